//! A directory of manifests followed file by file (standalone mode).
//!
//! [`DirSource`] remembers, per file, its identity and timestamps (a [`Stamp`]) and what it
//! contributes. The first refresh (and one after [`DirSource::forget_stamps`]: the directory
//! was replaced, events were lost) lists the directory and stats every manifest; every other
//! refresh stats only the files the watcher's events named since the last one
//! ([`DirSource::written`], [`DirSource::completed`], [`DirSource::touched`]) and those whose
//! write-settle time passed, so one edit costs one `stat` and one file's parse, not the
//! directory's. A refresh also says which objects changed ([`Dirty`]: by kind, namespace and
//! name), from the files it read, so the passes above hand only those to the model.
//!
//! The rules, which the README repeats for operators:
//! - **Last good content.** A file that parses with errors (a syntax error, a field of the
//!   wrong type, over its parse [`Budget`], unreadable) after it once parsed cleanly keeps
//!   serving what it last defined until it is fixed or removed; its errors are reported once,
//!   when that version of the file is read. A file never seen clean serves the documents of
//!   it that could be used (a bad document does not stop the others), as before.
//! - **Files being written.** A file modified in place (a `Modify` event without the writer's
//!   close since) is not read until its writer closes it, or until [`WRITE_SETTLE`] passes
//!   without another write (a writer that keeps the file open): a file rewritten slowly in
//!   place never programs a half of it. A file renamed into the directory (what `kubectl`,
//!   editors and `mv` do) is complete at once.
//! - **Removed files** stop contributing at the next refresh.
//! - **An object defined in several files** (or twice in one) is handed on with all its
//!   copies, in file name and document order; the model's rule applies (identical copies are
//!   one object, differing copies are an error and none is used).
//! - **Entries that are not manifests** are not read; an event naming one that is a directory
//!   or a symbolic link (a `ConfigMap` volume swapping its `..data` link) may change what
//!   every file's link points to: the next refresh lists the directory.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    ffi::{OsStr, OsString},
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use k8s_openapi::{
    Metadata,
    api::core::v1::{Node, Pod},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use smallvec::SmallVec;

use super::files::{Budget, DocumentError, Loaded, is_manifest, load_file};
use crate::model::{DEFAULT_NAMESPACE, HandWrittenSlices, Slice, Svc};

/// How long a file modified in place and not closed is left unread after its last write.
pub const WRITE_SETTLE: Duration = Duration::from_secs(5);

/// What identifies one version of a file: which inode, its size and its modification and
/// change times (nanoseconds). Any write, truncation, replacement or rename over it changes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl Stamp {
    fn of(meta: &fs::Metadata) -> Self {
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
            ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
        }
    }
}

/// Whether `path` was modified less than [`WRITE_SETTLE`] ago (wall clock).
fn modified_recently(path: &Path) -> bool {
    fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age < WRITE_SETTLE)
}

/// An object's namespace (`default` when it names none) and name (empty when none): how the
/// model tells objects apart.
pub type ObjectName = (String, String);

/// The name the model gives an object of its `namespace` and `name`.
fn object_name(namespace: Option<&str>, name: Option<&str>) -> ObjectName {
    (
        namespace.unwrap_or(DEFAULT_NAMESPACE).to_owned(),
        name.unwrap_or_default().to_owned(),
    )
}

/// An object the index keeps: it says its namespace and name.
trait Named {
    /// The name the model gives it.
    fn object_name(&self) -> ObjectName;
}

impl<T: Metadata<Ty = ObjectMeta>> Named for T {
    fn object_name(&self) -> ObjectName {
        let meta = self.metadata();
        object_name(meta.namespace.as_deref(), meta.name.as_deref())
    }
}

impl Named for Svc {
    fn object_name(&self) -> ObjectName {
        object_name(
            self.metadata.namespace.as_deref(),
            self.metadata.name.as_deref(),
        )
    }
}

impl Named for Slice {
    fn object_name(&self) -> ObjectName {
        object_name(self.namespace.as_deref(), self.name.as_deref())
    }
}

/// The objects a refresh added, removed or changed: each name whose copies (all the files'
/// together) are not the same as before, by content.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Dirty {
    /// Services.
    pub services: BTreeSet<ObjectName>,
    /// `EndpointSlice`s (as written in the files).
    pub slices: BTreeSet<ObjectName>,
    /// Pods.
    pub pods: BTreeSet<ObjectName>,
    /// Whether a Node changed (the model takes the Nodes as a whole).
    pub nodes: bool,
}

impl Dirty {
    /// Whether no object changed.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.services.is_empty() && self.slices.is_empty() && self.pods.is_empty() && !self.nodes
    }
}

/// One copy of an object: the file that defines it, and the object.
type Copy<T> = (Arc<OsStr>, Arc<T>);

