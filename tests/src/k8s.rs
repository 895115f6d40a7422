//! Service tests against the real agent: Kubernetes objects, the agent, backends and clients.
//!
//! - **Objects** ([`Service`], [`EndpointSlice`], [`node_yaml`]): builders that print `v1`
//!   Services, `discovery.k8s.io/v1` `EndpointSlice`s and `v1` Nodes as YAML in the shape
//!   `kubectl get -o yaml` prints them (keys sorted, `endpoints: null` for an empty slice,
//!   `targetPort` a number or a name), from a [`Topology`]'s actual pod addresses.
//! - **[`ManifestDir`]**: the directory an agent follows with `--from-dir`. Files are replaced
//!   atomically (hidden temporary file, then `rename`), so the agent never reads half a file,
//!   and every write is checked with the agent's own loader and model first, so a broken
//!   fixture fails with the parser's message instead of a mysteriously unprogrammed service.
//! - **[`Agent`]**: one `svc-agent run --from-dir` per node, started in the node's namespace and
//!   cgroup ([`Node::spawn`]); `inspect services` and `inspect stats` read back what it did.
//! - **[`Backends`]** and the client calls ([`tcp_request`], [`udp_request`], [`TcpSession`]):
//!   small TCP and UDP servers bound inside pod namespaces that answer every request with
//!   their label (the pod's name) and the client address they saw, and clients that check the
//!   answer. Every socket operation has a timeout and every loop is bounded.
//!
//! Addresses come from the [`Topology`]'s plan; service VIPs must come from
//! [`SERVICE_V4`](crate::netns::SERVICE_V4) and [`SERVICE_V6`](crate::netns::SERVICE_V6).

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::OsStr,
    fmt::Write as _,
    fs,
    io::{ErrorKind, Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, anyhow, bail, ensure};
use nix::sys::{
    socket::{setsockopt, sockopt::ReceiveTimeout},
    time::{TimeVal, TimeValLike as _},
};
pub use svc_agent::model::Protocol;

use crate::netns::{ETH0, Netns, Node, POD_IFNAME_PREFIX, Pod, Process, Topology, sockd};

/// The namespace every object of the tests lives in.
pub const NAMESPACE: &str = "default";

// ---------------------------------------------------------------------------------------------
// Objects
// ---------------------------------------------------------------------------------------------

/// A Service port's `targetPort`: a number, or the name of a container port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetPort {
    /// `targetPort: 8080`.
    Number(u16),
    /// `targetPort: web` (resolved per endpoint in the `EndpointSlice`).
    Name(String),
}

impl From<u16> for TargetPort {
    fn from(port: u16) -> Self {
        Self::Number(port)
    }
}

impl From<&str> for TargetPort {
    fn from(name: &str) -> Self {
        Self::Name(name.to_owned())
    }
}

/// One entry of a Service's `spec.ports`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    /// `name` (required by the API once a Service has several ports).
    pub name: String,
    /// `protocol`.
    pub protocol: Protocol,
    /// `port`: what clients connect to on the VIP.
    pub port: u16,
    /// `targetPort`.
    pub target_port: TargetPort,
    /// `nodePort` (only printed for `NodePort` and `LoadBalancer` Services).
    pub node_port: Option<u16>,
}

/// `spec.type` of a [`Service`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ServiceType {
    /// `ClusterIP`.
    #[default]
    ClusterIp,
    /// `NodePort`.
    NodePort,
    /// `LoadBalancer`.
    LoadBalancer,
}

/// A `v1` Service (of type `ClusterIP` unless set otherwise), printed as `kubectl get -o yaml`
/// would.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace`.
    pub namespace: String,
    /// `spec.clusterIPs` (IPv4 first by convention; one per family); `spec.clusterIP` is the
    /// first and `spec.ipFamilies` follows the list.
    pub cluster_ips: Vec<IpAddr>,
    /// `spec.ports`.
    pub ports: Vec<ServicePort>,
    /// `spec.internalTrafficPolicy` is `Local` (else `Cluster`).
    pub internal_traffic_policy_local: bool,
    /// `spec.selector` (`key: value` terms); empty: no selector, the endpoints come from the
    /// slices the test writes (with a selector, standalone agents compute them from Pods).
    pub selector: BTreeMap<String, String>,
    /// `spec.publishNotReadyAddresses`.
    pub publish_not_ready_addresses: bool,
    /// `spec.trafficDistribution` (`PreferClose`, `PreferSameZone`, `PreferSameNode`).
    pub traffic_distribution: Option<String>,
    /// `spec.type`.
    pub type_: ServiceType,
    /// `spec.externalTrafficPolicy` is `Local` (else `Cluster`; printed for `NodePort` and
    /// `LoadBalancer` Services).
    pub external_traffic_policy_local: bool,
    /// `spec.externalIPs`.
    pub external_ips: Vec<IpAddr>,
    /// `status.loadBalancer.ingress[].ip` (with `ipMode: VIP`).
    pub lb_ips: Vec<IpAddr>,
    /// `spec.loadBalancerSourceRanges` (CIDRs as written).
    pub source_ranges: Vec<String>,
}

impl Service {
    /// A `ClusterIP` Service `name` in [`NAMESPACE`] with these VIPs and no port yet.
    #[must_use]
    pub fn cluster_ip(name: &str, cluster_ips: &[IpAddr]) -> Self {
        Self {
            name: name.to_owned(),
            namespace: NAMESPACE.to_owned(),
            cluster_ips: cluster_ips.to_vec(),
            ports: Vec::new(),
            internal_traffic_policy_local: false,
            selector: BTreeMap::new(),
            publish_not_ready_addresses: false,
            traffic_distribution: None,
            type_: ServiceType::ClusterIp,
            external_traffic_policy_local: false,
            external_ips: Vec::new(),
            lb_ips: Vec::new(),
            source_ranges: Vec::new(),
        }
    }

    /// Makes it a `NodePort` Service (a `LoadBalancer` one stays one) whose last port so far has
    /// `nodePort: node_port`.
    #[must_use]
    pub fn node_port(mut self, node_port: u16) -> Self {
        if self.type_ == ServiceType::ClusterIp {
            self.type_ = ServiceType::NodePort;
        }
        if let Some(last) = self.ports.last_mut() {
            last.node_port = Some(node_port);
        }
        self
    }

    /// Makes it a `LoadBalancer` Service whose load balancer has these ingress IPs.
    #[must_use]
    pub fn load_balancer(mut self, ips: &[IpAddr]) -> Self {
        self.type_ = ServiceType::LoadBalancer;
        self.lb_ips = ips.to_vec();
        self
    }

    /// Sets `spec.loadBalancerSourceRanges`.
    #[must_use]
    pub fn load_balancer_source_ranges(mut self, cidrs: &[&str]) -> Self {
        self.source_ranges = cidrs.iter().map(|c| (*c).to_owned()).collect();
        self
    }

    /// Sets `spec.externalIPs`.
    #[must_use]
    pub fn external_ips(mut self, ips: &[IpAddr]) -> Self {
        self.external_ips = ips.to_vec();
        self
    }

    /// Sets `externalTrafficPolicy: Local`.
    #[must_use]
    pub fn external_traffic_policy_local(mut self) -> Self {
        self.external_traffic_policy_local = true;
        self
    }

    /// Sets `spec.trafficDistribution` (`PreferClose`, `PreferSameZone`, `PreferSameNode`).
    #[must_use]
    pub fn traffic_distribution(mut self, value: &str) -> Self {
        self.traffic_distribution = Some(value.to_owned());
        self
    }

    /// Adds the term `key: value` to `spec.selector`.
    #[must_use]
    pub fn select(mut self, key: &str, value: &str) -> Self {
        self.selector.insert(key.to_owned(), value.to_owned());
        self
    }

    /// Sets `spec.publishNotReadyAddresses: true`.
    #[must_use]
    pub fn publish_not_ready_addresses(mut self) -> Self {
        self.publish_not_ready_addresses = true;
        self
    }

