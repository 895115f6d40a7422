//! Consistent backend choice for external traffic (Maglev).
//!
//! A new flow from outside the cluster picks its backend by a hash of its tuple in a lookup
//! table the agent computes per external frontend with Maglev's population algorithm
//! (Eisenbud et al., NSDI 2016) from the frontend's backends, identified by address and port:
//! two nodes with the same backends (behind an ECMP load balancer) hold the same table and pick
//! the same backend for the same flow; so does a node whose conntrack entry of a live flow was
//! lost (evicted, or a restarted agent with new maps); and a change of one backend moves only
//! about 1/N of the table. `ClusterIP` traffic keeps the random choice.
//!
//! Map `MAGLEV_V1` (hash, no preallocation; written by the agent after each pass, read by the
//! node-facing program): key [`MaglevKey`] (frontend id, chunk), value [`MaglevChunk`]: entries
//! `64 * chunk ..` of the frontend's table, backend ids (as in `BACKENDS_V1`). The table size M
//! (`--maglev-table-size`, a prime) is a load-time constant of the programs
//! (`SVC_MAGLEV_SIZE`; 0: Maglev off); flow hash `h` uses entry `h % M`. A missing chunk or a
//! backend id `BACKENDS_V1` does not hold (a table written after a pass that removed the
//! backend) falls back to the frontend's slots. Host order throughout.

use crate::impl_pod;

/// Table entries per [`MaglevChunk`].
pub const CHUNK: u32 = 64;

/// Default table size: a prime, large enough that with up to ~10 backends the busiest gets at
/// most a few percent more than its share (Maglev's imbalance shrinks as M grows past 100 N).
pub const DEFAULT_SIZE: u32 = 1021;

/// Key of `MAGLEV_V1`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MaglevKey {
    /// The frontend's id (slot 0's `id` in `SERVICES_V1`).
    pub frontend_id: u32,
    /// Which 64 entries of its table.
    pub chunk: u32,
}
crate::assert_layout!(MaglevKey, size = 8, frontend_id = 0, chunk = 4);

/// Value of `MAGLEV_V1`: 64 consecutive entries of a frontend's table (backend ids; entries
/// past the table's end are 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevChunk {
    /// Backend ids.
    pub backend_ids: [u32; CHUNK as usize],
}
crate::assert_layout!(MaglevChunk, size = 256, backend_ids = 0);

impl Default for MaglevChunk {
    fn default() -> Self {
        Self {
            backend_ids: [0; CHUNK as usize],
        }
    }
}

/// Where entry `index` of a table is: (chunk, position in it).
#[inline]
#[must_use]
pub const fn locate(index: u32) -> (u32, usize) {
    (index / CHUNK, (index % CHUNK) as usize)
}

impl_pod!(MaglevKey, MaglevChunk);
