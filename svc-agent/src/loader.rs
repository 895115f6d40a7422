//! Loading the embedded eBPF object, pinning its maps, loading its programs.
//!
//! Maps are pinned one by one under `<bpffs>/svc/v1/<MAP_NAME>` (the layout version is in the
//! directory and in every map name), so a restarted agent adopts the state the previous one
//! left. Objects loaded with [`load_object`] (tests) get private maps. The programs' links are
//! pinned beside the maps by `ifaces` (TC) and `cgroup` (connect-time); the layout of the pin
//! directory is in `pins`.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, anyhow, bail, ensure};
use aya::{
    Ebpf, EbpfLoader,
    programs::{CgroupSockAddr, SchedClassifier, Xdp},
};
use svc_common::{MAP_NAMES, PIN_SUBDIR};

/// The eBPF object built from `svc-ebpf` by this crate's build script.
///
/// Empty when the crate was built with `AYA_BUILD_SKIP=1` (userspace-only builds).
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/svc"));

/// Name of the TC program for packets coming from a pod (ingress on the host end of its veth).
pub const PROG_TC_FROM_POD: &str = "svc_tc_from_pod";
/// Name of the TC program for packets going to a pod (egress on the host end of its veth).
pub const PROG_TC_TO_POD: &str = "svc_tc_to_pod";
/// Name of the TC program for packets coming from the outside world (ingress on a node-facing
/// interface).
pub const PROG_TC_FROM_WORLD: &str = "svc_tc_from_world";
/// Name of the TC program for packets going to the outside world (egress on a node-facing
/// interface).
pub const PROG_TC_TO_WORLD: &str = "svc_tc_to_world";
/// Every TC program; `svc-agent run` loads them all and attaches them by interface role.
pub const PROGS_TC: [&str; 4] = [
    PROG_TC_FROM_POD,
    PROG_TC_TO_POD,
    PROG_TC_FROM_WORLD,
    PROG_TC_TO_WORLD,
];
/// Name of the XDP program for frames coming from the outside world (a node-facing interface,
/// with `--xdp native|generic`).
pub const PROG_XDP_FROM_WORLD: &str = "svc_xdp_from_world";
/// Name of the cgroup `connect4` program (connect-time translation, IPv4).
pub const PROG_SOCK_CONNECT4: &str = "svc_sock_conn4";
/// Name of the cgroup `connect6` program (connect-time translation, IPv6).
pub const PROG_SOCK_CONNECT6: &str = "svc_sock_conn6";
/// Name of the cgroup `sendmsg4` program (UDP `sendto()` translation, IPv4).
pub const PROG_SOCK_SENDMSG4: &str = "svc_sock_send4";
/// Name of the cgroup `sendmsg6` program (UDP `sendto()` translation, IPv6).
pub const PROG_SOCK_SENDMSG6: &str = "svc_sock_send6";
/// Name of the cgroup `recvmsg4` program (UDP `recvfrom()` shows the service, IPv4).
pub const PROG_SOCK_RECVMSG4: &str = "svc_sock_recv4";
/// Name of the cgroup `recvmsg6` program (UDP `recvfrom()` shows the service, IPv6).
pub const PROG_SOCK_RECVMSG6: &str = "svc_sock_recv6";
/// Name of the cgroup `getpeername4` program (`getpeername()` shows the service, IPv4).
pub const PROG_SOCK_GETPEERNAME4: &str = "svc_sock_peer4";
/// Name of the cgroup `getpeername6` program (`getpeername()` shows the service, IPv6).
pub const PROG_SOCK_GETPEERNAME6: &str = "svc_sock_peer6";
/// Every connect-time (cgroup `sock_addr`) program; `svc-agent run --cgroup` attaches them all.
pub const PROGS_SOCK: [&str; 8] = [
    PROG_SOCK_CONNECT4,
    PROG_SOCK_CONNECT6,
    PROG_SOCK_SENDMSG4,
    PROG_SOCK_SENDMSG6,
    PROG_SOCK_RECVMSG4,
    PROG_SOCK_RECVMSG6,
    PROG_SOCK_GETPEERNAME4,
    PROG_SOCK_GETPEERNAME6,
];

