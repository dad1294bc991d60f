//! Which data path a connection takes, and why: pure decisions over the listener's policy,
//! what the kernel can offload, what the handshakes negotiated and the node's passthrough
//! choice. The connection code ([`crate::proxy`]), `tlsplice probe --config` ([`summary`]) and
//! the table test below all ask [`choose`]; the I/O code only carries its answer out.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::sync::Arc;

use crate::config::{DataPathPolicy, Mode, PassthroughPath, SOCKMAP_MARGIN};
use crate::ktls::{Cipher, TlsVersion};
use crate::outcome::DataPath;
use crate::probe;

/// What the running kernel can offload, probed once at start.
#[derive(Debug, Clone)]
pub struct KernelCaps {
    /// Version/cipher pairs the kernel takes for both TX and RX, or why kTLS is unusable.
    ktls: Result<BTreeSet<(TlsVersion, Cipher)>, String>,
    /// `Ok` when the kernel takes new TLS 1.3 keys on a live socket (KeyUpdate), else why not.
    rekey: Result<(), Arc<str>>,
}

impl KernelCaps {
    /// Probes the running kernel.
    pub fn probe() -> Self {
        Self::from_report(&probe::ProbeReport::collect())
    }

    /// What a probe report says can be offloaded: pairs accepted for both TX and RX.
    pub fn from_report(report: &probe::ProbeReport) -> Self {
        let ktls = match (&report.ktls, &report.splice) {
            (Some(why), _) => Err(format!("kernel has no kTLS: {why}")),
            (None, Some(why)) => Err(format!("kernel cannot splice kTLS sockets: {why}")),
            (None, None) => Ok(report
                .ciphers
                .iter()
                .filter(|c| c.tx.is_none() && c.rx.is_none())
                .map(|c| (c.version, c.cipher))
                .collect()),
        };
        let rekey = match &report.rekey {
            None => Ok(()),
            Some(why) => Err(Arc::from(format!("kernel cannot rekey kTLS: {why}"))),
        };
        Self { ktls, rekey }
    }

    /// Capabilities as given: the pairs kTLS offloads (or why none), and whether it rekeys.
    pub fn new(
        ktls: Result<BTreeSet<(TlsVersion, Cipher)>, String>,
        rekey: Result<(), String>,
    ) -> Self {
        Self {
            ktls,
            rekey: rekey.map_err(Arc::from),
        }
    }

    /// `Ok` when the kernel takes new TLS 1.3 keys on a live socket, else why not.
    pub fn rekey(&self) -> Result<(), Arc<str>> {
        self.rekey.clone()
    }

    /// `Ok` when the kernel can offload every version and cipher rustls may negotiate here, so
    /// a handshake can be run for the kernel before its outcome is known.
    pub fn offloads_all(&self) -> Result<(), String> {
        let supported = self.ktls.as_ref().map_err(Clone::clone)?;
        let missing: Vec<String> = all_pairs()
            .filter(|pair| !supported.contains(pair))
            .map(|(v, c)| format!("{v} {c}"))
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "kernel cannot offload {} (TX and RX)",
                missing.join(", ")
            ))
        }
    }

    /// `Ok` when the kernel can carry this session, else why not.
    pub fn offload(
        &self,
        version: Option<TlsVersion>,
        cipher: Option<Cipher>,
    ) -> Result<(), String> {
        let supported = self.ktls.as_ref().map_err(Clone::clone)?;
        let (Some(v), Some(c)) = (version, cipher) else {
            return Err("negotiated version or cipher cannot be offloaded to kTLS".into());
        };
        if supported.contains(&(v, c)) {
            Ok(())
        } else {
            Err(format!("kernel cannot offload {v} {c} (TX and RX)"))
        }
    }
}

impl KernelCaps {
    /// Of `pairs` (the versions and ciphers a TLS policy allows), those the kernel cannot
    /// offload; `None` when it offloads nothing at all (no kTLS).
    pub fn cannot_offload(
        &self,
        pairs: &BTreeSet<(TlsVersion, Cipher)>,
    ) -> Option<Vec<(TlsVersion, Cipher)>> {
        let supported = self.ktls.as_ref().ok()?;
        Some(
            pairs
                .iter()
                .filter(|p| !supported.contains(p))
                .copied()
                .collect(),
        )
    }
}

