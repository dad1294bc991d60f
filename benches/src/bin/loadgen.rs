//! `tlsplice-loadgen`: the traffic generator and the upstream server of `cargo xtask bench`.
//!
//! Each runs as its own process, so the CPU it spends (TLS on the client and upstream side) is
//! never counted as the relay's. Every client workload prints one JSON object on stdout.
//!
//! The upstream speaks a one-byte protocol after its (optional) TLS handshake: `L` and an 8-byte
//! big-endian length, then that many bytes, which it counts and answers with the count as 8
//! bytes big-endian (so the client knows every byte crossed the relay; the count is asked for
//! by length, not by a half-close, which HAProxy 3.4 with kTLS answers by closing both ways
//! before the answer is back); `E` echoes everything back until the end of the stream.
//!
//! TLS is TLS 1.3 with `TLS_AES_128_GCM_SHA256` only on both ends, so every relay negotiates
//! the cipher the crypto bound is measured for; certificates are ECDSA P-256.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser)]
#[command(about = "Traffic generator and upstream for tlsplice's benchmarks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve as the upstream: sink or echo per connection, plain or TLS (with --cert/--key).
    Upstream {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long, requires = "key")]
        cert: Option<PathBuf>,
        #[arg(long)]
        key: Option<PathBuf>,
    },
    /// Send `bytes` on each of `conns` connections at once; report throughput.
    Bulk {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        bytes: u64,
        #[arg(long, default_value_t = 1)]
        conns: usize,
    },
    /// Request/response of `size` bytes at a fixed offered rate over `conns` connections.
    Rr {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        size: usize,
        /// Requests per second, all connections together.
        #[arg(long)]
        rate: f64,
        #[arg(long)]
        secs: f64,
        #[arg(long, default_value_t = 4)]
        conns: usize,
        /// Once every connection is open, print `{"connected": N}` and wait for a line on stdin
        /// before the first request (the caller reads the relay's CPU between the two, so the
        /// handshakes are not counted against the requests).
        #[arg(long)]
        wait: bool,
    },
    /// New connections per second: handshake, one echoed byte, close.
    Handshakes {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        secs: f64,
        #[arg(long, default_value_t = 8)]
        conns: usize,
        /// Offer TLS 1.3 session resumption (tickets kept from earlier connections).
        #[arg(long)]
        resume: bool,
    },
    /// Open `count` connections (each handshaken and one byte echoed), print a JSON line, and
    /// hold them until stdin closes.
    Idle {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        count: usize,
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
    },
}

#[derive(Args, Clone)]
struct Target {
    /// The relay's address.
    #[arg(long)]
    addr: SocketAddr,
    /// CA certificate (PEM) to trust: the client speaks TLS when it is given, plain TCP if not.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Server name to ask for.
    #[arg(long, default_value = "localhost")]
    sni: String,
}

/// A client or server stream, plain or TLS.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// One suite and one group for every relay's rows, client and upstream alike: X25519, which
/// every peer has (Debian 12's OpenSSL has no ML-KEM), so every session uses it. A relay's own
/// upstream leg may still offer more: tlsplice and OpenSSL 3.5 or later send an ML-KEM share
/// beside X25519 by default, and that is part of their rows.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::aws_lc_rs as p;
    Arc::new(rustls::crypto::CryptoProvider {
        cipher_suites: vec![p::cipher_suite::TLS13_AES_128_GCM_SHA256],
        kx_groups: vec![p::kx_group::X25519],
        ..p::default_provider()
    })
}

/// Connects to a target: TCP, then TLS when it has a CA. Says whether the session resumed.
struct Connector {
    target: Target,
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
}

