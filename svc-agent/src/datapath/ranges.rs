//! `loadBalancerSourceRanges`, the agent's part: the `SOURCE_RANGES_V1` entries each frontend
//! means (pure functions), and what the map holds, kept between passes so that an incremental
//! pass looks only at the frontends it concerns. The map, its key and the program's lookup are
//! described in `svc_common::ranges`.
//!
//! The reconciler (`apply.rs`) uses it around each pass: before the pass writes anything, the
//! entries its frontends want and the map lacks are written ([`SourceRanges::before`]), so a
//! frontend's `DENY` and `ALLOW` entries are in place before the frontend is reachable; a
//! restricted frontend whose `DENY` entry is not in the map (its write failed) is held back from
//! the pass (not programmed, retried). After the pass, the entries they no longer want are
//! removed ([`SourceRanges::after`]): a removed frontend's after it is gone. The full pass reads
//! the whole map first and looks at every frontend; an incremental one only at those of its
//! delta (and those whose writes failed before).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use ipnet::IpNet;
use svc_common::{
    Be16,
    ranges::{FRONTEND_BITS, SourceRangeKey, verdict},
    service::{ServiceKey, scope},
};

use super::render::{frontend_key, map_addr};
use crate::model::{DesiredState, Frontend, FrontendKey, Scope};

/// One entry's key: the trie's prefix length (bits) and the key data.
pub type RangeKey = (u32, SourceRangeKey);

/// Entries of one frontend (or of the whole map), each with its verdict
/// (`svc_common::ranges::verdict`).
pub type Entries = BTreeMap<RangeKey, u32>;

/// Access to `SOURCE_RANGES_V1`.
pub trait RangeMap {
    /// Every entry.
    ///
    /// # Errors
    /// When the map cannot be read.
    fn source_ranges(&self) -> anyhow::Result<Entries>;
    /// Writes one entry.
    ///
    /// # Errors
    /// When the kernel refuses it (the map is full).
    fn put_source_range(&mut self, key: &RangeKey, verdict: u32) -> anyhow::Result<()>;
    /// Removes one entry (absent is fine).
    ///
    /// # Errors
    /// When the kernel refuses it.
    fn del_source_range(&mut self, key: &RangeKey) -> anyhow::Result<()>;
}

/// The frontend part of a key (its client all zero): what every entry of the frontend starts
/// with.
#[must_use]
pub fn frontend_part(key: &FrontendKey) -> SourceRangeKey {
    let k = frontend_key(key);
    SourceRangeKey {
        frontend: k.addr,
        port: k.port,
        proto: k.proto,
        family: k.family,
        client: [0; 16],
    }
}

/// The frontend whose entries start with `part` (external scope: only those have entries);
/// `None` for a protocol the model does not know.
#[must_use]
pub fn frontend_of_part(part: &SourceRangeKey) -> Option<FrontendKey> {
    super::apply::frontend_of(&ServiceKey {
        addr: part.frontend,
        port: part.port,
        slot: 0,
        proto: part.proto,
        family: part.family,
        scope: scope::EXTERNAL,
        _pad: 0,
    })
}

/// The key of allowed prefix `net` of the frontend whose part is `part` (host bits cleared).
#[must_use]
pub fn allow_key(part: &SourceRangeKey, net: &IpNet) -> RangeKey {
    let (client, _) = map_addr(net.trunc().addr());
    (
        FRONTEND_BITS + u32::from(net.prefix_len()),
        SourceRangeKey { client, ..*part },
    )
}

/// The entries frontend `key` (with `fe`) wants: none unless it is of the external scope and
/// has ranges of its own family; then a `DENY` entry with the frontend's bits and an `ALLOW`
/// entry per range (a `/0` range makes the frontend's own entry `ALLOW`).
#[must_use]
pub fn wanted(key: &FrontendKey, fe: &Frontend) -> Entries {
    let mut out = Entries::new();
    if key.scope != Scope::External {
        return out;
    }
    let ranges = fe
        .source_ranges
        .iter()
        .filter(|r| r.addr().is_ipv4() == key.addr.is_ipv4());
    let part = frontend_part(key);
    for net in ranges {
        if out.is_empty() {
            out.insert((FRONTEND_BITS, part), verdict::DENY);
        }
        out.insert(allow_key(&part, net), verdict::ALLOW);
    }
    out
}