/// Every version and cipher rustls may negotiate here.
fn all_pairs() -> impl Iterator<Item = (TlsVersion, Cipher)> {
    TlsVersion::ALL
        .iter()
        .flat_map(|&v| Cipher::ALL.iter().map(move |&c| (v, c)))
}

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
        Self::splice("ebpf.passthrough = splice".into())
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

/// What the node must do to know its passthrough path. `E` is what the loaded eBPF programs
/// are to the caller (the programs themselves, for the agent, which measures with them).
#[derive(Debug, Clone)]
pub enum PlainPlan<E> {
    /// It is known.
    Decided(PlainPath),
    /// `auto` with the eBPF programs loaded: measure both paths with them, then
    /// [`PlainPath::from_costs`].
    Measure(E),
}

impl PlainPath {
    fn splice(why: String) -> Self {
        Self {
            sockmap: false,
            why: Arc::from(why),
        }
    }

    /// The node's choice as far as configuration decides it. `ebpf` is the loaded eBPF
    /// programs, or why they are off. `Err`: the configuration asks for sockmap explicitly and
    /// it cannot be had, so the agent must not start.
    pub fn plan<E>(wanted: PassthroughPath, ebpf: Result<E, &str>) -> Result<PlainPlan<E>, String> {
        match (wanted, ebpf) {
            (PassthroughPath::Splice, _) => Ok(PlainPlan::Decided(Self::default())),
            (PassthroughPath::Sockmap, Ok(_)) => Ok(PlainPlan::Decided(Self {
                sockmap: true,
                why: Arc::from("ebpf.passthrough = sockmap"),
            })),
            (PassthroughPath::Sockmap, Err(why)) => Err(format!(
                "ebpf.passthrough = sockmap needs the eBPF programs, and they are off: {why}"
            )),
            (PassthroughPath::Auto, Err(why)) => Ok(PlainPlan::Decided(Self::splice(format!(
                "ebpf.passthrough = auto but eBPF is off: {why}"
            )))),
            (PassthroughPath::Auto, Ok(programs)) => Ok(PlainPlan::Measure(programs)),
        }
    }

    /// `auto` after measuring: sockmap only when it costs the node clearly less CPU per byte
    /// than splice (by [`SOCKMAP_MARGIN`]), with both figures in the reason.
    pub fn from_costs(splice: PathCost, sockmap: PathCost) -> Self {
        let cheaper =
            sockmap.cpu_seconds_per_gib < splice.cpu_seconds_per_gib * (1.0 - SOCKMAP_MARGIN);
        Self {
            sockmap: cheaper,
            why: Arc::from(format!(
                "ebpf.passthrough = auto: measured splice {:.2} CPU s/GiB ({:.0} MiB/s), sockmap {:.2} CPU s/GiB ({:.0} MiB/s); sockmap needs {:.0}% less",
                splice.cpu_seconds_per_gib,
                splice.mib_per_second,
                sockmap.cpu_seconds_per_gib,
                sockmap.mib_per_second,
                SOCKMAP_MARGIN * 100.0
            )),
        }
    }

    /// `auto` when measuring failed: splice, and why.
    pub fn measuring_failed(e: &std::io::Error) -> Self {
        Self::splice(format!("ebpf.passthrough = auto, measuring failed: {e}"))
    }

