//! `--log-format json`: every line the agent writes on stderr is one JSON object with the
//! event's time, level, message and fields, also the fatal error that ends a failed start;
//! `text` (the default) stays the human-readable line. Runs the built binary on commands that
//! need no root and touch nothing: `cleanup` of a bpffs path that does not exist ("nothing
//! pinned"), and `run` with a `--from-dir` that does not exist (refused before anything is
//! loaded).

use std::process::{Command, Output};

use serde_json::Value;

/// A path that does not exist.
const MISSING: &str = "/nonexistent/svc-log-format-test";

fn agent(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_svc-agent"))
        .args(args)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .env_remove("SVC_LOG_FORMAT")
        .envs(env.iter().copied())
        .output()
        .expect("running svc-agent")
}

/// Each stderr line as a JSON object; fails naming a line that is not one.
fn json_lines(out: &Output) -> Vec<serde_json::Map<String, Value>> {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.trim().is_empty(), "nothing on stderr");
    stderr
        .lines()
        .map(|line| match serde_json::from_str(line) {
            Ok(Value::Object(object)) => object,
            other => panic!("not a JSON object: {line:?} ({other:?})\nstderr:\n{stderr}"),
        })
        .collect()
}

#[test]
fn json_lines_carry_level_message_and_fields() {
    let out = agent(
        &["--log-format", "json", "--bpffs", MISSING, "cleanup"],
        &[],
    );
    assert!(out.status.success(), "{out:?}");
    let lines = json_lines(&out);
    let line = lines
        .iter()
        .find(|l| l["message"] == "nothing pinned")
        .unwrap_or_else(|| panic!("no 'nothing pinned' line: {lines:?}"));
    assert_eq!(line["level"], "INFO");
    assert_eq!(line["dir"], format!("{MISSING}/svc"));
    assert_eq!(line["target"], "svc_agent");
    let time = line["timestamp"].as_str().expect("a timestamp");
    assert!(time.ends_with('Z') && time.contains('T'), "{time}");
    // The environment variable the DaemonSet sets does the same.
    let out = agent(
        &["--bpffs", MISSING, "cleanup"],
        &[("SVC_LOG_FORMAT", "json")],
    );
    assert!(
        json_lines(&out)
            .iter()
            .any(|l| l["message"] == "nothing pinned")
    );
}

#[test]
fn a_failed_start_ends_with_a_json_error_line() {
    let out = agent(
        &[
            "--log-format",
            "json",
            "run",
            "--node-name",
            "node1",
            "--from-dir",
            MISSING,
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let lines = json_lines(&out);
    let last = lines.last().expect("a line");
    assert_eq!(last["level"], "ERROR", "{last:?}");
    let message = last["message"].as_str().expect("a message");
    assert!(
        message.contains(&format!("--from-dir {MISSING}: cannot list that directory")),
        "{message}"
    );
}

#[test]
fn text_is_the_default_and_other_formats_are_refused() {
    let out = agent(&["--bpffs", MISSING, "cleanup"], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stderr
        .lines()
        .find(|l| l.contains("nothing pinned"))
        .unwrap_or_else(|| panic!("no 'nothing pinned' line:\n{stderr}"));
    assert!(
        line.contains(" INFO svc_agent: nothing pinned dir="),
        "{line}"
    );
    assert!(serde_json::from_str::<Value>(line).is_err());
    let out = agent(&["--log-format", "yaml", "cleanup"], &[]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("invalid value 'yaml' for '--log-format"),
        "{out:?}"
    );
}