/// Sizes of the maps that scale with the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSizes {
    /// `SERVICES_V1` entries (frontends plus backend slots).
    pub services: u32,
    /// `BACKENDS_V1` entries.
    pub backends: u32,
    /// `CT_V1` entries (two per answered connection).
    pub conntrack: u32,
    /// `CT_NEW_V1` entries (two per flow nothing answered yet).
    pub conntrack_new: u32,
    /// `AFFINITY_V1` entries.
    pub affinity: u32,
    /// `SOCK_REVNAT_V1` entries.
    pub sock_revnat: u32,
    /// `SOCK_UDP_PIN_V1` entries.
    pub sock_pin: u32,
    /// `SNAT_V1` entries (one per external connection to a remote endpoint).
    pub snat: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            services: svc_common::sizes::SERVICES,
            backends: svc_common::sizes::BACKENDS,
            conntrack: svc_common::sizes::CT,
            conntrack_new: svc_common::sizes::CT_NEW,
            affinity: svc_common::sizes::AFFINITY,
            sock_revnat: svc_common::sock::SOCK_REVNAT_ENTRIES,
            sock_pin: svc_common::sock::SOCK_UDP_PIN_ENTRIES,
            snat: svc_common::sizes::SNAT,
        }
    }
}

impl MapSizes {
    /// Small maps for tests: quick to create, plenty for a fixture or an end-to-end test.
    #[must_use]
    pub const fn small() -> Self {
        Self {
            services: 4096,
            backends: 4096,
            conntrack: 16384,
            conntrack_new: 4096,
            affinity: 4096,
            sock_revnat: 4096,
            sock_pin: 4096,
            snat: 4096,
        }
    }

    /// Approximate kernel memory the sized maps take, in bytes (key + value + per-entry
    /// overhead of a preallocated hash element; `SNAT_V1`, not preallocated, takes memory only
    /// for the entries it holds and is left out).
    #[must_use]
    pub fn approx_bytes(&self) -> u64 {
        const HASH_ELEM_OVERHEAD: u64 = 48;
        let svc = u64::from(self.services) * (24 + 16 + HASH_ELEM_OVERHEAD);
        let be = u64::from(self.backends) * (4 + 20 + HASH_ELEM_OVERHEAD);
        let ct = (u64::from(self.conntrack) + u64::from(self.conntrack_new))
            * (40 + 40 + HASH_ELEM_OVERHEAD);
        let aff = u64::from(self.affinity) * (24 + 16 + HASH_ELEM_OVERHEAD);
        let rev = u64::from(self.sock_revnat) * (32 + 20 + HASH_ELEM_OVERHEAD);
        let pin = u64::from(self.sock_pin) * (32 + 28 + HASH_ELEM_OVERHEAD);
        svc + be + ct + aff + rev + pin
    }

    /// The maps these sizes set, with their entries.
    #[must_use]
    pub fn entries(&self) -> [(&'static str, u32); 13] {
        [
            ("SERVICES_V1", self.services),
            ("BACKENDS_V1", self.backends),
            ("BACKEND_NAMES_V1", self.backends),
            ("FRONTEND_NAMES_V1", self.services),
            ("CT_V1", self.conntrack),
            ("CT_NEW_V1", self.conntrack_new),
            ("AFFINITY_V1", self.affinity),
            ("SVC_STATS_V1", self.services),
            ("BACKEND_STATS_V1", self.backends),
            ("SOCK_REVNAT_V1", self.sock_revnat),
            ("SOCK_UDP_PIN_V1", self.sock_pin),
            ("ADDRS_V1", self.services.saturating_add(self.backends)),
            ("SNAT_V1", self.snat),
        ]
    }

    /// The entries these sizes give map `name`; `None` for a map of fixed size.
    #[must_use]
    pub fn max_entries_of(&self, name: &str) -> Option<u32> {
        self.entries()
            .into_iter()
            .find_map(|(n, v)| (n == name).then_some(v))
    }

    fn apply(&self, loader: &mut EbpfLoader<'_>) {
        for (name, entries) in self.entries() {
            loader.map_max_entries(name, entries);
        }
    }
}

/// Name of the kernel global that limits connect-time translation to one network namespace
/// (see `svc-ebpf/src/sock.rs`): 0 translates sockets of every namespace.
const GLOBAL_SOCK_LB_NETNS: &str = "SVC_SOCK_LB_NETNS";

/// Name of the kernel global holding the external frontends' Maglev table size (see
/// `svc-ebpf/src/lb.rs`; 0: off).
const GLOBAL_MAGLEV_SIZE: &str = "SVC_MAGLEV_SIZE";

/// Settings the programs read as load-time constants.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Globals {
    /// Translate at the socket only the sockets of the network namespace with this cookie (the
    /// node's own, `--socket-lb host-only`); 0: every socket in the cgroup (`all`).
    pub sock_lb_netns: u64,
    /// The size of external frontends' Maglev tables (`--maglev-table-size`); 0: off.
    pub maglev_size: u32,
}

impl Globals {
    fn apply<'a>(&'a self, loader: &mut EbpfLoader<'a>) {
        loader.override_global(GLOBAL_SOCK_LB_NETNS, &self.sock_lb_netns, true);
        loader.override_global(GLOBAL_MAGLEV_SIZE, &self.maglev_size, true);
    }
}

