//! Hostile TLS after the handshake, on every data path a TLS listener can take here: what the
//! agent does with post-handshake messages and malformed records once the client's session is
//! in the kernel (kTLS) or in rustls (user space), and that both say it with the same reason.
//!
//! The clients are real ones where a real one can send the message (openssl s_client's `k`,
//! `K` and `R` commands), a kTLS client of the tests' own for messages no tool sends (the
//! kernel encrypts whatever record it is given), and raw bytes written after a rustls
//! handshake for records that are broken on the wire.
//!
//! Runs in the VM matrix; on the host (no kTLS) the user-space path runs and the kTLS one
//! prints why it is skipped.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::crypto::cipher::{
    InboundOpaqueMessage, MessageDecrypter, MessageEncrypter, OutboundChunks, OutboundPlainMessage,
};
use tlsplice::config::{DataPathPolicy, Mode};
use tlsplice::ktls::{self, RecordType};
use tlsplice::outcome::{ConnectionReport, DataPath, Reason};
use tlsplice_tests::ktls_stream::KtlsStream;
use tlsplice_tests::{
    Agent, SuiteUnderTest, TestPki, listener, require, serve, tls_data_paths, tool_or_skip,
};

/// An upstream that echoes what it reads until the agent closes.
fn echo(mut sock: TcpStream) {
    let Ok(mut reader) = sock.try_clone() else {
        return;
    };
    let _ = std::io::copy(&mut reader, &mut sock);
    let _ = sock.shutdown(std::net::Shutdown::Write);
}

/// A terminate agent forced onto `path` in front of `upstream`.
fn agent_on(path: DataPath, pki_dir: &std::path::Path, upstream: SocketAddr) -> Agent {
    let policy = match path {
        DataPath::Ktls => DataPathPolicy::Ktls,
        _ => DataPathPolicy::Userspace,
    };
    Agent::start(listener(Mode::Terminate, pki_dir, upstream, policy))
}

/// The next connection report, which must be on `path`.
fn report_on(agent: &mut Agent, path: DataPath) -> ConnectionReport {
    let report = agent.next_report();
    assert_eq!(report.data_path, Some(path), "{report:?}");
    report
}

/// openssl s_client in its interactive mode (commands at the start of a line), with what it
/// prints collected as it comes.
struct OpensslClient {
    child: Child,
    out: Arc<Mutex<Vec<u8>>>,
}