    /// Adds a port.
    #[must_use]
    pub fn port(
        mut self,
        name: &str,
        protocol: Protocol,
        port: u16,
        target_port: impl Into<TargetPort>,
    ) -> Self {
        self.ports.push(ServicePort {
            name: name.to_owned(),
            protocol,
            port,
            target_port: target_port.into(),
            node_port: None,
        });
        self
    }

    /// Sets `internalTrafficPolicy: Local`.
    #[must_use]
    pub fn internal_traffic_policy_local(mut self) -> Self {
        self.internal_traffic_policy_local = true;
        self
    }

    /// The object as YAML (one document, no `---`).
    #[must_use]
    pub fn to_yaml(&self) -> String {
        let mut y = String::new();
        let _ = writeln!(y, "apiVersion: v1\nkind: Service\nmetadata:");
        let _ = writeln!(y, "  labels:\n    app: {}", self.name);
        let _ = writeln!(y, "  name: {}\n  namespace: {}", self.name, self.namespace);
        y.push_str("spec:\n");
        if let Some(first) = self.cluster_ips.first() {
            let _ = writeln!(y, "  clusterIP: {first}\n  clusterIPs:");
            for ip in &self.cluster_ips {
                let _ = writeln!(y, "  - {ip}");
            }
        }
        let policy = if self.internal_traffic_policy_local {
            "Local"
        } else {
            "Cluster"
        };
        let exposed = self.type_ != ServiceType::ClusterIp;
        if !self.external_ips.is_empty() {
            y.push_str("  externalIPs:\n");
            for ip in &self.external_ips {
                let _ = writeln!(y, "  - {ip}");
            }
        }
        if exposed {
            let external = if self.external_traffic_policy_local {
                "Local"
            } else {
                "Cluster"
            };
            let _ = writeln!(y, "  externalTrafficPolicy: {external}");
        }
        let _ = writeln!(y, "  internalTrafficPolicy: {policy}\n  ipFamilies:");
        for ip in &self.cluster_ips {
            let _ = writeln!(y, "  - {}", family_name(ip.is_ipv6()));
        }
        let family_policy = if self.cluster_ips.len() > 1 {
            "RequireDualStack"
        } else {
            "SingleStack"
        };
        let _ = writeln!(y, "  ipFamilyPolicy: {family_policy}");
        if !self.source_ranges.is_empty() {
            y.push_str("  loadBalancerSourceRanges:\n");
            for cidr in &self.source_ranges {
                let _ = writeln!(y, "  - {cidr}");
            }
        }
        y.push_str("  ports:\n");
        for p in &self.ports {
            let _ = writeln!(y, "  - name: {}", p.name);
            if let Some(node_port) = p.node_port.filter(|_| exposed) {
                let _ = writeln!(y, "    nodePort: {node_port}");
            }
            let _ = writeln!(y, "    port: {}", p.port);
            let _ = writeln!(y, "    protocol: {}", p.protocol.as_k8s());
            match &p.target_port {
                TargetPort::Number(n) => {
                    let _ = writeln!(y, "    targetPort: {n}");
                }
                TargetPort::Name(n) => {
                    let _ = writeln!(y, "    targetPort: {n}");
                }
            }
        }
        if !self.selector.is_empty() {
            y.push_str("  selector:\n");
            for (k, v) in &self.selector {
                let _ = writeln!(y, "    {k}: {v}");
            }
        }
        if self.publish_not_ready_addresses {
            y.push_str("  publishNotReadyAddresses: true\n");
        }
        y.push_str("  sessionAffinity: None\n");
        if let Some(value) = &self.traffic_distribution {
            let _ = writeln!(y, "  trafficDistribution: {value}");
        }
        let type_ = match self.type_ {
            ServiceType::ClusterIp => "ClusterIP",
            ServiceType::NodePort => "NodePort",
            ServiceType::LoadBalancer => "LoadBalancer",
        };
        let _ = writeln!(y, "  type: {type_}\nstatus:");
        if self.lb_ips.is_empty() {
            y.push_str("  loadBalancer: {}\n");
        } else {
            y.push_str("  loadBalancer:\n    ingress:\n");
            for ip in &self.lb_ips {
                let _ = writeln!(y, "    - ip: {ip}\n      ipMode: VIP");
            }
        }
        y
    }
}

/// `IPv4` / `IPv6`, as `ipFamilies` and `addressType` spell them.
fn family_name(ipv6: bool) -> &'static str {
    if ipv6 { "IPv6" } else { "IPv4" }
}

/// One endpoint of an [`EndpointSlice`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// `addresses[0]`.
    pub address: IpAddr,
    /// `nodeName`.
    pub node_name: String,
    /// `targetRef.name` (a Pod in the slice's namespace).
    pub pod: String,
    /// `conditions.ready`.
    pub ready: bool,
    /// `conditions.serving`.
    pub serving: bool,
    /// `conditions.terminating`.
    pub terminating: bool,
}

impl Endpoint {
    /// A ready endpoint for `pod` (its IPv6 address when `ipv6`) on the pod's node.
    #[must_use]
    pub fn ready(topo: &Topology, pod: &Pod, ipv6: bool) -> Self {
        Self {
            address: if ipv6 {
                pod.ipv6.into()
            } else {
                pod.ipv4.into()
            },
            node_name: topo.node(pod.node).name.clone(),
            pod: pod.name.clone(),
            ready: true,
            serving: true,
            terminating: false,
        }
    }

    /// A terminating endpoint that still serves (`ready: false, serving: true, terminating:
    /// true`: its pod got its deletion and runs its grace period), as the `EndpointSlice`
    /// controller writes it.
    #[must_use]
    pub fn terminating(topo: &Topology, pod: &Pod, ipv6: bool) -> Self {
        Self {
            ready: false,
            serving: true,
            terminating: true,
            ..Self::ready(topo, pod, ipv6)
        }
    }
}

/// One entry of an [`EndpointSlice`]'s `ports`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlicePort {
    /// The Service port's name.
    pub name: String,
    /// `protocol`.
    pub protocol: Protocol,
    /// The resolved target port number.
    pub port: u16,
}

/// A `discovery.k8s.io/v1` `EndpointSlice` of one address family, printed as
/// `kubectl get -o yaml` would.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSlice {
    /// `metadata.name` (`<service>-ipv4` / `<service>-ipv6`).
    pub name: String,
    /// `metadata.namespace`.
    pub namespace: String,
    /// The Service it belongs to (label `kubernetes.io/service-name`).
    pub service: String,
    /// `addressType: IPv6` (else `IPv4`).
    pub ipv6: bool,
    /// `ports`.
    pub ports: Vec<SlicePort>,
    /// `endpoints` (`null` when empty, like the API prints it).
    pub endpoints: Vec<Endpoint>,
}

impl EndpointSlice {
    /// An empty slice of `service` (in [`NAMESPACE`]) for one family.
    #[must_use]
    pub fn new(service: &str, ipv6: bool) -> Self {
        Self {
            name: format!("{service}-{}", family_name(ipv6).to_lowercase()),
            namespace: NAMESPACE.to_owned(),
            service: service.to_owned(),
            ipv6,
            ports: Vec::new(),
            endpoints: Vec::new(),
        }
    }

    /// The ports of `service` with their target ports resolved: numbers as they are, names
    /// through `named` (container port name -> number).
    ///
    /// # Panics
    /// When a named target port is not in `named` (a broken fixture).
    #[must_use]
    pub fn ports_of(mut self, service: &Service, named: &[(&str, u16)]) -> Self {
        for p in &service.ports {
            let port = match &p.target_port {
                TargetPort::Number(n) => *n,
                TargetPort::Name(name) => {
                    let Some((_, port)) = named.iter().find(|(n, _)| n == name) else {
                        panic!("targetPort {name:?} not in {named:?}");
                    };
                    *port
                }
            };
            self.ports.push(SlicePort {
                name: p.name.clone(),
                protocol: p.protocol,
                port,
            });
        }
        self
    }

