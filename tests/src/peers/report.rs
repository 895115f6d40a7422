//! Medians of the repetitions, the Markdown table and the CSV files.

use std::fmt::Write as _;

use super::wrk::WrkResult;

/// The mode every ratio and "over none" difference is taken against.
pub const BASELINE: &str = "none";

/// One repetition of a cell: a new-connection run, then a keep-alive run.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Rep {
    /// The run with `Connection: close` (a new connection per request).
    pub conn: WrkResult,
    /// The node's own CPU time during `conn` (its cgroup: wrk, nginx, the agent; and the
    /// counted CPUs' `ksoftirqd`), in % of the counted CPUs.
    pub conn_cpu_pct: f64,
    /// That CPU time per request of `conn`, µs.
    pub conn_cpu_us: f64,
    /// Entries in the node's conntrack table right after `conn`.
    pub conntrack: u64,
    /// The keep-alive run.
    pub ka: WrkResult,
    /// The node's own CPU time during `ka`, in % of the counted CPUs.
    pub ka_cpu_pct: f64,
    /// That CPU time per request of `ka`, µs.
    pub ka_cpu_us: f64,
    /// Busy % of the measured CPUs in the second before the runs (other processes).
    pub bg_pct: f64,
}

/// One mode at one Service count.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Cell {
    /// `none`, `iptables`, `nftables`, `ebpf-socket`, ...
    pub mode: String,
    /// Services programmed (`None` for the mode without a service).
    pub services: Option<u32>,
    /// Each full sync's wall time, ms.
    pub sync_ms: Vec<f64>,
    /// Memory the mode holds for its rules, MiB (see the README for what each mode counts).
    pub memory_mib: Option<f64>,
    /// The repetitions.
    pub reps: Vec<Rep>,
}

/// The median of `v` (the mean of the two middle values for an even count); `None` when empty.
#[must_use]
pub fn median(v: &[f64]) -> Option<f64> {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
    if s.is_empty() {
        return None;
    }
    s.sort_by(f64::total_cmp);
    let n = s.len();
    Some(if n % 2 == 1 {
        s[n / 2]
    } else {
        f64::midpoint(s[n / 2 - 1], s[n / 2])
    })
}

/// A cell's medians.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Medians {
    /// Sync ms.
    pub sync_ms: Option<f64>,
    /// New connections per second.
    pub conn_rps: f64,
    /// CPU µs per new connection.
    pub conn_cpu_us: f64,
    /// CPU % during the new-connection runs.
    pub conn_cpu_pct: f64,
    /// Conntrack entries after the new-connection runs.
    pub conntrack: f64,
    /// Keep-alive requests per second.
    pub ka_rps: f64,
    /// CPU µs per keep-alive request.
    pub ka_cpu_us: f64,
    /// CPU % during the keep-alive runs.
    pub ka_cpu_pct: f64,
    /// Keep-alive p50 latency, µs.
    pub ka_p50_us: f64,
    /// Keep-alive p99 latency, µs.
    pub ka_p99_us: f64,
    /// Background busy %.
    pub bg_pct: f64,
    /// Errors of the new-connection runs (summed over repetitions).
    pub conn_errors: u64,
    /// Errors of the keep-alive runs (summed).
    pub ka_errors: u64,
}

impl Cell {
    /// The medians of its repetitions.
    #[must_use]
    #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
    pub fn medians(&self) -> Medians {
        let m = |f: &dyn Fn(&Rep) -> f64| {
            median(&self.reps.iter().map(f).collect::<Vec<_>>()).unwrap_or(f64::NAN)
        };
        Medians {
            sync_ms: median(&self.sync_ms),
            conn_rps: m(&|r| r.conn.rps),
            conn_cpu_us: m(&|r| r.conn_cpu_us),
            conn_cpu_pct: m(&|r| r.conn_cpu_pct),
            conntrack: m(&|r| r.conntrack as f64),
            ka_rps: m(&|r| r.ka.rps),
            ka_cpu_us: m(&|r| r.ka_cpu_us),
            ka_cpu_pct: m(&|r| r.ka_cpu_pct),
            ka_p50_us: m(&|r| r.ka.p50_us),
            ka_p99_us: m(&|r| r.ka.p99_us),
            bg_pct: m(&|r| r.bg_pct),
            conn_errors: self.reps.iter().map(|r| r.conn.errors).sum(),
            ka_errors: self.reps.iter().map(|r| r.ka.errors).sum(),
        }
    }
}

