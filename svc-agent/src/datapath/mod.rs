//! From desired state to BPF maps: stable ids ([`ids`]), the map contents the desired state
//! means ([`render`], a pure function), what each frontend is programmed with and the capacity
//! decisions, kept between passes ([`layout`]), the ordered writes of only what changed, in a
//! full or an incremental pass ([`apply`]), the `loadBalancerSourceRanges` entries written around
//! each pass ([`ranges`]), clearing the kernel's flow state that names
//! what a pass ended ([`flows`]), and completing the programs' record of the pods they
//! translate for ([`tc_clients`]).

pub mod apply;
pub(crate) mod batch;
pub mod flows;
pub mod ids;
pub mod layout;
pub mod maglev;
pub mod names;
pub mod pressure;
pub mod ranges;
pub mod render;
pub mod snat;
pub mod sweeper;
pub mod tc_clients;

pub use apply::{
    AyaMaps, Cleared, DatapathMaps, Fill, ReconcileReport, Reconciler, ReconcilerHandle,
};
pub use render::{Rendered, render};
