//! `wrk` (Debian's `wrk`, 4.1): its command line and what its `--latency` report says.

use anyhow::{Context as _, bail};

/// wrk Lua script for the mode without a service: thread `i` talks to pod `i` directly (round
/// robin over `$PODS`, port `$PORT`), so the same backends carry the load as behind the VIP.
pub const SPREAD_LUA: &str = r#"-- svc-bench-peers: thread i -> pod i (no service in between)
local addrs, n = {}, 0
function setup(thread)
  if #addrs == 0 then
    for ip in string.gmatch(os.getenv("PODS"), "%S+") do
      addrs[#addrs + 1] = wrk.lookup(ip, os.getenv("PORT"))[1]
    end
  end
  n = n % #addrs + 1
  thread.addr = addrs[n]
end
"#;

/// One wrk run's figures.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WrkResult {
    /// Requests completed.
    pub requests: u64,
    /// `Requests/sec`.
    pub rps: f64,
    /// Socket errors (connect, read, write, timeout) plus non-2xx/3xx answers.
    pub errors: u64,
    /// Median latency, µs.
    pub p50_us: f64,
    /// 99th percentile latency, µs.
    pub p99_us: f64,
}

/// A wrk duration (`312.00us`, `1.20ms`, `2.00s`, `1.00m`) in µs.
fn duration_us(text: &str) -> anyhow::Result<f64> {
    let (num, mult) = if let Some(v) = text.strip_suffix("us") {
        (v, 1.0)
    } else if let Some(v) = text.strip_suffix("ms") {
        (v, 1e3)
    } else if let Some(v) = text.strip_suffix('s') {
        (v, 1e6)
    } else if let Some(v) = text.strip_suffix('m') {
        (v, 60e6)
    } else if let Some(v) = text.strip_suffix('h') {
        (v, 3600e6)
    } else {
        bail!("{text:?} is not a wrk duration");
    };
    let v: f64 = num
        .parse()
        .with_context(|| format!("{text:?} is not a wrk duration"))?;
    Ok(v * mult)
}

/// Parses wrk's report (run with `--latency`).
///
/// # Errors
/// When the requests count, rate or latency percentiles are missing.
pub fn parse(out: &str) -> anyhow::Result<WrkResult> {
    let mut r = WrkResult::default();
    let (mut requests, mut rps, mut p50, mut p99) = (None, None, None, None);
    for line in out.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            ["50%", v] => p50 = Some(duration_us(v)?),
            ["99%", v] => p99 = Some(duration_us(v)?),
            [n, "requests", "in", ..] => requests = n.parse::<u64>().ok(),
            ["Requests/sec:", v] => rps = v.parse::<f64>().ok(),
            ["Socket", "errors:", rest @ ..] => {
                // connect 0, read 0, write 0, timeout 0
                for pair in rest.chunks(2) {
                    if let [_, n] = pair {
                        r.errors += n.trim_end_matches(',').parse::<u64>().unwrap_or(0);
                    }
                }
            }
            ["Non-2xx", "or", "3xx", "responses:", n] => r.errors += n.parse::<u64>()?,
            _ => {}
        }
    }
    let missing = |what: &str| format!("no {what} in wrk's output:\n{out}");
    r.requests = requests.with_context(|| missing("request count"))?;
    r.rps = rps.with_context(|| missing("Requests/sec"))?;
    r.p50_us = p50.with_context(|| missing("50% latency (run with --latency)"))?;
    r.p99_us = p99.with_context(|| missing("99% latency (run with --latency)"))?;
    Ok(r)
}

/// wrk's arguments: `threads` threads, `conns` connections, `secs` seconds, `--latency`; a new
/// connection per request with `close`; `script` (a Lua file) when given; then `url`.
#[must_use]
pub fn args(
    threads: u32,
    conns: u32,
    secs: u64,
    close: bool,
    script: Option<&str>,
    url: &str,
) -> Vec<String> {
    let mut a = vec![
        format!("-t{threads}"),
        format!("-c{conns}"),
        format!("-d{secs}s"),
        "--timeout".to_owned(),
        "2s".to_owned(),
        "--latency".to_owned(),
    ];
    if close {
        a.extend(["-H".to_owned(), "Connection: close".to_owned()]);
    }
    if let Some(s) = script {
        a.extend(["-s".to_owned(), s.to_owned()]);
    }
    a.push(url.to_owned());
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPORT: &str = "Running 8s test @ http://198.19.255.1:80/
  3 threads and 30 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   412.10us  301.22us  12.40ms   91.02%
    Req/Sec    20.81k     1.10k   23.01k    71.25%
  Latency Distribution
     50%  312.00us
     75%  401.00us
     90%  612.00us
     99%    1.20ms
  497012 requests in 8.00s, 78.21MB read
  Socket errors: connect 0, read 3, write 0, timeout 2
  Non-2xx or 3xx responses: 4
Requests/sec:  62126.50
Transfer/sec:      9.78MB
";

    #[test]
    fn parses_a_latency_report() {
        let r = parse(REPORT).unwrap();
        assert_eq!(r.requests, 497_012);
        assert!((r.rps - 62_126.5).abs() < 1e-9);
        assert_eq!(r.errors, 9);
        assert!((r.p50_us - 312.0).abs() < 1e-9);
        assert!((r.p99_us - 1_200.0).abs() < 1e-9);
    }

    #[test]
    fn a_report_without_percentiles_is_an_error() {
        let text = REPORT.replace("     99%    1.20ms\n", "");
        assert!(parse(&text).unwrap_err().to_string().contains("99%"));
        assert!(parse("connection refused").is_err());
    }

    #[test]
    fn durations_in_every_unit() {
        assert!((duration_us("2.50s").unwrap() - 2.5e6).abs() < 1e-6);
        assert!((duration_us("1.00m").unwrap() - 60e6).abs() < 1e-6);
        assert!(duration_us("12").is_err());
        assert!(duration_us("xxms").is_err());
    }

    #[test]
    fn command_line() {
        assert_eq!(
            args(3, 30, 8, true, Some("/x/spread.lua"), "http://a/"),
            [
                "-t3",
                "-c30",
                "-d8s",
                "--timeout",
                "2s",
                "--latency",
                "-H",
                "Connection: close",
                "-s",
                "/x/spread.lua",
                "http://a/"
            ]
        );
    }
}
