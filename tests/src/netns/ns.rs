//! A named network namespace (`/run/netns/<name>`): run code, commands and background processes
//! inside it.

use std::{
    ffi::OsStr,
    fs::File,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, anyhow};
use nix::sched::{CloneFlags, setns};

use super::{cmd, process::Process};

/// Where `ip netns add` puts its namespace files.
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// A handle on a named network namespace. Cheap to clone; it does not own the namespace (the
/// [`Topology`](super::Topology) that created it deletes it).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Netns {
    name: String,
    path: PathBuf,
    /// The Unix socket of this namespace's socket helper (a pod's: see [`super::sockd`]).
    sockd: Option<PathBuf>,
}

impl Netns {
    /// A handle on the existing namespace `name` (as `ip netns list` shows it).
    #[must_use]
    pub fn named(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            path: Path::new(NETNS_RUN_DIR).join(name),
            sockd: None,
        }
    }

    /// This handle with the socket helper serving on `sockd`: client sockets that code run
    /// with [`run`](Self::run) opens through [`sockd::socket`](super::sockd::socket) come from
    /// it (and so belong to its cgroup).
    #[must_use]
    pub fn with_sockd(mut self, sockd: PathBuf) -> Self {
        self.sockd = Some(sockd);
        self
    }

    /// The namespace's name, for `ip -n NAME` / `ip netns exec NAME`.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace file, `/run/netns/<name>`.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on a new thread that has entered this namespace (`setns(CLONE_NEWNET)`) and
    /// returns its result. Sockets `f` opens stay in this namespace after it returns, so a test
    /// can create a listener here and use it from its own thread; aya attach calls that take an
    /// interface name resolve it in this namespace. Client sockets the harness opens in `f`
    /// come from the namespace's socket helper when it has one (a pod's sockets belong to the
    /// pod's cgroup: see [`super::sockd`]). A panic in `f` is passed on to the caller.
    pub fn run<T, F>(&self, f: F) -> anyhow::Result<T>
    where
        F: FnOnce() -> anyhow::Result<T> + Send,
        T: Send,
    {
        let file = File::open(&self.path)
            .with_context(|| format!("opening netns file {}", self.path.display()))?;
        let sockd = self.sockd.clone();
        let result = std::thread::scope(|scope| {
            let thread = std::thread::Builder::new()
                .name(format!("netns:{}", self.name))
                .spawn_scoped(scope, move || {
                    setns(&file, CloneFlags::CLONE_NEWNET).context("setns(CLONE_NEWNET)")?;
                    super::sockd::set_current(sockd);
                    f()
                })
                .context("spawning the namespace thread")?;
            match thread.join() {
                Ok(result) => result,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        });
        result.with_context(|| format!("in netns {}", self.name))
    }

    /// Runs `args` inside this namespace (`ip netns exec NAME args...`, which also mounts a
    /// `/sys` for the namespace) and returns its stdout; fails with its stderr when it exits
    /// non-zero.
    pub fn exec<I, S>(&self, args: I) -> anyhow::Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name]).args(args);
        cmd::output(&mut command, None)
    }

    /// `ip -n NAME args...`: returns stdout, fails with stderr.
    pub fn ip<I, S>(&self, args: I) -> anyhow::Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut command = Command::new("ip");
        command.args(["-n", &self.name]).args(args);
        cmd::output(&mut command, None)
    }

    /// Runs several `ip` commands in one go (`ip -n NAME -batch -`), one per line, stopping
    /// at the first that fails. Lines carry no `-4`/`-6`; the family follows the addresses.
    pub fn ip_batch<S: AsRef<str>>(&self, lines: &[S]) -> anyhow::Result<()> {
        let mut input = lines
            .iter()
            .map(AsRef::as_ref)
            .collect::<Vec<_>>()
            .join("\n");
        input.push('\n');
        let mut command = Command::new("ip");
        command.args(["-n", &self.name, "-batch", "-"]);
        cmd::output(&mut command, Some(&input)).map(drop)
    }

    /// Sets sysctls in this namespace (`key=value` items, e.g. `net.ipv4.ip_forward=1`).
    pub fn sysctl(&self, settings: &[&str]) -> anyhow::Result<()> {
        let mut args = vec!["sysctl", "-q", "-w"];
        args.extend_from_slice(settings);
        self.exec(args).map(drop)
    }

    /// Starts `command` in the background inside this namespace, and inside the cgroup v2
    /// directory `cgroup` when given (the process moves itself there before it execs, so every
    /// socket it opens belongs to that cgroup). Unlike [`Netns::exec`] this enters only the
    /// network namespace (`nsenter --net`), so the process sees the host's `/sys` (cgroup and
    /// bpffs paths). Program, arguments, added environment variables and working directory of
    /// `command` are used; stdout and stderr are captured (see [`Process::output`]). The
    /// returned guard stops the process (and its process group) on drop.
    pub fn spawn(&self, command: &Command, cgroup: Option<&Path>) -> anyhow::Result<Process> {
        Process::spawn(self, command, cgroup)
    }

    /// Waits (bounded: `tries` checks, `step` apart) until every interface in `ifnames` exists
    /// here with its carrier up (`LOWER_UP`).
    pub fn wait_links_up(
        &self,
        ifnames: &[&str],
        tries: u32,
        step: std::time::Duration,
    ) -> anyhow::Result<()> {
        let mut missing = Vec::new();
        for _ in 0..tries {
            let links = self.ip(["-o", "link", "show"])?;
            missing = ifnames
                .iter()
                .filter(|want| {
                    !links.lines().any(|l| {
                        let name = l.split_whitespace().nth(1).unwrap_or_default();
                        let name = name.trim_end_matches(':');
                        let name = name.split('@').next().unwrap_or_default();
                        name == **want && l.contains("LOWER_UP")
                    })
                })
                .map(|s| (*s).to_owned())
                .collect();
            if missing.is_empty() {
                return Ok(());
            }
            std::thread::sleep(step);
        }
        Err(anyhow!(
            "interfaces {missing:?} in netns {} not up after {tries} checks",
            self.name
        ))
    }
}

impl std::fmt::Display for Netns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}
