//! Kubernetes API source: the desired state comes from the API server.
//!
//! Three `kube` reflectors follow `v1` Services, `discovery.k8s.io/v1` `EndpointSlice`s and this
//! node's `v1` Node (by field selector) into in-memory stores. The Service is the unit of work:
//! a watch event names an object, the pass hands the named objects (as the stores hold them
//! now) to the incremental model ([`model::Model`]), which recomputes only their Services, and
//! the reconciler writes only the frontends that changed ([`Reconciler::apply_delta`]). Changes
//! arriving close together are coalesced into one pass.
//!
//! - **First sync** waits until all three stores have listed once, so a partial view (Services
//!   without their slices) is never programmed; it computes and writes everything.
//! - **Relists** (watch expired, `410 Gone`, reconnect) replace a store atomically when the list
//!   completes (kube's `InitDone`); deletes missed meanwhile have no event, so the pass that
//!   follows hands the model the whole stores (unchanged objects are recognised and not
//!   recomputed) and reconciles the whole maps: an unchanged Service is never removed and
//!   re-added, and nothing stale stays.
//! - **Audit** (`--audit-interval`): the full computation and the full diff against the maps
//!   run periodically as an oracle; any difference (a bug) is logged as drift and fixed.
//! - **API failures** are retried by each watcher with client-go's backoff (0.8 s doubling to
//!   30 s, jittered); meanwhile the stores and the maps keep the last known state and the
//!   datapath keeps serving it.
//! - **Bad objects and full maps** are reported as Kubernetes `Warning` Events on the object
//!   (reason `InvalidObject` naming the field, or `NotProgrammed` naming the map and its size)
//!   and logged; each problem is published when it appears, not on every pass. A frontend
//!   waiting for room is programmed as soon as room appears (the reconciler retries it).
//!
//! After the first pass and each pass that changed them, the health-check node ports go to
//! their server (`healthcheck`, [`Options::health_checks`]).
//!
//! Services and slices that belong to another proxy (`service.kubernetes.io/service-proxy-name`)
//! or to headless Services are filtered out by the API server (label selectors), as kube-proxy
//! does; the model ignores them too.

use std::{
    collections::{BTreeSet, HashMap},
    fmt,
    marker::PhantomData,
    path::Path,
    pin::pin,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use anyhow::Context as _;
use futures_util::{Stream, StreamExt as _, stream};
use k8s_openapi::{
    Resource as _,
    api::{
        core::v1::{Node, ObjectReference, Service},
        discovery::v1::EndpointSlice,
    },
};
use kube::{
    Api, Client, ResourceExt as _,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        WatchStreamExt as _,
        events::{Event as KubeEvent, EventType, Recorder, Reporter},
        reflector::{self, ObjectRef, Store},
        watcher,
    },
};
use tokio::{
    sync::{mpsc, watch},
    time::Instant,
};
use tracing::{debug, info, warn};

use crate::{
    datapath::{DatapathMaps, ReconcileReport, ReconcilerHandle},
    hostaddrs::HostAddresses,
    metrics::{EventResult, PassKind, Recorder as Metrics},
    model::{self, DesiredState, LABEL_HEADLESS, LABEL_SERVICE_PROXY_NAME, ObjectError, Snapshot},
};

/// The label an `EndpointSlice` names its Service with.
const LABEL_SERVICE_NAME: &str = model::LABEL_SERVICE_NAME;

/// The `reportingController` of the Events the agent publishes.
pub const EVENT_CONTROLLER: &str = "svc-agent";

/// How many Events may wait to be published; more are logged and dropped.
const EVENT_QUEUE: usize = 256;

/// The longest an Event's note may be (the API server rejects more than 1 kB).
const EVENT_NOTE_MAX: usize = 1000;

/// How long publishing one Event may take before it is given up.
const EVENT_TIMEOUT: Duration = Duration::from_secs(10);

/// How to reach the API server.
#[derive(Clone, Debug, Default)]
pub struct Connection {
    /// A kubeconfig file; `None` infers the configuration like `kubectl` and client-go do
    /// (in-cluster service account, then `KUBECONFIG`, then `~/.kube/config`).
    pub kubeconfig: Option<std::path::PathBuf>,
}

impl Connection {
    /// A client for the API server.
    pub async fn client(&self) -> anyhow::Result<Client> {
        let config = match &self.kubeconfig {
            Some(path) => config_from_file(path).await?,
            None => kube::Config::infer().await.context(
                "finding the API server (in-cluster config, KUBECONFIG or ~/.kube/config)",
            )?,
        };
        Client::try_from(config).context("building the Kubernetes client")
    }
}

async fn config_from_file(path: &Path) -> anyhow::Result<kube::Config> {
    let kubeconfig = Kubeconfig::read_from(path)
        .with_context(|| format!("reading kubeconfig {}", path.display()))?;
    kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .with_context(|| format!("using kubeconfig {}", path.display()))
}

/// Options of the Kubernetes source.
#[derive(Clone, Debug)]
pub struct Options {
    /// This node's name (decides which endpoints are local; selects the Node watched).
    pub node_name: String,
    /// How long to wait for more changes after one arrives before reconciling.
    pub coalesce: Duration,
    /// Whether to publish Kubernetes Events about bad objects.
    pub events: bool,
    /// How often the full computation and the full diff against the maps run as an audit of
    /// the incremental passes; `None`: never.
    pub audit_interval: Option<Duration>,
    /// Where passes, changes, watch failures and Events are reported (metrics, health).
    pub metrics: Metrics,
    /// Which node addresses serve `NodePort`s (`--nodeport-addresses`).
    pub nodeport_addresses: model::NodePortAddresses,
    /// Where the health-check node ports go after the first pass and each pass that changed
    /// them (`None`: not served).
    pub health_checks: Option<crate::healthcheck::Publisher>,
    /// The node-facing interfaces' addresses (`hostaddrs::follow`; `None`: not followed):
    /// they serve `NodePort`s with the Node's; a change is a pass of its own.
    pub host_addresses: Option<watch::Receiver<HostAddresses>>,
}

