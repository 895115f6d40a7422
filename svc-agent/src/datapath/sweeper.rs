//! Clearing flow state off the reconcile pass.
//!
//! When a pass ends `(frontend, backend)` pairs or removes backends, the UDP flows, UDP
//! sockets' backends and affinity entries that name them are cleared (`flows.rs`): one bounded
//! pass over `CT_V1`, `CT_NEW_V1`, `SOCK_UDP_PIN_V1` and `AFFINITY_V1`, which at millions of
//! entries takes far longer than writing a change. The agent hands that work to a thread of its
//! own ([`Sweeper`]) with its own descriptors of those maps ([`FlowTables`]): a pass only queues
//! what ended and goes on, so the next change never waits behind a sweep.
//!
//! The thread takes every job queued when it wakes, merged: what ended, minus what a later pass
//! brought back (a backend that turned ready again within the same burst keeps its flows). The
//! reply entries of cleared UDP flows go [`UDP_REPLY_GRACE`](super::apply::UDP_REPLY_GRACE)
//! later (`flows::ReplySchedule`), when the thread wakes for them: not at the next pass, which
//! may never come. A pair or backend that came back meanwhile is left out of that too.
//!
//! Without a sweeper (tests, and the reconciler's default) the pass clears inline, as before.
//! Either way the same code clears and logs ([`clear_now`]).

use std::{
    os::fd::AsFd as _,
    sync::mpsc::{self, RecvTimeoutError},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::{
    Ebpf, Pod,
    maps::{HashMap as BpfHashMap, IterableMap as _, Map, MapData, MapError},
};
use svc_common::{
    affinity::{AffinityKey, AffinityValue},
    conntrack::{CtKey, CtValue},
    sock::{SockPinKey, SockPinValue},
};
use tracing::{info, warn};

use super::{
    apply::Cleared,
    batch,
    flows::{FlowTable, ReplySchedule, StaleFlows, Sweep, is_flow, is_reply, sweep},
};

/// The four clearing passes, over whatever tables hold the flow state.
pub trait FlowSweeps {
    /// Deletes the UDP flows (forward entries, in `CT_V1` and `CT_NEW_V1`) that name what
    /// `stale` says ended; their reply entries stay until [`clear_udp_replies`](Self::clear_udp_replies).
    ///
    /// # Errors
    /// When a table cannot be read or an entry cannot be deleted.
    fn clear_udp_flows(&mut self, stale: &StaleFlows) -> anyhow::Result<Sweep>;
    /// Deletes the reply entries of the UDP flows that name what `stale` says ended.
    ///
    /// # Errors
    /// As [`clear_udp_flows`](Self::clear_udp_flows).
    fn clear_udp_replies(&mut self, stale: &StaleFlows) -> anyhow::Result<Sweep>;
    /// Deletes the affinity entries that name what `stale` says ended.
    ///
    /// # Errors
    /// As [`clear_udp_flows`](Self::clear_udp_flows).
    fn clear_affinity(&mut self, stale: &StaleFlows) -> anyhow::Result<Sweep>;
    /// Forgets the backends of unconnected UDP sockets that name what `stale` says ended.
    ///
    /// # Errors
    /// As [`clear_udp_flows`](Self::clear_udp_flows).
    fn clear_sock_pins(&mut self, stale: &StaleFlows) -> anyhow::Result<Sweep>;
}

/// `CT_V1`, `CT_NEW_V1`, `AFFINITY_V1` and `SOCK_UDP_PIN_V1`, with the bound of one pass over
/// each (its capacity).
pub struct FlowTables {
    ct: BpfHashMap<MapData, CtKey, CtValue>,
    ct_new: BpfHashMap<MapData, CtKey, CtValue>,
    affinity: BpfHashMap<MapData, AffinityKey, AffinityValue>,
    sock_pins: BpfHashMap<MapData, SockPinKey, SockPinValue>,
    ct_max: usize,
    ct_new_max: usize,
    affinity_max: usize,
    sock_pins_max: usize,
}

impl FlowTables {
    /// Takes the four tables out of `ebpf` (the programs keep using them).
    ///
    /// # Errors
    /// When a map is missing or of another kind.
    pub fn take(ebpf: &mut Ebpf) -> anyhow::Result<Self> {
        let (ct, ct_max) = take_hash(ebpf, "CT_V1")?;
        let (ct_new, ct_new_max) = take_hash(ebpf, "CT_NEW_V1")?;
        let (affinity, affinity_max) = take_hash(ebpf, "AFFINITY_V1")?;
        let (sock_pins, sock_pins_max) = take_hash(ebpf, "SOCK_UDP_PIN_V1")?;
        Ok(Self {
            ct,
            ct_new,
            affinity,
            sock_pins,
            ct_max,
            ct_new_max,
            affinity_max,
            sock_pins_max,
        })
    }

    /// The same four maps through new descriptors (for the sweeper's thread).
    ///
    /// # Errors
    /// When a descriptor cannot be duplicated.
    pub fn try_clone(&self) -> anyhow::Result<Self> {
        Ok(Self {
            ct: dup(&self.ct).context("CT_V1")?,
            ct_new: dup(&self.ct_new).context("CT_NEW_V1")?,
            affinity: dup(&self.affinity).context("AFFINITY_V1")?,
            sock_pins: dup(&self.sock_pins).context("SOCK_UDP_PIN_V1")?,
            ..*self
        })
    }
}

/// A hash map (plain or LRU) taken out of `ebpf`, with its size.
fn take_hash<K: Pod, V: Pod>(
    ebpf: &mut Ebpf,
    name: &str,
) -> anyhow::Result<(BpfHashMap<MapData, K, V>, usize)> {
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| anyhow::anyhow!("no map {name} in the object"))?;
    let (Map::HashMap(data) | Map::LruHashMap(data)) = &map else {
        anyhow::bail!("map {name} is not a hash map");
    };
    let max = data
        .info()
        .with_context(|| format!("reading {name}'s info"))?
        .max_entries();
    let max = usize::try_from(max).with_context(|| format!("{name}'s size"))?;
    Ok((
        BpfHashMap::try_from(map).with_context(|| name.to_owned())?,
        max,
    ))
}

