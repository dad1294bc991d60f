//! The kernel TLS (kTLS) interface.
//!
//! This module is the only place that talks to the kernel's TLS ULP: it attaches the ULP
//! (`setsockopt(TCP_ULP, "tls")`), installs per-direction crypto state
//! (`setsockopt(SOL_TLS, TLS_TX | TLS_RX)`), and sends and receives records with an explicit
//! record type (`sendmsg`/`recvmsg` with `TLS_SET_RECORD_TYPE` / `TLS_GET_RECORD_TYPE` control
//! messages). See the kernel's Documentation/networking/tls.rst.
#![allow(unsafe_code)]

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::mem;
use std::os::fd::{AsRawFd, BorrowedFd};

use rustls::{ConnectionTrafficSecrets, ProtocolVersion};
use zeroize::Zeroize;

/// A direction of a kTLS socket: what we send (TX) or what we receive (RX).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Records the kernel encrypts on `write`/`sendmsg`.
    Tx,
    /// Records the kernel decrypts on `read`/`recvmsg`.
    Rx,
}

impl Direction {
    fn optname(self) -> libc::c_int {
        match self {
            Direction::Tx => libc::TLS_TX,
            Direction::Rx => libc::TLS_RX,
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Tx => "TLS_TX",
            Direction::Rx => "TLS_RX",
        })
    }
}

/// TLS protocol versions the kernel can offload.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum TlsVersion {
    /// TLS 1.2 (RFC 5246).
    Tls12,
    /// TLS 1.3 (RFC 8446).
    Tls13,
}

impl TlsVersion {
    /// All versions, oldest first.
    pub const ALL: [TlsVersion; 2] = [TlsVersion::Tls12, TlsVersion::Tls13];

    fn kernel_value(self) -> u16 {
        match self {
            TlsVersion::Tls12 => libc::TLS_1_2_VERSION,
            TlsVersion::Tls13 => libc::TLS_1_3_VERSION,
        }
    }

    /// Maps a negotiated rustls protocol version; `None` for versions kTLS cannot carry.
    pub fn from_rustls(version: ProtocolVersion) -> Option<Self> {
        match version {
            ProtocolVersion::TLSv1_2 => Some(TlsVersion::Tls12),
            ProtocolVersion::TLSv1_3 => Some(TlsVersion::Tls13),
            _ => None,
        }
    }
}

impl fmt::Display for TlsVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TlsVersion::Tls12 => "TLSv1.2",
            TlsVersion::Tls13 => "TLSv1.3",
        })
    }
}

/// AEAD ciphers the agent offloads to the kernel.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum Cipher {
    /// AES-128-GCM (`TLS_CIPHER_AES_GCM_128`).
    Aes128Gcm,
    /// AES-256-GCM (`TLS_CIPHER_AES_GCM_256`).
    Aes256Gcm,
    /// ChaCha20-Poly1305 (`TLS_CIPHER_CHACHA20_POLY1305`).
    Chacha20Poly1305,
}

impl Cipher {
    /// The AEAD of a TLS 1.2 or 1.3 cipher suite, when the kernel has one for it.
    pub fn from_suite(suite: rustls::CipherSuite) -> Option<Self> {
        use rustls::CipherSuite as S;
        match suite {
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

    /// All offloadable ciphers.
    pub const ALL: [Cipher; 3] = [
        Cipher::Aes128Gcm,
        Cipher::Aes256Gcm,
        Cipher::Chacha20Poly1305,
    ];
}

impl fmt::Display for Cipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Cipher::Aes128Gcm => "AES-128-GCM",
            Cipher::Aes256Gcm => "AES-256-GCM",
            Cipher::Chacha20Poly1305 => "CHACHA20-POLY1305",
        })
    }
}

/// Failures of the kTLS kernel interface, each naming the syscall and option involved.
#[derive(Debug, thiserror::Error)]
pub enum KtlsError {
    /// The kernel refused to attach the TLS ULP.
    #[error(
        "setsockopt(TCP_ULP, \"tls\") on fd {fd}: {source}{}",
        ulp_hint(source)
    )]
    AttachUlp {
        /// The socket.
        fd: i32,
        /// The errno.
        source: io::Error,
    },
    /// The kernel refused the crypto state for one direction.
    #[error("setsockopt(SOL_TLS, {direction}) for {version} {cipher} on fd {fd}: {source}")]
    SetCryptoInfo {
        /// The socket.
        fd: i32,
        /// Which direction was being installed.
        direction: Direction,
        /// The negotiated version.
        version: TlsVersion,
        /// The negotiated cipher.
        cipher: Cipher,
        /// The errno.
        source: io::Error,
    },
    /// The kernel would not report the crypto state of one direction.
    #[error("getsockopt(SOL_TLS, {direction}) on fd {fd}: {source}")]
    GetCryptoInfo {
        /// The socket.
        fd: i32,
        /// Which direction was asked for.
        direction: Direction,
        /// The errno.
        source: io::Error,
    },
    /// rustls negotiated something the kernel cannot carry.
    #[error("cannot offload {what} to kTLS")]
    Unsupported {
        /// What was negotiated.
        what: String,
    },
}

