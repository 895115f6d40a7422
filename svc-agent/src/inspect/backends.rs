//! `svc-agent inspect backends`: every `BACKENDS_V1` entry with the Pod behind it
//! (`BACKEND_NAMES_V1`), its flags, the frontend slots and Services that point at it
//! (`SERVICES_V1`, `FRONTEND_NAMES_V1`) and its counters (`BACKEND_STATS_V1`). Works with the
//! agent stopped: everything comes from the pins, read by [`super::read_services`].

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::IpAddr,
};

use serde::{Deserialize, Serialize};
use svc_common::service::backend_flags;

use super::{
    Format, ServicesView, fmt_addr, ip,
    output::{self, Table},
};

/// One backend as `inspect backends` shows it (a JSON object of `-o json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackendsRow {
    /// The backend id (`BACKENDS_V1` key; slots, conntrack and affinity entries name it).
    pub id: u32,
    /// The endpoint, `addr:port` (IPv6 in brackets).
    pub endpoint: String,
    /// Its address.
    pub address: IpAddr,
    /// Its port (the resolved `targetPort`).
    pub port: u16,
    /// `namespace/name` of its Pod (`BACKEND_NAMES_V1`); null when unknown.
    pub pod: Option<String>,
    /// Its flags in words: `local` (on this node), `terminating`; empty when none is set.
    pub flags: Vec<String>,
    /// How many frontend slots (`SERVICES_V1` slots 1..=count) hold its id; 0: kept only for
    /// established flows (a terminating endpoint no slot offers any more).
    pub slots: usize,
    /// The ids of the frontends whose slots hold it, ascending.
    pub frontend_ids: Vec<u32>,
    /// `namespace/name` of those frontends' Services (`FRONTEND_NAMES_V1`), sorted, each once;
    /// frontends without a name are left out (their ids are in `frontendIds`).
    pub services: Vec<String>,
    /// Packets translated to or from it (`BACKEND_STATS_V1`, summed over CPUs; 0 without an
    /// entry). Connect-time translation counts no packets.
    pub packets: u64,
    /// Bytes of those packets.
    pub bytes: u64,
}

/// Which backends `inspect backends` shows (every one when empty).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BackendsFilter {
    /// Only backends at this address.
    pub addr: Option<IpAddr>,
    /// Only backends a frontend of this Service (`namespace/name`) offers in a slot.
    pub service: Option<String>,
}

/// `backend_flags` in words, in bit order.
#[must_use]
pub fn flag_words(f: u8) -> Vec<String> {
    [
        (backend_flags::LOCAL, "local"),
        (backend_flags::TERMINATING, "terminating"),
    ]
    .iter()
    .filter(|(bit, _)| f & bit != 0)
    .map(|(_, name)| (*name).to_owned())
    .collect()
}

/// The backends of `view` that `filter` lets through, sorted by address, port, then id.
#[must_use]
pub fn backend_rows(view: &ServicesView, filter: &BackendsFilter) -> Vec<BackendsRow> {
    // Slots per backend id: how many, and of which frontends (by slot 0's id).
    let mut slots: BTreeMap<u32, (usize, BTreeSet<u32>)> = BTreeMap::new();
    for (k, v) in view.services.iter().filter(|(k, _)| k.slot == 0) {
        for slot in 1..=v.count {
            if let Some(s) = view
                .services
                .get(&svc_common::service::ServiceKey { slot, ..*k })
            {
                let e = slots.entry(s.id).or_default();
                e.0 += 1;
                e.1.insert(v.id);
            }
        }
    }
    let mut rows: Vec<BackendsRow> = view
        .backends
        .iter()
        .map(|(&id, b)| {
            let (n, frontends) = slots.get(&id).cloned().unwrap_or_default();
            let services: BTreeSet<String> = frontends
                .iter()
                .filter_map(|f| view.frontend_names.get(f).map(|(s, _)| s.clone()))
                .collect();
            let c = view.backend_stats.get(&id).copied().unwrap_or_default();
            BackendsRow {
                id,
                endpoint: fmt_addr(&b.addr, b.family, b.port.to_host()),
                address: ip(&b.addr, b.family),
                port: b.port.to_host(),
                pod: view.names.get(&id).cloned(),
                flags: flag_words(b.flags),
                slots: n,
                frontend_ids: frontends.into_iter().collect(),
                services: services.into_iter().collect(),
                packets: c.packets,
                bytes: c.bytes,
            }
        })
        .filter(|r| {
            filter.addr.is_none_or(|a| a == r.address)
                && filter
                    .service
                    .as_ref()
                    .is_none_or(|s| r.services.contains(s))
        })
        .collect();
    rows.sort_by_key(|r| (r.address, r.port, r.id));
    rows
}

