//! Builds the eBPF programs (`svc-ebpf`) for `bpfel-unknown-none` with Debian's compiler
//! (rustup toolchain `debian`, linked by `cargo xtask setup`) and leaves the object in
//! `OUT_DIR/svc`, where `svc-agent` embeds it.
//!
//! `AYA_BUILD_SKIP=1` skips that build for userspace-only work (clippy, unit tests): an empty
//! object is embedded instead, and loading it fails with a message saying so.

use std::{env, fs, path::PathBuf};

use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").ok_or_else(|| anyhow!("OUT_DIR not set"))?);
    let object = out_dir.join("svc");
    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        // aya-build prints its own warning and returns; leave an empty object behind.
        fs::write(&object, []).context("writing the empty eBPF object")?;
    }
    let toolchain = env::var("SVC_EBPF_TOOLCHAIN").unwrap_or_else(|_| "debian".to_owned());
    println!("cargo:rerun-if-env-changed=SVC_EBPF_TOOLCHAIN");
    // Let only aya-ebpf use its feature gates on the stable Debian compiler; any other value
    // would make aya-build ask for `-Z build-std`, which needs a source tree we do not have.
    // SAFETY: build scripts are single-threaded here; nothing else reads the environment.
    unsafe { env::set_var("RUSTC_BOOTSTRAP", "aya_ebpf") };
    let package = aya_build::Package {
        name: "svc-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../svc-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::Custom(&toolchain)).with_context(|| {
        format!(
            "building svc-ebpf with rustup toolchain `{toolchain}` failed; run `cargo xtask setup` \
             (it installs Debian's rustc-web, the bpfel core and bpf-linker and links the toolchain)"
        )
    })?;
    Ok(())
}
