//! `svc-agent inspect trace`: the decision the kernel programs would take for one packet,
//! walked step by step over the live maps (works with the agent stopped).
//!
//! The walk mirrors the TC programs: `svc_tc_from_pod` (`svc-ebpf/src/pod.rs`) for a packet
//! from a pod or process of this node, `svc_tc_from_world` (`svc-ebpf/src/world.rs`) for one
//! arriving on a node-facing interface (from outside). The steps, in the kernel's order:
//! address test (`ADDRS_V1`) -> (from outside: the reply of an SNAT'd flow) -> connection
//! tables (`CT_V1`, then `CT_NEW_V1`) -> (a new flow from outside: source ranges) -> frontend
//! (`SERVICES_V1` slot 0) -> slots -> `ClientIP` affinity -> choice (Maglev for external
//! frontends, a hash of the tuple for a TCP packet that lost its entry, else random: "one of
//! N") -> reply tuple claim -> SNAT -> rewrite. Each check is one step with a short result and
//! a sentence; the verdict is `translated`, `rejected`, `dropped` (with the kernel's drop
//! reason) or `passed`.
//!
//! [`trace`] is pure: it reads the maps only through [`TraceMaps`] (point lookups, as the
//! programs make them), so the unit tests below drive every branch over in-memory maps;
//! [`pinned::PinnedMaps`] is the thin reader over the pins.

use std::{
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
};

use serde::{Deserialize, Serialize};
use svc_common::{
    Be16,
    addr::Addr,
    addrs::{AddrKey, addr_flags},
    affinity::{AffinityKey, AffinityValue, fingerprint},
    conntrack::{CtKey, CtValue, dir, flow_hash, idle_timeout_ns, reply_key, state},
    maglev::{CHUNK, MaglevChunk, MaglevKey, locate},
    nat::{PORT_TRIES, SnatConfig, SnatValue, candidate_port},
    net::ipproto,
    ranges::{SourceRangeKey, verdict},
    service::{Backend, ServiceKey, ServiceValue, backend_flags, flags, scope},
    stats::DropReason,
};

use super::{
    Format, fmt_addr, ip, kind_name,
    output::{self, Table},
    proto_name,
};
use crate::datapath::render::map_addr;

pub mod pinned;
mod walk;

use self::walk::{Pkt, Walk};

/// The largest Maglev table the agent writes (`--maglev-table-size` <= 65,521): chunks a
/// table can have.
const MAGLEV_CHUNKS: u32 = crate::datapath::maglev::MAX_SIZE.div_ceil(CHUNK);

/// What the walk reads, one lookup at a time, as the programs do. Implemented over the pins
/// ([`pinned::PinnedMaps`]) and, in tests, over in-memory maps.
pub trait TraceMaps {
    /// `ADDRS_V1` flags of an address (0: none).
    fn addr_flags(&self, key: &AddrKey) -> u32;
    /// A `SERVICES_V1` entry.
    fn service(&self, key: &ServiceKey) -> Option<ServiceValue>;
    /// Every frontend (slot 0 entry) of `SERVICES_V1`.
    fn frontends(&self) -> Vec<(ServiceKey, ServiceValue)>;
    /// A `BACKENDS_V1` entry.
    fn backend(&self, id: u32) -> Option<Backend>;
    /// `BACKEND_NAMES_V1`: the Pod behind a backend id.
    fn backend_name(&self, id: u32) -> Option<String>;
    /// `FRONTEND_NAMES_V1`: the Service (`namespace/name`) and port name of a frontend id.
    fn frontend_name(&self, id: u32) -> Option<(String, String)>;
    /// An entry of `CT_NEW_V1` (`unanswered`) or `CT_V1`.
    fn ct(&self, unanswered: bool, key: &CtKey) -> Option<CtValue>;
    /// An `AFFINITY_V1` entry.
    fn affinity(&self, key: &AffinityKey) -> Option<AffinityValue>;
    /// A `MAGLEV_V1` chunk.
    fn maglev(&self, key: &MaglevKey) -> Option<MaglevChunk>;
    /// `SOURCE_RANGES_V1`'s verdict for a full-length lookup (the longest matching prefix);
    /// `None` when nothing matches.
    fn source_range(&self, key: &SourceRangeKey) -> Option<u32>;
    /// `SNAT_CONFIG_V1` of a family.
    fn snat_config(&self, family: u8) -> Option<SnatConfig>;
    /// An `SNAT_V1` entry.
    fn snat(&self, key: &CtKey) -> Option<SnatValue>;
    /// Whether connect-time programs are attached (cgroup links pinned).
    fn socket_programs(&self) -> bool;
}

