//! Source NAT of external flows to remote endpoints, the agent's part (the programs' part and
//! the maps are described in `svc_common::nat`):
//! - the port range (`--snat-port-range`) is reserved on the node
//!   (`net.ipv4.ip_local_reserved_ports`, which covers IPv6 too), so the node's own
//!   `connect()`s never take a port an SNAT'd flow's replies come back to;
//! - `SNAT_CONFIG_V1` follows the node's addresses: the SNAT address of each family is the
//!   node's first `InternalIP` of the family (its first `ExternalIP` without one; none: SNAT
//!   of that family is off and such flows are dropped, counted `nat_no_address`);
//! - entries of ended flows leave `SNAT_V1`: a thread looks at each entry's flow (its reply
//!   entry in `CT_V1` or `CT_NEW_V1`) and removes the entries whose flow is gone or idle past
//!   its timeout, pass after pass, pausing between passes ten times as long as the last pass
//!   took, within [`GC_PAUSE_MIN`]..[`GC_PAUSE_MAX`] (see [`gc_pause`]). The table is not LRU,
//!   so without this it would fill; and a closed flow's port is free again only once its
//!   entry is gone, so the pause bounds new connections per endpoint.

use std::{
    fs,
    ops::RangeInclusive,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, bail};
use aya::{
    Ebpf,
    maps::{Array, HashMap as BpfHashMap, MapData},
};
use svc_common::{
    addr::Addr,
    conntrack::{CtKey, CtValue, dir, idle_timeout_ns, state},
    nat::{DEFAULT_PORT_MAX, DEFAULT_PORT_MIN, SNAT_V4, SNAT_V6, SnatConfig, SnatValue},
};
use tracing::{info, warn};

use super::render::map_addr;
use crate::model::{NodeAddress, NodeAddressKind};

/// The shortest pause between two passes over `SNAT_V1` (a small table).
pub const GC_PAUSE_MIN: Duration = Duration::from_secs(1);
/// The longest pause between two passes over `SNAT_V1` (a table whose pass takes a second or
/// more).
pub const GC_PAUSE_MAX: Duration = Duration::from_secs(10);

/// The pause after a pass over `SNAT_V1` that took `pass`: ten times as long, so the thread
/// spends at most a tenth of its time walking the table, within [`GC_PAUSE_MIN`] and
/// [`GC_PAUSE_MAX`]. A port is held from its flow's close (plus the 2 s grace) until the
/// next pass: with a small table, about a second, not ten.
#[must_use]
pub fn gc_pause(pass: Duration) -> Duration {
    pass.saturating_mul(10).clamp(GC_PAUSE_MIN, GC_PAUSE_MAX)
}

/// The sysctl holding the ports the node's automatic port choice skips (both families), below
/// `/proc/sys/net` (`--proc-sys-net`: a container sees the host's at a mount of its own).
const RESERVED_PORTS: &str = "ipv4/ip_local_reserved_ports";

/// The SNAT port range (`--snat-port-range`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortRange(pub RangeInclusive<u16>);

impl Default for PortRange {
    fn default() -> Self {
        Self(DEFAULT_PORT_MIN..=DEFAULT_PORT_MAX)
    }
}

impl PortRange {
    /// Parses `MIN-MAX` (both in 1024..=65535, MIN <= MAX).
    ///
    /// # Errors
    /// Says what is wrong with the text.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let Some((min, max)) = text.trim().split_once('-') else {
            bail!("{text:?}: expected MIN-MAX, such as 61000-65535");
        };
        let port = |p: &str| -> anyhow::Result<u16> {
            let n: u16 = p
                .trim()
                .parse()
                .with_context(|| format!("{p:?} is not a port"))?;
            if n < 1024 {
                bail!("{n}: SNAT ports start at 1024 (below are the node's well-known ports)");
            }
            Ok(n)
        };
        let (min, max) = (port(min)?, port(max)?);
        if min > max {
            bail!("{min}-{max}: the first port is above the last");
        }
        Ok(Self(min..=max))
    }
}

/// `SNAT_CONFIG_V1`'s two entries for a node with `addresses` and the range `ports`.
#[must_use]
pub fn configs(addresses: &[NodeAddress], ports: &PortRange) -> [SnatConfig; 2] {
    let pick = |v6: bool| {
        let of = |kind| {
            addresses
                .iter()
                .find(|a| a.kind == kind && a.addr.is_ipv6() == v6)
        };
        of(NodeAddressKind::InternalIp).or_else(|| of(NodeAddressKind::ExternalIp))
    };
    [false, true].map(|v6| match pick(v6) {
        Some(a) => SnatConfig {
            addr: map_addr(a.addr).0,
            port_min: *ports.0.start(),
            port_max: *ports.0.end(),
            enabled: 1,
            _pad: [0; 3],
        },
        None => SnatConfig::default(),
    })
}