/// Every object of one kind in the directory, by name: its copies, in file name and then
/// document order.
#[derive(Debug)]
struct Index<T> {
    /// Almost every name has one copy: held inline.
    by_name: HashMap<ObjectName, SmallVec<[Copy<T>; 1]>>,
}

impl<T> Default for Index<T> {
    fn default() -> Self {
        Self {
            by_name: HashMap::new(),
        }
    }
}

impl<T: Named + PartialEq> Index<T> {
    /// File `file` defined `old` and now defines `new`: updates the copies of each name whose
    /// copies in that file differ (by content), and adds those names to `dirty`.
    fn update(
        &mut self,
        file: &Arc<OsStr>,
        old: &[Arc<T>],
        new: &[Arc<T>],
        dirty: &mut BTreeSet<ObjectName>,
    ) {
        let by_name = |objects: &[Arc<T>]| {
            let mut named: BTreeMap<ObjectName, Vec<Arc<T>>> = BTreeMap::new();
            for object in objects {
                named
                    .entry(object.object_name())
                    .or_default()
                    .push(Arc::clone(object));
            }
            named
        };
        let mut new = by_name(new);
        for (name, before) in by_name(old) {
            let after = new.remove(&name).unwrap_or_default();
            let same =
                before.len() == after.len() && before.iter().zip(&after).all(|(a, b)| a == b);
            if !same {
                self.put(file, &name, after);
                dirty.insert(name);
            }
        }
        for (name, after) in new {
            self.put(file, &name, after);
            dirty.insert(name);
        }
    }

    /// Sets the copies of `name` that `file` defines.
    fn put(&mut self, file: &Arc<OsStr>, name: &ObjectName, copies: Vec<Arc<T>>) {
        let entries = self.by_name.entry(name.clone()).or_default();
        entries.retain(|(f, _)| f != file);
        let at = entries.partition_point(|(f, _)| **f < **file);
        entries.insert_many(at, copies.into_iter().map(|c| (Arc::clone(file), c)));
        if entries.is_empty() {
            self.by_name.remove(name);
        }
    }

    /// Every copy of `name`, in file name and document order.
    fn copies(&self, name: &ObjectName) -> Vec<Arc<T>> {
        self.by_name
            .get(name)
            .map(|entries| entries.iter().map(|(_, c)| Arc::clone(c)).collect())
            .unwrap_or_default()
    }

    /// Every object, the copies of one name together in file name and document order.
    fn all(&self) -> Vec<Arc<T>> {
        self.by_name
            .values()
            .flatten()
            .map(|(_, c)| Arc::clone(c))
            .collect()
    }
}

/// The directory's objects by kind and name, kept in step with the files.
#[derive(Debug, Default)]
struct Objects {
    services: Index<Svc>,
    slices: Index<Slice>,
    pods: Index<Pod>,
    nodes: Index<Node>,
}

impl Objects {
    /// File `file` contributed `old` and now contributes `new`: notes the names that changed.
    fn update(&mut self, file: &OsStr, old: &Loaded, new: &Loaded, dirty: &mut Dirty) {
        let file: Arc<OsStr> = Arc::from(file);
        let (old_snapshot, new_snapshot) = (&old.snapshot, &new.snapshot);
        self.services.update(
            &file,
            &old_snapshot.services,
            &new_snapshot.services,
            &mut dirty.services,
        );
        self.slices.update(
            &file,
            &old_snapshot.slices,
            &new_snapshot.slices,
            &mut dirty.slices,
        );
        self.pods
            .update(&file, &old.pods, &new.pods, &mut dirty.pods);
        let mut nodes = BTreeSet::new();
        self.nodes
            .update(&file, &old_snapshot.nodes, &new_snapshot.nodes, &mut nodes);
        dirty.nodes |= !nodes.is_empty();
    }
}

/// One file as last read.
#[derive(Debug)]
struct FileState {
    /// The version read.
    stamp: Stamp,
    /// What the file contributes: the last clean version's objects, or (never clean) the usable
    /// documents of the latest version.
    used: Loaded,
    /// Whether `used` comes from a version that parsed without errors.
    clean: bool,
}

/// What one file's read found, for the log.
#[derive(Debug, PartialEq)]
pub struct FileReport {
    /// The file.
    pub file: PathBuf,
    /// The documents (or the whole file) that could not be used in the version read.
    pub errors: Vec<DocumentError>,
    /// Objects of kinds the agent does not use, as `apiVersion kind (origin)`.
    pub skipped: Vec<String>,
    /// Whether the file keeps serving its last clean version (`errors` is not empty then).
    pub kept_last_good: bool,
}

/// What a refresh changed.
#[derive(Debug, Default, PartialEq)]
pub struct Refresh {
    /// Whether anything the directory contributes changed (a file read and used, added or
    /// removed).
    pub changed: bool,
    /// Whether the refresh listed the directory and looked at every file (the first one,
    /// after [`DirSource::forget_stamps`], after an event about a directory or link).
    pub listed: bool,
    /// The files read, in name order.
    pub read: Vec<FileReport>,
    /// Files that stopped contributing.
    pub removed: Vec<PathBuf>,
    /// Files left unread because a writer has them open (see [`WRITE_SETTLE`]).
    pub being_written: Vec<PathBuf>,
    /// The objects whose copies changed.
    pub dirty: Dirty,
}

