//! kTLS smoke test: rustls handshakes, keys handed to the kernel, 16 MiB each way.
//!
//! Runs in the VM matrix (`cargo xtask test`, or `cargo xtask vm --kernel 6.12 --test
//! ktls_smoke`). On a kernel without kTLS it prints `TLSPLICE-SKIP ...: <reason>`; inside the
//! matrix's guests a missing kTLS fails instead.
//!
//! For each suite three pairings run: both ends in the kernel, then each end in the kernel
//! against a peer that stays in user-space rustls. The mixed pairings prove the kernel speaks
//! standard TLS with the keys we gave it, not merely the same thing on both ends.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;

use rustls::pki_types::ServerName;
use rustls::{ClientConnection, ServerConnection, StreamOwned};
use tlsplice::ktls::{TlsStat, TlsVersion};
use tlsplice_tests::ktls_stream::KtlsStream;
use tlsplice_tests::{SuiteUnderTest, TestPki, expect_pattern, require, send_pattern};

/// Bytes each way when both ends are kTLS.
const BULK: usize = 16 << 20;
/// Bytes each way when one end stays in user space.
const INTEROP: usize = 4 << 20;

enum Leg {
    Kernel(KtlsStream),
    UserClient(StreamOwned<ClientConnection, TcpStream>),
    UserServer(StreamOwned<ServerConnection, TcpStream>),
}

impl Leg {
    fn close_notify(&mut self) -> io::Result<()> {
        match self {
            Leg::Kernel(s) => s.close_notify(),
            Leg::UserClient(s) => {
                s.conn.send_close_notify();
                s.flush()
            }
            Leg::UserServer(s) => {
                s.conn.send_close_notify();
                s.flush()
            }
        }
    }

    /// The peer's next record must be close_notify: a read returns end of stream.
    fn expect_close_notify(&mut self) -> io::Result<()> {
        let mut buf = [0u8; 64];
        match self.read(&mut buf)? {
            0 => Ok(()),
            n => Err(io::Error::other(format!(
                "{n} bytes where close_notify was due"
            ))),
        }
    }
}

impl Read for Leg {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Leg::Kernel(s) => s.read(buf),
            Leg::UserClient(s) => s.read(buf),
            Leg::UserServer(s) => s.read(buf),
        }
    }
}

impl Write for Leg {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Leg::Kernel(s) => s.write(buf),
            Leg::UserClient(s) => s.write(buf),
            Leg::UserServer(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Leg::Kernel(s) => s.flush(),
            Leg::UserClient(s) => s.flush(),
            Leg::UserServer(s) => s.flush(),
        }
    }
}

fn check_session(leg: &Leg, suite: &SuiteUnderTest, side: &str) -> Result<(), String> {
    if let Leg::Kernel(s) = leg {
        let session = s.session();
        if session.version != suite.version || session.cipher != suite.cipher {
            return Err(format!(
                "{side}: kernel got {} {}, expected {} {}",
                session.version, session.cipher, suite.version, suite.cipher
            ));
        }
    }
    Ok(())
}

