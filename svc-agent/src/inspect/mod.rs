//! `svc-agent inspect`: read the pinned maps of a running (or stopped) agent and print them.

use std::{collections::BTreeMap, fmt::Write as _, path::Path};

use anyhow::Context as _;
use aya::maps::{HashMap as BpfHashMap, Map, MapData, PerCpuArray, PerCpuHashMap};
use svc_common::{
    addr::{FAMILY_V4, to_v4},
    service::{Backend, ServiceKey, ServiceValue, backend_flags, flags},
    stats::{Counter, DropReason, PktCounter},
};

use crate::loader::pin_dir;

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
    })
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
                        "{} (backend {}{}{}){}",
                        fmt_addr(&b.addr, b.family, b.port.to_host()),
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
        let text = format_services(&ServicesView {
            services,
            backends,
            frontend_stats,
            backend_stats,
        });
        assert_eq!(
            text,
            "198.19.0.10:80 TCP id 1 backends 1  [4 packets, 300 bytes]\n  slot 1: 198.18.1.10:5000 (backend 7, local) [4 packets, 300 bytes]\n"
        );
    }
}
