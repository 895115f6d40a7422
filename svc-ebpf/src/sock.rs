//! Connect-time translation (cgroup `sock_addr` hooks) for the sockets of the cgroup the agent
//! attaches them to: pods and host-network processes (`--socket-lb all`, the default: the
//! `DaemonSet` attaches at the cgroup v2 root) or host-network processes only
//! (`--socket-lb host-only`: sockets of other network namespaces are left to the TC path).
//!
//! Forward (`connect4/6`, `sendmsg4/6`): the address a process hands to `connect()` or
//! `sendto()` -> in scope (its network namespace)? -> is it an internal-scope service frontend
//! -> a UDP socket that already connected or sent to this service keeps its backend
//! (`SOCK_UDP_PIN_V1`); otherwise the same backend choice as the packet path, with `ClientIP`
//! affinity keyed by the socket's network namespace -> remember (socket, backend) -> (service
//! address) -> hand the kernel the backend instead. The socket never sees the service address
//! on the wire, so no packet needs translating and the TC programs leave its packets alone.
//!
//! Reverse (`getpeername4/6`, `recvmsg4/6`): the backend address the kernel is about to report
//! for a socket we translated becomes the service address again, so `getpeername()` and
//! `recvfrom()` show what the process connected or sent to. (Not limited by scope: a socket
//! translated under another mode keeps its reverse translation.)
//!
//! IPv4-mapped IPv6 destinations (`::ffff:a.b.c.d` on a dual-stack socket) are IPv4 services:
//! the IPv6 hooks look them up as IPv4 and hand back `::ffff:<backend>` (the kernel's UDP
//! `sendmsg` path turns them into IPv4 before its hook, so `sendmsg4` sees those).
//!
//! A service without endpoints refuses the call: `connect()` / `sendto()` fail at once with
//! `ECONNREFUSED`; so does a `ClusterIP` on a port (and protocol) its Service does not have
//! (`ADDRS_V1` flag `CLUSTER_IP`), as the packet path rejects it. internalTrafficPolicy Local without a local endpoint leaves the call alone,
//! so its packets are dropped as kube-proxy drops them (by the TC programs, counted, for a pod).
//! Anything unexpected (another protocol, a backend of the other family) is left untouched.

use aya_ebpf::{
    EbpfContext as _,
    bindings::bpf_sock_addr,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_set_retval},
    macros::map,
    maps::LruHashMap,
    programs::SockAddrContext,
};
use svc_common::{
    Be16,
    addr::{Addr, FAMILY_V4, FAMILY_V6},
    addrs::{AddrKey, addr_flags},
    affinity::CLIENT_NETNS,
    net::ipproto,
    service::{ServiceKey, scope},
    sock::{
        SOCK_REVNAT_ENTRIES, SOCK_UDP_PIN_ENTRIES, SockPinKey, SockPinValue, SockRevNatKey,
        SockRevNatValue,
    },
    stats::{DropReason, PktCounter},
};

use crate::{
    lb::{Choice, Chosen, lb_backend, lb_select_for_client},
    maps::{ADDRS_V1, SERVICES_V1},
    stats,
};

/// Reverse translation per socket: (socket cookie, backend) -> service address. Writer: the
/// forward programs here; readers: the reverse programs here. See `svc_common::sock`.
#[map]
pub static SOCK_REVNAT_V1: LruHashMap<SockRevNatKey, SockRevNatValue> =
    LruHashMap::with_max_entries(SOCK_REVNAT_ENTRIES, 0);

/// The backend of each UDP socket per service: (socket cookie, service) -> backend. Writer:
/// the forward programs here (the agent deletes entries of ended backends).
/// See `svc_common::sock`.
#[map]
pub static SOCK_UDP_PIN_V1: LruHashMap<SockPinKey, SockPinValue> =
    LruHashMap::with_max_entries(SOCK_UDP_PIN_ENTRIES, 0);

/// Whose sockets the forward programs translate: 0 = every network namespace
/// (`--socket-lb all`); otherwise only sockets of the namespace with this cookie, the node's
/// own (`--socket-lb host-only`). Set by the agent when it loads the programs.
#[unsafe(no_mangle)]
static SVC_SOCK_LB_NETNS: u64 = 0;

