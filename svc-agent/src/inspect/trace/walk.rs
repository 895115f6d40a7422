//! The walk itself: each check of the programs, in their order, as a step (see the parent
//! module's docs).

use super::*;

/// The packet in map form.
#[derive(Clone, Copy)]
pub(super) struct Pkt {
    pub(super) src: Addr,
    pub(super) dst: Addr,
    pub(super) family: u8,
    /// Network order; 0 when not known.
    pub(super) sport: u16,
    pub(super) has_sport: bool,
    /// Network order.
    pub(super) dport: u16,
    pub(super) proto: u8,
    pub(super) syn: bool,
}

impl Pkt {
    pub(super) fn new(p: &Packet) -> Self {
        let (src, family) = map_addr(p.src);
        let (dst, _) = map_addr(p.dst.ip());
        Self {
            src,
            dst,
            family,
            sport: p.sport.unwrap_or(0).to_be(),
            has_sport: p.sport.is_some(),
            dport: p.dst.port().to_be(),
            proto: p.proto,
            syn: p.proto == ipproto::TCP && p.syn,
        }
    }

    /// The forward conntrack key of the packet's tuple (also what Maglev and SNAT hash).
    pub(super) fn fwd_key(&self) -> CtKey {
        CtKey {
            src: self.src,
            dst: self.dst,
            sport: Be16(self.sport),
            dport: Be16(self.dport),
            proto: self.proto,
            family: self.family,
            dir: dir::FORWARD,
            _pad: 0,
        }
    }

    fn addr(&self, a: &Addr, port_be: u16) -> String {
        fmt_addr(a, self.family, u16::from_be(port_be))
    }

    pub(super) fn source(&self) -> String {
        if self.has_sport {
            self.addr(&self.src, self.sport)
        } else {
            ip(&self.src, self.family).to_string()
        }
    }

    fn tcp_midflow(&self) -> bool {
        self.proto == ipproto::TCP && !self.syn
    }
}

/// How a determined backend was chosen.
enum Chosen {
    /// This backend (id and entry).
    One(u32, Backend),
    /// One of these backend ids: at random, or by a source port the trace was not given.
    OneOf(Vec<u32>),
    /// No backend: the kernel's verdict.
    Drop(DropReason),
}

pub(super) struct Walk<'a, M: TraceMaps> {
    pub(super) maps: &'a M,
    pub(super) p: Pkt,
    pub(super) now: u64,
    pub(super) out: Trace,
}

fn secs(ns: u64) -> u64 {
    ns / 1_000_000_000
}

