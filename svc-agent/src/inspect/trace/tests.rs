//! Every branch of the walk over in-memory maps.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
};

use svc_common::{addr::from_v4, nat::SnatConfig};

use super::{walk::maglev_size, *};

const NOW: u64 = 1_000 * 1_000_000_000;
const CLIENT: [u8; 4] = [198, 18, 1, 20];
const VIP: [u8; 4] = [198, 19, 0, 10];
const NODE: [u8; 4] = [198, 18, 0, 1];
const EXT: [u8; 4] = [198, 18, 100, 5];

/// In-memory maps (the longest-prefix match of `SOURCE_RANGES_V1` done here).
#[derive(Default)]
struct Mem {
    addrs: BTreeMap<AddrKey, u32>,
    services: BTreeMap<ServiceKey, ServiceValue>,
    backends: BTreeMap<u32, Backend>,
    backend_names: BTreeMap<u32, String>,
    frontend_names: BTreeMap<u32, (String, String)>,
    ct: HashMap<CtKey, CtValue>,
    ct_new: HashMap<CtKey, CtValue>,
    affinity: HashMap<AffinityKey, AffinityValue>,
    maglev: BTreeMap<MaglevKey, MaglevChunk>,
    ranges: Vec<(u32, SourceRangeKey, u32)>,
    snat_config: Option<SnatConfig>,
    snat: HashMap<CtKey, SnatValue>,
}

fn range_bytes(k: &SourceRangeKey) -> Vec<u8> {
    let mut b = k.frontend.to_vec();
    b.extend_from_slice(&k.port.0.to_ne_bytes());
    b.extend([k.proto, k.family]);
    b.extend_from_slice(&k.client);
    b
}

fn prefix_matches(bits: u32, a: &[u8], b: &[u8]) -> bool {
    (0..bits as usize).all(|i| (a[i / 8] ^ b[i / 8]) & (0x80 >> (i % 8)) == 0)
}

impl TraceMaps for Mem {
    fn addr_flags(&self, key: &AddrKey) -> u32 {
        self.addrs.get(key).copied().unwrap_or(0)
    }
    fn service(&self, key: &ServiceKey) -> Option<ServiceValue> {
        self.services.get(key).copied()
    }
    fn frontends(&self) -> Vec<(ServiceKey, ServiceValue)> {
        self.services
            .iter()
            .filter(|(k, _)| k.slot == 0)
            .map(|(k, v)| (*k, *v))
            .collect()
    }
    fn backend(&self, id: u32) -> Option<Backend> {
        self.backends.get(&id).copied()
    }
    fn backend_name(&self, id: u32) -> Option<String> {
        self.backend_names.get(&id).cloned()
    }
    fn frontend_name(&self, id: u32) -> Option<(String, String)> {
        self.frontend_names.get(&id).cloned()
    }
    fn ct(&self, unanswered: bool, key: &CtKey) -> Option<CtValue> {
        if unanswered {
            self.ct_new.get(key).copied()
        } else {
            self.ct.get(key).copied()
        }
    }
    fn affinity(&self, key: &AffinityKey) -> Option<AffinityValue> {
        self.affinity.get(key).copied()
    }
    fn maglev(&self, key: &MaglevKey) -> Option<MaglevChunk> {
        self.maglev.get(key).copied()
    }
    fn source_range(&self, key: &SourceRangeKey) -> Option<u32> {
        let want = range_bytes(key);
        self.ranges
            .iter()
            .filter(|(bits, k, _)| prefix_matches(*bits, &range_bytes(k), &want))
            .max_by_key(|(bits, _, _)| *bits)
            .map(|(_, _, v)| *v)
    }
    fn snat_config(&self, _family: u8) -> Option<SnatConfig> {
        self.snat_config
    }
    fn snat(&self, key: &CtKey) -> Option<SnatValue> {
        self.snat.get(key).copied()
    }
    fn socket_programs(&self) -> bool {
        false
    }
}

fn be(port: u16) -> Be16 {
    Be16::from_host(port)
}

fn fkey(addr: [u8; 4], port: u16, scope: u8) -> ServiceKey {
    ServiceKey {
        addr: from_v4(addr),
        port: be(port),
        slot: 0,
        proto: ipproto::TCP,
        family: 4,
        scope,
        _pad: 0,
    }
}

