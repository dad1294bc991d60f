//! terminate mode end to end: a TLS client (our rustls client, or openssl s_client) talks to
//! the agent, which forwards plaintext to a TCP upstream.
//!
//! Runs on every kernel of the matrix. Where the kernel has kTLS, connections must take the
//! ktls data path (keys in the kernel, bytes spliced); on the host they must take the userspace
//! path and say that the kernel has no kTLS. A listener forced to userspace must say so.
//! The bulk tests capture both legs and check that plaintext samples appear on the upstream leg
//! and never on the client's TLS leg.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::thread;
use std::time::Duration;

use rustls::{ClientConnection, StreamOwned};
use tlsplice::config::{DataPathPolicy, Mode};
use tlsplice::outcome::{ConnectionReport, DataPath, Reason};
use tlsplice_tests::{
    Agent, Tap, TestPki, contains, expect_pattern, expected_auto_path, listener, pattern_samples,
    s_client, send_pattern, tls_client, tool_or_skip,
};

/// Bytes each way in the bulk test.
const BULK: usize = 16 << 20;

/// An upstream that reads `len` bytes of pattern 1, answers with `len` bytes of pattern 2, then
/// waits for the agent to close its write side.
fn bulk_upstream(len: usize) -> (SocketAddr, thread::JoinHandle<Result<(), String>>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind upstream");
    let addr = listener.local_addr().expect("upstream addr");
    let handle = thread::spawn(move || {
        let (mut s, _) = listener.accept().map_err(|e| e.to_string())?;
        expect_pattern(&mut s, 1, len).map_err(|e| format!("upstream receiving: {e}"))?;
        send_pattern(&mut s, 2, len).map_err(|e| format!("upstream sending: {e}"))?;
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).map_err(|e| e.to_string())?;
        if rest.is_empty() {
            Ok(())
        } else {
            Err(format!("{} unexpected bytes after the request", rest.len()))
        }
    });
    (addr, handle)
}

fn bulk_through_agent(data_path: DataPathPolicy) -> ConnectionReport {
    let pki = TestPki::generate();
    let dir = pki.write_files();
    let (upstream, upstream_done) = bulk_upstream(BULK);
    // Wire captures of both legs: client -> [tls_leg] -> agent -> [plain_leg] -> upstream.
    let plain_leg = Tap::start(upstream);
    let mut agent = Agent::start(listener(Mode::Terminate, &dir, plain_leg.addr, data_path));
    let tls_leg = Tap::start(agent.addr);
    let mut tls = tls_client(tls_leg.addr, pki.client_config());
    if let Err(e) = send_pattern(&mut tls, 1, BULK).and_then(|()| expect_pattern(&mut tls, 2, BULK))
    {
        panic!("client: {e}; agent: {:?}", agent.next_report());
    }
    tls.conn.send_close_notify();
    tls.flush().expect("flush close_notify");
    let mut tail = Vec::new();
    // The agent answers our close_notify with its own once the upstream has closed: a clean
    // end of stream, not a truncation error.
    tls.read_to_end(&mut tail)
        .expect("clean close_notify from the agent");
    assert!(tail.is_empty());
    // Closing our end lets the capture of the TLS leg finish.
    drop(tls);
    upstream_done
        .join()
        .expect("upstream thread")
        .expect("upstream saw the right bytes");
    let report = agent.next_report();
    assert_eq!(report.error, None, "{report:?}");
    assert_eq!(report.bytes_up, BULK as u64, "{report:?}");
    assert_eq!(report.bytes_down, BULK as u64, "{report:?}");
    let (tls_up, tls_down) = tls_leg.finish();
    let (plain_up, plain_down) = plain_leg.finish();
    assert!(
        tls_up.len() > BULK && tls_down.len() > BULK,
        "TLS leg carried too little"
    );
    for (seed, tls, plain) in [(1, &tls_up, &plain_up), (2, &tls_down, &plain_down)] {
        for sample in pattern_samples(seed, BULK) {
            // The plaintext leg proves the samples are findable; the TLS leg must not have them.
            assert!(
                contains(plain, &sample),
                "capture check is blind: sample not on plain leg"
            );
            assert!(
                !contains(tls, &sample),
                "plaintext on the TLS leg ({:?})",
                report.data_path
            );
        }
    }
    let _ = std::fs::remove_dir_all(dir);
    report
}