impl OpensslClient {
    fn start(
        openssl: &std::path::Path,
        agent: SocketAddr,
        pki_dir: &std::path::Path,
        tls: &str,
    ) -> Self {
        let mut child = tlsplice_tests::s_client(openssl, agent, pki_dir, &[tls.as_ref()]);
        let out = Arc::new(Mutex::new(Vec::new()));
        for mut pipe in [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let out = out.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = pipe.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    out.lock().expect("output").extend_from_slice(&buf[..n]);
                }
            });
        }
        Self { child, out }
    }

    fn output(&self) -> String {
        String::from_utf8_lossy(&self.out.lock().expect("output")).into_owned()
    }

    /// Writes one line (a command, or data that is not one) as its own read for s_client.
    fn line(&mut self, text: &str) -> std::io::Result<()> {
        let stdin = self.child.stdin.as_mut().expect("stdin");
        stdin.write_all(format!("{text}\n").as_bytes())?;
        stdin.flush()
    }

    /// Waits until s_client has printed `text` (60 s at most).
    fn wait_for(&self, text: &str) {
        self.wait_for_count(text, 1);
    }

    /// Waits until s_client has printed `text` `count` times (60 s at most).
    fn wait_for_count(&self, text: &str, count: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.output().matches(text).count() < count {
            assert!(
                Instant::now() < deadline,
                "s_client never printed {text:?}:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Closes stdin (s_client then ends its session) and waits for it to exit.
    fn finish(mut self) -> String {
        drop(self.child.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.child.try_wait().expect("wait").is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(100));
        self.output()
    }
}

/// Whether the kernel here takes new TLS 1.3 keys on a live socket (6.14 and later).
fn kernel_rekeys() -> bool {
    tlsplice::path::KernelCaps::probe().rekey().is_ok()
}

/// CPU time (user + system) this process has used: the in-process agent's, for the storm.
fn process_cpu() -> Duration {
    // SAFETY: getrusage writes one rusage into the zeroed value it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid pointer.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    assert_eq!(rc, 0, "getrusage");
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// A rustls client through the agent that must still echo (the agent serves others).
fn bystander_echoes(agent: SocketAddr, pki: &TestPki, what: &str) {
    let mut c = tlsplice_tests::tls_client(agent, pki.client_config());
    c.get_ref()
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    c.write_all(what.as_bytes()).expect("bystander write");
    let mut got = vec![0u8; what.len()];
    c.read_exact(&mut got).expect("bystander echo");
    assert_eq!(got, what.as_bytes());
    c.conn.send_close_notify();
    let _ = c.flush();
}

#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
fn key_updates_from_openssl_are_followed_and_a_storm_is_cut() {
    const TEST: &str = "key_updates_from_openssl_are_followed_and_a_storm_is_cut";
    let Some(openssl) = tool_or_skip(TEST, "openssl") else {
        return;
    };
    let pki = TestPki::generate();
    let dir = pki.write_files();
    for path in tls_data_paths(TEST) {
        // 20 KeyUpdates a second, not the default 100: s_client acts on one command per read
        // of its input, so under a loaded (emulated) CPU the storm's lines arrive coalesced
        // and fewer KeyUpdates go out than lines; 20 a second a storm still exceeds.
        let policy = match path {
            DataPath::Ktls => DataPathPolicy::Ktls,
            _ => DataPathPolicy::Userspace,
        };
        let limits = tlsplice::config::LimitsConfig {
            key_updates_per_second: 20,
            ..Default::default()
        };
        let mut agent =
            Agent::start_with_limits(listener(Mode::Terminate, &dir, serve(echo), policy), limits);
        // Where the kTLS path cannot rekey, a KeyUpdate ends the connection as documented.
        let refuses = path == DataPath::Ktls && !kernel_rekeys();

        // Once each way: update_not_requested, then update_requested (the agent answers with
        // its own), with data before, between and after.
        let mut client = OpensslClient::start(&openssl, agent.addr, &dir, "-tls1_3");
        client.line("hello-1").expect("write");
        client.wait_for("hello-1\n");
        // s_client takes a command from the start of what one read returns and drops the rest:
        // the next line waits until it has acted.
        client.line("k").expect("k");
        client.wait_for_count("KEYUPDATE", 1);
        if refuses {
            // The agent answers with an alert and closes; s_client may be gone already, and
            // its input with it (a CI run on 6.1 caught the broken pipe).
            let _ = client.line("hello-2");
        } else {
            client.line("hello-2").expect("write");
        }
        if !refuses {
            client.wait_for("hello-2\n");
            client.line("K").expect("K");
            client.wait_for_count("KEYUPDATE", 2);
            client.line("hello-3").expect("write");
            client.wait_for("hello-3\n");
        }
        let out = client.finish();
        let report = report_on(&mut agent, path);
        if refuses {
            assert_eq!(
                report.outcome,
                Reason::RekeyUnsupported,
                "{report:?}\n{out}"
            );
        } else {
            assert_eq!(report.outcome, Reason::Ok, "{report:?}\n{out}");
            if path == DataPath::Ktls {
                // The client's two and the one the agent sent when asked.
                assert_eq!(report.key_updates, 3, "{report:?}");
            }
        }
        println!(
            "{path}: one KeyUpdate each way -> {} ({:?})",
            report.outcome, report.error
        );

        // A storm: KeyUpdates as fast as s_client sends them, no data between.
        let mut client = OpensslClient::start(&openssl, agent.addr, &dir, "-tls1_3");
        client.line("warm").expect("write");
        client.wait_for("warm\n");
        let cpu = process_cpu();
        let started = Instant::now();
        let mut sent = 0;
        for _ in 0..5_000 {
            if client.line("k").is_err() || client.child.try_wait().ok().flatten().is_some() {
                break;
            }
            sent += 1;
            std::thread::sleep(Duration::from_micros(500));
        }
        let report = report_on(&mut agent, path);
        let (cpu, took) = (process_cpu() - cpu, started.elapsed());
        let expected = if refuses {
            Reason::RekeyUnsupported
        } else {
            Reason::KeyUpdateRateLimit
        };
        assert_eq!(report.outcome, expected, "{report:?}");
        println!(
            "{path}: KeyUpdate storm ({sent} `k` lines in {took:?}) -> {}: {:?}; agent and test process CPU meanwhile {cpu:?}",
            report.outcome, report.error
        );
        drop(client.finish());
        // The agent still serves.
        bystander_echoes(agent.addr, &pki, "still here");
        assert_eq!(report_on(&mut agent, path).outcome, Reason::Ok);
    }
}

#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
fn tls12_renegotiation_is_refused() {
    const TEST: &str = "tls12_renegotiation_is_refused";
    let Some(openssl) = tool_or_skip(TEST, "openssl") else {
        return;
    };
    let pki = TestPki::generate();
    let dir = pki.write_files();
    for path in tls_data_paths(TEST) {
        let mut agent = agent_on(path, &dir, serve(echo));
        let mut client = OpensslClient::start(&openssl, agent.addr, &dir, "-tls1_2");
        client.line("before").expect("write");
        client.wait_for("before\n");
        client.line("R").expect("R");
        client.line("after").expect("write");
        let out = client.finish();
        let report = report_on(&mut agent, path);
        // Both paths refuse with a no_renegotiation warning; OpenSSL gives up on the session
        // with a fatal handshake_failure of its own.
        assert!(
            out.contains("RENEGOTIATING"),
            "s_client did not try to renegotiate:\n{out}"
        );
        assert!(
            out.contains("no renegotiation") || out.contains("no_renegotiation"),
            "s_client was not told no_renegotiation:\n{out}"
        );
        assert_eq!(report.outcome, Reason::AlertReceived, "{report:?}\n{out}");
        println!(
            "{path}: renegotiation -> {} ({:?})",
            report.outcome, report.error
        );
    }
}

/// A rustls client that finished its TLS 1.3 handshake with the agent; what it writes next is
/// raw bytes on the wire, and `records` seals plaintext into valid records.
struct RawClient {
    sock: TcpStream,
    conn: rustls::ClientConnection,
}

impl RawClient {
    fn connect(agent: SocketAddr, pki: &TestPki) -> Self {
        let sock = TcpStream::connect(agent).expect("connect");
        sock.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
        let mut conn = rustls::ClientConnection::new(
            SuiteUnderTest::tls13_aes128gcm().client_config(pki),
            name,
        )
        .expect("client");
        let mut io = &sock;
        while conn.is_handshaking() {
            conn.complete_io(&mut io).expect("handshake");
        }
        Self { sock, conn }
    }

    /// Valid application-data records carrying `data`.
    fn records(&mut self, data: &[u8]) -> Vec<u8> {
        self.conn.writer().write_all(data).expect("seal");
        let mut wire = Vec::new();
        while self.conn.wants_write() {
            self.conn.write_tls(&mut wire).expect("records");
        }
        wire
    }

    /// Reads until the agent closes; the alert it sent, if rustls read one.
    fn closed_with(mut self) -> String {
        let mut io = &self.sock;
        for _ in 0..100 {
            match self.conn.read_tls(&mut io) {
                Ok(0) => return "TCP close".into(),
                Ok(_) => {
                    if let Err(e) = self.conn.process_new_packets() {
                        return e.to_string();
                    }
                    let mut sink = [0u8; 4096];
                    let _ = self.conn.reader().read(&mut sink);
                }
                Err(e) => return format!("read error: {e}"),
            }
        }
        "no close".into()
    }
}

#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
fn broken_records_end_the_connection_with_their_reason() {
    const TEST: &str = "broken_records_end_the_connection_with_their_reason";
    let pki = TestPki::generate();
    let dir = pki.write_files();
    // (case, what to write after the handshake, the reason in user space, on kTLS)
    type Case = (&'static str, fn(&mut RawClient) -> Vec<u8>, Reason, Reason);
    let cases: [Case; 3] = [
        (
            "a record whose tag does not verify",
            |c| {
                let mut wire = c.records(b"tampered");
                if let Some(last) = wire.last_mut() {
                    *last ^= 0x01;
                }
                wire
            },
            Reason::RecordError,
            Reason::RecordError,
        ),
        (
            "a record over 2^14 + 256 bytes",
            |_| {
                let len: u16 = (1 << 14) + 256 + 1;
                let mut wire = vec![23, 3, 3];
                wire.extend(len.to_be_bytes());
                wire.resize(5 + usize::from(len), 0x5a);
                wire
            },
            Reason::RecordOverflow,
            Reason::RecordOverflow,
        ),
        (
            "a record of an unknown content type",
            |c| {
                let mut wire = c.records(b"odd type");
                wire[0] = 0x42;
                wire
            },
            Reason::UnexpectedMessage,
            // The kernel does not check a TLS 1.3 record's outer type (RFC 8446 5.2 says it
            // is always 23): the record decrypts and its data is relayed. Measured on 6.1,
            // 6.12 and 7.2; the agent never sees the outer type on this path.
            Reason::Ok,
        ),
    ];
    let mut table = Vec::new();
    for path in tls_data_paths(TEST) {
        let mut agent = agent_on(path, &dir, serve(echo));
        for (case, write, userspace, ktls) in &cases {
            let reason = if path == DataPath::Ktls {
                ktls
            } else {
                userspace
            };
            let mut client = RawClient::connect(agent.addr, &pki);
            // A good record first: the session is established and relaying.
            let good = client.records(b"ping");
            (&client.sock).write_all(&good).expect("write");
            let bad = write(&mut client);
            let _ = (&client.sock).write_all(&bad);
            let seen = if *reason == Reason::Ok {
                // Accepted: both records come back, then the client ends the session.
                let mut echoed = Vec::new();
                let mut io = &client.sock;
                while echoed.len() < b"pingodd type".len() {
                    let n = client.conn.read_tls(&mut io).expect("read");
                    assert!(n > 0, "{path}: {case}: closed before the echo");
                    client.conn.process_new_packets().expect("records");
                    let mut buf = [0u8; 64];
                    while let Ok(n @ 1..) = client.conn.reader().read(&mut buf) {
                        echoed.extend_from_slice(&buf[..n]);
                    }
                }
                assert_eq!(echoed, b"pingodd type", "{path}: {case}");
                client.conn.send_close_notify();
                let close = client.records(b"");
                let _ = (&client.sock).write_all(&close);
                let _ = client.sock.shutdown(std::net::Shutdown::Write);
                client.closed_with()
            } else {
                client.closed_with()
            };
            let report = report_on(&mut agent, path);
            table.push(format!(
                "{path:9} {case:40} -> {} | client saw: {seen} | {:?}",
                report.outcome, report.error
            ));
            assert_eq!(
                report.outcome, *reason,
                "{path}: {case}: {report:?} (client saw {seen})"
            );
        }
    }
    println!("{}", table.join("\n"));
}

/// What a kTLS peer receives next: an alert's description, or how the stream ended.
fn next_alert(stream: &KtlsStream) -> String {
    let mut buf = [0u8; 16 * 1024];
    for _ in 0..64 {
        match ktls::recv_record(stream.socket().as_fd(), &mut buf) {
            Ok((RecordType::Alert, n)) if n >= 2 => {
                let name = tlsplice_common::alert_name(u16::from(buf[1])).unwrap_or("unknown");
                return format!(
                    "alert {} {name}",
                    if buf[0] == 2 { "fatal" } else { "warning" }
                );
            }
            Ok((_, 0)) => return "TCP close".into(),
            // Tickets and echoed data.
            Ok(_) => {}
            Err(e) => return format!("error: {e}"),
        }
    }
    "nothing".into()
}

#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
fn unexpected_post_handshake_messages_get_unexpected_message() {
    const TEST: &str = "unexpected_post_handshake_messages_get_unexpected_message";
    // The client is a kTLS socket of the tests' own: it needs kTLS whatever the agent's path.
    let unavailable = tlsplice::probe::ktls_available()
        .err()
        .map(|e| format!("the test client needs kTLS: {e}"));
    if !require(TEST, unavailable) {
        return;
    }
    let pki = TestPki::generate();
    let dir = pki.write_files();
    // (case, record type, record body, the alert RFC 8446 names)
    let cases: [(&str, RecordType, &[u8], &str); 6] = [
        (
            "a NewSessionTicket from the client",
            RecordType::Handshake,
            &[4, 0, 0, 1, 0],
            "unexpected_message",
        ),
        (
            "a ClientHello after the TLS 1.3 handshake",
            RecordType::Handshake,
            &[1, 0, 0, 2, 3, 3],
            "unexpected_message",
        ),
        (
            "a KeyUpdate whose request_update is 2",
            RecordType::Handshake,
            &[24, 0, 0, 1, 2],
            "illegal_parameter",
        ),
        (
            "a KeyUpdate cut short",
            RecordType::Handshake,
            &[24, 0, 0, 4, 0],
            "decode_error",
        ),
        (
            "a ChangeCipherSpec inside the encrypted session",
            RecordType::ChangeCipherSpec,
            &[1],
            "unexpected_message",
        ),
        (
            "a record of inner content type 0x42",
            RecordType::Other(0x42),
            b"what",
            "unexpected_message",
        ),
    ];
    let mut table = Vec::new();
    let mut failures = Vec::new();
    for path in tls_data_paths(TEST) {
        let mut agent = agent_on(path, &dir, serve(echo));
        for (case, record_type, body, alert) in cases {
            let sock = TcpStream::connect(agent.addr).expect("connect");
            sock.set_read_timeout(Some(Duration::from_secs(30)))
                .expect("timeout");
            let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
            let conn = rustls::ClientConnection::new(
                SuiteUnderTest::tls13_aes128gcm().client_config(&pki),
                name,
            )
            .expect("client");
            let mut stream = KtlsStream::handshake(conn, sock).expect("kTLS client");
            stream.write_all(b"ping").expect("write");
            // A record's worth of room: a post-handshake record must fit whole.
            let mut echo = vec![0u8; 16 * 1024];
            let mut got = 0;
            while got < 4 {
                match stream.read(&mut echo[got..]).expect("echo") {
                    0 => panic!("{path}: {case}: closed before the echo"),
                    n => got += n,
                }
            }
            ktls::send_record(stream.socket().as_fd(), record_type, body).expect("send record");
            // rustls (user space) waits for the rest of a message cut short, as TLS allows (a
            // handshake message may span records); the kTLS path refuses it at once.
            let waits = path == DataPath::Userspace && alert == "decode_error";
            if waits {
                stream
                    .socket()
                    .set_read_timeout(Some(Duration::from_secs(2)))
                    .expect("timeout");
            }
            let seen = next_alert(&stream);
            println!("{path}: {case}: the client got {seen}");
            drop(stream);
            let report = report_on(&mut agent, path);
            table.push(format!(
                "{path:9} {case:48} -> {} | client got: {seen} | {:?}",
                report.outcome, report.error
            ));
            let expected = if waits {
                Reason::Truncated
            } else {
                Reason::UnexpectedMessage
            };
            if report.outcome != expected {
                failures.push(format!("{path}: {case}: reason {}", report.outcome));
            }
            // rustls (user space) names the alert its own way for some of these; the kTLS
            // path sends the one RFC 8446 names.
            if path == DataPath::Ktls && !seen.ends_with(alert) {
                failures.push(format!("{path}: {case}: client got {seen}, not {alert}"));
            }
        }
    }
    println!("{}", table.join("\n"));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
fn a_client_that_half_closes_right_after_its_handshake_is_served() {
    // The request, close_notify and FIN go out right behind the client's Finished, as
    // `printf 'GET /' | openssl s_client` or a scanner sends them. The kernel's TLS takes only
    // an established socket: when the FIN is in before the handoff, the connection stays in
    // user space and says why; either way the request is answered and the half-close kept.
    let pki = TestPki::generate();
    let dir = pki.write_files();
    let mut agent = Agent::start(listener(
        Mode::Terminate,
        &dir,
        serve(echo),
        DataPathPolicy::Auto,
    ));
    let (expected, _) = tlsplice_tests::expected_auto_path();
    let mut paths = Vec::new();
    for round in 0..5 {
        let sock = TcpStream::connect(agent.addr).expect("connect");
        sock.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
        let mut conn = rustls::ClientConnection::new(pki.client_config(), name).expect("client");
        let mut io = &sock;
        while conn.is_handshaking() {
            conn.complete_io(&mut io).expect("handshake");
        }
        conn.writer().write_all(b"request").expect("queue");
        conn.send_close_notify();
        while conn.wants_write() {
            conn.write_tls(&mut io).expect("request");
        }
        sock.shutdown(std::net::Shutdown::Write).expect("FIN");
        let mut stream = rustls::Stream::new(&mut conn, &mut io);
        let mut answer = Vec::new();
        stream
            .read_to_end(&mut answer)
            .expect("the answer, then close_notify");
        assert_eq!(answer, b"request", "round {round}");
        let report = agent.next_report();
        assert_eq!(report.outcome, Reason::Ok, "round {round}: {report:?}");
        match report.data_path {
            Some(DataPath::Userspace) if expected == DataPath::Ktls => assert!(
                report
                    .path_reason
                    .contains("closed its side before the handoff"),
                "{report:?}"
            ),
            Some(path) => assert_eq!(path, expected, "{report:?}"),
            None => panic!("no data path: {report:?}"),
        }
        paths.push(format!("{:?}: {}", report.data_path, report.path_reason));
    }
    println!("{}", paths.join("\n"));
}

/// What the upstream of [`SealedClient`] tests writes after the client's side has ended: a
/// client that reads it after its own close_notify proves the half-close was kept.
const TRAILER: &[u8] = b"|after your close_notify";

/// An upstream that echoes what it reads, then writes [`TRAILER`] and closes.
fn echo_then_trailer(mut sock: TcpStream) {
    let Ok(mut reader) = sock.try_clone() else {
        return;
    };
    if std::io::copy(&mut reader, &mut sock).is_ok() {
        let _ = sock.write_all(TRAILER);
    }
    let _ = sock.shutdown(std::net::Shutdown::Write);
}

/// A TLS 1.3 client (AES-128-GCM) whose records after the handshake are sealed here one by
/// one, so a test can write what no TLS library sends: empty and padding-only records, records
/// at and past the size limit, alerts of any level, a record cut short. Its reads open the
/// agent's records the same way. rustls does the handshake and the AEAD; nothing else.
struct SealedClient {
    sock: TcpStream,
    seal: Box<dyn MessageEncrypter>,
    open: Box<dyn MessageDecrypter>,
    tx_seq: u64,
    rx_seq: u64,
    inbound: Vec<u8>,
}

/// How the agent ended a [`SealedClient`]'s session, as the client saw it.
#[derive(Debug, PartialEq, Eq)]
enum Ending {
    /// close_notify, then the TCP close.
    CloseNotify,
    /// An alert other than close_notify (its level and name).
    Alert(&'static str, &'static str),
    /// The TCP close without an alert.
    TcpClose,
    /// A read error (a reset, or a record that did not open).
    Error(String),
}

impl SealedClient {
    fn connect(agent: SocketAddr, pki: &TestPki) -> Self {
        let sock = TcpStream::connect(agent).expect("connect");
        sock.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
        let suite = SuiteUnderTest::tls13_aes128gcm();
        let mut conn = rustls::Connection::from(
            rustls::ClientConnection::new(suite.client_config(pki), name).expect("client"),
        );
        tlsplice_tests::ktls_stream::complete_handshake(&mut conn, &sock).expect("handshake");
        let secrets = conn.dangerous_extract_secrets().expect("secrets");
        let aead = rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256
            .tls13()
            .expect("a TLS 1.3 suite")
            .aead_alg;
        let keys = |secrets| match secrets {
            rustls::ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (key, iv),
            _ => panic!("the suite under test is AES-128-GCM"),
        };
        let (tx_key, tx_iv) = keys(secrets.tx.1);
        let (rx_key, rx_iv) = keys(secrets.rx.1);
        Self {
            sock,
            seal: aead.encrypter(tx_key, tx_iv),
            open: aead.decrypter(rx_key, rx_iv),
            tx_seq: secrets.tx.0,
            rx_seq: secrets.rx.0,
            inbound: Vec::new(),
        }
    }

    /// One record whose TLS 1.3 inner plaintext is `payload` then the content type `typ`
    /// (RFC 8446 5.2): padding is zeros at the end of `payload` with `typ` 0 after them.
    fn record(&mut self, typ: u8, payload: &[u8]) -> Vec<u8> {
        let message = OutboundPlainMessage {
            typ: rustls::ContentType::from(typ),
            version: rustls::ProtocolVersion::TLSv1_2,
            payload: OutboundChunks::Single(payload),
        };
        let sealed = self.seal.encrypt(message, self.tx_seq).expect("seal");
        self.tx_seq += 1;
        sealed.encode()
    }

    fn send(&mut self, typ: u8, payload: &[u8]) {
        let record = self.record(typ, payload);
        (&self.sock).write_all(&record).expect("write a record");
    }

    fn send_data(&mut self, data: &[u8]) {
        self.send(APPLICATION_DATA, data);
    }

    fn send_close_notify(&mut self) {
        self.send(ALERT, &[1, 0]);
    }

    /// The agent's next record (content type, plaintext); `Ok(None)` at the TCP close.
    fn next_record(&mut self) -> std::io::Result<Option<(u8, Vec<u8>)>> {
        loop {
            if let [_, _, _, hi, lo, ..] = self.inbound[..] {
                let len = 5 + usize::from(u16::from_be_bytes([hi, lo]));
                if self.inbound.len() >= len {
                    let mut payload: Vec<u8> = self.inbound.drain(..len).skip(5).collect();
                    let sealed = InboundOpaqueMessage::new(
                        rustls::ContentType::ApplicationData,
                        rustls::ProtocolVersion::TLSv1_2,
                        &mut payload,
                    );
                    let plain = self
                        .open
                        .decrypt(sealed, self.rx_seq)
                        .map_err(std::io::Error::other)?;
                    self.rx_seq += 1;
                    return Ok(Some((u8::from(plain.typ), plain.payload.to_vec())));
                }
            }
            let mut buf = [0u8; 32 * 1024];
            match (&self.sock).read(&mut buf)? {
                0 => return Ok(None),
                n => self.inbound.extend_from_slice(&buf[..n]),
            }
        }
    }

    /// Reads application data until `want` has come back (session tickets skipped).
    fn expect_data(&mut self, want: &[u8]) {
        let mut data = Vec::new();
        while data.len() < want.len() {
            match self.next_record() {
                Ok(Some((APPLICATION_DATA, bytes))) => data.extend_from_slice(&bytes),
                Ok(Some((HANDSHAKE, _))) => {}
                other => panic!("waiting for {want:?}: {other:?}"),
            }
        }
        assert_eq!(data, want);
    }

    /// Application data until `want` bytes have come (session tickets skipped), then how the
    /// session ended.
    fn read_then_ending(&mut self, want: usize) -> (Vec<u8>, Ending) {
        let mut data = Vec::new();
        loop {
            match self.next_record() {
                Ok(Some((APPLICATION_DATA, bytes))) => data.extend_from_slice(&bytes),
                Ok(Some((HANDSHAKE, _))) => {}
                Ok(Some((ALERT, alert))) if alert == [1, 0] || alert == [2, 0] => {
                    // Nothing may follow close_notify but the TCP close.
                    let after = self.next_record();
                    assert!(matches!(after, Ok(None)), "after close_notify: {after:?}");
                    return (data, Ending::CloseNotify);
                }
                Ok(Some((ALERT, alert))) => {
                    let level = if alert.first() == Some(&2) {
                        "fatal"
                    } else {
                        "warning"
                    };
                    let name = alert
                        .get(1)
                        .and_then(|&d| tlsplice_common::alert_name(u16::from(d)))
                        .unwrap_or("unknown");
                    return (data, Ending::Alert(level, name));
                }
                Ok(Some((other, _))) => {
                    return (data, Ending::Error(format!("a record of type {other}")));
                }
                Ok(None) => return (data, Ending::TcpClose),
                Err(e) => return (data, Ending::Error(e.to_string())),
            }
            if data.len() > want {
                return (data, Ending::Error("more data than was sent".into()));
            }
        }
    }
}

const APPLICATION_DATA: u8 = 23;
const HANDSHAKE: u8 = 22;
const ALERT: u8 = 21;

/// What a [`SealedClient`] case writes after the handshake, and what it must come to.
struct SealedCase {
    case: &'static str,
    /// Writes the case's records; returns the application data the upstream must echo.
    write: fn(&mut SealedClient) -> Vec<u8>,
    /// The agent's reason on the user-space path and on the kTLS path.
    userspace: Reason,
    ktls: Reason,
}

/// Runs each case on a fresh connection through a terminate agent on each path. An accepted
/// case (reason `Ok`) ends with the client's close_notify and must read back its data, the
/// upstream's [`TRAILER`] after it (the half-close kept) and the agent's close_notify.
fn run_sealed_cases(test: &str, cases: &[SealedCase]) {
    let pki = TestPki::generate();
    let dir = pki.write_files();
    let mut table = Vec::new();
    let mut failures = Vec::new();
    for path in tls_data_paths(test) {
        let mut agent = agent_on(path, &dir, serve(echo_then_trailer));
        for case in cases {
            let expected = if path == DataPath::Ktls {
                case.ktls
            } else {
                case.userspace
            };
            let mut client = SealedClient::connect(agent.addr, &pki);
            let sent = (case.write)(&mut client);
            let seen = if expected == Reason::PeerReset {
                drop(client);
                "reset by the client".to_owned()
            } else if expected == Reason::Ok {
                client.send_close_notify();
                let mut want = sent.clone();
                want.extend_from_slice(TRAILER);
                let (got, ending) = client.read_then_ending(want.len());
                if got != want || ending != Ending::CloseNotify {
                    failures.push(format!(
                        "{path}: {}: read {} of {} bytes (equal: {}), then {ending:?}",
                        case.case,
                        got.len(),
                        want.len(),
                        got == want
                    ));
                }
                format!("{} bytes back, {ending:?}", got.len())
            } else {
                let (got, ending) = client.read_then_ending(sent.len());
                format!("{} bytes back, {ending:?}", got.len())
            };
            let report = report_on(&mut agent, path);
            table.push(format!(
                "{path:9} {:52} -> {} | client: {seen} | {:?}",
                case.case, report.outcome, report.error
            ));
            if report.outcome != expected {
                failures.push(format!(
                    "{path}: {}: reason {}, not {expected} ({:?}; client: {seen})",
                    case.case, report.outcome, report.error
                ));
            }
        }
    }
    println!("{}", table.join("\n"));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// 2^14, the most plaintext a record may carry (RFC 8446 5.1).
const MAX_PLAINTEXT: usize = 1 << 14;

#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
fn records_at_the_size_limits_are_relayed_and_those_past_them_refused() {
    let cases = [
        SealedCase {
            case: "a zero-length application data record",
            write: |c| {
                c.send_data(b"before");
                c.send_data(b"");
                c.send_data(b"+after");
                b"before+after".to_vec()
            },
            userspace: Reason::Ok,
            ktls: Reason::Ok,
        },
        SealedCase {
            case: "a record padded with 1,000 zero bytes",
            write: |c| {
                let mut inner = b"padded".to_vec();
                inner.push(APPLICATION_DATA);
                inner.resize(inner.len() + 999, 0);
                c.send(0, &inner);
                b"padded".to_vec()
            },
            userspace: Reason::Ok,
            ktls: Reason::Ok,
        },
        SealedCase {
            case: "a record of 2^14 bytes, the largest allowed",
            write: |c| {
                let data: Vec<u8> = (0..MAX_PLAINTEXT).map(|i| (i % 251) as u8).collect();
                c.send_data(&data);
                data
            },
            userspace: Reason::Ok,
            ktls: Reason::Ok,
        },
        SealedCase {
            case: "a record of padding only (no content type)",
            write: |c| {
                c.send(0, &[0; 32]);
                Vec::new()
            },
            // RFC 8446 5.4 says unexpected_message. The kernel refuses the record with
            // EBADMSG, as it refuses one that does not authenticate: on the kTLS path the
            // agent cannot tell the two apart.
            userspace: Reason::UnexpectedMessage,
            ktls: Reason::RecordError,
        },
        SealedCase {
            case: "a record of 2^14 + 1 bytes",
            write: |c| {
                c.send_data(&[7; MAX_PLAINTEXT + 1]);
                Vec::new()
            },
            userspace: Reason::RecordOverflow,
            ktls: Reason::RecordOverflow,
        },
    ];
    run_sealed_cases(
        "records_at_the_size_limits_are_relayed_and_those_past_them_refused",
        &cases,
    );
}

#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
fn alerts_and_cut_records_mid_stream_end_the_session_as_the_rfc_says() {
    let cases = [
        SealedCase {
            case: "close_notify mid-stream (the upstream answers after it)",
            write: |c| {
                c.send_data(b"last words");
                b"last words".to_vec()
            },
            userspace: Reason::Ok,
            ktls: Reason::Ok,
        },
        SealedCase {
            case: "a user_canceled warning between two records",
            write: |c| {
                c.send_data(b"one");
                c.send(ALERT, &[1, 90]);
                c.send_data(b"+two");
                b"one+two".to_vec()
            },
            userspace: Reason::Ok,
            ktls: Reason::Ok,
        },
        SealedCase {
            case: "five user_canceled warnings",
            write: |c| {
                c.send_data(b"one");
                for _ in 0..5 {
                    c.send(ALERT, &[1, 90]);
                }
                b"one".to_vec()
            },
            userspace: Reason::UnexpectedMessage,
            ktls: Reason::UnexpectedMessage,
        },
        SealedCase {
            case: "a warning alert TLS 1.3 does not allow",
            write: |c| {
                c.send_data(b"one");
                c.send(ALERT, &[1, 40]);
                b"one".to_vec()
            },
            userspace: Reason::AlertReceived,
            ktls: Reason::AlertReceived,
        },
        SealedCase {
            case: "a fatal alert mid-stream",
            write: |c| {
                c.send_data(b"one");
                c.send(ALERT, &[2, 80]);
                b"one".to_vec()
            },
            userspace: Reason::AlertReceived,
            ktls: Reason::AlertReceived,
        },
        SealedCase {
            case: "a record cut short by the client's FIN",
            write: |c| {
                c.send_data(b"one");
                // Echoed: the connection is on its data path before the cut.
                c.expect_data(b"one");
                let record = c.record(APPLICATION_DATA, b"cut in two");
                (&c.sock).write_all(&record[..9]).expect("half a record");
                c.sock.shutdown(std::net::Shutdown::Write).expect("FIN");
                Vec::new()
            },
            userspace: Reason::Truncated,
            ktls: Reason::Truncated,
        },
        SealedCase {
            case: "a record cut short by the client's RST",
            write: |c| {
                c.send_data(b"one");
                // Echoed: the connection is on its data path before the cut.
                c.expect_data(b"one");
                let record = c.record(APPLICATION_DATA, b"cut in two");
                (&c.sock).write_all(&record[..9]).expect("half a record");
                std::thread::sleep(Duration::from_millis(200));
                // The run drops the client next: with linger 0 its close sends the RST.
                socket2::SockRef::from(&c.sock)
                    .set_linger(Some(Duration::ZERO))
                    .expect("linger 0");
                Vec::new()
            },
            userspace: Reason::PeerReset,
            ktls: Reason::PeerReset,
        },
    ];
    run_sealed_cases(
        "alerts_and_cut_records_mid_stream_end_the_session_as_the_rfc_says",
        &cases,
    );
}