/// `inspect backends` in `format`: a row per backend (`wide` adds the id, bytes and frontend
/// ids), then the count; or JSON.
///
/// # Errors
/// When JSON serialization fails.
pub fn format_backends(
    view: &ServicesView,
    filter: &BackendsFilter,
    format: Format,
) -> anyhow::Result<String> {
    let rows = backend_rows(view, filter);
    if format == Format::Json {
        return output::json(&rows);
    }
    let wide = format == Format::Wide;
    let mut headers = vec!["ENDPOINT", "POD", "FLAGS", "SLOTS", "SERVICES", "PACKETS"];
    if wide {
        headers.extend(["BYTES", "ID", "FRONTEND_IDS"]);
    }
    let mut t = Table::new(&headers);
    for r in &rows {
        let mut cells = vec![
            r.endpoint.clone(),
            r.pod.clone().unwrap_or_default(),
            r.flags.join(","),
            r.slots.to_string(),
            r.services.join(","),
            r.packets.to_string(),
        ];
        if wide {
            cells.extend([
                r.bytes.to_string(),
                r.id.to_string(),
                r.frontend_ids
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
            ]);
        }
        t.row(cells);
    }
    let mut count = if *filter == BackendsFilter::default() {
        output::count(rows.len(), "backend", "backends")
    } else {
        format!(
            "{} matching of {}",
            rows.len(),
            output::count(view.backends.len(), "backend", "backends")
        )
    };
    let unslotted = rows.iter().filter(|r| r.slots == 0).count();
    if unslotted > 0 {
        let _ = write!(
            count,
            ", {unslotted} in no slot (kept for established flows)"
        );
    }
    Ok(t.render(&count))
}

#[cfg(test)]
mod tests {
    use svc_common::{
        Be16,
        addr::from_v4,
        service::{Backend, ServiceKey, ServiceValue},
        stats::Counter,
    };

    use super::*;

    /// Frontends 1 (`default/web`, slots -> 7, 8) and 2 (`default/web` too, another port:
    /// slot -> 7) and 3 (unnamed: slot -> 9); backends 7 (local), 8 (IPv6, terminating), 9 and
    /// 10 (in no slot).
    fn view() -> ServicesView {
        let k = |last, port, slot| ServiceKey {
            addr: from_v4([198, 19, 0, last]),
            port: Be16::from_host(port),
            slot,
            proto: 6,
            family: 4,
            scope: 0,
            _pad: 0,
        };
        let mut services = BTreeMap::new();
        for (key, id, count) in [
            (k(10, 80, 0), 1, 2),
            (k(10, 443, 0), 2, 1),
            (k(11, 80, 0), 3, 1),
        ] {
            services.insert(
                key,
                ServiceValue {
                    id,
                    count,
                    ..ServiceValue::default()
                },
            );
        }
        for (key, id) in [
            (k(10, 80, 1), 7),
            (k(10, 80, 2), 8),
            (k(10, 443, 1), 7),
            (k(11, 80, 1), 9),
        ] {
            services.insert(
                key,
                ServiceValue {
                    id,
                    ..ServiceValue::default()
                },
            );
        }
        let v4 = |last, flags| Backend {
            addr: from_v4([198, 18, 1, last]),
            port: Be16::from_host(5000),
            family: 4,
            flags,
        };
        let v6 = Backend {
            addr: "2001:db8::10"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
            port: Be16::from_host(8443),
            family: 6,
            flags: backend_flags::TERMINATING,
        };
        ServicesView {
            services,
            backends: BTreeMap::from([
                (7, v4(20, backend_flags::LOCAL)),
                (8, v6),
                (9, v4(3, 0)),
                (10, v4(20, 0)),
            ]),
            frontend_stats: BTreeMap::new(),
            backend_stats: BTreeMap::from([(
                7,
                Counter {
                    packets: 12,
                    bytes: 960,
                },
            )]),
            names: BTreeMap::from([
                (7, "default/web-0".to_owned()),
                (8, "default/web-1".to_owned()),
            ]),
            frontend_names: BTreeMap::from([
                (1, ("default/web".to_owned(), "http".to_owned())),
                (2, ("default/web".to_owned(), "https".to_owned())),
            ]),
        }
    }

