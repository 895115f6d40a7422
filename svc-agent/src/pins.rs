//! What the agent pins on bpffs, where, and what it does with what an earlier agent left.
//!
//! ```text
//! <bpffs>/svc/                              PIN_ROOT: one directory per map layout version
//! <bpffs>/svc/v1/                           PIN_SUBDIR: everything of layout 1, nothing else
//!   <MAP_NAME>                              every map of svc_common::MAP_NAMES
//!   links/tc/<ifindex>/ingress              TCX link, ingress: svc_tc_from_pod (pod-facing) or svc_tc_from_world (node-facing)
//!   links/tc/<ifindex>/egress               TCX link, egress: svc_tc_to_pod or svc_tc_to_world, same interface
//!   links/tc/<ifindex>/xdp-native           XDP link (node-facing, --xdp native): svc_xdp_from_world
//!   links/tc/<ifindex>/xdp-generic          XDP link (node-facing, --xdp generic): svc_xdp_from_world
//!   links/cgroup/<cgroup id>/<program>      cgroup link of one connect-time program (svc_sock_*)
//! ```
//!
//! A pinned link keeps its program attached after the agent exits, however it exits: the
//! datapath goes on translating with the pinned maps (conntrack and affinity included) while
//! no agent runs. TC links are keyed by ifindex, which a rename does not change; the cgroup id
//! is the inode number of the cgroup's directory. The interface's role (`ifaces::IfaceRole`) is
//! not in the layout: the program a TC link runs says it, so a link taken over or swapped to
//! the other role keeps its pin.
//!
//! A link is pinned under `<name>-new` first and renamed over `<name>` (bpffs renames
//! atomically, replacing what was there): at every instant each hook has a pinned link, the
//! earlier agent's or this one's, even if the agent is killed in between. Whatever a pin
//! replaces is released by the kernel shortly after (its program detaches). bpffs refuses
//! names with a dot (`EPERM`), hence the dash.
//!
//! The decisions about an earlier agent's pins (which are stale, which layouts are not ours)
//! are pure functions here, tested beside them; the attaching itself is in `ifaces` (TC) and
//! `cgroup` (connect-time).

use std::{
    collections::BTreeSet,
    fs,
    io::ErrorKind,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use aya::programs::links::{FdLink, LinkInfo, PinnedLink};
use svc_common::{MAP_LAYOUT_VERSION, PIN_ROOT};

/// Directory of the links, below a layout's pin directory.
pub const LINKS: &str = "links";
/// Directory of the TC links, below [`LINKS`].
pub const TC: &str = "tc";
/// Directory of the connect-time (cgroup) links, below [`LINKS`].
pub const CGROUP: &str = "cgroup";
/// Suffix of a link being pinned, before it is renamed over its final name.
const REPLACING: &str = "-new";

/// A TC hook of a followed (pod-facing or node-facing) interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TcHook {
    /// Ingress: packets from the pod (pod-facing) or from outside the node (node-facing).
    Ingress,
    /// Egress: packets to the pod (pod-facing) or leaving the node (node-facing).
    Egress,
}

impl TcHook {
    /// Both hooks.
    pub const ALL: [Self; 2] = [Self::Ingress, Self::Egress];

    /// The hook's pin name (`ingress`, `egress`).
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Ingress => "ingress",
            Self::Egress => "egress",
        }
    }

    /// The hook a pin name stands for.
    #[must_use]
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|h| h.name() == name)
    }
}

/// How the XDP program goes on node-facing interfaces (`--xdp`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpAttach {
    /// In the driver (`XDP_FLAGS_DRV_MODE`): before the kernel builds a socket buffer.
    Native,
    /// In the stack (`XDP_FLAGS_SKB_MODE`): any interface, after the socket buffer is built.
    Generic,
    /// No XDP: the TC programs serve everything.
    Off,
}

impl XdpAttach {
    /// The pin names of XDP links, one per mode.
    pub const PINS: [&str; 2] = ["xdp-native", "xdp-generic"];

    /// The link's pin name in an interface's directory (`None` for [`Self::Off`]).
    #[must_use]
    pub const fn pin_name(self) -> Option<&'static str> {
        match self {
            Self::Native => Some(Self::PINS[0]),
            Self::Generic => Some(Self::PINS[1]),
            Self::Off => None,
        }
    }

    /// The flag's value (`native`, `generic`, `off`).
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Native => "native",
            Self::Generic => "generic",
            Self::Off => "off",
        }
    }
}

