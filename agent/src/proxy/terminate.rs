//! terminate: client TLS in, plaintext TCP to the upstream.
//!
//! After the handshake the connection takes one of two data paths, and says which and why:
//! - ktls: the keys go to the kernel and both directions are spliced through a pipe, so the
//!   payload never enters user space;
//! - userspace: rustls keeps the record layer and a copy loop moves the plaintext.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::os::fd::AsFd;

use rustls::{Connection, ServerConnection};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::TcpStream;

use super::{ConnectionReport, DataPath, ListenerState};
use crate::config::DataPathPolicy;
use crate::handoff::{self, complete_handshake_async, flush_tls};
use crate::ktls::{self, Cipher, RecordType, TlsVersion};
use crate::splice::{self, Pipe};

/// Bytes asked of one splice call, and the pipe size requested.
const SPLICE_CHUNK: usize = 256 * 1024;

fn cipher_of(conn: &Connection) -> Option<Cipher> {
    use rustls::CipherSuite as S;
    match conn.negotiated_cipher_suite()?.suite() {
        S::TLS13_AES_128_GCM_SHA256
        | S::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
        | S::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => Some(Cipher::Aes128Gcm),
        S::TLS13_AES_256_GCM_SHA384
        | S::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
        | S::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => Some(Cipher::Aes256Gcm),
        S::TLS13_CHACHA20_POLY1305_SHA256
        | S::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
        | S::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256 => Some(Cipher::Chacha20Poly1305),
        _ => None,
    }
}

/// Handles one accepted client connection to the end.
pub(crate) async fn handle(
    state: &ListenerState,
    mut client: TcpStream,
    peer: SocketAddr,
) -> ConnectionReport {
    let cfg = &state.config;
    let mut report = ConnectionReport {
        listener: cfg.name.clone(),
        peer,
        data_path: None,
        reason: String::new(),
        session: String::new(),
        bytes_up: 0,
        bytes_down: 0,
        error: None,
    };
    let peer_s = peer.to_string();
    let mut conn: Connection = match ServerConnection::new(state.tls.clone()) {
        Ok(c) => c.into(),
        Err(e) => {
            report.error = Some(format!("rustls: {e}"));
            return report;
        }
    };
    let handshake = complete_handshake_async(&mut conn, &mut client, &peer_s);
    match tokio::time::timeout(cfg.handshake_timeout(), handshake).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            report.reason = "handshake failed".into();
            report.error = Some(e.to_string());
            linger_close(client).await;
            return report;
        }
        Err(_) => {
            report.reason = "handshake timeout".into();
            report.error = Some(format!(
                "no complete handshake within {} ms",
                cfg.handshake_timeout_ms
            ));
            return report;
        }
    }
    let version = conn.protocol_version().and_then(TlsVersion::from_rustls);
    let cipher = cipher_of(&conn);
    report.session = match (version, cipher) {
        (Some(v), Some(c)) => format!("{v} {c}"),
        _ => format!("{:?}", conn.negotiated_cipher_suite()),
    };

    let upstream =
        match tokio::time::timeout(cfg.connect_timeout(), TcpStream::connect(cfg.upstream)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                report.reason = "upstream unreachable".into();
                report.error = Some(format!("connect {}: {e}", cfg.upstream));
                close_userspace(conn, &mut client).await;
                return report;
            }
            Err(_) => {
                report.reason = "upstream connect timeout".into();
                report.error = Some(format!(
                    "connect {}: no answer within {} ms",
                    cfg.upstream, cfg.connect_timeout_ms
                ));
                close_userspace(conn, &mut client).await;
                return report;
            }
        };

    let offload = state.caps.offload(version, cipher);
    let (path, reason) = match (cfg.data_path, offload) {
        (DataPathPolicy::Userspace, _) => (
            DataPath::Userspace,
            "listener data_path = userspace".to_owned(),
        ),
        (_, Ok(())) => (
            DataPath::Ktls,
            format!("kernel offloads {}", report.session),
        ),
        (DataPathPolicy::Auto, Err(why)) => (DataPath::Userspace, why),
        (DataPathPolicy::Ktls, Err(why)) => {
            report.reason = format!("listener requires ktls: {why}");
            report.error = Some("connection refused by data_path = ktls".into());
            close_userspace(conn, &mut client).await;
            return report;
        }
    };
    report.data_path = Some(path);
    report.reason = reason;
    tracing::debug!(listener = %cfg.name, peer = %peer, data_path = %path, reason = %report.reason,
        session = %report.session, "data path chosen");

    let result = match path {
        DataPath::Ktls => match handoff::into_kernel(conn, client.as_fd(), &peer_s) {
            Ok(_) => splice_relay(&client, &upstream).await,
            Err(e) => Err(io::Error::other(e.to_string())),
        },
        DataPath::Userspace => userspace_relay(conn, client, upstream).await,
    };
    match result {
        Ok((up, down)) => {
            report.bytes_up = up;
            report.bytes_down = down;
        }
        Err(e) => report.error = Some(e.to_string()),
    }
    report
}

