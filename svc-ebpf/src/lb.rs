//! Service lookup and backend choice. The agent has already computed, per frontend, the
//! backends new connections may go to (policy, readiness, terminating fallback); here the
//! kernel only looks up: frontend (slot 0) -> random slot -> backend.

use aya_ebpf::helpers::bpf_get_prandom_u32;
use svc_common::{
    Be16,
    service::{Backend, ServiceKey, flags, scope},
    stats::DropReason,
};

use crate::{
    maps::{BACKENDS_V1, SERVICES_V1},
    parse::Parsed,
};

/// What the load balancer decided for a new flow.
pub enum Choice {
    /// The destination is not a service frontend: leave the packet alone.
    NotService,
    /// A service frontend that takes no new connection now.
    Drop(DropReason),
    /// Send the flow to the backend written to `out`.
    Backend,
}

/// The slot-0 key of the internal-scope frontend a packet is addressed to.
#[inline(always)]
pub fn lb_frontend_key(pkt: &Parsed) -> ServiceKey {
    ServiceKey {
        addr: pkt.dst,
        port: Be16(pkt.dport),
        slot: 0,
        proto: pkt.proto,
        family: pkt.family,
        scope: scope::INTERNAL,
        _pad: 0,
    }
}

/// Looks `key` (a slot-0 frontend key) up and picks a backend, which it writes to `out`
/// (id, backend); `key.slot` is left pointing at the chosen slot. A subprogram of its own: its
/// keys and values need not share the caller's 512-byte stack frame. Used by the packet path
/// and the connect-time path alike.
#[inline(never)]
pub fn lb_select_backend(key: &mut ServiceKey, out: &mut (u32, Backend)) -> Choice {
    // SAFETY: the value is copied out before anything else touches the map.
    let Some(frontend) = (unsafe { SERVICES_V1.get(&*key) }).copied() else {
        return Choice::NotService;
    };
    if frontend.count == 0 {
        return Choice::Drop(if frontend.flags & flags::DROP_EMPTY != 0 {
            DropReason::NoLocalEndpoint
        } else {
            DropReason::NoEndpoints
        });
    }
    // SAFETY: bpf_get_prandom_u32 has no preconditions.
    let random = unsafe { bpf_get_prandom_u32() };
    key.slot = (random % u32::from(frontend.count)) as u16 + 1;
    // SAFETY: copied out at once.
    let Some(slot) = (unsafe { SERVICES_V1.get(&*key) }).copied() else {
        return Choice::Drop(DropReason::BackendMissing);
    };
    match lb_backend(slot.id) {
        Some(b) => {
            *out = (slot.id, b);
            Choice::Backend
        }
        None => Choice::Drop(DropReason::BackendMissing),
    }
}

/// The backend with this id, if the agent still holds it.
#[inline(always)]
pub fn lb_backend(id: u32) -> Option<Backend> {
    // SAFETY: copied out at once.
    unsafe { BACKENDS_V1.get(&id) }.copied()
}
