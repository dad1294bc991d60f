//! `cargo xtask soak`: the soak test (tests/tests/soak.rs) run long — on this host with a
//! release agent, then in a kTLS guest — and the certificate rotation test at full load (20
//! rotations under 200 handshakes a second). `cargo xtask test` runs both short.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{cmd, matrix};

/// What `cargo xtask soak` runs.
pub struct Options {
    /// Connections on the host.
    pub connections: u64,
    /// Connections in the guest.
    pub guest_connections: u64,
    /// The most seconds each soak runs (it stops at its connection count first).
    pub seconds: u64,
    /// Guest kernel.
    pub kernel: String,
    /// No guest.
    pub host_only: bool,
    /// Only the guest.
    pub guest_only: bool,
}

/// Runs the soak and the rotation test on this host, then the soak in the guest.
pub fn run(root: &Path, o: &Options) -> Result<()> {
    crate::bootstrap::run()?;
    if !o.guest_only {
        host(root, o)?;
    }
    if o.host_only {
        return Ok(());
    }
    let env = vec![
        (
            "TLSPLICE_SOAK_CONNECTIONS".to_owned(),
            o.guest_connections.to_string(),
        ),
        ("TLSPLICE_SOAK_SECONDS".to_owned(), o.seconds.to_string()),
    ];
    matrix::vm_with_env(root, &o.kernel, "soak", &env, o.seconds + 900)
}

/// The soak and the rotation test on this host, with a release agent.
fn host(root: &Path, o: &Options) -> Result<()> {
    cmd::run(
        Command::new("cargo")
            .args(["build", "--release", "-p", "tlsplice"])
            .current_dir(root),
    )?;
    let agent = root.join("target/release/tlsplice");
    let binaries = matrix::build_test_binaries(root)?;
    let binary = |target: &str| {
        binaries
            .iter()
            .find(|b| b.target == target)
            .with_context(|| format!("the {target} test binary"))
    };
    let run_test = |b: &matrix::TestBinary, test: &str, env: &[(&str, String)]| -> Result<()> {
        println!("soak: host: {test} {env:?}");
        let status = matrix::host_test(&mut Command::new("env"), b, test, &agent)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .status()
            .with_context(|| format!("running {}", b.path.display()))?;
        if !status.success() {
            bail!("{test} failed on this host ({status})");
        }
        Ok(())
    };
    run_test(
        binary("soak")?,
        "soak_mixed_traffic_leaves_nothing_behind",
        &[
            ("TLSPLICE_SOAK_CONNECTIONS", o.connections.to_string()),
            ("TLSPLICE_SOAK_SECONDS", o.seconds.to_string()),
        ],
    )?;
    run_test(
        binary("operations")?,
        "certificates_rotated_under_a_handshake_load_fail_no_handshake",
        &[
            ("TLSPLICE_ROTATIONS", "20".into()),
            ("TLSPLICE_ROTATION_HANDSHAKES_PER_SECOND", "200".into()),
        ],
    )?;
    Ok(())
}