/// Verdict of a cgroup `sock_addr` program: let the call go on (with whatever address the program
/// left in the context).
const SOCK_PROCEED: i32 = 1;
/// Verdict of a cgroup `sock_addr` program: fail the call (`EPERM` unless a program set another
/// error with `bpf_set_retval`).
const SOCK_REFUSE: i32 = 0;

/// The error a refused `connect()` / `sendto()` returns.
const ECONNREFUSED: i32 = 111;

/// `sa_family` values.
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
/// `sk_type` values.
const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
/// Multipath TCP sockets (`SOCK_STREAM`, this protocol) reach services as TCP does.
const IPPROTO_MPTCP: u32 = 262;

/// An address and port as a `sock_addr` context carries them, in map layout.
struct SockAddr {
    addr: Addr,
    /// Network order.
    port: u16,
    /// The family the maps know the address by: [`FAMILY_V4`] also for an IPv4-mapped IPv6
    /// address.
    family: u8,
    /// An IPv4 address carried as `::ffff:a.b.c.d` by an IPv6 socket.
    mapped: bool,
}

/// `connect()` / `sendto()` of an IPv4 socket (`connect4`, `sendmsg4`). Returns the verdict.
#[inline(always)]
pub fn sock4_forward(ctx: &SockAddrContext) -> i32 {
    sock_xlate_fwd(ctx, FAMILY_V4)
}

/// `connect()` / `sendto()` of an IPv6 socket (`connect6`, `sendmsg6`). Returns the verdict.
#[inline(always)]
pub fn sock6_forward(ctx: &SockAddrContext) -> i32 {
    sock_xlate_fwd(ctx, FAMILY_V6)
}

/// `getpeername()` / `recvfrom()` of an IPv4 socket (`getpeername4`, `recvmsg4`). Returns the
/// verdict (always proceed).
#[inline(always)]
pub fn sock4_reverse(ctx: &SockAddrContext) -> i32 {
    sock_xlate_rev(ctx, FAMILY_V4)
}

/// `getpeername()` / `recvfrom()` of an IPv6 socket (`getpeername6`, `recvmsg6`). Returns the
/// verdict (always proceed).
#[inline(always)]
pub fn sock6_reverse(ctx: &SockAddrContext) -> i32 {
    sock_xlate_rev(ctx, FAMILY_V6)
}

/// `connect()` / `sendto()` of a socket whose context is of `ctx_family` ([`FAMILY_V4`] or
/// [`FAMILY_V6`], the program's own) in the attached cgroup: a service address becomes one of
/// its backends. Returns the program's verdict.
#[inline(always)]
fn sock_xlate_fwd(ctx: &SockAddrContext, ctx_family: u8) -> i32 {
    let sa = ctx.sock_addr;
    let Some(proto) = sock_service_proto(sa) else {
        return SOCK_PROCEED;
    };
    let Some(dst) = sock_user_addr(sa, ctx_family) else {
        return SOCK_PROCEED;
    };
    if !sock_in_scope(ctx) {
        return SOCK_PROCEED;
    }
    let mut key = ServiceKey {
        addr: dst.addr,
        port: Be16(dst.port),
        slot: 0,
        proto,
        family: dst.family,
        scope: scope::INTERNAL,
        _pad: 0,
    };
    // SAFETY: the context is the program's own; the helper only reads its socket.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let mut chosen = Chosen::default();
    // A UDP socket keeps its backend per service whether it connects or sends with an
    // address (a connected socket may still name the service in `sendto()`; a new choice there
    // would send the datagram to a backend the socket does not accept answers from).
    let choice = if proto == ipproto::UDP {
        sock_udp_select(ctx, &mut key, cookie, &mut chosen)
    } else {
        sock_select(ctx, &mut key, &mut chosen)
    };
    match choice {
        // internalTrafficPolicy Local without a local endpoint means drop, not refuse: the
        // call goes on with the service address, and the packet path drops (and counts) the
        // packets of a pod; a host process's go nowhere (the node has no route to services).
        Choice::NotService if sock_is_cluster_ip(&dst) => sock_refuse_unlisted(),
        Choice::NotService | Choice::Drop(DropReason::NoLocalEndpoint) => SOCK_PROCEED,
        Choice::Drop(reason) => sock_refuse(reason),
        Choice::Backend => {
            let backend = &chosen.backend;
            if backend.family != dst.family {
                // The agent never pairs frontends and backends of different families.
                return SOCK_PROCEED;
            }
            let rev_key = SockRevNatKey {
                cookie,
                addr: backend.addr,
                port: backend.port,
                family: dst.family,
                _pad: [0; 5],
            };
            let rev = SockRevNatValue {
                addr: dst.addr,
                port: Be16(dst.port),
                _pad: 0,
            };
            // Without its reverse entry the process would see replies from an address it never
            // named (and drop them, as resolvers do): refuse rather than half-translate.
            if SOCK_REVNAT_V1.insert(&rev_key, &rev, 0).is_err() {
                return sock_refuse(DropReason::CtInsertFailed);
            }
            sock_set_user_addr(sa, ctx_family, dst.mapped, &backend.addr, backend.port.0);
            stats::count(PktCounter::SockXlate, 0);
            SOCK_PROCEED
        }
    }
}

