//! The TLS 1.3 key schedule of a session under kTLS, kept by the agent itself so that it can
//! travel to a new agent at a takeover ([`crate::takeover`]): rustls' own schedule cannot leave
//! the process. The two application traffic secrets are caught as rustls derives them, through
//! its key-log hook ([`SecretCatcher`], which writes them nowhere: they stay in this
//! connection's [`Schedule`]), held in memory that is zeroized when dropped, and moved forward
//! on every KeyUpdate (RFC 8446 7.2) beside rustls' own.

use std::cell::RefCell;
use std::fmt;

use zeroize::Zeroizing;

use crate::ktls::{Cipher, Direction};

/// The key-log labels of the two application traffic secrets (NSS key log format).
const CLIENT_TRAFFIC_SECRET_0: &str = "CLIENT_TRAFFIC_SECRET_0";
const SERVER_TRAFFIC_SECRET_0: &str = "SERVER_TRAFFIC_SECRET_0";

/// A secret: zeroized when dropped, never shown (its `Debug` is redacted). It travels to a new
/// agent only inside a takeover record, as an array of bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Zeroizing<Vec<u8>>);

impl Secret {
    fn new(bytes: &[u8]) -> Self {
        Self(Zeroizing::new(bytes.to_vec()))
    }
}

impl AsRef<[u8]> for Secret {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret([redacted; {}])", self.0.len())
    }
}

impl serde::Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.as_slice().serialize(s)
    }
}

impl<'de> serde::Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        /// Reads the bytes into room made once, so no copy is left behind by a reallocation.
        struct Bytes;
        impl<'de> serde::de::Visitor<'de> for Bytes {
            type Value = Secret;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a secret of at most 64 bytes")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Secret, A::Error> {
                let mut bytes = Zeroizing::new(Vec::with_capacity(MAX_SECRET));
                while let Some(b) = seq.next_element::<u8>()? {
                    if bytes.len() == MAX_SECRET {
                        return Err(serde::de::Error::invalid_length(MAX_SECRET + 1, &self));
                    }
                    bytes.push(b);
                }
                Ok(Secret(bytes))
            }
        }
        d.deserialize_seq(Bytes)
    }
}

/// The longest traffic secret (SHA-384's 48 bytes) with room to spare.
const MAX_SECRET: usize = 64;

/// The secrets caught from one session's handshake so far.
#[derive(Default)]
pub struct Caught {
    client: Option<Secret>,
    server: Option<Secret>,
}

impl fmt::Debug for Caught {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Caught")
            .field("client", &self.client.is_some())
            .field("server", &self.server.is_some())
            .finish()
    }
}

thread_local! {
    /// The session whose records rustls is processing on this thread, while [`catching`].
    static CAUGHT: RefCell<Option<Caught>> = const { RefCell::new(None) };
}

/// rustls' key-log hook: keeps the two application traffic secrets of the session being
/// processed on this thread (see [`catching`]) with that session, and writes nothing anywhere.
#[derive(Debug)]
pub struct SecretCatcher;

impl rustls::KeyLog for SecretCatcher {
    fn will_log(&self, label: &str) -> bool {
        matches!(label, CLIENT_TRAFFIC_SECRET_0 | SERVER_TRAFFIC_SECRET_0)
    }

    fn log(&self, label: &str, _client_random: &[u8], secret: &[u8]) {
        CAUGHT.with(|caught| {
            if let Some(caught) = caught.borrow_mut().as_mut() {
                match label {
                    CLIENT_TRAFFIC_SECRET_0 => caught.client = Some(Secret::new(secret)),
                    SERVER_TRAFFIC_SECRET_0 => caught.server = Some(Secret::new(secret)),
                    _ => {}
                }
            }
        });
    }
}

/// Runs `f`, one synchronous call into rustls for a session, catching the secrets it derives
/// into `into` (rustls calls its key-log hook from within that call, on this thread).
pub(crate) fn catching<R>(into: &mut Caught, f: impl FnOnce() -> R) -> R {
    // (A session whose secrets are forgotten catches none again: rustls derives them once.)
    CAUGHT.with(|c| *c.borrow_mut() = Some(std::mem::take(into)));
    let result = f();
    *into = CAUGHT.with(|c| c.borrow_mut().take()).unwrap_or_default();
    result
}

impl Caught {
    /// Whether both secrets were caught.
    pub fn complete(&self) -> bool {
        self.client.is_some() && self.server.is_some()
    }
}

/// A TLS 1.3 session's current application traffic secret in each direction.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Schedule {
    /// The AEAD the keys are for.
    pub cipher: Cipher,
    /// The secret of what the agent sends.
    pub tx: Secret,
    /// The secret of what the agent receives.
    pub rx: Secret,
}

impl Schedule {
    /// The schedule of a session whose handshake gave `caught`, the agent being its client
    /// (`is_client`) or its server; `None` when either secret is missing (TLS 1.2).
    pub fn from_caught(caught: Caught, is_client: bool, cipher: Cipher) -> Option<Self> {
        let (client, server) = (caught.client?, caught.server?);
        let (tx, rx) = if is_client {
            (client, server)
        } else {
            (server, client)
        };
        Some(Self { cipher, tx, rx })
    }

