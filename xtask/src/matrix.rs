//! `cargo xtask test`, `vm` and `demo`: the host checks, and the kernel-dependent tests run on the
//! host kernel and in every guest kernel whose features they need.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::kernels::{self, GuestKernel};
use crate::{bootstrap, cmd, initramfs, vm};

/// Something a matrix test needs from the kernel.
#[derive(Debug, Clone, Copy)]
#[allow(dead_code)] // Sockmap and KernelAtLeast are for targets that need them; none does yet.
pub enum Need {
    /// The TLS ULP with AES-GCM and ChaCha20-Poly1305.
    Ktls,
    /// BPF sockmap/sockhash with sk_skb and sk_msg programs.
    Sockmap,
    /// A minimum kernel version.
    KernelAtLeast(u32, u32),
}

/// An integration test target (in tests/) that runs in the kernel matrix. Its tests are
/// `#[ignore]`d for plain `cargo test` and run here with `--ignored`.
#[derive(Debug)]
pub struct MatrixTest {
    /// The `[[test]]` name in tests/Cargo.toml.
    pub target: &'static str,
    /// What a kernel must have for the target to run there.
    pub needs: &'static [Need],
    /// Host programs the tests call, copied into guests with their libraries.
    pub tools: &'static [&'static str],
}

/// Every matrix test target.
pub const MATRIX_TESTS: &[MatrixTest] = &[
    MatrixTest {
        target: "ktls_smoke",
        needs: &[Need::Ktls],
        tools: &[],
    },
    MatrixTest {
        target: "terminate",
        needs: &[],
        tools: &["openssl", "curl"],
    },
    MatrixTest {
        target: "reencrypt",
        needs: &[],
        tools: &["openssl"],
    },
    MatrixTest {
        target: "passthrough",
        needs: &[],
        tools: &[],
    },
    MatrixTest {
        target: "mtls",
        needs: &[],
        tools: &["openssl"],
    },
    MatrixTest {
        target: "policy",
        needs: &[],
        tools: &["openssl", "ip"],
    },
    MatrixTest {
        target: "probe",
        needs: &[],
        tools: &[],
    },
    MatrixTest {
        target: "session",
        needs: &[],
        tools: &["openssl"],
    },
    MatrixTest {
        target: "modes",
        needs: &[],
        tools: &[],
    },
    MatrixTest {
        target: "ebpf",
        needs: &[],
        tools: &["setpriv"],
    },
    MatrixTest {
        target: "operations",
        needs: &[],
        tools: &["openssl"],
    },
    MatrixTest {
        target: "takeover",
        needs: &[],
        tools: &[],
    },
    MatrixTest {
        target: "footprint",
        needs: &[],
        tools: &[],
    },
    MatrixTest {
        target: "hostile",
        needs: &[],
        tools: &["openssl"],
    },
    MatrixTest {
        target: "abuse",
        needs: &[],
        tools: &[],
    },
    MatrixTest {
        target: "soak",
        needs: &[],
        tools: &[],
    },
    MatrixTest {
        target: "demo",
        needs: &[],
        tools: &[],
    },
];

/// Marker a skipped test prints (tests/src/lib.rs `SKIP_MARKER`).
const SKIP_MARKER: &str = "TLSPLICE-SKIP";
/// Environment variable that turns a missing kernel feature into a failure in guests.
const REQUIRE_ENV: &str = "TLSPLICE_REQUIRE_KERNEL_FEATURES";
/// Environment variable naming the agent binary for tests that run it (tests/src/lib.rs).
const AGENT_BIN_ENV: &str = "TLSPLICE_AGENT_BIN";
const BEGIN: &str = "TLSPLICE-TEST-BEGIN";
const END: &str = "TLSPLICE-TEST-END";

/// Per-test time limit on the host.
const HOST_TEST_TIMEOUT: Duration = Duration::from_secs(600);
/// Per-guest time limit.
/// Each guest took 14-21 min in clean runs two at a time (2026-12-02, 12-03); three at once on
/// two cores may take half as long again if they are busy. 45 min keeps a slow run whole and
/// inside CI's limit.
const GUEST_TIMEOUT: Duration = Duration::from_secs(2700);

/// The first need a kernel of `version` does not meet. Features (kTLS, sockmap) are not
/// decided here: every guest loads tls.ko and has BPF, and on the host the test probes the
/// feature itself and prints why it skips.
fn version_unmet(release: &str, version: (u32, u32), needs: &[Need]) -> Option<String> {
    needs.iter().find_map(|need| match need {
        Need::Ktls | Need::Sockmap => None,
        Need::KernelAtLeast(major, minor) => (version < (*major, *minor))
            .then(|| format!("needs kernel >= {major}.{minor}, this kernel is {release}")),
    })
}