/// `ip_local_reserved_ports` with `ports` added (unchanged when some entry covers them).
#[must_use]
pub fn reserved_with(current: &str, ports: &PortRange) -> Option<String> {
    let (min, max) = (*ports.0.start(), *ports.0.end());
    let covered = current.trim().split(',').any(|entry| {
        let entry = entry.trim();
        let (a, b) = entry.split_once('-').unwrap_or((entry, entry));
        matches!((a.parse::<u16>(), b.parse::<u16>()), (Ok(a), Ok(b)) if a <= min && max <= b)
    });
    if covered {
        return None;
    }
    let range = if min == max {
        min.to_string()
    } else {
        format!("{min}-{max}")
    };
    Some(if current.trim().is_empty() {
        range
    } else {
        format!("{},{range}", current.trim())
    })
}

/// Reserves `ports` on this node (network namespace) so its own sockets never pick them, in
/// `proc_sys_net` (`/proc/sys/net`, or where a container has the host's mounted).
///
/// # Errors
/// When the sysctl cannot be read or written.
pub fn reserve_ports(proc_sys_net: &Path, ports: &PortRange) -> anyhow::Result<()> {
    let path = proc_sys_net.join(RESERVED_PORTS);
    let current =
        fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    if let Some(wanted) = reserved_with(&current, ports) {
        fs::write(&path, &wanted).with_context(|| format!("writing {}", path.display()))?;
        info!(reserved = %wanted, "SNAT ports reserved for this node's own sockets (ip_local_reserved_ports)");
    }
    Ok(())
}

/// [`reserve_ports`], with a warning when it fails (SNAT still works; a node socket that picks
/// one of the ports may then see the replies of an SNAT'd flow).
pub fn reserve_ports_or_warn(proc_sys_net: &Path, ports: &PortRange) {
    if let Err(e) = reserve_ports(proc_sys_net, ports) {
        warn!(error = %format!("{e:#}"), "could not reserve the SNAT ports: a node socket that picks one may see replies of an SNAT'd flow");
    }
}

/// How long after a TCP flow closed (both FINs, or a reset) its SNAT port is kept, for the last
/// ACKs and retransmitted FINs; then the port is free for new flows (rather than after the
/// conntrack entry's whole closing timeout: a port held per closed connection bounds the new
/// connections per second to one endpoint).
pub const CLOSED_GRACE_NS: u64 = 2_000_000_000;

/// Whether the `SNAT_V1` entry `key` (endpoint -> SNAT address and port) / `value` (client)
/// belongs to a flow that ended: its reply entry (endpoint -> client), looked up with `flow`
/// (answered table first, then unanswered: `(entry, unanswered)`), is gone, idle past its
/// timeout at `now`, closed for [`CLOSED_GRACE_NS`], or now holds another port (the tuple's
/// flow took a new one: this entry is an older flow's).
pub fn ended(
    key: &CtKey,
    value: &SnatValue,
    now: u64,
    flow: impl Fn(&CtKey) -> Option<(CtValue, bool)>,
) -> bool {
    let reply = CtKey {
        dst: value.client,
        dport: value.client_port,
        dir: dir::REPLY,
        ..*key
    };
    match flow(&reply) {
        None => true,
        Some((entry, unanswered)) => {
            let idle = now.saturating_sub(entry.last_seen_ns);
            entry.snat_port != key.dport
                || idle > idle_timeout_ns(unanswered, key.proto, entry.state)
                || (entry.state & state::CLOSING != 0 && idle > CLOSED_GRACE_NS)
        }
    }
}

/// `SNAT_CONFIG_V1` and `SNAT_V1` with the connection tables, for the agent.
pub struct Snat {
    config: Array<MapData, SnatConfig>,
    ports: PortRange,
    written: Option<[SnatConfig; 2]>,
}

