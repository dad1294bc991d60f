//! Installs the tools the other tasks need, on a fresh machine of this project's kind (Debian 12,
//! root, rustup with stable and nightly). Each step checks first and only installs what is
//! missing, saying what it installs.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::cmd::{self, cache_dir, which};

/// Debian packages and a program each provides, to check for presence.
const APT_PACKAGES: [(&str, &str); 4] = [
    ("qemu-system-x86", "/usr/bin/qemu-system-x86_64"),
    ("busybox-static", "/bin/busybox"),
    ("xz-utils", "/usr/bin/xz"),
    // promtool, which deploy/validate.sh runs over the alerting rules (the package's server
    // is not started by anything here).
    ("prometheus", "/usr/bin/promtool"),
];

/// The nightly toolchain that builds the eBPF programs (and whose libLLVM bpf-linker uses).
pub const NIGHTLY: &str = "nightly";
/// bpf-linker release; 0.13 needs LLVM 21-23, which nightly ships as libLLVM.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Runs every bootstrap step.
pub fn run() -> Result<()> {
    null_device()?;
    apt()?;
    nightly_rust_src()?;
    bpf_linker()?;
    Ok(())
}

/// What `cargo xtask scan` drives against the agent: a TLS scanner, and openssl.
const SCAN_PACKAGES: [(&str, &str); 2] = [
    ("testssl.sh", "/usr/bin/testssl"),
    ("openssl", "/usr/bin/openssl"),
];

/// Installs the scan's tools that are missing.
pub fn scan_tools() -> Result<()> {
    install_missing(&SCAN_PACKAGES)
}