fn tools_of(binaries: &[&TestBinary]) -> Vec<String> {
    let mut tools: Vec<String> = MATRIX_TESTS
        .iter()
        .filter(|t| binaries.iter().any(|b| b.target == t.target))
        .flat_map(|t| t.tools.iter().map(|s| (*s).to_owned()))
        .collect();
    tools.sort();
    tools.dedup();
    tools
}

fn needs_of(target: &str) -> &'static [Need] {
    MATRIX_TESTS
        .iter()
        .find(|t| t.target == target)
        .map_or(&[][..], |t| t.needs)
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Passed,
    Failed(String),
    Skipped(String),
}

/// A test binary and the test names in it.
pub(crate) struct TestBinary {
    pub(crate) target: &'static str,
    pub(crate) path: PathBuf,
    tests: Vec<String>,
}

/// `run` (a test binary, or a wrapper such as `timeout` given its arguments) set to run one
/// test of `b` on this host against `agent`, as the matrix does.
pub(crate) fn host_test<'a>(
    run: &'a mut Command,
    b: &TestBinary,
    test: &str,
    agent: &Path,
) -> &'a mut Command {
    run.arg(&b.path)
        .args([
            "--ignored",
            "--exact",
            test,
            "--nocapture",
            "--test-threads=1",
        ])
        .env_remove(REQUIRE_ENV)
        .env(AGENT_BIN_ENV, agent)
}

/// Builds the matrix test binaries and lists their tests.
pub(crate) fn build_test_binaries(root: &Path) -> Result<Vec<TestBinary>> {
    let mut c = Command::new("cargo");
    c.args([
        "test",
        "-p",
        "tlsplice-tests",
        "--no-run",
        "--message-format=json-render-diagnostics",
    ]);
    for t in MATRIX_TESTS {
        c.args(["--test", t.target]);
    }
    let out = cmd::output(c.current_dir(root))?;
    let mut binaries = Vec::new();
    for line in out.lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let name = msg["target"]["name"].as_str().unwrap_or_default();
        let Some(exe) = msg["executable"].as_str() else {
            continue;
        };
        if let Some(t) = MATRIX_TESTS.iter().find(|t| t.target == name) {
            let listing = cmd::output(Command::new(exe).args(["--list", "--ignored"]))?;
            let tests = listing
                .lines()
                .filter_map(|l| l.strip_suffix(": test"))
                .map(str::to_owned)
                .collect();
            binaries.push(TestBinary {
                target: t.target,
                path: PathBuf::from(exe),
                tests,
            });
        }
    }
    for t in MATRIX_TESTS {
        if !binaries.iter().any(|b| b.target == t.target) {
            bail!("cargo built no test binary for {}", t.target);
        }
    }
    Ok(binaries)
}

fn classify(status_ok: bool, output: &str) -> Outcome {
    let skips: Vec<&str> = output
        .lines()
        .filter_map(|l| l.split_once(SKIP_MARKER).map(|(_, rest)| rest.trim()))
        .collect();
    if !status_ok {
        let tail: Vec<&str> = output.lines().rev().take(15).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        Outcome::Failed(tail.join("\n"))
    } else if !skips.is_empty() {
        Outcome::Skipped(skips.join("; "))
    } else {
        Outcome::Passed
    }
}

/// Runs every matrix test on the host kernel; tests print why they skip.
/// Runs every test on the host kernel; `agent` is the tlsplice binary the tests may start.
fn run_on_host(binaries: &[TestBinary], agent: &Path) -> Result<Vec<(String, Outcome)>> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let version = kernels::parse_version(&release);
    let mut results = Vec::new();
    for b in binaries {
        if let Some(why) = version_unmet(&release, version, needs_of(b.target)) {
            for test in &b.tests {
                println!("[host] skipping {}::{test}: {why}", b.target);
                results.push((
                    format!("{}::{test}", b.target),
                    Outcome::Skipped(why.clone()),
                ));
            }
            continue;
        }
        for test in &b.tests {
            // coreutils `timeout` kills a hung test (exit status 124) so the run always ends.
            let mut run = Command::new("timeout");
            run.arg(HOST_TEST_TIMEOUT.as_secs().to_string());
            let out = host_test(&mut run, b, test, agent)
                .output()
                .with_context(|| format!("running {}", b.path.display()))?;
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            for l in text.lines().filter(|l| !l.trim().is_empty()) {
                println!("[host] {l}");
            }
            let mut outcome = classify(out.status.success(), &text);
            if out.status.code() == Some(124) {
                outcome = Outcome::Failed(format!(
                    "timed out after {}s on the host",
                    HOST_TEST_TIMEOUT.as_secs()
                ));
            }
            results.push((format!("{}::{test}", b.target), outcome));
        }
    }
    Ok(results)
}

