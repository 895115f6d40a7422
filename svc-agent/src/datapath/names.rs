//! `BACKEND_NAMES_V1` and `FRONTEND_NAMES_V1`: who each backend is (`namespace/name` of its
//! Pod) and which Service port each frontend is, written beside `BACKENDS_V1` and
//! `SERVICES_V1` so `svc-agent inspect` can show them from pinned state, with no agent
//! running. No program reads them.

use std::{
    collections::BTreeMap,
    hash::{DefaultHasher, Hasher},
    marker::PhantomData,
};

use svc_common::service::{BackendName, FrontendName, Name};

/// What the reconciler remembers of a names map value: a 64-bit hash of its bytes. It only
/// needs to know whether the map holds what it would write (the values are written from the
/// desired state, never from memory). A `BackendName` is 256 bytes of which a Pod's
/// `namespace/name` uses a few dozen; even packed to those, one per backend and frontend took
/// about 8 MiB at 30,000 Services. Two different values share a fingerprint with probability
/// 2^-64: at worst a name stays stale until it changes again (no program reads these maps).
pub struct Fingerprint<T> {
    hash: u64,
    value: PhantomData<fn() -> T>,
}

impl<T: aya::Pod> Fingerprint<T> {
    /// The fingerprint of `value`.
    #[must_use]
    pub fn of(value: &T) -> Self {
        // SAFETY: the map value types implement `Pod` through `svc_common::impl_pod`: `repr(C)`
        // without implicit padding (asserted at compile time), so every byte is initialised.
        let raw = unsafe {
            std::slice::from_raw_parts(std::ptr::from_ref(value).cast::<u8>(), size_of::<T>())
        };
        // The same keys every time (not `RandomState`): fingerprints are compared only within
        // the process, and a fixed function keeps them reproducible.
        let mut hasher = DefaultHasher::new();
        hasher.write(raw);
        Self {
            hash: hasher.finish(),
            value: PhantomData,
        }
    }
}

impl<T> Clone for Fingerprint<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for Fingerprint<T> {}

impl<T> PartialEq for Fingerprint<T> {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash
    }
}

impl<T> Eq for Fingerprint<T> {}

impl<T> std::fmt::Debug for Fingerprint<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Fingerprint({:016x})", self.hash)
    }
}

/// How many names [`settle_many`] hands to one `put` (one `BPF_MAP_UPDATE_BATCH` call in the
/// real maps; a chunk's values are built only for it).
const SETTLE_CHUNK: usize = 4096;

/// Brings the names of the ids in `wants` from what `current` holds to what each asks for
/// (`None`: no name): new or changed names are written through `put`, a chunk at a time (it
/// returns each entry's result, in order), names no longer wanted are deleted through `del`.
/// `current` follows what succeeded; each failure goes to `failed` with its id. At 90,000
/// backends a cold start writes 90,000 names: in 22 calls instead of 90,000.
pub fn settle_many<S, T: aya::Pod>(
    maps: &mut S,
    wants: impl IntoIterator<Item = (u32, Option<T>)>,
    current: &mut BTreeMap<u32, Fingerprint<T>>,
    mut put: impl FnMut(&mut S, &[(u32, T)]) -> Vec<anyhow::Result<()>>,
    mut del: impl FnMut(&mut S, u32) -> anyhow::Result<()>,
    mut failed: impl FnMut(u32, anyhow::Error),
) {
    let mut chunk: Vec<(u32, T)> = Vec::new();
    for (id, want) in wants {
        if want.as_ref().map(Fingerprint::of) == current.get(&id).copied() {
            continue;
        }
        match want {
            Some(name) => chunk.push((id, name)),
            None => match del(maps, id) {
                Ok(()) => {
                    current.remove(&id);
                }
                Err(e) => failed(id, e),
            },
        }
        if chunk.len() == SETTLE_CHUNK {
            let results = put(maps, &chunk);
            record(&mut chunk, results, current, &mut failed);
        }
    }
    if !chunk.is_empty() {
        let results = put(maps, &chunk);
        record(&mut chunk, results, current, &mut failed);
    }
}

/// Records the written names of `chunk` (emptied) in `current`, each failure in `failed`.
fn record<T: aya::Pod>(
    chunk: &mut Vec<(u32, T)>,
    results: Vec<anyhow::Result<()>>,
    current: &mut BTreeMap<u32, Fingerprint<T>>,
    failed: &mut impl FnMut(u32, anyhow::Error),
) {
    for ((id, name), result) in chunk.drain(..).zip(results) {
        match result {
            Ok(()) => {
                current.insert(id, Fingerprint::of(&name));
            }
            Err(e) => failed(id, e),
        }
    }
}

