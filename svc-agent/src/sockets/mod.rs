//! Destroying the connected UDP sockets whose backend ended.
//!
//! The connect-time programs send a socket to a backend at `connect()`; a connected UDP socket
//! then keeps that backend for its whole life, with no per-flow state in the datapath to clear.
//! When a reconcile pass ends backends (a `(service, backend)` pair, or a backend removed
//! altogether: [`EndedBackends`]), the reconciler hands that set to a dedicated thread
//! ([`SocketDestroyer`]) and goes on; the thread, per pass:
//! 1. reads `SOCK_REVNAT_V1` (batched, at most its capacity in entries) and keeps the
//!    `(cookie, backend)` entries whose service and backend ended ([`select::doomed`]); none:
//!    done, no namespace is visited;
//! 2. lists the network namespaces that may hold them ([`netns`]: every process's, plus
//!    `/run/netns` bind mounts), enters each in turn with `setns` and there dumps the connected
//!    UDP sockets (`sock_diag`, both families);
//! 3. destroys (`SOCK_DESTROY`, by exact tuple and cookie) each socket whose cookie and peer
//!    are a doomed entry ([`select::to_destroy`]): the application's pending or next call
//!    fails with `ECONNABORTED`, the socket is disconnected, and its next `connect()` chooses a
//!    live backend. It stops early once every doomed socket was found.
//!
//! A pass logs one line (`destroyed N connected UDP sockets of ended backends in M network
//! namespaces`); every failure is logged and counted, never fatal. Passes queued while one ran
//! are merged into the next. TCP sockets are never touched.

mod diag;
pub mod netns;
pub mod select;

use std::{
    collections::HashSet,
    path::Path,
    sync::mpsc::{Receiver, Sender, channel},
    time::Instant,
};

use anyhow::Context as _;
use aya::maps::{HashMap as BpfHashMap, MapData};
pub use select::{EndedBackends, Translated, UdpSock};
use svc_common::sock::{SockRevNatKey, SockRevNatValue};
use tracing::{debug, info, warn};

use crate::datapath::batch;

/// At most this many network namespaces are visited per pass.
pub const MAX_NAMESPACES: usize = 65_536;
/// At most this many connected UDP sockets are read per namespace and family.
pub const MAX_SOCKETS_PER_DUMP: usize = 1 << 20;
/// Failures logged one by one per pass; more are only counted.
const LOGGED_ERRORS: usize = 5;

/// Where a reconcile pass sends what it ended; cheap to clone, never blocks.
#[derive(Clone)]
pub struct EndedSender(Sender<EndedBackends>);

impl EndedSender {
    /// A sender and the receiving end its sends arrive at (the destroy thread's, or a test's).
    #[must_use]
    pub fn channel() -> (Self, Receiver<EndedBackends>) {
        let (tx, rx) = channel();
        (Self(tx), rx)
    }

    /// Queues `ended` for the destroy thread (nothing when it is empty). A thread that is gone
    /// is logged, not fatal: translated sockets then keep their backend as before.
    pub fn send(&self, ended: EndedBackends) {
        if ended.is_empty() {
            return;
        }
        if self.0.send(ended).is_err() {
            warn!(
                "the UDP socket destroy thread is gone: sockets of ended backends stay connected"
            );
        }
    }
}

/// The thread that destroys connected UDP sockets of ended backends (see the module docs).
pub struct SocketDestroyer {
    revnat: BpfHashMap<MapData, SockRevNatKey, SockRevNatValue>,
    revnat_max: usize,
    passes: u64,
    errors_total: u64,
}

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DestroyPass {
    /// `SOCK_REVNAT_V1` entries read.
    pub entries: usize,
    /// Of those, `(socket, backend)` pairs whose service and backend ended.
    pub doomed: usize,
    /// Network namespaces visited.
    pub namespaces: usize,
    /// Namespaces in which at least one socket was destroyed.
    pub namespaces_hit: usize,
    /// Connected UDP sockets seen in them.
    pub sockets_seen: usize,
    /// Sockets destroyed.
    pub destroyed: usize,
    /// Sockets that were gone by the time they were to be destroyed.
    pub gone: usize,
    /// Failures (each logged, or counted past the first few).
    pub errors: usize,
    /// A bound cut the pass short (entries, namespaces or sockets).
    pub truncated: bool,
}

