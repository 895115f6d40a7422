//! The emulated cluster: an underlay bridge, two nodes, an external client and pods.

use std::{
    fs,
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Once,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, anyhow, bail};
use aya::{
    Ebpf,
    programs::{Xdp, XdpMode},
};
use nix::mount::{MsFlags, mount};

use super::{
    Netns, Process,
    cleanup::{self, CGROUP2_ROOT},
    cmd,
    plan::{
        BLACK_HOLE_V4, BLACK_HOLE_V6, EXTERNAL_V4, EXTERNAL_V6, Ipv4Cidr, Ipv6Cidr, MAX_NODES,
        MAX_PODS_PER_NODE, NODE_COUNT, TEST_PREFIX, UNDERLAY_V4, UNDERLAY_V6, node_pod_cidr_v4,
        node_pod_cidr_v6, node_underlay_v4, node_underlay_v6, pod_v4, pod_v6,
    },
    require_root, sockd,
};

/// Name of the bridge in the underlay namespace.
pub const BRIDGE: &str = "br0";

/// Name of the node side of a pod's veth: `svcpod<N>` (N counts the node's pods from 0). A
/// later agent finds pod-facing interfaces by this pattern.
pub const POD_IFNAME_PREFIX: &str = "svcpod";

/// Name of the underlay interface in node and external namespaces, and of a pod's interface.
pub const ETH0: &str = "eth0";

/// Readiness polls: this many checks ...
const READY_TRIES: u32 = 300;
/// ... this far apart (3 s in all).
const READY_STEP: Duration = Duration::from_millis(10);

/// Sysctls for every namespace: addresses are usable at once (no DAD), no reverse-path filter.
const COMMON_SYSCTLS: &[&str] = &[
    "net.ipv6.conf.all.accept_dad=0",
    "net.ipv6.conf.default.accept_dad=0",
    "net.ipv4.conf.all.rp_filter=0",
    "net.ipv4.conf.default.rp_filter=0",
];

/// Sysctls for nodes: they route (both families) and send no redirects (the external client's
/// routes stay as the test set them).
const NODE_SYSCTLS: &[&str] = &[
    "net.ipv4.ip_forward=1",
    "net.ipv6.conf.all.forwarding=1",
    "net.ipv6.conf.default.forwarding=1",
    "net.ipv4.conf.all.send_redirects=0",
    "net.ipv4.conf.default.send_redirects=0",
];

/// Environment variable choosing how the end-to-end tests' agents attach the XDP program to
/// the nodes' uplinks: `off` (the default), `generic` or `native` (`--xdp`). `cargo xtask
/// test` runs the north-south cases once with each of `generic` and `native` besides.
pub const XDP_ENV: &str = "SVC_TEST_XDP";

/// The `--xdp` value the tests' agents run with (see [`XDP_ENV`]).
///
/// # Panics
/// When the variable holds anything but `off`, `generic` or `native`.
#[must_use]
pub fn xdp_mode() -> &'static str {
    match std::env::var(XDP_ENV).as_deref() {
        Err(_) | Ok("" | "off") => "off",
        Ok("generic") => "generic",
        Ok("native") => "native",
        Ok(other) => panic!("{XDP_ENV}={other:?}: expected off, generic or native"),
    }
}

/// Makes the underlay behave like a wire for XDP runs: frames arrive with complete checksums
/// (veth otherwise hands a local stack's `CHECKSUM_PARTIAL` packets over as they are, whose
/// transport checksum field holds only the pseudo-header sum: XDP sees bytes, not the socket
/// buffer's checksum state, so it could not rewrite them correctly; a NIC never delivers
/// such frames), so transmit checksum offload is off on every underlay interface; and the
/// bridge's ports take the frames nodes send back with `XDP_TX` at once: a veth kicks its
/// peer's receive queue after `XDP_TX` only when the peer runs an XDP program itself (else
/// the frames wait there until the peer receives something else), so each port runs one in
/// native mode that passes every frame: svc's own, from an object of its own whose maps stay
/// empty (no frontend, no SNAT address: every frame is untouched). The returned object holds
/// those attachments. `hosts`: the namespaces whose `eth0` is on the underlay.
fn like_a_wire<'a>(
    underlay: &Netns,
    ports: &[String],
    hosts: impl Iterator<Item = &'a Netns>,
) -> anyhow::Result<Ebpf> {
    let mut ebpf = svc_agent::loader::load_object_with(
        svc_agent::loader::MapSizes::small(),
        svc_agent::loader::Globals::default(),
    )?;
    let prog = svc_agent::loader::loaded::<Xdp>(&mut ebpf, svc_agent::loader::PROG_XDP_FROM_WORLD)?;
    underlay.run(|| {
        for port in ports {
            prog.attach(port, XdpMode::Driver)
                .with_context(|| format!("a pass-through XDP program on the underlay's {port}"))?;
        }
        Ok(())
    })?;
    for port in ports {
        underlay.exec(["ethtool", "-K", port, "tx", "off"])?;
    }
    for ns in hosts {
        ns.exec(["ethtool", "-K", ETH0, "tx", "off"])?;
    }
    Ok(ebpf)
}