/// Whether entries `want` restrict their frontend: some client is denied.
#[must_use]
pub fn restricts(want: &Entries) -> bool {
    want.values().any(|v| *v == verdict::DENY)
}

/// What to write (missing or with another verdict) and what to remove (not wanted) to bring
/// `held` to `want`.
#[must_use]
pub fn diff(held: &Entries, want: &Entries) -> (Vec<(RangeKey, u32)>, Vec<RangeKey>) {
    let writes = want
        .iter()
        .filter(|(k, v)| held.get(k) != Some(v))
        .map(|(k, v)| (*k, *v))
        .collect();
    let removals = held
        .keys()
        .filter(|k| !want.contains_key(k))
        .copied()
        .collect();
    (writes, removals)
}

/// What `SOURCE_RANGES_V1` holds, per frontend, as far as the reconciler knows; and what the
/// next pass must look at again.
#[derive(Debug, Default)]
pub struct SourceRanges {
    held: BTreeMap<FrontendKey, Entries>,
    /// Entries of no frontend the model could name (another layout's protocol): removed by the
    /// next full pass.
    strays: Vec<RangeKey>,
    /// Frontends whose entries could not all be written or removed.
    pending: BTreeSet<FrontendKey>,
}

/// The frontends of one pass, as [`SourceRanges::before`] left them for
/// [`SourceRanges::after`].
#[derive(Debug, Default)]
pub struct RangePass {
    /// The frontends the pass looks at.
    keys: BTreeSet<FrontendKey>,
    /// Errors of the writes before the pass.
    pub errors: Vec<String>,
}

impl SourceRanges {
    /// What the map holds, grouped by frontend.
    #[must_use]
    pub fn adopt(entries: Entries) -> Self {
        let mut out = Self::default();
        for (key, v) in entries {
            let part = SourceRangeKey {
                client: [0; 16],
                ..key.1
            };
            match frontend_of_part(&part) {
                Some(fe) => {
                    out.held.entry(fe).or_default().insert(key, v);
                }
                None => out.strays.push(key),
            }
        }
        out
    }

    /// The entries held for `key`.
    #[must_use]
    pub fn held(&self, key: &FrontendKey) -> Option<&Entries> {
        self.held.get(key)
    }

    /// Frontends with entries held.
    #[must_use]
    pub fn frontends(&self) -> usize {
        self.held.len()
    }

    /// Whether a write or removal failed and waits for the next pass.
    #[must_use]
    pub fn is_pending(&self) -> bool {
        !self.pending.is_empty() || !self.strays.is_empty()
    }