/// The agent binary the matrix, the demo and the scans run, on the host and in guests (its build
/// script builds and embeds the eBPF object).
pub(crate) fn build_agent(root: &Path) -> Result<PathBuf> {
    // The test profile (optimised, with debug assertions) and not dev: an unoptimised agent
    // in a TCG guest is tens of times slower than a shipped one, so slow that a flood's
    // connects outpace its accept loop by far and the load tests measure the build, not the
    // agent (an echo behind a flood took 30 s, against 2-3 s optimised). The test binaries
    // have already compiled nearly every dependency in this profile; a release build would
    // compile them all a third time (3.5 min on 2 cores).
    cmd::run(
        Command::new("cargo")
            .args([
                "build",
                "--profile",
                "test",
                "-p",
                "tlsplice",
                "--bin",
                "tlsplice",
            ])
            .current_dir(root),
    )?;
    // The test profile's outputs share target/debug with dev's, which a later dev build of the
    // agent would replace: a copy of its own.
    let built = root.join("target/debug/tlsplice");
    let dir = root.join("target/matrix-agent");
    std::fs::create_dir_all(&dir)?;
    let agent = dir.join("tlsplice");
    std::fs::copy(&built, &agent)
        .with_context(|| format!("copying {} to {}", built.display(), agent.display()))?;
    Ok(agent)
}

/// Puts the agent, the given test binaries and tools into an initramfs for `kernel`.
pub(crate) fn guest_image(
    root: &Path,
    kernel: &GuestKernel,
    agent: &Path,
    binaries: &[&TestBinary],
    tools: &[String],
    script: &str,
) -> Result<PathBuf> {
    let work = root.join("target/vm").join(&kernel.release);
    std::fs::create_dir_all(&work)?;
    let mut contents = initramfs::Contents::default();
    initramfs::add_kernel_modules(&mut contents, kernel)?;
    contents.add_program(
        &initramfs::stripped_copy(agent, &work.join("bin"))?,
        "/usr/bin/tlsplice",
    )?;
    for b in binaries {
        let stripped = initramfs::stripped_copy(&b.path, &work.join("bin"))?;
        contents.add_program(&stripped, &format!("/tlsplice/bin/{}", b.target))?;
    }
    for tool in tools {
        let host =
            cmd::which(tool).with_context(|| format!("{tool} is not installed on the host"))?;
        contents.add_program(&host, &format!("/usr/bin/{tool}"))?;
    }
    contents.env(REQUIRE_ENV, "1");
    contents.env("RUST_BACKTRACE", "1");
    contents.script(script);
    let busybox = Path::new("/bin/busybox");
    let image = work.join("initramfs.cpio");
    initramfs::write(&contents, busybox, &image)?;
    Ok(image)
}

/// Each test's outcome, by `target::test` name.
type Results = Vec<(String, Outcome)>;

/// Runs every guest of the matrix at once (`TLSPLICE_GUESTS_AT_ONCE` sets fewer) and returns
/// each guest's results in the order given. Guest lines stay labelled with the kernel's name.
///
/// A TCG guest is one vCPU thread, but the tests in it spend much of their time waiting
/// (timers, handshakes, agent starts): on 2026-12-03 the third guest, run alone after the
/// first two, took as long as each of the pair (1,291 s against 1,190 s), with a core idle.
/// All three at once on two cores finish in less than a pair and then one.
fn run_guests(
    root: &Path,
    guests: &[(&str, GuestKernel)],
    agent: &Path,
    binaries: &[TestBinary],
) -> Result<Vec<(String, Results)>> {
    let at_once = std::env::var("TLSPLICE_GUESTS_AT_ONCE")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(guests.len())
        .clamp(1, guests.len().max(1));
    println!("matrix: {} guests, {at_once} at a time", guests.len());
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<std::sync::Mutex<Option<Result<Results>>>> =
        guests.iter().map(|_| std::sync::Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for _ in 0..at_once {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some((name, kernel)) = guests.get(i) else {
                        break;
                    };
                    let run = run_in_guest(root, name, kernel, agent, binaries);
                    *results[i].lock().unwrap_or_else(|p| p.into_inner()) = Some(run);
                }
            });
        }
    });
    guests
        .iter()
        .zip(results)
        .map(|((name, kernel), result)| {
            let result = result
                .into_inner()
                .unwrap_or_else(|p| p.into_inner())
                .unwrap_or_else(|| Err(anyhow::anyhow!("the {name} guest never ran")))?;
            Ok((format!("{name} {}", kernel.release), result))
        })
        .collect()
}

