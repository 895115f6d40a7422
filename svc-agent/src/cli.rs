//! Command-line interface of `svc-agent`.

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

/// The svc node agent: an eBPF service dataplane for Kubernetes.
#[derive(Parser, Debug)]
#[command(version, about)]
pub struct Cli {
    /// Where the bpf filesystem is (mounted there if it is not); maps and program links are
    /// pinned in `svc/v1`.
    #[arg(long, global = true, default_value = "/sys/fs/bpf", env = "SVC_BPFFS")]
    pub bpffs: PathBuf,
    /// How log lines (stderr) are written: `text`, one human-readable line per event, or
    /// `json`, one JSON object per line (`timestamp`, `level`, `message`, the event's fields,
    /// `target`), for log collectors. A fatal error is the last line, in the same format.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value_t = LogFormat::Text,
        env = "SVC_LOG_FORMAT"
    )]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// `--log-format`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// `2026-01-01T00:00:00.000000Z  INFO svc_agent: svc-agent running node=node1`.
    #[default]
    Text,
    /// `{"timestamp":"...","level":"INFO","message":"svc-agent running","node":"node1",
    /// "target":"svc_agent"}`.
    Json,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Load and attach the dataplane (taking over what an earlier agent pinned), then keep it
    /// programmed until stopped. The dataplane stays in place when the agent stops.
    Run(Box<RunArgs>),
    /// Show the dataplane's state from its pinned maps.
    Inspect {
        /// What to show.
        #[command(subcommand)]
        what: Inspect,
    },
    /// Remove the pinned state of every layout: the programs detach, the maps go. Stop the
    /// agent first.
    Cleanup,
}

