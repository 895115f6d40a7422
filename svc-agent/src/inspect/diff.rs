//! `svc-agent inspect diff --from-dir DIR`: what the pinned maps hold against what the objects
//! of a standalone directory say they should hold, per Service.
//!
//! The desired state is computed as standalone mode computes it (its audit's full
//! computation): the directory read with the agent's own reader (`source::dir`), the slices of
//! Services with a selector computed from the Pods (`model::slices_from_pods`), then
//! `model::compute_with` for `--node-name` with `--nodeport-addresses`; it is rendered into map
//! contents by the reconciler's own `datapath::render` (fresh ids). Both sides are then turned
//! into the same id-free form ([`frontend_states`]): per frontend (address, port, protocol,
//! scope), its slot 0 (flags, affinity timeout), its slots' endpoints with their flags, and its
//! Service port's name. A frontend only the objects have is `missing`, one only the maps have
//! `extra`, one whose form differs `different` (which fields, which backends). Backends the
//! objects keep for established flows only (terminating, unready, remote under a Local
//! policy) are in no slot; they must be in `BACKENDS_V1` with the right flags.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    path::Path,
    time::Instant,
};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use svc_common::service::{Backend, FrontendName, ServiceKey, ServiceValue, backend_flags, flags};

use super::{
    Format, fmt_addr, kind_name,
    output::{self, Table},
    proto_name,
};
use crate::{
    datapath::{
        ids::IdMap,
        names,
        render::{self, Capacity},
    },
    model::{self, DesiredState, NodePortAddresses},
    source::{Budget, dir::DirSource},
};

/// A frontend in id-free form, as the maps hold it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendState {
    /// Slot 0's flags.
    pub flags: u16,
    /// Slot 0's `ClientIP` affinity timeout (seconds; 0: none).
    pub affinity_timeout: u32,
    /// The slots' backends: `addr:port` -> backend flags (`None`: the slot or its backend is
    /// missing, keyed `slot N`).
    pub slots: BTreeMap<String, Option<u8>>,
    /// The Service (`namespace/name`) and port name (`FRONTEND_NAMES_V1`).
    pub name: Option<(String, String)>,
    /// Whether slot 0 exists (false: only stray slots were found).
    pub entry: bool,
    /// Slot entries past the frontend's count, or of a frontend without slot 0: what no
    /// program reads and no pass of the agent leaves behind.
    pub stray: Vec<u16>,
}

/// Every frontend of `services` (slot 0 entries) in id-free form, its slots resolved through
/// `backends` and its name through `names` (by frontend id); slot entries no frontend counts
/// are noted as `stray` (under a state without `entry` when slot 0 is missing).
#[must_use]
pub fn frontend_states(
    services: &BTreeMap<ServiceKey, ServiceValue>,
    backends: &BTreeMap<u32, Backend>,
    names: &BTreeMap<u32, (String, String)>,
) -> BTreeMap<ServiceKey, FrontendState> {
    let mut out = counted_states(services, backends, names);
    for k in services.keys().filter(|k| k.slot != 0) {
        let slot0 = ServiceKey { slot: 0, ..*k };
        let counted = services.get(&slot0).is_some_and(|v| k.slot <= v.count);
        if !counted {
            out.entry(slot0)
                .or_insert_with(|| FrontendState {
                    flags: 0,
                    affinity_timeout: 0,
                    slots: BTreeMap::new(),
                    name: None,
                    entry: false,
                    stray: Vec::new(),
                })
                .stray
                .push(k.slot);
        }
    }
    out
}

fn counted_states(
    services: &BTreeMap<ServiceKey, ServiceValue>,
    backends: &BTreeMap<u32, Backend>,
    names: &BTreeMap<u32, (String, String)>,
) -> BTreeMap<ServiceKey, FrontendState> {
    services
        .iter()
        .filter(|(k, _)| k.slot == 0)
        .map(|(k, v)| {
            let slots = (1..=v.count)
                .map(|slot| {
                    let b = services
                        .get(&ServiceKey { slot, ..*k })
                        .and_then(|s| backends.get(&s.id));
                    match b {
                        Some(b) => (fmt_addr(&b.addr, b.family, b.port.to_host()), Some(b.flags)),
                        None => (format!("slot {slot}"), None),
                    }
                })
                .collect();
            let state = FrontendState {
                flags: v.flags,
                affinity_timeout: v.affinity_timeout,
                slots,
                name: names.get(&v.id).cloned(),
                entry: true,
                stray: Vec::new(),
            };
            (*k, state)
        })
        .collect()
}