fn backend(last: u8, flags: u8) -> Backend {
    Backend {
        addr: from_v4([198, 18, 2, last]),
        port: be(8080),
        family: 4,
        flags,
    }
}

impl Mem {
    fn flag(&mut self, addr: [u8; 4], flags: u32) {
        *self
            .addrs
            .entry(AddrKey {
                addr: from_v4(addr),
                family: 4,
                _pad: [0; 3],
            })
            .or_default() |= flags;
    }

    /// A frontend `key` with id `id`, `flags`, slots holding `slots` (backend ids).
    fn frontend(&mut self, key: ServiceKey, id: u32, flags: u16, slots: &[u32]) {
        self.services.insert(
            key,
            ServiceValue {
                id,
                count: slots.len() as u16,
                flags,
                ..ServiceValue::default()
            },
        );
        for (i, b) in slots.iter().enumerate() {
            self.services.insert(
                ServiceKey {
                    slot: i as u16 + 1,
                    ..key
                },
                ServiceValue {
                    id: *b,
                    ..ServiceValue::default()
                },
            );
        }
        self.frontend_names
            .insert(id, ("default/web".to_owned(), "http".to_owned()));
    }

    /// A `ClusterIP` `VIP:80` (id 1) with ready backends 10 (local) and 11 (remote), backend 12
    /// terminating (kept), and its `NodePort` on `NODE:30080` (id 2, same slots) whose eTP is
    /// `external_local` (then only 10).
    fn web(external_local: bool) -> Self {
        let mut m = Self::default();
        m.flag(VIP, addr_flags::FRONTEND | addr_flags::CLUSTER_IP);
        m.flag(NODE, addr_flags::FRONTEND | addr_flags::EXTERNAL);
        m.backends.insert(10, backend(10, backend_flags::LOCAL));
        m.backends.insert(11, backend(11, 0));
        m.backends.insert(
            12,
            backend(12, backend_flags::LOCAL | backend_flags::TERMINATING),
        );
        m.backend_names.insert(10, "default/web-0".to_owned());
        m.backend_names.insert(11, "default/web-1".to_owned());
        m.frontend(fkey(VIP, 80, scope::INTERNAL), 1, 0, &[10, 11]);
        let np = flags::EXTERNAL_ADDR | flags::KIND_NODE_PORT;
        if external_local {
            m.frontend(
                fkey(NODE, 30080, scope::EXTERNAL),
                2,
                np | flags::LOCAL_ONLY,
                &[10],
            );
        } else {
            m.frontend(fkey(NODE, 30080, scope::EXTERNAL), 2, np, &[10, 11]);
        }
        m.snat_config = Some(SnatConfig {
            addr: from_v4(NODE),
            port_min: 61_000,
            port_max: 65_535,
            enabled: 1,
            _pad: [0; 3],
        });
        m
    }

    fn ct_pair(&mut self, fwd: CtKey, backend_id: u32, st: u8, unanswered: bool, snat: u16) {
        let b = self.backends[&backend_id];
        let v = CtValue {
            addr: b.addr,
            port: b.port,
            state: st,
            backend_id,
            frontend_id: 1,
            snat_port: Be16(snat.to_be()),
            last_seen_ns: NOW - 5_000_000_000,
            ..CtValue::default()
        };
        let table = if unanswered {
            &mut self.ct_new
        } else {
            &mut self.ct
        };
        table.insert(fwd, v);
    }
}

fn packet(src: [u8; 4], sport: Option<u16>, dst: [u8; 4], dport: u16) -> Packet {
    Packet {
        src: IpAddr::from(src),
        sport,
        dst: SocketAddr::new(IpAddr::from(dst), dport),
        proto: ipproto::TCP,
        from_outside: false,
        syn: true,
    }
}

fn outside(sport: Option<u16>, syn: bool) -> Packet {
    Packet {
        from_outside: true,
        syn,
        ..packet(EXT, sport, NODE, 30080)
    }
}

fn checks(t: &Trace) -> Vec<(&str, &str)> {
    t.steps
        .iter()
        .map(|s| (s.check.as_str(), s.result.as_str()))
        .collect()
}

fn fwd(p: &Packet) -> CtKey {
    Pkt::new(p).fwd_key()
}

