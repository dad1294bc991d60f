//! passthrough: the client's TLS goes to the upstream untouched. The agent peeks at the
//! ClientHello (without consuming it) for the server name, picks the upstream by it, and moves
//! the bytes between two plain TCP sockets: spliced in the kernel (data path `splice`),
//! redirected by the eBPF sock hash (`sockmap`, when the node asks for it or measures it
//! cheaper: see [`PlainPath::decide`]), or with a user-space copy loop when the listener sets
//! `data_path = "userspace"`.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};

use super::relay::{
    RekeyPolicy, connect_upstream, idle_watch, linger_close, sockmap_relay, splice_relay,
    userspace_relay, with_idle_timeout, write_proxy_header,
};
use super::{ConnectionReport, DataPath, ListenerState};
use crate::client_hello::{self, ClientHelloError, MAX_CLIENT_HELLO, Peek};
use crate::config::{DataPathPolicy, PassthroughPath};

/// How passthrough listeners relay, decided once for the node, and why.
#[derive(Debug, Clone)]
pub struct PlainPath {
    /// `true`: the sockmap; `false`: splice.
    sockmap: bool,
    /// Why, for every connection's reason.
    why: Arc<str>,
}

impl Default for PlainPath {
    /// Splice, until the agent has decided (in-process proxies that never decide keep it).
    fn default() -> Self {
        Self {
            sockmap: false,
            why: Arc::from("ebpf.passthrough = splice"),
        }
    }
}

impl PlainPath {
    /// Splice, because the agent started without a passthrough listener and so did not
    /// measure (a passthrough listener added later by a reload gets this, and says so).
    pub fn not_measured(wanted: PassthroughPath) -> Self {
        Self {
            sockmap: false,
            why: Arc::from(format!(
                "ebpf.passthrough = {}: not measured, the agent started without a passthrough listener (restart it to measure)",
                match wanted {
                    PassthroughPath::Auto => "auto",
                    PassthroughPath::Splice => "splice",
                    PassthroughPath::Sockmap => "sockmap",
                }
            )),
        }
    }
}

/// What one plain-leg path cost on this kernel.
#[derive(Debug, Clone, Copy)]
pub struct PathCost {
    /// Node CPU seconds (every CPU, kernel workers included) per GiB moved.
    pub cpu_seconds_per_gib: f64,
    /// Throughput in MiB/s.
    pub mib_per_second: f64,
}

/// How long each path is measured for by `passthrough = "auto"`.
const MEASURE_FOR: Duration = Duration::from_millis(400);

impl PlainPath {
    /// The node's choice: as configured, or for `auto` by measuring both paths here. Without
    /// the eBPF programs it is splice, and says so.
    pub async fn decide(
        wanted: PassthroughPath,
        bpf: Option<&crate::bpf::LoadedBpf>,
        ebpf_off: Option<&str>,
    ) -> Self {
        let splice = |why: String| Self {
            sockmap: false,
            why: Arc::from(why),
        };
        match (wanted, bpf) {
            (PassthroughPath::Splice, _) => Self::default(),
            (PassthroughPath::Sockmap, Some(_)) => Self {
                sockmap: true,
                why: Arc::from("ebpf.passthrough = sockmap"),
            },
            (PassthroughPath::Sockmap | PassthroughPath::Auto, None) => splice(format!(
                "ebpf.passthrough = {} but eBPF is off: {}",
                if wanted == PassthroughPath::Auto {
                    "auto"
                } else {
                    "sockmap"
                },
                ebpf_off.unwrap_or("not loaded")
            )),
            (PassthroughPath::Auto, Some(bpf)) => {
                let measured = async {
                    Ok::<_, io::Error>((measure(false, bpf).await?, measure(true, bpf).await?))
                };
                match measured.await {
                    Ok((s, m)) => {
                        let sockmap = m.cpu_seconds_per_gib
                            < s.cpu_seconds_per_gib * (1.0 - crate::config::SOCKMAP_MARGIN);
                        let why = format!(
                            "ebpf.passthrough = auto: measured splice {:.2} CPU s/GiB ({:.0} MiB/s), sockmap {:.2} CPU s/GiB ({:.0} MiB/s); sockmap needs {:.0}% less",
                            s.cpu_seconds_per_gib,
                            s.mib_per_second,
                            m.cpu_seconds_per_gib,
                            m.mib_per_second,
                            crate::config::SOCKMAP_MARGIN * 100.0
                        );
                        tracing::info!(
                            chosen = if sockmap { "sockmap" } else { "splice" },
                            "{why}"
                        );
                        Self {
                            sockmap,
                            why: Arc::from(why),
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "measuring the passthrough paths failed: splice");
                        splice(format!("ebpf.passthrough = auto, measuring failed: {e}"))
                    }
                }
            }
        }
    }

