//! `svc-agent inspect`: read the pinned maps of a running (or stopped) agent and print them.

use std::path::Path;

use anyhow::Context as _;
use aya::maps::{MapData, PerCpuArray};
use svc_common::stats::{Counter, PktCounter};

use crate::loader::pin_dir;

/// Reads `PKT_STATS_V1` from the pin directory under `bpffs`, summed over CPUs.
pub fn read_pkt_stats(bpffs: &Path) -> anyhow::Result<Vec<(PktCounter, Counter)>> {
    let path = pin_dir(bpffs).join("PKT_STATS_V1");
    let data = MapData::from_pin(&path).with_context(|| {
        format!(
            "opening pinned map {} (is the agent running?)",
            path.display()
        )
    })?;
    let map: PerCpuArray<_, Counter> = PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data))?;
    PktCounter::ALL
        .iter()
        .map(|c| {
            let per_cpu = map.get(&(*c as u32), 0)?;
            let sum = per_cpu.iter().fold(Counter::default(), |a, v| Counter {
                packets: a.packets + v.packets,
                bytes: a.bytes + v.bytes,
            });
            Ok((*c, sum))
        })
        .collect()
}

/// Formats the parser counters as a table.
#[must_use]
pub fn format_pkt_stats(stats: &[(PktCounter, Counter)]) -> String {
    use std::fmt::Write as _;
    let mut out = format!("{:<20} {:>12} {:>14}\n", "counter", "packets", "bytes");
    for (c, v) in stats {
        let _ = writeln!(out, "{:<20} {:>12} {:>14}", c.name(), v.packets, v.bytes);
    }
    out
}

#[cfg(test)]
mod tests {
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
}
