//! TLS policy keys: protocol versions, cipher suites (in the server's order of preference), key
//! exchange groups and session resumption. Each listener's client side and each upstream TLS
//! leg may set them; what neither sets comes from the node-wide `[tls]` section (or its node
//! flags), and what that leaves unset from the built-in defaults ([`crate::tls_policy`]).

use serde::{Deserialize, Serialize};

/// A TLS protocol version, as the configuration names it.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Deserialize,
    Serialize,
    clap::ValueEnum,
)]
pub enum VersionName {
    /// TLS 1.2 (RFC 5246), with its AEAD suites only.
    #[serde(rename = "1.2")]
    #[value(name = "1.2")]
    Tls12,
    /// TLS 1.3 (RFC 8446).
    #[serde(rename = "1.3")]
    #[value(name = "1.3")]
    Tls13,
}

impl VersionName {
    /// As written in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            VersionName::Tls12 => "1.2",
            VersionName::Tls13 => "1.3",
        }
    }

    /// The version as the kernel interface names it.
    pub fn kernel(self) -> crate::ktls::TlsVersion {
        match self {
            VersionName::Tls12 => crate::ktls::TlsVersion::Tls12,
            VersionName::Tls13 => crate::ktls::TlsVersion::Tls13,
        }
    }
}

/// A cipher suite, by its IANA name. Only AEAD suites exist here: the agent offers nothing else.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Deserialize,
    Serialize,
    clap::ValueEnum,
)]
#[allow(non_camel_case_types, clippy::upper_case_acronyms)]
pub enum CipherSuiteName {
    /// TLS 1.3, AES-128-GCM.
    #[value(name = "TLS13_AES_128_GCM_SHA256")]
    TLS13_AES_128_GCM_SHA256,
    /// TLS 1.3, AES-256-GCM.
    #[value(name = "TLS13_AES_256_GCM_SHA384")]
    TLS13_AES_256_GCM_SHA384,
    /// TLS 1.3, ChaCha20-Poly1305.
    #[value(name = "TLS13_CHACHA20_POLY1305_SHA256")]
    TLS13_CHACHA20_POLY1305_SHA256,
    /// TLS 1.2, ECDHE with an ECDSA certificate, AES-128-GCM.
    #[value(name = "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256")]
    TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    /// TLS 1.2, ECDHE with an ECDSA certificate, AES-256-GCM.
    #[value(name = "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384")]
    TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
    /// TLS 1.2, ECDHE with an ECDSA certificate, ChaCha20-Poly1305.
    #[value(name = "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256")]
    TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    /// TLS 1.2, ECDHE with an RSA certificate, AES-128-GCM.
    #[value(name = "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256")]
    TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
    /// TLS 1.2, ECDHE with an RSA certificate, AES-256-GCM.
    #[value(name = "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384")]
    TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
    /// TLS 1.2, ECDHE with an RSA certificate, ChaCha20-Poly1305.
    #[value(name = "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256")]
    TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
}

impl CipherSuiteName {
    /// Every suite, TLS 1.3 first.
    pub const ALL: [CipherSuiteName; 9] = [
        CipherSuiteName::TLS13_AES_128_GCM_SHA256,
        CipherSuiteName::TLS13_AES_256_GCM_SHA384,
        CipherSuiteName::TLS13_CHACHA20_POLY1305_SHA256,
        CipherSuiteName::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        CipherSuiteName::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        CipherSuiteName::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        CipherSuiteName::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        CipherSuiteName::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        CipherSuiteName::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    ];

    /// The version it belongs to.
    pub fn version(self) -> VersionName {
        match self {
            CipherSuiteName::TLS13_AES_128_GCM_SHA256
            | CipherSuiteName::TLS13_AES_256_GCM_SHA384
            | CipherSuiteName::TLS13_CHACHA20_POLY1305_SHA256 => VersionName::Tls13,
            _ => VersionName::Tls12,
        }
    }

    /// The record cipher it uses.
    pub fn cipher(self) -> crate::ktls::Cipher {
        use crate::ktls::Cipher;
        match self {
            CipherSuiteName::TLS13_AES_128_GCM_SHA256
            | CipherSuiteName::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
            | CipherSuiteName::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => Cipher::Aes128Gcm,
            CipherSuiteName::TLS13_AES_256_GCM_SHA384
            | CipherSuiteName::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
            | CipherSuiteName::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => Cipher::Aes256Gcm,
            CipherSuiteName::TLS13_CHACHA20_POLY1305_SHA256
            | CipherSuiteName::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
            | CipherSuiteName::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256 => {
                Cipher::Chacha20Poly1305
            }
        }
    }

