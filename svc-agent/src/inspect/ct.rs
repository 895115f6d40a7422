//! `svc-agent inspect ct`: both connection tables (`CT_V1`, answered flows; `CT_NEW_V1`, flows
//! nothing answered yet), read from their pins with `BPF_MAP_LOOKUP_BATCH`.

use std::{fmt::Write as _, path::Path};

use anyhow::Context as _;
use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use svc_common::{
    addr::FAMILY_V4,
    conntrack::{CtKey, CtValue, dir, idle_timeout_ns, state},
};

use super::open_pinned;
use crate::datapath::batch;

/// Entries printed per table at most (the count is always complete).
pub const MAX_LINES: usize = 1000;

/// One connection table as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CtTable {
    /// The map's name.
    pub name: &'static str,
    /// Whether it is the table of unanswered flows (its own timeout).
    pub unanswered: bool,
    /// Its capacity.
    pub max_entries: u32,
    /// Every entry, sorted.
    pub entries: Vec<(CtKey, CtValue)>,
}

/// Reads `CT_V1` and `CT_NEW_V1` (the latter only if pinned: an older agent's pins lack it).
pub fn read_ct(bpffs: &Path) -> anyhow::Result<Vec<CtTable>> {
    let mut out = Vec::new();
    for (name, unanswered) in [("CT_V1", false), ("CT_NEW_V1", true)] {
        if unanswered && !crate::loader::pin_dir(bpffs).join(name).exists() {
            continue;
        }
        let data = open_pinned(bpffs, name)?;
        let max_entries = data.info().map_or(0, |i| i.max_entries());
        let map: BpfHashMap<MapData, CtKey, CtValue> =
            BpfHashMap::try_from(Map::LruHashMap(data)).with_context(|| name.to_owned())?;
        let mut entries = batch::entries(&map)
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("reading {name}"))?;
        entries
            .sort_by_key(|(k, _)| (k.family, k.proto, k.src, k.sport.0, k.dst, k.dport.0, k.dir));
        out.push(CtTable {
            name,
            unanswered,
            max_entries,
            entries,
        });
    }
    Ok(out)
}

/// `CLOCK_MONOTONIC` now, in ns: the clock the programs stamp entries with.
pub fn monotonic_ns() -> anyhow::Result<u64> {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .context("clock_gettime(CLOCK_MONOTONIC)")?;
    Ok(u64::try_from(t.tv_sec()).unwrap_or(0) * 1_000_000_000
        + u64::try_from(t.tv_nsec()).unwrap_or(0))
}

fn endpoint(addr: &[u8; 16], family: u8, port: u16) -> String {
    if family == FAMILY_V4 {
        let v4 = std::net::Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]);
        format!("{v4}:{port}")
    } else {
        format!("[{}]:{port}", std::net::Ipv6Addr::from(*addr))
    }
}

fn state_words(st: u8) -> String {
    let names = [
        (state::FIN_FORWARD, "fin-from-client"),
        (state::FIN_REPLY, "fin-from-backend"),
        (state::CLOSING, "closing"),
        (state::HAIRPIN_REPLY, "hairpin"),
    ];
    let words: Vec<&str> = names
        .iter()
        .filter(|(bit, _)| st & bit != 0)
        .map(|(_, n)| *n)
        .collect();
    if words.is_empty() {
        "open".to_owned()
    } else {
        words.join(",")
    }
}

/// One line per entry, under a line per table with its count and capacity: the packet's tuple,
/// where it goes (`=>` backend for a forward entry, `<=` the service restored as the source
/// for a reply leg), ids, state, and idle time (or `expired`, awaiting eviction).
#[must_use]
pub fn format_ct(tables: &[CtTable], now_ns: u64) -> String {
    let mut out = String::new();
    for t in tables {
        let what = if t.unanswered {
            "flows nothing answered yet"
        } else {
            "answered flows"
        };
        let _ = writeln!(
            out,
            "{} ({what}): {} of {} entries",
            t.name,
            t.entries.len(),
            t.max_entries
        );
        for (k, v) in t.entries.iter().take(MAX_LINES) {
            let proto = match k.proto {
                6 => "TCP",
                17 => "UDP",
                _ => "?",
            };
            let reply = k.dir == dir::REPLY || v.state & state::HAIRPIN_REPLY != 0;
            let idle = now_ns.saturating_sub(v.last_seen_ns);
            let timeout = idle_timeout_ns(t.unanswered, k.proto, v.state);
            let age = if idle > timeout {
                "expired".to_owned()
            } else {
                format!("idle {}s", idle / 1_000_000_000)
            };
            let _ = writeln!(
                out,
                "  {proto} {} -> {} {} {}  frontend {} backend {}  {}  {age}",
                endpoint(&k.src, k.family, k.sport.to_host()),
                endpoint(&k.dst, k.family, k.dport.to_host()),
                if reply { "<=" } else { "=>" },
                endpoint(&v.addr, k.family, v.port.to_host()),
                v.frontend_id,
                v.backend_id,
                state_words(v.state),
            );
        }
        if t.entries.len() > MAX_LINES {
            let _ = writeln!(out, "  ... and {} more", t.entries.len() - MAX_LINES);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use svc_common::{Be16, addr::from_v4};

    use super::*;

    #[test]
    fn a_flow_shows_both_legs_with_state_and_age() {
        let fwd = CtKey {
            src: from_v4([198, 18, 1, 10]),
            dst: from_v4([198, 19, 0, 10]),
            sport: Be16::from_host(40000),
            dport: Be16::from_host(80),
            proto: 6,
            family: FAMILY_V4,
            dir: dir::FORWARD,
            _pad: 0,
        };
        let value = CtValue {
            addr: from_v4([198, 18, 2, 10]),
            port: Be16::from_host(5000),
            state: state::FIN_FORWARD,
            backend_id: 7,
            frontend_id: 3,
            last_seen_ns: 1_000_000_000,
            ..CtValue::default()
        };
        let tables = [
            CtTable {
                name: "CT_V1",
                unanswered: false,
                max_entries: 16,
                entries: vec![(fwd, value)],
            },
            CtTable {
                name: "CT_NEW_V1",
                unanswered: true,
                max_entries: 8,
                entries: vec![(fwd, value)],
            },
        ];
        let text = format_ct(&tables, 71_000_000_000);
        assert_eq!(
            text,
            "CT_V1 (answered flows): 1 of 16 entries\n  TCP 198.18.1.10:40000 -> \
             198.19.0.10:80 => 198.18.2.10:5000  frontend 3 backend 7  fin-from-client  idle \
             70s\nCT_NEW_V1 (flows nothing answered yet): 1 of 8 entries\n  TCP \
             198.18.1.10:40000 -> 198.19.0.10:80 => 198.18.2.10:5000  frontend 3 backend 7  \
             fin-from-client  expired\n"
        );
    }
}