impl Connector {
    fn new(target: &Target, resume: bool) -> Result<Self> {
        let tls = match &target.ca {
            None => None,
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in CertificateDer::pem_file_iter(ca)
                    .with_context(|| format!("reading {}", ca.display()))?
                {
                    roots.add(cert.context("CA PEM")?)?;
                }
                let mut config = rustls::ClientConfig::builder_with_provider(provider())
                    .with_protocol_versions(&[&rustls::version::TLS13])?
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                if !resume {
                    config.resumption = rustls::client::Resumption::disabled();
                }
                let name = ServerName::try_from(target.sni.clone())?;
                Some((tokio_rustls::TlsConnector::from(Arc::new(config)), name))
            }
        };
        Ok(Self {
            target: target.clone(),
            tls,
        })
    }

    /// Connects and completes the handshake, or fails after 10 s (a stalled relay).
    async fn connect(&self) -> Result<(Box<dyn Stream>, bool)> {
        tokio::time::timeout(Duration::from_secs(10), self.connect_now())
            .await
            .with_context(|| format!("no session with {} within 10 s", self.target.addr))?
    }

    async fn connect_now(&self) -> Result<(Box<dyn Stream>, bool)> {
        let tcp = TcpStream::connect(self.target.addr)
            .await
            .with_context(|| format!("connecting to {}", self.target.addr))?;
        tcp.set_nodelay(true)?;
        match &self.tls {
            None => Ok((Box::new(tcp), false)),
            Some((connector, name)) => {
                let tls = connector
                    .connect(name.clone(), tcp)
                    .await
                    .context("TLS handshake")?;
                let resumed =
                    tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
                Ok((Box::new(tls), resumed))
            }
        }
    }
}

async fn upstream(listen: SocketAddr, cert: Option<PathBuf>, key: Option<PathBuf>) -> Result<()> {
    let acceptor = match (cert, key) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(&cert)?.collect::<Result<Vec<_>, _>>()?;
            let key = PrivateKeyDer::from_pem_file(&key)?;
            let config = rustls::ServerConfig::builder_with_provider(provider())
                .with_protocol_versions(&[&rustls::version::TLS13])?
                .with_no_client_auth()
                .with_single_cert(chain, key)?;
            Some(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
        }
        _ => None,
    };
    let listener = TcpListener::bind(listen).await?;
    loop {
        let (tcp, _) = listener.accept().await?;
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let stream: Box<dyn Stream> = match acceptor {
                None => Box::new(tcp),
                Some(a) => match a.accept(tcp).await {
                    Ok(s) => Box::new(s),
                    Err(_) => return,
                },
            };
            let _ = serve_upstream(stream).await;
        });
    }
}

async fn serve_upstream(mut stream: Box<dyn Stream>) -> std::io::Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut first = [0u8; 1];
    stream.read_exact(&mut first).await?;
    match first[0] {
        b'L' => {
            let mut length = [0u8; 8];
            stream.read_exact(&mut length).await?;
            let length = u64::from_be_bytes(length);
            let mut total = 0u64;
            while total < length {
                let want = buf
                    .len()
                    .min(usize::try_from(length - total).unwrap_or(usize::MAX));
                let n = stream.read(&mut buf[..want]).await?;
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            stream.write_all(&total.to_be_bytes()).await?;
            stream.flush().await?;
        }
        _ => loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            // Out before the next read: TLS may hold records the socket had no room for.
            stream.write_all(&buf[..n]).await?;
            stream.flush().await?;
        },
    }
    stream.shutdown().await
}

