//! The Linux capabilities `svc-agent run` needs, checked before anything touches the kernel, so
//! a start without one of them fails naming it and what it is for, rather than with the
//! kernel's bare `EPERM` from some `bpf()` call halfway through loading (or, worse, later: a
//! take-over that cannot see the programs on a hook, sockets that are never destroyed).
//!
//! What each step asks of the kernel (Linux 6.x, measured on 6.18 by starting the agent under
//! `setpriv` with one capability fewer at a time, and from `kernel/bpf/syscall.c`):
//!
//! | step | the kernel accepts |
//! |---|---|
//! | any `bpf()` call, creating the maps (`kernel.unprivileged_bpf_disabled`, LRU and LPM maps) | `CAP_BPF` or `CAP_SYS_ADMIN` |
//! | the verifier's privileged mode the programs are written for (pointer arithmetic on stack and map pointers: `pointer arithmetic with it prohibited for !root` otherwise) | `CAP_PERFMON` or `CAP_SYS_ADMIN` |
//! | loading TC classifiers and cgroup `sock_addr` programs, querying hooks (`BPF_PROG_QUERY`) | `CAP_NET_ADMIN` or `CAP_SYS_ADMIN` |
//! | taking over pinned TCX links: the ids on a hook opened as programs (`BPF_PROG_GET_FD_BY_ID`) | `CAP_SYS_ADMIN` |
//! | entering a pod's network namespace to destroy its connected UDP sockets (`setns`) | `CAP_SYS_ADMIN` |
//! | destroying a socket (`sock_diag` `SOCK_DESTROY`; measured with `ss -K` under `setpriv`: with `CAP_SYS_ADMIN` alone the socket stays connected) | `CAP_NET_ADMIN` |
//!
//! So `CAP_SYS_ADMIN` and, with connect-time translation on, `CAP_NET_ADMIN` are what the
//! agent cannot run without; `CAP_BPF` and `CAP_PERFMON` are what the first two steps ask for
//! first, and `CAP_SYS_ADMIN` also satisfies them. Not needed: `CAP_SYS_RESOURCE` (since
//! Linux 5.11 BPF memory is charged to the memory cgroup, not to `RLIMIT_MEMLOCK`, and aya
//! raises the limit only on older kernels), `CAP_NET_RAW`, `CAP_DAC_OVERRIDE` (the agent runs
//! as uid 0, owner of what it touches), `CAP_SYS_PTRACE` (pods' network namespaces are also
//! reached through the runtime's `/run/netns` bind mounts).
//!
//! The `DaemonSet` (`manifests/deploy/daemonset.yaml`) grants `BPF`, `PERFMON`, `NET_ADMIN`
//! and `SYS_ADMIN`; `tests/tests/least_privilege_e2e.rs` runs an agent with exactly those and
//! one without `SYS_ADMIN`.

use std::fmt;

use anyhow::{Context as _, bail};

/// A Linux capability, by number (`include/uapi/linux/capability.h`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cap(pub u8);

impl Cap {
    /// `CAP_NET_ADMIN`.
    pub const NET_ADMIN: Self = Self(12);
    /// `CAP_SYS_ADMIN`.
    pub const SYS_ADMIN: Self = Self(21);
    /// `CAP_SYS_RESOURCE`.
    pub const SYS_RESOURCE: Self = Self(24);
    /// `CAP_PERFMON` (Linux 5.8).
    pub const PERFMON: Self = Self(38);
    /// `CAP_BPF` (Linux 5.8).
    pub const BPF: Self = Self(39);

    /// Every capability name this module knows, without the `CAP_` prefix, as Kubernetes
    /// spells them in `capabilities.add` (`NET_ADMIN`), by number.
    const NAMES: [&'static str; 41] = [
        "CHOWN",
        "DAC_OVERRIDE",
        "DAC_READ_SEARCH",
        "FOWNER",
        "FSETID",
        "KILL",
        "SETGID",
        "SETUID",
        "SETPCAP",
        "LINUX_IMMUTABLE",
        "NET_BIND_SERVICE",
        "NET_BROADCAST",
        "NET_ADMIN",
        "NET_RAW",
        "IPC_LOCK",
        "IPC_OWNER",
        "SYS_MODULE",
        "SYS_RAWIO",
        "SYS_CHROOT",
        "SYS_PTRACE",
        "SYS_PACCT",
        "SYS_ADMIN",
        "SYS_BOOT",
        "SYS_NICE",
        "SYS_RESOURCE",
        "SYS_TIME",
        "SYS_TTY_CONFIG",
        "MKNOD",
        "LEASE",
        "AUDIT_WRITE",
        "AUDIT_CONTROL",
        "SETFCAP",
        "MAC_OVERRIDE",
        "MAC_ADMIN",
        "SYSLOG",
        "WAKE_ALARM",
        "BLOCK_SUSPEND",
        "AUDIT_READ",
        "PERFMON",
        "BPF",
        "CHECKPOINT_RESTORE",
    ];