/// Whether the forward programs translate this socket: always with `--socket-lb all`; with
/// `host-only`, only sockets of the node's own network namespace.
#[inline(always)]
fn sock_in_scope(ctx: &SockAddrContext) -> bool {
    // SAFETY: a plain read of a global the agent set at load time (volatile: its value is only
    // known then, not when this is compiled).
    let only = unsafe { core::ptr::read_volatile(&raw const SVC_SOCK_LB_NETNS) };
    // SAFETY: the context is the program's own; the helper only reads its socket's namespace.
    only == 0 || unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } == only
}

/// The backend choice for a connection (or a datagram with no pinned backend): the frontend's
/// slots, with `ClientIP` affinity keyed by the socket's network namespace (see
/// `svc_common::affinity::CLIENT_NETNS`).
#[inline(always)]
fn sock_select(ctx: &SockAddrContext, key: &mut ServiceKey, out: &mut Chosen) -> Choice {
    // SAFETY: the context is the program's own; the helper only reads its socket's namespace.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) }.to_ne_bytes();
    let mut client = [0u8; 16];
    client[..8].copy_from_slice(&netns);
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    lb_select_for_client(key, &client, CLIENT_NETNS, now, out)
}

/// The backend for a UDP socket's `connect()` or datagram: the one this socket's earlier
/// datagrams (or connect) to the same service went to, while that backend exists (same id, address and
/// port) and the frontend has no `ClientIP` affinity (which does the sticking itself);
/// otherwise a new choice, remembered. A subprogram of its own (stack room for its keys).
#[inline(never)]
fn sock_udp_select(
    ctx: &SockAddrContext,
    key: &mut ServiceKey,
    cookie: u64,
    out: &mut Chosen,
) -> Choice {
    // SAFETY: copied out at once.
    let Some(frontend) = (unsafe { SERVICES_V1.get(&*key) }).copied() else {
        return Choice::NotService;
    };
    if frontend.affinity_timeout != 0 {
        return sock_select(ctx, key, out);
    }
    let pin_key = SockPinKey {
        cookie,
        addr: key.addr,
        port: key.port,
        family: key.family,
        _pad: [0; 5],
    };
    // SAFETY: copied out at once.
    if let Some(pin) = unsafe { SOCK_UDP_PIN_V1.get(&pin_key) }.copied() {
        let alive = lb_backend(pin.backend_id)
            .filter(|b| pin.frontend_id == frontend.id && b.addr == pin.addr && b.port == pin.port);
        if let Some(backend) = alive {
            out.frontend_id = frontend.id;
            out.backend_id = pin.backend_id;
            out.backend = backend;
            return Choice::Backend;
        }
    }
    let choice = sock_select(ctx, key, out);
    if let Choice::Backend = choice {
        let pin = SockPinValue {
            backend_id: out.backend_id,
            frontend_id: out.frontend_id,
            addr: out.backend.addr,
            port: out.backend.port,
            _pad: 0,
        };
        // A full LRU map evicts; an error only costs this socket its stickiness.
        let _ = SOCK_UDP_PIN_V1.insert(&pin_key, &pin, 0);
    }
    choice
}