/// Sysctls for the underlay: a pure layer-2 segment, no IPv6 on the bridge or its ports.
const UNDERLAY_SYSCTLS: &[&str] = &[
    "net.ipv6.conf.all.disable_ipv6=1",
    "net.ipv6.conf.default.disable_ipv6=1",
];

static RUN_COUNTER: AtomicU32 = AtomicU32::new(0);
static STALE_CLEANUP: Once = Once::new();

/// An emulated node: its own namespace that routes between its pods and the underlay, its own
/// bpffs and its own cgroup.
#[derive(Clone, Debug)]
pub struct Node {
    /// 0-based index (node `i` is `node{i+1}`).
    pub index: usize,
    /// `node1`, `node2`.
    pub name: String,
    /// The node's network namespace.
    pub ns: Netns,
    /// The underlay interface (`eth0`).
    pub underlay_ifname: String,
    /// Underlay address (`198.18.0.11`, ...), on `eth0` as a /24.
    pub underlay_v4: Ipv4Addr,
    /// Underlay address, IPv6 (`2001:db8::11`, ...), on `eth0` as a /64.
    pub underlay_v6: Ipv6Addr,
    /// The node's pod CIDR (`198.18.1.0/24`, ...).
    pub pod_cidr_v4: Ipv4Cidr,
    /// The node's IPv6 pod CIDR (`2001:db8:1::/64`, ...).
    pub pod_cidr_v6: Ipv6Cidr,
    /// Pods' gateway (`.1` of the pod CIDR), on every pod-facing interface as a /32.
    pub gateway_v4: Ipv4Addr,
    /// Pods' IPv6 gateway (`::1` of the pod CIDR), on every pod-facing interface as a /128.
    pub gateway_v6: Ipv6Addr,
    /// A bpffs mounted for this node alone (`/run/svc-tests/<prefix>/<node>/bpffs`).
    pub bpffs: PathBuf,
    /// A cgroup v2 directory for this node's processes (`/sys/fs/cgroup/unified/<prefix>-<node>`).
    pub cgroup: PathBuf,
    /// The node sides of its pods' veths (`svcpod0`, `svcpod1`, ...), in creation order.
    pub pod_ifnames: Vec<String>,
}

impl Node {
    /// Starts `command` in the background in this node's namespace and cgroup (see
    /// [`Netns::spawn`]).
    pub fn spawn(&self, command: &Command) -> anyhow::Result<Process> {
        self.ns.spawn(command, Some(&self.cgroup))
    }
}

/// A pod: its own namespace, wired to its node like the ptp CNI does.
#[derive(Clone, Debug)]
pub struct Pod {
    /// The name the test gave it.
    pub name: String,
    /// Index of its node in [`Topology::nodes`].
    pub node: usize,
    /// The pod's network namespace.
    pub ns: Netns,
    /// The pod's interface (`eth0`).
    pub ifname: String,
    /// The node side of its veth (`svcpod<N>`, in the node's namespace).
    pub host_ifname: String,
    /// The pod's address (a /32 on `eth0`).
    pub ipv4: Ipv4Addr,
    /// The pod's IPv6 address (a /128 on `eth0`).
    pub ipv6: Ipv6Addr,
    /// The pod's cgroup, below its node's (as a pod's cgroup lies below the cgroup v2 root in
    /// a cluster): client sockets the harness opens in the pod, and [`Pod::spawn`]'s
    /// processes, belong to it.
    pub cgroup: PathBuf,
}

impl Pod {
    /// Starts `command` in the background in this pod's namespace and cgroup.
    pub fn spawn(&self, command: &Command) -> anyhow::Result<Process> {
        self.ns.spawn(command, Some(&self.cgroup))
    }
}

