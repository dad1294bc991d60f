//! What the running kernel and process can do: kTLS per version, cipher and direction, the
//! kernel counters, BTF and the capabilities held. `tlsplice probe` prints this report.

use std::fmt;
use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsFd;

use crate::ktls::{self, Cipher, CryptoInfo, Direction, KtlsError, TlsStat, TlsVersion};

/// Why kTLS cannot be used on this kernel.
#[derive(Debug, thiserror::Error)]
pub enum KtlsUnavailable {
    /// A loopback socket pair for the probe could not be made.
    #[error("cannot create a loopback TCP pair to probe kTLS: {0}")]
    Loopback(#[from] io::Error),
    /// The kernel refused the TLS ULP.
    #[error("{0}")]
    Kernel(#[from] KtlsError),
}

/// An established loopback TCP connection: both ends.
fn loopback_pair() -> io::Result<(TcpStream, TcpStream)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let client = TcpStream::connect(listener.local_addr()?)?;
    let (server, _) = listener.accept()?;
    Ok((client, server))
}

/// Checks that the kernel accepts the TLS ULP on an established TCP socket.
pub fn ktls_available() -> Result<(), KtlsUnavailable> {
    let (client, _server) = loopback_pair()?;
    ktls::attach_ulp(client.as_fd())?;
    Ok(())
}

/// Checks that the kernel accepts crypto state for one version, cipher and direction.
pub fn ktls_supports(
    version: TlsVersion,
    cipher: Cipher,
    direction: Direction,
) -> Result<(), KtlsUnavailable> {
    let (client, _server) = loopback_pair()?;
    ktls::attach_ulp(client.as_fd())?;
    ktls::set_crypto_info(
        client.as_fd(),
        direction,
        &CryptoInfo::zeroed(version, cipher),
    )?;
    Ok(())
}

/// Checks that the kernel takes a second TLS 1.3 TX key on a socket that already has one: the
/// rekey that follows a KeyUpdate (kernel 6.14 and later; older kernels answer EBUSY).
pub fn ktls_rekey_supported() -> Result<(), KtlsUnavailable> {
    let (client, _server) = loopback_pair()?;
    ktls::attach_ulp(client.as_fd())?;
    let info = CryptoInfo::zeroed(TlsVersion::Tls13, Cipher::Aes128Gcm);
    ktls::set_crypto_info(client.as_fd(), Direction::Tx, &info)?;
    ktls::set_crypto_info(client.as_fd(), Direction::Tx, &info)?;
    Ok(())
}

/// Checks that splice(2) moves decrypted bytes out of a kTLS RX socket and encrypted bytes into
/// a kTLS TX socket, as the ktls data path does: a loopback connection with kTLS both ways on
/// both ends (one zero TLS 1.3 key), a message written by one end, spliced by the other from its
/// socket into a pipe and from the pipe back into its socket, and read back by the first.
pub fn ktls_splice_supported() -> Result<(), KtlsUnavailable> {
    use std::io::{Read, Write};
    use std::time::{Duration, Instant};
    let fail = |what: &str, e: io::Error| {
        KtlsUnavailable::Loopback(io::Error::new(e.kind(), format!("{what}: {e}")))
    };
    let (mut client, server) = loopback_pair()?;
    let info = CryptoInfo::zeroed(TlsVersion::Tls13, Cipher::Aes128Gcm);
    for sock in [&client, &server] {
        ktls::attach_ulp(sock.as_fd())?;
        ktls::set_crypto_info(sock.as_fd(), Direction::Tx, &info)?;
        ktls::set_crypto_info(sock.as_fd(), Direction::Rx, &info)?;
    }
    let pipe = crate::splice::Pipe::new(64 * 1024).map_err(|e| fail("pipe2", e))?;
    let message = b"tlsplice splice probe";
    client
        .write_all(message)
        .map_err(|e| fail("write to kTLS TX", e))?;
    let deadline = Instant::now() + Duration::from_secs(2);
    let splice_all = |from, to, what: &str| -> Result<(), KtlsUnavailable> {
        let mut moved = 0;
        while moved < message.len() {
            match crate::splice::splice(from, to, message.len() - moved) {
                Ok(0) => return Err(fail(what, io::ErrorKind::UnexpectedEof.into())),
                Ok(n) => moved += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(fail(what, e)),
            }
        }
        Ok(())
    };
    splice_all(server.as_fd(), pipe.write_end(), "splice from kTLS RX")?;
    splice_all(pipe.read_end(), server.as_fd(), "splice into kTLS TX")?;
    client
        .set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| fail("SO_RCVTIMEO", e))?;
    let mut echoed = vec![0u8; message.len()];
    client
        .read_exact(&mut echoed)
        .map_err(|e| fail("read from kTLS RX", e))?;
    if echoed != message {
        return Err(fail(
            "spliced bytes",
            io::Error::other("came back different"),
        ));
    }
    Ok(())
}