/// Whether `name` is the pin of a link of a followed interface: a TC hook's or an XDP link's.
#[must_use]
pub fn is_iface_link_pin(name: &str) -> bool {
    TcHook::from_name(name).is_some() || XdpAttach::PINS.contains(&name)
}

/// `<pin dir>/links`.
#[must_use]
pub fn links_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join(LINKS)
}

/// `<pin dir>/links/tc`.
#[must_use]
pub fn tc_dir(pin_dir: &Path) -> PathBuf {
    links_dir(pin_dir).join(TC)
}

/// `<pin dir>/links/tc/<ifindex>`: the links of one followed interface.
#[must_use]
pub fn tc_iface_dir(pin_dir: &Path, ifindex: u32) -> PathBuf {
    tc_dir(pin_dir).join(ifindex.to_string())
}

/// `<pin dir>/links/tc/<ifindex>/<hook>`.
#[must_use]
pub fn tc_link_path(pin_dir: &Path, ifindex: u32, hook: TcHook) -> PathBuf {
    tc_iface_dir(pin_dir, ifindex).join(hook.name())
}

/// `<pin dir>/links/cgroup`.
#[must_use]
pub fn cgroup_dir(pin_dir: &Path) -> PathBuf {
    links_dir(pin_dir).join(CGROUP)
}

/// `<pin dir>/links/cgroup/<cgroup id>/<program>`.
#[must_use]
pub fn cgroup_link_path(pin_dir: &Path, cgroup_id: u64, program: &str) -> PathBuf {
    cgroup_dir(pin_dir)
        .join(cgroup_id.to_string())
        .join(program)
}

/// What is pinned for one TC hook, as far as the decision needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PinnedTcLink {
    /// Whether the kernel says it is a TCX link.
    pub is_tcx: bool,
    /// The program it runs.
    pub program_id: u32,
}

/// What to do on one TC hook of a followed interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcPinAction {
    /// Nothing is pinned: attach a new link and pin it.
    Attach,
    /// This agent's program is pinned and on the hook already: nothing to do.
    Keep,
    /// An earlier agent's link on this hook, or this agent's link running the interface's
    /// other role's program: give it the program wanted now in place (`BPF_LINK_UPDATE`).
    Update,
    /// A pin whose link is not on this hook (its interface was deleted and the ifindex reused
    /// while no agent ran, or it is no TCX link): attach a new link and pin it over the stale one.
    Replace,
}

/// Decides what to do on a TC hook from what is pinned for it (`None`: nothing), the ids of
/// the programs the hook runs (`BPF_PROG_QUERY`) and this agent's program id. A pinned link
/// counts as on the hook when the hook runs its program: each agent loads its programs once,
/// so a program id names one agent's links, and a link on another interface or a defunct one
/// (its interface gone) does not put its program on this hook.
#[must_use]
pub fn tc_pin_action(pinned: Option<PinnedTcLink>, on_hook: &[u32], ours: u32) -> TcPinAction {
    let Some(link) = pinned else {
        return TcPinAction::Attach;
    };
    if !link.is_tcx || !on_hook.contains(&link.program_id) {
        return TcPinAction::Replace;
    }
    if link.program_id == ours {
        TcPinAction::Keep
    } else {
        TcPinAction::Update
    }
}

/// One directory of a two-level pin tree (`links/tc`, `links/cgroup`): its name and the
/// names of the files in it.
pub type PinGroup = (String, Vec<String>);

/// What to remove of `links/tc` (paths relative to it), given its groups and the ifindexes
/// of the interfaces that have a role now: the directory of every other ifindex (an
/// interface deleted, or renamed out of the patterns, while no agent ran; removing its pins
/// detaches what is still attached), and in the others any file that is not a hook's or an XDP
/// link's pin (a `-new` left by an agent killed while pinning).
#[must_use]
pub fn stale_tc_pins(groups: &[PinGroup], live: &BTreeSet<u32>) -> Vec<PathBuf> {
    let mut stale = Vec::new();
    for (dir, files) in groups {
        let is_live = dir
            .parse::<u32>()
            .is_ok_and(|i| live.contains(&i) && i.to_string() == *dir);
        if !is_live {
            stale.push(PathBuf::from(dir));
            continue;
        }
        stale.extend(
            files
                .iter()
                .filter(|f| !is_iface_link_pin(f))
                .map(|f| Path::new(dir).join(f)),
        );
    }
    stale
}

