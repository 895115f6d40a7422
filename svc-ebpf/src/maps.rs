//! Every map the kernel programs use. Layouts, byte order and writers are documented beside
//! each type in `svc-common`; names carry the layout version (`_V1`) and the agent pins each
//! one as `<bpffs>/svc/v1/<NAME>`. Sizes here are defaults; the agent sets them at load time.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap},
};

/// `BPF_F_NO_PREALLOC` (uapi): entries are allocated when inserted.
const BPF_F_NO_PREALLOC: u32 = 1;
use svc_common::{
    addrs::{AddrKey, AddrValue},
    affinity::{AffinityKey, AffinityValue},
    conntrack::{CtKey, CtValue},
    frag::{FRAG_ENTRIES, FragKey, FragValue},
    ids::{self, IdCursor},
    maglev::{MaglevChunk, MaglevKey},
    nat::{SNAT_CONFIG_ENTRIES, SnatConfig, SnatValue},
    ranges::{SOURCE_RANGES_ENTRIES, SourceRangeKey, SourceRangeValue},
    service::{Backend, BackendName, FrontendName, ServiceKey, ServiceValue},
    sizes,
    stats::{Counter, DropReason, PENDING_SLOTS, Pending, PktCounter},
    tc_clients::{TC_CLIENTS_ENTRIES, TcClient, TcClientsReady},
};

/// Parser and translation counters. Writer: every program. Key: `u32` [`PktCounter`] index.
#[map]
pub static PKT_STATS_V1: PerCpuArray<Counter> = PerCpuArray::with_max_entries(PktCounter::COUNT, 0);

/// Drops by reason. Writer: every program. Key: `u32` [`DropReason`] index.
#[map]
pub static DROP_STATS_V1: PerCpuArray<Counter> =
    PerCpuArray::with_max_entries(DropReason::COUNT, 0);

/// Frontends and their backend slots. Writer: the agent. See `svc_common::service`.
#[map]
pub static SERVICES_V1: HashMap<ServiceKey, ServiceValue> =
    HashMap::with_max_entries(sizes::SERVICES, 0);

/// Backends by id. Writer: the agent. See `svc_common::service`.
#[map]
pub static BACKENDS_V1: HashMap<u32, Backend> = HashMap::with_max_entries(sizes::BACKENDS, 0);

/// Connection table of answered flows, forward and reply entries. Writer: the programs
/// (promotion from `CT_NEW_V1`). See `svc_common::conntrack`.
#[map]
pub static CT_V1: LruHashMap<CtKey, CtValue> = LruHashMap::with_max_entries(sizes::CT, 0);

/// Connection table of flows nothing has answered yet (same key and value as `CT_V1`), so
/// unanswered SYNs and datagrams never evict answered flows. Writer: the programs. See
/// `svc_common::conntrack`.
#[map]
pub static CT_NEW_V1: LruHashMap<CtKey, CtValue> = LruHashMap::with_max_entries(sizes::CT_NEW, 0);

/// `ClientIP` session affinity. Writer: the programs. See `svc_common::affinity`.
#[map]
pub static AFFINITY_V1: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::with_max_entries(sizes::AFFINITY, 0);

/// Per-frontend (service port) packets and bytes, per CPU. Writers of entries: the programs
/// (the first packet of a new flow creates the entry, every translated packet adds) and the
/// agent (deletes the entry with the frontend). Key: frontend id. No preallocation: memory
/// only for ids that carried a flow.
#[map]
pub static SVC_STATS_V1: PerCpuHashMap<u32, Counter> =
    PerCpuHashMap::with_max_entries(sizes::SERVICES, BPF_F_NO_PREALLOC);

/// Who each backend is (`namespace/name` of its Pod), for `svc-agent inspect`. Writer: the
/// agent; no program reads it (declared here so it is created and pinned with the others).
/// Key: backend id. No preallocation: memory only for backends that have a name.
#[map]
pub static BACKEND_NAMES_V1: HashMap<u32, BackendName> =
    HashMap::with_max_entries(sizes::BACKENDS, BPF_F_NO_PREALLOC);

/// Which Service port each frontend is (`namespace/name` of the Service and the port's name),
/// for `svc-agent inspect`. Writer: the agent; no program reads it (declared here so it is
/// created and pinned with the others). Key: frontend id. No preallocation: memory only for
/// frontends programmed.
#[map]
pub static FRONTEND_NAMES_V1: HashMap<u32, FrontendName> =
    HashMap::with_max_entries(sizes::SERVICES, BPF_F_NO_PREALLOC);

