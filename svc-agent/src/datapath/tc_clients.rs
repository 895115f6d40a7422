//! Filling `TC_CLIENTS_V1` with the clients of flows an older build recorded, then marking it
//! ready (`svc_common::tc_clients`).
//!
//! The pod program records each pod it translates a new flow for in `TC_CLIENTS_V1`, and the
//! reply path passes a backend's packet to any other pod without a conntrack lookup, but only
//! once `TC_CLIENTS_READY_V1` says the map is complete. When the map is new (a node's first
//! agent, or an upgrade from a build without it), the connection tables may hold flows whose
//! clients nobody recorded. Once the agent's programs are attached (no older program adds flows
//! any more), [`fill_and_mark_ready`] reads both connection tables, records the client of
//! every reply entry, and marks the map ready. Until then every reply from a backend address is
//! looked up in conntrack, as before the map existed.
//!
//! The map is marked ready only if every client found fits with room to spare (half of
//! [`TC_CLIENTS_ENTRIES`]): filling an LRU past its size would evict clients with live flows,
//! whose replies would then go untranslated. A node with more distinct clients (external
//! clients of `NodePort`s count too) stays on the conntrack lookups, and says so.

use std::{collections::BTreeSet, path::Path};

use anyhow::Context as _;
use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData};
use svc_common::{
    addrs::AddrKey,
    conntrack::{CtKey, CtValue, dir},
    tc_clients::{TC_CLIENTS_ENTRIES, TC_CLIENTS_READY, TcClient, TcClientsReady},
};

/// What [`fill_and_mark_ready`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filled {
    /// The map was ready already (an agent of this layout marked it): nothing read.
    AlreadyReady,
    /// These many distinct clients were recorded and the map marked ready.
    Ready(usize),
    /// More than [`Clients::ROOM`] distinct clients: too many to record safely; the map stays
    /// not ready (replies from backends keep their conntrack lookups).
    TooMany,
}

/// The maps [`fill_and_mark_ready`] reads and writes.
pub struct TcClientMaps {
    /// `CT_V1` and `CT_NEW_V1`.
    pub conntrack: [BpfHashMap<MapData, CtKey, CtValue>; 2],
    /// `TC_CLIENTS_V1`.
    pub clients: BpfHashMap<MapData, AddrKey, TcClient>,
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

/// The client (as `TC_CLIENTS_V1` keys it) of a connection-table entry that is a reply entry:
/// its key runs from the backend to the client.
#[must_use]
pub fn client_of(key: &CtKey) -> Option<AddrKey> {
    (key.dir == dir::REPLY).then_some(AddrKey::new(key.dst, key.family))
}

/// The distinct clients of reply entries, gathered while the connection tables are read, up
/// to half of `TC_CLIENTS_V1` (see the module documentation).
#[derive(Debug, Default)]
pub struct Clients(BTreeSet<AddrKey>);

impl Clients {
    /// The most clients recorded at once.
    pub const ROOM: usize = (TC_CLIENTS_ENTRIES / 2) as usize;

    /// Adds the client of `key`, if it is a reply entry; false once there are more than
    /// [`ROOM`](Self::ROOM) (reading can stop: none will be recorded).
    pub fn add(&mut self, key: &CtKey) -> bool {
        self.0.extend(client_of(key));
        self.0.len() <= Self::ROOM
    }
}

/// Records the client of every reply entry in the connection tables and marks the map ready,
/// unless it is ready already or the clients would not fit (see the module documentation).
/// Call it once the agent's programs are attached.
///
/// # Errors
/// When a map cannot be read or written; the map is then left not ready.
pub fn fill_and_mark_ready(maps: &mut TcClientMaps) -> anyhow::Result<Filled> {
    let ready = maps
        .ready
        .get(&0, 0)
        .context("reading TC_CLIENTS_READY_V1")?;
    if ready.ready == TC_CLIENTS_READY {
        return Ok(Filled::AlreadyReady);
    }
    let mut clients = Clients::default();
    for table in &maps.conntrack {
        for entry in super::batch::entries(table) {
            let (key, _) = entry.context("reading a connection table")?;
            if !clients.add(&key) {
                return Ok(Filled::TooMany);
            }
        }
    }
    let Clients(clients) = clients;
    for client in &clients {
        maps.clients
            .insert(client, TcClient { since_ns: 0 }, 0)
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
    Ok(Filled::Ready(clients.len()))
}

#[cfg(test)]
mod tests {
    use svc_common::addr::FAMILY_V6;

    use super::*;

    fn key(d: u8) -> CtKey {
        reply_to([2; 16], d)
    }

    fn reply_to(client: [u8; 16], d: u8) -> CtKey {
        CtKey {
            src: [1; 16],
            dst: client,
            sport: svc_common::Be16(1),
            dport: svc_common::Be16(2),
            proto: 6,
            family: FAMILY_V6,
            dir: d,
            _pad: 0,
        }
    }

    #[test]
    fn a_reply_entry_names_its_destination_as_the_client_and_a_forward_entry_names_none() {
        let client = client_of(&key(dir::REPLY)).expect("a reply entry has a client");
        assert_eq!(client.addr, [2; 16]);
        assert_eq!(client.family, FAMILY_V6);
        assert_eq!(client_of(&key(dir::FORWARD)), None);
    }

    #[test]
    fn clients_are_gathered_once_each_up_to_the_room_and_reading_stops_beyond() {
        let client = |i: usize| {
            let mut a = [0u8; 16];
            a[..8].copy_from_slice(&i.to_be_bytes());
            a
        };
        let mut clients = Clients::default();
        for i in 0..Clients::ROOM {
            // Two flows of each client, and a forward entry, which names none.
            assert!(clients.add(&reply_to(client(i), dir::REPLY)));
            assert!(clients.add(&reply_to(client(i), dir::REPLY)));
            assert!(clients.add(&reply_to(client(i + Clients::ROOM), dir::FORWARD)));
        }
        assert_eq!(clients.0.len(), Clients::ROOM);
        assert!(clients.0.contains(&AddrKey::new(client(0), FAMILY_V6)));
        assert!(
            !clients.add(&reply_to(client(Clients::ROOM), dir::REPLY)),
            "one client more than the room must stop the fill"
        );
    }
}