/// What to remove of `links/cgroup` (paths relative to it), given its groups, the cgroup the
/// connect-time programs are attached to now (`None`: connect-time translation is off) and
/// their names: every other cgroup's directory, and in the current one every file that is
/// not one of `programs`' pins.
#[must_use]
pub fn stale_cgroup_pins(
    groups: &[PinGroup],
    current: Option<u64>,
    programs: &[&str],
) -> Vec<PathBuf> {
    let mut stale = Vec::new();
    for (dir, files) in groups {
        if current.is_none_or(|id| id.to_string() != *dir) {
            stale.push(PathBuf::from(dir));
            continue;
        }
        stale.extend(
            files
                .iter()
                .filter(|f| !programs.contains(&f.as_str()))
                .map(|f| Path::new(dir).join(f)),
        );
    }
    stale
}

/// A directory below [`PIN_ROOT`], classified against this agent's layout version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayoutDir {
    /// `v<this version>`: this agent's own.
    Current,
    /// `v<n>` with `n` below this agent's version: left by an older agent.
    Older(u32),
    /// `v<n>` with `n` above this agent's version: left by a newer agent (a rollback).
    Newer(u32),
    /// Anything else: not a layout directory; left alone.
    Unknown,
}

/// Classifies the directory `name` below [`PIN_ROOT`] for an agent of layout `current`.
#[must_use]
pub fn classify_layout(name: &str, current: u32) -> LayoutDir {
    let Some(n) = name.strip_prefix('v').and_then(|d| d.parse::<u32>().ok()) else {
        return LayoutDir::Unknown;
    };
    // `v01`, `v+1`: not a name any agent writes.
    if format!("v{n}") != name {
        return LayoutDir::Unknown;
    }
    match n.cmp(&current) {
        std::cmp::Ordering::Equal => LayoutDir::Current,
        std::cmp::Ordering::Less => LayoutDir::Older(n),
        std::cmp::Ordering::Greater => LayoutDir::Newer(n),
    }
}

/// Another layout's pin directory found at startup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OtherLayout {
    /// `<bpffs>/svc/v<version>`.
    pub path: PathBuf,
    /// Its layout version.
    pub version: u32,
}

impl OtherLayout {
    /// `older` or `newer`, compared with this agent's layout.
    #[must_use]
    pub fn relation(&self) -> &'static str {
        if self.version < MAP_LAYOUT_VERSION {
            "older"
        } else {
            "newer"
        }
    }
}

/// The other layouts' directories below `<bpffs>/svc` (in version order), and the entries
/// there that are no layout directory.
pub fn other_layouts(bpffs: &Path) -> anyhow::Result<(Vec<OtherLayout>, Vec<PathBuf>)> {
    let root = bpffs.join(PIN_ROOT);
    let mut layouts = Vec::new();
    let mut unknown = Vec::new();
    for name in entry_names(&root)? {
        let path = root.join(&name);
        match classify_layout(&name, MAP_LAYOUT_VERSION) {
            LayoutDir::Current => {}
            LayoutDir::Older(version) | LayoutDir::Newer(version) => {
                layouts.push(OtherLayout { path, version });
            }
            LayoutDir::Unknown => unknown.push(path),
        }
    }
    layouts.sort_by_key(|l| l.version);
    Ok((layouts, unknown))
}

/// How many pins a removal took away.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PinCount {
    /// Pinned links (files below `links/`): their programs detach.
    pub links: usize,
    /// Other pinned objects (maps): freed once no program holds them.
    pub maps: usize,
}

/// Removes a whole pin directory (a layout's, or all of [`PIN_ROOT`]) and says how many
/// links and maps it held; nothing when it does not exist.
pub fn remove_tree(dir: &Path) -> anyhow::Result<PinCount> {
    let mut count = PinCount::default();
    count_pins(dir, false, &mut count)?;
    match fs::remove_dir_all(dir) {
        Ok(()) => Ok(count),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(PinCount::default()),
        Err(e) => Err(e).with_context(|| format!("removing {}", dir.display())),
    }
}