/// The three kinds the source follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Service,
    EndpointSlice,
    Node,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Service => "Service",
            Self::EndpointSlice => "EndpointSlice",
            Self::Node => "Node",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What one watcher reported, reduced to what the source acts on.
#[derive(Debug)]
enum Update {
    /// An object changed (an event).
    Changed(Kind, ObjectKey),
    /// A (re)list completed: the store now holds a full, consistent list.
    Listed(Kind),
    /// A (re)list started or is in progress; the store still holds the previous state.
    Listing,
    /// The watch failed; the watcher retries after a backoff.
    Failed(Kind, watcher::Error),
    /// The node-facing interfaces' addresses changed.
    HostAddresses,
}

/// An object's namespace and name, as the stores key it.
type ObjectKey = (String, String);

fn update<K: kube::Resource>(
    kind: Kind,
    item: Result<watcher::Event<K>, watcher::Error>,
) -> Update {
    match item {
        Ok(watcher::Event::Apply(object) | watcher::Event::Delete(object)) => {
            let meta = object.meta();
            let key = (
                meta.namespace.clone().unwrap_or_default(),
                meta.name.clone().unwrap_or_default(),
            );
            Update::Changed(kind, key)
        }
        Ok(watcher::Event::InitDone) => Update::Listed(kind),
        Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => Update::Listing,
        Err(e) => Update::Failed(kind, e),
    }
}

/// What one pass is to do: what changed since the last pass.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Work {
    /// Kinds that (re)listed: their store was replaced, deletes may have no event; the pass
    /// hands the model everything and reconciles the whole maps.
    relisted: BTreeSet<Kind>,
    /// Services changed (namespace, name).
    services: BTreeSet<ObjectKey>,
    /// `EndpointSlice`s changed (namespace, name).
    slices: BTreeSet<ObjectKey>,
    /// The Node changed.
    nodes: bool,
    /// The node-facing interfaces' addresses changed.
    host_addresses: bool,
    /// The periodic audit is due.
    audit: bool,
}

impl Work {
    /// The kind of pass this work makes (an audit compares everything, whatever else changed).
    fn kind(&self) -> PassKind {
        if self.audit {
            PassKind::Audit
        } else if self.relisted.is_empty() {
            PassKind::Incremental
        } else {
            PassKind::Full
        }
    }
}

impl Work {
    fn note(&mut self, kind: Kind, key: ObjectKey) {
        match kind {
            Kind::Service => {
                self.services.insert(key);
            }
            Kind::EndpointSlice => {
                self.slices.insert(key);
            }
            Kind::Node => self.nodes = true,
        }
    }
}

/// Objects of one kind as the model keeps them (`T`: [`model::Svc`], [`model::Slice`]),
/// converted from the API's `K` when their event arrives, so no `k8s-openapi` object outlives
/// its event (at 30,000 Services with one slice of 3 endpoints each, reflector stores of the
/// API objects took 111 MiB; these take about a third). Relists replace the whole set when
/// the list completes, as kube's reflector stores do.
struct LeanStore<K, T> {
    kind: Kind,
    state: Arc<Mutex<LeanState<T>>>,
    api: PhantomData<fn(K)>,
}

impl<K, T> Clone for LeanStore<K, T> {
    fn clone(&self) -> Self {
        Self {
            kind: self.kind,
            state: Arc::clone(&self.state),
            api: PhantomData,
        }
    }
}

struct LeanState<T> {
    /// By [`stored_key`].
    objects: HashMap<Box<str>, Arc<T>>,
    /// A list in progress: what it has delivered so far.
    listing: Option<HashMap<Box<str>, Arc<T>>>,
    /// The `last-change-trigger-time` of each event since the last pass took them (network
    /// programming latency; bounded).
    triggers: Vec<std::time::SystemTime>,
}

/// The annotation the `EndpointSlice` controller sets to when the change that caused a
/// slice's update happened (a Pod's or Service's change).
const LAST_CHANGE_TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// The most trigger times kept between two passes.
const TRIGGERS_MAX: usize = 65_536;

/// When the change an API object's update carries happened, if it says.
trait Triggered {
    fn trigger_time(&self) -> Option<std::time::SystemTime>;
}

impl Triggered for EndpointSlice {
    fn trigger_time(&self) -> Option<std::time::SystemTime> {
        let value = self
            .metadata
            .annotations
            .as_ref()?
            .get(LAST_CHANGE_TRIGGER_TIME)?;
        let at: k8s_openapi::jiff::Timestamp = value.parse().ok()?;
        Some(at.into())
    }
}

impl Triggered for Service {
    fn trigger_time(&self) -> Option<std::time::SystemTime> {
        None
    }
}

/// How a store keys an object: `namespace/name` in one allocation (neither part holds a `/`).
fn stored_key(namespace: &str, name: &str) -> Box<str> {
    format!("{namespace}/{name}").into_boxed_str()
}

/// What a kept object says about itself.
trait Kept {
    /// Its `metadata.uid`.
    fn uid(&self) -> Option<&str>;
}

impl Kept for model::Slice {
    fn uid(&self) -> Option<&str> {
        self.uid.as_deref()
    }
}

impl Kept for model::Svc {
    fn uid(&self) -> Option<&str> {
        self.metadata.uid.as_deref()
    }
}

