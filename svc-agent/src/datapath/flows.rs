//! Clearing kernel state that names backends a frontend no longer has.
//!
//! The kernel programs own `CT_V1` (connection table) and `AFFINITY_V1` (`ClientIP` affinity);
//! the agent only deletes from them, here. When a reconcile pass ends `(frontend, backend)`
//! pairs (an endpoint left a Service's slices, or the Service went away) or removes backends
//! from `BACKENDS_V1`, it deletes, in one bounded pass over each table:
//! - the connection-table entries of **UDP** flows that name such a pair or backend, so the
//!   client's next datagram chooses a live backend at once: the forward entries at once, the
//!   reply entries at a pass at least a grace later ([`ReplySchedule`]), so a reply already on
//!   its way still leaves with the service address. kube-proxy does the
//!   same with `conntrack -D` for UDP. TCP flows are left alone: a connection to a pod that is
//!   gone ends by itself (the next segment chooses a live backend, which answers with a reset),
//!   and one to a pod that only left this Service keeps working, as with kube-proxy;
//! - the affinity entries that send a client of a frontend to such a pair or backend, so that
//!   client's next connection is chosen afresh;
//! - the backends unconnected UDP sockets were given per service at the socket
//!   (`SOCK_UDP_PIN_V1`) that name such a pair or backend, so the socket's next datagram to the
//!   service chooses a live backend (the kernel itself only notices a backend that is gone).
//!
//! The kernel's own check stays the fallback for whatever this misses (a pass cut short at its
//! bound, an agent that stopped in between): an established flow whose backend id is no longer
//! in `BACKENDS_V1` chooses a new backend, and an affinity entry naming a backend that is gone
//! or may not take new connections is ignored. Only a backend that left one frontend while
//! another still uses it depends on this pass, for UDP flows and affinity.
//!
//! A pass collects the keys to delete while reading the table (in batches of thousands of
//! entries per system call for the real maps, see `batch.rs`; at most the table's capacity in
//! entries, a bound that holds whatever the kernel's iteration does), then deletes them one by
//! one after reading each again: an entry the kernel has meanwhile re-pointed at a live backend
//! is kept. Reading costs well under a microsecond per entry and deleting two system calls per
//! cleared entry; the pass runs only when a reconcile ended something, once per table.

use std::{
    collections::{BTreeSet, HashSet, VecDeque},
    time::{Duration, Instant},
};

use svc_common::{
    affinity::{AffinityKey, AffinityValue},
    conntrack::{CtKey, CtValue, dir, state},
    net::ipproto,
    sock::SockPinValue,
};

/// What the connection and affinity tables may still name although it is gone.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StaleFlows {
    /// `(frontend id, backend id)` pairs that ended: the backend is neither in the frontend's
    /// slots nor kept for its established flows any more, or the frontend is gone.
    pub pairs: BTreeSet<(u32, u32)>,
    /// Backend ids removed from `BACKENDS_V1` (whichever frontend an entry names with them).
    pub backends: BTreeSet<u32>,
}

impl StaleFlows {
    /// Whether nothing ended.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty() && self.backends.is_empty()
    }

    /// Whether a flow or client of `frontend_id` sent to `backend_id` must be forgotten.
    #[must_use]
    pub fn names(&self, frontend_id: u32, backend_id: u32) -> bool {
        self.backends.contains(&backend_id) || self.pairs.contains(&(frontend_id, backend_id))
    }

    /// Whether a connection-table entry is one to delete: a UDP flow (either direction) whose
    /// frontend and backend are stale.
    #[must_use]
    pub fn matches_ct(&self, key: &CtKey, value: &CtValue) -> bool {
        key.proto == ipproto::UDP && self.names(value.frontend_id, value.backend_id)
    }

    /// Whether an affinity entry is one to delete.
    #[must_use]
    pub fn matches_affinity(&self, key: &AffinityKey, value: &AffinityValue) -> bool {
        self.names(key.frontend_id, value.backend_id)
    }

    /// Whether an unconnected UDP socket's backend (`SOCK_UDP_PIN_V1`) is one to forget.
    #[must_use]
    pub fn matches_sock_pin(&self, value: &SockPinValue) -> bool {
        self.names(value.frontend_id, value.backend_id)
    }
}