/// A directory of manifests, read file by file (see the module documentation).
#[derive(Debug)]
pub struct DirSource {
    dir: PathBuf,
    budget: Budget,
    /// Keyed by file name (all files are in the directory): names compare as bytes, where
    /// whole paths compare component by component.
    files: BTreeMap<OsString, FileState>,
    /// What the files define, by name.
    objects: Objects,
    /// Manifests modified in place whose writer has not closed them, with the last write's
    /// time.
    writing: HashMap<OsString, Instant>,
    /// Manifests whose writer closed them (or that were renamed into place) since they were
    /// read.
    completed: HashSet<OsString>,
    /// Entries events named since the last refresh: all that a refresh looks at, with the
    /// files whose write settled, unless it lists the directory.
    named: HashSet<OsString>,
    /// Whether a refresh listed the directory since the stamps were forgotten (until then a
    /// refresh lists it and reads every file, whatever its age).
    primed: bool,
}

impl DirSource {
    /// A source for `dir`, nothing read yet.
    #[must_use]
    pub fn new(dir: &Path, budget: Budget) -> Self {
        Self {
            dir: dir.to_owned(),
            budget,
            files: BTreeMap::new(),
            objects: Objects::default(),
            writing: HashMap::new(),
            completed: HashSet::new(),
            named: HashSet::new(),
            primed: false,
        }
    }

    /// The directory.
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Notes that `file` was modified in place at `at` (its writer may still be writing).
    pub fn written(&mut self, file: &Path, at: Instant) {
        if let Some(name) = self.name_in_dir(file) {
            if is_manifest(file) {
                // A write after a close: the close no longer says it is complete.
                self.completed.remove(&name);
                self.writing.insert(name.clone(), at);
            }
            self.named.insert(name);
        }
    }

    /// Notes that `file` is complete: its writer closed it, it was renamed into place or it
    /// was removed.
    pub fn completed(&mut self, file: &Path) {
        if let Some(name) = self.name_in_dir(file) {
            self.writing.remove(&name);
            if is_manifest(file) {
                self.completed.insert(name.clone());
            }
            self.named.insert(name);
        }
    }

    /// Notes that an event named `file` without saying anything about its writer (created,
    /// its metadata changed): the next refresh looks at it.
    pub fn touched(&mut self, file: &Path) {
        if let Some(name) = self.name_in_dir(file) {
            self.named.insert(name);
        }
    }

    /// The name of `file` when it is an entry of the directory.
    fn name_in_dir(&self, file: &Path) -> Option<OsString> {
        (file.parent() == Some(self.dir.as_path()))
            .then(|| file.file_name().map(OsStr::to_owned))
            .flatten()
    }

    /// When the oldest file left unread because it is being written may be read, if any.
    #[must_use]
    pub fn next_settle(&self) -> Option<Instant> {
        self.writing.values().min().map(|at| *at + WRITE_SETTLE)
    }

    /// Reads the manifests that changed since the last refresh: of the files events named and
    /// those whose write settled, or (the first time, after
    /// [`forget_stamps`](Self::forget_stamps), after an event about a directory or link) of
    /// the whole directory.
    ///
    /// # Errors
    /// When the directory cannot be listed; nothing is forgotten then.
    pub fn refresh(&mut self, now: Instant) -> anyhow::Result<Refresh> {
        if self.primed {
            if !self.named_a_link_or_directory() {
                return Ok(self.refresh_named(now));
            }
            // The files' links point into another version, written before the links were
            // swapped: read every changed file at once, as after lost events.
            self.primed = false;
        }
        let entries = fs::read_dir(&self.dir)
            .with_context(|| format!("listing directory {}", self.dir.display()))?;
        let mut present: HashMap<OsString, (PathBuf, Stamp)> = HashMap::new();
        for entry in entries {
            let entry =
                entry.with_context(|| format!("listing directory {}", self.dir.display()))?;
            let path = entry.path();
            if !is_manifest(&path) {
                continue;
            }
            // `fs::metadata` follows symbolic links (`ConfigMap` volumes are made of them).
            if let Ok(meta) = fs::metadata(&path)
                && meta.is_file()
            {
                present.insert(entry.file_name(), (path, Stamp::of(&meta)));
            }
        }
        self.named.clear();
        let mut refresh = Refresh {
            listed: true,
            ..Refresh::default()
        };
        let gone: Vec<OsString> = self
            .files
            .keys()
            .filter(|name| !present.contains_key(*name))
            .cloned()
            .collect();
        for name in gone {
            self.gone(&name, &mut refresh);
        }
        self.writing.retain(|name, _| present.contains_key(name));
        self.completed.retain(|name| present.contains_key(name));
        // In name order (reports and logs follow it).
        let mut present: Vec<(OsString, (PathBuf, Stamp))> = present.into_iter().collect();
        present.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        for (name, (path, stamp)) in present {
            self.look_at(name, &path, stamp, now, &mut refresh);
        }
        self.primed = true;
        Ok(refresh)
    }

