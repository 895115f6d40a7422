//! Following the interfaces the TC programs go on as they appear, change and disappear
//! (netlink link events), each in its role.
//!
//! An interface has one of two roles, decided from its name by two lists of patterns
//! ([`RolePatterns`]): **pod-facing** (`--pod-ifaces`: the host end of a pod's veth; programs
//! `svc_tc_from_pod` on ingress, `svc_tc_to_pod` on egress) or **node-facing** (`--node-ifaces`:
//! the node's uplinks; `svc_tc_from_world` on ingress, `svc_tc_to_world` on egress). A name that
//! matches both lists is node-facing (an uplink that also matches a pod pattern must not get the
//! pod programs), said once per name with a warning. One watch, one tracker and one set of
//! links serve both roles: the role only picks the programs.
//!
//! [`IfaceWatch`] joins the rtnetlink link group (`RTNLGRP_LINK`) of the calling thread's
//! network namespace first and lists the links (an `RTM_GETLINK` dump on a second socket)
//! second, so a link created in between is seen at least once: in the listing, as an event or
//! both. [`IfaceTracker`] turns the listing and the events into [`IfaceEvent`]s for the links
//! whose names give them a role, keyed by ifindex: the kernel sends `RTM_NEWLINK` for every
//! flag, carrier or address change, and again for links the listing already showed, and those
//! give no event. When the event socket overflows (`ENOBUFS`: events were lost) the watch lists
//! again and diffs what it knew against the listing, like a relist in kube-rs, so a lost event
//! delays a change but never hides it.
//!
//! [`IfaceLinks`] puts the two programs of its role on each interface of an
//! [`IfaceEvent::Appeared`], through TCX links pinned at `links/tc/<ifindex>/{ingress,egress}`
//! (see `pins`; the role shows in which program a pinned link runs), so they stay attached when
//! the agent exits. A pin an earlier agent left on a hook where its link is still attached gets
//! this agent's program through `BPF_LINK_UPDATE` (aya's `attach_to_link`): the kernel swaps the
//! program in place, so every packet meets exactly one of the two, and the link keeps its pin
//! and its place among other TCX programs. The same update swaps the programs of an interface
//! renamed into the other role (and takes over an earlier agent's link of the other role). A
//! pin whose link is no longer attached there (the interface was deleted and its ifindex reused
//! while no agent ran) is replaced by a new link. A hook that has this agent's program already
//! is left alone, so nothing is attached twice. Renamed out of both lists, an interface loses
//! its pins (and with them its programs); gone, its pins are removed (the kernel already
//! dropped the links from it). [`attach_listed`] does this for the interfaces there at startup
//! and then removes the pins of interfaces that vanished while no agent ran; [`follow`] does it
//! for every later event.
//!
//! Netlink comes from the rust-netlink family: `rtnetlink` 0.24 (the dump and the multicast
//! subscription), with its `netlink-packet-route` 0.34, `netlink-proto` 0.14 and `netlink-sys`
//! 0.9, all maintained together and building on stable Rust. Events and requests use separate
//! sockets: `netlink-proto` routes an incoming message to a pending request by sequence number,
//! and a notification carries the sequence number of whichever process caused it, so on a
//! shared socket it could land in the dump's reply stream.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    fmt, fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use aya::{
    Ebpf,
    programs::{
        LinkOrder, ProgramInfo, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, LinkType},
        tc::{SchedClassifierLink, TcAttachOptions},
        xdp::XdpLink,
    },
};
use futures_util::{StreamExt as _, TryStreamExt as _, stream::BoxStream};
use rtnetlink::{
    Handle, MulticastGroup,
    packet_core::{NetlinkMessage, NetlinkPayload},
    packet_route::{
        AddressFamily, RouteNetlinkMessage,
        link::{LinkAttribute, LinkMessage},
    },
    proto::sys::{AsyncSocket as _, SocketAddr},
};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::{
    loader::{
        IfacePatterns, PROG_TC_FROM_POD, PROG_TC_FROM_WORLD, PROG_TC_TO_POD, PROG_TC_TO_WORLD,
        PROG_XDP_FROM_WORLD,
    },
    pins::{self, PinnedTcLink, TcHook, TcPinAction, XdpAttach},
};

/// Receive buffer asked for the event socket (the kernel caps it at `net.core.rmem_max`). The
/// connection task drains it into a channel at once, so it only has to absorb bursts.
const EVENT_RCVBUF: usize = 4 << 20;

/// A failed listing is tried this many times before the watch gives up.
const LIST_ATTEMPTS: u32 = 3;

/// How long detaching from an interface renamed out of the patterns may take to show on its
/// hooks (the kernel releases an unpinned link asynchronously, normally within milliseconds).
const DETACH_TIMEOUT: Duration = Duration::from_secs(1);

/// The longest program name the kernel keeps (`BPF_OBJ_NAME_LEN` less the terminating NUL):
/// `svc_tc_from_world` is known to it as `svc_tc_from_wor`.
const KERNEL_PROG_NAME_LEN: usize = 15;

/// What a followed interface is for, which decides the two TC programs it carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IfaceRole {
    /// The host end of a pod's veth (`--pod-ifaces`): `svc_tc_from_pod` on ingress (packets
    /// from the pod), `svc_tc_to_pod` on egress (packets to it).
    PodFacing,
    /// One of the node's uplinks (`--node-ifaces`): `svc_tc_from_world` on ingress (packets
    /// from outside the node), `svc_tc_to_world` on egress (packets leaving it).
    NodeFacing,
}

impl IfaceRole {
    /// Both roles.
    pub const ALL: [Self; 2] = [Self::PodFacing, Self::NodeFacing];

    /// `pod-facing` or `node-facing`: how logs, docs and `inspect links` name the role.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::PodFacing => "pod-facing",
            Self::NodeFacing => "node-facing",
        }
    }

    /// The program this role puts on `hook`.
    #[must_use]
    pub const fn program(self, hook: TcHook) -> &'static str {
        match (self, hook) {
            (Self::PodFacing, TcHook::Ingress) => PROG_TC_FROM_POD,
            (Self::PodFacing, TcHook::Egress) => PROG_TC_TO_POD,
            (Self::NodeFacing, TcHook::Ingress) => PROG_TC_FROM_WORLD,
            (Self::NodeFacing, TcHook::Egress) => PROG_TC_TO_WORLD,
        }
    }

    /// The role's programs with their hooks, ingress first.
    #[must_use]
    pub const fn programs(self) -> [(&'static str, TcHook); 2] {
        [
            (self.program(TcHook::Ingress), TcHook::Ingress),
            (self.program(TcHook::Egress), TcHook::Egress),
        ]
    }

    /// The role and hook of a TC program, by its name as the kernel reports it (at most 15
    /// bytes, see [`KERNEL_PROG_NAME_LEN`]) or in full; `None` for any other program.
    #[must_use]
    pub fn of_program(name: &str) -> Option<(Self, TcHook)> {
        let kernel = |full: &'static str| &full[..full.len().min(KERNEL_PROG_NAME_LEN)];
        Self::ALL.into_iter().find_map(|role| {
            TcHook::ALL.into_iter().find_map(|hook| {
                let full = role.program(hook);
                (name == full || name == kernel(full)).then_some((role, hook))
            })
        })
    }
}

