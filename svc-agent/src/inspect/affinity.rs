//! `svc-agent inspect affinity`: every `ClientIP` session affinity entry (`AFFINITY_V1`): the
//! client (an address, or a network namespace's cookie for the connect-time path), the frontend
//! and Service, the backend and Pod, how long since it was last used, and whether the kernel
//! would still honour it, checked as `lb_select_for_client` (`svc-ebpf/src/lb.rs`) checks it.
//! Works with the agent stopped: everything comes from the pins.

use std::{collections::BTreeMap, net::IpAddr, path::Path};

use anyhow::Context as _;
use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use serde::{Deserialize, Serialize};
use svc_common::{
    affinity::{AffinityKey, AffinityValue, CLIENT_NETNS, fingerprint},
    service::{ServiceKey, ServiceValue, backend_flags, flags},
};

use super::{
    Format, ServicesView, fmt_addr, ip, open_pinned,
    output::{self, Table},
    proto_name,
};
use crate::datapath::batch;

/// `AFFINITY_V1` as read: its entries (sorted by client, then frontend id) and capacity.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AffinityTable {
    /// Every entry.
    pub entries: Vec<(AffinityKey, AffinityValue)>,
    /// The map's capacity.
    pub max_entries: u32,
}

/// Reads `AFFINITY_V1` with batched lookups (a snapshot: the programs write it meanwhile).
///
/// # Errors
/// When the pinned map cannot be opened or read.
pub fn read_affinity(bpffs: &Path) -> anyhow::Result<AffinityTable> {
    let data = open_pinned(bpffs, "AFFINITY_V1")?;
    let max_entries = data.info().map_or(0, |i| i.max_entries());
    let map: BpfHashMap<MapData, AffinityKey, AffinityValue> =
        BpfHashMap::try_from(Map::LruHashMap(data)).context("AFFINITY_V1")?;
    let mut entries = batch::entries(&map)
        .collect::<Result<Vec<_>, _>>()
        .context("reading AFFINITY_V1")?;
    entries.sort_by_key(|(k, _)| (k.family, k.client, k.frontend_id));
    Ok(AffinityTable {
        entries,
        max_entries,
    })
}

/// One affinity entry as `inspect affinity` shows it (a JSON object of `-o json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AffinityRow {
    /// The client: its address (the packet path), or `netns:<cookie>` (the connect-time path
    /// keys a socket's client by its network namespace).
    pub client: String,
    /// The client's address; null for a namespace.
    pub client_address: Option<IpAddr>,
    /// The client's network namespace cookie; null for an address.
    pub client_netns: Option<u64>,
    /// The frontend id (the key's).
    pub frontend_id: u32,
    /// The frontend, `addr:port/PROTO`; null when `SERVICES_V1` has no frontend of that id.
    pub frontend: Option<String>,
    /// `namespace/name` of its Service (`FRONTEND_NAMES_V1`); null when unnamed.
    pub service: Option<String>,
    /// The Service port's name, likewise.
    pub port_name: Option<String>,
    /// The backend id the client sticks to.
    pub backend_id: u32,
    /// That backend, `addr:port`; null when `BACKENDS_V1` no longer holds it.
    pub backend: Option<String>,
    /// `namespace/name` of its Pod (`BACKEND_NAMES_V1`); null when unknown.
    pub pod: Option<String>,
    /// Seconds since the kernel last wrote or honoured the entry (each use refreshes it).
    pub idle_seconds: u64,
    /// The frontend's affinity timeout (slot 0), in seconds; 0 when it has no affinity (or is
    /// gone).
    pub timeout_seconds: u32,
    /// Whether the next connection of this client to this frontend would go to this backend.
    pub honoured: bool,
    /// Why not, when not honoured: `frontend gone`, `affinity off`, `no slots`, `expired`,
    /// `backend gone`, `backend terminating`, `backend not local`, `backend id reissued`
    /// (the fingerprint does not match the backend the id names now).
    pub reason: Option<String>,
}

