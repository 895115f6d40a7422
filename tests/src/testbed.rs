//! The common part of a `svc-agent` end-to-end test: the topology with its pods, a manifest
//! directory holding the topology's Nodes, the agent binary, the agents following that
//! directory (one per node), and a clock for step lines.
//!
//! A test's own cluster type holds a [`TestBed`] as its last field (so its servers drop first,
//! then the agents, then the topology, whose guard removes namespaces, mounts and the run
//! directory) and derefs to it.

use std::{collections::BTreeMap, fmt::Write as _, net::IpAddr, path::PathBuf, time::Instant};

use crate::{
    k8s::{self, Agent, ManifestDir, Programmed},
    netns::{self, Pod, SERVICE_V4, SERVICE_V6, Topology, v6_twin},
};

/// See the [module docs](self).
#[derive(Debug)]
pub struct TestBed {
    /// The agents, by node index, once [`start_agents`](Self::start_agents) ran.
    pub agents: Vec<Agent>,
    /// The directory of manifests the agents follow (`nodes.yaml` holds the Nodes).
    pub manifests: ManifestDir,
    /// The namespaces: nodes, pods, underlay.
    pub topo: Topology,
    /// The `svc-agent` binary under test.
    pub agent_bin: PathBuf,
    /// When the test began (for [`step`](Self::step)).
    pub started: Instant,
}

impl TestBed {
    /// A topology with `pods` ((node index, name), created in this order, so each node's pods
    /// get `.10`, `.11`, ... in that order) and a manifest directory holding the Nodes.
    ///
    /// # Panics
    /// With the reason when something is missing (not root, no agent binary) or cannot be
    /// built: tests fail, never skip.
    #[must_use]
    pub fn new(pods: &[(usize, &str)]) -> Self {
        Self::build(pods, false)
    }

    /// [`new`](Self::new) on an underlay made a wire whatever the run's XDP mode (see
    /// [`Topology::new_on_a_wire`]): for tests that turn XDP on themselves.
    ///
    /// # Panics
    /// As [`new`](Self::new).
    #[must_use]
    pub fn new_on_a_wire(pods: &[(usize, &str)]) -> Self {
        Self::build(pods, true)
    }

    fn build(pods: &[(usize, &str)], wire: bool) -> Self {
        if let Err(e) = netns::require_root() {
            panic!("{e:#}");
        }
        let agent_bin = k8s::agent_binary().unwrap_or_else(|e| panic!("{e:#}"));
        let started = Instant::now();
        let topo = if wire {
            Topology::new_on_a_wire()
        } else {
            Topology::new()
        };
        let mut topo = topo.expect("building the topology");
        for (node, name) in pods {
            topo.add_pod(*node, name)
                .unwrap_or_else(|e| panic!("adding pod {name}: {e:#}"));
        }
        let manifests = ManifestDir::create(&topo.run_dir().join("manifests"))
            .expect("creating the manifest directory");
        let nodes: Vec<String> = topo.nodes().iter().map(k8s::node_yaml).collect();
        manifests
            .write("nodes.yaml", &k8s::documents(&nodes))
            .expect("writing the Node objects");
        let bed = Self {
            agents: Vec::new(),
            manifests,
            topo,
            agent_bin,
            started,
        };
        let pods: Vec<String> = bed
            .topo
            .pods()
            .iter()
            .map(|p| format!("{} {} {} ({})", p.name, p.ipv4, p.ipv6, bed.node_name(p)))
            .collect();
        bed.step(&format!(
            "topology {} up; pods: {}",
            bed.topo.prefix(),
            pods.join(", ")
        ));
        bed
    }

    /// Prints `what` with the time since the test began.
    pub fn step(&self, what: &str) {
        println!("[{:>6.2}s] {what}", self.started.elapsed().as_secs_f64());
    }

    /// The name of `pod`'s node.
    #[must_use]
    pub fn node_name(&self, pod: &Pod) -> &str {
        &self.topo.node(pod.node).name
    }

    /// Serves the echo protocol (TCP and UDP, answering with the pod's name) in each pod of
    /// `names` on its IPv4 address and `port`, with `backends`.
    ///
    /// # Panics
    /// When a pod is unknown or its sockets cannot be bound (naming the pod).
    pub fn serve_pods(&self, backends: &k8s::Backends, names: &[&str], port: u16) {
        for &name in names {
            let pod = self.pod(name);
            backends
                .serve(
                    &pod.ns,
                    name,
                    std::net::SocketAddr::new(pod.ipv4.into(), port),
                )
                .unwrap_or_else(|e| panic!("serving {name}: {e:#}"));
        }
    }