    /// Every frontend with entries held or waiting for a retry, for a full pass.
    pub fn all_keys(&self) -> impl Iterator<Item = FrontendKey> + '_ {
        self.held.keys().chain(&self.pending).copied()
    }

    /// The frontends whose entries could not all be written or removed (the next pass looks
    /// at them again).
    pub fn pending_keys(&self) -> impl Iterator<Item = FrontendKey> + '_ {
        self.pending.iter().copied()
    }

    /// Before a pass over `keys` (plus those whose writes failed before): writes the entries
    /// each one wants in `desired` and `map` lacks. Returns the pass (for
    /// [`after`](Self::after)) and the restricted frontends whose `DENY` entry is not in the
    /// map, with why: they must not be programmed by this pass.
    pub fn before(
        &mut self,
        map: &mut impl RangeMap,
        desired: &DesiredState,
        keys: impl IntoIterator<Item = FrontendKey>,
    ) -> (RangePass, BTreeMap<FrontendKey, String>) {
        let mut pass = RangePass::default();
        pass.keys.extend(keys);
        pass.keys.extend(std::mem::take(&mut self.pending));
        let mut held_back = BTreeMap::new();
        for key in &pass.keys {
            let Some(fe) = desired.frontends.get(key) else {
                continue;
            };
            let want = wanted(key, fe);
            if want.is_empty() && !self.held.contains_key(key) {
                continue;
            }
            let held = self.held.entry(*key).or_default();
            let (writes, _) = diff(held, &want);
            for (k, v) in writes {
                match map.put_source_range(&k, v) {
                    Ok(()) => {
                        held.insert(k, v);
                    }
                    Err(e) => {
                        self.pending.insert(*key);
                        pass.errors.push(format!(
                            "frontend {key} source range {}: {e:#}",
                            describe(&k)
                        ));
                    }
                }
            }
            if held.is_empty() {
                self.held.remove(key);
            }
            let deny = (FRONTEND_BITS, frontend_part(key));
            let guarded = self.held.get(key).and_then(|h| h.get(&deny)) == want.get(&deny);
            if restricts(&want) && !guarded {
                held_back.insert(
                    *key,
                    "its loadBalancerSourceRanges could not be written to SOURCE_RANGES_V1: not \
                     served from outside rather than served to every client"
                        .to_owned(),
                );
            }
        }
        (pass, held_back)
    }

    /// After the pass: removes the entries the frontends of `pass` no longer want in `desired`
    /// (every entry of one that is gone), and the strays. Returns the errors of the pass (those
    /// of [`before`](Self::before) first).
    ///
    /// A frontend's entries follow the desired state, not what the pass programmed: one that
    /// waits for room keeps its entries (its address and port drop clients outside the ranges
    /// rather than pass them to the node), so it is restricted from its first packet on.
    pub fn after(
        &mut self,
        map: &mut impl RangeMap,
        desired: &DesiredState,
        pass: RangePass,
    ) -> Vec<String> {
        let mut errors = pass.errors;
        for key in pass.keys {
            let want = desired
                .frontends
                .get(&key)
                .map(|fe| wanted(&key, fe))
                .unwrap_or_default();
            let Some(held) = self.held.get_mut(&key) else {
                continue;
            };
            let (_, removals) = diff(held, &want);
            for k in removals {
                match map.del_source_range(&k) {
                    Ok(()) => {
                        held.remove(&k);
                    }
                    Err(e) => {
                        self.pending.insert(key);
                        errors.push(format!(
                            "frontend {key} source range {}: {e:#}",
                            describe(&k)
                        ));
                    }
                }
            }
            if held.is_empty() {
                self.held.remove(&key);
            }
        }
        let strays = std::mem::take(&mut self.strays);
        for k in strays {
            if let Err(e) = map.del_source_range(&k) {
                errors.push(format!("source range {}: {e:#}", describe(&k)));
                self.strays.push(k);
            }
        }
        errors
    }
}

/// An entry for messages: `frontend <- client/N`.
#[must_use]
pub fn describe(key: &RangeKey) -> String {
    let (bits, k) = key;
    let ip = |a: &[u8; 16]| -> IpAddr {
        if k.family == svc_common::addr::FAMILY_V4 {
            IpAddr::from([a[0], a[1], a[2], a[3]])
        } else {
            IpAddr::from(*a)
        }
    };
    let port = Be16::to_host(k.port);
    match bits.checked_sub(FRONTEND_BITS) {
        Some(0) | None => format!("{}:{port}/{} (deny)", ip(&k.frontend), k.proto),
        Some(n) => format!(
            "{}:{port}/{} <- {}/{n}",
            ip(&k.frontend),
            k.proto,
            ip(&k.client)
        ),
    }
}

#[cfg(test)]
mod tests {
    use svc_common::{addr::FAMILY_V4, net::ipproto};