fn count_pins(dir: &Path, in_links: bool, count: &mut PinCount) -> anyhow::Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    };
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            let links = in_links || entry.file_name() == LINKS;
            count_pins(&path, links, count)?;
        } else if in_links {
            count.links += 1;
        } else {
            count.maps += 1;
        }
    }
    Ok(())
}

/// The names in `dir`, sorted; none when it does not exist.
fn entry_names(dir: &Path) -> anyhow::Result<Vec<String>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

/// The groups of a two-level pin tree (`links/tc`, `links/cgroup`); a file directly in it
/// is a group without files.
pub fn pin_groups(dir: &Path) -> anyhow::Result<Vec<PinGroup>> {
    let mut groups = Vec::new();
    for name in entry_names(dir)? {
        let path = dir.join(&name);
        let files = if path.is_dir() {
            entry_names(&path)?
        } else {
            Vec::new()
        };
        groups.push((name, files));
    }
    Ok(groups)
}

/// Removes `rel` (files or directories, relative to `base`); returns what was removed.
pub fn remove_relative(base: &Path, rel: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    for r in rel {
        let path = base.join(r);
        let result = if path.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        match result {
            Ok(()) => removed.push(path),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
        }
    }
    Ok(removed)
}

/// The link pinned at `path` with what the kernel says about it; `None` when nothing is
/// pinned there.
pub fn open_link(path: &Path) -> anyhow::Result<Option<(FdLink, LinkInfo)>> {
    match fs::symlink_metadata(path) {
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("stat {}", path.display())),
    }
    let link = FdLink::from(
        PinnedLink::from_pin(path)
            .with_context(|| format!("opening the pinned link {}", path.display()))?,
    );
    let info = link
        .info()
        .with_context(|| format!("reading the link pinned at {}", path.display()))?;
    Ok(Some((link, info)))
}

/// Pins `link` at `path`, replacing atomically whatever is pinned there (see the module
/// documentation): pinned as `<path>-new`, then renamed over `path`. Creates the parent
/// directories. On error the link is not pinned (and detaches when its last descriptor goes).
pub fn pin_replacing(link: FdLink, path: &Path) -> anyhow::Result<()> {
    let parent = path
        .parent()
        .with_context(|| format!("{} has no parent directory", path.display()))?;
    fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(REPLACING);
    let tmp = PathBuf::from(tmp);
    // Left by an agent killed between pinning and renaming: a link of that agent's.
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", tmp.display())),
    }
    link.pin(&tmp)
        .with_context(|| format!("pinning a link at {}", tmp.display()))?;
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()));
    }
    Ok(())
}

/// Why a pin directory may not be used: it is no directory, or someone other than root owns
/// it or may write to it (and so could replace what the agent pins, or rename it away so the
/// next agent finds nothing and leaves stale programs attached). `None`: safe. `uid` and `mode`
/// are the directory's (`lstat`: a symbolic link is no directory).
#[must_use]
pub fn unsafe_dir_reason(is_dir: bool, uid: u32, mode: u32) -> Option<String> {
    const GROUP_OTHER_WRITE: u32 = 0o022;
    if !is_dir {
        return Some("it is not a directory".to_owned());
    }
    if uid != 0 {
        return Some(format!("it is owned by uid {uid}, not root"));
    }
    if mode & GROUP_OTHER_WRITE != 0 {
        return Some(format!(
            "its mode {:04o} lets group or others write to it",
            mode & 0o7777
        ));
    }
    None
}

/// Creates `dir` (mode 0700) unless it exists, then checks that it is a directory only root may
/// write to (see [`unsafe_dir_reason`]); refuses with a message that says what to do otherwise.
pub fn ensure_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _};

    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
    }
    let meta = fs::symlink_metadata(dir).with_context(|| format!("stat {}", dir.display()))?;
    if let Some(why) = unsafe_dir_reason(meta.is_dir(), meta.uid(), meta.mode()) {
        anyhow::bail!(
            "refusing to use the pin directory {}: {why}; only root may own and write the \
             agent's pin directories (someone else could replace or rename what is pinned \
             there). Check who made it, then remove it (for a directory of stale pins: \
             `svc-agent cleanup`) or fix it (`chown root:root`, `chmod go-w`), and start again",
            dir.display()
        );
    }
    Ok(())
}