/// The kernel release, e.g. "6.12.48+deb12-cloud-amd64".
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|e| format!("unknown ({e})"))
}

/// Major and minor number of a kernel release string.
pub fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Capabilities the agent cares about, with their bit numbers (linux/capability.h).
const CAPABILITIES: [(&str, u32); 5] = [
    ("CAP_NET_BIND_SERVICE", 10),
    ("CAP_NET_ADMIN", 12),
    ("CAP_SYS_ADMIN", 21),
    ("CAP_PERFMON", 38),
    ("CAP_BPF", 39),
];

/// The effective capability set of this process, from /proc/self/status.
fn effective_capabilities() -> io::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .ok_or_else(|| io::Error::other("no CapEff line in /proc/self/status"))
}

/// One line of the kTLS support table.
#[derive(Debug)]
pub struct CipherSupport {
    /// Protocol version.
    pub version: TlsVersion,
    /// Cipher.
    pub cipher: Cipher,
    /// TX result: `None` when supported, or why not.
    pub tx: Option<String>,
    /// RX result: `None` when supported, or why not.
    pub rx: Option<String>,
}

/// Everything `tlsplice probe` reports.
#[derive(Debug)]
pub struct ProbeReport {
    /// `uname -r`.
    pub kernel: String,
    /// `None` when the TLS ULP attaches, or the reason it does not.
    pub ktls: Option<String>,
    /// Per version and cipher, when the ULP exists.
    pub ciphers: Vec<CipherSupport>,
    /// TLS 1.3 KeyUpdate in kTLS (kernel 6.14 and later): `None` when a second TX key is
    /// accepted, else why not.
    pub rekey: Option<String>,
    /// splice(2) out of kTLS RX and into kTLS TX: `None` when it works, else why not.
    pub splice: Option<String>,
    /// /proc/net/tls_stat counters, when present.
    pub tls_stat: Option<TlsStat>,
    /// /sys/kernel/btf/vmlinux exists.
    pub btf: bool,
    /// Capabilities of interest and whether each is effective; `Err` if unreadable.
    pub capabilities: Result<Vec<(&'static str, bool)>, String>,
    /// `None` when the eBPF object and its programs load here, else why not.
    pub ebpf: Option<String>,
}

impl ProbeReport {
    /// Probes the running kernel.
    pub fn collect() -> Self {
        let kernel = kernel_release();
        let ktls = ktls_available().err().map(|e| e.to_string());
        let ciphers = if ktls.is_none() {
            TlsVersion::ALL
                .iter()
                .flat_map(|&version| Cipher::ALL.iter().map(move |&cipher| (version, cipher)))
                .map(|(version, cipher)| CipherSupport {
                    version,
                    cipher,
                    tx: ktls_supports(version, cipher, Direction::Tx)
                        .err()
                        .map(|e| e.to_string()),
                    rx: ktls_supports(version, cipher, Direction::Rx)
                        .err()
                        .map(|e| e.to_string()),
                })
                .collect()
        } else {
            Vec::new()
        };
        let splice = match &ktls {
            None => ktls_splice_supported().err().map(|e| e.to_string()),
            Some(_) => Some("kTLS unavailable".to_owned()),
        };
        let rekey = match &ktls {
            None => ktls_rekey_supported().err().map(|e| e.to_string()),
            Some(_) => Some("kTLS unavailable".to_owned()),
        };
        let capabilities = effective_capabilities()
            .map(|eff| {
                CAPABILITIES
                    .iter()
                    .map(|&(name, bit)| (name, eff & (1u64 << bit) != 0))
                    .collect()
            })
            .map_err(|e| e.to_string());
        Self {
            kernel,
            ktls,
            ciphers,
            rekey,
            splice,
            tls_stat: TlsStat::read().ok().flatten(),
            btf: std::path::Path::new("/sys/kernel/btf/vmlinux").exists(),
            capabilities,
            ebpf: crate::bpf::probe_load().err().map(|e| e.to_string()),
        }
    }
}

fn yes_no(result: &Option<String>) -> &str {
    match result {
        None => "yes",
        Some(why) => why,
    }
}

impl fmt::Display for ProbeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "kernel: {}", self.kernel)?;
        match &self.ktls {
            None => writeln!(f, "ktls: available")?,
            Some(why) => writeln!(f, "ktls: unavailable: {why}")?,
        }
        for c in &self.ciphers {
            writeln!(
                f,
                "ktls {} {}: tx {}, rx {}",
                c.version,
                c.cipher,
                yes_no(&c.tx),
                yes_no(&c.rx)
            )?;
        }
        match &self.splice {
            None => writeln!(f, "ktls splice (RX -> pipe -> TX): yes")?,
            Some(why) => writeln!(f, "ktls splice (RX -> pipe -> TX): no ({why})")?,
        }
        match &self.rekey {
            None => writeln!(f, "ktls tls1.3 rekey: yes")?,
            Some(why) => writeln!(f, "ktls tls1.3 rekey: no ({why}; needs kernel >= 6.14)")?,
        }
        match &self.tls_stat {
            Some(stat) => {
                let counters: Vec<String> = stat
                    .counters
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                writeln!(f, "tls_stat: {}", counters.join(" "))?;
            }
            None => writeln!(f, "tls_stat: absent ({} does not exist)", TlsStat::PATH)?,
        }
        writeln!(f, "btf: {}", if self.btf { "yes" } else { "no" })?;
        match &self.ebpf {
            None => writeln!(
                f,
                "ebpf: programs load (sock_ops and cgroup_skb counters, sockmap verdict)"
            )?,
            Some(why) => writeln!(f, "ebpf: off: {why}")?,
        }
        match &self.capabilities {
            Ok(caps) => {
                let held: Vec<&str> = caps.iter().filter(|c| c.1).map(|c| c.0).collect();
                let missing: Vec<&str> = caps.iter().filter(|c| !c.1).map(|c| c.0).collect();
                writeln!(
                    f,
                    "capabilities: held [{}] missing [{}]",
                    held.join(" "),
                    missing.join(" ")
                )?;
            }
            Err(e) => writeln!(f, "capabilities: unknown ({e})")?,
        }
        Ok(())
    }
}