    /// The capability a name means: `BPF`, `CAP_BPF`, `cap_bpf` or `bpf`.
    #[must_use]
    pub fn from_name(name: &str) -> Option<Self> {
        let upper = name.trim().to_ascii_uppercase();
        let bare = upper.strip_prefix("CAP_").unwrap_or(&upper);
        Self::NAMES
            .iter()
            .position(|n| *n == bare)
            .and_then(|i| u8::try_from(i).ok())
            .map(Self)
    }

    /// The name without `CAP_` (`BPF`), or the number for one this module does not know.
    #[must_use]
    pub fn name(self) -> String {
        Self::NAMES
            .get(usize::from(self.0))
            .map_or_else(|| self.0.to_string(), |n| (*n).to_owned())
    }

    /// This capability's bit in a capability mask (`CapEff` and the like).
    #[must_use]
    pub const fn bit(self) -> u64 {
        1 << self.0
    }
}

impl fmt::Display for Cap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CAP_{}", self.name())
    }
}

/// One thing the agent asks of the kernel, and the capabilities that allow it.
#[derive(Clone, Copy, Debug)]
pub struct Need {
    /// Any one of these allows it.
    pub any_of: &'static [Cap],
    /// What for, for the error.
    pub what: &'static str,
}

/// What `svc-agent run` asks of the kernel (see the [module docs](self)); `sockets`: whether
/// connect-time translation is on (`--socket-lb` other than `off`), whose connected UDP
/// sockets the agent destroys.
#[must_use]
pub fn needs(sockets: bool) -> Vec<Need> {
    let mut needs = vec![
        Need {
            any_of: &[Cap::BPF, Cap::SYS_ADMIN],
            what: "bpf(): creating the maps, loading the programs, pinning them",
        },
        Need {
            any_of: &[Cap::PERFMON, Cap::SYS_ADMIN],
            what: "the verifier's privileged mode the programs need (pointer arithmetic)",
        },
        Need {
            any_of: &[Cap::NET_ADMIN, Cap::SYS_ADMIN],
            what: "loading TC and cgroup sock_addr programs",
        },
        Need {
            any_of: &[Cap::SYS_ADMIN],
            what: "taking over pinned TCX links (BPF_PROG_GET_FD_BY_ID) and entering pods' \
                   network namespaces (setns) to destroy their UDP sockets",
        },
    ];
    if sockets {
        needs.push(Need {
            any_of: &[Cap::NET_ADMIN],
            what: "destroying connected UDP sockets of ended backends (sock_diag SOCK_DESTROY)",
        });
    }
    needs
}

/// The capabilities the `DaemonSet` grants, [`needs`] in full with `CAP_BPF` and
/// `CAP_PERFMON` named although `CAP_SYS_ADMIN` covers them (see the [module docs](self)).
pub const GRANTED: [Cap; 4] = [Cap::BPF, Cap::PERFMON, Cap::NET_ADMIN, Cap::SYS_ADMIN];

/// The capabilities in `mask`, lowest first.
#[must_use]
pub fn in_mask(mask: u64) -> Vec<Cap> {
    (0..64u8).map(Cap).filter(|c| mask & c.bit() != 0).collect()
}

/// A capability mask line of `/proc/<pid>/status` (`CapEff:\t000001ffffffffff`): its value.
#[must_use]
pub fn status_mask(status: &str, field: &str) -> Option<u64> {
    status.lines().find_map(|l| {
        let value = l.strip_prefix(field)?.strip_prefix(':')?;
        u64::from_str_radix(value.trim(), 16).ok()
    })
}

/// This process's effective capabilities (`CapEff` of `/proc/self/status`).
pub fn effective() -> anyhow::Result<u64> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    status_mask(&status, "CapEff").context("no CapEff line in /proc/self/status")
}

