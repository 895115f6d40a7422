//! `BACKEND_NAMES_V1`: who each backend is (`namespace/name` of its Pod), written beside
//! `BACKENDS_V1` so `svc-agent inspect` can show it from pinned state, with no agent running.
//! No program reads it.

use std::collections::BTreeMap;

use svc_common::service::BackendName;

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
pub fn display(name: &BackendName) -> String {
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
}
