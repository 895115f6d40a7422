//! A load generator for the control plane: it changes Services and `EndpointSlices` through a
//! `kube::Client` at a set rate, in the shapes a cluster's controllers produce, and reports
//! when each write was acknowledged, so a benchmark can time how long every node takes to
//! program it. It works against the test API server ([`ApiServer`](crate::apiserver::ApiServer)
//! started with [`Options::writable`](crate::apiserver::Options::writable)) and against a real
//! API server (a kind cluster) alike: it only creates, replaces and deletes objects.
//!
//! The shapes, on Services of `replicas` endpoints drawn from a pool of pods:
//!
//! - **Rollout** (a Deployment with `maxSurge: 1, maxUnavailable: 0`), for each old pod in
//!   turn: a new endpoint appears not ready, becomes ready, the old one becomes terminating
//!   (`ready: false, serving: true, terminating: true`), then is removed. Four writes per pod.
//! - **HPA**: `hpa_step` endpoints appear not ready, then become ready (scale up); later the
//!   same number become terminating, then are removed (scale down).
//! - **Churn**: other Services are created (their slice, then the Service) and deleted (the
//!   Service, then its slice).
//!
//! The writes are planned first ([`plan`], a pure function: the slice after each write and
//! what a node must then program) and executed by [`run`]. Services carry no selector and the
//! slices are labelled `endpointslice.kubernetes.io/managed-by: svc-loadgen`, so a real
//! cluster's `EndpointSlice` controller leaves them alone; every slice write sets
//! `endpoints.kubernetes.io/last-change-trigger-time` as that controller does, so an agent's
//! (or kube-proxy's) `kubeproxy_network_programming_duration_seconds` covers it too.
//!
//! What a node programs for a Service ([`Expect`]): its ready endpoints, or, when none is
//! ready, its serving terminating ones; not-ready endpoints never. A write that does not
//! change that set (a not-ready endpoint appearing, a terminating one leaving while others are
//! ready) has nothing to wait for: [`Expect::Unchanged`].

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use k8s_openapi::{api::core::v1::Service, api::discovery::v1::EndpointSlice};
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, PostParams},
};
use serde_json::{Value, json};

/// The `managed-by` label value on everything the generator writes.
pub const MANAGED_BY: &str = "svc-loadgen";

/// The annotation the `EndpointSlice` controller sets to the time of the change that caused a
/// write (what network programming latency is measured from).
pub const TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// A pod whose address can be an endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolPod {
    /// The pod's address (the family of the Services' `ClusterIPs`).
    pub ip: IpAddr,
    /// The node it runs on (`nodeName` of its endpoint).
    pub node: String,
    /// Its name (`targetRef.name`).
    pub name: String,
}

/// A Service the generator writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    /// `metadata.name`.
    pub name: String,
    /// `spec.clusterIP`; `None`: the API server allocates one (a real one does; the test API
    /// server does not).
    pub cluster_ip: Option<IpAddr>,
}

/// What to generate.
#[derive(Clone, Debug)]
pub struct Config {
    /// The namespace of every object.
    pub namespace: String,
    /// Services that exist throughout (created first) and get rolled and scaled: clients send
    /// their requests to these.
    pub services: Vec<ServiceSpec>,
    /// Services created and deleted in the churn phase (no traffic goes to them).
    pub churn: Vec<ServiceSpec>,
    /// Ready endpoints per Service outside of a rollout or a scale-up.
    pub replicas: usize,
    /// Endpoints an HPA step adds and later removes (0: no HPA phase).
    pub hpa_step: usize,
    /// How many times the rollout, HPA and churn phases repeat.
    pub rounds: usize,
    /// The Services' port.
    pub port: u16,
    /// The pods' port (the slices' port).
    pub target_port: u16,
    /// Writes per second.
    pub rate: f64,
}

