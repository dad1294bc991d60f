//! Builds the eBPF programs (`ebpf/tlsplice-ebpf`: nightly, `bpfel-unknown-none`, bpf-linker)
//! with aya-build, as aya-template does, and leaves the object in `OUT_DIR`, where `src/bpf.rs`
//! embeds it: `cargo build -p tlsplice` gives the whole agent. `AYA_BUILD_SKIP=1` builds an
//! agent without its eBPF programs, which then says so at run time (`ebpf: off`).
//!
//! The eBPF crate is its own workspace (it builds for another target, with another toolchain),
//! so the build runs from its directory.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// ELF machine number for eBPF.
const EM_BPF: u16 = 247;

fn main() -> Result<()> {
    let manifest =
        PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?);
    let ebpf = manifest.join("../ebpf/tlsplice-ebpf");
    let common = manifest.join("../ebpf/tlsplice-common");
    for input in [
        ebpf.join("src"),
        ebpf.join("Cargo.toml"),
        ebpf.join("Cargo.lock"),
        common.join("src"),
        common.join("Cargo.toml"),
    ] {
        println!("cargo::rerun-if-changed={}", input.display());
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").context("OUT_DIR")?).join("tlsplice-ebpf");
    let skip =
        std::env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        // aya-build says it skipped; the agent embeds nothing and reports it has no programs.
        std::fs::write(&out, []).with_context(|| format!("writing {}", out.display()))?;
        println!("cargo::rerun-if-env-changed=AYA_BUILD_SKIP");
        println!(
            "cargo::warning=AYA_BUILD_SKIP is set: this agent is built without its eBPF programs"
        );
        return Ok(());
    }
    if !on_path("bpf-linker") || !on_path("rustup") {
        bail!(
            "building the eBPF programs needs rustup with a nightly toolchain and bpf-linker on PATH: \
             run `cargo xtask bootstrap` (it installs both), or set AYA_BUILD_SKIP=1 to build the \
             agent without its eBPF programs"
        );
    }
    std::env::set_current_dir(&ebpf).with_context(|| format!("entering {}", ebpf.display()))?;
    let root_dir = ebpf.join("src");
    let root_dir = root_dir
        .to_str()
        .context("a UTF-8 path to ebpf/tlsplice-ebpf")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "tlsplice-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )?;
    check_object(&out)
}

/// The object must be an eBPF ELF with the sock_ops program in it.
fn check_object(object: &Path) -> Result<()> {
    let bytes = std::fs::read(object).with_context(|| format!("reading {}", object.display()))?;
    let machine = bytes.get(18..20).map(|b| u16::from_le_bytes([b[0], b[1]]));
    if !bytes.starts_with(b"\x7fELF") || machine != Some(EM_BPF) {
        bail!(
            "{} is not an eBPF ELF object (e_machine {machine:?})",
            object.display()
        );
    }
    if !bytes.windows(7).any(|w| w == b"sockops") {
        bail!("{} has no sockops program section", object.display());
    }
    Ok(())
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}