fn ulp_hint(err: &io::Error) -> &'static str {
    match err.raw_os_error() {
        Some(libc::ENOENT) => {
            " (the kernel has no \"tls\" ULP: CONFIG_TLS is unset or tls.ko is not loaded)"
        }
        Some(libc::ENOTCONN) => {
            " (the socket is not connected: the ULP needs an established TCP socket)"
        }
        Some(libc::EEXIST) => " (a ULP is already attached to this socket)",
        _ => "",
    }
}

/// Key material for one direction in the layout the kernel expects.
///
/// The key, salt and IV are zeroized when this value is dropped, so nothing outlives the
/// `setsockopt` call that hands them to the kernel.
pub struct CryptoInfo {
    version: TlsVersion,
    layout: CryptoLayout,
}

enum CryptoLayout {
    Aes128Gcm(libc::tls12_crypto_info_aes_gcm_128),
    Aes256Gcm(libc::tls12_crypto_info_aes_gcm_256),
    Chacha20Poly1305(libc::tls12_crypto_info_chacha20_poly1305),
}

impl fmt::Debug for CryptoInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CryptoInfo")
            .field("version", &self.version)
            .field("cipher", &self.cipher())
            .field("key", &"<redacted>")
            .finish()
    }
}

impl CryptoInfo {
    /// Builds the kernel's crypto state from the secrets rustls extracted for one direction.
    ///
    /// `seq` is the sequence number of the next record in that direction.
    pub fn from_rustls(
        version: TlsVersion,
        seq: u64,
        secrets: &ConnectionTrafficSecrets,
    ) -> Result<Self, KtlsError> {
        let (cipher, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (Cipher::Aes128Gcm, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (Cipher::Aes256Gcm, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (Cipher::Chacha20Poly1305, key, iv)
            }
            _ => {
                return Err(KtlsError::Unsupported {
                    what: "a cipher other than AES-GCM or ChaCha20-Poly1305".to_owned(),
                });
            }
        };
        Self::from_parts(version, cipher, seq, key.as_ref(), iv.as_ref())
    }

    /// Crypto state from a traffic key and its 12-byte IV (the nonce base), with `seq` the
    /// sequence number of the next record (a new key after a KeyUpdate starts at 0).
    pub fn from_parts(
        version: TlsVersion,
        cipher: Cipher,
        seq: u64,
        key: &[u8],
        iv: &[u8],
    ) -> Result<Self, KtlsError> {
        let mut info = Self::zeroed(version, cipher);
        // rustls gives the 12-byte nonce base; for the GCM ciphers the kernel wants it split into
        // a 4-byte implicit salt and an 8-byte IV, for ChaCha20-Poly1305 whole (RFC 8446 5.3,
        // RFC 5288 3, RFC 7905 2).
        match &mut info.layout {
            CryptoLayout::Aes128Gcm(c) => {
                fill(
                    &mut c.key,
                    &mut c.salt,
                    &mut c.iv,
                    &mut c.rec_seq,
                    key,
                    iv,
                    seq,
                    cipher,
                )?;
            }
            CryptoLayout::Aes256Gcm(c) => {
                fill(
                    &mut c.key,
                    &mut c.salt,
                    &mut c.iv,
                    &mut c.rec_seq,
                    key,
                    iv,
                    seq,
                    cipher,
                )?;
            }
            CryptoLayout::Chacha20Poly1305(c) => {
                fill(
                    &mut c.key,
                    &mut c.salt,
                    &mut c.iv,
                    &mut c.rec_seq,
                    key,
                    iv,
                    seq,
                    cipher,
                )?;
            }
        }
        Ok(info)
    }

    /// Crypto state with an all-zero key, for probing whether the kernel accepts a cipher (and
    /// as the blank that [`CryptoInfo::from_rustls`] fills in).
    pub fn zeroed(version: TlsVersion, cipher: Cipher) -> Self {
        let info = |cipher_type| libc::tls_crypto_info {
            version: version.kernel_value(),
            cipher_type,
        };
        let layout = match cipher {
            Cipher::Aes128Gcm => CryptoLayout::Aes128Gcm(libc::tls12_crypto_info_aes_gcm_128 {
                info: info(libc::TLS_CIPHER_AES_GCM_128),
                iv: [0; 8],
                key: [0; 16],
                salt: [0; 4],
                rec_seq: [0; 8],
            }),
            Cipher::Aes256Gcm => CryptoLayout::Aes256Gcm(libc::tls12_crypto_info_aes_gcm_256 {
                info: info(libc::TLS_CIPHER_AES_GCM_256),
                iv: [0; 8],
                key: [0; 32],
                salt: [0; 4],
                rec_seq: [0; 8],
            }),
            Cipher::Chacha20Poly1305 => {
                CryptoLayout::Chacha20Poly1305(libc::tls12_crypto_info_chacha20_poly1305 {
                    info: info(libc::TLS_CIPHER_CHACHA20_POLY1305),
                    iv: [0; 12],
                    key: [0; 32],
                    salt: [],
                    rec_seq: [0; 8],
                })
            }
        };
        Self { version, layout }
    }

    /// The cipher this state is for.
    pub fn cipher(&self) -> Cipher {
        match self.layout {
            CryptoLayout::Aes128Gcm(_) => Cipher::Aes128Gcm,
            CryptoLayout::Aes256Gcm(_) => Cipher::Aes256Gcm,
            CryptoLayout::Chacha20Poly1305(_) => Cipher::Chacha20Poly1305,
        }
    }

    /// The protocol version this state is for.
    pub fn version(&self) -> TlsVersion {
        self.version
    }
}

impl Drop for CryptoInfo {
    fn drop(&mut self) {
        match &mut self.layout {
            CryptoLayout::Aes128Gcm(c) => {
                c.key.zeroize();
                c.iv.zeroize();
                c.salt.zeroize();
            }
            CryptoLayout::Aes256Gcm(c) => {
                c.key.zeroize();
                c.iv.zeroize();
                c.salt.zeroize();
            }
            CryptoLayout::Chacha20Poly1305(c) => {
                c.key.zeroize();
                c.iv.zeroize();
            }
        }
    }
}

/// Copies key material into a kernel struct's fields: the nonce base is split into salt
/// (its first `salt.len()` bytes) and IV (the rest).
#[allow(clippy::too_many_arguments)] // the four destination fields of one kernel struct
fn fill(
    dst_key: &mut [u8],
    dst_salt: &mut [u8],
    dst_iv: &mut [u8],
    dst_seq: &mut [u8; 8],
    key: &[u8],
    nonce: &[u8],
    seq: u64,
    cipher: Cipher,
) -> Result<(), KtlsError> {
    if key.len() != dst_key.len() || nonce.len() != dst_salt.len() + dst_iv.len() {
        return Err(KtlsError::Unsupported {
            what: format!(
                "{cipher} with a {}-byte key and {}-byte nonce (the kernel wants {} and {})",
                key.len(),
                nonce.len(),
                dst_key.len(),
                dst_salt.len() + dst_iv.len()
            ),
        });
    }
    dst_key.copy_from_slice(key);
    let (salt, iv) = nonce.split_at(dst_salt.len());
    dst_salt.copy_from_slice(salt);
    dst_iv.copy_from_slice(iv);
    *dst_seq = seq.to_be_bytes();
    Ok(())
}

/// Attaches the kernel TLS ULP to an established TCP socket.
pub fn attach_ulp(sock: BorrowedFd<'_>) -> Result<(), KtlsError> {
    let name = b"tls";
    // SAFETY: `sock` is a live descriptor for the duration of the call; the option value points
    // to `name`, valid for `name.len()` bytes, which the kernel only reads.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_TCP,
            libc::TCP_ULP,
            name.as_ptr().cast(),
            name.len() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(KtlsError::AttachUlp {
            fd: sock.as_raw_fd(),
            source: io::Error::last_os_error(),
        })
    }
}

