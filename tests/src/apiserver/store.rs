//! The object store behind the test API server, kept the way etcd keeps it for the real one:
//! one global, monotonically increasing resource version, the current objects, and a bounded
//! history of changes (each with the object's previous state, so the state at any retained
//! version can be rebuilt for consistent paginated lists and watches can replay from it).
//!
//! Each object is kept with what serving it needs, computed once when it is written: its JSON
//! text, its text as a list item and its labels ([`Stored`]). A list or a watch then costs a
//! copy of bytes per object served, not a serialization.

use std::{
    collections::{BTreeMap, VecDeque, btree_map},
    iter::Peekable,
    ops::{Bound, RangeBounds as _},
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use serde_json::Value;

use super::{kind::Kind, selector::Labels};

/// Where an object is stored: kind, namespace (empty for cluster-scoped kinds), name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Key {
    pub(crate) kind: Kind,
    pub(crate) namespace: String,
    pub(crate) name: String,
}

/// One state of an object, with what serving it needs, computed once when it is written.
#[derive(Debug)]
pub(crate) struct Stored {
    /// The object, with `apiVersion` and `kind`.
    pub(crate) value: Value,
    /// `value` as JSON text, as a `GET` or a watch event sends it.
    pub(crate) json: Bytes,
    /// `value` as a list item's JSON text: without `apiVersion` and `kind`, as the real API
    /// server lists them.
    pub(crate) item: Bytes,
    /// Its labels, for label selectors.
    pub(crate) labels: Labels,
}

impl Stored {
    pub(crate) fn new(value: Value) -> Self {
        // Writing a `Value` into a Vec cannot fail.
        let json = serde_json::to_vec(&value).unwrap_or_default().into();
        let item = serde_json::to_vec(&list_item(&value))
            .unwrap_or_default()
            .into();
        let labels = Labels::of(&value);
        Self {
            value,
            json,
            item,
            labels,
        }
    }
}

/// An object as a list item: the real API server leaves out `apiVersion` and `kind`. (With
/// `serde_json`'s `preserve_order`, `remove` moves the last field into the removed one's place:
/// the order the server has always listed fields in, which the list tests pin.)
fn list_item(object: &Value) -> Value {
    let mut item = object.clone();
    if let Some(map) = item.as_object_mut() {
        map.remove("apiVersion");
        map.remove("kind");
    }
    item
}

/// One change: the object after it (for a deletion, its last state carrying the deletion's
/// resource version), and before it.
#[derive(Debug)]
pub(crate) struct Change {
    pub(crate) rv: u64,
    pub(crate) key: Key,
    pub(crate) prev: Option<Arc<Stored>>,
    pub(crate) object: Arc<Stored>,
    pub(crate) deleted: bool,
}

/// A resource version the history no longer reaches back to (etcd: "required revision has
/// been compacted"; the API server: `410 Gone`, reason `Expired`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Compacted {
    pub(crate) requested: u64,
    pub(crate) oldest: u64,
}

/// The store. Bounded: at most `history_limit` changes and `max_objects` objects.
#[derive(Debug)]
pub(crate) struct Store {
    rv: u64,
    objects: BTreeMap<Key, Arc<Stored>>,
    /// Every change with a resource version above `compacted`, oldest first.
    history: VecDeque<Change>,
    compacted: u64,
    history_limit: usize,
    max_objects: usize,
    uid_seed: u64,
    uids: u64,
}

