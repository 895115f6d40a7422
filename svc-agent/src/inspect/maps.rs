//! `svc-agent inspect maps`: each pinned map of this layout with its type, size, entries,
//! fill and the kernel memory it holds.

use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    path::Path,
};

use anyhow::Context as _;
use aya::maps::MapData;
use serde::{Deserialize, Serialize};
use svc_common::MAP_NAMES;

use super::{
    Format,
    output::{self, Table},
};
use crate::{loader::pin_dir, migrate};

/// One pinned map (a JSON object of `-o json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MapRow {
    /// Its name (`SERVICES_V1`).
    pub name: String,
    /// Whether it is pinned (false: an agent that predates it pinned the others).
    pub pinned: bool,
    /// The kernel's map type (`hash`, `lru_hash`, `percpu_array`, ...).
    #[serde(rename = "type")]
    pub kind: String,
    /// Key and value sizes in bytes.
    pub key_size: u32,
    /// Value size in bytes (per CPU for per-CPU maps).
    pub value_size: u32,
    /// Entries it can hold.
    pub max_entries: u32,
    /// Entries it holds: counted with batched lookups; an array's size (every index exists).
    pub entries: u64,
    /// How `entries` was found: `counted` (a walk of a map only the agent writes: exact while
    /// no pass runs), `snapshot` (a walk of a map the programs write: it changes while it is
    /// read), `size` (an array).
    pub counted: String,
    /// `entries / maxEntries`.
    pub fill_ratio: f64,
    /// Kernel memory charged to the map (`memlock` of `/proc/self/fdinfo/<fd>`), in bytes.
    pub memlock_bytes: u64,
}

/// The maps this agent writes alone (the programs never write them).
const AGENT_ONLY: &[&str] = &[
    "SERVICES_V1",
    "BACKENDS_V1",
    "ADDRS_V1",
    "BACKEND_NAMES_V1",
    "FRONTEND_NAMES_V1",
    "SOURCE_RANGES_V1",
];

/// `enum bpf_map_type` names (uapi) of the types this project uses.
fn type_name(t: u32) -> String {
    match t {
        1 => "hash".to_owned(),
        2 => "array".to_owned(),
        5 => "percpu_hash".to_owned(),
        6 => "percpu_array".to_owned(),
        9 => "lru_hash".to_owned(),
        10 => "lru_percpu_hash".to_owned(),
        11 => "lpm_trie".to_owned(),
        other => format!("type {other}"),
    }
}

/// `memlock` of an open descriptor's fdinfo, in bytes.
fn memlock(fdinfo: &str) -> Option<u64> {
    fdinfo
        .lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Every map of [`MAP_NAMES`], in that order.
///
/// # Errors
/// When a pinned map cannot be opened or read.
pub fn read_maps(bpffs: &Path) -> anyhow::Result<Vec<MapRow>> {
    let dir = pin_dir(bpffs);
    let mut rows = Vec::new();
    for name in MAP_NAMES {
        let path = dir.join(name);
        if !path.exists() {
            rows.push(MapRow {
                name: (*name).to_owned(),
                pinned: false,
                kind: String::new(),
                key_size: 0,
                value_size: 0,
                max_entries: 0,
                entries: 0,
                counted: String::new(),
                fill_ratio: 0.0,
                memlock_bytes: 0,
            });
            continue;
        }
        let map = MapData::from_pin(&path)
            .with_context(|| format!("opening pinned map {}", path.display()))?;
        let info = map
            .info()
            .with_context(|| format!("reading {name}'s info"))?;
        let map_type = info.map_type().map_or(0, |t| t as u32);
        let is_array = matches!(map_type, 2 | 6);
        let entries = migrate::count_entries(&map).with_context(|| format!("counting {name}"))?;
        let fdinfo_path = format!("/proc/self/fdinfo/{}", map.fd().as_fd().as_raw_fd());
        let fdinfo = std::fs::read_to_string(&fdinfo_path)
            .with_context(|| format!("reading {fdinfo_path}"))?;
        let max_entries = info.max_entries();
        rows.push(MapRow {
            name: (*name).to_owned(),
            pinned: true,
            kind: type_name(map_type),
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries,
            entries: entries as u64,
            counted: if is_array {
                "size"
            } else if AGENT_ONLY.contains(name) {
                "counted"
            } else {
                "snapshot"
            }
            .to_owned(),
            fill_ratio: if max_entries == 0 {
                0.0
            } else {
                #[expect(
                    clippy::cast_precision_loss,
                    reason = "a ratio; entries never exceed a u32 max_entries"
                )]
                let ratio = entries as f64 / f64::from(max_entries);
                ratio
            },
            memlock_bytes: memlock(&fdinfo).unwrap_or(0),
        });
    }
    Ok(rows)
}

