//! The agent's id cursors.
//!
//! Map `ID_CURSORS_V1` (array of [`COUNT`] `u32`; written by the agent, read by no program):
//! entry [`FRONTEND`] is the next frontend id the agent hands out, entry [`BACKEND`] the next
//! backend id. Pinned with the other maps, so a restarted agent goes on after the highest id
//! any agent issued instead of after the highest id the maps still hold: an id freed just
//! before a restart is not given to a different frontend or backend while connection-table,
//! affinity or socket entries may still name it. 0: no cursor yet (a fresh map, or maps of an
//! agent that kept none). Host order.

use crate::impl_pod;

/// Index of the frontend cursor.
pub const FRONTEND: u32 = 0;
/// Index of the backend cursor.
pub const BACKEND: u32 = 1;
/// Entries of `ID_CURSORS_V1`.
pub const COUNT: u32 = 2;

/// Value of `ID_CURSORS_V1`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IdCursor {
    /// The next id to hand out (0: none recorded).
    pub next: u32,
}
crate::assert_layout!(IdCursor, size = 4, next = 0);

impl_pod!(IdCursor);