impl Config {
    /// Checks that the plan can be made with `pool`.
    pub fn check(&self, pool: &[PoolPod]) -> anyhow::Result<()> {
        ensure!(self.replicas > 0, "a Service needs at least one replica");
        ensure!(
            pool.len() > self.replicas && pool.len() >= self.replicas + self.hpa_step,
            "a pool of {} pods is too small for {} replicas (a rollout needs one pod more, an \
             HPA step of {} needs that many more)",
            pool.len(),
            self.replicas,
            self.hpa_step
        );
        ensure!(
            self.rate.is_finite() && self.rate > 0.0,
            "the write rate must be a positive number of writes per second, not {}",
            self.rate
        );
        let mut names = BTreeSet::new();
        for s in self.services.iter().chain(&self.churn) {
            ensure!(
                names.insert(s.name.as_str()),
                "Service name {:?} given twice",
                s.name
            );
        }
        Ok(())
    }
}

/// The phase a write belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Phase {
    /// Creating the long-lived Services.
    Setup,
    /// Rolling updates.
    Rollout,
    /// HPA scale-ups and scale-downs.
    Hpa,
    /// Other Services created and deleted.
    Churn,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Setup => "setup",
            Self::Rollout => "rollout",
            Self::Hpa => "hpa",
            Self::Churn => "churn",
        })
    }
}

/// An endpoint's conditions, as the `EndpointSlice` controller writes them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Condition {
    /// Its pod is starting (`ready: false, serving: false, terminating: false`).
    NotReady,
    /// `ready: true, serving: true, terminating: false`.
    Ready,
    /// Its pod got its deletion (`ready: false, serving: true, terminating: true`).
    Terminating,
}

/// One endpoint of a planned slice: a pool pod (by index) and its conditions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SliceEndpoint {
    /// Index into the pool.
    pub pod: usize,
    /// Its conditions.
    pub condition: Condition,
}

/// What one write does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// `POST` the Service's slice with these endpoints.
    CreateSlice(Vec<SliceEndpoint>),
    /// `POST` the Service.
    CreateService,
    /// `PUT` the Service's slice with these endpoints.
    ReplaceSlice(Vec<SliceEndpoint>),
    /// `DELETE` the Service.
    DeleteService,
    /// `DELETE` the Service's slice.
    DeleteSlice,
}

impl Op {
    /// A short name for tables (`replace slice`, ...).
    #[must_use]
    pub fn name(&self) -> &'static str {
        match self {
            Self::CreateSlice(_) => "create slice",
            Self::CreateService => "create service",
            Self::ReplaceSlice(_) => "replace slice",
            Self::DeleteService => "delete service",
            Self::DeleteSlice => "delete slice",
        }
    }
}

/// What a node must program for the Service once a write is done.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expect {
    /// Nothing changes (nothing to time).
    Unchanged,
    /// The Service's frontend picks among exactly these backend addresses.
    Backends(BTreeSet<IpAddr>),
    /// The Service has no frontend.
    Absent,
}

/// One planned write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Planned {
    /// Index into `services` then `churn` of the [`Config`].
    pub service: usize,
    /// Which phase it belongs to.
    pub phase: Phase,
    /// The write.
    pub op: Op,
    /// What nodes must program after it.
    pub expect: Expect,
}

/// The backends a node programs for these endpoints (see the [module docs](self)).
#[must_use]
pub fn programmed(endpoints: &[SliceEndpoint], pool: &[PoolPod]) -> BTreeSet<IpAddr> {
    let pick = |c: Condition| -> BTreeSet<IpAddr> {
        endpoints
            .iter()
            .filter(|e| e.condition == c)
            .filter_map(|e| pool.get(e.pod).map(|p| p.ip))
            .collect()
    };
    let ready = pick(Condition::Ready);
    if ready.is_empty() {
        pick(Condition::Terminating)
    } else {
        ready
    }
}

