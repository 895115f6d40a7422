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

pub mod csum;
pub mod net;
pub mod stats;

pub use net::{Be16, Be32};

/// Version of the map layout. It is part of every map name and of the pin directory
/// (`/sys/fs/bpf/svc/v1/...`), so an agent with a new layout never reads an old pin.
pub const MAP_LAYOUT_VERSION: u32 = 1;

/// Name of every map in the kernel object. The agent pins each one as `<pin dir>/<name>`;
/// a fixture test checks this list against the object.
pub const MAP_NAMES: &[&str] = &["PKT_STATS_V1"];

/// Directory (below the bpffs mount) where the agent pins this layout's maps and links.
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