#[test]
fn addresses_that_are_no_frontend_pass_untouched() {
    let m = Mem::web(false);
    let t = trace(&m, &packet(CLIENT, None, [198, 19, 9, 9], 80), NOW);
    assert_eq!(t.verdict, "passed");
    assert_eq!(checks(&t), [("address", "not a frontend")]);
    assert_eq!(t.flow, None);
    // From outside, an address without the external flag is the node's own traffic.
    let t = trace(
        &m,
        &Packet {
            from_outside: true,
            ..packet(EXT, None, VIP, 80)
        },
        NOW,
    );
    assert_eq!((t.verdict.as_str(), t.path.as_str()), ("passed", "outside"));
}

#[test]
fn a_clusterips_unlisted_port_is_rejected_and_a_node_addresss_passed() {
    let m = Mem::web(false);
    let t = trace(&m, &packet(CLIENT, None, VIP, 81), NOW);
    assert_eq!(
        (t.verdict.as_str(), t.drop_reason.as_deref()),
        ("rejected", Some("unlisted_port"))
    );
    assert!(t.steps[2].detail.contains("a TCP reset"), "{t:#?}");
    // From a pod to the node address's other port (no internal frontend there).
    let t = trace(&m, &packet(CLIENT, None, NODE, 22), NOW);
    assert_eq!(t.verdict, "passed");
    // From outside to a port of the node's own.
    let mut p = outside(None, true);
    p.dst.set_port(22);
    let t = trace(&m, &p, NOW);
    assert_eq!(t.verdict, "passed");
    assert_eq!(checks(&t).last(), Some(&("frontend", "none")));
}

#[test]
fn a_new_flow_without_source_port_goes_to_one_of_the_slots() {
    let m = Mem::web(false);
    let t = trace(&m, &packet(CLIENT, None, VIP, 80), NOW);
    assert_eq!(t.verdict, "translated");
    assert_eq!(t.flow.as_deref(), Some("new"));
    assert_eq!(
        checks(&t),
        [
            ("address", "frontend"),
            ("conntrack", "not looked up"),
            ("frontend", "found"),
            ("slots", "2 eligible"),
            ("affinity", "off"),
            ("choice", "one of 2"),
            ("rewrite", "destination"),
        ]
    );
    let f = t.frontend.as_ref().unwrap();
    assert_eq!(
        (
            f.id,
            f.service.as_deref(),
            f.kind.as_str(),
            f.scope.as_str()
        ),
        (1, Some("default/web"), "ClusterIP", "internal")
    );
    let cands: Vec<(&str, Option<u16>, Option<&str>)> = t
        .candidates
        .iter()
        .map(|c| (c.endpoint.as_str(), c.slot, c.pod.as_deref()))
        .collect();
    assert_eq!(
        cands,
        [
            ("198.18.2.10:8080", Some(1), Some("default/web-0")),
            ("198.18.2.11:8080", Some(2), Some("default/web-1"))
        ]
    );
    assert_eq!(t.rewritten, None, "the destination is one of two");
    assert_eq!(t.source, "198.18.1.20");
    let text = format_trace(&t, Format::Table).unwrap();
    assert!(
        text.ends_with(
            "verdict: translated: to one of 2 backends (198.18.2.10:8080 (default/web-0), \
             198.18.2.11:8080 (default/web-1))\n"
        ),
        "{text}"
    );
    assert!(text.starts_with("trace 198.18.1.20 -> 198.19.0.10:80 TCP SYN, from a pod"));
}

#[test]
fn empty_frontends_reject_or_drop_by_their_flags() {
    let mut m = Mem::web(false);
    m.frontend(fkey(VIP, 90, scope::INTERNAL), 5, flags::REJECT_EMPTY, &[]);
    m.frontend(fkey(VIP, 91, scope::INTERNAL), 6, flags::DROP_EMPTY, &[]);
    let t = trace(&m, &packet(CLIENT, Some(40_000), VIP, 90), NOW);
    assert_eq!(
        (t.verdict.as_str(), t.drop_reason.as_deref()),
        ("rejected", Some("no_endpoints"))
    );
    let t = trace(&m, &packet(CLIENT, None, VIP, 91), NOW);
    assert_eq!(
        (t.verdict.as_str(), t.drop_reason.as_deref()),
        ("dropped", Some("no_local_endpoint"))
    );
    assert_eq!(checks(&t).last(), Some(&("choice", "dropped")));
}