impl fmt::Display for IfaceRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The two pattern lists that give an interface its role by name (`--pod-ifaces`,
/// `--node-ifaces`).
#[derive(Clone, Debug)]
pub struct RolePatterns {
    pod: IfacePatterns,
    node: IfacePatterns,
}

impl RolePatterns {
    /// Pod-facing interfaces match `pod`, node-facing ones `node` (which may be empty: then no
    /// interface is node-facing).
    #[must_use]
    pub const fn new(pod: IfacePatterns, node: IfacePatterns) -> Self {
        Self { pod, node }
    }

    /// The role of an interface called `name` (`None`: neither list names it), and whether
    /// both lists match it (then it is node-facing).
    #[must_use]
    pub fn classify(&self, name: &str) -> (Option<IfaceRole>, bool) {
        match (self.pod.matches(name), self.node.matches(name)) {
            (true, true) => (Some(IfaceRole::NodeFacing), true),
            (false, true) => (Some(IfaceRole::NodeFacing), false),
            (true, false) => (Some(IfaceRole::PodFacing), false),
            (false, false) => (None, false),
        }
    }
}

/// One link's state as rtnetlink reports it, for links of this namespace only.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkChange {
    /// The link exists under this name (`RTM_NEWLINK`: created, renamed, moved here, or any
    /// other change of it; also every entry of a listing).
    Present {
        /// Interface index.
        index: u32,
        /// Interface name.
        name: String,
    },
    /// The link is no longer in this namespace (`RTM_DELLINK`: deleted or moved away).
    Removed {
        /// Interface index.
        index: u32,
    },
}

/// What the event socket delivered, translated.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Incoming {
    /// A change of a link.
    Link(LinkChange),
    /// Events were lost (`ENOBUFS`): the state must be listed again.
    Overrun,
    /// Anything else (bridge-port notifications, other message types): ignored.
    Other,
}

/// What happened to a followed interface: one whose name gives it a role.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IfaceEvent {
    /// An interface with a role is there: created, moved into the namespace, renamed into the
    /// patterns, or found by a listing.
    Appeared {
        /// Interface index.
        index: u32,
        /// Interface name.
        name: String,
        /// Its role.
        role: IfaceRole,
    },
    /// An interface with a role got another name that gives it a role (the same or the other).
    Renamed {
        /// Interface index.
        index: u32,
        /// The name it had.
        from: String,
        /// The name it has now.
        to: String,
        /// The role it had.
        from_role: IfaceRole,
        /// The role it has now.
        role: IfaceRole,
    },
    /// An interface with a role stopped having one.
    Disappeared {
        /// Interface index.
        index: u32,
        /// The name it had.
        name: String,
        /// The role it had.
        role: IfaceRole,
        /// `None` when the interface is gone (deleted or moved to another namespace); its new
        /// name, which no pattern matches, when it was renamed out of the patterns and still
        /// exists.
        renamed_to: Option<String>,
    },
}

impl IfaceEvent {
    /// The interface index the event is about.
    #[must_use]
    pub const fn index(&self) -> u32 {
        match self {
            Self::Appeared { index, .. }
            | Self::Renamed { index, .. }
            | Self::Disappeared { index, .. } => *index,
        }
    }

    /// The interface's name after the event (its last name when it is gone).
    #[must_use]
    pub fn name(&self) -> &str {
        match self {
            Self::Appeared { name, .. } | Self::Disappeared { name, .. } => name,
            Self::Renamed { to, .. } => to,
        }
    }

    /// The interface's role after the event (the role it had when it lost it).
    #[must_use]
    pub const fn role(&self) -> IfaceRole {
        match self {
            Self::Appeared { role, .. }
            | Self::Renamed { role, .. }
            | Self::Disappeared { role, .. } => *role,
        }
    }
}

/// `(ifindex, name)` of a link message that describes a link itself, `None` for anything else:
/// bridge-port messages (`AF_BRIDGE`: an `RTM_DELLINK` of that family only says a port left its
/// bridge) and messages without a name.
fn link_of(msg: &LinkMessage) -> Option<(u32, String)> {
    if msg.header.interface_family != AddressFamily::Unspec {
        return None;
    }
    msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(name) => Some((msg.header.index, name.clone())),
        _ => None,
    })
}

/// Translates a message from the event socket.
fn translate(msg: &NetlinkMessage<RouteNetlinkMessage>) -> Incoming {
    match &msg.payload {
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => link_of(link)
            .map_or(Incoming::Other, |(index, name)| {
                Incoming::Link(LinkChange::Present { index, name })
            }),
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(link))
            if link.header.interface_family == AddressFamily::Unspec =>
        {
            Incoming::Link(LinkChange::Removed {
                index: link.header.index,
            })
        }
        NetlinkPayload::Overrun(_) => Incoming::Overrun,
        _ => Incoming::Other,
    }
}

/// The interfaces with a role known so far, by ifindex: turns link changes and listings into
/// [`IfaceEvent`]s, each change of such an interface once. Pure apart from one warning per
/// name that both pattern lists match: no netlink, no eBPF.
#[derive(Clone, Debug)]
pub struct IfaceTracker {
    patterns: RolePatterns,
    known: BTreeMap<u32, (String, IfaceRole)>,
    /// Names both lists matched, each warned about once.
    overlapping: BTreeSet<String>,
}

impl IfaceTracker {
    /// A tracker that knows no interface yet.
    #[must_use]
    pub const fn new(patterns: RolePatterns) -> Self {
        Self {
            patterns,
            known: BTreeMap::new(),
            overlapping: BTreeSet::new(),
        }
    }

    /// The role of `name`; warns the first time a name matches both lists.
    fn role_of(&mut self, name: &str) -> Option<IfaceRole> {
        let (role, both) = self.patterns.classify(name);
        if both && self.overlapping.insert(name.to_owned()) {
            warn!(
                iface = %name,
                "the interface matches both --pod-ifaces and --node-ifaces: it is node-facing \
                 (narrow one of the lists to silence this)"
            );
        }
        role
    }

    /// The names both pattern lists matched so far (each warned about once).
    pub fn overlapping(&self) -> impl Iterator<Item = &str> {
        self.overlapping.iter().map(String::as_str)
    }

