//! The table `cargo xtask bench cluster` (and `cargo xtask kind bench`) prints: one row per
//! node, from what [`loadgen`](crate::loadgen) wrote and what each node was seen to program.

use std::{fmt::Write as _, time::Duration};

/// What one node showed during a run.
#[derive(Clone, Debug, Default)]
pub struct NodeRow {
    /// The node's name.
    pub node: String,
    /// Network programming latencies: write acknowledged -> the node's maps show it.
    pub latencies: Vec<Duration>,
    /// Writes whose expected state the node never showed within the bound (`None`: not
    /// known, e.g. latencies read from a histogram).
    pub missed: Option<usize>,
    /// Writes not timed because the next write of the same Service came before the node
    /// showed them (the node may rightly have programmed both at once).
    pub superseded: Option<usize>,
    /// Requests its clients sent, and how many failed, during rollouts and HPA steps.
    pub rollout_requests: Option<(u64, u64)>,
    /// Requests its clients sent, and how many failed, at other times (setup, churn).
    pub other_requests: Option<(u64, u64)>,
    /// The agent's CPU time (user + system) during the load, and the load's wall time.
    pub cpu: Option<(Duration, Duration)>,
    /// The agent's peak resident memory (`VmHWM`), KiB.
    pub peak_rss_kib: Option<u64>,
}

/// The `p`th percentile (0..=100, nearest rank rounding up) of `sorted`.
#[must_use]
pub fn percentile(sorted: &[Duration], p: usize) -> Option<Duration> {
    let last = sorted.len().checked_sub(1)?;
    Some(sorted[(last * p).div_ceil(100).min(last)])
}

fn ms(d: Option<Duration>) -> String {
    d.map_or_else(
        || "-".to_owned(),
        |d| format!("{:.1}", d.as_secs_f64() * 1e3),
    )
}

fn count(n: Option<usize>) -> String {
    n.map_or_else(|| "n/a".to_owned(), |n| n.to_string())
}

fn requests(r: Option<(u64, u64)>) -> String {
    r.map_or_else(
        || "n/a".to_owned(),
        |(sent, failed)| format!("{failed} / {sent}"),
    )
}

/// The Markdown table of `rows`.
#[must_use]
pub fn markdown(rows: &[NodeRow]) -> String {
    let mut out = String::from(
        "| node | timed writes | p50 ms | p99 ms | max ms | missed | superseded | failed / \
         requests (rollout, HPA) | failed / requests (other) | agent CPU s (share of a core) | \
         agent peak RSS MiB |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for row in rows {
        let mut sorted = row.latencies.clone();
        sorted.sort_unstable();
        let cpu = row.cpu.map_or_else(
            || "n/a".to_owned(),
            |(cpu, wall)| {
                format!(
                    "{:.2} ({:.1}%)",
                    cpu.as_secs_f64(),
                    cpu.as_secs_f64() * 100.0 / wall.as_secs_f64().max(1e-9)
                )
            },
        );
        let rss = row
            .peak_rss_kib
            .map_or_else(|| "n/a".to_owned(), |k| format!("{:.1}", kib_to_mib(k)));
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            row.node,
            sorted.len(),
            ms(percentile(&sorted, 50)),
            ms(percentile(&sorted, 99)),
            ms(sorted.last().copied()),
            count(row.missed),
            count(row.superseded),
            requests(row.rollout_requests),
            requests(row.other_requests),
            cpu,
            rss,
        );
    }
    out
}

#[expect(
    clippy::cast_precision_loss,
    reason = "a figure to print: KiB far below 2^52"
)]
fn kib_to_mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_take_the_nearest_rank_above() {
        let d: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&d, 50), Some(Duration::from_millis(51)));
        assert_eq!(percentile(&d, 99), Some(Duration::from_millis(100)));
        assert_eq!(percentile(&d[..1], 99), Some(Duration::from_millis(1)));
        assert_eq!(percentile(&[], 50), None);
    }

    #[test]
    fn the_table_has_one_row_per_node_and_says_what_was_not_measured() {
        let rows = [
            NodeRow {
                node: "node1".into(),
                latencies: vec![Duration::from_millis(30), Duration::from_millis(10)],
                missed: Some(1),
                superseded: Some(0),
                rollout_requests: Some((200, 0)),
                other_requests: Some((50, 2)),
                cpu: Some((Duration::from_millis(500), Duration::from_secs(10))),
                peak_rss_kib: Some(20 * 1024),
            },
            NodeRow {
                node: "kind-worker".into(),
                ..NodeRow::default()
            },
        ];
        let table = markdown(&rows);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4, "{table}");
        assert_eq!(
            lines[2],
            "| node1 | 2 | 30.0 | 30.0 | 30.0 | 1 | 0 | 0 / 200 | 2 / 50 | 0.50 (5.0%) | 20.0 |"
        );
        assert_eq!(
            lines[3],
            "| kind-worker | 0 | - | - | - | n/a | n/a | n/a | n/a | n/a | n/a |"
        );
        // Every row has as many cells as the header.
        let cells = |l: &str| l.matches('|').count();
        assert!(lines.iter().all(|l| cells(l) == cells(lines[0])), "{table}");
    }
}