/// Whether a connection-table entry stands for a flow of its own (its forward entry), rather
/// than the reply leg of one.
#[must_use]
pub fn is_flow(key: &CtKey, value: &CtValue) -> bool {
    key.dir == dir::FORWARD && value.state & state::HAIRPIN_REPLY == 0
}

impl StaleFlows {
    /// Adds what `other` says ended.
    pub fn merge(&mut self, other: Self) {
        self.pairs.extend(other.pairs);
        self.backends.extend(other.backends);
    }
}

/// When the reply entries of cleared UDP flows go.
///
/// A pass deletes the forward entries of the UDP flows it ends at once (the client's next
/// datagram chooses a live backend) but not their reply entries: a reply the old backend sent
/// just before (still in a queue, on the wire, in the other direction's program) must still find
/// its entry and leave with the service address. The reply entries go at the first pass at
/// least the grace later. Bounded: at most [`ReplySchedule::MAX_PENDING`] batches wait (more
/// are merged into the newest, whose time moves to the newest's), and each is cleared once;
/// should no pass come (no change in the cluster), the kernel's idle timeout of UDP entries
/// (60 s, checked at lookup) ends them, and until then such an entry can only rewrite a reply
/// from that old backend address and port to that client address and port.
#[derive(Debug, Clone)]
pub struct ReplySchedule {
    grace: Duration,
    pending: VecDeque<(Instant, StaleFlows)>,
}

impl ReplySchedule {
    /// Batches waiting at most; more are merged.
    pub const MAX_PENDING: usize = 16;

    /// A schedule whose batches wait `grace`.
    #[must_use]
    pub fn new(grace: Duration) -> Self {
        Self {
            grace,
            pending: VecDeque::new(),
        }
    }

    /// How long a batch waits.
    #[must_use]
    pub fn grace(&self) -> Duration {
        self.grace
    }

    /// Changes how long batches pushed from now on wait.
    pub fn set_grace(&mut self, grace: Duration) {
        self.grace = grace;
    }

    /// The reply entries of what `stale` names are to go once the grace from `now` is over.
    pub fn push(&mut self, now: Instant, stale: StaleFlows) {
        if stale.is_empty() {
            return;
        }
        let due = now + self.grace;
        if self.pending.len() >= Self::MAX_PENDING
            && let Some((last_due, last)) = self.pending.back_mut()
        {
            last.merge(stale);
            *last_due = due;
            return;
        }
        self.pending.push_back((due, stale));
    }

    /// Takes every batch whose time has come by `now`, merged; `None` when none has.
    pub fn take_due(&mut self, now: Instant) -> Option<StaleFlows> {
        let mut due: Option<StaleFlows> = None;
        while self.pending.front().is_some_and(|(at, _)| *at <= now) {
            if let Some((_, stale)) = self.pending.pop_front() {
                due.get_or_insert_with(StaleFlows::default).merge(stale);
            }
        }
        due
    }

    /// Leaves out of every waiting batch what `back` names (pairs reachable again, backends
    /// that exist again): their reply entries are in use again.
    pub fn forget(&mut self, back: &StaleFlows) {
        for (_, stale) in &mut self.pending {
            stale.pairs.retain(|p| !back.pairs.contains(p));
            stale.backends.retain(|b| !back.backends.contains(b));
        }
        self.pending.retain(|(_, stale)| !stale.is_empty());
    }

    /// When the next batch is due.
    #[must_use]
    pub fn next_due(&self) -> Option<Instant> {
        self.pending.front().map(|(at, _)| *at)
    }