    /// Applies one link change; returns the event it makes, if any.
    pub fn apply(&mut self, change: LinkChange) -> Option<IfaceEvent> {
        match change {
            LinkChange::Present { index, name } => {
                let role = self.role_of(&name);
                match (self.known.get(&index), role) {
                    (None, Some(role)) => {
                        self.known.insert(index, (name.clone(), role));
                        Some(IfaceEvent::Appeared { index, name, role })
                    }
                    (None, None) => None,
                    (Some((known, _)), _) if *known == name => None,
                    (Some(_), Some(role)) => {
                        let (from, from_role) = self.known.insert(index, (name.clone(), role))?;
                        Some(IfaceEvent::Renamed {
                            index,
                            from,
                            to: name,
                            from_role,
                            role,
                        })
                    }
                    (Some(_), None) => {
                        let (old, role) = self.known.remove(&index)?;
                        Some(IfaceEvent::Disappeared {
                            index,
                            name: old,
                            role,
                            renamed_to: Some(name),
                        })
                    }
                }
            }
            LinkChange::Removed { index } => {
                self.known
                    .remove(&index)
                    .map(|(name, role)| IfaceEvent::Disappeared {
                        index,
                        name,
                        role,
                        renamed_to: None,
                    })
            }
        }
    }

    /// Replaces what is known with a full listing of the namespace's links: the events that
    /// bring the known state to the listing's (gone ones first, then renamed and new ones).
    pub fn resync<I>(&mut self, links: I) -> Vec<IfaceEvent>
    where
        I: IntoIterator<Item = (u32, String)>,
    {
        let listed: BTreeMap<u32, String> = links.into_iter().collect();
        let gone: Vec<u32> = self
            .known
            .keys()
            .filter(|index| !listed.contains_key(index))
            .copied()
            .collect();
        let mut events: Vec<IfaceEvent> = gone
            .into_iter()
            .filter_map(|index| self.apply(LinkChange::Removed { index }))
            .collect();
        events.extend(
            listed
                .into_iter()
                .filter_map(|(index, name)| self.apply(LinkChange::Present { index, name })),
        );
        events
    }

    /// Forgets interface `index`, so its next `RTM_NEWLINK` makes it appear again (used when
    /// attaching to it failed). Returns whether it was known.
    pub fn forget(&mut self, index: u32) -> bool {
        self.known.remove(&index).is_some()
    }

    /// The interfaces with a role known now: `(ifindex, name, role)`, by ifindex.
    pub fn matching(&self) -> impl Iterator<Item = (u32, &str, IfaceRole)> {
        self.known.iter().map(|(i, (n, r))| (*i, n.as_str(), *r))
    }
}

/// The netlink side: a subscription to link events of this network namespace plus a socket
/// for listings, turned into [`IfaceEvent`]s by an [`IfaceTracker`].
pub struct IfaceWatch {
    tracker: IfaceTracker,
    /// Messages from the event socket with their sender, as `rtnetlink` hands them over.
    events: BoxStream<'static, (NetlinkMessage<RouteNetlinkMessage>, SocketAddr)>,
    requests: Handle,
    connections: [JoinHandle<()>; 2],
    ready: VecDeque<IfaceEvent>,
}

impl std::fmt::Debug for IfaceWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IfaceWatch")
            .field("tracker", &self.tracker)
            .field("ready", &self.ready)
            .finish_non_exhaustive()
    }
}

impl IfaceWatch {
    /// Joins `RTNLGRP_LINK` in the calling thread's network namespace, then lists its links:
    /// those with a role come first out of [`IfaceWatch::next`] as [`IfaceEvent::Appeared`].
    /// Needs a tokio runtime (the two netlink connections run as tasks).
    pub async fn start(patterns: RolePatterns) -> anyhow::Result<Self> {
        let (mut conn, _, events) = rtnetlink::new_multicast_connection(&[MulticastGroup::Link])
            .context("joining the rtnetlink link group (RTNLGRP_LINK)")?;
        if let Err(e) = conn.socket_mut().socket_ref().set_rx_buf_sz(EVENT_RCVBUF) {
            debug!(error = %e, "could not enlarge the netlink event socket's buffer");
        }
        let events_task = tokio::spawn(conn);
        // From here on every link change is queued on `events`: the listing below can only be
        // older than what follows it there.
        let (conn, requests, _) =
            rtnetlink::new_connection().context("opening an rtnetlink socket")?;
        let requests_task = tokio::spawn(conn);
        let mut watch = Self {
            tracker: IfaceTracker::new(patterns),
            events: events.boxed(),
            requests,
            connections: [events_task, requests_task],
            ready: VecDeque::new(),
        };
        watch.relist().await?;
        let count = |role| watch.ready.iter().filter(|e| e.role() == role).count();
        info!(
            matching = watch.ready.len(),
            pod_facing = count(IfaceRole::PodFacing),
            node_facing = count(IfaceRole::NodeFacing),
            "following pod-facing interfaces and node-facing interfaces (rtnetlink link events)"
        );
        Ok(watch)
    }

    /// The next change of a followed interface. Fails only when netlink does (the event
    /// connection closed, listings keep failing); the watch is of no further use then.
    pub async fn next(&mut self) -> anyhow::Result<IfaceEvent> {
        loop {
            if let Some(event) = self.ready.pop_front() {
                return Ok(event);
            }
            let Some((msg, _)) = self.events.next().await else {
                bail!("the rtnetlink link event connection closed");
            };
            match translate(&msg) {
                Incoming::Link(change) => self.ready.extend(self.tracker.apply(change)),
                Incoming::Overrun => {
                    warn!("link events were lost (netlink socket buffer full): listing again");
                    self.relist().await?;
                }
                Incoming::Other => {}
            }
        }
    }

    /// Forgets interface `index` so its next link event makes it appear again (see
    /// [`IfaceTracker::forget`]).
    pub fn forget(&mut self, index: u32) -> bool {
        self.tracker.forget(index)
    }

    /// The interfaces with a role known now: `(ifindex, name, role)`.
    pub fn matching(&self) -> impl Iterator<Item = (u32, &str, IfaceRole)> {
        self.tracker.matching()
    }

    /// Lists the links and queues the events that bring the tracker up to date.
    async fn relist(&mut self) -> anyhow::Result<()> {
        let mut attempt = 1;
        let links = loop {
            match list_links(&self.requests).await {
                Ok(links) => break links,
                Err(e) if attempt < LIST_ATTEMPTS => {
                    warn!(error = %format!("{e:#}"), attempt, "listing links failed; again");
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        };
        self.ready.extend(self.tracker.resync(links));
        Ok(())
    }
}

impl Drop for IfaceWatch {
    fn drop(&mut self) {
        for task in &self.connections {
            task.abort();
        }
    }
}

/// Every link of the namespace, `(ifindex, name)` (an `RTM_GETLINK` dump).
pub(crate) async fn list_links(handle: &Handle) -> anyhow::Result<Vec<(u32, String)>> {
    let links: Vec<LinkMessage> = handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .context("listing links (RTM_GETLINK dump)")?;
    Ok(links.iter().filter_map(link_of).collect())
}

/// What attaching did on one hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HookOutcome {
    /// A new link, pinned (nothing of ours was attached there).
    Attached,
    /// An earlier agent's pinned link now runs this agent's program (`BPF_LINK_UPDATE`).
    Replaced,
    /// This agent's program was attached and pinned there already.
    Kept,
}

impl HookOutcome {
    const fn name(self) -> &'static str {
        match self {
            Self::Attached => "attached",
            Self::Replaced => "replaced",
            Self::Kept => "kept",
        }
    }
}