/// Installs the crypto state for one direction on a socket that has the TLS ULP attached.
pub fn set_crypto_info(
    sock: BorrowedFd<'_>,
    direction: Direction,
    info: &CryptoInfo,
) -> Result<(), KtlsError> {
    let (ptr, len): (*const libc::c_void, usize) = match &info.layout {
        CryptoLayout::Aes128Gcm(c) => (std::ptr::from_ref(c).cast(), mem::size_of_val(c)),
        CryptoLayout::Aes256Gcm(c) => (std::ptr::from_ref(c).cast(), mem::size_of_val(c)),
        CryptoLayout::Chacha20Poly1305(c) => (std::ptr::from_ref(c).cast(), mem::size_of_val(c)),
    };
    // SAFETY: `ptr` points to a live, fully initialised `tls12_crypto_info_*` struct of `len`
    // bytes owned by `info`, which outlives the call; the kernel copies it and keeps no pointer.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_TLS,
            direction.optname(),
            ptr,
            len as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(KtlsError::SetCryptoInfo {
            fd: sock.as_raw_fd(),
            direction,
            version: info.version,
            cipher: info.cipher(),
            source: io::Error::last_os_error(),
        })
    }
}

/// The sequence number of the next record the kernel will send (`Tx`) or expects (`Rx`) under
/// the current key, read back with `getsockopt(SOL_TLS, TLS_TX/TLS_RX)`.
///
/// The kernel copies the whole crypto state, key included, into our buffer: it lives in a
/// [`CryptoInfo`], which zeroizes it on drop.
pub fn record_sequence(
    sock: BorrowedFd<'_>,
    direction: Direction,
    version: TlsVersion,
    cipher: Cipher,
) -> Result<u64, KtlsError> {
    let mut info = CryptoInfo::zeroed(version, cipher);
    let (ptr, len): (*mut libc::c_void, usize) = match &mut info.layout {
        CryptoLayout::Aes128Gcm(c) => (std::ptr::from_mut(c).cast(), mem::size_of_val(c)),
        CryptoLayout::Aes256Gcm(c) => (std::ptr::from_mut(c).cast(), mem::size_of_val(c)),
        CryptoLayout::Chacha20Poly1305(c) => (std::ptr::from_mut(c).cast(), mem::size_of_val(c)),
    };
    let mut optlen = len as libc::socklen_t;
    // SAFETY: `ptr` points to a live `tls12_crypto_info_*` struct of `len` bytes owned by `info`
    // and `optlen` says so; the kernel writes at most `optlen` bytes and keeps no pointer.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_TLS,
            direction.optname(),
            ptr,
            &raw mut optlen,
        )
    };
    if rc != 0 {
        return Err(KtlsError::GetCryptoInfo {
            fd: sock.as_raw_fd(),
            direction,
            source: io::Error::last_os_error(),
        });
    }
    let rec_seq = match &info.layout {
        CryptoLayout::Aes128Gcm(c) => c.rec_seq,
        CryptoLayout::Aes256Gcm(c) => c.rec_seq,
        CryptoLayout::Chacha20Poly1305(c) => c.rec_seq,
    };
    Ok(u64::from_be_bytes(rec_seq))
}