/// The exclusive lock on `<bpffs>/svc` that `svc-agent run` holds for its whole life (and
/// `cleanup` while it removes pins): one agent per node. Released when dropped or when the
/// process ends, however it ends (a `flock` on the directory's open file description).
#[derive(Debug)]
pub struct PinRootLock {
    _lock: nix::fcntl::Flock<fs::File>,
    path: PathBuf,
}

impl PinRootLock {
    /// The locked directory.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Creates `<bpffs>/svc` if needed (mode 0700), checks it (see [`ensure_private_dir`]) and takes
/// its exclusive lock (see [`lock_dir`]).
pub fn lock_pin_root(bpffs: &Path) -> anyhow::Result<PinRootLock> {
    let root = bpffs.join(PIN_ROOT);
    ensure_private_dir(&root)?;
    lock_dir(&root)
}

/// Takes the exclusive lock on the directory `root` (`<bpffs>/svc`) without waiting. Fails at
/// once, naming the holder's pid, when another process (an agent, a `cleanup`) holds it.
pub fn lock_dir(root: &Path) -> anyhow::Result<PinRootLock> {
    use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};

    use nix::fcntl::{Flock, FlockArg};

    let root = root.to_owned();
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_DIRECTORY | nix::libc::O_NOFOLLOW)
        .open(&root)
        .with_context(|| format!("opening {}", root.display()))?;
    // The directory opened must be the one checked (not renamed and replaced in between).
    let (opened, checked) = (file.metadata()?, fs::symlink_metadata(&root)?);
    anyhow::ensure!(
        opened.dev() == checked.dev() && opened.ino() == checked.ino(),
        "{} changed while it was being opened; start again",
        root.display()
    );
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(PinRootLock {
            _lock: lock,
            path: root,
        }),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
            let holder = lock_holder(&root).ok().flatten().map_or_else(
                || "a process this one cannot see".to_owned(),
                |pid| format!("pid {pid}"),
            );
            anyhow::bail!(
                "another svc-agent ({holder}) holds the lock on {}: one agent per node and bpffs \
                 (two would hand out the same ids to different backends and delete each other's \
                 entries). Stop it first, or point --bpffs elsewhere",
                root.display()
            )
        }
        Err((_, e)) => Err(e).with_context(|| format!("flock {}", root.display())),
    }
}

/// The pid of the process holding the lock on `root` (`<bpffs>/svc`), from `/proc/locks`;
/// `None` when nobody holds it (or `root` does not exist). Takes no lock itself, so it never
/// gets in the way of an agent starting.
pub fn lock_holder(root: &Path) -> anyhow::Result<Option<u32>> {
    use std::os::unix::fs::MetadataExt as _;

    let meta = match fs::symlink_metadata(root) {
        Ok(meta) => meta,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("stat {}", root.display())),
    };
    let locks = fs::read_to_string("/proc/locks").context("reading /proc/locks")?;
    let dev = meta.dev();
    Ok(flock_holder(
        &locks,
        nix::sys::stat::major(dev),
        nix::sys::stat::minor(dev),
        meta.ino(),
    ))
}