/// The pinned links of the TC programs (and of the XDP program, on node-facing interfaces
/// with `--xdp native|generic`), by ifindex: which interfaces have them, in which role.
#[derive(Debug)]
pub struct IfaceLinks {
    pin_dir: PathBuf,
    /// ifindex -> the interface's name and the role its programs are for.
    by_index: HashMap<u32, (String, IfaceRole)>,
    /// How the XDP program goes on node-facing interfaces.
    xdp: XdpAttach,
}

impl IfaceLinks {
    /// No attachment known yet; links are pinned below `pin_dir` (`<bpffs>/svc/v1`); the XDP
    /// program goes on node-facing interfaces as `xdp` says.
    #[must_use]
    pub fn new(pin_dir: &Path, xdp: XdpAttach) -> Self {
        Self {
            pin_dir: pin_dir.to_owned(),
            by_index: HashMap::new(),
            xdp,
        }
    }

    /// The role whose programs are on interface `index` (as far as this knows); `None` when
    /// none are.
    #[must_use]
    pub fn attached(&self, index: u32) -> Option<IfaceRole> {
        self.by_index.get(&index).map(|(_, role)| *role)
    }

    /// Acts on one event and logs what it did: attaches its role's programs (or takes over an
    /// earlier agent's pinned links) on [`IfaceEvent::Appeared`] and on a rename of an
    /// interface it had not attached to, swaps the programs in place on a rename into the
    /// other role, unpins (detaches) on a rename out of the patterns, removes the pins of a
    /// gone interface. Fails only when attaching did; then the links made by this attempt are
    /// removed again, and those of an earlier agent (or of the interface's earlier role) stay.
    pub fn apply(&mut self, ebpf: &mut Ebpf, event: &IfaceEvent) -> anyhow::Result<()> {
        match event {
            IfaceEvent::Appeared { index, name, role } => self.attach(ebpf, *index, name, *role),
            IfaceEvent::Renamed {
                index,
                from,
                to,
                role,
                ..
            } => match self.by_index.get_mut(index) {
                Some((known, known_role)) if *known_role == *role => {
                    known.clone_from(to);
                    info!(iface = %to, ifindex = index, %from, role = %role, "{role} interface renamed; its programs stay (pins are by ifindex)");
                    Ok(())
                }
                _ => self.attach(ebpf, *index, to, *role),
            },
            IfaceEvent::Disappeared {
                index,
                name,
                role,
                renamed_to,
            } => {
                // Pins go even when this agent never attached there (an attach that failed
                // keeps an earlier agent's pins, which still translated).
                let known = self.by_index.remove(index).is_some();
                let pinned = pins::tc_iface_dir(&self.pin_dir, *index).exists();
                if !known && !pinned {
                    return Ok(());
                }
                let Some(to) = renamed_to else {
                    // The kernel dropped the links from the interface; the pins only keep the
                    // link objects.
                    if let Err(e) = self.unpin(*index) {
                        warn!(iface = %name, ifindex = index, role = %role, error = %format!("{e:#}"), "{role} interface gone: removing its link pins failed");
                    } else {
                        info!(iface = %name, ifindex = index, role = %role, "{role} interface gone: removed its TC link pins");
                    }
                    return Ok(());
                };
                match self.detach(*index, to) {
                    Ok(()) => {
                        info!(iface = %name, ifindex = index, renamed_to = %to, role = %role, "renamed out of the {role} patterns: unpinned and detached its programs");
                    }
                    Err(e) => {
                        warn!(iface = %name, ifindex = index, renamed_to = %to, role = %role, error = %format!("{e:#}"), "renamed out of the {role} patterns: detaching failed");
                    }
                }
                Ok(())
            }
        }
    }

    /// Puts both programs of `role` on `name` unless they are there already; swaps them in
    /// place when the interface carries the other role's programs.
    fn attach(
        &mut self,
        ebpf: &mut Ebpf,
        index: u32,
        name: &str,
        role: IfaceRole,
    ) -> anyhow::Result<()> {
        let previous = self.attached(index);
        if previous == Some(role) {
            debug!(iface = %name, ifindex = index, role = %role, "programs already attached");
            return Ok(());
        }
        // The event is about `index`; make sure the name still means that interface (it may
        // have been deleted and recreated, or renamed, since: its own events follow).
        match nix::net::if_::if_nametoindex(name) {
            Ok(now) if now == index => {}
            Ok(now) => bail!("{name} is ifindex {now} by now, not {index}: its own event follows"),
            Err(e) => bail!("{name} (ifindex {index}) is no longer there: {e}"),
        }
        let mut outcomes = Vec::new();
        for (prog_name, hook) in role.programs() {
            match pin_tc_program(ebpf, &self.pin_dir, name, index, prog_name, hook) {
                Ok(outcome) => outcomes.push((hook, outcome)),
                Err(e) => {
                    // Only this attempt's new links go; an earlier agent's stay and translate.
                    for (hook, outcome) in outcomes {
                        if outcome == HookOutcome::Attached {
                            let _ = fs::remove_file(pins::tc_link_path(&self.pin_dir, index, hook));
                        }
                    }
                    return Err(e);
                }
            }
        }
        let [(_, ingress), (_, egress)] = outcomes[..] else {
            bail!("internal: {} hook outcomes for {name}", outcomes.len());
        };
        // XDP: on a node-facing interface as `--xdp` says; off everywhere else (an earlier
        // agent's XDP link of another mode, or on an interface now pod-facing, goes). A
        // failure leaves the TC programs, which serve everything alone, and is only logged.
        let xdp = if role == IfaceRole::NodeFacing {
            self.xdp
        } else {
            XdpAttach::Off
        };
        match pin_xdp_program(ebpf, &self.pin_dir, name, index, xdp) {
            Ok(Some(outcome)) => {
                info!(iface = %name, ifindex = index, mode = xdp.name(), outcome = outcome.name(), "{role} interface: {PROG_XDP_FROM_WORLD} on XDP ({}), link pinned", xdp.name());
            }
            Ok(None) => {}
            Err(e) => {
                warn!(iface = %name, ifindex = index, mode = xdp.name(), error = %format!("{e:#}"), "XDP not attached: the TC programs serve this interface alone");
            }
        }
        let pins = pins::tc_iface_dir(&self.pin_dir, index);
        let [(ingress_prog, _), (egress_prog, _)] = role.programs();
        let both = |outcome| ingress == outcome && egress == outcome;
        if let Some(from_role) = previous {
            info!(iface = %name, ifindex = index, pins = %pins.display(), from_role = %from_role, role = %role, ingress = ingress.name(), egress = egress.name(), "interface changed role, {from_role} to {role}: programs swapped in place (BPF_LINK_UPDATE), now {ingress_prog} (ingress) and {egress_prog} (egress)");
        } else if both(HookOutcome::Attached) {
            info!(iface = %name, ifindex = index, pins = %pins.display(), role = %role, "{role} interface: attached {ingress_prog} (ingress) and {egress_prog} (egress), links pinned");
        } else if both(HookOutcome::Replaced) {
            info!(iface = %name, ifindex = index, pins = %pins.display(), role = %role, "{role} interface: took over the pinned TC links of an earlier agent: its programs replaced in place by {ingress_prog} (ingress) and {egress_prog} (egress) (BPF_LINK_UPDATE)");
        } else {
            info!(iface = %name, ifindex = index, pins = %pins.display(), role = %role, ingress = ingress.name(), egress = egress.name(), "{role} programs in place: {ingress_prog} (ingress), {egress_prog} (egress)");
        }
        self.by_index.insert(index, (name.to_owned(), role));
        Ok(())
    }

