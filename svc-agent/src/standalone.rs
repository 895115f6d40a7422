//! Standalone mode: the desired state comes from a directory of Kubernetes YAML/JSON files,
//! re-read whenever the directory changes (changes arriving together are coalesced).

use std::{path::Path, time::Duration};

use anyhow::Context as _;
use notify::Watcher as _;
use tracing::{info, warn};

use crate::{
    datapath::{DatapathMaps, Reconciler},
    model, source,
};

/// How long to wait for more changes after one arrives before reconciling.
const COALESCE: Duration = Duration::from_millis(50);

/// Reads `dir`, computes the desired state for `node_name` and applies it.
pub fn sync_once<M: DatapathMaps>(
    dir: &Path,
    node_name: &str,
    rec: &mut Reconciler<M>,
) -> anyhow::Result<()> {
    let loaded = source::files::load_dir(dir)?;
    for e in &loaded.errors {
        warn!(error = %e, "skipped a document");
    }
    if !loaded.skipped.is_empty() {
        let objects: Vec<String> = loaded
            .skipped
            .iter()
            .map(|s| format!("{} {} ({})", s.api_version, s.kind, s.origin))
            .collect();
        info!(
            objects = %objects.join(", "),
            "skipped {} objects of kinds svc does not use (documentation only)",
            objects.len()
        );
    }
    let snapshot = with_pod_slices(&loaded);
    let desired = model::compute(&snapshot, node_name);
    for e in &desired.errors {
        warn!(error = %e, "skipped an object");
    }
    let report = rec.apply(&desired);
    for e in &report.errors {
        warn!(error = %e, "not programmed");
    }
    info!(
        frontends = desired.frontends.len(),
        services_written = report.services_written,
        services_deleted = report.services_deleted,
        backends_written = report.backends_written,
        backends_deleted = report.backends_deleted,
        "synced {}",
        dir.display()
    );
    Ok(())
}

/// The snapshot to compute from: the directory's Services and Nodes, with the slices of
/// Services that have a selector computed from the directory's Pods (as the `EndpointSlice`
/// controller would) and the hand-written slices of the others. Logs the selections, the
/// hand-written slices ignored and the Pods that could not be used.
fn with_pod_slices(loaded: &source::Loaded) -> model::Snapshot {
    let computed = model::slices_from_pods(
        &loaded.snapshot.services,
        &loaded.pods,
        &loaded.snapshot.slices,
    );
    for ignored in &computed.ignored_slices {
        warn!(
            slice = %format!("{}/{}", ignored.namespace, ignored.slice),
            "{ignored}"
        );
    }
    for e in &computed.errors {
        warn!(error = %e, "skipped an object");
    }
    for selection in &computed.selections {
        info!(
            service = %format!("{}/{}", selection.namespace, selection.name),
            selector = %selection.selector,
            pods = %selection.pods.join(","),
            "selected {selection}"
        );
    }
    model::Snapshot {
        services: loaded.snapshot.services.clone(),
        slices: computed.slices,
        nodes: loaded.snapshot.nodes.clone(),
    }
}

/// Whether a directory event can change what the directory holds. Opening and closing files
/// (reading them, as every sync does) does not: reacting to those would re-sync forever.
fn changes_content(e: &notify::Event) -> bool {
    use notify::{EventKind, event::AccessKind, event::AccessMode};
    // A file written in place and closed counts too: its content is final now.
    matches!(
        e.kind,
        EventKind::Create(_)
            | EventKind::Modify(_)
            | EventKind::Remove(_)
            | EventKind::Any
            | EventKind::Access(AccessKind::Close(AccessMode::Write))
    )
}

/// Syncs `dir` now and again after every change, until the task is dropped.
pub async fn follow<M: DatapathMaps>(
    dir: &Path,
    node_name: &str,
    rec: &mut Reconciler<M>,
) -> anyhow::Result<()> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
    let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        if ev.is_ok_and(|e| changes_content(&e)) {
            // A full channel already holds a wake-up: nothing is lost.
            let _ = tx.try_send(());
        }
    })
    .context("starting the directory watcher")?;
    watcher
        .watch(dir, notify::RecursiveMode::NonRecursive)
        .with_context(|| format!("watching {}", dir.display()))?;
    sync_once(dir, node_name, rec)?;
    while rx.recv().await.is_some() {
        tokio::time::sleep(COALESCE).await;
        while rx.try_recv().is_ok() {}
        if let Err(e) = sync_once(dir, node_name, rec) {
            warn!(error = %format!("{e:#}"), "sync failed; keeping the last programmed state");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use notify::{
        Event, EventKind,
        event::{AccessKind, AccessMode, CreateKind, ModifyKind, RemoveKind},
    };

    use super::changes_content;

    #[test]
    fn reading_the_directory_is_not_a_change() {
        assert!(!changes_content(&Event::new(EventKind::Access(
            AccessKind::Open(AccessMode::Any)
        ))));
        assert!(!changes_content(&Event::new(EventKind::Access(
            AccessKind::Close(AccessMode::Read)
        ))));
        assert!(changes_content(&Event::new(EventKind::Access(
            AccessKind::Close(AccessMode::Write)
        ))));
        assert!(changes_content(&Event::new(EventKind::Create(
            CreateKind::File
        ))));
        assert!(changes_content(&Event::new(EventKind::Modify(
            ModifyKind::Any
        ))));
        assert!(changes_content(&Event::new(EventKind::Remove(
            RemoveKind::File
        ))));
    }
}
