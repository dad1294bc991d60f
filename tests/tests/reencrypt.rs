//! reencrypt (client TLS -> agent -> TLS upstream) and originate (plaintext in -> TLS upstream)
//! end to end, against our rustls peers and openssl s_server.
//!
//! Runs on every kernel of the matrix. Where the kernel has kTLS both legs' keys go to the kernel
//! and the bytes are spliced between two kTLS sockets; on the host the userspace path is taken and
//! says why. Wire captures of every leg check that plaintext samples never cross an encrypted leg
//! (and do cross the plaintext leg of originate, so the check is not blind).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::thread;

use rustls::{ServerConfig, ServerConnection, StreamOwned};
use tlsplice::config::{DataPathPolicy, Mode};
use tlsplice::outcome::{ConnectionReport, Reason};
use tlsplice_tests::{
    Agent, Tap, TestPki, contains, expect_pattern, expected_auto_path, listener, pattern_samples,
    send_pattern, tls_client, tool_or_skip,
};

/// Bytes each way in the bulk tests.
const BULK: usize = 16 << 20;

/// A TLS upstream (rustls, user space): reads `len` bytes of pattern 1, answers with `len`
/// bytes of pattern 2, then expects close_notify and answers it.
fn tls_bulk_upstream(
    config: Arc<ServerConfig>,
    len: usize,
) -> (SocketAddr, thread::JoinHandle<Result<(), String>>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind upstream");
    let addr = listener.local_addr().expect("upstream addr");
    let handle = thread::spawn(move || {
        let (sock, _) = listener.accept().map_err(|e| e.to_string())?;
        let conn = ServerConnection::new(config).map_err(|e| e.to_string())?;
        let mut tls = StreamOwned::new(conn, sock);
        expect_pattern(&mut tls, 1, len).map_err(|e| format!("upstream receiving: {e}"))?;
        send_pattern(&mut tls, 2, len).map_err(|e| format!("upstream sending: {e}"))?;
        let mut rest = Vec::new();
        tls.read_to_end(&mut rest)
            .map_err(|e| format!("upstream awaiting close_notify: {e}"))?;
        tls.conn.send_close_notify();
        tls.flush().map_err(|e| e.to_string())?;
        if rest.is_empty() {
            Ok(())
        } else {
            Err(format!("{} unexpected bytes after the request", rest.len()))
        }
    });
    (addr, handle)
}

fn assert_no_samples(capture: &[u8], seed: u64, leg: &str, report: &ConnectionReport) {
    assert!(capture.len() > BULK, "{leg}: capture too short");
    for sample in pattern_samples(seed, BULK) {
        assert!(
            !contains(capture, &sample),
            "plaintext on {leg} ({report:?})"
        );
    }
}

fn check_path(report: &ConnectionReport) {
    let (path, reason) = expected_auto_path();
    assert_eq!(report.error, None, "{report:?}");
    assert_eq!(report.data_path, Some(path), "{report:?}");
    if let Some(reason) = reason {
        assert!(report.path_reason.contains(&reason), "{report:?}");
    }
    assert_eq!(report.bytes_up, BULK as u64, "{report:?}");
    assert_eq!(report.bytes_down, BULK as u64, "{report:?}");
}

