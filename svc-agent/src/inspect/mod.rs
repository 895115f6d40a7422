//! `svc-agent inspect`: read the pinned maps of a running (or stopped) agent and print them.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use aya::maps::{HashMap as BpfHashMap, Map, MapData, PerCpuArray, PerCpuHashMap};
use svc_common::{
    addr::{FAMILY_V4, to_v4},
    service::{Backend, BackendName, ServiceKey, ServiceValue, backend_flags, flags},
    stats::{Counter, DropReason, PktCounter},
};

use crate::{datapath::names, loader::pin_dir, pins};

pub mod ct;

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

/// Formats the packet counters as a table.
#[must_use]
pub fn format_pkt_stats(stats: &[(PktCounter, Counter)]) -> String {
    table("counter", stats.iter().map(|(c, v)| (c.name(), v)))
}

/// Formats the drop counters as a table.
#[must_use]
pub fn format_drop_stats(stats: &[(DropReason, Counter)]) -> String {
    table("drop reason", stats.iter().map(|(c, v)| (c.name(), v)))
}

fn table<'a>(head: &str, rows: impl Iterator<Item = (&'a str, &'a Counter)>) -> String {
    let mut out = format!("{head:<20} {:>12} {:>14}\n", "packets", "bytes");
    for (name, v) in rows {
        let _ = writeln!(out, "{name:<20} {:>12} {:>14}", v.packets, v.bytes);
    }
    out
}

/// The contents of `SERVICES_V1` and `BACKENDS_V1`, with the per-id counters.
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
}

