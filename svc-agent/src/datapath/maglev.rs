//! Maglev lookup tables of external frontends (the map and the kernel's part are described in
//! `svc_common::maglev`).
//!
//! [`table`] is Maglev's population algorithm (Eisenbud et al., "Maglev: A Fast and Reliable
//! Software Network Load Balancer", NSDI 2016, section 3.4): each backend, named by its
//! address and port, gets a permutation of the table's M entries from two hashes of its name
//! (an offset and a skip); backends take turns claiming their next free preferred entry until
//! the table is full. The result depends only on the set of backends and M (backends are taken
//! in address order, the hash is fixed: FNV-1a with two seeds), so every node computes the same
//! table, and adding or removing one backend of N moves about 1/N of the entries.
//!
//! [`Maglev`] keeps `MAGLEV_V1` following the desired state after each reconcile pass: for each
//! external frontend the pass touched (every one in a full pass), the table of its backends
//! (those new connections may take; none: no table), written in chunks of 64 backend ids, only
//! the chunks that changed. Tables of frontends gone are deleted; a full pass also deletes what
//! the pinned map holds for frontends this agent does not program. Writes failing (a full map)
//! are logged; the kernel then falls back to the frontend's slots.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use anyhow::{Context as _, bail};
use aya::{
    Ebpf,
    maps::{HashMap as BpfHashMap, MapData},
};
use svc_common::maglev::{CHUNK, MaglevChunk, MaglevKey};
use tracing::warn;

use super::{ids::IdMap, render::BackendRef};
use crate::model::{DesiredState, FrontendKey, Scope};

/// Table sizes accepted: primes (Maglev needs M prime for every skip to give a permutation)
/// up to this.
pub const MAX_SIZE: u32 = 65_521;

/// Checks `--maglev-table-size`: 0 (off) or a prime in 7..=[`MAX_SIZE`].
///
/// # Errors
/// Says what is wrong with it.
pub fn check_size(m: u32) -> anyhow::Result<()> {
    if m == 0 {
        return Ok(());
    }
    if !(7..=MAX_SIZE).contains(&m) {
        bail!("{m} is not in 7..={MAX_SIZE} (or 0: off)");
    }
    if !is_prime(m) {
        bail!("{m} is not a prime (Maglev's permutations need one; 1021, 4093, 16381 are)");
    }
    Ok(())
}

fn is_prime(n: u32) -> bool {
    n >= 2 && (2..=n.isqrt()).all(|d| !n.is_multiple_of(d))
}

