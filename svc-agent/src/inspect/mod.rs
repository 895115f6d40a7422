//! `svc-agent inspect`: read the pinned maps of a running (or stopped) agent and print them.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use aya::maps::{HashMap as BpfHashMap, Map, MapData, PerCpuArray, PerCpuHashMap};
use svc_common::{
    addr::{FAMILY_V4, to_v4},
    service::{
        Backend, BackendName, FrontendName, ServiceKey, ServiceValue, backend_flags, flags, scope,
    },
    stats::{Counter, DropReason, PENDING_SLOTS, Pending, PktCounter},
};

use serde::{Deserialize, Serialize};

pub use self::output::Format;
use self::output::Table;
use crate::{datapath::names, loader::pin_dir, pins};

pub mod affinity;
pub mod backends;
pub mod ct;
pub mod diff;
pub mod maps;
pub mod nat;
pub mod output;
pub mod trace;

fn open_pinned(bpffs: &Path, name: &str) -> anyhow::Result<MapData> {
    let path = pin_dir(bpffs).join(name);
    MapData::from_pin(&path).with_context(|| {
        format!(
            "opening pinned map {} (is the agent running?)",
            path.display()
        )
    })
}

/// Sums a per-CPU counter array over CPUs, for indices `0..n`.
fn read_counters(bpffs: &Path, name: &str, n: u32) -> anyhow::Result<Vec<Counter>> {
    let map: PerCpuArray<_, Counter> =
        PerCpuArray::try_from(Map::PerCpuArray(open_pinned(bpffs, name)?))?;
    (0..n)
        .map(|i| {
            let per_cpu = map.get(&i, 0)?;
            Ok(per_cpu.iter().fold(Counter::default(), |a, v| Counter {
                packets: a.packets + v.packets,
                bytes: a.bytes + v.bytes,
            }))
        })
        .collect()
}

/// Whether an agent runs on `bpffs` (it holds the lock on `<bpffs>/svc`; see
/// `pins::lock_pin_root`), as one line: `inspect` works either way, from the pinned maps.
#[must_use]
pub fn agent_status(bpffs: &Path) -> String {
    let root = bpffs.join(svc_common::PIN_ROOT);
    match pins::lock_holder(&root) {
        Ok(Some(pid)) => format!("svc-agent running (pid {pid}, holding {})", root.display()),
        Ok(None) => format!(
            "no svc-agent running on {} (the pinned programs and maps, if any, go on without one)",
            bpffs.display()
        ),
        Err(e) => format!("whether an svc-agent runs is unknown: {e:#}"),
    }
}

/// Reads `PKT_STATS_V1` from the pin directory under `bpffs`, summed over CPUs.
pub fn read_pkt_stats(bpffs: &Path) -> anyhow::Result<Vec<(PktCounter, Counter)>> {
    let v = read_counters(bpffs, "PKT_STATS_V1", PktCounter::COUNT)?;
    Ok(PktCounter::ALL.iter().copied().zip(v).collect())
}

/// Reads `DROP_STATS_V1`, summed over CPUs.
pub fn read_drop_stats(bpffs: &Path) -> anyhow::Result<Vec<(DropReason, Counter)>> {
    let v = read_counters(bpffs, "DROP_STATS_V1", DropReason::COUNT)?;
    Ok(DropReason::ALL.iter().copied().zip(v).collect())
}

/// One counter of `inspect stats` (a JSON object of `-o json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatRow {
    /// `packet` (`PKT_STATS_V1`) or `drop` (`DROP_STATS_V1`, by reason).
    pub kind: String,
    /// The counter's or drop reason's name (`dnat`, `no_endpoints`, ...).
    pub name: String,
    /// Packets, summed over CPUs.
    pub packets: u64,
    /// Bytes of those packets.
    pub bytes: u64,
}

/// `inspect stats` in `format`: the packet counters, then the drops by reason (two tables in
/// counter order; `wide` is `table`), or JSON.
///
/// # Errors
/// When JSON serialization fails.
pub fn format_stats(
    pkt: &[(PktCounter, Counter)],
    drops: &[(DropReason, Counter)],
    format: Format,
) -> anyhow::Result<String> {
    let row = |kind: &str, name: &str, c: &Counter| StatRow {
        kind: kind.to_owned(),
        name: name.to_owned(),
        packets: c.packets,
        bytes: c.bytes,
    };
    let pkt: Vec<StatRow> = pkt
        .iter()
        .map(|(p, c)| row("packet", p.name(), c))
        .collect();
    let drops: Vec<StatRow> = drops
        .iter()
        .map(|(d, c)| row("drop", d.name(), c))
        .collect();
    if format == Format::Json {
        return output::json(&[pkt, drops].concat());
    }
    let table = |head: &'static str, rows: &[StatRow], count: &str| {
        let mut t = Table::new(&[head, "PACKETS", "BYTES"]);
        for r in rows {
            t.row(vec![
                r.name.clone(),
                r.packets.to_string(),
                r.bytes.to_string(),
            ]);
        }
        t.render(count)
    };
    let dropped: u64 = drops.iter().map(|r| r.packets).sum();
    Ok(format!(
        "{}{}",
        table("COUNTER", &pkt, ""),
        table(
            "DROP_REASON",
            &drops,
            &format!(
                "{}, {}, {dropped} packets dropped",
                output::count(pkt.len(), "counter", "counters"),
                output::count(drops.len(), "drop reason", "drop reasons"),
            )
        )
    ))
}

