//! Standalone mode: the desired state comes from a directory of Kubernetes YAML/JSON files,
//! followed live, and a change costs what it changes, not what the directory holds:
//! - `source::dir` stats and parses only the files the watch's events named (with its
//!   last-good and files-being-written rules) and says which objects changed, by kind,
//!   namespace and name;
//! - the `EndpointSlice` controller's part (Services over Pods, `model::PodSlicer`) computes
//!   again only the slices of the selector Services whose Service changed or that a changed
//!   Pod matches (before or after the change);
//! - the incremental model is handed only the changed objects (`model::Model::set_*`, then
//!   `update`) and recomputes only their Services; the reconciler writes only the frontends
//!   that changed.
//!
//! The first pass, and a pass after the directory was listed again (it was replaced, events
//! were lost), hand the model the whole object set (`model::Model::replace`). A pass runs only
//! when something the directory contributes changed; bursts of events are coalesced
//! (`--coalesce-ms`). The reconciler's retries (frontends waiting for room) and the periodic
//! audit (`--audit-interval`, `source::audit`: the full computation from the files, Services
//! over Pods included, against the incremental state and the maps) run from the same loop.
//! After the first pass and each pass that changed them, the health-check node ports go to
//! their server (`healthcheck`, [`Standalone::serve_health_checks`]).
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
use tokio::sync::watch;
use tracing::{info, warn};

use crate::{
    datapath::{DatapathMaps, ReconcileReport, Reconciler, ReconcilerHandle},
    healthcheck::Publisher,
    hostaddrs::HostAddresses,
    metrics::{PassKind, Recorder},
    model,
    source::{
        Budget,
        dir::{DirSource, Refresh},
    },
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
    /// The slices of Services with a selector, computed from the Pods (the `EndpointSlice`
    /// controller's part), kept Service by Service, and the hand-written slices of the others.
    slicer: model::PodSlicer,
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
    /// The watch on the directory, from the first [`sync`](Self::sync) on.
    watch: Option<Watch>,
    /// Each selector Service's selection as last logged.
    selections: BTreeMap<String, String>,
    /// The topology notes (hints this node ignores) of the last pass: each is logged (info)
    /// when it appears, not on every pass.
    topology_notes: BTreeSet<model::TopologyNote>,
    /// Where passes and changes are reported (metrics, health).
    metrics: Recorder,
    /// Where the health-check node ports go after a pass that changed them (`None`: not
    /// served).
    health_checks: Option<Publisher>,
    /// The node-facing interfaces' addresses (`hostaddrs`), when followed.
    host_addresses: Option<watch::Receiver<HostAddresses>>,
}

