//! Completing `TC_CLIENTS_V1` over the flows an older build tracked, then marking it ready
//! (`svc_common::tc_clients`).
//!
//! The pod program records the interface of each pod it translates a new flow for in
//! `TC_CLIENTS_V1`, and the reply path passes a backend's packet to any other pod without a
//! conntrack lookup, but only once `TC_CLIENTS_READY_V1` says the map is complete. When the
//! map is new (a node's first agent, or an upgrade from a build without it), the connection
//! tables may hold flows whose pods nobody recorded. Once the agent's programs are attached
//! (no older program adds flows any more), [`fill_and_mark_ready`] looks for a translated
//! flow in both connection tables; if there is one, it records every interface the agent
//! attached to (a flow names its client's address, not the interface it is behind), then
//! marks the map ready. Until then every reply from a backend address is looked up in
//! conntrack, as before the map existed.
//!
//! Recording every interface costs the pods of that moment the lookups they paid before (until
//! they are replaced: a new pod has a new interface); it never leaves a flow untranslated.

use std::path::Path;

use anyhow::Context as _;
use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData};
use svc_common::{
    conntrack::{CtKey, CtValue, dir},
    tc_clients::{TC_CLIENTS_READY, TcClient, TcClientsReady},
};

/// What [`fill_and_mark_ready`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filled {
    /// The map was ready already (an agent of this layout marked it): nothing read.
    AlreadyReady,
    /// The map is ready now, with these many interfaces recorded (0: the connection tables
    /// held no translated flow).
    Ready(usize),
}

/// The maps [`fill_and_mark_ready`] reads and writes.
pub struct TcClientMaps {
    /// `CT_V1` and `CT_NEW_V1`.
    pub conntrack: [BpfHashMap<MapData, CtKey, CtValue>; 2],
    /// `TC_CLIENTS_V1`.
    pub clients: BpfHashMap<MapData, u32, TcClient>,
    /// `TC_CLIENTS_READY_V1`.
    pub ready: Array<MapData, TcClientsReady>,
}

impl TcClientMaps {
    /// The maps pinned in `pin_dir` (the agent's layout directory).
    ///
    /// # Errors
    /// When a pin is missing or is not the map it should be.
    pub fn pinned(pin_dir: &Path) -> anyhow::Result<Self> {
        let open = |name: &str| {
            let path = pin_dir.join(name);
            MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))
        };
        Self::new(
            open("CT_V1")?,
            open("CT_NEW_V1")?,
            open("TC_CLIENTS_V1")?,
            open("TC_CLIENTS_READY_V1")?,
        )
    }

    /// The maps `CT_V1`, `CT_NEW_V1`, `TC_CLIENTS_V1` and `TC_CLIENTS_READY_V1`, opened.
    ///
    /// # Errors
    /// When one is not the map it should be (type, key or value size).
    pub fn new(
        ct: MapData,
        ct_new: MapData,
        clients: MapData,
        ready: MapData,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            conntrack: [
                BpfHashMap::try_from(Map::LruHashMap(ct)).context("CT_V1")?,
                BpfHashMap::try_from(Map::LruHashMap(ct_new)).context("CT_NEW_V1")?,
            ],
            clients: BpfHashMap::try_from(Map::LruHashMap(clients)).context("TC_CLIENTS_V1")?,
            ready: Array::try_from(Map::Array(ready)).context("TC_CLIENTS_READY_V1")?,
        })
    }
}

/// Whether a connection-table entry is the reply entry of a translated flow (its key runs
/// from the backend to the client, whose replies the reply path looks up).
#[must_use]
pub fn is_reply_entry(key: &CtKey) -> bool {
    key.dir == dir::REPLY
}

/// The interfaces the agent's TC programs are attached to (the directories of
/// `<pin dir>/links/tc`; node-facing ones too, which the reply path to pods never sees).
///
/// # Errors
/// When the directory cannot be read.
pub fn attached_interfaces(pin_dir: &Path) -> anyhow::Result<Vec<u32>> {
    let dir = crate::pins::tc_dir(pin_dir);
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    for entry in entries {
        let entry = entry.with_context(|| format!("reading {}", dir.display()))?;
        if let Some(ifindex) = entry.file_name().to_str().and_then(|n| n.parse().ok()) {
            out.push(ifindex);
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// Marks the map ready, after recording `interfaces` if the connection tables hold a
/// translated flow; does nothing when it is ready already (see the module documentation).
/// Call it once the agent's programs are attached, with the interfaces they are attached to.
///
/// # Errors
/// When a map cannot be read or written; the map is then left not ready.
pub fn fill_and_mark_ready(maps: &mut TcClientMaps, interfaces: &[u32]) -> anyhow::Result<Filled> {
    let ready = maps
        .ready
        .get(&0, 0)
        .context("reading TC_CLIENTS_READY_V1")?;
    if ready.ready == TC_CLIENTS_READY {
        return Ok(Filled::AlreadyReady);
    }
    let mut tracked = false;
    'tables: for table in &maps.conntrack {
        for entry in super::batch::entries(table) {
            let (key, _) = entry.context("reading a connection table")?;
            if is_reply_entry(&key) {
                tracked = true;
                break 'tables;
            }
        }
    }
    let recorded: &[u32] = if tracked { interfaces } else { &[] };
    for ifindex in recorded {
        maps.clients
            .insert(ifindex, TcClient { since_ns: 0 }, 0)
            .context("writing TC_CLIENTS_V1")?;
    }
    maps.ready
        .set(
            0,
            TcClientsReady {
                ready: TC_CLIENTS_READY,
            },
            0,
        )
        .context("writing TC_CLIENTS_READY_V1")?;
    Ok(Filled::Ready(recorded.len()))
}

#[cfg(test)]
mod tests {
    use svc_common::addr::FAMILY_V6;

    use super::*;

    fn key(d: u8) -> CtKey {
        CtKey {
            src: [1; 16],
            dst: [2; 16],
            sport: svc_common::Be16(1),
            dport: svc_common::Be16(2),
            proto: 6,
            family: FAMILY_V6,
            dir: d,
            _pad: 0,
        }
    }

    #[test]
    fn only_a_reply_entry_says_a_translated_flow_is_tracked() {
        assert!(is_reply_entry(&key(dir::REPLY)));
        assert!(!is_reply_entry(&key(dir::FORWARD)));
    }

    #[test]
    fn attached_interfaces_are_the_numeric_directories_of_the_tc_links() {
        let tmp = std::env::temp_dir().join(format!("svc-tc-clients-{}", std::process::id()));
        let tc = crate::pins::tc_dir(&tmp);
        assert_eq!(attached_interfaces(&tmp).unwrap(), Vec::<u32>::new());
        for name in ["12", "3", "not-an-ifindex"] {
            std::fs::create_dir_all(tc.join(name)).unwrap();
        }
        assert_eq!(attached_interfaces(&tmp).unwrap(), vec![3, 12]);
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