    /// Moves `direction` to its next traffic secret (after a KeyUpdate, RFC 8446 7.2) and
    /// returns the key and the 12-byte IV derived from it (RFC 8446 7.3).
    pub fn next(&mut self, direction: Direction) -> Result<(Secret, Secret), String> {
        let suite = tls13_suite(self.cipher)?;
        let secret = match direction {
            Direction::Tx => &mut self.tx,
            Direction::Rx => &mut self.rx,
        };
        let hash_len = suite.common.hash_provider.output_len();
        *secret = expand_label(suite, secret, b"traffic upd", hash_len)?;
        keys(suite, self.cipher, secret)
    }

    /// The key and IV of `direction`'s current secret.
    pub fn current(&self, direction: Direction) -> Result<(Secret, Secret), String> {
        let suite = tls13_suite(self.cipher)?;
        let secret = match direction {
            Direction::Tx => &self.tx,
            Direction::Rx => &self.rx,
        };
        keys(suite, self.cipher, secret)
    }
}

/// The traffic key and IV of `secret` (RFC 8446 7.3).
fn keys(
    suite: &rustls::Tls13CipherSuite,
    cipher: Cipher,
    secret: &Secret,
) -> Result<(Secret, Secret), String> {
    let key_len = match cipher {
        Cipher::Aes128Gcm => 16,
        Cipher::Aes256Gcm | Cipher::Chacha20Poly1305 => 32,
    };
    Ok((
        expand_label(suite, secret, b"key", key_len)?,
        expand_label(suite, secret, b"iv", 12)?,
    ))
}

/// The TLS 1.3 suite of the agent's crypto provider that uses `cipher`.
fn tls13_suite(cipher: Cipher) -> Result<&'static rustls::Tls13CipherSuite, String> {
    use rustls::crypto::aws_lc_rs::cipher_suite as s;
    let suite = match cipher {
        Cipher::Aes128Gcm => s::TLS13_AES_128_GCM_SHA256,
        Cipher::Aes256Gcm => s::TLS13_AES_256_GCM_SHA384,
        Cipher::Chacha20Poly1305 => s::TLS13_CHACHA20_POLY1305_SHA256,
    };
    suite
        .tls13()
        .ok_or_else(|| format!("no TLS 1.3 suite for {cipher}"))
}

/// HKDF-Expand-Label(secret, label, "", len) (RFC 8446 7.1).
fn expand_label(
    suite: &rustls::Tls13CipherSuite,
    secret: &Secret,
    label: &[u8],
    len: usize,
) -> Result<Secret, String> {
    let expander = suite
        .hkdf_provider
        .expander_for_okm(&rustls::crypto::tls13::OkmBlock::new(&secret.0));
    let out_len = u16::try_from(len).map_err(|_| "output too long".to_owned())?;
    let label_len = u8::try_from(6 + label.len()).map_err(|_| "label too long".to_owned())?;
    let info: [&[u8]; 6] = [
        &out_len.to_be_bytes(),
        &[label_len],
        b"tls13 ",
        label,
        &[0],
        &[],
    ];
    let mut out = Zeroizing::new(vec![0u8; len]);
    expander
        .expand_slice(&info, &mut out)
        .map_err(|_| format!("HKDF-Expand-Label for {len} bytes"))?;
    Ok(Secret(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// RFC 8448 section 3 (simple 1-RTT handshake): the server's application traffic secret
    /// and the write key and IV derived from it.
    #[test]
    fn keys_are_derived_as_rfc_8448_shows() {
        let server = Secret::new(&hex(
            "a1 1a f9 f0 55 31 f8 56 ad 47 11 6b 45 a9 50 32 82 04 b4 f4 4b fb 6b 3a 4b 4f 1f 3f cb 63 16 43",
        ));
        let schedule = Schedule {
            cipher: Cipher::Aes128Gcm,
            tx: server.clone(),
            rx: server,
        };
        let (key, iv) = schedule.current(Direction::Tx).unwrap();
        assert_eq!(
            *key.0,
            hex("9f 02 28 3b 6c 9c 07 ef c2 6b b9 f2 ac 92 e3 56")
        );
        assert_eq!(*iv.0, hex("cf 78 2b 88 dd 83 54 9a ad f1 e9 84"));
    }

    #[test]
    fn an_update_moves_one_direction_only_and_changes_its_keys() {
        let mut schedule = Schedule {
            cipher: Cipher::Aes256Gcm,
            tx: Secret::new(&[1; 48]),
            rx: Secret::new(&[2; 48]),
        };
        let before = schedule.clone();
        let (key, iv) = schedule.next(Direction::Tx).unwrap();
        assert_eq!((key.0.len(), iv.0.len()), (32, 12));
        assert_ne!(schedule.tx, before.tx);
        assert_eq!(schedule.rx, before.rx);
        assert_eq!(schedule.current(Direction::Tx).unwrap(), (key, iv));
        // Secrets never show in debug output (rx is still all 2s).
        let shown = format!("{schedule:?}");
        assert!(
            !shown.contains("2, 2") && shown.contains("redacted"),
            "{shown}"
        );
    }
}