/// What the objects say the maps should hold.
#[derive(Debug, Default)]
pub struct Desired {
    /// Every programmable frontend, id-free.
    pub frontends: BTreeMap<ServiceKey, FrontendState>,
    /// Per frontend, the backends kept for established flows only (in no slot): `addr:port`
    /// -> flags `BACKENDS_V1` must hold them with.
    pub kept: BTreeMap<ServiceKey, BTreeMap<String, u8>>,
    /// Frontends this datapath cannot program (SCTP, too many endpoints), with why.
    pub unsupported: Vec<(String, String)>,
}

/// Renders `desired` (the model's output) as the reconciler would, into id-free form.
#[must_use]
pub fn desired_states(desired: &DesiredState) -> Desired {
    let rendered = render::render(
        desired,
        &mut IdMap::default(),
        &mut IdMap::default(),
        Capacity {
            services: u32::MAX,
            backends: u32::MAX,
        },
    );
    // The name of each rendered frontend (by its slot 0's id), as `FRONTEND_NAMES_V1` holds it.
    let names: BTreeMap<u32, (String, String)> = (desired.frontends.iter())
        .filter_map(|(key, fe)| {
            let id = rendered.services.get(&render::frontend_key(key))?.id;
            let s = &fe.service;
            let n: FrontendName = names::frontend_name(&s.namespace, &s.name, &s.port_name);
            Some((id, (names::display(&n.service), names::display(&n.port))))
        })
        .collect();
    let frontends = frontend_states(&rendered.services, &rendered.backends, &names);
    let mut kept = BTreeMap::new();
    for (key, fe) in &desired.frontends {
        let map_key = render::frontend_key(key);
        if !frontends.contains_key(&map_key) {
            continue;
        }
        let held: BTreeMap<String, u8> = fe
            .kept_backends
            .iter()
            .chain(&fe.unready_backends)
            .map(|b| {
                let v = render::backend_value(b);
                (fmt_addr(&v.addr, v.family, b.port), v.flags)
            })
            .collect();
        if !held.is_empty() {
            kept.insert(map_key, held);
        }
    }
    let unsupported = rendered
        .skipped
        .iter()
        .map(|(k, why)| (k.to_string(), why.clone()))
        .collect();
    Desired {
        frontends,
        kept,
        unsupported,
    }
}

/// What the API server's objects say for node `node_name` (one listing, with the agent's own
/// selectors), and what computing them had to say (objects skipped, no Node), for stderr.
///
/// # Errors
/// When a listing fails.
pub async fn desired_from_api(
    client: &kube::Client,
    node_name: &str,
    nodeports: NodePortAddresses,
    host_addresses: Vec<std::net::IpAddr>,
) -> anyhow::Result<(DesiredState, Vec<String>)> {
    let snapshot = crate::source::kube::list_snapshot(client, node_name).await?;
    let mut notes = Vec::new();
    if snapshot.nodes.is_empty() {
        notes.push(format!(
            "the API server has no Node named {node_name}: it has no node addresses from a Node \
             (NodePorts only on the node-facing interfaces' addresses) and every endpoint is \
             remote, as for an agent run with that --node-name"
        ));
    }
    let desired = model::compute_with(
        &snapshot,
        node_name,
        &mut model::Memo::with_nodeport_addresses(nodeports).with_host_addresses(host_addresses),
    );
    for e in &desired.errors {
        notes.push(format!("skipped: {e}"));
    }
    Ok((desired, notes))
}