/// The next frontend and backend ids the agent hands out, so a restarted agent does not
/// reissue an id the other maps may still name (`svc_common::ids`). Writer: the agent; no
/// program reads it (declared here so it is created and pinned with the others). Key: `u32`
/// index (`ids::FRONTEND`, `ids::BACKEND`).
#[map]
pub static ID_CURSORS_V1: Array<IdCursor> = Array::with_max_entries(ids::COUNT, 0);

/// Per-backend packets and bytes, per CPU; managed like `SVC_STATS_V1`. Key: backend id.
#[map]
pub static BACKEND_STATS_V1: PerCpuHashMap<u32, Counter> =
    PerCpuHashMap::with_max_entries(sizes::BACKENDS, BPF_F_NO_PREALLOC);

/// Packets of established flows not yet added to `SVC_STATS_V1` / `BACKEND_STATS_V1`, per CPU:
/// a write-back cache of [`PENDING_SLOTS`] (frontend, backend) pairs. Writer: the programs;
/// read by `inspect`, which adds it to the per-id sums. See `svc_common::stats::Pending`.
#[map]
pub static PENDING_STATS_V1: PerCpuArray<Pending> = PerCpuArray::with_max_entries(PENDING_SLOTS, 0);

/// Frontend and backend addresses: the pod programs' first test. Writer: the agent. See
/// `svc_common::addrs`. No preallocation: memory follows the addresses in use.
#[map]
pub static ADDRS_V1: HashMap<AddrKey, AddrValue> =
    HashMap::with_max_entries(sizes::ADDRS, BPF_F_NO_PREALLOC);

/// Later fragments of translated datagrams follow their first. Writer and reader: the pod
/// programs. See `svc_common::frag`.
#[map]
pub static FRAG_V1: LruHashMap<FragKey, FragValue> = LruHashMap::with_max_entries(FRAG_ENTRIES, 0);

/// The node's SNAT address per family and the SNAT port range. Writer: the agent (at start).
/// Key: `u32` (`svc_common::nat::SNAT_V4`, `SNAT_V6`). See `svc_common::nat`.
#[map]
pub static SNAT_CONFIG_V1: Array<SnatConfig> = Array::with_max_entries(SNAT_CONFIG_ENTRIES, 0);

/// Source NAT of external flows to remote endpoints: reply tuple -> client. Writer: the
/// node-facing program (new flows); the agent removes the entries of ended flows. Not LRU: a
/// live flow's entry is never evicted; a full table drops new flows. See `svc_common::nat`.
#[map]
pub static SNAT_V1: HashMap<CtKey, SnatValue> =
    HashMap::with_max_entries(sizes::SNAT, BPF_F_NO_PREALLOC);

/// Maglev lookup tables of external frontends, in chunks of 64 backend ids. Writer: the agent.
/// See `svc_common::maglev`.
#[map]
pub static MAGLEV_V1: HashMap<MaglevKey, MaglevChunk> =
    HashMap::with_max_entries(sizes::MAGLEV, BPF_F_NO_PREALLOC);

/// `loadBalancerSourceRanges`: which clients may open new flows to a load balancer IP (longest
/// prefix match over the frontend and the client's address). Writer: the agent. No
/// preallocation (the kernel requires it of LPM tries). See `svc_common::ranges`.
#[map]
pub static SOURCE_RANGES_V1: LpmTrie<SourceRangeKey, SourceRangeValue> =
    LpmTrie::with_max_entries(SOURCE_RANGES_ENTRIES, BPF_F_NO_PREALLOC);

/// Pods the TC programs translated a flow for (by pod-facing interface): replies to any other
/// pod skip conntrack. Writer: the pod program (a pod's new flow); the agent at start. See
/// `svc_common::tc_clients`.
#[map]
pub static TC_CLIENTS_V1: LruHashMap<u32, TcClient> =
    LruHashMap::with_max_entries(TC_CLIENTS_ENTRIES, 0);

/// Whether `TC_CLIENTS_V1` names every pod with a translated flow (key `0u32`). Writer: the
/// agent, once it recorded the pods of the conntrack entries an older build left. See
/// `svc_common::tc_clients`.
#[map]
pub static TC_CLIENTS_READY_V1: Array<TcClientsReady> = Array::with_max_entries(1, 0);