impl<M: TraceMaps> Walk<'_, M> {
    fn step(&mut self, check: &str, result: impl Into<String>, detail: impl Into<String>) {
        let step = self.out.steps.len() + 1;
        self.out.steps.push(Step {
            step,
            check: check.to_owned(),
            result: result.into(),
            detail: detail.into(),
        });
    }

    fn passed(&mut self) {
        "passed".clone_into(&mut self.out.verdict);
    }

    fn dropped(&mut self, reason: DropReason) {
        "dropped".clone_into(&mut self.out.verdict);
        self.out.drop_reason = Some(reason.name().to_owned());
    }

    fn rejected(&mut self, why: &str) {
        "rejected".clone_into(&mut self.out.verdict);
        self.out.drop_reason = Some(why.to_owned());
    }

    fn translated(&mut self, src: String, dst: String) {
        "translated".clone_into(&mut self.out.verdict);
        self.out.rewritten = Some(Rewritten {
            source: src,
            destination: dst,
        });
    }

    fn addr_flags(&self, a: &Addr) -> u32 {
        self.maps.addr_flags(&AddrKey {
            addr: *a,
            family: self.p.family,
            _pad: [0; 3],
        })
    }

    fn backend_ref(&self, id: u32, slot: Option<u16>) -> BackendRef {
        let b = self.maps.backend(id);
        BackendRef {
            id,
            endpoint: b.map_or_else(String::new, |b| self.p.addr(&b.addr, b.port.0)),
            pod: self.maps.backend_name(id),
            state: match b {
                None => "missing",
                Some(b) if b.flags & backend_flags::TERMINATING != 0 => "terminating",
                Some(_) => "ready",
            }
            .to_owned(),
            local: b.is_some_and(|b| b.flags & backend_flags::LOCAL != 0),
            slot,
        }
    }

    fn frontend_ref(&self, key: &ServiceKey, v: &ServiceValue) -> FrontendRef {
        let name = self.maps.frontend_name(v.id);
        FrontendRef {
            id: v.id,
            frontend: fmt_addr(&key.addr, key.family, key.port.to_host()),
            protocol: proto_name(key.proto).to_owned(),
            scope: if key.scope == scope::EXTERNAL {
                "external"
            } else {
                "internal"
            }
            .to_owned(),
            kind: kind_name(v.flags).to_owned(),
            service: name.as_ref().map(|(s, _)| s.clone()),
            port_name: name.map(|(_, p)| p),
        }
    }

    /// `addr:port (pod, state)` of a backend, for sentences.
    fn describe(&self, id: u32) -> String {
        let r = self.backend_ref(id, None);
        if r.state == "missing" {
            return format!("backend id {id} (not in BACKENDS_V1)");
        }
        let mut s = format!("{} (", r.endpoint);
        if let Some(pod) = &r.pod {
            let _ = write!(s, "{pod}, ");
        }
        let _ = write!(
            s,
            "{}, {}, id {id})",
            r.state,
            if r.local { "local" } else { "remote" }
        );
        s
    }

    // ---- The pod path (svc_tc_from_pod).

    pub(super) fn pod_path(&mut self) {
        let flags = self.addr_flags(&self.p.dst);
        if flags & addr_flags::FRONTEND == 0 {
            let dst = ip(&self.p.dst, self.p.family);
            self.step(
                "address",
                "not a frontend",
                format!(
                    "{dst} is no frontend address (ADDRS_V1): not a Service's; the packet goes \
                     on untouched (TCX_NEXT)"
                ),
            );
            return self.passed();
        }
        self.step(
            "address",
            "frontend",
            format!(
                "{} is a frontend address ({})",
                ip(&self.p.dst, self.p.family),
                addr_words(flags)
            ),
        );
        if self.maps.socket_programs() {
            self.step(
                "socket",
                "note",
                "connect-time programs are attached: a process whose socket they translate \
                 (every one with --socket-lb all, host processes with host-only) makes the \
                 same choice below at connect()/sendto(), with ClientIP affinity keyed by its \
                 network namespace rather than its address, and makes no conntrack entry: its \
                 packets reach this program addressed to the backend and pass untouched. This \
                 trace follows the per-packet path",
            );
        }
        if let Some(e) = self.established(false) {
            return self.keep(&e, false);
        }
        self.new_flow(scope::INTERNAL, flags);
    }

    // ---- The node-facing path (svc_tc_from_world).

    pub(super) fn world_path(&mut self) {
        if self.snat_reply() {
            return;
        }
        let flags = self.addr_flags(&self.p.dst);
        if flags & addr_flags::EXTERNAL == 0 {
            self.step(
                "address",
                "not external",
                format!(
                    "{} is no external frontend address (ADDRS_V1 flag external): the node's \
                     own traffic; the packet goes on untouched (TCX_NEXT)",
                    ip(&self.p.dst, self.p.family)
                ),
            );
            return self.passed();
        }
        self.step(
            "address",
            "external",
            format!(
                "{} is an external frontend address ({})",
                ip(&self.p.dst, self.p.family),
                addr_words(flags)
            ),
        );
        if let Some(e) = self.established(true) {
            return self.keep(&e, true);
        }
        if !self.source_allowed() {
            return self.dropped(DropReason::SourceRange);
        }
        self.new_flow(scope::EXTERNAL, flags);
    }

    /// The reply of a flow this node SNAT'd (`world.rs` `snat_reply`); true when the packet is
    /// addressed to the SNAT address and range (the walk ends there).
    fn snat_reply(&mut self) -> bool {
        let p = self.p;
        let Some(cfg) = self.maps.snat_config(p.family).filter(|c| c.enabled != 0) else {
            return false;
        };
        let port = u16::from_be(p.dport);
        if cfg.addr != p.dst || port < cfg.port_min || port > cfg.port_max {
            return false;
        }
        let range = format!("{}-{}", cfg.port_min, cfg.port_max);
        if !p.has_sport {
            self.step(
                "snat-reply",
                "needs source port",
                format!(
                    "{} is this node's SNAT address and port {port} is in the SNAT range \
                     {range}: the reply of an SNAT'd flow if SNAT_V1 holds its tuple, which \
                     needs the endpoint's port (--from ADDR:PORT)",
                    ip(&p.dst, p.family)
                ),
            );
            self.passed();
            return true;
        }
        let mut key = CtKey {
            dir: dir::REPLY,
            ..p.fwd_key()
        };
        let Some(nat) = self.maps.snat(&key) else {
            self.step(
                "snat-reply",
                "unknown",
                format!(
                    "addressed to the SNAT address and range {range}, but SNAT_V1 has no flow \
                     on this tuple: passed to the node untouched (no socket holds a reserved \
                     port: it answers with a reset)"
                ),
            );
            self.passed();
            return true;
        };
        key.dst = nat.client;
        key.dport = nat.client_port;
        let client = p.addr(&nat.client, nat.client_port.0);
        let Some((table, e)) = self.ct_live(&key) else {
            self.step(
                "snat-reply",
                "no flow",
                format!(
                    "SNAT_V1 names client {client}, but neither connection table holds the \
                     flow's reply entry any more: passed untouched"
                ),
            );
            self.passed();
            return true;
        };
        if e.snat_port.0 != p.dport {
            self.step(
                "snat-reply",
                "stale",
                format!(
                    "SNAT_V1 names client {client}, but the flow on that tuple ({table}) took \
                     SNAT port {}: an older flow's entry; passed untouched",
                    e.snat_port.to_host()
                ),
            );
            self.passed();
            return true;
        }
        self.out.flow = Some("established".to_owned());
        self.set_frontend_by_id(e.frontend_id);
        self.out.backend = Some(self.backend_ref(e.backend_id, None));
        let frontend = p.addr(&e.addr, e.port.0);
        self.step(
            "snat-reply",
            "reverse SNAT",
            format!(
                "the reply of an SNAT'd flow (SNAT_V1, reply entry in {table}): destination \
                 back to the client {client}, source back to the frontend {frontend}; sent on \
                 by the program (FIB lookup; no route: dropped, no_route)"
            ),
        );
        self.translated(frontend, client);
        true
    }

    /// The live entry of `key` in `CT_V1`, else `CT_NEW_V1` (the programs' `ct_lookup`).
    fn ct_live(&self, key: &CtKey) -> Option<(&'static str, CtValue)> {
        [(false, "CT_V1"), (true, "CT_NEW_V1")]
            .into_iter()
            .find_map(|(unanswered, name)| {
                let e = self.maps.ct(unanswered, key)?;
                let idle = self.now.saturating_sub(e.last_seen_ns);
                (idle <= idle_timeout_ns(unanswered, key.proto, e.state)).then_some((name, e))
            })
    }

    fn source_allowed(&mut self) -> bool {
        let p = self.p;
        let key = SourceRangeKey {
            frontend: p.dst,
            port: Be16(p.dport),
            proto: p.proto,
            family: p.family,
            client: p.src,
        };
        let client = ip(&p.src, p.family);
        match self.maps.source_range(&key) {
            None => {
                self.step(
                    "source-ranges",
                    "none",
                    "SOURCE_RANGES_V1 has no ranges for this frontend: every client may open \
                     flows",
                );
                true
            }
            Some(verdict::ALLOW) => {
                self.step(
                    "source-ranges",
                    "allowed",
                    format!("{client} is in one of the frontend's loadBalancerSourceRanges"),
                );
                true
            }
            Some(_) => {
                self.step(
                    "source-ranges",
                    "denied",
                    format!(
                        "the frontend has loadBalancerSourceRanges and {client} is in none: a \
                         new flow is dropped (source_range); established ones keep going"
                    ),
                );
                false
            }
        }
    }

    // ---- Connection tables (pod.rs `established_backend`).

    /// The entry whose backend the packet keeps, if any (each table looked at is a step).
    fn established(&mut self, external: bool) -> Option<CtValue> {
        if !self.p.has_sport {
            self.step(
                "conntrack",
                "not looked up",
                "no source port given: the packet is taken as a new flow's (an entry needs \
                 the whole tuple; give --from ADDR:PORT to look one up)",
            );
            return None;
        }
        let fwd = self.p.fwd_key();
        for (unanswered, name) in [(false, "CT_V1"), (true, "CT_NEW_V1")] {
            let Some(e) = self.maps.ct(unanswered, &fwd) else {
                self.step("conntrack", "miss", format!("{name}: no forward entry"));
                continue;
            };
            let idle = self.now.saturating_sub(e.last_seen_ns);
            let timeout = idle_timeout_ns(unanswered, fwd.proto, e.state);
            if idle > timeout {
                self.step(
                    "conntrack",
                    "expired",
                    format!(
                        "{name}: an entry idle {} s, past its {} s timeout: as absent",
                        secs(idle),
                        secs(timeout)
                    ),
                );
                continue;
            }
            let to = self.describe(e.backend_id);
            match self.may_keep(&e) {
                Ok(()) => {
                    let mut detail = format!(
                        "{name}: the flow goes to {to} (state {}, idle {} s)",
                        crate::inspect::ct::state_words(e.state),
                        secs(idle)
                    );
                    if unanswered {
                        detail.push_str(&promotion(&e, external, self.p.syn));
                    }
                    self.step("conntrack", "hit", detail);
                    return Some(e);
                }
                Err(why) => {
                    let mut detail = format!("{name}: an entry to {to}, but {why}");
                    if !unanswered {
                        detail.push_str("; the program removes its pair");
                    }
                    self.step("conntrack", "chooses again", detail);
                    if unanswered {
                        return None;
                    }
                }
            }
        }
        None
    }

    /// Whether the packet may go where `e` says (pod.rs `may_keep`), or why not.
    fn may_keep(&self, e: &CtValue) -> Result<(), &'static str> {
        let backend = self.maps.backend(e.backend_id);
        if e.state & state::HAIRPIN_REPLY != 0 {
            return backend
                .map(|_| ())
                .ok_or("its backend is no longer in BACKENDS_V1");
        }
        let Some(b) = backend.filter(|b| b.addr == e.addr && b.port == e.port) else {
            return Err("its backend is no longer in BACKENDS_V1 (or names another endpoint)");
        };
        if self.p.syn && e.state & state::ENDING != 0 {
            return Err("a SYN on a connection that ended (FIN or reset seen) opens a new one");
        }
        if self.p.syn && b.flags & backend_flags::TERMINATING != 0 {
            return Err("its backend is terminating and a SYN opens a new connection");
        }
        Ok(())
    }

    fn set_frontend_by_id(&mut self, id: u32) {
        if let Some((k, v)) = self.maps.frontends().into_iter().find(|(_, v)| v.id == id) {
            self.out.frontend = Some(self.frontend_ref(&k, &v));
        }
    }

    /// A tracked flow keeps its backend: the rewrite (pod.rs `to_service`, world.rs
    /// `to_external_service` after `established_backend`).
    fn keep(&mut self, e: &CtValue, external: bool) {
        let p = self.p;
        self.out.flow = Some("established".to_owned());
        self.set_frontend_by_id(e.frontend_id);
        self.out.backend = Some(self.backend_ref(e.backend_id, None));
        let target = p.addr(&e.addr, e.port.0);
        if e.state & state::HAIRPIN_REPLY != 0 {
            let pod = p.addr(&p.src, p.dport);
            self.step(
                "rewrite",
                "hairpin reply",
                format!(
                    "the reply leg of a pod reaching itself: destination {pod}, source the \
                     service {target}; sent straight back out to the pod"
                ),
            );
            return self.translated(target, pod);
        }
        if !external {
            return self.rewrite_to(e.addr, e.port.0);
        }
        if e.snat_port.0 == 0 {
            self.step(
                "rewrite",
                "destination",
                format!("destination {target}; the endpoint is on this node (no SNAT)"),
            );
            return self.translated(p.source(), target);
        }
        let Some(cfg) = self.maps.snat_config(p.family).filter(|c| c.enabled != 0) else {
            self.step(
                "snat",
                "no address",
                "the flow was given an SNAT port but SNAT_CONFIG_V1 has no address of its \
                 family now: dropped (nat_no_address)",
            );
            return self.dropped(DropReason::NatNoAddress);
        };
        let port = e.snat_port.to_host();
        self.out.snat = Some(SnatRef {
            address: ip(&cfg.addr, p.family),
            port_min: cfg.port_min,
            port_max: cfg.port_max,
            port: Some(port),
        });
        let src = p.addr(&cfg.addr, e.snat_port.0);
        self.step(
            "snat",
            "established",
            format!(
                "the flow's endpoint is on another node: source {src} (its SNAT port), \
                 destination {target}; sent on by the program (FIB lookup)"
            ),
        );
        self.translated(src, target);
    }

    /// The pod path's rewrite to `addr:port` (network order), with the hairpin case.
    fn rewrite_to(&mut self, addr: Addr, port: u16) {
        let p = self.p;
        let target = p.addr(&addr, port);
        if addr == p.src {
            let vip = if p.has_sport {
                p.addr(&p.dst, p.sport)
            } else {
                ip(&p.dst, p.family).to_string()
            };
            self.step(
                "rewrite",
                "hairpin",
                format!(
                    "the pod reaches itself: destination {target}, source the service \
                     address {vip}, so its reply comes back here; sent straight back out"
                ),
            );
            return self.translated(vip, target);
        }
        self.step("rewrite", "destination", format!("destination {target}"));
        self.translated(p.source(), target);
    }

    // ---- A new flow (pod.rs `new_flow_backend`, lb.rs `lb_select_for_client`).

    fn new_flow(&mut self, scope: u8, addr_flags: u32) {
        let p = self.p;
        let key = ServiceKey {
            addr: p.dst,
            port: Be16(p.dport),
            slot: 0,
            proto: p.proto,
            family: p.family,
            scope,
            _pad: 0,
        };
        let Some(fe) = self.maps.service(&key) else {
            return self.not_service(scope, addr_flags);
        };
        self.out.flow = Some("new".to_owned());
        let f = self.frontend_ref(&key, &fe);
        self.step("frontend", "found", describe_frontend(&f, &fe));
        self.out.frontend = Some(f);
        self.slots(&key, &fe);
        let chosen = self.choose(&key, &fe);
        match chosen {
            Chosen::Drop(DropReason::NoEndpoints) => {
                self.step(
                    "choice",
                    "no endpoints",
                    format!(
                        "the Service has no endpoint at all: rejected at once ({}; dropped, \
                         no_endpoints, when that cannot be built)",
                        reject_words(p.proto)
                    ),
                );
                self.rejected(DropReason::NoEndpoints.name());
            }
            Chosen::Drop(reason) => {
                self.step(
                    "choice",
                    "dropped",
                    format!("{}: dropped ({})", drop_words(reason), reason.name()),
                );
                self.dropped(reason);
            }
            Chosen::One(id, b) => self.one(id, &b, scope),
            Chosen::OneOf(ids) => self.one_of(&ids, scope),
        }
    }

    fn not_service(&mut self, scope: u8, addr_flags: u32) {
        let port = u16::from_be(self.p.dport);
        let proto = proto_name(self.p.proto);
        if scope == scope::EXTERNAL {
            self.step(
                "frontend",
                "none",
                format!(
                    "no external frontend on port {port}/{proto}: a port of the node's own; \
                     passed untouched"
                ),
            );
            return self.passed();
        }
        if addr_flags & addr_flags::CLUSTER_IP != 0 {
            self.step(
                "frontend",
                "unlisted port",
                format!(
                    "a ClusterIP, but its Service has no port {port}/{proto}: rejected at once \
                     ({}; dropped, unlisted_port_dropped, when that cannot be built)",
                    reject_words(self.p.proto)
                ),
            );
            return self.rejected("unlisted_port");
        }
        self.step(
            "frontend",
            "none",
            format!(
                "no frontend on port {port}/{proto} of this (node, external or load-balancer) \
                 address: passed untouched"
            ),
        );
        self.passed();
    }

    /// The frontend's slots, and the backends of its Service port they leave out.
    fn slots(&mut self, key: &ServiceKey, fe: &ServiceValue) {
        let mut listed = Vec::new();
        let mut odd = Vec::new();
        for slot in 1..=fe.count {
            let id = self
                .maps
                .service(&ServiceKey { slot, ..*key })
                .map_or(0, |s| s.id);
            let r = self.backend_ref(id, Some(slot));
            if id == 0 || r.state == "missing" {
                odd.push(format!(
                    "slot {slot} is missing or names no backend: a flow picking it is dropped \
                     (backend_missing)"
                ));
            } else if r.state == "terminating" && fe.flags & flags::SERVES_TERMINATING == 0 {
                odd.push(format!(
                    "slot {slot} holds a terminating backend though the frontend has ready \
                     ones (a pass was cut short?)"
                ));
            } else if !r.local && fe.flags & flags::LOCAL_ONLY != 0 {
                odd.push(format!(
                    "slot {slot} holds a remote backend under a Local policy (a pass was cut \
                     short?)"
                ));
            }
            listed.push(r);
        }
        self.out.excluded = self.excluded(key, fe, &listed);
        let mut detail = if listed.is_empty() {
            "no slots: new flows have no backend to go to".to_owned()
        } else {
            let words = listed
                .iter()
                .map(|r| format!("{}: {}", r.slot.unwrap_or(0), self.describe(r.id)))
                .collect::<Vec<_>>()
                .join("; ");
            let which = if fe.flags & flags::SERVES_TERMINATING != 0 {
                "no endpoint is ready: the slots hold the serving terminating ones"
            } else if fe.flags & flags::LOCAL_ONLY != 0 {
                "ready endpoints on this node (traffic policy Local)"
            } else {
                "ready endpoints"
            };
            format!("{which}: {words}")
        };
        for o in &odd {
            let _ = write!(detail, "; {o}");
        }
        for x in &self.out.excluded {
            let _ = write!(
                detail,
                "; not in a slot: {} ({})",
                self.describe(x.backend.id),
                x.reason
            );
        }
        self.step(
            "slots",
            format!("{} eligible", fe.count.saturating_sub(odd.len() as u16)),
            detail,
        );
        self.out.slots = listed;
    }

    /// Backends of the same Service port (the slots of its other frontends of this family:
    /// the maps keep no list of the backends a frontend holds only for established flows) that
    /// `slots` leave out, with why.
    fn excluded(&self, key: &ServiceKey, fe: &ServiceValue, slots: &[BackendRef]) -> Vec<Excluded> {
        let Some(name) = self.maps.frontend_name(fe.id) else {
            return Vec::new();
        };
        let mine: Vec<u32> = slots.iter().map(|r| r.id).collect();
        let mut ids: Vec<u32> = Vec::new();
        for (k, v) in self.maps.frontends() {
            if v.id == fe.id
                || k.family != key.family
                || self.maps.frontend_name(v.id).as_ref() != Some(&name)
            {
                continue;
            }
            for slot in 1..=v.count {
                if let Some(s) = self.maps.service(&ServiceKey { slot, ..k })
                    && !mine.contains(&s.id)
                    && !ids.contains(&s.id)
                    && self.maps.backend(s.id).is_some()
                {
                    ids.push(s.id);
                }
            }
        }
        ids.sort_unstable();
        ids.into_iter()
            .map(|id| {
                let b = self.maps.backend(id).unwrap_or_default();
                let policy = if key.scope == scope::EXTERNAL {
                    "externalTrafficPolicy"
                } else {
                    "internalTrafficPolicy"
                };
                let reason = if b.flags & backend_flags::TERMINATING != 0
                    && fe.flags & flags::SERVES_TERMINATING == 0
                {
                    "terminating: no new flows while the Service has ready endpoints".to_owned()
                } else if b.flags & backend_flags::LOCAL == 0 && fe.flags & flags::LOCAL_ONLY != 0 {
                    format!("on another node: {policy} Local")
                } else {
                    "not in this frontend's slots (topology hints?)".to_owned()
                };
                Excluded {
                    backend: self.backend_ref(id, None),
                    reason,
                }
            })
            .collect()
    }

    /// The backend choice (lb.rs `lb_select_for_client` and `lb_pick_slot`).
    fn choose(&mut self, key: &ServiceKey, fe: &ServiceValue) -> Chosen {
        if fe.affinity_timeout == 0 {
            self.step("affinity", "off", "no ClientIP session affinity");
        } else if fe.count == 0 {
            self.step(
                "affinity",
                "not consulted",
                "ClientIP affinity, but no slots: nothing to stick to",
            );
        } else if let Some(chosen) = self.affinity(fe) {
            return chosen;
        }
        if fe.count != 0
            && key.scope == scope::EXTERNAL
            && let Some(chosen) = self.maglev(fe)
        {
            return chosen;
        }
        if fe.count == 0 {
            return Chosen::Drop(if fe.flags & flags::DROP_EMPTY != 0 {
                DropReason::NoLocalEndpoint
            } else {
                DropReason::NoEndpoints
            });
        }
        if self.p.tcp_midflow() {
            if !self.p.has_sport {
                self.step(
                    "choice",
                    format!("one of {}", fe.count),
                    "a TCP packet that is not a SYN and has no entry (lost, expired) picks the \
                     slot its tuple hashes to (counted ct_miss_midflow): give --from ADDR:PORT \
                     to see which",
                );
                return Chosen::OneOf(self.slot_ids(key, fe));
            }
            let slot = (flow_hash(&self.p.fwd_key()) % u32::from(fe.count)) as u16 + 1;
            return self.pick_slot(key, slot, "the slot its tuple hashes to (a TCP packet that is not a SYN without an entry: counted ct_miss_midflow)");
        }
        if fe.count == 1 {
            return self.pick_slot(key, 1, "the only slot");
        }
        self.step(
            "choice",
            format!("one of {}", fe.count),
            format!(
                "a random slot (1 + random % {}): any of the slots above",
                fe.count
            ),
        );
        Chosen::OneOf(self.slot_ids(key, fe))
    }

    fn slot_ids(&self, key: &ServiceKey, fe: &ServiceValue) -> Vec<u32> {
        (1..=fe.count)
            .map(|slot| {
                self.maps
                    .service(&ServiceKey { slot, ..*key })
                    .map_or(0, |s| s.id)
            })
            .collect()
    }

    fn pick_slot(&mut self, key: &ServiceKey, slot: u16, how: &str) -> Chosen {
        let Some(s) = self.maps.service(&ServiceKey { slot, ..*key }) else {
            self.step(
                "choice",
                format!("slot {slot}"),
                format!("{how}: slot {slot}, which SERVICES_V1 does not hold"),
            );
            return Chosen::Drop(DropReason::BackendMissing);
        };
        let Some(b) = self.maps.backend(s.id) else {
            self.step(
                "choice",
                format!("slot {slot}"),
                format!(
                    "{how}: slot {slot}, backend id {}, not in BACKENDS_V1",
                    s.id
                ),
            );
            return Chosen::Drop(DropReason::BackendMissing);
        };
        let to = self.describe(s.id);
        self.step(
            "choice",
            format!("slot {slot}"),
            format!("{how}: slot {slot}, {to}"),
        );
        Chosen::One(s.id, b)
    }

    /// `ClientIP` affinity: the client's live entry, if it may be honoured (else a step says
    /// why not and the choice goes on).
    fn affinity(&mut self, fe: &ServiceValue) -> Option<Chosen> {
        let p = self.p;
        let akey = AffinityKey {
            client: p.src,
            frontend_id: fe.id,
            family: p.family,
            _pad: [0; 3],
        };
        let client = ip(&p.src, p.family);
        let Some(a) = self.maps.affinity(&akey) else {
            self.step(
                "affinity",
                "none yet",
                format!(
                    "ClientIP affinity ({} s): no AFFINITY_V1 entry for {client}; the choice \
                     below becomes its entry",
                    fe.affinity_timeout
                ),
            );
            return None;
        };
        let idle = self.now.saturating_sub(a.last_used_ns);
        let to = self.describe(a.backend_id);
        let b = self.maps.backend(a.backend_id);
        let why_not = if idle > u64::from(fe.affinity_timeout) * 1_000_000_000 {
            Some(format!("it is idle {} s, past the timeout", secs(idle)))
        } else if let Some(b) = b {
            if b.flags & backend_flags::TERMINATING != 0
                && fe.flags & flags::SERVES_TERMINATING == 0
            {
                Some("its backend is terminating (the Service has ready endpoints)".to_owned())
            } else if b.flags & backend_flags::LOCAL == 0 && fe.flags & flags::LOCAL_ONLY != 0 {
                Some("its backend is on another node (traffic policy Local)".to_owned())
            } else if a.check != 0 && a.check != fingerprint(fe.id, &b) {
                Some("its backend id now names another endpoint (fingerprint differs)".to_owned())
            } else {
                None
            }
        } else {
            Some("its backend is no longer in BACKENDS_V1".to_owned())
        };
        match (why_not, b) {
            (None, Some(b)) => {
                self.step(
                    "affinity",
                    "sticks",
                    format!(
                        "{client} sticks to {to} (AFFINITY_V1, used {} s ago, timeout {} s)",
                        secs(idle),
                        fe.affinity_timeout
                    ),
                );
                Some(Chosen::One(a.backend_id, b))
            }
            (why, _) => {
                self.step(
                    "affinity",
                    "not honoured",
                    format!(
                        "{client}'s entry names {to}, but {}; the choice below replaces it",
                        why.unwrap_or_default()
                    ),
                );
                None
            }
        }
    }

    /// The frontend's Maglev table (lb.rs `lb_maglev`): its choice for the flow, or `None`
    /// when the slots decide (a step says why).
    fn maglev(&mut self, fe: &ServiceValue) -> Option<Chosen> {
        let chunks: Vec<(u32, MaglevChunk)> = (0..MAGLEV_CHUNKS)
            .filter_map(|chunk| {
                let key = MaglevKey {
                    frontend_id: fe.id,
                    chunk,
                };
                self.maps.maglev(&key).map(|c| (chunk, c))
            })
            .collect();
        let Some(m) = maglev_size(&chunks) else {
            self.step(
                "maglev",
                "no table",
                format!(
                    "MAGLEV_V1 has no table for frontend id {} (Maglev off: \
                     --maglev-table-size 0, or not written yet): the slots decide",
                    fe.id
                ),
            );
            return None;
        };
        if !self.p.has_sport {
            let mut ids: Vec<u32> = Vec::new();
            for (_, c) in &chunks {
                for id in c.backend_ids.iter().filter(|id| **id != 0) {
                    if !ids.contains(id) {
                        ids.push(*id);
                    }
                }
            }
            ids.sort_unstable();
            self.step(
                "maglev",
                format!("one of {}", ids.len()),
                format!(
                    "the frontend's Maglev table ({m} entries) picks by a hash of the whole \
                     tuple: give --from ADDR:PORT to see which"
                ),
            );
            return Some(Chosen::OneOf(ids));
        }
        let index = flow_hash(&self.p.fwd_key()) % m;
        let (chunk, at) = locate(index);
        let id = chunks
            .iter()
            .find(|(c, _)| *c == chunk)
            .map_or(0, |(_, c)| c.backend_ids[at]);
        let Some(b) = self.maps.backend(id) else {
            self.step(
                "maglev",
                "stale entry",
                format!(
                    "entry {index} of the table ({m} entries) names backend id {id}, not in \
                     BACKENDS_V1: the slots decide"
                ),
            );
            return None;
        };
        let to = self.describe(id);
        self.step(
            "maglev",
            format!("entry {index}"),
            format!(
                "the flow's tuple hashes to entry {index} of the frontend's Maglev table \
                 ({m} entries): {to} (the same on every node with these endpoints)"
            ),
        );
        Some(Chosen::One(id, b))
    }

    /// A new flow to one backend: reply tuple, SNAT, rewrite.
    fn one(&mut self, id: u32, b: &Backend, scope: u8) {
        self.out.backend = Some(self.backend_ref(id, None));
        if let Some(reason) = self.reply_clash(b) {
            return self.dropped(reason);
        }
        if scope == scope::EXTERNAL {
            return self.snat_new(b);
        }
        self.rewrite_to(b.addr, b.port.0);
    }

    /// A new flow to one of `ids`.
    fn one_of(&mut self, ids: &[u32], scope: u8) {
        let p = self.p;
        self.out.candidates = ids
            .iter()
            .map(|id| {
                let slot = self
                    .out
                    .slots
                    .iter()
                    .find(|s| s.id == *id)
                    .and_then(|s| s.slot);
                self.backend_ref(*id, slot)
            })
            .collect();
        let live: Vec<String> = self
            .out
            .candidates
            .iter()
            .filter(|c| c.state != "missing")
            .map(|c| c.endpoint.clone())
            .collect();
        if live.is_empty() {
            self.step(
                "choice",
                "none usable",
                "every slot names a backend BACKENDS_V1 does not hold: dropped (backend_missing)",
            );
            return self.dropped(DropReason::BackendMissing);
        }
        if scope == scope::EXTERNAL
            && self.out.candidates.iter().any(|c| !c.local)
            && let Some(cfg) = self.maps.snat_config(p.family)
        {
            let detail = if cfg.enabled == 0 {
                "if an endpoint on another node is chosen, the flow is dropped: no SNAT address \
                 of this family (nat_no_address)"
                    .to_owned()
            } else {
                format!(
                    "if an endpoint on another node is chosen: source {} and a port of {}-{} \
                     (SNAT); a local one keeps the client's address",
                    ip(&cfg.addr, p.family),
                    cfg.port_min,
                    cfg.port_max
                )
            };
            self.step("snat", "depends", detail);
        }
        self.step(
            "rewrite",
            "destination",
            format!("destination one of {}", live.join(", ")),
        );
        "translated".clone_into(&mut self.out.verdict);
    }

    /// Whether the new flow's reply tuple is a live flow's of another frontend (conntrack.rs
    /// `ct_claim_reply`): the flow is then dropped. Needs the source port.
    fn reply_clash(&mut self, b: &Backend) -> Option<DropReason> {
        if !self.p.has_sport {
            return None;
        }
        let fwd = self.p.fwd_key();
        let reply = reply_key(&fwd, &b.addr, b.port);
        if reply.dir != dir::REPLY {
            return None;
        }
        for (unanswered, name) in [(false, "CT_V1"), (true, "CT_NEW_V1")] {
            let Some(e) = self.maps.ct(unanswered, &reply) else {
                continue;
            };
            if e.addr == fwd.dst && e.port == fwd.dport {
                continue;
            }
            let idle = self.now.saturating_sub(e.last_seen_ns);
            let owner = self.p.addr(&e.addr, e.port.0);
            if idle <= idle_timeout_ns(unanswered, reply.proto, e.state)
                && e.state & state::CLOSING == 0
            {
                self.step(
                    "reply-tuple",
                    "clash",
                    format!(
                        "{name}: the reply tuple (backend -> client port) belongs to a live \
                         flow to {owner}: the new flow is dropped (ct_reply_clash)"
                    ),
                );
                return Some(DropReason::CtReplyClash);
            }
            self.step(
                "reply-tuple",
                "replaces",
                format!(
                    "{name}: the reply tuple was an ended flow's (to {owner}): its pair is \
                     replaced"
                ),
            );
        }
        None
    }

    /// SNAT of a new external flow (nat.rs `snat_new_flow`), then the rewrite.
    fn snat_new(&mut self, b: &Backend) {
        let p = self.p;
        let target = p.addr(&b.addr, b.port.0);
        if b.flags & backend_flags::LOCAL != 0 {
            self.step(
                "snat",
                "none",
                "the endpoint is on this node: no SNAT, the client's address is kept",
            );
            self.step("rewrite", "destination", format!("destination {target}"));
            return self.translated(p.source(), target);
        }
        let Some(cfg) = self.maps.snat_config(p.family).filter(|c| c.enabled != 0) else {
            self.step(
                "snat",
                "no address",
                "the endpoint is on another node and this node has no SNAT address of the \
                 family (SNAT_CONFIG_V1): dropped (nat_no_address)",
            );
            return self.dropped(DropReason::NatNoAddress);
        };
        let node = ip(&cfg.addr, p.family);
        let mut snat = SnatRef {
            address: node,
            port_min: cfg.port_min,
            port_max: cfg.port_max,
            port: None,
        };
        if !p.has_sport {
            self.step(
                "snat",
                "node address",
                format!(
                    "the endpoint is on another node: source {node} and the first free of \
                     {PORT_TRIES} ports of {}-{} from a hash of the tuple",
                    cfg.port_min, cfg.port_max
                ),
            );
            self.out.snat = Some(snat);
            self.step("rewrite", "destination", format!("destination {target}"));
            return self.translated(node.to_string(), target);
        }
        let Some((port, own)) = self.snat_port(b, &cfg) else {
            self.step(
                "snat",
                "exhausted",
                format!(
                    "the endpoint is on another node, and all {PORT_TRIES} ports this tuple \
                     tries are other flows' (SNAT_V1): dropped (nat_ports_exhausted)"
                ),
            );
            return self.dropped(DropReason::NatPortsExhausted);
        };
        snat.port = Some(port);
        self.out.snat = Some(snat);
        let src = fmt_addr(&cfg.addr, p.family, port);
        self.step(
            "snat",
            format!("port {port}"),
            format!(
                "the endpoint is on another node: source {src} ({}; unless SNAT_V1 is full: \
                 nat_table_full), so its reply comes back here; sent on by the program (FIB \
                 lookup)",
                if own {
                    "the port SNAT_V1 already holds for this client and port"
                } else {
                    "the first free port the tuple's hash tries"
                }
            ),
        );
        self.step("rewrite", "destination", format!("destination {target}"));
        self.translated(src, target);
    }

    /// The SNAT port the flow takes (and whether `SNAT_V1` already held it for this client), or
    /// `None` when every candidate is taken.
    fn snat_port(&self, b: &Backend, cfg: &SnatConfig) -> Option<(u16, bool)> {
        let p = self.p;
        let hash = flow_hash(&p.fwd_key());
        (0..PORT_TRIES).find_map(|n| {
            let port = candidate_port(hash, n, cfg.port_min, cfg.port_max);
            let key = CtKey {
                src: b.addr,
                dst: cfg.addr,
                sport: b.port,
                dport: Be16(port.to_be()),
                proto: p.proto,
                family: p.family,
                dir: dir::REPLY,
                _pad: 0,
            };
            match self.maps.snat(&key) {
                None => Some((port, false)),
                Some(v) if v.client == p.src && v.client_port.0 == p.sport => Some((port, true)),
                Some(_) => None,
            }
        })
    }
}