/// The cookie of this process's network namespace (`SO_NETNS_COOKIE`, kernel 5.14 or newer): the
/// value `bpf_get_netns_cookie` gives the programs for sockets of this namespace.
pub fn own_netns_cookie() -> anyhow::Result<u64> {
    use std::os::fd::AsRawFd as _;

    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};

    let sock = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .context("opening a socket to read this network namespace's cookie")?;
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as nix::libc::socklen_t;
    // SAFETY: `sock` is an open socket; `cookie` and `len` are valid for writes of the sizes
    // given (the kernel writes at most `len` = 8 bytes, the option's size, and updates `len`).
    let ret = unsafe {
        nix::libc::getsockopt(
            sock.as_raw_fd(),
            nix::libc::SOL_SOCKET,
            nix::libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if ret != 0 {
        return Err(std::io::Error::last_os_error()).context(
            "getsockopt(SO_NETNS_COOKIE) (kernel 5.14 or newer is needed for --socket-lb host-only)",
        );
    }
    ensure!(
        len as usize == size_of::<u64>() && cookie != 0,
        "getsockopt(SO_NETNS_COOKIE) gave no cookie"
    );
    Ok(cookie)
}

/// Where the agent keeps its pinned state: `<bpffs>/svc/v1`.
#[must_use]
pub fn pin_dir(bpffs: &Path) -> PathBuf {
    bpffs.join(PIN_SUBDIR)
}

fn check_object() -> anyhow::Result<()> {
    if EBPF_OBJECT.is_empty() {
        bail!(
            "this svc-agent was built with AYA_BUILD_SKIP=1 and carries no eBPF object; \
             rebuild without it (cargo xtask build)"
        );
    }
    Ok(())
}

/// Loads the object with private, unpinned maps (fixture tests, one-off tools).
pub fn load_object(sizes: MapSizes) -> anyhow::Result<Ebpf> {
    load_object_with(sizes, Globals::default())
}

/// As [`load_object`], with the load-time constants `globals` (fixture rows of the shipped
/// settings, e.g. Maglev on).
pub fn load_object_with(sizes: MapSizes, globals: Globals) -> anyhow::Result<Ebpf> {
    check_object()?;
    let mut loader = EbpfLoader::new();
    sizes.apply(&mut loader);
    globals.apply(&mut loader);
    loader
        .load(EBPF_OBJECT)
        .context("loading the embedded eBPF object (root is needed)")
}

/// Loads the object with every map pinned under [`pin_dir`]: existing pins are adopted, missing
/// ones created, pinned maps of another size migrated into new ones (`migrate`; call
/// [`Migration::finish`](crate::migrate::Migration::finish) once the programs are attached),
/// pinned maps that can be neither refused. `bpffs` must be a mounted bpf filesystem (see
/// [`ensure_bpffs`]).
pub fn load_pinned(
    bpffs: &Path,
    sizes: MapSizes,
    globals: Globals,
) -> anyhow::Result<(Ebpf, crate::migrate::Migration)> {
    check_object()?;
    let dir = pin_dir(bpffs);
    crate::pins::ensure_private_dir(&dir)?;
    let wanted = crate::migrate::wanted_shapes(EBPF_OBJECT, &sizes)?;
    let migration = crate::migrate::Migration::prepare(&dir, &wanted)?;
    let paths: Vec<(&str, PathBuf)> = MAP_NAMES.iter().map(|n| (*n, dir.join(n))).collect();
    let mut loader = EbpfLoader::new();
    sizes.apply(&mut loader);
    globals.apply(&mut loader);
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    let ebpf = loader.load(EBPF_OBJECT).with_context(|| {
        format!(
            "loading the eBPF object with maps pinned in {}",
            dir.display()
        )
    })?;
    migration.copy(&dir)?;
    Ok((ebpf, migration))
}

/// Mounts a bpf filesystem at `path` unless one is already there: with mode 0700 (only root may
/// create, rename or remove what is in it; the kernel's default is 1777, anyone may create).
pub fn ensure_bpffs(path: &Path) -> anyhow::Result<()> {
    let mounts =
        std::fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    let want = path.to_string_lossy();
    if mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        let (_, mnt, fstype) = (f.next(), f.next(), f.next());
        mnt == Some(&want) && fstype == Some("bpf")
    }) {
        return Ok(());
    }
    std::fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
    nix::mount::mount(
        Some("bpf"),
        path,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        Some("mode=0700"),
    )
    .with_context(|| format!("mounting a bpf filesystem at {}", path.display()))
}

/// Interface-name patterns (shell globs such as `svcpod*`, `lxc*`, `eth*`) that select the
/// interfaces of one role (pod-facing, node-facing) the TC programs attach to.
#[derive(Clone, Debug, Default)]
pub struct IfacePatterns(Vec<glob::Pattern>);