/// The `FRONTEND_NAMES_V1` value of port `port` (name; empty: unnamed) of the Service
/// `namespace/name`.
#[must_use]
pub fn frontend_name(namespace: &str, name: &str, port: &str) -> FrontendName {
    FrontendName::new(&format!("{namespace}/{name}"), port)
}

/// Brings the names map from `current` to `want`: writes the entries that are new or
/// changed, then deletes those `want` lacks (a deleted entry that is already gone counts as
/// deleted). `current` follows what succeeded; failures are pushed onto `errors`. Returns
/// (written, deleted).
pub fn sync(
    current: &mut BTreeMap<u32, BackendName>,
    want: &BTreeMap<u32, BackendName>,
    mut put: impl FnMut(u32, &BackendName) -> anyhow::Result<()>,
    mut del: impl FnMut(u32) -> anyhow::Result<()>,
    errors: &mut Vec<String>,
) -> (usize, usize) {
    let (mut written, mut deleted) = (0, 0);
    for (id, name) in want {
        if current.get(id) == Some(name) {
            continue;
        }
        match put(*id, name) {
            Ok(()) => {
                current.insert(*id, *name);
                written += 1;
            }
            Err(e) => errors.push(format!("backend {id} name: {e:#}")),
        }
    }
    let stale: Vec<u32> = current
        .keys()
        .filter(|id| !want.contains_key(id))
        .copied()
        .collect();
    for id in stale {
        match del(id) {
            Ok(()) => {
                current.remove(&id);
                deleted += 1;
            }
            Err(e) => errors.push(format!("backend {id} name: {e:#}")),
        }
    }
    (written, deleted)
}

