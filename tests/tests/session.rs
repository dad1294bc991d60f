//! A session's life after the handshake under kTLS: a peer's TLS 1.3 KeyUpdate (rustls and
//! openssl s_client as the peer), the agent's own rekey before the confidentiality limit, and
//! session tickets from a TLS upstream kept for resumption.
//!
//! What must happen depends on the kernel, and each test says which case it checked:
//! - kTLS with rekey (6.14 and later): keys change in the kernel and data keeps flowing;
//! - kTLS without rekey (6.1, 6.12): the connection ends with an alert and a clear error,
//!   never with data decrypted under a stale key, never a hang;
//! - no kTLS (the host): rustls in user space does all of it itself.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use rustls::{ClientConfig, ClientConnection, HandshakeKind, ServerConnection, StreamOwned};
use tlsplice::config::{DataPathPolicy, Mode};
use tlsplice::outcome::{ConnectionReport, DataPath, Reason};
use tlsplice_tests::{
    Agent, Pattern, SuiteUnderTest, TestPki, expect_pattern, expected_auto_path, listener,
    s_client, send_pattern, tls_client, tool_or_skip,
};

/// Bytes each way.
const LEN: usize = 4 << 20;

/// What this kernel must do with a key change on a kTLS leg.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// No kTLS here: rustls in user space.
    Userspace,
    /// kTLS and rekey: keys change in the kernel.
    Rekey,
    /// kTLS without rekey: the connection ends cleanly with a reason.
    Close,
}

fn expect() -> Expect {
    match expected_auto_path().0 {
        DataPath::Ktls => match tlsplice::probe::ktls_rekey_supported() {
            Ok(()) => Expect::Rekey,
            Err(e) => {
                let release = tlsplice::probe::kernel_release();
                let version = tlsplice::probe::parse_release(&release);
                assert!(
                    std::env::var_os(tlsplice_tests::REQUIRE_ENV).is_none()
                        || version.is_some_and(|v| v < (6, 14)),
                    "kernel {release} should rekey kTLS: {e}"
                );
                Expect::Close
            }
        },
        _ => Expect::Userspace,
    }
}

fn tls_stat(name: &str) -> u64 {
    tlsplice::ktls::TlsStat::read()
        .ok()
        .flatten()
        .map_or(0, |s| s.get(name))
}

/// A plaintext upstream: reads `up` bytes of pattern 1, answers with `down` bytes of pattern 2.
fn bulk_upstream(up: usize, down: usize) -> (SocketAddr, thread::JoinHandle<Result<(), String>>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind upstream");
    let addr = l.local_addr().expect("addr");
    let handle = thread::spawn(move || {
        let (mut s, _) = l.accept().map_err(|e| e.to_string())?;
        expect_pattern(&mut s, 1, up).map_err(|e| format!("upstream receiving: {e}"))?;
        send_pattern(&mut s, 2, down).map_err(|e| format!("upstream sending: {e}"))?;
        Ok(())
    });
    (addr, handle)
}

fn client(
    agent: SocketAddr,
    config: Arc<ClientConfig>,
) -> StreamOwned<ClientConnection, TcpStream> {
    let tls = tls_client(agent, config);
    tls.sock
        .set_read_timeout(Some(Duration::from_secs(120)))
        .expect("timeout");
    tls
}

/// Ends our side: close_notify (when the session is still up), then the socket.
fn close(mut tls: StreamOwned<ClientConnection, TcpStream>) {
    tls.conn.send_close_notify();
    let _ = tls.flush();
    let _ = tls.sock.shutdown(std::net::Shutdown::Both);
}

/// Sends `len` bytes of pattern 1, calling `midway` once half of it is written.
fn send_with(
    tls: &mut StreamOwned<ClientConnection, TcpStream>,
    len: usize,
    mut midway: impl FnMut(&mut StreamOwned<ClientConnection, TcpStream>),
) -> std::io::Result<()> {
    let mut pattern = Pattern::new(1);
    let mut buf = vec![0u8; 64 * 1024];
    let mut sent = 0;
    while sent < len {
        let n = buf.len().min(len - sent);
        pattern.fill(&mut buf[..n]);
        tls.write_all(&buf[..n])?;
        sent += n;
        if sent == len / 2 {
            midway(tls);
        }
    }
    Ok(())
}

fn check_closed_for(report: &ConnectionReport, reason: Reason, phrase: &str) {
    assert_eq!(report.data_path, Some(DataPath::Ktls), "{report:?}");
    assert_eq!(report.outcome, reason, "{report:?}");
    let error = report.error.as_deref().unwrap_or_default();
    assert!(error.contains(phrase), "{report:?}");
}