/// Why the kernel would not honour entry `v` of frontend `fe` at `now_ns` (None: it would),
/// in `lb_select_for_client`'s order: affinity on and slots (else the entry is not even looked
/// at), not idle past the timeout, the backend exists, may take new connections from this
/// frontend (`affinity_eligible`) and is the one the entry was written for
/// (`affinity_same_pair`: `check` 0 is honoured by id alone).
#[must_use]
pub fn why_not_honoured(
    fe: Option<&ServiceValue>,
    v: &AffinityValue,
    backend: Option<&svc_common::service::Backend>,
    now_ns: u64,
) -> Option<&'static str> {
    let Some(fe) = fe else {
        return Some("frontend gone");
    };
    if fe.affinity_timeout == 0 {
        return Some("affinity off");
    }
    if fe.count == 0 {
        return Some("no slots");
    }
    if now_ns.saturating_sub(v.last_used_ns) > u64::from(fe.affinity_timeout) * 1_000_000_000 {
        return Some("expired");
    }
    let Some(b) = backend else {
        return Some("backend gone");
    };
    if b.flags & backend_flags::TERMINATING != 0 && fe.flags & flags::SERVES_TERMINATING == 0 {
        return Some("backend terminating");
    }
    if b.flags & backend_flags::LOCAL == 0 && fe.flags & flags::LOCAL_ONLY != 0 {
        return Some("backend not local");
    }
    if v.check != 0 && v.check != fingerprint(fe.id, b) {
        return Some("backend id reissued");
    }
    None
}

/// The client of key `k`: its text, address and namespace cookie.
fn client(k: &AffinityKey) -> (String, Option<IpAddr>, Option<u64>) {
    if k.family == CLIENT_NETNS {
        let mut cookie = [0u8; 8];
        cookie.copy_from_slice(&k.client[..8]);
        let cookie = u64::from_ne_bytes(cookie);
        (format!("netns:{cookie}"), None, Some(cookie))
    } else {
        let a = ip(&k.client, k.family);
        (a.to_string(), Some(a), None)
    }
}

/// The rows of `table` at `now_ns` (`CLOCK_MONOTONIC`), the frontends, backends and names from
/// `view`; in the table's order (client, then frontend id).
#[must_use]
pub fn affinity_rows(table: &AffinityTable, view: &ServicesView, now_ns: u64) -> Vec<AffinityRow> {
    // Slot 0 of each frontend id (the first key, should two scopes share one).
    let mut frontends: BTreeMap<u32, (&ServiceKey, &ServiceValue)> = BTreeMap::new();
    for (k, v) in view.services.iter().filter(|(k, _)| k.slot == 0) {
        frontends.entry(v.id).or_insert((k, v));
    }
    table
        .entries
        .iter()
        .map(|(k, v)| {
            let (text, client_address, client_netns) = client(k);
            let fe = frontends.get(&k.frontend_id);
            let b = view.backends.get(&v.backend_id);
            let name = view.frontend_names.get(&k.frontend_id);
            let why = why_not_honoured(fe.map(|(_, fv)| *fv), v, b, now_ns);
            AffinityRow {
                client: text,
                client_address,
                client_netns,
                frontend_id: k.frontend_id,
                frontend: fe.map(|(fk, _)| {
                    format!(
                        "{}/{}",
                        fmt_addr(&fk.addr, fk.family, fk.port.to_host()),
                        proto_name(fk.proto)
                    )
                }),
                service: name.map(|(s, _)| s.clone()),
                port_name: name.map(|(_, p)| p.clone()),
                backend_id: v.backend_id,
                backend: b.map(|b| fmt_addr(&b.addr, b.family, b.port.to_host())),
                pod: view.names.get(&v.backend_id).cloned(),
                idle_seconds: now_ns.saturating_sub(v.last_used_ns) / 1_000_000_000,
                timeout_seconds: fe.map_or(0, |(_, fv)| fv.affinity_timeout),
                honoured: why.is_none(),
                reason: why.map(str::to_owned),
            }
        })
        .collect()
}