/// Per Service: its slice's endpoints and what nodes program for it (`None`: no frontend).
struct State<'a> {
    pool: &'a [PoolPod],
    slices: BTreeMap<usize, Vec<SliceEndpoint>>,
    frontends: BTreeMap<usize, BTreeSet<IpAddr>>,
    /// Next pool pod a Service's new endpoint is taken from (rotates over the pool).
    next_pod: BTreeMap<usize, usize>,
}

impl<'a> State<'a> {
    fn new(pool: &'a [PoolPod]) -> Self {
        Self {
            pool,
            slices: BTreeMap::new(),
            frontends: BTreeMap::new(),
            next_pod: BTreeMap::new(),
        }
    }

    /// Records a write of `service`'s slice (`None`: deleted) and the Service (`exists`).
    fn write(
        &mut self,
        service: usize,
        phase: Phase,
        op: Op,
        slice: Option<Vec<SliceEndpoint>>,
        exists: bool,
    ) -> Planned {
        match slice {
            Some(s) => self.slices.insert(service, s),
            None => self.slices.remove(&service),
        };
        let now = exists.then(|| {
            programmed(
                self.slices.get(&service).map_or(&[][..], Vec::as_slice),
                self.pool,
            )
        });
        let before = self.frontends.get(&service).cloned();
        let expect = match (&before, &now) {
            (b, n) if b == n => Expect::Unchanged,
            (_, Some(n)) => Expect::Backends(n.clone()),
            (_, None) => Expect::Absent,
        };
        match now {
            Some(n) => self.frontends.insert(service, n),
            None => self.frontends.remove(&service),
        };
        Planned {
            service,
            phase,
            op,
            expect,
        }
    }

    fn slice(&self, service: usize) -> Vec<SliceEndpoint> {
        self.slices.get(&service).cloned().unwrap_or_default()
    }

    /// A pool pod neither among `service`'s endpoints nor in `taken`, rotating over the pool
    /// (the plan's checks leave enough pods for one).
    fn free_pod(&mut self, service: usize, taken: &[usize]) -> usize {
        let used: BTreeSet<usize> = self
            .slice(service)
            .iter()
            .map(|e| e.pod)
            .chain(taken.iter().copied())
            .collect();
        let start = self.next_pod.get(&service).copied().unwrap_or(service);
        let n = self.pool.len();
        let pod = (0..n)
            .map(|k| (start + k) % n)
            .find(|p| !used.contains(p))
            .unwrap_or(start % n);
        self.next_pod.insert(service, pod + 1);
        pod
    }

    /// Creating `service` with `replicas` ready endpoints: its slice, then the Service.
    fn create(&mut self, service: usize, replicas: usize, phase: Phase) -> Vec<Planned> {
        let mut pods = Vec::new();
        for _ in 0..replicas {
            let pod = self.free_pod(service, &pods);
            pods.push(pod);
        }
        let endpoints: Vec<SliceEndpoint> = pods
            .into_iter()
            .map(|pod| SliceEndpoint {
                pod,
                condition: Condition::Ready,
            })
            .collect();
        vec![
            self.write(
                service,
                phase,
                Op::CreateSlice(endpoints.clone()),
                Some(endpoints),
                false,
            ),
            self.write(
                service,
                phase,
                Op::CreateService,
                Some(self.slice(service)),
                true,
            ),
        ]
    }

    fn delete(&mut self, service: usize) -> Vec<Planned> {
        let slice = self.slice(service);
        vec![
            self.write(service, Phase::Churn, Op::DeleteService, Some(slice), false),
            self.write(service, Phase::Churn, Op::DeleteSlice, None, false),
        ]
    }

    fn replace(
        &mut self,
        service: usize,
        phase: Phase,
        edit: impl FnOnce(&mut Vec<SliceEndpoint>),
    ) -> Planned {
        let mut slice = self.slice(service);
        edit(&mut slice);
        self.write(
            service,
            phase,
            Op::ReplaceSlice(slice.clone()),
            Some(slice),
            true,
        )
    }