/// cargo-fuzz release for `cargo xtask fuzz`.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Installs cargo-fuzz when `cargo fuzz` is missing (about 2 minutes).
pub fn cargo_fuzz() -> Result<()> {
    let present = Command::new("cargo")
        .args(["fuzz", "--version"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if present {
        return Ok(());
    }
    println!("bootstrap: installing cargo-fuzz {CARGO_FUZZ_VERSION} (about 2 minutes)");
    cmd::run(Command::new("cargo").args([
        "install",
        "--locked",
        "cargo-fuzz",
        "--version",
        CARGO_FUZZ_VERSION,
    ]))
}

/// Makes sure `/dev/null` is the null device. On 2026-12-03 it was a regular file on this
/// kind of machine, here and in CI: every `> /dev/null` appended to it, and every reader got
/// what others had thrown away. Cargo's compiler probe under clippy read another build
/// script's errors as its source and failed ("failed to run `rustc` to learn about
/// target-specific information"), and CI with it. Recreated when it is not a character
/// device (as root; otherwise the task stops and says why).
fn null_device() -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let null = Path::new("/dev/null");
    let meta = std::fs::symlink_metadata(null).context("reading /dev/null")?;
    if meta.file_type().is_char_device() {
        return Ok(());
    }
    println!(
        "bootstrap: /dev/null is not the null device (a {:?} of {} bytes): recreating it",
        meta.file_type(),
        meta.len()
    );
    cmd::run(Command::new("sh").args(["-c", "rm -f /dev/null && mknod -m 666 /dev/null c 1 3"]))
        .context("/dev/null must be the null device (mknod needs root)")
}

/// The peers `cargo xtask bench` measures tlsplice against, from Debian's packages.
const BENCH_PACKAGES: [(&str, &str); 5] = [
    ("haproxy", "/usr/sbin/haproxy"),
    ("nginx-light", "/usr/sbin/nginx"),
    (
        "libnginx-mod-stream",
        "/usr/lib/nginx/modules/ngx_stream_module.so",
    ),
    ("stunnel4", "/usr/bin/stunnel4"),
    ("socat", "/usr/bin/socat"),
];

/// Installs the benchmark peers that are missing (the services they ship are not used: each
/// benchmark starts its own instance with its own configuration).
pub fn bench_peers() -> Result<()> {
    install_missing(&BENCH_PACKAGES)
}

fn apt() -> Result<()> {
    install_missing(&APT_PACKAGES)
}

fn install_missing(packages: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .filter(|(_, file)| !Path::new(file).exists())
        .map(|(pkg, _)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!(
        "bootstrap: installing Debian packages {}",
        missing.join(" ")
    );
    cmd::run(Command::new("apt-get").args(["update", "-qq"]))?;
    cmd::run(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// The nightly toolchain's directory (holds lib/libLLVM*.so).
fn nightly_sysroot() -> Result<PathBuf> {
    let out = cmd::output(
        Command::new("rustup").args(["run", NIGHTLY, "rustc", "--print", "sysroot"]),
    )
    .context("the nightly toolchain is needed for the eBPF programs (rustup toolchain list)")?;
    Ok(PathBuf::from(out.trim()))
}

fn nightly_rust_src() -> Result<()> {
    let sysroot = nightly_sysroot()?;
    if sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        return Ok(());
    }
    println!(
        "bootstrap: adding rust-src to the nightly toolchain (eBPF builds core with -Z build-std)"
    );
    cmd::run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", NIGHTLY]))
}

fn bpf_linker_path() -> PathBuf {
    let cargo_home = std::env::var_os("CARGO_HOME").map_or_else(
        || {
            let home =
                std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
            home.join(".cargo")
        },
        PathBuf::from,
    );
    cargo_home.join("bin").join("bpf-linker")
}

/// The installed bpf-linker, or `None`.
pub fn installed_bpf_linker() -> Option<PathBuf> {
    which("bpf-linker").or_else(|| Some(bpf_linker_path()).filter(|p| p.is_file()))
}

fn bpf_linker() -> Result<()> {
    if let Some(found) = installed_bpf_linker() {
        let version = Command::new("rustup")
            .args(["run", NIGHTLY])
            .arg(&found)
            .arg("--version")
            .output();
        if let Ok(out) = version
            && String::from_utf8_lossy(&out.stdout).contains(BPF_LINKER_VERSION)
        {
            return Ok(());
        }
    }
    // Debian 12 has LLVM 14; bpf-linker needs 21+. The nightly toolchain ships libLLVM 22 in its
    // lib/ directory, so build bpf-linker against that through an LLVM_PREFIX holding a link.
    let sysroot = nightly_sysroot()?;
    let lib = std::fs::read_dir(sysroot.join("lib"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM") && n.contains(".so"))
        })
        .context("the nightly toolchain has no libLLVM*.so in its lib directory")?;
    let name = lib.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let major = name
        .trim_start_matches("libLLVM")
        .trim_start_matches(['-', '.', 's', 'o'])
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap_or_default()
        .to_owned();
    if !["21", "22", "23"].contains(&major.as_str()) {
        bail!(
            "nightly ships libLLVM {major} ({name}); bpf-linker {BPF_LINKER_VERSION} needs 21-23"
        );
    }
    let prefix = cache_dir().join(format!("llvm-prefix-{major}"));
    std::fs::create_dir_all(prefix.join("lib"))?;
    let link = prefix.join("lib/libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&lib, &link)
        .with_context(|| format!("linking {} to {}", link.display(), lib.display()))?;
    println!(
        "bootstrap: building bpf-linker {BPF_LINKER_VERSION} against nightly's libLLVM {major} (about 2 minutes)"
    );
    cmd::run(
        Command::new("cargo")
            .args(["+nightly", "install", "--locked", "bpf-linker"])
            .args(["--version", BPF_LINKER_VERSION, "--force"])
            .args(["--no-default-features", "--features"])
            .arg(format!("llvm-{major}"))
            .env("LLVM_PREFIX", &prefix)
            .env("RUSTUP_TOOLCHAIN", NIGHTLY),
    )
}

/// Mounts a BPF filesystem at /sys/fs/bpf when none is there (the agent pins its maps under
/// it; systemd-based hosts mount it at boot, this machine does not).
pub fn mount_bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mounted = mounts.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.get(1) == Some(&"/sys/fs/bpf") && f.get(2) == Some(&"bpf")
    });
    if !mounted {
        println!("host: mounting a bpf filesystem at /sys/fs/bpf (the eBPF tests pin there)");
        // Without it the eBPF tests print why they skip on the host; the guests mount their own.
        if let Err(e) = cmd::run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"])) {
            println!("host: could not mount bpffs: {e:#}");
        }
    }
    Ok(())
}
