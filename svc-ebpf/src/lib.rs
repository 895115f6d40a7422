//! Empty library target: it lets `svc-agent` name this crate as a build dependency, so cargo
//! rebuilds the agent when the kernel programs change. The programs are the `svc` binary.
#![no_std]
