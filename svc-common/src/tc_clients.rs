//! Which pods have flows translated by the TC programs: the reply path's second test.
//!
//! With `--socket-lb all` (the default) a pod's connection to a service is translated at
//! `connect()`: the pod talks to the backend's own address and no conntrack entry exists. The
//! backend's answers still come from a backend address, so the address test (`ADDRS_V1`) alone
//! cannot tell them from replies to reverse-translate, and each one paid two conntrack misses.
//! This map names the pods the TC programs translated a flow for, by the host end of their
//! veth (the pod-facing interface, `ifindex`): a reply leaving through any other interface
//! cannot match a conntrack entry and is passed after one lookup in a small map.
//!
//! Why the interface and not the pod's address: a pod may forge source addresses, and a flood
//! of SYNs to a service from 65,536 forged addresses would evict the records of real pods
//! (their idle connections' replies would then go untranslated). A pod cannot choose the
//! interface its packets arrive on; a node has one per pod.
//!
//! Map `TC_CLIENTS_V1` (LRU hash, [`TC_CLIENTS_ENTRIES`] entries; written by the pod program
//! `svc_tc_from_pod` when it records a new flow, before the flow's first packet goes on, and by
//! the agent at start; read by `svc_tc_to_pod`): key `u32` ifindex (host order), value
//! [`TcClient`]. Entries are not removed; the LRU evicts the least recently used one when the
//! map is full, which takes that many interfaces (pods created since).
//!
//! Map `TC_CLIENTS_READY_V1` (array of one [`TcClientsReady`]; written by the agent, read by
//! `svc_tc_to_pod`): until it says [`TC_CLIENTS_READY`], `TC_CLIENTS_V1` may miss pods with
//! flows recorded by an older build (which did not mark them), and every reply from a backend
//! address is looked up in conntrack as before. The agent marks it ready once its programs are
//! attached: if the connection tables hold a translated flow, after recording every interface
//! it attached to (it cannot tell which pod a flow's client is behind).

use crate::impl_pod;

/// Entries of `TC_CLIENTS_V1`.
pub const TC_CLIENTS_ENTRIES: u32 = 16_384;

/// [`TcClientsReady::ready`] once `TC_CLIENTS_V1` names every pod with a translated flow.
pub const TC_CLIENTS_READY: u32 = 1;

/// Value of `TC_CLIENTS_V1`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcClient {
    /// `CLOCK_MONOTONIC` (coarse) in ns when the entry was written: the pod's first flow
    /// translated at TC since the entry was last evicted (0: written by the agent).
    pub since_ns: u64,
}
crate::assert_layout!(TcClient, size = 8, since_ns = 0);

/// Value of `TC_CLIENTS_READY_V1` (key `0u32`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcClientsReady {
    /// [`TC_CLIENTS_READY`], or 0 while the agent has not completed `TC_CLIENTS_V1` yet.
    pub ready: u32,
}
crate::assert_layout!(TcClientsReady, size = 4, ready = 0);

impl_pod!(TcClient, TcClientsReady);
