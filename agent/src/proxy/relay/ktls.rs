//! The ktls data path: every TLS leg's session goes to the kernel (keys installed, zeroized in
//! user space), then both directions are spliced ([`super::splice`]): the kernel decrypts into
//! the pipe and encrypts out of it, so the payload never enters user space. What stays with the
//! agent is a leg's [`KtlsLeg`]: control records (close_notify, alerts, NewSessionTicket,
//! KeyUpdate) read with their record type, and records counted against the cipher's
//! confidentiality limit, with a KeyUpdate of our own (or a close) before it.

use std::io;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::io::Interest;

use super::RelayOutcome;
use super::splice::{self, RecordLayer};
use crate::handoff::{KernelSession, TlsSession};
use crate::ktls::{self, Direction, RecordType, TlsVersion};
use crate::net::StreamSocket;
use crate::outcome::{Failure, Reason};

/// Page size: the smallest record the TX record estimate assumes.
const PAGE: usize = 4096;

/// The KeyUpdate handshake message (RFC 8446 4.6.3) with request_update = update_not_requested.
const KEY_UPDATE_NOT_REQUESTED: [u8; 5] = [24, 0, 0, 1, 0];

/// An internal_error alert (fatal): the session cannot go on safely, and the peer should know.
const INTERNAL_ERROR: [u8; 2] = [2, 80];

/// When the kernel legs change keys.
#[derive(Debug, Clone)]
pub(crate) struct RekeyPolicy {
    /// `Ok` when the kernel takes new TLS 1.3 keys on a live socket, else why not.
    pub(crate) kernel: Result<(), Arc<str>>,
    /// Records sent under one key before the agent rekeys (or, where it cannot, closes);
    /// `None`: half the cipher suite's confidentiality limit.
    pub(crate) after_records: Option<u64>,
}

/// A connection's legs whose record layer is in the kernel: the client's, the upstream's
/// (`None` for a plain leg; both `None` on the splice path). Each on the heap on its own, so a
/// connection holds only the legs it has (terminate: one), every one in a 640-byte size class.
pub(crate) type KernelLegs = (Option<Box<KtlsLeg>>, Option<Box<KtlsLeg>>);

/// Splices both directions of a connection whose TLS legs are in the kernel ([`into_kernel`]);
/// with `park_after`, it may stop idle (see [`splice::relay`]), the legs kept for the next run.
pub(crate) async fn relay(
    pipes: &crate::splice::PipePool,
    client: &tokio::net::TcpStream,
    client_leg: Option<&KtlsLeg>,
    upstream: &crate::net::Upstream,
    upstream_leg: Option<&KtlsLeg>,
    park_after: Option<std::time::Duration>,
) -> RelayOutcome {
    let mut outcome = splice::relay(
        pipes,
        client,
        client_leg,
        upstream,
        upstream_leg,
        park_after,
    )
    .await;
    // The legs' own counts: they span every run of the relay.
    let legs = [client_leg, upstream_leg];
    outcome.key_updates = legs
        .iter()
        .flatten()
        .map(|l| l.key_updates.load(Ordering::Relaxed))
        .sum();
    outcome.tickets = legs
        .iter()
        .flatten()
        .map(|l| l.session().map_or(0, |s| s.tickets))
        .sum();
    outcome
}

/// Moves each leg's session, if it has one, into the kernel.
pub(crate) fn into_kernel(
    client: &tokio::net::TcpStream,
    client_tls: Option<Box<TlsSession>>,
    upstream: &crate::net::Upstream,
    upstream_tls: Option<Box<TlsSession>>,
    rekey: &RekeyPolicy,
) -> Result<KernelLegs, Failure> {
    let leg = |tls: Option<Box<TlsSession>>, sock: &dyn AsFd, who: String| {
        tls.map(|k| {
            k.into_kernel(sock.as_fd(), &who)
                .map(|session| Box::new(KtlsLeg::new(session, rekey)))
                .map_err(|e| Failure::new(Reason::KtlsRefused, e.to_string()))
        })
        .transpose()
    };
    let client_name = client
        .peer_addr()
        .map_or_else(|_| "the client".to_owned(), |a| a.to_string());
    Ok((
        leg(client_tls, client, client_name)?,
        leg(upstream_tls, upstream, upstream.peer())?,
    ))
}

