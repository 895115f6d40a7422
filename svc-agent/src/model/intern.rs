//! Shared copies of the strings many objects repeat.
//!
//! A cluster's `EndpointSlice`s name a handful of nodes and namespaces tens of thousands of times
//! (every endpoint names its node and its Pod's namespace), and Services repeat the same few
//! values of their enum-like fields (`TCP`, `ClusterIP`, `IPv4`, `Cluster`). Held as `String`s,
//! each costs a heap allocation (24 bytes of `String` plus 24-32 of heap); held as one shared
//! [`Arc<str>`] per distinct value, 16 bytes. [`intern`] hands out the shared copy.
//!
//! Only fields with few distinct values go through here: names and addresses, unique per
//! object, stay owned. Values no object holds any more are dropped when the pool has doubled
//! since it was last swept, so a stream of distinct values (a misbehaving source) costs memory
//! in proportion to what objects hold, not to what was ever seen.

use std::{
    collections::HashSet,
    sync::{Arc, LazyLock, Mutex, PoisonError},
};

/// The pool: every distinct value handed out and possibly still held.
struct Pool {
    values: HashSet<Arc<str>>,
    /// The pool's size after its last sweep.
    swept_at: usize,
}

/// Pools smaller than this are never swept.
const SWEEP_FLOOR: usize = 1024;

static POOL: LazyLock<Mutex<Pool>> = LazyLock::new(|| {
    Mutex::new(Pool {
        values: HashSet::new(),
        swept_at: 0,
    })
});

/// The shared copy of `value`.
#[must_use]
pub fn intern(value: &str) -> Arc<str> {
    let mut pool = POOL.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(shared) = pool.values.get(value) {
        return Arc::clone(shared);
    }
    if pool.values.len() >= SWEEP_FLOOR.max(pool.swept_at * 2) {
        // Only the pool holds these.
        pool.values.retain(|v| Arc::strong_count(v) > 1);
        pool.swept_at = pool.values.len();
    }
    let shared: Arc<str> = Arc::from(value);
    pool.values.insert(Arc::clone(&shared));
    shared
}

/// [`intern`] for an optional value (the API types' `Option<String>` fields).
#[must_use]
pub fn intern_opt(value: Option<&str>) -> Option<Arc<str>> {
    value.map(intern)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_values_share_one_copy() {
        let a = intern("intern-test-node-1");
        let b = intern(&String::from("intern-test-node-1"));
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(&*a, "intern-test-node-1");
        assert!(!Arc::ptr_eq(&a, &intern("intern-test-node-2")));
        assert_eq!(intern_opt(None), None);
        assert!(Arc::ptr_eq(
            &intern_opt(Some("intern-test-node-1")).unwrap(),
            &a
        ));
    }

    #[test]
    fn values_nobody_holds_are_swept_as_the_pool_grows() {
        // Distinct values, none kept: the pool stays bounded instead of holding all of them.
        for i in 0..4 * SWEEP_FLOOR {
            let _ = intern(&format!("intern-test-churn-{i}"));
        }
        let kept = intern("intern-test-kept");
        for i in 0..4 * SWEEP_FLOOR {
            let _ = intern(&format!("intern-test-churn-again-{i}"));
        }
        let pool = POOL.lock().unwrap();
        // Without sweeps it would hold all 8,192 (other tests intern meanwhile: some slack).
        assert!(
            pool.values.len() < 4 * SWEEP_FLOOR,
            "{} values pooled",
            pool.values.len()
        );
        assert!(pool.values.contains("intern-test-kept"));
        drop(pool);
        assert!(Arc::ptr_eq(&kept, &intern("intern-test-kept")));
    }
}