    use super::*;
    use crate::model::{EmptyAction, FrontendKind, Protocol, ServicePortRef};

    fn key(addr: &str, scope: Scope) -> FrontendKey {
        FrontendKey {
            addr: addr.parse().unwrap(),
            port: 443,
            proto: Protocol::Tcp,
            scope,
        }
    }

    fn lb(ranges: &[&str]) -> Frontend {
        Frontend {
            service: ServicePortRef {
                namespace: "default".into(),
                name: "lb".into(),
                port_name: "".into(),
            },
            kind: FrontendKind::LoadBalancerIp,
            source_ranges: ranges.iter().map(|r| r.parse().unwrap()).collect(),
            affinity_timeout: None,
            local_only: false,
            backends: Vec::new(),
            kept_backends: Vec::new(),
            unready_backends: Vec::new(),
            on_empty: EmptyAction::Reject,
        }
    }

    /// Entries as `(bits past the frontend's, client, verdict)`.
    fn shown(entries: &Entries) -> Vec<(u32, IpAddr, u32)> {
        entries
            .iter()
            .map(|((bits, k), v)| {
                let client = if k.family == FAMILY_V4 {
                    IpAddr::from([k.client[0], k.client[1], k.client[2], k.client[3]])
                } else {
                    IpAddr::from(k.client)
                };
                (bits - FRONTEND_BITS, client, *v)
            })
            .collect()
    }

    #[derive(Default)]
    struct Map {
        entries: Entries,
        fail: bool,
        log: Vec<String>,
    }

    impl RangeMap for Map {
        fn source_ranges(&self) -> anyhow::Result<Entries> {
            Ok(self.entries.clone())
        }
        fn put_source_range(&mut self, key: &RangeKey, verdict: u32) -> anyhow::Result<()> {
            if self.fail {
                anyhow::bail!("E2BIG");
            }
            self.log.push(format!("put {}", describe(key)));
            self.entries.insert(*key, verdict);
            Ok(())
        }
        fn del_source_range(&mut self, key: &RangeKey) -> anyhow::Result<()> {
            self.log.push(format!("del {}", describe(key)));
            self.entries.remove(key);
            Ok(())
        }
    }

    fn state(frontends: &[(FrontendKey, Frontend)]) -> DesiredState {
        DesiredState {
            frontends: frontends
                .iter()
                .map(|(k, fe)| (*k, fe.clone().into()))
                .collect(),
            ..DesiredState::default()
        }
    }

    #[test]
    fn a_key_is_the_frontend_then_the_client_prefix() {
        let k = key("198.19.1.1", Scope::External);
        let part = frontend_part(&k);
        assert_eq!(part.frontend[..4], [198, 19, 1, 1]);
        assert_eq!(part.port, Be16::from_host(443));
        assert_eq!(part.proto, ipproto::TCP);
        assert_eq!(part.family, FAMILY_V4);
        assert_eq!(part.client, [0; 16]);
        // Host bits cleared; the prefix length counts the frontend's bits too.
        let (bits, data) = allow_key(&part, &"198.18.0.77/24".parse().unwrap());
        assert_eq!(bits, FRONTEND_BITS + 24);
        assert_eq!(data.client[..4], [198, 18, 0, 0]);
        assert!(data.client[4..].iter().all(|b| *b == 0));
        assert_eq!(
            SourceRangeKey {
                client: [0; 16],
                ..data
            },
            part
        );
        let (bits, data) = allow_key(&part, &"2001:db8:7::5/48".parse().unwrap());
        assert_eq!(bits, FRONTEND_BITS + 48);
        assert_eq!(
            IpAddr::from(data.client),
            "2001:db8:7::".parse::<IpAddr>().unwrap()
        );
        // Back to the frontend (external scope: only those have entries).
        assert_eq!(frontend_of_part(&part), Some(k));
        assert_eq!(frontend_of_part(&SourceRangeKey { proto: 1, ..part }), None);
    }