    /// Splice, because the agent started without a passthrough listener and so did not
    /// measure (a passthrough listener added later by a reload gets this, and says so).
    pub fn not_measured(wanted: PassthroughPath) -> Self {
        Self::splice(format!(
            "ebpf.passthrough = {}: not measured, the agent started without a passthrough listener (restart it to measure)",
            match wanted {
                PassthroughPath::Auto => "auto",
                PassthroughPath::Splice => "splice",
                PassthroughPath::Sockmap => "sockmap",
            }
        ))
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

/// One TLS leg's negotiated session, as the path choice sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LegSession {
    /// "client" or "upstream".
    pub leg: &'static str,
    /// Negotiated version, `None` when kTLS has no code for it.
    pub version: Option<TlsVersion>,
    /// Negotiated cipher, `None` when kTLS has no code for it.
    pub cipher: Option<Cipher>,
    /// The leg's socket is still established: its peer has not closed its side. The kernel's
    /// TLS takes only an established socket (a client that sends its request and half-closes
    /// right after the handshake is already past that when the keys are ready).
    pub established: bool,
}

/// How far the connection's handshakes are.
#[derive(Debug, Clone, Copy)]
pub enum Negotiated<'a> {
    /// Before any handshake: any version and cipher rustls may negotiate. The answer is the
    /// path a passthrough connection takes, and what a TLS listener expects (its start-up
    /// line); a TLS connection's own path is chosen once its sessions are negotiated.
    Pending,
    /// After them: every TLS leg the agent holds.
    Legs(&'a [LegSession]),
}

/// What the path choice looks at.
#[derive(Debug, Clone, Copy)]
pub struct PathInputs<'a> {
    /// The listener's mode.
    pub mode: Mode,
    /// The listener's `data_path`.
    pub policy: DataPathPolicy,
    /// What the kernel offloads.
    pub kernel: &'a KernelCaps,
    /// The node's passthrough path.
    pub plain: &'a PlainPath,
    /// How far the handshakes are.
    pub negotiated: Negotiated<'a>,
}

/// The path choice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    /// Take this data path, for this reason (borrowed where it is fixed text: a connection
    /// holds its reason as long as it lives).
    Take(DataPath, Cow<'static, str>),
    /// The listener's policy cannot be met: close the connection, for this reason.
    Refuse(String),
}

impl Choice {
    /// The data path, when one is taken.
    pub fn path(&self) -> Option<DataPath> {
        match self {
            Choice::Take(p, _) => Some(*p),
            Choice::Refuse(_) => None,
        }
    }
}

const USERSPACE_BY_POLICY: &str = "listener data_path = userspace";

/// The data path a connection takes, and why. Pure: the same inputs give the same answer.
pub fn choose(i: &PathInputs<'_>) -> Choice {
    if i.mode == Mode::Passthrough {
        return match i.policy {
            DataPathPolicy::Userspace => {
                Choice::Take(DataPath::Userspace, USERSPACE_BY_POLICY.into())
            }
            // `tlsplice check` rejects this; a connection must still never be told ktls.
            DataPathPolicy::Ktls => Choice::Refuse(
                "mode passthrough never holds keys: data_path = \"ktls\" cannot apply".into(),
            ),
            DataPathPolicy::Auto if i.plain.is_sockmap() => Choice::Take(
                DataPath::Sockmap,
                format!(
                    "passthrough: plain legs redirected in the kernel ({})",
                    i.plain.why()
                )
                .into(),
            ),
            DataPathPolicy::Auto => Choice::Take(
                DataPath::Splice,
                format!("{PLAIN_LEGS} ({})", i.plain.why()).into(),
            ),
        };
    }
    let all = i.kernel.offloads_all();
    match (i.policy, all, i.negotiated) {
        (DataPathPolicy::Userspace, ..) => {
            Choice::Take(DataPath::Userspace, USERSPACE_BY_POLICY.into())
        }
        (DataPathPolicy::Auto, Err(why), _) => Choice::Take(DataPath::Userspace, why.into()),
        (DataPathPolicy::Auto, Ok(()), Negotiated::Pending) => Choice::Take(
            DataPath::Ktls,
            "kernel offloads every version and cipher rustls may negotiate".into(),
        ),
        // data_path = "ktls": the handshake runs for the kernel whatever it may negotiate;
        // what it did negotiate decides.
        (DataPathPolicy::Ktls, Ok(()), Negotiated::Pending) => Choice::Take(
            DataPath::Ktls,
            "kernel offloads every version and cipher rustls may negotiate".into(),
        ),
        (DataPathPolicy::Ktls, Err(why), Negotiated::Pending) => Choice::Take(
            DataPath::Ktls,
            format!("data_path = \"ktls\": handshake run for the kernel, though {why}").into(),
        ),
        (policy, _, Negotiated::Legs(legs))
            if let Some(closed) = legs.iter().find(|l| !l.established) =>
        {
            let why = format!(
                "the {} leg's peer closed its side before the handoff, and the kernel's TLS takes only an established socket",
                closed.leg
            );
            match policy {
                DataPathPolicy::Ktls => Choice::Refuse(format!("listener requires ktls: {why}")),
                _ => Choice::Take(DataPath::Userspace, why.into()),
            }
        }
        (DataPathPolicy::Auto | DataPathPolicy::Ktls, _, Negotiated::Legs(legs)) => {
            match offload_legs(i.kernel, legs) {
                // Which versions and ciphers: the connection's session says.
                Ok(()) => Choice::Take(DataPath::Ktls, OFFLOADS_EVERY_LEG.into()),
                Err(why) => Choice::Refuse(format!("listener requires ktls: {why}")),
            }
        }
    }
}

