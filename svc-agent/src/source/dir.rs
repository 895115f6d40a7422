//! A directory of manifests followed file by file (standalone mode).
//!
//! [`DirSource`] remembers, per file, its identity and timestamps (a [`Stamp`]) and what it
//! contributes; a refresh lists the directory, stats every manifest and parses only the files
//! whose stamp changed, so one edit costs one file's parse, not the directory's.
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

use std::{
    collections::{BTreeMap, HashMap},
    ffi::OsString,
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::Context as _;

use super::files::{Budget, DocumentError, Loaded, is_manifest, load_file};

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
    /// The files read, in name order.
    pub read: Vec<FileReport>,
    /// Files that stopped contributing.
    pub removed: Vec<PathBuf>,
    /// Files left unread because a writer has them open (see [`WRITE_SETTLE`]).
    pub being_written: Vec<PathBuf>,
}

/// A directory of manifests, read file by file (see the module documentation).
#[derive(Debug)]
pub struct DirSource {
    dir: PathBuf,
    budget: Budget,
    files: BTreeMap<OsString, FileState>,
    /// Files modified in place whose writer has not closed them, with the last write's time.
    writing: HashMap<PathBuf, Instant>,
    /// Files whose writer closed them (or that were renamed into place) since they were read.
    completed: std::collections::HashSet<PathBuf>,
    /// Whether a first refresh read the directory (it reads every file, whatever its age).
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
            writing: HashMap::new(),
            completed: std::collections::HashSet::new(),
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
        self.writing.insert(file.to_owned(), at);
    }

    /// Notes that `file` is complete: its writer closed it, it was renamed into place or it
    /// was removed.
    pub fn completed(&mut self, file: &Path) {
        self.writing.remove(file);
        self.completed.insert(file.to_owned());
    }

    /// When the oldest file left unread because it is being written may be read, if any.
    #[must_use]
    pub fn next_settle(&self) -> Option<Instant> {
        self.writing.values().min().map(|at| *at + WRITE_SETTLE)
    }

    /// Lists the directory and reads the manifests that changed since the last refresh.
    ///
    /// # Errors
    /// When the directory cannot be listed; nothing is forgotten then.
    pub fn refresh(&mut self, now: Instant) -> anyhow::Result<Refresh> {
        let entries = fs::read_dir(&self.dir)
            .with_context(|| format!("listing directory {}", self.dir.display()))?;
        // Keyed by file name (all files are in the directory): names compare as bytes, where
        // whole paths compare component by component (most of a pass's time at 10,000 files).
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
        let mut refresh = Refresh::default();
        let gone: Vec<OsString> = self
            .files
            .keys()
            .filter(|name| !present.contains_key(*name))
            .cloned()
            .collect();
        for name in gone {
            self.files.remove(&name);
            let path = self.dir.join(&name);
            self.writing.remove(&path);
            refresh.removed.push(path);
            refresh.changed = true;
        }
        self.writing.retain(|path, _| {
            path.file_name()
                .is_some_and(|name| present.contains_key(name))
        });
        // In name order, as before (reports and logs follow it).
        let mut present: Vec<(OsString, (PathBuf, Stamp))> = present.into_iter().collect();
        present.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        for (name, (path, stamp)) in present {
            if self.files.get(&name).is_some_and(|f| f.stamp == stamp) {
                continue;
            }
            if !self.completed.remove(&path) {
                if let Some(at) = self.writing.get(&path) {
                    if now.saturating_duration_since(*at) < WRITE_SETTLE {
                        refresh.being_written.push(path);
                        continue;
                    }
                    self.writing.remove(&path);
                } else if self.primed && modified_recently(&path) {
                    // Changed, but neither its writer's close nor a rename has been seen (the
                    // events may still be on their way): treated as being written.
                    self.writing.insert(path.clone(), now);
                    refresh.being_written.push(path);
                    continue;
                }
            }
            let report = self.read(name, &path, stamp);
            // A file that keeps its last good version contributes what it did.
            refresh.changed |= !report.kept_last_good;
            refresh.read.push(report);
        }
        self.primed = true;
        Ok(refresh)
    }

    /// Reads one file and applies the last-good rule.
    fn read(&mut self, name: OsString, path: &Path, stamp: Stamp) -> FileReport {
        let mut loaded = load_file(path, &self.budget);
        let errors = std::mem::take(&mut loaded.errors);
        let skipped = std::mem::take(&mut loaded.skipped)
            .into_iter()
            .map(|s| format!("{} {} ({})", s.api_version, s.kind, s.origin))
            .collect();
        let clean = errors.is_empty();
        let keep = !clean && self.files.get(&name).is_some_and(|f| f.clean);
        match self.files.get_mut(&name) {
            Some(state) if keep => state.stamp = stamp,
            _ => {
                self.files.insert(
                    name,
                    FileState {
                        stamp,
                        used: loaded,
                        clean,
                    },
                );
            }
        }
        FileReport {
            file: path.to_owned(),
            errors,
            skipped,
            kept_last_good: keep,
        }
    }

    /// Forgets every file's stamp so the next refresh reads them all again (after the
    /// directory was replaced or events were lost). What they contribute stays until then.
    pub fn forget_stamps(&mut self) {
        for state in self.files.values_mut() {
            state.stamp.len = u64::MAX;
        }
        // Events about them may be lost too: the next refresh reads every file as it is.
        self.primed = false;
    }

    /// Everything the directory contributes, in file name order.
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
        let third = source.refresh(now).unwrap();
        assert_eq!(third.removed, [dir.0.join("a.yaml")]);
        assert_eq!(names(&source), ["b2"]);
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
