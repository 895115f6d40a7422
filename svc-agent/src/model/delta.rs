//! What one incremental model update changed, for the reconciler to write only that.

use std::{collections::BTreeSet, net::IpAddr};

use super::FrontendKey;

/// The parts of a [`DesiredState`](super::DesiredState) that an update changed: the
/// reconciler's incremental pass writes only these frontends (and their backends), looking
/// their new value up in the state (a key missing there was removed).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "one flag per part of the state that has no keys of its own"
)]
pub struct Delta {
    /// Frontends added, changed or removed.
    pub frontends: BTreeSet<FrontendKey>,
    /// Addresses whose entry in `backend_names` was added, changed or removed.
    pub backend_names: BTreeSet<IpAddr>,
    /// Whether `errors` changed.
    pub errors: bool,
    /// Whether `node_addresses` changed.
    pub nodes: bool,
    /// Whether `topology_notes` changed (nothing to write to the maps: the notes are for
    /// logging, like `errors`).
    pub topology_notes: bool,
    /// Whether `health_checks` changed (nothing to write to the maps: the health-check
    /// servers follow them).
    pub health_checks: bool,
}

impl Delta {
    /// Whether the update changed nothing.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.frontends.is_empty()
            && self.backend_names.is_empty()
            && !self.errors
            && !self.nodes
            && !self.topology_notes
            && !self.health_checks
    }

    /// The delta between two whole states (what changed from `before` to `after`): what an
    /// incremental update from `before` to `after` must report. For tests and the audit.
    #[must_use]
    pub fn between(before: &super::DesiredState, after: &super::DesiredState) -> Self {
        let mut frontends = BTreeSet::new();
        for (k, v) in &before.frontends {
            if after.frontends.get(k) != Some(v) {
                frontends.insert(*k);
            }
        }
        for k in after.frontends.keys() {
            if !before.frontends.contains_key(k) {
                frontends.insert(*k);
            }
        }
        let mut backend_names = BTreeSet::new();
        for (a, n) in &before.backend_names {
            if after.backend_names.get(a) != Some(n) {
                backend_names.insert(*a);
            }
        }
        for a in after.backend_names.keys() {
            if !before.backend_names.contains_key(a) {
                backend_names.insert(*a);
            }
        }
        Self {
            frontends,
            backend_names,
            errors: before.errors != after.errors,
            nodes: before.node_addresses != after.node_addresses,
            topology_notes: before.topology_notes != after.topology_notes,
            health_checks: before.health_checks != after.health_checks,
        }
    }
}
