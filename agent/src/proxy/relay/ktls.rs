//! The ktls data path: every TLS leg's session goes to the kernel (keys installed, zeroized in
//! user space), then both directions are spliced ([`super::splice`]): the kernel decrypts into
//! the pipe and encrypts out of it, so the payload never enters user space. What stays with the
//! agent is a leg's [`KtlsLeg`]: control records (close_notify, alerts, NewSessionTicket,
//! KeyUpdate) read with their record type, and records counted against the cipher's
//! confidentiality limit, with a KeyUpdate of our own (or a close) before it.

use std::io;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
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

/// A no_renegotiation alert (warning, RFC 5246 7.2.2): the TLS 1.2 session goes on unchanged.
const NO_RENEGOTIATION: [u8; 2] = [1, 100];

/// Alert descriptions the agent sends when it ends a kTLS session for a protocol error
/// (RFC 8446 6.2).
pub(crate) mod alert {
    /// unexpected_message (10).
    pub(crate) const UNEXPECTED_MESSAGE: u8 = 10;
    /// bad_record_mac (20).
    pub(crate) const BAD_RECORD_MAC: u8 = 20;
    /// record_overflow (22).
    pub(crate) const RECORD_OVERFLOW: u8 = 22;
    /// illegal_parameter (47).
    pub(crate) const ILLEGAL_PARAMETER: u8 = 47;
    /// decode_error (50).
    pub(crate) const DECODE_ERROR: u8 = 50;
}

/// TLS 1.2 renegotiation requests refused with a warning before the next one ends the
/// connection (rustls refuses the same way in user space).
const RENEGOTIATIONS_REFUSED: u8 = 1;

/// Warning alerts (other than close_notify) a kTLS peer may send in one connection; the next
/// ends it as unexpected_message. rustls allows the same number in user space.
const WARNING_ALERTS_ALLOWED: u8 = 4;

/// alert level warning (RFC 5246 7.2).
const WARNING: u8 = 1;

/// close_notify (0) and user_canceled (90), the two alerts TLS 1.3 lets a session outlive.
const CLOSE_NOTIFY: u8 = 0;
const USER_CANCELED: u8 = 90;

/// What the agent does with an alert from a kTLS peer (RFC 8446 6, RFC 5246 7.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AlertVerdict {
    /// close_notify: the peer sends no more; the other direction goes on (half-close).
    EndOfDirection,
    /// A warning the session outlives: any warning in TLS 1.2, user_canceled in TLS 1.3.
    Ignore,
    /// An error alert, or a warning TLS 1.3 does not allow: the connection ends.
    End,
}

/// The verdict on alert (`level`, `description`), decided from the alert and the version alone
/// as rustls decides it in user space, so both paths end (or go on) alike.
pub(crate) fn judge_alert(version: TlsVersion, level: u8, description: u8) -> AlertVerdict {
    match (version, level, description) {
        (_, _, CLOSE_NOTIFY) => AlertVerdict::EndOfDirection,
        (TlsVersion::Tls12, WARNING, _) | (TlsVersion::Tls13, WARNING, USER_CANCELED) => {
            AlertVerdict::Ignore
        }
        _ => AlertVerdict::End,
    }
}

/// When the kernel legs change keys.
#[derive(Debug, Clone)]
pub(crate) struct RekeyPolicy {
    /// `Ok` when the kernel takes new TLS 1.3 keys on a live socket, else why not.
    pub(crate) kernel: Result<(), Arc<str>>,
    /// Records sent under one key before the agent rekeys (or, where it cannot, closes);
    /// `None`: half the cipher suite's confidentiality limit.
    pub(crate) after_records: Option<u64>,
    /// A peer's KeyUpdates followed in one second; the next one in that second ends the
    /// connection (`limits.key_updates_per_second`).
    pub(crate) key_updates_per_second: u16,
}

/// What the agent does with one post-handshake message from a kTLS peer (RFC 8446 4.6,
/// RFC 5246 7.4.1): decided from the message alone, carried out by [`KtlsLeg`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PostHandshake {
    /// A NewSessionTicket from the TLS 1.3 server the agent is a client of: kept.
    Ticket,
    /// A TLS 1.3 KeyUpdate; `requested`: the peer asks the agent to update its own key too.
    KeyUpdate { requested: bool },
    /// A TLS 1.2 renegotiation request (a ClientHello to the agent as server, a HelloRequest
    /// to it as client): refused with a no_renegotiation warning, the session goes on.
    RefuseRenegotiation,
    /// A protocol error: the connection ends with this alert.
    Fatal {
        reason: Reason,
        alert: u8,
        why: &'static str,
    },
}

