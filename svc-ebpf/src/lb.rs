//! Service lookup and backend choice. The agent has already computed, per frontend, the
//! backends new connections may go to (policy, readiness, terminating fallback); here the
//! kernel only looks up: frontend (slot 0) -> random slot -> backend.

use aya_ebpf::helpers::bpf_get_prandom_u32;
use svc_common::{
    Be16,
    addr::Addr,
    affinity::{self, AffinityKey, AffinityValue},
    conntrack::{CtKey, dir, flow_hash},
    maglev::{self, MaglevKey},
    service::{Backend, ServiceKey, ServiceValue, backend_flags, flags, scope},
    stats::DropReason,
};

use crate::{
    maps::{AFFINITY_V1, BACKENDS_V1, MAGLEV_V1, SERVICES_V1},
    parse::Parsed,
};

/// The frontend and backend a new flow goes to.
#[derive(Clone, Copy, Default)]
pub struct Chosen {
    /// The frontend's (service port's) id.
    pub frontend_id: u32,
    /// The backend's id.
    pub backend_id: u32,
    /// The backend.
    pub backend: Backend,
    /// Set by the caller: pick the slot by this hash of the flow's tuple instead of at random
    /// (a TCP packet that is not a SYN and lost its connection-table entry).
    pub tuple_hash: Option<u32>,
    /// Set by the packet paths: the client's port (network order), which with the frontend and
    /// the client's address makes the flow's tuple for an external frontend's Maglev table.
    pub client_port: u16,
}

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

/// Looks `key` (a slot-0 frontend key) up and picks a backend for `client` (an address of
/// family `client_family`, or a namespace cookie with `affinity::CLIENT_NETNS`), writing it to
/// `out` (id, backend) and leaving `key.slot` at the chosen slot. With `ClientIP` session
/// affinity, a client with a live entry whose backend is still eligible goes there again (the
/// entry is refreshed); otherwise the pick is uniformly random over the slots, or by
/// `out.tuple_hash` when the caller set it (and recorded for an affine frontend). Used by the packet path and the connect-time path alike. A subprogram
/// of its own: its keys and values need not share the caller's 512-byte stack frame.
#[inline(never)]
pub fn lb_select_for_client(
    key: &mut ServiceKey,
    client: &Addr,
    client_family: u8,
    now: u64,
    out: &mut Chosen,
) -> Choice {
    // SAFETY: the value is copied out before anything else touches the map.
    let Some(frontend) = (unsafe { SERVICES_V1.get(&*key) }).copied() else {
        return Choice::NotService;
    };
    out.frontend_id = frontend.id;
    if frontend.affinity_timeout == 0 || frontend.count == 0 {
        return lb_pick_slot(key, &frontend, client, out);
    }
    let akey = AffinityKey {
        client: *client,
        frontend_id: frontend.id,
        family: client_family,
        _pad: [0; 3],
    };
    let timeout_ns = u64::from(frontend.affinity_timeout) * 1_000_000_000;
    if let Some(entry) = AFFINITY_V1.get_ptr_mut(&akey) {
        // SAFETY: a pointer into the map's value; a racing update can only lose a refresh.
        let (id, last, check) =
            unsafe { ((*entry).backend_id, (*entry).last_used_ns, (*entry).check) };
        let live = now.saturating_sub(last) <= timeout_ns;
        // SAFETY: a pointer into the map's value, read before anything else touches the map.
        let backend = unsafe { BACKENDS_V1.get(&id) };
        if let Some(b) = backend.filter(|b| {
            live && affinity_eligible(&frontend, b) && affinity_same_pair(check, frontend.id, b)
        }) {
            // SAFETY: as above.
            unsafe { (*entry).last_used_ns = now };
            out.backend_id = id;
            out.backend = *b;
            return Choice::Backend;
        }
    }
    let choice = lb_pick_slot(key, &frontend, client, out);
    if let Choice::Backend = choice {
        let value = AffinityValue {
            backend_id: out.backend_id,
            check: affinity::fingerprint(frontend.id, &out.backend),
            last_used_ns: now,
        };
        // A full LRU map evicts; an error only costs this client its stickiness.
        let _ = AFFINITY_V1.insert(&akey, &value, 0);
    }
    choice
}