/// Reads a per-CPU counter hash, summed over CPUs.
fn read_keyed_counters(bpffs: &Path, name: &str) -> anyhow::Result<BTreeMap<u32, Counter>> {
    let map: PerCpuHashMap<_, u32, Counter> =
        PerCpuHashMap::try_from(Map::PerCpuHashMap(open_pinned(bpffs, name)?))?;
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

/// Reads the pinned service and backend maps.
pub fn read_services(bpffs: &Path) -> anyhow::Result<ServicesView> {
    let services: BpfHashMap<_, ServiceKey, ServiceValue> =
        BpfHashMap::try_from(Map::HashMap(open_pinned(bpffs, "SERVICES_V1")?))?;
    let backends: BpfHashMap<_, u32, Backend> =
        BpfHashMap::try_from(Map::HashMap(open_pinned(bpffs, "BACKENDS_V1")?))?;
    Ok(ServicesView {
        services: services.iter().collect::<Result<_, _>>()?,
        backends: backends.iter().collect::<Result<_, _>>()?,
        frontend_stats: read_keyed_counters(bpffs, "SVC_STATS_V1")?,
        backend_stats: read_keyed_counters(bpffs, "BACKEND_STATS_V1")?,
        names: read_names(bpffs)?,
    })
}

/// `BACKEND_NAMES_V1` as text, by backend id; empty when it is not pinned.
fn read_names(bpffs: &Path) -> anyhow::Result<BTreeMap<u32, String>> {
    if !pin_dir(bpffs).join("BACKEND_NAMES_V1").exists() {
        return Ok(BTreeMap::new());
    }
    let map: BpfHashMap<_, u32, BackendName> =
        BpfHashMap::try_from(Map::HashMap(open_pinned(bpffs, "BACKEND_NAMES_V1")?))?;
    map.iter()
        .map(|r| {
            let (id, name) = r.context("reading BACKEND_NAMES_V1")?;
            Ok((id, names::display(&name)))
        })
        .collect()
}

fn fmt_addr(addr: &[u8; 16], family: u8, port: u16) -> String {
    if family == FAMILY_V4 {
        format!("{}:{port}", std::net::Ipv4Addr::from(to_v4(addr)))
    } else {
        format!("[{}]:{port}", std::net::Ipv6Addr::from(*addr))
    }
}

/// `[P packets, B bytes]`.
fn traffic(c: &Counter) -> String {
    format!("[{} packets, {} bytes]", c.packets, c.bytes)
}

/// One frontend per line group: address, protocol, id, flags, then its slots' backends.
#[must_use]
pub fn format_services(view: &ServicesView) -> String {
    let mut out = String::new();
    for (k, v) in view.services.iter().filter(|(k, _)| k.slot == 0) {
        let proto = match k.proto {
            6 => "TCP",
            17 => "UDP",
            132 => "SCTP",
            _ => "?",
        };
        let mut notes = Vec::new();
        if v.flags & flags::REJECT_EMPTY != 0 {
            notes.push("reject (no endpoints)".to_owned());
        }
        if v.flags & flags::DROP_EMPTY != 0 {
            notes.push("drop (no local endpoint)".to_owned());
        }
        if v.affinity_timeout != 0 {
            notes.push(format!("affinity {}s", v.affinity_timeout));
        }
        if let Some(c) = view.frontend_stats.get(&v.id) {
            notes.push(traffic(c));
        }
        let _ = writeln!(
            out,
            "{} {proto} id {} backends {}{}{}",
            fmt_addr(&k.addr, k.family, k.port.to_host()),
            v.id,
            v.count,
            if notes.is_empty() { "" } else { "  " },
            notes.join(", ")
        );
        for slot in 1..=v.count {
            let line = match view.services.get(&ServiceKey { slot, ..*k }) {
                Some(s) => match view.backends.get(&s.id) {
                    Some(b) => format!(
                        "{}{} (backend {}{}{}){}",
                        fmt_addr(&b.addr, b.family, b.port.to_host()),
                        view.names
                            .get(&s.id)
                            .map(|n| format!(" {n}"))
                            .unwrap_or_default(),
                        s.id,
                        if b.flags & backend_flags::LOCAL != 0 {
                            ", local"
                        } else {
                            ""
                        },
                        if b.flags & backend_flags::TERMINATING != 0 {
                            ", terminating"
                        } else {
                            ""
                        },
                        view.backend_stats
                            .get(&s.id)
                            .map(|c| format!(" {}", traffic(c)))
                            .unwrap_or_default(),
                    ),
                    None => format!("MISSING backend {}", s.id),
                },
                None => "MISSING slot".to_owned(),
            };
            let _ = writeln!(out, "  slot {slot}: {line}");
        }
    }
    if out.is_empty() {
        out.push_str("no frontends programmed\n");
    }
    out
}

/// One pinned link, as the kernel describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
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
        views.push(PinnedLinkView {
            pin: path.strip_prefix(&base).unwrap_or(&path).to_owned(),
            link_id: info.id(),
            link_type: info
                .link_type()
                .map_or_else(|_| "?".to_owned(), |t| format!("{t:?}").to_lowercase()),
            program_id: info.program_id(),
            program: names
                .get(&info.program_id())
                .cloned()
                .unwrap_or_else(|| "?".to_owned()),
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

/// One pinned link per line: pin, link type and id, program id and name.
#[must_use]
pub fn format_links(bpffs: &Path, links: &[PinnedLinkView]) -> String {
    let base = pins::links_dir(&pin_dir(bpffs));
    if links.is_empty() {
        return format!("no links pinned in {}\n", base.display());
    }
    let mut out = format!("links pinned in {}\n", base.display());
    let width = links
        .iter()
        .map(|l| l.pin.as_os_str().len())
        .max()
        .unwrap_or(0);
    for l in links {
        let _ = writeln!(
            out,
            "{:<width$}  {:<6} link {:<6} program {:<6} {}",
            l.pin.display(),
            l.link_type,
            l.link_id,
            l.program_id,
            l.program
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use svc_common::{Be16, addr::from_v4};

    use super::*;

    #[test]
    fn stats_table_has_one_line_per_counter() {
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
        let t = format_pkt_stats(&stats);
        assert_eq!(t.lines().count(), 3);
        assert!(
            t.lines()
                .nth(1)
                .unwrap()
                .split_whitespace()
                .eq(["tcp", "3", "180"])
        );
    }

    #[test]
    fn services_view_lists_frontends_with_their_backends() {
        let k = ServiceKey {
            addr: from_v4([198, 19, 0, 10]),
            port: Be16::from_host(80),
            slot: 0,
            proto: 6,
            family: 4,
            scope: 0,
            _pad: 0,
        };
        let mut services = BTreeMap::new();
        services.insert(
            k,
            ServiceValue {
                id: 1,
                count: 1,
                flags: 0,
                affinity_timeout: 0,
                _pad: 0,
            },
        );
        services.insert(
            ServiceKey { slot: 1, ..k },
            ServiceValue {
                id: 7,
                ..ServiceValue::default()
            },
        );
        let mut backends = BTreeMap::new();
        backends.insert(
            7,
            Backend {
                addr: from_v4([198, 18, 1, 10]),
                port: Be16::from_host(5000),
                family: 4,
                flags: backend_flags::LOCAL,
            },
        );
        let mut backend_stats = BTreeMap::new();
        backend_stats.insert(
            7,
            Counter {
                packets: 4,
                bytes: 300,
            },
        );
        let mut frontend_stats = BTreeMap::new();
        frontend_stats.insert(
            1,
            Counter {
                packets: 4,
                bytes: 300,
            },
        );
        let mut view = ServicesView {
            services,
            backends,
            frontend_stats,
            backend_stats,
            names: BTreeMap::new(),
        };
        assert_eq!(
            format_services(&view),
            "198.19.0.10:80 TCP id 1 backends 1  [4 packets, 300 bytes]\n  slot 1: 198.18.1.10:5000 (backend 7, local) [4 packets, 300 bytes]\n"
        );
        // With the Pod behind the backend (BACKEND_NAMES_V1).
        view.names.insert(7, "default/web-0".to_owned());
        assert_eq!(
            format_services(&view),
            "198.19.0.10:80 TCP id 1 backends 1  [4 packets, 300 bytes]\n  slot 1: 198.18.1.10:5000 default/web-0 (backend 7, local) [4 packets, 300 bytes]\n"
        );
    }

    #[test]
    fn pinned_links_are_listed_one_per_line() {
        let bpffs = Path::new("/sys/fs/bpf");
        assert_eq!(
            format_links(bpffs, &[]),
            "no links pinned in /sys/fs/bpf/svc/v1/links\n"
        );
        let links = [
            PinnedLinkView {
                pin: PathBuf::from("cgroup/4242/svc_sock_conn4"),
                link_id: 12,
                link_type: "cgroup".to_owned(),
                program_id: 40,
                program: "svc_sock_conn4".to_owned(),
            },
            PinnedLinkView {
                pin: PathBuf::from("tc/7/ingress"),
                link_id: 9,
                link_type: "tcx".to_owned(),
                program_id: 31,
                program: "svc_tc_from_pod".to_owned(),
            },
        ];
        assert_eq!(
            format_links(bpffs, &links),
            "links pinned in /sys/fs/bpf/svc/v1/links\n\
             cgroup/4242/svc_sock_conn4  cgroup link 12     program 40     svc_sock_conn4\n\
             tc/7/ingress                tcx    link 9      program 31     svc_tc_from_pod\n"
        );
    }
}