#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
fn bulk_takes_the_best_data_path() {
    let report = bulk_through_agent(DataPathPolicy::Auto);
    let (path, reason) = expected_auto_path();
    assert_eq!(report.data_path, Some(path), "{report:?}");
    if let Some(reason) = reason {
        assert!(report.path_reason.contains(&reason), "{report:?}");
    }
    println!(
        "terminate: {} MiB each way byte-identical over {} ({}; {})",
        BULK >> 20,
        path,
        report.path_reason,
        report.session
    );
}

#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
fn forced_userspace_says_so() {
    let report = bulk_through_agent(DataPathPolicy::Userspace);
    assert_eq!(report.data_path, Some(DataPath::Userspace), "{report:?}");
    assert_eq!(report.path_reason, "listener data_path = userspace");
    println!(
        "terminate: forced userspace: {} MiB each way byte-identical",
        BULK >> 20
    );
}

#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
fn openssl_s_client_request_response() {
    let Some(openssl) = tool_or_skip("terminate openssl_s_client", "openssl") else {
        return;
    };
    let pki = TestPki::generate();
    let dir = pki.write_files();
    let upstream_listener = TcpListener::bind("127.0.0.1:0").expect("bind upstream");
    let upstream = upstream_listener.local_addr().expect("addr");
    let upstream_done = thread::spawn(move || -> Result<String, String> {
        let (s, _) = upstream_listener.accept().map_err(|e| e.to_string())?;
        let mut line = String::new();
        BufReader::new(&s)
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        (&s).write_all(format!("pong {line}").as_bytes())
            .map_err(|e| e.to_string())?;
        Ok(line)
    });
    let mut agent = Agent::start(listener(
        Mode::Terminate,
        &dir,
        upstream,
        DataPathPolicy::Auto,
    ));
    let mut child = s_client(&openssl, agent.addr, &dir, &["-quiet".as_ref()]);
    let mut stdin = child.stdin.take().expect("stdin");
    stdin
        .write_all(b"ping-marker\n")
        .expect("write to s_client");
    // s_client exits when the agent closes the TLS session (the upstream closed after replying).
    let out = child.wait_with_output().expect("s_client output");
    drop(stdin);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("pong ping-marker"),
        "s_client got {stdout:?}; stderr {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        upstream_done.join().expect("upstream").expect("upstream"),
        "ping-marker\n"
    );
    let report = agent.next_report();
    let (path, _) = expected_auto_path();
    assert_eq!(report.data_path, Some(path), "{report:?}");
    assert_eq!(report.bytes_up, 12, "{report:?}");
    assert_eq!(report.bytes_down, 17, "{report:?}");
    println!(
        "terminate: openssl s_client round trip over {path} ({})",
        report.session
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
fn plaintext_client_is_refused_cleanly() {
    let pki = TestPki::generate();
    let dir = pki.write_files();
    let never = TcpListener::bind("127.0.0.1:0").expect("bind upstream");
    let mut agent = Agent::start(listener(
        Mode::Terminate,
        &dir,
        never.local_addr().expect("addr"),
        DataPathPolicy::Auto,
    ));
    let mut sock = TcpStream::connect(agent.addr).expect("connect");
    sock.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write");
    let mut answer = Vec::new();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    sock.read_to_end(&mut answer)
        .expect("the agent closes the connection");
    // Whatever came back is at most a TLS alert record (type 21), never plaintext.
    assert!(answer.is_empty() || answer[0] == 21, "{answer:?}");
    let report = agent.next_report();
    assert_eq!(report.data_path, None, "{report:?}");
    assert_eq!(report.outcome, Reason::HandshakeFailed, "{report:?}");
    assert!(report.error.is_some());
    never.set_nonblocking(true).expect("nonblocking");
    assert!(
        never.accept().is_err(),
        "the upstream must never be contacted"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// An upstream that echoes every connection until it ends, each on its own thread.
fn echo_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind echo");
    let addr = listener.local_addr().expect("addr");
    thread::spawn(move || {
        for sock in listener.incoming() {
            let Ok(mut sock) = sock else { return };
            thread::spawn(move || {
                let mut buf = [0u8; 16 * 1024];
                loop {
                    match sock.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if sock.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    addr
}

/// `count` request/response exchanges of 64 bytes each on one session, then a clean close.
fn small_exchanges(tls: &mut StreamOwned<ClientConnection, TcpStream>, count: usize) {
    let mut answer = [0u8; 64];
    for i in 0..count {
        let request = [(i % 251) as u8; 64];
        tls.write_all(&request).expect("request");
        tls.read_exact(&mut answer).expect("response");
        assert_eq!(answer, request, "exchange {i}");
    }
    tls.conn.send_close_notify();
    tls.flush().expect("flush");
    let mut rest = Vec::new();
    tls.read_to_end(&mut rest).expect("clean close");
    assert!(rest.is_empty());
}

#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
fn ten_thousand_small_exchanges() {
    let pki = TestPki::generate();
    let dir = pki.write_files();
    let mut agent = Agent::start(listener(
        Mode::Terminate,
        &dir,
        echo_upstream(),
        DataPathPolicy::Auto,
    ));
    let mut tls = tls_client(agent.addr, pki.client_config());
    small_exchanges(&mut tls, 10_000);
    let report = agent.next_report();
    let (path, _) = expected_auto_path();
    assert_eq!(report.data_path, Some(path), "{report:?}");
    assert_eq!(report.error, None, "{report:?}");
    assert_eq!((report.bytes_up, report.bytes_down), (640_000, 640_000));
    println!("terminate: 10000 request/response exchanges over {path}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
fn curl_gets_through() {
    let Some(curl) = tool_or_skip("terminate curl", "curl") else {
        return;
    };
    let pki = TestPki::generate();
    let dir = pki.write_files();
    let http = TcpListener::bind("127.0.0.1:0").expect("bind http");
    let upstream = http.local_addr().expect("addr");
    let served = thread::spawn(move || -> String {
        let (mut s, _) = http.accept().expect("accept");
        let mut request = Vec::new();
        let mut byte = [0u8; 1];
        while !request.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut byte).expect("request");
            request.push(byte[0]);
        }
        s.write_all(
            b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\nConnection: close\r\n\r\nhello-through",
        )
        .expect("response");
        String::from_utf8_lossy(&request).into_owned()
    });
    let mut agent = Agent::start(listener(
        Mode::Terminate,
        &dir,
        upstream,
        DataPathPolicy::Auto,
    ));
    let port = agent.addr.port();
    let out = Command::new(curl)
        .args(["-sS", "--max-time", "60", "--cacert"])
        .arg(dir.join("ca.pem"))
        .arg("--resolve")
        .arg(format!("localhost:{port}:127.0.0.1"))
        .arg(format!("https://localhost:{port}/probe"))
        .output()
        .expect("run curl");
    assert!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello-through");
    assert!(
        served
            .join()
            .expect("http thread")
            .starts_with("GET /probe HTTP/1.1\r\n")
    );
    let report = agent.next_report();
    let (path, _) = expected_auto_path();
    assert_eq!(report.data_path, Some(path), "{report:?}");
    println!("terminate: curl GET over {path} ({})", report.session);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
fn refused_upstream_and_silent_client_close_cleanly() {
    let pki = TestPki::generate();
    let dir = pki.write_files();
    // A port nobody listens on.
    let closed = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port");
    let mut config = listener(Mode::Terminate, &dir, closed, DataPathPolicy::Auto);
    config.handshake_timeout_ms = 1_000;
    let mut agent = Agent::start(config);

    let mut tls = tls_client(agent.addr, pki.client_config());
    tls.write_all(b"hello").expect("handshake and send");
    let mut rest = Vec::new();
    tls.read_to_end(&mut rest)
        .expect("close_notify, not a reset, when the upstream refuses");
    assert!(rest.is_empty());
    let report = agent.next_report();
    assert_eq!(report.outcome, Reason::UpstreamUnreachable, "{report:?}");
    assert!(
        report
            .error
            .as_deref()
            .is_some_and(|e| e.contains("refused")),
        "{report:?}"
    );

    let mut silent = TcpStream::connect(agent.addr).expect("connect");
    silent
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut rest = Vec::new();
    silent
        .read_to_end(&mut rest)
        .expect("closed after the handshake timeout");
    let report = agent.next_report();
    assert_eq!(report.outcome, Reason::HandshakeTimeout, "{report:?}");
    let _ = std::fs::remove_dir_all(dir);
}

/// This process's open descriptors: pipes (the agent's pipe pool), and the rest.
fn open_fds_by_kind() -> (usize, usize) {
    let fds: Vec<_> = std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .flatten()
        .collect();
    let pipes = fds
        .iter()
        .filter(|f| {
            std::fs::read_link(f.path())
                .is_ok_and(|target| target.to_string_lossy().starts_with("pipe:"))
        })
        .count();
    (pipes, fds.len() - pipes)
}

#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
fn no_descriptors_leak() {
    let pki = TestPki::generate();
    let dir = pki.write_files();
    let echo = echo_upstream();
    let mut agent = Agent::start(listener(Mode::Terminate, &dir, echo, DataPathPolicy::Auto));
    // Warm up once so lazily created runtime resources are in the baseline.
    small_exchanges(&mut tls_client(agent.addr, pki.client_config()), 1);
    agent.next_report();
    thread::sleep(Duration::from_millis(200));
    // Pipes are the pool's: it keeps the ones given back empty and closes one a reset left
    // bytes in, so their number may go down; one connection at a time lends at most two.
    let (pipes_before, baseline) = open_fds_by_kind();
    for round in 0..20 {
        small_exchanges(&mut tls_client(agent.addr, pki.client_config()), 10);
        assert_eq!(agent.next_report().error, None, "round {round}");
        let mut plain = TcpStream::connect(agent.addr).expect("connect");
        plain.write_all(b"not tls at all\r\n\r\n").expect("write");
        let mut rest = Vec::new();
        let _ = plain.read_to_end(&mut rest);
        drop(plain);
        assert_eq!(agent.next_report().outcome, Reason::HandshakeFailed);
        // A client that resets mid-transfer (SO_LINGER 0, then close: RST with data in flight).
        let mut tls = tls_client(agent.addr, pki.client_config());
        tls.write_all(&[7u8; 64 * 1024]).expect("write");
        let mut some = [0u8; 1024];
        tls.read_exact(&mut some).expect("first echoed bytes");
        socket2::SockRef::from(&tls.sock)
            .set_linger(Some(Duration::ZERO))
            .expect("SO_LINGER 0");
        drop(tls);
        let report = agent.next_report();
        assert!(
            report.outcome == Reason::PeerReset
                && report.error.as_deref().is_some_and(|e| e.contains("reset")),
            "a reset mid-transfer is reported: {report:?}"
        );
    }
    // Echo threads close their sockets when they see EOF: give them a moment.
    let (mut pipes, mut now) = open_fds_by_kind();
    for _ in 0..50 {
        if now <= baseline {
            break;
        }
        thread::sleep(Duration::from_millis(100));
        (pipes, now) = open_fds_by_kind();
    }
    assert_eq!(
        now, baseline,
        "sockets or other descriptors leaked over 60 connections"
    );
    assert!(
        pipes <= 4,
        "{pipes} pipe descriptors left after 60 connections"
    );
    println!(
        "terminate: 60 connections (good, not TLS, reset mid-transfer), open descriptors back \
         to {baseline}, and {pipes} pipe ends ({pipes_before} before)"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
fn unix_socket_upstream_with_proxy_header() {
    let pki = TestPki::generate();
    let dir = pki.write_files();
    let path = dir.join("upstream.sock");
    let l = std::os::unix::net::UnixListener::bind(&path).expect("bind unix upstream");
    const LEN: usize = 4 << 20;
    let upstream_done = thread::spawn(move || -> Result<String, String> {
        let (mut s, _) = l.accept().map_err(|e| e.to_string())?;
        // The PROXY v1 line, byte by byte so nothing after it is consumed.
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while !line.ends_with(b"\r\n") {
            s.read_exact(&mut byte).map_err(|e| e.to_string())?;
            line.push(byte[0]);
        }
        expect_pattern(&mut s, 1, LEN).map_err(|e| format!("upstream receiving: {e}"))?;
        send_pattern(&mut s, 2, LEN).map_err(|e| format!("upstream sending: {e}"))?;
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).map_err(|e| e.to_string())?;
        String::from_utf8(line).map_err(|e| e.to_string())
    });
    // Any TCP address stands in for `upstream` in the helper; the unix path replaces it.
    let mut cfg = listener(
        Mode::Terminate,
        &dir,
        "127.0.0.1:1".parse().expect("addr"),
        DataPathPolicy::Auto,
    );
    cfg.upstream = None;
    cfg.upstream_unix = Some(path.clone());
    cfg.proxy_protocol = Some(tlsplice::config::ProxyProtocol::V1);
    let mut agent = Agent::start(cfg);
    let mut tls = tls_client(agent.addr, pki.client_config());
    send_pattern(&mut tls, 1, LEN).expect("client sending");
    expect_pattern(&mut tls, 2, LEN).expect("client receiving");
    let client_port = tls.sock.local_addr().expect("addr").port();
    tls.conn.send_close_notify();
    tls.flush().expect("flush");
    let mut rest = Vec::new();
    tls.read_to_end(&mut rest).expect("clean close");
    let header = upstream_done.join().expect("upstream").expect("upstream");
    assert_eq!(
        header,
        format!(
            "PROXY TCP4 127.0.0.1 127.0.0.1 {client_port} {}\r\n",
            agent.addr.port()
        )
    );
    let report = agent.next_report();
    let (path_taken, _) = expected_auto_path();
    assert_eq!(report.error, None, "{report:?}");
    assert_eq!(report.data_path, Some(path_taken), "{report:?}");
    assert_eq!(report.bytes_up, LEN as u64, "{report:?}");
    assert_eq!(report.bytes_down, LEN as u64, "{report:?}");
    println!(
        "terminate: unix socket upstream, {} MiB each way over {path_taken}",
        LEN >> 20
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
fn silent_upstream_times_out_cleanly() {
    let pki = TestPki::generate();
    let dir = pki.write_files();
    // An upstream whose accept queue is full: the kernel drops further SYNs, so a connect
    // neither succeeds nor fails until the agent's deadline.
    let full =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    full.bind(&"127.0.0.1:0".parse::<SocketAddr>().expect("addr").into())
        .expect("bind");
    full.listen(0).expect("listen");
    let addr = full.local_addr().expect("addr").as_socket().expect("inet");
    let _queued: Vec<TcpStream> = (0..2)
        .filter_map(|_| TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok())
        .collect();
    let mut cfg = listener(Mode::Terminate, &dir, addr, DataPathPolicy::Auto);
    cfg.connect_timeout_ms = 1_000;
    let mut agent = Agent::start(cfg);
    let mut tls = tls_client(agent.addr, pki.client_config());
    tls.write_all(b"hello").expect("handshake and send");
    let mut rest = Vec::new();
    tls.read_to_end(&mut rest)
        .expect("close_notify from the agent after the connect deadline");
    assert!(rest.is_empty());
    let report = agent.next_report();
    assert_eq!(report.outcome, Reason::UpstreamConnectTimeout, "{report:?}");
    assert!(
        report
            .error
            .as_deref()
            .is_some_and(|e| e.contains("no answer within 1000 ms")),
        "{report:?}"
    );
    let _ = std::fs::remove_dir_all(dir);
}