/// Whether an affinity entry's `check` says its backend id still names the backend `b` it was
/// written for, for this frontend (`svc_common::affinity::fingerprint`); 0: an entry written
/// before the check existed, honoured by id alone (ids are not reissued while the entry can
/// live; see `svc-agent/src/datapath/ids.rs`).
#[inline(always)]
fn affinity_same_pair(check: u32, frontend_id: u32, b: &Backend) -> bool {
    check == 0 || check == affinity::fingerprint(frontend_id, b)
}

/// Whether an affinity entry's backend may still take new connections from `frontend`.
#[inline(always)]
fn affinity_eligible(frontend: &ServiceValue, b: &Backend) -> bool {
    (b.flags & backend_flags::TERMINATING == 0 || frontend.flags & flags::SERVES_TERMINATING != 0)
        && (b.flags & backend_flags::LOCAL != 0 || frontend.flags & flags::LOCAL_ONLY == 0)
}

/// Size of the external frontends' Maglev tables (`svc_common::maglev`); 0: Maglev off. Set by
/// the agent when it loads the programs (`--maglev-table-size`).
#[unsafe(no_mangle)]
static SVC_MAGLEV_SIZE: u32 = 0;

/// The backend the external frontend `key` (slot 0, id `frontend_id`)'s Maglev table names for
/// the flow from `client`:`out.client_port` (entry `flow_hash % M`), if the table has that chunk
/// and the backend is still held. A subprogram of its own (the tuple it hashes and the table
/// key need no room in the caller's frame).
#[inline(never)]
fn lb_maglev(key: &ServiceKey, frontend_id: u32, client: &Addr, out: &mut Chosen) -> bool {
    // SAFETY: a load-time constant, read as a plain value.
    let size = unsafe { core::ptr::read_volatile(&raw const SVC_MAGLEV_SIZE) };
    if size == 0 {
        return false;
    }
    let tuple = CtKey {
        src: *client,
        dst: key.addr,
        sport: Be16(out.client_port),
        dport: key.port,
        proto: key.proto,
        family: key.family,
        dir: dir::FORWARD,
        _pad: 0,
    };
    let (chunk, at) = maglev::locate(flow_hash(&tuple) % size);
    let key = MaglevKey { frontend_id, chunk };
    // SAFETY: read at once.
    let Some(id) = (unsafe { MAGLEV_V1.get(&key) }).and_then(|c| c.backend_ids.get(at).copied())
    else {
        return false;
    };
    match lb_backend(id) {
        Some(b) => {
            out.backend_id = id;
            out.backend = b;
            true
        }
        None => false,
    }
}

/// Picks the backend of a new flow from `client` to `frontend` (looked up with `key`): for an
/// external frontend, its Maglev table's entry for the flow (see [`lb_maglev`]); otherwise
/// slot `1 + random % count` (`out.tuple_hash` instead of a random number when set).
#[inline(always)]
fn lb_pick_slot(
    key: &mut ServiceKey,
    frontend: &ServiceValue,
    client: &Addr,
    out: &mut Chosen,
) -> Choice {
    if frontend.count != 0
        && key.scope == scope::EXTERNAL
        && lb_maglev(key, frontend.id, client, out)
    {
        return Choice::Backend;
    }
    if frontend.count == 0 {
        return Choice::Drop(if frontend.flags & flags::DROP_EMPTY != 0 {
            DropReason::NoLocalEndpoint
        } else {
            DropReason::NoEndpoints
        });
    }
    let pick = match out.tuple_hash {
        Some(hash) => hash,
        // SAFETY: bpf_get_prandom_u32 has no preconditions.
        None => unsafe { bpf_get_prandom_u32() },
    };
    key.slot = (pick % u32::from(frontend.count)) as u16 + 1;
    // SAFETY: copied out at once.
    let Some(slot) = (unsafe { SERVICES_V1.get(&*key) }).copied() else {
        return Choice::Drop(DropReason::BackendMissing);
    };
    match lb_backend(slot.id) {
        Some(b) => {
            out.backend_id = slot.id;
            out.backend = b;
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
