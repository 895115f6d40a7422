//! Service frontends and their backend slots.
//!
//! Map `SERVICES_V1` (hash; written by the agent's reconciler, read by every program).
//! Key [`ServiceKey`]: the frontend (address, port, protocol, family, scope) plus a slot.
//! Slot 0 holds the frontend itself ([`ServiceValue`] with `count`, `flags`, `id`, affinity);
//! slots `1..=count` each hold one backend id for new connections to choose from. The agent
//! computes the set; the kernel picks slot `1 + random % count` and looks it up.
//! Byte order: addresses and `port` network order, everything else host order.
//!
//! Map `BACKENDS_V1` (hash; written by the reconciler): key `u32` backend id, value
//! [`Backend`]. Holds every backend a slot points at and also the ones only kept for existing
//! connections (terminating endpoints), so established flows can check theirs still exists.
//!
//! Maps `BACKEND_NAMES_V1` and `FRONTEND_NAMES_V1` (hash, no preallocation; written by the
//! reconciler beside `BACKENDS_V1` and `SERVICES_V1`, read by `svc-agent inspect` only): key
//! `u32` backend / frontend id, value [`BackendName`] / [`FrontendName`]: who is behind the id,
//! so the pinned state names it with no agent running.

use crate::{Be16, addr::Addr, impl_pod};

/// Scope of a frontend: who the traffic comes from.
pub mod scope {
    /// From inside the cluster (pods, host processes): `ClusterIP`, and LB/external IPs reached
    /// from inside.
    pub const INTERNAL: u8 = 0;
    /// From outside the cluster (packets arriving on a node-facing interface): `NodePort`,
    /// `LoadBalancer` ingress and external IPs.
    pub const EXTERNAL: u8 = 1;
}

/// Flags of a frontend (slot 0's `flags`).
pub mod flags {
    /// No backend for new connections and none anywhere: reject at once (TCP RST / ICMP port
    /// unreachable).
    pub const REJECT_EMPTY: u16 = 1 << 0;
    /// No backend allowed by policy (internalTrafficPolicy Local with no local endpoint): drop,
    /// counted as `DropReason::NoLocalEndpoint`.
    pub const DROP_EMPTY: u16 = 1 << 1;
    /// The slots hold terminating endpoints (no ready one exists): session affinity may stick
    /// to a terminating backend.
    pub const SERVES_TERMINATING: u16 = 1 << 2;
    /// New connections only go to endpoints on this node (the scope's traffic policy is Local):
    /// session affinity may only stick to a local backend.
    pub const LOCAL_ONLY: u16 = 1 << 3;
    /// The frontend is on a node, external or load-balancer address, not a `ClusterIP`: the
    /// address's other ports are not refused (they belong to the node or someone else). The
    /// agent reads it back when it rebuilds `ADDRS_V1`; the programs do not need it.
    pub const EXTERNAL_ADDR: u16 = 1 << 4;
    /// With `EXTERNAL_ADDR`: a node address at a `nodePort` (for `inspect`; the programs do
    /// not read it).
    pub const KIND_NODE_PORT: u16 = 1 << 5;
    /// With `EXTERNAL_ADDR`: a load balancer's ingress IP (for `inspect`). Neither kind bit:
    /// one of the Service's `externalIPs`.
    pub const KIND_LOAD_BALANCER: u16 = 1 << 6;
}

/// Key of `SERVICES_V1`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    /// Frontend address (see [`crate::addr`]), network order.
    pub addr: Addr,
    /// Frontend port, network order.
    pub port: Be16,
    /// 0 for the frontend entry, `1..=count` for backend slots.
    pub slot: u16,
    /// IP protocol number (TCP 6, UDP 17, SCTP 132).
    pub proto: u8,
    /// [`crate::addr::FAMILY_V4`] or [`crate::addr::FAMILY_V6`].
    pub family: u8,
    /// [`scope::INTERNAL`] or [`scope::EXTERNAL`].
    pub scope: u8,
    /// Explicit padding, always zero.
    pub _pad: u8,
}
crate::assert_layout!(
    ServiceKey,
    size = 24,
    addr = 0,
    port = 16,
    slot = 18,
    proto = 20,
    family = 21,
    scope = 22
);

/// Value of `SERVICES_V1`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceValue {
    /// Slot 0: the service port's id (counters, affinity). Slot n: the backend id.
    pub id: u32,
    /// Slot 0: how many backend slots follow. Slot n: 0.
    pub count: u16,
    /// Slot 0: [`flags`]. Slot n: 0.
    pub flags: u16,
    /// Slot 0: `ClientIP` session affinity timeout in seconds; 0 = no affinity.
    pub affinity_timeout: u32,
    /// Explicit padding, always zero.
    pub _pad: u32,
}
crate::assert_layout!(
    ServiceValue,
    size = 16,
    id = 0,
    count = 4,
    flags = 6,
    affinity_timeout = 8
);

