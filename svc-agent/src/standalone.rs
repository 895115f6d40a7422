//! Standalone mode: the desired state comes from a directory of Kubernetes YAML/JSON files,
//! followed live. Only the files that changed are parsed again (`source::dir`, with its
//! last-good and files-being-written rules); a pass runs only when something the directory
//! contributes changed; bursts of events are coalesced (`--coalesce-ms`). A pass hands the
//! directory's objects to the incremental model (`model::Model::replace`: objects of unchanged
//! files are the same shared objects, so only Services whose objects changed are recomputed;
//! computed slices of selector Services are compared by content) and the reconciler writes only
//! the frontends that changed. The reconciler's retries (frontends waiting for room) and the
//! periodic audit (`--audit-interval`, `source::audit`) run from the same loop.
//!
//! The directory is watched with inotify (`notify`), and so is its parent, for the directory
//! itself: when it is replaced (`mv dir dir.old; mkdir dir`, a `ConfigMap` volume's swap of a
//! symbolic link), the watch moves to the new directory and every file is read again; when
//! the kernel's event queue overflowed (events were lost), every file is checked again.
//! Independently of events, the directory's identity is checked every [`IDENTITY_CHECK`].

use std::{
    collections::{BTreeMap, BTreeSet},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use notify::Watcher as _;
use tracing::{info, warn};

use crate::{
    datapath::{DatapathMaps, Reconciler},
    model,
    source::{Budget, dir::DirSource},
};

/// How often the directory's identity (device and inode) is checked without any event.
pub const IDENTITY_CHECK: Duration = Duration::from_secs(2);

/// The errors of one file logged in full; the rest are counted in one more line.
const ERRORS_LOGGED_PER_FILE: usize = 5;

/// A followed directory and what the last passes logged.
#[derive(Debug)]
pub struct Standalone {
    source: DirSource,
    node_name: String,
    coalesce: Duration,
    /// The desired state, kept Service by Service: a pass recomputes only the Services whose
    /// objects changed, and the reconciler writes only the frontends that changed.
    model: model::Model,
    /// Whether a pass has computed and applied the directory once.
    synced: bool,
    /// When the reconciler asked to be called again (something waits for room, or a write
    /// failed).
    retry_at: Option<Instant>,
    /// How often the audit runs (`None`: never), and when it runs next.
    audit_interval: Option<Duration>,
    audit_at: Option<Instant>,
    /// Lines logged by the last pass about objects (bad objects, selections, objects not
    /// programmed): each is logged when it appears, not on every pass.
    said: BTreeSet<String>,
    /// What the last computation from the directory's objects had to say (kept for passes
    /// that only retry).
    said_about_objects: Vec<String>,
    /// Each selector Service's selection as last logged.
    selections: BTreeMap<String, String>,
    /// The topology notes (hints this node ignores) of the last pass: each is logged (info)
    /// when it appears, not on every pass.
    topology_notes: BTreeSet<model::TopologyNote>,
}

impl Standalone {
    /// Follows `dir` for node `node_name`; `coalesce` is how long to wait for more changes
    /// after one arrives; every `audit_interval` the full computation and diff run as an
    /// audit (`source::audit`).
    #[must_use]
    pub fn new(
        dir: &Path,
        node_name: &str,
        coalesce: Duration,
        audit_interval: Option<Duration>,
    ) -> Self {
        Self {
            source: DirSource::new(dir, Budget::DEFAULT),
            node_name: node_name.to_owned(),
            coalesce,
            model: model::Model::new(node_name),
            synced: false,
            retry_at: None,
            audit_interval,
            audit_at: audit_interval.map(|i| Instant::now() + i),
            said: BTreeSet::new(),
            said_about_objects: Vec::new(),
            selections: BTreeMap::new(),
            topology_notes: BTreeSet::new(),
        }
    }

    /// Reads what changed in the directory and, when something did (or nothing was applied
    /// yet), hands the objects to the model and writes what changed; also retries what the
    /// reconciler asked to retry, and runs the audit when it is due.
    ///
    /// # Errors
    /// When the directory cannot be listed: nothing is applied, the last state stays.
    pub fn sync<M: DatapathMaps>(&mut self, rec: &mut Reconciler<M>) -> anyhow::Result<()> {
        let refresh = self.source.refresh(Instant::now())?;
        log_refresh(&refresh);
        let now = Instant::now();
        let retry = self.retry_at.is_some_and(|t| t <= now);
        let audit = self.audit_at.is_some_and(|t| t <= now);
        if self.synced && !refresh.changed && !retry && !audit {
            return Ok(());
        }
        let started = Instant::now();
        if audit && self.synced && !refresh.changed && !retry {
            // Nothing changed: only the audit (its own log line), no "synced" pass.
            self.audit_at = self.audit_interval.map(|i| now + i);
            let loaded = self.source.loaded();
            let mut said = Vec::new();
            let objects = self.with_pod_slices(&loaded, &mut said);
            let report =
                crate::source::audit::audit(&objects, &self.node_name, &mut self.model, rec);
            self.retry_at = report.retry_after.map(|d| now + d);
            return Ok(());
        }
        let computed = !self.synced || refresh.changed || audit;
        let report = if computed {
            let loaded = self.source.loaded();
            let mut said = Vec::new();
            let objects = self.with_pod_slices(&loaded, &mut said);
            self.said_about_objects = said;
            let mut report = if self.synced {
                let delta = self.model.replace(&objects);
                rec.apply_delta(self.model.state(), &delta)
            } else {
                self.model.replace(&objects);
                rec.apply(self.model.state())
            };
            if audit {
                // After the change is applied: the audit checks the result, not the change.
                self.audit_at = self.audit_interval.map(|i| now + i);
                let audit =
                    crate::source::audit::audit(&objects, &self.node_name, &mut self.model, rec);
                report.errors.extend(audit.errors);
                report.skipped = audit.skipped;
                report.retry_after = audit.retry_after;
            }
            report
        } else {
            rec.apply_delta(self.model.state(), &model::Delta::default())
        };
        self.retry_at = report.retry_after.map(|d| now + d);
        self.log_topology_notes();
        let mut said = self.said_about_objects.clone();
        for e in &self.model.state().errors {
            said.push(format!("skipped an object: {e}"));
        }
        for (key, why) in &report.skipped {
            if let Some(frontend) = self.model.state().frontends.get(key) {
                let svc = &frontend.service;
                said.push(format!(
                    "Service {}/{} port {:?} (frontend {key}) not programmed: {why}",
                    svc.namespace, svc.name, svc.port_name
                ));
            }
        }
        for e in &report.errors {
            said.push(format!("not programmed: {e}"));
        }
        self.say_new(said);
        info!(
            frontends = self.model.state().frontends.len(),
            files_read = refresh.read.len(),
            files_removed = refresh.removed.len(),
            recomputed = self.model.recomputed(),
            services_written = report.services_written,
            services_deleted = report.services_deleted,
            backends_written = report.backends_written,
            backends_deleted = report.backends_deleted,
            waiting = report.skipped.len(),
            retry_only = !computed,
            took_us = started.elapsed().as_micros(),
            "synced {}",
            self.source.dir().display()
        );
        self.synced = true;
        Ok(())
    }

    /// Logs (info) the topology notes (hints this node ignores) that appeared since the last
    /// pass.
    fn log_topology_notes(&mut self) {
        let notes = &self.model.state().topology_notes;
        if notes.len() == self.topology_notes.len()
            && notes.iter().all(|n| self.topology_notes.contains(n))
        {
            return;
        }
        let notes: BTreeSet<model::TopologyNote> = notes.iter().cloned().collect();
        for note in notes.difference(&self.topology_notes) {
            info!(service = %format!("{}/{}", note.namespace, note.name), "{note}");
        }
        self.topology_notes = notes;
    }

    /// When [`sync`](Self::sync) has something to do without any file event: a retry or the
    /// audit.
    fn next_timer(&self) -> Option<Instant> {
        match (self.retry_at, self.audit_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Logs the lines of this pass that the previous pass did not log; remembers this pass's.
    fn say_new(&mut self, said: Vec<String>) {
        let mut now = BTreeSet::new();
        for line in said {
            if !self.said.contains(&line) {
                warn!("{line}");
            }
            now.insert(line);
        }
        self.said = now;
    }

    /// The snapshot to compute from: the directory's Services and Nodes, with the slices of
    /// Services that have a selector computed from the directory's Pods (as the
    /// `EndpointSlice` controller would) and the hand-written slices of the others. Logs the
    /// selections that changed; collects what to say about ignored slices and unusable Pods.
    fn with_pod_slices(
        &mut self,
        loaded: &crate::source::Loaded,
        said: &mut Vec<String>,
    ) -> model::Snapshot {
        let computed = model::slices_from_pods(
            &loaded.snapshot.services,
            &loaded.pods,
            &loaded.snapshot.slices,
            &loaded.snapshot.nodes,
        );
        for ignored in &computed.ignored_slices {
            said.push(format!(
                "{ignored} (slice {}/{})",
                ignored.namespace, ignored.slice
            ));
        }
        for e in &computed.errors {
            said.push(format!("skipped an object: {e}"));
        }
        let mut selections = BTreeMap::new();
        for selection in &computed.selections {
            let service = format!("{}/{}", selection.namespace, selection.name);
            let text = selection.to_string();
            if self.selections.get(&service) != Some(&text) {
                info!(
                    service = %service,
                    selector = %selection.selector,
                    pods = %selection.pods.join(","),
                    "selected {selection}"
                );
            }
            selections.insert(service, text);
        }
        self.selections = selections;
        model::Snapshot {
            services: loaded.snapshot.services.clone(),
            slices: computed.slices,
            nodes: loaded.snapshot.nodes.clone(),
        }
    }

    /// Syncs after every change of the directory, until the task is dropped. Call after a
    /// first [`sync`](Self::sync): the watch starts here, and a first pass here finds nothing
    /// changed unless something did meanwhile.
    ///
    /// # Errors
    /// When the directory cannot be watched at the start.
    pub async fn follow<M: DatapathMaps>(&mut self, rec: &mut Reconciler<M>) -> anyhow::Result<()> {
        let dir = self.source.dir().to_owned();
        let events = Arc::new(Mutex::new(Pending::default()));
        let wake = Arc::new(tokio::sync::Notify::new());
        let mut watcher = {
            let events = Arc::clone(&events);
            let wake = Arc::clone(&wake);
            let dir = dir.clone();
            notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
                let mut pending = events
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                // The watcher's own failure: check everything.
                let relevant = if let Ok(e) = ev {
                    pending.note(&e, &dir, Instant::now())
                } else {
                    pending.rescan = true;
                    true
                };
                drop(pending);
                // Reads (the agent's own included) and other events that change nothing do not
                // wake the loop.
                if relevant {
                    wake.notify_one();
                }
            })
            .context("starting the directory watcher")?
        };
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            // Best effort: without it, a replaced directory is found by the periodic check.
            if let Err(e) = watcher.watch(parent, notify::RecursiveMode::NonRecursive) {
                warn!(dir = %parent.display(), error = %e, "cannot watch the directory's parent; a replaced directory is found within {IDENTITY_CHECK:?}");
            }
        }
        let mut identity_watched = watch_dir(&mut watcher, &dir)?;
        let mut next_identity_check = Instant::now() + IDENTITY_CHECK;
        loop {
            let deadline = [self.source.next_settle(), self.next_timer()]
                .into_iter()
                .flatten()
                .fold(next_identity_check, Instant::min);
            tokio::select! {
                () = wake.notified() => {
                    // More changes usually follow the first: take them in the same pass.
                    tokio::time::sleep(self.coalesce).await;
                }
                () = tokio::time::sleep_until(deadline.into()) => {}
            }
            let pending = std::mem::take(
                &mut *events
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
            );
            for (file, write) in pending.files {
                match write {
                    Write::Modified(at) => self.source.written(&file, at),
                    Write::Completed => self.source.completed(&file),
                }
            }
            if pending.rescan {
                info!(dir = %dir.display(), "directory events were lost (queue overflow): checking every file");
                self.source.forget_stamps();
            }
            if pending.identity || Instant::now() >= next_identity_check {
                next_identity_check = Instant::now() + IDENTITY_CHECK;
                let now = identity(&dir);
                if now != identity_watched {
                    let _ = watcher.unwatch(&dir);
                    match watch_dir(&mut watcher, &dir) {
                        Ok(id) => {
                            info!(dir = %dir.display(), "the directory was replaced: watching the new one and reading every file");
                            identity_watched = id;
                            self.source.forget_stamps();
                        }
                        Err(e) => {
                            identity_watched = None;
                            warn!(error = %format!("{e:#}"), "the directory is gone; keeping the last programmed state");
                            continue;
                        }
                    }
                }
            }
            if let Err(e) = self.sync(rec) {
                warn!(error = %format!("{e:#}"), "sync failed; keeping the last programmed state");
            }
        }
    }
}