/// Busy CPU seconds of the whole node since boot (every CPU, every process and kernel thread:
/// everything but idle and iowait), from the `cpu` line of /proc/stat. Kernel work no process
/// is charged for, such as sockmap redirects in kernel workers, is in it.
pub fn node_busy_seconds() -> io::Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .ok_or_else(|| io::Error::other("/proc/stat has no cpu line"))?;
    let ticks: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal; guest time is already in user.
    let busy: f64 = [0, 1, 2, 5, 6, 7]
        .iter()
        .filter_map(|&i| ticks.get(i))
        .sum();
    // USER_HZ: the kernel ABI fixes /proc tick units at 100 per second.
    Ok(busy / 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kernel_releases() {
        assert_eq!(parse_release("6.1.0-41-cloud-amd64"), Some((6, 1)));
        assert_eq!(parse_release("6.12.48+deb12-cloud-amd64"), Some((6, 12)));
        assert_eq!(parse_release("7.2.1"), Some((7, 2)));
        assert_eq!(parse_release("garbage"), None);
    }

    /// On any kernel the probe must agree with itself: either the ULP attaches and at least one
    /// cipher is accepted, or it is reported unavailable with a reason and no ciphers.
    #[test]
    fn probe_is_consistent() {
        let report = ProbeReport::collect();
        match &report.ktls {
            None => assert!(report.ciphers.iter().any(|c| c.tx.is_none())),
            Some(why) => {
                assert!(why.contains("TCP_ULP"), "{why}");
                assert!(report.ciphers.is_empty());
            }
        }
        assert!(report.to_string().starts_with("kernel: "));
    }
}
