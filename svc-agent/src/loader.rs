//! Loading the embedded eBPF object.

use anyhow::{Context as _, bail};
use aya::Ebpf;

/// The eBPF object built from `svc-ebpf` by this crate's build script.
///
/// Empty when the crate was built with `AYA_BUILD_SKIP=1` (userspace-only builds).
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/svc"));

/// Name of the TC program for packets coming from a pod (ingress on the host end of its veth).
pub const PROG_TC_FROM_POD: &str = "svc_tc_from_pod";

/// Parses the embedded object and loads its maps, without loading or attaching programs.
pub fn load_object() -> anyhow::Result<Ebpf> {
    if EBPF_OBJECT.is_empty() {
        bail!(
            "this svc-agent was built with AYA_BUILD_SKIP=1 and carries no eBPF object; \
             rebuild without it (cargo xtask build)"
        );
    }
    Ebpf::load(EBPF_OBJECT).context("loading the embedded eBPF object (are you root?)")
}