/// FNV-1a (64 bits) of `bytes`, starting from `seed` mixed into the offset basis: fixed across
/// nodes, agent versions and Rust versions (unlike `std`'s hasher).
fn fnv1a(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325_u64 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// A backend's name for hashing: its address (16 bytes, IPv4-mapped for IPv4) and port.
fn name(b: &BackendRef) -> [u8; 18] {
    let addr = match b.0 {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    };
    let mut out = [0u8; 18];
    out[..16].copy_from_slice(&addr);
    out[16..].copy_from_slice(&b.1.to_be_bytes());
    out
}

/// Maglev's lookup table of size `m` (a prime) for `backends` (any order; each once): entry
/// `i` is an index into `backends` as sorted. Empty without backends.
#[must_use]
pub fn table(backends: &[BackendRef], m: u32) -> Vec<usize> {
    let mut sorted: Vec<&BackendRef> = backends.iter().collect();
    sorted.sort();
    let n = sorted.len();
    if n == 0 || m == 0 {
        return Vec::new();
    }
    let m64 = u64::from(m);
    let perm: Vec<(u64, u64)> = sorted
        .iter()
        .map(|b| {
            let id = name(b);
            let offset = fnv1a(1, &id) % m64;
            let skip = fnv1a(2, &id) % (m64 - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; n];
    let mut entry: Vec<Option<usize>> = vec![None; m as usize];
    let mut filled = 0usize;
    // Each round gives every backend one entry; at most M entries to fill.
    while filled < m as usize {
        for (i, (offset, skip)) in perm.iter().enumerate() {
            let mut c = (offset + next[i] * skip) % m64;
            while entry[c as usize].is_some() {
                next[i] += 1;
                c = (offset + next[i] * skip) % m64;
            }
            entry[c as usize] = Some(i);
            next[i] += 1;
            filled += 1;
            if filled == m as usize {
                break;
            }
        }
    }
    // Indexes into the sorted list, mapped back to `backends`' order.
    let position: BTreeMap<&BackendRef, usize> =
        backends.iter().enumerate().map(|(i, b)| (b, i)).collect();
    entry
        .into_iter()
        .map(|e| e.map_or(0, |i| position[sorted[i]]))
        .collect()
}

/// What writes `MAGLEV_V1`.
pub trait MaglevMap {
    /// Writes one chunk.
    fn put(&mut self, key: MaglevKey, chunk: &MaglevChunk) -> anyhow::Result<()>;
    /// Deletes one chunk (absent is fine).
    fn del(&mut self, key: MaglevKey) -> anyhow::Result<()>;
    /// Every key it holds.
    fn keys(&self) -> Vec<MaglevKey>;
}

impl MaglevMap for BpfHashMap<MapData, MaglevKey, MaglevChunk> {
    fn put(&mut self, key: MaglevKey, chunk: &MaglevChunk) -> anyhow::Result<()> {
        self.insert(key, chunk, 0).context("writing MAGLEV_V1")
    }
    fn del(&mut self, key: MaglevKey) -> anyhow::Result<()> {
        match self.remove(&key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e).context("deleting from MAGLEV_V1"),
        }
    }
    fn keys(&self) -> Vec<MaglevKey> {
        BpfHashMap::keys(self).filter_map(Result::ok).collect()
    }
}

/// `MAGLEV_V1`, following the desired state (see the module docs).
pub struct Maglev<T: MaglevMap = BpfHashMap<MapData, MaglevKey, MaglevChunk>> {
    map: T,
    size: u32,
    /// What each frontend (by key) has in the map: its id and its table (backend ids).
    written: BTreeMap<FrontendKey, (u32, Vec<u32>)>,
    /// Frontend ids the pinned map held when this agent started, until a full pass.
    adopted: BTreeSet<u32>,
}

impl Maglev {
    /// Takes `MAGLEV_V1` out of `ebpf`, for tables of `size` entries (0: off, nothing written).
    ///
    /// # Errors
    /// When the map is missing.
    pub fn take(ebpf: &mut Ebpf, size: u32) -> anyhow::Result<Self> {
        let map = ebpf
            .take_map("MAGLEV_V1")
            .context("no map MAGLEV_V1 in the object")?;
        Ok(Self::new(
            BpfHashMap::try_from(map).context("MAGLEV_V1")?,
            size,
        ))
    }
}

impl<T: MaglevMap> Maglev<T> {
    /// Over `map`, for tables of `size` entries.
    pub fn new(map: T, size: u32) -> Self {
        let adopted = map.keys().into_iter().map(|k| k.frontend_id).collect();
        Self {
            map,
            size,
            written: BTreeMap::new(),
            adopted,
        }
    }

    /// Brings the tables of `keys` (every frontend in a full pass: `full`) in line with
    /// `desired`, with the ids the reconciler gave frontends and backends.
    pub fn follow(
        &mut self,
        desired: &DesiredState,
        keys: impl IntoIterator<Item = FrontendKey>,
        frontend_ids: &IdMap<FrontendKey>,
        backend_ids: &IdMap<BackendRef>,
        full: bool,
    ) {
        let mut keys: BTreeSet<FrontendKey> = keys.into_iter().collect();
        if full {
            keys.extend(self.written.keys().copied());
        }
        for key in keys.into_iter().filter(|k| k.scope == Scope::External) {
            let wanted = self.wanted(desired, &key, frontend_ids, backend_ids);
            self.settle(key, wanted);
        }
        if full {
            let live: BTreeSet<u32> = self.written.values().map(|(id, _)| *id).collect();
            let stale: Vec<MaglevKey> = std::mem::take(&mut self.adopted)
                .into_iter()
                .filter(|id| !live.contains(id))
                .flat_map(|id| self.chunks_of(id))
                .collect();
            self.delete(stale);
        }
    }

    /// The id and table a frontend should have; `None`: no table (Maglev off, not programmed,
    /// no backend for new connections, or a backend without an id yet).
    fn wanted(
        &self,
        desired: &DesiredState,
        key: &FrontendKey,
        frontend_ids: &IdMap<FrontendKey>,
        backend_ids: &IdMap<BackendRef>,
    ) -> Option<(u32, Vec<u32>)> {
        if self.size == 0 {
            return None;
        }
        let fe = desired.frontends.get(key)?;
        let id = frontend_ids.get(key)?;
        let refs: Vec<BackendRef> = fe.backends.iter().map(|b| (b.addr, b.port)).collect();
        let ids: Vec<u32> = refs
            .iter()
            .map(|r| backend_ids.get(r))
            .collect::<Option<_>>()?;
        let entries = table(&refs, self.size);
        (!entries.is_empty()).then(|| (id, entries.into_iter().map(|i| ids[i]).collect()))
    }

    /// Writes (only the changed chunks of) or deletes one frontend's table.
    fn settle(&mut self, key: FrontendKey, wanted: Option<(u32, Vec<u32>)>) {
        let before = self.written.remove(&key);
        match (before, wanted) {
            (Some((old_id, _)), None) => {
                let chunks = self.chunks_of(old_id);
                self.delete(chunks);
            }
            (before, Some((id, entries))) => {
                let old = before
                    .as_ref()
                    .filter(|(old_id, _)| *old_id == id)
                    .map(|(_, e)| e.as_slice());
                if let Some((old_id, _)) = before.as_ref().filter(|(old_id, _)| *old_id != id) {
                    let chunks = self.chunks_of(*old_id);
                    self.delete(chunks);
                }
                for (chunk, part) in entries.chunks(CHUNK as usize).enumerate() {
                    let start = chunk * CHUNK as usize;
                    let same = old.is_some_and(|o| o.get(start..start + part.len()) == Some(part));
                    if same {
                        continue;
                    }
                    let mut value = MaglevChunk::default();
                    value.backend_ids[..part.len()].copy_from_slice(part);
                    let k = MaglevKey {
                        frontend_id: id,
                        chunk: u32::try_from(chunk).unwrap_or(u32::MAX),
                    };
                    if let Err(e) = self.map.put(k, &value) {
                        warn!(frontend = %key, error = %format!("{e:#}"), "Maglev table not written; new external flows of this frontend use its slots");
                        return;
                    }
                }
                self.written.insert(key, (id, entries));
            }
            (None, None) => {}
        }
    }

    fn chunks_of(&self, id: u32) -> Vec<MaglevKey> {
        (0..self.size.div_ceil(CHUNK).max(1))
            .map(|chunk| MaglevKey {
                frontend_id: id,
                chunk,
            })
            .chain(
                self.map
                    .keys()
                    .into_iter()
                    .filter(move |k| k.frontend_id == id && k.chunk >= self.size.div_ceil(CHUNK)),
            )
            .collect()
    }

    fn delete(&mut self, keys: Vec<MaglevKey>) {
        for k in keys {
            if let Err(e) = self.map.del(k) {
                warn!(error = %format!("{e:#}"), "deleting a Maglev chunk failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn backends(n: usize) -> Vec<BackendRef> {
        (0..n)
            .map(|i| {
                (
                    IpAddr::from([198, 18, 1, u8::try_from(10 + i).unwrap()]),
                    8080,
                )
            })
            .collect()
    }

    #[test]
    fn sizes_must_be_prime() {
        assert!(check_size(0).is_ok());
        assert!(check_size(1021).is_ok());
        assert!(check_size(65_521).is_ok());
        let e = check_size(1024).unwrap_err().to_string();
        assert!(e.contains("not a prime"), "{e}");
        assert!(
            check_size(65_537)
                .unwrap_err()
                .to_string()
                .contains("7..=65521")
        );
    }

    #[test]
    fn the_table_depends_only_on_the_set_and_balances() {
        let b = backends(5);
        let t = table(&b, 1021);
        assert_eq!(t.len(), 1021);
        let mut reversed = b.clone();
        reversed.reverse();
        let r = table(&reversed, 1021);
        // Same backend at every entry whatever the input order.
        for i in 0..1021 {
            assert_eq!(b[t[i]], reversed[r[i]]);
        }
        let mut count = HashMap::new();
        for i in &t {
            *count.entry(*i).or_insert(0) += 1;
        }
        // 1021 / 5 = 204.2: Maglev gives each within one round of its share.
        for n in count.values() {
            assert!((200..=210).contains(n), "{count:?}");
        }
        assert!(table(&[], 1021).is_empty());
    }

    #[test]
    fn removing_one_backend_moves_little_more_than_its_share() {
        let b = backends(10);
        let before = table(&b, 1021);
        let fewer: Vec<BackendRef> = b.iter().copied().filter(|x| *x != b[3]).collect();
        let after = table(&fewer, 1021);
        let moved = (0..1021)
            .filter(|&i| b[before[i]] != fewer[after[i]] && b[before[i]] != b[3])
            .count();
        // Entries of the other 9 that moved anyway: Maglev keeps this small (the paper: a few
        // percent); modulo hashing would move about 90 %.
        assert!(moved < 1021 / 10, "{moved} entries of live backends moved");
    }

    #[derive(Default)]
    struct FakeMap(BTreeMap<MaglevKey, MaglevChunk>, usize);

    impl MaglevMap for FakeMap {
        fn put(&mut self, key: MaglevKey, chunk: &MaglevChunk) -> anyhow::Result<()> {
            self.1 += 1;
            self.0.insert(key, *chunk);
            Ok(())
        }
        fn del(&mut self, key: MaglevKey) -> anyhow::Result<()> {
            self.0.remove(&key);
            Ok(())
        }
        fn keys(&self) -> Vec<MaglevKey> {
            self.0.keys().copied().collect()
        }
    }

    #[test]
    fn tables_follow_their_frontends_and_stale_ones_go() {
        use crate::model::test_support::yaml;
        let svc = |endpoints: &[&str]| {
            let eps = endpoints.iter().fold(String::new(), |mut out, a| {
                out.push_str("- addresses: [");
                out.push_str(a);
                out.push_str("]\n  nodeName: node2\n");
                out
            });
            crate::model::Snapshot::new(
                vec![yaml(
                    "metadata: {name: web, namespace: default}\nspec:\n  type: NodePort\n  \
                     clusterIP: 198.19.0.10\n  ports: [{name: http, port: 80, nodePort: 30080}]\n",
                )],
                vec![yaml(&format!(
                    "metadata:\n  name: web-1\n  namespace: default\n  labels: \
                     {{kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{{name: \
                     http, port: 8080}}]\nendpoints:\n{eps}"
                ))],
                vec![yaml(
                    "metadata: {name: node1}\nstatus:\n  addresses: [{type: InternalIP, \
                     address: 198.18.0.11}]\n",
                )],
            )
        };
        let stale = MaglevKey {
            frontend_id: 99,
            chunk: 0,
        };
        let mut pinned = FakeMap::default();
        pinned.0.insert(stale, MaglevChunk::default());
        let mut m = Maglev::new(pinned, 131);
        let mut fids = IdMap::default();
        let mut bids = IdMap::default();
        let desired = crate::model::compute(&svc(&["198.18.2.10", "198.18.2.11"]), "node1");
        for k in desired.frontends.keys() {
            fids.get_or_alloc(k);
        }
        for fe in desired.frontends.values() {
            for b in &fe.backends {
                bids.get_or_alloc(&(b.addr, b.port));
            }
        }
        m.follow(
            &desired,
            desired.frontends.keys().copied(),
            &fids,
            &bids,
            true,
        );
        let ext: Vec<&FrontendKey> = (desired.frontends.keys())
            .filter(|k| k.scope == Scope::External)
            .collect();
        assert_eq!(ext.len(), 1);
        let id = fids.get(ext[0]).unwrap();
        let chunks: Vec<u32> = (m.map.0.keys())
            .filter(|k| k.frontend_id == id)
            .map(|k| k.chunk)
            .collect();
        assert_eq!(chunks, [0, 1, 2], "131 entries: 3 chunks");
        assert!(
            !m.map.0.contains_key(&stale),
            "the full pass removed what nobody programs"
        );
        // Only the external frontend has a table; entries name the two backends' ids.
        assert_eq!(m.map.0.len(), 3);
        let used: BTreeSet<u32> = (m.map.0.values())
            .flat_map(|c| c.backend_ids.iter().copied())
            .filter(|&b| b != 0 || bids.key_of(0).is_some())
            .collect();
        assert_eq!(used.len(), 2);
        // The same state again writes nothing.
        let writes = m.map.1;
        m.follow(
            &desired,
            desired.frontends.keys().copied(),
            &fids,
            &bids,
            false,
        );
        assert_eq!(m.map.1, writes);
        // The Service gone: its table goes.
        let empty = crate::model::DesiredState::default();
        m.follow(
            &empty,
            desired.frontends.keys().copied(),
            &fids,
            &bids,
            false,
        );
        assert!(m.map.0.is_empty());
    }
}