/// The contents of `SERVICES_V1` and `BACKENDS_V1`, with the per-id counters and names.
pub struct ServicesView {
    /// Every service entry (frontends and slots).
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    /// Every backend.
    pub backends: BTreeMap<u32, Backend>,
    /// `SVC_STATS_V1` summed over CPUs, by frontend id.
    pub frontend_stats: BTreeMap<u32, Counter>,
    /// `BACKEND_STATS_V1` summed over CPUs, by backend id.
    pub backend_stats: BTreeMap<u32, Counter>,
    /// `BACKEND_NAMES_V1` (`namespace/name` of each backend's Pod), by backend id; empty when
    /// the map is not pinned (pins of an agent that predates it).
    pub names: BTreeMap<u32, String>,
    /// `FRONTEND_NAMES_V1` (the Service port of each frontend: `namespace/name`, port name),
    /// by frontend id; empty when the map is not pinned (pins of an agent that predates it).
    pub frontend_names: BTreeMap<u32, (String, String)>,
}

/// Reads a per-CPU counter hash, summed over CPUs.
fn read_keyed_counters(bpffs: &Path, name: &str) -> anyhow::Result<BTreeMap<u32, Counter>> {
    let map: PerCpuHashMap<_, u32, Counter> =
        PerCpuHashMap::try_from(Map::PerCpuHashMap(open_pinned(bpffs, name)?))?;
    sum_keyed_counters(&map)
}

/// A per-CPU counter hash (`SVC_STATS_V1`, `BACKEND_STATS_V1`) summed over CPUs, by id.
///
/// # Errors
/// When the map cannot be read.
pub fn sum_keyed_counters(
    map: &PerCpuHashMap<MapData, u32, Counter>,
) -> anyhow::Result<BTreeMap<u32, Counter>> {
    map.iter()
        .map(|r| {
            let (id, per_cpu) = r?;
            let sum = per_cpu.iter().fold(Counter::default(), |a, v| Counter {
                packets: a.packets + v.packets,
                bytes: a.bytes + v.bytes,
            });
            Ok((id, sum))
        })
        .collect()
}

/// Every CPU's `PENDING_STATS_V1` slots (empty when it is not pinned: pins of an agent that
/// predates it).
fn read_pending(bpffs: &Path) -> anyhow::Result<Vec<Pending>> {
    if !pin_dir(bpffs).join("PENDING_STATS_V1").exists() {
        return Ok(Vec::new());
    }
    let map: PerCpuArray<_, Pending> =
        PerCpuArray::try_from(Map::PerCpuArray(open_pinned(bpffs, "PENDING_STATS_V1")?))?;
    let mut out = Vec::new();
    for i in 0..PENDING_SLOTS {
        out.extend(map.get(&i, 0).context("reading PENDING_STATS_V1")?.iter());
    }
    Ok(out)
}

/// Adds the packets `PENDING_STATS_V1` holds (`slots`: every CPU's) to the per-id sums of
/// `SVC_STATS_V1` (`frontends`) and `BACKEND_STATS_V1` (`backends`), for ids they hold: what
/// the slots' next flushes will add (a flush adds to existing entries only).
pub fn add_pending(
    slots: &[Pending],
    frontends: &mut BTreeMap<u32, Counter>,
    backends: &mut BTreeMap<u32, Counter>,
) {
    for s in slots.iter().filter(|s| s.packets != 0) {
        for (sums, id) in [
            (&mut *frontends, s.frontend_id),
            (&mut *backends, s.backend_id),
        ] {
            if let Some(c) = sums.get_mut(&id) {
                c.packets += s.packets;
                c.bytes += s.bytes;
            }
        }
    }
}