/// Runs the matrix tests that apply inside one guest kernel.
fn run_in_guest(
    root: &Path,
    name: &str,
    kernel: &GuestKernel,
    agent: &Path,
    binaries: &[TestBinary],
) -> Result<Vec<(String, Outcome)>> {
    let mut results = Vec::new();
    let mut selected = Vec::new();
    let mut script = String::new();
    for b in binaries {
        if let Some(why) = version_unmet(&kernel.release, kernel.version(), needs_of(b.target)) {
            for test in &b.tests {
                results.push((
                    format!("{}::{test}", b.target),
                    Outcome::Skipped(why.clone()),
                ));
            }
            continue;
        }
        selected.push(b);
        for test in &b.tests {
            script.push_str(&format!(
                "echo {BEGIN} {target}::{test} $(cut -d' ' -f1 /proc/uptime)\n/tlsplice/bin/{target} --ignored --exact {test} --nocapture --test-threads=1\necho {END} {target}::{test} $? $(cut -d' ' -f1 /proc/uptime)\n",
                target = b.target
            ));
        }
    }
    if selected.is_empty() {
        return Ok(results);
    }
    let tools = tools_of(&selected);
    let image = guest_image(root, kernel, agent, &selected, &tools, &script)?;
    let run = vm::boot(
        kernel,
        &image,
        name,
        GUEST_TIMEOUT,
        vm::TEST_MEMORY_MIB,
        &[],
        vm::Clock::Host,
    )?;
    println!(
        "[{name}] guest finished in {:.0}s",
        run.elapsed.as_secs_f64()
    );
    let mut current: Option<(String, String)> = None;
    let mut seen = BTreeMap::new();
    // Guest seconds (its uptime) each test took, to show where the matrix's time goes.
    let mut started = None;
    let mut took = Vec::new();
    for line in &run.lines {
        if let Some(rest) = line.strip_prefix(BEGIN) {
            let mut parts = rest.split_whitespace();
            let id = parts.next().unwrap_or_default().to_owned();
            started = parts.next().and_then(|t| t.parse::<f64>().ok());
            current = Some((id, String::new()));
        } else if let Some(rest) = line.strip_prefix(END) {
            let mut parts = rest.split_whitespace();
            let id = parts.next().unwrap_or_default().to_owned();
            let ok = parts.next() == Some("0");
            if let (Some(begin), Some(end)) = (
                started.take(),
                parts.next().and_then(|t| t.parse::<f64>().ok()),
            ) {
                took.push((end - begin, id.clone()));
            }
            let text = current.take().map(|c| c.1).unwrap_or_default();
            seen.insert(id, classify(ok, &text));
        } else if let Some((_, text)) = current.as_mut() {
            text.push_str(line);
            text.push('\n');
        }
    }
    println!("[{name}] {}", slowest(&mut took, 8));
    for b in &selected {
        for test in &b.tests {
            let id = format!("{}::{test}", b.target);
            let outcome = seen.remove(&id).unwrap_or_else(|| {
                Outcome::Failed(if run.timed_out {
                    format!(
                        "guest timed out after {}s before the test ended",
                        GUEST_TIMEOUT.as_secs()
                    )
                } else if let Some((cur, _)) = current.as_ref().filter(|c| c.0 == id) {
                    format!("{cur}: the guest stopped during the test (kernel crash?)")
                } else {
                    "the test never ran in the guest".to_owned()
                })
            });
            results.push((id, outcome));
        }
    }
    Ok(results)
}

/// "slowest: a 12.0s, b 9.5s, ... (of N tests, T s in all)" from (guest seconds, test) pairs.
fn slowest(took: &mut [(f64, String)], count: usize) -> String {
    let total: f64 = took.iter().map(|t| t.0).sum();
    took.sort_by(|a, b| b.0.total_cmp(&a.0));
    let top: Vec<String> = took
        .iter()
        .take(count)
        .map(|(secs, id)| format!("{id} {secs:.0}s"))
        .collect();
    format!(
        "slowest: {} (of {} tests, {total:.0}s of guest time in all)",
        top.join(", "),
        took.len()
    )
}