impl Snat {
    /// Takes `SNAT_CONFIG_V1` out of `ebpf` and starts the thread that removes ended flows'
    /// entries from `SNAT_V1` (through descriptors of its own).
    ///
    /// # Errors
    /// When a map is missing or the thread cannot start.
    pub fn start(ebpf: &mut Ebpf, ports: PortRange) -> anyhow::Result<Self> {
        let config = ebpf
            .take_map("SNAT_CONFIG_V1")
            .context("no map SNAT_CONFIG_V1 in the object")?;
        let config = Array::try_from(config).context("SNAT_CONFIG_V1")?;
        let table = ebpf
            .take_map("SNAT_V1")
            .context("no map SNAT_V1 in the object")?;
        let table: BpfHashMap<MapData, CtKey, SnatValue> =
            BpfHashMap::try_from(table).context("SNAT_V1")?;
        let ct = shared(ebpf, "CT_V1")?;
        let ct_new = shared(ebpf, "CT_NEW_V1")?;
        let tables = Arc::new(Mutex::new((table, ct, ct_new)));
        std::thread::Builder::new()
            .name("svc-snat-gc".into())
            .spawn(move || {
                let mut pause = GC_PAUSE_MAX;
                loop {
                    std::thread::sleep(pause);
                    let Ok(mut guard) = tables.lock() else { return };
                    let (table, ct, ct_new) = &mut *guard;
                    let began = std::time::Instant::now();
                    if let Err(e) = collect(table, ct, ct_new) {
                        warn!(error = %format!("{e:#}"), "removing ended flows from SNAT_V1 failed");
                    }
                    pause = gc_pause(began.elapsed());
                }
            })
            .context("starting the SNAT_V1 thread")?;
        Ok(Self {
            config,
            ports,
            written: None,
        })
    }

    /// Writes `SNAT_CONFIG_V1` for a node with `addresses`, when it changed.
    pub fn follow(&mut self, addresses: &[NodeAddress]) {
        let wanted = configs(addresses, &self.ports);
        if self.written == Some(wanted) {
            return;
        }
        for (index, config) in [SNAT_V4, SNAT_V6].into_iter().zip(&wanted) {
            if let Err(e) = self.config.set(index, config, 0) {
                warn!(error = %e, "writing SNAT_CONFIG_V1 failed; retried on the next pass");
                return;
            }
        }
        let show = |c: &SnatConfig, v6: bool| -> String {
            if c.enabled == 0 {
                return "none".to_owned();
            }
            shown(&c.addr, v6)
        };
        info!(
            v4 = %show(&wanted[0], false),
            v6 = %show(&wanted[1], true),
            ports = %format!("{}-{}", self.ports.0.start(), self.ports.0.end()),
            "SNAT addresses for external flows to other nodes' endpoints"
        );
        self.written = Some(wanted);
    }
}

fn shown(addr: &Addr, v6: bool) -> String {
    if v6 {
        std::net::Ipv6Addr::from(*addr).to_string()
    } else {
        std::net::Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]).to_string()
    }
}

/// The LRU hash map `name` of `ebpf` through a descriptor of its own (the object keeps it).
fn shared(ebpf: &Ebpf, name: &str) -> anyhow::Result<BpfHashMap<MapData, CtKey, CtValue>> {
    use std::os::fd::AsFd as _;
    let Some(aya::maps::Map::LruHashMap(data)) = ebpf.map(name) else {
        bail!("no LRU hash map {name} in the object");
    };
    let fd = data
        .fd()
        .as_fd()
        .try_clone_to_owned()
        .with_context(|| format!("duplicating the descriptor of {name}"))?;
    let map = aya::maps::Map::LruHashMap(MapData::from_fd(fd)?);
    BpfHashMap::try_from(map).with_context(|| name.to_owned())
}