async fn bulk(target: Target, bytes: u64, conns: usize) -> Result<serde_json::Value> {
    let connector = Arc::new(Connector::new(&target, false)?);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let connector = connector.clone();
        tasks.push(tokio::spawn(async move {
            let (mut s, _) = connector.connect().await?;
            let chunk = vec![0x5au8; 256 * 1024];
            s.write_all(b"L").await?;
            s.write_all(&bytes.to_be_bytes()).await?;
            let mut sent = 0u64;
            while sent < bytes {
                let n = chunk
                    .len()
                    .min(usize::try_from(bytes - sent).unwrap_or(usize::MAX));
                s.write_all(&chunk[..n]).await?;
                sent += n as u64;
            }
            // TLS may still hold the last records: out with them before waiting for the answer.
            s.flush().await?;
            let mut count = [0u8; 8];
            s.read_exact(&mut count)
                .await
                .context("the upstream's byte count")?;
            // The count is in: how the relay passes the close on is not measured here.
            let _ = s.shutdown().await;
            let got = u64::from_be_bytes(count);
            if got != bytes {
                bail!("the upstream received {got} bytes of {bytes}");
            }
            anyhow::Ok(())
        }));
    }
    let mut errors = Vec::new();
    for t in tasks {
        if let Err(e) = t.await? {
            errors.push(format!("{e:#}"));
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let moved = bytes * (conns - errors.len()) as u64;
    Ok(json!({
        "bytes": moved, "secs": secs, "conns": conns,
        "errors": errors.len(), "first_error": errors.first(),
    }))
}

async fn request_response(
    target: Target,
    size: usize,
    rate: f64,
    secs: f64,
    conns: usize,
    wait: bool,
) -> Result<serde_json::Value> {
    let connector = Connector::new(&target, false)?;
    let interval = Duration::from_secs_f64(conns as f64 / rate);
    let run_for = Duration::from_secs_f64(secs);
    // Every connection open (and set to echo) before the first request: a thousand handshakes
    // would otherwise run beside the first requests.
    let mut streams = Vec::with_capacity(conns);
    for _ in 0..conns {
        let (mut s, _) = connector.connect().await?;
        s.write_all(b"E").await?;
        streams.push(s);
    }
    if wait {
        println!("{}", json!({ "connected": streams.len() }));
        tokio::task::spawn_blocking(|| std::io::stdin().read_line(&mut String::new())).await??;
    }
    let mut tasks = Vec::new();
    for (c, mut s) in streams.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let mut msg = vec![0x42u8; size];
            let mut samples = Vec::new();
            // Connections start staggered so the offered load is spread evenly.
            let start = Instant::now() + interval.mul_f64(c as f64 / conns as f64);
            let mut last_done = Instant::now();
            for i in 0u32.. {
                let due = start + interval * i;
                if due > start + run_for {
                    break;
                }
                tokio::time::sleep_until(due.into()).await;
                let sent = Instant::now();
                s.write_all(&msg).await?;
                s.flush().await?;
                s.read_exact(&mut msg).await?;
                let done = Instant::now();
                // On schedule, the clock starts at the send (the timer's own lateness is not the
                // relay's); behind schedule, at the due time, so a slow relay's queueing counts
                // (no coordinated omission).
                let from = if last_done <= due { sent } else { due };
                samples.push(done.duration_since(from).as_secs_f64() * 1e6);
                last_done = done;
            }
            s.shutdown().await?;
            anyhow::Ok(samples)
        }));
    }
    let mut all = Vec::new();
    let mut errors = Vec::new();
    for t in tasks {
        match t.await? {
            Ok(s) => all.extend(s),
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    all.sort_by(f64::total_cmp);
    let q = |p: f64| tlsplice_benches::percentile(&all, p);
    // 200 points of the distribution for the CDF plots.
    let cdf: Vec<[f64; 2]> = (0..=199)
        .map(|i| {
            let p = 1.0 - 0.5f64.powf(f64::from(i) / 20.0);
            [q(p), p]
        })
        .collect();
    Ok(json!({
        "samples": all.len(), "secs": secs, "offered_rate": rate, "size": size, "conns": conns,
        "p50_us": q(0.5), "p99_us": q(0.99), "p999_us": q(0.999), "max_us": all.last(),
        "cdf": cdf, "errors": errors.len(), "first_error": errors.first(),
    }))
}

async fn handshakes(
    target: Target,
    secs: f64,
    conns: usize,
    resume: bool,
) -> Result<serde_json::Value> {
    let connector = Arc::new(Connector::new(&target, resume)?);
    if resume {
        // One connection first, so the cache holds tickets before the timed run.
        one_exchange(&connector).await?;
    }
    let done = Arc::new(AtomicU64::new(0));
    let resumed = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let (connector, done, resumed) = (connector.clone(), done.clone(), resumed.clone());
        tasks.push(tokio::spawn(async move {
            // A count and the first message: a relay that refuses fast must not fill memory.
            let (mut count, mut first) = (0u64, None);
            while Instant::now() < deadline {
                match one_exchange(&connector).await {
                    Ok(r) => {
                        done.fetch_add(1, Ordering::Relaxed);
                        resumed.fetch_add(u64::from(r), Ordering::Relaxed);
                    }
                    Err(e) => {
                        count += 1;
                        first.get_or_insert_with(|| format!("{e:#}"));
                    }
                }
            }
            (count, first)
        }));
    }
    let (mut errors, mut first_error) = (0u64, None);
    for t in tasks {
        let (count, first) = t.await?;
        errors += count;
        first_error = first_error.or(first);
    }
    let secs = start.elapsed().as_secs_f64();
    let n = done.load(Ordering::Relaxed);
    Ok(json!({
        "handshakes": n, "secs": secs, "per_sec": n as f64 / secs,
        "resumed": resumed.load(Ordering::Relaxed), "resume_offered": resume,
        "errors": errors, "first_error": first_error,
    }))
}

