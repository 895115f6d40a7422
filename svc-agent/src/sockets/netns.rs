//! Finding the network namespaces that may hold translated sockets, and entering them.
//!
//! The connect-time programs run for every process of the cgroup they are attached to, in
//! whatever network namespace the process is (the node's own, or a pod's). A namespace is
//! found through the processes in it (`/proc/<pid>/ns/net`; with `hostPID` every process of
//! the node) and through bind mounts (`/run/netns/*`, where `ip netns` and CNI runtimes keep
//! pod namespaces, also one no process is in at the moment). Each distinct namespace (device
//! and inode of its nsfs file) is listed once, by the first path found for it.
//!
//! Entering is `setns(CLONE_NEWNET)` of the calling thread: only the destroy thread does it,
//! never a thread of the agent's async runtime.

use std::{
    collections::HashSet,
    fs::File,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use nix::{
    sched::{CloneFlags, setns},
    sys::statfs::{FsType, statfs},
};

/// Directories whose entries are network namespace bind mounts.
pub const BIND_DIRS: [&str; 2] = ["/run/netns", "/var/run/netns"];

/// `NSFS_MAGIC` (`include/uapi/linux/magic.h`): the file system of namespace files.
const NSFS_MAGIC: FsType = FsType(0x6e73_6673);

/// One network namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetnsRef {
    /// A path to its nsfs file (a process's `ns/net` or a bind mount).
    pub path: PathBuf,
    /// Device and inode of that file: the namespace's identity.
    pub id: (u64, u64),
}

/// What [`list`] found.
#[derive(Debug, Default)]
pub struct Listed {
    /// The distinct namespaces, at most the limit.
    pub namespaces: Vec<NetnsRef>,
    /// More were there than the limit.
    pub truncated: bool,
}

/// The distinct network namespaces of the processes under `proc` (a procfs) and of the bind
/// mounts in `bind_dirs`, at most `limit`. A process that exits meanwhile, or a directory that
/// does not exist, is skipped.
#[must_use]
pub fn list(proc: &Path, bind_dirs: &[&Path], limit: usize) -> Listed {
    let mut seen = HashSet::new();
    let mut out = Listed::default();
    let processes = std::fs::read_dir(proc)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_str().is_some_and(is_pid))
        .map(|e| e.path().join("ns/net"));
    // A bind point whose namespace was unmounted is a plain empty file: not on nsfs, skipped.
    let bound = bind_dirs
        .iter()
        .flat_map(|dir| std::fs::read_dir(dir).into_iter().flatten().flatten())
        .map(|e| e.path())
        .filter(|p| statfs(p).is_ok_and(|fs| fs.filesystem_type() == NSFS_MAGIC));
    for path in processes.chain(bound) {
        // stat follows the ns/net link to the nsfs inode; it fails for a process that exited.
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        let id = (meta.dev(), meta.ino());
        if !seen.insert(id) {
            continue;
        }
        if out.namespaces.len() == limit {
            out.truncated = true;
            break;
        }
        out.namespaces.push(NetnsRef { path, id });
    }
    out
}

fn is_pid(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_digit())
}

/// Moves the calling thread into the network namespace at `path`.
pub fn enter(path: &Path) -> anyhow::Result<()> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    setns(&file, CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("setns(CLONE_NEWNET) into {}", path.display()))
}

/// The calling thread's own network namespace, to come back to.
pub fn own() -> anyhow::Result<File> {
    File::open("/proc/thread-self/ns/net").context("opening /proc/thread-self/ns/net")
}

/// Moves the calling thread back into `ns` (from [`own`]).
pub fn back(ns: &File) -> anyhow::Result<()> {
    setns(ns, CloneFlags::CLONE_NEWNET).context("setns(CLONE_NEWNET) back to the agent's own")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_own_namespace_is_listed_once_and_the_limit_holds() {
        let own = std::fs::metadata("/proc/self/ns/net").unwrap();
        let all = list(Path::new("/proc"), &[], usize::MAX);
        assert!(!all.truncated);
        let mine: Vec<_> = all
            .namespaces
            .iter()
            .filter(|n| n.id == (own.dev(), own.ino()))
            .collect();
        assert_eq!(
            mine.len(),
            1,
            "listed once although every process shares it"
        );
        let ids: HashSet<_> = all.namespaces.iter().map(|n| n.id).collect();
        assert_eq!(ids.len(), all.namespaces.len(), "distinct");
        let none = list(Path::new("/proc"), &[], 0);
        assert!(none.namespaces.is_empty() && none.truncated);
    }

    #[test]
    fn missing_directories_are_skipped() {
        let listed = list(
            Path::new("/nonexistent-proc"),
            &[Path::new("/nonexistent-netns")],
            10,
        );
        assert!(listed.namespaces.is_empty() && !listed.truncated);
    }

    #[test]
    fn only_numeric_entries_are_processes() {
        assert!(is_pid("1") && is_pid("4242"));
        assert!(!is_pid("self") && !is_pid("thread-self") && !is_pid("") && !is_pid("1a"));
    }
}