/// The map behind `map`, through a new descriptor.
fn dup<K: Pod, V: Pod>(
    map: &BpfHashMap<MapData, K, V>,
) -> anyhow::Result<BpfHashMap<MapData, K, V>> {
    let fd = map
        .map()
        .fd()
        .as_fd()
        .try_clone_to_owned()
        .context("duplicating a map descriptor")?;
    let data = MapData::from_fd(fd)?;
    // `HashMap::try_from` checks the map's kind; both hash kinds hold entries alike.
    let is_lru = data.info()?.map_type()? == aya::maps::MapType::LruHash;
    let map = if is_lru {
        Map::LruHashMap(data)
    } else {
        Map::HashMap(data)
    };
    Ok(BpfHashMap::try_from(map)?)
}

impl FlowSweeps for FlowTables {
    fn clear_udp_flows(&mut self, stale: &StaleFlows) -> anyhow::Result<Sweep> {
        let answered = sweep(
            &mut AyaTable(&mut self.ct),
            self.ct_max,
            |k, v| stale.matches_ct(k, v) && is_flow(k, v),
            is_flow,
        )
        .context("clearing CT_V1")?;
        // Flows nothing answered yet (a datagram whose backend never replied) live in
        // CT_NEW_V1 until their first answer; their reply entries wait too (a first answer
        // may be on its way).
        let unanswered = sweep(
            &mut AyaTable(&mut self.ct_new),
            self.ct_new_max,
            |k, v| stale.matches_ct(k, v) && is_flow(k, v),
            is_flow,
        )
        .context("clearing CT_NEW_V1")?;
        Ok(answered.plus(unanswered))
    }
    fn clear_udp_replies(&mut self, stale: &StaleFlows) -> anyhow::Result<Sweep> {
        let answered = sweep(
            &mut AyaTable(&mut self.ct),
            self.ct_max,
            |k, v| stale.matches_ct(k, v) && is_reply(k, v),
            |_, _| false,
        )
        .context("clearing CT_V1's reply entries")?;
        let unanswered = sweep(
            &mut AyaTable(&mut self.ct_new),
            self.ct_new_max,
            |k, v| stale.matches_ct(k, v) && is_reply(k, v),
            |_, _| false,
        )
        .context("clearing CT_NEW_V1's reply entries")?;
        Ok(answered.plus(unanswered))
    }
    fn clear_affinity(&mut self, stale: &StaleFlows) -> anyhow::Result<Sweep> {
        sweep(
            &mut AyaTable(&mut self.affinity),
            self.affinity_max,
            |k, v| stale.matches_affinity(k, v),
            |_, _| true,
        )
        .context("clearing AFFINITY_V1")
    }
    fn clear_sock_pins(&mut self, stale: &StaleFlows) -> anyhow::Result<Sweep> {
        sweep(
            &mut AyaTable(&mut self.sock_pins),
            self.sock_pins_max,
            |_, v| stale.matches_sock_pin(v),
            |_, _| true,
        )
        .context("clearing SOCK_UDP_PIN_V1")
    }
}

