//! `cargo xtask bench`: tlsplice against HAProxy, nginx, stunnel and socat on this host, then
//! the kTLS rows inside a QEMU/TCG guest, then target/bench/report.md with SVG charts and raw
//! JSON, then the criterion micro-benchmarks. `--quick` is the smoke run CI executes.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::{bootstrap, cmd, initramfs, kernels, peers, vm};

/// What `cargo xtask bench` was asked for.
#[derive(Debug)]
pub struct Options {
    /// Small sizes, test-profile builds, criterion benches run once each as tests.
    pub quick: bool,
    /// No guest (no kTLS rows).
    pub host_only: bool,
    /// No host rows.
    pub guest_only: bool,
    /// The guest kernel for the kTLS rows.
    pub kernel: String,
    /// Only these workloads (empty: all, and the micro-benchmarks).
    pub only: Vec<String>,
    /// Only these relays, by label (empty: all).
    pub relays: Vec<String>,
    /// Runs per host row (each figure their median, with the spread beside it).
    pub host_repeat: u32,
}

impl Options {
    /// The filters as `tlsplice-bench run` arguments.
    fn filters(&self) -> Vec<String> {
        let only = self
            .only
            .iter()
            .flat_map(|w| ["--only".to_owned(), w.clone()]);
        let relays = self
            .relays
            .iter()
            .flat_map(|r| ["--relay".to_owned(), r.clone()]);
        only.chain(relays).collect()
    }
}

/// Guests that run the kTLS rows, side by side: their figures, instruction counts, must agree.
const GUEST_RUNS: usize = 2;

/// Tells `tlsplice-bench` in the guest where the newest nginx's stream module is.
const NEWEST_STREAM_MODULE_ENV: &str = "TLSPLICE_BENCH_NEWEST_NGINX_STREAM_MODULE";
/// Tells it why the newest peers are missing, when they are.
const NEWEST_PEERS_MISSING_ENV: &str = "TLSPLICE_BENCH_NEWEST_PEERS_MISSING";

/// The peers' programs the guest needs with nginx (its stream module is a loadable object).
const NGINX_STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";

/// Runs everything and writes target/bench.
pub fn run(root: &Path, opts: &Options) -> Result<()> {
    bootstrap::run()?;
    bootstrap::bench_peers()?;
    bootstrap::mount_bpffs()?;
    // Quick runs check that the harness works, not how fast anything is: the test profile
    // (optimised, debug assertions on), whose dependencies `cargo xtask test` has already
    // compiled, saves minutes of release compilation; unoptimised TLS in the TCG guests would
    // take several times longer than the build saves.
    let profile = if opts.quick { "debug" } else { "release" };
    let mut build = Command::new("cargo");
    build.args([
        "build",
        "-p",
        "tlsplice",
        "-p",
        "tlsplice-benches",
        "--bins",
    ]);
    if opts.quick {
        // The test profile's outputs go to target/debug.
        build.args(["--profile", "test"]);
    } else {
        build.arg("--release");
    }
    cmd::run(build.current_dir(root))?;
    let bin = root.join("target").join(profile);
    let out = root.join("target/bench");
    std::fs::create_dir_all(&out)?;
    let mut inputs = Vec::new();

    let host_json = out.join("host.json");
    let mut host_result = Ok(());
    if !opts.guest_only {
        let _ = std::fs::remove_file(&host_json);
        println!("== bench: on this host ==");
        host_result = host(&bin, &host_json, opts);
    } else if host_json.exists() {
        // The guest part again (it takes the longest): the host rows measured before stay in
        // the report, under their own date.
        println!(
            "bench: the report keeps the host rows measured earlier ({})",
            host_json.display()
        );
    }
    if host_json.exists() {
        inputs.push(host_json);
    }

    let mut guest_result = Ok(());
    if !opts.host_only {
        println!(
            "== bench: the kTLS rows in {GUEST_RUNS} guests side by side ({} kernel, QEMU/TCG, CPU counted in instructions) ==",
            opts.kernel
        );
        let guest_json = out.join("guest.json");
        let _ = std::fs::remove_file(&guest_json);
        guest_result = guest(&bin, &out, opts);
        if guest_json.exists() {
            inputs.push(guest_json);
        }
    }

    if !inputs.is_empty() {
        let mut report = Command::new(bin.join("tlsplice-bench"));
        report.args(["report", "--out"]).arg(&out);
        for i in &inputs {
            report.arg("--input").arg(i);
        }
        cmd::run(&mut report)?;
    }

    let micro = if opts.only.is_empty() && opts.relays.is_empty() {
        println!(
            "== bench: criterion micro-benchmarks (ClientHello peek, PROXY v2, splice loop) =="
        );
        micro(root, &out, opts.quick)
    } else {
        println!("bench: rows filtered (--only/--relay): no micro-benchmarks");
        Ok(())
    };
    host_result.context("the host benchmark")?;
    guest_result.context("the guest benchmark")?;
    micro.context("the micro-benchmarks")?;
    println!("bench: report at {}", out.join("report.md").display());
    Ok(())
}