    /// Batches waiting.
    #[must_use]
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// Whether none waits.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

/// Whether a connection-table entry is the reply leg of a flow (a reply entry, or a hairpin
/// flow's second forward entry): what [`ReplySchedule`] clears after the grace.
#[must_use]
pub fn is_reply(key: &CtKey, value: &CtValue) -> bool {
    !is_flow(key, value)
}

/// What one pass over a table did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Sweep {
    /// Entries read.
    pub visited: usize,
    /// Entries deleted.
    pub deleted: usize,
    /// Of those, how many stood for a flow or a client: forward connection-table entries (a
    /// flow's reply entry goes with it), or affinity entries.
    pub flows: usize,
    /// The pass stopped at its bound before the end of the table: matching entries may remain
    /// (the kernel's lazy check still covers removed backends).
    pub truncated: bool,
}

impl Sweep {
    /// Two passes (over two tables) as one.
    #[must_use]
    pub fn plus(self, other: Self) -> Self {
        Self {
            visited: self.visited + other.visited,
            deleted: self.deleted + other.deleted,
            flows: self.flows + other.flows,
            truncated: self.truncated || other.truncated,
        }
    }
}

/// A table a pass reads and deletes from: the real maps, or a test's.
pub trait FlowTable<K, V> {
    /// What a failed read or delete reports.
    type Error;
    /// Every entry, in the table's order.
    fn entries(&self) -> impl Iterator<Item = Result<(K, V), Self::Error>> + '_;
    /// The entry of `key`, if there is one.
    fn get(&self, key: &K) -> Result<Option<V>, Self::Error>;
    /// Deletes the entry of `key`; `false` when there was none.
    fn remove(&mut self, key: &K) -> Result<bool, Self::Error>;
}

/// One pass over `table`: reads at most `limit` entries, then deletes those `matches` accepts
/// (each read again first, and kept if it no longer matches). `is_flow` says which deleted
/// entries count as flows.
pub fn sweep<K, V, T>(
    table: &mut T,
    limit: usize,
    matches: impl Fn(&K, &V) -> bool,
    is_flow: impl Fn(&K, &V) -> bool,
) -> Result<Sweep, T::Error>
where
    K: Copy + Eq + std::hash::Hash,
    T: FlowTable<K, V>,
{
    let found = collect_matching(table.entries(), limit, &matches)?;
    delete_collected(&found, |k| delete_if_still(table, k, &matches), is_flow)
}

/// Deletes `key` from `table` if it is still there and `still` accepts its value now (the
/// kernel may have re-pointed it since it was read). BPF maps have no compare-and-delete: an
/// entry re-pointed between this read and the delete is lost, and its flow chooses again.
pub fn delete_if_still<K, V, T: FlowTable<K, V>>(
    table: &mut T,
    key: &K,
    still: impl Fn(&K, &V) -> bool,
) -> Result<Deleted<V>, T::Error> {
    match table.get(key)? {
        Some(value) if still(key, &value) => Ok(if table.remove(key)? {
            Deleted::Yes(value)
        } else {
            Deleted::No
        }),
        _ => Ok(Deleted::No),
    }
}

/// Keys to delete found by reading a table.
#[derive(Debug)]
struct Collected<K> {
    /// The matching keys, each once, in the order first read.
    keys: Vec<K>,
    /// Entries read.
    visited: usize,
    /// Reading stopped at `limit` before the end of the table.
    truncated: bool,
}