    /// Whether the sockmap path is chosen.
    pub fn is_sockmap(&self) -> bool {
        self.sockmap
    }

    /// Why this path.
    pub fn why(&self) -> &str {
        &self.why
    }
}

/// Relays loopback traffic for [`MEASURE_FOR`] over one plain-leg path, the way a passthrough
/// connection is relayed, and returns what it cost the node.
async fn measure(sockmap: bool, bpf: &crate::bpf::LoadedBpf) -> io::Result<PathCost> {
    let front = TcpListener::bind("127.0.0.1:0").await?;
    let back = TcpListener::bind("127.0.0.1:0").await?;
    let (front_addr, back_addr) = (front.local_addr()?, back.local_addr()?);
    let stop = Arc::new(AtomicBool::new(false));
    let sender_stop = stop.clone();
    let sender = std::thread::spawn(move || -> io::Result<()> {
        let mut sock = std::net::TcpStream::connect(front_addr)?;
        let chunk = vec![0u8; 256 * 1024];
        while !sender_stop.load(Ordering::Relaxed) {
            sock.write_all(&chunk)?;
        }
        sock.shutdown(std::net::Shutdown::Write)?;
        let mut rest = Vec::new();
        sock.read_to_end(&mut rest)?;
        Ok(())
    });
    let sink = std::thread::spawn(move || -> io::Result<u64> {
        let listener = back.into_std()?;
        listener.set_nonblocking(false)?;
        let (mut sock, _) = listener.accept()?;
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0u64;
        loop {
            match sock.read(&mut buf)? {
                0 => return Ok(total),
                n => total += n as u64,
            }
        }
    });
    let (client, _) = front.accept().await?;
    let upstream = TcpStream::connect(back_addr).await?;
    let cpu_before = crate::probe::node_busy_seconds()?;
    let started = Instant::now();
    let timer_stop = stop.clone();
    let timer = tokio::spawn(async move {
        tokio::time::sleep(MEASURE_FOR).await;
        timer_stop.store(true, Ordering::Relaxed);
    });
    let outcome = if sockmap {
        sockmap_relay(&client, &upstream, bpf, tlsplice_common::NO_LISTENER)
            .await
            .map_err(io::Error::other)?
    } else {
        let policy = RekeyPolicy {
            kernel: Err("measurement".into()),
            after_records: None,
        };
        splice_relay(&client, None, &upstream, None, &policy).await
    };
    stop.store(true, Ordering::Relaxed);
    timer.abort();
    outcome.result?;
    drop((client, upstream));
    let joined = |r: std::thread::Result<io::Result<u64>>| {
        r.map_err(|_| io::Error::other("measurement thread panicked"))?
    };
    let moved = joined(sink.join())?;
    joined(sender.join().map(|r| r.map(|()| 0)))?;
    let seconds = started.elapsed().as_secs_f64();
    let cpu = crate::probe::node_busy_seconds()? - cpu_before;
    if moved == 0 {
        return Err(io::Error::other("no bytes moved"));
    }
    let gib = moved as f64 / f64::from(1u32 << 30);
    Ok(PathCost {
        cpu_seconds_per_gib: cpu / gib,
        mib_per_second: moved as f64 / f64::from(1u32 << 20) / seconds,
    })
}

/// Why no ClientHello could be read.
enum PeekFailure {
    Hello(ClientHelloError),
    Io(io::Error),
}

/// Waits until the client's first record is a complete ClientHello and returns its server
/// name; nothing is consumed from the socket.
async fn peek_server_name(sock: &TcpStream) -> Result<Option<String>, PeekFailure> {
    let mut buf = vec![0u8; MAX_CLIENT_HELLO];
    loop {
        let n = sock.peek(&mut buf).await.map_err(PeekFailure::Io)?;
        if n == 0 {
            return Err(PeekFailure::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "client closed before sending a ClientHello",
            )));
        }
        match client_hello::peek(&buf[..n]) {
            Ok(Peek::ClientHello { server_name }) => return Ok(server_name),
            // The socket stays readable while the bytes we peeked sit in it, so wait a little
            // for the rest of the record instead of spinning on readiness.
            Ok(Peek::Incomplete) => tokio::time::sleep(Duration::from_millis(5)).await,
            Err(e) => return Err(PeekFailure::Hello(e)),
        }
    }
}