    /// A rolling update of `service` (maxSurge 1, maxUnavailable 0): every current endpoint
    /// replaced in turn, four writes each.
    fn rollout(&mut self, service: usize) -> Vec<Planned> {
        let old: Vec<usize> = self.slice(service).iter().map(|e| e.pod).collect();
        let mut out = Vec::new();
        for old_pod in old {
            let new_pod = self.free_pod(service, &[]);
            let set = |pod: usize, c: Condition| {
                move |s: &mut Vec<SliceEndpoint>| {
                    for e in s.iter_mut().filter(|e| e.pod == pod) {
                        e.condition = c;
                    }
                }
            };
            out.push(self.replace(service, Phase::Rollout, |s| {
                s.push(SliceEndpoint {
                    pod: new_pod,
                    condition: Condition::NotReady,
                });
            }));
            out.push(self.replace(service, Phase::Rollout, set(new_pod, Condition::Ready)));
            out.push(self.replace(
                service,
                Phase::Rollout,
                set(old_pod, Condition::Terminating),
            ));
            out.push(self.replace(service, Phase::Rollout, |s| {
                s.retain(|e| e.pod != old_pod);
            }));
        }
        out
    }

    /// An HPA scale-up by `step` endpoints and the scale-down after it: four writes.
    fn hpa(&mut self, service: usize, step: usize) -> Vec<Planned> {
        let mut added = Vec::new();
        for _ in 0..step {
            let pod = self.free_pod(service, &added);
            added.push(pod);
        }
        let set = |c: Condition, added: Vec<usize>| {
            move |s: &mut Vec<SliceEndpoint>| {
                for e in s.iter_mut().filter(|e| added.contains(&e.pod)) {
                    e.condition = c;
                }
            }
        };
        let mut out = Vec::new();
        let new = added.clone();
        out.push(self.replace(service, Phase::Hpa, move |s| {
            s.extend(new.iter().map(|&pod| SliceEndpoint {
                pod,
                condition: Condition::NotReady,
            }));
        }));
        out.push(self.replace(service, Phase::Hpa, set(Condition::Ready, added.clone())));
        out.push(self.replace(
            service,
            Phase::Hpa,
            set(Condition::Terminating, added.clone()),
        ));
        out.push(self.replace(service, Phase::Hpa, move |s| {
            s.retain(|e| !added.contains(&e.pod));
        }));
        out
    }
}

/// Interleaves per-Service sequences round-robin (first writes of every Service, then second
/// writes, ...), so writes to one Service are spread out.
fn interleave(sequences: Vec<Vec<Planned>>) -> Vec<Planned> {
    let longest = sequences.iter().map(Vec::len).max().unwrap_or(0);
    let mut iters: Vec<_> = sequences.into_iter().map(IntoIterator::into_iter).collect();
    let mut out = Vec::new();
    for _ in 0..longest {
        for it in &mut iters {
            out.extend(it.next());
        }
    }
    out
}

