//! Boots a guest kernel under QEMU (TCG: KVM is not usable on these machines) with an initramfs,
//! streams its console, and returns the command's exit status. The guest is killed by its PID
//! when it overruns the timeout.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::initramfs::{EXIT_MARKER, READY_MARKER};
use crate::kernels::GuestKernel;

/// How a guest run ended.
#[derive(Debug)]
pub struct GuestRun {
    /// The command's exit status, when the guest got far enough to print it.
    pub exit: Option<i32>,
    /// Every console line after the guest was ready.
    pub lines: Vec<String>,
    /// Killed at the timeout.
    pub timed_out: bool,
    /// Wall time of the whole boot-run-poweroff.
    pub elapsed: Duration,
}

/// Guest memory for the test matrix (two guests may run side by side).
pub const TEST_MEMORY_MIB: u32 = 1024;

/// Boots `kernel` with `initrd` and `memory_mib` of memory; `label` prefixes the streamed
/// console lines.
pub fn boot(
    kernel: &GuestKernel,
    initrd: &Path,
    label: &str,
    timeout: Duration,
    memory_mib: u32,
) -> Result<GuestRun> {
    let start = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-cpu", "max", "-smp", "1"])
        .args(["-m", &memory_mib.to_string()])
        .args([
            "-nographic",
            "-no-reboot",
            "-nodefaults",
            "-serial",
            "stdio",
        ])
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args([
            "-append",
            "console=ttyS0 quiet loglevel=3 panic=-1 oops=panic rdinit=/init",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting qemu-system-x86_64 (cargo xtask bootstrap installs it)")?;
    let pid = child.id();
    let stdout = child.stdout.take().context("qemu stdout")?;
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n') {
            let Ok(line) = line else { break };
            let text = String::from_utf8_lossy(&line)
                .trim_end_matches(['\r', '\n'])
                .to_owned();
            if tx.send(text).is_err() {
                break;
            }
        }
    });
    let mut run = GuestRun {
        exit: None,
        lines: Vec::new(),
        timed_out: false,
        elapsed: Duration::ZERO,
    };
    let mut ready = false;
    let deadline = start + timeout;
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                // The firmware's terminal escapes can share a line with the first marker.
                if let Some((_, code)) = line.split_once(EXIT_MARKER) {
                    run.exit = code.trim().parse().ok();
                } else if line.contains(READY_MARKER) {
                    ready = true;
                    println!("[{label}] {line}");
                } else {
                    if ready {
                        run.lines.push(line.clone());
                    }
                    println!("[{label}] {line}");
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if Instant::now() > deadline {
            println!(
                "[{label}] timed out after {}s: killing QEMU pid {pid}",
                timeout.as_secs()
            );
            run.timed_out = true;
            let _ = child.kill();
            break;
        }
    }
    let _ = child.wait();
    let _ = reader.join();
    run.elapsed = start.elapsed();
    Ok(run)
}