/// Handles one accepted client connection to the end.
pub(crate) async fn handle(
    state: &ListenerState,
    client: TcpStream,
    peer: SocketAddr,
) -> ConnectionReport {
    let cfg = &state.config;
    let mut report = ConnectionReport::new(&cfg.name, peer);
    let peeked = tokio::time::timeout(cfg.handshake_timeout(), peek_server_name(&client)).await;
    let server_name = match peeked {
        Ok(Ok(name)) => name,
        Ok(Err(PeekFailure::Hello(e))) => {
            report.reason = match e {
                ClientHelloError::NotTls(_) => "not TLS",
                ClientHelloError::Oversized(_) => "oversized ClientHello",
                ClientHelloError::NotClientHello(_) | ClientHelloError::Malformed(_) => {
                    "malformed ClientHello"
                }
            }
            .to_owned();
            report.error = Some(e.to_string());
            linger_close(client).await;
            return report;
        }
        Ok(Err(PeekFailure::Io(e))) => {
            report.reason = "no ClientHello".into();
            report.error = Some(e.to_string());
            return report;
        }
        Err(_) => {
            report.reason = "handshake timeout".into();
            report.error = Some(format!(
                "no complete ClientHello within {} ms",
                cfg.handshake_timeout_ms
            ));
            linger_close(client).await;
            return report;
        }
    };
    report.session = format!("SNI {}", server_name.as_deref().unwrap_or("(none)"));
    let route = server_name
        .as_ref()
        .and_then(|name| cfg.sni.get(name))
        .copied()
        .or(cfg.upstream);
    let Some(upstream_addr) = route else {
        report.reason = "unknown SNI".into();
        report.error = Some(format!(
            "no route for server name {server_name:?} and no default upstream"
        ));
        linger_close(client).await;
        return report;
    };

    let mut upstream = match connect_upstream(upstream_addr, cfg.connect_timeout()).await {
        Ok(s) => s,
        Err((reason, error)) => {
            report.reason = reason.to_owned();
            report.error = Some(error);
            linger_close(client).await;
            return report;
        }
    };
    if let Err((reason, error)) = write_proxy_header(&mut upstream, cfg, &client, peer, None).await
    {
        report.reason = reason.to_owned();
        report.error = Some(error);
        linger_close(client).await;
        return report;
    }

    let splice_reason = "passthrough: both legs are plain TCP to the agent";
    let plain = &state.passthrough;
    let (path, reason) = match (cfg.data_path, plain.is_sockmap(), state.telemetry.bpf()) {
        (DataPathPolicy::Userspace, ..) => (
            DataPath::Userspace,
            "listener data_path = userspace".to_owned(),
        ),
        (_, true, Some(_)) => (
            DataPath::Sockmap,
            format!(
                "passthrough: plain legs redirected in the kernel ({})",
                plain.why()
            ),
        ),
        _ => (
            DataPath::Splice,
            format!("{splice_reason} ({})", plain.why()),
        ),
    };
    report.data_path = Some(path);
    report.reason = format!("{reason}; upstream {upstream_addr}");
    // Passthrough never holds keys, so there is nothing to rekey.
    let policy = RekeyPolicy {
        kernel: Err("passthrough holds no keys".into()),
        after_records: None,
    };
    let watch = idle_watch(&client, &upstream, &mut report.reason);
    let relay = async {
        match (path, state.telemetry.bpf()) {
            (DataPath::Userspace, _) => userspace_relay(client, None, upstream, None).await,
            (DataPath::Sockmap, Some(bpf)) => {
                match sockmap_relay(&client, &upstream, bpf, state.index).await {
                    Ok(outcome) => outcome,
                    Err(why) => {
                        report.data_path = Some(DataPath::Splice);
                        report.reason = format!(
                            "{splice_reason}; sockmap refused this connection: {why}; upstream {upstream_addr}"
                        );
                        splice_relay(&client, None, &upstream, None, &policy).await
                    }
                }
            }
            _ => splice_relay(&client, None, &upstream, None, &policy).await,
        }
    };
    let (outcome, idled) = with_idle_timeout(relay, watch, cfg.idle_timeout()).await;
    if idled {
        super::idled(&mut report, cfg.idle_timeout());
    }
    report.bytes_up = outcome.up;
    report.bytes_down = outcome.down;
    if !idled {
        report.error = outcome.result.err().map(|e| e.to_string());
    }
    report
}