/// `getpeername()` / `recvfrom()` of a socket whose context is of `ctx_family` in the attached
/// cgroup: a backend this socket was sent to is reported as the service address it asked for.
/// Always lets the call go on (these hooks cannot fail a call).
#[inline(always)]
fn sock_xlate_rev(ctx: &SockAddrContext, ctx_family: u8) -> i32 {
    let sa = ctx.sock_addr;
    let Some(peer) = sock_user_addr(sa, ctx_family) else {
        return SOCK_PROCEED;
    };
    let key = SockRevNatKey {
        // SAFETY: the context is the program's own; the helper only reads its socket.
        cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        addr: peer.addr,
        port: Be16(peer.port),
        family: peer.family,
        _pad: [0; 5],
    };
    // SAFETY: copied out at once.
    if let Some(orig) = unsafe { SOCK_REVNAT_V1.get(&key) }.copied() {
        sock_set_user_addr(sa, ctx_family, peer.mapped, &orig.addr, orig.port.0);
        stats::count(PktCounter::SockRevNat, 0);
    }
    SOCK_PROCEED
}

/// Fails the call with `ECONNREFUSED`. A service without endpoints counts as `rejected`, as
/// the packet path's resets and port unreachables do; anything else as a drop with `reason`.
#[inline(always)]
fn sock_refuse(reason: DropReason) -> i32 {
    if reason == DropReason::NoEndpoints {
        stats::count(PktCounter::Rejected, 0);
    } else {
        stats::count_drop(reason, 0);
    }
    // SAFETY: no preconditions; connect and sendmsg programs may set the call's error (without
    // it a refused call fails with EPERM).
    unsafe { bpf_set_retval(-ECONNREFUSED) };
    SOCK_REFUSE
}

/// Whether `dst` is a `ClusterIP` (`ADDRS_V1`): the call names one of its ports the Service
/// does not have (the frontend lookup missed).
#[inline(always)]
fn sock_is_cluster_ip(dst: &SockAddr) -> bool {
    let key = AddrKey {
        addr: dst.addr,
        family: dst.family,
        _pad: [0; 3],
    };
    // SAFETY: the value is read at once.
    unsafe { ADDRS_V1.get(&key) }.is_some_and(|v| v.flags & addr_flags::CLUSTER_IP != 0)
}

/// Fails a call to a `ClusterIP`'s unlisted port with `ECONNREFUSED`, counted `rejected` and
/// `unlisted_port`.
#[inline(always)]
fn sock_refuse_unlisted() -> i32 {
    stats::count(PktCounter::UnlistedPort, 0);
    sock_refuse(DropReason::NoEndpoints)
}

/// The IP protocol a service frontend of this socket would be keyed by: TCP for stream
/// sockets (TCP, MPTCP), UDP for datagram sockets; `None` for anything else.
#[inline(always)]
fn sock_service_proto(sa: *mut bpf_sock_addr) -> Option<u8> {
    // SAFETY: `sa` is the program's context; the verifier allows 4-byte reads of these fields
    // (volatile keeps them exactly 4 bytes).
    let (sk_type, protocol) = unsafe {
        (
            (&raw const (*sa).type_).read_volatile(),
            (&raw const (*sa).protocol).read_volatile(),
        )
    };
    match sk_type {
        SOCK_STREAM if protocol == u32::from(ipproto::TCP) || protocol == IPPROTO_MPTCP => {
            Some(ipproto::TCP)
        }
        SOCK_DGRAM if protocol == u32::from(ipproto::UDP) => Some(ipproto::UDP),
        _ => None,
    }
}