/// `inspect affinity` in `format`: a row per entry (`wide` adds the ids, the port name and the
/// timeout), then the count; or JSON.
///
/// # Errors
/// When JSON serialization fails.
pub fn format_affinity(
    table: &AffinityTable,
    view: &ServicesView,
    now_ns: u64,
    filter: &AffinityFilter,
    format: Format,
) -> anyhow::Result<String> {
    let all = affinity_rows(table, view, now_ns);
    let total = all.len();
    let rows: Vec<AffinityRow> = all.into_iter().filter(|r| filter.matches(r)).collect();
    if format == Format::Json {
        return output::json(&rows);
    }
    let wide = format == Format::Wide;
    let mut headers = vec![
        "CLIENT", "FRONTEND", "SERVICE", "BACKEND", "POD", "IDLE", "HONOURED",
    ];
    if wide {
        headers.extend(["PORT", "TIMEOUT", "FRONTEND_ID", "BACKEND_ID"]);
    }
    let mut t = Table::new(&headers);
    for r in &rows {
        let mut cells = vec![
            r.client.clone(),
            r.frontend
                .clone()
                .unwrap_or_else(|| format!("id {}", r.frontend_id)),
            r.service.clone().unwrap_or_default(),
            r.backend
                .clone()
                .unwrap_or_else(|| format!("id {}", r.backend_id)),
            r.pod.clone().unwrap_or_default(),
            format!("{}s", r.idle_seconds),
            match &r.reason {
                None => "yes".to_owned(),
                Some(why) => format!("no ({why})"),
            },
        ];
        if wide {
            cells.extend([
                r.port_name.clone().unwrap_or_default(),
                format!("{}s", r.timeout_seconds),
                r.frontend_id.to_string(),
                r.backend_id.to_string(),
            ]);
        }
        t.row(cells);
    }
    let honoured = rows.iter().filter(|r| r.honoured).count();
    let shown = if filter.is_empty() {
        String::new()
    } else {
        format!("{} shown of ", rows.len())
    };
    Ok(t.render(&format!(
        "AFFINITY_V1: {shown}{total} of {} entries, {honoured} honoured",
        table.max_entries
    )))
}

/// Which entries `inspect affinity` shows (all by default).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AffinityFilter {
    /// Only entries of this client address.
    pub client: Option<IpAddr>,
    /// Only entries of this Service's frontends (`namespace/name`).
    pub service: Option<String>,
}

impl AffinityFilter {
    /// Whether no filter is set.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.client.is_none() && self.service.is_none()
    }

    /// Whether `row` passes the filter.
    #[must_use]
    pub fn matches(&self, row: &AffinityRow) -> bool {
        self.client.is_none_or(|c| row.client_address == Some(c))
            && self
                .service
                .as_ref()
                .is_none_or(|s| row.service.as_ref() == Some(s))
    }
}

#[cfg(test)]
mod tests {
    use svc_common::{Be16, addr::from_v4, service::Backend};

    use super::*;

    const S: u64 = 1_000_000_000;
    const NOW: u64 = 10_000 * S;

    fn backend(addr: [u8; 16], family: u8, port: u16, flags: u8) -> Backend {
        Backend {
            addr,
            port: Be16::from_host(port),
            family,
            flags,
        }
    }

    fn v6(text: &str) -> [u8; 16] {
        text.parse::<std::net::Ipv6Addr>().unwrap().octets()
    }

    /// Frontend 1 `default/sticky` (`198.19.0.141:80/TCP`, 600 s, slot -> 7) and frontend 2
    /// (`default/sticky6`, `[2001:db8:f::141]:80/TCP`, 600 s, local only, slot -> 9); backends 7
    /// (198.18.1.10:8080, `default/web-0`), 8 (terminating) and 9 (IPv6, not local).
    fn view() -> ServicesView {
        let k4 = ServiceKey {
            addr: from_v4([198, 19, 0, 141]),
            port: Be16::from_host(80),
            slot: 0,
            proto: 6,
            family: 4,
            scope: 0,
            _pad: 0,
        };
        let k6 = ServiceKey {
            addr: v6("2001:db8:f::141"),
            family: 6,
            ..k4
        };
        let fe = |id, flags| ServiceValue {
            id,
            count: 1,
            flags,
            affinity_timeout: 600,
            _pad: 0,
        };
        let slot = |id| ServiceValue {
            id,
            ..ServiceValue::default()
        };
        ServicesView {
            services: BTreeMap::from([
                (k4, fe(1, 0)),
                (ServiceKey { slot: 1, ..k4 }, slot(7)),
                (k6, fe(2, flags::LOCAL_ONLY)),
                (ServiceKey { slot: 1, ..k6 }, slot(9)),
            ]),
            backends: BTreeMap::from([
                (7, backend(from_v4([198, 18, 1, 10]), 4, 8080, 0)),
                (
                    8,
                    backend(
                        from_v4([198, 18, 1, 11]),
                        4,
                        8080,
                        backend_flags::TERMINATING,
                    ),
                ),
                (9, backend(v6("2001:db8:1::10"), 6, 8080, 0)),
            ]),
            frontend_stats: BTreeMap::new(),
            backend_stats: BTreeMap::new(),
            names: BTreeMap::from([(7, "default/web-0".to_owned())]),
            frontend_names: BTreeMap::from([
                (1, ("default/sticky".to_owned(), "api".to_owned())),
                (2, ("default/sticky6".to_owned(), String::new())),
            ]),
        }
    }