/// Every write of a run, in order (see the [module docs](self)).
pub fn plan(config: &Config, pool: &[PoolPod]) -> anyhow::Result<Vec<Planned>> {
    config.check(pool)?;
    let mut state = State::new(pool);
    let rolled = 0..config.services.len();
    let churned = config.services.len()..config.services.len() + config.churn.len();
    let mut out = Vec::new();
    // Each step is computed once its Service's previous one is known: a phase is planned per
    // Service in turn, then interleaved (Services are independent of each other).
    out.extend(interleave(
        rolled
            .clone()
            .map(|s| state.create(s, config.replicas, Phase::Setup))
            .collect(),
    ));
    for _ in 0..config.rounds {
        out.extend(interleave(
            rolled.clone().map(|s| state.rollout(s)).collect(),
        ));
        if config.hpa_step > 0 {
            out.extend(interleave(
                rolled
                    .clone()
                    .map(|s| state.hpa(s, config.hpa_step))
                    .collect(),
            ));
        }
        out.extend(interleave(
            churned
                .clone()
                .map(|s| {
                    let mut seq = state.create(s, config.replicas, Phase::Churn);
                    seq.extend(state.delete(s));
                    seq
                })
                .collect(),
        ));
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Running the plan
// ---------------------------------------------------------------------------------------------

/// One write as it happened.
#[derive(Clone, Debug)]
pub struct Written {
    /// Its place in the plan (0-based).
    pub seq: usize,
    /// The Service's name.
    pub service: String,
    /// The Service's `ClusterIP` (as given, or as the API server allocated it).
    pub cluster_ip: Option<IpAddr>,
    /// The planned write.
    pub planned: Planned,
    /// When it was sent.
    pub sent: Instant,
    /// When the API server acknowledged it (its response arrived): latencies start here.
    pub acked: Instant,
}

/// The name of `service`'s slice.
#[must_use]
pub fn slice_name(service: &str) -> String {
    format!("{service}-loadgen")
}

/// The `EndpointSlice` object of `service` with `endpoints` (IPv4 or IPv6 after the first
/// pool pod's family).
#[must_use]
pub fn slice_json(
    config: &Config,
    service: &str,
    endpoints: &[SliceEndpoint],
    pool: &[PoolPod],
    resource_version: Option<&str>,
) -> Value {
    let family = if pool.first().is_some_and(|p| p.ip.is_ipv6()) {
        "IPv6"
    } else {
        "IPv4"
    };
    let endpoints: Vec<Value> = endpoints
        .iter()
        .filter_map(|e| {
            let pod = pool.get(e.pod)?;
            let (ready, serving, terminating) = match e.condition {
                Condition::NotReady => (false, false, false),
                Condition::Ready => (true, true, false),
                Condition::Terminating => (false, true, true),
            };
            Some(json!({
                "addresses": [pod.ip.to_string()],
                "conditions": {"ready": ready, "serving": serving, "terminating": terminating},
                "nodeName": pod.node,
                "targetRef": {"kind": "Pod", "name": pod.name, "namespace": config.namespace},
            }))
        })
        .collect();
    let mut metadata = json!({
        "name": slice_name(service),
        "namespace": config.namespace,
        "labels": {
            "kubernetes.io/service-name": service,
            "endpointslice.kubernetes.io/managed-by": MANAGED_BY,
        },
        "annotations": {TRIGGER_TIME: k8s_openapi::jiff::Timestamp::now().to_string()},
    });
    if let Some(rv) = resource_version {
        metadata["resourceVersion"] = rv.into();
    }
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": metadata,
        "addressType": family,
        "endpoints": endpoints,
        "ports": [{"name": "http", "port": config.target_port, "protocol": "TCP"}],
    })
}

/// The Service object of `spec` (no selector: the generator writes its slices).
#[must_use]
pub fn service_json(config: &Config, spec: &ServiceSpec) -> Value {
    let mut object = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": spec.name,
            "namespace": config.namespace,
            "labels": {"app.kubernetes.io/managed-by": MANAGED_BY},
        },
        "spec": {
            "type": "ClusterIP",
            "ports": [{
                "name": "http",
                "port": config.port,
                "protocol": "TCP",
                "targetPort": config.target_port,
            }],
        },
    });
    if let Some(ip) = spec.cluster_ip {
        let family = if ip.is_ipv6() { "IPv6" } else { "IPv4" };
        object["spec"]["clusterIP"] = ip.to_string().into();
        object["spec"]["clusterIPs"] = json!([ip.to_string()]);
        object["spec"]["ipFamilies"] = json!([family]);
    }
    object
}

/// Executes plans through a `kube::Client`, remembering between calls what the API server
/// answered (the slices' resource versions, allocated `ClusterIPs`), so a plan can be run in
/// parts (the setup, then the rest while traffic flows).
pub struct Generator<'a> {
    config: &'a Config,
    pool: &'a [PoolPod],
    services: Api<Service>,
    slices: Api<EndpointSlice>,
    cluster_ips: BTreeMap<usize, IpAddr>,
    slice_versions: BTreeMap<usize, String>,
}

