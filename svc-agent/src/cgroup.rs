//! Attaching the connect-time programs to a cgroup v2 hierarchy.
//!
//! The cgroup `sock_addr` programs (`svc_sock_*`, see `loader::PROGS_SOCK`) run for every socket
//! of every process in the cgroup and its descendants: `connect()`/`sendto()` to a service
//! address go to a backend directly, `getpeername()`/`recvfrom()` report the service address.
//! They are attached as BPF links (kernel >= 5.7), which always coexist with other programs on
//! the same cgroup and hook (other agents, systemd), and pinned at
//! `links/cgroup/<cgroup id>/<program>` (see `pins`): they stay attached when the agent exits.
//!
//! A new agent attaches its own programs first and then pins each link over the earlier
//! agent's pin, which releases the earlier link (aya 0.14 has no `BPF_LINK_UPDATE` for cgroup
//! links, only for TC and XDP ones). In between both programs run on a hook, the earlier one
//! first, and a socket is still translated once: after the first `connect4`/`sendmsg4` the
//! address is a backend's, which no frontend has, so the second finds no service and leaves it;
//! after the first `getpeername4`/`recvmsg4` it is the service's, which has no entry in
//! `SOCK_REVNAT_V1` (keyed by backend), so the second leaves it too. Both read and write the
//! same pinned maps.

use std::{
    fs::File,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use aya::{
    Ebpf,
    programs::{CgroupAttachMode, CgroupSockAddr, links::FdLink},
};
use nix::sys::statfs::{CGROUP2_SUPER_MAGIC, statfs};
use tracing::info;

use crate::{
    loader::{
        PROG_SOCK_CONNECT4, PROG_SOCK_CONNECT6, PROG_SOCK_GETPEERNAME4, PROG_SOCK_GETPEERNAME6,
        PROG_SOCK_RECVMSG4, PROG_SOCK_RECVMSG6, PROG_SOCK_SENDMSG4, PROG_SOCK_SENDMSG6, PROGS_SOCK,
    },
    pins,
};

/// Attach order: the reverse hooks first, so every socket the forward hooks translate already
/// gets the service address back from `getpeername()` and `recvfrom()`.
const ATTACH_ORDER: [&str; 8] = [
    PROG_SOCK_GETPEERNAME4,
    PROG_SOCK_GETPEERNAME6,
    PROG_SOCK_RECVMSG4,
    PROG_SOCK_RECVMSG6,
    PROG_SOCK_CONNECT4,
    PROG_SOCK_CONNECT6,
    PROG_SOCK_SENDMSG4,
    PROG_SOCK_SENDMSG6,
];

/// The connect-time programs attached to one cgroup, through pinned links: they stay attached
/// when this (or the agent) goes; removing the pins detaches them.
#[derive(Debug)]
pub struct CgroupLinks {
    cgroup: PathBuf,
    cgroup_id: u64,
    pins: Vec<PathBuf>,
    replaced: usize,
}

impl CgroupLinks {
    /// The cgroup the programs are attached to.
    #[must_use]
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// The cgroup's id (the inode number of its directory), as in the pin paths.
    #[must_use]
    pub fn cgroup_id(&self) -> u64 {
        self.cgroup_id
    }

    /// Where the links are pinned, in attach order.
    #[must_use]
    pub fn pins(&self) -> &[PathBuf] {
        &self.pins
    }

    /// How many pins of an earlier agent this attach replaced.
    #[must_use]
    pub fn replaced(&self) -> usize {
        self.replaced
    }

    /// How many programs are attached.
    #[must_use]
    pub fn len(&self) -> usize {
        self.pins.len()
    }

    /// Whether no program is attached.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.pins.is_empty()
    }
}

/// The cgroup named by `svc-agent run --cgroup`: `None` when the value is empty (connect-time
/// translation disabled).
#[must_use]
pub fn cgroup_arg(value: &str) -> Option<&Path> {
    (!value.is_empty()).then_some(Path::new(value))
}

/// Checks that `cgroup` is a directory of a cgroup v2 hierarchy (what `--cgroup` must name).
pub fn check_cgroup_dir(cgroup: &Path) -> anyhow::Result<()> {
    let fs = statfs(cgroup).with_context(|| {
        format!(
            "--cgroup {}: no such cgroup v2 directory; point --cgroup at the cgroup v2 mount \
             (e.g. /sys/fs/cgroup/unified or /sys/fs/cgroup) or a cgroup below it, or pass \
             --cgroup '' to disable connect-time translation",
            cgroup.display()
        )
    })?;
    if fs.filesystem_type() != CGROUP2_SUPER_MAGIC || !cgroup.is_dir() {
        bail!(
            "{} is not a cgroup v2 directory (its filesystem type is {:?}); point --cgroup at \
             the cgroup v2 mount (e.g. /sys/fs/cgroup/unified or /sys/fs/cgroup) or a cgroup \
             below it, or pass --cgroup '' to disable connect-time translation",
            cgroup.display(),
            fs.filesystem_type()
        );
    }
    Ok(())
}