/// `v` with `digits` decimals, `-` when absent; never `-0.0`.
fn opt(v: Option<f64>, digits: usize) -> String {
    v.filter(|x| x.is_finite()).map_or_else(
        || "-".to_owned(),
        |x| {
            let s = format!("{x:.digits$}");
            if s.starts_with('-') && s[1..].chars().all(|c| c == '0' || c == '.') {
                s[1..].to_owned()
            } else {
                s
            }
        },
    )
}

/// The Markdown table of `cells`, ratios and differences against the [`BASELINE`] cell.
#[must_use]
pub fn markdown(cells: &[Cell]) -> String {
    let base = cells.iter().find(|c| c.mode == BASELINE).map(Cell::medians);
    let mut o = String::from(
        "| mode | S | sync ms | memory MiB | new conn/s | × none | CPU µs/conn | +µs/conn | \
         conntrack | keep-alive req/s | × none | CPU µs/req | +µs/req | p50 µs | p99 µs | \
         CPU % conn/ka | bg % | errors conn/ka |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for c in cells {
        let m = c.medians();
        let ratio = |v: f64, b: fn(&Medians) -> f64| opt(base.as_ref().map(|bm| v / b(bm)), 2);
        let over = |v: f64, b: fn(&Medians) -> f64| opt(base.as_ref().map(|bm| v - b(bm)), 1);
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {:.0} | {} | {:.1} | {} | {:.0} | {:.0} | {} | {:.1} | {} | \
             {:.0} | {:.0} | {:.0}/{:.0} | {:.0} | {}/{} |",
            c.mode,
            c.services.map_or_else(|| "-".to_owned(), |s| s.to_string()),
            opt(m.sync_ms, 0),
            opt(c.memory_mib, 1),
            m.conn_rps,
            ratio(m.conn_rps, |b| b.conn_rps),
            m.conn_cpu_us,
            over(m.conn_cpu_us, |b| b.conn_cpu_us),
            m.conntrack,
            m.ka_rps,
            ratio(m.ka_rps, |b| b.ka_rps),
            m.ka_cpu_us,
            over(m.ka_cpu_us, |b| b.ka_cpu_us),
            m.ka_p50_us,
            m.ka_p99_us,
            m.conn_cpu_pct,
            m.ka_cpu_pct,
            m.bg_pct,
            m.conn_errors,
            m.ka_errors,
        );
    }
    o
}

/// The medians as CSV (one line per cell, with a header).
#[must_use]
pub fn csv(cells: &[Cell]) -> String {
    let mut o = String::from(
        "mode,services,sync_ms,memory_mib,conn_rps,conn_cpu_us,conn_cpu_pct,conntrack,ka_rps,\
         ka_cpu_us,ka_cpu_pct,ka_p50_us,ka_p99_us,bg_pct,conn_errors,ka_errors\n",
    );
    for c in cells {
        let m = c.medians();
        let _ = writeln!(
            o,
            "{},{},{},{},{:.0},{:.2},{:.1},{:.0},{:.0},{:.2},{:.1},{:.0},{:.0},{:.1},{},{}",
            c.mode,
            c.services.map_or_else(String::new, |s| s.to_string()),
            m.sync_ms.map_or_else(String::new, |v| format!("{v:.0}")),
            c.memory_mib.map_or_else(String::new, |v| format!("{v:.2}")),
            m.conn_rps,
            m.conn_cpu_us,
            m.conn_cpu_pct,
            m.conntrack,
            m.ka_rps,
            m.ka_cpu_us,
            m.ka_cpu_pct,
            m.ka_p50_us,
            m.ka_p99_us,
            m.bg_pct,
            m.conn_errors,
            m.ka_errors,
        );
    }
    o
}

