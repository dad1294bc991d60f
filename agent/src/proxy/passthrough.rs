//! passthrough: the client's TLS goes to the upstream untouched. The agent peeks at the
//! ClientHello (without consuming it) for the server name, picks the upstream by it, and moves
//! the bytes between two plain TCP sockets: spliced in the kernel (data path `splice`), or with
//! a user-space copy loop when the listener sets `data_path = "userspace"`.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;

use super::relay::{
    RekeyPolicy, connect_upstream, linger_close, sockmap_relay, splice_relay, userspace_relay,
    write_proxy_header,
};
use super::{ConnectionReport, DataPath, ListenerState};
use crate::client_hello::{self, ClientHelloError, MAX_CLIENT_HELLO, Peek};
use crate::config::{DataPathPolicy, PassthroughPath};

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
    let (path, reason) = match (cfg.data_path, state.passthrough, state.telemetry.bpf()) {
        (DataPathPolicy::Userspace, ..) => (
            DataPath::Userspace,
            "listener data_path = userspace".to_owned(),
        ),
        (_, PassthroughPath::Sockmap, Some(_)) => (
            DataPath::Sockmap,
            "passthrough: plain legs redirected in the kernel (ebpf.passthrough = sockmap)"
                .to_owned(),
        ),
        (_, PassthroughPath::Sockmap, None) => (
            DataPath::Splice,
            format!(
                "{splice_reason}; sockmap asked for but eBPF is off: {}",
                state.telemetry.ebpf().err().unwrap_or("unknown")
            ),
        ),
        (_, PassthroughPath::Splice, _) => (DataPath::Splice, splice_reason.to_owned()),
    };
    report.data_path = Some(path);
    report.reason = format!("{reason}; upstream {upstream_addr}");
    // Passthrough never holds keys, so there is nothing to rekey.
    let policy = RekeyPolicy {
        kernel: Err("passthrough holds no keys".into()),
        after_records: None,
    };
    let outcome = match (path, state.telemetry.bpf()) {
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
    };
    report.bytes_up = outcome.up;
    report.bytes_down = outcome.down;
    report.error = outcome.result.err().map(|e| e.to_string());
    report
}