/// A leg whose record layer is in the kernel, shared by the two directions of a relay: the
/// reading direction follows the peer's KeyUpdates and keeps its tickets, the writing direction
/// counts records against the confidentiality limit.
pub(crate) struct KtlsLeg {
    session: Mutex<KernelSession>,
    /// Records this leg may send under one key before it must rekey or close: 7/8 of the
    /// configured number, else of half the cipher suite's confidentiality limit. Fixed for the
    /// connection, so the hot path never locks the session for it.
    tx_threshold: u64,
    /// Records sent under the current TX key: an estimate from the bytes spliced, corrected
    /// from the kernel's own sequence number whenever it nears the limit.
    tx_records: AtomicU64,
    key_updates: AtomicU64,
    /// `None` when the kernel takes new TLS 1.3 keys on a live socket, else why not (see
    /// [`RekeyPolicy::kernel`]).
    cannot_rekey: Option<Arc<str>>,
}

impl KtlsLeg {
    fn new(session: KernelSession, rekey: &RekeyPolicy) -> Self {
        let limit = rekey
            .after_records
            .unwrap_or_else(|| session.confidentiality_limit() / 2);
        Self {
            session: Mutex::new(session),
            tx_threshold: limit - limit / 8,
            tx_records: AtomicU64::new(0),
            key_updates: AtomicU64::new(0),
            cannot_rekey: rekey.kernel.clone().err(),
        }
    }

    fn session(&self) -> Result<MutexGuard<'_, KernelSession>, Failure> {
        self.session
            .lock()
            .map_err(|_| Failure::new(Reason::Internal, "kTLS session state poisoned by a panic"))
    }

    /// Sends our KeyUpdate under the current key, then moves the kernel's TX to the next key.
    async fn rekey_tx(&self, sock: &impl StreamSocket) -> Result<(), Failure> {
        send_control(sock, RecordType::Handshake, &KEY_UPDATE_NOT_REQUESTED).await?;
        self.session()?
            .rekey(sock.as_fd(), Direction::Tx)
            .map_err(|e| Failure::new(Reason::KtlsRefused, format!("rekeying TX: {e}")))?;
        self.tx_records.store(0, Ordering::Relaxed);
        self.key_updates.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Follows a peer's KeyUpdate with body `body` (one byte: update_requested or not).
    async fn key_update(&self, sock: &impl StreamSocket, body: &[u8]) -> Result<(), Failure> {
        let requested = match body {
            [0] => false,
            [1] => true,
            _ => {
                return Err(Failure::new(
                    Reason::UnexpectedMessage,
                    "malformed KeyUpdate from a kTLS peer",
                ));
            }
        };
        if let Some(why) = &self.cannot_rekey {
            let _ = send_control(sock, RecordType::Alert, &INTERNAL_ERROR).await;
            return Err(Failure::new(
                Reason::RekeyUnsupported,
                format!("peer sent TLS 1.3 KeyUpdate and {why}: closing"),
            ));
        }
        self.session()?
            .rekey(sock.as_fd(), Direction::Rx)
            .map_err(|e| {
                Failure::new(
                    Reason::KtlsRefused,
                    format!("rekeying RX after the peer's KeyUpdate: {e}"),
                )
            })?;
        self.key_updates.fetch_add(1, Ordering::Relaxed);
        if requested {
            self.rekey_tx(sock).await?;
        }
        Ok(())
    }
}

impl RecordLayer for KtlsLeg {
    /// Reads one control record and acts on it:
    /// - close_notify: the end of this direction;
    /// - NewSessionTicket: stored for resumption (we are the client of a TLS upstream);
    /// - KeyUpdate: the kernel's RX moves to the peer's next key and, when the peer asks, ours
    ///   follows with a KeyUpdate of our own; on a kernel that cannot rekey, the connection ends
    ///   with an internal_error alert rather than decrypting garbage;
    /// - any other alert, or anything else, ends the connection.
    async fn control_record(&self, sock: &impl StreamSocket) -> Result<bool, Failure> {
        // On the heap, and only here: an array would sit inline in every connection's future
        // (this one is held across an await), costing each idle connection 16 KiB per
        // direction for a record that rarely comes (cargo xtask bench, idle connections).
        let mut buf = crate::buffers::Buffer::with_len(16 * 1024);
        let (record_type, n) = sock
            .try_io(Interest::READABLE, || {
                ktls::recv_record(sock.as_fd(), &mut buf)
            })
            .map_err(|e| Failure::io("reading a control record", &e))?;
        match record_type {
            RecordType::Alert if n >= 2 && buf[1] == 0 => Ok(true),
            RecordType::Alert => {
                let description = buf.get(1).copied().unwrap_or(0);
                Err(Failure::new(
                    Reason::AlertReceived,
                    format!(
                        "peer sent TLS alert level {} description {description} ({})",
                        buf[0],
                        tlsplice_common::alert_name(u16::from(description)).unwrap_or("unknown")
                    ),
                ))
            }
            RecordType::Handshake => {
                let mut messages = &buf[..n];
                while !messages.is_empty() {
                    let truncated = || {
                        Failure::new(
                            Reason::UnexpectedMessage,
                            "truncated post-handshake message from a kTLS peer",
                        )
                    };
                    let (&[kind, a, b, c], rest) =
                        messages.split_first_chunk::<4>().ok_or_else(truncated)?;
                    let len = u32::from_be_bytes([0, a, b, c]) as usize;
                    if rest.len() < len {
                        return Err(truncated());
                    }
                    let (body, next) = rest.split_at(len);
                    messages = next;
                    match kind {
                        // NewSessionTicket (RFC 8446 4.6.1)
                        4 => self
                            .session()?
                            .take_ticket(body)
                            .map_err(|e| Failure::new(Reason::UnexpectedMessage, e.to_string()))?,
                        // KeyUpdate (RFC 8446 4.6.3)
                        24 => self.key_update(sock, body).await?,
                        other => {
                            return Err(Failure::new(
                                Reason::UnexpectedMessage,
                                format!(
                                    "unexpected post-handshake message type {other} from a kTLS peer"
                                ),
                            ));
                        }
                    }
                }
                Ok(false)
            }
            RecordType::ApplicationData if n == 0 => Ok(true),
            other => Err(Failure::new(
                Reason::UnexpectedMessage,
                format!("unexpected {other:?} record from a kTLS peer"),
            )),
        }
    }