/// Logs what a refresh read: each file's errors (bounded), skipped kinds, kept content.
fn log_refresh(refresh: &crate::source::dir::Refresh) {
    for file in &refresh.read {
        for e in file.errors.iter().take(ERRORS_LOGGED_PER_FILE) {
            warn!(error = %e, "skipped a document");
        }
        if file.errors.len() > ERRORS_LOGGED_PER_FILE {
            warn!(
                file = %file.file.display(),
                "{} more documents of this file could not be used",
                file.errors.len() - ERRORS_LOGGED_PER_FILE
            );
        }
        if file.kept_last_good {
            warn!(
                file = %file.file.display(),
                errors = file.errors.len(),
                "the file has errors: it keeps serving its last good version until it is fixed or removed"
            );
        }
        if !file.skipped.is_empty() {
            info!(
                file = %file.file.display(),
                objects = %file.skipped.join(", "),
                "skipped {} objects of kinds svc does not use (documentation only)",
                file.skipped.len()
            );
        }
    }
    for file in &refresh.being_written {
        info!(file = %file.display(), "the file is being written: read when its writer closes it");
    }
    for file in &refresh.removed {
        info!(file = %file.display(), "the file was removed: its objects go");
    }
}

/// The directory's device and inode, if it exists.
fn identity(dir: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(dir)
        .ok()
        .filter(std::fs::Metadata::is_dir)
        .map(|m| (m.dev(), m.ino()))
}

