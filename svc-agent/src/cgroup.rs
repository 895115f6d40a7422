//! Attaching the connect-time programs to a cgroup v2 hierarchy.
//!
//! The cgroup `sock_addr` programs (`svc_sock_*`, see `loader::PROGS_SOCK`) run for every socket
//! of every process in the cgroup and its descendants: `connect()`/`sendto()` to a service
//! address go to a backend directly, `getpeername()`/`recvfrom()` report the service address.
//! They are attached as BPF links (kernel >= 5.7), which always coexist with other programs on
//! the same cgroup and hook (other agents, systemd), and are detached when the
//! [`CgroupLinks`] holding them drops, or when the agent exits.

use std::{
    fs::File,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use aya::{
    Ebpf,
    programs::{CgroupAttachMode, CgroupSockAddr, cgroup_sock_addr::CgroupSockAddrLink},
};
use nix::sys::statfs::{CGROUP2_SUPER_MAGIC, statfs};
use tracing::info;

use crate::loader::{
    PROG_SOCK_CONNECT4, PROG_SOCK_CONNECT6, PROG_SOCK_GETPEERNAME4, PROG_SOCK_GETPEERNAME6,
    PROG_SOCK_RECVMSG4, PROG_SOCK_RECVMSG6, PROG_SOCK_SENDMSG4, PROG_SOCK_SENDMSG6,
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

/// The connect-time programs attached to one cgroup. Dropping it detaches them.
#[derive(Debug)]
pub struct CgroupLinks {
    cgroup: PathBuf,
    // Owned links: each detaches when dropped.
    links: Vec<CgroupSockAddrLink>,
}

impl CgroupLinks {
    /// The cgroup the programs are attached to.
    #[must_use]
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// How many programs are attached.
    #[must_use]
    pub fn len(&self) -> usize {
        self.links.len()
    }

    /// Whether no program is attached.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.links.is_empty()
    }
}

/// The cgroup named by `svc-agent run --cgroup`: `None` when the value is empty (connect-time
/// translation disabled).
#[must_use]
pub fn cgroup_arg(value: &str) -> Option<&Path> {
    (!value.is_empty()).then_some(Path::new(value))
}

/// Attaches every connect-time program (loading it first if needed) to the cgroup v2 directory
/// `cgroup`. On error, the programs attached so far are detached again.
pub fn attach_sock_programs(ebpf: &mut Ebpf, cgroup: &Path) -> anyhow::Result<CgroupLinks> {
    let fs = statfs(cgroup).with_context(|| format!("statfs {}", cgroup.display()))?;
    if fs.filesystem_type() != CGROUP2_SUPER_MAGIC {
        bail!(
            "{} is not a cgroup v2 directory (its filesystem type is {:?}); point --cgroup at \
             the cgroup v2 mount (e.g. /sys/fs/cgroup/unified or /sys/fs/cgroup) or a cgroup \
             below it, or pass --cgroup '' to disable connect-time translation",
            cgroup.display(),
            fs.filesystem_type()
        );
    }
    let dir = File::open(cgroup).with_context(|| format!("opening {}", cgroup.display()))?;
    let mut links = Vec::with_capacity(ATTACH_ORDER.len());
    for name in ATTACH_ORDER {
        let prog = crate::loader::loaded::<CgroupSockAddr>(ebpf, name)?;
        // With a BPF link the kernel takes no attach flags: `Single` (0) is the only accepted
        // mode, and a link still coexists with any other program on the hook.
        let id = prog
            .attach(&dir, CgroupAttachMode::Single)
            .with_context(|| format!("attaching {name} to cgroup {}", cgroup.display()))?;
        links.push(
            prog.take_link(id)
                .with_context(|| format!("taking the link of {name}"))?,
        );
    }
    info!(
        cgroup = %cgroup.display(),
        programs = links.len(),
        "attached connect-time translation (connect, sendmsg, recvmsg, getpeername; v4 and v6)"
    );
    Ok(CgroupLinks {
        cgroup: cgroup.to_owned(),
        links,
    })
}

/// What `svc-agent run` does with `--cgroup`: attaches the connect-time programs to it, or
/// nothing when it is empty. Keep the result for as long as the programs should stay attached.
pub fn attach_from_arg(ebpf: &mut Ebpf, value: &str) -> anyhow::Result<Option<CgroupLinks>> {
    let Some(cgroup) = cgroup_arg(value) else {
        info!("--cgroup is empty: connect-time translation disabled");
        return Ok(None);
    };
    attach_sock_programs(ebpf, cgroup).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loader::PROGS_SOCK;

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