    /// Bytes the next splice into this leg may carry so that the record estimate cannot pass
    /// the threshold unchecked.
    fn splice_budget(&self) -> usize {
        let headroom = self
            .tx_threshold
            .saturating_sub(self.tx_records.load(Ordering::Relaxed))
            .max(1);
        usize::try_from(headroom)
            .unwrap_or(usize::MAX)
            .saturating_mul(PAGE)
    }

    /// Counts `bytes` just spliced into this leg; `true` once the estimate reaches the rekey
    /// threshold.
    fn count_sent(&self, bytes: usize) -> bool {
        // A pessimistic count: every splice ends its records (no SPLICE_F_MORE), and a record
        // holds at most 2^14 bytes but may be pushed early when its page fragments run out, so
        // assume one per page. The kernel's own sequence number settles it near the threshold.
        let records = bytes.div_ceil(PAGE) as u64;
        let estimate = self.tx_records.fetch_add(records, Ordering::Relaxed) + records;
        estimate >= self.tx_threshold
    }

    /// Near the record limit: reads the kernel's own count and, at the threshold, rekeys this
    /// leg's TX (TLS 1.3 on a kernel that can) or ends the connection before the limit.
    async fn near_limit(&self, sock: &impl StreamSocket) -> Result<(), Failure> {
        let threshold = self.tx_threshold;
        let session = self.session()?.session();
        let sent =
            ktls::record_sequence(sock.as_fd(), Direction::Tx, session.version, session.cipher)
                .map_err(|e| Failure::new(Reason::RelayError, e.to_string()))?;
        self.tx_records.store(sent, Ordering::Relaxed);
        if sent < threshold {
            return Ok(());
        }
        let cannot = match (&self.cannot_rekey, session.version) {
            (None, TlsVersion::Tls13) => None,
            (Some(why), TlsVersion::Tls13) => Some(why.to_string()),
            (_, TlsVersion::Tls12) => Some("TLS 1.2 has no KeyUpdate".to_owned()),
        };
        match cannot {
            None => self.rekey_tx(sock).await,
            Some(why) => {
                let _ = send_control(sock, RecordType::Alert, &INTERNAL_ERROR).await;
                Err(Failure::new(
                    Reason::RecordLimit,
                    format!(
                        "{sent} records sent under one {} {} key (rekey threshold {threshold}) and {why}: closing before the confidentiality limit",
                        session.version, session.cipher
                    ),
                ))
            }
        }
    }

    fn close_notify(&self, sock: &impl StreamSocket) -> io::Result<()> {
        // level warning (1), description close_notify (0)
        ktls::send_record(sock.as_fd(), RecordType::Alert, &[1, 0]).map(|_| ())
    }
}

/// Sends a control record on a kTLS socket, waiting for room in the socket buffer.
async fn send_control(
    sock: &impl StreamSocket,
    record_type: RecordType,
    data: &[u8],
) -> Result<(), Failure> {
    loop {
        sock.writable().await?;
        match sock.try_io(Interest::WRITABLE, || {
            ktls::send_record(sock.as_fd(), record_type, data)
        }) {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(Failure::io("sending a control record", &e)),
        }
    }
}