/// Judges one post-handshake handshake message of type `kind` with body `body` on a leg of
/// `version` where the agent is the client (`we_are_client`) or the server.
fn judge_post_handshake(
    version: TlsVersion,
    we_are_client: bool,
    kind: u8,
    body: &[u8],
) -> PostHandshake {
    let unexpected = |why| PostHandshake::Fatal {
        reason: Reason::UnexpectedMessage,
        alert: alert::UNEXPECTED_MESSAGE,
        why,
    };
    match (version, kind) {
        // NewSessionTicket (RFC 8446 4.6.1): only a server sends one.
        (TlsVersion::Tls13, 4) if we_are_client => PostHandshake::Ticket,
        (TlsVersion::Tls13, 4) => unexpected("a NewSessionTicket, which only a server sends"),
        // KeyUpdate (RFC 8446 4.6.3)
        (TlsVersion::Tls13, 24) => match body {
            [0] => PostHandshake::KeyUpdate { requested: false },
            [1] => PostHandshake::KeyUpdate { requested: true },
            [_] => PostHandshake::Fatal {
                reason: Reason::UnexpectedMessage,
                alert: alert::ILLEGAL_PARAMETER,
                why: "a KeyUpdate whose request_update is neither 0 nor 1",
            },
            _ => PostHandshake::Fatal {
                reason: Reason::UnexpectedMessage,
                alert: alert::DECODE_ERROR,
                why: "a KeyUpdate whose body is not one byte",
            },
        },
        (TlsVersion::Tls13, 1) => unexpected("a ClientHello after the TLS 1.3 handshake"),
        // ClientHello to a server, HelloRequest to a client (RFC 5246 7.4.1.1, RFC 5746 4.2)
        (TlsVersion::Tls12, 1) if !we_are_client => PostHandshake::RefuseRenegotiation,
        (TlsVersion::Tls12, 0) if we_are_client => PostHandshake::RefuseRenegotiation,
        (TlsVersion::Tls12, 24) => unexpected("a KeyUpdate in TLS 1.2"),
        _ => unexpected("a handshake message type not allowed after the handshake"),
    }
}

/// One message of a post-handshake record, and what to do with it.
#[derive(Debug)]
pub(crate) struct Judged<'a> {
    /// The handshake type (0 where the record could not be split).
    pub(crate) kind: u8,
    /// The message body, after its 4-byte header.
    pub(crate) body: &'a [u8],
    pub(crate) verdict: PostHandshake,
}

impl Judged<'_> {
    /// Whether this message ends the connection.
    #[cfg(fuzzing)]
    pub(crate) fn is_fatal(&self) -> bool {
        matches!(self.verdict, PostHandshake::Fatal { .. })
    }
}

/// Splits a handshake record received after the handshake into its messages and judges each,
/// in order; the list ends at the first fatal verdict. A message split over records is legal
/// TLS, but no post-handshake message the agent accepts needs it: it is refused as
/// undecodable, as is an empty record (RFC 8446 5.1 forbids zero-length handshake fragments).
pub(crate) fn judge_record(
    version: TlsVersion,
    we_are_client: bool,
    record: &[u8],
) -> Vec<Judged<'_>> {
    let mut judged = Vec::new();
    let mut messages = record;
    if messages.is_empty() {
        judged.push(Judged {
            kind: 0,
            body: &[],
            verdict: PostHandshake::Fatal {
                reason: Reason::UnexpectedMessage,
                alert: alert::UNEXPECTED_MESSAGE,
                why: "an empty handshake record",
            },
        });
    }
    while !messages.is_empty() {
        let header = messages.split_first_chunk::<4>().and_then(|(h, rest)| {
            let len = u32::from_be_bytes([0, h[1], h[2], h[3]]) as usize;
            (rest.len() >= len).then(|| (h[0], rest.split_at(len)))
        });
        let Some((kind, (body, next))) = header else {
            judged.push(Judged {
                kind: 0,
                body: &[],
                verdict: PostHandshake::Fatal {
                    reason: Reason::UnexpectedMessage,
                    alert: alert::DECODE_ERROR,
                    why: "a post-handshake message cut short or split over records",
                },
            });
            break;
        };
        messages = next;
        let verdict = judge_post_handshake(version, we_are_client, kind, body);
        judged.push(Judged {
            kind,
            body,
            verdict,
        });
        if matches!(verdict, PostHandshake::Fatal { .. }) {
            break;
        }
    }
    judged
}