#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
fn client_key_update_is_followed_or_ends_the_connection() {
    let expect = expect();
    let pki = TestPki::generate();
    let dir = pki.write_files();
    let (upstream, upstream_done) = bulk_upstream(LEN, LEN);
    let mut agent = Agent::start(listener(
        Mode::Terminate,
        &dir,
        upstream,
        DataPathPolicy::Auto,
    ));
    let (rx_ok, tx_ok) = (tls_stat("TlsRxRekeyOk"), tls_stat("TlsTxRekeyOk"));
    let mut tls = client(agent.addr, pki.client_config());
    // A KeyUpdate with update_requested: the agent must take our new key and change its own.
    let sent = send_with(&mut tls, LEN, |tls| {
        tls.conn.refresh_traffic_keys().expect("KeyUpdate");
    });
    let received = sent.and_then(|()| expect_pattern(&mut tls, 2, LEN));
    close(tls);
    let report = agent.next_report();
    match expect {
        Expect::Userspace | Expect::Rekey => {
            received.expect("data after the KeyUpdate");
            upstream_done.join().expect("upstream").expect("upstream");
            assert_eq!(report.error, None, "{report:?}");
            assert_eq!(report.bytes_up, LEN as u64, "{report:?}");
            assert_eq!(report.bytes_down, LEN as u64, "{report:?}");
        }
        Expect::Close => {
            let e = received.expect_err("a kernel that cannot rekey must end the connection");
            check_closed_for(&report, Reason::RekeyUnsupported, "KeyUpdate");
            println!("client saw: {e}");
        }
    }
    if expect == Expect::Rekey {
        assert_eq!(report.data_path, Some(DataPath::Ktls), "{report:?}");
        assert_eq!(
            report.key_updates, 2,
            "RX followed, TX answered: {report:?}"
        );
        assert!(tls_stat("TlsRxRekeyOk") > rx_ok, "kernel RX rekey counter");
        assert!(tls_stat("TlsTxRekeyOk") > tx_ok, "kernel TX rekey counter");
    }
    println!("{expect:?}: {report:?}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
fn record_limit_rekeys_or_ends_the_connection() {
    let expect = expect();
    let pki = TestPki::generate();
    let dir = pki.write_files();
    for (suite, tls13) in [
        (None, true),
        (Some(SuiteUnderTest::tls12_ecdhe_aes128gcm()), false),
    ] {
        let (upstream, upstream_done) = bulk_upstream(1024, LEN);
        let mut cfg = listener(Mode::Terminate, &dir, upstream, DataPathPolicy::Auto);
        // 4 MiB down is at least 256 records: several keys' worth.
        cfg.rekey_after_records = Some(64);
        let mut agent = Agent::start(cfg);
        let config = suite.map_or_else(|| pki.client_config(), |s| s.client_config(&pki));
        let mut tls = client(agent.addr, config);
        let received =
            send_pattern(&mut tls, 1, 1024).and_then(|()| expect_pattern(&mut tls, 2, LEN));
        close(tls);
        let report = agent.next_report();
        match (expect, tls13) {
            (Expect::Userspace, _) | (Expect::Rekey, true) => {
                received.expect("all data");
                upstream_done.join().expect("upstream").expect("upstream");
                assert_eq!(report.error, None, "{report:?}");
                assert_eq!(report.bytes_down, LEN as u64, "{report:?}");
                if expect == Expect::Rekey {
                    assert!(report.key_updates >= 3, "{report:?}");
                }
            }
            (Expect::Close, _) | (Expect::Rekey, false) => {
                let e = received.expect_err("the agent must stop before the record limit");
                check_closed_for(&report, Reason::RecordLimit, " records sent under one ");
                // The agent never sends more records under one key than it was told to.
                let sent: u64 = report
                    .error
                    .as_deref()
                    .and_then(|e| e.split(' ').next())
                    .and_then(|n| n.parse().ok())
                    .expect("record count in the error");
                assert!((56..=64).contains(&sent), "{report:?}");
                if !tls13 {
                    check_closed_for(&report, Reason::RecordLimit, "TLS 1.2 has no KeyUpdate");
                }
                println!("client saw: {e}");
            }
        }
        println!("{expect:?} tls13={tls13}: {report:?}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
fn openssl_s_client_key_update_is_followed_or_ends_the_connection() {
    let Some(openssl) = tool_or_skip("session openssl key update", "openssl") else {
        return;
    };
    let expect = expect();
    let pki = TestPki::generate();
    let dir = pki.write_files();
    let l = TcpListener::bind("127.0.0.1:0").expect("bind upstream");
    let upstream = l.local_addr().expect("addr");
    // Answers each line; ends after two lines or when the agent closes.
    let upstream_done = thread::spawn(move || -> Vec<String> {
        let Ok((s, _)) = l.accept() else {
            return Vec::new();
        };
        let mut lines = Vec::new();
        let mut reader = BufReader::new(&s);
        while lines.len() < 2 {
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let _ = (&s).write_all(format!("pong {line}").as_bytes());
                    lines.push(line.trim().to_owned());
                }
            }
        }
        lines
    });
    let mut agent = Agent::start(listener(
        Mode::Terminate,
        &dir,
        upstream,
        DataPathPolicy::Auto,
    ));
    // Not -quiet: s_client takes commands ("K": KeyUpdate, update requested) only without it.
    let mut child = s_client(&openssl, agent.addr, &dir, &[]);
    let mut stdin = child.stdin.take().expect("stdin");
    // s_client reads a command only when it is alone in one read of stdin: pace the lines.
    for line in ["first\n", "K\n", "second\n"] {
        thread::sleep(Duration::from_secs(2));
        let _ = stdin.write_all(line.as_bytes());
    }
    let lines = upstream_done.join().expect("upstream");
    thread::sleep(Duration::from_secs(1));
    drop(stdin);
    let out = child.wait_with_output().expect("s_client output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("KEYUPDATE"),
        "s_client sent no KeyUpdate: {stderr}"
    );
    let report = agent.next_report();
    match expect {
        Expect::Userspace | Expect::Rekey => {
            assert_eq!(lines, ["first", "second"], "{report:?}");
            assert!(stdout.contains("pong second"), "{stdout}");
            if expect == Expect::Rekey {
                assert_eq!(report.key_updates, 2, "{report:?}");
            }
        }
        Expect::Close => {
            assert_eq!(lines, ["first"], "{report:?}");
            assert!(!stdout.contains("pong second"), "{stdout}");
            check_closed_for(&report, Reason::RekeyUnsupported, "KeyUpdate");
        }
    }
    println!("{expect:?}: {report:?}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
fn upstream_session_tickets_are_kept_for_resumption() {
    let (path, _) = expected_auto_path();
    let pki = TestPki::generate();
    let dir = pki.write_files();
    let l = TcpListener::bind("127.0.0.1:0").expect("bind upstream");
    let upstream = l.local_addr().expect("addr");
    let server_config = pki.server_config();
    // Two TLS connections from the agent; says how each handshake went.
    let upstream_done = thread::spawn(move || -> Result<Vec<HandshakeKind>, String> {
        let mut kinds = Vec::new();
        for _ in 0..2 {
            let (s, _) = l.accept().map_err(|e| e.to_string())?;
            let conn = ServerConnection::new(server_config.clone()).map_err(|e| e.to_string())?;
            let mut tls = StreamOwned::new(conn, s);
            let mut request = [0u8; 5];
            tls.read_exact(&mut request).map_err(|e| e.to_string())?;
            tls.write_all(b"reply").map_err(|e| e.to_string())?;
            tls.conn.send_close_notify();
            tls.flush().map_err(|e| e.to_string())?;
            kinds.push(tls.conn.handshake_kind().ok_or("no handshake kind")?);
        }
        Ok(kinds)
    });
    let mut agent = Agent::start(listener(
        Mode::Reencrypt,
        &dir,
        upstream,
        DataPathPolicy::Auto,
    ));
    let mut reports = Vec::new();
    for _ in 0..2 {
        let mut tls = client(agent.addr, pki.client_config());
        tls.write_all(b"hello").expect("request");
        let mut reply = Vec::new();
        tls.read_to_end(&mut reply).expect("reply and close");
        assert_eq!(reply, b"reply");
        close(tls);
        reports.push(agent.next_report());
    }
    let kinds = upstream_done.join().expect("upstream").expect("upstream");
    assert_eq!(kinds[0], HandshakeKind::Full, "{reports:?}");
    assert_eq!(
        kinds[1],
        HandshakeKind::Resumed,
        "the second upstream handshake must resume: {reports:?}"
    );
    for r in &reports {
        assert_eq!(r.data_path, Some(path), "{r:?}");
        assert_eq!(r.error, None, "{r:?}");
    }
    if path == DataPath::Ktls {
        assert!(
            reports[0].tickets >= 1,
            "tickets stored under kTLS: {reports:?}"
        );
    }
    println!(
        "{path}: upstream handshakes {kinds:?}; tickets {}",
        reports[0].tickets
    );
    let _ = std::fs::remove_dir_all(dir);
}