impl SocketDestroyer {
    /// Takes `SOCK_REVNAT_V1` out of `ebpf` (the programs keep using it) and starts the
    /// thread. Returns where reconcile passes send what they ended.
    pub fn start(ebpf: &mut aya::Ebpf) -> anyhow::Result<EndedSender> {
        let map = ebpf
            .take_map("SOCK_REVNAT_V1")
            .context("no map SOCK_REVNAT_V1 in the object")?;
        let max = match &map {
            aya::maps::Map::LruHashMap(data) | aya::maps::Map::HashMap(data) => {
                data.info().context("SOCK_REVNAT_V1 info")?.max_entries()
            }
            _ => anyhow::bail!("SOCK_REVNAT_V1 is not a hash map"),
        };
        let destroyer = Self {
            revnat: BpfHashMap::try_from(map).context("SOCK_REVNAT_V1")?,
            revnat_max: usize::try_from(max).context("SOCK_REVNAT_V1 size")?,
            passes: 0,
            errors_total: 0,
        };
        let (sender, rx) = EndedSender::channel();
        std::thread::Builder::new()
            .name("svc-udp-destroy".into())
            .spawn(move || destroyer.run(&rx))
            .context("starting the UDP socket destroy thread")?;
        Ok(sender)
    }

    fn run(mut self, rx: &Receiver<EndedBackends>) {
        let own = match netns::own() {
            Ok(own) => own,
            Err(e) => {
                warn!(error = %format!("{e:#}"), "UDP socket destroy thread not running");
                return;
            }
        };
        while let Ok(mut ended) = rx.recv() {
            // Whatever queued up meanwhile goes into this pass.
            while let Ok(more) = rx.try_recv() {
                ended.merge(more);
            }
            let started = Instant::now();
            let pass = self.pass(&ended, &own);
            self.passes += 1;
            self.errors_total += pass.errors as u64;
            info!(
                destroyed = pass.destroyed,
                namespaces_hit = pass.namespaces_hit,
                namespaces = pass.namespaces,
                doomed = pass.doomed,
                revnat_entries = pass.entries,
                sockets_seen = pass.sockets_seen,
                gone = pass.gone,
                errors = pass.errors,
                errors_total = self.errors_total,
                passes = self.passes,
                truncated = pass.truncated,
                took_ms = started.elapsed().as_secs_f64() * 1e3,
                "destroyed {} connected UDP sockets of ended backends in {} network namespaces",
                pass.destroyed,
                pass.namespaces_hit,
            );
        }
    }

    /// One pass (see the module docs); the thread is back in its own namespace afterwards.
    fn pass(&mut self, ended: &EndedBackends, own: &std::fs::File) -> DestroyPass {
        let mut pass = DestroyPass::default();
        let mut errors = Errors::default();
        let mut doomed = HashSet::new();
        for entry in batch::entries(&self.revnat) {
            if pass.entries == self.revnat_max {
                pass.truncated = true;
                break;
            }
            match entry {
                Ok((k, v)) => {
                    pass.entries += 1;
                    if let Some(t) = Translated::from_entry(&k, &v)
                        && ended.names(t.service, t.backend)
                    {
                        doomed.insert((t.cookie, t.backend));
                    }
                }
                Err(e) => {
                    errors.note(&anyhow::Error::from(e).context("reading SOCK_REVNAT_V1"));
                    break;
                }
            }
        }
        pass.doomed = doomed.len();
        if !doomed.is_empty() {
            visit_namespaces(&mut doomed, &mut pass, &mut errors);
            if let Err(e) = netns::back(own) {
                errors.note(&e);
            }
        }
        pass.errors = errors.count;
        pass
    }
}

