//! A background process inside a namespace (and optionally a cgroup), stopped on drop.

use std::{
    ffi::OsStr,
    fs,
    io::Read,
    os::unix::{
        fs::MetadataExt as _,
        process::{CommandExt as _, ExitStatusExt as _},
    },
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex, PoisonError},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};
use nix::{
    sys::{
        signal::{Signal, killpg},
        wait::{Id, WaitPidFlag, WaitStatus, waitid},
    },
    unistd::Pid,
};

use super::{cmd, ns::Netns};

/// How long [`Process::stop`] waits after `SIGTERM` before it sends `SIGKILL`.
pub const STOP_GRACE: Duration = Duration::from_secs(3);

/// How long `spawn` waits for the process to enter its namespace and cgroup.
const ENTER_TIMEOUT: Duration = Duration::from_secs(5);

/// Most bytes of output kept per process; more is dropped (and said so). An agent with
/// 100,000 Services and a full map logs one warning per frontend it cannot hold (over 4 MiB)
/// before the lines the harness waits for.
const OUTPUT_LIMIT: usize = 64 << 20;

/// Moves itself into the cgroup (when one is given), then becomes `nsenter`, which becomes the
/// command: the pid the harness holds is the command's own.
const WRAPPER: &str = r#"cg=$1; ns=$2; shift 2
if [ -n "$cg" ]; then
  echo $$ > "$cg/cgroup.procs" || { echo "svc-tests: cannot join cgroup $cg" >&2; exit 125; }
fi
exec nsenter --net="$ns" -- "$@""#;

/// A running background process. Dropping it stops it: `SIGTERM` to its process group,
/// [`STOP_GRACE`] to exit, then `SIGKILL`, then it is reaped. When the thread is panicking its
/// captured output is printed, so a failed test shows what the process said.
#[derive(Debug)]
pub struct Process {
    child: Child,
    label: String,
    output: Arc<Mutex<Vec<u8>>>,
    readers: Vec<JoinHandle<()>>,
    status: Option<ExitStatus>,
}

impl Process {
    pub(super) fn spawn(
        ns: &Netns,
        command: &Command,
        cgroup: Option<&Path>,
    ) -> anyhow::Result<Self> {
        let label = format!("`{}` in netns {ns}", cmd::describe(command));
        let mut wrapper = Command::new("sh");
        wrapper
            .arg("-c")
            .arg(WRAPPER)
            .arg("svc-tests-spawn")
            .arg(cgroup.map_or(OsStr::new(""), Path::as_os_str))
            .arg(ns.path())
            .arg(command.get_program())
            .args(command.get_args());
        for (key, value) in command.get_envs() {
            match value {
                Some(value) => wrapper.env(key, value),
                None => wrapper.env_remove(key),
            };
        }
        if let Some(dir) = command.get_current_dir() {
            wrapper.current_dir(dir);
        }
        wrapper
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = wrapper
            .spawn()
            .with_context(|| format!("starting {label}"))?;
        let output = Arc::new(Mutex::new(Vec::new()));
        let mut readers = Vec::new();
        let pipes: [Option<Box<dyn Read + Send>>; 2] = [
            child.stdout.take().map(|p| Box::new(p) as _),
            child.stderr.take().map(|p| Box::new(p) as _),
        ];
        for pipe in pipes.into_iter().flatten() {
            let sink = Arc::clone(&output);
            readers.push(std::thread::spawn(move || collect(pipe, &sink)));
        }
        let mut process = Self {
            child,
            label,
            output,
            readers,
            status: None,
        };
        process.wait_entered(ns)?;
        Ok(process)
    }