/// The table size M of a Maglev table from its chunks: entries are backend ids (never 0) up
/// to M, zero after. `None`: no table.
pub(super) fn maglev_size(chunks: &[(u32, MaglevChunk)]) -> Option<u32> {
    chunks
        .iter()
        .flat_map(|(chunk, c)| {
            c.backend_ids
                .iter()
                .enumerate()
                .filter(|(_, id)| **id != 0)
                .map(move |(i, _)| chunk * CHUNK + i as u32 + 1)
        })
        .max()
}

/// How a `CT_NEW_V1` hit is promoted (pod.rs `established_backend`).
fn promotion(e: &CtValue, external: bool, syn: bool) -> String {
    if e.state & state::HAIRPIN_REPLY != 0 {
        "; nothing answered it yet: this packet (the pod answering itself) moves the pair to \
         CT_V1"
            .to_owned()
    } else if external && !syn {
        "; nothing answered it yet: this packet (the client's second) moves the pair to CT_V1"
            .to_owned()
    } else {
        "; nothing answered it yet (the backend's first reply moves the pair to CT_V1)".to_owned()
    }
}

/// The `ADDRS_V1` flags, in words.
fn addr_words(f: u32) -> String {
    let names = [
        (addr_flags::FRONTEND, "frontend"),
        (addr_flags::CLUSTER_IP, "ClusterIP"),
        (addr_flags::EXTERNAL, "external"),
        (addr_flags::BACKEND, "backend"),
    ];
    let words: Vec<&str> = names
        .iter()
        .filter(|(bit, _)| f & bit != 0)
        .map(|(_, n)| *n)
        .collect();
    format!("ADDRS_V1: {}", words.join(", "))
}

