//! From desired state to BPF maps: stable ids ([`ids`]), the map contents the desired state
//! means ([`render`], a pure function), the ordered diff that writes only what changed
//! ([`apply`]), and clearing the kernel's flow state that names what the diff ended
//! ([`flows`]).

pub mod apply;
pub(crate) mod batch;
pub mod flows;
pub mod ids;
pub mod layout;
pub mod names;
pub mod pressure;
pub mod render;

pub use apply::{AyaMaps, Cleared, DatapathMaps, ReconcileReport, Reconciler};
pub use render::{Rendered, render};