#[test]
fn an_answered_flow_keeps_its_backend_and_a_syn_to_a_terminating_one_chooses_again() {
    let mut m = Mem::web(false);
    let p = Packet {
        syn: false,
        ..packet(CLIENT, Some(40_000), VIP, 80)
    };
    m.ct_pair(fwd(&p), 12, 0, false, 0);
    let t = trace(&m, &p, NOW);
    assert_eq!(t.flow.as_deref(), Some("established"));
    assert_eq!(
        checks(&t),
        [
            ("address", "frontend"),
            ("conntrack", "hit"),
            ("rewrite", "destination")
        ]
    );
    assert!(
        t.steps[1]
            .detail
            .starts_with("CT_V1: the flow goes to 198.18.2.12:8080 (terminating"),
        "{t:#?}"
    );
    assert_eq!(t.backend.as_ref().unwrap().id, 12);
    assert_eq!(
        t.rewritten,
        Some(Rewritten {
            source: "198.18.1.20:40000".into(),
            destination: "198.18.2.12:8080".into()
        })
    );
    assert_eq!(t.frontend.as_ref().unwrap().id, 1);
    // A SYN on that tuple leaves the terminating backend: a new choice among the slots.
    let t = trace(&m, &Packet { syn: true, ..p }, NOW);
    assert_eq!(checks(&t)[1], ("conntrack", "chooses again"));
    assert!(t.steps[1].detail.contains("terminating"));
    assert_eq!(checks(&t)[2], ("conntrack", "miss"), "then CT_NEW_V1");
    assert_eq!(t.flow.as_deref(), Some("new"));
    assert_eq!(t.candidates.len(), 2);
}

#[test]
fn ended_expired_and_gone_entries_do_not_keep_the_flow() {
    let p = packet(CLIENT, Some(40_000), VIP, 80);
    // A SYN on a connection that ended.
    let mut m = Mem::web(false);
    m.ct_pair(fwd(&p), 10, state::FIN_FORWARD, false, 0);
    let t = trace(&m, &p, NOW);
    assert!(t.steps[1].detail.contains("ended"), "{t:#?}");
    assert_eq!(t.flow.as_deref(), Some("new"));
    // Idle past the timeout of an unanswered flow (60 s).
    let mut m = Mem::web(false);
    m.ct_pair(fwd(&p), 10, 0, true, 0);
    m.ct_new.get_mut(&fwd(&p)).unwrap().last_seen_ns = NOW - 61_000_000_000;
    let t = trace(&m, &p, NOW);
    assert_eq!(
        checks(&t)[1..3],
        [("conntrack", "miss"), ("conntrack", "expired")]
    );
    // Its backend gone from BACKENDS_V1.
    let mut m = Mem::web(false);
    m.ct_pair(fwd(&p), 11, 0, false, 0);
    m.backends.remove(&11);
    let t = trace(&m, &Packet { syn: false, ..p }, NOW);
    assert!(
        t.steps[1].detail.contains("no longer in BACKENDS_V1"),
        "{t:#?}"
    );
    assert_eq!(t.flow.as_deref(), Some("new"));
    // An unanswered flow keeps its backend (a retransmitted SYN).
    let mut m = Mem::web(false);
    m.ct_pair(fwd(&p), 11, 0, true, 0);
    let t = trace(&m, &p, NOW);
    assert_eq!(
        checks(&t)[1..3],
        [("conntrack", "miss"), ("conntrack", "hit")]
    );
    assert!(t.steps[2].detail.contains("nothing answered it yet"));
    assert_eq!(t.rewritten.unwrap().destination, "198.18.2.11:8080");
}

#[test]
fn a_tcp_segment_that_lost_its_entry_takes_the_slot_its_tuple_hashes_to() {
    let m = Mem::web(false);
    let p = Packet {
        syn: false,
        ..packet(CLIENT, Some(40_123), VIP, 80)
    };
    let t = trace(&m, &p, NOW);
    let slot = (flow_hash(&fwd(&p)) % 2) as u16 + 1;
    assert_eq!(checks(&t)[6], ("choice", format!("slot {slot}").as_str()));
    assert!(t.steps[6].detail.contains("ct_miss_midflow"));
    let want = if slot == 1 {
        "198.18.2.10:8080"
    } else {
        "198.18.2.11:8080"
    };
    assert_eq!(t.rewritten.unwrap().destination, want);
    // Without the source port: one of the slots.
    let t = trace(&m, &Packet { sport: None, ..p }, NOW);
    assert_eq!(t.candidates.len(), 2);
}