/// Arguments of `svc-agent run`.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// This node's name (decides which endpoints are local).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// Comma-separated globs naming the pod-facing interfaces (host ends of pod veths); they get
    /// `svc_tc_from_pod` (ingress) and `svc_tc_to_pod` (egress).
    #[arg(long, default_value = "svcpod*,lxc*,veth*", env = "SVC_POD_IFACES")]
    pub pod_ifaces: String,
    /// Comma-separated globs naming the node-facing interfaces (the node's uplinks, where
    /// `NodePort`, external and load-balancer traffic arrives); they get `svc_tc_from_world`
    /// (ingress) and `svc_tc_to_world` (egress). The default covers the names uplinks get:
    /// `eth*` (kind nodes, most cloud VMs, older naming), `ens*`/`enp*`/`eno*` (systemd's
    /// predictable names for slot, PCI and on-board NICs), `bond*` (bonded uplinks); pod veths
    /// (`veth*`, `lxc*`) and bridges match none of them. An empty value: no node-facing
    /// interfaces. A name both lists match is node-facing (with a warning).
    #[arg(
        long,
        default_value = "eth*,ens*,enp*,eno*,bond*",
        env = "SVC_NODE_IFACES"
    )]
    pub node_ifaces: String,
    /// The XDP fast path on node-facing interfaces: `native` (in the driver: `NodePort`,
    /// external and load-balancer traffic to other nodes' endpoints is translated and sent
    /// back out before the kernel builds a socket buffer), `generic` (the same program in the
    /// stack, on any interface: for testing, or a driver without XDP), or `off` (the TC
    /// programs serve all of it, identically). Off by default, as Cilium's acceleration is:
    /// attaching native XDP resets some NICs' queues, so it is the operator's choice. Frames
    /// must arrive with complete checksums, as from a wire (see svc-ebpf/DESIGN.md).
    #[arg(long, value_enum, default_value_t = crate::pins::XdpAttach::Off, env = "SVC_XDP")]
    pub xdp: crate::pins::XdpAttach,
    /// Standalone mode: read `Service`, `EndpointSlice`, `Node` and `Pod` objects from the YAML/JSON
    /// files in this directory and follow its changes live; Services with a selector get their
    /// endpoints from the Pods, as the `EndpointSlice` controller computes them. Without it, the
    /// agent follows the Kubernetes API server.
    #[arg(long, conflicts_with = "kubeconfig")]
    pub from_dir: Option<std::path::PathBuf>,
    /// The kubeconfig file to reach the API server with. Without it: the in-cluster service
    /// account, then `KUBECONFIG`, then `~/.kube/config`.
    #[arg(long)]
    pub kubeconfig: Option<std::path::PathBuf>,
    /// How long to wait for more changes after one arrives before reconciling (milliseconds).
    #[arg(long, default_value_t = 20)]
    pub coalesce_ms: u64,
    /// Every this many seconds, the full computation of the desired state and the full diff
    /// against the maps run as an audit of the incremental passes, logging and fixing any drift
    /// (0: never). A full pass costs about what a cold sync's compute and diff cost.
    #[arg(long, value_name = "SECONDS", default_value_t = 300)]
    pub audit_interval: u64,
    /// Do not publish Kubernetes Events about bad objects (they are logged either way).
    #[arg(long)]
    pub no_events: bool,
    /// `SERVICES_V1` entries (frontends plus one per backend slot).
    #[arg(long, default_value_t = svc_common::sizes::SERVICES)]
    pub max_service_entries: u32,
    /// `BACKENDS_V1` entries.
    #[arg(long, default_value_t = svc_common::sizes::BACKENDS)]
    pub max_backends: u32,
    /// `CT_V1` entries (two per tracked connection the backend answered; LRU: an evicted
    /// connection's next packet is counted `ct_miss_midflow` and usually survives, see
    /// svc-ebpf/DESIGN.md "Conntrack under pressure").
    #[arg(long, default_value_t = svc_common::sizes::CT)]
    pub max_conntrack_entries: u32,
    /// `CT_NEW_V1` entries (two per flow nothing answered yet: SYNs, unanswered UDP; LRU: a
    /// flood of them only evicts its own kind).
    #[arg(long, default_value_t = svc_common::sizes::CT_NEW)]
    pub max_ct_new_entries: u32,
    /// `AFFINITY_V1` entries (client and service-port pairs with `ClientIP` affinity).
    #[arg(long, default_value_t = svc_common::sizes::AFFINITY)]
    pub max_affinity_entries: u32,
    /// `SOCK_REVNAT_V1` entries: one per (socket, backend) pair reached through a service at
    /// the socket (LRU: an evicted entry makes `recvfrom()`/`getpeername()` show the backend).
    #[arg(long, default_value_t = svc_common::sock::SOCK_REVNAT_ENTRIES)]
    pub max_sock_revnat_entries: u32,
    /// `SOCK_UDP_PIN_V1` entries: one per (unconnected UDP socket, service) pair.
    #[arg(long, default_value_t = svc_common::sock::SOCK_UDP_PIN_ENTRIES)]
    pub max_sock_pin_entries: u32,
    /// `SNAT_V1` entries: one per external connection to an endpoint on another node (not
    /// preallocated; not LRU: when full, new such connections are dropped, counted
    /// `nat_table_full`, never translated without a way back).
    #[arg(long, default_value_t = svc_common::sizes::SNAT)]
    pub max_snat_entries: u32,
    /// cgroup v2 directory whose processes (and those of its descendants) get connect-time
    /// translation: `connect()`/`sendto()` to a service address go to a backend directly. An
    /// empty value disables it (as `--socket-lb off`).
    #[arg(long, default_value = "/sys/fs/cgroup/unified", env = "SVC_CGROUP")]
    pub cgroup: String,
    /// Which sockets in `--cgroup` are translated at `connect()`/`sendto()`.
    #[arg(long, value_enum, default_value_t = SocketLb::All, env = "SVC_SOCKET_LB")]
    pub socket_lb: SocketLb,
    /// Where to serve Prometheus metrics (`/metrics`), as `IP:port` (kube-proxy's port). Empty
    /// or `0`: not served.
    #[arg(
        long,
        default_value = "127.0.0.1:10249",
        env = "SVC_METRICS_BIND_ADDRESS"
    )]
    pub metrics_bind_address: String,
    /// Where to serve `/healthz` and `/livez`, as `IP:port` (kube-proxy's port). Empty or `0`:
    /// not served.
    #[arg(
        long,
        default_value = "0.0.0.0:10256",
        env = "SVC_HEALTHZ_BIND_ADDRESS"
    )]
    pub healthz_bind_address: String,
    /// Which node addresses serve `NodePort`s (kube-proxy's flag): empty for every
    /// `InternalIP` and `ExternalIP` of this node's Node object and every address of the
    /// node-facing interfaces (`--node-ifaces`), `primary` for the Node's first `InternalIP` of
    /// each family, or comma-separated CIDRs (those addresses inside them). With a value, the
    /// health-check node ports listen on those addresses only, as kube-proxy's.
    #[arg(long, default_value = "", env = "SVC_NODEPORT_ADDRESSES")]
    pub nodeport_addresses: String,
    /// Entries of each external frontend's Maglev table (a prime; 0: off): new connections from
    /// outside choose their endpoint by a hash of their tuple in it, the same on every node and
    /// after a lost conntrack entry. Larger spreads more evenly (aim for 100 per endpoint);
    /// each table takes 4 bytes per entry in `MAGLEV_V1`.
    #[arg(long, default_value_t = svc_common::maglev::DEFAULT_SIZE, env = "SVC_MAGLEV_TABLE_SIZE")]
    pub maglev_table_size: u32,
    /// Source ports external flows to other nodes' endpoints get on this node's address
    /// (`MIN-MAX`); reserved on the node (`net.ipv4.ip_local_reserved_ports`) so its own
    /// sockets never take them. The default is above Linux's default ephemeral range.
    #[arg(long, default_value = "61000-65535", env = "SVC_SNAT_PORT_RANGE")]
    pub snat_port_range: String,
    /// Where the node's `/proc/sys/net` is (`ipv4/ip_local_reserved_ports` is written there,
    /// see `--snat-port-range`). A container's own `/proc/sys` is read-only: the `DaemonSet`
    /// mounts the host's at `/host/proc/sys/net`.
    #[arg(long, default_value = "/proc/sys/net", env = "SVC_PROC_SYS_NET")]
    pub proc_sys_net: PathBuf,
    /// `/healthz` and `/livez` answer 503 once a change has waited this long to be programmed
    /// (kube-proxy: twice its 30 s sync period).
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = 60,
        env = "SVC_HEALTHZ_STALE_AFTER"
    )]
    pub healthz_stale_after: u64,
}