    /// Waits (bounded) until the process is inside `ns`: from then on it is also in its cgroup
    /// (the wrapper joins the cgroup before it enters the namespace), so the caller can rely
    /// on both as soon as `spawn` returns.
    fn wait_entered(&mut self, ns: &Netns) -> anyhow::Result<()> {
        let target =
            fs::metadata(ns.path()).with_context(|| format!("stat {}", ns.path().display()))?;
        let current = PathBuf::from(format!("/proc/{}/ns/net", self.pid()));
        let deadline = Instant::now() + ENTER_TIMEOUT;
        loop {
            if fs::metadata(&current)
                .is_ok_and(|m| m.ino() == target.ino() && m.dev() == target.dev())
            {
                return Ok(());
            }
            if let Some(status) = self.try_status()? {
                bail!(
                    "{} exited ({status}) before entering the namespace; output:\n{}",
                    self.label,
                    self.output()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not enter the namespace within {ENTER_TIMEOUT:?}",
                    self.label
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// The process id (also its process group id).
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What was started where, for messages.
    #[must_use]
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Everything the process wrote to stdout and stderr so far (interleaved as it arrived).
    #[must_use]
    pub fn output(&self) -> String {
        String::from_utf8_lossy(&self.output.lock().unwrap_or_else(PoisonError::into_inner))
            .into_owned()
    }

    /// The exit status if the process has exited, without waiting. When it has, whatever is
    /// left of its process group is killed before it is reaped (while the group id still
    /// cannot be reused).
    pub fn try_status(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        if self.status.is_none() && self.has_exited()? {
            self.reap()?;
        }
        Ok(self.status)
    }

    /// Waits until the output contains `needle` (e.g. a "ready" line), checking every 20 ms
    /// for at most `timeout`. Fails early if the process exits.
    pub fn wait_for_output(&mut self, needle: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.output().contains(needle) {
                return Ok(());
            }
            if let Some(status) = self.try_status()? {
                bail!(
                    "{} exited ({status}) before printing {needle:?}; output:\n{}",
                    self.label,
                    self.output()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not print {needle:?} within {timeout:?}; output:\n{}",
                    self.label,
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the process (`SIGTERM` to its group, `SIGKILL` after [`STOP_GRACE`]) and returns
    /// how it ended.
    pub fn stop(mut self) -> anyhow::Result<ExitStatus> {
        self.terminate()
    }

    /// Like [`Process::stop`], and also returns everything the process wrote, its last words
    /// included.
    pub fn stop_with_output(mut self) -> anyhow::Result<(ExitStatus, String)> {
        let status = self.terminate()?;
        Ok((status, self.output()))
    }

    /// Kills the process group with `SIGKILL` at once, without the grace [`Process::stop`]
    /// gives (the process runs none of its shutdown code), and returns how it ended.
    pub fn kill(mut self) -> anyhow::Result<ExitStatus> {
        if self.status.is_none() && !self.has_exited()? {
            // Not reaped yet, so the group id is still ours.
            killpg(self.pgid(), Signal::SIGKILL)
                .with_context(|| format!("sending SIGKILL to {}", self.label))?;
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.has_exited()? && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        // Reaps it; a process that has exited gets no further signal there (one that somehow
        // survived gets the usual SIGTERM, then SIGKILL again).
        self.terminate()
    }

    fn pgid(&self) -> Pid {
        // Linux pids fit in i32 (pid_max <= 2^22).
        Pid::from_raw(self.child.id().cast_signed())
    }

    /// Whether the leader has exited, without reaping it (its pid stays reserved).
    fn has_exited(&self) -> anyhow::Result<bool> {
        let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
        let state = waitid(Id::Pid(self.pgid()), flags)
            .with_context(|| format!("checking {}", self.label))?;
        Ok(!matches!(state, WaitStatus::StillAlive))
    }

    /// Kills what is left of the group and reaps the (exited) leader.
    fn reap(&mut self) -> anyhow::Result<()> {
        // ESRCH only means the group is already empty.
        let _ = killpg(self.pgid(), Signal::SIGKILL);
        self.status = Some(
            self.child
                .wait()
                .with_context(|| format!("reaping {}", self.label))?,
        );
        Ok(())
    }

    fn terminate(&mut self) -> anyhow::Result<ExitStatus> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        for (signal, grace) in [
            (Signal::SIGTERM, STOP_GRACE),
            (Signal::SIGKILL, Duration::from_secs(5)),
        ] {
            if self.has_exited()? {
                break;
            }
            // Not reaped yet, so the group id is still ours.
            let _ = killpg(self.pgid(), signal);
            let deadline = Instant::now() + grace;
            while !self.has_exited()? && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        if !self.has_exited()? {
            bail!("{} did not exit after SIGKILL", self.label);
        }
        self.reap()?;
        // The pipes close once every member of the group is gone; do not wait for ever on a
        // grandchild that left the group.
        let deadline = Instant::now() + Duration::from_secs(1);
        while self.readers.iter().any(|r| !r.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        for reader in std::mem::take(&mut self.readers) {
            if reader.is_finished() {
                let _ = reader.join();
            }
        }
        self.status
            .ok_or_else(|| anyhow!("{} has no exit status", self.label))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let stopped = self.terminate();
        if std::thread::panicking() {
            eprintln!(
                "--- output of {} ---\n{}--- end ---",
                self.label,
                self.output()
            );
        }
        match stopped {
            Ok(status) if status.signal().is_some() || status.success() => {}
            Ok(status) => eprintln!("svc-tests: {} ended with {status}", self.label),
            Err(e) => eprintln!("svc-tests: stopping {}: {e:#}", self.label),
        }
    }
}

/// Copies `pipe` into `sink` until end of file, keeping at most [`OUTPUT_LIMIT`] bytes.
fn collect(mut pipe: Box<dyn Read + Send>, sink: &Mutex<Vec<u8>>) {
    let mut buf = [0u8; 8192];
    let mut truncated = false;
    // Ends at end of file: when the process (and anything sharing its pipes) is gone.
    while let Ok(n) = pipe.read(&mut buf) {
        if n == 0 {
            break;
        }
        let mut out = sink.lock().unwrap_or_else(PoisonError::into_inner);
        let room = OUTPUT_LIMIT.saturating_sub(out.len());
        out.extend_from_slice(&buf[..n.min(room)]);
        if n > room && !truncated {
            truncated = true;
            out.extend_from_slice(b"\n[svc-tests: output truncated]\n");
        }
    }
}
