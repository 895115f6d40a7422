//! `svc-agent inspect ct`: both connection tables (`CT_V1`, answered flows; `CT_NEW_V1`, flows
//! nothing answered yet), read from their pins with `BPF_MAP_LOOKUP_BATCH`.

use std::{collections::BTreeMap, fmt::Write as _, net::IpAddr, path::Path};

use anyhow::Context as _;
use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use serde::{Deserialize, Serialize};
use svc_common::{
    addr::FAMILY_V4,
    conntrack::{CtKey, CtValue, dir, idle_timeout_ns, state},
};

use super::{
    Format, open_pinned,
    output::{self, Table},
};
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

pub(crate) fn state_words(st: u8) -> String {
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

/// Which entries `inspect ct` shows (every one when empty).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CtFilter {
    /// An address the entry names: its source, destination or where it goes.
    pub addr: Option<IpAddr>,
    /// A port the entry names, likewise.
    pub port: Option<u16>,
    /// Its IP protocol number.
    pub proto: Option<u8>,
    /// The Service (`namespace/name`) of its frontend (`FRONTEND_NAMES_V1`).
    pub service: Option<String>,
}

/// One entry of a connection table (a JSON object of `-o json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CtRow {
    /// `CT_V1` (answered flows) or `CT_NEW_V1` (nothing answered yet).
    pub table: String,
    /// `TCP` or `UDP`.
    pub protocol: String,
    /// The packet's source, `addr:port`.
    pub source: String,
    /// The packet's destination.
    pub destination: String,
    /// `forward` (client to service: goes to `translated`) or `reply` (backend to client:
    /// its source becomes `translated`, the service).
    pub direction: String,
    /// The backend (forward) or the service restored as the source (reply).
    pub translated: String,
    /// The frontend id.
    pub frontend_id: u32,
    /// The backend id.
    pub backend_id: u32,
    /// `namespace/name` of the frontend's Service, if `FRONTEND_NAMES_V1` names it.
    pub service: Option<String>,
    /// The Service port's name, likewise.
    pub port_name: Option<String>,
    /// `open`, or the FIN/closing/hairpin bits, comma-separated.
    pub state: String,
    /// Seconds since its last packet.
    pub idle_seconds: u64,
    /// Idle past its timeout: awaiting eviction (the programs treat it as gone).
    pub expired: bool,
}

/// The entries of `tables` that `filter` lets through, in table then tuple order; frontend
/// ids named through `names` (`FRONTEND_NAMES_V1`, by id: `namespace/name`, port name).
#[must_use]
pub fn ct_rows(
    tables: &[CtTable],
    now_ns: u64,
    names: &BTreeMap<u32, (String, String)>,
    filter: &CtFilter,
) -> Vec<CtRow> {
    let mut rows = Vec::new();
    for t in tables {
        for (k, v) in &t.entries {
            let name = names.get(&v.frontend_id);
            let ips = [&k.src, &k.dst, &v.addr].map(|a| super::ip(a, k.family));
            let ports = [k.sport, k.dport, v.port].map(svc_common::Be16::to_host);
            let keep = filter.addr.is_none_or(|a| ips.contains(&a))
                && filter.port.is_none_or(|p| ports.contains(&p))
                && filter.proto.is_none_or(|p| p == k.proto)
                && filter
                    .service
                    .as_ref()
                    .is_none_or(|s| name.is_some_and(|(n, _)| n == s));
            if !keep {
                continue;
            }
            let reply = k.dir == dir::REPLY || v.state & state::HAIRPIN_REPLY != 0;
            let idle = now_ns.saturating_sub(v.last_seen_ns);
            rows.push(CtRow {
                table: t.name.to_owned(),
                protocol: super::proto_name(k.proto).to_owned(),
                source: endpoint(&k.src, k.family, k.sport.to_host()),
                destination: endpoint(&k.dst, k.family, k.dport.to_host()),
                direction: if reply { "reply" } else { "forward" }.to_owned(),
                translated: endpoint(&v.addr, k.family, v.port.to_host()),
                frontend_id: v.frontend_id,
                backend_id: v.backend_id,
                service: name.map(|(n, _)| n.clone()),
                port_name: name.map(|(_, p)| p.clone()),
                state: state_words(v.state),
                idle_seconds: idle / 1_000_000_000,
                expired: idle > idle_timeout_ns(t.unanswered, k.proto, v.state),
            });
        }
    }
    rows
}