/// TLS record content types (RFC 8446 section 5.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordType {
    /// change_cipher_spec (20).
    ChangeCipherSpec,
    /// alert (21).
    Alert,
    /// handshake (22): NewSessionTicket and KeyUpdate after the handshake.
    Handshake,
    /// application_data (23).
    ApplicationData,
    /// Anything else the kernel reports.
    Other(u8),
}

impl RecordType {
    /// The wire value.
    pub fn to_u8(self) -> u8 {
        match self {
            RecordType::ChangeCipherSpec => 20,
            RecordType::Alert => 21,
            RecordType::Handshake => 22,
            RecordType::ApplicationData => 23,
            RecordType::Other(v) => v,
        }
    }

    /// From the wire value.
    pub fn from_u8(v: u8) -> Self {
        match v {
            20 => RecordType::ChangeCipherSpec,
            21 => RecordType::Alert,
            22 => RecordType::Handshake,
            23 => RecordType::ApplicationData,
            v => RecordType::Other(v),
        }
    }
}

/// Room for one `cmsghdr` carrying a single byte, aligned for `cmsghdr`.
#[repr(C)]
struct RecordTypeCmsgBuf {
    _align: [libc::cmsghdr; 0],
    bytes: [u8; 32],
}

/// Sends `data` as one or more records of `record_type` on a kTLS TX socket.
pub fn send_record(
    sock: BorrowedFd<'_>,
    record_type: RecordType,
    data: &[u8],
) -> io::Result<usize> {
    let mut cbuf = RecordTypeCmsgBuf {
        _align: [],
        bytes: [0; 32],
    };
    let mut iov = libc::iovec {
        iov_base: data.as_ptr().cast_mut().cast(),
        iov_len: data.len(),
    };
    // SAFETY: all-zero is a valid `msghdr` (null pointers, zero lengths).
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.bytes.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE only computes a size.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(1) } as usize;
    // SAFETY: msg_control points to `cbuf`, which is cmsghdr-aligned and larger than
    // CMSG_SPACE(1), so CMSG_FIRSTHDR returns a non-null pointer to a writable header inside it,
    // and CMSG_DATA points to the byte after that header, also inside it. `iov` and `data`
    // outlive the sendmsg call, which only reads them.
    let rc = unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_TLS;
        (*cmsg).cmsg_type = libc::TLS_SET_RECORD_TYPE;
        (*cmsg).cmsg_len = libc::CMSG_LEN(1) as usize;
        *libc::CMSG_DATA(cmsg) = record_type.to_u8();
        libc::sendmsg(sock.as_raw_fd(), &msg, 0)
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc as usize)
    }
}

