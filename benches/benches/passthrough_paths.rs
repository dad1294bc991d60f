//! Passthrough data paths compared on the running kernel: splice (pipe per direction, driven
//! by the agent), sockmap (sock hash + stream verdict, the kernel redirects) and user space
//! (a copy loop). For each: throughput and CPU seconds per GiB moving 1 GiB one way, and
//! p50/p99 round-trip latency of 1 KiB request/response on one connection, with a direct
//! connection (no agent) as the latency floor.
//!
//! CPU is reported two ways: the agent process, and the whole node (every CPU: the agent, this
//! benchmark's client and upstream, and the kernel workers that carry sockmap redirects, which
//! no process is charged for). Only the node figure compares paths fairly: on loopback much of
//! the relay's kernel work runs in the sending process's context.
//!
//! Needs root, a bpf filesystem at /sys/fs/bpf and the agent (`cargo xtask bench` provides
//! them). Numbers come from loopback on one machine: compare paths within one run only.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tlsplice_benches::{node_busy_seconds, percentile, process_cpu_seconds};
use tlsplice_tests::{TestPki, free_port, serve};

const GIB: u64 = 1 << 30;
const RUNS: usize = 3;
const EXCHANGES: usize = 10_000;
const MESSAGE: usize = 1024;

/// Upstream: drains each connection to EOF (throughput) or echoes 1 KiB messages after the
/// ClientHello (latency), depending on the first byte after the hello: 0 drain, 1 echo.
fn upstream(hello_len: usize) -> SocketAddr {
    serve(move |mut sock| {
        let mut head = vec![0u8; hello_len + 1];
        if sock.read_exact(&mut head).is_err() {
            return;
        }
        let mut buf = vec![0u8; 1 << 20];
        if head[hello_len] == 0 {
            while matches!(sock.read(&mut buf), Ok(n) if n > 0) {}
        } else {
            let _ = sock.set_nodelay(true);
            let msg = &mut buf[..MESSAGE];
            while sock.read_exact(msg).is_ok() {
                if sock.write_all(msg).is_err() {
                    break;
                }
            }
        }
        let _ = sock.shutdown(Shutdown::Write);
    })
}

struct Agent {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Agent {
    fn drop(&mut self) {
        // SIGTERM, so the agent removes its pins; kill only if it does not stop.
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_agent(path: &str, upstream: SocketAddr, dir: &std::path::Path) -> Agent {
    let port = free_port();
    let data_path = if path == "userspace" {
        "userspace"
    } else {
        "auto"
    };
    let config = dir.join(format!("{path}.toml"));
    std::fs::write(
        &config,
        format!(
            "[[listener]]\nname = \"bench\"\nmode = \"passthrough\"\nlisten = \"127.0.0.1:{port}\"\n\
             upstream = \"{upstream}\"\ndata_path = \"{data_path}\"\n"
        ),
    )
    .expect("config");
    let bin =
        std::env::var_os("TLSPLICE_AGENT_BIN").unwrap_or_else(|| "target/release/tlsplice".into());
    let passthrough = if path == "sockmap" {
        "sockmap"
    } else {
        "splice"
    };
    let ebpf = if path == "sockmap" {
        "required"
    } else {
        "auto"
    };
    let log = std::fs::File::create(dir.join(format!("{path}.log"))).expect("log");
    let child = Command::new(&bin)
        .args(["run", "--config"])
        .arg(&config)
        .args(["--passthrough-path", passthrough, "--ebpf", ebpf])
        .args(["--admin-addr", &format!("127.0.0.1:{}", free_port())])
        .args([
            "--bpf-pin-path",
            &format!("/sys/fs/bpf/tlsplice-bench-{}", std::process::id()),
        ])
        .env("TLSPLICE_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {bin:?}: {e}"));
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(addr).is_err() {
        assert!(
            Instant::now() < deadline,
            "agent did not start: see {}",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Agent { child, addr }
}

/// Moves 1 GiB one way through `addr`; returns (seconds, agent CPU s, node CPU s).
fn throughput(addr: SocketAddr, hello: &[u8], agent_pid: Option<u32>) -> (f64, f64, f64) {
    let agent_cpu = || agent_pid.map_or(0.0, process_cpu_seconds);
    let (a0, n0) = (agent_cpu(), node_busy_seconds());
    let start = Instant::now();
    let mut sock = TcpStream::connect(addr).expect("connect");
    let mut head = hello.to_vec();
    head.push(0);
    sock.write_all(&head).expect("hello");
    let chunk = vec![0x5au8; 1 << 20];
    let mut sent = 0u64;
    while sent < GIB {
        sock.write_all(&chunk).expect("send");
        sent += chunk.len() as u64;
    }
    sock.shutdown(Shutdown::Write).expect("FIN");
    let mut rest = Vec::new();
    sock.read_to_end(&mut rest)
        .expect("EOF from the upstream side");
    let secs = start.elapsed().as_secs_f64();
    // Let the agent finish its bookkeeping for the connection before reading its CPU.
    std::thread::sleep(Duration::from_millis(200));
    (secs, agent_cpu() - a0, node_busy_seconds() - n0)
}

/// p50 and p99 round trips of 1 KiB messages, in microseconds.
fn latency(addr: SocketAddr, hello: &[u8]) -> (f64, f64) {
    let mut sock = TcpStream::connect(addr).expect("connect");
    sock.set_nodelay(true).expect("nodelay");
    let mut head = hello.to_vec();
    head.push(1);
    sock.write_all(&head).expect("hello");
    let mut msg = vec![7u8; MESSAGE];
    let mut samples = Vec::with_capacity(EXCHANGES);
    for _ in 0..EXCHANGES {
        let t = Instant::now();
        sock.write_all(&msg).expect("request");
        sock.read_exact(&mut msg).expect("response");
        samples.push(t.elapsed().as_secs_f64() * 1e6);
    }
    samples.sort_by(f64::total_cmp);
    (percentile(&samples, 0.5), percentile(&samples, 0.99))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    percentile(&v, 0.5)
}

fn main() {
    // `cargo bench` passes filter arguments; this harness runs everything.
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!("passthrough data paths on kernel {}", kernel.trim());
    println!("{RUNS} runs of 1 GiB one way (median), {EXCHANGES} x {MESSAGE} B request/response");
    let dir = std::env::temp_dir().join(format!("tlsplice-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("bench dir");
    let hello = TestPki::generate().client_hello();
    let up = upstream(hello.len());

    let (p50, p99) = latency(up, &hello);
    println!(
        "\n{:10} {:>9} {:>15} {:>15} {:>9} {:>9}",
        "path", "MiB/s", "agent CPU", "node CPU", "p50 us", "p99 us"
    );
    println!(
        "{:10} {:>9} {:>15} {:>15} {:>9.1} {:>9.1}",
        "direct", "-", "-", "-", p50, p99
    );
    for path in ["splice", "sockmap", "userspace"] {
        let agent = start_agent(path, up, &dir);
        let pid = agent.child.id();
        let mut rates = Vec::new();
        let (mut agent_cpu, mut node_cpu) = (Vec::new(), Vec::new());
        for _ in 0..RUNS {
            let (secs, a, n) = throughput(agent.addr, &hello, Some(pid));
            rates.push(1024.0 / secs);
            agent_cpu.push(a);
            node_cpu.push(n);
        }
        let (p50, p99) = latency(agent.addr, &hello);
        println!(
            "{:10} {:>9.0} {:>9.2} s/GiB {:>9.2} s/GiB {:>9.1} {:>9.1}",
            path,
            median(rates),
            median(agent_cpu),
            median(node_cpu),
            p50,
            p99
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