impl IfacePatterns {
    /// Parses a comma-separated list of globs; at least one is needed.
    pub fn parse(list: &str) -> anyhow::Result<Self> {
        let pats = Self::parse_or_none(list)?;
        if pats.is_empty() {
            bail!("no interface pattern given");
        }
        Ok(pats)
    }

    /// Parses a comma-separated list of globs; an empty list (or only commas and blanks) gives
    /// patterns that match no interface.
    pub fn parse_or_none(list: &str) -> anyhow::Result<Self> {
        list.split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| glob::Pattern::new(p).with_context(|| format!("bad interface pattern `{p}`")))
            .collect::<anyhow::Result<Vec<_>>>()
            .map(Self)
    }

    /// Whether there is no pattern at all (no interface matches).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `name` matches one of the patterns.
    #[must_use]
    pub fn matches(&self, name: &str) -> bool {
        self.0.iter().any(|p| p.matches(name))
    }
}

/// Loads the programs an agent attaches into the kernel (without attaching): the TC and
/// connect-time ones, and the XDP one when `xdp` says it goes on the node-facing interfaces
/// (it is the largest for the verifier, about half the load time). Maps taken out of the
/// object before must stay open until this returns: the programs' instructions name them by
/// the descriptors the object was loaded with; once loaded, the programs hold their maps.
pub fn load_programs(ebpf: &mut Ebpf, xdp: bool) -> anyhow::Result<()> {
    for name in PROGS_TC.iter().chain(&PROGS_SOCK) {
        load_program(ebpf, name)?;
    }
    if xdp {
        load_program(ebpf, PROG_XDP_FROM_WORLD)?;
    }
    Ok(())
}

/// Loads program `name` (any of this object's: TC, connect-time or XDP) if it was not yet.
pub fn load_program(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<()> {
    if PROGS_TC.contains(&name) {
        loaded::<SchedClassifier>(ebpf, name)?;
    } else if PROGS_SOCK.contains(&name) {
        loaded::<CgroupSockAddr>(ebpf, name)?;
    } else if name == PROG_XDP_FROM_WORLD {
        loaded::<Xdp>(ebpf, name)?;
    } else {
        bail!("no program {name} in the object");
    }
    Ok(())
}

/// Program `name` of type `P`, loaded into the kernel (by the verifier) if it was not yet.
pub fn loaded<'a, P>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut P>
where
    P: LoadableProgram,
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog: &mut P = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("no program {name} in the object"))?
        .try_into()?;
    if !prog.is_loaded() {
        prog.load_now()
            .with_context(|| format!("loading {name} (verifier)"))?;
    }
    Ok(prog)
}

/// The programs this agent loads: whether one is loaded, and loading it.
pub trait LoadableProgram {
    /// Whether the program is in the kernel already.
    fn is_loaded(&self) -> bool;
    /// Loads the program (runs the verifier).
    fn load_now(&mut self) -> Result<(), aya::programs::ProgramError>;
}

impl LoadableProgram for SchedClassifier {
    fn is_loaded(&self) -> bool {
        self.fd().is_ok()
    }
    fn load_now(&mut self) -> Result<(), aya::programs::ProgramError> {
        self.load()
    }
}

impl LoadableProgram for Xdp {
    fn is_loaded(&self) -> bool {
        self.fd().is_ok()
    }
    fn load_now(&mut self) -> Result<(), aya::programs::ProgramError> {
        self.load()
    }
}

impl LoadableProgram for CgroupSockAddr {
    fn is_loaded(&self) -> bool {
        self.fd().is_ok()
    }
    fn load_now(&mut self) -> Result<(), aya::programs::ProgramError> {
        self.load()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_patterns_match_globs() {
        let p = IfacePatterns::parse("svcpod*, lxc?").unwrap();
        assert!(p.matches("svcpod0"));
        assert!(p.matches("lxca"));
        assert!(!p.matches("eth0"));
        assert!(!p.matches("lxcab"));
        assert!(IfacePatterns::parse(" , ").is_err());
        assert!(IfacePatterns::parse("[").is_err());
        let none = IfacePatterns::parse_or_none(" , ").unwrap();
        assert!(none.is_empty() && !none.matches("eth0") && !none.matches(""));
        assert!(IfacePatterns::parse_or_none("eth0,[").is_err());
        assert!(!IfacePatterns::parse_or_none("eth0").unwrap().is_empty());
    }

    #[test]
    fn pin_dir_carries_the_layout_version() {
        assert_eq!(
            pin_dir(Path::new("/sys/fs/bpf")),
            Path::new("/sys/fs/bpf/svc/v1")
        );
    }
}