/// Every repetition as CSV (one line per repetition, with a header).
#[must_use]
pub fn raw_csv(cells: &[Cell]) -> String {
    let mut o = String::from(
        "mode,services,rep,conn_rps,conn_requests,conn_errors,conn_p50_us,conn_p99_us,\
         conn_cpu_pct,conn_cpu_us,conntrack,ka_rps,ka_requests,ka_errors,ka_p50_us,ka_p99_us,\
         ka_cpu_pct,ka_cpu_us,bg_pct\n",
    );
    for c in cells {
        for (i, r) in c.reps.iter().enumerate() {
            let _ = writeln!(
                o,
                "{},{},{},{:.0},{},{},{:.0},{:.0},{:.1},{:.2},{},{:.0},{},{},{:.0},{:.0},{:.1},{:.2},{:.1}",
                c.mode,
                c.services.map_or_else(String::new, |s| s.to_string()),
                i + 1,
                r.conn.rps,
                r.conn.requests,
                r.conn.errors,
                r.conn.p50_us,
                r.conn.p99_us,
                r.conn_cpu_pct,
                r.conn_cpu_us,
                r.conntrack,
                r.ka.rps,
                r.ka.requests,
                r.ka.errors,
                r.ka.p50_us,
                r.ka.p99_us,
                r.ka_cpu_pct,
                r.ka_cpu_us,
                r.bg_pct,
            );
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_of_odd_even_and_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[7.0]), Some(7.0));
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[f64::NAN, 5.0]), Some(5.0));
        assert_eq!(opt(Some(-0.04), 1), "0.0");
        assert_eq!(opt(Some(-1.25), 1), "-1.2");
        assert_eq!(opt(None, 1), "-");
    }

    fn rep(conn_rps: f64, conn_us: f64, ka_rps: f64, ka_us: f64) -> Rep {
        Rep {
            conn: WrkResult {
                requests: 100,
                rps: conn_rps,
                errors: 0,
                p50_us: 100.0,
                p99_us: 900.0,
            },
            conn_cpu_pct: 100.0,
            conn_cpu_us: conn_us,
            conntrack: 14_000,
            ka: WrkResult {
                requests: 1000,
                rps: ka_rps,
                errors: 1,
                p50_us: 300.0,
                p99_us: 800.0,
            },
            ka_cpu_pct: 99.0,
            ka_cpu_us: ka_us,
            bg_pct: 1.0,
        }
    }

    #[test]
    fn table_has_ratios_and_differences_to_none() {
        let none = Cell {
            mode: "none".into(),
            services: None,
            sync_ms: vec![],
            memory_mib: None,
            reps: vec![
                rep(10_000.0, 60.0, 80_000.0, 12.0),
                rep(20_000.0, 50.0, 60_000.0, 14.0),
                rep(16_000.0, 55.0, 70_000.0, 13.0),
            ],
        };
        let ipt = Cell {
            mode: "iptables".into(),
            services: Some(10_000),
            sync_ms: vec![1500.0, 1700.0, 1600.0],
            memory_mib: Some(12.34),
            reps: vec![rep(4_000.0, 250.0, 56_000.0, 17.0)],
        };
        let table = markdown(&[none.clone(), ipt.clone()]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4);
        assert!(lines[0].starts_with("| mode | S | sync ms |"));
        assert_eq!(
            lines[2],
            "| none | - | - | - | 16000 | 1.00 | 55.0 | 0.0 | 14000 | 70000 | 1.00 | 13.0 | 0.0 | \
             300 | 800 | 100/99 | 1 | 0/3 |"
        );
        assert_eq!(
            lines[3],
            "| iptables | 10000 | 1600 | 12.3 | 4000 | 0.25 | 250.0 | 195.0 | 14000 | 56000 | \
             0.80 | 17.0 | 4.0 | 300 | 800 | 100/99 | 1 | 0/1 |"
        );
        // Without the baseline the comparisons are left blank.
        let alone = markdown(std::slice::from_ref(&ipt));
        assert!(alone.contains("| 4000 | - | 250.0 | - |"), "{alone}");
        let csv = csv(&[none, ipt.clone()]);
        assert_eq!(
            csv.lines().nth(2).unwrap(),
            "iptables,10000,1600,12.34,4000,250.00,100.0,14000,56000,17.00,99.0,300,800,1.0,0,1"
        );
        assert_eq!(raw_csv(&[ipt]).lines().count(), 2);
    }
}
