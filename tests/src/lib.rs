//! Test support for svc: the packet fixture runner (`BPF_PROG_TEST_RUN`) and the network
//! namespace harness used by the end-to-end tests.

pub mod apiserver;
pub mod bench_objects;
pub mod fixture;
pub mod k8s;
pub mod loadgen;
pub mod loadgen_remote;
pub mod loadgen_table;
pub mod netns;
pub mod packets;
pub mod peers;
pub mod procfs;
pub mod testbed;