/// The client outside the cluster, on the underlay.
#[derive(Clone, Debug)]
pub struct External {
    /// Its network namespace.
    pub ns: Netns,
    /// Its underlay interface (`eth0`).
    pub ifname: String,
    /// [`EXTERNAL_V4`](super::EXTERNAL_V4), a /24 on `eth0`.
    pub ipv4: Ipv4Addr,
    /// [`EXTERNAL_V6`](super::EXTERNAL_V6), a /64 on `eth0`.
    pub ipv6: Ipv6Addr,
}

/// The emulated cluster of one test run. Everything it creates is named with its
/// [prefix](Topology::prefix) and is removed when it is dropped, also during a panic.
///
/// ```text
///  pod ns (eth0 .10/32) ==veth== svcpod0 [node1 ns] eth0 ==veth== n1 ┐
///                                                                    ├ br0 [underlay ns]
///  pod ns (eth0 .10/32) ==veth== svcpod0 [node2 ns] eth0 ==veth== n2 ┤
///                                              [external ns] eth0 ==veth== ext ┘
/// ```
#[derive(Debug)]
pub struct Topology {
    prefix: String,
    underlay: Netns,
    /// The black-hole gateway of the underlay (see [`BLACK_HOLE_V4`](super::BLACK_HOLE_V4)).
    black_hole: Netns,
    nodes: Vec<Node>,
    external: External,
    pods: Vec<Pod>,
    /// Each pod's socket helper (see [`super::sockd`]).
    sockds: Vec<Process>,
    /// With XDP on, the underlay ports' pass-through XDP programs (see `like_a_wire`).
    _wire: Option<Ebpf>,
    // Last, so the handles above are gone before the cleanup runs (they own nothing anyway).
    guard: RunGuard,
}

impl Topology {
    /// Builds the underlay, [`NODE_COUNT`] nodes and the external client, and waits (bounded)
    /// until every link is up. Fails first thing, with a message saying so, when not root.
    /// With XDP on ([`xdp_mode`]), the underlay is made a wire (see `like_a_wire`).
    pub fn new() -> anyhow::Result<Self> {
        Self::build(xdp_mode() != "off", NODE_COUNT)
    }

    /// [`new`](Self::new) with `nodes` nodes (1 to [`MAX_NODES`]) instead of [`NODE_COUNT`]:
    /// every node routes to every other node's pods, the external client reaches every pod
    /// CIDR through node 0.
    pub fn with_nodes(nodes: usize) -> anyhow::Result<Self> {
        if !(1..=MAX_NODES).contains(&nodes) {
            bail!("a topology has 1 to {MAX_NODES} nodes, not {nodes}");
        }
        Self::build(xdp_mode() != "off", nodes)
    }

    /// [`new`](Self::new), the underlay made a wire whatever [`xdp_mode`] says: for tests that
    /// turn XDP on themselves.
    pub fn new_on_a_wire() -> anyhow::Result<Self> {
        Self::build(true, NODE_COUNT)
    }