    /// Adds a ready endpoint for each of `pods` (addresses of this slice's family).
    #[must_use]
    pub fn ready_pods<'a>(
        mut self,
        topo: &Topology,
        pods: impl IntoIterator<Item = &'a Pod>,
    ) -> Self {
        for pod in pods {
            self.endpoints.push(Endpoint::ready(topo, pod, self.ipv6));
        }
        self
    }

    /// Adds `endpoint`.
    #[must_use]
    pub fn endpoint(mut self, endpoint: Endpoint) -> Self {
        self.endpoints.push(endpoint);
        self
    }

    /// The object as YAML (one document, no `---`).
    #[must_use]
    pub fn to_yaml(&self) -> String {
        let mut y = String::new();
        let _ = writeln!(y, "addressType: {}", family_name(self.ipv6));
        y.push_str("apiVersion: discovery.k8s.io/v1\n");
        if self.endpoints.is_empty() {
            y.push_str("endpoints: null\n");
        } else {
            y.push_str("endpoints:\n");
        }
        for e in &self.endpoints {
            let _ = writeln!(y, "- addresses:\n  - {}", e.address);
            let _ = writeln!(
                y,
                "  conditions:\n    ready: {}\n    serving: {}\n    terminating: {}",
                e.ready, e.serving, e.terminating
            );
            let _ = writeln!(y, "  nodeName: {}", e.node_name);
            let _ = writeln!(
                y,
                "  targetRef:\n    kind: Pod\n    name: {}\n    namespace: {}",
                e.pod, self.namespace
            );
        }
        y.push_str("kind: EndpointSlice\nmetadata:\n");
        let _ = writeln!(y, "  generateName: {}-", self.service);
        y.push_str("  labels:\n");
        y.push_str("    endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io\n");
        let _ = writeln!(y, "    kubernetes.io/service-name: {}", self.service);
        let _ = writeln!(y, "  name: {}\n  namespace: {}", self.name, self.namespace);
        if self.ports.is_empty() {
            y.push_str("ports: null\n");
        } else {
            y.push_str("ports:\n");
        }
        for p in &self.ports {
            let _ = writeln!(
                y,
                "- name: {}\n  port: {}\n  protocol: {}",
                p.name,
                p.port,
                p.protocol.as_k8s()
            );
        }
        y
    }
}

/// The `v1` Node object of an emulated node: its underlay addresses as `InternalIP`s, its pod
/// CIDRs, as `kubectl get node -o yaml` prints them (status trimmed to the addresses).
#[must_use]
pub fn node_yaml(node: &Node) -> String {
    node_yaml_in_zone(node, None)
}

/// [`node_yaml`], with the label `topology.kubernetes.io/zone: <zone>` when `zone` is given.
#[must_use]
pub fn node_yaml_in_zone(node: &Node, zone: Option<&str>) -> String {
    let mut y = String::new();
    y.push_str("apiVersion: v1\nkind: Node\nmetadata:\n  labels:\n");
    let _ = writeln!(y, "    kubernetes.io/hostname: {}", node.name);
    y.push_str("    kubernetes.io/os: linux\n");
    if let Some(zone) = zone {
        let _ = writeln!(y, "    topology.kubernetes.io/zone: {zone}");
    }
    let _ = writeln!(y, "  name: {}", node.name);
    let _ = writeln!(y, "spec:\n  podCIDR: {}\n  podCIDRs:", node.pod_cidr_v4);
    let _ = writeln!(y, "  - {}\n  - {}", node.pod_cidr_v4, node.pod_cidr_v6);
    y.push_str("status:\n  addresses:\n");
    let _ = writeln!(y, "  - address: {}\n    type: InternalIP", node.underlay_v4);
    let _ = writeln!(y, "  - address: {}\n    type: InternalIP", node.underlay_v6);
    let _ = writeln!(y, "  - address: {}\n    type: Hostname", node.name);
    y
}

/// Several documents as one YAML stream (`---` before each).
#[must_use]
pub fn documents<S: AsRef<str>>(docs: &[S]) -> String {
    docs.iter().fold(String::new(), |mut out, d| {
        out.push_str("---\n");
        out.push_str(d.as_ref());
        out
    })
}

// ---------------------------------------------------------------------------------------------
// The directory the agents follow
// ---------------------------------------------------------------------------------------------

/// A directory of manifests an agent follows (`--from-dir`).
#[derive(Debug)]
pub struct ManifestDir {
    path: PathBuf,
}

impl ManifestDir {
    /// Creates `path` (and its parents).
    pub fn create(path: &Path) -> anyhow::Result<Self> {
        fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self {
            path: path.to_owned(),
        })
    }

    /// The directory.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Replaces (or creates) `file` with `text` atomically: written to a hidden file, which
    /// the agent does not read, then renamed. Before writing, checks that the agent's loader
    /// reads `text` without an error; after, that the whole directory computes without an
    /// object error (see [`check_manifests`]), so a broken fixture fails the caller at once.
    pub fn write(&self, file: &str, text: &str) -> anyhow::Result<()> {
        let parsed = svc_agent::source::parse_str(text, Path::new(file));
        if let Some(e) = parsed.errors.first() {
            bail!("{file} does not load: {e}\n{text}");
        }
        let tmp = self.path.join(format!(".{file}.tmp"));
        fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
        let dst = self.path.join(file);
        fs::rename(&tmp, &dst).with_context(|| format!("renaming to {}", dst.display()))?;
        check_manifests(&self.path)
    }

    /// Removes `file`.
    pub fn remove(&self, file: &str) -> anyhow::Result<()> {
        let path = self.path.join(file);
        fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))
    }
}