/// Why passthrough relays in the agent: the text every splice path reason starts with.
const PLAIN_LEGS: &str = "passthrough: both legs are plain TCP to the agent";

/// The path a passthrough connection takes when its sockmap join was refused: splice, and why.
pub fn sockmap_refused(why: &str) -> (DataPath, String) {
    (
        DataPath::Splice,
        format!("{PLAIN_LEGS}; sockmap refused this connection: {why}"),
    )
}

/// Why a connection whose every leg the kernel offloads takes the ktls path.
const OFFLOADS_EVERY_LEG: &str = "kernel offloads every leg's version and cipher (see session)";

/// Every leg offloadable; else the first leg that is not, and why.
fn offload_legs(kernel: &KernelCaps, legs: &[LegSession]) -> Result<(), String> {
    for l in legs {
        kernel
            .offload(l.version, l.cipher)
            .map_err(|why| format!("{} leg: {why}", l.leg))?;
    }
    Ok(())
}

/// What a listener's connections will get on this kernel, in one line, from [`choose`]: `Err`
/// says why none can be served (`data_path = "ktls"` on a kernel that offloads nothing).
/// `tlsplice probe --config` prints it.
pub fn summary(
    mode: Mode,
    policy: DataPathPolicy,
    kernel: &KernelCaps,
    plain: &Result<PlainPlan<()>, String>,
) -> Result<String, String> {
    let splice = PlainPath::default();
    let plain = match plain {
        Ok(PlainPlan::Decided(p)) => p,
        // Only passthrough listeners that leave the path to the node depend on the plan.
        _ if mode != Mode::Passthrough || policy == DataPathPolicy::Userspace => &splice,
        Ok(PlainPlan::Measure(())) => {
            return Ok("data path sockmap or splice, whichever costs the node less CPU when measured at start (ebpf.passthrough = auto)".into());
        }
        Err(why) => return Err(why.clone()),
    };
    let choose_for = |negotiated: Negotiated<'_>| {
        choose(&PathInputs {
            mode,
            policy,
            kernel,
            plain,
            negotiated,
        })
    };
    match choose_for(Negotiated::Pending) {
        Choice::Refuse(why) => Err(why),
        Choice::Take(DataPath::Userspace, why) if policy == DataPathPolicy::Userspace => {
            Ok(format!("data path userspace ({why})"))
        }
        Choice::Take(DataPath::Userspace, why) => Ok(format!("data path userspace: {why}")),
        Choice::Take(DataPath::Ktls, _) => {
            let offloaded: Vec<String> = all_pairs()
                .filter(|&(v, c)| {
                    let leg = [LegSession {
                        leg: "client",
                        version: Some(v),
                        cipher: Some(c),
                        established: true,
                    }];
                    choose_for(Negotiated::Legs(&leg)).path() == Some(DataPath::Ktls)
                })
                .map(|(v, c)| format!("{v} {c}"))
                .collect();
            if offloaded.is_empty() {
                let why = kernel
                    .ktls
                    .as_ref()
                    .err()
                    .cloned()
                    .unwrap_or_else(|| "kernel offloads no TLS version and cipher".into());
                return Err(format!("data_path = \"ktls\" but {why}"));
            }
            let others = match policy {
                DataPathPolicy::Ktls => "other sessions are refused (data_path = \"ktls\")",
                _ => "no other session can be negotiated",
            };
            Ok(format!(
                "data path ktls for {}; {others}",
                offloaded.join(", ")
            ))
        }
        Choice::Take(path, why) => Ok(format!("data path {} ({why})", path.as_str())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V12: TlsVersion = TlsVersion::Tls12;
    const V13: TlsVersion = TlsVersion::Tls13;
    const AES128: Cipher = Cipher::Aes128Gcm;
    const AES256: Cipher = Cipher::Aes256Gcm;
    const CHACHA: Cipher = Cipher::Chacha20Poly1305;

    /// The capability sets the table runs over.
    #[derive(Debug, Clone, Copy)]
    enum Kernel {
        /// No kTLS at all (this development host).
        NoKtls,
        /// Every pair (a modern distribution kernel).
        All,
        /// AES-GCM only: no ChaCha20-Poly1305 (a kernel built without it).
        NoChacha,
    }

    fn caps(k: Kernel) -> KernelCaps {
        let pairs = |keep: &dyn Fn(Cipher) -> bool| {
            all_pairs()
                .filter(|&(_, c)| keep(c))
                .collect::<BTreeSet<_>>()
        };
        match k {
            Kernel::NoKtls => KernelCaps::new(
                Err("kernel has no kTLS: TCP_ULP tls: ENOENT".into()),
                Err("no kTLS".into()),
            ),
            Kernel::All => KernelCaps::new(Ok(pairs(&|_| true)), Ok(())),
            Kernel::NoChacha => KernelCaps::new(Ok(pairs(&|c| c != CHACHA)), Ok(())),
        }
    }

    fn plain(sockmap: bool) -> PlainPath {
        if sockmap {
            match PlainPath::plan(PassthroughPath::Sockmap, Ok(())) {
                Ok(PlainPlan::Decided(p)) => p,
                other => panic!("{other:?}"),
            }
        } else {
            PlainPath::default()
        }
    }

    /// Expected answer: a path and a phrase its reason contains, or a refusal's phrase.
    #[derive(Debug)]
    enum Want {
        Take(DataPath, &'static str),
        Refuse(&'static str),
    }

    /// What negotiated, in the table: before the handshake, or one leg's session (the client
    /// leg; reencrypt gets a second, upstream leg of the same session).
    #[derive(Debug, Clone, Copy)]
    enum Hs {
        Pending,
        Done(TlsVersion, Cipher),
        Unknown,
        /// Negotiated, but this leg's peer closed its side before the handoff.
        Closed(TlsVersion, Cipher, &'static str),
    }

    #[test]
    fn the_path_choice_table() {
        use DataPath::{Ktls, Sockmap, Splice, Userspace};
        use DataPathPolicy::{Auto, Ktls as PKtls, Userspace as PUser};
        use Kernel::{All, NoChacha, NoKtls};
        use Mode::{Originate, Passthrough, Reencrypt, Terminate};
        #[rustfmt::skip]
        let table: &[(Mode, DataPathPolicy, Kernel, bool, Hs, Want)] = &[
            // terminate, every policy, every kernel, before and after the handshake
            (Terminate, Auto, All, false, Hs::Pending, Want::Take(Ktls, "every version and cipher")),
            (Terminate, Auto, All, false, Hs::Done(V13, AES128), Want::Take(Ktls, OFFLOADS_EVERY_LEG)),
            (Terminate, Auto, All, false, Hs::Done(V12, AES256), Want::Take(Ktls, OFFLOADS_EVERY_LEG)),
            (Terminate, Auto, All, false, Hs::Done(V13, CHACHA), Want::Take(Ktls, OFFLOADS_EVERY_LEG)),
            (Terminate, Auto, NoKtls, false, Hs::Pending, Want::Take(Userspace, "kernel has no kTLS")),
            (Terminate, Auto, NoKtls, false, Hs::Done(V13, AES128), Want::Take(Userspace, "kernel has no kTLS")),
            (Terminate, Auto, NoChacha, false, Hs::Pending, Want::Take(Userspace, "cannot offload TLSv1.2 CHACHA20-POLY1305")),
            (Terminate, Auto, NoChacha, false, Hs::Done(V13, AES128), Want::Take(Userspace, "CHACHA20-POLY1305 (TX and RX)")),
            (Terminate, PKtls, All, false, Hs::Pending, Want::Take(Ktls, "every version and cipher")),
            (Terminate, PKtls, All, false, Hs::Done(V13, AES256), Want::Take(Ktls, OFFLOADS_EVERY_LEG)),
            (Terminate, PKtls, NoKtls, false, Hs::Pending, Want::Take(Ktls, "handshake run for the kernel, though kernel has no kTLS")),
            (Terminate, PKtls, NoKtls, false, Hs::Done(V13, AES128), Want::Refuse("listener requires ktls: client leg: kernel has no kTLS")),
            (Terminate, PKtls, NoChacha, false, Hs::Pending, Want::Take(Ktls, "though kernel cannot offload")),
            (Terminate, PKtls, NoChacha, false, Hs::Done(V13, AES128), Want::Take(Ktls, OFFLOADS_EVERY_LEG)),
            (Terminate, PKtls, NoChacha, false, Hs::Done(V13, CHACHA), Want::Refuse("client leg: kernel cannot offload TLSv1.3 CHACHA20-POLY1305")),
            (Terminate, PKtls, NoChacha, false, Hs::Done(V12, CHACHA), Want::Refuse("TLSv1.2 CHACHA20-POLY1305")),
            (Terminate, PKtls, All, false, Hs::Unknown, Want::Refuse("negotiated version or cipher cannot be offloaded")),
            (Terminate, PUser, All, false, Hs::Pending, Want::Take(Userspace, "listener data_path = userspace")),
            (Terminate, PUser, All, false, Hs::Done(V13, AES128), Want::Take(Userspace, "listener data_path = userspace")),
            (Terminate, PUser, NoKtls, false, Hs::Pending, Want::Take(Userspace, "listener data_path = userspace")),
            // a leg whose peer closed its side before the handoff cannot go to the kernel
            (Terminate, Auto, All, false, Hs::Closed(V13, AES128, "client"), Want::Take(Userspace, "the client leg's peer closed its side before the handoff")),
            (Terminate, PKtls, All, false, Hs::Closed(V13, AES128, "client"), Want::Refuse("listener requires ktls: the client leg's peer closed")),
            (Terminate, PUser, All, false, Hs::Closed(V13, AES128, "client"), Want::Take(Userspace, "listener data_path = userspace")),
            (Reencrypt, Auto, All, false, Hs::Closed(V12, AES256, "upstream"), Want::Take(Userspace, "the upstream leg's peer closed")),
            // the node's passthrough choice does not touch TLS modes
            (Terminate, Auto, All, true, Hs::Done(V13, AES128), Want::Take(Ktls, "kernel offloads")),
            // reencrypt: two legs, both must offload
            (Reencrypt, Auto, All, false, Hs::Done(V13, AES128), Want::Take(Ktls, OFFLOADS_EVERY_LEG)),
            (Reencrypt, Auto, NoKtls, false, Hs::Done(V13, AES128), Want::Take(Userspace, "kernel has no kTLS")),
            (Reencrypt, Auto, NoChacha, false, Hs::Pending, Want::Take(Userspace, "cannot offload")),
            (Reencrypt, PKtls, NoKtls, false, Hs::Done(V12, AES128), Want::Refuse("client leg: kernel has no kTLS")),
            (Reencrypt, PKtls, NoChacha, false, Hs::Done(V13, CHACHA), Want::Refuse("client leg: kernel cannot offload TLSv1.3 CHACHA20-POLY1305")),
            (Reencrypt, PUser, All, false, Hs::Done(V13, AES128), Want::Take(Userspace, "listener data_path = userspace")),
            // originate: one TLS leg, the upstream
            (Originate, Auto, All, false, Hs::Pending, Want::Take(Ktls, "every version and cipher")),
            (Originate, Auto, All, false, Hs::Done(V12, AES128), Want::Take(Ktls, OFFLOADS_EVERY_LEG)),
            (Originate, Auto, NoKtls, false, Hs::Done(V13, AES128), Want::Take(Userspace, "kernel has no kTLS")),
            (Originate, PKtls, NoChacha, false, Hs::Done(V13, CHACHA), Want::Refuse("upstream leg: kernel cannot offload")),
            (Originate, PUser, All, false, Hs::Pending, Want::Take(Userspace, "listener data_path = userspace")),
            // passthrough: the node's choice, or the listener's userspace; never ktls
            (Passthrough, Auto, All, false, Hs::Pending, Want::Take(Splice, "both legs are plain TCP to the agent (ebpf.passthrough = splice)")),
            (Passthrough, Auto, NoKtls, false, Hs::Pending, Want::Take(Splice, "plain TCP")),
            (Passthrough, Auto, All, true, Hs::Pending, Want::Take(Sockmap, "redirected in the kernel (ebpf.passthrough = sockmap)")),
            (Passthrough, Auto, NoKtls, true, Hs::Pending, Want::Take(Sockmap, "redirected in the kernel")),
            (Passthrough, PUser, All, true, Hs::Pending, Want::Take(Userspace, "listener data_path = userspace")),
            (Passthrough, PUser, NoKtls, false, Hs::Pending, Want::Take(Userspace, "listener data_path = userspace")),
            (Passthrough, PKtls, All, false, Hs::Pending, Want::Refuse("never holds keys")),
        ];
        assert!(table.len() >= 30);
        for (row, (mode, policy, kernel, sockmap, hs, want)) in table.iter().enumerate() {
            let kernel_caps = caps(*kernel);
            let plain = plain(*sockmap);
            let legs: Vec<LegSession> = match hs {
                Hs::Pending => Vec::new(),
                Hs::Done(v, c) | Hs::Closed(v, c, _) => {
                    let closed = match hs {
                        Hs::Closed(_, _, leg) => Some(*leg),
                        _ => None,
                    };
                    let names: &[&str] = match mode {
                        Mode::Reencrypt => &["client", "upstream"],
                        Mode::Originate => &["upstream"],
                        _ => &["client"],
                    };
                    names
                        .iter()
                        .map(|&leg| LegSession {
                            leg,
                            version: Some(*v),
                            cipher: Some(*c),
                            established: closed != Some(leg),
                        })
                        .collect()
                }
                Hs::Unknown => vec![LegSession {
                    leg: "client",
                    version: Some(V13),
                    cipher: None,
                    established: true,
                }],
            };
            let negotiated = match hs {
                Hs::Pending => Negotiated::Pending,
                _ => Negotiated::Legs(&legs),
            };
            let got = choose(&PathInputs {
                mode: *mode,
                policy: *policy,
                kernel: &kernel_caps,
                plain: &plain,
                negotiated,
            });
            let ok = match (want, &got) {
                (Want::Take(p, phrase), Choice::Take(q, why)) => p == q && why.contains(phrase),
                (Want::Refuse(phrase), Choice::Refuse(why)) => why.contains(phrase),
                _ => false,
            };
            assert!(
                ok,
                "row {row}: {mode:?} {policy:?} {kernel:?} sockmap={sockmap} {hs:?}: want {want:?}, got {got:?}"
            );
        }
    }

    #[test]
    fn a_handshake_run_in_user_space_stays_there() {
        // What Pending says is how the handshake runs; after it, the answer must agree, or the
        // connection would hold a session in the wrong place.
        for kernel in [Kernel::NoKtls, Kernel::All, Kernel::NoChacha] {
            for policy in [
                DataPathPolicy::Auto,
                DataPathPolicy::Ktls,
                DataPathPolicy::Userspace,
            ] {
                let k = caps(kernel);
                let p = PlainPath::default();
                let choose_for = |negotiated: Negotiated<'_>| {
                    choose(&PathInputs {
                        mode: Mode::Terminate,
                        policy,
                        kernel: &k,
                        plain: &p,
                        negotiated,
                    })
                    .path()
                };
                let before = choose_for(Negotiated::Pending);
                for (v, c) in all_pairs() {
                    let leg = [LegSession {
                        leg: "client",
                        version: Some(v),
                        cipher: Some(c),
                        established: true,
                    }];
                    let after = choose_for(Negotiated::Legs(&leg));
                    match before {
                        Some(DataPath::Userspace) => {
                            assert_eq!(after, Some(DataPath::Userspace), "{kernel:?} {policy:?}");
                        }
                        _ => assert_ne!(after, Some(DataPath::Userspace), "{kernel:?} {policy:?}"),
                    }
                }
            }
        }
    }

    #[test]
    fn the_node_passthrough_plan_refuses_an_explicit_sockmap_without_ebpf() {
        assert!(
            PlainPath::plan::<()>(PassthroughPath::Sockmap, Err("no CAP_BPF"))
                .is_err_and(|e| e.contains("no CAP_BPF"))
        );
        assert!(matches!(
            PlainPath::plan::<()>(PassthroughPath::Auto, Err("no CAP_BPF")),
            Ok(PlainPlan::Decided(p)) if !p.is_sockmap() && p.why().contains("eBPF is off: no CAP_BPF")
        ));
        assert!(matches!(
            PlainPath::plan(PassthroughPath::Auto, Ok(())),
            Ok(PlainPlan::Measure(()))
        ));
        assert!(matches!(
            PlainPath::plan(PassthroughPath::Splice, Ok(())),
            Ok(PlainPlan::Decided(p)) if !p.is_sockmap()
        ));
        let cost = |cpu| PathCost {
            cpu_seconds_per_gib: cpu,
            mib_per_second: 1000.0,
        };
        assert!(PlainPath::from_costs(cost(1.0), cost(0.85)).is_sockmap());
        assert!(!PlainPath::from_costs(cost(1.0), cost(0.95)).is_sockmap());
    }

    #[test]
    fn summaries_say_what_connections_get() {
        let p = Ok(PlainPlan::Decided(PlainPath::default()));
        let s = |mode, policy, kernel| summary(mode, policy, &caps(kernel), &p);
        assert_eq!(
            s(Mode::Terminate, DataPathPolicy::Auto, Kernel::NoKtls),
            Ok("data path userspace: kernel has no kTLS: TCP_ULP tls: ENOENT".into())
        );
        assert!(
            s(Mode::Terminate, DataPathPolicy::Ktls, Kernel::NoKtls)
                .is_err_and(|e| e.starts_with("data_path = \"ktls\" but kernel has no kTLS"))
        );
        assert!(
            s(Mode::Terminate, DataPathPolicy::Auto, Kernel::All)
                .is_ok_and(|t| t.starts_with("data path ktls for TLSv1.2 AES-128-GCM"))
        );
        assert!(
            s(Mode::Terminate, DataPathPolicy::Ktls, Kernel::NoChacha)
                .is_ok_and(|t| !t.contains("CHACHA") && t.contains("other sessions are refused"))
        );
        assert!(
            s(Mode::Terminate, DataPathPolicy::Auto, Kernel::NoChacha)
                .is_ok_and(|t| t.starts_with("data path userspace: kernel cannot offload"))
        );
        assert_eq!(
            s(Mode::Terminate, DataPathPolicy::Userspace, Kernel::All),
            Ok("data path userspace (listener data_path = userspace)".into())
        );
        assert!(
            s(Mode::Passthrough, DataPathPolicy::Auto, Kernel::All)
                .is_ok_and(|t| t.starts_with("data path splice (passthrough: both legs"))
        );
        // The node's passthrough plan: measured at start, or refused without eBPF.
        let k = caps(Kernel::All);
        let auto = PlainPath::plan(PassthroughPath::Auto, Ok(()));
        assert!(
            summary(Mode::Passthrough, DataPathPolicy::Auto, &k, &auto)
                .is_ok_and(|t| t.contains("measured at start"))
        );
        let sockmap = PlainPath::plan::<()>(PassthroughPath::Sockmap, Err("no CAP_BPF"));
        assert!(
            summary(Mode::Passthrough, DataPathPolicy::Auto, &k, &sockmap)
                .is_err_and(|e| e.contains("no CAP_BPF"))
        );
        assert!(summary(Mode::Terminate, DataPathPolicy::Auto, &k, &sockmap).is_ok());
        assert!(summary(Mode::Passthrough, DataPathPolicy::Userspace, &k, &sockmap).is_ok());
    }
}