impl<K: kube::Resource + Triggered + Into<T>, T: Kept> LeanStore<K, T> {
    fn new(kind: Kind) -> Self {
        Self {
            kind,
            state: Arc::new(Mutex::new(LeanState {
                objects: HashMap::new(),
                listing: None,
                triggers: Vec::new(),
            })),
            api: PhantomData,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, LeanState<T>> {
        // A panic while holding the lock leaves whole maps behind: the state is usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Applies one watcher event, and says what it means to the source.
    fn apply(&self, item: Result<watcher::Event<K>, watcher::Error>) -> Update {
        let kind = self.kind;
        let key_of = |object: &K| -> ObjectKey {
            let meta = object.meta();
            (
                meta.namespace.clone().unwrap_or_default(),
                meta.name.clone().unwrap_or_default(),
            )
        };
        let mut state = self.state();
        match item {
            Ok(watcher::Event::Apply(object)) => {
                let key = key_of(&object);
                if let Some(at) = object
                    .trigger_time()
                    .filter(|_| state.triggers.len() < TRIGGERS_MAX)
                {
                    state.triggers.push(at);
                }
                (state.objects).insert(stored_key(&key.0, &key.1), Arc::new(object.into()));
                Update::Changed(kind, key)
            }
            Ok(watcher::Event::Delete(object)) => {
                let key = key_of(&object);
                state.objects.remove(&stored_key(&key.0, &key.1));
                Update::Changed(kind, key)
            }
            Ok(watcher::Event::Init) => {
                state.listing = Some(HashMap::new());
                Update::Listing
            }
            Ok(watcher::Event::InitApply(object)) => {
                let key = key_of(&object);
                let listing = state.listing.get_or_insert_default();
                listing.insert(stored_key(&key.0, &key.1), Arc::new(object.into()));
                Update::Listing
            }
            Ok(watcher::Event::InitDone) => {
                let mut listed = state.listing.take().unwrap_or_default();
                listed.shrink_to_fit();
                state.objects = listed;
                Update::Listed(kind)
            }
            Err(e) => Update::Failed(kind, e),
        }
    }

    fn get(&self, namespace: &str, name: &str) -> Option<Arc<T>> {
        self.state()
            .objects
            .get(&stored_key(namespace, name))
            .cloned()
    }

    fn all(&self) -> Vec<Arc<T>> {
        self.state().objects.values().cloned().collect()
    }

    fn uid(&self, namespace: &str, name: &str) -> Option<String> {
        self.get(namespace, name)
            .and_then(|object| object.uid().map(str::to_owned))
    }

    /// The trigger times of the changes since the last call.
    fn take_triggers(&self) -> Vec<std::time::SystemTime> {
        std::mem::take(&mut self.state().triggers)
    }
}

/// The stores the desired state is computed from: Services and slices as the model keeps
/// them, and a kube reflector store of the Node.
#[derive(Clone)]
pub struct Stores {
    services: LeanStore<Service, model::Svc>,
    slices: LeanStore<EndpointSlice, model::Slice>,
    nodes: Store<Node>,
}

impl Stores {
    /// Everything the stores hold now (shared, not copied).
    #[must_use]
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            services: self.services.all(),
            slices: self.slices.all(),
            nodes: self.nodes.state(),
        }
    }

    /// Hands the objects `work` names, as the stores hold them now, to `model`.
    fn hand_over(&self, work: &Work, model: &mut model::Model) {
        for (namespace, name) in &work.services {
            model.set_service(namespace, name, self.services.get(namespace, name));
        }
        for (namespace, name) in &work.slices {
            model.set_slice(namespace, name, self.slices.get(namespace, name));
        }
        if work.nodes {
            model.set_nodes(self.nodes.state());
        }
    }

    /// A reference to the object an error is about, for an Event (with its uid when the
    /// store still has it, so `kubectl describe` shows the Event).
    fn reference(&self, kind: &str, namespace: &str, name: &str) -> ObjectReference {
        let namespace = (!namespace.is_empty()).then(|| namespace.to_owned());
        let (api_version, uid) = match kind {
            "Service" => (
                Service::API_VERSION,
                self.services
                    .uid(namespace.as_deref().unwrap_or_default(), name),
            ),
            "EndpointSlice" => (
                EndpointSlice::API_VERSION,
                self.slices
                    .uid(namespace.as_deref().unwrap_or_default(), name),
            ),
            _ => (Node::API_VERSION, uid_of(&self.nodes, None, name)),
        };
        ObjectReference {
            api_version: Some(api_version.to_owned()),
            kind: Some(kind.to_owned()),
            namespace,
            name: Some(name.to_owned()),
            uid,
            ..ObjectReference::default()
        }
    }
}

fn uid_of<K>(store: &Store<K>, namespace: Option<&str>, name: &str) -> Option<String>
where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    let mut key = ObjectRef::new(name);
    if let Some(ns) = namespace {
        key = key.within(ns);
    }
    store.get(&key).and_then(|o| o.uid())
}

/// How the watchers list: from the API server's watch cache (`resourceVersion=0`), as
/// client-go's informers (kube-proxy's) do, not as a quorum read from etcd in pages of 500. At
/// 30,000 objects per kind that is one response instead of 60 requests, and far less work for
/// the API server, which matters when every node of a large cluster (re)lists at once. A list
/// served from the cache may be slightly older than the newest write; the watch that follows
/// it delivers what came after.
fn list_config() -> watcher::Config {
    watcher::Config::default().any_semantic()
}

/// One listing of what the source follows, with the watches' selectors (Services and
/// `EndpointSlice`s of this proxy, the Node named `node_name`), as the model keeps it: what a
/// relist would hand the model (`inspect diff` compares the maps with it).
///
/// # Errors
/// When a listing fails (which kind, and the API server's error).
pub async fn list_snapshot(client: &Client, node_name: &str) -> anyhow::Result<Snapshot> {
    use kube::api::ListParams;
    let services = Api::<Service>::all(client.clone())
        .list(&ListParams::default().labels(&not_ours_selector()))
        .await
        .context("listing Services")?;
    let slices = Api::<EndpointSlice>::all(client.clone())
        .list(
            &ListParams::default().labels(&format!("{LABEL_SERVICE_NAME},{}", not_ours_selector())),
        )
        .await
        .context("listing EndpointSlices")?;
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default().fields(&format!("metadata.name={node_name}")))
        .await
        .context("listing the Node")?;
    Ok(Snapshot::new(services.items, slices.items, nodes.items))
}

