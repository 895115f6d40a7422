//! Map keys, values and helpers shared by the svc kernel programs (`svc-ebpf`) and the
//! userspace agent (`svc-agent`).
//!
//! Every type here is `#[repr(C)]` with its padding written out as explicit `_pad` fields, so
//! the kernel and userspace agree on the layout byte for byte; each layout is pinned by
//! compile-time size and offset asserts next to the type. Fields that hold network-order data
//! say so in their type ([`Be16`], [`Be32`]) so byte order cannot be confused.
//!
//! With the `user` feature every map type implements `aya::Pod`.
#![no_std]
#![expect(
    clippy::pub_underscore_fields,
    reason = "padding is written out as public `_pad` fields so map types can be built with struct literals and have no implicit padding"
)]

pub mod addr;
pub mod addrs;
pub mod affinity;
pub mod conntrack;
pub mod csum;
pub mod frag;
pub mod handoff;
pub mod ids;
pub mod maglev;
pub mod nat;
pub mod net;
pub mod ranges;
pub mod service;
pub mod sock;
pub mod stats;
pub mod tc_clients;

pub use net::{Be16, Be32};

/// Version of the map layout. It is part of every map name and of the pin directory
/// (`/sys/fs/bpf/svc/v1/...`), so an agent with a new layout never reads an old pin.
pub const MAP_LAYOUT_VERSION: u32 = 1;

/// Name of every map in the kernel object. The agent pins each one as `<pin dir>/<name>`;
/// a fixture test checks this list against the object.
pub const MAP_NAMES: &[&str] = &[
    "PKT_STATS_V1",
    "DROP_STATS_V1",
    "SERVICES_V1",
    "BACKENDS_V1",
    "CT_V1",
    "AFFINITY_V1",
    "SVC_STATS_V1",
    "BACKEND_STATS_V1",
    "SOCK_REVNAT_V1",
    "SOCK_UDP_PIN_V1",
    "ADDRS_V1",
    "BACKEND_NAMES_V1",
    "ID_CURSORS_V1",
    "CT_NEW_V1",
    "FRAG_V1",
    "FRONTEND_NAMES_V1",
    "SNAT_CONFIG_V1",
    "SNAT_V1",
    "MAGLEV_V1",
    "SOURCE_RANGES_V1",
    "PENDING_STATS_V1",
    "TC_CLIENTS_V1",
    "TC_CLIENTS_READY_V1",
];

/// Default map sizes (the agent's flags override them at load time).
pub mod sizes {
    /// `SERVICES_V1` entries: frontends plus backend slots. 100,000 service ports with 3
    /// endpoints each take 400,000 (30,000 with 10 endpoints: 330,000); the rest is room to
    /// grow. Preallocated: about 48 MiB.
    pub const SERVICES: u32 = 524_288;
    /// `BACKENDS_V1` entries: 100,000 Services with 3 endpoints of their own each take
    /// 300,000. Preallocated: about 30 MiB.
    pub const BACKENDS: u32 = 393_216;
    /// `CT_V1` entries: two per connection, for 1,000,000 connections.
    pub const CT: u32 = 2_000_000;
    /// `CT_NEW_V1` entries: two per flow nothing has answered yet (a SYN, a UDP datagram),
    /// for 131,072 such flows.
    pub const CT_NEW: u32 = 262_144;
    /// `AFFINITY_V1` entries: (client, service port) pairs with `ClientIP` affinity.
    pub const AFFINITY: u32 = 262_144;
    /// `SNAT_V1` entries: one per external connection to a remote endpoint. Not preallocated.
    pub const SNAT: u32 = 262_144;
    /// `MAGLEV_V1` entries (chunks of 64 table entries): 4,096 external frontends with the
    /// default table size (16 chunks each). Not preallocated.
    pub const MAGLEV: u32 = 65_536;
    /// `ADDRS_V1` entries: every frontend and backend address fits (each has at least one
    /// entry in `SERVICES_V1` or `BACKENDS_V1`). Not preallocated.
    pub const ADDRS: u32 = SERVICES + BACKENDS;
}

/// Directory (below the bpffs mount) holding one directory per layout version (`v1`, `v2`,
/// ...): an agent finds other layouts' pins there and replaces them.
pub const PIN_ROOT: &str = "svc";

/// Directory (below the bpffs mount) where the agent pins this layout's maps and links:
/// `<PIN_ROOT>/v<MAP_LAYOUT_VERSION>`.
pub const PIN_SUBDIR: &str = "svc/v1";

/// Asserts a type's size and field offsets at compile time.
#[macro_export]
macro_rules! assert_layout {
    ($ty:ty, size = $size:expr $(, $field:ident = $off:expr)* $(,)?) => {
        const _: () = assert!(::core::mem::size_of::<$ty>() == $size);
        $(const _: () = assert!(::core::mem::offset_of!($ty, $field) == $off);)*
    };
}

/// Implements `aya::Pod` for map types when built for userspace.
macro_rules! impl_pod {
    ($($ty:ty),* $(,)?) => {
        $(
            #[cfg(feature = "user")]
            // SAFETY: the type is `repr(C)`, `Copy`, has no implicit padding (asserted by
            // `assert_layout!` beside it) and every bit pattern is a valid value.
            unsafe impl aya::Pod for $ty {}
        )*
    };
}
pub(crate) use impl_pod;