/// The address and port the call names (`connect`/`sendmsg`: destination; `getpeername`:
/// peer; `recvmsg`: the datagram's source), if it is of the context's family `ctx_family`. An
/// IPv4-mapped IPv6 address comes back as the IPv4 address it maps.
#[inline(always)]
fn sock_user_addr(sa: *mut bpf_sock_addr, ctx_family: u8) -> Option<SockAddr> {
    // SAFETY: `sa` is the program's context; every field is read with one 4-byte load, which
    // the verifier allows for all of them.
    unsafe {
        let user_family = (&raw const (*sa).user_family).read_volatile();
        let port = (&raw const (*sa).user_port).read_volatile() as u16;
        if ctx_family == FAMILY_V4 {
            if user_family != AF_INET {
                return None;
            }
            let ip = (&raw const (*sa).user_ip4).read_volatile();
            return Some(SockAddr {
                addr: addr_from_words([ip, 0, 0, 0]),
                port,
                family: FAMILY_V4,
                mapped: false,
            });
        }
        if user_family != AF_INET6 {
            return None;
        }
        let words = [
            (&raw const (*sa).user_ip6[0]).read_volatile(),
            (&raw const (*sa).user_ip6[1]).read_volatile(),
            (&raw const (*sa).user_ip6[2]).read_volatile(),
            (&raw const (*sa).user_ip6[3]).read_volatile(),
        ];
        if words[0] == 0 && words[1] == 0 && words[2] == V4_MAPPED_WORD {
            return Some(SockAddr {
                addr: addr_from_words([words[3], 0, 0, 0]),
                port,
                family: FAMILY_V4,
                mapped: true,
            });
        }
        Some(SockAddr {
            addr: addr_from_words(words),
            port,
            family: FAMILY_V6,
            mapped: false,
        })
    }
}

/// The third word of an IPv4-mapped IPv6 address (`::ffff:0:0/96`), as the context holds it.
const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// Replaces the address and port the call names: `addr` is of the family the maps know it by;
/// `mapped` writes an IPv4 address as `::ffff:a.b.c.d` into an IPv6 context. `port` network
/// order.
#[inline(always)]
fn sock_set_user_addr(
    sa: *mut bpf_sock_addr,
    ctx_family: u8,
    mapped: bool,
    addr: &Addr,
    port: u16,
) {
    let w = addr_to_words(addr);
    // SAFETY: `sa` is the program's context; these fields take 4-byte stores in every hook that
    // runs this (connect, sendmsg, recvmsg, getpeername). The kernel stores the port's low 16
    // bits, which hold it in network order.
    unsafe {
        if ctx_family == FAMILY_V4 {
            (&raw mut (*sa).user_ip4).write_volatile(w[0]);
        } else if mapped {
            (&raw mut (*sa).user_ip6[0]).write_volatile(0);
            (&raw mut (*sa).user_ip6[1]).write_volatile(0);
            (&raw mut (*sa).user_ip6[2]).write_volatile(V4_MAPPED_WORD);
            (&raw mut (*sa).user_ip6[3]).write_volatile(w[0]);
        } else {
            (&raw mut (*sa).user_ip6[0]).write_volatile(w[0]);
            (&raw mut (*sa).user_ip6[1]).write_volatile(w[1]);
            (&raw mut (*sa).user_ip6[2]).write_volatile(w[2]);
            (&raw mut (*sa).user_ip6[3]).write_volatile(w[3]);
        }
        (&raw mut (*sa).user_port).write_volatile(u32::from(port));
    }
}

/// Four context words (each holding four address bytes in memory order) as an [`Addr`].
#[inline(always)]
fn addr_from_words(w: [u32; 4]) -> Addr {
    let [a0, a1, a2, a3] = w[0].to_ne_bytes();
    let [b0, b1, b2, b3] = w[1].to_ne_bytes();
    let [c0, c1, c2, c3] = w[2].to_ne_bytes();
    let [d0, d1, d2, d3] = w[3].to_ne_bytes();
    [
        a0, a1, a2, a3, b0, b1, b2, b3, c0, c1, c2, c3, d0, d1, d2, d3,
    ]
}

/// An [`Addr`] as four context words.
#[inline(always)]
fn addr_to_words(a: &Addr) -> [u32; 4] {
    [
        u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
        u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
        u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
        u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
    ]
}
