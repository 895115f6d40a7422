//! Sockets that belong to a pod: created by a small process that lives in the pod's network
//! namespace *and* the pod's cgroup, and handed to the test over a Unix socket
//! (`SCM_RIGHTS`).
//!
//! A socket belongs to the cgroup of the task that created it, and cgroup `sock_addr` programs
//! (connect-time translation) run for the socket's cgroup, not for the caller's. Test code runs
//! in threads of the test process, which lives in no pod's cgroup; a socket made by this
//! process's helper instead is a pod's socket in every respect the kernel looks at (network
//! namespace and cgroup), as in a cluster where the agent attaches its connect-time programs
//! at the cgroup v2 root and every pod's cgroup lies below it.
//!
//! [`Netns::run`](super::Netns::run) makes the namespace's helper (when it has one) the
//! current thread's; [`socket`] then asks it for every client socket the test harness opens.
//! Without a helper (node namespaces, the external client) `socket` makes the socket itself.

use std::{
    cell::RefCell,
    io::IoSliceMut,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail, ensure};
use nix::sys::socket::{
    AddressFamily, ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr, connect, recvmsg,
    send,
};

/// The helper: serves one socket per connection on the Unix socket `argv[1]`, of the family and
/// type the request names (`"<family> <type>"`, Linux numbers), as `SCM_RIGHTS` with the reply
/// `ok`, or `err <errno>`. It exits after an hour without requests (its owner's guard stops it
/// long before); every accept waits at most that long.
const SOCKD_PY: &str = r#"
import os, socket, sys
path = sys.argv[1]
srv = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
srv.bind(path + ".tmp")
os.rename(path + ".tmp", path)
srv.listen(64)
srv.settimeout(3600)
while True:
    try:
        conn, _ = srv.accept()
    except socket.timeout:
        sys.exit(0)
    with conn:
        try:
            family, kind = (int(w) for w in conn.recv(64).split())
            s = socket.socket(family, kind)
        except OSError as e:
            conn.send(b"err %d" % e.errno)
            continue
        except ValueError:
            conn.send(b"err 22")
            continue
        socket.send_fds(conn, [b"ok"], [s.fileno()])
        s.close()
"#;

/// How long [`start`] waits for the helper's socket to appear.
const START_TIMEOUT: Duration = Duration::from_secs(10);

thread_local! {
    /// The socket helper of the namespace the current thread runs in (see [`Netns::run`]).
    static CURRENT: RefCell<Option<PathBuf>> = const { RefCell::new(None) };
}

/// The command that runs the helper serving on `path` (to be spawned in the pod's namespace
/// and cgroup).
#[must_use]
pub fn command(path: &Path) -> std::process::Command {
    let mut cmd = std::process::Command::new("python3");
    cmd.arg("-c").arg(SOCKD_PY).arg(path);
    cmd
}

/// Waits (bounded) until the helper serves on `path`.
pub fn wait_ready(path: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    while !path.exists() {
        ensure!(
            Instant::now() < deadline,
            "the socket helper did not start serving on {} within {START_TIMEOUT:?} (is python3 installed?)",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// Makes `helper` (or none) the current thread's socket helper for the rest of its life.
pub(super) fn set_current(helper: Option<PathBuf>) {
    CURRENT.with(|c| *c.borrow_mut() = helper);
}

/// A new socket of `domain` and `kind` (`socket2`'s types): from the current thread's socket
/// helper when it has one (a pod's socket: its namespace and cgroup), else made here.
pub fn socket(domain: socket2::Domain, kind: socket2::Type) -> anyhow::Result<socket2::Socket> {
    let helper = CURRENT.with(|c| c.borrow().clone());
    let Some(helper) = helper else {
        return socket2::Socket::new(domain, kind, None).context("socket()");
    };
    let fd = request(&helper, i32::from(domain), i32::from(kind))
        .with_context(|| format!("a socket from the pod's helper {}", helper.display()))?;
    Ok(socket2::Socket::from(fd))
}

/// Asks the helper on `path` for a socket of `family` and `kind`.
fn request(path: &Path, family: i32, kind: i32) -> anyhow::Result<OwnedFd> {
    let conn = nix::sys::socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .context("socket(AF_UNIX, SOCK_SEQPACKET)")?;
    let addr = UnixAddr::new(path).context("the helper's address")?;
    connect(conn.as_raw_fd(), &addr).context("connecting to the helper")?;
    send(
        conn.as_raw_fd(),
        format!("{family} {kind}").as_bytes(),
        MsgFlags::empty(),
    )
    .context("sending the request")?;
    let mut reply = [0u8; 64];
    let mut iov = [IoSliceMut::new(&mut reply)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let msg = recvmsg::<()>(
        conn.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .context("receiving the reply")?;
    let mut fds = Vec::new();
    for cmsg in msg
        .cmsgs()
        .context("reading the reply's control messages")?
    {
        if let ControlMessageOwned::ScmRights(received) = cmsg {
            fds.extend(received);
        }
    }
    let len = msg.bytes;
    // SAFETY: each fd arrived with SCM_RIGHTS in this message and is owned by nobody else.
    let mut owned: Vec<OwnedFd> = fds
        .into_iter()
        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    let text = String::from_utf8_lossy(&reply[..len]).into_owned();
    if text != "ok" {
        bail!("the helper refused: {text}");
    }
    ensure!(
        owned.len() == 1,
        "the helper sent {} descriptors, not 1",
        owned.len()
    );
    owned.pop().ok_or_else(|| anyhow!("no descriptor"))
}