    /// Whether an entry events named is a directory or a symbolic link that is not a
    /// manifest (a `ConfigMap` volume's `..data`): the files' links may point elsewhere now.
    fn named_a_link_or_directory(&self) -> bool {
        self.named.iter().any(|name| {
            let path = self.dir.join(name);
            !is_manifest(&path)
                && fs::symlink_metadata(&path)
                    .is_ok_and(|m| m.is_dir() || m.file_type().is_symlink())
        })
    }

    /// The refresh of only the files events named and those whose write settled.
    fn refresh_named(&mut self, now: Instant) -> Refresh {
        let mut names: Vec<OsString> = self
            .named
            .drain()
            .filter(|name| is_manifest(Path::new(name)))
            .collect();
        names.extend(
            self.writing
                .iter()
                .filter(|(_, at)| now.saturating_duration_since(**at) >= WRITE_SETTLE)
                .map(|(name, _)| name.clone()),
        );
        names.sort_unstable();
        names.dedup();
        let mut refresh = Refresh::default();
        for name in names {
            let path = self.dir.join(&name);
            // `fs::metadata` follows symbolic links, as the listing does.
            match fs::metadata(&path) {
                Ok(meta) if meta.is_file() => {
                    self.look_at(name, &path, Stamp::of(&meta), now, &mut refresh);
                }
                _ => {
                    self.writing.remove(&name);
                    self.completed.remove(&name);
                    if self.files.contains_key(&name) {
                        self.gone(&name, &mut refresh);
                    }
                }
            }
        }
        refresh
    }

    /// A file that stopped contributing.
    fn gone(&mut self, name: &OsString, refresh: &mut Refresh) {
        if let Some(state) = self.files.remove(name) {
            self.objects
                .update(name, &state.used, &Loaded::default(), &mut refresh.dirty);
        }
        let path = self.dir.join(name);
        self.writing.remove(name);
        refresh.removed.push(path);
        refresh.changed = true;
    }

    /// Reads the file `name` (at `path`, with `stamp` now) when it changed and is not being
    /// written.
    fn look_at(
        &mut self,
        name: OsString,
        path: &Path,
        stamp: Stamp,
        now: Instant,
        refresh: &mut Refresh,
    ) {
        if self.files.get(&name).is_some_and(|f| f.stamp == stamp) {
            // The version read is the file as it is: nothing to wait for (a writer's next
            // write is another event).
            self.writing.remove(&name);
            self.completed.remove(&name);
            return;
        }
        if !self.completed.remove(&name) {
            if let Some(at) = self.writing.get(&name) {
                if now.saturating_duration_since(*at) < WRITE_SETTLE {
                    refresh.being_written.push(path.to_owned());
                    return;
                }
                self.writing.remove(&name);
            } else if self.primed && modified_recently(path) {
                // Changed, but neither its writer's close nor a rename has been seen (the
                // events may still be on their way): treated as being written.
                self.writing.insert(name, now);
                refresh.being_written.push(path.to_owned());
                return;
            }
        }
        let report = self.read(&name, path, stamp, &mut refresh.dirty);
        // A file that keeps its last good version contributes what it did.
        refresh.changed |= !report.kept_last_good;
        refresh.read.push(report);
    }

    /// Reads one file and applies the last-good rule; notes the objects that changed.
    fn read(
        &mut self,
        name: &OsString,
        path: &Path,
        stamp: Stamp,
        dirty: &mut Dirty,
    ) -> FileReport {
        let mut loaded = load_file(path, &self.budget);
        let errors = std::mem::take(&mut loaded.errors);
        let skipped = std::mem::take(&mut loaded.skipped)
            .into_iter()
            .map(|s| format!("{} {} ({})", s.api_version, s.kind, s.origin))
            .collect();
        let clean = errors.is_empty();
        let keep = !clean && self.files.get(name).is_some_and(|f| f.clean);
        if keep {
            if let Some(state) = self.files.get_mut(name) {
                state.stamp = stamp;
            }
        } else {
            loaded.shrink_to_fit();
            let state = FileState {
                stamp,
                used: loaded,
                clean,
            };
            let old = self.files.insert(name.clone(), state).map(|s| s.used);
            if let Some(new) = self.files.get(name) {
                let old = old.unwrap_or_default();
                self.objects.update(name, &old, &new.used, dirty);
            }
        }
        FileReport {
            file: path.to_owned(),
            errors,
            skipped,
            kept_last_good: keep,
        }
    }