/// `inspect ct` in `format`: a row per entry (at most [`MAX_LINES`] per table; `wide` adds the
/// ids and the Service port), then each table's count and capacity; or JSON (every entry).
///
/// # Errors
/// When JSON serialization fails.
pub fn format_ct(
    tables: &[CtTable],
    now_ns: u64,
    names: &BTreeMap<u32, (String, String)>,
    filter: &CtFilter,
    format: Format,
) -> anyhow::Result<String> {
    let rows = ct_rows(tables, now_ns, names, filter);
    if format == Format::Json {
        return output::json(&rows);
    }
    let wide = format == Format::Wide;
    let mut headers = vec![
        "TABLE",
        "PROTO",
        "SOURCE",
        "DESTINATION",
        "DIR",
        "TRANSLATED",
        "SERVICE",
        "STATE",
        "IDLE",
    ];
    if wide {
        headers.extend(["PORT", "FRONTEND_ID", "BACKEND_ID"]);
    }
    let mut t = Table::new(&headers);
    let mut shown = BTreeMap::<&str, usize>::new();
    let mut cut = 0;
    for r in &rows {
        let n = shown.entry(r.table.as_str()).or_default();
        *n += 1;
        if *n > MAX_LINES {
            cut += 1;
            continue;
        }
        let mut cells = vec![
            r.table.clone(),
            r.protocol.clone(),
            r.source.clone(),
            r.destination.clone(),
            if r.direction == "reply" { "<=" } else { "=>" }.to_owned(),
            r.translated.clone(),
            r.service.clone().unwrap_or_default(),
            r.state.clone(),
            if r.expired {
                "expired".to_owned()
            } else {
                format!("{}s", r.idle_seconds)
            },
        ];
        if wide {
            cells.extend([
                r.port_name.clone().unwrap_or_default(),
                r.frontend_id.to_string(),
                r.backend_id.to_string(),
            ]);
        }
        t.row(cells);
    }
    let filtered = *filter != CtFilter::default();
    let counts: Vec<String> = tables
        .iter()
        .map(|t| {
            let what = if t.unanswered {
                "flows nothing answered yet"
            } else {
                "answered flows"
            };
            let matching = rows.iter().filter(|r| r.table == t.name).count();
            if filtered {
                format!(
                    "{}: {matching} matching of {} of {} entries ({what})",
                    t.name,
                    t.entries.len(),
                    t.max_entries
                )
            } else {
                format!(
                    "{}: {} of {} entries ({what})",
                    t.name,
                    t.entries.len(),
                    t.max_entries
                )
            }
        })
        .collect();
    let mut count = counts.join("; ");
    if cut > 0 {
        let _ = write!(
            count,
            "; {cut} more not shown (at most {MAX_LINES} per table; -o json shows all)"
        );
    }
    Ok(t.render(&count))
}

#[cfg(test)]
mod tests {
    use svc_common::{Be16, addr::from_v4};

    use super::*;

    type Names = BTreeMap<u32, (String, String)>;

    /// One forward entry in both tables, of frontend 3 (`default/web`, port `http`).
    fn sample() -> ([CtTable; 2], Names) {
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
        let names = BTreeMap::from([(3, ("default/web".to_owned(), "http".to_owned()))]);
        (tables, names)
    }

    #[test]
    fn a_flow_shows_both_legs_with_state_and_age() {
        let (tables, names) = sample();
        let all = CtFilter::default();
        let text = format_ct(&tables, 71_000_000_000, &names, &all, Format::Table).unwrap();
        assert_eq!(
            text,
            "TABLE      PROTO  SOURCE             DESTINATION     DIR  TRANSLATED        SERVICE      STATE            IDLE\n\
             CT_V1      TCP    198.18.1.10:40000  198.19.0.10:80  =>   198.18.2.10:5000  default/web  fin-from-client  70s\n\
             CT_NEW_V1  TCP    198.18.1.10:40000  198.19.0.10:80  =>   198.18.2.10:5000  default/web  fin-from-client  expired\n\
             CT_V1: 1 of 16 entries (answered flows); CT_NEW_V1: 1 of 8 entries (flows nothing answered yet)\n"
        );
        // JSON parses back, one object per entry.
        let json = format_ct(&tables, 71_000_000_000, &names, &all, Format::Json).unwrap();
        let back: Vec<CtRow> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, ct_rows(&tables, 71_000_000_000, &names, &all));
        assert_eq!(back[0].service.as_deref(), Some("default/web"));
        assert_eq!(back[0].port_name.as_deref(), Some("http"));
        assert_eq!(
            (back[0].idle_seconds, back[0].expired, back[1].expired),
            (70, false, true)
        );
    }

    #[test]
    fn filters_keep_what_they_name_and_nothing_else() {
        let (tables, names) = sample();
        let all = CtFilter::default();
        let count = |f: CtFilter| ct_rows(&tables, 0, &names, &f).len();
        let ip = |a: &str| Some(a.parse().unwrap());
        assert_eq!(
            count(CtFilter {
                addr: ip("198.18.2.10"),
                ..all.clone()
            }),
            2
        );
        assert_eq!(
            count(CtFilter {
                addr: ip("198.18.1.10"),
                ..all.clone()
            }),
            2
        );
        assert_eq!(
            count(CtFilter {
                addr: ip("198.18.9.9"),
                ..all.clone()
            }),
            0
        );
        assert_eq!(
            count(CtFilter {
                port: Some(80),
                ..all.clone()
            }),
            2
        );
        assert_eq!(
            count(CtFilter {
                port: Some(5000),
                ..all.clone()
            }),
            2
        );
        assert_eq!(
            count(CtFilter {
                port: Some(81),
                ..all.clone()
            }),
            0
        );
        assert_eq!(
            count(CtFilter {
                proto: Some(6),
                ..all.clone()
            }),
            2
        );
        assert_eq!(
            count(CtFilter {
                proto: Some(17),
                ..all.clone()
            }),
            0
        );
        let web = Some("default/web".to_owned());
        assert_eq!(
            count(CtFilter {
                service: web.clone(),
                ..all.clone()
            }),
            2
        );
        let other = Some("default/other".to_owned());
        assert_eq!(
            count(CtFilter {
                service: other,
                ..all.clone()
            }),
            0
        );
        // Together: all must hold.
        let both = CtFilter {
            service: web,
            proto: Some(17),
            ..all.clone()
        };
        assert_eq!(count(both), 0);
        let udp = CtFilter {
            proto: Some(17),
            ..all
        };
        let text = format_ct(&tables, 0, &names, &udp, Format::Table).unwrap();
        assert!(
            text.starts_with("CT_V1: 0 matching of 1 of 16 entries"),
            "{text}"
        );
    }
}