/// Loads `dir` with the agent's own loader and computes every node's desired state with its
/// model; fails with the first document or object error. Kinds the agent does not use (a
/// Deployment) are fine.
pub fn check_manifests(dir: &Path) -> anyhow::Result<()> {
    let loaded = svc_agent::source::load_dir(dir)?;
    if let Some(e) = loaded.errors.first() {
        bail!("{} does not load: {e}", dir.display());
    }
    let mut nodes: Vec<String> = loaded
        .snapshot
        .nodes
        .iter()
        .filter_map(|n| n.metadata.name.clone())
        .collect();
    if nodes.is_empty() {
        nodes.push(String::new());
    }
    for node in nodes {
        let desired = svc_agent::model::compute(&loaded.snapshot, &node);
        if let Some(e) = desired.errors.first() {
            bail!("{}: object error for node {node:?}: {e:?}", dir.display());
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The agent
// ---------------------------------------------------------------------------------------------

/// Map sizes for test agents: small, so loading is quick.
pub const TEST_MAP_SIZES: [(&str, u32); 3] = [
    ("--max-service-entries", 4096),
    ("--max-backends", 4096),
    ("--max-conntrack-entries", 16384),
];

/// How often test agents audit their incremental passes against the full computation
/// (`--audit-interval`).
pub const AUDIT_INTERVAL_SECS: u32 = 2;

/// How long an agent may take to print "svc-agent running".
pub const AGENT_START_TIMEOUT: Duration = Duration::from_secs(15);

/// Finds the `svc-agent` binary: `$SVC_AGENT_BIN`, else next to the running executable or one
/// directory up (a test binary lives in `target/<profile>/deps`, the demo in
/// `target/<profile>`). Fails saying how to build it.
pub fn agent_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("SVC_AGENT_BIN") {
        let path = PathBuf::from(path);
        ensure!(
            path.is_file(),
            "SVC_AGENT_BIN={} is not a file",
            path.display()
        );
        return Ok(path);
    }
    let exe = std::env::current_exe().context("locating the running executable")?;
    let dir = exe.parent().context("the executable has no directory")?;
    let candidates = [dir.join("svc-agent"), dir.join("../svc-agent")];
    for c in &candidates {
        if c.is_file() {
            return Ok(c.clone());
        }
    }
    let profile =
        if dir.ends_with("release") || dir.parent().is_some_and(|p| p.ends_with("release")) {
            "--release "
        } else {
            ""
        };
    bail!(
        "svc-agent binary not found (looked at {} and {}): build it first with \
         `cargo build {profile}-p svc-agent` (or set SVC_AGENT_BIN)",
        candidates[0].display(),
        candidates[1].display()
    )
}

/// Runs `svc-agent --bpffs <bpffs> <args>` to completion and returns its stdout.
pub fn agent_command(binary: &Path, bpffs: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(binary)
        .arg("--bpffs")
        .arg(bpffs)
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .with_context(|| format!("running {}", binary.display()))?;
    ensure!(
        out.status.success(),
        "`svc-agent --bpffs {} {}` failed ({}): {}",
        bpffs.display(),
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8(out.stdout).context("svc-agent printed non-UTF-8")
}

/// Environment variable choosing where the end-to-end tests' agents translate pods' traffic to
/// services: `all` (the default, as shipped: at the socket) or `host-only` (per packet, by the
/// TC programs). `cargo xtask test` runs the end-to-end tier once with each.
pub const SOCKET_LB_ENV: &str = "SVC_TEST_SOCKET_LB";

/// The `--socket-lb` value the tests' agents run with (see [`SOCKET_LB_ENV`]).
///
/// # Panics
/// When the variable holds anything but `all` or `host-only`.
#[must_use]
pub fn socket_lb() -> &'static str {
    match std::env::var(SOCKET_LB_ENV).as_deref() {
        Err(_) | Ok("" | "all") => "all",
        Ok("host-only") => "host-only",
        Ok(other) => panic!("{SOCKET_LB_ENV}={other:?}: expected all or host-only"),
    }
}

/// Whether pods' connections to services are translated at the socket in this run (see
/// [`socket_lb`]); otherwise the TC programs translate their packets.
#[must_use]
pub fn pods_at_socket() -> bool {
    socket_lb() == "all"
}

/// The counter (`inspect stats`) that goes up at least once per connection or datagram a pod
/// sends to a service through the agent of its node: `sock_xlate` (one per `connect()` or
/// `sendto()`) when pods are translated at the socket, `dnat` (one per packet) otherwise.
#[must_use]
pub fn forward_counter() -> &'static str {
    if pods_at_socket() {
        "sock_xlate"
    } else {
        "dnat"
    }
}

/// The counter that goes up at least once per answer a pod receives from a service:
/// `sock_rev_nat` (one per `recvfrom()`/`getpeername()` showing the service) when pods are
/// translated at the socket, `rev_nat` (one per packet) otherwise.
#[must_use]
pub fn reverse_counter() -> &'static str {
    if pods_at_socket() {
        "sock_rev_nat"
    } else {
        "rev_nat"
    }
}

/// Whether `svc-agent run` accepts `flag` (from its `--help`).
fn supports_flag(binary: &Path, flag: &str) -> anyhow::Result<bool> {
    let out = Command::new(binary)
        .args(["run", "--help"])
        .output()
        .with_context(|| format!("running {} run --help", binary.display()))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .any(|w| w.trim_end_matches(',') == flag))
}

/// A running `svc-agent run --from-dir` on one node; stopped when dropped.
#[derive(Debug)]
pub struct Agent {
    node: String,
    bpffs: PathBuf,
    binary: PathBuf,
    /// What the agent's log says after each sync (`synced <dir>`, `synced from the API server`).
    sync_line: String,
    /// The wall-clock time just before the process was spawned.
    spawned_at: SystemTime,
    process: Process,
}