/// Watches `dir` (not its subdirectories); its identity.
fn watch_dir(watcher: &mut impl notify::Watcher, dir: &Path) -> anyhow::Result<Option<(u64, u64)>> {
    watcher
        .watch(dir, notify::RecursiveMode::NonRecursive)
        .with_context(|| format!("watching {}", dir.display()))?;
    Ok(identity(dir))
}

/// What a file's events say about its writer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Write {
    /// Modified in place at this time; its writer may still have it open.
    Modified(Instant),
    /// Closed after writing, renamed into place or removed: complete.
    Completed,
}

/// Events noted since the last pass.
#[derive(Debug, Default)]
struct Pending {
    /// Per file, the last word on its writer.
    files: BTreeMap<PathBuf, Write>,
    /// Events were lost: check every file.
    rescan: bool,
    /// The directory itself was created, removed or renamed: check its identity.
    identity: bool,
}

impl Pending {
    /// Notes one event about `dir` or its parent; whether it can change anything (a read, an
    /// open, a change of the parent's other entries cannot).
    fn note(&mut self, e: &notify::Event, dir: &Path, at: Instant) -> bool {
        use notify::{
            EventKind,
            event::{AccessKind, AccessMode, ModifyKind},
        };
        let mut relevant = false;
        if e.need_rescan() {
            self.rescan = true;
            relevant = true;
        }
        for path in &e.paths {
            if path == dir {
                self.identity = true;
                relevant = true;
                continue;
            }
            if path.parent() != Some(dir) {
                // The parent's other entries.
                continue;
            }
            match e.kind {
                EventKind::Modify(ModifyKind::Data(_) | ModifyKind::Any) => {
                    self.files.insert(path.clone(), Write::Modified(at));
                    relevant = true;
                }
                EventKind::Access(AccessKind::Close(AccessMode::Write))
                | EventKind::Modify(ModifyKind::Name(_))
                | EventKind::Remove(_) => {
                    self.files.insert(path.clone(), Write::Completed);
                    relevant = true;
                }
                // A new file (created empty, or a hard link), its metadata: read at the next
                // pass either way.
                EventKind::Create(_) | EventKind::Modify(_) => relevant = true,
                _ => {}
            }
        }
        relevant
    }
}