/// Receives from a kTLS RX socket, reporting the record type of what was read.
///
/// The kernel never mixes record types in one read, and without a control buffer a non-data
/// record would fail with `EIO`; this reads with one. `Ok((_, 0))` means the TCP peer closed.
pub fn recv_record(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(RecordType, usize)> {
    let mut cbuf = RecordTypeCmsgBuf {
        _align: [],
        bytes: [0; 32],
    };
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: all-zero is a valid `msghdr` (null pointers, zero lengths).
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.bytes.as_mut_ptr().cast();
    msg.msg_controllen = cbuf.bytes.len();
    // SAFETY: `iov` points into `buf` and `msg_control` into `cbuf`, both writable for the
    // lengths given and alive across the call.
    let rc = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, 0) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut record_type = RecordType::ApplicationData;
    // SAFETY: the kernel filled `msg.msg_control`/`msg_controllen` within `cbuf`; the CMSG_*
    // macros walk only headers inside that range, and a TLS_GET_RECORD_TYPE cmsg carries one
    // byte of data.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_TLS && (*cmsg).cmsg_type == libc::TLS_GET_RECORD_TYPE
            {
                record_type = RecordType::from_u8(*libc::CMSG_DATA(cmsg));
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok((record_type, rc as usize))
}

/// The kernel's kTLS counters from `/proc/net/tls_stat` (TlsTxSw, TlsRxSw, TlsDecryptError...).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsStat {
    /// Counter name to value.
    pub counters: BTreeMap<String, u64>,
}

impl TlsStat {
    /// Where the kernel publishes the counters once tls.ko is loaded.
    pub const PATH: &'static str = "/proc/net/tls_stat";

    /// Reads the counters; `Ok(None)` when the file does not exist (no kTLS in this kernel).
    pub fn read() -> io::Result<Option<Self>> {
        match std::fs::read_to_string(Self::PATH) {
            Ok(text) => Ok(Some(Self::parse(&text))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Parses the `Name   value` lines of the file; malformed lines are skipped.
    pub fn parse(text: &str) -> Self {
        let counters = text
            .lines()
            .filter_map(|line| {
                let mut parts = line.split_whitespace();
                let name = parts.next()?;
                let value = parts.next()?.parse().ok()?;
                Some((name.to_owned(), value))
            })
            .collect();
        Self { counters }
    }

    /// One counter, 0 when absent.
    pub fn get(&self, name: &str) -> u64 {
        self.counters.get(name).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tls_stat() {
        let stat = TlsStat::parse("TlsCurrTxSw                     \t2\nTlsTxSw    7\nbogus\n");
        assert_eq!(stat.get("TlsCurrTxSw"), 2);
        assert_eq!(stat.get("TlsTxSw"), 7);
        assert_eq!(stat.get("TlsRxSw"), 0);
        assert_eq!(stat.counters.len(), 2);
    }

    #[test]
    fn gcm_nonce_is_split_into_salt_and_iv() {
        let key = rustls::crypto::cipher::AeadKey::from([7u8; 32]);
        let iv = rustls::crypto::cipher::Iv::new([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
        let secrets = ConnectionTrafficSecrets::Aes256Gcm { key, iv };
        let info = CryptoInfo::from_rustls(TlsVersion::Tls13, 0x0102, &secrets).expect("layout");
        match &info.layout {
            CryptoLayout::Aes256Gcm(c) => {
                assert_eq!(c.salt, [1, 2, 3, 4]);
                assert_eq!(c.iv, [5, 6, 7, 8, 9, 10, 11, 12]);
                assert_eq!(c.key, [7; 32]);
                assert_eq!(c.rec_seq, [0, 0, 0, 0, 0, 0, 1, 2]);
                assert_eq!(c.info.version, 0x0304);
                assert_eq!(c.info.cipher_type, 52);
            }
            _ => panic!("wrong layout"),
        }
        assert!(!format!("{info:?}").contains('7'));
    }
}
