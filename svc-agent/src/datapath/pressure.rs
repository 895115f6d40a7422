//! A warning before the connection table of answered flows (`CT_V1`) overflows.
//!
//! `CT_V1` is an LRU map: when it is full, each new answered flow evicts the least recently
//! used one, and that connection's next packet finds no entry (counted `ct_miss_midflow`; it
//! usually lands on its backend again by the tuple hash, but not when the backend set changed
//! meanwhile). Unanswered flows (SYN floods, scans) live in `CT_NEW_V1` and cannot fill it.
//! A thread counts the entries every [`INTERVAL`] (batched reads: about 0.1 s per 200,000
//! entries) and warns while the table is at least [`WARN_PERCENT`] full, naming the flag that
//! sizes it. Each count goes to the metrics (`svc_map_entries{map="CT_V1"}`), the first at
//! once.

use std::{path::Path, time::Duration};

use anyhow::Context as _;
use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use svc_common::conntrack::{CtKey, CtValue};
use tracing::{info, warn};

use super::batch;

/// How often the table is counted.
pub const INTERVAL: Duration = Duration::from_secs(30);
/// Fill level (percent of capacity) from which the agent warns.
pub const WARN_PERCENT: u64 = 90;

/// The fill level in percent when it calls for a warning.
#[must_use]
pub fn warn_level(entries: usize, capacity: u32) -> Option<u64> {
    if capacity == 0 {
        return None;
    }
    let percent = entries as u64 * 100 / u64::from(capacity);
    (percent >= WARN_PERCENT).then_some(percent)
}

/// Starts the thread that counts the pinned `CT_V1` in `pin_dir` for the agent's life,
/// reporting each count to `metrics`.
pub fn watch(pin_dir: &Path, metrics: crate::metrics::Recorder) -> anyhow::Result<()> {
    let path = pin_dir.join("CT_V1");
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    let capacity = data.info().map_or(0, |i| i.max_entries());
    let map: BpfHashMap<MapData, CtKey, CtValue> =
        BpfHashMap::try_from(Map::LruHashMap(data)).context("CT_V1")?;
    std::thread::Builder::new()
        .name("ct-pressure".into())
        .spawn(move || {
            let mut warned = false;
            let mut first = true;
            loop {
                if !std::mem::take(&mut first) {
                    std::thread::sleep(INTERVAL);
                }
                let entries = batch::entries(&map).take_while(Result::is_ok).count();
                metrics.conntrack(entries, capacity);
                match warn_level(entries, capacity) {
                    Some(percent) => {
                        warned = true;
                        warn!(
                            entries,
                            capacity,
                            percent,
                            "the connection table CT_V1 is nearly full: new connections evict \
                             established ones (counted ct_miss_midflow); raise \
                             --max-conntrack-entries"
                        );
                    }
                    None if warned => {
                        warned = false;
                        info!(
                            entries,
                            capacity, "the connection table CT_V1 has room again"
                        );
                    }
                    None => {}
                }
            }
        })
        .context("starting the CT_V1 pressure thread")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warns_from_ninety_percent() {
        assert_eq!(warn_level(0, 1024), None);
        assert_eq!(warn_level(921, 1024), None);
        assert_eq!(warn_level(922, 1024), Some(90));
        assert_eq!(warn_level(1024, 1024), Some(100));
        assert_eq!(warn_level(5, 0), None);
    }
}
