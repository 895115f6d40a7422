//! The periodic audit of the incremental passes (`--audit-interval`): the full computation of
//! the desired state and the full diff against the maps, as an oracle. Both sources run it.

use tracing::{info, warn};

use crate::{
    datapath::{DatapathMaps, ReconcileReport, Reconciler},
    metrics::Recorder,
    model::{self, Snapshot},
};

/// The periodic audit: computes the desired state from scratch and compares it with the
/// incremental model's (a difference is a bug: logged as drift, and the model is rebuilt),
/// then reconciles the whole maps against it (anything written is drift too: logged). Both
/// drifts are counted in `metrics`.
pub fn audit<M: DatapathMaps>(
    snapshot: &Snapshot,
    node_name: &str,
    model: &mut model::Model,
    rec: &mut Reconciler<M>,
    metrics: &Recorder,
) -> ReconcileReport {
    let started = std::time::Instant::now();
    let which = model.nodeport_setting().clone();
    let host = model.host_addresses().to_vec();
    let oracle = model::compute_with(
        snapshot,
        node_name,
        &mut model::Memo::with_nodeport_addresses(which.clone()).with_host_addresses(host.clone()),
    );
    let drift = model::Delta::between(model.state(), &oracle);
    if !drift.is_empty() {
        warn!(
            frontends = drift.frontends.len(),
            backend_names = drift.backend_names.len(),
            errors = drift.errors,
            nodes = drift.nodes,
            "audit: the incremental model drifted from the full computation; rebuilding it"
        );
        *model = model::Model::with_nodeport_addresses(node_name, which);
        model.set_host_addresses(host);
        model.replace(snapshot);
    }
    let report = rec.apply(model.state());
    let fixed = report.services_written
        + report.services_deleted
        + report.backends_written
        + report.backends_deleted;
    if fixed > 0 {
        warn!(
            services_written = report.services_written,
            services_deleted = report.services_deleted,
            backends_written = report.backends_written,
            backends_deleted = report.backends_deleted,
            "audit: the maps drifted from the desired state; rewrote what differed"
        );
    }
    metrics.audit_drift(drift.frontends.len(), fixed);
    info!(
        model_drift = drift.frontends.len(),
        map_drift = fixed,
        took_us = started.elapsed().as_micros(),
        "audit done"
    );
    report
}