/// What an agent follows: a directory of manifests (`--from-dir`) or the API server a
/// kubeconfig file points at (`--kubeconfig`).
#[derive(Clone, Copy, Debug)]
pub enum AgentSource<'a> {
    /// `--from-dir <dir>`.
    Dir(&'a Path),
    /// `--kubeconfig <file>`.
    Kube(&'a Path),
}

impl Agent {
    /// Starts the agent on `node` (its namespace, cgroup and bpffs), attached to every
    /// `svcpod*` interface that exists now and following `dir`, with [`TEST_MAP_SIZES`] and,
    /// when the agent has connect-time translation, the node's cgroup for it. Returns once it
    /// is running, which it announces after programming `dir` for the first time.
    pub fn start(binary: &Path, node: &Node, dir: &Path) -> anyhow::Result<Self> {
        let source = [OsStr::new("--from-dir"), dir.as_os_str()];
        Self::start_with(
            binary,
            node,
            &source,
            format!("synced {}", dir.display()),
            (&TEST_MAP_SIZES, AGENT_START_TIMEOUT, true),
            &[],
        )
    }

    /// Like [`start`](Self::start), but started by `launcher` (a program and its arguments,
    /// which execs `svc-agent` with the arguments that follow: `setpriv ... --`), so the agent
    /// runs as the launcher sets it up (its pid is still the agent's).
    pub fn start_under(
        launcher: &[&OsStr],
        binary: &Path,
        node: &Node,
        dir: &Path,
    ) -> anyhow::Result<Self> {
        let source = [OsStr::new("--from-dir"), dir.as_os_str()];
        Self::start_with(
            binary,
            node,
            &source,
            format!("synced {}", dir.display()),
            (&TEST_MAP_SIZES, AGENT_START_TIMEOUT, true),
            launcher,
        )
    }

    /// Like [`start`](Self::start) with other map sizes (`(flag, entries)`); a flag this agent
    /// does not have is left out (so a test can run against an older agent).
    pub fn start_sized(
        binary: &Path,
        node: &Node,
        dir: &Path,
        sizes: &[(&str, u32)],
    ) -> anyhow::Result<Self> {
        let mut known = Vec::new();
        for (flag, value) in sizes {
            if supports_flag(binary, flag)? {
                known.push((*flag, *value));
            }
        }
        let source = [OsStr::new("--from-dir"), dir.as_os_str()];
        Self::start_with(
            binary,
            node,
            &source,
            format!("synced {}", dir.display()),
            (&known, AGENT_START_TIMEOUT, true),
            &[],
        )
    }

    /// Like [`start`](Self::start), but following the API server `kubeconfig` points at (see
    /// [`ApiServer::write_kubeconfig`](crate::apiserver::ApiServer::write_kubeconfig)).
    pub fn start_kube(binary: &Path, node: &Node, kubeconfig: &Path) -> anyhow::Result<Self> {
        Self::start_kube_sized(
            binary,
            node,
            kubeconfig,
            &TEST_MAP_SIZES,
            AGENT_START_TIMEOUT,
        )
    }

    /// Like [`start_kube`](Self::start_kube) with other map sizes (`(flag, entries)`) and
    /// another bound on the wait for the first sync.
    pub fn start_kube_sized(
        binary: &Path,
        node: &Node,
        kubeconfig: &Path,
        sizes: &[(&str, u32)],
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let source = [OsStr::new("--kubeconfig"), kubeconfig.as_os_str()];
        let sync_line = "synced from the API server".to_owned();
        Self::start_with(
            binary,
            node,
            &source,
            sync_line,
            (sizes, timeout, true),
            &[],
        )
    }

    /// Starts the agent on `node` following `source` with the agent's own default map sizes
    /// and `flags` added to `svc-agent run` as they are (`["--coalesce-ms", "5"]`); waits at
    /// most `timeout` for it to announce that it runs (after its first sync). For benchmarks:
    /// [`spawned_at`](Self::spawned_at) tells when the process was started.
    pub fn start_with_flags(
        binary: &Path,
        node: &Node,
        source: &AgentSource<'_>,
        flags: &[&str],
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let (args, sync_line) = match source {
            AgentSource::Dir(dir) => (
                [OsStr::new("--from-dir"), dir.as_os_str()],
                format!("synced {}", dir.display()),
            ),
            AgentSource::Kube(kubeconfig) => (
                [OsStr::new("--kubeconfig"), kubeconfig.as_os_str()],
                "synced from the API server".to_owned(),
            ),
        };
        let flags: Vec<&OsStr> = args
            .into_iter()
            .chain(flags.iter().map(OsStr::new))
            .collect();
        Self::start_with(binary, node, &flags, sync_line, (&[], timeout, false), &[])
    }

    fn start_with(
        binary: &Path,
        node: &Node,
        source: &[&OsStr],
        sync_line: String,
        (sizes, timeout, audit): (&[(&str, u32)], Duration, bool),
        launcher: &[&OsStr],
    ) -> anyhow::Result<Self> {
        let mut cmd = match launcher.split_first() {
            Some((program, args)) => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg(binary);
                cmd
            }
            None => Command::new(binary),
        };
        cmd.arg("--bpffs")
            .arg(&node.bpffs)
            .args(["run", "--node-name", &node.name, "--pod-ifaces"])
            .arg(format!("{POD_IFNAME_PREFIX}*"))
            .args(source);
        // The node's uplink (its underlay interface) carries the node-facing programs, as on a
        // real node (where the default patterns find it): every end-to-end test runs with them.
        if supports_flag(binary, "--node-ifaces")? {
            cmd.arg("--node-ifaces").arg(ETH0);
        }
        for (flag, value) in sizes {
            cmd.arg(flag).arg(value.to_string());
        }
        // Connect-time translation (when the agent has it) only for this node's processes,
        // never for the whole machine (the agent's default is the cgroup v2 root).
        if supports_flag(binary, "--cgroup")? {
            cmd.arg("--cgroup").arg(&node.cgroup);
        }
        if supports_flag(binary, "--socket-lb")? {
            cmd.arg("--socket-lb").arg(socket_lb());
        }
        // The XDP program on the uplink too, when the run asks for it: by the environment
        // (`--xdp`'s variable), so a launcher (`env SVC_XDP=...`) may choose otherwise.
        if crate::netns::xdp_mode() != "off" {
            cmd.env("SVC_XDP", crate::netns::xdp_mode());
        }
        // Test agents (`audit`) check their incremental passes against the full computation
        // every 2 s (the default is 5 min): any drift is a warning, and a test fails on an
        // agent's warnings. Benchmarks run the agent as shipped.
        if audit && supports_flag(binary, "--audit-interval")? {
            cmd.arg("--audit-interval")
                .arg(AUDIT_INTERVAL_SECS.to_string());
        }
        cmd.env("RUST_LOG", "info").env("NO_COLOR", "1");
        let spawned_at = SystemTime::now();
        let process = node.spawn(&cmd)?;
        let mut agent = Self {
            node: node.name.clone(),
            bpffs: node.bpffs.clone(),
            binary: binary.to_owned(),
            sync_line,
            spawned_at,
            process,
        };
        agent
            .process
            .wait_for_output("svc-agent running", timeout)
            .with_context(|| format!("svc-agent on {} did not start", node.name))?;
        // The first sync comes before "running"; seeing it also proves that `syncs` recognises
        // the agent's "synced" lines, which later waits rely on.
        agent.wait_syncs(1, Duration::from_secs(5))?;
        Ok(agent)
    }

    /// The node's name.
    #[must_use]
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The node's bpffs (where the agent pins its maps under `svc/v1`).
    #[must_use]
    pub fn bpffs(&self) -> &Path {
        &self.bpffs
    }

    /// Everything the agent logged so far.
    #[must_use]
    pub fn log(&self) -> String {
        self.process.output()
    }

    /// How many "synced" lines the agent has logged.
    #[must_use]
    pub fn syncs(&self) -> usize {
        self.log().matches(&self.sync_line).count()
    }

    /// Waits (polling every 10 ms, at most `timeout`) until the agent has logged at least
    /// `count` "synced" lines; fails early if it exits.
    pub fn wait_syncs(&mut self, count: usize, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.syncs() >= count {
                return Ok(());
            }
            if let Some(status) = self.process.try_status()? {
                bail!(
                    "svc-agent on {} exited ({status}); log:\n{}",
                    self.node,
                    self.log()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "svc-agent on {} logged {} of {count} syncs within {timeout:?}; log:\n{}",
                    self.node,
                    self.syncs(),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `svc-agent inspect <what>` against this node's pinned maps.
    pub fn inspect(&self, what: &str) -> anyhow::Result<String> {
        agent_command(&self.binary, &self.bpffs, &["inspect", what])
    }

    /// The programmed frontends (`inspect services -o json`, parsed).
    pub fn services(&self) -> anyhow::Result<Programmed> {
        Ok(Programmed::parse(&agent_command(
            &self.binary,
            &self.bpffs,
            &["inspect", "services", "-o", "json"],
        )?))
    }

    /// Packets per counter and per drop reason (`inspect stats`, parsed): `dnat`, `rev_nat`,
    /// `dropped`, `no_endpoints`, `no_local_endpoint`, ...
    pub fn stats(&self) -> anyhow::Result<BTreeMap<String, u64>> {
        parse_stats(&self.inspect("stats")?)
    }

    /// The wall-clock time just before the agent's process was spawned (compare with the
    /// timestamps of its log lines).
    #[must_use]
    pub fn spawned_at(&self) -> SystemTime {
        self.spawned_at
    }

    /// The agent's process id.
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Stops the agent (`SIGTERM`, then `SIGKILL` after a grace period) and returns how it
    /// ended: a clean stop is a successful exit.
    pub fn stop(self) -> anyhow::Result<std::process::ExitStatus> {
        self.process.stop()
    }

    /// Like [`Agent::stop`], and also returns the agent's whole log, its last lines included.
    pub fn stop_with_log(self) -> anyhow::Result<(std::process::ExitStatus, String)> {
        self.process.stop_with_output()
    }

    /// Kills the agent with `SIGKILL` (no shutdown code runs: a crash, an OOM kill, a node
    /// agent's container killed at once) and returns how it ended.
    pub fn kill(self) -> anyhow::Result<std::process::ExitStatus> {
        self.process.kill()
    }

    /// The first "synced" line the agent logged (its first reconcile), if any.
    #[must_use]
    pub fn first_sync_line(&self) -> Option<String> {
        self.log()
            .lines()
            .find(|l| l.contains(&self.sync_line))
            .map(str::to_owned)
    }
}

/// Counter name -> packets, from the two tables `inspect stats` prints.
pub fn parse_stats(text: &str) -> anyhow::Result<BTreeMap<String, u64>> {
    let mut stats = BTreeMap::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // Headers ("counter packets bytes", "drop reason packets bytes") have no number.
        if let [name, packets, _bytes] = fields.as_slice()
            && let Ok(packets) = packets.parse::<u64>()
        {
            stats.insert((*name).to_owned(), packets);
        }
    }
    ensure!(
        stats.contains_key("dnat") && stats.contains_key("no_endpoints"),
        "unexpected `inspect stats` output:\n{text}"
    );
    Ok(stats)
}

/// One programmed frontend, from `inspect services -o json`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProgrammedFrontend {
    /// `addr:port` of each backend slot, in slot order.
    pub backends: Vec<String>,
    /// What it does without endpoints (`reject (no endpoints)`, `drop (no local endpoint)`)
    /// and its affinity (`affinity 10800s`), comma-separated; empty when neither applies.
    pub notes: String,
    /// `namespace/name` of its Service (`FRONTEND_NAMES_V1`), if named.
    pub service: Option<String>,
    /// Its port's name, if named.
    pub port_name: Option<String>,
    /// The Pod behind each backend slot that has one (`BACKEND_NAMES_V1`), by `addr:port`.
    pub pods: BTreeMap<String, String>,
    /// The whole row as `inspect` printed it.
    pub row: Option<svc_agent::inspect::ServiceRow>,
}

/// The frontends `inspect services -o json` shows, by `"<addr:port> <PROTO>"` (for example
/// `"198.19.0.10:80 TCP"`, `"[2001:db8:f::10]:80 UDP"`; `"198.18.0.1:30080 TCP external"` for
/// the external scope of a node, external or load-balancer address).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Programmed {
    /// The frontends.
    pub frontends: BTreeMap<String, ProgrammedFrontend>,
    /// The text it was parsed from.
    pub text: String,
}