/// Admits one KeyUpdate into a one-second window of at most `limit`. `window` packs the
/// window's start (milliseconds, upper 44 bits) and its count (lower 20 bits, saturating);
/// returns the new window and whether this KeyUpdate is within the limit.
fn admit_key_update(window: u64, now_ms: u64, limit: u16) -> (u64, bool) {
    const COUNT_BITS: u32 = 20;
    const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;
    let (start, count) = (window >> COUNT_BITS, window & COUNT_MASK);
    let (start, count) = if window == 0 || now_ms.saturating_sub(start) >= 1000 {
        (now_ms, 1)
    } else {
        (start, (count + 1).min(COUNT_MASK))
    };
    // Never 0, so a window that starts at 0 ms still reads as started.
    let packed = ((start << COUNT_BITS) | count).max(1);
    (packed, count <= u64::from(limit))
}

/// Milliseconds on the agent's monotonic clock (from its first use), for the KeyUpdate window.
fn monotonic_ms() -> u64 {
    static BASE: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let base = BASE.get_or_init(std::time::Instant::now);
    u64::try_from(base.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// A connection's legs whose record layer is in the kernel: the client's, the upstream's
/// (`None` for a plain leg; both `None` on the splice path). Each on the heap on its own, so a
/// connection holds only the legs it has (terminate: one), every one in a 640-byte size class.
pub(crate) type KernelLegs = (Option<Box<KtlsLeg>>, Option<Box<KtlsLeg>>);

/// Splices both directions of a connection whose TLS legs are in the kernel ([`into_kernel`]);
/// with `park_after`, it may stop idle (see [`splice::relay`]), the legs kept for the next run;
/// with `moving`, it stops idle when asked to move to a new agent.
pub(crate) async fn relay(
    pipes: &crate::splice::PipePool,
    client: &tokio::net::TcpStream,
    client_leg: Option<&KtlsLeg>,
    upstream: &crate::net::Upstream,
    upstream_leg: Option<&KtlsLeg>,
    park_after: Option<std::time::Duration>,
    moving: Option<super::Drained>,
) -> RelayOutcome {
    let mut outcome = splice::relay(
        pipes,
        client,
        client_leg,
        upstream,
        upstream_leg,
        park_after,
        moving,
    )
    .await;
    // The legs' own counts: they span every run of the relay.
    let legs = [client_leg, upstream_leg];
    outcome.key_updates = legs
        .iter()
        .flatten()
        .map(|l| u64::from(l.key_updates.load(Ordering::Relaxed)))
        .sum();
    outcome.tickets = legs
        .iter()
        .flatten()
        .map(|l| l.session().map_or(0, |s| u64::from(s.tickets)))
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
    /// The current second's window of the peer's KeyUpdates ([`admit_key_update`]).
    key_update_window: AtomicU64,
    /// KeyUpdates followed and sent.
    key_updates: AtomicU32,
    /// The peer's KeyUpdates allowed in one second.
    key_updates_per_second: u16,
    /// TLS 1.2 renegotiation requests refused so far.
    renegotiations_refused: AtomicU8,
    /// Warning alerts the session outlived so far ([`WARNING_ALERTS_ALLOWED`]).
    warning_alerts: AtomicU8,
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
            key_update_window: AtomicU64::new(0),
            key_updates: AtomicU32::new(0),
            key_updates_per_second: rekey.key_updates_per_second,
            renegotiations_refused: AtomicU8::new(0),
            warning_alerts: AtomicU8::new(0),
            cannot_rekey: rekey.kernel.clone().err(),
        }
    }

    /// The leg as it travels to a new agent at a takeover: what the agent keeps beside the
    /// kernel's state (which travels with the socket), its TLS 1.3 key schedule included.
    pub(crate) fn to_record(&self) -> Result<crate::takeover::LegRecord, Failure> {
        let session = self.session()?;
        let kernel = session.session();
        Ok(crate::takeover::LegRecord {
            version: kernel.version,
            cipher: kernel.cipher,
            agent_is_client: session.is_client(),
            confidentiality_limit: session.confidentiality_limit(),
            tx_records: self.tx_records.load(Ordering::Relaxed),
            key_updates: self.key_updates.load(Ordering::Relaxed),
            renegotiations_refused: self.renegotiations_refused.load(Ordering::Relaxed),
            warning_alerts: self.warning_alerts.load(Ordering::Relaxed),
            tickets: u64::from(session.tickets),
            schedule: session.schedule().cloned(),
        })
    }

    /// A leg handed over by the agent before this one, its kernel state on the socket and its
    /// TLS 1.3 key schedule in the record, so KeyUpdates go on as before. Without a schedule
    /// a KeyUpdate from its peer, or its own record limit, ends the connection cleanly (an
    /// internal_error alert) rather than letting the kernel decrypt with a stale key.
    pub(crate) fn from_record(record: &crate::takeover::LegRecord, rekey: &RekeyPolicy) -> Self {
        let session = KernelSession::moved(
            crate::handoff::KtlsSession {
                version: record.version,
                cipher: record.cipher,
            },
            record.agent_is_client,
            record.confidentiality_limit,
            u32::try_from(record.tickets).unwrap_or(u32::MAX),
            record.schedule.clone(),
        );
        let mut leg = Self::new(session, rekey);
        leg.tx_records = AtomicU64::new(record.tx_records);
        leg.key_updates = AtomicU32::new(record.key_updates);
        leg.renegotiations_refused = AtomicU8::new(record.renegotiations_refused);
        leg.warning_alerts = AtomicU8::new(record.warning_alerts);
        if record.schedule.is_none() {
            leg.cannot_rekey = Some(
                "the connection moved from the agent before this one without its key schedule (TLS 1.2 has none)"
                    .into(),
            );
        }
        leg
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

    /// Follows a peer's KeyUpdate (`requested`: it asks for ours too), within the rate limit.
    async fn key_update(&self, sock: &impl StreamSocket, requested: bool) -> Result<(), Failure> {
        let (window, admitted) = admit_key_update(
            self.key_update_window.load(Ordering::Relaxed),
            monotonic_ms(),
            self.key_updates_per_second,
        );
        self.key_update_window.store(window, Ordering::Relaxed);
        if !admitted {
            // No alert names a rate; the peer sees the close (HAProxy closes the same way).
            return Err(Failure::new(
                Reason::KeyUpdateRateLimit,
                format!(
                    "peer sent more than {} TLS 1.3 KeyUpdates in a second: closing",
                    self.key_updates_per_second
                ),
            ));
        }
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

impl KtlsLeg {
    /// Ends the session for a protocol error: sends the fatal alert `description` (best
    /// effort: the peer may be gone) and returns the failure to record.
    async fn fatal(
        &self,
        sock: &impl StreamSocket,
        reason: Reason,
        description: u8,
        why: String,
    ) -> Failure {
        let name = tlsplice_common::alert_name(u16::from(description)).unwrap_or("alert");
        let sent = match send_control(sock, RecordType::Alert, &[2, description]).await {
            Ok(()) => format!("sent {name}"),
            Err(e) => format!("could not send {name}: {}", e.detail),
        };
        Failure::new(reason, format!("kTLS peer sent {why}: {sent}"))
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
            .map_err(|e| {
                let mut failure = Failure::io("reading a control record", &e);
                if let Some(sent) = self.record_refused(sock, failure.reason) {
                    failure.detail = format!("{}: {sent}", failure.detail);
                }
                failure
            })?;
        match record_type {
            RecordType::Alert if n != 2 => Err(self
                .fatal(
                    sock,
                    Reason::UnexpectedMessage,
                    alert::DECODE_ERROR,
                    format!("an alert record of {n} bytes (an alert is 2)"),
                )
                .await),
            RecordType::Alert => {
                let (level, description) = (buf[0], buf[1]);
                let name = tlsplice_common::alert_name(u16::from(description)).unwrap_or("unknown");
                let version = self.session()?.session().version;
                match judge_alert(version, level, description) {
                    AlertVerdict::EndOfDirection => Ok(true),
                    AlertVerdict::Ignore => {
                        let seen = self.warning_alerts.fetch_add(1, Ordering::Relaxed);
                        if seen >= WARNING_ALERTS_ALLOWED {
                            return Err(self
                                .fatal(
                                    sock,
                                    Reason::UnexpectedMessage,
                                    alert::UNEXPECTED_MESSAGE,
                                    format!(
                                        "warning alert {description} ({name}) after {seen} others"
                                    ),
                                )
                                .await);
                        }
                        tracing::debug!(
                            "a kTLS peer sent a warning alert {name}: the session goes on"
                        );
                        Ok(false)
                    }
                    AlertVerdict::End => Err(Failure::new(
                        Reason::AlertReceived,
                        format!(
                            "peer sent TLS alert level {level} description {description} ({name})"
                        ),
                    )),
                }
            }
            RecordType::Handshake => {
                let (version, we_are_client) = {
                    let session = self.session()?;
                    (session.session().version, session.is_client())
                };
                for Judged {
                    kind,
                    body,
                    verdict,
                } in judge_record(version, we_are_client, &buf[..n])
                {
                    match verdict {
                        PostHandshake::Ticket => self
                            .session()?
                            .take_ticket(body)
                            .map_err(|e| Failure::new(Reason::UnexpectedMessage, e.to_string()))?,
                        PostHandshake::KeyUpdate { requested } => {
                            self.key_update(sock, requested).await?;
                        }
                        PostHandshake::RefuseRenegotiation => {
                            let refused =
                                self.renegotiations_refused.fetch_add(1, Ordering::Relaxed);
                            if refused >= RENEGOTIATIONS_REFUSED {
                                return Err(self
                                    .fatal(
                                        sock,
                                        Reason::UnexpectedMessage,
                                        alert::UNEXPECTED_MESSAGE,
                                        format!(
                                            "peer asked to renegotiate TLS 1.2 again after {refused} refusal(s)"
                                        ),
                                    )
                                    .await);
                            }
                            tracing::info!(
                                "a kTLS peer asked to renegotiate TLS 1.2: refused (no_renegotiation), the session goes on"
                            );
                            send_control(sock, RecordType::Alert, &NO_RENEGOTIATION).await?;
                        }
                        PostHandshake::Fatal { reason, alert, why } => {
                            return Err(self
                                .fatal(
                                    sock,
                                    reason,
                                    alert,
                                    format!("{why} (handshake type {kind})"),
                                )
                                .await);
                        }
                    }
                }
                Ok(false)
            }
            RecordType::ApplicationData if n == 0 => Ok(true),
            other => Err(self
                .fatal(
                    sock,
                    Reason::UnexpectedMessage,
                    alert::UNEXPECTED_MESSAGE,
                    format!("a {other:?} record after the handshake"),
                )
                .await),
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

    fn record_refused(&self, sock: &impl StreamSocket, reason: Reason) -> Option<String> {
        let description = refused_record_alert(reason)?;
        let name = tlsplice_common::alert_name(u16::from(description)).unwrap_or("alert");
        // One try, not waiting for room: the session is over either way.
        Some(
            match ktls::send_record(sock.as_fd(), RecordType::Alert, &[2, description]) {
                Ok(_) => format!("sent {name}"),
                Err(e) => format!("could not send {name}: {e}"),
            },
        )
    }
}

/// The alert for a record the kernel refused (RFC 8446 5.2, 6.2): one that did not
/// authenticate, one too long.
fn refused_record_alert(reason: Reason) -> Option<u8> {
    match reason {
        Reason::RecordError => Some(alert::BAD_RECORD_MAC),
        Reason::RecordOverflow => Some(alert::RECORD_OVERFLOW),
        _ => None,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn post_handshake_messages_are_judged_as_the_rfcs_say() {
        use PostHandshake::*;
        use TlsVersion::{Tls12, Tls13};
        let fatal =
            |alert| move |p: PostHandshake| matches!(p, Fatal { alert: a, .. } if a == alert);
        let unexpected = fatal(alert::UNEXPECTED_MESSAGE);
        // (version, agent is client, type, body, verdict)
        type Verdict<'a> = &'a dyn Fn(PostHandshake) -> bool;
        let cases: [(TlsVersion, bool, u8, &[u8], Verdict); 15] = [
            (Tls13, true, 4, b"ticket", &|p| p == Ticket),
            (Tls13, false, 4, b"ticket", &unexpected),
            (Tls12, true, 4, b"ticket", &unexpected),
            (Tls13, false, 24, &[0], &|p| {
                p == KeyUpdate { requested: false }
            }),
            (Tls13, true, 24, &[1], &|p| {
                p == KeyUpdate { requested: true }
            }),
            (Tls13, false, 24, &[2], &fatal(alert::ILLEGAL_PARAMETER)),
            (Tls13, false, 24, &[], &fatal(alert::DECODE_ERROR)),
            (Tls13, false, 24, &[0, 0], &fatal(alert::DECODE_ERROR)),
            (Tls12, false, 24, &[0], &unexpected),
            (Tls13, false, 1, b"hello", &unexpected),
            (Tls12, false, 1, b"hello", &|p| p == RefuseRenegotiation),
            (Tls12, true, 1, b"hello", &unexpected),
            (Tls12, true, 0, b"", &|p| p == RefuseRenegotiation),
            (Tls12, false, 0, b"", &unexpected),
            (Tls13, false, 20, b"finished", &unexpected),
        ];
        for (version, client, kind, body, ok) in cases {
            let verdict = judge_post_handshake(version, client, kind, body);
            assert!(
                ok(verdict),
                "{version:?} client={client} type {kind} {body:?}: {verdict:?}"
            );
            if let Fatal { reason, .. } = verdict {
                assert_eq!(reason, Reason::UnexpectedMessage);
            }
        }
    }

    #[test]
    fn a_record_is_split_into_messages_and_ends_at_the_first_fatal_one() {
        let verdicts = |record: &[u8]| -> Vec<(u8, Option<u8>)> {
            judge_record(TlsVersion::Tls13, true, record)
                .iter()
                .map(|j| match j.verdict {
                    PostHandshake::Fatal { alert, .. } => (j.kind, Some(alert)),
                    _ => (j.kind, None),
                })
                .collect()
        };
        // Two KeyUpdates and a ticket in one record.
        let mut record = vec![24, 0, 0, 1, 0, 24, 0, 0, 1, 1];
        record.extend([4, 0, 0, 2, 9, 9]);
        assert_eq!(verdicts(&record), [(24, None), (24, None), (4, None)]);
        // Cut short: the header claims more than the record holds.
        assert_eq!(
            verdicts(&[24, 0, 0, 1, 0, 24, 0, 0, 9, 1]),
            [(24, None), (0, Some(alert::DECODE_ERROR))]
        );
        // Less than a header.
        assert_eq!(verdicts(&[24, 0]), [(0, Some(alert::DECODE_ERROR))]);
        assert_eq!(verdicts(&[]), [(0, Some(alert::UNEXPECTED_MESSAGE))]);
        // Nothing after a fatal message is judged.
        assert_eq!(
            verdicts(&[2, 0, 0, 0, 24, 0, 0, 1, 0]),
            [(2, Some(alert::UNEXPECTED_MESSAGE))]
        );
    }

    #[test]
    fn key_updates_are_admitted_up_to_the_limit_in_each_second() {
        let limit = 3;
        // (ms since the first, admitted)
        let steps = [
            (0, true),
            (10, true),
            (20, true),
            (30, false),
            (999, false),
            // A new window a second after the first one's start.
            (1000, true),
            (1001, true),
            (1002, true),
            (1003, false),
            (5000, true),
        ];
        let mut window = 0;
        for (ms, admitted) in steps {
            let (next, ok) = admit_key_update(window, ms, limit);
            assert_eq!(ok, admitted, "at {ms} ms");
            assert_ne!(next, 0);
            window = next;
        }
        // A storm never wraps the count back under the limit.
        let mut window = 0;
        let mut admitted = 0;
        for _ in 0..3_000_000u32 {
            let (next, ok) = admit_key_update(window, 7, u16::MAX);
            window = next;
            admitted += u32::from(ok);
        }
        assert_eq!(admitted, u32::from(u16::MAX));
    }

    #[test]
    fn alerts_end_or_go_on_as_rustls_decides() {
        use AlertVerdict::*;
        use TlsVersion::{Tls12, Tls13};
        let table = [
            (Tls13, 1, 0, EndOfDirection),
            (Tls13, 2, 0, EndOfDirection),
            (Tls12, 1, 0, EndOfDirection),
            (Tls13, 1, 90, Ignore),
            (Tls13, 1, 40, End),
            (Tls13, 2, 90, End),
            (Tls13, 2, 80, End),
            (Tls12, 1, 90, Ignore),
            (Tls12, 1, 100, Ignore),
            (Tls12, 2, 40, End),
            (Tls13, 7, 40, End),
        ];
        for (version, level, description, verdict) in table {
            assert_eq!(
                judge_alert(version, level, description),
                verdict,
                "{version:?} level {level} description {description}"
            );
        }
    }

    #[test]
    fn refused_records_get_the_rfc_alert() {
        assert_eq!(
            refused_record_alert(Reason::RecordError),
            Some(alert::BAD_RECORD_MAC)
        );
        assert_eq!(
            refused_record_alert(Reason::RecordOverflow),
            Some(alert::RECORD_OVERFLOW)
        );
        assert_eq!(refused_record_alert(Reason::PeerReset), None);
    }
}