    /// Forgets every file's stamp so the next refresh lists the directory and reads every
    /// file again (after the directory was replaced or events were lost). What they
    /// contribute stays until then.
    pub fn forget_stamps(&mut self) {
        for state in self.files.values_mut() {
            state.stamp.len = u64::MAX;
        }
        // Events about them may be lost too: the next refresh reads every file as it is.
        self.primed = false;
    }

    /// Everything the directory contributes, file by file in file name order (what the
    /// periodic audit computes from, apart from the by-name bookkeeping).
    #[must_use]
    pub fn loaded(&self) -> Loaded {
        let mut all = Loaded::default();
        for state in self.files.values() {
            all.snapshot
                .services
                .extend(state.used.snapshot.services.iter().cloned());
            all.snapshot
                .slices
                .extend(state.used.snapshot.slices.iter().cloned());
            all.snapshot
                .nodes
                .extend(state.used.snapshot.nodes.iter().cloned());
            all.pods.extend(state.used.pods.iter().cloned());
        }
        all
    }

    /// Every Service, the copies of one name together in file name and document order.
    #[must_use]
    pub fn all_services(&self) -> Vec<Arc<Svc>> {
        self.objects.services.all()
    }

    /// Every copy of the Service `name`, in file name and document order.
    #[must_use]
    pub fn services(&self, name: &ObjectName) -> Vec<Arc<Svc>> {
        self.objects.services.copies(name)
    }

    /// Every copy of the `EndpointSlice` `name`, in file name and document order.
    #[must_use]
    pub fn slices(&self, name: &ObjectName) -> Vec<Arc<Slice>> {
        self.objects.slices.copies(name)
    }

    /// Every copy of the Pod `name`, in file name and document order.
    #[must_use]
    pub fn pods(&self, name: &ObjectName) -> Vec<Arc<Pod>> {
        self.objects.pods.copies(name)
    }

    /// Every Node, the copies of one name together.
    #[must_use]
    pub fn nodes(&self) -> Vec<Arc<Node>> {
        self.objects.nodes.all()
    }
}

/// The directory's `EndpointSlice`s, for the Services-over-Pods computation.
impl HandWrittenSlices for DirSource {
    fn copies(&self, namespace: &str, name: &str) -> Vec<Arc<Slice>> {
        self.slices(&(namespace.to_owned(), name.to_owned()))
    }