/// Reads the pinned service and backend maps.
pub fn read_services(bpffs: &Path) -> anyhow::Result<ServicesView> {
    let services: BpfHashMap<_, ServiceKey, ServiceValue> =
        BpfHashMap::try_from(Map::HashMap(open_pinned(bpffs, "SERVICES_V1")?))?;
    let backends: BpfHashMap<_, u32, Backend> =
        BpfHashMap::try_from(Map::HashMap(open_pinned(bpffs, "BACKENDS_V1")?))?;
    let mut frontend_stats = read_keyed_counters(bpffs, "SVC_STATS_V1")?;
    let mut backend_stats = read_keyed_counters(bpffs, "BACKEND_STATS_V1")?;
    add_pending(
        &read_pending(bpffs)?,
        &mut frontend_stats,
        &mut backend_stats,
    );
    Ok(ServicesView {
        services: services.iter().collect::<Result<_, _>>()?,
        backends: backends.iter().collect::<Result<_, _>>()?,
        frontend_stats,
        backend_stats,
        names: read_names(bpffs, "BACKEND_NAMES_V1", |n: &BackendName| {
            names::display(n)
        })?,
        frontend_names: read_frontend_names(bpffs)?,
    })
}

/// `FRONTEND_NAMES_V1` as (`namespace/name`, port name), by frontend id; empty when it is not
/// pinned.
pub fn read_frontend_names(bpffs: &Path) -> anyhow::Result<BTreeMap<u32, (String, String)>> {
    read_names(bpffs, "FRONTEND_NAMES_V1", |n: &FrontendName| {
        (names::display(&n.service), names::display(&n.port))
    })
}

/// A names map (`BACKEND_NAMES_V1`, `FRONTEND_NAMES_V1`) as text, by id; empty when it is not
/// pinned (an agent that predates it pinned the others).
fn read_names<V: aya::Pod, T>(
    bpffs: &Path,
    name: &str,
    text: impl Fn(&V) -> T,
) -> anyhow::Result<BTreeMap<u32, T>> {
    if !pin_dir(bpffs).join(name).exists() {
        return Ok(BTreeMap::new());
    }
    let map: BpfHashMap<_, u32, V> = BpfHashMap::try_from(Map::HashMap(open_pinned(bpffs, name)?))?;
    map.iter()
        .map(|r| {
            let (id, value) = r.with_context(|| format!("reading {name}"))?;
            Ok((id, text(&value)))
        })
        .collect()
}

/// `addr:port`, IPv6 in brackets.
fn fmt_addr(addr: &[u8; 16], family: u8, port: u16) -> String {
    SocketAddr::new(ip(addr, family), port).to_string()
}

fn ip(addr: &[u8; 16], family: u8) -> IpAddr {
    if family == FAMILY_V4 {
        IpAddr::from(to_v4(addr))
    } else {
        IpAddr::from(*addr)
    }
}

/// An IP protocol number's name.
fn proto_name(proto: u8) -> &'static str {
    match proto {
        6 => "TCP",
        17 => "UDP",
        132 => "SCTP",
        _ => "?",
    }
}

/// One frontend as `inspect services` shows it (a JSON object of `-o json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceRow {
    /// The Service's namespace (`FRONTEND_NAMES_V1`; null when the map has no name for it).
    pub namespace: Option<String>,
    /// The Service's name.
    pub name: Option<String>,
    /// The port's name (`spec.ports[].name`; empty for an unnamed port).
    pub port_name: Option<String>,
    /// The frontend, `addr:port` (IPv6 in brackets).
    pub frontend: String,
    /// Its address.
    pub address: IpAddr,
    /// Its port.
    pub port: u16,
    /// `TCP`, `UDP` or `SCTP`.
    pub protocol: String,
    /// What kind of address: `ClusterIP`, `NodePort` (a node address), `ExternalIP` or
    /// `LoadBalancer` (an ingress IP); the last three have a frontend of each scope.
    #[serde(rename = "type")]
    pub kind: String,
    /// `internal` or `external`.
    pub scope: String,
    /// The frontend id (counters, affinity, conntrack entries name it).
    pub id: u32,
    /// `Local` when new connections only go to endpoints on this node, else `Cluster` (the
    /// scope's policy: `externalTrafficPolicy` for the external scope).
    pub internal_traffic_policy: String,
    /// `ClientIP` or `None`.
    pub session_affinity: String,
    /// `ClientIP` affinity's timeout (0 without affinity).
    pub affinity_timeout_seconds: u32,
    /// What happens without endpoints: `serve` (it has some), `reject` (TCP reset / ICMP
    /// unreachable), `drop` (internalTrafficPolicy Local, none local).
    pub when_empty: String,
    /// The slots hold terminating endpoints only (no ready one exists).
    pub serves_terminating: bool,
    /// Packets and bytes translated to it (per-CPU counters, summed).
    pub packets: u64,
    /// Bytes of those packets.
    pub bytes: u64,
    /// Its backend slots, in slot order.
    pub backends: Vec<BackendRow>,
}