/// The packet to trace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Packet {
    /// Its source address.
    pub src: IpAddr,
    /// Its source port; `None`: any (a new flow's, whose port is not known yet).
    pub sport: Option<u16>,
    /// Its destination.
    pub dst: SocketAddr,
    /// `ipproto::TCP` or `ipproto::UDP`.
    pub proto: u8,
    /// It arrives on a node-facing interface (a client outside the cluster): the external
    /// scope; otherwise it comes from a pod or process of this node.
    pub from_outside: bool,
    /// TCP: a SYN without ACK (opening a connection); otherwise any later segment.
    pub syn: bool,
}

impl Packet {
    /// Checks what the kernel could never see: addresses of two families, port 0, another
    /// protocol.
    ///
    /// # Errors
    /// Says what is wrong.
    pub fn check(&self) -> anyhow::Result<()> {
        if self.src.is_ipv4() != self.dst.is_ipv4() {
            anyhow::bail!(
                "--from {} and --to {} are of different address families",
                self.src,
                self.dst
            );
        }
        if self.dst.port() == 0 || self.sport == Some(0) {
            anyhow::bail!("port 0 is not a port a packet can carry");
        }
        if self.proto != ipproto::TCP && self.proto != ipproto::UDP {
            anyhow::bail!("only TCP and UDP are translated");
        }
        Ok(())
    }
}

/// What `--from ADDR[:PORT]` holds: an address, and a port when given (`[v6]:port` for IPv6).
///
/// # Errors
/// Says what is expected.
pub fn parse_source(text: &str) -> Result<(IpAddr, Option<u16>), String> {
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Ok((ip, None));
    }
    text.parse::<SocketAddr>()
        .map(|s| (s.ip(), Some(s.port())))
        .map_err(|_| {
            format!(
                "{text:?} is not ADDR or ADDR:PORT (198.18.1.10, 198.18.1.10:40000, \
                 2001:db8::1, [2001:db8::1]:40000)"
            )
        })
}

/// What `--to ADDR:PORT` holds.
///
/// # Errors
/// Says what is expected.
pub fn parse_destination(text: &str) -> Result<SocketAddr, String> {
    text.parse::<SocketAddr>()
        .map_err(|_| format!("{text:?} is not ADDR:PORT (198.19.0.10:80, [2001:db8::10]:80)"))
}

/// One step of the walk (a JSON object of `steps`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Step {
    /// 1, 2, ...
    pub step: usize,
    /// What was looked at: `address`, `snat-reply`, `conntrack`, `source-ranges`, `frontend`,
    /// `slots`, `affinity`, `maglev`, `choice`, `reply-tuple`, `snat`, `socket`.
    pub check: String,
    /// Its outcome in a word or two (`hit`, `miss`, `found`, `one of 2`, ...).
    pub result: String,
    /// The sentence saying why.
    pub detail: String,
}

/// A frontend the walk met.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FrontendRef {
    /// Its id (slot 0's `id`).
    pub id: u32,
    /// `addr:port`.
    pub frontend: String,
    /// `TCP` or `UDP`.
    pub protocol: String,
    /// `internal` or `external`.
    pub scope: String,
    /// `ClusterIP`, `NodePort`, `ExternalIP` or `LoadBalancer`.
    #[serde(rename = "type")]
    pub kind: String,
    /// `namespace/name` of its Service (`FRONTEND_NAMES_V1`; null when unnamed).
    pub service: Option<String>,
    /// Its port's name.
    pub port_name: Option<String>,
}

/// A backend the walk met.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackendRef {
    /// Its id.
    pub id: u32,
    /// `addr:port` (empty when `BACKENDS_V1` does not hold it).
    pub endpoint: String,
    /// `namespace/name` of its Pod (`BACKEND_NAMES_V1`).
    pub pod: Option<String>,
    /// `ready`, `terminating`, or `missing` (not in `BACKENDS_V1`).
    pub state: String,
    /// It runs on this node.
    pub local: bool,
    /// The frontend's slot holding it, when it is in one.
    pub slot: Option<u16>,
}

/// A backend of the Service port that new flows of this frontend do not take, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Excluded {
    /// The backend.
    pub backend: BackendRef,
    /// Why it is in none of the frontend's slots.
    pub reason: String,
}

/// The source NAT an external flow to another node's endpoint gets.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SnatRef {
    /// The node's SNAT address (`SNAT_CONFIG_V1`).
    pub address: IpAddr,
    /// The SNAT port range.
    pub port_min: u16,
    /// Its last port.
    pub port_max: u16,
    /// The port the flow has (an established flow) or takes (a new one with a known source
    /// port); null when it depends on the source port.
    pub port: Option<u16>,
}

/// The packet as it leaves the program.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Rewritten {
    /// Its source (`addr:port`, or `addr` when the source port is not known).
    pub source: String,
    /// Its destination.
    pub destination: String,
}

