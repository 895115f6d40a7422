//! `cargo xtask setup`: install everything a fresh Debian 12 machine lacks, idempotently.
//!
//! 1. Debian packages: `rustc-web`/`cargo-web` (the eBPF compiler, rustc 1.96 on LLVM 22),
//!    `libstd-rust-web-dev-bpf` (prebuilt `core` for `bpfel-unknown-none`) and the test tools.
//! 2. `llvm-N-dev`, where N is the LLVM major of `/usr/bin/rustc` (read, never hard-coded).
//! 3. `bpf-linker` built against that LLVM (checked by the `libLLVM.so.N` it links).
//! 4. The rustup toolchain `debian` linked to `/usr`, which `svc-agent`'s build script uses.
//!
//! When everything is present this only runs `dpkg-query`, `rustc -vV`, `ldd` and
//! `rustup toolchain list`.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, anyhow, bail};

/// The bpf-linker release known to work with the aya 0.14 line (see the toolchain notes).
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Packages every task needs: the eBPF compiler, its bpfel `core`, and the tools the tests use.
const PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    // Lints the kernel crate on its own target.
    "rust-web-clippy",
    // The netns harness and the agent's interface handling.
    "iproute2",
    // Checksum offload off and GRO on for the underlay of the XDP end-to-end runs.
    "ethtool",
    // Operators' and tests' view of loaded programs and maps.
    "bpftool",
];

/// What `cargo xtask bench` needs beyond [`PACKAGES`]: an HTTP server for the backends and a
/// load generator (the north-south benchmark); kube-proxy's tools for `cargo xtask bench
/// peers` (its rules loaded by `iptables-restore` and `nft -f`, conntrack flushed between runs).
const BENCH_PACKAGES: &[&str] = &["nginx-light", "wrk", "iptables", "nftables", "conntrack"];

/// Installs the benchmark tools when missing; fast and silent when nothing is.
///
/// # Errors
/// When `apt-get` fails.
pub fn bench_tools() -> anyhow::Result<()> {
    ensure_packages(BENCH_PACKAGES)
}

/// Installs whatever is missing; fast and silent when nothing is.
pub fn run() -> anyhow::Result<()> {
    let t0 = std::time::Instant::now();
    ensure_packages(PACKAGES)?;
    let major = llvm_major("/usr/bin/rustc")?;
    ensure_packages(&[&format!("llvm-{major}-dev")])?;
    ensure_bpf_linker(major)?;
    ensure_debian_toolchain()?;
    eprintln!(
        "setup: ok (eBPF compiler on LLVM {major}, bpf-linker {BPF_LINKER_VERSION}) in {:.1?}",
        t0.elapsed()
    );
    Ok(())
}

fn ensure_packages(packages: &[&str]) -> anyhow::Result<()> {
    let missing = missing_packages(packages)?;
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing Debian packages: {}. Install them as root: apt-get install {}",
            missing.join(" "),
            missing.join(" ")
        );
    }
    eprintln!("setup: installing {}", missing.join(" "));
    run_quiet(
        Command::new("apt-get").args(["update", "-q"]),
        "apt-get update",
    )?;
    run_quiet(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing),
        &format!("apt-get install {}", missing.join(" ")),
    )?;
    let still = missing_packages(packages)?;
    if !still.is_empty() {
        bail!(
            "apt-get reported success but these packages are still not installed: {}",
            still.join(" ")
        );
    }
    Ok(())
}

fn missing_packages(packages: &[&str]) -> anyhow::Result<Vec<String>> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Package} ${Status}\n"])
        .args(packages)
        .stderr(Stdio::null())
        .output()
        .context("running dpkg-query (is this a Debian machine?)")?;
    let installed: Vec<&str> = std::str::from_utf8(&out.stdout)?
        .lines()
        .filter(|l| l.ends_with(" install ok installed"))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    Ok(packages
        .iter()
        .filter(|p| !installed.contains(p))
        .map(|p| (*p).to_owned())
        .collect())
}

/// The LLVM major version a rustc was built on (`LLVM version: 22.1.8` -> 22).
fn llvm_major(rustc: &str) -> anyhow::Result<u32> {
    let out = Command::new(rustc)
        .arg("-vV")
        .output()
        .with_context(|| format!("running {rustc} -vV"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_llvm_major(&text)
        .ok_or_else(|| anyhow!("no `LLVM version:` line in `{rustc} -vV`:\n{text}"))
}

fn parse_llvm_major(rustc_vv: &str) -> Option<u32> {
    let line = rustc_vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))?;
    line.split('.').next()?.trim().parse().ok()
}

fn cargo_bin_dir() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
        .join("bin")
}

fn ensure_bpf_linker(major: u32) -> anyhow::Result<()> {
    let linker = cargo_bin_dir().join("bpf-linker");
    if linker.exists()
        && linked_llvm_major(&linker) == Some(major)
        && linker_version(&linker).as_deref() == Some(BPF_LINKER_VERSION)
    {
        return Ok(());
    }
    eprintln!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM {major} (about a minute)"
    );
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    run_quiet(
        Command::new(cargo)
            .env("LLVM_PREFIX", format!("/usr/lib/llvm-{major}"))
            .args([
                "install",
                "--locked",
                "--force",
                &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            ])
            .args([
                "--no-default-features",
                "--features",
                &format!("llvm-{major}"),
            ]),
        "cargo install bpf-linker",
    )?;
    match linked_llvm_major(&linker) {
        Some(m) if m == major => Ok(()),
        other => bail!(
            "bpf-linker at {} links LLVM {other:?}, expected {major}",
            linker.display()
        ),
    }
}

/// The major of the `libLLVM.so.N` a binary links, read from `ldd`.
fn linked_llvm_major(binary: &Path) -> Option<u32> {
    let out = Command::new("ldd").arg(binary).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let rest = text
        .split("libLLVM.so.")
        .nth(1)
        .or_else(|| text.split("libLLVM-").nth(1))?;
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

fn linker_version(binary: &Path) -> Option<String> {
    let out = Command::new(binary).arg("--version").output().ok()?;
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(1)
        .map(str::to_owned)
}

fn ensure_debian_toolchain() -> anyhow::Result<()> {
    let out = Command::new("rustup")
        .args(["toolchain", "list", "-v"])
        .output()
        .context("running rustup")?;
    let listed = String::from_utf8_lossy(&out.stdout);
    if listed
        .lines()
        .any(|l| l.starts_with("debian") && l.trim_end().ends_with("/usr"))
    {
        return Ok(());
    }
    run_quiet(
        Command::new("rustup").args(["toolchain", "link", "debian", "/usr"]),
        "rustup toolchain link debian /usr",
    )
}

fn run_quiet(cmd: &mut Command, what: &str) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("starting {what}"))?;
    if !out.status.success() {
        let tail: Vec<&str> = std::str::from_utf8(&out.stderr)
            .unwrap_or("")
            .lines()
            .rev()
            .take(15)
            .collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!("{what} failed ({}):\n{}", out.status, tail.join("\n"));
    }
    Ok(())
}

/// Whether this process runs as root (real uid 0).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("Uid:")
                    .map(|r| r.split_whitespace().nth(1) == Some("0"))
            })
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_llvm_major_from_rustc_vv() {
        let text = "rustc 1.96.0 (ac68faa20 2026-05-25)\nbinary: rustc\nhost: x86_64-unknown-linux-gnu\nrelease: 1.96.0\nLLVM version: 22.1.8\n";
        assert_eq!(parse_llvm_major(text), Some(22));
        assert_eq!(parse_llvm_major("rustc 1.0\n"), None);
    }
}