impl Standalone {
    /// `NodePort`s listen on the node addresses `which` picks (`--nodeport-addresses`; the
    /// default: every node address).
    #[must_use]
    pub fn with_nodeport_addresses(mut self, which: model::NodePortAddresses) -> Self {
        self.model = model::Model::with_nodeport_addresses(&self.node_name, which);
        self
    }

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
            slicer: model::PodSlicer::new(),
            model: model::Model::new(node_name),
            synced: false,
            retry_at: None,
            audit_interval,
            audit_at: audit_interval.map(|i| Instant::now() + i),
            said: BTreeSet::new(),
            said_about_objects: Vec::new(),
            watch: None,
            selections: BTreeMap::new(),
            topology_notes: BTreeSet::new(),
            metrics: Recorder::default(),
            health_checks: None,
            host_addresses: None,
        }
    }

    /// Serves `NodePort`s on the addresses of the node-facing interfaces too, as `addresses`
    /// follows them (`hostaddrs::follow`): a change is a pass of its own, which recomputes
    /// only the Services with node ports.
    pub fn follow_host_addresses(&mut self, addresses: watch::Receiver<HostAddresses>) {
        self.host_addresses = Some(addresses);
    }

    /// Hands the model the node-facing interfaces' addresses when they changed since the last
    /// call; returns whether they did.
    fn take_host_addresses(&mut self) -> bool {
        let Some(rx) = &mut self.host_addresses else {
            return false;
        };
        let now = Arc::clone(&rx.borrow_and_update());
        if *now == self.model.host_addresses() {
            return false;
        }
        self.model.set_host_addresses(now.to_vec());
        true
    }

    /// Reports passes and changes to `metrics` from now on.
    pub fn report_to(&mut self, metrics: Recorder) {
        self.metrics = metrics;
    }

    /// Hands the health-check node ports to `publisher` after the first pass and after each
    /// pass that changed them (`healthcheck`).
    pub fn serve_health_checks(&mut self, publisher: Publisher) {
        self.health_checks = Some(publisher);
    }

    /// Publishes the model's health checks (a cheap comparison when they did not change).
    fn publish_health_checks(&self) {
        if let Some(publisher) = &self.health_checks {
            publisher.publish_from(&self.model);
        }
    }

    /// Reads what changed in the directory and, when something did (or nothing was applied
    /// yet), hands the changed objects to the model and writes what changed; also retries
    /// what the reconciler asked to retry, and runs the audit when it is due.
    ///
    /// The first call starts the watch on the directory (before reading it, so a change made
    /// from then on has its event; [`follow`](Self::follow) takes the events).
    ///
    /// # Errors
    /// When the directory cannot be listed, or (the first call) watched: nothing is applied,
    /// the last state stays. When the reconciler could not be built (the first call).
    pub fn sync<M: DatapathMaps>(
        &mut self,
        handle: &mut impl ReconcilerHandle<M>,
    ) -> anyhow::Result<()> {
        self.watch()?;
        let refresh = self.source.refresh(Instant::now())?;
        log_refresh(&refresh);
        let hosts = self.take_host_addresses();
        let now = Instant::now();
        let retry = self.retry_at.is_some_and(|t| t <= now);
        let audit = self.audit_at.is_some_and(|t| t <= now);
        let changed = refresh.changed || hosts;
        if self.synced && !changed && !retry && !audit {
            return Ok(());
        }
        let started = Instant::now();
        if audit && self.synced && !changed && !retry {
            // Nothing changed: only the audit (its own log line), no "synced" pass.
            self.audit_at = self.audit_interval.map(|i| now + i);
            let rec = handle.reconciler()?;
            let report = self.audit(rec);
            self.retry_at = report.retry_after.map(|d| now + d);
            let bad = self.model.state().errors.len() + self.slicer.errors().len();
            // The audit may have rebuilt the model.
            self.publish_health_checks();
            self.metrics
                .pass(PassKind::Audit, started.elapsed(), rec, bad);
            return Ok(());
        }
        let computed = !self.synced || changed;
        // Computed before the reconciler is asked for: at the start, its maps may still be
        // being created meanwhile.
        let delta = computed.then(|| self.compute(&refresh));
        let health_checks_changed =
            !self.synced || audit || hosts || delta.as_ref().is_some_and(|d| d.health_checks);
        let rec = handle.reconciler()?;
        let mut report = match delta {
            Some(delta) if self.synced => rec.apply_delta(self.model.state(), &delta),
            Some(_) => rec.apply(self.model.state()),
            None => rec.apply_delta(self.model.state(), &model::Delta::default()),
        };
        if audit {
            // After the change is applied: the audit checks the result, not the change.
            self.audit_at = self.audit_interval.map(|i| now + i);
            let audit = self.audit(rec);
            report.errors.extend(audit.errors);
            report.skipped = audit.skipped;
            report.retry_after = audit.retry_after;
        }
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
            listed = refresh.listed,
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
        let kind = match (audit, !self.synced || refresh.listed) {
            (true, _) => PassKind::Audit,
            (false, true) => PassKind::Full,
            (false, false) => PassKind::Incremental,
        };
        if health_checks_changed {
            self.publish_health_checks();
        }
        let bad = self.model.state().errors.len() + self.slicer.errors().len();
        self.metrics.pass(kind, started.elapsed(), rec, bad);
        self.synced = true;
        Ok(())
    }

    /// Hands what `refresh` changed to the Services-over-Pods computation and the model;
    /// returns what changed in the desired state. The first pass, and one after the
    /// directory was listed again, hand the model the whole object set.
    fn compute(&mut self, refresh: &Refresh) -> model::Delta {
        let dirty = &refresh.dirty;
        for name in &dirty.services {
            (self.slicer).set_service(&name.0, &name.1, &self.source.services(name));
        }
        for name in &dirty.pods {
            (self.slicer).set_pod(&name.0, &name.1, &self.source.pods(name));
        }
        for name in &dirty.slices {
            self.slicer.slice_changed(&name.0, &name.1);
        }
        if dirty.nodes {
            self.slicer.set_nodes(self.source.nodes());
        }
        let changes = self.slicer.update(&self.source);
        self.metrics
            .changes(dirty.services.len(), changes.slices.len());
        if refresh.listed && self.synced {
            self.metrics.relisted("directory");
        }
        self.log_selections(&changes);
        self.said_about_objects = self.said_about_pods();

        if !self.synced || refresh.listed {
            return self.model.replace(&model::Snapshot {
                services: self.source.all_services(),
                slices: self.slicer.slices(&self.source),
                nodes: self.source.nodes(),
            });
        }
        for name in &dirty.services {
            let copies = self.source.services(name);
            self.model.set_service_copies(&name.0, &name.1, copies);
        }
        for (namespace, name) in &changes.slices {
            let copies = self.slicer.slice_copies(namespace, name, &self.source);
            self.model.set_slice_copies(namespace, name, copies);
        }
        if dirty.nodes {
            self.model.set_nodes(self.source.nodes());
        }
        self.model.update()
    }

    /// The periodic audit (`source::audit`): the desired state computed from scratch from the
    /// files (Services over Pods by [`model::slices_from_pods`]) against the model and the
    /// maps. What the Services-over-Pods computation says (errors, ignored slices,
    /// selections) is checked against the same oracle.
    fn audit<M: DatapathMaps>(&mut self, rec: &mut Reconciler<M>) -> ReconcileReport {
        let loaded = self.source.loaded();
        let computed = model::slices_from_pods(
            &loaded.snapshot.services,
            &loaded.pods,
            &loaded.snapshot.slices,
            &loaded.snapshot.nodes,
        );
        if computed.errors != self.slicer.errors()
            || computed.ignored_slices != self.slicer.ignored_slices()
            || computed.selections != self.slicer.selections()
        {
            warn!(
                "audit: the Services-over-Pods computation drifted from the full computation \
                 (errors, ignored slices or selections)"
            );
        }
        let oracle = model::Snapshot {
            services: loaded.snapshot.services,
            slices: computed.slices,
            nodes: loaded.snapshot.nodes,
        };
        crate::source::audit::audit(
            &oracle,
            &self.node_name,
            &mut self.model,
            rec,
            &self.metrics,
        )
    }

    /// Logs the selections that changed; forgets those of Services that no longer select.
    fn log_selections(&mut self, changes: &model::PodSliceChanges) {
        for (namespace, name) in &changes.unselected {
            self.selections.remove(&format!("{namespace}/{name}"));
        }
        for selection in &changes.selections {
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
            self.selections.insert(service, text);
        }
    }

    /// What to say about ignored hand-written slices and unusable Pods.
    fn said_about_pods(&self) -> Vec<String> {
        let ignored =
            self.slicer.ignored_slices().into_iter().map(|ignored| {
                format!("{ignored} (slice {}/{})", ignored.namespace, ignored.slice)
            });
        let errors = (self.slicer.errors().iter()).map(|e| format!("skipped an object: {e}"));
        ignored.chain(errors).collect()
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

    /// Syncs after every change of the directory, until the task is dropped. Call after a
    /// first [`sync`](Self::sync), which started the watch before it read the directory: a
    /// change made since has its event.
    ///
    /// # Errors
    /// When the directory cannot be watched at the start.
    pub async fn follow<M: DatapathMaps>(&mut self, rec: &mut Reconciler<M>) -> anyhow::Result<()> {
        let dir = self.source.dir().to_owned();
        let (events, wake) = {
            let watch = self.watch()?;
            (Arc::clone(&watch.events), Arc::clone(&watch.wake))
        };
        let mut next_identity_check = Instant::now() + IDENTITY_CHECK;
        loop {
            let deadline = [self.source.next_settle(), self.next_timer()]
                .into_iter()
                .flatten()
                .fold(next_identity_check, Instant::min);
            tokio::select! {
                () = wake.notified() => {
                    self.metrics.queued();
                    // More changes usually follow the first: take them in the same pass.
                    tokio::time::sleep(self.coalesce).await;
                }
                () = host_addresses_changed(self.host_addresses.as_mut()) => {
                    self.metrics.queued();
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
            for file in pending.touched {
                self.source.touched(&file);
            }
            if pending.rescan {
                info!(dir = %dir.display(), "directory events were lost (queue overflow): checking every file");
                self.source.forget_stamps();
            }
            if pending.identity || Instant::now() >= next_identity_check {
                next_identity_check = Instant::now() + IDENTITY_CHECK;
                let watch = self.watch()?;
                let now = identity(&dir);
                if now != watch.identity {
                    let _ = watch.watcher.unwatch(&dir);
                    match watch_dir(&mut watch.watcher, &dir) {
                        Ok(id) => {
                            info!(dir = %dir.display(), "the directory was replaced: watching the new one and reading every file");
                            watch.identity = id;
                            self.source.forget_stamps();
                        }
                        Err(e) => {
                            watch.identity = None;
                            warn!(error = %format!("{e:#}"), "the directory is gone; keeping the last programmed state");
                            continue;
                        }
                    }
                }
            }
            match self.sync(rec) {
                Ok(()) => self.metrics.up_to_date(),
                Err(e) => {
                    warn!(error = %format!("{e:#}"), "sync failed; keeping the last programmed state");
                }
            }
        }
    }

    /// The directory's watch, started if it is not yet.
    ///
    /// # Errors
    /// When the directory cannot be watched.
    fn watch(&mut self) -> anyhow::Result<&mut Watch> {
        let watch = match self.watch.take() {
            Some(watch) => watch,
            None => Watch::start(self.source.dir())?,
        };
        Ok(self.watch.insert(watch))
    }
}

/// Returns when the node-facing interfaces' addresses changed (never without a receiver, or
/// once its sender is gone).
async fn host_addresses_changed(rx: Option<&mut watch::Receiver<HostAddresses>>) {
    if let Some(rx) = rx
        && rx.changed().await.is_ok()
    {
        return;
    }
    std::future::pending::<()>().await;
}

/// The watch on the directory (and its parent) and what its events noted since the last pass.
struct Watch {
    watcher: notify::RecommendedWatcher,
    events: Arc<Mutex<Pending>>,
    /// Woken by an event that can change something.
    wake: Arc<tokio::sync::Notify>,
    /// The identity (device, inode) of the directory watched.
    identity: Option<(u64, u64)>,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl Watch {
    /// Watches `dir` and its parent (best effort).
    fn start(dir: &Path) -> anyhow::Result<Self> {
        let events = Arc::new(Mutex::new(Pending::default()));
        let wake = Arc::new(tokio::sync::Notify::new());
        let mut watcher = {
            let events = Arc::clone(&events);
            let wake = Arc::clone(&wake);
            let dir = dir.to_owned();
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
        let identity = watch_dir(&mut watcher, dir)?;
        Ok(Self {
            watcher,
            events,
            wake,
            identity,
        })
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
    /// Entries named by events that say nothing about a writer (created, metadata changed):
    /// the next refresh looks at them too.
    touched: BTreeSet<PathBuf>,
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
                // A new file (created empty, or a hard link; a directory or link: see
                // `DirSource::refresh`), its metadata: looked at by the next pass.
                EventKind::Create(_) | EventKind::Modify(_) => {
                    self.touched.insert(path.clone());
                    relevant = true;
                }
                _ => {}
            }
        }
        relevant
    }
}

#[cfg(test)]
mod tests {
    use std::fmt::Write as _;

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
        let touched: Vec<&Path> = p.touched.iter().map(PathBuf::as_path).collect();
        assert_eq!(touched, [Path::new("/d/e.yaml")]);

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

    /// A directory edited file by file, with its events.
    struct Dir(PathBuf);

    impl Dir {
        fn new(name: &str) -> Self {
            let path = std::env::temp_dir().join(format!(
                "svc-standalone-{name}-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = std::fs::remove_dir_all(&path);
            std::fs::create_dir_all(&path).unwrap();
            Self(path)
        }

        /// Writes `file` (renamed into place) and tells `standalone`, as the watch would.
        fn write(&self, standalone: &mut Standalone, file: &str, docs: &[String]) {
            let path = self.0.join(file);
            let tmp = self.0.join(format!(".{file}.tmp"));
            std::fs::write(&tmp, docs.join("---\n")).unwrap();
            std::fs::rename(&tmp, &path).unwrap();
            standalone.source.completed(&path);
            standalone.source.completed(&tmp);
        }

        fn remove(&self, standalone: &mut Standalone, file: &str) {
            let path = self.0.join(file);
            std::fs::remove_file(&path).unwrap();
            standalone.source.completed(&path);
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn svc(name: &str, ip: &str, selector: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  clusterIP: {ip}\n\
             {selector}  ports:\n  - {{name: http, port: 80, targetPort: 8080}}\n"
        )
    }

    fn slice(name: &str, service: &str, ips: &[&str]) -> String {
        let endpoints = ips.iter().fold(String::new(), |mut out, ip| {
            let _ = writeln!(
                out,
                "- addresses: [\"{ip}\"]\n  conditions: {{ready: true}}"
            );
            out
        });
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  \
             labels:\n    kubernetes.io/service-name: {service}\naddressType: IPv4\nendpoints:\n\
             {endpoints}ports:\n- {{name: http, port: 8080}}\n"
        )
    }

    fn pod(name: &str, app: &str, ip: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  labels: {{app: {app}}}\n\
             spec:\n  nodeName: node1\n  containers: []\nstatus:\n  phase: Running\n  podIP: {ip}\n  \
             conditions:\n  - {{type: Ready, status: \"True\"}}\n"
        )
    }

    fn node(zone: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: node1\n  labels:\n    \
             topology.kubernetes.io/zone: {zone}\n"
        )
    }

    /// One pass's computation (no maps); checks the model against the full computation from
    /// the files and returns the refresh.
    fn pass(standalone: &mut Standalone) -> Refresh {
        let refresh = standalone.source.refresh(Instant::now()).unwrap();
        standalone.compute(&refresh);
        standalone.synced = true;
        let loaded = standalone.source.loaded();
        let computed = model::slices_from_pods(
            &loaded.snapshot.services,
            &loaded.pods,
            &loaded.snapshot.slices,
            &loaded.snapshot.nodes,
        );
        let oracle = model::compute(
            &model::Snapshot {
                services: loaded.snapshot.services,
                slices: computed.slices,
                nodes: loaded.snapshot.nodes,
            },
            "node1",
        );
        assert_eq!(standalone.model.state(), &oracle);
        assert_eq!(standalone.slicer.errors(), &computed.errors[..]);
        assert_eq!(standalone.slicer.selections(), computed.selections);
        refresh
    }

    /// The health-check node ports are published after the first pass and after each pass
    /// that changed them (a count included), not after the others.
    #[test]
    fn passes_publish_the_health_check_ports_when_they_change() {
        let dir = Dir::new("health-checks");
        let mut s = Standalone::new(&dir.0, "node1", Duration::ZERO, None);
        let (publisher, mut rx) = crate::healthcheck::Publisher::channel();
        s.serve_health_checks(publisher);
        let mut rec = Reconciler::adopt(crate::datapath::apply::tests::FakeMaps::default())
            .expect("fake maps");
        let lb = "apiVersion: v1\nkind: Service\nmetadata:\n  name: lb\nspec:\n  \
                  clusterIP: 198.19.0.9\n  type: LoadBalancer\n  externalTrafficPolicy: Local\n  \
                  healthCheckNodePort: 32000\n  ports:\n  - {name: http, port: 80, \
                  targetPort: 8080, nodePort: 30080}\n";
        let local = |ready: bool| {
            format!(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: lb-1\n  \
                 labels:\n    kubernetes.io/service-name: lb\naddressType: IPv4\nendpoints:\n\
                 - addresses: [\"198.18.1.10\"]\n  conditions: {{ready: {ready}}}\n  nodeName: node1\n\
                 ports:\n- {{name: http, port: 8080}}\n"
            )
        };
        dir.write(&mut s, "lb.yaml", &[lb.to_owned(), local(true)]);
        dir.write(&mut s, "node.yaml", &[node("z1")]);
        s.sync(&mut rec).unwrap();
        assert!(rx.has_changed().unwrap(), "the first pass publishes");
        let checks = rx.borrow_and_update().clone();
        assert_eq!(checks.len(), 1);
        assert_eq!(
            (&*checks[&32000].name, checks[&32000].local_endpoints),
            ("lb", 1)
        );
        // Another Service changes: nothing to publish.
        dir.write(&mut s, "a.yaml", &[svc("a", "198.19.0.1", "")]);
        s.sync(&mut rec).unwrap();
        assert!(!rx.has_changed().unwrap());
        // The local endpoint turns not ready: the count goes to 0.
        dir.write(&mut s, "lb.yaml", &[lb.to_owned(), local(false)]);
        s.sync(&mut rec).unwrap();
        assert!(rx.has_changed().unwrap());
        assert_eq!(rx.borrow_and_update()[&32000].local_endpoints, 0);
        // The Service goes: no port.
        dir.remove(&mut s, "lb.yaml");
        s.sync(&mut rec).unwrap();
        assert!(rx.borrow_and_update().is_empty());
    }

    /// Each edit of the directory is handed to the model as the objects it changed (only
    /// their Services are computed again), and the result is always what the full
    /// computation from the files gives.
    #[test]
    fn a_pass_hands_the_model_only_what_the_changed_files_changed() {
        let dir = Dir::new("passes");
        let mut s = Standalone::new(&dir.0, "node1", Duration::ZERO, None);
        let web = "  selector: {app: web}\n";
        let services = |c_ip: &str| {
            [
                svc("a", "198.19.0.1", ""),
                svc("b", "198.19.0.2", web),
                svc("c", c_ip, ""),
            ]
        };
        dir.write(&mut s, "services.yaml", &services("198.19.0.3"));
        dir.write(&mut s, "a-1.yaml", &[slice("a-1", "a", &["198.18.0.1"])]);
        dir.write(&mut s, "c-1.yaml", &[slice("c-1", "c", &["198.18.0.3"])]);
        dir.write(
            &mut s,
            "pods.yaml",
            &[
                pod("web-0", "web", "198.18.1.1"),
                pod("web-1", "web", "198.18.1.2"),
            ],
        );
        dir.write(&mut s, "node.yaml", &[node("z1")]);
        let first = pass(&mut s);
        assert!(first.listed);
        assert_eq!(s.model.state().frontends.len(), 3);

        // One slice file: one Service computed again.
        dir.write(
            &mut s,
            "a-1.yaml",
            &[slice("a-1", "a", &["198.18.0.1", "198.18.0.2"])],
        );
        let refresh = pass(&mut s);
        assert!(!refresh.listed);
        assert_eq!(s.model.recomputed(), 1);

        // A Pod relabelled: the selector Service computed again.
        dir.write(
            &mut s,
            "pods.yaml",
            &[
                pod("web-0", "web", "198.18.1.1"),
                pod("web-1", "db", "198.18.1.2"),
            ],
        );
        pass(&mut s);
        assert_eq!(s.model.recomputed(), 1);

        // The Service file rewritten with one Service changed.
        dir.write(&mut s, "services.yaml", &services("198.19.0.4"));
        let refresh = pass(&mut s);
        let dirty: Vec<&str> = refresh
            .dirty
            .services
            .iter()
            .map(|n| n.1.as_str())
            .collect();
        assert_eq!(dirty, ["c"]);
        assert_eq!(s.model.recomputed(), 1);

        // The same slice in a second file, differing: an error, the slice is not used; made
        // identical: used again.
        dir.write(&mut s, "z-copy.yaml", &[slice("c-1", "c", &["198.18.0.9"])]);
        pass(&mut s);
        assert!(
            s.model.state().errors.iter().any(|e| e.name == "c-1"),
            "{:?}",
            s.model.state().errors
        );
        dir.write(&mut s, "z-copy.yaml", &[slice("c-1", "c", &["198.18.0.3"])]);
        pass(&mut s);
        assert!(s.model.state().errors.is_empty());

        // A hand-written slice for the selector Service is ignored; the selector removed, it
        // is used.
        dir.write(&mut s, "b-1.yaml", &[slice("b-1", "b", &["198.18.0.5"])]);
        pass(&mut s);
        assert_eq!(s.slicer.ignored_slices().len(), 1);
        let plain = [
            svc("a", "198.19.0.1", ""),
            svc("b", "198.19.0.2", ""),
            svc("c", "198.19.0.4", ""),
        ];
        dir.write(&mut s, "services.yaml", &plain);
        pass(&mut s);
        assert!(s.slicer.ignored_slices().is_empty());

        // The Node's zone, a removed file, then lost events: a listing and the whole set.
        dir.write(&mut s, "node.yaml", &[node("z2")]);
        pass(&mut s);
        dir.remove(&mut s, "pods.yaml");
        pass(&mut s);
        dir.write(&mut s, "services.yaml", &services("198.19.0.3"));
        s.source.forget_stamps();
        let refresh = pass(&mut s);
        assert!(refresh.listed);
    }
}