/// The kind of address a frontend (slot 0 `flags`) is on, as `inspect services` names it.
fn kind_name(f: u16) -> &'static str {
    if f & flags::EXTERNAL_ADDR == 0 {
        "ClusterIP"
    } else if f & flags::KIND_NODE_PORT != 0 {
        "NodePort"
    } else if f & flags::KIND_LOAD_BALANCER != 0 {
        "LoadBalancer"
    } else {
        "ExternalIP"
    }
}

/// One backend slot of a frontend.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackendRow {
    /// The slot (1..=count).
    pub slot: u16,
    /// The backend id (0 when the slot is missing).
    pub id: u32,
    /// The endpoint, `addr:port` (empty when the backend is missing).
    pub endpoint: String,
    /// `namespace/name` of its Pod (`BACKEND_NAMES_V1`), if known.
    pub pod: Option<String>,
    /// `ready`, `terminating`, or `missing` (the slot or backend entry is absent: a pass
    /// was cut short; the next one completes it).
    pub state: String,
    /// The endpoint runs on this node.
    pub local: bool,
    /// Packets translated to it.
    pub packets: u64,
    /// Bytes of those packets.
    pub bytes: u64,
}

/// Every frontend of `view`, sorted by Service, port name, then frontend.
#[must_use]
pub fn service_rows(view: &ServicesView) -> Vec<ServiceRow> {
    let mut rows = Vec::new();
    for (k, v) in view.services.iter().filter(|(k, _)| k.slot == 0) {
        let (namespace, name, port_name) = match view.frontend_names.get(&v.id) {
            Some((service, port)) => {
                let (ns, n) = service.split_once('/').unwrap_or(("", service));
                (Some(ns.to_owned()), Some(n.to_owned()), Some(port.clone()))
            }
            None => (None, None, None),
        };
        let counter = view.frontend_stats.get(&v.id).copied().unwrap_or_default();
        let backends = (1..=v.count)
            .map(|slot| {
                let s = view.services.get(&ServiceKey { slot, ..*k });
                let b = s.and_then(|s| view.backends.get(&s.id));
                let id = s.map_or(0, |s| s.id);
                let c = view.backend_stats.get(&id).copied().unwrap_or_default();
                BackendRow {
                    slot,
                    id,
                    endpoint: b.map_or_else(String::new, |b| {
                        fmt_addr(&b.addr, b.family, b.port.to_host())
                    }),
                    pod: view.names.get(&id).cloned(),
                    state: match b {
                        None => "missing",
                        Some(b) if b.flags & backend_flags::TERMINATING != 0 => "terminating",
                        Some(_) => "ready",
                    }
                    .to_owned(),
                    local: b.is_some_and(|b| b.flags & backend_flags::LOCAL != 0),
                    packets: c.packets,
                    bytes: c.bytes,
                }
            })
            .collect();
        let internal = k.scope == scope::INTERNAL;
        rows.push(ServiceRow {
            namespace,
            name,
            port_name,
            frontend: fmt_addr(&k.addr, k.family, k.port.to_host()),
            address: ip(&k.addr, k.family),
            port: k.port.to_host(),
            protocol: proto_name(k.proto).to_owned(),
            kind: kind_name(v.flags).to_owned(),
            scope: if internal { "internal" } else { "external" }.to_owned(),
            id: v.id,
            internal_traffic_policy: if v.flags & flags::LOCAL_ONLY != 0 {
                "Local"
            } else {
                "Cluster"
            }
            .to_owned(),
            session_affinity: if v.affinity_timeout == 0 {
                "None"
            } else {
                "ClientIP"
            }
            .to_owned(),
            affinity_timeout_seconds: v.affinity_timeout,
            when_empty: if v.flags & flags::REJECT_EMPTY != 0 {
                "reject"
            } else if v.flags & flags::DROP_EMPTY != 0 {
                "drop"
            } else {
                "serve"
            }
            .to_owned(),
            serves_terminating: v.flags & flags::SERVES_TERMINATING != 0,
            packets: counter.packets,
            bytes: counter.bytes,
            backends,
        });
    }
    rows.sort_by(|a, b| {
        let key = |r: &ServiceRow| {
            (
                r.namespace.is_none(),
                r.namespace.clone(),
                r.name.clone(),
                r.port_name.clone(),
                r.address,
                r.port,
                r.protocol.clone(),
            )
        };
        key(a).cmp(&key(b))
    });
    rows
}

