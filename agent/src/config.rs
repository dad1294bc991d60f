//! The agent's TOML configuration: listeners, their mode, upstream and TLS material.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// How a listener treats its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Client TLS, plaintext to the upstream.
    Terminate,
}

/// Which data path a listener may use after the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataPathPolicy {
    /// kTLS + splice when the kernel can offload the negotiated version and cipher, otherwise
    /// user space (and each connection says why).
    #[default]
    Auto,
    /// kTLS + splice only: a connection that cannot be offloaded is closed.
    Ktls,
    /// rustls in user space and a copy loop.
    Userspace,
}

/// One listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Name used in logs and metrics.
    pub name: String,
    /// What the listener does.
    pub mode: Mode,
    /// Address to accept on.
    pub listen: SocketAddr,
    /// Plaintext upstream address.
    pub upstream: SocketAddr,
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, SEC1 or PKCS#1).
    pub key: PathBuf,
    /// ALPN protocols offered, in preference order (none by default).
    #[serde(default)]
    pub alpn: Vec<String>,
    /// Milliseconds a client has to finish the handshake.
    #[serde(default = "default_handshake_timeout_ms")]
    pub handshake_timeout_ms: u64,
    /// Milliseconds to wait for the upstream to accept.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Data path policy.
    #[serde(default)]
    pub data_path: DataPathPolicy,
}

fn default_handshake_timeout_ms() -> u64 {
    10_000
}

fn default_connect_timeout_ms() -> u64 {
    5_000
}

impl ListenerConfig {
    /// The handshake deadline.
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
    }

    /// The upstream connect deadline.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Listeners, each with its own mode.
    #[serde(rename = "listener", default)]
    pub listeners: Vec<ListenerConfig>,
}

/// A configuration that could not be loaded, with where.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("{path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why, with line and column.
        source: Box<toml::de::Error>,
    },
    /// A value is wrong.
    #[error("{path}: listener {listener:?}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The listener's name.
        listener: String,
        /// What is wrong.
        message: String,
    },
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates configuration text; `path` is used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })?;
        let invalid = |listener: &ListenerConfig, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            listener: listener.name.clone(),
            message,
        };
        let mut names = std::collections::BTreeSet::new();
        for l in &config.listeners {
            if !names.insert(l.name.as_str()) {
                return Err(invalid(l, "duplicate listener name".into()));
            }
            if l.handshake_timeout_ms == 0 {
                return Err(invalid(l, "handshake_timeout_ms must be above 0".into()));
            }
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_terminate_listener_with_defaults() {
        let c = Config::parse(
            r#"
            [[listener]]
            name = "web"
            mode = "terminate"
            listen = "127.0.0.1:8443"
            upstream = "127.0.0.1:8080"
            cert = "/c.pem"
            key = "/k.pem"
            "#,
            Path::new("t.toml"),
        )
        .unwrap();
        let l = &c.listeners[0];
        assert_eq!(l.mode, Mode::Terminate);
        assert_eq!(l.data_path, DataPathPolicy::Auto);
        assert_eq!(l.handshake_timeout(), Duration::from_secs(10));
    }

    #[test]
    fn errors_name_the_file_and_listener() {
        let dup = r#"
            [[listener]]
            name = "a"
            mode = "terminate"
            listen = "127.0.0.1:1"
            upstream = "127.0.0.1:2"
            cert = "c"
            key = "k"
            [[listener]]
            name = "a"
            mode = "terminate"
            listen = "127.0.0.1:3"
            upstream = "127.0.0.1:4"
            cert = "c"
            key = "k"
        "#;
        let e = Config::parse(dup, Path::new("f.toml"))
            .unwrap_err()
            .to_string();
        assert_eq!(e, "f.toml: listener \"a\": duplicate listener name");
        let e = Config::parse("[[listener]]\nname = 1\n", Path::new("g.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("g.toml: ") && e.contains("line 2"), "{e}");
    }
}
