//! Running the helper tools (`ip`, `bridge`, `sysctl`) with errors that carry their output.

use std::{
    fmt::Write as _,
    io::Write as _,
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

/// The command line as a shell would show it, for error messages.
pub(super) fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `cmd` to completion (feeding it `stdin` when given) and returns its stdout; a non-zero
/// exit becomes an error naming the command, its status, stderr and stdout.
pub(super) fn output(cmd: &mut Command, stdin: Option<&str>) -> anyhow::Result<String> {
    let line = describe(cmd);
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start `{line}` (is the tool installed?)"))?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .with_context(|| format!("writing the input of `{line}`"))?;
    }
    let out = child
        .wait_with_output()
        .with_context(|| format!("waiting for `{line}`"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let mut msg = format!("`{line}` failed ({}): {}", out.status, stderr.trim());
        if !stdout.trim().is_empty() {
            let _ = write!(msg, "\nstdout: {}", stdout.trim());
        }
        if let Some(input) = stdin {
            let _ = write!(msg, "\ninput:\n{input}");
        }
        bail!(msg);
    }
    Ok(stdout)
}

/// `ip ARGS...` in the current (root) namespace; used only for `ip netns` management.
pub(super) fn ip<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> anyhow::Result<String> {
    output(Command::new("ip").args(args), None)
}