/// One connection: client sends `len` bytes, server checks them and sends `len` back, then
/// close_notify both ways. Returns the session tickets the kernel-side client consumed.
fn transfer(
    suite: &SuiteUnderTest,
    pki: &TestPki,
    client_in_kernel: bool,
    server_in_kernel: bool,
    len: usize,
) -> Result<u64, String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let server_config = suite.server_config(pki);
    let server_suite = *suite;
    let server = thread::spawn(move || -> Result<(), String> {
        let (sock, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
        let conn = ServerConnection::new(server_config).map_err(|e| e.to_string())?;
        let mut leg = if server_in_kernel {
            Leg::Kernel(KtlsStream::handshake(conn, sock).map_err(|e| format!("server: {e}"))?)
        } else {
            Leg::UserServer(StreamOwned::new(conn, sock))
        };
        check_session(&leg, &server_suite, "server")?;
        expect_pattern(&mut leg, 1, len).map_err(|e| format!("server receiving: {e}"))?;
        send_pattern(&mut leg, 2, len).map_err(|e| format!("server sending: {e}"))?;
        leg.expect_close_notify()
            .map_err(|e| format!("server awaiting close_notify: {e}"))?;
        leg.close_notify()
            .map_err(|e| format!("server close_notify: {e}"))
    });

    let client = || -> Result<u64, String> {
        let sock = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
        let name = ServerName::try_from("localhost").map_err(|e| e.to_string())?;
        let conn =
            ClientConnection::new(suite.client_config(pki), name).map_err(|e| e.to_string())?;
        let mut leg = if client_in_kernel {
            Leg::Kernel(KtlsStream::handshake(conn, sock).map_err(|e| format!("client: {e}"))?)
        } else {
            Leg::UserClient(StreamOwned::new(conn, sock))
        };
        check_session(&leg, suite, "client")?;
        send_pattern(&mut leg, 1, len).map_err(|e| format!("client sending: {e}"))?;
        expect_pattern(&mut leg, 2, len).map_err(|e| format!("client receiving: {e}"))?;
        leg.close_notify()
            .map_err(|e| format!("client close_notify: {e}"))?;
        leg.expect_close_notify()
            .map_err(|e| format!("client awaiting close_notify: {e}"))?;
        Ok(match &leg {
            Leg::Kernel(s) => s.ticket_records,
            _ => 0,
        })
    };
    let client_result = client();
    let server_result = server
        .join()
        .map_err(|_| "server thread panicked".to_owned())?;
    server_result?;
    client_result
}

fn run(suite: SuiteUnderTest) {
    let test = format!("ktls_smoke {}", suite.name);
    let unavailable = tlsplice::probe::ktls_available()
        .err()
        .map(|e| format!("kTLS unavailable: {e}"));
    if !require(&test, unavailable) {
        return;
    }
    let before = TlsStat::read()
        .expect("read tls_stat")
        .expect("/proc/net/tls_stat exists once the tls ULP is loaded");
    let pki = TestPki::generate();
    let mut kernel_sockets = 0;
    for (client_in_kernel, server_in_kernel, len) in [
        (true, true, BULK),
        (false, true, INTEROP),
        (true, false, INTEROP),
    ] {
        let tickets = transfer(&suite, &pki, client_in_kernel, server_in_kernel, len)
            .unwrap_or_else(|e| {
                panic!(
                    "{test} (client kTLS {client_in_kernel}, server kTLS {server_in_kernel}): {e}"
                )
            });
        if client_in_kernel && suite.version == TlsVersion::Tls13 {
            // rustls servers send NewSessionTickets after the handshake: the kernel-side client
            // must have received them as control records, not as data or an error.
            assert!(
                tickets > 0,
                "{test}: no NewSessionTicket seen by the kTLS client"
            );
        }
        kernel_sockets += u64::from(client_in_kernel) + u64::from(server_in_kernel);
        println!(
            "{test}: client {} server {}: {} MiB each way byte-identical, {tickets} NewSessionTicket records",
            if client_in_kernel { "kTLS" } else { "rustls" },
            if server_in_kernel { "kTLS" } else { "rustls" },
            len >> 20
        );
    }
    let after = TlsStat::read()
        .expect("read tls_stat")
        .expect("/proc/net/tls_stat still exists");
    for counter in ["TlsTxSw", "TlsRxSw"] {
        let (b, a) = (before.get(counter), after.get(counter));
        assert!(
            a >= b + kernel_sockets,
            "{test}: {counter} rose from {b} to {a}, expected at least {kernel_sockets} more"
        );
        println!("{test}: {counter} {b} -> {a}");
    }
}

#[test]
#[ignore = "needs kTLS: runs in the VM kernel matrix (cargo xtask test)"]
fn tls13_aes_128_gcm() {
    run(SuiteUnderTest::tls13_aes128gcm());
}

#[test]
#[ignore = "needs kTLS: runs in the VM kernel matrix (cargo xtask test)"]
fn tls13_aes_256_gcm() {
    run(SuiteUnderTest::tls13_aes256gcm());
}

#[test]
#[ignore = "needs kTLS: runs in the VM kernel matrix (cargo xtask test)"]
fn tls13_chacha20_poly1305() {
    run(SuiteUnderTest::tls13_chacha20());
}

#[test]
#[ignore = "needs kTLS: runs in the VM kernel matrix (cargo xtask test)"]
fn tls12_ecdhe_aes_128_gcm() {
    run(SuiteUnderTest::tls12_ecdhe_aes128gcm());
}