/// Fails when `effective` allows not every one of [`needs`]`(sockets)`, naming for each the
/// capability it lacks and what for, and the capabilities it has.
pub fn check(effective: u64, sockets: bool) -> anyhow::Result<()> {
    let missing: Vec<String> = needs(sockets)
        .iter()
        .filter(|n| n.any_of.iter().all(|c| effective & c.bit() == 0))
        .map(|n| {
            let caps: Vec<String> = n.any_of.iter().map(Cap::to_string).collect();
            format!("{} ({})", caps.join(" or "), n.what)
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let have: Vec<String> = in_mask(effective).iter().map(Cap::to_string).collect();
    bail!(
        "svc-agent run lacks {}; its effective capabilities are {}. Run it as root, or grant \
         {} (the DaemonSet's securityContext.capabilities.add, manifests/deploy/daemonset.yaml)",
        missing.join(", "),
        if have.is_empty() {
            "none".to_owned()
        } else {
            have.join(", ")
        },
        GRANTED.map(Cap::name).join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers_agree_with_the_kernel_header() {
        assert_eq!(Cap::from_name("BPF"), Some(Cap::BPF));
        assert_eq!(Cap::from_name("cap_perfmon"), Some(Cap::PERFMON));
        assert_eq!(Cap::from_name("CAP_NET_ADMIN"), Some(Cap::NET_ADMIN));
        assert_eq!(Cap::from_name("sys_admin"), Some(Cap::SYS_ADMIN));
        assert_eq!(Cap::from_name("SYS_RESOURCE"), Some(Cap::SYS_RESOURCE));
        assert_eq!(Cap::from_name("CHECKPOINT_RESTORE"), Some(Cap(40)));
        assert_eq!(Cap::from_name("NET_ADMINN"), None);
        assert_eq!(Cap::BPF.to_string(), "CAP_BPF");
        assert_eq!(Cap(63).name(), "63");
    }

    #[test]
    fn reads_masks_from_proc_status() {
        let status = "Name:\tsvc-agent\nCapInh:\t0000000000000000\nCapPrm:\t000000c000201000\n\
                      CapEff:\t000000c000201000\nCapBnd:\t000001ffffffffff\n";
        let eff = status_mask(status, "CapEff").unwrap();
        assert_eq!(
            in_mask(eff),
            vec![Cap::NET_ADMIN, Cap::SYS_ADMIN, Cap::PERFMON, Cap::BPF]
        );
        assert_eq!(status_mask(status, "CapBnd"), Some((1 << 41) - 1));
        assert_eq!(status_mask(status, "CapAmb"), None);
        // This process can read its own.
        effective().unwrap();
    }

    #[test]
    fn a_missing_capability_is_named_with_its_purpose() {
        let granted = GRANTED.iter().fold(0, |m, c| m | c.bit());
        check(granted, true).unwrap();
        check(u64::MAX, true).unwrap();
        // What the kernel accepts: CAP_SYS_ADMIN stands for CAP_BPF and CAP_PERFMON.
        check(granted & !Cap::BPF.bit() & !Cap::PERFMON.bit(), true).unwrap();
        // Without connect-time translation no socket is destroyed: CAP_SYS_ADMIN alone.
        check(Cap::SYS_ADMIN.bit(), false).unwrap();
        let err = |mask: u64| format!("{:#}", check(mask, true).unwrap_err());
        let no_admin = err(granted & !Cap::SYS_ADMIN.bit());
        assert!(
            no_admin.contains("lacks CAP_SYS_ADMIN (taking over pinned TCX links"),
            "{no_admin}"
        );
        assert!(
            no_admin.contains("effective capabilities are CAP_NET_ADMIN, CAP_PERFMON, CAP_BPF"),
            "{no_admin}"
        );
        assert!(
            no_admin.contains("grant BPF, PERFMON, NET_ADMIN, SYS_ADMIN"),
            "{no_admin}"
        );
        let no_net = err(granted & !Cap::NET_ADMIN.bit());
        assert!(
            no_net.contains("lacks CAP_NET_ADMIN (destroying connected UDP sockets"),
            "{no_net}"
        );
        let none = err(0);
        assert!(
            none.contains("lacks CAP_BPF or CAP_SYS_ADMIN (bpf()")
                && none.contains("CAP_PERFMON or CAP_SYS_ADMIN")
                && none.contains("effective capabilities are none"),
            "{none}"
        );
    }
}