/// `inspect services` in `format`: a row per frontend (`wide`: with its id, counters, and
/// each backend's Pod and state), or JSON.
///
/// # Errors
/// When JSON serialization fails.
pub fn format_services(view: &ServicesView, format: Format) -> anyhow::Result<String> {
    let rows = service_rows(view);
    if format == Format::Json {
        return output::json(&rows);
    }
    let wide = format == Format::Wide;
    let mut headers = vec![
        "NAMESPACE",
        "NAME",
        "PORT",
        "FRONTEND",
        "PROTO",
        "TYPE",
        "POLICY",
        "AFFINITY",
        "BACKENDS",
    ];
    if wide {
        headers.extend(["ID", "PACKETS", "BYTES"]);
    }
    headers.push("ENDPOINTS");
    let mut table = Table::new(&headers);
    for r in &rows {
        let ready = r.backends.iter().filter(|b| b.state == "ready").count();
        let summary = match r.when_empty.as_str() {
            "reject" => "0 (reject)".to_owned(),
            "drop" => "0 (drop: none local)".to_owned(),
            _ if ready == r.backends.len() => ready.to_string(),
            _ => format!("{} ({ready} ready)", r.backends.len()),
        };
        let endpoints: Vec<String> = r
            .backends
            .iter()
            .map(|b| {
                let mut notes = Vec::new();
                if b.state != "ready" {
                    notes.push(b.state.clone());
                }
                if b.local {
                    notes.push("local".to_owned());
                }
                let mut text = if b.endpoint.is_empty() {
                    format!("slot {}", b.slot)
                } else {
                    b.endpoint.clone()
                };
                if wide {
                    if let Some(pod) = &b.pod {
                        let _ = write!(text, "={pod}");
                    }
                    notes.push(format!("id {}", b.id));
                }
                if !notes.is_empty() {
                    let _ = write!(text, "({})", notes.join(","));
                }
                text
            })
            .collect();
        let mut cells = vec![
            r.namespace.clone().unwrap_or_default(),
            r.name.clone().unwrap_or_default(),
            r.port_name.clone().unwrap_or_default(),
            r.frontend.clone(),
            r.protocol.clone(),
            // The external scope (traffic from outside the cluster) of a node, external or
            // load-balancer address, beside its internal one (pods, host processes).
            if r.scope == "external" {
                format!("{} (outside)", r.kind)
            } else {
                r.kind.clone()
            },
            r.internal_traffic_policy.clone(),
            if r.affinity_timeout_seconds == 0 {
                "None".to_owned()
            } else {
                format!("ClientIP/{}s", r.affinity_timeout_seconds)
            },
            summary,
        ];
        if wide {
            cells.extend([r.id.to_string(), r.packets.to_string(), r.bytes.to_string()]);
        }
        cells.push(endpoints.join(","));
        table.row(cells);
    }
    let services: BTreeSet<(&Option<String>, &Option<String>)> = rows
        .iter()
        .filter(|r| r.name.is_some())
        .map(|r| (&r.namespace, &r.name))
        .collect();
    let slots: usize = rows.iter().map(|r| r.backends.len()).sum();
    Ok(table.render(&format!(
        "{} of {}, {}",
        output::count(rows.len(), "frontend", "frontends"),
        output::count(services.len(), "Service", "Services"),
        output::count(slots, "backend slot", "backend slots"),
    )))
}

/// One pinned link, as the kernel describes it (a JSON object of `inspect links -o json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PinnedLinkView {
    /// Where it is pinned, relative to `<pin dir>/links` (`tc/7/ingress`,
    /// `cgroup/4242/svc_sock_conn4`).
    pub pin: PathBuf,
    /// The kernel's link id.
    pub link_id: u32,
    /// The link type (`tcx`, `cgroup`), or `?` when aya does not know it.
    pub link_type: String,
    /// The id of the program the link runs.
    pub program_id: u32,
    /// That program's name (as the kernel keeps it: at most 15 bytes), or `?`.
    pub program: String,
    /// For a TC link, the role of its interface as the program says (`pod-facing`,
    /// `node-facing`); `null` for connect-time links and programs of no role.
    #[serde(default)]
    pub role: Option<String>,
}