impl RunArgs {
    /// `--audit-interval` as a duration; `None` when audits are off (0).
    #[must_use]
    pub fn audit_interval(&self) -> Option<std::time::Duration> {
        (self.audit_interval != 0).then(|| std::time::Duration::from_secs(self.audit_interval))
    }

    /// `--metrics-bind-address`; `None` when it is off.
    pub fn metrics_addr(&self) -> anyhow::Result<Option<std::net::SocketAddr>> {
        bind_address("metrics-bind-address", &self.metrics_bind_address)
    }

    /// `--healthz-bind-address`; `None` when it is off.
    pub fn healthz_addr(&self) -> anyhow::Result<Option<std::net::SocketAddr>> {
        bind_address("healthz-bind-address", &self.healthz_bind_address)
    }

    /// `--nodeport-addresses`, parsed.
    ///
    /// # Errors
    /// Names the entry that is neither `primary` nor a CIDR.
    pub fn nodeport_addresses(&self) -> anyhow::Result<crate::model::NodePortAddresses> {
        crate::model::NodePortAddresses::parse(&self.nodeport_addresses)
            .map_err(|e| anyhow::anyhow!("--nodeport-addresses: {e}"))
    }

    /// `--snat-port-range`, parsed.
    ///
    /// # Errors
    /// Says what is wrong with it.
    pub fn snat_ports(&self) -> anyhow::Result<crate::datapath::snat::PortRange> {
        crate::datapath::snat::PortRange::parse(&self.snat_port_range).context("--snat-port-range")
    }

