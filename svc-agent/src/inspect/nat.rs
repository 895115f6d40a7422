//! `svc-agent inspect nat`: the source NAT table (`SNAT_V1`), read from its pin: for each
//! external flow to another node's endpoint, the client, the node address and port it was
//! given, the endpoint, and how long since a reply used it. Works with the agent stopped.

use std::{net::IpAddr, path::Path};

use anyhow::Context as _;
use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use serde::{Deserialize, Serialize};
use svc_common::{conntrack::CtKey, nat::SnatValue};

use super::{
    Format, fmt_addr, ip, open_pinned,
    output::{self, Table},
    proto_name,
};
use crate::datapath::batch;

/// One SNAT entry as `inspect nat` shows it (a JSON object of `-o json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NatRow {
    /// `TCP` or `UDP`.
    pub protocol: String,
    /// The external client, `addr:port`.
    pub client: String,
    /// The client's address.
    pub client_address: IpAddr,
    /// What the endpoint sees as the client: the node's SNAT address and port, `addr:port`.
    pub translated: String,
    /// The SNAT port.
    pub snat_port: u16,
    /// The endpoint (on another node), `addr:port`.
    pub endpoint: String,
    /// Seconds since a reply last used the entry (its creation when none has).
    pub idle_seconds: u64,
}

/// Every `SNAT_V1` entry, sorted (nothing when the map is not pinned: an older agent's pins).
///
/// # Errors
/// When the pinned map cannot be read.
pub fn read_nat(bpffs: &Path) -> anyhow::Result<(Vec<(CtKey, SnatValue)>, u32)> {
    if !crate::loader::pin_dir(bpffs).join("SNAT_V1").exists() {
        return Ok((Vec::new(), 0));
    }
    let data = open_pinned(bpffs, "SNAT_V1")?;
    let max_entries = data.info().map_or(0, |i| i.max_entries());
    let map: BpfHashMap<MapData, CtKey, SnatValue> =
        BpfHashMap::try_from(Map::HashMap(data)).context("SNAT_V1")?;
    let mut entries = batch::entries(&map)
        .collect::<Result<Vec<_>, _>>()
        .context("reading SNAT_V1")?;
    entries.sort_by_key(|(k, v)| (k.family, k.proto, v.client, v.client_port.0, k.dport.0));
    Ok((entries, max_entries))
}

/// The rows of `entries` at `now_ns` (`CLOCK_MONOTONIC`).
#[must_use]
pub fn nat_rows(entries: &[(CtKey, SnatValue)], now_ns: u64) -> Vec<NatRow> {
    entries
        .iter()
        .map(|(k, v)| NatRow {
            protocol: proto_name(k.proto).to_owned(),
            client: fmt_addr(&v.client, k.family, v.client_port.to_host()),
            client_address: ip(&v.client, k.family),
            translated: fmt_addr(&k.dst, k.family, k.dport.to_host()),
            snat_port: k.dport.to_host(),
            endpoint: fmt_addr(&k.src, k.family, k.sport.to_host()),
            idle_seconds: now_ns.saturating_sub(v.last_seen_ns) / 1_000_000_000,
        })
        .collect()
}

/// `inspect nat` in `format`.
///
/// # Errors
/// When JSON cannot be written.
pub fn format_nat(
    entries: &[(CtKey, SnatValue)],
    max_entries: u32,
    now_ns: u64,
    format: Format,
) -> anyhow::Result<String> {
    let rows = nat_rows(entries, now_ns);
    if format == Format::Json {
        return output::json(&rows);
    }
    let mut t = Table::new(&["PROTO", "CLIENT", "AS", "ENDPOINT", "IDLE"]);
    for r in &rows {
        t.row(vec![
            r.protocol.clone(),
            r.client.clone(),
            r.translated.clone(),
            r.endpoint.clone(),
            format!("{}s", r.idle_seconds),
        ]);
    }
    Ok(t.render(&format!(
        "SNAT_V1: {} of {max_entries} entries (external flows to other nodes' endpoints)",
        rows.len()
    )))
}

#[cfg(test)]
mod tests {
    use svc_common::{Be16, addr::from_v4, conntrack::dir, net::ipproto};

    use super::*;

    #[test]
    fn an_entry_shows_client_translation_and_endpoint() {
        let key = CtKey {
            src: from_v4([198, 18, 2, 10]),
            dst: from_v4([198, 18, 0, 11]),
            sport: Be16::from_host(8080),
            dport: Be16::from_host(61_234),
            proto: ipproto::TCP,
            family: 4,
            dir: dir::REPLY,
            _pad: 0,
        };
        let value = SnatValue {
            client: from_v4([198, 18, 0, 100]),
            client_port: Be16::from_host(40_000),
            _pad: 0,
            last_seen_ns: 5_000_000_000,
        };
        let text = format_nat(&[(key, value)], 262_144, 12_000_000_000, Format::Table).unwrap();
        assert_eq!(
            text,
            "PROTO  CLIENT              AS                 ENDPOINT          IDLE\n\
             TCP    198.18.0.100:40000  198.18.0.11:61234  198.18.2.10:8080  7s\n\
             SNAT_V1: 1 of 262144 entries (external flows to other nodes' endpoints)\n"
        );
        let json = format_nat(&[(key, value)], 262_144, 12_000_000_000, Format::Json).unwrap();
        assert!(json.contains("\"snatPort\": 61234"), "{json}");
    }
}
