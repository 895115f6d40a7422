//! Stable numeric ids for frontends and backends.
//!
//! An id stays with its object for as long as the object exists, survives agent restarts
//! (rebuilt from the maps by [`IdMap::adopt`]) and is not handed out again soon after it is
//! freed (ids are allocated upward and wrap), so a connection-table entry that still names an
//! old backend id cannot land on a different backend by accident.

use std::collections::BTreeMap;

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

    /// Records that `key` already has `id` (read back from the maps after a restart).
    pub fn adopt(&mut self, key: K, id: u32) {
        self.by_key.insert(key.clone(), id);
        self.used.insert(id, key);
        self.next = self.next.max(id.wrapping_add(1));
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
}