/// What the directory's objects say for node `node_name`, and what reading them had to say
/// (files with errors, objects skipped), for stderr.
///
/// # Errors
/// When the directory cannot be read.
pub fn desired_from_dir(
    dir: &Path,
    node_name: &str,
    nodeports: NodePortAddresses,
    host_addresses: Vec<std::net::IpAddr>,
) -> anyhow::Result<(DesiredState, Vec<String>)> {
    std::fs::read_dir(dir)
        .with_context(|| format!("--from-dir {}: cannot list that directory", dir.display()))?;
    let mut source = DirSource::new(dir, Budget::DEFAULT);
    let refresh = source
        .refresh(Instant::now())
        .with_context(|| format!("reading {}", dir.display()))?;
    let mut notes = Vec::new();
    for report in &refresh.read {
        notes.extend(report.errors.iter().map(ToString::to_string));
    }
    let loaded = source.loaded();
    if !loaded
        .snapshot
        .nodes
        .iter()
        .any(|n| n.metadata.name.as_deref() == Some(node_name))
    {
        notes.push(format!(
            "no Node named {node_name} in {}: it has no node addresses (no NodePorts) and every \
             endpoint is remote, as for an agent run with that --node-name",
            dir.display()
        ));
    }
    let computed = model::slices_from_pods(
        &loaded.snapshot.services,
        &loaded.pods,
        &loaded.snapshot.slices,
        &loaded.snapshot.nodes,
    );
    let snapshot = model::Snapshot {
        services: loaded.snapshot.services,
        slices: computed.slices,
        nodes: loaded.snapshot.nodes,
    };
    let desired = model::compute_with(
        &snapshot,
        node_name,
        &mut model::Memo::with_nodeport_addresses(nodeports).with_host_addresses(host_addresses),
    );
    for e in &desired.errors {
        notes.push(format!("skipped: {e}"));
    }
    Ok((desired, notes))
}

/// One field of a frontend that differs (a JSON object of `fields`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FieldDiff {
    /// What: `service`, `type`, `trafficPolicy`, `sessionAffinity`, `whenEmpty`,
    /// `servesTerminating`, or a backend `addr:port` (its state).
    pub field: String,
    /// What the objects say.
    pub want: String,
    /// What the maps hold.
    pub have: String,
}

/// One frontend that drifted (a JSON object of `inspect diff -o json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DiffRow {
    /// The Service's namespace (the objects' for a missing or different frontend; the
    /// `FRONTEND_NAMES_V1` name for an extra one; null when unnamed).
    pub namespace: Option<String>,
    /// The Service's name.
    pub name: Option<String>,
    /// The port's name.
    pub port_name: Option<String>,
    /// The frontend, `addr:port`.
    pub frontend: String,
    /// `TCP`, `UDP`, `SCTP`.
    pub protocol: String,
    /// `internal` or `external`.
    pub scope: String,
    /// `missing` (the objects have it, the maps do not), `extra` (the maps have it, the
    /// objects do not) or `different`.
    pub drift: String,
    /// Slot 0 fields and backend states that differ.
    pub fields: Vec<FieldDiff>,
    /// Endpoints the objects put in the slots and the maps' slots lack (`addr:port`).
    pub missing_backends: Vec<String>,
    /// Endpoints in the maps' slots the objects do not have there, and slot entries no frontend
    /// counts (`slot N (stray)`).
    pub extra_backends: Vec<String>,
    /// Endpoints kept for established flows (in no slot) that `BACKENDS_V1` lacks, or holds
    /// with other flags.
    pub missing_kept: Vec<String>,
}

