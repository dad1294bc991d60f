//! Every mode x data path with real traffic: 64 MiB each way byte-identical, then 10,000 small
//! request/response exchanges on one session.
//!
//! Where each row runs is decided by [`runs_here`] and printed when it does not.
//!
//! "best" is the listener's default (`data_path = "auto"`): kTLS + splice in the guests, user
//! space on the host (the report says why), splice for passthrough. "userspace" forces the copy
//! loop. The wire checks for each mode live in its own test file (terminate, reencrypt,
//! passthrough); this file is about volume and many round trips.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use rustls::{ClientConnection, ServerConfig, ServerConnection, StreamOwned};
use tlsplice::config::{DataPathPolicy, Mode};
use tlsplice::outcome::{ConnectionReport, DataPath};
use tlsplice_tests::{
    Agent, TestPki, expect_pattern, expected_auto_path, in_guest, listener, send_pattern, skip,
};

/// Bytes each way in the bulk transfer.
const BULK: usize = 64 << 20;
/// Request/response exchanges on one session.
const EXCHANGES: usize = 10_000;
/// Bytes in each request and each response.
const MESSAGE: usize = 64;

/// One end of a connection: plaintext TCP or a rustls session over it.
enum End<C> {
    Plain(TcpStream),
    Tls(StreamOwned<C, TcpStream>),
}