#[test]
fn client_ip_affinity_sticks_while_its_backend_may_take_new_flows() {
    let mut m = Mem::web(false);
    let key = fkey(VIP, 80, scope::INTERNAL);
    m.services.get_mut(&key).unwrap().affinity_timeout = 600;
    let akey = AffinityKey {
        client: from_v4(CLIENT),
        frontend_id: 1,
        family: 4,
        _pad: [0; 3],
    };
    m.affinity.insert(
        akey,
        AffinityValue {
            backend_id: 11,
            check: fingerprint(1, &m.backends[&11]),
            last_used_ns: NOW - 10_000_000_000,
        },
    );
    let t = trace(&m, &packet(CLIENT, None, VIP, 80), NOW);
    assert_eq!(checks(&t)[4], ("affinity", "sticks"));
    assert_eq!(t.rewritten.unwrap().destination, "198.18.2.11:8080");
    // Past the timeout: chooses again.
    m.affinity.get_mut(&akey).unwrap().last_used_ns = NOW - 601_000_000_000;
    let t = trace(&m, &packet(CLIENT, None, VIP, 80), NOW);
    assert_eq!(checks(&t)[4], ("affinity", "not honoured"));
    assert!(t.steps[4].detail.contains("past the timeout"));
    assert_eq!(t.candidates.len(), 2);
    // A terminating backend (the Service has ready ones).
    m.affinity.insert(
        akey,
        AffinityValue {
            backend_id: 12,
            check: 0,
            last_used_ns: NOW,
        },
    );
    let t = trace(&m, &packet(CLIENT, None, VIP, 80), NOW);
    assert!(t.steps[4].detail.contains("terminating"), "{t:#?}");
    // No entry yet.
    m.affinity.clear();
    let t = trace(&m, &packet(CLIENT, None, VIP, 80), NOW);
    assert_eq!(checks(&t)[4], ("affinity", "none yet"));
}

#[test]
fn a_pod_reaching_itself_is_hairpinned() {
    let mut m = Mem::web(false);
    let pod = [198, 18, 2, 10];
    let key = fkey(VIP, 80, scope::INTERNAL);
    // One slot: the pod itself.
    m.frontend(key, 1, 0, &[10]);
    let t = trace(&m, &packet(pod, Some(40_000), VIP, 80), NOW);
    assert_eq!(checks(&t).last(), Some(&("rewrite", "hairpin")));
    assert_eq!(
        t.rewritten,
        Some(Rewritten {
            source: "198.19.0.10:40000".into(),
            destination: "198.18.2.10:8080".into()
        })
    );
}

#[test]
fn a_reply_tuple_of_a_live_flow_to_another_frontend_drops_the_new_flow() {
    let mut m = Mem::web(false);
    m.frontend(fkey(VIP, 80, scope::INTERNAL), 1, 0, &[11]);
    let p = packet(CLIENT, Some(40_000), VIP, 80);
    let b = m.backends[&11];
    let reply = reply_key(&fwd(&p), &b.addr, b.port);
    let other = CtValue {
        addr: from_v4([198, 19, 0, 99]),
        port: be(80),
        last_seen_ns: NOW,
        ..CtValue::default()
    };
    m.ct.insert(reply, other);
    let t = trace(&m, &p, NOW);
    assert_eq!(
        (t.verdict.as_str(), t.drop_reason.as_deref()),
        ("dropped", Some("ct_reply_clash"))
    );
    // A closing one is replaced.
    m.ct.get_mut(&reply).unwrap().state = state::CLOSING;
    let t = trace(&m, &p, NOW);
    assert_eq!(t.verdict, "translated");
    assert!(checks(&t).contains(&("reply-tuple", "replaces")));
}

#[test]
fn source_ranges_decide_new_external_flows() {
    let mut m = Mem::web(false);
    let base = SourceRangeKey {
        frontend: from_v4(NODE),
        port: be(30080),
        proto: ipproto::TCP,
        family: 4,
        client: [0; 16],
    };
    m.ranges.push((160, base, verdict::DENY));
    let t = trace(&m, &outside(Some(50_000), true), NOW);
    assert_eq!(
        (t.verdict.as_str(), t.drop_reason.as_deref()),
        ("dropped", Some("source_range"))
    );
    // The client's /24 allowed.
    let allowed = SourceRangeKey {
        client: from_v4([198, 18, 100, 0]),
        ..base
    };
    m.ranges.push((160 + 24, allowed, verdict::ALLOW));
    let t = trace(&m, &outside(Some(50_000), true), NOW);
    assert!(checks(&t).contains(&("source-ranges", "allowed")), "{t:#?}");
    assert_eq!(t.verdict, "translated");
}