/// One pass over `SNAT_V1`: removes the entries of ended flows. Returns how many.
fn collect(
    table: &mut BpfHashMap<MapData, CtKey, SnatValue>,
    ct: &BpfHashMap<MapData, CtKey, CtValue>,
    ct_new: &BpfHashMap<MapData, CtKey, CtValue>,
) -> anyhow::Result<usize> {
    let now = crate::inspect::ct::monotonic_ns()?;
    let flow = |key: &CtKey| {
        ct.get(key, 0)
            .ok()
            .map(|v| (v, false))
            .or_else(|| ct_new.get(key, 0).ok().map(|v| (v, true)))
    };
    let gone: Vec<CtKey> = table
        .iter()
        .filter_map(Result::ok)
        .filter(|(k, v)| ended(k, v, now, flow))
        .map(|(k, _)| k)
        .collect();
    let mut removed = 0;
    for key in &gone {
        if table.remove(key).is_ok() {
            removed += 1;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;

    fn addr(ip: &str, kind: NodeAddressKind) -> NodeAddress {
        NodeAddress {
            addr: ip.parse().unwrap(),
            kind,
        }
    }

    #[test]
    fn gc_pauses_ten_times_the_pass_within_bounds() {
        assert_eq!(gc_pause(Duration::ZERO), GC_PAUSE_MIN);
        assert_eq!(gc_pause(Duration::from_millis(30)), GC_PAUSE_MIN);
        assert_eq!(gc_pause(Duration::from_millis(300)), Duration::from_secs(3));
        assert_eq!(gc_pause(Duration::from_secs(2)), GC_PAUSE_MAX);
        assert_eq!(gc_pause(Duration::MAX), GC_PAUSE_MAX);
    }

    #[test]
    fn port_ranges_parse_and_say_what_is_wrong() {
        assert_eq!(
            PortRange::parse("61000-65535").unwrap(),
            PortRange::default()
        );
        assert_eq!(
            PortRange::parse(" 40000 - 40010 ").unwrap().0,
            40000..=40010
        );
        for (text, says) in [
            ("61000", "expected MIN-MAX"),
            ("80-90", "start at 1024"),
            ("5000-4000", "above the last"),
            ("x-4000", "not a port"),
        ] {
            let e = format!("{:#}", PortRange::parse(text).unwrap_err());
            assert!(e.contains(says), "{text}: {e}");
        }
    }

    #[test]
    fn snat_addresses_are_the_first_internal_ip_of_each_family() {
        let ports = PortRange::default();
        let c = configs(
            &[
                addr("198.18.0.1", NodeAddressKind::InternalIp),
                addr("198.18.0.2", NodeAddressKind::InternalIp),
                addr("198.18.9.1", NodeAddressKind::ExternalIp),
                addr("2001:db8::9", NodeAddressKind::ExternalIp),
            ],
            &ports,
        );
        assert_eq!(c[0].enabled, 1);
        assert_eq!(&c[0].addr[..4], &[198, 18, 0, 1]);
        assert_eq!((c[0].port_min, c[0].port_max), (61000, 65535));
        assert_eq!(c[1].enabled, 1, "an ExternalIP when there is no InternalIP");
        let v6: IpAddr = "2001:db8::9".parse().unwrap();
        assert_eq!(c[1].addr, map_addr(v6).0);
        assert_eq!(configs(&[], &ports), [SnatConfig::default(); 2]);
    }

    #[test]
    fn the_range_is_added_to_the_reserved_ports_unless_covered() {
        let ports = PortRange::default();
        assert_eq!(reserved_with("\n", &ports).as_deref(), Some("61000-65535"));
        assert_eq!(
            reserved_with("30000-32767\n", &ports).as_deref(),
            Some("30000-32767,61000-65535")
        );
        assert_eq!(reserved_with("30000-32767,60000-65535\n", &ports), None);
        let one = PortRange(40000..=40000);
        assert_eq!(reserved_with("40000", &one), None);
        assert_eq!(reserved_with("", &one).as_deref(), Some("40000"));
    }

    #[test]
    fn an_entry_ends_with_its_flow() {
        let key = CtKey {
            src: [1; 16],
            dst: [2; 16],
            sport: svc_common::Be16(80),
            dport: svc_common::Be16(61_000),
            proto: svc_common::net::ipproto::TCP,
            family: svc_common::addr::FAMILY_V4,
            dir: dir::REPLY,
            _pad: 0,
        };
        let value = SnatValue {
            client: [3; 16],
            client_port: svc_common::Be16(5555),
            ..SnatValue::default()
        };
        let now = 100 * 1_000_000_000;
        let seen = |last_seen_ns, st| CtValue {
            last_seen_ns,
            state: st,
            snat_port: svc_common::Be16(61_000),
            ..CtValue::default()
        };
        // The flow is looked up by its reply tuple: endpoint -> client.
        let asked = std::cell::RefCell::new(None);
        assert!(ended(&key, &value, now, |k| {
            *asked.borrow_mut() = Some(*k);
            None
        }));
        let asked = asked.into_inner().unwrap();
        assert_eq!((asked.src, asked.dst), ([1; 16], [3; 16]));
        assert_eq!(
            (asked.sport.0, asked.dport.0, asked.dir),
            (80, 5555, dir::REPLY)
        );
        assert!(!ended(&key, &value, now, |_| Some((
            seen(now - 1_000_000_000, 0),
            false
        ))));
        // Closed: kept 2 s for the last ACKs, then free (not the closing timeout's 10 s).
        let just_closed = seen(now - 1_000_000_000, state::CLOSING);
        assert!(!ended(&key, &value, now, |_| Some((just_closed, false))));
        let closed = seen(now - 3_000_000_000, state::CLOSING);
        assert!(ended(&key, &value, now, |_| Some((closed, false))));
        // The tuple's flow holds another port now: this entry is an older flow's.
        let moved = CtValue {
            snat_port: svc_common::Be16(61_001),
            ..seen(now, 0)
        };
        assert!(ended(&key, &value, now, |_| Some((moved, false))));
        // Unanswered: 60 s.
        let syn = seen(now - 30_000_000_000, 0);
        assert!(!ended(&key, &value, now, |_| Some((syn, true))));
        let old_syn = seen(now - 61_000_000_000, 0);
        assert!(ended(&key, &value, now, |_| Some((old_syn, true))));
    }
}