    fn all(&self) -> Vec<Arc<Slice>> {
        self.objects.slices.all()
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let path = std::env::temp_dir().join(format!(
                "svc-dir-{name}-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = fs::remove_dir_all(&path);
            fs::create_dir_all(&path).unwrap();
            Self(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn service(name: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  clusterIP: 198.19.0.1\n"
        )
    }

    fn names(source: &DirSource) -> Vec<String> {
        source
            .loaded()
            .snapshot
            .services
            .iter()
            .map(|s| s.metadata.name.clone().unwrap_or_default())
            .collect()
    }

    /// Writes `text` to `path` as a new inode (a rename into place), so stamps always differ.
    fn replace(path: &Path, text: &str) {
        let tmp = path.with_extension("tmp");
        fs::write(&tmp, text).unwrap();
        fs::rename(&tmp, path).unwrap();
    }

    /// [`replace`], and the rename's event as the watcher reports it.
    fn replace_in(source: &mut DirSource, path: &Path, text: &str) {
        replace(path, text);
        source.completed(path);
    }

    #[test]
    fn only_changed_files_are_read() {
        let dir = TempDir::new("changed");
        fs::write(dir.0.join("a.yaml"), service("a")).unwrap();
        fs::write(dir.0.join("b.yaml"), service("b")).unwrap();
        let mut source = DirSource::new(&dir.0, Budget::DEFAULT);
        let now = Instant::now();
        let first = source.refresh(now).unwrap();
        assert!(first.changed);
        assert_eq!(first.read.len(), 2);
        assert_eq!(names(&source), ["a", "b"]);

        let again = source.refresh(now).unwrap();
        assert_eq!(again, Refresh::default(), "nothing changed: nothing read");

        replace_in(&mut source, &dir.0.join("b.yaml"), &service("b2"));
        let second = source.refresh(now).unwrap();
        assert!(second.changed);
        let read: Vec<&Path> = second.read.iter().map(|r| r.file.as_path()).collect();
        assert_eq!(read, [dir.0.join("b.yaml")]);
        assert_eq!(names(&source), ["a", "b2"]);

        fs::remove_file(dir.0.join("a.yaml")).unwrap();
        source.completed(&dir.0.join("a.yaml"));
        let third = source.refresh(now).unwrap();
        assert_eq!(third.removed, [dir.0.join("a.yaml")]);
        assert_eq!(names(&source), ["b2"]);
    }

    fn name(namespace: &str, name: &str) -> ObjectName {
        (namespace.to_owned(), name.to_owned())
    }

    fn set(names: &[(&str, &str)]) -> BTreeSet<ObjectName> {
        names.iter().map(|(ns, n)| name(ns, n)).collect()
    }

    /// A refresh after the first looks only at the files events named (and settled writes):
    /// a file changed without an event is not read until a refresh lists the directory.
    #[test]
    fn only_files_events_named_are_looked_at() {
        let dir = TempDir::new("named");
        for file in ["a.yaml", "b.yaml", "c.yaml"] {
            fs::write(dir.0.join(file), service(file.trim_end_matches(".yaml"))).unwrap();
        }
        let mut source = DirSource::new(&dir.0, Budget::DEFAULT);
        let now = Instant::now();
        let first = source.refresh(now).unwrap();
        assert!(first.listed);
        assert_eq!(first.read.len(), 3);

        // b changes with its event, c without one (as if the event were lost).
        replace_in(&mut source, &dir.0.join("b.yaml"), &service("b2"));
        replace(&dir.0.join("c.yaml"), &service("c2"));
        // An event about an entry that is no manifest, and one about a file not changed.
        source.completed(&dir.0.join(".b.yaml.tmp"));
        source.touched(&dir.0.join("a.yaml"));
        let second = source.refresh(now).unwrap();
        assert!(!second.listed);
        let read: Vec<&Path> = second.read.iter().map(|r| r.file.as_path()).collect();
        assert_eq!(read, [dir.0.join("b.yaml")]);
        assert_eq!(names(&source), ["a", "b2", "c"]);
        assert_eq!(
            second.dirty.services,
            set(&[("default", "b"), ("default", "b2")])
        );

        // A removal is seen through its event.
        fs::remove_file(dir.0.join("a.yaml")).unwrap();
        source.completed(&dir.0.join("a.yaml"));
        let third = source.refresh(now).unwrap();
        assert_eq!(third.removed, [dir.0.join("a.yaml")]);
        assert_eq!(third.dirty.services, set(&[("default", "a")]));
        assert!(third.read.is_empty());

        // Lost events: the next refresh lists the directory and finds c.
        source.forget_stamps();
        let fourth = source.refresh(now).unwrap();
        assert!(fourth.listed);
        assert_eq!(names(&source), ["b2", "c2"]);
        assert_eq!(
            fourth.dirty.services,
            set(&[("default", "c"), ("default", "c2")])
        );
    }

    /// An event about a directory or a link that is not a manifest (a `ConfigMap` volume
    /// swapping `..data`) makes the next refresh list the directory: the files' links may
    /// point elsewhere.
    #[test]
    fn an_event_about_a_link_or_directory_lists_the_directory() {
        let dir = TempDir::new("configmap");
        let data = |version: &str| dir.0.join(format!("..{version}"));
        fs::create_dir(data("v1")).unwrap();
        fs::write(data("v1").join("svc.yaml"), service("one")).unwrap();
        std::os::unix::fs::symlink("..v1", dir.0.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/svc.yaml", dir.0.join("svc.yaml")).unwrap();
        let mut source = DirSource::new(&dir.0, Budget::DEFAULT);
        let now = Instant::now();
        source.refresh(now).unwrap();
        assert_eq!(names(&source), ["one"]);

        // What the kubelet does: a new version's directory, `..data` swapped by a rename.
        fs::create_dir(data("v2")).unwrap();
        fs::write(data("v2").join("svc.yaml"), service("two")).unwrap();
        std::os::unix::fs::symlink("..v2", dir.0.join("..data_tmp")).unwrap();
        fs::rename(dir.0.join("..data_tmp"), dir.0.join("..data")).unwrap();
        source.touched(&data("v2"));
        source.completed(&dir.0.join("..data_tmp"));
        source.completed(&dir.0.join("..data"));
        let refresh = source.refresh(now).unwrap();
        assert!(refresh.listed);
        assert_eq!(names(&source), ["two"]);
        assert_eq!(
            refresh.dirty.services,
            set(&[("default", "one"), ("default", "two")])
        );
    }

    /// The names a refresh reports dirty are those whose copies changed, whatever file they
    /// are in; an object in two files has both copies, in file name order.
    #[test]
    fn dirty_names_follow_the_objects_of_the_changed_files() {
        let dir = TempDir::new("dirty");
        let slice = |n: &str, ip: &str| {
            format!(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {n}\n  \
                 namespace: ns\n  labels:\n    kubernetes.io/service-name: s1\naddressType: IPv4\n\
                 endpoints:\n- addresses: [\"{ip}\"]\n"
            )
        };
        let pod = |n: &str, app: &str| {
            format!("apiVersion: v1\nkind: Pod\nmetadata:\n  name: {n}\n  labels: {{app: {app}}}\n")
        };
        let node = |zone: &str| {
            format!(
                "apiVersion: v1\nkind: Node\nmetadata:\n  name: node1\n  labels:\n    \
                 topology.kubernetes.io/zone: {zone}\n"
            )
        };
        let a = dir.0.join("a.yaml");
        let b = dir.0.join("b.yaml");
        let docs = |d: &[String]| d.join("---\n");
        fs::write(
            &a,
            docs(&[
                service("s1"),
                service("s2"),
                slice("e1", "198.18.0.1"),
                pod("p1", "web"),
            ]),
        )
        .unwrap();
        fs::write(&b, docs(&[service("s2"), node("z1")])).unwrap();
        let mut source = DirSource::new(&dir.0, Budget::DEFAULT);
        let now = Instant::now();
        let first = source.refresh(now).unwrap();
        assert_eq!(
            first.dirty,
            Dirty {
                services: set(&[("default", "s1"), ("default", "s2")]),
                slices: set(&[("ns", "e1")]),
                pods: set(&[("default", "p1")]),
                nodes: true,
            }
        );
        let s2 = name("default", "s2");
        assert_eq!(source.services(&s2).len(), 2, "one copy per file");

        // a.yaml rewritten: s1 gone, s2 the same, the slice and the Pod changed.
        replace_in(
            &mut source,
            &a,
            &docs(&[service("s2"), slice("e1", "198.18.0.2"), pod("p1", "db")]),
        );
        let second = source.refresh(now).unwrap();
        assert_eq!(
            second.dirty,
            Dirty {
                services: set(&[("default", "s1")]),
                slices: set(&[("ns", "e1")]),
                pods: set(&[("default", "p1")]),
                nodes: false,
            }
        );
        assert!(source.services(&name("default", "s1")).is_empty());
        let e1 = source.slices(&name("ns", "e1"));
        assert_eq!(e1.len(), 1);
        assert_eq!(e1[0].endpoints[0].address.as_deref(), Some("198.18.0.2"));

        // b.yaml's copy of s2 changes: s2 is dirty, with both copies, a's first.
        let other = service("s2").replace("198.19.0.1", "198.19.0.2");
        replace_in(&mut source, &b, &docs(&[other, node("z2")]));
        let third = source.refresh(now).unwrap();
        assert_eq!(third.dirty.services, set(&[("default", "s2")]));
        assert!(third.dirty.nodes);
        let copies = source.services(&s2);
        let ips: Vec<Option<&str>> = copies
            .iter()
            .map(|s| s.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()))
            .collect();
        assert_eq!(ips, [Some("198.19.0.1"), Some("198.19.0.2")]);

        // Rewritten with the same content: read, nothing dirty.
        let text = fs::read_to_string(&a).unwrap();
        replace_in(&mut source, &a, &text);
        let same = source.refresh(now).unwrap();
        assert_eq!(same.read.len(), 1);
        assert!(same.dirty.is_empty(), "{:?}", same.dirty);

        // b.yaml removed: its copy of s2 and the Node go.
        fs::remove_file(&b).unwrap();
        source.completed(&b);
        let fourth = source.refresh(now).unwrap();
        assert_eq!(fourth.dirty.services, set(&[("default", "s2")]));
        assert!(fourth.dirty.nodes);
        assert_eq!(source.services(&s2).len(), 1);
        assert!(source.nodes().is_empty());
    }

    #[test]
    fn a_broken_file_keeps_its_last_good_content() {
        let dir = TempDir::new("lastgood");
        let file = dir.0.join("svc.yaml");
        fs::write(&file, format!("{}---\n{}", service("one"), service("two"))).unwrap();
        let mut source = DirSource::new(&dir.0, Budget::DEFAULT);
        let now = Instant::now();
        source.refresh(now).unwrap();
        assert_eq!(names(&source), ["one", "two"]);

        // Cut off in the middle of the second document: a syntax error.
        replace_in(
            &mut source,
            &file,
            &format!("{}---\napiVersion: v1\nkind: [", service("one")),
        );
        let broken = source.refresh(now).unwrap();
        assert!(
            !broken.changed,
            "what the directory contributes is the same"
        );
        assert_eq!(broken.read.len(), 1);
        assert!(broken.read[0].kept_last_good);
        assert_eq!(broken.read[0].errors.len(), 1);
        assert!(
            broken.read[0].errors[0].to_string().contains("line "),
            "{}",
            broken.read[0].errors[0]
        );
        assert_eq!(
            names(&source),
            ["one", "two"],
            "still the last good version"
        );

        // The same broken version is not read (nor reported) again.
        assert_eq!(source.refresh(now).unwrap(), Refresh::default());

        replace_in(&mut source, &file, &service("three"));
        source.refresh(now).unwrap();
        assert_eq!(names(&source), ["three"]);
    }

    #[test]
    fn a_file_never_clean_serves_its_usable_documents() {
        let dir = TempDir::new("neverclean");
        let file = dir.0.join("svc.yaml");
        fs::write(&file, format!("{}---\nkind: [\n", service("ok"))).unwrap();
        let mut source = DirSource::new(&dir.0, Budget::DEFAULT);
        let refresh = source.refresh(Instant::now()).unwrap();
        assert!(!refresh.read[0].kept_last_good);
        assert_eq!(refresh.read[0].errors.len(), 1);
        assert_eq!(names(&source), ["ok"]);
    }

    #[test]
    fn a_file_being_written_is_read_when_closed_or_settled() {
        let dir = TempDir::new("writing");
        let file = dir.0.join("svc.yaml");
        fs::write(&file, service("old")).unwrap();
        let mut source = DirSource::new(&dir.0, Budget::DEFAULT);
        let start = Instant::now();
        source.refresh(start).unwrap();

        // A writer truncates the file and writes half of the new content.
        let mut writer = fs::File::create(&file).unwrap();
        writer.write_all(b"apiVersion: v1\nkind: Serv").unwrap();
        source.written(&file, start);
        let during = source.refresh(start).unwrap();
        assert_eq!(during.being_written, std::slice::from_ref(&file));
        assert!(!during.changed);
        assert_eq!(names(&source), ["old"]);
        assert_eq!(source.next_settle(), Some(start + WRITE_SETTLE));

        writer
            .write_all(b"ice\nmetadata:\n  name: new\nspec:\n  clusterIP: 198.19.0.1\n")
            .unwrap();
        drop(writer);
        source.completed(&file);
        source.refresh(start).unwrap();
        assert_eq!(names(&source), ["new"]);

        // A writer that never closes: read once it has been quiet for WRITE_SETTLE.
        let mut writer = fs::OpenOptions::new().append(true).open(&file).unwrap();
        writer.write_all(b"---\n").unwrap();
        writer.write_all(service("more").as_bytes()).unwrap();
        source.written(&file, start);
        assert!(!source.refresh(start).unwrap().changed);
        let later = source.refresh(start + WRITE_SETTLE).unwrap();
        assert!(later.changed);
        assert_eq!(names(&source), ["new", "more"]);
        assert_eq!(source.next_settle(), None);
    }

    /// A write event about a file whose version was already read leaves nothing to wait
    /// for: no settle timer stays behind (it would wake the loop forever), and a close seen
    /// before a later write in place does not make that write complete.
    #[test]
    fn write_events_about_a_file_already_read_leave_nothing_to_wait_for() {
        let dir = TempDir::new("stale");
        let file = dir.0.join("svc.yaml");
        fs::write(&file, service("one")).unwrap();
        let mut source = DirSource::new(&dir.0, Budget::DEFAULT);
        let start = Instant::now();
        source.refresh(start).unwrap();
        source.written(&file, start);
        assert_eq!(source.refresh(start).unwrap(), Refresh::default());
        assert_eq!(source.next_settle(), None);

        // Closed (nothing changed), then written in place again, half-way.
        source.completed(&file);
        let mut writer = fs::OpenOptions::new().append(true).open(&file).unwrap();
        writer
            .write_all(b"---\napiVersion: v1\nkind: Serv")
            .unwrap();
        source.written(&file, start);
        let during = source.refresh(start).unwrap();
        assert_eq!(during.being_written, std::slice::from_ref(&file));
        assert_eq!(names(&source), ["one"]);
        drop(writer);
    }

    #[test]
    fn a_file_over_budget_is_one_error_and_keeps_its_last_good_content() {
        let dir = TempDir::new("budget");
        let file = dir.0.join("svc.yaml");
        fs::write(&file, service("small")).unwrap();
        let budget = Budget {
            max_bytes: 4096,
            max_objects: 3,
            max_alias_replay: 1000,
        };
        let mut source = DirSource::new(&dir.0, budget);
        source.refresh(Instant::now()).unwrap();

        let many: Vec<String> = (0..4).map(|i| service(&format!("s{i}"))).collect();
        replace_in(&mut source, &file, &many.join("---\n"));
        let refresh = source.refresh(Instant::now()).unwrap();
        assert_eq!(refresh.read[0].errors.len(), 1);
        assert!(
            refresh.read[0].errors[0]
                .message
                .contains("more than 3 objects"),
            "{:?}",
            refresh.read[0].errors
        );
        assert!(refresh.read[0].kept_last_good);
        assert_eq!(names(&source), ["small"]);

        replace_in(&mut source, &file, &"# padding\n".repeat(500));
        let refresh = source.refresh(Instant::now()).unwrap();
        assert!(
            refresh.read[0].errors[0]
                .message
                .contains("larger than 4096 bytes"),
            "{:?}",
            refresh.read[0].errors
        );
        assert_eq!(names(&source), ["small"]);
    }

    #[test]
    fn forgotten_stamps_read_every_file_again() {
        let dir = TempDir::new("forget");
        fs::write(dir.0.join("a.yaml"), service("a")).unwrap();
        let mut source = DirSource::new(&dir.0, Budget::DEFAULT);
        source.refresh(Instant::now()).unwrap();
        source.forget_stamps();
        let refresh = source.refresh(Instant::now()).unwrap();
        assert_eq!(refresh.read.len(), 1);
        assert_eq!(names(&source), ["a"]);
    }
}