    /// `--healthz-stale-after` as a duration.
    #[must_use]
    pub fn healthz_stale_after(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.healthz_stale_after)
    }

    /// Everything about the arguments that can be checked before anything is loaded, attached
    /// or pinned: the node name, the map sizes, conflicting flags, the interface patterns, and
    /// that `--from-dir`, `--kubeconfig` and `--cgroup` name what they must. A run that fails
    /// here leaves the kernel and the bpffs as they were.
    pub fn check(&self) -> anyhow::Result<()> {
        check_node_name(&self.node_name)?;
        for (flag, value) in self.sizes() {
            if value == 0 {
                bail!("--{flag} 0: a map needs at least one entry");
            }
        }
        self.iface_roles()?;
        self.nodeport_addresses()?;
        self.snat_ports()?;
        crate::datapath::maglev::check_size(self.maglev_table_size)
            .context("--maglev-table-size")?;
        self.metrics_addr()?;
        self.healthz_addr()?;
        if self.healthz_stale_after == 0 {
            bail!("--healthz-stale-after 0: a change needs some time to be programmed");
        }
        if self.socket_lb == SocketLb::HostOnly && self.cgroup.is_empty() {
            bail!(
                "--socket-lb host-only asks for connect-time translation, --cgroup '' disables \
                 it: give a cgroup, or use --socket-lb off"
            );
        }
        if let Some(dir) = &self.from_dir {
            std::fs::read_dir(dir).with_context(|| {
                format!("--from-dir {}: cannot list that directory", dir.display())
            })?;
        }
        if let Some(file) = &self.kubeconfig {
            std::fs::File::open(file)
                .with_context(|| format!("--kubeconfig {}: cannot read it", file.display()))?;
        }
        if let Some(cgroup) = crate::cgroup::cgroup_arg(self.socket_lb.cgroup(&self.cgroup)) {
            crate::cgroup::check_cgroup_dir(cgroup)?;
        }
        Ok(())
    }

    /// `--pod-ifaces` and `--node-ifaces`, parsed: which interfaces get which TC programs.
    pub fn iface_roles(&self) -> anyhow::Result<crate::ifaces::RolePatterns> {
        Ok(crate::ifaces::RolePatterns::new(
            crate::loader::IfacePatterns::parse(&self.pod_ifaces).context("--pod-ifaces")?,
            crate::loader::IfacePatterns::parse_or_none(&self.node_ifaces)
                .context("--node-ifaces")?,
        ))
    }

    /// The map-size flags with their values.
    fn sizes(&self) -> [(&'static str, u32); 7] {
        [
            ("max-service-entries", self.max_service_entries),
            ("max-backends", self.max_backends),
            ("max-conntrack-entries", self.max_conntrack_entries),
            ("max-affinity-entries", self.max_affinity_entries),
            ("max-sock-revnat-entries", self.max_sock_revnat_entries),
            ("max-sock-pin-entries", self.max_sock_pin_entries),
            ("max-snat-entries", self.max_snat_entries),
        ]
    }
}

/// An `IP:port` bind address flag; empty or `0` turns the endpoint off (`None`).
fn bind_address(flag: &str, value: &str) -> anyhow::Result<Option<std::net::SocketAddr>> {
    let value = value.trim();
    if value.is_empty() || value == "0" {
        return Ok(None);
    }
    value.parse().map(Some).with_context(|| {
        format!(
            "--{flag} {value:?}: not an IP:port (e.g. 127.0.0.1:10249, [::1]:10249; '' for none)"
        )
    })
}

/// A node name must be what Kubernetes accepts (a DNS-1123 subdomain: at most 253 lowercase
/// letters, digits, `-` and `.`, starting and ending with a letter or digit): an empty or
/// mistyped one would make every endpoint look remote.
pub fn check_node_name(name: &str) -> anyhow::Result<()> {
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.chars().all(|c| alnum(c) || c == '-' || c == '.')
        && name.starts_with(alnum)
        && name.ends_with(alnum);
    if !ok {
        bail!(
            "--node-name {name:?}: not a Kubernetes node name (1 to 253 lowercase letters, \
             digits, '-' and '.', starting and ending with a letter or digit)"
        );
    }
    Ok(())
}

/// Which sockets the connect-time programs translate (`svc-agent run --socket-lb`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SocketLb {
    /// Every socket in the `--cgroup` hierarchy, pods' and host processes' alike (the
    /// `DaemonSet` attaches at the cgroup v2 root): a pod's connection to a service goes to the
    /// backend from its first packet, and no packet of it needs translating.
    #[default]
    All,
    /// Only sockets of the node's own network namespace (host-network processes); pods'
    /// traffic is translated per packet by the TC programs, so whatever runs in the pod (a
    /// service mesh's sidecar) sees the service address on the wire. Cilium's
    /// `socketLB.hostNamespaceOnly`.
    HostOnly,
    /// No connect-time translation: the connect-time programs are not attached (an earlier
    /// agent's are removed). Pods are translated by the TC programs; host-network processes
    /// are not translated at all.
    Off,
}

impl SocketLb {
    /// The cgroup to attach the connect-time programs to: `cgroup`, or empty (none) with
    /// [`SocketLb::Off`].
    #[must_use]
    pub fn cgroup(self, cgroup: &str) -> &str {
        if self == Self::Off { "" } else { cgroup }
    }
}