/// A Maglev table for frontend 2 of `m` entries: entry `i` names backend 10 + i % 2.
fn maglev_table(m: &mut Mem, size: u32) {
    for chunk in 0..size.div_ceil(CHUNK) {
        let mut c = MaglevChunk::default();
        for i in 0..CHUNK {
            let e = chunk * CHUNK + i;
            if e < size {
                c.backend_ids[i as usize] = 10 + e % 2;
            }
        }
        m.maglev.insert(
            MaglevKey {
                frontend_id: 2,
                chunk,
            },
            c,
        );
    }
}

#[test]
fn maglev_picks_external_flows_by_their_tuple_and_remote_endpoints_get_snat() {
    let mut m = Mem::web(false);
    maglev_table(&mut m, 131);
    assert_eq!(
        maglev_size(
            &m.maglev
                .iter()
                .map(|(k, c)| (k.chunk, *c))
                .collect::<Vec<_>>()
        ),
        Some(131)
    );
    let mut seen = BTreeMap::new();
    for port in 50_000..50_016 {
        let p = outside(Some(port), true);
        let t = trace(&m, &p, NOW);
        let index = flow_hash(&fwd(&p)) % 131;
        let id = 10 + index % 2;
        let step = t.steps.iter().find(|s| s.check == "maglev").unwrap();
        assert_eq!(step.result, format!("entry {index}"), "{t:#?}");
        assert_eq!(t.backend.as_ref().unwrap().id, id);
        let rw = t.rewritten.clone().unwrap();
        if id == 10 {
            // Local: no SNAT, the client's address kept.
            assert_eq!(rw.source, format!("198.18.100.5:{port}"));
            assert_eq!(t.snat, None);
        } else {
            let hash = flow_hash(&fwd(&p));
            let want = candidate_port(hash, 0, 61_000, 65_535);
            assert_eq!(rw.source, format!("198.18.0.1:{want}"));
            assert_eq!(t.snat.as_ref().unwrap().port, Some(want));
        }
        seen.insert(id, rw.destination);
    }
    assert_eq!(seen.len(), 2, "16 ports reach both endpoints: {seen:?}");
    // Without the source port: one of the table's backends.
    let t = trace(&m, &outside(None, true), NOW);
    assert_eq!(t.candidates.len(), 2);
    assert!(checks(&t).contains(&("snat", "depends")));
    // No table: the slots decide.
    m.maglev.clear();
    let t = trace(&m, &outside(Some(50_000), true), NOW);
    assert!(checks(&t).contains(&("maglev", "no table")));
    assert_eq!(t.candidates.len(), 2);
}

#[test]
fn snat_takes_the_first_port_no_other_flow_holds() {
    let mut m = Mem::web(true);
    // eTP Cluster with only the remote backend.
    m.frontend(
        fkey(NODE, 30080, scope::EXTERNAL),
        2,
        flags::EXTERNAL_ADDR,
        &[11],
    );
    let p = outside(Some(50_000), true);
    let hash = flow_hash(&fwd(&p));
    let b = m.backends[&11];
    let snat_key = |port: u16| CtKey {
        src: b.addr,
        dst: from_v4(NODE),
        sport: b.port,
        dport: be(port),
        proto: ipproto::TCP,
        family: 4,
        dir: dir::REPLY,
        _pad: 0,
    };
    let first = candidate_port(hash, 0, 61_000, 65_535);
    m.snat.insert(
        snat_key(first),
        SnatValue {
            client: from_v4([198, 18, 100, 6]),
            client_port: be(1),
            ..SnatValue::default()
        },
    );
    let t = trace(&m, &p, NOW);
    let second = candidate_port(hash, 1, 61_000, 65_535);
    assert_eq!(t.snat.unwrap().port, Some(second));
    // The taken port names this very client and port: kept.
    m.snat.get_mut(&snat_key(first)).unwrap().client = from_v4(EXT);
    m.snat.get_mut(&snat_key(first)).unwrap().client_port = be(50_000);
    let t = trace(&m, &p, NOW);
    assert_eq!(t.snat.unwrap().port, Some(first));
    // Every candidate taken.
    for n in 0..PORT_TRIES {
        m.snat.insert(
            snat_key(candidate_port(hash, n, 61_000, 65_535)),
            SnatValue::default(),
        );
    }
    let t = trace(&m, &p, NOW);
    assert_eq!(t.drop_reason.as_deref(), Some("nat_ports_exhausted"));
    // No SNAT address of the family.
    m.snat_config.as_mut().unwrap().enabled = 0;
    let t = trace(&m, &p, NOW);
    assert_eq!(t.drop_reason.as_deref(), Some("nat_no_address"));
}