/// A BPF hash map as a [`FlowTable`]: read in batches, deleted from one key at a time.
struct AyaTable<'a, K, V>(&'a mut BpfHashMap<MapData, K, V>);

impl<K: Pod, V: Pod> FlowTable<K, V> for AyaTable<'_, K, V> {
    type Error = anyhow::Error;
    fn entries(&self) -> impl Iterator<Item = anyhow::Result<(K, V)>> + '_ {
        batch::entries(self.0).map(|r| r.context("BPF_MAP_LOOKUP_BATCH"))
    }
    fn get(&self, key: &K) -> anyhow::Result<Option<V>> {
        match self.0.get(key, 0) {
            Ok(value) => Ok(Some(value)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e).context("looking an entry up again"),
        }
    }
    fn remove(&mut self, key: &K) -> anyhow::Result<bool> {
        match self.0.remove(key) {
            Ok(()) => Ok(true),
            Err(MapError::KeyNotFound) => Ok(false),
            Err(e) => Err(e).context("deleting an entry"),
        }
    }
}

/// Forgets the UDP flows (when `udp`: forward entries now, reply entries scheduled in
/// `replies`) and affinity entries that name what `stale` says ended, one bounded pass over
/// each table; logs what it did. Failures go to `errors`.
pub fn clear_now(
    tables: &mut impl FlowSweeps,
    stale: &StaleFlows,
    udp: bool,
    replies: &mut ReplySchedule,
    errors: &mut Vec<String>,
) -> Cleared {
    let started = Instant::now();
    let mut cleared = Cleared {
        removed_backends: stale.backends.len(),
        ended_pairs: stale.pairs.len(),
        ..Cleared::default()
    };
    if udp {
        match tables.clear_udp_flows(stale) {
            Ok(sweep) => {
                cleared.udp = Some(sweep);
                replies.push(Instant::now(), stale.clone());
            }
            Err(e) => errors.push(format!("clearing UDP flows of ended backends: {e:#}")),
        }
        match tables.clear_sock_pins(stale) {
            Ok(sweep) => cleared.sock_pins = Some(sweep),
            Err(e) => errors.push(format!(
                "clearing UDP sockets' backends of ended backends: {e:#}"
            )),
        }
    }
    match tables.clear_affinity(stale) {
        Ok(sweep) => cleared.affinity = Some(sweep),
        Err(e) => errors.push(format!(
            "clearing affinity entries of ended backends: {e:#}"
        )),
    }
    let udp = cleared.udp.unwrap_or_default();
    let affinity = cleared.affinity.unwrap_or_default();
    let sock_pins = cleared.sock_pins.unwrap_or_default();
    info!(
        udp_flows = udp.flows,
        ct_entries = udp.deleted,
        ct_scanned = udp.visited,
        ct_scan = if cleared.udp.is_some() {
            "done"
        } else {
            "skipped: no UDP frontend concerned"
        },
        affinity_entries = affinity.deleted,
        affinity_scanned = affinity.visited,
        sock_pins = sock_pins.deleted,
        ended_pairs = cleared.ended_pairs,
        took_ms = started.elapsed().as_secs_f64() * 1e3,
        "cleared {} UDP flows of {} removed backends",
        // Flows tracked per packet, and sockets given a backend at the socket.
        udp.flows + sock_pins.deleted,
        cleared.removed_backends,
    );
    if udp.truncated || affinity.truncated || sock_pins.truncated {
        warn!(
            ct_truncated = udp.truncated,
            affinity_truncated = affinity.truncated,
            sock_pins_truncated = sock_pins.truncated,
            "a flow-clearing pass stopped at its bound (the table's capacity); entries it \
             did not reach are left to the kernel's check of removed backends"
        );
    }
    cleared
}

/// Clears the reply entries `due` names (UDP flows cleared at least the grace ago); logs what
/// it did. `None` (with the failure in `errors`) when the pass failed.
pub fn clear_replies_now(
    tables: &mut impl FlowSweeps,
    due: &StaleFlows,
    grace: Duration,
    errors: &mut Vec<String>,
) -> Option<Sweep> {
    match tables.clear_udp_replies(due) {
        Ok(sweep) => {
            info!(
                ct_entries = sweep.deleted,
                ct_scanned = sweep.visited,
                truncated = sweep.truncated,
                "cleared the reply entries of UDP flows cleared at least {grace:?} ago"
            );
            Some(sweep)
        }
        Err(e) => {
            errors.push(format!("clearing reply entries of ended UDP flows: {e:#}"));
            None
        }
    }
}