/// Every link pinned below `<pin dir>/links`, in path order.
pub fn read_links(bpffs: &Path) -> anyhow::Result<Vec<PinnedLinkView>> {
    let base = pins::links_dir(&pin_dir(bpffs));
    let mut files = Vec::new();
    collect_files(&base, &mut files)?;
    files.sort();
    let mut names: BTreeMap<u32, String> = BTreeMap::new();
    let mut views = Vec::new();
    for path in files {
        let Some((_, info)) = pins::open_link(&path)? else {
            continue;
        };
        if names.is_empty() {
            // Read once, when the first link is found: every loaded program's name by id.
            for prog in aya::programs::loaded_programs().flatten() {
                names.insert(prog.id(), prog.name_as_str().unwrap_or("?").to_owned());
            }
        }
        let program = names
            .get(&info.program_id())
            .cloned()
            .unwrap_or_else(|| "?".to_owned());
        views.push(PinnedLinkView {
            pin: path.strip_prefix(&base).unwrap_or(&path).to_owned(),
            link_id: info.id(),
            link_type: info
                .link_type()
                .map_or_else(|_| "?".to_owned(), |t| format!("{t:?}").to_lowercase()),
            program_id: info.program_id(),
            role: crate::ifaces::IfaceRole::of_program(&program)
                .map(|(role, _)| role.name().to_owned()),
            program,
        });
    }
    Ok(views)
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    };
    for entry in entries {
        let path = entry
            .with_context(|| format!("listing {}", dir.display()))?
            .path();
        if path.is_dir() {
            collect_files(&path, out)?;
        } else {
            out.push(path);
        }
    }
    Ok(())
}

/// `inspect links` in `format`: one row per pinned link (path order), or JSON.
///
/// # Errors
/// When JSON serialization fails.
pub fn format_links(
    bpffs: &Path,
    links: &[PinnedLinkView],
    format: Format,
) -> anyhow::Result<String> {
    if format == Format::Json {
        return output::json(links);
    }
    let base = pins::links_dir(&pin_dir(bpffs));
    let mut t = Table::new(&["PIN", "TYPE", "LINK", "PROGRAM_ID", "PROGRAM", "ROLE"]);
    for l in links {
        t.row(vec![
            l.pin.display().to_string(),
            l.link_type.clone(),
            l.link_id.to_string(),
            l.program_id.to_string(),
            l.program.clone(),
            l.role.clone().unwrap_or_else(|| "-".to_owned()),
        ]);
    }
    Ok(t.render(&format!(
        "{} pinned in {}",
        output::count(links.len(), "link", "links"),
        base.display()
    )))
}

/// Why `inspect` cannot read this layout's pins, as a sentence an operator can act on: nothing
/// pinned at all, or only another layout's pins (an agent of another build ran). None when this
/// layout's pin directory exists.
#[must_use]
pub fn unreadable_pins(bpffs: &Path) -> Option<String> {
    let dir = pin_dir(bpffs);
    if dir.is_dir() {
        return None;
    }
    let others = pins::other_layouts(bpffs)
        .map(|(l, _)| l)
        .unwrap_or_default();
    Some(match others.as_slice() {
        [] => format!(
            "nothing is pinned at {}: no svc-agent has run with this bpffs (--bpffs {}), or \
             `svc-agent cleanup` removed its state",
            dir.display(),
            bpffs.display()
        ),
        found => format!(
            "the pinned state at {} is of map layout {}; this svc-agent reads layout {} only \
             (run the `inspect` of the svc-agent build that pinned it; starting this build's \
             agent takes the datapath over and replaces those pins)",
            bpffs.join(svc_common::PIN_ROOT).display(),
            found
                .iter()
                .map(|l| format!("v{}", l.version))
                .collect::<Vec<_>>()
                .join(", "),
            svc_common::MAP_LAYOUT_VERSION
        ),
    })
}

#[cfg(test)]
mod tests {
    use svc_common::{Be16, addr::from_v4};

    use super::*;

    #[test]
    fn pending_packets_add_to_the_ids_held_and_only_those() {
        let c = |packets, bytes| Counter { packets, bytes };
        let mut frontends = BTreeMap::from([(1, c(5, 500)), (2, c(1, 100))]);
        let mut backends = BTreeMap::from([(10, c(5, 500)), (11, c(1, 100))]);
        let slot = |frontend_id, backend_id, packets, bytes| Pending {
            frontend_id,
            backend_id,
            packets,
            bytes,
        };
        let slots = [
            // Two CPUs' slots of one pair, a pair whose backend counters were deleted, a free
            // slot that still names an id.
            slot(1, 10, 2, 200),
            slot(1, 10, 1, 60),
            slot(2, 12, 4, 400),
            slot(2, 11, 0, 0),
        ];
        add_pending(&slots, &mut frontends, &mut backends);
        assert_eq!(frontends, BTreeMap::from([(1, c(8, 760)), (2, c(5, 500))]));
        assert_eq!(backends, BTreeMap::from([(10, c(8, 760)), (11, c(1, 100))]));
    }