/// Closes after a failed handshake without a reset: rustls already sent its alert, so send FIN
/// and discard what the client still sends (bounded in bytes and time). Closing a socket with
/// unread input would make the kernel answer with RST, and the client might lose the alert.
async fn linger_close(mut sock: TcpStream) {
    let _ = sock.shutdown().await;
    let mut sink = [0u8; 4096];
    let drain = async {
        let mut left = 64 * 1024usize;
        while left > 0 {
            match sock.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), drain).await;
}

/// Sends close_notify from a connection still in user space, best effort.
async fn close_userspace(mut conn: Connection, sock: &mut TcpStream) {
    conn.send_close_notify();
    if flush_tls(&mut conn, &mut Vec::new(), sock).await.is_ok() {
        let _ = sock.shutdown().await;
    }
}

fn shutdown_write(sock: &TcpStream) -> io::Result<()> {
    socket2::SockRef::from(sock).shutdown(Shutdown::Write)
}

/// Moves bytes from `src` to `dst` through a pipe until `src` ends. When `src_ktls`, control
/// records on `src` are handled (close_notify ends the stream, session tickets are skipped,
/// anything else is an error); when `dst_ktls`, the end is signalled with close_notify.
async fn pump(src: &TcpStream, dst: &TcpStream, src_ktls: bool, dst_ktls: bool) -> io::Result<u64> {
    let pipe = Pipe::new(SPLICE_CHUNK)?;
    let mut total = 0u64;
    loop {
        let n = loop {
            src.readable().await?;
            match src.try_io(Interest::READABLE, || {
                splice::splice(src.as_fd(), pipe.write_end(), SPLICE_CHUNK)
            }) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                // A kTLS socket refuses to splice a non-data record: read it with its type.
                Err(e) if src_ktls && e.raw_os_error() == Some(libc::EINVAL) => {
                    if control_record(src)? {
                        break 0;
                    }
                }
                Err(e) => return Err(e),
            }
        };
        if n == 0 {
            if dst_ktls {
                ktls::send_record(dst.as_fd(), RecordType::Alert, &[1, 0])?;
            }
            shutdown_write(dst)?;
            return Ok(total);
        }
        let mut left = n;
        while left > 0 {
            dst.writable().await?;
            match dst.try_io(Interest::WRITABLE, || {
                splice::splice(pipe.read_end(), dst.as_fd(), left)
            }) {
                Ok(m) => left -= m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        total += n as u64;
    }
}

/// Reads one control record from a kTLS socket. `Ok(true)`: close_notify (end of stream).
fn control_record(sock: &TcpStream) -> io::Result<bool> {
    let mut buf = [0u8; 16 * 1024];
    let (record_type, n) = sock.try_io(Interest::READABLE, || {
        ktls::recv_record(sock.as_fd(), &mut buf)
    })?;
    match record_type {
        RecordType::Alert if n >= 2 && buf[1] == 0 => Ok(true),
        RecordType::Alert => Err(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            format!(
                "client sent TLS alert level {} description {}",
                buf[0],
                buf.get(1).copied().unwrap_or(0)
            ),
        )),
        // NewSessionTicket (4) is only meaningful to clients: skip it.
        RecordType::Handshake if n >= 1 && buf[0] == 4 => Ok(false),
        // KeyUpdate (24): following it needs kernel >= 6.14 and is not implemented yet; ending
        // the connection is the only way to avoid decrypting with stale keys.
        RecordType::Handshake if n >= 1 && buf[0] == 24 => Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "client sent TLS 1.3 KeyUpdate: rekeying under kTLS is not supported, closing",
        )),
        RecordType::ApplicationData if n == 0 => Ok(true),
        other => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected {other:?} record from a kTLS peer"),
        )),
    }
}