/// Flags of a backend.
pub mod backend_flags {
    /// The endpoint runs on this node.
    pub const LOCAL: u8 = 1 << 0;
    /// The endpoint is terminating (kept for existing connections).
    pub const TERMINATING: u8 = 1 << 1;
}

/// Value of `BACKENDS_V1`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    /// Endpoint address, network order.
    pub addr: Addr,
    /// Endpoint port (the resolved targetPort), network order.
    pub port: Be16,
    /// [`crate::addr::FAMILY_V4`] or [`crate::addr::FAMILY_V6`].
    pub family: u8,
    /// [`backend_flags`].
    pub flags: u8,
}
crate::assert_layout!(
    Backend,
    size = 20,
    addr = 0,
    port = 16,
    family = 18,
    flags = 19
);

/// A UTF-8 name in fixed-size bytes, for the maps that tell `svc-agent inspect` who is behind
/// an id (`BACKEND_NAMES_V1`, `FRONTEND_NAMES_V1`): its length, then its first `N` bytes,
/// zero-padded. `N` is even, so the type has no padding (`len` is 2 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Name<const N: usize> {
    /// Length of the whole name in bytes; more than `N`: `name` holds its first `N` bytes.
    pub len: u16,
    /// The name, zero-padded.
    pub name: [u8; N],
}

impl<const N: usize> Default for Name<N> {
    fn default() -> Self {
        Self {
            len: 0,
            name: [0; N],
        }
    }
}

impl<const N: usize> Name<N> {
    /// Bytes it holds; longer names are cut (and [`Self::is_cut`] says so).
    pub const CAP: usize = N;

    /// `text`, cut to `N` bytes (at a character boundary) when longer.
    #[must_use]
    pub fn new(text: &str) -> Self {
        let mut out = Self {
            len: u16::try_from(text.len()).unwrap_or(u16::MAX),
            ..Self::default()
        };
        let mut cut = text.len().min(N);
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        out.name[..cut].copy_from_slice(&text.as_bytes()[..cut]);
        out
    }

    /// The stored bytes of the name (all of it unless [`Self::is_cut`]).
    #[must_use]
    pub fn stored(&self) -> &[u8] {
        let n = usize::from(self.len).min(N);
        let end = self.name[..n].iter().position(|&b| b == 0).unwrap_or(n);
        &self.name[..end]
    }

    /// Whether the name was longer than `N` bytes.
    #[must_use]
    pub fn is_cut(&self) -> bool {
        usize::from(self.len) > N
    }
}

/// Bytes of a name [`BackendName`] holds; longer names are cut (and [`Name::is_cut`] says so).
pub const BACKEND_NAME_CAP: usize = 254;

/// Value of `BACKEND_NAMES_V1` (key: backend id, as in `BACKENDS_V1`): who the backend is,
/// `namespace/name` of its endpoint's `targetRef` (a Pod), UTF-8, for `svc-agent inspect`.
/// Written by the agent beside `BACKENDS_V1`; never read by the programs.
pub type BackendName = Name<BACKEND_NAME_CAP>;
crate::assert_layout!(BackendName, size = 256, len = 0, name = 2);

/// Bytes of a Service's `namespace/name` a [`FrontendName`] holds: any the API accepts (a
/// namespace and a Service name are DNS labels, at most 63 bytes each: 127 with the slash).
pub const SERVICE_NAME_CAP: usize = 158;

/// Bytes of a port name a [`FrontendName`] holds: any the API accepts (`IANA_SVC_NAME`, at most
/// 15 bytes).
pub const PORT_NAME_CAP: usize = 30;

/// Value of `FRONTEND_NAMES_V1` (key: frontend id, as in slot 0 of `SERVICES_V1`): which
/// Service port the frontend is, for `svc-agent inspect`. Written by the agent beside
/// `SERVICES_V1`; never read by the programs. 192 bytes, so an entry with the kernel's
/// element header stays within a 256-byte allocation.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FrontendName {
    /// `namespace/name` of the Service, UTF-8.
    pub service: Name<SERVICE_NAME_CAP>,
    /// The port's name (`spec.ports[].name`; empty for a Service's one unnamed port), UTF-8.
    pub port: Name<PORT_NAME_CAP>,
}
crate::assert_layout!(FrontendName, size = 192, service = 0, port = 160);

impl FrontendName {
    /// Port `port` of the Service `service` (`namespace/name`), each cut as [`Name::new`] cuts.
    #[must_use]
    pub fn new(service: &str, port: &str) -> Self {
        Self {
            service: Name::new(service),
            port: Name::new(port),
        }
    }
}

impl_pod!(ServiceKey, ServiceValue, Backend, BackendName, FrontendName);