/// `svc-agent inspect` subjects.
#[derive(Subcommand, Debug)]
pub enum Inspect {
    /// Parser, translation and drop counters.
    Stats(OutputArgs),
    /// Programmed frontends: the Service port each one is, type, policy, affinity and its
    /// backend slots (the Pod behind each, ready/terminating/local).
    Services(OutputArgs),
    /// Every backend (`BACKENDS_V1`): its endpoint, the Pod behind it, flags, how many frontend
    /// slots hold it and of which Services, and its packet counters.
    Backends(BackendsArgs),
    /// Every `ClientIP` session affinity entry (`AFFINITY_V1`): client (address or network
    /// namespace), frontend and Service, backend and Pod, idle time, and whether the kernel
    /// would still honour it (and why not).
    Affinity(AffinityArgs),
    /// Pinned program links: where each is pinned, its kernel link and program.
    Links(OutputArgs),
    /// Both connection tables (`CT_V1` answered flows, `CT_NEW_V1` unanswered ones): each
    /// entry's tuple, where it goes, its Service, state and idle time.
    Ct(CtArgs),
    /// Every pinned map: type, size, entries, fill and kernel memory.
    Maps(OutputArgs),
    /// The source NAT table (`SNAT_V1`): each external flow to another node's endpoint, its
    /// client, the node address and port it was given, the endpoint and its idle time.
    Nat(OutputArgs),
    /// The decision the kernel would take for one packet, step by step from the live maps:
    /// connection tables, frontend, slots and why, affinity, Maglev, SNAT, the verdict and the
    /// rewritten packet.
    Trace(TraceArgs),
    /// What the maps hold against what the objects say they should hold (a standalone
    /// directory's, `--from-dir`, or the API server's, as `run` follows them), per Service:
    /// missing, extra and different frontends. Exit code 0: no drift; 1: drift; 2: an error.
    Diff(DiffArgs),
}

/// Arguments of `inspect diff`.
#[derive(clap::Args, Debug, Clone)]
pub struct DiffArgs {
    /// Output format (`wide` is `table`).
    #[command(flatten)]
    pub output: OutputArgs,
    /// The directory of YAML, as `svc-agent run --from-dir` reads it. Without it: the
    /// objects of the API server, listed once as `run` follows them.
    #[arg(long, conflicts_with = "kubeconfig")]
    pub from_dir: Option<PathBuf>,
    /// As `svc-agent run --kubeconfig`: the kubeconfig file to reach the API server with.
    /// Without it: the in-cluster service account, then `KUBECONFIG`, then `~/.kube/config`.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// This node's name, as `svc-agent run --node-name` (decides which endpoints are local).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// As `svc-agent run --nodeport-addresses`.
    #[arg(long, default_value = "", env = "SVC_NODEPORT_ADDRESSES")]
    pub nodeport_addresses: String,
    /// As `svc-agent run --node-ifaces`: the addresses of these interfaces (in the network
    /// namespace `inspect diff` runs in, the node's) serve `NodePort`s too.
    #[arg(
        long,
        default_value = "eth*,ens*,enp*,eno*,bond*",
        env = "SVC_NODE_IFACES"
    )]
    pub node_ifaces: String,
}

impl DiffArgs {
    /// `--node-name` checked, `--nodeport-addresses` and `--node-ifaces` parsed.
    ///
    /// # Errors
    /// Names the flag that is wrong.
    pub fn checked(
        &self,
    ) -> anyhow::Result<(crate::model::NodePortAddresses, crate::ifaces::RolePatterns)> {
        check_node_name(&self.node_name)?;
        let nodeports = crate::model::NodePortAddresses::parse(&self.nodeport_addresses)
            .map_err(|e| anyhow::anyhow!("--nodeport-addresses: {e}"))?;
        // Only the node-facing list matters here (no pod-facing patterns).
        let roles = crate::ifaces::RolePatterns::new(
            crate::loader::IfacePatterns::parse_or_none("")?,
            crate::loader::IfacePatterns::parse_or_none(&self.node_ifaces)
                .context("--node-ifaces")?,
        );
        Ok((nodeports, roles))
    }
}

/// Arguments of `inspect trace`.
#[derive(clap::Args, Debug, Clone)]
pub struct TraceArgs {
    /// Output format (`wide` is `table`).
    #[command(flatten)]
    pub output: OutputArgs,
    /// The packet's source: `ADDR` (a new flow, its port not known) or `ADDR:PORT` (IPv6 in
    /// brackets: `[2001:db8::1]:40000`), which also looks the flow up in the connection tables.
    #[arg(long, value_name = "ADDR[:PORT]", value_parser = crate::inspect::trace::parse_source)]
    pub from: (std::net::IpAddr, Option<u16>),
    /// The packet's destination, `ADDR:PORT`.
    #[arg(long, value_name = "ADDR:PORT", value_parser = crate::inspect::trace::parse_destination)]
    pub to: std::net::SocketAddr,
    /// Its protocol.
    #[arg(long, value_enum)]
    pub proto: CtProto,
    /// The packet arrives on a node-facing interface (a client outside the cluster: `NodePort`,
    /// external and load-balancer IPs, their external scope). Default: from a pod or a process
    /// of this node.
    #[arg(long)]
    pub from_outside: bool,
    /// TCP only: `syn` (a SYN without ACK, opening a connection; the default) or `ack` (any
    /// later segment of a connection).
    #[arg(long, value_enum)]
    pub tcp_flags: Option<TcpFlags>,
}

