//! `/healthz` and `/livez` (`--healthz-bind-address`), with kube-proxy's semantics
//! (`pkg/proxy/healthcheck/proxier_health.go`): the agent is healthy while nothing it was told
//! about waits to be programmed, or while the oldest change waiting is younger than
//! `--healthz-stale-after`; unhealthy (503) when a change has waited longer. `/healthz` also
//! answers 503 while this node is not eligible (its `Node` is being deleted, or tainted
//! `ToBeDeletedByClusterAutoscaler`); `/livez` ignores the node.
//!
//! One difference from kube-proxy, which answers 200 while it starts: before the first pass has
//! programmed the maps both answer 503, so a ready agent is a programmed one (the `DaemonSet`
//! gives the cold sync time with a startup probe).
//!
//! The sources tell [`Health`] when a change arrives ([`Health::queued`]) and when a pass has
//! programmed what they know ([`Health::updated`]); the HTTP task asks [`Health::check`]. The
//! clock is injected ([`Clock`]) so the state machine is tested without waiting.

use std::{
    fmt::{self, Write as _},
    sync::{Mutex, PoisonError},
    time::{Duration, Instant, SystemTime},
};

/// The taint the cluster autoscaler puts on a node it is about to delete.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// `--healthz-stale-after`'s default: kube-proxy's is twice its sync period (30 s).
pub const DEFAULT_STALE_AFTER: Duration = Duration::from_mins(1);

/// Where [`Health`] reads the time.
pub trait Clock: Send + Sync + fmt::Debug {
    /// A monotonic instant (ages are measured with it).
    fn now(&self) -> Instant;
    /// The wall-clock time (for the answers' timestamps).
    fn wall(&self) -> SystemTime;
}

/// The system's clocks.
#[derive(Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
    fn wall(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// The two endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probe {
    /// `/healthz`: programming fresh and the node eligible.
    Healthz,
    /// `/livez`: programming fresh, whatever the node.
    Livez,
}

impl Probe {
    /// The probe a request path names.
    #[must_use]
    pub fn of_path(path: &str) -> Option<Self> {
        match path {
            "/healthz" => Some(Self::Healthz),
            "/livez" => Some(Self::Livez),
            _ => None,
        }
    }
}

#[derive(Debug)]
struct State {
    /// When the last pass programmed the maps (`None`: none yet).
    last_updated: Option<SystemTime>,
    /// When the oldest change not programmed yet arrived (`None`: nothing waits).
    oldest_pending: Option<Instant>,
    node_eligible: bool,
}

/// The agent's health (see the [module docs](self)).
#[derive(Debug)]
pub struct Health {
    clock: Box<dyn Clock>,
    stale_after: Duration,
    state: Mutex<State>,
}

/// What [`Health::check`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// Programming is fresh (the node's eligibility aside).
    pub fresh: bool,
    /// The node is eligible (not being deleted, not tainted for deletion).
    pub node_eligible: bool,
    /// When the last pass programmed the maps.
    pub last_updated: Option<SystemTime>,
    /// Now.
    pub current_time: SystemTime,
    /// Why it is not fresh, for the log and the answer's text.
    pub why: Option<String>,
}

impl Health {
    /// Health on the system clock; a change is stale after `stale_after`.
    #[must_use]
    pub fn new(stale_after: Duration) -> Self {
        Self::with_clock(stale_after, Box::new(SystemClock))
    }

