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

/// The guest's address on QEMU's user network (its first DHCP address, set statically by
/// the guest's init).
pub const GUEST_ADDR: &str = "10.0.2.15";

/// QEMU arguments for a network card whose only way in is `forward`: each port on the host's
/// loopback goes to the same port in the guest. `restrict=on` cuts the guest off from
/// everything else (no route out, no DNS, nothing on the host but the forwarded ports).
pub fn network_args(forward: &[u16]) -> Vec<String> {
    if forward.is_empty() {
        return Vec::new();
    }
    let mut netdev = String::from("user,id=net0,restrict=on");
    for port in forward {
        netdev.push_str(&format!(
            ",hostfwd=tcp:127.0.0.1:{port}-{GUEST_ADDR}:{port}"
        ));
    }
    vec![
        "-netdev".into(),
        netdev,
        "-device".into(),
        // No option ROM: the kernel is booted directly, network boot would only cost time.
        "virtio-net-pci,netdev=net0,romfile=".into(),
    ]
}

/// What the guest's clocks follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Clock {
    /// The host's time: timers and timeouts behave as on a real machine (the test matrix).
    Host,
    /// Executed instructions (`-icount shift=0,sleep=off`): one instruction is one nanosecond of
    /// guest time, and an idle guest skips ahead to its next timer. Guest CPU time becomes an
    /// instruction count that does not depend on how busy the host is, so two runs of the same
    /// build agree; throughput and latency in guest time are those of an imaginary 1 GHz
    /// one-instruction-per-cycle CPU, not of any real one.
    Instructions,
}

impl Clock {
    fn qemu_args(self) -> &'static [&'static str] {
        match self {
            Clock::Host => &[],
            Clock::Instructions => &["-icount", "shift=0,sleep=off"],
        }
    }
}

/// Boots `kernel` with `initrd` and `memory_mib` of memory; `label` prefixes the streamed
/// console lines. `forward`: host loopback ports forwarded to the guest ([`network_args`]).
/// `timeout` is host time, whatever the guest's `clock`.
pub fn boot(
    kernel: &GuestKernel,
    initrd: &Path,
    label: &str,
    timeout: Duration,
    memory_mib: u32,
    forward: &[u16],
    clock: Clock,
) -> Result<GuestRun> {
    let start = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-cpu", "max", "-smp", "1"])
        .args(clock.qemu_args())
        .args(network_args(forward))
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