/// `inspect trace --tcp-flags`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcpFlags {
    /// A SYN without ACK: a client opening a connection.
    Syn,
    /// Any later segment (ACK set): a packet of an open connection.
    Ack,
}

impl TraceArgs {
    /// The packet these arguments describe.
    ///
    /// # Errors
    /// Says what is wrong: two address families, `--tcp-flags` with UDP, port 0.
    pub fn packet(&self) -> anyhow::Result<crate::inspect::trace::Packet> {
        if self.proto == CtProto::Udp && self.tcp_flags.is_some() {
            bail!("--tcp-flags is for TCP packets (--proto tcp)");
        }
        let packet = crate::inspect::trace::Packet {
            src: self.from.0,
            sport: self.from.1,
            dst: self.to,
            proto: self.proto.number(),
            from_outside: self.from_outside,
            syn: self.tcp_flags != Some(TcpFlags::Ack),
        };
        packet.check()?;
        Ok(packet)
    }
}

/// `-o` of every `inspect` subcommand.
#[derive(clap::Args, Debug, Clone, Copy)]
pub struct OutputArgs {
    /// Output format: aligned columns with a count line (`table`), with every column (`wide`),
    /// or a JSON array, one object per row (`json`; the fields are listed in the README).
    #[arg(short = 'o', long = "output", value_enum, default_value_t = crate::inspect::Format::Table)]
    pub format: crate::inspect::Format,
}

/// Arguments of `inspect ct`.
#[derive(clap::Args, Debug, Clone)]
pub struct CtArgs {
    /// Output format.
    #[command(flatten)]
    pub output: OutputArgs,
    /// Only entries naming this address (source, destination or where they go).
    #[arg(long)]
    pub addr: Option<std::net::IpAddr>,
    /// Only entries naming this port (source, destination or where they go).
    #[arg(long)]
    pub port: Option<u16>,
    /// Only entries of this protocol.
    #[arg(long, value_enum)]
    pub proto: Option<CtProto>,
    /// Only entries of this Service's frontends (`namespace/name`, from `FRONTEND_NAMES_V1`).
    #[arg(long, value_parser = parse_service)]
    pub service: Option<String>,
}

/// Arguments of `inspect backends`.
#[derive(clap::Args, Debug, Clone)]
pub struct BackendsArgs {
    /// Output format.
    #[command(flatten)]
    pub output: OutputArgs,
    /// Only backends at this address.
    #[arg(long)]
    pub addr: Option<std::net::IpAddr>,
    /// Only backends a frontend of this Service (`namespace/name`, from `FRONTEND_NAMES_V1`)
    /// offers in a slot.
    #[arg(long, value_parser = parse_service)]
    pub service: Option<String>,
}

/// Arguments of `inspect affinity`.
#[derive(clap::Args, Debug, Clone)]
pub struct AffinityArgs {
    /// Output format.
    #[command(flatten)]
    pub output: OutputArgs,
    /// Only entries of this client address (entries of the packet path; connect-time entries
    /// are keyed by network namespace).
    #[arg(long)]
    pub client: Option<std::net::IpAddr>,
    /// Only entries of this Service's frontends (`namespace/name`, from `FRONTEND_NAMES_V1`).
    #[arg(long, value_parser = parse_service)]
    pub service: Option<String>,
}

impl AffinityArgs {
    /// The filter these arguments describe.
    #[must_use]
    pub fn filter(&self) -> crate::inspect::affinity::AffinityFilter {
        crate::inspect::affinity::AffinityFilter {
            client: self.client,
            service: self.service.clone(),
        }
    }
}

impl BackendsArgs {
    /// The filter these arguments describe.
    #[must_use]
    pub fn filter(&self) -> crate::inspect::backends::BackendsFilter {
        crate::inspect::backends::BackendsFilter {
            addr: self.addr,
            service: self.service.clone(),
        }
    }
}

/// `inspect ct --proto`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum CtProto {
    /// TCP (6).
    Tcp,
    /// UDP (17).
    Udp,
}