    /// The pod called `name`.
    ///
    /// # Panics
    /// If there is none.
    #[must_use]
    pub fn pod(&self, name: &str) -> &Pod {
        self.topo
            .pods()
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// `pod`'s address of `vip`'s family.
    #[must_use]
    pub fn pod_ip(&self, pod: &str, vip: IpAddr) -> IpAddr {
        let pod = self.pod(pod);
        if vip.is_ipv6() {
            pod.ipv6.into()
        } else {
            pod.ipv4.into()
        }
    }

    /// Starts one agent per node, each following the manifest directory (see
    /// [`Agent::start`]).
    ///
    /// # Panics
    /// When an agent does not start.
    pub fn start_agents(&mut self) {
        for node in self.topo.nodes() {
            let agent = Agent::start(&self.agent_bin, node, self.manifests.path())
                .unwrap_or_else(|e| panic!("starting svc-agent on {}: {e:#}", node.name));
            self.agents.push(agent);
        }
        let nodes: Vec<&str> = self.agents.iter().map(Agent::node).collect();
        self.step(&format!(
            "svc-agent running on {} (following {})",
            nodes.join(" and "),
            self.manifests.path().display()
        ));
    }

    /// Like [`start_agents`](Self::start_agents), each agent started by `launcher` (see
    /// [`Agent::start_under`]).
    ///
    /// # Panics
    /// When an agent does not start.
    pub fn start_agents_under(&mut self, launcher: &[&std::ffi::OsStr]) {
        for node in self.topo.nodes() {
            let agent = Agent::start_under(launcher, &self.agent_bin, node, self.manifests.path())
                .unwrap_or_else(|e| panic!("starting svc-agent on {}: {e:#}", node.name));
            self.agents.push(agent);
        }
        self.step(&format!(
            "svc-agent running on every node under `{}`",
            launcher.join(std::ffi::OsStr::new(" ")).display()
        ));
    }

    /// Like [`start_agents`](Self::start_agents) with other map sizes (`(flag, entries)`, see
    /// [`Agent::start_sized`]).
    ///
    /// # Panics
    /// When an agent does not start.
    pub fn start_agents_sized(&mut self, sizes: &[(&str, u32)]) {
        for node in self.topo.nodes() {
            let agent = Agent::start_sized(&self.agent_bin, node, self.manifests.path(), sizes)
                .unwrap_or_else(|e| panic!("starting svc-agent on {}: {e:#}", node.name));
            self.agents.push(agent);
        }
        self.step(&format!("svc-agent running with map sizes {sizes:?}"));
    }

    /// The agent of node `node` (0-based).
    ///
    /// # Panics
    /// When that agent was not started.
    #[must_use]
    pub fn agent(&self, node: usize) -> &Agent {
        &self.agents[node]
    }

    /// What node `node`'s agent programmed (`inspect services`, parsed).
    ///
    /// # Panics
    /// When `inspect` fails.
    #[must_use]
    pub fn programmed(&self, node: usize) -> Programmed {
        self.agent(node)
            .services()
            .unwrap_or_else(|e| panic!("inspect services on node{}: {e:#}", node + 1))
    }

    /// Node `node`'s counters (`inspect stats`, parsed).
    ///
    /// # Panics
    /// When `inspect` fails.
    #[must_use]
    pub fn stats(&self, node: usize) -> BTreeMap<String, u64> {
        self.agent(node)
            .stats()
            .unwrap_or_else(|e| panic!("inspect stats on node{}: {e:#}", node + 1))
    }

    /// What every agent programmed and counted, for failure messages.
    #[must_use]
    pub fn diag(&self) -> String {
        let mut out = String::new();
        for agent in &self.agents {
            let services = agent
                .inspect("services")
                .unwrap_or_else(|e| format!("{e:#}"));
            let stats = agent.inspect("stats").unwrap_or_else(|e| format!("{e:#}"));
            let node = agent.node();
            let _ = write!(
                out,
                "\n--- {node}: inspect services ---\n{services}--- {node}: inspect stats ---\n{stats}"
            );
        }
        out
    }

    /// Ends the test: stops the agents (each must exit cleanly and must not have logged a
    /// warning or an error), removes the topology, and asserts that nothing of the run
    /// remains, agent processes included.
    ///
    /// # Panics
    /// When an agent failed, warned or survived, or something of the run is left.
    pub fn finish(self) {
        self.finish_allowing(&[]);
    }

    /// Like [`finish`](Self::finish), but an agent may warn with lines holding one of
    /// `expected` (warnings the test provoked on purpose); any other warning fails.
    ///
    /// # Panics
    /// As [`finish`](Self::finish).
    pub fn finish_allowing(self, expected: &[&str]) {
        let Self {
            agents,
            topo,
            started,
            ..
        } = self;
        let mut pids = Vec::new();
        for agent in agents {
            let node = agent.node().to_owned();
            let log = agent.log();
            // The pid is the agent's own (the spawn wrapper execs into it).
            pids.push(agent.pid());
            let status = agent
                .stop()
                .unwrap_or_else(|e| panic!("stopping svc-agent on {node}: {e:#}"));
            assert!(
                status.success(),
                "svc-agent on {node} ended with {status}; log:\n{log}"
            );
            let unexpected = log.lines().any(|line| {
                (line.contains(" WARN ") || line.contains(" ERROR "))
                    && !expected.iter().any(|e| line.contains(e))
            });
            assert!(!unexpected, "svc-agent on {node} warned:\n{log}");
        }
        let prefix = topo.prefix().to_owned();
        drop(topo);
        netns::assert_run_gone(&prefix);
        for pid in pids {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            assert!(
                !String::from_utf8_lossy(&cmdline).contains("svc-agent"),
                "svc-agent {pid} survived the topology"
            );
        }
        println!(
            "[{:>6.2}s] agents stopped cleanly, nothing of {prefix} remains",
            started.elapsed().as_secs_f64()
        );
    }
}

/// The service VIP `198.19.0.<host>` (and on: `host` 256 is `198.19.1.0`).
#[must_use]
pub fn vip4(host: u32) -> IpAddr {
    SERVICE_V4.host(host).into()
}

/// The service VIP `2001:db8:f::<host>` (same digits as [`vip4`]).
#[must_use]
pub fn vip6(host: u32) -> IpAddr {
    SERVICE_V6.host(v6_twin(host)).into()
}

/// `IPv4` or `IPv6`, for messages.
#[must_use]
pub fn family(ip: IpAddr) -> &'static str {
    if ip.is_ipv6() { "IPv6" } else { "IPv4" }
}