impl<C, S> End<C>
where
    C: std::ops::DerefMut<Target = rustls::ConnectionCommon<S>>,
    S: rustls::SideData,
{
    fn io(&mut self) -> &mut dyn ReadWrite {
        match self {
            End::Plain(s) => s,
            End::Tls(t) => t,
        }
    }

    /// Ends our direction (close_notify on TLS, then FIN) and waits for the peer to end its.
    fn close(self) -> Result<(), String> {
        match self {
            End::Plain(mut s) => {
                s.shutdown(std::net::Shutdown::Write)
                    .map_err(|e| e.to_string())?;
                drain(&mut s)
            }
            End::Tls(mut t) => {
                t.conn.send_close_notify();
                t.flush().map_err(|e| e.to_string())?;
                drain(&mut t)
            }
        }
    }

    /// Waits for the peer's end of stream, then ends ours.
    fn close_after_peer(self) -> Result<(), String> {
        match self {
            End::Plain(mut s) => {
                drain(&mut s)?;
                s.shutdown(std::net::Shutdown::Write)
                    .map_err(|e| e.to_string())
            }
            End::Tls(mut t) => {
                drain(&mut t)?;
                t.conn.send_close_notify();
                t.flush().map_err(|e| e.to_string())
            }
        }
    }
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

fn drain(r: &mut impl Read) -> Result<(), String> {
    let mut rest = Vec::new();
    r.read_to_end(&mut rest)
        .map_err(|e| format!("awaiting the end of stream: {e}"))?;
    if rest.is_empty() {
        Ok(())
    } else {
        Err(format!("{} unexpected bytes before the end", rest.len()))
    }
}

/// Whether the upstream terminates TLS itself (reencrypt, originate, passthrough).
fn upstream_tls(mode: Mode) -> bool {
    matches!(mode, Mode::Reencrypt | Mode::Originate | Mode::Passthrough)
}

/// The upstream for one connection: the bulk transfer, or echoes of the exchanges.
fn upstream(
    mode: Mode,
    config: Arc<ServerConfig>,
    bulk: bool,
) -> (SocketAddr, thread::JoinHandle<Result<(), String>>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind upstream");
    let addr = l.local_addr().expect("addr");
    let handle = thread::spawn(move || {
        let (sock, _) = l.accept().map_err(|e| e.to_string())?;
        let mut end = if upstream_tls(mode) {
            let conn = ServerConnection::new(config).map_err(|e| e.to_string())?;
            End::Tls(StreamOwned::new(conn, sock))
        } else {
            End::Plain(sock)
        };
        let io = end.io();
        if bulk {
            expect_pattern(io, 1, BULK).map_err(|e| format!("upstream receiving: {e}"))?;
            send_pattern(io, 2, BULK).map_err(|e| format!("upstream sending: {e}"))?;
        } else {
            let mut message = [0u8; MESSAGE];
            for i in 0..EXCHANGES {
                io.read_exact(&mut message)
                    .and_then(|()| io.write_all(&message))
                    .map_err(|e| format!("upstream exchange {i}: {e}"))?;
            }
        }
        end.close_after_peer()
    });
    (addr, handle)
}

/// A client connection through the agent: TLS unless the mode takes plaintext in.
fn client(mode: Mode, agent: SocketAddr, pki: &TestPki) -> End<ClientConnection> {
    let sock = TcpStream::connect(agent).expect("connect");
    sock.set_read_timeout(Some(Duration::from_secs(300)))
        .expect("timeout");
    if mode == Mode::Originate {
        return End::Plain(sock);
    }
    let name = ServerName::try_from("localhost").expect("name");
    let conn = ClientConnection::new(pki.client_config(), name).expect("client");
    End::Tls(StreamOwned::new(conn, sock))
}

/// Checks a report; passthrough counts TLS bytes, the other modes plaintext.
fn check(report: &ConnectionReport, mode: Mode, expected: DataPath, bytes: u64) {
    assert_eq!(report.error, None, "{report:?}");
    assert_eq!(report.data_path, Some(expected), "{report:?}");
    if mode == Mode::Passthrough {
        assert!(
            report.bytes_up > bytes && report.bytes_down > bytes,
            "{report:?}"
        );
    } else {
        assert_eq!(report.bytes_up, bytes, "{report:?}");
        assert_eq!(report.bytes_down, bytes, "{report:?}");
    }
}

/// Where each row runs, within the matrix's time (the guests are emulated): the user-space rows
/// on the host, since the copy loop is the same code on every kernel; the kernel rows (ktls,
/// splice) on the host and in every guest.
fn runs_here(test: &str, policy: DataPathPolicy) -> bool {
    if in_guest() && policy == DataPathPolicy::Userspace {
        skip(
            test,
            "the user-space copy loop is kernel-independent: this row runs on the host",
        );
        return false;
    }
    true
}

/// One connection through an agent for `mode` with `policy`: the 64 MiB transfer (`bulk`) or
/// the 10,000 exchanges, then a clean close, and the report checked.
fn run(mode: Mode, policy: DataPathPolicy, bulk: bool) {
    let pki = TestPki::generate();
    let dir = pki.write_files();
    let (upstream_addr, upstream_done) = upstream(mode, pki.server_config(), bulk);
    // passthrough has no TLS material of its own; `listener` leaves it out.
    let mut agent = Agent::start(listener(mode, &dir, upstream_addr, policy));
    let expected = match (mode, policy) {
        (_, DataPathPolicy::Userspace) => DataPath::Userspace,
        (Mode::Passthrough, _) => DataPath::Splice,
        _ => expected_auto_path().0,
    };
    let started = Instant::now();
    let mut c = client(mode, agent.addr, &pki);
    let (bytes, what) = if bulk {
        send_pattern(c.io(), 1, BULK).expect("client sending");
        expect_pattern(c.io(), 2, BULK).expect("client receiving");
        (BULK, format!("{} MiB each way byte-identical", BULK >> 20))
    } else {
        let mut answer = [0u8; MESSAGE];
        for i in 0..EXCHANGES {
            let request = [(i % 251) as u8; MESSAGE];
            c.io().write_all(&request).expect("request");
            c.io().read_exact(&mut answer).expect("response");
            assert_eq!(answer, request, "exchange {i}");
        }
        (
            EXCHANGES * MESSAGE,
            format!("{EXCHANGES} exchanges of {MESSAGE} bytes"),
        )
    };
    c.close().expect("clean close");
    let report = agent.next_report();
    check(&report, mode, expected, bytes as u64);
    upstream_done
        .join()
        .expect("upstream thread")
        .expect("upstream");
    println!(
        "{mode:?} over {expected}: {what} in {:.1} s ({})",
        started.elapsed().as_secs_f64(),
        report.session
    );
    let _ = std::fs::remove_dir_all(dir);
}

macro_rules! mode_tests {
    ($($bulk:ident, $small:ident: $mode:expr, $policy:expr;)*) => {$(
        #[test]
        #[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
        fn $bulk() {
            if runs_here(stringify!($bulk), $policy) {
                run($mode, $policy, true);
            }
        }

        #[test]
        #[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
        fn $small() {
            if runs_here(stringify!($small), $policy) {
                run($mode, $policy, false);
            }
        }
    )*};
}

mode_tests! {
    terminate_best_64mib, terminate_best_exchanges: Mode::Terminate, DataPathPolicy::Auto;
    terminate_userspace_64mib, terminate_userspace_exchanges: Mode::Terminate, DataPathPolicy::Userspace;
    reencrypt_best_64mib, reencrypt_best_exchanges: Mode::Reencrypt, DataPathPolicy::Auto;
    reencrypt_userspace_64mib, reencrypt_userspace_exchanges: Mode::Reencrypt, DataPathPolicy::Userspace;
    originate_best_64mib, originate_best_exchanges: Mode::Originate, DataPathPolicy::Auto;
    originate_userspace_64mib, originate_userspace_exchanges: Mode::Originate, DataPathPolicy::Userspace;
    passthrough_splice_64mib, passthrough_splice_exchanges: Mode::Passthrough, DataPathPolicy::Auto;
    passthrough_userspace_64mib, passthrough_userspace_exchanges: Mode::Passthrough, DataPathPolicy::Userspace;
}