#[test]
fn external_traffic_policy_local_without_a_local_endpoint_drops() {
    let mut m = Mem::web(true);
    m.frontend(
        fkey(NODE, 30080, scope::EXTERNAL),
        2,
        flags::EXTERNAL_ADDR | flags::LOCAL_ONLY | flags::DROP_EMPTY,
        &[],
    );
    let t = trace(&m, &outside(Some(50_000), true), NOW);
    assert_eq!(t.drop_reason.as_deref(), Some("no_local_endpoint"));
    // With one local endpoint, the remote one is listed as left out by the policy.
    let mut m = Mem::web(true);
    m.maglev.clear();
    let t = trace(&m, &outside(None, true), NOW);
    assert_eq!(t.slots.len(), 1);
    let x: Vec<(u32, &str)> = t
        .excluded
        .iter()
        .map(|x| (x.backend.id, x.reason.as_str()))
        .collect();
    assert_eq!(x, [(11, "on another node: externalTrafficPolicy Local")]);
}

#[test]
fn established_external_flows_keep_their_snat_port_and_replies_are_reversed() {
    let mut m = Mem::web(false);
    let p = outside(Some(50_000), false);
    m.ct_pair(fwd(&p), 11, 0, false, 61_234);
    let t = trace(&m, &p, NOW);
    assert_eq!(t.flow.as_deref(), Some("established"));
    assert_eq!(
        t.rewritten,
        Some(Rewritten {
            source: "198.18.0.1:61234".into(),
            destination: "198.18.2.11:8080".into()
        })
    );
    // Unanswered, the client's second packet promotes it.
    let mut m = Mem::web(false);
    m.ct_pair(fwd(&p), 11, 0, true, 61_234);
    let t = trace(&m, &p, NOW);
    assert!(
        t.steps
            .iter()
            .any(|s| s.detail.contains("the client's second"))
    );
    // The endpoint's reply to the SNAT address: back to the client, from the frontend.
    let web1 = m.backends[&11];
    let reply_in = CtKey {
        src: web1.addr,
        dst: from_v4(NODE),
        sport: web1.port,
        dport: be(61_234),
        proto: ipproto::TCP,
        family: 4,
        dir: dir::REPLY,
        _pad: 0,
    };
    m.snat.insert(
        reply_in,
        SnatValue {
            client: from_v4(EXT),
            client_port: be(50_000),
            ..SnatValue::default()
        },
    );
    let reply_entry = reply_key(&fwd(&p), &web1.addr, web1.port);
    let mut rv = CtValue {
        addr: from_v4(NODE),
        port: be(30080),
        backend_id: 11,
        frontend_id: 2,
        snat_port: be(61_234),
        last_seen_ns: NOW,
        ..CtValue::default()
    };
    m.ct.insert(reply_entry, rv);
    let answer = Packet {
        src: IpAddr::from([198, 18, 2, 11]),
        sport: Some(8080),
        dst: "198.18.0.1:61234".parse().unwrap(),
        proto: ipproto::TCP,
        from_outside: true,
        syn: false,
    };
    let t = trace(&m, &answer, NOW);
    assert_eq!(checks(&t), [("snat-reply", "reverse SNAT")]);
    assert_eq!(
        t.rewritten,
        Some(Rewritten {
            source: "198.18.0.1:30080".into(),
            destination: "198.18.100.5:50000".into()
        })
    );
    // An older flow's SNAT entry: passed.
    rv.snat_port = be(61_235);
    m.ct.insert(reply_entry, rv);
    let t = trace(&m, &answer, NOW);
    assert_eq!((checks(&t)[0].1, t.verdict.as_str()), ("stale", "passed"));
    // Unknown to SNAT_V1.
    m.snat.clear();
    let t = trace(&m, &answer, NOW);
    assert_eq!((checks(&t)[0].1, t.verdict.as_str()), ("unknown", "passed"));
}