impl Store {
    pub(crate) fn new(history_limit: usize, max_objects: usize) -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        Self {
            rv: 1,
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            compacted: 1,
            history_limit: history_limit.max(1),
            max_objects,
            uid_seed: (nanos as u64) ^ u64::from(std::process::id()).rotate_left(32),
            uids: 0,
        }
    }

    /// The current resource version.
    pub(crate) fn rv(&self) -> u64 {
        self.rv
    }

    /// The current objects, in key order.
    pub(crate) fn objects(&self) -> &BTreeMap<Key, Arc<Stored>> {
        &self.objects
    }

    /// Creates or updates an object. The server sets `metadata.resourceVersion`, `uid` and
    /// `creationTimestamp` (kept across updates); an update that changes nothing is a no-op
    /// that makes no event, like the real API server's.
    pub(crate) fn apply(&mut self, mut object: Value) -> Result<Arc<Stored>, String> {
        let key = key_of(&mut object)?;
        let existing = self.objects.get(&key).cloned();
        if let Some(existing) = &existing {
            let meta = metadata_mut(&mut object)?;
            for field in ["uid", "creationTimestamp", "resourceVersion"] {
                match existing.value.pointer(&format!("/metadata/{field}")) {
                    Some(v) => meta.insert(field.to_owned(), v.clone()),
                    None => meta.remove(field),
                };
            }
            if object == existing.value {
                return Ok(Arc::clone(existing));
            }
        } else {
            if self.objects.len() >= self.max_objects {
                return Err(format!(
                    "the test API server holds at most {} objects",
                    self.max_objects
                ));
            }
            self.uids += 1;
            let uid = self.uid();
            let now = k8s_openapi::jiff::Timestamp::now().as_second();
            let now = k8s_openapi::jiff::Timestamp::from_second(now).map_err(|e| e.to_string())?;
            let meta = metadata_mut(&mut object)?;
            meta.insert("uid".to_owned(), uid.into());
            meta.insert("creationTimestamp".to_owned(), now.to_string().into());
        }
        let rv = self.rv + 1;
        set_resource_version(&mut object, rv);
        let object = Arc::new(Stored::new(object));
        self.rv = rv;
        self.objects.insert(key.clone(), Arc::clone(&object));
        self.record(Change {
            rv,
            key,
            prev: existing,
            object: Arc::clone(&object),
            deleted: false,
        });
        Ok(object)
    }

    /// Deletes an object, returning its last state (with the deletion's resource version).
    pub(crate) fn delete(&mut self, key: &Key) -> Option<Arc<Stored>> {
        let prev = self.objects.remove(key)?;
        let rv = self.rv + 1;
        self.rv = rv;
        let mut last = prev.value.clone();
        set_resource_version(&mut last, rv);
        let last = Arc::new(Stored::new(last));
        self.record(Change {
            rv,
            key: key.clone(),
            prev: Some(prev),
            object: Arc::clone(&last),
            deleted: true,
        });
        Some(last)
    }

    /// Forgets the whole history, as an etcd compaction at the current revision does.
    pub(crate) fn compact(&mut self) {
        self.history.clear();
        self.compacted = self.rv;
    }

    /// Moves the version on by one without changing an object (as a write to a kind this
    /// server does not serve would) and compacts there: every client, even one that has seen
    /// the latest version (through a bookmark), must relist.
    pub(crate) fn compact_past_everyone(&mut self) {
        self.rv += 1;
        self.compact();
    }

    /// Every change after `rv`, oldest first.
    pub(crate) fn changes_since(
        &self,
        rv: u64,
    ) -> Result<impl Iterator<Item = &Change>, Compacted> {
        if rv < self.compacted {
            return Err(Compacted {
                requested: rv,
                oldest: self.compacted,
            });
        }
        let first = self.history.partition_point(|c| c.rv <= rv);
        Ok(self.history.range(first..))
    }

    /// The objects as they were at `rv`, in key order, from `start` on: the current ones with
    /// those changed since put back as they were. Costs the changes since `rv` (at most one
    /// history) and then the objects read, never a copy of the whole store.
    pub(crate) fn objects_at<'a>(
        &'a self,
        rv: u64,
        start: Bound<&Key>,
    ) -> Result<ObjectsAt<'a>, Compacted> {
        let range = (start, Bound::Unbounded);
        let mut then: BTreeMap<&Key, Option<&Arc<Stored>>> = BTreeMap::new();
        // The first change after `rv` to each object holds its state at `rv`.
        for change in self.changes_since(rv)? {
            if range.contains(&change.key) {
                then.entry(&change.key).or_insert(change.prev.as_ref());
            }
        }
        Ok(ObjectsAt {
            now: self.objects.range::<Key, _>(range).peekable(),
            then: then.into_iter().peekable(),
        })
    }

    fn record(&mut self, change: Change) {
        self.history.push_back(change);
        while self.history.len() > self.history_limit {
            if let Some(oldest) = self.history.pop_front() {
                self.compacted = oldest.rv;
            }
        }
    }

    /// A fresh, well-formed (version 4 layout) UID, unique within this server.
    fn uid(&self) -> String {
        let (seed, n) = (self.uid_seed, self.uids);
        format!(
            "{:08x}-{:04x}-4{:03x}-a{:03x}-{:012x}",
            (seed >> 32) as u32,
            (seed >> 16) & 0xffff,
            seed & 0xfff,
            (n >> 48) & 0xfff,
            n & 0xffff_ffff_ffff
        )
    }
}