impl Programmed {
    /// Parses the output of `inspect services -o json` (an empty or unparsable text: nothing).
    #[must_use]
    pub fn parse(text: &str) -> Self {
        let rows: Vec<svc_agent::inspect::ServiceRow> =
            serde_json::from_str(text).unwrap_or_default();
        let frontends = rows
            .into_iter()
            .map(|r| {
                // As the text `inspect services` printed before `-o`: what it does without
                // endpoints, then its affinity.
                let mut notes: Vec<String> = match r.when_empty.as_str() {
                    "reject" => vec!["reject (no endpoints)".to_owned()],
                    "drop" => vec!["drop (no local endpoint)".to_owned()],
                    _ => Vec::new(),
                };
                if r.affinity_timeout_seconds != 0 {
                    notes.push(format!("affinity {}s", r.affinity_timeout_seconds));
                }
                let fe = ProgrammedFrontend {
                    backends: r.backends.iter().map(|b| b.endpoint.clone()).collect(),
                    notes: notes.join(", "),
                    service: r
                        .namespace
                        .as_ref()
                        .zip(r.name.as_ref())
                        .map(|(ns, n)| format!("{ns}/{n}")),
                    port_name: r.port_name.clone(),
                    pods: r
                        .backends
                        .iter()
                        .filter_map(|b| Some((b.endpoint.clone(), b.pod.clone()?)))
                        .collect(),
                    row: None,
                };
                // The external scope of an address (traffic from outside) beside its internal
                // one: `"<addr:port> <PROTO> external"`.
                let scope = if r.scope == "external" {
                    " external"
                } else {
                    ""
                };
                (
                    format!("{} {}{scope}", r.frontend, r.protocol),
                    ProgrammedFrontend { row: Some(r), ..fe },
                )
            })
            .collect();
        Self {
            frontends,
            text: text.to_owned(),
        }
    }

    /// The backends of `frontend` (`"198.19.0.10:80 TCP"`) as a set; `None` when the frontend
    /// is not programmed.
    #[must_use]
    pub fn backends(&self, frontend: &str) -> Option<BTreeSet<String>> {
        self.frontends
            .get(frontend)
            .map(|f| f.backends.iter().cloned().collect())
    }

    /// The Pod `inspect` names behind backend `addr:port` (of any frontend).
    #[must_use]
    pub fn pod_of(&self, backend: &str) -> Option<&str> {
        self.frontends
            .values()
            .find_map(|f| f.pods.get(backend))
            .map(String::as_str)
    }
}

/// `"addr:port PROTO"` as `inspect services` names a frontend or backend address.
#[must_use]
pub fn frontend_key(addr: SocketAddr, protocol: Protocol) -> String {
    format!("{addr} {}", protocol.as_k8s())
}

// ---------------------------------------------------------------------------------------------
// Backends and clients
// ---------------------------------------------------------------------------------------------

/// How often serving threads look at their stop flag (their socket timeout).
const SERVER_POLL: Duration = Duration::from_millis(50);

/// Largest request a server reads.
const MAX_REQUEST: usize = 512;

/// TCP and UDP servers inside pod namespaces. Each answers a request (a line over TCP, a
/// datagram over UDP) with `"<label> <client address it saw> <request>"`. Dropping it stops
/// every thread (within [`SERVER_POLL`]) and closes every socket.
#[derive(Debug, Default)]
pub struct Backends {
    stop: Arc<AtomicBool>,
    threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
    served: Arc<Mutex<BTreeMap<String, u64>>>,
}

impl Backends {
    /// No server yet.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Serves TCP and UDP on `addr` inside `ns` (sockets bound there, served from threads),
    /// answering as `label`.
    pub fn serve(&self, ns: &Netns, label: &str, addr: SocketAddr) -> anyhow::Result<()> {
        let (tcp, udp) = ns.run(|| {
            let tcp = TcpListener::bind(addr).with_context(|| format!("TCP bind {addr}"))?;
            let udp = UdpSocket::bind(addr).with_context(|| format!("UDP bind {addr}"))?;
            Ok((tcp, udp))
        })?;
        // accept() honours SO_RCVTIMEO on Linux: the accept loop wakes up to check `stop`.
        setsockopt(&tcp, ReceiveTimeout, &TimeVal::milliseconds(poll_millis()))
            .context("SO_RCVTIMEO on the listener")?;
        udp.set_read_timeout(Some(SERVER_POLL))?;
        let (stop, threads, served) = (
            Arc::clone(&self.stop),
            Arc::clone(&self.threads),
            Arc::clone(&self.served),
        );
        let label = label.to_owned();
        let tcp_thread = {
            let label = label.clone();
            let (stop, threads, served) =
                (Arc::clone(&stop), Arc::clone(&threads), Arc::clone(&served));
            std::thread::Builder::new()
                .name(format!("tcp:{label}"))
                .spawn(move || accept_loop(&tcp, &label, &stop, &threads, &served))?
        };
        let udp_thread = std::thread::Builder::new()
            .name(format!("udp:{label}"))
            .spawn(move || udp_loop(&udp, &label, &stop, &served))?;
        let mut all = threads.lock().unwrap_or_else(PoisonError::into_inner);
        all.push(tcp_thread);
        all.push(udp_thread);
        Ok(())
    }

    /// Requests answered so far, per label.
    #[must_use]
    pub fn served(&self) -> BTreeMap<String, u64> {
        self.served
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Requests answered so far, all labels.
    #[must_use]
    pub fn total_served(&self) -> u64 {
        self.served().values().sum()
    }
}

impl Drop for Backends {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Connection threads are added by accept loops; take until none is left.
        for _ in 0..1000 {
            let batch =
                std::mem::take(&mut *self.threads.lock().unwrap_or_else(PoisonError::into_inner));
            if batch.is_empty() {
                break;
            }
            for t in batch {
                let _ = t.join();
            }
        }
    }
}

fn poll_millis() -> i64 {
    i64::try_from(SERVER_POLL.as_millis()).unwrap_or(50)
}

fn count(served: &Mutex<BTreeMap<String, u64>>, label: &str) {
    *served
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .entry(label.to_owned())
        .or_default() += 1;
}

fn answer(label: &str, peer: SocketAddr, request: &[u8]) -> String {
    format!(
        "{label} {} {}",
        peer.ip(),
        String::from_utf8_lossy(request).trim_end()
    )
}

fn accept_loop(
    listener: &TcpListener,
    label: &str,
    stop: &Arc<AtomicBool>,
    threads: &Mutex<Vec<JoinHandle<()>>>,
    served: &Arc<Mutex<BTreeMap<String, u64>>>,
) {
    while !stop.load(Ordering::Relaxed) {
        let (stream, peer) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => {
                eprintln!("svc-tests: backend {label}: accept: {e}");
                return;
            }
        };
        let (label, stop, served) = (label.to_owned(), Arc::clone(stop), Arc::clone(served));
        let handle =
            std::thread::spawn(move || serve_connection(stream, peer, &label, &stop, &served));
        threads
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(handle);
    }
}