    fn build(wire: bool, node_count: usize) -> anyhow::Result<Self> {
        require_root()?;
        if !Path::new(CGROUP2_ROOT).join("cgroup.controllers").exists() {
            bail!(
                "cgroup v2 is not mounted at {CGROUP2_ROOT}; the harness needs it for node cgroups"
            );
        }
        STALE_CLEANUP.call_once(cleanup::remove_stale_runs);
        let prefix = format!(
            "{TEST_PREFIX}{}x{}",
            std::process::id(),
            RUN_COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        // From here on, an early return drops the guard, which removes what was created.
        let guard = RunGuard {
            prefix: prefix.clone(),
        };
        let underlay = guard.add_netns("u", &[COMMON_SYSCTLS, UNDERLAY_SYSCTLS])?;
        underlay.ip_batch(&[
            format!("link add {BRIDGE} type bridge stp_state 0 forward_delay 0 mcast_snooping 0"),
            format!("link set {BRIDGE} up"),
        ])?;

        let mut nodes = Vec::new();
        for index in 0..node_count {
            nodes.push(guard.add_node(&underlay, index)?);
        }
        let external = guard.add_external(&underlay, &nodes[0], node_count)?;
        let black_hole = guard.add_black_hole(&underlay)?;

        // Each node reaches the other nodes' pods through their underlay address.
        for node in &nodes {
            let routes: Vec<String> = nodes
                .iter()
                .filter(|other| other.index != node.index)
                .flat_map(|other| {
                    [
                        format!(
                            "route add {} via {} dev {ETH0}",
                            other.pod_cidr_v4, other.underlay_v4
                        ),
                        format!(
                            "route add {} via {} dev {ETH0}",
                            other.pod_cidr_v6, other.underlay_v6
                        ),
                    ]
                })
                .chain([
                    format!("route add default via {BLACK_HOLE_V4} dev {ETH0}"),
                    format!("route add ::/0 via {BLACK_HOLE_V6} dev {ETH0}"),
                ])
                .collect();
            node.ns.ip_batch(&routes)?;
        }

        let mut ports: Vec<String> = (1..=node_count).map(|i| format!("n{i}")).collect();
        ports.push("ext".to_owned());
        ports.push("gw".to_owned());
        let wire = if wire {
            Some(like_a_wire(
                &underlay,
                &ports,
                nodes
                    .iter()
                    .map(|n| &n.ns)
                    .chain([&external.ns, &black_hole]),
            )?)
        } else {
            None
        };
        wait_bridge_forwarding(&underlay, &ports)?;
        for ns in nodes
            .iter()
            .map(|n| &n.ns)
            .chain([&external.ns, &black_hole])
        {
            ns.wait_links_up(&[ETH0], READY_TRIES, READY_STEP)?;
        }
        Ok(Self {
            prefix,
            underlay,
            black_hole,
            nodes,
            external,
            pods: Vec::new(),
            sockds: Vec::new(),
            _wire: wire,
            guard,
        })
    }

    /// Adds a pod named `name` on node `node` (0-based): its namespace, a veth `eth0` (pod) /
    /// `svcpod<N>` (node), addresses, routes both ways; waits until the veth is up.
    pub fn add_pod(&mut self, node: usize, name: &str) -> anyhow::Result<Pod> {
        let index = self.pods.len();
        let count = self.nodes.len();
        let n = self
            .nodes
            .get_mut(node)
            .ok_or_else(|| anyhow!("no node {node}: the topology has {count} (0-based)"))?;
        let slot = u32::try_from(n.pod_ifnames.len()).unwrap_or(u32::MAX);
        if slot >= MAX_PODS_PER_NODE {
            bail!("node {} already has {MAX_PODS_PER_NODE} pods", n.name);
        }
        let ns = self
            .guard
            .add_netns(&format!("p{index}"), &[COMMON_SYSCTLS])?;
        let cgroup = n.cgroup.join(format!("pod{index}"));
        fs::create_dir(&cgroup).with_context(|| format!("creating cgroup {}", cgroup.display()))?;
        let sockd = cleanup::run_dir(&self.prefix).join(format!("p{index}.sockd"));
        let helper = ns.spawn(&sockd::command(&sockd), Some(&cgroup))?;
        sockd::wait_ready(&sockd)?;
        self.sockds.push(helper);
        let ns = ns.with_sockd(sockd);
        let pod = Pod {
            name: name.to_owned(),
            node,
            ns,
            ifname: ETH0.to_owned(),
            host_ifname: format!("{POD_IFNAME_PREFIX}{slot}"),
            ipv4: pod_v4(node, slot),
            ipv6: pod_v6(node, slot),
            cgroup,
        };
        let host = &pod.host_ifname;
        n.ns.ip([
            "link",
            "add",
            host,
            "type",
            "veth",
            "peer",
            "name",
            ETH0,
            "netns",
            pod.ns.name(),
        ])?;
        n.ns.ip_batch(&[
            format!("link set {host} up"),
            format!("addr add {}/32 dev {host}", n.gateway_v4),
            format!("addr add {}/128 dev {host} nodad", n.gateway_v6),
            format!("route add {}/32 dev {host}", pod.ipv4),
            format!("route add {}/128 dev {host}", pod.ipv6),
        ])?;
        pod.ns.ip_batch(&[
            format!("link set {ETH0} up"),
            format!("addr add {}/32 dev {ETH0}", pod.ipv4),
            format!("addr add {}/128 dev {ETH0} nodad", pod.ipv6),
            format!("route add {}/32 dev {ETH0} scope link", n.gateway_v4),
            format!("route add 0.0.0.0/0 via {} dev {ETH0}", n.gateway_v4),
            format!("route add {}/128 dev {ETH0}", n.gateway_v6),
            format!("route add ::/0 via {} dev {ETH0}", n.gateway_v6),
        ])?;
        pod.ns.wait_links_up(&[ETH0], READY_TRIES, READY_STEP)?;
        n.ns.wait_links_up(&[host], READY_TRIES, READY_STEP)?;
        n.pod_ifnames.push(pod.host_ifname.clone());
        self.pods.push(pod.clone());
        Ok(pod)
    }

    /// The run's prefix (`svct<pid>x<n>`); every name the run creates starts with it.
    #[must_use]
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The namespace holding the underlay bridge ([`BRIDGE`]).
    #[must_use]
    pub fn underlay(&self) -> &Netns {
        &self.underlay
    }

    /// The nodes, index 0 first.
    #[must_use]
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// Node `index` (0-based).
    ///
    /// # Panics
    /// When there is no node `index` (there are [`NODE_COUNT`] unless built
    /// [`with_nodes`](Self::with_nodes)).
    #[must_use]
    pub fn node(&self, index: usize) -> &Node {
        &self.nodes[index]
    }

    /// The external client (routes to every pod CIDR via node 0).
    #[must_use]
    pub fn external(&self) -> &External {
        &self.external
    }

    /// The pods, in creation order.
    #[must_use]
    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// The run's directory (`/run/svc-tests/<prefix>`), removed on drop.
    #[must_use]
    pub fn run_dir(&self) -> PathBuf {
        cleanup::run_dir(&self.prefix)
    }

    /// Every namespace of the run (underlay, nodes, external, pods).
    #[must_use]
    pub fn all_netns(&self) -> Vec<&Netns> {
        [&self.underlay, &self.black_hole]
            .into_iter()
            .chain(self.nodes.iter().map(|n| &n.ns))
            .chain([&self.external.ns])
            .chain(self.pods.iter().map(|p| &p.ns))
            .collect()
    }
}

/// Owns the run's resources; dropping it removes all of them (found by prefix, so whatever
/// was created before an error is removed too).
#[derive(Debug)]
struct RunGuard {
    prefix: String,
}

impl RunGuard {
    /// Creates namespace `<prefix>-<suffix>` with loopback up and `sysctls` set.
    fn add_netns(&self, suffix: &str, sysctls: &[&[&str]]) -> anyhow::Result<Netns> {
        let name = format!("{}-{suffix}", self.prefix);
        cmd::ip(&["netns", "add", &name])?;
        let ns = Netns::named(&name);
        ns.ip(["link", "set", "lo", "up"])?;
        ns.sysctl(&sysctls.concat())?;
        Ok(ns)
    }