    fn key(client: [u8; 16], family: u8, frontend_id: u32) -> AffinityKey {
        AffinityKey {
            client,
            frontend_id,
            family,
            _pad: [0; 3],
        }
    }

    fn netns(cookie: u64) -> [u8; 16] {
        let mut k = [0; 16];
        k[..8].copy_from_slice(&cookie.to_ne_bytes());
        k
    }

    fn entry(view: &ServicesView, fe: u32, backend_id: u32, idle_s: u64) -> AffinityValue {
        AffinityValue {
            backend_id,
            check: fingerprint(fe, &view.backends[&backend_id]),
            last_used_ns: NOW - idle_s * S,
        }
    }

    #[test]
    fn entries_show_client_frontend_backend_and_whether_they_are_honoured() {
        let view = view();
        let client = from_v4([198, 18, 2, 10]);
        let table = AffinityTable {
            entries: vec![
                // Honoured: live, fingerprint of (1, backend 7).
                (key(client, 4, 1), entry(&view, 1, 7, 30)),
                // A connect-time client (a namespace cookie), expired.
                (key(netns(4242), CLIENT_NETNS, 1), entry(&view, 1, 7, 601)),
                // An IPv6 client of the local-only frontend whose backend is not local.
                (key(v6("2001:db8:2::10"), 6, 2), entry(&view, 2, 9, 1)),
            ],
            max_entries: 65_536,
        };
        assert_eq!(
            format_affinity(
                &table,
                &view,
                NOW,
                &AffinityFilter::default(),
                Format::Table
            )
            .unwrap(),
            "CLIENT          FRONTEND                  SERVICE          BACKEND                POD            IDLE  HONOURED\n\
             198.18.2.10     198.19.0.141:80/TCP       default/sticky   198.18.1.10:8080       default/web-0  30s   yes\n\
             netns:4242      198.19.0.141:80/TCP       default/sticky   198.18.1.10:8080       default/web-0  601s  no (expired)\n\
             2001:db8:2::10  [2001:db8:f::141]:80/TCP  default/sticky6  [2001:db8:1::10]:8080  -              1s    no (backend not local)\n\
             AFFINITY_V1: 3 of 65536 entries, 1 honoured\n"
        );
        let only = |client: Option<&str>, service: Option<&str>| AffinityFilter {
            client: client.map(|c| c.parse().unwrap()),
            service: service.map(ToOwned::to_owned),
        };
        let text = |filter| format_affinity(&table, &view, NOW, &filter, Format::Table).unwrap();
        let by_client = text(only(Some("198.18.2.10"), None));
        assert_eq!(by_client.lines().count(), 3, "{by_client}");
        assert!(
            by_client.ends_with("AFFINITY_V1: 1 shown of 3 of 65536 entries, 1 honoured\n"),
            "{by_client}"
        );
        let by_service = text(only(None, Some("default/sticky")));
        assert_eq!(by_service.lines().count(), 4, "{by_service}");
        assert!(!by_service.contains("sticky6"), "{by_service}");
        let none = text(only(Some("198.18.2.10"), Some("default/sticky6")));
        assert!(none.contains("0 shown of 3"), "{none}");
        let json =
            format_affinity(&table, &view, NOW, &AffinityFilter::default(), Format::Json).unwrap();
        let back: Vec<AffinityRow> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, affinity_rows(&table, &view, NOW));
        assert_eq!(
            (back[0].client_address, back[0].client_netns),
            (Some("198.18.2.10".parse().unwrap()), None)
        );
        assert_eq!(
            (back[1].client_address, back[1].client_netns),
            (None, Some(4242))
        );
        assert_eq!(back[0].pod.as_deref(), Some("default/web-0"));
        assert_eq!(back[0].port_name.as_deref(), Some("api"));
        assert_eq!(
            (back[1].honoured, back[1].reason.as_deref()),
            (false, Some("expired"))
        );
        let raw: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(raw[1]["clientNetns"], 4242);
        assert_eq!(raw[0]["timeoutSeconds"], 600);
        let wide =
            format_affinity(&table, &view, NOW, &AffinityFilter::default(), Format::Wide).unwrap();
        assert!(
            wide.lines()
                .nth(1)
                .unwrap()
                .ends_with("api   600s     1            7"),
            "{wide}"
        );
    }

    #[test]
    fn each_kernel_check_can_refuse_an_entry() {
        let view = view();
        let fe1 = &view.services.values().find(|v| v.id == 1).copied().unwrap();
        let b7 = view.backends[&7];
        let live = entry(&view, 1, 7, 0);
        assert_eq!(why_not_honoured(Some(fe1), &live, Some(&b7), NOW), None);
        // At the timeout exactly the kernel still honours it (`<=`); one ns later not.
        let at = AffinityValue {
            last_used_ns: NOW - 600 * S,
            ..live
        };
        assert_eq!(why_not_honoured(Some(fe1), &at, Some(&b7), NOW), None);
        assert_eq!(
            why_not_honoured(Some(fe1), &at, Some(&b7), NOW + 1),
            Some("expired")
        );
        // A stale fingerprint: id 7 now names another endpoint.
        let moved = backend(from_v4([198, 18, 1, 99]), 4, 8080, 0);
        assert_eq!(
            why_not_honoured(Some(fe1), &live, Some(&moved), NOW),
            Some("backend id reissued")
        );
        // An entry from before the check (0): honoured by id alone.
        let old = AffinityValue { check: 0, ..live };
        assert_eq!(why_not_honoured(Some(fe1), &old, Some(&moved), NOW), None);
        let b8 = view.backends[&8];
        let to8 = entry(&view, 1, 8, 0);
        assert_eq!(
            why_not_honoured(Some(fe1), &to8, Some(&b8), NOW),
            Some("backend terminating")
        );
        let serving_terminating = ServiceValue {
            flags: flags::SERVES_TERMINATING,
            ..*fe1
        };
        assert_eq!(
            why_not_honoured(Some(&serving_terminating), &to8, Some(&b8), NOW),
            None
        );
        assert_eq!(
            why_not_honoured(Some(fe1), &live, None, NOW),
            Some("backend gone")
        );
        assert_eq!(
            why_not_honoured(None, &live, Some(&b7), NOW),
            Some("frontend gone")
        );
        let off = ServiceValue {
            affinity_timeout: 0,
            ..*fe1
        };
        assert_eq!(
            why_not_honoured(Some(&off), &live, Some(&b7), NOW),
            Some("affinity off")
        );
        let empty = ServiceValue { count: 0, ..*fe1 };
        assert_eq!(
            why_not_honoured(Some(&empty), &live, Some(&b7), NOW),
            Some("no slots")
        );
    }

    #[test]
    fn an_entry_of_a_removed_frontend_or_backend_names_the_ids() {
        let view = view();
        let table = AffinityTable {
            entries: vec![(
                key(from_v4([198, 18, 2, 10]), 4, 77),
                AffinityValue {
                    backend_id: 55,
                    check: 1,
                    last_used_ns: NOW,
                },
            )],
            max_entries: 8,
        };
        let text = format_affinity(
            &table,
            &view,
            NOW,
            &AffinityFilter::default(),
            Format::Table,
        )
        .unwrap();
        assert!(
            text.lines().nth(1).unwrap().split_whitespace().eq([
                "198.18.2.10",
                "id",
                "77",
                "-",
                "id",
                "55",
                "-",
                "0s",
                "no",
                "(frontend",
                "gone)"
            ]),
            "{text}"
        );
        let rows = affinity_rows(&table, &view, NOW);
        assert_eq!(
            (rows[0].frontend.as_deref(), rows[0].backend.as_deref()),
            (None, None)
        );
    }
}