impl<'a> Generator<'a> {
    /// A generator writing through `client`; fails when `config` does not fit `pool`.
    pub fn new(client: &Client, config: &'a Config, pool: &'a [PoolPod]) -> anyhow::Result<Self> {
        config.check(pool)?;
        Ok(Self {
            config,
            pool,
            services: Api::namespaced(client.clone(), &config.namespace),
            slices: Api::namespaced(client.clone(), &config.namespace),
            cluster_ips: config
                .services
                .iter()
                .chain(&config.churn)
                .enumerate()
                .filter_map(|(i, s)| Some((i, s.cluster_ip?)))
                .collect(),
            slice_versions: BTreeMap::new(),
        })
    }

    /// The `ClusterIP` of Service `service` (index as in [`Planned::service`]), once known.
    #[must_use]
    pub fn cluster_ip(&self, service: usize) -> Option<IpAddr> {
        self.cluster_ips.get(&service).copied()
    }

    /// Executes `planned` (whose first write is write `first_seq` of the whole plan) at the
    /// configured rate: write `i` is sent `i / rate` after the call, or as soon as the one
    /// before it is acknowledged when the API server is slower. Calls `on_write` after each
    /// acknowledgement. Fails at the first write the API server refuses, naming it.
    pub async fn run(
        &mut self,
        planned: &[Planned],
        first_seq: usize,
        mut on_write: impl FnMut(&Written),
    ) -> anyhow::Result<Vec<Written>> {
        let start = tokio::time::Instant::now();
        let mut done = Vec::with_capacity(planned.len());
        for (i, p) in planned.iter().enumerate() {
            #[expect(
                clippy::cast_precision_loss,
                reason = "a write's index, far below 2^52"
            )]
            let due = start + Duration::from_secs_f64(i as f64 / self.config.rate);
            tokio::time::sleep_until(due).await;
            let sent = Instant::now();
            let service = self.write(first_seq + i, p).await?;
            let written = Written {
                seq: first_seq + i,
                service,
                cluster_ip: self.cluster_ip(p.service),
                planned: p.clone(),
                sent,
                acked: Instant::now(),
            };
            on_write(&written);
            done.push(written);
        }
        Ok(done)
    }

    /// Makes one write; returns the Service's name.
    async fn write(&mut self, seq: usize, p: &Planned) -> anyhow::Result<String> {
        let config = self.config;
        let spec = config
            .services
            .iter()
            .chain(&config.churn)
            .nth(p.service)
            .with_context(|| format!("write {seq} names an unknown Service {}", p.service))?;
        let name = spec.name.as_str();
        let what = || format!("write {seq} ({} {name}, {})", p.op.name(), p.phase);
        let pp = PostParams::default();
        match &p.op {
            Op::CreateSlice(endpoints) | Op::ReplaceSlice(endpoints) => {
                let rv = self.slice_versions.get(&p.service).map(String::as_str);
                let object: EndpointSlice =
                    serde_json::from_value(slice_json(config, name, endpoints, self.pool, rv))?;
                let stored = if matches!(p.op, Op::CreateSlice(_)) {
                    self.slices.create(&pp, &object).await
                } else {
                    self.slices.replace(&slice_name(name), &pp, &object).await
                }
                .with_context(what)?;
                if let Some(rv) = stored.metadata.resource_version {
                    self.slice_versions.insert(p.service, rv);
                }
            }
            Op::CreateService => {
                let object: Service = serde_json::from_value(service_json(config, spec))?;
                let stored = self
                    .services
                    .create(&pp, &object)
                    .await
                    .with_context(what)?;
                let allocated = stored
                    .spec
                    .and_then(|s| s.cluster_ip)
                    .and_then(|ip| ip.parse().ok());
                if let Some(ip) = allocated {
                    self.cluster_ips.insert(p.service, ip);
                }
            }
            Op::DeleteService => {
                self.services
                    .delete(name, &DeleteParams::default())
                    .await
                    .with_context(what)?;
            }
            Op::DeleteSlice => {
                self.slices
                    .delete(&slice_name(name), &DeleteParams::default())
                    .await
                    .with_context(what)?;
                self.slice_versions.remove(&p.service);
            }
        }
        Ok(name.to_owned())
    }
}

