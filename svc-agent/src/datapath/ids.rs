//! Stable numeric ids for frontends and backends.
//!
//! An id stays with its object for as long as the object exists, survives agent restarts
//! (rebuilt from the maps by [`IdMap::adopt`]) and is not handed out again soon after it is
//! freed (ids are allocated upward and wrap), so a connection-table entry that still names an
//! old backend id cannot land on a different backend by accident. The cursor (the next id to
//! try) is persisted in `ID_CURSORS_V1` and restored with [`IdMap::resume_at`], so this holds
//! across restarts too: without it a restarted agent would go on after the highest id the
//! maps still hold, reissuing ids freed just before the restart.
//!
//! Wraparound: after `u32::MAX` the cursor goes back to 1, skipping ids in use. An id comes
//! back only after 2^32 - 1 other allocations (at 1,000 new endpoints a second, 50 days),
//! longer than any entry that names one lives without being refreshed (connection table: 6 h
//! idle; affinity: at most a day); the kernel's affinity check (`AffinityValue::check`) covers
//! a refreshed affinity entry even then.

use std::{collections::BTreeMap, ops::RangeBounds};

/// Ids for keys of type `K`, from 1 to `u32::MAX` (0 is never used).
#[derive(Debug, Clone)]
pub struct IdMap<K: Ord + Clone> {
    by_key: BTreeMap<K, u32>,
    used: BTreeMap<u32, K>,
    next: u32,
}

impl<K: Ord + Clone> Default for IdMap<K> {
    fn default() -> Self {
        Self {
            by_key: BTreeMap::new(),
            used: BTreeMap::new(),
            next: 1,
        }
    }
}

impl<K: Ord + Clone> IdMap<K> {
    /// The id of `key`, allocating one if it has none.
    pub fn get_or_alloc(&mut self, key: &K) -> u32 {
        if let Some(id) = self.by_key.get(key) {
            return *id;
        }
        let mut id = self.next;
        // Skip ids in use; the map holds far fewer than 2^32 entries, so this ends quickly.
        while id == 0 || self.used.contains_key(&id) {
            id = id.wrapping_add(1);
        }
        self.next = id.wrapping_add(1);
        self.by_key.insert(key.clone(), id);
        self.used.insert(id, key.clone());
        id
    }

    /// The id of `key`, if it has one.
    #[must_use]
    pub fn get(&self, key: &K) -> Option<u32> {
        self.by_key.get(key).copied()
    }

    /// The next id [`get_or_alloc`](Self::get_or_alloc) tries (what `ID_CURSORS_V1` keeps).
    #[must_use]
    pub fn cursor(&self) -> u32 {
        self.next
    }

    /// Goes on from a persisted cursor (`ID_CURSORS_V1`): the next id tried is `next`, unless
    /// 0 (no cursor was kept), which leaves the cursor after the highest adopted id.
    pub fn resume_at(&mut self, next: u32) {
        if next != 0 {
            self.next = next;
        }
    }

    /// Records that `key` already has `id` (read back from the maps after a restart).
    pub fn adopt(&mut self, key: K, id: u32) {
        self.by_key.insert(key.clone(), id);
        self.used.insert(id, key);
        self.next = self.next.max(id.wrapping_add(1));
    }

    /// Every key that has an id.
    pub fn keys(&self) -> impl Iterator<Item = &K> {
        self.by_key.keys()
    }

    /// The keys in `range` with their ids, in key order.
    pub fn range(&self, range: impl RangeBounds<K>) -> impl Iterator<Item = (&K, u32)> {
        self.by_key.range(range).map(|(k, id)| (k, *id))
    }

    /// The key that holds `id`, if any.
    #[must_use]
    pub fn key_of(&self, id: u32) -> Option<&K> {
        self.used.get(&id)
    }

    /// Frees the id of `key` (if it has one), returning it.
    pub fn remove(&mut self, key: &K) -> Option<u32> {
        let id = self.by_key.remove(key)?;
        self.used.remove(&id);
        Some(id)
    }

    /// Frees every id whose key `keep` rejects.
    pub fn retain(&mut self, mut keep: impl FnMut(&K) -> bool) {
        self.by_key.retain(|k, _| keep(k));
        let by_key = &self.by_key;
        self.used.retain(|_, k| by_key.contains_key(k));
    }

    /// Number of ids in use.
    #[must_use]
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    /// Whether no id is in use.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_and_not_reused_at_once() {
        let mut ids = IdMap::default();
        let a = ids.get_or_alloc(&"a");
        let b = ids.get_or_alloc(&"b");
        assert_ne!(a, b);
        assert_eq!(ids.get_or_alloc(&"a"), a);
        ids.retain(|k| *k != "a");
        assert_eq!(ids.get(&"a"), None);
        let c = ids.get_or_alloc(&"c");
        assert!(c != a && c != b, "freed id {a} handed out again at once");
        assert_eq!(ids.len(), 2);
    }

    #[test]
    fn a_removed_key_frees_its_id_without_moving_the_cursor_back() {
        let mut ids = IdMap::default();
        let a = ids.get_or_alloc(&"a");
        assert_eq!(ids.key_of(a), Some(&"a"));
        assert_eq!(ids.remove(&"a"), Some(a));
        assert_eq!(ids.remove(&"a"), None);
        assert_eq!((ids.key_of(a), ids.get(&"a")), (None, None));
        assert!(ids.get_or_alloc(&"b") > a);
    }

    #[test]
    fn adopted_ids_are_kept_and_skipped() {
        let mut ids = IdMap::default();
        ids.adopt("old", 7);
        assert_eq!(ids.get_or_alloc(&"old"), 7);
        assert!(ids.get_or_alloc(&"new") > 7);
    }

    #[test]
    fn allocation_wraps_past_ids_in_use_and_never_yields_zero() {
        let mut ids = IdMap::default();
        ids.adopt("top", u32::MAX);
        ids.adopt("one", 1);
        let n = ids.get_or_alloc(&"x");
        assert!(n != 0 && n != 1 && n != u32::MAX);
    }

    #[test]
    fn a_resumed_cursor_goes_on_after_ids_freed_before_a_restart() {
        let mut before = IdMap::default();
        let a = before.get_or_alloc(&"a");
        let b = before.get_or_alloc(&"b");
        before.retain(|k| *k == "a");
        let cursor = before.cursor();
        // A restart: the maps hold only "a"; the cursor was persisted.
        let mut lost = IdMap::default();
        lost.adopt("a", a);
        assert_eq!(
            lost.get_or_alloc(&"c"),
            b,
            "without the cursor, b's id comes back"
        );
        let mut after = IdMap::default();
        after.adopt("a", a);
        after.resume_at(cursor);
        let c = after.get_or_alloc(&"c");
        assert!(c > b, "c got {c}, b had {b}");
        // No cursor kept (0): after the highest adopted id, as before.
        let mut none = IdMap::default();
        none.adopt("a", 7);
        none.resume_at(0);
        assert_eq!(none.get_or_alloc(&"c"), 8);
        // A cursor that wrapped past ids in use skips them.
        let mut wrapped = IdMap::default();
        wrapped.adopt("a", 1);
        wrapped.resume_at(1);
        assert_eq!(wrapped.get_or_alloc(&"c"), 2);
    }
}