    /// Removes the pins of interface `index`.
    fn unpin(&self, index: u32) -> anyhow::Result<()> {
        let dir = pins::tc_iface_dir(&self.pin_dir, index);
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("removing {}", dir.display())),
        }
    }

    /// Removes the pins of interface `index` (now called `iface`) and waits (bounded) until
    /// their programs are off its hooks.
    fn detach(&self, index: u32, iface: &str) -> anyhow::Result<()> {
        let mut programs = Vec::new();
        for hook in TcHook::ALL {
            if let Some((_, info)) =
                pins::open_link(&pins::tc_link_path(&self.pin_dir, index, hook))?
            {
                programs.push((hook, info.program_id()));
            }
        }
        self.unpin(index)?;
        let deadline = Instant::now() + DETACH_TIMEOUT;
        loop {
            let mut left = Vec::new();
            for (hook, id) in &programs {
                let (_, on_hook) = SchedClassifier::query_tcx(iface, tcx_attach_type(*hook))
                    .with_context(|| format!("querying the {} hook of {iface}", hook.name()))?;
                if on_hook.iter().any(|p| p.id() == *id) {
                    left.push(hook.name());
                }
            }
            if left.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "unpinned, but still on the {left:?} hooks of {iface} after {DETACH_TIMEOUT:?}"
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// The aya attach point of a hook.
const fn tcx_attach_type(hook: TcHook) -> TcAttachType {
    match hook {
        TcHook::Ingress => TcAttachType::Ingress,
        TcHook::Egress => TcAttachType::Egress,
    }
}

/// Puts `prog_name` on `hook` of `iface` (ifindex `index`) through a link pinned at
/// `links/tc/<index>/<hook>` (see the module documentation for the three cases).
fn pin_tc_program(
    ebpf: &mut Ebpf,
    pin_dir: &Path,
    iface: &str,
    index: u32,
    prog_name: &str,
    hook: TcHook,
) -> anyhow::Result<HookOutcome> {
    let at = tcx_attach_type(hook);
    let prog = crate::loader::loaded::<SchedClassifier>(ebpf, prog_name)?;
    let prog_id = prog.info()?.id();
    let (_, on_hook) = SchedClassifier::query_tcx(iface, at).with_context(|| {
        format!(
            "querying the TCX {} hook of {iface}: pinned TC links need TCX (kernel >= 6.6)",
            hook.name()
        )
    })?;
    let path = pins::tc_link_path(pin_dir, index, hook);
    let pinned = pins::open_link(&path)?;
    let on_hook: Vec<u32> = on_hook.iter().map(ProgramInfo::id).collect();
    let action = pins::tc_pin_action(
        pinned.as_ref().map(|(_, info)| PinnedTcLink {
            is_tcx: matches!(info.link_type(), Ok(LinkType::Tcx)),
            program_id: info.program_id(),
        }),
        &on_hook,
        prog_id,
    );
    match (action, pinned) {
        (TcPinAction::Keep, _) => return Ok(HookOutcome::Kept),
        (TcPinAction::Update, Some((link, _))) => {
            let link = SchedClassifierLink::try_from(link)
                .with_context(|| format!("{} is not a TCX link", path.display()))?;
            match prog.attach_to_link(link) {
                Ok(id) => {
                    // The pin holds the link; dropping this handle only closes a descriptor.
                    drop(prog.take_link(id)?);
                    return Ok(HookOutcome::Replaced);
                }
                Err(e) => {
                    warn!(iface, hook = hook.name(), error = %e, "replacing the program of a pinned link failed: attaching beside it, then replacing its pin");
                }
            }
        }
        (TcPinAction::Replace, _) => {
            debug!(iface, hook = hook.name(), pin = %path.display(), "pinned link no longer on this hook: replacing it");
        }
        _ => {}
    }
    let id = prog
        .attach_with_options(iface, at, TcAttachOptions::TcxOrder(LinkOrder::default()))
        .with_context(|| {
            format!(
                "attaching {prog_name} to the {} hook of {iface}",
                hook.name()
            )
        })?;
    let link: FdLink = prog
        .take_link(id)?
        .try_into()
        .with_context(|| format!("the link of {prog_name} on {iface} is no TCX link"))?;
    pins::pin_replacing(link, &path)?;
    Ok(HookOutcome::Attached)
}

/// Puts the XDP program on `iface` (ifindex `index`) in mode `xdp` through a link pinned at
/// `links/tc/<index>/xdp-<mode>`, and removes the pin of any XDP link of another mode (the
/// kernel refuses a second mode beside one attached; removing the pin detaches it, and the
/// TC programs serve the interface meanwhile). An earlier agent's link of this mode gets this
/// agent's program in place (`BPF_LINK_UPDATE`); one that is no longer attached (its interface
/// went) is replaced by a new link. `Off`: only the removal; returns `None`.
fn pin_xdp_program(
    ebpf: &mut Ebpf,
    pin_dir: &Path,
    iface: &str,
    index: u32,
    xdp: XdpAttach,
) -> anyhow::Result<Option<HookOutcome>> {
    let dir = pins::tc_iface_dir(pin_dir, index);
    let mut removed_other = false;
    for other in XdpAttach::PINS {
        if Some(other) != xdp.pin_name() {
            match fs::remove_file(dir.join(other)) {
                Ok(()) => {
                    removed_other = true;
                    info!(
                        iface,
                        ifindex = index,
                        pin = other,
                        "removed the XDP link of another --xdp mode"
                    );
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("removing {}", dir.join(other).display()));
                }
            }
        }
    }
    let (Some(pin), mode) = (
        xdp.pin_name(),
        match xdp {
            XdpAttach::Native => XdpMode::Driver,
            XdpAttach::Generic | XdpAttach::Off => XdpMode::Skb,
        },
    ) else {
        return Ok(None);
    };
    let path = dir.join(pin);
    let prog = crate::loader::loaded::<Xdp>(ebpf, PROG_XDP_FROM_WORLD)?;
    let prog_id = prog.info()?.id();
    if let Some((link, info)) = pins::open_link(&path)? {
        if info.program_id() == prog_id {
            return Ok(Some(HookOutcome::Kept));
        }
        // A link whose interface went (the ifindex reused since) refuses the update (ENOLINK).
        match XdpLink::try_from(link).map(|link| prog.attach_to_link(link)) {
            Ok(Ok(id)) => {
                // The pin holds the link; dropping this handle only closes a descriptor.
                drop(prog.take_link(id)?);
                return Ok(Some(HookOutcome::Replaced));
            }
            Ok(Err(e)) => {
                debug!(iface, pin = %path.display(), error = %e, "pinned XDP link not updatable: replacing it");
            }
            Err(e) => {
                debug!(iface, pin = %path.display(), error = %e, "pin is no XDP link: replacing it");
            }
        }
        fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    }
    let id = attach_xdp(prog, index, mode, removed_other).with_context(|| {
        format!(
            "attaching {PROG_XDP_FROM_WORLD} to {iface} in {} mode",
            xdp.name()
        )
    })?;
    let link: FdLink = prog
        .take_link(id)?
        .try_into()
        .with_context(|| format!("the XDP link on {iface} is no BPF link (kernel < 5.9?)"))?;
    pins::pin_replacing(link, &path)?;
    Ok(Some(HookOutcome::Attached))
}

/// How long an XDP attach waits for the link of another mode, whose pin was just removed, to
/// leave the interface: the kernel frees an unpinned link after an RCU grace period, from a
/// work item, and refuses a second mode meanwhile (`EEXIST`; seen on a busy node).
const OTHER_MODE_GONE: Duration = Duration::from_secs(2);

/// Attaches `prog` to interface `index` in `mode`; after removing another mode's link
/// (`removed_other`), tries again while the kernel still has it attached, for at most
/// [`OTHER_MODE_GONE`] (blocking: this happens once, when `--xdp` changed across a restart).
fn attach_xdp(
    prog: &mut Xdp,
    index: u32,
    mode: XdpMode,
    removed_other: bool,
) -> Result<aya::programs::xdp::XdpLinkId, aya::programs::ProgramError> {
    let deadline = Instant::now() + OTHER_MODE_GONE;
    loop {
        match prog.attach_to_if_index(index, mode) {
            Err(e) if removed_other && Instant::now() < deadline && is_eexist(&e) => {
                std::thread::sleep(Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

/// Whether `e` or an error below it is `EEXIST`.
fn is_eexist(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(err) = next {
        if err
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.raw_os_error() == Some(nix::errno::Errno::EEXIST as i32))
        {
            return true;
        }
        next = err.source();
    }
    false
}

/// Attaches each interface's programs (by its role) to the interfaces of the watch's first
/// listing (taking over an earlier agent's pinned links, whichever role they ran for), then
/// removes the pins of every interface that has no role any more: deleted or renamed away
/// while no agent ran (removing a pin detaches what is still attached). Call it once, right after [`IfaceWatch::start`], before
/// [`follow`]. An interface that fails is logged, keeps whatever pins it had and is retried on
/// its next link event.
pub fn attach_listed(
    ebpf: &mut Ebpf,
    watch: &mut IfaceWatch,
    links: &mut IfaceLinks,
) -> anyhow::Result<()> {
    let listed: BTreeSet<u32> = watch.matching().map(|(index, ..)| index).collect();
    for event in std::mem::take(&mut watch.ready) {
        apply_or_retry_later(ebpf, &mut watch.tracker, links, &event);
    }
    let dir = pins::tc_dir(&links.pin_dir);
    let stale = pins::stale_tc_pins(&pins::pin_groups(&dir)?, &listed);
    for path in pins::remove_relative(&dir, &stale)? {
        info!(pin = %path.display(), "removed stale TC link pins: the interface went, or stopped being pod-facing or node-facing, while no agent ran");
    }
    Ok(())
}

/// Keeps each role's programs on every interface of this namespace with that role for as long
/// as it runs: attaches to each that appears, swaps the programs of each renamed into the other
/// role, detaches from each renamed away, removes the pins of each that goes. A failed attach
/// is logged with the interface's name and retried on the interface's next link event; the
/// agent goes on. Returns only when netlink fails.
pub async fn follow(
    ebpf: &mut Ebpf,
    mut watch: IfaceWatch,
    mut links: IfaceLinks,
) -> anyhow::Result<()> {
    loop {
        let event = watch.next().await?;
        apply_or_retry_later(ebpf, &mut watch.tracker, &mut links, &event);
    }
}

/// Applies `event`; when that fails, logs it and makes the tracker forget the interface, so
/// its next link event tries again.
fn apply_or_retry_later(
    ebpf: &mut Ebpf,
    tracker: &mut IfaceTracker,
    links: &mut IfaceLinks,
    event: &IfaceEvent,
) {
    if let Err(e) = links.apply(ebpf, event) {
        let role = event.role();
        warn!(
            iface = %event.name(), ifindex = event.index(), role = %role, error = %format!("{e:#}"),
            "could not attach the {role} programs; retried on this interface's next link event"
        );
        tracker.forget(event.index());
    }
}

#[cfg(test)]
mod tests {
    use rtnetlink::packet_core::NetlinkHeader;

    use super::*;

    #[test]
    fn eexist_is_found_below_the_attach_error() {
        let exists = || std::io::Error::from_raw_os_error(nix::errno::Errno::EEXIST as i32);
        assert!(is_eexist(&exists()));
        let attach = aya::programs::ProgramError::SyscallError(aya::sys::SyscallError {
            call: "bpf_link_create",
            io_error: exists(),
        });
        assert!(is_eexist(&attach));
        let busy = std::io::Error::from_raw_os_error(nix::errno::Errno::EBUSY as i32);
        assert!(!is_eexist(&busy));
        assert!(!is_eexist(&aya::programs::ProgramError::NotLoaded));
    }

    const POD: IfaceRole = IfaceRole::PodFacing;
    const NODE: IfaceRole = IfaceRole::NodeFacing;

    fn patterns() -> RolePatterns {
        RolePatterns::new(
            IfacePatterns::parse("svcpod*,lxc*").unwrap(),
            IfacePatterns::parse_or_none("ens*,bond*").unwrap(),
        )
    }

    /// The role `patterns()` gives `name`.
    fn role(name: &str) -> IfaceRole {
        patterns().classify(name).0.expect("a name with a role")
    }

    fn link_msg(family: AddressFamily, index: u32, name: Option<&str>) -> LinkMessage {
        let mut msg = LinkMessage::default();
        msg.header.interface_family = family;
        msg.header.index = index;
        msg.attributes
            .extend(name.map(|n| LinkAttribute::IfName(n.to_owned())));
        msg
    }

    fn new_link(index: u32, name: &str) -> NetlinkMessage<RouteNetlinkMessage> {
        NetlinkMessage::from(RouteNetlinkMessage::NewLink(link_msg(
            AddressFamily::Unspec,
            index,
            Some(name),
        )))
    }

    fn present(index: u32, name: &str) -> LinkChange {
        LinkChange::Present {
            index,
            name: name.to_owned(),
        }
    }

    fn appeared(index: u32, name: &str) -> IfaceEvent {
        IfaceEvent::Appeared {
            index,
            name: name.to_owned(),
            role: role(name),
        }
    }

    fn gone(index: u32, name: &str) -> IfaceEvent {
        IfaceEvent::Disappeared {
            index,
            name: name.to_owned(),
            role: role(name),
            renamed_to: None,
        }
    }

    fn renamed(index: u32, from: &str, to: &str) -> IfaceEvent {
        IfaceEvent::Renamed {
            index,
            from: from.to_owned(),
            to: to.to_owned(),
            from_role: role(from),
            role: role(to),
        }
    }

    fn renamed_away(index: u32, name: &str, to: &str) -> IfaceEvent {
        IfaceEvent::Disappeared {
            index,
            name: name.to_owned(),
            role: role(name),
            renamed_to: Some(to.to_owned()),
        }
    }

    #[test]
    fn translates_link_messages_of_this_namespace() {
        assert_eq!(
            translate(&new_link(7, "svcpod0")),
            Incoming::Link(present(7, "svcpod0"))
        );
        let del = NetlinkMessage::from(RouteNetlinkMessage::DelLink(link_msg(
            AddressFamily::Unspec,
            7,
            Some("svcpod0"),
        )));
        assert_eq!(
            translate(&del),
            Incoming::Link(LinkChange::Removed { index: 7 })
        );
    }

    #[test]
    fn ignores_bridge_port_messages_and_nameless_links() {
        // `ip link set X nomaster` sends an AF_BRIDGE RTM_DELLINK for X, which still exists.
        for msg in [
            RouteNetlinkMessage::DelLink(link_msg(AddressFamily::Bridge, 7, Some("svcpod0"))),
            RouteNetlinkMessage::NewLink(link_msg(AddressFamily::Bridge, 7, Some("svcpod0"))),
            RouteNetlinkMessage::NewLink(link_msg(AddressFamily::Unspec, 7, None)),
            RouteNetlinkMessage::GetLink(link_msg(AddressFamily::Unspec, 7, Some("svcpod0"))),
        ] {
            assert_eq!(
                translate(&NetlinkMessage::from(msg.clone())),
                Incoming::Other,
                "{msg:?}"
            );
        }
        assert_eq!(
            link_of(&link_msg(AddressFamily::Bridge, 3, Some("x"))),
            None
        );
        assert_eq!(
            link_of(&link_msg(AddressFamily::Unspec, 3, Some("x"))),
            Some((3, "x".to_owned()))
        );
    }

    #[test]
    fn an_overrun_asks_for_a_relisting() {
        let msg = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::Overrun(vec![]));
        assert_eq!(translate(&msg), Incoming::Overrun);
    }

    #[test]
    fn only_matching_interfaces_make_events() {
        let mut t = IfaceTracker::new(patterns());
        assert_eq!(t.apply(present(1, "lo")), None);
        assert_eq!(t.apply(present(2, "eth0")), None);
        assert_eq!(t.apply(LinkChange::Removed { index: 2 }), None);
        assert_eq!(t.apply(present(5, "lxc12")), Some(appeared(5, "lxc12")));
        assert_eq!(t.matching().collect::<Vec<_>>(), [(5, "lxc12", POD)]);
    }

    #[test]
    fn repeated_newlinks_of_a_known_interface_make_no_event() {
        let mut t = IfaceTracker::new(patterns());
        assert_eq!(t.apply(present(5, "svcpod0")), Some(appeared(5, "svcpod0")));
        // Up, carrier, addresses: each is another RTM_NEWLINK with the same name.
        for _ in 0..3 {
            assert_eq!(t.apply(present(5, "svcpod0")), None);
        }
        assert_eq!(
            t.apply(LinkChange::Removed { index: 5 }),
            Some(gone(5, "svcpod0"))
        );
        assert_eq!(t.apply(LinkChange::Removed { index: 5 }), None);
    }

    #[test]
    fn renames_inside_out_of_and_into_the_patterns() {
        let mut t = IfaceTracker::new(patterns());
        t.apply(present(5, "svcpod0"));
        assert_eq!(
            t.apply(present(5, "svcpod9")),
            Some(renamed(5, "svcpod0", "svcpod9"))
        );
        assert_eq!(
            t.apply(present(5, "moved0")),
            Some(renamed_away(5, "svcpod9", "moved0"))
        );
        assert_eq!(t.apply(present(5, "moved1")), None);
        assert_eq!(t.apply(present(5, "lxcab")), Some(appeared(5, "lxcab")));
    }

    #[test]
    fn a_name_reused_by_a_new_interface_is_a_new_interface() {
        let mut t = IfaceTracker::new(patterns());
        t.apply(present(5, "svcpod0"));
        assert_eq!(
            t.apply(LinkChange::Removed { index: 5 }),
            Some(gone(5, "svcpod0"))
        );
        assert_eq!(t.apply(present(6, "svcpod0")), Some(appeared(6, "svcpod0")));
    }

    #[test]
    fn a_listing_is_diffed_against_what_is_known() {
        let mut t = IfaceTracker::new(patterns());
        let first = t.resync([
            (1, "lo".to_owned()),
            (4, "svcpod1".to_owned()),
            (3, "svcpod0".to_owned()),
        ]);
        assert_eq!(first, [appeared(3, "svcpod0"), appeared(4, "svcpod1")]);
        assert_eq!(t.resync([(3, "svcpod0".to_owned())]), [gone(4, "svcpod1")]);
        // After lost events: 3 was renamed away, 7 came.
        assert_eq!(
            t.resync([(3, "other".to_owned()), (7, "lxc7".to_owned())]),
            [renamed_away(3, "svcpod0", "other"), appeared(7, "lxc7")]
        );
        assert_eq!(t.resync([(7, "lxc7".to_owned())]), []);
    }

    /// The watch subscribes, then lists, then applies what was queued meanwhile: whatever the
    /// interleaving, the outcome is the final state, and nothing appears twice.
    #[test]
    fn events_queued_while_listing_converge_to_the_final_state() {
        // Created before the listing started: listed, and its queued NEWLINK is a repeat.
        let mut t = IfaceTracker::new(patterns());
        let mut events = t.resync([(5, "svcpod0".to_owned())]);
        events.extend(t.apply(present(5, "svcpod0")));
        assert_eq!(events, [appeared(5, "svcpod0")]);

        // Created and deleted while the listing ran, which missed it: appears, then goes.
        let mut t = IfaceTracker::new(patterns());
        let mut events = t.resync([]);
        events.extend(t.apply(present(5, "svcpod0")));
        events.extend(t.apply(LinkChange::Removed { index: 5 }));
        assert_eq!(events, [appeared(5, "svcpod0"), gone(5, "svcpod0")]);
        assert_eq!(t.matching().count(), 0);

        // Listed, then deleted and its name reused before the queue was read.
        let mut t = IfaceTracker::new(patterns());
        let mut events = t.resync([(5, "svcpod0".to_owned())]);
        events.extend(t.apply(LinkChange::Removed { index: 5 }));
        events.extend(t.apply(present(6, "svcpod0")));
        assert_eq!(
            events,
            [
                appeared(5, "svcpod0"),
                gone(5, "svcpod0"),
                appeared(6, "svcpod0")
            ]
        );
        assert_eq!(t.matching().collect::<Vec<_>>(), [(6, "svcpod0", POD)]);
    }

    #[test]
    fn a_forgotten_interface_appears_again_on_its_next_event() {
        let mut t = IfaceTracker::new(patterns());
        t.apply(present(5, "svcpod0"));
        assert!(t.forget(5));
        assert!(!t.forget(5));
        assert_eq!(t.apply(present(5, "svcpod0")), Some(appeared(5, "svcpod0")));
    }

    #[test]
    fn events_name_their_interface_and_role() {
        let event = renamed(2, "svcpod0", "ens3");
        assert_eq!(
            (event.index(), event.name(), event.role()),
            (2, "ens3", NODE)
        );
        assert_eq!(gone(3, "svcpod3").name(), "svcpod3");
        assert_eq!(gone(3, "svcpod3").role(), POD);
        assert_eq!(renamed_away(4, "bond0", "x").role(), NODE);
    }

    #[test]
    fn each_role_has_its_programs_on_its_hooks() {
        assert_eq!(
            POD.programs(),
            [
                (PROG_TC_FROM_POD, TcHook::Ingress),
                (PROG_TC_TO_POD, TcHook::Egress)
            ]
        );
        assert_eq!(
            NODE.programs(),
            [
                (PROG_TC_FROM_WORLD, TcHook::Ingress),
                (PROG_TC_TO_WORLD, TcHook::Egress)
            ]
        );
        for role in IfaceRole::ALL {
            for (program, hook) in role.programs() {
                assert_eq!(IfaceRole::of_program(program), Some((role, hook)));
            }
        }
        // As the kernel reports them (15 bytes at most).
        assert_eq!(
            IfaceRole::of_program("svc_tc_from_wor"),
            Some((NODE, TcHook::Ingress))
        );
        assert_eq!(
            IfaceRole::of_program("svc_tc_to_world"),
            Some((NODE, TcHook::Egress))
        );
        assert_eq!(
            IfaceRole::of_program("svc_tc_from_pod"),
            Some((POD, TcHook::Ingress))
        );
        for other in ["svc_sock_conn4", "svc_tc_from", "svc_tc_from_worl", "", "x"] {
            assert_eq!(IfaceRole::of_program(other), None, "{other}");
        }
        assert_eq!(
            (POD.to_string(), NODE.to_string()),
            ("pod-facing".to_owned(), "node-facing".to_owned())
        );
    }

    #[test]
    fn node_facing_wins_where_both_lists_match() {
        let both = RolePatterns::new(
            IfacePatterns::parse("svcpod*,veth*,eth1").unwrap(),
            IfacePatterns::parse("eth*").unwrap(),
        );
        assert_eq!(both.classify("eth0"), (Some(NODE), false));
        assert_eq!(both.classify("eth1"), (Some(NODE), true));
        assert_eq!(both.classify("veth1"), (Some(POD), false));
        assert_eq!(both.classify("lo"), (None, false));
        // An empty node list: nothing is node-facing.
        let none = RolePatterns::new(
            IfacePatterns::parse("svcpod*").unwrap(),
            IfacePatterns::parse_or_none("").unwrap(),
        );
        assert_eq!(none.classify("eth0"), (None, false));
        assert_eq!(none.classify("svcpod0"), (Some(POD), false));

        // The tracker warns once per name, however often the name comes back.
        let mut t = IfaceTracker::new(both);
        assert_eq!(
            t.apply(present(4, "eth1")),
            Some(IfaceEvent::Appeared {
                index: 4,
                name: "eth1".into(),
                role: NODE
            })
        );
        for _ in 0..3 {
            assert_eq!(t.apply(present(4, "eth1")), None);
        }
        t.resync([(4, "eth1".to_owned())]);
        t.apply(LinkChange::Removed { index: 4 });
        t.apply(present(9, "eth1"));
        assert_eq!(t.overlapping().collect::<Vec<_>>(), ["eth1"]);
    }

    #[test]
    fn a_rename_can_move_an_interface_between_roles() {
        let mut t = IfaceTracker::new(patterns());
        assert_eq!(t.apply(present(5, "svcpod0")), Some(appeared(5, "svcpod0")));
        // Pod-facing to node-facing: the same interface, another role.
        let event = t.apply(present(5, "ens5")).unwrap();
        assert_eq!(
            event,
            IfaceEvent::Renamed {
                index: 5,
                from: "svcpod0".into(),
                to: "ens5".into(),
                from_role: POD,
                role: NODE
            }
        );
        assert_eq!(t.matching().collect::<Vec<_>>(), [(5, "ens5", NODE)]);
        // Inside the node-facing role: a plain rename.
        assert_eq!(
            t.apply(present(5, "bond0")),
            Some(renamed(5, "ens5", "bond0"))
        );
        // And back, then out of both lists.
        assert_eq!(
            t.apply(present(5, "lxc5")),
            Some(renamed(5, "bond0", "lxc5"))
        );
        assert_eq!(
            t.apply(present(5, "eth0")),
            Some(renamed_away(5, "lxc5", "eth0"))
        );
        assert_eq!(t.apply(present(5, "ens9")), Some(appeared(5, "ens9")));
        // A listing after lost events sees the role change as a rename too.
        assert_eq!(
            t.resync([(5, "svcpod3".to_owned())]),
            [renamed(5, "ens9", "svcpod3")]
        );
        assert_eq!(t.overlapping().count(), 0);
    }
}