/// `cargo xtask test`.
pub fn test(root: &Path, kernel_names: &[String], lint: bool) -> Result<()> {
    bootstrap::run()?;
    if lint {
        cmd::run(Command::new("cargo").args(["fmt", "--all", "--check"]))?;
        for manifest in ["ebpf/tlsplice-ebpf/Cargo.toml", "tests/fuzz/Cargo.toml"] {
            cmd::run(Command::new("cargo").args(["fmt", "--check", "--manifest-path", manifest]))?;
        }
        cmd::run(Command::new("cargo").args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))?;
    }
    cmd::run(Command::new("cargo").args(["test", "--workspace"]))?;
    // Every parser that reads untrusted bytes, fuzzed for a moment from its seeds (the long
    // run is `cargo xtask fuzz`).
    crate::fuzz::run(root, crate::fuzz::SMOKE_SECONDS, &[])?;

    let lines: Vec<&kernels::KernelLine> = if kernel_names.is_empty() {
        kernels::MATRIX.iter().collect()
    } else {
        kernel_names
            .iter()
            .map(|n| kernels::line(n))
            .collect::<Result<_>>()?
    };
    let binaries = build_test_binaries(root)?;
    let agent = build_agent(root)?;
    // The deployment files, offline: Kubernetes schemas, systemd-analyze, config drift.
    cmd::run(
        Command::new("bash")
            .arg(root.join("deploy/validate.sh"))
            .arg(&agent),
    )?;
    bootstrap::mount_bpffs()?;
    let mut table: Vec<(String, Vec<(String, Outcome)>)> = Vec::new();
    let host_release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    table.push((
        format!("host {host_release}"),
        run_on_host(&binaries, &agent)?,
    ));
    let guests = lines
        .into_iter()
        .map(|line| Ok((line.name, kernels::fetch(line, false)?)))
        .collect::<Result<Vec<_>>>()?;
    table.extend(run_guests(root, &guests, &agent, &binaries)?);

    println!("\nkernel matrix:");
    let (mut passed, mut failed, mut skipped) = (0, 0, 0);
    for (kernel, results) in &table {
        for (test, outcome) in results {
            match outcome {
                Outcome::Passed => {
                    passed += 1;
                    println!("  PASS  {kernel:40} {test}");
                }
                Outcome::Skipped(why) => {
                    skipped += 1;
                    println!("  SKIP  {kernel:40} {test}: {why}");
                }
                Outcome::Failed(why) => {
                    failed += 1;
                    println!("  FAIL  {kernel:40} {test}:\n{why}");
                }
            }
        }
    }
    println!("matrix: {passed} passed, {failed} failed, {skipped} skipped");
    if failed > 0 {
        bail!("{failed} kernel matrix tests failed");
    }
    // Real tools from the host: openssl's post-handshake commands and a TLS scanner, against
    // the host's agent and one in each guest of the run through forwarded ports.
    let scanned: Vec<&str> = guests.iter().map(|(name, _)| *name).collect();
    crate::scan::run(root, &scanned, false)?;
    let last = kernels::MATRIX.last().map_or("sid", |l| l.name);
    // The benchmark harness's smoke run, so it cannot rot: every peer and tlsplice path, the
    // guest's kTLS rows, the report and the micro-benchmarks (each once).
    crate::bench::run(
        root,
        &crate::bench::Options {
            quick: true,
            host_only: false,
            guest_only: false,
            kernel: last.to_owned(),
            only: Vec::new(),
            relays: Vec::new(),
            host_repeat: 1,
        },
    )
}

/// `cargo xtask vm`.
#[allow(clippy::too_many_arguments)] // one per command-line option
pub fn vm(
    root: &Path,
    kernel_name: &str,
    test: Option<&str>,
    tools: &[String],
    timeout: u64,
    forward: &[u16],
    clock: vm::Clock,
    command: &[String],
) -> Result<()> {
    guest_run(
        root,
        kernel_name,
        test,
        &[],
        tools,
        timeout,
        forward,
        clock,
        command,
    )
}

