//! A side's TLS policy in force ([`TlsPolicy`]): the configured versions, cipher suites, key
//! exchange groups and resumption, checked against each other and turned into what rustls
//! takes (a crypto provider holding only those suites and groups, in that order, and the
//! versions). Unset keys take the built-in defaults: TLS 1.2 and 1.3, every AEAD suite with
//! AES-GCM first where the CPU has AES instructions and ChaCha20-Poly1305 first where it has
//! not (software AES is slower and not constant-time), and the post-quantum hybrid
//! X25519MLKEM768 first, then X25519, P-256, P-384 (as browsers, OpenSSL 3.5 and rustls with
//! its `prefer-post-quantum` feature order them). Which group a session gets is the client's choice among these: rustls takes the
//! first of the client's groups it has, without a retry where the client sent that share.

use std::collections::BTreeSet;

use rustls::SupportedProtocolVersion;
use rustls::crypto::CryptoProvider;
use rustls::crypto::aws_lc_rs as provider;

use crate::config::{CipherSuiteName, GroupName, TlsPolicyConfig, VersionName};
use crate::ktls::{Cipher, TlsVersion};

/// Seeds this thread's share of the crypto provider's random generator, and times it. aws-lc
/// seeds its generator on first use, from CPU jitter, once per process (about 25 ms of CPU
/// here, far longer in an emulated guest) and lightly per thread: done at start and as each
/// runtime thread starts, so no client's handshake waits for it.
pub fn seed_random() -> Result<std::time::Duration, rustls::Error> {
    let started = std::time::Instant::now();
    provider::default_provider()
        .secure_random
        .fill(&mut [0u8; 32])
        .map_err(|_| rustls::Error::FailedToGetRandomBytes)?;
    Ok(started.elapsed())
}

/// A policy the configuration asks for that cannot be served, with the key at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct PolicyError {
    /// `tls_versions`, `cipher_suites` or `groups`.
    pub key: &'static str,
    /// Why.
    pub message: String,
}

fn policy_error(key: &'static str, message: impl Into<String>) -> PolicyError {
    PolicyError {
        key,
        message: message.into(),
    }
}

/// One side's TLS policy in force, consistent in itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsPolicy {
    /// Versions, TLS 1.3 first.
    pub versions: Vec<VersionName>,
    /// Suites in order of preference.
    pub suites: Vec<CipherSuiteName>,
    /// Groups in order of preference.
    pub groups: Vec<GroupName>,
    /// Session resumption on.
    pub resumption: bool,
}

/// The built-in suite order: AES-GCM first with AES instructions, ChaCha20 first without.
pub fn default_suites(cpu_has_aes: bool) -> Vec<CipherSuiteName> {
    use CipherSuiteName as S;
    let aes_first = [
        S::TLS13_AES_128_GCM_SHA256,
        S::TLS13_AES_256_GCM_SHA384,
        S::TLS13_CHACHA20_POLY1305_SHA256,
        S::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        S::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        S::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        S::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        S::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        S::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    ];
    let mut suites = aes_first.to_vec();
    if !cpu_has_aes {
        // Stable: within each version, ChaCha20 moves ahead of AES.
        suites.sort_by_key(|s| {
            (
                s.version() != VersionName::Tls13,
                s.cipher() != Cipher::Chacha20Poly1305,
            )
        });
    }
    suites
}

/// Whether this CPU has AES instructions (AES-NI; the ARMv8 crypto extension).
pub fn cpu_has_aes() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

/// The built-in groups: the post-quantum hybrid first (TLS 1.3 only; a client offering it
/// sends an X25519 share beside it, so a server without it answers without a retry).
pub const DEFAULT_GROUPS: [GroupName; 4] = [
    GroupName::X25519MlKem768,
    GroupName::X25519,
    GroupName::P256,
    GroupName::P384,
];