/// Answers every line of one connection until the client closes it or the servers stop.
fn serve_connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    label: &str,
    stop: &AtomicBool,
    served: &Mutex<BTreeMap<String, u64>>,
) {
    if stream.set_read_timeout(Some(SERVER_POLL)).is_err()
        || stream
            .set_write_timeout(Some(Duration::from_secs(2)))
            .is_err()
    {
        return;
    }
    let mut pending = Vec::new();
    let mut buf = [0u8; MAX_REQUEST];
    while !stop.load(Ordering::Relaxed) {
        let n = match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        pending.extend_from_slice(&buf[..n]);
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let reply = answer(label, peer, &line) + "\n";
            if stream.write_all(reply.as_bytes()).is_err() {
                return;
            }
            count(served, label);
        }
        if pending.len() > MAX_REQUEST {
            return;
        }
    }
}

fn udp_loop(
    socket: &UdpSocket,
    label: &str,
    stop: &AtomicBool,
    served: &Mutex<BTreeMap<String, u64>>,
) {
    let mut buf = [0u8; MAX_REQUEST];
    while !stop.load(Ordering::Relaxed) {
        match socket.recv_from(&mut buf) {
            Ok((n, peer)) => {
                if socket
                    .send_to(answer(label, peer, &buf[..n]).as_bytes(), peer)
                    .is_ok()
                {
                    count(served, label);
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            // ICMP errors from earlier sends surface here (ECONNREFUSED ...): keep serving.
            Err(_) => {}
        }
    }
}

/// A server's answer to one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    /// The label of the server that answered (the backend pod's name).
    pub label: String,
    /// The client address the server saw (the client pod's own address: no source NAT).
    pub client_seen: IpAddr,
    /// Where the answer came from, as the client's socket reports it (the VIP and service
    /// port when the reverse translation works).
    pub from: SocketAddr,
}

/// Parses `"<label> <client> <request>"` and checks the request came back.
fn parse_answer(text: &str, request: &str, from: SocketAddr) -> anyhow::Result<Answer> {
    let text = text.trim_end();
    let mut parts = text.splitn(3, ' ');
    let (Some(label), Some(client), Some(echo)) = (parts.next(), parts.next(), parts.next()) else {
        bail!("malformed answer {text:?} from {from}");
    };
    ensure!(
        echo == request,
        "answer from {from} ({label}) echoes {echo:?}, not {request:?}"
    );
    Ok(Answer {
        label: label.to_owned(),
        client_seen: client
            .parse()
            .with_context(|| format!("client address in answer {text:?}"))?,
        from,
    })
}

/// An open TCP connection to a service (or any server), for several requests in turn.
#[derive(Debug)]
pub struct TcpSession {
    stream: TcpStream,
    pending: Vec<u8>,
}

impl TcpSession {
    /// Connects to `dst` within `timeout`; reads and writes get `timeout` too. Call it inside
    /// the client's namespace ([`Netns::run`]); the connection can be used from anywhere after.
    pub fn connect(dst: SocketAddr, timeout: Duration) -> anyhow::Result<Self> {
        Self::connect_from(0, dst, timeout)
    }

    /// Like [`connect`](Self::connect) from local port `local_port` (0: one the system picks).
    pub fn connect_from(
        local_port: u16,
        dst: SocketAddr,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let socket = sockd::socket(socket2::Domain::for_address(dst), socket2::Type::STREAM)?;
        if local_port != 0 {
            let any: SocketAddr = if dst.is_ipv4() {
                (std::net::Ipv4Addr::UNSPECIFIED, local_port).into()
            } else {
                (std::net::Ipv6Addr::UNSPECIFIED, local_port).into()
            };
            socket
                .bind(&any.into())
                .with_context(|| format!("TCP bind {any}"))?;
        }
        socket
            .connect_timeout(&dst.into(), timeout)
            .with_context(|| format!("TCP connect to {dst}"))?;
        let stream = TcpStream::from(socket);
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        Ok(Self {
            stream,
            pending: Vec::new(),
        })
    }

    /// The connection's local address.
    pub fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.stream.local_addr()?)
    }

    /// Sends `request` (one line, no newline) and reads the answer line.
    pub fn ask(&mut self, request: &str) -> anyhow::Result<Answer> {
        let peer = self.stream.peer_addr()?;
        self.stream
            .write_all(format!("{request}\n").as_bytes())
            .with_context(|| format!("sending {request:?} to {peer}"))?;
        let mut buf = [0u8; MAX_REQUEST];
        // Bounded: each read waits at most the timeout, and a line is at most MAX_REQUEST.
        loop {
            if let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=end).collect();
                return parse_answer(&String::from_utf8_lossy(&line), request, peer);
            }
            ensure!(
                self.pending.len() <= MAX_REQUEST,
                "answer from {peer} too long"
            );
            let n = self
                .stream
                .read(&mut buf)
                .with_context(|| format!("waiting for the answer to {request:?} from {peer}"))?;
            ensure!(
                n > 0,
                "{peer} closed the connection before answering {request:?}"
            );
            self.pending.extend_from_slice(&buf[..n]);
        }
    }
}

/// A UDP socket that keeps sending to one destination from the same source port: one flow
/// across many requests (unlike [`udp_request`], whose every request is a new flow).
#[derive(Debug)]
pub struct UdpSession {
    socket: UdpSocket,
    dst: SocketAddr,
    timeout: Duration,
}

impl UdpSession {
    /// Binds a socket (any address, a free port) for requests to `dst`, each attempt waiting
    /// `timeout` for its answer. Call it inside the client's namespace; the session can be used
    /// from anywhere after.
    pub fn open(dst: SocketAddr, timeout: Duration) -> anyhow::Result<Self> {
        let bind: SocketAddr = if dst.is_ipv4() {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let socket = udp_socket(bind).with_context(|| format!("UDP bind for {dst}"))?;
        Ok(Self {
            socket,
            dst,
            timeout,
        })
    }

    /// The socket's local address.
    pub fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.socket.local_addr()?)
    }

    /// Sends `request` (which must differ from every earlier request of this session) up to
    /// `attempts` times, waiting for its answer after each; answers to earlier requests that
    /// arrive late are skipped. Returns the answer and the attempt that got it.
    pub fn ask(&self, request: &str, attempts: u32) -> anyhow::Result<(Answer, u32)> {
        let mut buf = [0u8; MAX_REQUEST];
        for attempt in 1..=attempts {
            self.socket
                .send_to(request.as_bytes(), self.dst)
                .with_context(|| format!("UDP send to {}", self.dst))?;
            let deadline = Instant::now() + self.timeout;
            // Bounded: every receive waits at most until the deadline.
            while let Some(left) = deadline
                .checked_duration_since(Instant::now())
                .filter(|d| !d.is_zero())
            {
                self.socket.set_read_timeout(Some(left))?;
                let (n, from) = match self.socket.recv_from(&mut buf) {
                    Ok(got) => got,
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                        break;
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => {
                        return Err(e).with_context(|| format!("UDP receive from {}", self.dst));
                    }
                };
                let text = String::from_utf8_lossy(&buf[..n]);
                let echoes_request = text
                    .trim_end()
                    .splitn(3, ' ')
                    .nth(2)
                    .is_some_and(|echo| echo == request);
                if echoes_request {
                    return Ok((parse_answer(&text, request, from)?, attempt));
                }
            }
        }
        bail!(
            "no UDP answer from {} to {request:?} after {attempts} attempts of {:?}",
            self.dst,
            self.timeout
        )
    }
}

/// A UDP socket bound to `bind`: a client socket of the current namespace (a pod's comes from
/// its socket helper, see [`sockd`]).
pub fn udp_socket(bind: SocketAddr) -> anyhow::Result<UdpSocket> {
    let socket = sockd::socket(socket2::Domain::for_address(bind), socket2::Type::DGRAM)?;
    socket.bind(&bind.into())?;
    Ok(socket.into())
}

/// One request over a new TCP connection to `dst` (connect, ask, close). Call it inside the
/// client's namespace.
pub fn tcp_request(dst: SocketAddr, request: &str, timeout: Duration) -> anyhow::Result<Answer> {
    TcpSession::connect(dst, timeout)?.ask(request)
}