/// Deletes every Service and `EndpointSlice` of `namespace` the generator wrote (its label),
/// e.g. what an interrupted run left in a real cluster; returns how many objects it deleted.
pub async fn clean_up(client: &Client, namespace: &str) -> anyhow::Result<usize> {
    let services: Api<Service> = Api::namespaced(client.clone(), namespace);
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), namespace);
    let mut deleted = 0;
    let by_label =
        ListParams::default().labels(&format!("app.kubernetes.io/managed-by={MANAGED_BY}"));
    for s in services.list(&by_label).await.context("listing Services")? {
        if let Some(name) = s.metadata.name {
            services.delete(&name, &DeleteParams::default()).await?;
            deleted += 1;
        }
    }
    let by_label = ListParams::default().labels(&format!(
        "endpointslice.kubernetes.io/managed-by={MANAGED_BY}"
    ));
    for s in slices
        .list(&by_label)
        .await
        .context("listing EndpointSlices")?
    {
        if let Some(name) = s.metadata.name {
            slices.delete(&name, &DeleteParams::default()).await?;
            deleted += 1;
        }
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn pool(n: u8) -> Vec<PoolPod> {
        (0..n)
            .map(|i| PoolPod {
                ip: IpAddr::V4(Ipv4Addr::new(198, 18, 1, 10 + i)),
                node: format!("node{}", 1 + i % 3),
                name: format!("echo-{i}"),
            })
            .collect()
    }

    fn config(services: usize, churn: usize) -> Config {
        let spec = |i: usize| ServiceSpec {
            name: format!("svc-{i}"),
            cluster_ip: None,
        };
        Config {
            namespace: "bench".into(),
            services: (0..services).map(spec).collect(),
            churn: (services..services + churn).map(spec).collect(),
            replicas: 3,
            hpa_step: 2,
            rounds: 1,
            port: 80,
            target_port: 8080,
            rate: 10.0,
        }
    }

    /// Replays a plan: every slice write keeps the rollout's promises and every expectation
    /// is what the slice says.
    #[test]
    fn rollouts_surge_by_one_and_never_lose_a_ready_endpoint() {
        let pool = pool(6);
        let config = config(2, 0);
        let plan = plan(&config, &pool).unwrap();
        let mut slices: BTreeMap<usize, Vec<SliceEndpoint>> = BTreeMap::new();
        let mut rollout_writes = 0;
        for p in &plan {
            if let Op::CreateSlice(s) | Op::ReplaceSlice(s) = &p.op {
                slices.insert(p.service, s.clone());
            }
            let s = &slices[&p.service];
            let ready = s.iter().filter(|e| e.condition == Condition::Ready).count();
            if p.phase == Phase::Rollout {
                rollout_writes += 1;
                assert!(s.len() <= config.replicas + 1, "maxSurge 1: {s:?}");
                assert!(ready >= config.replicas, "maxUnavailable 0: {s:?}");
            }
            // No pod twice in a slice.
            let pods: BTreeSet<usize> = s.iter().map(|e| e.pod).collect();
            assert_eq!(pods.len(), s.len(), "{s:?}");
            if let Expect::Backends(b) = &p.expect {
                assert_eq!(*b, programmed(s, &pool));
            }
        }
        // Two Services, three pods each, four writes per pod.
        assert_eq!(rollout_writes, 2 * 3 * 4);
        // After a full rollout no old pod remains.
        for (service, s) in &slices {
            assert_eq!(s.len(), 3, "service {service}: {s:?}");
            assert!(s.iter().all(|e| e.condition == Condition::Ready));
        }
    }

    #[test]
    fn only_writes_that_change_the_programmed_set_expect_something() {
        let pool = pool(6);
        let plan = plan(&config(1, 1), &pool).unwrap();
        let kinds: Vec<(&str, bool)> = plan
            .iter()
            .map(|p| (p.op.name(), p.expect != Expect::Unchanged))
            .collect();
        // Setup: slice (nothing yet), Service (its three backends).
        assert_eq!(
            kinds[..2],
            [("create slice", false), ("create service", true)]
        );
        // A rollout step: not-ready add (nothing), ready (+1), terminating (-1), removal
        // (nothing: it was not programmed any more).
        assert_eq!(
            kinds[2..6],
            [
                ("replace slice", false),
                ("replace slice", true),
                ("replace slice", true),
                ("replace slice", false)
            ]
        );
        // Churn ends with the Service gone, then its slice.
        let last: Vec<&Planned> = plan.iter().rev().take(2).collect();
        assert_eq!(last[1].expect, Expect::Absent);
        assert_eq!(last[0].expect, Expect::Unchanged);
        assert!(
            plan.iter()
                .all(|p| p.phase != Phase::Churn || p.service == 1)
        );
    }

    #[test]
    fn terminating_endpoints_are_programmed_only_without_ready_ones() {
        let pool = pool(3);
        let e = |pod, condition| SliceEndpoint { pod, condition };
        let both = [e(0, Condition::Ready), e(1, Condition::Terminating)];
        assert_eq!(programmed(&both, &pool), BTreeSet::from([pool[0].ip]));
        let only = [e(1, Condition::Terminating), e(2, Condition::NotReady)];
        assert_eq!(programmed(&only, &pool), BTreeSet::from([pool[1].ip]));
        assert!(programmed(&[e(2, Condition::NotReady)], &pool).is_empty());
    }

    #[test]
    fn bad_configs_are_refused_with_the_reason() {
        let err = plan(&config(1, 0), &pool(3)).unwrap_err().to_string();
        assert!(err.contains("too small"), "{err}");
        let mut c = config(1, 0);
        c.rate = 0.0;
        assert!(plan(&c, &pool(6)).unwrap_err().to_string().contains("rate"));
        let mut c = config(1, 0);
        c.churn = c.services.clone();
        assert!(
            plan(&c, &pool(6))
                .unwrap_err()
                .to_string()
                .contains("twice")
        );
    }

    #[test]
    fn objects_are_what_the_api_expects() {
        let pool = pool(4);
        let c = config(1, 0);
        let e = [SliceEndpoint {
            pod: 1,
            condition: Condition::Terminating,
        }];
        let slice = slice_json(&c, "svc-0", &e, &pool, Some("7"));
        let slice: EndpointSlice = serde_json::from_value(slice).unwrap();
        assert_eq!(slice.metadata.name.as_deref(), Some("svc-0-loadgen"));
        assert_eq!(slice.metadata.resource_version.as_deref(), Some("7"));
        let ep = &slice.endpoints[0];
        assert_eq!(ep.addresses, ["198.18.1.11"]);
        let cond = ep.conditions.as_ref().unwrap();
        assert_eq!(
            (cond.ready, cond.serving, cond.terminating),
            (Some(false), Some(true), Some(true))
        );
        let spec = ServiceSpec {
            name: "svc-0".into(),
            cluster_ip: Some("198.19.0.1".parse().unwrap()),
        };
        let svc: Service = serde_json::from_value(service_json(&c, &spec)).unwrap();
        let s = svc.spec.unwrap();
        assert_eq!(s.cluster_ip.as_deref(), Some("198.19.0.1"));
        assert!(s.selector.is_none());
    }
}