    #[test]
    fn a_restricted_frontend_wants_a_deny_and_one_allow_per_range_of_its_family() {
        let k = key("198.19.1.1", Scope::External);
        let fe = lb(&["198.18.0.0/24", "2001:db8::/32", "198.18.9.9/32"]);
        let any: IpAddr = "0.0.0.0".parse().unwrap();
        assert_eq!(
            shown(&wanted(&k, &fe)),
            [
                (0, any, verdict::DENY),
                (24, "198.18.0.0".parse().unwrap(), verdict::ALLOW),
                (32, "198.18.9.9".parse().unwrap(), verdict::ALLOW),
            ]
        );
        assert!(restricts(&wanted(&k, &fe)));
        // IPv6 frontend: only the IPv6 range.
        let k6 = key("2001:db8:f::1", Scope::External);
        let any6: IpAddr = "::".parse().unwrap();
        assert_eq!(
            shown(&wanted(&k6, &fe)),
            [
                (0, any6, verdict::DENY),
                (32, "2001:db8::".parse().unwrap(), verdict::ALLOW),
            ]
        );
    }

    #[test]
    fn no_ranges_other_family_only_internal_scope_or_slash_zero_restrict_nothing() {
        let k = key("198.19.1.1", Scope::External);
        assert!(wanted(&k, &lb(&[])).is_empty());
        // Ranges of the other family only: kube-proxy ignores them, the frontend is open.
        assert!(wanted(&k, &lb(&["2001:db8::/32"])).is_empty());
        // From inside the cluster: never restricted.
        let inside = key("198.19.1.1", Scope::Internal);
        assert!(wanted(&inside, &lb(&["198.18.0.0/24"])).is_empty());
        // `/0`: the frontend's own entry allows every client.
        let all = wanted(&k, &lb(&["0.0.0.0/0", "198.18.0.0/24"]));
        assert!(!restricts(&all));
        assert_eq!(all[&(FRONTEND_BITS, frontend_part(&k))], verdict::ALLOW);
    }

    #[test]
    fn the_diff_writes_what_is_missing_or_different_and_removes_what_is_not_wanted() {
        let k = key("198.19.1.1", Scope::External);
        let held = wanted(&k, &lb(&["198.18.0.0/24", "198.18.1.0/24"]));
        let want = wanted(&k, &lb(&["198.18.1.0/24", "198.18.2.0/24"]));
        let (writes, removals) = diff(&held, &want);
        let part = frontend_part(&k);
        assert_eq!(
            writes,
            [(
                allow_key(&part, &"198.18.2.0/24".parse().unwrap()),
                verdict::ALLOW
            )]
        );
        assert_eq!(
            removals,
            [allow_key(&part, &"198.18.0.0/24".parse().unwrap())]
        );
        // To `/0`: the frontend's entry changes its verdict.
        let open = wanted(&k, &lb(&["0.0.0.0/0"]));
        let (writes, _) = diff(&held, &open);
        assert_eq!(writes, [((FRONTEND_BITS, part), verdict::ALLOW)]);
        assert_eq!(diff(&want, &want), (Vec::new(), Vec::new()));
    }