    /// Health on `clock`.
    #[must_use]
    pub fn with_clock(stale_after: Duration, clock: Box<dyn Clock>) -> Self {
        Self {
            clock,
            stale_after,
            state: Mutex::new(State {
                last_updated: None,
                oldest_pending: None,
                // Eligible until the Node says otherwise (as kube-proxy).
                node_eligible: true,
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A change arrived that a pass has to program: the oldest one waiting sets the age.
    pub fn queued(&self) {
        let now = self.clock.now();
        self.state().oldest_pending.get_or_insert(now);
    }

    /// A pass programmed everything the source knew when it began.
    pub fn updated(&self) {
        let wall = self.clock.wall();
        let mut state = self.state();
        state.oldest_pending = None;
        state.last_updated = Some(wall);
    }

    /// Whether this node may take traffic: not being deleted (`deletionTimestamp`), not
    /// tainted [`TO_BE_DELETED_TAINT`].
    pub fn set_node_eligible(&self, eligible: bool) {
        self.state().node_eligible = eligible;
    }

    /// The state now.
    #[must_use]
    pub fn check(&self) -> Verdict {
        let now = self.clock.now();
        let current_time = self.clock.wall();
        let state = self.state();
        let why = match (state.last_updated, state.oldest_pending) {
            (None, _) => Some("the first sync has not programmed the maps yet".to_owned()),
            (Some(_), Some(since)) if now.duration_since(since) >= self.stale_after => {
                Some(format!(
                    "a change has waited {:.1} s to be programmed (stale after {} s)",
                    now.duration_since(since).as_secs_f64(),
                    self.stale_after.as_secs()
                ))
            }
            _ => None,
        };
        Verdict {
            fresh: why.is_none(),
            node_eligible: state.node_eligible,
            last_updated: state.last_updated,
            current_time,
            why,
        }
    }

    /// The answer to `probe`: status code and JSON body, as kube-proxy's: `lastUpdated`,
    /// `currentTime` and (`/healthz`) `nodeEligible`. As kube-proxy does for compatibility,
    /// a healthy answer's `lastUpdated` is the current time; an unhealthy one's is when the last
    /// pass programmed the maps (Go's zero time before the first). RFC 3339 timestamps.
    #[must_use]
    pub fn answer(&self, probe: Probe) -> (u16, String) {
        let v = self.check();
        let healthy = v.fresh && (probe == Probe::Livez || v.node_eligible);
        let last = if healthy {
            Some(v.current_time)
        } else {
            v.last_updated
        };
        let mut body = format!(
            "{{\"lastUpdated\": \"{}\",\"currentTime\": \"{}\"",
            rfc3339(last),
            rfc3339(Some(v.current_time))
        );
        if probe == Probe::Healthz {
            let _ = write!(body, ", \"nodeEligible\": {}", v.node_eligible);
        }
        body.push('}');
        (if healthy { 200 } else { 503 }, body)
    }
}

/// RFC 3339 in UTC with nanoseconds trimmed to what is there; `None`: Go's zero time.
fn rfc3339(t: Option<SystemTime>) -> String {
    let Some(t) = t else {
        return "0001-01-01T00:00:00Z".to_owned();
    };
    k8s_openapi::jiff::Timestamp::try_from(t)
        .map_or_else(|_| "0001-01-01T00:00:00Z".to_owned(), |ts| ts.to_string())
}

/// Whether a `Node` is eligible (see [`Health::set_node_eligible`]).
#[must_use]
pub fn node_eligible(node: &k8s_openapi::api::core::v1::Node) -> bool {
    node.metadata.deletion_timestamp.is_none()
        && !node
            .spec
            .iter()
            .flat_map(|s| s.taints.iter().flatten())
            .any(|t| t.key == TO_BE_DELETED_TAINT)
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A clock the test moves.
    #[derive(Debug, Clone)]
    struct TestClock(Arc<Mutex<(Instant, SystemTime)>>);

    impl TestClock {
        fn new() -> Self {
            Self(Arc::new(Mutex::new((
                Instant::now(),
                SystemTime::UNIX_EPOCH + Duration::from_hours(500_000),
            ))))
        }
        fn advance(&self, by: Duration) {
            let mut t = self.0.lock().unwrap();
            t.0 += by;
            t.1 += by;
        }
    }

    impl Clock for TestClock {
        fn now(&self) -> Instant {
            self.0.lock().unwrap().0
        }
        fn wall(&self) -> SystemTime {
            self.0.lock().unwrap().1
        }
    }

    fn health() -> (Health, TestClock) {
        let clock = TestClock::new();
        let h = Health::with_clock(Duration::from_mins(1), Box::new(clock.clone()));
        (h, clock)
    }

    #[test]
    fn unhealthy_until_the_first_sync_then_stale_only_when_a_change_waits_too_long() {
        let (h, clock) = health();
        let (code, body) = h.answer(Probe::Healthz);
        assert_eq!(code, 503);
        assert_eq!(
            body,
            "{\"lastUpdated\": \"0001-01-01T00:00:00Z\",\"currentTime\": \
             \"2027-01-15T08:00:00Z\", \"nodeEligible\": true}"
        );
        assert_eq!(h.answer(Probe::Livez).0, 503);
        // Changes queued before the first sync are programmed by it.
        h.queued();
        clock.advance(Duration::from_secs(5));
        h.updated();
        assert_eq!(h.answer(Probe::Healthz).0, 200);
        // Nothing pending: healthy however old the last pass.
        clock.advance(Duration::from_hours(1));
        let (code, body) = h.answer(Probe::Livez);
        assert_eq!(code, 200);
        assert_eq!(
            body,
            "{\"lastUpdated\": \"2027-01-15T09:00:05Z\",\"currentTime\": \"2027-01-15T09:00:05Z\"}",
            "a healthy answer's lastUpdated is now, as kube-proxy's"
        );
        // A change waits: healthy until it has waited stale_after; the oldest one counts.
        h.queued();
        clock.advance(Duration::from_secs(59));
        h.queued();
        assert_eq!(h.answer(Probe::Healthz).0, 200);
        clock.advance(Duration::from_secs(1));
        let v = h.check();
        assert!(!v.fresh);
        assert!(v.why.unwrap().contains("waited 60.0 s"));
        let (code, body) = h.answer(Probe::Healthz);
        assert_eq!(code, 503);
        assert!(
            body.starts_with("{\"lastUpdated\": \"2027-01-15T08:00:05Z\""),
            "an unhealthy answer says when the maps were last programmed: {body}"
        );
        assert_eq!(h.answer(Probe::Livez).0, 503);
        // The pass that programs it makes it healthy again.
        h.updated();
        assert_eq!(h.answer(Probe::Healthz).0, 200);
    }

    #[test]
    fn healthz_follows_the_node_and_livez_does_not() {
        let (h, _clock) = health();
        h.updated();
        h.set_node_eligible(false);
        let (code, body) = h.answer(Probe::Healthz);
        assert_eq!(code, 503);
        assert!(body.ends_with("\"nodeEligible\": false}"), "{body}");
        assert_eq!(h.answer(Probe::Livez).0, 200);
        h.set_node_eligible(true);
        assert_eq!(h.answer(Probe::Healthz).0, 200);
    }

    #[test]
    fn a_node_being_deleted_or_tainted_for_deletion_is_not_eligible() {
        let node = |json| serde_json::from_value(json).unwrap();
        assert!(node_eligible(&node(
            serde_json::json!({"metadata": {"name": "n"}})
        )));
        assert!(!node_eligible(&node(serde_json::json!({
            "metadata": {"name": "n", "deletionTimestamp": "2027-01-01T00:00:00Z"}
        }))));
        assert!(!node_eligible(&node(serde_json::json!({
            "metadata": {"name": "n"},
            "spec": {"taints": [{"key": TO_BE_DELETED_TAINT, "effect": "NoSchedule"}]}
        }))));
        assert!(node_eligible(&node(serde_json::json!({
            "metadata": {"name": "n"},
            "spec": {"taints": [{"key": "other", "effect": "NoSchedule"}]}
        }))));
    }

    #[test]
    fn probes_by_path() {
        assert_eq!(Probe::of_path("/healthz"), Some(Probe::Healthz));
        assert_eq!(Probe::of_path("/livez"), Some(Probe::Livez));
        assert_eq!(Probe::of_path("/metrics"), None);
    }
}