/// Attaches every connect-time program (loading it first if needed) to the cgroup v2 directory
/// `cgroup` and pins its link below `pin_dir`, replacing an earlier agent's pin of the same
/// program on the same cgroup (see the module documentation). On error, the programs attached
/// so far stay attached and pinned (each hook has the earlier agent's program or this one's).
pub fn attach_sock_programs(
    ebpf: &mut Ebpf,
    cgroup: &Path,
    pin_dir: &Path,
) -> anyhow::Result<CgroupLinks> {
    check_cgroup_dir(cgroup)?;
    let dir = File::open(cgroup).with_context(|| format!("opening {}", cgroup.display()))?;
    let cgroup_id = dir
        .metadata()
        .with_context(|| format!("stat {}", cgroup.display()))?
        .ino();
    let mut pins = Vec::with_capacity(ATTACH_ORDER.len());
    let mut replaced = 0;
    for name in ATTACH_ORDER {
        let prog = crate::loader::loaded::<CgroupSockAddr>(ebpf, name)?;
        // With a BPF link the kernel takes no attach flags: `Single` (0) is the only accepted
        // mode, and a link still coexists with any other program on the hook.
        let id = prog
            .attach(&dir, CgroupAttachMode::Single)
            .with_context(|| format!("attaching {name} to cgroup {}", cgroup.display()))?;
        let link: FdLink = prog
            .take_link(id)
            .with_context(|| format!("taking the link of {name}"))?
            .try_into()
            .with_context(|| format!("the link of {name} is no BPF link: it cannot be pinned"))?;
        let path = pins::cgroup_link_path(pin_dir, cgroup_id, name);
        if path.exists() {
            replaced += 1;
        }
        pins::pin_replacing(link, &path)?;
        pins.push(path);
    }
    let stale = remove_stale(pin_dir, Some(cgroup_id))?;
    info!(
        cgroup = %cgroup.display(),
        cgroup_id,
        programs = pins.len(),
        replaced,
        stale_removed = stale,
        "attached connect-time translation (connect, sendmsg, recvmsg, getpeername; v4 and v6), links pinned"
    );
    Ok(CgroupLinks {
        cgroup: cgroup.to_owned(),
        cgroup_id,
        pins,
        replaced,
    })
}

/// Removes the cgroup link pins that are not the current cgroup's (`None`: none is current):
/// links of a cgroup an earlier agent was configured with, leftovers of an interrupted pin.
/// Returns how many it removed.
fn remove_stale(pin_dir: &Path, current: Option<u64>) -> anyhow::Result<usize> {
    let dir = pins::cgroup_dir(pin_dir);
    let stale = pins::stale_cgroup_pins(&pins::pin_groups(&dir)?, current, &PROGS_SOCK);
    let removed = pins::remove_relative(&dir, &stale)?;
    for path in &removed {
        info!(pin = %path.display(), "removed a stale connect-time link pin (another cgroup, or left by an interrupted agent): its programs detach");
    }
    Ok(removed.len())
}

/// What `svc-agent run` does with `--cgroup`: attaches the connect-time programs to it (links
/// pinned below `pin_dir`), or, when it is empty, removes the connect-time links an earlier
/// agent pinned.
pub fn attach_from_arg(
    ebpf: &mut Ebpf,
    value: &str,
    pin_dir: &Path,
) -> anyhow::Result<Option<CgroupLinks>> {
    let Some(cgroup) = cgroup_arg(value) else {
        let removed = remove_stale(pin_dir, None)?;
        info!(
            stale_removed = removed,
            "--cgroup is empty: connect-time translation disabled"
        );
        return Ok(None);
    };
    attach_sock_programs(ebpf, cgroup, pin_dir).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sock_program_is_attached_once() {
        let mut order = ATTACH_ORDER.to_vec();
        let mut all = PROGS_SOCK.to_vec();
        order.sort_unstable();
        all.sort_unstable();
        assert_eq!(order, all);
    }

    #[test]
    fn an_empty_cgroup_argument_disables_translation() {
        assert_eq!(cgroup_arg(""), None);
        assert_eq!(
            cgroup_arg("/sys/fs/cgroup/unified"),
            Some(Path::new("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn names_fit_the_kernel_and_the_prefix() {
        for name in PROGS_SOCK {
            assert!(name.starts_with("svc_sock_"), "{name}");
            assert!(
                name.len() <= 15,
                "{name} is longer than BPF_OBJ_NAME_LEN - 1"
            );
        }
    }
}