/// The label selector that leaves out objects of other proxies and of headless Services.
fn not_ours_selector() -> String {
    format!("!{LABEL_SERVICE_PROXY_NAME},!{LABEL_HEADLESS}")
}

/// Drops what the model never reads from an object's metadata before the reflector stores it:
/// `managedFields` (often most of an object's size), annotations (`kubectl`'s
/// `last-applied-configuration` holds a second copy of the object), owner references,
/// finalizers, timestamps, generation and resource version (the watcher keeps its own; without
/// it an update that changes nothing the model reads compares equal and recomputes nothing).
/// Names, namespace, labels and uid stay (the model and the Events read them). A model change
/// that reads another field must keep it here.
fn strip_metadata(meta: &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) {
    meta.managed_fields = None;
    meta.annotations = None;
    meta.owner_references = None;
    meta.finalizers = None;
    meta.generate_name = None;
    meta.creation_timestamp = None;
    meta.deletion_timestamp = None;
    meta.deletion_grace_period_seconds = None;
    meta.generation = None;
    meta.resource_version = None;
}

/// [`strip_metadata`], and the parts of a Node's status the model never reads (its image list
/// is often tens of kilobytes).
fn strip_node(node: &mut Node) {
    // A Node being deleted makes this node not eligible (`/healthz`).
    let deleting = node.metadata.deletion_timestamp.take();
    strip_metadata(&mut node.metadata);
    node.metadata.deletion_timestamp = deleting;
    if let Some(status) = node.status.as_mut() {
        status.images = None;
        status.volumes_attached = None;
        status.volumes_in_use = None;
        status.conditions = None;
    }
}

/// An [`Update::HostAddresses`] for each change of the node-facing interfaces' addresses
/// (none without a receiver).
fn host_address_changes(rx: Option<watch::Receiver<HostAddresses>>) -> impl Stream<Item = Update> {
    stream::unfold(rx, |rx| async move {
        let mut rx = rx?;
        rx.changed().await.ok()?;
        Some((Update::HostAddresses, Some(rx)))
    })
}

/// The stores the watches fill and the stream of what they report (with the node-facing
/// interfaces' address changes).
fn watch_all(client: &Client, options: &Options) -> (Stores, impl Stream<Item = Update> + use<>) {
    let (nodes, nodes_writer) = reflector::store();
    let stores = Stores {
        services: LeanStore::new(Kind::Service),
        slices: LeanStore::new(Kind::EndpointSlice),
        nodes,
    };

    let services_stream = watcher(
        Api::<Service>::all(client.clone()),
        list_config().labels(&not_ours_selector()),
    )
    .default_backoff()
    .map({
        let store = stores.services.clone();
        move |e| store.apply(e)
    });
    let slices_stream = watcher(
        Api::<EndpointSlice>::all(client.clone()),
        list_config().labels(&format!("{LABEL_SERVICE_NAME},{}", not_ours_selector())),
    )
    .default_backoff()
    .map({
        let store = stores.slices.clone();
        move |e| store.apply(e)
    });
    let nodes_stream = watcher(
        Api::<Node>::all(client.clone()),
        list_config().fields(&format!("metadata.name={}", options.node_name)),
    )
    .modify(strip_node)
    .default_backoff()
    .reflect(nodes_writer)
    .map(|e| update(Kind::Node, e));
    let updates = stream::select(
        stream::select(
            services_stream,
            host_address_changes(options.host_addresses.clone()),
        ),
        stream::select(slices_stream, nodes_stream),
    );

    (stores, updates)
}

/// Follows the API server and keeps the maps programmed from it, until an error that cannot be
/// retried (none today: API failures are retried forever). `on_first_sync` runs once the first
/// complete state has been applied; its error ends the source. The reconciler is first asked
/// for when the first pass begins (it may still be being built while the stores list).
pub async fn follow<M: DatapathMaps>(
    client: Client,
    options: &Options,
    rec: &mut impl ReconcilerHandle<M>,
    on_first_sync: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let (stores, updates) = watch_all(&client, options);
    let host_addresses = options.host_addresses.clone();
    let metrics = &options.metrics;
    let events = options
        .events
        .then(|| EventPublisher::start(client, &options.node_name, metrics.clone()));
    let mut reporter = ProblemReporter::default();
    let mut said = SaidOnce::default();
    let mut model = model::Model::with_nodeport_addresses(
        &options.node_name,
        options.nodeport_addresses.clone(),
    );
    let mut first_sync = Some(on_first_sync);
    // Boxed: the three watch streams make a large future.
    Box::pin(run_loop(
        updates,
        options.coalesce,
        options.audit_interval,
        metrics,
        |work| {
            let started = std::time::Instant::now();
            if let Some(rx) = &host_addresses {
                model.set_host_addresses(rx.borrow().to_vec());
            }
            let (report, health_checks_changed) =
                sync(&stores, &work, &options.node_name, &mut model, rec, metrics)?;
            let rec = rec.reconciler()?;
            if let Some(publisher) = &options.health_checks
                && (health_checks_changed || work.host_addresses || first_sync.is_some())
            {
                publisher.publish_from(&model);
            }
            metrics.pass(
                work.kind(),
                started.elapsed(),
                rec,
                model.state().errors.len(),
            );
            for at in stores.slices.take_triggers() {
                metrics.programmed_change(at);
            }
            let eligible = stores
                .nodes
                .state()
                .iter()
                .all(|n| crate::health::node_eligible(n));
            metrics.health().set_node_eligible(eligible);
            said.say(&report.errors);
            for problem in reporter.new_problems(model.state(), &report) {
                if let Some(events) = &events {
                    events.publish(
                        stores.reference(&problem.kind, &problem.namespace, &problem.name),
                        &problem,
                    );
                }
            }
            if let Some(f) = first_sync.take() {
                f()?;
            }
            Ok(report.retry_after)
        },
    ))
    .await
}