impl TlsPolicy {
    /// The policy in force from its configuration (unset keys: built-in defaults), or why it
    /// cannot be served: an empty list, a version with no suite left, a suite of a version
    /// not allowed, a version with no group left (X25519MLKEM768 is TLS 1.3 only).
    pub fn resolve(config: &TlsPolicyConfig, cpu_has_aes: bool) -> Result<Self, PolicyError> {
        let mut versions: Vec<VersionName> = config
            .tls_versions
            .clone()
            .unwrap_or_else(|| vec![VersionName::Tls13, VersionName::Tls12]);
        versions.sort_by_key(|v| std::cmp::Reverse(*v));
        versions.dedup();
        if versions.is_empty() {
            return Err(policy_error("tls_versions", "empty: no version to speak"));
        }
        let suites = match &config.cipher_suites {
            Some(listed) => {
                if listed.is_empty() {
                    return Err(policy_error("cipher_suites", "empty: no suite to offer"));
                }
                if let Some(s) = listed.iter().find(|s| !versions.contains(&s.version())) {
                    return Err(policy_error(
                        "cipher_suites",
                        format!(
                            "{} is a TLS {} suite, and tls_versions does not allow TLS {}",
                            s.as_str(),
                            s.version().as_str(),
                            s.version().as_str()
                        ),
                    ));
                }
                let mut seen = BTreeSet::new();
                listed.iter().copied().filter(|s| seen.insert(*s)).collect()
            }
            None => default_suites(cpu_has_aes)
                .into_iter()
                .filter(|s| versions.contains(&s.version()))
                .collect::<Vec<_>>(),
        };
        if let Some(v) = versions
            .iter()
            .find(|v| !suites.iter().any(|s| s.version() == **v))
        {
            return Err(policy_error(
                "cipher_suites",
                format!(
                    "no TLS {} suite, and tls_versions allows TLS {}",
                    v.as_str(),
                    v.as_str()
                ),
            ));
        }
        let mut groups = match &config.groups {
            Some(listed) => listed.clone(),
            // Without TLS 1.3 the TLS 1.3-only groups would be offered for nothing.
            None => DEFAULT_GROUPS
                .into_iter()
                .filter(|g| versions.iter().any(|v| g.usable_for(*v)))
                .collect(),
        };
        let mut seen = BTreeSet::new();
        groups.retain(|g| seen.insert(*g));
        if groups.is_empty() {
            return Err(policy_error("groups", "empty: no key exchange"));
        }
        if let Some(v) = versions
            .iter()
            .find(|v| !groups.iter().any(|g| g.usable_for(**v)))
        {
            return Err(policy_error(
                "groups",
                format!(
                    "no group for TLS {v}: X25519MLKEM768 is TLS 1.3 only, and tls_versions \
                     allows TLS {v} (the built-in default where unset); add X25519 or P-256 to \
                     groups, or allow TLS 1.3 only",
                    v = v.as_str()
                ),
            ));
        }
        Ok(TlsPolicy {
            versions,
            suites,
            groups,
            resumption: config.session_resumption.unwrap_or(true),
        })
    }

    /// A crypto provider with exactly this policy's suites and groups, in its order.
    pub fn provider(&self) -> CryptoProvider {
        let base = provider::default_provider();
        CryptoProvider {
            cipher_suites: self.suites.iter().map(|s| rustls_suite(*s)).collect(),
            kx_groups: self.groups.iter().map(|g| rustls_group(*g)).collect(),
            ..base
        }
    }

    /// The versions as rustls takes them.
    pub fn rustls_versions(&self) -> Vec<&'static SupportedProtocolVersion> {
        self.versions
            .iter()
            .map(|v| match v {
                VersionName::Tls12 => &rustls::version::TLS12,
                VersionName::Tls13 => &rustls::version::TLS13,
            })
            .collect()
    }

    /// Every version and cipher a session under this policy may use.
    pub fn kernel_pairs(&self) -> BTreeSet<(TlsVersion, Cipher)> {
        self.suites
            .iter()
            .map(|s| (s.version().kernel(), s.cipher()))
            .collect()
    }
}

fn rustls_suite(s: CipherSuiteName) -> rustls::SupportedCipherSuite {
    use CipherSuiteName as S;
    use provider::cipher_suite as c;
    match s {
        S::TLS13_AES_128_GCM_SHA256 => c::TLS13_AES_128_GCM_SHA256,
        S::TLS13_AES_256_GCM_SHA384 => c::TLS13_AES_256_GCM_SHA384,
        S::TLS13_CHACHA20_POLY1305_SHA256 => c::TLS13_CHACHA20_POLY1305_SHA256,
        S::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 => c::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        S::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384 => c::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        S::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256 => {
            c::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
        }
        S::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => c::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        S::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => c::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        S::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256 => {
            c::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256
        }
    }
}

