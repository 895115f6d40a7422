//! From desired state to BPF maps: stable ids ([`ids`]), the map contents the desired state
//! means ([`render`], a pure function), and the ordered diff that writes only what changed
//! ([`apply`]).

pub mod apply;
pub mod ids;
pub mod render;

pub use apply::{AyaMaps, DatapathMaps, ReconcileReport, Reconciler};
pub use render::{Rendered, render};