/// Handshake, one byte there and back, close. Returns whether the session resumed.
async fn one_exchange(connector: &Connector) -> Result<bool> {
    let (mut s, resumed) = connector.connect().await?;
    s.write_all(b"E!").await?;
    let mut back = [0u8; 1];
    s.read_exact(&mut back).await.context("the echoed byte")?;
    s.shutdown().await?;
    Ok(resumed)
}

async fn idle(target: Target, count: usize, concurrency: usize) -> Result<()> {
    let connector = Arc::new(Connector::new(&target, false)?);
    let permits = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..count {
        let (connector, permits) = (connector.clone(), permits.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = permits.acquire().await?;
            // A relay past its connection limit may leave a connection waiting for good: count
            // it as an error rather than wait with it.
            let open = async {
                let (mut s, _) = connector.connect().await?;
                s.write_all(b"E!").await?;
                let mut back = [0u8; 1];
                s.read_exact(&mut back).await.context("the echoed byte")?;
                anyhow::Ok(s)
            };
            tokio::time::timeout(Duration::from_secs(60), open)
                .await
                .context("no session and echo within 60 s")?
        }));
    }
    let mut held = Vec::with_capacity(count);
    let mut errors = Vec::new();
    for t in tasks {
        match t.await? {
            Ok(s) => held.push(s),
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    println!(
        "{}",
        json!({
            "established": held.len(), "secs": start.elapsed().as_secs_f64(),
            "errors": errors.len(), "first_error": errors.first(),
        })
    );
    // Hold every connection until the harness has measured and closes our stdin.
    let _ = tokio::task::spawn_blocking(|| {
        let mut rest = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut rest)
    })
    .await;
    drop(held);
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    tlsplice_benches::raise_open_files_limit();
    let cli = Cli::parse();
    let report = match cli.command {
        Command::Upstream { listen, cert, key } => return upstream(listen, cert, key).await,
        Command::Idle {
            target,
            count,
            concurrency,
        } => return idle(target, count, concurrency).await,
        Command::Bulk {
            target,
            bytes,
            conns,
        } => bulk(target, bytes, conns).await?,
        Command::Rr {
            target,
            size,
            rate,
            secs,
            conns,
            wait,
        } => request_response(target, size, rate, secs, conns, wait).await?,
        Command::Handshakes {
            target,
            secs,
            conns,
            resume,
        } => handshakes(target, secs, conns, resume).await?,
    };
    println!("{report}");
    Ok(())
}
