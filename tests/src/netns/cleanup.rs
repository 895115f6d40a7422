//! Finding and removing what a run created: namespaces, cgroups, bpffs mounts, its run
//! directory. Everything is found by the run's prefix, so the same code cleans up after a
//! finished run (on drop) and after a run that was killed (at the next start).

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use nix::{
    mount::{MntFlags, umount2},
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use super::{cmd, plan::TEST_PREFIX};

/// The cgroup v2 hierarchy on the test machines (hybrid layout).
pub const CGROUP2_ROOT: &str = "/sys/fs/cgroup/unified";

/// Parent of every run's directory (`/run/svc-tests/<prefix>/<node>/bpffs`).
pub const RUN_ROOT: &str = "/run/svc-tests";

/// The run's own directory.
#[must_use]
pub fn run_dir(prefix: &str) -> PathBuf {
    Path::new(RUN_ROOT).join(prefix)
}

/// Names from `ip netns list` that belong to the run `prefix` (`<prefix>-...`).
pub fn netns_with_prefix(prefix: &str) -> anyhow::Result<Vec<String>> {
    let owned = format!("{prefix}-");
    Ok(all_netns()?
        .into_iter()
        .filter(|n| n.starts_with(&owned))
        .collect())
}

/// Whether a filesystem of type `fstype` is mounted at `path` (per `/proc/mounts`).
#[must_use]
pub fn is_mounted(path: &Path, fstype: &str) -> bool {
    std::fs::read_to_string("/proc/mounts").is_ok_and(|m| {
        m.lines().any(|l| {
            let mut f = l.split_whitespace();
            f.nth(1) == path.to_str() && f.next() == Some(fstype)
        })
    })
}

/// Panics, naming what is left, unless nothing of run `prefix` exists any more (namespaces,
/// cgroups, bpffs and other mounts, the run directory). Tests call it after dropping their
/// topology.
///
/// # Panics
/// When something of the run remains, or the system cannot be asked.
pub fn assert_run_gone(prefix: &str) {
    let left = leftovers(prefix).expect("listing what is left of the run");
    assert!(left.is_empty(), "leftovers of {prefix}: {left:?}");
}

/// Everything of the run `prefix` that still exists, one line each ("netns ...", "cgroup ...",
/// "mount ...", "dir ..."); empty once the run is cleaned up.
pub fn leftovers(prefix: &str) -> anyhow::Result<Vec<String>> {
    let mut left: Vec<String> = netns_with_prefix(prefix)?
        .into_iter()
        .map(|n| format!("netns {n}"))
        .collect();
    left.extend(
        cgroups_of(prefix)?
            .iter()
            .map(|c| format!("cgroup {}", c.display())),
    );
    left.extend(
        mounts_under(&run_dir(prefix))?
            .iter()
            .map(|m| format!("mount {}", m.display())),
    );
    if run_dir(prefix).exists() {
        left.push(format!("dir {}", run_dir(prefix).display()));
    }
    Ok(left)
}

/// Removes everything of the run `prefix`: kills the processes in its namespaces and cgroups,
/// removes the cgroups, deletes the namespaces (their interfaces go with them), unmounts its
/// bpffs mounts and deletes its run directory. Keeps going after an error and returns them all.
pub(super) fn remove_run(prefix: &str) -> Vec<anyhow::Error> {
    let mut errors = Vec::new();
    let namespaces = netns_with_prefix(prefix).unwrap_or_else(|e| {
        errors.push(e);
        Vec::new()
    });
    for ns in &namespaces {
        if let Err(e) = kill_netns_processes(ns) {
            errors.push(e);
        }
    }
    match cgroups_of(prefix) {
        Ok(cgroups) => errors.extend(cgroups.iter().filter_map(|c| remove_cgroup(c).err())),
        Err(e) => errors.push(e),
    }
    for ns in &namespaces {
        if let Err(e) = cmd::ip(&["netns", "del", ns]) {
            errors.push(e);
        }
    }
    let dir = run_dir(prefix);
    match mounts_under(&dir) {
        Ok(mut mounts) => {
            // Deepest first.
            mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
            for mount in &mounts {
                if let Err(e) = umount2(mount, MntFlags::MNT_DETACH) {
                    errors.push(anyhow::anyhow!("unmounting {}: {e}", mount.display()));
                }
            }
        }
        Err(e) => errors.push(e),
    }
    // Only delete the directory once nothing is mounted below it.
    match mounts_under(&dir) {
        Ok(left) if left.is_empty() => {
            if let Err(e) = fs::remove_dir_all(&dir)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                errors.push(anyhow::anyhow!("removing {}: {e}", dir.display()));
            }
        }
        Ok(left) => errors.push(anyhow::anyhow!(
            "not removing {}: still mounted: {left:?}",
            dir.display()
        )),
        Err(e) => errors.push(e),
    }
    errors
}