    #[test]
    fn stats_tables_have_one_line_per_counter_and_a_count() {
        let stats = [
            (
                PktCounter::Tcp,
                Counter {
                    packets: 3,
                    bytes: 180,
                },
            ),
            (PktCounter::Udp, Counter::default()),
        ];
        let drops = [(DropReason::ALL[0], Counter::default())];
        let t = format_stats(&stats, &drops, Format::Table).unwrap();
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 6, "{t}");
        assert!(lines[1].split_whitespace().eq(["tcp", "3", "180"]));
        assert!(lines[3].starts_with("DROP_REASON"));
        assert_eq!(lines[5], "2 counters, 1 drop reason, 0 packets dropped");
        let back: Vec<StatRow> =
            serde_json::from_str(&format_stats(&stats, &drops, Format::Json).unwrap()).unwrap();
        assert_eq!(back.len(), 3);
        assert_eq!(
            (
                back[0].kind.as_str(),
                back[0].name.as_str(),
                back[0].packets
            ),
            ("packet", "tcp", 3)
        );
        assert_eq!(back[2].kind, "drop");
    }

    fn view() -> ServicesView {
        let k = ServiceKey {
            addr: from_v4([198, 19, 0, 10]),
            port: Be16::from_host(80),
            slot: 0,
            proto: 6,
            family: 4,
            scope: 0,
            _pad: 0,
        };
        let k6 = ServiceKey {
            addr: "2001:db8:f::10"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
            port: Be16::from_host(53),
            proto: 17,
            family: 6,
            ..k
        };
        let mut services = BTreeMap::new();
        services.insert(
            k,
            ServiceValue {
                id: 1,
                count: 2,
                flags: flags::LOCAL_ONLY,
                affinity_timeout: 10800,
                _pad: 0,
            },
        );
        for (slot, id) in [(1, 7), (2, 8)] {
            services.insert(
                ServiceKey { slot, ..k },
                ServiceValue {
                    id,
                    ..ServiceValue::default()
                },
            );
        }
        services.insert(
            k6,
            ServiceValue {
                id: 2,
                flags: flags::REJECT_EMPTY,
                ..ServiceValue::default()
            },
        );
        let backend = |last, flags| Backend {
            addr: from_v4([198, 18, 1, last]),
            port: Be16::from_host(5000),
            family: 4,
            flags,
        };
        let backends = BTreeMap::from([
            (7, backend(10, backend_flags::LOCAL)),
            (
                8,
                backend(11, backend_flags::LOCAL | backend_flags::TERMINATING),
            ),
        ]);
        let c = Counter {
            packets: 4,
            bytes: 300,
        };
        ServicesView {
            services,
            backends,
            frontend_stats: BTreeMap::from([(1, c)]),
            backend_stats: BTreeMap::from([(7, c)]),
            names: BTreeMap::from([(7, "default/web-0".to_owned())]),
            frontend_names: BTreeMap::from([
                (1, ("default/web".to_owned(), "http".to_owned())),
                (2, ("kube-system/dns".to_owned(), String::new())),
            ]),
        }
    }

    #[test]
    fn services_are_listed_by_service_with_names_policies_and_backend_states() {
        let mut view = view();
        assert_eq!(
            format_services(&view, Format::Table).unwrap(),
            "NAMESPACE    NAME  PORT  FRONTEND             PROTO  TYPE       POLICY   AFFINITY         BACKENDS     ENDPOINTS\n\
             default      web   http  198.19.0.10:80       TCP    ClusterIP  Local    ClientIP/10800s  2 (1 ready)  198.18.1.10:5000(local),198.18.1.11:5000(terminating,local)\n\
             kube-system  dns   -     [2001:db8:f::10]:53  UDP    ClusterIP  Cluster  None             0 (reject)   -\n\
             2 frontends of 2 Services, 2 backend slots\n"
        );
        let wide = format_services(&view, Format::Wide).unwrap();
        assert!(
            wide.contains("1   4        300    198.18.1.10:5000=default/web-0(local,id 7),198.18.1.11:5000(terminating,local,id 8)"),
            "{wide}"
        );
        let rows: Vec<ServiceRow> =
            serde_json::from_str(&format_services(&view, Format::Json).unwrap()).unwrap();
        assert_eq!(rows, service_rows(&view));
        let web = &rows[0];
        assert_eq!(
            (
                web.namespace.as_deref(),
                web.name.as_deref(),
                web.port_name.as_deref()
            ),
            (Some("default"), Some("web"), Some("http"))
        );
        assert_eq!(web.internal_traffic_policy, "Local");
        assert_eq!(
            (web.session_affinity.as_str(), web.affinity_timeout_seconds),
            ("ClientIP", 10800)
        );
        assert_eq!(web.backends[0].pod.as_deref(), Some("default/web-0"));
        assert_eq!(
            web.backends
                .iter()
                .map(|b| (b.state.as_str(), b.local))
                .collect::<Vec<_>>(),
            [("ready", true), ("terminating", true)]
        );
        assert_eq!(rows[1].when_empty, "reject");
        // JSON keys are camelCase.
        let raw: serde_json::Value =
            serde_json::from_str(&format_services(&view, Format::Json).unwrap()).unwrap();
        assert_eq!(raw[0]["portName"], "http");
        assert_eq!(raw[0]["internalTrafficPolicy"], "Local");
        assert_eq!(raw[0]["type"], "ClusterIP");
        // Pins of an agent that predates FRONTEND_NAMES_V1: no names, listed after the named.
        view.frontend_names.clear();
        let rows = service_rows(&view);
        assert!(rows.iter().all(|r| r.name.is_none()));
        let text = format_services(&view, Format::Table).unwrap();
        assert!(
            text.ends_with("2 frontends of 0 Services, 2 backend slots\n"),
            "{text}"
        );
    }

    #[test]
    fn pinned_links_are_listed_one_per_line() {
        let bpffs = Path::new("/sys/fs/bpf");
        assert_eq!(
            format_links(bpffs, &[], Format::Table).unwrap(),
            "0 links pinned in /sys/fs/bpf/svc/v1/links\n"
        );
        let links = [
            PinnedLinkView {
                pin: PathBuf::from("cgroup/4242/svc_sock_conn4"),
                link_id: 12,
                link_type: "cgroup".to_owned(),
                program_id: 40,
                program: "svc_sock_conn4".to_owned(),
                role: None,
            },
            PinnedLinkView {
                pin: PathBuf::from("tc/2/egress"),
                link_id: 10,
                link_type: "tcx".to_owned(),
                program_id: 33,
                program: "svc_tc_to_world".to_owned(),
                role: Some("node-facing".to_owned()),
            },
            PinnedLinkView {
                pin: PathBuf::from("tc/7/ingress"),
                link_id: 9,
                link_type: "tcx".to_owned(),
                program_id: 31,
                program: "svc_tc_from_pod".to_owned(),
                role: Some("pod-facing".to_owned()),
            },
        ];
        assert_eq!(
            format_links(bpffs, &links, Format::Table).unwrap(),
            "PIN                         TYPE    LINK  PROGRAM_ID  PROGRAM          ROLE\n\
             cgroup/4242/svc_sock_conn4  cgroup  12    40          svc_sock_conn4   -\n\
             tc/2/egress                 tcx     10    33          svc_tc_to_world  node-facing\n\
             tc/7/ingress                tcx     9     31          svc_tc_from_pod  pod-facing\n\
             3 links pinned in /sys/fs/bpf/svc/v1/links\n"
        );
        let json = format_links(bpffs, &links, Format::Json).unwrap();
        assert!(json.contains("\"role\": \"node-facing\""), "{json}");
        assert!(json.contains("\"role\": null"), "{json}");
        let back: Vec<PinnedLinkView> =
            serde_json::from_str(&format_links(bpffs, &links, Format::Json).unwrap()).unwrap();
        assert_eq!(back, links);
    }

    #[test]
    fn unreadable_pins_say_why() {
        let dir = std::env::temp_dir().join(format!("svc-inspect-pins-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let why = unreadable_pins(&dir).unwrap();
        assert!(why.starts_with("nothing is pinned at"), "{why}");
        std::fs::create_dir_all(dir.join("svc/v2")).unwrap();
        let why = unreadable_pins(&dir).unwrap();
        assert!(
            why.contains("is of map layout v2; this svc-agent reads layout 1"),
            "{why}"
        );
        std::fs::create_dir_all(dir.join("svc/v1")).unwrap();
        assert_eq!(unreadable_pins(&dir), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn frontend_kinds_are_named_from_their_flags() {
        use svc_common::service::flags;
        assert_eq!(kind_name(0), "ClusterIP");
        assert_eq!(kind_name(flags::LOCAL_ONLY), "ClusterIP");
        assert_eq!(kind_name(flags::EXTERNAL_ADDR), "ExternalIP");
        assert_eq!(
            kind_name(flags::EXTERNAL_ADDR | flags::KIND_NODE_PORT),
            "NodePort"
        );
        assert_eq!(
            kind_name(flags::EXTERNAL_ADDR | flags::KIND_LOAD_BALANCER | flags::REJECT_EMPTY),
            "LoadBalancer"
        );
    }
}