/// The pid holding a `flock` on the inode `(major, minor, ino)` according to `proc_locks` (the
/// text of `/proc/locks`: `1: FLOCK  ADVISORY  WRITE 4242 00:2a:1234 0 EOF`; waiters' lines
/// carry `->` and are skipped).
#[must_use]
pub fn flock_holder(proc_locks: &str, major: u64, minor: u64, ino: u64) -> Option<u32> {
    let want = format!("{major:02x}:{minor:02x}:{ino}");
    proc_locks.lines().find_map(|line| {
        let mut f = line.split_whitespace();
        let (_, kind, next) = (f.next()?, f.next()?, f.next()?);
        if kind != "FLOCK" || next == "->" {
            return None;
        }
        let (_, pid, inode) = (f.next()?, f.next()?, f.next()?);
        (inode == want).then(|| pid.parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use svc_common::PIN_SUBDIR;

    use super::*;

    fn group(dir: &str, files: &[&str]) -> PinGroup {
        (
            dir.to_owned(),
            files.iter().map(|f| (*f).to_owned()).collect(),
        )
    }

    #[test]
    fn the_pin_subdirectory_is_the_root_plus_the_layout_version() {
        assert_eq!(PIN_SUBDIR, format!("{PIN_ROOT}/v{MAP_LAYOUT_VERSION}"));
    }

    #[test]
    fn pins_are_named_by_ifindex_hook_cgroup_and_program() {
        let dir = Path::new("/sys/fs/bpf/svc/v1");
        assert_eq!(
            tc_link_path(dir, 7, TcHook::Ingress),
            Path::new("/sys/fs/bpf/svc/v1/links/tc/7/ingress")
        );
        assert_eq!(
            tc_link_path(dir, 7, TcHook::Egress),
            Path::new("/sys/fs/bpf/svc/v1/links/tc/7/egress")
        );
        assert_eq!(
            cgroup_link_path(dir, 4242, "svc_sock_conn4"),
            Path::new("/sys/fs/bpf/svc/v1/links/cgroup/4242/svc_sock_conn4")
        );
        for hook in TcHook::ALL {
            assert_eq!(TcHook::from_name(hook.name()), Some(hook));
        }
        assert_eq!(TcHook::from_name("ingress-new"), None);
    }

    #[test]
    fn a_tc_hook_is_attached_kept_updated_or_replaced() {
        let ours = 50;
        let pinned = |program_id, is_tcx| Some(PinnedTcLink { is_tcx, program_id });
        // First agent on this interface.
        assert_eq!(tc_pin_action(None, &[], ours), TcPinAction::Attach);
        // Another program (someone else's) on the hook does not matter.
        assert_eq!(tc_pin_action(None, &[7], ours), TcPinAction::Attach);
        // A restart: the earlier agent's link runs its program on this hook.
        assert_eq!(
            tc_pin_action(pinned(40, true), &[7, 40], ours),
            TcPinAction::Update
        );
        // Already done by this agent (an interface that appears twice).
        assert_eq!(
            tc_pin_action(pinned(50, true), &[50], ours),
            TcPinAction::Keep
        );
        // The pinned link is defunct or elsewhere: the ifindex now names a new interface.
        assert_eq!(
            tc_pin_action(pinned(40, true), &[], ours),
            TcPinAction::Replace
        );
        assert_eq!(
            tc_pin_action(pinned(50, true), &[7], ours),
            TcPinAction::Replace
        );
        // Not a TCX link at all.
        assert_eq!(
            tc_pin_action(pinned(40, false), &[40], ours),
            TcPinAction::Replace
        );
    }

    #[test]
    fn tc_pins_of_interfaces_no_longer_pod_facing_are_stale() {
        let groups = [
            group("3", &["ingress", "egress", "xdp-native"]),
            // Gone (or renamed out of the patterns) while no agent ran.
            group("4", &["ingress", "egress", "xdp-generic"]),
            // Killed between pinning and renaming.
            group("5", &["ingress", "egress", "egress-new", "xdp-generic-new"]),
            // Not a name the agent writes.
            group("05", &["ingress"]),
            group("junk", &[]),
        ];
        let live: BTreeSet<u32> = [3, 5, 9].into_iter().collect();
        assert_eq!(
            stale_tc_pins(&groups, &live),
            [
                PathBuf::from("4"),
                PathBuf::from("5/egress-new"),
                PathBuf::from("5/xdp-generic-new"),
                PathBuf::from("05"),
                PathBuf::from("junk"),
            ]
        );
        assert!(stale_tc_pins(&groups[..1], &live).is_empty());
        // No followed interface at all: every pin goes.
        assert_eq!(stale_tc_pins(&groups, &BTreeSet::new()).len(), groups.len());
    }

    #[test]
    fn cgroup_pins_of_other_cgroups_and_leftovers_are_stale() {
        let programs = ["svc_sock_conn4", "svc_sock_conn6"];
        let groups = [
            group(
                "100",
                &["svc_sock_conn4", "svc_sock_conn6", "svc_sock_conn4-new"],
            ),
            // The agent ran with another --cgroup before.
            group("200", &["svc_sock_conn4"]),
        ];
        assert_eq!(
            stale_cgroup_pins(&groups, Some(100), &programs),
            [
                PathBuf::from("100/svc_sock_conn4-new"),
                PathBuf::from("200")
            ]
        );
        // Connect-time translation turned off: every cgroup pin goes.
        assert_eq!(
            stale_cgroup_pins(&groups, None, &programs),
            [PathBuf::from("100"), PathBuf::from("200")]
        );
        assert_eq!(
            stale_cgroup_pins(&groups, Some(300), &programs),
            [PathBuf::from("100"), PathBuf::from("200")]
        );
    }

    #[test]
    fn layout_directories_are_classified_by_version() {
        assert_eq!(classify_layout("v2", 2), LayoutDir::Current);
        assert_eq!(classify_layout("v1", 2), LayoutDir::Older(1));
        assert_eq!(classify_layout("v0", 2), LayoutDir::Older(0));
        assert_eq!(classify_layout("v3", 2), LayoutDir::Newer(3));
        for name in ["v", "v02", "v+3", "vx", "links", "V2", "v2-new"] {
            assert_eq!(classify_layout(name, 2), LayoutDir::Unknown, "{name}");
        }
    }

    #[test]
    fn pin_trees_are_listed_counted_and_removed() {
        // A plain directory stands in for bpffs: listing, counting and removing are the same.
        let root = std::env::temp_dir().join(format!("svc-pins-test-{}", std::process::id()));
        let layout = root.join("svc/v0");
        fs::create_dir_all(layout.join("links/tc/7")).unwrap();
        fs::create_dir_all(layout.join("links/cgroup/9")).unwrap();
        fs::create_dir_all(root.join("svc/v1")).unwrap();
        fs::create_dir_all(root.join("svc/other")).unwrap();
        for f in [
            "CT_V1",
            "SERVICES_V1",
            "links/tc/7/ingress",
            "links/tc/7/egress",
            "links/cgroup/9/svc_sock_conn4",
        ] {
            fs::write(layout.join(f), b"").unwrap();
        }
        let (others, unknown) = other_layouts(&root).unwrap();
        assert_eq!(
            others,
            [OtherLayout {
                path: layout.clone(),
                version: 0
            }]
        );
        assert_eq!(others[0].relation(), "older");
        assert_eq!(unknown, [root.join("svc/other")]);
        assert_eq!(
            pin_groups(&tc_dir(&layout)).unwrap(),
            [group("7", &["egress", "ingress"])]
        );
        let removed = remove_relative(
            &tc_dir(&layout),
            &[PathBuf::from("7/egress"), PathBuf::from("8")],
        )
        .unwrap();
        assert_eq!(removed, [tc_dir(&layout).join("7/egress")]);
        assert_eq!(
            remove_tree(&layout).unwrap(),
            PinCount { links: 2, maps: 2 }
        );
        assert!(!layout.exists());
        assert_eq!(remove_tree(&layout).unwrap(), PinCount::default());
        assert!(other_layouts(&root.join("nothing")).unwrap().0.is_empty());
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn pin_directories_must_be_root_owned_directories_nobody_else_writes() {
        assert_eq!(unsafe_dir_reason(true, 0, 0o40700), None);
        assert_eq!(unsafe_dir_reason(true, 0, 0o40755), None);
        assert_eq!(unsafe_dir_reason(true, 0, 0o41755), None);
        assert_eq!(
            unsafe_dir_reason(true, 1000, 0o40700).unwrap(),
            "it is owned by uid 1000, not root"
        );
        assert_eq!(
            unsafe_dir_reason(true, 0, 0o40777).unwrap(),
            "its mode 0777 lets group or others write to it"
        );
        assert!(unsafe_dir_reason(true, 0, 0o40720).is_some());
        assert_eq!(
            unsafe_dir_reason(false, 0, 0o100_600).unwrap(),
            "it is not a directory"
        );
    }

    #[test]
    fn the_lock_holder_is_found_by_device_and_inode_in_proc_locks() {
        let locks = "1: POSIX  ADVISORY  WRITE 77 00:2a:99 0 EOF\n\
                     2: FLOCK  ADVISORY  WRITE 4242 00:2a:1234 0 EOF\n\
                     2: -> FLOCK  ADVISORY  WRITE 4343 00:2a:1234 0 EOF\n\
                     3: FLOCK  ADVISORY  WRITE 5151 103:0a:1234 0 EOF\n";
        assert_eq!(flock_holder(locks, 0, 0x2a, 1234), Some(4242));
        assert_eq!(flock_holder(locks, 0x103, 0x0a, 1234), Some(5151));
        assert_eq!(
            flock_holder(locks, 0, 0x2a, 99),
            None,
            "POSIX locks are not ours"
        );
        assert_eq!(flock_holder(locks, 0, 0x2b, 1234), None);
        assert_eq!(flock_holder("", 0, 0x2a, 1234), None);
    }
}