#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
fn reencrypt_bulk_keeps_both_legs_encrypted() {
    let pki = TestPki::generate();
    let dir = pki.write_files();
    let (upstream, upstream_done) = tls_bulk_upstream(pki.server_config(), BULK);
    let upstream_leg = Tap::start(upstream);
    let mut agent = Agent::start(listener(
        Mode::Reencrypt,
        &dir,
        upstream_leg.addr,
        DataPathPolicy::Auto,
    ));
    let client_leg = Tap::start(agent.addr);
    let mut tls = tls_client(client_leg.addr, pki.client_config());
    send_pattern(&mut tls, 1, BULK).expect("client sending");
    expect_pattern(&mut tls, 2, BULK).expect("client receiving");
    tls.conn.send_close_notify();
    tls.flush().expect("flush");
    let mut tail = Vec::new();
    tls.read_to_end(&mut tail)
        .expect("clean close_notify from the agent");
    drop(tls);
    upstream_done
        .join()
        .expect("upstream thread")
        .expect("upstream saw the right bytes");
    let report = agent.next_report();
    check_path(&report);
    assert!(
        report.session.contains("client TLS") && report.session.contains("upstream TLS"),
        "{report:?}"
    );
    let (c_up, c_down) = client_leg.finish();
    let (u_up, u_down) = upstream_leg.finish();
    assert_no_samples(&c_up, 1, "client leg, upward", &report);
    assert_no_samples(&c_down, 2, "client leg, downward", &report);
    assert_no_samples(&u_up, 1, "upstream leg, upward", &report);
    assert_no_samples(&u_down, 2, "upstream leg, downward", &report);
    println!(
        "reencrypt: {} MiB each way byte-identical over {:?} ({}; {})",
        BULK >> 20,
        report.data_path,
        report.path_reason,
        report.session
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
fn originate_bulk_encrypts_the_upstream_leg() {
    let pki = TestPki::generate();
    let dir = pki.write_files();
    let (upstream, upstream_done) = tls_bulk_upstream(pki.server_config(), BULK);
    let upstream_leg = Tap::start(upstream);
    let mut agent = Agent::start(listener(
        Mode::Originate,
        &dir,
        upstream_leg.addr,
        DataPathPolicy::Auto,
    ));
    let client_leg = Tap::start(agent.addr);
    let mut sock = TcpStream::connect(client_leg.addr).expect("connect");
    send_pattern(&mut sock, 1, BULK).expect("client sending");
    expect_pattern(&mut sock, 2, BULK).expect("client receiving");
    sock.shutdown(std::net::Shutdown::Write)
        .expect("half-close");
    let mut tail = Vec::new();
    sock.read_to_end(&mut tail)
        .expect("agent closes after the upstream");
    assert!(tail.is_empty());
    drop(sock);
    upstream_done
        .join()
        .expect("upstream thread")
        .expect("upstream saw the right bytes");
    let report = agent.next_report();
    check_path(&report);
    let (c_up, c_down) = client_leg.finish();
    let (u_up, u_down) = upstream_leg.finish();
    // The plaintext leg carries the samples: the check can see them when they are there.
    for sample in pattern_samples(1, BULK) {
        assert!(contains(&c_up, &sample), "capture check is blind");
    }
    for sample in pattern_samples(2, BULK) {
        assert!(contains(&c_down, &sample), "capture check is blind");
    }
    assert_no_samples(&u_up, 1, "upstream leg, upward", &report);
    assert_no_samples(&u_down, 2, "upstream leg, downward", &report);
    println!(
        "originate: {} MiB each way byte-identical over {:?} ({})",
        BULK >> 20,
        report.data_path,
        report.session
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// Starts `openssl s_server -rev` (answers each line reversed) on an ephemeral port.
fn openssl_rev_server(openssl: &Path, dir: &Path) -> (SocketAddr, std::process::Child) {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let mut child = Command::new(openssl)
        .args(["s_server", "-rev", "-naccept", "1"])
        .arg("-accept")
        .arg(format!("127.0.0.1:{port}"))
        .arg("-cert")
        .arg(dir.join("server.pem"))
        .arg("-key")
        .arg(dir.join("server.key"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start openssl s_server");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    // s_server prints ACCEPT once it listens.
    for line in lines.by_ref() {
        if line.expect("s_server output").contains("ACCEPT") {
            break;
        }
    }
    thread::spawn(move || for _ in lines {});
    (format!("127.0.0.1:{port}").parse().expect("addr"), child)
}

#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
fn reencrypt_to_openssl_s_server() {
    let Some(openssl) = tool_or_skip("reencrypt openssl_s_server", "openssl") else {
        return;
    };
    let pki = TestPki::generate();
    let dir = pki.write_files();
    let (upstream, mut server) = openssl_rev_server(&openssl, &dir);
    let mut agent = Agent::start(listener(
        Mode::Reencrypt,
        &dir,
        upstream,
        DataPathPolicy::Auto,
    ));
    let mut tls = tls_client(agent.addr, pki.client_config());
    tls.write_all(b"ping-marker\n").expect("send");
    let mut line = String::new();
    BufReader::new(&mut tls)
        .read_line(&mut line)
        .expect("answer from s_server through the agent");
    assert_eq!(line, "rekram-gnip\n");
    tls.conn.send_close_notify();
    tls.flush().expect("flush");
    drop(tls);
    let report = agent.next_report();
    let (path, _) = expected_auto_path();
    assert_eq!(report.data_path, Some(path), "{report:?}");
    assert_eq!(report.bytes_up, 12, "{report:?}");
    assert_eq!(report.bytes_down, 12, "{report:?}");
    let _ = server.kill();
    let _ = server.wait();
    println!(
        "reencrypt: openssl s_server round trip over {path} ({})",
        report.session
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
fn reencrypt_refuses_an_untrusted_upstream() {
    let pki = TestPki::generate();
    let dir = pki.write_files();
    // The upstream's certificate comes from another CA than the one the agent trusts.
    let stranger = TestPki::generate();
    let (upstream, upstream_done) = tls_bulk_upstream(stranger.server_config(), 1);
    let mut agent = Agent::start(listener(
        Mode::Reencrypt,
        &dir,
        upstream,
        DataPathPolicy::Auto,
    ));
    let mut tls = tls_client(agent.addr, pki.client_config());
    tls.write_all(b"x").expect("client handshake and send");
    let mut rest = Vec::new();
    // The agent ends the client session cleanly (close_notify) without forwarding anything.
    tls.read_to_end(&mut rest)
        .expect("clean close from the agent");
    assert!(rest.is_empty());
    let report = agent.next_report();
    assert_eq!(
        report.outcome,
        Reason::UpstreamCertificateRefused,
        "{report:?}"
    );
    assert!(
        report
            .error
            .as_deref()
            .is_some_and(|e| e.contains("certificate")),
        "{report:?}"
    );
    assert!(upstream_done.join().expect("upstream thread").is_err());
    let _ = std::fs::remove_dir_all(dir);
}
