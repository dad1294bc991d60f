//! `cargo xtask demo`: the agent doing its job on this kernel, end to end, and a report of what
//! it did. A throwaway CA and certificates (rcgen), sample upstreams, the agent binary with a
//! generated configuration covering terminate, reencrypt and passthrough, real TLS clients
//! through each, then per mode: the data path every connection took and why, the bytes moved,
//! the handshakes and the counters, read from the agent's own `/metrics`.
//!
//! It runs on the host (no kTLS there: terminate and reencrypt in user space, passthrough over
//! the eBPF sockmap when it loads) and in the guest kernels (kTLS). It asserts what it prints,
//! so it is also a test of the whole agent, in the matrix like the others.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use rustls::{ClientConnection, ServerConnection, StreamOwned};
use tlsplice_tests::{
    AgentProcess, Pattern, Tap, TestPki, contains, expected_auto_path, free_port, pattern_samples,
    serve,
};

/// Sessions per mode, and bytes each way per session.
const SESSIONS: usize = 8;
const BYTES: usize = 1 << 20;

/// A plaintext upstream that echoes (the terminate mode's application).
fn plain_echo() -> SocketAddr {
    serve(|sock| {
        let _ = std::io::copy(&mut &sock, &mut &sock);
    })
}

/// A TLS upstream that echoes (reencrypt's and passthrough's application).
fn tls_echo(pki: &Arc<TestPki>) -> SocketAddr {
    let config = pki.server_config();
    serve(move |sock| {
        let Ok(conn) = ServerConnection::new(config.clone()) else {
            return;
        };
        let mut tls = StreamOwned::new(conn, sock);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match tls.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tls.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            }
        }
        tls.conn.send_close_notify();
        let _ = tls.flush();
    })
}

/// One session through `addr`: BYTES up, the same BYTES back, a clean close.
fn session(addr: SocketAddr, pki: &TestPki, seed: u64) -> Result<(), String> {
    let sock = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    sock.set_read_timeout(Some(Duration::from_secs(120)))
        .map_err(|e| e.to_string())?;
    let name = ServerName::try_from("localhost").map_err(|e| e.to_string())?;
    let conn = ClientConnection::new(pki.client_config(), name).map_err(|e| e.to_string())?;
    let mut tls = StreamOwned::new(conn, sock);
    let mut payload = vec![0u8; BYTES];
    Pattern::new(seed).fill(&mut payload);
    // 64 KiB out, the same 64 KiB back, until BYTES each way.
    let mut back = vec![0u8; 64 * 1024];
    for chunk in payload.chunks(64 * 1024) {
        tls.write_all(chunk).map_err(|e| format!("send: {e}"))?;
        tls.read_exact(&mut back[..chunk.len()])
            .map_err(|e| format!("echo: {e}"))?;
        if back[..chunk.len()] != *chunk {
            return Err("the echo differs from what was sent".into());
        }
    }
    tls.conn.send_close_notify();
    tls.flush().map_err(|e| e.to_string())?;
    let mut rest = Vec::new();
    let _ = tls.read_to_end(&mut rest);
    Ok(())
}

/// `/metrics` samples as (family, labels) -> value.
fn samples(text: &str) -> Vec<(String, BTreeMap<String, String>, f64)> {
    text.lines()
        .filter(|l| l.starts_with("tlsplice_"))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let value: f64 = value.parse().ok()?;
            let (family, labels) = match series.split_once('{') {
                Some((f, rest)) => (f, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split("\",")
                .filter_map(|kv| {
                    let (k, v) = kv.split_once("=\"")?;
                    Some((k.to_owned(), v.trim_end_matches('"').to_owned()))
                })
                .collect();
            Some((family.to_owned(), labels, value))
        })
        .collect()
}

fn sum(
    samples: &[(String, BTreeMap<String, String>, f64)],
    family: &str,
    with: &[(&str, &str)],
) -> f64 {
    samples
        .iter()
        .filter(|(f, labels, _)| {
            f == family
                && with
                    .iter()
                    .all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, _, v)| v)
        .sum()
}