/// The objects at a version ([`Store::objects_at`]): a merge of the current objects with the
/// earlier states of those changed since, in key order.
pub(crate) struct ObjectsAt<'a> {
    now: Peekable<btree_map::Range<'a, Key, Arc<Stored>>>,
    then: Peekable<btree_map::IntoIter<&'a Key, Option<&'a Arc<Stored>>>>,
}

impl<'a> Iterator for ObjectsAt<'a> {
    type Item = (&'a Key, &'a Arc<Stored>);

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let changed_first = match (self.now.peek(), self.then.peek()) {
                (_, None) => return self.now.next(),
                (None, Some(_)) => true,
                (Some((now, _)), Some((then, _))) => *then <= *now,
            };
            if !changed_first {
                return self.now.next();
            }
            let (key, state) = self.then.next()?;
            if self.now.peek().is_some_and(|(now, _)| *now == key) {
                self.now.next();
            }
            // `None`: created since, so absent then.
            if let Some(state) = state {
                return Some((key, state));
            }
        }
    }
}

/// The key of an object, checking that it is of a served kind and named; a namespaced
/// object naming no namespace goes to `default` (like `kubectl apply`), a cluster-scoped one
/// loses any namespace it names.
pub(crate) fn key_of(object: &mut Value) -> Result<Key, String> {
    let text = |v: &Value, field: &str| v.get(field).and_then(Value::as_str).map(str::to_owned);
    let api_version = text(object, "apiVersion").ok_or("object has no apiVersion")?;
    let kind_name = text(object, "kind").ok_or("object has no kind")?;
    let kind = Kind::of(&api_version, &kind_name)
        .ok_or_else(|| format!("the test API server does not serve {api_version} {kind_name}"))?;
    let meta = object
        .get_mut("metadata")
        .and_then(Value::as_object_mut)
        .ok_or("object has no metadata")?;
    let name = meta
        .get("name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or("object has no metadata.name")?
        .to_owned();
    let namespace = if kind.namespaced() {
        let ns = meta
            .get("namespace")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .unwrap_or("default")
            .to_owned();
        meta.insert("namespace".to_owned(), ns.clone().into());
        ns
    } else {
        meta.remove("namespace");
        String::new()
    };
    Ok(Key {
        kind,
        namespace,
        name,
    })
}

fn metadata_mut(object: &mut Value) -> Result<&mut serde_json::Map<String, Value>, String> {
    object
        .get_mut("metadata")
        .and_then(Value::as_object_mut)
        .ok_or_else(|| "object has no metadata".to_owned())
}

/// Sets `metadata.resourceVersion`.
pub(crate) fn set_resource_version(object: &mut Value, rv: u64) {
    if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert("resourceVersion".to_owned(), rv.to_string().into());
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn node(name: &str, label: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Node",
               "metadata": {"name": name, "labels": {"l": label}}})
    }

    #[test]
    fn versions_grow_and_no_op_updates_make_no_change() {
        let mut store = Store::new(10, 10);
        let a = store.apply(node("a", "1")).unwrap();
        assert_eq!(a.value["metadata"]["resourceVersion"], "2");
        let uid = a.value["metadata"]["uid"].clone();
        let same = store.apply(node("a", "1")).unwrap();
        assert_eq!(same.value["metadata"]["resourceVersion"], "2");
        let b = store.apply(node("a", "2")).unwrap();
        assert_eq!(b.value["metadata"]["resourceVersion"], "3");
        assert_eq!(b.value["metadata"]["uid"], uid);
        let gone = store.delete(&key_of(&mut node("a", "")).unwrap()).unwrap();
        assert_eq!(gone.value["metadata"]["resourceVersion"], "4");
        assert_eq!(gone.value["metadata"]["labels"]["l"], "2");
        assert_eq!(gone.labels.get("l"), Some("2"));
        assert_eq!(store.changes_since(2).unwrap().count(), 2);
    }

    #[test]
    fn compacting_past_everyone_expires_the_latest_version_too() {
        let mut store = Store::new(100, 100);
        store.apply(node("a", "x")).unwrap();
        let latest = store.rv();
        store.compact();
        assert!(
            store.changes_since(latest).is_ok(),
            "a plain compaction keeps the latest"
        );
        store.compact_past_everyone();
        assert!(store.changes_since(latest).is_err());
        assert!(
            store.changes_since(store.rv()).is_ok(),
            "a relist's version watches on"
        );
        assert_eq!(store.objects().len(), 1);
    }

    /// The objects at `rv` from `start` on, as (name, label `l`).
    fn at(store: &Store, rv: u64, start: Bound<&Key>) -> Result<Vec<(String, String)>, Compacted> {
        let objects = store.objects_at(rv, start)?;
        Ok(objects
            .map(|(key, o)| {
                let label = o.labels.get("l").unwrap_or_default().to_owned();
                (key.name.clone(), label)
            })
            .collect())
    }

    fn named(names: &[(&str, &str)]) -> Vec<(String, String)> {
        names
            .iter()
            .map(|(n, l)| ((*n).to_owned(), (*l).to_owned()))
            .collect()
    }

    #[test]
    fn old_states_are_rebuilt_until_compacted() {
        let mut store = Store::new(3, 10);
        store.apply(node("a", "1")).unwrap(); // 2
        store.apply(node("b", "1")).unwrap(); // 3
        store.apply(node("a", "2")).unwrap(); // 4
        store.delete(&key_of(&mut node("b", "")).unwrap()); // 5
        let all = Bound::Unbounded;
        assert_eq!(
            at(&store, 3, all).unwrap(),
            named(&[("a", "1"), ("b", "1")])
        );
        // Four changes, three kept: version 2 is compacted away.
        assert!(at(&store, 1, all).is_err());
        assert_eq!(at(&store, 2, all).unwrap(), named(&[("a", "1")]));
        assert_eq!(at(&store, 5, all).unwrap(), named(&[("a", "2")]));
        store.compact();
        assert!(store.changes_since(4).is_err());
        assert_eq!(store.changes_since(5).unwrap().count(), 0);
        assert_eq!(at(&store, 5, all).unwrap(), named(&[("a", "2")]));
    }

    #[test]
    fn old_states_merge_with_current_objects_in_key_order() {
        let mut store = Store::new(100, 100);
        for name in ["a", "c", "e", "g"] {
            store.apply(node(name, "old")).unwrap();
        }
        let rv = store.rv();
        store.apply(node("b", "new")).unwrap(); // created since: absent then
        store.delete(&key_of(&mut node("c", "")).unwrap()); // deleted since: present then
        store.apply(node("e", "new")).unwrap(); // modified since: old state then
        store.apply(node("e", "newer")).unwrap();
        store.apply(node("h", "new")).unwrap();
        store.delete(&key_of(&mut node("h", "")).unwrap()); // created and deleted since
        let then = named(&[("a", "old"), ("c", "old"), ("e", "old"), ("g", "old")]);
        assert_eq!(at(&store, rv, Bound::Unbounded).unwrap(), then);
        let c = key_of(&mut node("c", "")).unwrap();
        assert_eq!(at(&store, rv, Bound::Excluded(&c)).unwrap(), then[2..]);
        assert_eq!(at(&store, rv, Bound::Included(&c)).unwrap(), then[1..]);
        let now = named(&[("a", "old"), ("b", "new"), ("e", "newer"), ("g", "old")]);
        assert_eq!(at(&store, store.rv(), Bound::Unbounded).unwrap(), now);
        assert_eq!(
            at(&store, store.rv(), Bound::Excluded(&c)).unwrap(),
            now[2..]
        );
    }
}