/// Reads at most `limit` entries of `entries` and returns the keys of those `matches` accepts.
/// Stops at the first read error.
fn collect_matching<K, V, E>(
    entries: impl IntoIterator<Item = Result<(K, V), E>>,
    limit: usize,
    matches: impl Fn(&K, &V) -> bool,
) -> Result<Collected<K>, E>
where
    K: Copy + Eq + std::hash::Hash,
{
    let mut seen = HashSet::new();
    let mut out = Collected {
        keys: Vec::new(),
        visited: 0,
        truncated: false,
    };
    let mut entries = entries.into_iter();
    loop {
        if out.visited == limit {
            out.truncated = entries.next().is_some();
            return Ok(out);
        }
        let Some(entry) = entries.next() else {
            return Ok(out);
        };
        let (key, value) = entry?;
        out.visited += 1;
        // The kernel restarts an iteration whose current key was deleted meanwhile: the same
        // key may come twice.
        if matches(&key, &value) && seen.insert(key) {
            out.keys.push(key);
        }
    }
}

/// What happened to one key when it was to be deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deleted<V> {
    /// Deleted; the value it had.
    Yes(V),
    /// Gone already (expired, evicted) or re-pointed at a live backend since it was read: kept.
    No,
}

/// Deletes `keys` one by one through `delete` (which re-reads each and deletes it only while it
/// still matches) and tallies the result; `is_flow` says which deleted entries count as flows.
fn delete_collected<K, V, E>(
    collected: &Collected<K>,
    mut delete: impl FnMut(&K) -> Result<Deleted<V>, E>,
    is_flow: impl Fn(&K, &V) -> bool,
) -> Result<Sweep, E> {
    let mut sweep = Sweep {
        visited: collected.visited,
        truncated: collected.truncated,
        ..Sweep::default()
    };
    for key in &collected.keys {
        if let Deleted::Yes(value) = delete(key)? {
            sweep.deleted += 1;
            sweep.flows += usize::from(is_flow(key, &value));
        }
    }
    Ok(sweep)
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, convert::Infallible};

    use svc_common::{Be16, addr::from_v4};

    use super::*;

    /// A table whose first read of `race.0` finds `race.1` there: the kernel re-pointed the
    /// entry between the pass's reading and its deleting.
    struct Racing {
        entries: HashMap<CtKey, CtValue>,
        race: Option<(CtKey, CtValue)>,
    }

    impl FlowTable<CtKey, CtValue> for Racing {
        type Error = Infallible;
        fn entries(&self) -> impl Iterator<Item = Result<(CtKey, CtValue), Infallible>> + '_ {
            self.entries.iter().map(|(k, v)| Ok((*k, *v)))
        }
        fn get(&self, key: &CtKey) -> Result<Option<CtValue>, Infallible> {
            Ok(match self.race {
                Some((k, v)) if k == *key => Some(v),
                _ => self.entries.get(key).copied(),
            })
        }
        fn remove(&mut self, key: &CtKey) -> Result<bool, Infallible> {
            Ok(self.entries.remove(key).is_some())
        }
    }

    fn ct(proto: u8, d: u8, sport: u16) -> CtKey {
        CtKey {
            src: from_v4([198, 18, 1, 10]),
            dst: from_v4([198, 19, 0, 10]),
            sport: Be16::from_host(sport),
            dport: Be16::from_host(53),
            proto,
            family: 4,
            dir: d,
            _pad: 0,
        }
    }

    fn value(frontend_id: u32, backend_id: u32) -> CtValue {
        CtValue {
            frontend_id,
            backend_id,
            ..CtValue::default()
        }
    }

    fn stale() -> StaleFlows {
        StaleFlows {
            pairs: [(1, 10)].into(),
            backends: [20].into(),
        }
    }

    #[test]
    fn only_udp_entries_naming_a_stale_pair_or_removed_backend_match() {
        let s = stale();
        let udp = ct(ipproto::UDP, dir::FORWARD, 40000);
        let tcp = ct(ipproto::TCP, dir::FORWARD, 40000);
        assert!(s.matches_ct(&udp, &value(1, 10)), "stale pair");
        assert!(
            s.matches_ct(&ct(ipproto::UDP, dir::REPLY, 40000), &value(1, 10)),
            "reply entries go too"
        );
        assert!(
            s.matches_ct(&udp, &value(7, 20)),
            "removed backend, any frontend"
        );
        assert!(
            !s.matches_ct(&udp, &value(2, 10)),
            "backend 10 only left frontend 1; frontend 2 keeps it"
        );
        assert!(!s.matches_ct(&udp, &value(1, 11)));
        assert!(
            !s.matches_ct(&tcp, &value(1, 10)),
            "TCP flows end by themselves"
        );
        assert!(!s.matches_ct(&tcp, &value(1, 20)));
    }

    #[test]
    fn affinity_entries_of_any_protocol_match_by_frontend_and_backend() {
        let s = stale();
        let key = |frontend_id| AffinityKey {
            client: from_v4([198, 18, 1, 10]),
            frontend_id,
            family: 4,
            _pad: [0; 3],
        };
        let to = |backend_id| AffinityValue {
            backend_id,
            ..AffinityValue::default()
        };
        assert!(s.matches_affinity(&key(1), &to(10)));
        assert!(s.matches_affinity(&key(3), &to(20)));
        assert!(!s.matches_affinity(&key(2), &to(10)));
        assert!(StaleFlows::default().is_empty() && !s.is_empty());
    }

    #[test]
    fn collecting_stops_at_the_limit_and_skips_repeated_keys() {
        let entries: Vec<Result<(u32, u32), ()>> =
            vec![Ok((1, 1)), Ok((2, 0)), Ok((1, 1)), Ok((3, 1)), Ok((4, 1))];
        let all = collect_matching(entries.clone(), 10, |_, v| *v == 1).unwrap();
        assert_eq!(
            (all.keys, all.visited, all.truncated),
            (vec![1, 3, 4], 5, false)
        );
        let cut = collect_matching(entries.clone(), 3, |_, v| *v == 1).unwrap();
        assert_eq!((cut.keys, cut.visited, cut.truncated), (vec![1], 3, true));
        let exact = collect_matching(entries, 5, |_, v| *v == 1).unwrap();
        assert!(
            !exact.truncated,
            "reading the last entry at the limit is complete"
        );
    }

    #[test]
    fn collecting_passes_read_errors_on() {
        let entries: Vec<Result<(u32, u32), &str>> = vec![Ok((1, 1)), Err("EIO")];
        assert_eq!(
            collect_matching(entries, 10, |_, _| true).unwrap_err(),
            "EIO"
        );
    }

    #[test]
    fn deleting_counts_only_what_was_still_there_and_flows_separately() {
        let collected = Collected {
            keys: vec![
                ct(ipproto::UDP, dir::FORWARD, 1),
                ct(ipproto::UDP, dir::REPLY, 1),
                ct(ipproto::UDP, dir::FORWARD, 2),
                ct(ipproto::UDP, dir::FORWARD, 3),
            ],
            visited: 9,
            truncated: false,
        };
        let hairpin_reply = CtValue {
            state: state::HAIRPIN_REPLY,
            ..value(1, 10)
        };
        let sweep = delete_collected(
            &collected,
            |k| -> Result<_, ()> {
                Ok(match k.sport.to_host() {
                    // Re-pointed at a live backend since it was read.
                    2 => Deleted::No,
                    3 => Deleted::Yes(hairpin_reply),
                    _ => Deleted::Yes(value(1, 10)),
                })
            },
            is_flow,
        )
        .unwrap();
        assert_eq!(
            sweep,
            Sweep {
                visited: 9,
                deleted: 3,
                flows: 1,
                truncated: false
            }
        );
    }

    #[test]
    fn an_entry_re_pointed_after_it_was_read_is_kept_and_one_gone_already_is_not_counted() {
        let stale = StaleFlows {
            pairs: BTreeSet::new(),
            backends: [20].into(),
        };
        let (forward, reply, other) = (
            ct(ipproto::UDP, dir::FORWARD, 40000),
            ct(ipproto::UDP, dir::REPLY, 40000),
            ct(ipproto::UDP, dir::FORWARD, 40001),
        );
        let mut table = Racing {
            entries: [
                (forward, value(1, 20)),
                (reply, value(1, 20)),
                (other, value(1, 21)),
            ]
            .into(),
            // The kernel's lazy fallback moved the flow to backend 21 meanwhile.
            race: Some((forward, value(1, 21))),
        };
        let sweep = sweep(
            &mut table,
            usize::MAX,
            |k, v| stale.matches_ct(k, v),
            is_flow,
        )
        .unwrap();
        assert_eq!(
            sweep,
            Sweep {
                visited: 3,
                deleted: 1,
                flows: 0,
                truncated: false
            },
            "only the old reply entry goes"
        );
        assert!(table.entries.contains_key(&forward) && table.entries.contains_key(&other));
        assert_eq!(
            delete_if_still(&mut table, &reply, |_, _| true).unwrap(),
            Deleted::No,
            "deleted already"
        );
    }

    #[test]
    fn reply_entries_wait_for_the_grace_and_go_once() {
        let t0 = Instant::now();
        let grace = Duration::from_secs(2);
        let mut s = ReplySchedule::new(grace);
        assert_eq!(s.take_due(t0 + grace), None, "nothing pushed");
        s.push(t0, StaleFlows::default());
        assert!(s.is_empty(), "nothing ended: nothing to wait for");
        s.push(t0, stale());
        let later = StaleFlows {
            pairs: [(2, 30)].into(),
            backends: BTreeSet::new(),
        };
        s.push(t0 + Duration::from_secs(1), later.clone());
        assert_eq!(s.next_due(), Some(t0 + grace));
        assert_eq!(s.take_due(t0), None);
        assert_eq!(s.take_due(t0 + Duration::from_millis(1999)), None);
        assert_eq!(
            s.take_due(t0 + grace),
            Some(stale()),
            "the first batch only"
        );
        assert_eq!(s.take_due(t0 + grace), None, "each batch goes once");
        let mut both = stale();
        both.merge(later.clone());
        s.push(t0 + Duration::from_secs(3), stale());
        // A pass long after: every due batch at once, merged.
        assert_eq!(s.take_due(t0 + Duration::from_mins(1)), Some(both));
        assert!(s.is_empty() && s.next_due().is_none());
    }

    #[test]
    fn reply_batches_are_bounded_by_merging_into_the_newest() {
        let t0 = Instant::now();
        let mut s = ReplySchedule::new(Duration::from_secs(2));
        for i in 0..40u32 {
            s.push(
                t0 + Duration::from_millis(u64::from(i)),
                StaleFlows {
                    pairs: [(1, i)].into(),
                    backends: BTreeSet::new(),
                },
            );
        }
        assert_eq!(s.len(), ReplySchedule::MAX_PENDING);
        // The merged batch waits for the newest push's grace: no reply entry goes early.
        assert_eq!(
            s.take_due(t0 + Duration::from_millis(2038))
                .map(|f| f.pairs.len()),
            Some(ReplySchedule::MAX_PENDING - 1)
        );
        let rest = s.take_due(t0 + Duration::from_millis(2039)).unwrap();
        assert_eq!(rest.pairs.len(), 40 - (ReplySchedule::MAX_PENDING - 1));
        assert!(s.is_empty());
    }

    #[test]
    fn forward_and_reply_legs_are_told_apart() {
        let v = value(1, 10);
        assert!(is_flow(&ct(ipproto::UDP, dir::FORWARD, 1), &v));
        assert!(is_reply(&ct(ipproto::UDP, dir::REPLY, 1), &v));
        let hairpin = CtValue {
            state: state::HAIRPIN_REPLY,
            ..v
        };
        assert!(is_reply(&ct(ipproto::UDP, dir::FORWARD, 1), &hairpin));
    }
}