/// What a pass tells the sweeper.
#[derive(Debug)]
enum Job {
    /// These ended; `udp`: a UDP frontend is concerned (the connection tables are swept too).
    Ended { stale: StaleFlows, udp: bool },
    /// These are reachable (pairs) or exist (backends) again: not to be cleared any more.
    Revived(StaleFlows),
}

/// The thread that clears flow state off the pass. Dropping it stops the thread after the job
/// at hand.
#[derive(Debug)]
pub struct Sweeper {
    jobs: mpsc::Sender<Job>,
}

impl Sweeper {
    /// Starts the thread over `tables`; reply entries of cleared UDP flows go `reply_grace`
    /// after their flows.
    ///
    /// # Errors
    /// When the thread cannot be started.
    pub fn start(
        tables: impl FlowSweeps + Send + 'static,
        reply_grace: Duration,
    ) -> anyhow::Result<Self> {
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("svc-sweep".to_owned())
            .spawn(move || {
                let mut state = SweepState::new(tables, reply_grace);
                state.run(&rx);
            })
            .context("starting the flow-clearing thread")?;
        Ok(Self { jobs: tx })
    }

    /// Queues the clearing of what `stale` names (`udp`: the connection tables too).
    pub fn ended(&self, stale: StaleFlows, udp: bool) {
        if !stale.is_empty() {
            // A stopped thread (it never stops while the sender lives) has nothing to clear.
            let _ = self.jobs.send(Job::Ended { stale, udp });
        }
    }

    /// Tells the thread that these pairs are reachable and these backends exist again.
    pub fn revived(&self, back: StaleFlows) {
        if !back.is_empty() {
            let _ = self.jobs.send(Job::Revived(back));
        }
    }
}

/// The sweeper thread's state: the tables, what is queued, and the reply schedule.
struct SweepState<T> {
    tables: T,
    replies: ReplySchedule,
    /// Ended, not cleared yet.
    ended: StaleFlows,
    udp: bool,
}

impl<T: FlowSweeps> SweepState<T> {
    fn new(tables: T, reply_grace: Duration) -> Self {
        Self {
            tables,
            replies: ReplySchedule::new(reply_grace),
            ended: StaleFlows::default(),
            udp: false,
        }
    }

    /// Takes jobs until the sender is gone.
    fn run(&mut self, jobs: &mpsc::Receiver<Job>) {
        loop {
            let job = match self.replies.next_due() {
                Some(due) => {
                    match jobs.recv_timeout(due.saturating_duration_since(Instant::now())) {
                        Ok(job) => Some(job),
                        Err(RecvTimeoutError::Timeout) => None,
                        Err(RecvTimeoutError::Disconnected) => return,
                    }
                }
                None => match jobs.recv() {
                    Ok(job) => Some(job),
                    Err(mpsc::RecvError) => return,
                },
            };
            if let Some(job) = job {
                self.take(job);
                // Everything queued meanwhile, so a later pass's revival counts.
                while let Ok(job) = jobs.try_recv() {
                    self.take(job);
                }
            }
            self.work(Instant::now());
        }
    }

    fn take(&mut self, job: Job) {
        match job {
            Job::Ended { stale, udp } => {
                self.ended.merge(stale);
                self.udp |= udp;
            }
            Job::Revived(back) => {
                self.ended.pairs.retain(|p| !back.pairs.contains(p));
                self.ended.backends.retain(|b| !back.backends.contains(b));
                self.replies.forget(&back);
            }
        }
    }

