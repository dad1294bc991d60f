//! `cargo xtask fuzz`: the cargo-fuzz (libFuzzer) targets in `tests/fuzz`, one for every parser
//! that reads untrusted bytes, each run for a time from its committed seeds. `cargo xtask test`
//! runs each for a short smoke time. A crash or a timeout fails the run and leaves the input
//! under `tests/fuzz/artifacts/<target>/`.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{bootstrap, cmd};

/// Every target, by its `[[bin]]` name in tests/fuzz/Cargo.toml.
pub const TARGETS: [&str; 4] = ["client_hello", "post_handshake", "proxy_protocol", "config"];

/// Seconds each target runs in `cargo xtask test`.
pub const SMOKE_SECONDS: u64 = 15;

/// Seconds one input may take before libFuzzer calls it a timeout (a hang).
const INPUT_TIMEOUT_SECONDS: u64 = 10;

/// Builds every target once, then runs `targets` (all when empty) for `seconds` each.
pub fn run(root: &Path, seconds: u64, targets: &[String]) -> Result<()> {
    bootstrap::cargo_fuzz()?;
    let dir = root.join("tests/fuzz");
    let selected: Vec<&str> = if targets.is_empty() {
        TARGETS.to_vec()
    } else {
        for t in targets {
            if !TARGETS.contains(&t.as_str()) {
                bail!("no fuzz target {t}: the targets are {}", TARGETS.join(", "));
            }
        }
        targets.iter().map(String::as_str).collect()
    };
    cmd::run(fuzz_command(&dir).args(["build", "-O"]))?;
    let mut rows = Vec::new();
    for target in selected {
        // New inputs go to a scratch corpus under target/; the committed seeds stay as they are.
        let scratch = dir.join("target/corpus").join(target);
        let artifacts = dir.join("artifacts").join(target);
        for d in [&scratch, &artifacts] {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        let mut command = fuzz_command(&dir);
        command
            .args(["run", "-O", target])
            .arg(&scratch)
            .arg(dir.join("corpus").join(target))
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg(format!("-timeout={INPUT_TIMEOUT_SECONDS}"))
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            .arg("-print_final_stats=1");
        println!("+ {}", cmd::show(&command));
        let out = command
            .stdin(std::process::Stdio::null())
            .output()
            .context("starting cargo fuzz")?;
        let text = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            println!("{text}");
            bail!(
                "fuzz target {target} failed ({}): the input is under {}",
                out.status,
                artifacts.display()
            );
        }
        let runs = text
            .lines()
            .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
            .map_or("?".to_owned(), |v| v.trim().to_owned());
        let corpus = std::fs::read_dir(&scratch).map_or(0, |d| d.count());
        rows.push(format!(
            "  {target:16} {runs:>12} inputs in {seconds} s, 0 crashes, 0 timeouts, corpus {corpus}"
        ));
    }
    println!("fuzz:\n{}", rows.join("\n"));
    Ok(())
}

/// `cargo +nightly fuzz` in `dir`, building the agent without its eBPF programs (the parsers
/// do not need them, and the nested eBPF build does not take the fuzzing flags).
fn fuzz_command(dir: &Path) -> Command {
    let mut c = Command::new("cargo");
    c.arg(format!("+{}", bootstrap::NIGHTLY))
        .arg("fuzz")
        .current_dir(dir)
        .env("AYA_BUILD_SKIP", "1");
    c
}