/// The host rows: `tlsplice-bench run --scope host`, each row the median of `host_repeat` runs.
fn host(bin: &Path, json: &Path, opts: &Options) -> Result<()> {
    let mut host = Command::new(bin.join("tlsplice-bench"));
    host.args(["run", "--scope", "host"])
        .arg("--agent")
        .arg(bin.join("tlsplice"))
        .arg("--loadgen")
        .arg(bin.join("tlsplice-loadgen"))
        .arg("--out")
        .arg(json);
    if opts.quick {
        host.arg("--quick");
    }
    host.args(["--repeat", &opts.host_repeat.to_string()]);
    host.args(opts.filters());
    cmd::run(&mut host)
}

fn guest(bin: &Path, out: &Path, opts: &Options) -> Result<()> {
    let line = kernels::line(&opts.kernel)?;
    let kernel = kernels::fetch(line, false)?;
    let work = out.join(format!("vm-{}", kernel.release));
    std::fs::create_dir_all(&work)?;
    let mut contents = initramfs::Contents::default();
    initramfs::add_kernel_modules(&mut contents, &kernel)?;
    for (name, guest_path) in [
        ("tlsplice", "/usr/bin/tlsplice"),
        ("tlsplice-bench", "/usr/bin/tlsplice-bench"),
        ("tlsplice-loadgen", "/usr/bin/tlsplice-loadgen"),
    ] {
        // The agent keeps its symbols: the report's profile names its functions.
        let stripped = if name == "tlsplice" {
            initramfs::copy_keeping_symbols(&bin.join(name), &work.join("bin"))?
        } else {
            initramfs::stripped_copy(&bin.join(name), &work.join("bin"))?
        };
        contents.add_program(&stripped, guest_path)?;
    }
    for tool in ["openssl", "nginx"] {
        let host = cmd::which(tool).with_context(|| format!("{tool} is not installed"))?;
        contents.add_program(&host, &format!("/usr/bin/{tool}"))?;
    }
    contents.add_program(Path::new(NGINX_STREAM_MODULE), NGINX_STREAM_MODULE)?;
    // The newest peers beside them: nginx 1.30 with OpenSSL 3.6 (kTLS both ways), HAProxy 3.4
    // (kTLS), from Debian sid and experimental.
    // Without them (no archive reachable) the Debian 12 peers still run, and the report says
    // why the newest are missing.
    match peers::fetch(false).and_then(|newest| {
        peers::add_to(&mut contents, &newest)?;
        Ok(newest)
    }) {
        Ok(newest) => {
            println!(
                "bench: newest peers: nginx {}, OpenSSL {}, HAProxy {}",
                newest.nginx, newest.openssl, newest.haproxy
            );
            contents.env(NEWEST_STREAM_MODULE_ENV, peers::NGINX_STREAM_MODULE);
        }
        Err(e) => {
            let why = format!("the newest peers could not be fetched: {e:#}");
            println!("bench: {why}");
            contents.env(NEWEST_PEERS_MISSING_ENV, &why);
        }
    }
    // nginx looks its worker user up even when told `user root`.
    contents.add_bytes("/etc/passwd", b"root:x:0:0:root:/tmp:/bin/sh\n".to_vec());
    contents.add_bytes("/etc/group", b"root:x:0:\n".to_vec());
    // openssl reads its configuration from here; without it, it still runs with defaults.
    if Path::new("/usr/lib/ssl/openssl.cnf").exists() {
        contents.add_bytes(
            "/usr/lib/ssl/openssl.cnf",
            std::fs::read("/usr/lib/ssl/openssl.cnf")?,
        );
    }
    let quick = if opts.quick { " --quick" } else { "" };
    // Quoted for the guest's shell: relay labels have spaces.
    let filters: String = opts.filters().iter().map(|a| format!(" '{a}'")).collect();
    // Transparent huge pages off for every relay: khugepaged's collapsing, for any process,
    // is kernel-thread CPU, which every row counts against its relay (tlsplice turns them off
    // for itself; the peers would otherwise keep them and their bill would land anywhere).
    contents.script(&format!(
        "ulimit -n 65536\necho never > /sys/kernel/mm/transparent_hugepage/enabled\n\
         tlsplice-bench run --scope guest{quick} --clock instructions \
         --agent /usr/bin/tlsplice --loadgen /usr/bin/tlsplice-loadgen --out -{filters}\n"
    ));
    let image = work.join("initramfs.cpio");
    initramfs::write(&contents, Path::new("/bin/busybox"), &image)?;
    // A full run emulates every row of eight relays in two modes: the better part of an hour.
    let timeout = if opts.quick { 1500 } else { 10800 };
    // The same image in GUEST_RUNS guests at once, each on the instruction clock: a TCG guest is
    // one host thread, so two side by side take the time of one on this 2-core machine, and
    // neither's figures depend on the other's load. Each guest has 2 GiB: thousands of idle
    // connections are four sockets each in the guest's kernel and a TLS client session each in
    // the load generator, besides the relay.
    let runs: Vec<Result<vm::GuestRun>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (1..=GUEST_RUNS)
            .map(|i| {
                let (kernel, image) = (&kernel, &image);
                let label = format!("{}#{i}", line.name);
                scope.spawn(move || {
                    vm::boot(
                        kernel,
                        image,
                        &label,
                        Duration::from_secs(timeout),
                        2048,
                        &[],
                        vm::Clock::Instructions,
                    )
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| bail!("a guest's console thread panicked"))
            })
            .collect()
    });
    let mut jsons = Vec::new();
    let mut failures = Vec::new();
    for (i, run) in (1..=GUEST_RUNS).zip(runs) {
        let run = run?;
        let console = out.join(format!("guest-console-{i}.log"));
        std::fs::write(&console, run.lines.join("\n"))?;
        // The results are on the console even when a row failed (the run then exits 1).
        let json = out.join(format!("guest-run{i}.json"));
        let _ = std::fs::remove_file(&json);
        let reassembled = cmd::run(
            Command::new(bin.join("tlsplice-bench"))
                .args(["from-console", "--log"])
                .arg(&console)
                .arg("--out")
                .arg(&json),
        );
        if reassembled.is_ok() {
            jsons.push(json);
        }
        match run.exit {
            Some(0) => reassembled?,
            Some(code) => failures.push(format!(
                "guest {i}: the benchmark exited with status {code}"
            )),
            None if run.timed_out => {
                failures.push(format!("guest {i}: timed out after {timeout}s"))
            }
            None => failures.push(format!("guest {i}: stopped before the benchmark finished")),
        }
    }
    if !jsons.is_empty() {
        let mut merge = Command::new(bin.join("tlsplice-bench"));
        merge.arg("merge").arg("--out").arg(out.join("guest.json"));
        for j in &jsons {
            merge.arg("--input").arg(j);
        }
        cmd::run(&mut merge)?;
    }
    if !failures.is_empty() {
        bail!("{}", failures.join("; "));
    }
    Ok(())
}

/// Criterion micro-benchmarks: measured in a full run (output kept in target/bench/micro.txt);
/// in a quick run each benchmark runs once, as a test.
fn micro(root: &Path, out: &Path, quick: bool) -> Result<()> {
    let mut c = Command::new("cargo");
    if quick {
        c.args(["test", "-p", "tlsplice-benches", "--bench", "micro"]);
    } else {
        c.args(["bench", "-p", "tlsplice-benches", "--bench", "micro"]);
    }
    let text = cmd::output(c.current_dir(root))?;
    print!("{text}");
    let path: PathBuf = out.join("micro.txt");
    std::fs::write(&path, &text)?;
    Ok(())
}