/// Enters each network namespace in turn (until every doomed socket was found) and destroys
/// the doomed sockets there; the caller goes back to its own namespace.
fn visit_namespaces(
    doomed: &mut HashSet<(u64, std::net::SocketAddr)>,
    pass: &mut DestroyPass,
    errors: &mut Errors,
) {
    let bind_dirs: Vec<&Path> = netns::BIND_DIRS.iter().map(Path::new).collect();
    let listed = netns::list(Path::new("/proc"), &bind_dirs, MAX_NAMESPACES);
    pass.truncated |= listed.truncated;
    for ns in &listed.namespaces {
        if doomed.is_empty() {
            break;
        }
        pass.namespaces += 1;
        match netns::enter(&ns.path) {
            Ok(()) => {}
            // The process exited, or the bind mount went, since the listing.
            Err(e) if is_gone(&e) => {
                debug!(path = %ns.path.display(), "namespace gone before it was entered");
                continue;
            }
            Err(e) => {
                errors.note(&e);
                continue;
            }
        }
        let destroyed_before = pass.destroyed;
        if let Err(e) = destroy_in_current(doomed, pass) {
            errors.note(&e.context(format!("in the network namespace of {}", ns.path.display())));
        }
        if pass.destroyed > destroyed_before {
            pass.namespaces_hit += 1;
        }
    }
}

/// Dumps the connected UDP sockets of the namespace the thread is in and destroys the doomed
/// ones (removing them from `doomed`).
fn destroy_in_current(
    doomed: &mut HashSet<(u64, std::net::SocketAddr)>,
    pass: &mut DestroyPass,
) -> anyhow::Result<()> {
    let mut socket = diag::DiagSocket::open()?;
    for family in diag::FAMILIES {
        let (sockets, truncated) = socket.connected_udp(family, MAX_SOCKETS_PER_DUMP)?;
        pass.truncated |= truncated;
        pass.sockets_seen += sockets.len();
        let chosen: Vec<UdpSock> = select::to_destroy(&sockets, doomed).cloned().collect();
        for sock in chosen {
            match socket.destroy(family, &sock)? {
                diag::Destroyed::Yes => pass.destroyed += 1,
                diag::Destroyed::Gone => pass.gone += 1,
            }
            doomed.remove(&(sock.cookie, sock.peer));
        }
    }
    Ok(())
}

/// Whether entering failed because the namespace's file is gone.
fn is_gone(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|c| c.downcast_ref::<std::io::Error>())
        .any(|io| {
            matches!(
                io.raw_os_error(),
                Some(nix::libc::ENOENT | nix::libc::ESRCH)
            )
        })
}

/// Failures of one pass: the first few logged, all counted.
#[derive(Default)]
struct Errors {
    count: usize,
}

impl Errors {
    fn note(&mut self, e: &anyhow::Error) {
        self.count += 1;
        if self.count <= LOGGED_ERRORS {
            warn!(error = %format!("{e:#}"), "destroying UDP sockets of ended backends");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_namespace_file_counts_as_gone_not_as_an_error() {
        let missing = netns::enter(Path::new("/proc/nonexistent/ns/net")).unwrap_err();
        assert!(is_gone(&missing), "{missing:#}");
        let other = anyhow::anyhow!("EINVAL");
        assert!(!is_gone(&other));
    }

    #[test]
    fn an_empty_set_is_not_sent() {
        let (sender, rx) = EndedSender::channel();
        sender.send(EndedBackends::default());
        let ended = EndedBackends {
            pairs: std::collections::BTreeSet::new(),
            backends: ["198.18.2.10:5353".parse().unwrap()].into(),
        };
        sender.send(ended.clone());
        assert_eq!(rx.try_recv().ok(), Some(ended));
        assert!(rx.try_recv().is_err());
    }
}