/// Both directions spliced; returns (bytes up, bytes down).
async fn splice_relay(client: &TcpStream, upstream: &TcpStream) -> io::Result<(u64, u64)> {
    tokio::try_join!(
        pump(client, upstream, true, false),
        pump(upstream, client, false, true)
    )
}

/// rustls in user space: decrypt from the client, copy to the upstream, and back.
async fn userspace_relay(
    mut conn: Connection,
    client: TcpStream,
    upstream: TcpStream,
) -> io::Result<(u64, u64)> {
    let (mut client_rd, mut client_wr) = client.into_split();
    let (mut up_rd, mut up_wr) = upstream.into_split();
    let mut tls_in = vec![0u8; 32 * 1024];
    let mut plain = vec![0u8; 32 * 1024];
    let mut from_up = vec![0u8; 16 * 1024];
    let mut tls_out = Vec::new();
    let (mut client_open, mut upstream_open) = (true, true);
    let (mut up_bytes, mut down_bytes) = (0u64, 0u64);
    loop {
        flush_tls(&mut conn, &mut tls_out, &mut client_wr).await?;
        if !client_open && !upstream_open {
            return Ok((up_bytes, down_bytes));
        }
        tokio::select! {
            r = client_rd.read(&mut tls_in), if client_open => {
                let n = r?;
                if n == 0 {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof,
                        "client closed TCP without close_notify"));
                }
                // rustls holds a bounded amount of plaintext: decrypt a piece, pass it on,
                // then the next piece.
                let mut input = &tls_in[..n];
                while !input.is_empty() && client_open {
                    conn.read_tls(&mut input)?;
                    if let Err(e) = conn.process_new_packets() {
                        flush_tls(&mut conn, &mut tls_out, &mut client_wr).await?;
                        return Err(io::Error::new(io::ErrorKind::InvalidData, e));
                    }
                    loop {
                        match conn.reader().read(&mut plain) {
                            Ok(0) => {
                                client_open = false;
                                up_wr.shutdown().await?;
                                break;
                            }
                            Ok(m) => {
                                up_wr.write_all(&plain[..m]).await?;
                                up_bytes += m as u64;
                            }
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                            Err(e) => return Err(e),
                        }
                    }
                }
            }
            r = up_rd.read(&mut from_up), if upstream_open => {
                let n = r?;
                if n == 0 {
                    upstream_open = false;
                    conn.send_close_notify();
                } else {
                    // rustls buffers a bounded amount of plaintext: hand it over in pieces,
                    // sending the records each piece becomes.
                    let mut data = &from_up[..n];
                    while !data.is_empty() {
                        let taken = conn.writer().write(data)?;
                        data = &data[taken..];
                        flush_tls(&mut conn, &mut tls_out, &mut client_wr).await?;
                    }
                    down_bytes += n as u64;
                }
            }
        }
    }
}