#[cfg(test)]
mod tests {
    use notify::{
        Event, EventKind, Watcher as _,
        event::{AccessKind, AccessMode, CreateKind, DataChange, Flag, ModifyKind, RenameMode},
    };

    use super::*;

    fn event(kind: EventKind, path: &str) -> Event {
        Event::new(kind).add_path(PathBuf::from(path))
    }

    #[test]
    fn events_say_which_files_are_being_written() {
        let dir = Path::new("/d");
        let at = Instant::now();
        let mut p = Pending::default();
        p.note(
            &event(
                EventKind::Modify(ModifyKind::Data(DataChange::Any)),
                "/d/a.yaml",
            ),
            dir,
            at,
        );
        p.note(
            &event(
                EventKind::Modify(ModifyKind::Data(DataChange::Any)),
                "/d/b.yaml",
            ),
            dir,
            at,
        );
        p.note(
            &event(
                EventKind::Access(AccessKind::Close(AccessMode::Write)),
                "/d/b.yaml",
            ),
            dir,
            at,
        );
        p.note(
            &event(
                EventKind::Modify(ModifyKind::Name(RenameMode::To)),
                "/d/c.yaml",
            ),
            dir,
            at,
        );
        // Reads and creations say nothing about a writer; the parent's other entries are
        // not ours.
        p.note(
            &event(
                EventKind::Access(AccessKind::Close(AccessMode::Read)),
                "/d/d.yaml",
            ),
            dir,
            at,
        );
        p.note(
            &event(EventKind::Create(CreateKind::File), "/d/e.yaml"),
            dir,
            at,
        );
        p.note(
            &event(
                EventKind::Modify(ModifyKind::Data(DataChange::Any)),
                "/other/x.yaml",
            ),
            dir,
            at,
        );
        let files: Vec<(&str, Write)> = p
            .files
            .iter()
            .map(|(f, w)| (f.to_str().unwrap(), *w))
            .collect();
        assert_eq!(
            files,
            [
                ("/d/a.yaml", Write::Modified(at)),
                ("/d/b.yaml", Write::Completed),
                ("/d/c.yaml", Write::Completed),
            ]
        );
        assert!(!p.rescan && !p.identity);

        p.note(&event(EventKind::Create(CreateKind::Folder), "/d"), dir, at);
        assert!(p.identity);
        p.note(
            &Event::new(EventKind::Other).set_flag(Flag::Rescan),
            dir,
            at,
        );
        assert!(p.rescan);
    }

