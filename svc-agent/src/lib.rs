//! svc-agent: loads the svc eBPF dataplane, programs Kubernetes Services into its maps and
//! lets operators inspect it.

pub mod caps;
pub mod cgroup;
pub mod cli;
pub mod datapath;
pub mod health;
pub mod healthcheck;
pub mod hostaddrs;
pub mod ifaces;
pub mod inspect;
pub mod loader;
pub mod memory;
pub mod metrics;
pub mod migrate;
pub mod model;
pub mod pins;
pub mod serve;
pub mod sockets;
pub mod source;
pub mod standalone;
pub mod startup;
