//! Abuse: a flood from one source held by the per-source limits while another source is
//! served, and slow or silent peers (slowloris, a client that never sends or never reads, an
//! upstream that never answers, never reads or never handshakes) each ended by its timeout
//! with its reason, on every data path this kernel has.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tlsplice::config::{DataPathPolicy, Mode};
use tlsplice::outcome::{ConnectionReport, DataPath, Reason};
use tlsplice_tests::ops::{
    connect_from, connect_tls_from, echo, echo_upstream, finish, terminate_listener, test_dir,
    tls_over, trusting,
};
use tlsplice_tests::{
    Agent, AgentProcess, TestPki, eventually, free_port, listener, metric, serve, tls_data_paths,
};

const GOOD: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 1));
const CHURNER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));
const HOLDER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 3));

/// Whether the agent closed `sock` (a FIN or a reset) within 10 s, without sending a byte.
fn closed_silently(sock: &mut TcpStream) -> bool {
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut buf = [0u8; 64];
    match sock.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
fn per_source_limits_hold_a_flood_from_one_source_while_another_is_served() {
    let dir = test_dir("per-source");
    let pki = TestPki::generate();
    let files = pki.write_files();
    let (web, strict) = (free_port(), free_port());
    let upstream = echo_upstream();
    // Node-wide: 20 new connections a second per source, in bursts of 10; listener "strict"
    // also allows 4 connections per source at once.
    let config = format!(
        "[limits]\nper_source_handshakes_per_second = 20\nper_source_handshake_burst = 10\n\
         {}{}per_source_connections = 4\n",
        terminate_listener("web", web, upstream, &files),
        terminate_listener("strict", strict, upstream, &files),
    );
    let agent = AgentProcess::start(&dir, &config, &[], &["--ebpf", "off"]);
    let web = SocketAddr::from(([127, 0, 0, 1], web));
    let strict = SocketAddr::from(([127, 0, 0, 1], strict));
    let trust = trusting(&[&pki]);
    let hello = pki.client_hello();

    // One source holds its 4 connections (half a ClientHello each); its next 16 are closed
    // before the agent reads a byte, and take none of its rate.
    let limits_since = Instant::now();
    let mut held = Vec::new();
    // Accepted in the order they connected: the listen queue is first in, first out.
    for _ in 0..4 {
        let mut s = connect_from(HOLDER, strict).expect("connect");
        s.write_all(&hello[..20]).expect("part of a ClientHello");
        held.push(s);
    }
    for _ in 0..16 {
        let mut s = connect_from(HOLDER, strict).expect("connect");
        assert!(
            closed_silently(&mut s),
            "a fifth connection from one source"
        );
    }

    // Another source churns connections as fast as it can for 2 s (bounded in count) while a
    // good source opens sessions and echoes: every good one is served.
    let stop = Arc::new(AtomicBool::new(false));
    let churned = Arc::new(AtomicU64::new(0));
    let flood_started = Instant::now();
    let churn = {
        let (stop, churned, hello) = (stop.clone(), churned.clone(), hello.clone());
        std::thread::spawn(move || {
            let started = Instant::now();
            while !stop.load(Ordering::Relaxed) && churned.load(Ordering::Relaxed) < 5_000 {
                if let Ok(mut s) = connect_from(CHURNER, web) {
                    let _ = s.write_all(&hello);
                    churned.fetch_add(1, Ordering::Relaxed);
                }
            }
            started.elapsed()
        })
    };
    // At least 2 s and 5 sessions (an emulated guest is slow), at most 120 s.
    let mut good = 0;
    let mut slowest = Duration::ZERO;
    let (since, until) = (Instant::now(), Instant::now() + Duration::from_secs(120));
    while (good < 5 || since.elapsed() < Duration::from_secs(2)) && Instant::now() < until {
        let session = Instant::now();
        let mut c = connect_tls_from(GOOD, web, trust.clone()).expect("a good source's session");
        echo(&mut c, b"good").expect("echo");
        slowest = slowest.max(session.elapsed());
        finish(c);
        good += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    let churn_time = churn.join().expect("churn thread");
    let churned = churned.load(Ordering::Relaxed);
    println!(
        "good source: {good} sessions, the slowest (handshake and echo) {slowest:?}; \
         churning source: {churned} connections in {churn_time:?}"
    );

    // What the counters say: the holder's 16 by the count; the churner got at most its burst
    // and its rate over the time it churned (and a second of slack), the rest by the rate.
    let count = |listener: &str, reason: &str| {
        metric(
            &agent.metrics(),
            "tlsplice_connections_total",
            &[
                &format!("listener=\"{listener}\""),
                &format!("outcome=\"{reason}\""),
            ],
        )
    };
    // The agent accepts what the listen queue holds after the churner's last connect: its
    // bucket refills until it has taken the last one, so the rate allows what it does over
    // the time until every connection of the churn (and the good ones) has ended and counted.
    let web_ended = || {
        metric(
            &agent.metrics(),
            "tlsplice_connections_total",
            &["listener=\"web\""],
        )
    };
    eventually(
        Duration::from_secs(60),
        "every connection on web counted",
        || web_ended() >= (churned + good) as f64,
    );
    let allowed = 10.0 + 20.0 * (flood_started.elapsed().as_secs_f64() + 1.0);
    let refused = count("web", "source rate limit");
    assert!(
        refused >= churned as f64 - allowed,
        "{refused} of {churned} refused by the rate, which lets {allowed} through"
    );
    assert!(
        churned as f64 > allowed,
        "the churn did not exceed the rate"
    );
    println!(
        "web refused {} by the source rate",
        count("web", "source rate limit")
    );
    assert_eq!(count("strict", "source connection limit"), 16.0);
    assert_eq!(count("web", "source connection limit"), 0.0);
    assert_eq!(count("web", "connection limit"), 0.0);

    // The holder's places come back when its connections end.
    drop(held);
    eventually(
        Duration::from_secs(30),
        "a place again for the holder",
        || {
            connect_tls_from(HOLDER, strict, trust.clone()).is_ok_and(|mut c| {
                let ok = echo(&mut c, b"again").is_ok();
                finish(c);
                ok
            })
        },
    );

    // Thousands of refusals, a log line per limit and listener every 10 s (two pairs: the
    // holder's on strict, the churner's on web): a flood does not flood the log.
    let log = agent.log_text();
    let lines = log.matches("connection refused by a limit").count() as u64;
    let most = 2 * (1 + limits_since.elapsed().as_secs() / 10);
    assert!(
        (2..=most).contains(&lines),
        "{lines} refusal lines (at most {most}):\n{log}"
    );
}

/// What a slow-peer case's upstream does once it has read the client's first line.
fn slow_upstream(mut sock: TcpStream, wrote: Arc<AtomicU64>) {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while !line.ends_with(b"\n") {
        match sock.read(&mut byte) {
            Ok(1) => line.push(byte[0]),
            _ => return,
        }
    }
    let hold = |sock: &mut TcpStream| {
        // Holds the connection, reading nothing, until the agent closes it (or 60 s).
        let _ = sock.set_read_timeout(Some(Duration::from_secs(60)));
        let mut peek = [0u8; 1];
        while let Ok(n) = sock.peek(&mut peek) {
            if n == 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    match line.as_slice() {
        // Writes until the agent stops taking bytes (bounded: 256 MiB).
        b"flood\n" => {
            let chunk = vec![b'f'; 64 * 1024];
            let _ = sock.set_write_timeout(Some(Duration::from_secs(60)));
            while wrote.load(Ordering::Relaxed) < 256 << 20 {
                match sock.write(&chunk) {
                    Ok(n) => wrote.fetch_add(n as u64, Ordering::Relaxed),
                    Err(_) => break,
                };
            }
        }
        // Never answers, never reads again.
        b"mute\n" | b"deaf\n" => hold(&mut sock),
        _ => {}
    }
}

/// A case's client leg, its local address, and the reason its end must have.
struct SlowCase {
    what: &'static str,
    local: SocketAddr,
    reason: Reason,
    client: std::thread::JoinHandle<()>,
}

const TIMEOUT_MS: u64 = 1_500;

/// Starts the client side of one case against `agent`.
fn start_case(
    what: &'static str,
    agent: SocketAddr,
    pki: &TestPki,
    reason: Reason,
    run: impl FnOnce(TcpStream, Arc<rustls::ClientConfig>, Vec<u8>) + Send + 'static,
) -> SlowCase {
    let sock = connect_from(GOOD, agent).expect("connect");
    let local = sock.local_addr().expect("local");
    let (config, hello) = (pki.client_config(), pki.client_hello());
    let client = std::thread::spawn(move || run(sock, config, hello));
    SlowCase {
        what,
        local,
        reason,
        client,
    }
}

/// Reads until the agent closes (an error counts), bounded at 60 s.
fn until_closed(mut r: impl Read) {
    let mut buf = [0u8; 4096];
    let until = Instant::now() + Duration::from_secs(60);
    while Instant::now() < until {
        match r.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
fn slow_and_silent_peers_end_by_their_timeouts_with_their_reason() {
    let test = "slow_and_silent_peers_end_by_their_timeouts_with_their_reason";
    let pki = TestPki::generate();
    let dir = pki.write_files();
    let wrote = Arc::new(AtomicU64::new(0));
    let upstream = {
        let wrote = wrote.clone();
        serve(move |sock| slow_upstream(sock, wrote.clone()))
    };
    for path in tls_data_paths(test) {
        let policy = match path {
            DataPath::Ktls => DataPathPolicy::Ktls,
            _ => DataPathPolicy::Userspace,
        };
        let mut l = listener(Mode::Terminate, &dir, upstream, policy);
        l.handshake_timeout_ms = TIMEOUT_MS;
        l.idle_timeout_ms = TIMEOUT_MS;
        let mut agent = Agent::start(l);
        let started = Instant::now();
        let done = Arc::new(AtomicBool::new(false));
        let cases = vec![
            // Slowloris: a byte of ClientHello every 300 ms; the handshake deadline is whole,
            // not renewed by each byte.
            start_case(
                "slowloris",
                agent.addr,
                &pki,
                Reason::HandshakeTimeout,
                |mut s, _, hello| {
                    for b in hello.iter().take(60) {
                        if s.write_all(&[*b]).is_err() {
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(300));
                    }
                },
            ),
            start_case(
                "handshake, then silence",
                agent.addr,
                &pki,
                Reason::IdleTimeout,
                |s, c, _| {
                    let s = tls_over(s, c).expect("handshake");
                    until_closed(s.sock);
                },
            ),
            start_case(
                "a client that never reads",
                agent.addr,
                &pki,
                Reason::IdleTimeout,
                {
                    let done = done.clone();
                    move |s, c, _| {
                        let mut s = tls_over(s, c).expect("handshake");
                        s.write_all(b"flood\n").expect("request");
                        s.flush().expect("flush");
                        // Reads nothing while the upstream writes, until the agent's report is in.
                        let until = Instant::now() + Duration::from_secs(60);
                        while !done.load(Ordering::Relaxed) && Instant::now() < until {
                            std::thread::sleep(Duration::from_millis(50));
                        }
                    }
                },
            ),
            start_case(
                "an upstream that never answers",
                agent.addr,
                &pki,
                Reason::IdleTimeout,
                |s, c, _| {
                    let mut s = tls_over(s, c).expect("handshake");
                    s.write_all(b"mute\n").expect("request");
                    s.flush().expect("flush");
                    until_closed(s);
                },
            ),
            start_case(
                "an upstream that stops reading",
                agent.addr,
                &pki,
                Reason::IdleTimeout,
                |s, c, _| {
                    let mut s = tls_over(s, c).expect("handshake");
                    s.write_all(b"deaf\n").expect("request");
                    s.sock
                        .set_write_timeout(Some(Duration::from_millis(200)))
                        .expect("write timeout");
                    let chunk = vec![b'd'; 16 * 1024];
                    // Writes until the agent and the upstream stop taking bytes (bounded: 256 MiB).
                    let mut sent = 0usize;
                    while sent < 256 << 20 {
                        if s.write_all(&chunk).is_err() {
                            break;
                        }
                        sent += chunk.len();
                    }
                    until_closed(s.sock);
                },
            ),
        ];
        let mut want: std::collections::BTreeMap<SocketAddr, (&str, Reason)> = cases
            .iter()
            .map(|c| (c.local, (c.what, c.reason)))
            .collect();
        let mut reports: Vec<ConnectionReport> = Vec::new();
        while !want.is_empty() {
            let report = agent.next_report();
            let Some((what, reason)) = want.remove(&report.peer) else {
                continue;
            };
            assert_eq!(report.outcome, reason, "{what} on {path:?}: {report:?}");
            if reason == Reason::IdleTimeout {
                assert_eq!(report.data_path, Some(path), "{what}: {report:?}");
            }
            reports.push(report);
        }
        done.store(true, Ordering::Relaxed);
        for c in cases {
            c.client.join().expect("case client");
        }
        // Each ended by its deadline (1.5 s), not by the 60 s the clients would wait.
        let took = started.elapsed();
        assert!(took < Duration::from_secs(45), "{path:?}: {took:?}");
        let flood = wrote.swap(0, Ordering::Relaxed);
        println!(
            "{path:?}: 5 slow peers ended in {took:?}; the upstream got {flood} bytes out to a client that never read"
        );
        // Bounded buffering: what the kernel's socket buffers and one relay buffer hold, far
        // below the 256 MiB the upstream would write.
        assert!(
            flood < 64 << 20,
            "{path:?}: {flood} bytes taken from the upstream"
        );
    }
}

#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
fn an_upstream_that_never_handshakes_ends_by_the_handshake_timeout() {
    let pki = TestPki::generate();
    let dir = pki.write_files();
    // Accepts, then holds the connection without a byte.
    let upstream = serve(|mut sock| {
        let _ = sock.set_read_timeout(Some(Duration::from_secs(60)));
        let mut buf = [0u8; 4096];
        while let Ok(n) = sock.read(&mut buf) {
            if n == 0 {
                break;
            }
        }
    });
    let mut l = listener(Mode::Reencrypt, &dir, upstream, DataPathPolicy::Auto);
    l.handshake_timeout_ms = TIMEOUT_MS;
    let mut agent = Agent::start(l);
    let started = Instant::now();
    let sock = connect_from(GOOD, agent.addr).expect("connect");
    let local = sock.local_addr().expect("local");
    let client = {
        let config = pki.client_config();
        std::thread::spawn(move || {
            let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
            let conn = rustls::ClientConnection::new(config, name).expect("client");
            let mut s = rustls::StreamOwned::new(conn, sock);
            // The client's handshake may finish before the upstream's fails; either way the
            // agent ends the session.
            let _ = s.write_all(b"hello\n");
            until_closed(s);
        })
    };
    let report = agent.next_report();
    client.join().expect("client");
    assert_eq!(report.peer, local);
    assert_eq!(
        report.outcome,
        Reason::UpstreamHandshakeTimeout,
        "{report:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
}

#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
fn handshakes_waiting_for_a_place_are_served_by_source_in_turn() {
    let dir = test_dir("fair-queue");
    let pki = TestPki::generate();
    let files = pki.write_files();
    let port = free_port();
    // Two handshakes at once, node-wide; sixteen may wait, up to their 20 s deadline.
    let config = format!(
        "[limits]\nmax_handshakes = 2\nhandshake_queue = 16\n{}",
        terminate_listener("web", port, echo_upstream(), &files).replace(
            "handshake_timeout_ms = 5000",
            "handshake_timeout_ms = 20000"
        ),
    );
    let agent = AgentProcess::start(&dir, &config, &[], &["--ebpf", "off"]);
    let web = SocketAddr::from(([127, 0, 0, 1], port));
    let hello = pki.client_hello();
    let stall = || {
        let mut s = connect_from(CHURNER, web).expect("connect");
        s.write_all(&hello[..20]).expect("part of a ClientHello");
        s
    };
    // One source takes both places with handshakes that never finish, and queues six more.
    let holding: Vec<TcpStream> = (0..2).map(|_| stall()).collect();
    std::thread::sleep(Duration::from_millis(500));
    let queued: Vec<TcpStream> = (0..6).map(|_| stall()).collect();
    std::thread::sleep(Duration::from_millis(500));
    // Another source's handshake queues behind them.
    let trust = trusting(&[&pki]);
    let good = std::thread::spawn(move || {
        let started = Instant::now();
        let mut c = connect_tls_from(GOOD, web, trust)?;
        echo(&mut c, b"served").map_err(|e| e.to_string())?;
        finish(c);
        Ok::<Duration, String>(started.elapsed())
    });
    std::thread::sleep(Duration::from_millis(500));
    // Two places come back: the first goes to the stalling source's turn, the second to the
    // other source, not after the stalling source's whole queue (which would hold it past its
    // deadline: each of those holds its place for 20 s).
    drop(holding);
    let waited = good
        .join()
        .expect("good client")
        .expect("the other source's handshake served in its turn");
    println!("the other source's handshake took {waited:?} behind a queue of 6 stalled ones");
    drop(queued);
    let m = agent.metrics();
    assert_eq!(
        metric(
            &m,
            "tlsplice_connections_total",
            &["outcome=\"handshake limit\""]
        ),
        0.0,
        "{m}"
    );
}