    /// Clears what ended, then the reply entries due by `now`.
    fn work(&mut self, now: Instant) {
        let mut errors = Vec::new();
        if !self.ended.is_empty() {
            let stale = std::mem::take(&mut self.ended);
            let udp = std::mem::take(&mut self.udp);
            clear_now(
                &mut self.tables,
                &stale,
                udp,
                &mut self.replies,
                &mut errors,
            );
        }
        if let Some(due) = self.replies.take_due(now).filter(|d| !d.is_empty()) {
            let grace = self.replies.grace();
            clear_replies_now(&mut self.tables, &due, grace, &mut errors);
        }
        for e in errors {
            warn!(error = %e, "clearing flow state");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// Records what each pass was asked to clear.
    #[derive(Default)]
    struct Recorder {
        flows: Vec<StaleFlows>,
        replies: Vec<StaleFlows>,
        affinity: Vec<StaleFlows>,
    }

    impl FlowSweeps for Recorder {
        fn clear_udp_flows(&mut self, stale: &StaleFlows) -> anyhow::Result<Sweep> {
            self.flows.push(stale.clone());
            Ok(Sweep::default())
        }
        fn clear_udp_replies(&mut self, stale: &StaleFlows) -> anyhow::Result<Sweep> {
            self.replies.push(stale.clone());
            Ok(Sweep::default())
        }
        fn clear_affinity(&mut self, stale: &StaleFlows) -> anyhow::Result<Sweep> {
            self.affinity.push(stale.clone());
            Ok(Sweep::default())
        }
        fn clear_sock_pins(&mut self, _: &StaleFlows) -> anyhow::Result<Sweep> {
            Ok(Sweep::default())
        }
    }

    fn stale(pairs: &[(u32, u32)], backends: &[u32]) -> StaleFlows {
        StaleFlows {
            pairs: pairs.iter().copied().collect(),
            backends: backends.iter().copied().collect::<BTreeSet<_>>(),
        }
    }

    #[test]
    fn queued_jobs_are_merged_and_a_later_revival_is_left_alone() {
        let mut s = SweepState::new(Recorder::default(), Duration::from_secs(2));
        s.take(Job::Ended {
            stale: stale(&[(1, 10), (1, 11)], &[12]),
            udp: false,
        });
        s.take(Job::Ended {
            stale: stale(&[(2, 10)], &[]),
            udp: true,
        });
        s.take(Job::Revived(stale(&[(1, 11)], &[])));
        let t0 = Instant::now();
        s.work(t0);
        assert_eq!(s.tables.flows, vec![stale(&[(1, 10), (2, 10)], &[12])]);
        assert_eq!(s.tables.affinity, s.tables.flows);
        assert!(s.tables.replies.is_empty(), "replies wait for their grace");
        s.work(t0 + Duration::from_secs(3));
        assert_eq!(s.tables.replies, vec![stale(&[(1, 10), (2, 10)], &[12])]);
        s.work(t0 + Duration::from_secs(6));
        assert_eq!(s.tables.replies.len(), 1, "each batch is cleared once");
    }

    #[test]
    fn a_pair_revived_during_its_grace_keeps_its_reply_entries() {
        let mut s = SweepState::new(Recorder::default(), Duration::from_secs(2));
        s.take(Job::Ended {
            stale: stale(&[(1, 10), (1, 11)], &[]),
            udp: true,
        });
        let t0 = Instant::now();
        s.work(t0);
        s.take(Job::Revived(stale(&[(1, 10)], &[])));
        s.work(t0 + Duration::from_secs(3));
        assert_eq!(s.tables.replies, vec![stale(&[(1, 11)], &[])]);
    }

    #[test]
    fn tcp_only_endings_leave_the_connection_tables_alone() {
        let mut s = SweepState::new(Recorder::default(), Duration::from_secs(2));
        s.take(Job::Ended {
            stale: stale(&[(1, 10)], &[]),
            udp: false,
        });
        s.work(Instant::now());
        assert!(s.tables.flows.is_empty());
        assert_eq!(s.tables.affinity.len(), 1);
        assert_eq!(s.replies.len(), 0);
    }

    #[test]
    fn the_thread_clears_what_a_pass_queued_and_stops_with_its_sender() {
        use std::sync::{Arc, Mutex};
        struct Shared(Arc<Mutex<Recorder>>);
        impl FlowSweeps for Shared {
            fn clear_udp_flows(&mut self, s: &StaleFlows) -> anyhow::Result<Sweep> {
                self.0.lock().unwrap().clear_udp_flows(s)
            }
            fn clear_udp_replies(&mut self, s: &StaleFlows) -> anyhow::Result<Sweep> {
                self.0.lock().unwrap().clear_udp_replies(s)
            }
            fn clear_affinity(&mut self, s: &StaleFlows) -> anyhow::Result<Sweep> {
                self.0.lock().unwrap().clear_affinity(s)
            }
            fn clear_sock_pins(&mut self, s: &StaleFlows) -> anyhow::Result<Sweep> {
                self.0.lock().unwrap().clear_sock_pins(s)
            }
        }
        let seen = Arc::new(Mutex::new(Recorder::default()));
        let sweeper = Sweeper::start(Shared(Arc::clone(&seen)), Duration::from_millis(50)).unwrap();
        sweeper.ended(stale(&[(1, 10)], &[]), true);
        let deadline = Instant::now() + Duration::from_secs(5);
        while seen.lock().unwrap().replies.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let seen = seen.lock().unwrap();
        assert_eq!(seen.flows, vec![stale(&[(1, 10)], &[])]);
        assert_eq!(
            seen.replies,
            vec![stale(&[(1, 10)], &[])],
            "the thread wakes for the reply entries by itself"
        );
    }
}