/// A live upgrade while a TLS connection streams through the terminate listener: a new agent
/// takes over from `old` (same configuration and flags, plus `--takeover`), the connection moves
/// to it and goes on; returns the new agent.
fn upgrade(
    mut old: AgentProcess,
    dir: &std::path::Path,
    config: &str,
    flags: &[&str],
    web: u16,
    pki: &Arc<TestPki>,
) -> AgentProcess {
    use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
    println!("\ndemo: live upgrade: a new agent takes over while a connection streams");
    let stop = Arc::new(AtomicBool::new(false));
    let echoed = Arc::new(AtomicU64::new(0));
    // The streaming client's port, to find its connection's report.
    let client_port = Arc::new(AtomicU16::new(0));
    let stream = {
        let (stop, echoed, pki) = (stop.clone(), echoed.clone(), pki.clone());
        let client_port = client_port.clone();
        let addr = SocketAddr::from(([127, 0, 0, 1], web));
        std::thread::spawn(move || -> Result<(), String> {
            let sock = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
            sock.set_read_timeout(Some(Duration::from_secs(120)))
                .map_err(|e| e.to_string())?;
            let port = sock.local_addr().map_err(|e| e.to_string())?.port();
            client_port.store(port, Ordering::Relaxed);
            let name = ServerName::try_from("localhost").map_err(|e| e.to_string())?;
            let conn =
                ClientConnection::new(pki.client_config(), name).map_err(|e| e.to_string())?;
            let mut tls = StreamOwned::new(conn, sock);
            let (mut out, mut want) = (Pattern::new(99), Pattern::new(99));
            let (mut chunk, mut back, mut expect) = (
                vec![0u8; 16 * 1024],
                vec![0u8; 16 * 1024],
                vec![0u8; 16 * 1024],
            );
            // 16 KiB out and back every 10 ms: never idle, so it moves while busy.
            while !stop.load(Ordering::Relaxed) {
                out.fill(&mut chunk);
                tls.write_all(&chunk).map_err(|e| format!("send: {e}"))?;
                tls.read_exact(&mut back)
                    .map_err(|e| format!("echo: {e}"))?;
                want.fill(&mut expect);
                if back != expect {
                    return Err("the echo differs from what was sent".into());
                }
                echoed.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(10));
            }
            tls.conn.send_close_notify();
            tls.flush().map_err(|e| e.to_string())?;
            let mut rest = Vec::new();
            let _ = tls.read_to_end(&mut rest);
            Ok(())
        })
    };
    std::thread::sleep(Duration::from_secs(2));
    let before = echoed.load(Ordering::Relaxed);
    let mut new_flags = flags.to_vec();
    let socket = flags[flags.len() - 1];
    new_flags.extend(["--takeover", socket]);
    let new = AgentProcess::start_with_admin(dir, config, old.admin, &new_flags);
    let deadline = Instant::now() + Duration::from_secs(60);
    let moved = loop {
        if let Some(line) = new
            .log_text()
            .lines()
            .find(|l| l.contains("takeover: connections moved"))
        {
            break line.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "the new agent did not take over:\n{}",
            new.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let field = |name: &str| {
        moved
            .split(&format!("{name}="))
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or("?")
            .to_owned()
    };
    let at_upgrade = echoed.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    stream
        .join()
        .expect("streaming thread")
        .unwrap_or_else(|e| panic!("the streaming connection broke: {e}"));
    let total = echoed.load(Ordering::Relaxed);
    let status = old
        .exited_within(Duration::from_secs(60))
        .expect("the old agent exits once it holds nothing");
    assert!(status.success(), "{status}");
    // Its report: in the new agent when it moved, in the old one when it stayed (the
    // user-space path's rustls state cannot move; it finished in the old agent). The last line
    // of its port: an earlier session may have had the same one.
    let moved = field("moved") != "0";
    let deadline = Instant::now() + Duration::from_secs(30);
    let peer = format!("peer=127.0.0.1:{} ", client_port.load(Ordering::Relaxed));
    let closed = loop {
        let log = if moved {
            new.log_text()
        } else {
            old.log_text()
        };
        if let Some(line) = log
            .lines()
            .rev()
            .find(|l| l.contains("connection closed") && l.contains(&peer))
        {
            break line.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no report of the streaming connection"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let path = closed
        .split("data_path=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or("?");
    println!(
        "demo: upgrade: the new agent took the listening sockets and {} connection(s) over in {} ms \
         (moves {} ms; lost {}, left with the old agent to drain {}); the old agent exited {status}",
        field("moved"),
        field("takeover_ms"),
        field("move_ms"),
        field("lost"),
        field("staying"),
    );
    println!(
        "demo: upgrade: the streaming connection ({path} path) echoed {} before the new agent started, {} in all, every byte checked; {}",
        mib(before as f64),
        mib(total as f64),
        if closed.contains("moved from the agent before this one") {
            "it moved to the new agent, not reconnected"
        } else {
            "it stayed with the old agent (the user-space path's TLS state cannot move) and finished there"
        },
    );
    assert!(
        total > at_upgrade,
        "the connection carried data after the upgrade"
    );
    assert!(closed.contains("outcome=ok"), "{closed}");
    // A kTLS connection moves; a user-space one stays.
    assert_eq!(
        closed.contains("moved from the agent before this one"),
        path == "ktls",
        "{closed}"
    );
    new
}

fn mib(bytes: f64) -> String {
    format!("{:.1} MiB", bytes / f64::from(1u32 << 20))
}

#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test) and in cargo xtask demo"]
fn demo() {
    // (Run by `cargo xtask demo`; see the module documentation.)
    let started = Instant::now();
    let pki = Arc::new(TestPki::generate());
    let dir = pki.write_files();
    println!(
        "demo: a throwaway CA and a certificate for \"localhost\" in {}",
        dir.display()
    );
    let (web, backend, edge) = (free_port(), free_port(), free_port());
    let plain = plain_echo();
    let tls = tls_echo(&pki);
    println!("demo: sample upstreams: plaintext echo on {plain}, TLS echo on {tls}");
    let config = format!(
        r#"# generated by cargo xtask demo
[[listener]]
name = "web"
mode = "terminate"
listen = "127.0.0.1:{web}"
upstream = "{plain}"
cert = "{dir}/server.pem"
key = "{dir}/server.key"

[[listener]]
name = "backend"
mode = "reencrypt"
listen = "127.0.0.1:{backend}"
upstream = "{tls}"
cert = "{dir}/server.pem"
key = "{dir}/server.key"
[listener.upstream_tls]
server_name = "localhost"
ca = "{dir}/ca.pem"

[[listener]]
name = "edge"
mode = "passthrough"
listen = "127.0.0.1:{edge}"
[listener.sni]
"localhost" = "{tls}"
"#,
        dir = dir.display()
    );
    println!("demo: the agent's configuration:\n{config}");
    // eBPF when this kernel and these privileges allow it (the agent says why not otherwise),
    // and passthrough on the sockmap path when the programs load here: an agent asked for
    // sockmap without them refuses to start, so ask only when `tlsplice probe` says they load.
    let probe = std::process::Command::new(tlsplice_tests::agent_binary())
        .arg("probe")
        .output()
        .expect("tlsplice probe");
    let probe = String::from_utf8_lossy(&probe.stdout);
    let passthrough = if probe.contains("ebpf: programs load") {
        "sockmap"
    } else {
        "splice"
    };
    let takeover = dir.join("takeover.sock").display().to_string();
    let flags = [
        "--ebpf",
        "auto",
        "--passthrough-path",
        passthrough,
        "--takeover-socket",
        &takeover,
    ];
    let agent = AgentProcess::start(&dir, &config, &[], &flags);
    assert!(
        agent.get("/readyz").0 == 200,
        "agent not ready:\n{}",
        agent.log_text()
    );
    println!("demo: agent ready: {}", agent.get("/readyz").1.trim_end());

    for (mode, port) in [
        ("terminate", web),
        ("reencrypt", backend),
        ("passthrough", edge),
    ] {
        let t = Instant::now();
        let agent_addr = SocketAddr::from(([127, 0, 0, 1], port));
        // The first session's client leg goes through a wire tap.
        let tap = Tap::start(agent_addr);
        let clients: Vec<_> = (0..SESSIONS)
            .map(|i| {
                let pki = pki.clone();
                let addr = if i == 0 { tap.addr } else { agent_addr };
                std::thread::spawn(move || session(addr, &pki, i as u64))
            })
            .collect();
        for c in clients {
            c.join()
                .expect("client thread")
                .unwrap_or_else(|e| panic!("{mode}: {e}"));
        }
        let (up, down) = tap.finish();
        let samples = pattern_samples(0, BYTES);
        let clear = samples
            .iter()
            .any(|p| contains(&up, p) || contains(&down, p));
        assert!(!clear, "{mode}: plaintext on the client's TLS leg");
        println!(
            "demo: {mode}: wire capture of one client leg: {} up, {} down, no plaintext in it (no 32-byte run of what was sent)",
            mib(up.len() as f64),
            mib(down.len() as f64)
        );
        println!(
            "demo: {mode}: {SESSIONS} TLS sessions, {} each way, echoed and checked in {:.1} s",
            mib(BYTES as f64),
            t.elapsed().as_secs_f64()
        );
    }

    // Every connection's report is in the counters once it has ended.
    let deadline = Instant::now() + Duration::from_secs(60);
    let metrics = loop {
        let m = samples(&agent.metrics());
        if sum(&m, "tlsplice_connections_total", &[]) >= (3 * SESSIONS) as f64 {
            break m;
        }
        assert!(Instant::now() < deadline, "connections still open");
        std::thread::sleep(Duration::from_millis(100));
    };
    let log = agent.log_text();
    let ebpf = sum(&metrics, "tlsplice_ebpf_loaded", &[]) == 1.0;
    let (tls_path, _) = expected_auto_path();
    let plain_path = if ebpf { "sockmap" } else { "splice" };

    println!(
        "\n{:<12} {:<9} {:<10} {:>8} {:>11} {:>11} {:>10}  why (from the agent's log)\n\
         (bytes: plaintext for terminate and reencrypt; TLS records, untouched, for passthrough)",
        "mode", "listener", "data path", "conns", "bytes up", "bytes down", "handshakes"
    );
    for (mode, listener, path) in [
        ("terminate", "web", tls_path.to_string()),
        ("reencrypt", "backend", tls_path.to_string()),
        ("passthrough", "edge", plain_path.to_owned()),
    ] {
        let l = ("listener", listener);
        let ok = sum(
            &metrics,
            "tlsplice_connections_total",
            &[l, ("data_path", &path), ("outcome", "ok")],
        );
        let all = sum(&metrics, "tlsplice_connections_total", &[l]);
        let up = sum(
            &metrics,
            "tlsplice_bytes_total",
            &[l, ("data_path", &path), ("direction", "up")],
        );
        let down = sum(
            &metrics,
            "tlsplice_bytes_total",
            &[l, ("data_path", &path), ("direction", "down")],
        );
        let handshakes = sum(
            &metrics,
            "tlsplice_handshakes_total",
            &[l, ("outcome", "ok")],
        ) + sum(
            &metrics,
            "tlsplice_upstream_handshakes_total",
            &[l, ("outcome", "ok")],
        );
        let why = log
            .lines()
            .find(|line| {
                line.contains("connection closed")
                    && line.contains(&format!("listener={listener} "))
            })
            .and_then(|line| {
                let start = line.find("reason=")? + "reason=".len();
                let end = line[start..]
                    .find(" session=")
                    .map_or(line.len(), |e| start + e);
                Some(line[start..end].to_owned())
            })
            .unwrap_or_default();
        // Passthrough never decrypts: its bytes are the client's TLS records, handshake
        // included, and the handshakes are the client's and the upstream's own.
        let handshakes = if mode == "passthrough" {
            "-".to_owned()
        } else {
            format!("{}", handshakes as u64)
        };
        println!(
            "{mode:<12} {listener:<9} {path:<10} {:>8} {:>11} {:>11} {:>10}  {why}",
            format!("{ok}/{all}"),
            mib(up),
            mib(down),
            handshakes
        );
        assert_eq!(
            ok, SESSIONS as f64,
            "{mode}: every connection on {path}, clean"
        );
        assert_eq!(all, SESSIONS as f64, "{mode}: no other connection");
        let sent = (SESSIONS * BYTES) as f64;
        if mode == "passthrough" {
            // Records add 22 bytes per 16 KiB at most, plus the handshake.
            for (d, n) in [("up", up), ("down", down)] {
                assert!(n > sent && n < sent * 1.01 + 65536.0, "{mode}: {d} {n}");
            }
        } else {
            assert_eq!(up, sent, "{mode}: bytes up");
            assert_eq!(down, sent, "{mode}: bytes down");
        }
    }

    println!("\nkernel-side and agent counters (/metrics):");
    let mut shown = 0;
    for (family, labels, value) in &metrics {
        let interesting = matches!(
            family.as_str(),
            "tlsplice_connections_accepted_total"
                | "tlsplice_connections_closed_total"
                | "tlsplice_handshakes_total"
                | "tlsplice_upstream_handshakes_total"
                | "tlsplice_tls_handshake_records_total"
                | "tlsplice_ebpf_loaded"
                | "tlsplice_certificate_expiry_seconds"
        ) || (family == "tlsplice_kernel_tls_stat" && *value > 0.0);
        if interesting {
            let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            if labels.is_empty() {
                println!("  {family} {value}");
            } else {
                println!("  {family}{{{}}} {value}", labels.join(","));
            }
            shown += 1;
        }
    }
    assert!(shown > 0);
    if !ebpf {
        let why = log
            .lines()
            .find(|l| l.contains("eBPF off"))
            .unwrap_or("eBPF off");
        println!("\nnote: {why}");
    }
    let agent = upgrade(agent, &dir, &config, &flags, web, &pki);
    let status = {
        let mut agent = agent;
        agent.terminate().expect("the agent stops on SIGTERM")
    };
    assert!(status.success(), "{status}");
    println!(
        "\ndemo: done in {:.1} s; the agent stopped cleanly on SIGTERM",
        started.elapsed().as_secs_f64()
    );
}