    #[test]
    fn backends_are_listed_by_address_with_pods_slots_services_and_counters() {
        let view = view();
        let all = BackendsFilter::default();
        assert_eq!(
            format_backends(&view, &all, Format::Table).unwrap(),
            "ENDPOINT             POD            FLAGS        SLOTS  SERVICES     PACKETS\n\
             198.18.1.3:5000      -              -            1      -            0\n\
             198.18.1.20:5000     default/web-0  local        2      default/web  12\n\
             198.18.1.20:5000     -              -            0      -            0\n\
             [2001:db8::10]:8443  default/web-1  terminating  1      default/web  0\n\
             4 backends, 1 in no slot (kept for established flows)\n"
        );
        let wide = format_backends(&view, &all, Format::Wide).unwrap();
        assert!(
            wide.lines().nth(2).unwrap().split_whitespace().eq([
                "198.18.1.20:5000",
                "default/web-0",
                "local",
                "2",
                "default/web",
                "12",
                "960",
                "7",
                "1,2"
            ]),
            "{wide}"
        );
        let json = format_backends(&view, &all, Format::Json).unwrap();
        let back: Vec<BackendsRow> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, backend_rows(&view, &all));
        let web0 = &back[1];
        assert_eq!(
            (web0.id, web0.slots, web0.frontend_ids.as_slice()),
            (7, 2, [1, 2].as_slice())
        );
        assert_eq!(web0.services, ["default/web"], "deduplicated");
        assert_eq!(web0.flags, ["local"]);
        assert_eq!(back[3].address, "2001:db8::10".parse::<IpAddr>().unwrap());
        assert_eq!(back[3].flags, ["terminating"]);
        // The unnamed frontend's slot counts; no Service is named for it.
        assert_eq!((back[0].slots, back[0].services.len()), (1, 0));
        let raw: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(raw[1]["frontendIds"], serde_json::json!([1, 2]));
        assert_eq!(raw[2]["pod"], serde_json::Value::Null);
    }

    #[test]
    fn filters_keep_a_services_backends_or_an_address() {
        let view = view();
        let ids = |f: BackendsFilter| -> Vec<u32> {
            backend_rows(&view, &f).iter().map(|r| r.id).collect()
        };
        let web = BackendsFilter {
            service: Some("default/web".to_owned()),
            ..BackendsFilter::default()
        };
        assert_eq!(ids(web.clone()), [7, 8]);
        assert_eq!(
            ids(BackendsFilter {
                addr: Some("198.18.1.20".parse().unwrap()),
                ..BackendsFilter::default()
            }),
            [7, 10]
        );
        assert_eq!(
            ids(BackendsFilter {
                addr: Some("2001:db8::10".parse().unwrap()),
                ..web.clone()
            }),
            [8]
        );
        let text = format_backends(&view, &web, Format::Table).unwrap();
        assert!(text.ends_with("\n2 matching of 4 backends\n"), "{text}");
    }
}