/// Removes the leftovers of earlier runs whose process is gone (killed with SIGKILL, so their
/// guards never ran). Runs of live processes are left alone. Problems are printed, not fatal.
pub(super) fn remove_stale_runs() {
    let mut prefixes: Vec<(String, i32)> = Vec::new();
    let names = all_netns()
        .unwrap_or_default()
        .into_iter()
        .chain(dir_names(Path::new(CGROUP2_ROOT)))
        .chain(dir_names(Path::new(RUN_ROOT)));
    for name in names {
        if let Some(owner) = owner(&name)
            && !prefixes.contains(&owner)
        {
            prefixes.push(owner);
        }
    }
    for (prefix, pid) in prefixes {
        if Path::new("/proc").join(pid.to_string()).exists() {
            continue;
        }
        eprintln!("svc-tests: removing leftovers of run {prefix} (pid {pid} is gone)");
        for e in remove_run(&prefix) {
            eprintln!("svc-tests: cleaning up stale run {prefix}: {e:#}");
        }
    }
}

/// The run prefix and owning pid encoded in a name `svct<pid>x<n>[-...]`.
fn owner(name: &str) -> Option<(String, i32)> {
    let rest = name.strip_prefix(TEST_PREFIX)?;
    let (pid, rest) = rest.split_once('x')?;
    let counter = rest.split_once('-').map_or(rest, |(c, _)| c);
    let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(pid) || !all_digits(counter) {
        return None;
    }
    Some((format!("{TEST_PREFIX}{pid}x{counter}"), pid.parse().ok()?))
}

fn all_netns() -> anyhow::Result<Vec<String>> {
    Ok(cmd::ip(&["netns", "list"])?
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

fn dir_names(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn cgroups_of(prefix: &str) -> anyhow::Result<Vec<PathBuf>> {
    let owned = format!("{prefix}-");
    let root = Path::new(CGROUP2_ROOT);
    if !root.exists() {
        return Ok(Vec::new());
    }
    Ok(fs::read_dir(root)
        .with_context(|| format!("listing {CGROUP2_ROOT}"))?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(&owned))
        .map(|e| e.path())
        .collect())
}

/// Mount points at or below `dir`, from `/proc/self/mounts`.
fn mounts_under(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mounts = fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    Ok(mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(PathBuf::from)
        .filter(|m| m.starts_with(dir))
        .collect())
}

fn kill_netns_processes(ns: &str) -> anyhow::Result<()> {
    let me = std::process::id();
    for pid in cmd::ip(&["netns", "pids", ns])?.split_whitespace() {
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        // ESRCH: it exited meanwhile.
        let _ = kill(Pid::from_raw(pid.cast_signed()), Signal::SIGKILL);
    }
    Ok(())
}

/// Kills everything in the cgroup and below (`cgroup.kill`), waits (bounded) for it to empty
/// and removes it, its child cgroups (pods' cgroups below a node's) first.
fn remove_cgroup(cgroup: &Path) -> anyhow::Result<()> {
    let procs = cgroup.join("cgroup.procs");
    if fs::read_to_string(&procs).is_ok_and(|p| !p.trim().is_empty()) || has_child_cgroups(cgroup) {
        fs::write(cgroup.join("cgroup.kill"), "1")
            .with_context(|| format!("killing the processes of {}", cgroup.display()))?;
    }
    if let Ok(entries) = fs::read_dir(cgroup) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup(&entry.path())?;
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match fs::remove_dir(cgroup) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            // EBUSY while the killed processes are still exiting.
            Err(e) if Instant::now() >= deadline => {
                let left = fs::read_to_string(&procs).unwrap_or_default();
                return Err(e).with_context(|| {
                    format!(
                        "removing cgroup {} (processes left: {})",
                        cgroup.display(),
                        left.split_whitespace().collect::<Vec<_>>().join(" ")
                    )
                });
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Whether `cgroup` has child cgroups.
fn has_child_cgroups(cgroup: &Path) -> bool {
    fs::read_dir(cgroup).is_ok_and(|entries| {
        entries
            .flatten()
            .any(|e| e.file_type().is_ok_and(|t| t.is_dir()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_is_parsed_from_every_kind_of_name() {
        assert_eq!(owner("svct123x4-n1"), Some(("svct123x4".into(), 123)));
        assert_eq!(owner("svct123x4"), Some(("svct123x4".into(), 123)));
        assert_eq!(owner("svct123x45-node2"), Some(("svct123x45".into(), 123)));
        assert_eq!(owner("svct-x4"), None);
        assert_eq!(owner("svctx4"), None);
        assert_eq!(owner("svct12x"), None);
        assert_eq!(owner("other123x4-n1"), None);
    }
}