/// How `inspect` shows a stored name: the text (invalid UTF-8 replaced), `…` when it was cut.
#[must_use]
pub fn display<const N: usize>(name: &Name<N>) -> String {
    let text = String::from_utf8_lossy(name.stored());
    if name.is_cut() {
        format!("{text}…")
    } else {
        text.into_owned()
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;

    #[test]
    fn fingerprints_are_equal_exactly_when_the_values_are() {
        let short = BackendName::new("default/web-0");
        assert_eq!(Fingerprint::of(&short), Fingerprint::of(&short));
        // A name that ends where another goes on differs, and so does a cut one.
        assert_ne!(
            Fingerprint::of(&short),
            Fingerprint::of(&BackendName::new("default/web-01"))
        );
        let long = "n/".to_owned() + &"x".repeat(300);
        assert_ne!(
            Fingerprint::of(&BackendName::new(&long)),
            Fingerprint::of(&BackendName::new(&long[..200]))
        );
        assert_ne!(
            Fingerprint::of(&FrontendName::new("default/web", "http")),
            Fingerprint::of(&FrontendName::new("default/web", ""))
        );
        assert_eq!(size_of::<Fingerprint<BackendName>>(), 8);
    }

    #[test]
    fn writes_what_changed_and_deletes_what_went() {
        let map = RefCell::new(BTreeMap::new());
        let mut current = BTreeMap::new();
        let mut errors = Vec::new();
        let want = BTreeMap::from([
            (1, BackendName::new("default/web-0")),
            (2, BackendName::new("default/web-1")),
        ]);
        let put = |id, n: &BackendName| {
            map.borrow_mut().insert(id, *n);
            Ok(())
        };
        let del = |id| {
            map.borrow_mut().remove(&id);
            Ok(())
        };
        assert_eq!(sync(&mut current, &want, put, del, &mut errors), (2, 0));
        assert_eq!(*map.borrow(), want);
        let want2 = BTreeMap::from([(2, BackendName::new("default/web-1b"))]);
        assert_eq!(sync(&mut current, &want2, put, del, &mut errors), (1, 1));
        assert_eq!(*map.borrow(), want2);
        assert_eq!(current, want2);
        // Nothing changed: nothing written.
        assert_eq!(sync(&mut current, &want2, put, del, &mut errors), (0, 0));
        assert_eq!(errors, Vec::<String>::new());
    }

    #[test]
    fn failures_are_reported_and_retried_next_pass() {
        let mut current = BTreeMap::new();
        let mut errors = Vec::new();
        let want = BTreeMap::from([(7, BackendName::new("ns/p"))]);
        let written = sync(
            &mut current,
            &want,
            |_, _| anyhow::bail!("E2BIG"),
            |_| Ok(()),
            &mut errors,
        );
        assert_eq!(written, (0, 0));
        assert_eq!(errors, ["backend 7 name: E2BIG"]);
        assert!(current.is_empty(), "a failed write is not recorded");
    }

    #[test]
    fn long_names_are_cut_at_a_character_and_marked() {
        let short = BackendName::new("default/web-0");
        assert_eq!(display(&short), "default/web-0");
        let long = format!("ns/{}", "é".repeat(200));
        let cut = BackendName::new(&long);
        assert!(cut.is_cut());
        assert_eq!(usize::from(cut.len), long.len());
        let shown = display(&cut);
        assert!(shown.ends_with('…'), "{shown}");
        assert!(long.starts_with(shown.trim_end_matches('…')));
        assert!(shown.len() <= svc_common::service::BACKEND_NAME_CAP + '…'.len_utf8());
    }

    #[test]
    fn frontend_names_round_trip_and_are_cut_like_backend_names() {
        let n = frontend_name("kube-system", "kube-dns", "dns-tcp");
        assert_eq!(display(&n.service), "kube-system/kube-dns");
        assert_eq!(display(&n.port), "dns-tcp");
        let unnamed = frontend_name("default", "web", "");
        assert_eq!(display(&unnamed.port), "");
        // The longest names the API accepts fit whole.
        let longest = frontend_name(&"n".repeat(63), &"s".repeat(63), &"p".repeat(15));
        assert!(!longest.service.is_cut() && !longest.port.is_cut());
        assert_eq!(display(&longest.service).len(), 127);
        // Longer (only a hand-written file can say so): cut and marked.
        let long = frontend_name("default", &"é".repeat(100), &"p".repeat(40));
        assert!(long.service.is_cut() && long.port.is_cut());
        assert!(display(&long.service).ends_with('…'));
        assert_eq!(display(&long.port), format!("{}…", "p".repeat(30)));
    }

    #[test]
    fn settle_many_writes_changes_in_chunks_deletes_removals_and_keeps_failures_out() {
        let mut current = BTreeMap::new();
        let mut calls = Vec::new();
        let wants = (0..SETTLE_CHUNK as u32 + 3).map(|id| (id, Some(id)));
        let print = |v: u32| Fingerprint::of(&v);
        let mut failures = Vec::new();
        settle_many(
            &mut (),
            wants,
            &mut current,
            |(), chunk| {
                calls.push(chunk.len());
                // Id 7's write fails: not recorded, reported.
                (chunk.iter().map(|(id, _)| {
                    if *id == 7 {
                        Err(anyhow::anyhow!("E2BIG"))
                    } else {
                        Ok(())
                    }
                }))
                .collect()
            },
            |(), _| Ok(()),
            |id, _| failures.push(id),
        );
        assert_eq!(calls, [SETTLE_CHUNK, 3], "one call per chunk");
        assert_eq!(failures, [7]);
        assert_eq!(current.len(), SETTLE_CHUNK + 2);
        assert!(!current.contains_key(&7));

        // Unchanged names are not written; a changed one is; removals are deleted, a failed
        // delete is kept.
        let mut written = Vec::new();
        let mut deleted = Vec::new();
        let mut failures = Vec::new();
        settle_many(
            &mut (),
            [
                (1, Some(1)),
                (2, Some(20)),
                (3, None),
                (4, None),
                (9999, None),
            ],
            &mut current,
            |(), chunk| {
                written.extend(chunk.iter().copied());
                chunk.iter().map(|_| Ok(())).collect()
            },
            |(), id| {
                deleted.push(id);
                if id == 4 {
                    anyhow::bail!("EPERM")
                }
                Ok(())
            },
            |id, _| failures.push(id),
        );
        assert_eq!(written, [(2, 20)]);
        assert_eq!(deleted, [3, 4], "9999 has no name: nothing to delete");
        assert_eq!(failures, [4]);
        assert_eq!(current.get(&2), Some(&print(20)));
        assert!(!current.contains_key(&3));
        assert_eq!(
            current.get(&4),
            Some(&print(4)),
            "a failed delete is not recorded"
        );
    }
}