    #[test]
    fn entries_are_written_before_the_pass_and_removed_after_it() {
        let k = key("198.19.1.1", Scope::External);
        let mut map = Map::default();
        let mut ranges = SourceRanges::default();
        let d = state(&[(k, lb(&["198.18.0.0/24"]))]);
        let (pass, held_back) = ranges.before(&mut map, &d, [k]);
        assert!(held_back.is_empty());
        assert_eq!(
            map.log,
            [
                "put 198.19.1.1:443/6 (deny)",
                "put 198.19.1.1:443/6 <- 198.18.0.0/24"
            ]
        );
        assert!(ranges.after(&mut map, &d, pass).is_empty());
        assert_eq!(map.log.len(), 2, "nothing to remove");
        // Ranges changed: the new one is written before, the old one removed after.
        map.log.clear();
        let d = state(&[(k, lb(&["198.18.5.0/24"]))]);
        let (pass, _) = ranges.before(&mut map, &d, [k]);
        assert_eq!(map.log, ["put 198.19.1.1:443/6 <- 198.18.5.0/24"]);
        map.log.clear();
        assert!(ranges.after(&mut map, &d, pass).is_empty());
        assert_eq!(map.log, ["del 198.19.1.1:443/6 <- 198.18.0.0/24"]);
        // The frontend is gone: everything goes, after the pass only.
        map.log.clear();
        let gone = DesiredState::default();
        let (pass, _) = ranges.before(&mut map, &gone, [k]);
        assert!(map.log.is_empty());
        assert!(ranges.after(&mut map, &gone, pass).is_empty());
        assert_eq!(map.log.len(), 2);
        assert!(map.entries.is_empty());
        assert_eq!(ranges.frontends(), 0);
        // A pass over frontends without ranges touches nothing.
        let other = key("198.19.1.2", Scope::External);
        let d = state(&[(other, lb(&[]))]);
        let (pass, held_back) = ranges.before(&mut map, &d, [other]);
        assert!(held_back.is_empty() && ranges.after(&mut map, &d, pass).is_empty());
        assert_eq!(ranges.frontends(), 0);
    }

    #[test]
    fn a_frontend_whose_deny_cannot_be_written_is_held_back_and_retried() {
        let k = key("198.19.1.1", Scope::External);
        let mut map = Map {
            fail: true,
            ..Map::default()
        };
        let mut ranges = SourceRanges::default();
        let d = state(&[(k, lb(&["198.18.0.0/24"]))]);
        let (pass, held_back) = ranges.before(&mut map, &d, [k]);
        assert_eq!(held_back.keys().collect::<Vec<_>>(), [&k]);
        let errors = ranges.after(&mut map, &d, pass);
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(ranges.is_pending());
        assert_eq!(ranges.pending_keys().collect::<Vec<_>>(), [k]);
        // The next pass (of no frontend) tries again.
        map.fail = false;
        let (pass, held_back) = ranges.before(&mut map, &d, []);
        assert!(held_back.is_empty());
        assert!(ranges.after(&mut map, &d, pass).is_empty());
        assert!(!ranges.is_pending());
        assert_eq!(map.entries.len(), 2);
        // A frontend already guarded stays programmed when an extra range fails: it is only
        // stricter than wanted until the retry.
        map.fail = true;
        let d = state(&[(k, lb(&["198.18.0.0/24", "198.18.1.0/24"]))]);
        let (_, held_back) = ranges.before(&mut map, &d, [k]);
        assert!(held_back.is_empty());
        assert!(ranges.is_pending());
    }

    #[test]
    fn what_the_map_holds_is_adopted_by_frontend() {
        let k = key("198.19.1.1", Scope::External);
        let want = wanted(&k, &lb(&["198.18.0.0/24"]));
        let mut all = want.clone();
        // An entry of a protocol the model does not know: a stray, removed by the next pass.
        let stray = (
            FRONTEND_BITS,
            SourceRangeKey {
                proto: 1,
                ..frontend_part(&k)
            },
        );
        all.insert(stray, verdict::DENY);
        let mut ranges = SourceRanges::adopt(all.clone());
        assert_eq!(ranges.held(&k), Some(&want));
        assert!(ranges.is_pending());
        let mut map = Map {
            entries: all,
            ..Map::default()
        };
        let d = state(&[(k, lb(&["198.18.0.0/24"]))]);
        let keys: Vec<FrontendKey> = ranges.all_keys().collect();
        let (pass, _) = ranges.before(&mut map, &d, keys);
        assert!(ranges.after(&mut map, &d, pass).is_empty());
        assert_eq!(map.log, ["del 198.19.1.1:443/1 (deny)"]);
        assert_eq!(map.entries, want);
        assert!(!ranges.is_pending());
    }
}