/// Runs matrix test target `test` in a `kernel_name` guest with `env` set for it.
pub(crate) fn vm_with_env(
    root: &Path,
    kernel_name: &str,
    test: &str,
    env: &[(String, String)],
    timeout: u64,
) -> Result<()> {
    guest_run(
        root,
        kernel_name,
        Some(test),
        env,
        &[],
        timeout,
        &[],
        vm::Clock::Host,
        &[],
    )
}

#[allow(clippy::too_many_arguments)] // the two entry points above name them
fn guest_run(
    root: &Path,
    kernel_name: &str,
    test: Option<&str>,
    env: &[(String, String)],
    tools: &[String],
    timeout: u64,
    forward: &[u16],
    clock: vm::Clock,
    command: &[String],
) -> Result<()> {
    bootstrap::run()?;
    let line = kernels::line(kernel_name)?;
    let kernel = kernels::fetch(line, false)?;
    let agent = build_agent(root)?;
    let binaries = if test.is_some() {
        build_test_binaries(root)?
    } else {
        Vec::new()
    };
    let selected: Vec<&TestBinary> = binaries.iter().filter(|b| Some(b.target) == test).collect();
    if let Some(t) = test
        && selected.is_empty()
    {
        bail!("no matrix test target named {t}");
    }
    let mut script = String::new();
    for b in &selected {
        let env: String = env.iter().map(|(k, v)| format!("{k}={v} ")).collect();
        script.push_str(&format!(
            "{env}/tlsplice/bin/{} --ignored --nocapture --test-threads=1 || exit $?\n",
            b.target
        ));
    }
    if !command.is_empty() {
        script.push_str(&shell_join(command));
        script.push('\n');
    }
    if script.is_empty() {
        script.push_str("tlsplice probe\n");
    }
    let mut tools = tools.to_vec();
    tools.extend(tools_of(&selected));
    let image = guest_image(root, &kernel, &agent, &selected, &tools, &script)?;
    let run = vm::boot(
        &kernel,
        &image,
        line.name,
        Duration::from_secs(timeout),
        vm::TEST_MEMORY_MIB,
        forward,
        clock,
    )?;
    match run.exit {
        Some(0) => Ok(()),
        Some(code) => bail!("the command exited with status {code} in the guest"),
        None if run.timed_out => bail!("the guest timed out after {timeout}s"),
        None => bail!("the guest stopped before the command finished"),
    }
}

fn shell_join(words: &[String]) -> String {
    words
        .iter()
        .map(|w| {
            if w.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./=:,".contains(c))
            {
                w.clone()
            } else {
                format!("'{}'", w.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `cargo xtask demo`: the agent doing its job here, then (unless `host_only`) inside a guest
/// kernel with kTLS; each step says what it is doing first.
pub fn demo(root: &Path, kernel_name: &str, host_only: bool) -> Result<()> {
    let steps = if host_only { 3 } else { 4 };
    println!("== [1/{steps}] set-up: toolchains, QEMU, bpf-linker (installed once) ==");
    bootstrap::run()?;
    println!("== [2/{steps}] building the agent (with its eBPF object) and the demo ==");
    let agent = build_agent(root)?;
    let binaries = build_test_binaries(root)?;
    let demo = binaries
        .iter()
        .find(|b| b.target == "demo")
        .context("the demo test binary")?;
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    println!(
        "== [3/{steps}] on this host (kernel {release}): what it can offload, then terminate, reencrypt and passthrough end to end =="
    );
    cmd::run(Command::new(&agent).arg("probe"))?;
    bootstrap::mount_bpffs()?;
    cmd::run(
        Command::new(&demo.path)
            .args([
                "--ignored",
                "--exact",
                "demo",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(AGENT_BIN_ENV, &agent),
    )?;
    if host_only {
        return Ok(());
    }
    println!(
        "== [4/{steps}] in a guest: Debian's {kernel_name} kernel under QEMU/TCG with kTLS (downloaded once; boots in seconds, runs slower: the CPU is emulated) =="
    );
    vm(
        root,
        kernel_name,
        Some("demo"),
        &[],
        900,
        &[],
        vm::Clock::Host,
        &["tlsplice".into(), "probe".into()],
    )
}

#[cfg(test)]
mod tests {
    use super::slowest;

    #[test]
    fn slowest_lists_the_longest_tests_first_with_the_total() {
        let mut took = vec![
            (1.0, "a::one".to_owned()),
            (30.5, "b::two".to_owned()),
            (4.0, "c::three".to_owned()),
        ];
        assert_eq!(
            slowest(&mut took, 2),
            "slowest: b::two 30s, c::three 4s (of 3 tests, 36s of guest time in all)"
        );
    }
}