/// One request over a new UDP socket (a new flow, so a new backend choice) to `dst`, sent up
/// to `attempts` times on the same socket (the same flow) with `timeout` each. Returns the
/// answer and the attempt that got it. The socket is not connected, so the answer's
/// [`from`](Answer::from) is whatever source the answer had. Call it inside the client's
/// namespace.
pub fn udp_request(
    dst: SocketAddr,
    request: &str,
    timeout: Duration,
    attempts: u32,
) -> anyhow::Result<(Answer, u32)> {
    udp_exchange(dst, request, timeout, attempts, false)
}

/// Like [`udp_request`] but on a socket connected to `dst`: only answers from `dst` are
/// received, and an ICMP error for the flow (port unreachable: a rejected request) fails the
/// receive at once with `ConnectionRefused` instead of waiting for the timeout.
pub fn udp_request_connected(
    dst: SocketAddr,
    request: &str,
    timeout: Duration,
    attempts: u32,
) -> anyhow::Result<(Answer, u32)> {
    udp_exchange(dst, request, timeout, attempts, true)
}

/// Like [`udp_request`] from a socket bound to `local_port` (any address). A port the system
/// hands out may be one an earlier socket used, and a datagram on the same addresses and ports
/// continues that flow (in this datapath as in conntrack) with the backend it had: to be sure
/// each request is a new flow, give each its own port outside the ephemeral range.
pub fn udp_request_from(
    local_port: u16,
    dst: SocketAddr,
    request: &str,
    timeout: Duration,
    attempts: u32,
) -> anyhow::Result<(Answer, u32)> {
    udp_exchange_from(local_port, dst, request, timeout, attempts, false)
}

fn udp_exchange(
    dst: SocketAddr,
    request: &str,
    timeout: Duration,
    attempts: u32,
    connected: bool,
) -> anyhow::Result<(Answer, u32)> {
    udp_exchange_from(0, dst, request, timeout, attempts, connected)
}

fn udp_exchange_from(
    local_port: u16,
    dst: SocketAddr,
    request: &str,
    timeout: Duration,
    attempts: u32,
    connected: bool,
) -> anyhow::Result<(Answer, u32)> {
    let bind: SocketAddr = if dst.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, local_port).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, local_port).into()
    };
    let socket = udp_socket(bind).with_context(|| format!("UDP bind {bind}"))?;
    socket.set_read_timeout(Some(timeout))?;
    if connected {
        socket
            .connect(dst)
            .with_context(|| format!("UDP connect to {dst}"))?;
    }
    let mut buf = [0u8; MAX_REQUEST];
    let mut last = anyhow!("no attempt made");
    for attempt in 1..=attempts {
        socket
            .send_to(request.as_bytes(), dst)
            .with_context(|| format!("UDP send to {dst}"))?;
        match socket.recv_from(&mut buf) {
            Ok((n, from)) => {
                return Ok((
                    parse_answer(&String::from_utf8_lossy(&buf[..n]), request, from)?,
                    attempt,
                ));
            }
            Err(e) => last = anyhow::Error::new(e),
        }
    }
    Err(last.context(format!(
        "no UDP answer from {dst} to {request:?} after {attempts} attempts of {timeout:?}"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inspect_services_output_is_parsed() {
        let text = r#"[
          {"namespace": "default", "name": "web", "portName": "http", "frontend": "198.19.0.10:80",
           "address": "198.19.0.10", "port": 80, "protocol": "TCP", "type": "ClusterIP",
           "scope": "internal", "id": 1, "internalTrafficPolicy": "Cluster",
           "sessionAffinity": "None", "affinityTimeoutSeconds": 0, "whenEmpty": "serve",
           "servesTerminating": false, "packets": 0, "bytes": 0, "backends": [
             {"slot": 1, "id": 7, "endpoint": "198.18.1.10:8080", "pod": "default/web-0",
              "state": "ready", "local": true, "packets": 0, "bytes": 0},
             {"slot": 2, "id": 8, "endpoint": "198.18.2.10:8080", "pod": null,
              "state": "ready", "local": false, "packets": 0, "bytes": 0}]},
          {"namespace": null, "name": null, "portName": null, "frontend": "[2001:db8:f::10]:80",
           "address": "2001:db8:f::10", "port": 80, "protocol": "UDP", "type": "ClusterIP",
           "scope": "internal", "id": 2, "internalTrafficPolicy": "Cluster",
           "sessionAffinity": "None", "affinityTimeoutSeconds": 0, "whenEmpty": "reject",
           "servesTerminating": false, "packets": 0, "bytes": 0, "backends": []}
        ]"#;
        let p = Programmed::parse(text);
        assert_eq!(
            p.backends("198.19.0.10:80 TCP").unwrap(),
            ["198.18.1.10:8080", "198.18.2.10:8080"]
                .iter()
                .map(|s| (*s).to_owned())
                .collect()
        );
        let web = &p.frontends["198.19.0.10:80 TCP"];
        assert_eq!(web.service.as_deref(), Some("default/web"));
        assert_eq!(web.port_name.as_deref(), Some("http"));
        assert_eq!(p.pod_of("198.18.1.10:8080"), Some("default/web-0"));
        assert_eq!(p.pod_of("198.18.2.10:8080"), None);
        let v6 = &p.frontends["[2001:db8:f::10]:80 UDP"];
        assert!(v6.backends.is_empty());
        assert_eq!(v6.notes, "reject (no endpoints)");
        assert!(Programmed::parse("[]").frontends.is_empty());
    }

    #[test]
    fn stats_tables_are_parsed() {
        let text = "counter packets bytes\ndnat 3 180\nrev_nat 2 120\ndrop reason packets bytes\nno_endpoints 1 60\n";
        let s = parse_stats(text).unwrap();
        assert_eq!(s["dnat"], 3);
        assert_eq!(s["no_endpoints"], 1);
    }

    #[test]
    fn objects_load_through_the_agent_and_compute_without_errors() {
        let v4: IpAddr = "198.19.0.10".parse().unwrap();
        let v6: IpAddr = "2001:db8:f::10".parse().unwrap();
        let svc = Service::cluster_ip("web", &[v4, v6])
            .port("http", Protocol::Tcp, 80, "web")
            .port("metrics", Protocol::Udp, 9090, 9100)
            .internal_traffic_policy_local();
        let mut slice = EndpointSlice::new("web", true).ports_of(&svc, &[("web", 8080)]);
        slice.endpoints.push(Endpoint {
            address: "2001:db8:1::10".parse().unwrap(),
            node_name: "node1".to_owned(),
            pod: "web-0".to_owned(),
            ready: true,
            serving: true,
            terminating: false,
        });
        let empty = EndpointSlice::new("web", false).ports_of(&svc, &[("web", 8080)]);
        let text = documents(&[svc.to_yaml(), slice.to_yaml(), empty.to_yaml()]);
        let loaded = svc_agent::source::parse_str(&text, Path::new("web.yaml"));
        assert!(loaded.errors.is_empty(), "{:?}\n{text}", loaded.errors);
        assert_eq!(loaded.snapshot.services.len(), 1);
        assert_eq!(loaded.snapshot.slices.len(), 2);
        let desired = svc_agent::model::compute(&loaded.snapshot, "node1");
        assert!(desired.errors.is_empty(), "{:?}", desired.errors);
        // 2 VIPs x 2 ports.
        assert_eq!(desired.frontends.len(), 4, "{:?}", desired.frontends);
        let backends: Vec<String> = desired
            .frontends
            .iter()
            .flat_map(|(k, f)| {
                f.backends
                    .iter()
                    .map(move |b| format!("{k} -> {}:{}", b.addr, b.port))
            })
            .collect();
        assert_eq!(
            backends,
            [
                "[2001:db8:f::10]:80/TCP (internal) -> 2001:db8:1::10:8080",
                "[2001:db8:f::10]:9090/UDP (internal) -> 2001:db8:1::10:9100"
            ]
        );
    }
}