fn flag_fields(f: u16, affinity: u32) -> [(&'static str, String); 5] {
    [
        ("type", kind_name(f).to_owned()),
        (
            "trafficPolicy",
            if f & flags::LOCAL_ONLY != 0 {
                "Local"
            } else {
                "Cluster"
            }
            .to_owned(),
        ),
        (
            "sessionAffinity",
            if affinity == 0 {
                "None".to_owned()
            } else {
                format!("ClientIP/{affinity}s")
            },
        ),
        (
            "whenEmpty",
            if f & flags::REJECT_EMPTY != 0 {
                "reject"
            } else if f & flags::DROP_EMPTY != 0 {
                "drop"
            } else {
                "serve"
            }
            .to_owned(),
        ),
        (
            "servesTerminating",
            (f & flags::SERVES_TERMINATING != 0).to_string(),
        ),
    ]
}

fn backend_words(f: Option<u8>) -> String {
    match f {
        None => "missing".to_owned(),
        Some(f) => format!(
            "{},{}",
            if f & backend_flags::TERMINATING != 0 {
                "terminating"
            } else {
                "ready"
            },
            if f & backend_flags::LOCAL != 0 {
                "local"
            } else {
                "remote"
            }
        ),
    }
}

fn row(key: &ServiceKey, name: Option<&(String, String)>, drift: &str) -> DiffRow {
    let (namespace, svc, port) = match name {
        Some((service, port)) => {
            let (ns, n) = service.split_once('/').unwrap_or(("", service));
            (Some(ns.to_owned()), Some(n.to_owned()), Some(port.clone()))
        }
        None => (None, None, None),
    };
    DiffRow {
        namespace,
        name: svc,
        port_name: port,
        frontend: fmt_addr(&key.addr, key.family, key.port.to_host()),
        protocol: proto_name(key.proto).to_owned(),
        scope: if key.scope == svc_common::service::scope::EXTERNAL {
            "external"
        } else {
            "internal"
        }
        .to_owned(),
        drift: drift.to_owned(),
        fields: Vec::new(),
        missing_backends: Vec::new(),
        extra_backends: Vec::new(),
        missing_kept: Vec::new(),
    }
}

/// `slot N (stray)` for each stray slot entry of `state`.
fn stray_words(state: Option<&FrontendState>) -> Vec<String> {
    state
        .map(|s| {
            s.stray
                .iter()
                .map(|n| format!("slot {n} (stray)"))
                .collect()
        })
        .unwrap_or_default()
}

/// The frontends of `desired` and `have` (the maps, id-free) that differ, sorted by Service,
/// port name, then frontend; `have_backends` is `BACKENDS_V1` by endpoint (`addr:port` ->
/// flags), for the kept backends.
#[must_use]
pub fn compare(
    desired: &Desired,
    have: &BTreeMap<ServiceKey, FrontendState>,
    have_backends: &BTreeMap<String, u8>,
) -> Vec<DiffRow> {
    let mut rows = Vec::new();
    for (key, want) in &desired.frontends {
        let Some(got) = have.get(key).filter(|g| g.entry) else {
            let mut r = row(key, want.name.as_ref(), "missing");
            r.missing_backends = want.slots.keys().cloned().collect();
            r.extra_backends = stray_words(have.get(key));
            rows.push(r);
            continue;
        };
        let mut r = row(key, want.name.as_ref(), "different");
        if want.name != got.name {
            let text = |n: &Option<(String, String)>| {
                n.as_ref()
                    .map_or("(none)".to_owned(), |(s, p)| format!("{s} port {p:?}"))
            };
            r.fields.push(FieldDiff {
                field: "service".to_owned(),
                want: text(&want.name),
                have: text(&got.name),
            });
        }
        let (wf, hf) = (
            flag_fields(want.flags, want.affinity_timeout),
            flag_fields(got.flags, got.affinity_timeout),
        );
        for ((field, w), (_, h)) in wf.into_iter().zip(hf) {
            if w != h {
                r.fields.push(FieldDiff {
                    field: field.to_owned(),
                    want: w,
                    have: h,
                });
            }
        }
        for (endpoint, wflags) in &want.slots {
            match got.slots.get(endpoint) {
                None => r.missing_backends.push(endpoint.clone()),
                Some(hflags) if hflags != wflags => r.fields.push(FieldDiff {
                    field: endpoint.clone(),
                    want: backend_words(*wflags),
                    have: backend_words(*hflags),
                }),
                Some(_) => {}
            }
        }
        r.extra_backends = got
            .slots
            .keys()
            .filter(|e| !want.slots.contains_key(*e))
            .cloned()
            .chain(stray_words(Some(got)))
            .collect();
        for (endpoint, wflags) in desired.kept.get(key).into_iter().flatten() {
            if have_backends.get(endpoint) != Some(wflags) {
                r.missing_kept.push(endpoint.clone());
            }
        }
        if !(r.fields.is_empty()
            && r.missing_backends.is_empty()
            && r.extra_backends.is_empty()
            && r.missing_kept.is_empty())
        {
            rows.push(r);
        }
    }
    for (key, got) in have {
        if !desired.frontends.contains_key(key) {
            let mut r = row(key, got.name.as_ref(), "extra");
            r.extra_backends = got
                .slots
                .keys()
                .cloned()
                .chain(stray_words(Some(got)))
                .collect();
            rows.push(r);
        }
    }
    rows.sort_by(|a, b| {
        let k = |r: &DiffRow| {
            (
                r.name.is_none(),
                r.namespace.clone(),
                r.name.clone(),
                r.port_name.clone(),
                r.frontend.clone(),
                r.protocol.clone(),
                r.scope.clone(),
            )
        };
        k(a).cmp(&k(b))
    });
    rows
}

/// The maps' side: `SERVICES_V1`, `BACKENDS_V1`, `FRONTEND_NAMES_V1` in id-free form, and
/// `BACKENDS_V1` by endpoint.
///
/// # Errors
/// When a map cannot be read.
pub fn read_have(
    bpffs: &Path,
) -> anyhow::Result<(BTreeMap<ServiceKey, FrontendState>, BTreeMap<String, u8>)> {
    let view = super::read_services(bpffs)?;
    let states = frontend_states(&view.services, &view.backends, &view.frontend_names);
    let by_endpoint = view
        .backends
        .values()
        .map(|b| (fmt_addr(&b.addr, b.family, b.port.to_host()), b.flags))
        .collect();
    Ok((states, by_endpoint))
}

/// `inspect diff` in `format`: a row per drifted frontend (by Service) and a count line, or
/// JSON (an array of the rows; empty: no drift).
///
/// # Errors
/// When JSON serialization fails.
pub fn format_diff(rows: &[DiffRow], desired: &Desired, format: Format) -> anyhow::Result<String> {
    if format == Format::Json {
        return output::json(rows);
    }
    let mut t = Table::new(&[
        "NAMESPACE",
        "NAME",
        "PORT",
        "FRONTEND",
        "PROTO",
        "SCOPE",
        "DRIFT",
        "DETAIL",
    ]);
    for r in rows {
        let mut detail = Vec::new();
        for f in &r.fields {
            detail.push(format!("{}: want {}, have {}", f.field, f.want, f.have));
        }
        let list = |label: &str, v: &[String]| format!("{label} {}", v.join(","));
        if !r.missing_backends.is_empty() {
            detail.push(list("backends missing:", &r.missing_backends));
        }
        if !r.extra_backends.is_empty() {
            detail.push(list("backends extra:", &r.extra_backends));
        }
        if !r.missing_kept.is_empty() {
            detail.push(list("kept backends not in BACKENDS_V1:", &r.missing_kept));
        }
        t.row(vec![
            r.namespace.clone().unwrap_or_default(),
            r.name.clone().unwrap_or_default(),
            r.port_name.clone().unwrap_or_default(),
            r.frontend.clone(),
            r.protocol.clone(),
            r.scope.clone(),
            r.drift.clone(),
            detail.join("; "),
        ]);
    }
    let services: BTreeSet<(Option<&String>, Option<&String>)> = rows
        .iter()
        .map(|r| (r.namespace.as_ref(), r.name.as_ref()))
        .collect();
    let mut count = if rows.is_empty() {
        format!(
            "no drift: the maps hold the {} the objects ask for",
            output::count(desired.frontends.len(), "frontend", "frontends")
        )
    } else {
        format!(
            "drift: {} of {}",
            output::count(rows.len(), "frontend", "frontends"),
            output::count(services.len(), "Service", "Services")
        )
    };
    if !desired.unsupported.is_empty() {
        let _ = write!(
            count,
            " ({} this datapath cannot program: {})",
            desired.unsupported.len(),
            desired
                .unsupported
                .iter()
                .map(|(k, why)| format!("{k}: {why}"))
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    Ok(t.render(&count))
}

#[cfg(test)]
mod tests;