impl CtProto {
    /// The IP protocol number.
    #[must_use]
    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => 6,
            Self::Udp => 17,
        }
    }
}

fn parse_service(text: &str) -> Result<String, String> {
    match text.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok(text.to_owned())
        }
        _ => Err(format!("{text:?} is not namespace/name")),
    }
}

impl CtArgs {
    /// The filter these arguments ask for.
    #[must_use]
    pub fn filter(&self) -> crate::inspect::ct::CtFilter {
        crate::inspect::ct::CtFilter {
            addr: self.addr,
            port: self.port,
            proto: self.proto.map(CtProto::number),
            service: self.service.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inspect_trace_takes_a_packet_and_refuses_what_no_packet_is() {
        let parse = |args: &[&str]| {
            Cli::try_parse_from([&["svc-agent", "inspect", "trace"], args].concat()).map(
                |c| match c.command {
                    Command::Inspect {
                        what: Inspect::Trace(t),
                    } => t,
                    other => panic!("{other:?}"),
                },
            )
        };
        let t = parse(&[
            "--from",
            "198.18.1.10:40000",
            "--to",
            "198.19.0.10:80",
            "--proto",
            "tcp",
            "--tcp-flags",
            "ack",
            "--from-outside",
            "-o",
            "json",
        ])
        .unwrap();
        let p = t.packet().unwrap();
        assert_eq!(
            (p.sport, p.dst.port(), p.proto, p.syn, p.from_outside),
            (Some(40_000), 80, 6, false, true)
        );
        assert_eq!(t.output.format, crate::inspect::Format::Json);
        let t = parse(&[
            "--from",
            "2001:db8::1",
            "--to",
            "[2001:db8::10]:53",
            "--proto",
            "udp",
        ])
        .unwrap();
        assert!(t.packet().unwrap().sport.is_none());
        // Two families; --tcp-flags with UDP; no port in --to; a name.
        let t = parse(&[
            "--from",
            "198.18.1.10",
            "--to",
            "[2001:db8::10]:53",
            "--proto",
            "udp",
        ])
        .unwrap();
        assert!(t.packet().is_err());
        let t = parse(&[
            "--from",
            "198.18.1.10",
            "--to",
            "198.19.0.10:53",
            "--proto",
            "udp",
            "--tcp-flags",
            "syn",
        ])
        .unwrap();
        assert!(t.packet().unwrap_err().to_string().contains("--tcp-flags"));
        assert!(
            parse(&[
                "--from",
                "198.18.1.10",
                "--to",
                "198.19.0.10",
                "--proto",
                "tcp"
            ])
            .is_err()
        );
        assert!(parse(&["--from", "web", "--to", "198.19.0.10:80", "--proto", "tcp"]).is_err());
    }

    #[test]
    fn inspect_takes_an_output_format_and_ct_filters() {
        let parse = |args: &[&str]| Cli::try_parse_from([&["svc-agent", "inspect"], args].concat());
        let Command::Inspect {
            what: Inspect::Services(o),
        } = parse(&["services", "-o", "json"]).unwrap().command
        else {
            panic!()
        };
        assert_eq!(o.format, crate::inspect::Format::Json);
        let Command::Inspect {
            what: Inspect::Ct(ct),
        } = parse(&[
            "ct",
            "--addr",
            "198.19.0.10",
            "--port",
            "80",
            "--proto",
            "udp",
            "--service",
            "default/web",
            "-o",
            "wide",
        ])
        .unwrap()
        .command
        else {
            panic!()
        };
        assert_eq!(ct.output.format, crate::inspect::Format::Wide);
        let f = ct.filter();
        assert_eq!(
            (f.addr, f.port, f.proto, f.service.as_deref()),
            (
                Some("198.19.0.10".parse().unwrap()),
                Some(80),
                Some(17),
                Some("default/web")
            )
        );
        assert!(parse(&["ct", "--service", "web"]).is_err());
        assert!(parse(&["ct", "--proto", "sctp"]).is_err());
        let Command::Inspect {
            what: Inspect::Backends(b),
        } = parse(&[
            "backends",
            "--service",
            "default/web",
            "--addr",
            "2001:db8::10",
            "-o",
            "json",
        ])
        .unwrap()
        .command
        else {
            panic!()
        };
        assert_eq!(b.output.format, crate::inspect::Format::Json);
        assert_eq!(
            b.filter(),
            crate::inspect::backends::BackendsFilter {
                addr: Some("2001:db8::10".parse().unwrap()),
                service: Some("default/web".to_owned()),
            }
        );
        assert!(parse(&["backends", "--service", "web"]).is_err());
        let Command::Inspect {
            what: Inspect::Affinity(a),
        } = parse(&["affinity", "-o", "wide", "--client", "198.18.0.2"])
            .unwrap()
            .command
        else {
            panic!("affinity parses as itself");
        };
        assert_eq!(a.output.format, crate::inspect::Format::Wide);
        assert_eq!(
            a.filter(),
            crate::inspect::affinity::AffinityFilter {
                client: Some("198.18.0.2".parse().unwrap()),
                service: None,
            }
        );
        assert!(parse(&["affinity", "--service", "web"]).is_err());
        assert!(parse(&["maps", "-o", "yaml"]).is_err());
    }

    fn run_args(args: &[&str]) -> RunArgs {
        let mut command_line = vec!["svc-agent", "run", "--node-name", "node1"];
        if !args.contains(&"--cgroup") {
            command_line.extend(["--cgroup", ""]);
        }
        command_line.extend(args);
        match Cli::try_parse_from(command_line).unwrap().command {
            Command::Run(args) => *args,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn endpoints_default_to_kube_proxys_ports_and_turn_off_when_empty_or_zero() {
        let args = run_args(&[]);
        assert_eq!(
            args.metrics_addr().unwrap(),
            Some("127.0.0.1:10249".parse().unwrap())
        );
        assert_eq!(
            args.healthz_addr().unwrap(),
            Some("0.0.0.0:10256".parse().unwrap())
        );
        assert_eq!(args.healthz_stale_after().as_secs(), 60);
        for off in ["", "0"] {
            let args = run_args(&["--metrics-bind-address", off, "--healthz-bind-address", off]);
            assert_eq!(args.metrics_addr().unwrap(), None);
            assert_eq!(args.healthz_addr().unwrap(), None);
        }
        let args = run_args(&["--metrics-bind-address", "[2001:db8::1]:9000"]);
        assert_eq!(
            args.metrics_addr().unwrap(),
            Some("[2001:db8::1]:9000".parse().unwrap())
        );
    }

    #[test]
    fn node_names_are_kubernetes_names() {
        for ok in ["node1", "a", "ip-198-18-0-1.example.internal", "1node"] {
            check_node_name(ok).unwrap();
        }
        for bad in [
            "",
            " ",
            "Node1",
            "node_1",
            "-node",
            "node.",
            "a b",
            &"a".repeat(254),
        ] {
            assert!(check_node_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn arguments_are_checked_before_anything_is_loaded() {
        run_args(&[]).check().unwrap();
        let err = |args: &[&str]| format!("{:#}", run_args(args).check().unwrap_err());
        assert!(err(&["--max-backends", "0"]).contains("--max-backends 0"));
        assert!(err(&["--pod-ifaces", " , "]).contains("--pod-ifaces"));
        assert!(err(&["--node-ifaces", "eth0,["]).contains("--node-ifaces"));
        run_args(&["--node-ifaces", ""]).check().unwrap();
        run_args(&["--node-ifaces", "eth0"]).check().unwrap();
        assert!(err(&["--socket-lb", "host-only"]).contains("--socket-lb host-only"));
        assert!(
            err(&["--from-dir", "/nonexistent/svc-manifests"])
                .contains("--from-dir /nonexistent/svc-manifests: cannot list that directory")
        );
        assert!(err(&["--kubeconfig", "/nonexistent/kubeconfig"]).contains("--kubeconfig"));
        let dir = std::env::temp_dir();
        let dir = dir.to_str().unwrap();
        run_args(&["--from-dir", dir]).check().unwrap();
        assert!(
            err(&["--cgroup", dir]).contains("is not a cgroup v2 directory"),
            "a temporary directory is no cgroup"
        );
        run_args(&["--cgroup", dir, "--socket-lb", "off"])
            .check()
            .unwrap();
        assert!(
            err(&["--metrics-bind-address", "localhost"])
                .contains("--metrics-bind-address \"localhost\": not an IP:port")
        );
        assert!(err(&["--healthz-bind-address", "1.2.3.4"]).contains("--healthz-bind-address"));
        assert!(err(&["--healthz-stale-after", "0"]).contains("--healthz-stale-after 0"));
        let mut empty = run_args(&[]);
        empty.node_name = String::new();
        assert!(format!("{:#}", empty.check().unwrap_err()).contains("--node-name \"\""));
    }
}