/// The event loop: collects updates, waits until every kind has listed once, and calls `pass`
/// once per burst of changes (after `coalesce`) with what changed; again after the delay
/// `pass` returns (the reconciler retries what waits for room or failed), and every
/// `audit_interval` with the audit flag set. An error of `pass` ends the loop.
async fn run_loop(
    updates: impl Stream<Item = Update>,
    coalesce: Duration,
    audit_interval: Option<Duration>,
    metrics: &Metrics,
    mut pass: impl FnMut(Work) -> anyhow::Result<Option<Duration>>,
) -> anyhow::Result<()> {
    let mut updates = pin!(updates);
    let mut listed = BTreeSet::new();
    let mut work = Work::default();
    let mut due: Option<Instant> = None;
    let mut audit_due = audit_interval.map(|i| Instant::now() + i);
    loop {
        let ready = listed.len() == 3;
        tokio::select! {
            update = updates.next() => {
                let Some(update) = update else {
                    anyhow::bail!("the Kubernetes watch streams ended");
                };
                match update {
                    Update::Changed(kind, key) => {
                        debug!(kind = %kind, namespace = %key.0, name = %key.1, "changed");
                        metrics.changes(usize::from(kind == Kind::Service), usize::from(kind == Kind::EndpointSlice));
                        work.note(kind, key);
                    }
                    Update::Listed(kind) => {
                        if !listed.insert(kind) {
                            info!(kind = %kind, "relisted");
                            metrics.relisted(kind.as_str());
                        }
                        work.relisted.insert(kind);
                    }
                    Update::Listing => continue,
                    Update::HostAddresses => work.host_addresses = true,
                    Update::Failed(kind, e) => {
                        metrics.watch_failed(kind.as_str());
                        warn!(kind = %kind, error = %e,
                            "watch failed; retrying with backoff, the datapath keeps the last known state");
                        continue;
                    }
                }
                metrics.queued();
                metrics.pending(work.services.len(), work.slices.len());
                let soon = Instant::now() + coalesce;
                due = Some(due.map_or(soon, |d| d.min(soon)));
            }
            () = sleep_until(due), if ready && due.is_some() => {
                due = pass(std::mem::take(&mut work))?.map(|retry| Instant::now() + retry);
            }
            () = sleep_until(audit_due), if ready && audit_due.is_some() => {
                audit_due = audit_interval.map(|i| Instant::now() + i);
                work.audit = true;
                due = Some(Instant::now());
            }
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// One pass: hands what changed to the model and writes what that changed; after a relist,
/// the whole stores and the whole maps; with the audit flag, then checks both against the full
/// computation. Logs what it did. Also says whether the health checks may have changed (the
/// model said so, or an audit may have rebuilt it). The model computes before the reconciler
/// is asked for: at the start its maps may still be being created (about 0.3 s of the first
/// pass at 30,000 Services runs meanwhile).
///
/// # Errors
/// When the reconciler could not be built (the first pass).
fn sync<M: DatapathMaps>(
    stores: &Stores,
    work: &Work,
    node_name: &str,
    model: &mut model::Model,
    handle: &mut impl ReconcilerHandle<M>,
    metrics: &Metrics,
) -> anyhow::Result<(ReconcileReport, bool)> {
    if work.audit
        && *work
            == (Work {
                audit: true,
                ..Work::default()
            })
    {
        // Nothing changed: only the audit (its own log line), no "synced" pass.
        let rec = handle.reconciler()?;
        let report = super::audit::audit(&stores.snapshot(), node_name, model, rec, metrics);
        return Ok((report, true));
    }
    let started = std::time::Instant::now();
    let full = !work.relisted.is_empty();
    let delta = if full {
        model.replace(&stores.snapshot())
    } else {
        stores.hand_over(work, model);
        model.update()
    };
    let computed = started.elapsed();
    let rec = handle.reconciler()?;
    let waited = started.elapsed().saturating_sub(computed);
    let mut report = if full {
        rec.apply(model.state())
    } else {
        rec.apply_delta(model.state(), &delta)
    };
    let health_checks = delta.health_checks;
    if full {
        crate::memory::return_free_memory();
    }
    let took = started.elapsed().saturating_sub(waited);
    let relisted: Vec<String> = work.relisted.iter().map(ToString::to_string).collect();
    let state = model.state();
    info!(
        pass = if full { "full" } else { "incremental" },
        changed_services = work.services.len(),
        changed_slices = work.slices.len(),
        recomputed = model.recomputed(),
        frontends = state.frontends.len(),
        services_written = report.services_written,
        services_deleted = report.services_deleted,
        backends_written = report.backends_written,
        backends_deleted = report.backends_deleted,
        waiting = report.skipped.len(),
        bad_objects = state.errors.len(),
        relisted = relisted.join(","),
        compute_us = computed.as_micros(),
        took_us = took.as_micros(),
        waited_for_maps_us = waited.as_micros(),
        "synced from the API server"
    );
    if work.audit {
        let audit = super::audit::audit(&stores.snapshot(), node_name, model, rec, metrics);
        report.errors.extend(audit.errors.iter().cloned());
        report.skipped.clone_from(&audit.skipped);
        report.retry_after = audit.retry_after;
    }
    Ok((report, health_checks || work.audit))
}

/// Logs each of a pass's errors when it appears, not on every pass (a frontend waiting for
/// room is in every pass's errors until it is programmed).
#[derive(Default)]
struct SaidOnce {
    last: BTreeSet<String>,
}

impl SaidOnce {
    /// Warns the errors the previous pass did not have; remembers these.
    fn say(&mut self, errors: &[String]) {
        let now: BTreeSet<String> = errors.iter().cloned().collect();
        for e in now.difference(&self.last) {
            warn!(error = %e, "not programmed");
        }
        self.last = now;
    }
}

/// One problem to report on an object: a bad field, or a frontend the maps could not hold.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Problem {
    kind: String,
    namespace: String,
    name: String,
    /// `InvalidObject` or `NotProgrammed`.
    reason: &'static str,
    note: String,
}

/// Remembers which problems were reported, so each is reported once when it appears (and again
/// if it goes away and comes back).
#[derive(Default)]
struct ProblemReporter {
    active: BTreeSet<Problem>,
}

impl ProblemReporter {
    /// The problems of this pass that the previous pass did not have; logs each.
    fn new_problems(&mut self, desired: &DesiredState, report: &ReconcileReport) -> Vec<Problem> {
        let now = problems(desired, report);
        let new: Vec<Problem> = now.difference(&self.active).cloned().collect();
        for p in &new {
            warn!(kind = %p.kind, namespace = %p.namespace, name = %p.name, reason = p.reason,
                "{}", p.note);
        }
        self.active = now;
        new
    }
}

fn problems(desired: &DesiredState, report: &ReconcileReport) -> BTreeSet<Problem> {
    let mut out: BTreeSet<Problem> = desired.errors.iter().map(invalid_object).collect();
    for (key, why) in &report.skipped {
        let Some(frontend) = desired.frontends.get(key) else {
            continue;
        };
        let svc = &frontend.service;
        out.insert(Problem {
            kind: "Service".to_owned(),
            namespace: svc.namespace.to_string(),
            name: svc.name.to_string(),
            reason: "NotProgrammed",
            note: format!(
                "frontend {key} (port {:?}) not programmed: {why}",
                svc.port_name
            ),
        });
    }
    out
}

fn invalid_object(e: &ObjectError) -> Problem {
    Problem {
        kind: e.kind.to_owned(),
        namespace: e.namespace.clone(),
        name: e.name.clone(),
        reason: "InvalidObject",
        note: format!("{}: {} (skipped by svc-agent)", e.field, e.reason),
    }
}

/// Publishes Events from a task of its own, so a slow or failing API server never holds up
/// programming the maps.
struct EventPublisher {
    queue: mpsc::Sender<(ObjectReference, KubeEvent, &'static str)>,
    metrics: Metrics,
}

impl EventPublisher {
    fn start(client: Client, node_name: &str, metrics: Metrics) -> Self {
        let recorder = Recorder::new(
            client,
            Reporter {
                controller: EVENT_CONTROLLER.to_owned(),
                instance: Some(format!("{EVENT_CONTROLLER}-{node_name}")),
            },
        );
        let (queue, mut rx) = mpsc::channel::<(ObjectReference, KubeEvent, _)>(EVENT_QUEUE);
        let counts = metrics.clone();
        tokio::spawn(async move {
            while let Some((reference, event, reason)) = rx.recv().await {
                let result =
                    match tokio::time::timeout(EVENT_TIMEOUT, recorder.publish(&event, &reference))
                        .await
                    {
                        Ok(Ok(())) => {
                            debug!(reason = %event.reason, "published an event");
                            EventResult::Published
                        }
                        Ok(Err(e)) => {
                            warn!(error = %e, reason = %event.reason, "could not publish an event");
                            EventResult::Failed
                        }
                        Err(_) => {
                            warn!(reason = %event.reason, "publishing an event timed out");
                            EventResult::Failed
                        }
                    };
                counts.event(reason, result);
            }
        });
        Self { queue, metrics }
    }

    fn publish(&self, reference: ObjectReference, problem: &Problem) {
        let mut note = problem.note.clone();
        if note.len() > EVENT_NOTE_MAX {
            let mut cut = EVENT_NOTE_MAX;
            while !note.is_char_boundary(cut) {
                cut -= 1;
            }
            note.truncate(cut);
        }
        let event = KubeEvent {
            type_: EventType::Warning,
            reason: problem.reason.to_owned(),
            note: Some(note),
            action: "Program".to_owned(),
            secondary: None,
        };
        if self
            .queue
            .try_send((reference, event, problem.reason))
            .is_err()
        {
            self.metrics.event(problem.reason, EventResult::Dropped);
            warn!(
                reason = problem.reason,
                "event queue full; an event was dropped (the log line above has it)"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn stores_keep_only_what_the_model_reads() {
        let mut node: Node = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "node1",
                "labels": {"topology.kubernetes.io/zone": "z1"},
                "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"},
                "managedFields": [{"manager": "kubelet", "operation": "Update"}],
            },
            "status": {
                "addresses": [{"type": "InternalIP", "address": "198.18.0.1"}],
                "images": [{"names": ["registry.example/app:1"], "sizeBytes": 1}],
                "conditions": [{"type": "Ready", "status": "True"}],
            },
        }))
        .unwrap();
        strip_node(&mut node);
        assert_eq!(
            serde_json::to_value(&node).unwrap(),
            serde_json::json!({
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": "node1", "labels": {"topology.kubernetes.io/zone": "z1"}},
                "status": {"addresses": [{"type": "InternalIP", "address": "198.18.0.1"}]},
            })
        );
    }

    /// A Service and its slice as the API server sends them (kubectl's annotation, the
    /// controller's owner reference, labels, generated name, full `targetRef`s, hostnames).
    fn as_served() -> (Service, EndpointSlice) {
        let svc = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "web", "namespace": "default", "uid": "u-svc", "resourceVersion": "17",
                "creationTimestamp": "2026-12-01T00:00:00Z",
                "labels": {"app": "web"},
                "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"},
                "finalizers": ["service.kubernetes.io/load-balancer-cleanup"],
            },
            "spec": {
                "type": "ClusterIP", "clusterIP": "198.19.0.10", "clusterIPs": ["198.19.0.10"],
                "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
                "sessionAffinity": "ClientIP",
            },
            "status": {"conditions": [{"type": "Ready", "status": "True", "reason": "x",
                "message": "y", "lastTransitionTime": "2026-12-01T00:00:00Z"}]},
        }))
        .unwrap();
        let slice = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "web-abcde", "generateName": "web-", "namespace": "default",
                "uid": "u-slice", "resourceVersion": "18", "generation": 3,
                "labels": {"kubernetes.io/service-name": "web",
                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"},
                "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": "web",
                    "uid": "u-svc", "controller": true, "blockOwnerDeletion": true}],
            },
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [
                {"addresses": ["198.18.2.10"], "conditions": {"ready": true}, "hostname": "web-0",
                 "nodeName": "node1", "zone": "z1",
                 "hints": {"forZones": [{"name": "z1"}]},
                 "targetRef": {"kind": "Pod", "name": "web-0", "namespace": "default",
                    "uid": "u-pod", "resourceVersion": "5"}},
                {"addresses": ["198.18.2.11"], "conditions": {"ready": false, "serving": true,
                    "terminating": true}, "nodeName": "node2",
                 "targetRef": {"kind": "Pod", "name": "web-1", "namespace": "default"}},
            ],
        }))
        .unwrap();
        (svc, slice)
    }

    /// The slice store follows watch events as kube's reflector stores do: events change one
    /// object, a relist replaces the whole set when it completes (until then the old set
    /// stays), and every event says what it means to the source.
    #[test]
    fn the_slice_store_follows_events_and_relists() {
        let (_, served) = as_served();
        let slice_called = |name: &str| {
            let mut s = served.clone();
            s.metadata.name = Some(name.to_owned());
            s
        };
        let store = LeanStore::<EndpointSlice, model::Slice>::new(Kind::EndpointSlice);
        let held = |store: &LeanStore<EndpointSlice, model::Slice>| -> Vec<String> {
            let mut list: Vec<String> = store.all().iter().filter_map(|s| s.name.clone()).collect();
            list.sort();
            list
        };
        let changed = |u: Update, name: &str| {
            assert!(
                matches!(&u, Update::Changed(Kind::EndpointSlice, (ns, n)) if ns == "default" && n == name),
                "{u:?}"
            );
        };
        assert!(matches!(
            store.apply(Ok(watcher::Event::Init)),
            Update::Listing
        ));
        let update = store.apply(Ok(watcher::Event::InitApply(slice_called("a"))));
        assert!(matches!(update, Update::Listing));
        assert!(held(&store).is_empty(), "a list in progress is not seen");
        let update = store.apply(Ok(watcher::Event::InitDone));
        assert!(matches!(update, Update::Listed(Kind::EndpointSlice)));
        assert_eq!(held(&store), ["a"]);
        changed(
            store.apply(Ok(watcher::Event::Apply(slice_called("b")))),
            "b",
        );
        assert_eq!(held(&store), ["a", "b"]);
        let kept = store.get("default", "b").unwrap();
        assert_eq!(*kept, model::Slice::from(slice_called("b")));
        assert_eq!(kept.uid.as_deref(), Some("u-slice"));
        changed(
            store.apply(Ok(watcher::Event::Delete(slice_called("a")))),
            "a",
        );
        assert_eq!(held(&store), ["b"]);
        // A relist: the old set stays until the list completes, then only the listed remain.
        store.apply(Ok(watcher::Event::Init));
        store.apply(Ok(watcher::Event::InitApply(slice_called("c"))));
        assert_eq!(held(&store), ["b"]);
        store.apply(Ok(watcher::Event::InitDone));
        assert_eq!(held(&store), ["c"]);
        assert!(store.get("default", "b").is_none());
        assert_eq!(
            Stores {
                services: LeanStore::new(Kind::Service),
                slices: store.clone(),
                nodes: reflector::store().0,
            }
            .reference("EndpointSlice", "default", "c")
            .uid
            .as_deref(),
            Some("u-slice")
        );
    }

    #[test]
    fn the_selector_leaves_out_other_proxies_and_headless_services() {
        assert_eq!(
            not_ours_selector(),
            "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"
        );
    }

    fn error(field: &str) -> ObjectError {
        ObjectError {
            kind: "Service",
            namespace: "default".into(),
            name: "web".into(),
            field: field.into(),
            reason: "not an IP address: \"10.0.0.300\"".into(),
        }
    }

    #[test]
    fn problems_are_reported_once_when_they_appear() {
        let mut reporter = ProblemReporter::default();
        let mut desired = DesiredState {
            errors: vec![error("spec.clusterIP")],
            ..DesiredState::default()
        };
        let report = ReconcileReport::default();
        let first = reporter.new_problems(&desired, &report);
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].reason, "InvalidObject");
        assert_eq!(first[0].name, "web");
        assert!(
            first[0]
                .note
                .starts_with("spec.clusterIP: not an IP address")
        );
        assert!(
            reporter.new_problems(&desired, &report).is_empty(),
            "reported twice"
        );
        desired.errors.clear();
        assert!(reporter.new_problems(&desired, &report).is_empty());
        desired.errors.push(error("spec.clusterIP"));
        assert_eq!(
            reporter.new_problems(&desired, &report).len(),
            1,
            "a problem that came back is reported again"
        );
    }

    #[test]
    fn a_full_map_is_reported_on_the_service_with_the_map_and_its_size() {
        use crate::model::{EmptyAction, Frontend, FrontendKey, Protocol, Scope, ServicePortRef};
        let key = FrontendKey {
            addr: "198.19.0.7".parse().unwrap(),
            port: 443,
            proto: Protocol::Tcp,
            scope: Scope::Internal,
        };
        let frontend = Frontend {
            kind: crate::model::FrontendKind::ClusterIp,
            source_ranges: Vec::new(),
            service: ServicePortRef {
                namespace: "shop".into(),
                name: "api".into(),
                port_name: "https".into(),
            },
            affinity_timeout: None,
            local_only: false,
            backends: Vec::new(),
            kept_backends: Vec::new(),
            unready_backends: Vec::new(),
            on_empty: EmptyAction::Reject,
        };
        let desired = DesiredState {
            frontends: [(key, frontend.into())].into(),
            ..DesiredState::default()
        };
        let report = ReconcileReport {
            skipped: vec![(key, "map SERVICES_V1 is full (4096 entries)".to_owned())],
            ..ReconcileReport::default()
        };
        let found = ProblemReporter::default().new_problems(&desired, &report);
        assert_eq!(found.len(), 1);
        let p = &found[0];
        assert_eq!(
            (p.kind.as_str(), p.namespace.as_str(), p.name.as_str()),
            ("Service", "shop", "api")
        );
        assert_eq!(p.reason, "NotProgrammed");
        assert!(
            p.note.contains("SERVICES_V1 is full (4096 entries)"),
            "{}",
            p.note
        );
        assert!(
            p.note.contains("198.19.0.7:443/TCP") || p.note.contains("198.19.0.7"),
            "{}",
            p.note
        );
    }

    fn key(name: &str) -> ObjectKey {
        ("default".to_owned(), name.to_owned())
    }

    /// The work of every pass so far.
    type Passes = Arc<std::sync::Mutex<Vec<Work>>>;

    /// Runs `run_loop` over a channel; every pass's work is recorded, and each pass returns
    /// the next retry delay from `retries` (then none).
    fn looping(
        audit: Option<Duration>,
        mut retries: Vec<Duration>,
    ) -> (
        mpsc::UnboundedSender<Update>,
        Passes,
        tokio::task::JoinHandle<anyhow::Result<()>>,
    ) {
        let (tx, rx) = mpsc::unbounded_channel();
        let updates = tokio_stream_of(rx);
        let passes = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = Arc::clone(&passes);
        retries.reverse();
        let task = tokio::spawn(async move {
            run_loop(
                updates,
                Duration::from_millis(5),
                audit,
                &Metrics::default(),
                move |work| {
                    seen.lock().unwrap().push(work);
                    Ok(retries.pop())
                },
            )
            .await
        });
        (tx, passes, task)
    }

    #[tokio::test]
    async fn nothing_is_applied_before_every_kind_has_listed() {
        let (tx, passes, looping) = looping(None, Vec::new());
        let wait = || tokio::time::sleep(Duration::from_millis(50));
        tx.send(Update::Listed(Kind::Service)).unwrap();
        tx.send(Update::Changed(Kind::Service, key("web"))).unwrap();
        tx.send(Update::Listed(Kind::EndpointSlice)).unwrap();
        wait().await;
        assert!(passes.lock().unwrap().is_empty(), "applied a partial view");
        tx.send(Update::Listed(Kind::Node)).unwrap();
        wait().await;
        assert_eq!(
            passes.lock().unwrap().len(),
            1,
            "one pass for the whole burst"
        );
        // A burst of changes is coalesced into one pass, which names each changed object once.
        for i in 0..10 {
            tx.send(Update::Changed(
                Kind::EndpointSlice,
                key(&format!("web-{}", i % 3)),
            ))
            .unwrap();
        }
        wait().await;
        {
            let passes = passes.lock().unwrap();
            assert_eq!(passes.len(), 2);
            assert_eq!(
                passes[1],
                Work {
                    slices: (0..3).map(|i| key(&format!("web-{i}"))).collect(),
                    ..Work::default()
                }
            );
        }
        // Listing events and failures alone do not cause a pass.
        tx.send(Update::Listing).unwrap();
        wait().await;
        assert_eq!(passes.lock().unwrap().len(), 2);
        // A relist does, and says which kind relisted.
        tx.send(Update::Listed(Kind::Service)).unwrap();
        wait().await;
        let passes_now = passes.lock().unwrap().clone();
        assert_eq!(passes_now.len(), 3);
        assert_eq!(passes_now[2].relisted, BTreeSet::from([Kind::Service]));
        drop(tx);
        let ended = looping.await.unwrap();
        assert!(
            ended.is_err(),
            "the loop ends with an error when the streams end"
        );
    }

    #[tokio::test]
    async fn a_pass_that_asks_for_a_retry_gets_an_empty_one_and_audits_come_by_themselves() {
        let (tx, passes, looping) = looping(
            Some(Duration::from_millis(300)),
            vec![Duration::ZERO, Duration::from_millis(20)],
        );
        for kind in [Kind::Service, Kind::EndpointSlice, Kind::Node] {
            tx.send(Update::Listed(kind)).unwrap();
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
        {
            let passes = passes.lock().unwrap();
            assert_eq!(
                passes.len(),
                3,
                "the first pass, then two retries: {passes:?}"
            );
            assert_eq!(passes[1], Work::default(), "a retry carries no change");
            assert_eq!(passes[2], Work::default());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        {
            let passes = passes.lock().unwrap();
            assert_eq!(passes.len(), 4, "{passes:?}");
            assert!(passes[3].audit);
        }
        looping.abort();
    }

    fn tokio_stream_of(mut rx: mpsc::UnboundedReceiver<Update>) -> impl Stream<Item = Update> {
        stream::poll_fn(move |cx| rx.poll_recv(cx))
    }
}