#[test]
fn json_is_stable_camel_case_and_round_trips() {
    let m = Mem::web(false);
    let t = trace(&m, &outside(Some(50_000), true), NOW);
    let text = format_trace(&t, Format::Json).unwrap();
    let raw: serde_json::Value = serde_json::from_str(&text).unwrap();
    for field in [
        "path",
        "protocol",
        "tcpFlags",
        "source",
        "destination",
        "steps",
        "verdict",
        "dropReason",
        "flow",
        "frontend",
        "slots",
        "excluded",
        "backend",
        "candidates",
        "snat",
        "rewritten",
    ] {
        assert!(raw.get(field).is_some(), "no {field}: {text}");
    }
    assert_eq!(raw["frontend"]["type"], "NodePort");
    assert_eq!(raw["steps"][0]["step"], 1);
    let back: Trace = serde_json::from_str(&text).unwrap();
    assert_eq!(back, t);
    // The table numbers the steps.
    let table = format_trace(&t, Format::Table).unwrap();
    assert!(
        table.lines().nth(1).unwrap().starts_with("STEP  CHECK"),
        "{table}"
    );
    assert!(
        table.lines().nth(2).unwrap().starts_with("1     address"),
        "{table}"
    );
}

#[test]
fn arguments_are_checked() {
    assert_eq!(
        parse_source("198.18.1.10:40000"),
        Ok(("198.18.1.10".parse().unwrap(), Some(40_000)))
    );
    assert_eq!(
        parse_source("2001:db8::1"),
        Ok(("2001:db8::1".parse().unwrap(), None))
    );
    assert_eq!(
        parse_source("[2001:db8::1]:80"),
        Ok(("2001:db8::1".parse().unwrap(), Some(80)))
    );
    assert!(
        parse_source("web")
            .unwrap_err()
            .contains("is not ADDR or ADDR:PORT")
    );
    assert!(parse_destination("198.19.0.10").is_err());
    let mut p = packet(CLIENT, None, VIP, 80);
    assert!(p.check().is_ok());
    p.src = "2001:db8::1".parse().unwrap();
    let e = p.check().unwrap_err().to_string();
    assert!(e.contains("different address families"), "{e}");
    let p = packet(CLIENT, Some(0), VIP, 80);
    assert!(p.check().is_err());
}

#[test]
fn ipv6_packets_walk_the_same_steps() {
    let v6 = |s: &str| s.parse::<std::net::Ipv6Addr>().unwrap().octets();
    let mut m = Mem::default();
    m.addrs.insert(
        AddrKey {
            addr: v6("2001:db8:f::10"),
            family: 6,
            _pad: [0; 3],
        },
        addr_flags::FRONTEND | addr_flags::CLUSTER_IP,
    );
    m.backends.insert(
        10,
        Backend {
            addr: v6("2001:db8:2::10"),
            port: be(8080),
            family: 6,
            flags: backend_flags::LOCAL,
        },
    );
    m.frontend(
        ServiceKey {
            addr: v6("2001:db8:f::10"),
            family: 6,
            ..fkey(VIP, 80, scope::INTERNAL)
        },
        1,
        0,
        &[10],
    );
    let p = Packet {
        src: "2001:db8:1::20".parse().unwrap(),
        sport: Some(40_000),
        dst: "[2001:db8:f::10]:80".parse().unwrap(),
        proto: ipproto::TCP,
        from_outside: false,
        syn: true,
    };
    let t = trace(&m, &p, NOW);
    assert_eq!(t.verdict, "translated", "{t:#?}");
    assert_eq!(
        t.rewritten,
        Some(Rewritten {
            source: "[2001:db8:1::20]:40000".into(),
            destination: "[2001:db8:2::10]:8080".into()
        })
    );
    // Its entry, once made, is found by the same tuple.
    m.ct_pair(fwd(&p), 10, 0, false, 0);
    let t = trace(&m, &Packet { syn: false, ..p }, NOW);
    assert_eq!(t.flow.as_deref(), Some("established"));
    assert_eq!(t.backend.unwrap().endpoint, "[2001:db8:2::10]:8080");
}
