//! Network-namespace topology harness for end-to-end tests of the svc dataplane.
//!
//! [`Topology::new`] builds an emulated cluster entirely inside network namespaces named with a
//! per-run prefix (`svct<pid>x<n>`): an underlay namespace with a bridge, two node namespaces
//! that route (each with its own bpffs and cgroup v2 directory), an external client, and the
//! underlay's default gateway, which silently drops what it is asked to forward (every node's
//! default route points at it, so untranslated traffic times out as on a real node instead of
//! failing at once with "network unreachable"; [`BLACK_HOLE_V4`]). Pods
//! are added with [`Topology::add_pod`], wired to their node like the ptp CNI does (`eth0` with
//! a /32 and /128 in the pod, `svcpod<N>` with the gateway address on the node, host routes
//! both ways). Addresses come only from `198.18.0.0/15` and `2001:db8::/32` (the constants and `node_*` /
//! `pod_*` functions below); the root namespace's addresses and routes are never touched.
//!
//! Everything a run creates (namespaces with their interfaces, bpffs mounts, cgroups and the
//! processes in them, its run directory) is removed when the [`Topology`] is dropped, also
//! while a test panics; [`leftovers`] lists what remains of a run. Leftovers of runs whose
//! process was killed (SIGKILL skips Drop) are removed by the next [`Topology::new`].
//!
//! Code runs inside a namespace with [`Netns::run`] (a thread that `setns`es), commands with
//! [`Netns::exec`], background processes with [`Netns::spawn`] / [`Node::spawn`] (stopped when
//! their [`Process`] guard drops). All of it needs root: [`require_root`] says so.

mod cleanup;
mod cmd;
mod ns;
mod plan;
mod process;
pub mod sockd;
mod topology;

pub use cleanup::{
    CGROUP2_ROOT, RUN_ROOT, assert_run_gone, is_mounted, leftovers, netns_with_prefix, run_dir,
};
pub use ns::{NETNS_RUN_DIR, Netns};
pub use plan::{
    BLACK_HOLE_V4, BLACK_HOLE_V6, EXTERNAL_V4, EXTERNAL_V6, FIRST_POD_HOST, Ipv4Cidr, Ipv6Cidr,
    MAX_NODES, MAX_PODS_PER_NODE, NODE_COUNT, SERVICE_V4, SERVICE_V6, TEST_PREFIX, UNDERLAY_V4,
    UNDERLAY_V6, node_pod_cidr_v4, node_pod_cidr_v6, node_underlay_v4, node_underlay_v6, pod_v4,
    pod_v6, v6_twin,
};
pub use process::{Process, STOP_GRACE};
pub use topology::{
    BRIDGE, ETH0, External, Node, POD_IFNAME_PREFIX, Pod, Topology, XDP_ENV, xdp_mode,
};

/// Fails with a message saying why root is needed when the process is not root. Tests that
/// build a [`Topology`] or load eBPF programs call this first (through [`Topology::new`]), so
/// they fail loudly rather than skip: CI runs as root and must run them.
pub fn require_root() -> anyhow::Result<()> {
    if nix::unistd::Uid::effective().is_root() {
        return Ok(());
    }
    anyhow::bail!(
        "this test needs root: it creates network namespaces, veths and a bridge, mounts bpffs, \
         creates cgroups and loads eBPF programs (CAP_SYS_ADMIN, CAP_NET_ADMIN, CAP_BPF). \
         Run it as root, e.g. `sudo -E cargo test -p svc-tests --test netns_e2e`"
    )
}