/// The whole walk (the JSON object of `inspect trace -o json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Trace {
    /// `pod` (from a pod or process of this node: `svc_tc_from_pod`) or `outside` (arriving
    /// on a node-facing interface: `svc_tc_from_world`).
    pub path: String,
    /// `TCP` or `UDP`.
    pub protocol: String,
    /// TCP: `syn` (a SYN without ACK) or `ack` (any later segment); null for UDP.
    pub tcp_flags: Option<String>,
    /// The packet's source (`addr:port`, or `addr` without a port).
    pub source: String,
    /// Its destination, `addr:port`.
    pub destination: String,
    /// The steps, in the kernel's order.
    pub steps: Vec<Step>,
    /// `translated`, `rejected` (TCP reset / ICMP port unreachable sent back), `dropped` or
    /// `passed` (untouched).
    pub verdict: String,
    /// With `dropped`: the kernel's drop reason (`DROP_STATS_V1` name); with `rejected`: why
    /// (`no_endpoints`, `unlisted_port`).
    pub drop_reason: Option<String>,
    /// `established` (a connection-table entry decides), `new` (a backend is chosen), or
    /// null (not a Service's flow).
    pub flow: Option<String>,
    /// The frontend, when one matched.
    pub frontend: Option<FrontendRef>,
    /// The frontend's slots (what new flows choose from).
    pub slots: Vec<BackendRef>,
    /// Other backends of the same Service port the frontend's slots leave out, with why.
    pub excluded: Vec<Excluded>,
    /// The backend the packet goes to, when it is determined.
    pub backend: Option<BackendRef>,
    /// When the choice is random (or needs the source port): the backends it is one of.
    pub candidates: Vec<BackendRef>,
    /// The source NAT, when the flow gets one.
    pub snat: Option<SnatRef>,
    /// The rewritten packet, when it is determined.
    pub rewritten: Option<Rewritten>,
}

/// Walks the decision for `packet` at `now_ns` (`CLOCK_MONOTONIC`, the programs' clock).
#[must_use]
pub fn trace(maps: &impl TraceMaps, packet: &Packet, now_ns: u64) -> Trace {
    let p = Pkt::new(packet);
    let mut w = Walk {
        maps,
        p,
        now: now_ns,
        out: Trace {
            path: if packet.from_outside {
                "outside"
            } else {
                "pod"
            }
            .to_owned(),
            protocol: proto_name(p.proto).to_owned(),
            tcp_flags: (p.proto == ipproto::TCP)
                .then(|| if p.syn { "syn" } else { "ack" }.to_owned()),
            source: p.source(),
            destination: packet.dst.to_string(),
            steps: Vec::new(),
            verdict: String::new(),
            drop_reason: None,
            flow: None,
            frontend: None,
            slots: Vec::new(),
            excluded: Vec::new(),
            backend: None,
            candidates: Vec::new(),
            snat: None,
            rewritten: None,
        },
    };
    if packet.from_outside {
        w.world_path();
    } else {
        w.pod_path();
    }
    w.out
}

/// `inspect trace` in `format` (`wide` is `table`): a title line, the numbered steps, and the
/// verdict; or the JSON object.
///
/// # Errors
/// When JSON serialization fails.
pub fn format_trace(t: &Trace, format: Format) -> anyhow::Result<String> {
    if format == Format::Json {
        let mut text = serde_json::to_string_pretty(t)?;
        text.push('\n');
        return Ok(text);
    }
    let flags = t
        .tcp_flags
        .as_deref()
        .map_or(String::new(), |f| format!(" {}", f.to_uppercase()));
    let from = if t.path == "outside" {
        "arriving on a node-facing interface (from outside the cluster)"
    } else {
        "from a pod or process of this node"
    };
    let mut out = format!(
        "trace {} -> {} {}{flags}, {from}\n",
        t.source, t.destination, t.protocol
    );
    let mut table = Table::new(&["STEP", "CHECK", "RESULT", "DETAIL"]);
    for s in &t.steps {
        table.row(vec![
            s.step.to_string(),
            s.check.clone(),
            s.result.clone(),
            s.detail.clone(),
        ]);
    }
    out.push_str(&table.render(&verdict_line(t)));
    Ok(out)
}

fn verdict_line(t: &Trace) -> String {
    let mut line = format!("verdict: {}", t.verdict);
    if let Some(r) = &t.drop_reason {
        let _ = write!(line, " ({r})");
    }
    if let Some(rw) = &t.rewritten {
        let _ = write!(line, ": {} -> {}", rw.source, rw.destination);
    } else if !t.candidates.is_empty() {
        let list: Vec<String> = t
            .candidates
            .iter()
            .map(|c| match &c.pod {
                Some(pod) => format!("{} ({pod})", c.endpoint),
                None => c.endpoint.clone(),
            })
            .collect();
        let _ = write!(
            line,
            ": to one of {} ({})",
            output::count(t.candidates.len(), "backend", "backends"),
            list.join(", ")
        );
    }
    if let Some(b) = &t.backend
        && let Some(pod) = &b.pod
    {
        let _ = write!(line, " [{pod}]");
    }
    line
}

#[cfg(test)]
mod tests;