    /// Its IANA name, as written in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            CipherSuiteName::TLS13_AES_128_GCM_SHA256 => "TLS13_AES_128_GCM_SHA256",
            CipherSuiteName::TLS13_AES_256_GCM_SHA384 => "TLS13_AES_256_GCM_SHA384",
            CipherSuiteName::TLS13_CHACHA20_POLY1305_SHA256 => "TLS13_CHACHA20_POLY1305_SHA256",
            CipherSuiteName::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 => {
                "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"
            }
            CipherSuiteName::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384 => {
                "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384"
            }
            CipherSuiteName::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256 => {
                "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256"
            }
            CipherSuiteName::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => {
                "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"
            }
            CipherSuiteName::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => {
                "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384"
            }
            CipherSuiteName::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256 => {
                "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256"
            }
        }
    }
}

/// A key exchange group.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Deserialize,
    Serialize,
    clap::ValueEnum,
)]
pub enum GroupName {
    /// Curve25519 ECDH.
    #[serde(rename = "X25519", alias = "x25519")]
    #[value(name = "X25519", alias = "x25519")]
    X25519,
    /// NIST P-256 ECDH.
    #[serde(rename = "P-256", alias = "secp256r1")]
    #[value(name = "P-256", alias = "secp256r1")]
    P256,
    /// NIST P-384 ECDH.
    #[serde(rename = "P-384", alias = "secp384r1")]
    #[value(name = "P-384", alias = "secp384r1")]
    P384,
    /// The post-quantum hybrid of X25519 and ML-KEM-768 (TLS 1.3 only).
    #[serde(rename = "X25519MLKEM768")]
    #[value(name = "X25519MLKEM768")]
    X25519MlKem768,
}

impl GroupName {
    /// Whether a session of `version` can use it (the hybrid is defined for TLS 1.3 only).
    pub fn usable_for(self, version: VersionName) -> bool {
        self != GroupName::X25519MlKem768 || version == VersionName::Tls13
    }

    /// The group of an IANA value (what rustls reports), if it is one of these.
    pub fn from_wire(value: u16) -> Option<Self> {
        match value {
            0x001d => Some(GroupName::X25519),
            0x0017 => Some(GroupName::P256),
            0x0018 => Some(GroupName::P384),
            0x11ec => Some(GroupName::X25519MlKem768),
            _ => None,
        }
    }

    /// As written in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            GroupName::X25519 => "X25519",
            GroupName::P256 => "P-256",
            GroupName::P384 => "P-384",
            GroupName::X25519MlKem768 => "X25519MLKEM768",
        }
    }
}

/// One side's TLS policy; `None` keys come from the node-wide defaults, then the built-in ones.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsPolicyConfig {
    /// Protocol versions accepted (or offered, on an upstream leg). Built in: 1.2 and 1.3.
    #[serde(default)]
    pub tls_versions: Option<Vec<VersionName>>,
    /// Cipher suites, in the server's order of preference (the server's order wins). Built
    /// in: every suite, AES-GCM first where the CPU has AES instructions, ChaCha20 first
    /// otherwise.
    #[serde(default)]
    pub cipher_suites: Option<Vec<CipherSuiteName>>,
    /// Key exchange groups, in order of preference (the client's order picks among them).
    /// Built in: X25519MLKEM768 (TLS 1.3), X25519, P-256, P-384.
    #[serde(default)]
    pub groups: Option<Vec<GroupName>>,
    /// Session resumption (tickets and session IDs; PSK in TLS 1.3). Built in: on.
    #[serde(default)]
    pub session_resumption: Option<bool>,
}

impl TlsPolicyConfig {
    /// This policy, with `defaults` where it says nothing.
    pub fn or(&self, defaults: &TlsPolicyConfig) -> TlsPolicyConfig {
        TlsPolicyConfig {
            tls_versions: self
                .tls_versions
                .clone()
                .or_else(|| defaults.tls_versions.clone()),
            cipher_suites: self
                .cipher_suites
                .clone()
                .or_else(|| defaults.cipher_suites.clone()),
            groups: self.groups.clone().or_else(|| defaults.groups.clone()),
            session_resumption: self.session_resumption.or(defaults.session_resumption),
        }
    }

    /// Whether it sets nothing.
    pub fn is_empty(&self) -> bool {
        *self == TlsPolicyConfig::default()
    }
}