fn reject_words(proto: u8) -> &'static str {
    if proto == ipproto::TCP {
        "a TCP reset"
    } else {
        "an ICMP port unreachable"
    }
}

fn drop_words(reason: DropReason) -> &'static str {
    match reason {
        DropReason::NoLocalEndpoint => {
            "the traffic policy is Local and no endpoint runs on this node"
        }
        DropReason::BackendMissing => "the chosen slot names no backend",
        _ => "no backend",
    }
}

fn describe_frontend(f: &FrontendRef, v: &ServiceValue) -> String {
    let name = match (&f.service, &f.port_name) {
        (Some(s), Some(p)) if !p.is_empty() => format!("{s} port {p}"),
        (Some(s), _) => s.clone(),
        _ => "an unnamed Service".to_owned(),
    };
    let mut s = format!(
        "{} {} ({}, scope {}, id {}): {name}; {} slot(s), policy {}",
        f.frontend,
        f.protocol,
        f.kind,
        f.scope,
        f.id,
        v.count,
        if v.flags & flags::LOCAL_ONLY != 0 {
            "Local"
        } else {
            "Cluster"
        }
    );
    if v.affinity_timeout != 0 {
        let _ = write!(s, ", ClientIP affinity {} s", v.affinity_timeout);
    }
    if v.count == 0 {
        s.push_str(if v.flags & flags::DROP_EMPTY != 0 {
            ", empty: drop"
        } else {
            ", empty: reject"
        });
    }
    s
}