/// `n` bytes in KiB / MiB / GiB.
fn human_bytes(n: u64) -> String {
    #[expect(clippy::cast_precision_loss, reason = "shown with one decimal")]
    let f = n as f64;
    match n {
        0..1024 => format!("{n} B"),
        1024..1_048_576 => format!("{:.1} KiB", f / 1024.0),
        1_048_576..1_073_741_824 => format!("{:.1} MiB", f / 1_048_576.0),
        _ => format!("{:.1} GiB", f / 1_073_741_824.0),
    }
}

/// `inspect maps` in `format`: a row per map (`wide`: key and value sizes, how entries were
/// counted, memory in bytes), a total of kernel memory; or JSON.
///
/// # Errors
/// When JSON serialization fails.
pub fn format_maps(rows: &[MapRow], format: Format) -> anyhow::Result<String> {
    if format == Format::Json {
        return output::json(rows);
    }
    let wide = format == Format::Wide;
    let mut headers = vec!["NAME", "TYPE", "MAX_ENTRIES", "ENTRIES", "FILL", "MEMORY"];
    if wide {
        headers.extend(["KEY", "VALUE", "COUNTED", "MEMLOCK_BYTES"]);
    }
    let mut t = Table::new(&headers);
    for r in rows {
        if !r.pinned {
            let mut cells = vec![r.name.clone(), "not pinned".to_owned()];
            cells.resize(headers.len(), String::new());
            t.row(cells);
            continue;
        }
        let entries = if r.counted == "snapshot" {
            format!("~{}", r.entries)
        } else {
            r.entries.to_string()
        };
        let mut cells = vec![
            r.name.clone(),
            r.kind.clone(),
            r.max_entries.to_string(),
            entries,
            format!("{:.1}%", r.fill_ratio * 100.0),
            human_bytes(r.memlock_bytes),
        ];
        if wide {
            cells.extend([
                r.key_size.to_string(),
                r.value_size.to_string(),
                r.counted.clone(),
                r.memlock_bytes.to_string(),
            ]);
        }
        t.row(cells);
    }
    let total: u64 = rows.iter().map(|r| r.memlock_bytes).sum();
    let pinned = rows.iter().filter(|r| r.pinned).count();
    Ok(t.render(&format!(
        "{} pinned, {} of kernel memory (memlock); ~: counted while the programs write it",
        output::count(pinned, "map", "maps"),
        human_bytes(total)
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memlock_is_read_from_fdinfo() {
        let fdinfo = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1057\nmap_type:\t1\n\
                      key_size:\t4\nvalue_size:\t20\nmax_entries:\t4096\nmap_flags:\t0x0\n\
                      map_extra:\t0x0\nmemlock:\t143360\nmap_id:\t48\nfrozen:\t0\n";
        assert_eq!(memlock(fdinfo), Some(143_360));
        assert_eq!(memlock("pos:\t0\n"), None);
    }

    #[test]
    fn maps_table_marks_estimates_and_unpinned_maps_and_totals_memory() {
        let row = |name: &str, counted: &str, entries: u64| MapRow {
            name: name.to_owned(),
            pinned: true,
            kind: "hash".to_owned(),
            key_size: 4,
            value_size: 20,
            max_entries: 100,
            entries,
            counted: counted.to_owned(),
            fill_ratio: f64::from(u32::try_from(entries).unwrap()) / 100.0,
            memlock_bytes: 2048,
        };
        let mut rows = vec![
            row("BACKENDS_V1", "counted", 5),
            row("CT_V1", "snapshot", 50),
        ];
        rows.push(MapRow {
            pinned: false,
            memlock_bytes: 0,
            ..row("FRONTEND_NAMES_V1", "", 0)
        });
        let text = format_maps(&rows, Format::Table).unwrap();
        assert_eq!(
            text,
            "NAME               TYPE        MAX_ENTRIES  ENTRIES  FILL   MEMORY\n\
             BACKENDS_V1        hash        100          5        5.0%   2.0 KiB\n\
             CT_V1              hash        100          ~50      50.0%  2.0 KiB\n\
             FRONTEND_NAMES_V1  not pinned  -            -        -      -\n\
             2 maps pinned, 4.0 KiB of kernel memory (memlock); ~: counted while the programs write it\n"
        );
        let back: Vec<MapRow> =
            serde_json::from_str(&format_maps(&rows, Format::Json).unwrap()).unwrap();
        assert_eq!(back, rows);
    }
}