    fn add_node(&self, underlay: &Netns, index: usize) -> anyhow::Result<Node> {
        let name = format!("node{}", index + 1);
        let ns = self.add_netns(&format!("n{}", index + 1), &[COMMON_SYSCTLS, NODE_SYSCTLS])?;
        let port = format!("n{}", index + 1);
        let node = Node {
            index,
            ns,
            underlay_ifname: ETH0.to_owned(),
            underlay_v4: node_underlay_v4(index),
            underlay_v6: node_underlay_v6(index),
            pod_cidr_v4: node_pod_cidr_v4(index),
            pod_cidr_v6: node_pod_cidr_v6(index),
            gateway_v4: node_pod_cidr_v4(index).host(1),
            gateway_v6: node_pod_cidr_v6(index).host(1),
            bpffs: self.add_bpffs(&name)?,
            cgroup: self.add_cgroup(&name)?,
            pod_ifnames: Vec::new(),
            name,
        };
        Self::plug_into_bridge(&node.ns, underlay, &port)?;
        node.ns.ip_batch(&[
            format!(
                "addr add {}/{} dev {ETH0}",
                node.underlay_v4, UNDERLAY_V4.len
            ),
            format!(
                "addr add {}/{} dev {ETH0} nodad",
                node.underlay_v6, UNDERLAY_V6.len
            ),
        ])?;
        Ok(node)
    }