fn rustls_group(g: GroupName) -> &'static dyn rustls::crypto::SupportedKxGroup {
    use provider::kx_group as k;
    match g {
        GroupName::X25519 => k::X25519,
        GroupName::P256 => k::SECP256R1,
        GroupName::P384 => k::SECP384R1,
        GroupName::X25519MlKem768 => k::X25519MLKEM768,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use CipherSuiteName as S;

    fn config(
        versions: Option<&[VersionName]>,
        suites: Option<&[CipherSuiteName]>,
        groups: Option<&[GroupName]>,
    ) -> TlsPolicyConfig {
        TlsPolicyConfig {
            tls_versions: versions.map(<[_]>::to_vec),
            cipher_suites: suites.map(<[_]>::to_vec),
            groups: groups.map(<[_]>::to_vec),
            session_resumption: None,
        }
    }

    #[test]
    fn the_default_order_follows_the_cpu() {
        let with = default_suites(true);
        assert_eq!(with[0], S::TLS13_AES_128_GCM_SHA256);
        let without = default_suites(false);
        assert_eq!(without[0], S::TLS13_CHACHA20_POLY1305_SHA256);
        assert_eq!(without[3], S::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256);
        // TLS 1.3 suites first either way, and the same set.
        assert!(
            without[..3]
                .iter()
                .all(|s| s.version() == VersionName::Tls13)
        );
        assert_eq!(
            with.iter().collect::<BTreeSet<_>>(),
            without.iter().collect::<BTreeSet<_>>()
        );
    }

    #[test]
    fn policies_resolve_or_say_which_key_is_wrong() {
        use GroupName as G;
        use VersionName::{Tls12, Tls13};
        let ok = |c: TlsPolicyConfig| TlsPolicy::resolve(&c, true).expect("valid");
        let bad = |c: TlsPolicyConfig| TlsPolicy::resolve(&c, true).expect_err("invalid");

        let all = ok(config(None, None, None));
        assert_eq!(all.versions, vec![Tls13, Tls12]);
        assert_eq!(all.suites.len(), 9);
        assert_eq!(all.groups, DEFAULT_GROUPS.to_vec());
        assert!(all.resumption);

        // TLS 1.3 only: the TLS 1.2 suites go from the defaults.
        let only13 = ok(config(Some(&[Tls13]), None, None));
        assert_eq!(only13.suites.len(), 3);
        assert_eq!(only13.rustls_versions().len(), 1);

        // Without TLS 1.3 the hybrid leaves the defaults; with it, it is offered first.
        let only12 = ok(config(Some(&[Tls12]), None, None));
        assert_eq!(only12.groups, [G::X25519, G::P256, G::P384]);
        assert_eq!(all.groups[0], G::X25519MlKem768);
        // The hybrid beside a group TLS 1.2 can use serves both versions.
        let hybrid = ok(config(None, None, Some(&[G::X25519MlKem768, G::X25519])));
        assert_eq!(hybrid.groups, [G::X25519MlKem768, G::X25519]);

        // The configured order is kept (the server's preference).
        let order = [S::TLS13_AES_256_GCM_SHA384, S::TLS13_AES_128_GCM_SHA256];
        assert_eq!(ok(config(Some(&[Tls13]), Some(&order), None)).suites, order);

        #[rustfmt::skip]
        let refused: &[(TlsPolicyConfig, &str, &str)] = &[
            (config(Some(&[]), None, None), "tls_versions", "empty"),
            (config(None, Some(&[]), None), "cipher_suites", "empty"),
            (config(Some(&[Tls13]), Some(&[S::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256]), None), "cipher_suites", "does not allow TLS 1.2"),
            (config(None, Some(&[S::TLS13_AES_128_GCM_SHA256]), None), "cipher_suites", "no TLS 1.2 suite"),
            (config(None, None, Some(&[])), "groups", "empty"),
            (config(None, None, Some(&[G::X25519MlKem768])), "groups", "no group for TLS 1.2"),
            (config(Some(&[Tls12]), None, Some(&[G::X25519MlKem768])), "groups", "X25519MLKEM768 is TLS 1.3 only"),
        ];
        for (c, key, words) in refused {
            let e = bad(c.clone());
            assert_eq!(e.key, *key, "{c:?}: {e}");
            assert!(e.message.contains(words), "{c:?}: {e}");
        }
    }

    #[test]
    fn the_provider_holds_the_policy_in_order() {
        let c = config(
            Some(&[VersionName::Tls13]),
            Some(&[
                S::TLS13_CHACHA20_POLY1305_SHA256,
                S::TLS13_AES_128_GCM_SHA256,
            ]),
            Some(&[GroupName::P256]),
        );
        let p = TlsPolicy::resolve(&c, true).expect("valid");
        let provider = p.provider();
        let names: Vec<_> = provider
            .cipher_suites
            .iter()
            .map(|s| format!("{:?}", s.suite()))
            .collect();
        assert_eq!(
            names,
            ["TLS13_CHACHA20_POLY1305_SHA256", "TLS13_AES_128_GCM_SHA256"]
        );
        assert_eq!(provider.kx_groups.len(), 1);
        assert_eq!(
            p.kernel_pairs(),
            BTreeSet::from([
                (TlsVersion::Tls13, Cipher::Chacha20Poly1305),
                (TlsVersion::Tls13, Cipher::Aes128Gcm)
            ])
        );
    }
}