    /// The watcher the agent uses reports what [`Pending::note`] expects from a real writer:
    /// writes in place, then the close.
    #[test]
    fn inotify_reports_writes_and_the_close() {
        let dir = std::env::temp_dir().join(format!("svc-standalone-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let mut watcher = notify::recommended_watcher(move |e| {
            let _ = tx.send(e);
        })
        .unwrap();
        watcher
            .watch(&dir, notify::RecursiveMode::NonRecursive)
            .unwrap();
        let file = dir.join("a.yaml");
        let mut p = Pending::default();
        {
            use std::io::Write as _;
            let mut f = std::fs::File::create(&file).unwrap();
            f.write_all(b"apiVersion: v1\n").unwrap();
            f.sync_all().unwrap();
            let deadline = Instant::now() + Duration::from_secs(5);
            while !p.files.contains_key(&file) && Instant::now() < deadline {
                if let Ok(Ok(e)) = rx.recv_timeout(Duration::from_millis(100)) {
                    p.note(&e, &dir, Instant::now());
                }
            }
            assert!(
                matches!(p.files.get(&file), Some(Write::Modified(_))),
                "{:?}",
                p.files
            );
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while p.files.get(&file) != Some(&Write::Completed) && Instant::now() < deadline {
            if let Ok(Ok(e)) = rx.recv_timeout(Duration::from_millis(100)) {
                p.note(&e, &dir, Instant::now());
            }
        }
        assert_eq!(p.files.get(&file), Some(&Write::Completed));
        drop(watcher);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