    fn add_external(
        &self,
        underlay: &Netns,
        via: &Node,
        node_count: usize,
    ) -> anyhow::Result<External> {
        let ns = self.add_netns("ext", &[COMMON_SYSCTLS])?;
        Self::plug_into_bridge(&ns, underlay, "ext")?;
        let mut lines = vec![
            format!("addr add {EXTERNAL_V4}/{} dev {ETH0}", UNDERLAY_V4.len),
            format!(
                "addr add {EXTERNAL_V6}/{} dev {ETH0} nodad",
                UNDERLAY_V6.len
            ),
        ];
        for index in 0..node_count {
            lines.push(format!(
                "route add {} via {}",
                node_pod_cidr_v4(index),
                via.underlay_v4
            ));
            lines.push(format!(
                "route add {} via {}",
                node_pod_cidr_v6(index),
                via.underlay_v6
            ));
        }
        ns.ip_batch(&lines)?;
        Ok(External {
            ns,
            ifname: ETH0.to_owned(),
            ipv4: EXTERNAL_V4,
            ipv6: EXTERNAL_V6,
        })
    }

    /// The underlay's black-hole gateway: a router (forwarding on) whose only route beyond the
    /// underlay is a `blackhole` default, so whatever a node sends it is dropped without an
    /// ICMP error (a forwarding-off router would answer "host unreachable" at once).
    fn add_black_hole(&self, underlay: &Netns) -> anyhow::Result<Netns> {
        let ns = self.add_netns("gw", &[COMMON_SYSCTLS, NODE_SYSCTLS])?;
        Self::plug_into_bridge(&ns, underlay, "gw")?;
        ns.ip_batch(&[
            format!("addr add {BLACK_HOLE_V4}/{} dev {ETH0}", UNDERLAY_V4.len),
            format!(
                "addr add {BLACK_HOLE_V6}/{} dev {ETH0} nodad",
                UNDERLAY_V6.len
            ),
            "route add blackhole default".to_owned(),
            "route add blackhole ::/0".to_owned(),
        ])?;
        Ok(ns)
    }

    /// A veth `eth0` in `ns` whose peer `port` is created directly in the underlay namespace
    /// (nothing appears in the root namespace) and enslaved to the bridge; both ends up.
    fn plug_into_bridge(ns: &Netns, underlay: &Netns, port: &str) -> anyhow::Result<()> {
        ns.ip([
            "link",
            "add",
            ETH0,
            "type",
            "veth",
            "peer",
            "name",
            port,
            "netns",
            underlay.name(),
        ])?;
        underlay.ip_batch(&[
            format!("link set {port} master {BRIDGE}"),
            format!("link set {port} up"),
        ])?;
        ns.ip(["link", "set", ETH0, "up"]).map(drop)
    }

    fn add_bpffs(&self, node: &str) -> anyhow::Result<PathBuf> {
        let dir = cleanup::run_dir(&self.prefix).join(node).join("bpffs");
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        mount(
            Some("bpf"),
            &dir,
            Some("bpf"),
            MsFlags::empty(),
            None::<&str>,
        )
        .with_context(|| format!("mount -t bpf bpf {}", dir.display()))?;
        Ok(dir)
    }

    fn add_cgroup(&self, node: &str) -> anyhow::Result<PathBuf> {
        let dir = Path::new(CGROUP2_ROOT).join(format!("{}-{node}", self.prefix));
        fs::create_dir(&dir).with_context(|| format!("creating cgroup {}", dir.display()))?;
        Ok(dir)
    }
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        for e in cleanup::remove_run(&self.prefix) {
            eprintln!("svc-tests: cleaning up run {}: {e:#}", self.prefix);
        }
    }
}

/// Waits (bounded) until every `port` of the underlay bridge is forwarding.
fn wait_bridge_forwarding(underlay: &Netns, ports: &[String]) -> anyhow::Result<()> {
    let mut waiting = Vec::new();
    for _ in 0..READY_TRIES {
        let mut command = Command::new("bridge");
        command.args(["-n", underlay.name(), "link", "show"]);
        let links = cmd::output(&mut command, None)?;
        waiting = ports
            .iter()
            .filter(|port| {
                !links.lines().any(|l| {
                    l.split_whitespace()
                        .nth(1)
                        .and_then(|n| n.trim_end_matches(':').split('@').next())
                        == Some(port.as_str())
                        && l.contains("state forwarding")
                })
            })
            .cloned()
            .collect();
        if waiting.is_empty() {
            return Ok(());
        }
        std::thread::sleep(READY_STEP);
    }
    Err(anyhow!(
        "bridge ports {waiting:?} in {underlay} not forwarding after {READY_TRIES} checks"
    ))
}
