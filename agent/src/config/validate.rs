//! Every problem of a configuration's values, each with where it is (listener and key); the
//! parser has checked the types.

use super::{Config, DataPathPolicy, ListenerConfig, Mode, Problem};

impl Config {
    /// Everything wrong with the values (the types are checked by the parser).
    pub(super) fn problems(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        let mut top = |key: &str, message: &str| {
            out.push(Problem {
                listener: None,
                key: key.to_owned(),
                message: message.to_owned(),
            });
        };
        if self.limits.max_connections == 0 {
            top("limits.max_connections", "must be above 0");
        }
        if self.limits.key_updates_per_second == 0 {
            top("limits.key_updates_per_second", "must be above 0");
        }
        if self.limits.max_handshakes == 0 {
            top("limits.max_handshakes", "must be above 0");
        }
        if self.limits.max_splice_pipes == 0 || self.limits.max_splice_pipes > 1_000_000 {
            top(
                "limits.max_splice_pipes",
                "must be between 1 and 1,000,000 (two descriptors each)",
            );
        }
        let l = &self.limits;
        if l.worker_threads.is_some_and(|n| n == 0 || n > 1024) {
            top("limits.worker_threads", "must be between 1 and 1,024");
        }
        if l.per_source_connections == Some(0) {
            top("limits.per_source_connections", "must be above 0");
        }
        if l.per_source_handshakes_per_second == Some(0) {
            top("limits.per_source_handshakes_per_second", "must be above 0");
        }
        if l.per_source_handshake_burst == Some(0) {
            top("limits.per_source_handshake_burst", "must be above 0");
        }
        if l.source_prefix_v4 > 32 {
            top("limits.source_prefix_v4", "must be between 0 and 32");
        }
        if l.source_prefix_v6 > 128 {
            top("limits.source_prefix_v6", "must be between 0 and 128");
        }
        if self.certs.reload_interval_ms < 100 {
            top(
                "certs.reload_interval_ms",
                "must be at least 100 (files are read at each check)",
            );
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, l) in self.listeners.iter().enumerate() {
            let mut bad = |key: &str, message: String| {
                out.push(Problem {
                    listener: Some(l.name.clone()),
                    key: key.to_owned(),
                    message,
                });
            };
            if !names.insert(l.name.as_str()) {
                bad("name", "duplicate listener name".into());
            }
            if i == tlsplice_common::LISTENERS_MAX_ENTRIES as usize {
                bad(
                    "name",
                    format!(
                        "more than {} listeners",
                        tlsplice_common::LISTENERS_MAX_ENTRIES
                    ),
                );
            }
            l.check(&mut bad);
        }
        out
    }
}

impl ListenerConfig {
    /// Reports every problem of this listener to `bad(key, message)`.
    fn check(&self, bad: &mut impl FnMut(&str, String)) {
        let l = self;
        let mode = format!("{:?}", l.mode).to_lowercase();
        if l.rekey_after_records.is_some_and(|n| n < 16) {
            bad("rekey_after_records", "must be at least 16".into());
        }
        if l.handshake_timeout_ms == 0 {
            bad("handshake_timeout_ms", "must be above 0".into());
        }
        if l.idle_timeout_ms < 100 {
            bad("idle_timeout_ms", "must be at least 100".into());
        }
        if l.max_connections == Some(0) {
            bad("max_connections", "must be above 0".into());
        }
        for (key, value) in [
            ("per_source_connections", l.per_source_connections),
            (
                "per_source_handshakes_per_second",
                l.per_source_handshakes_per_second,
            ),
            ("per_source_handshake_burst", l.per_source_handshake_burst),
        ] {
            if value == Some(0) {
                bad(key, "must be above 0".into());
            }
        }
        if l.mode == Mode::Passthrough {
            if l.upstream_unix.is_some() {
                bad(
                    "upstream_unix",
                    "mode passthrough routes to TCP upstreams: upstream_unix is for terminate"
                        .into(),
                );
            }
            if l.upstream.is_none() && l.sni.is_empty() {
                bad(
                    "upstream",
                    "mode passthrough needs sni routes or an upstream".into(),
                );
            }
            if l.data_path == DataPathPolicy::Ktls {
                bad(
                    "data_path",
                    "mode passthrough never holds keys: data_path = \"ktls\" cannot apply".into(),
                );
            }
            if !l.alpn.is_empty() {
                bad(
                    "alpn",
                    "mode passthrough leaves ALPN to the endpoints: remove alpn".into(),
                );
            }
        } else {
            match (&l.upstream, &l.upstream_unix) {
                (None, None) => bad("upstream", format!("mode {mode} needs an upstream")),
                (Some(_), Some(_)) => bad(
                    "upstream_unix",
                    "upstream and upstream_unix are exclusive: pick one".into(),
                ),
                (None, Some(_)) if l.mode != Mode::Terminate => bad(
                    "upstream_unix",
                    format!("mode {mode} needs a TCP upstream: upstream_unix is for terminate"),
                ),
                _ => {}
            }
            if !l.sni.is_empty() {
                bad(
                    "sni",
                    format!("mode {mode} does not route by SNI: remove the sni table"),
                );
            }
        }
        if l.client_ca.is_none() {
            // Without client certificates there is no identity to allow or revoke.
            if !l.allow_clients.is_empty() {
                bad(
                    "allow_clients",
                    "needs client_ca: clients are named by the certificate they present".into(),
                );
            }
            if !l.client_crls.is_empty() {
                bad(
                    "client_crls",
                    "needs client_ca: revocation applies to client certificates".into(),
                );
            }
        }
        if !l.mode.client_tls() && l.ocsp.is_some() {
            bad(
                "ocsp",
                format!("mode {mode} serves no certificate: remove ocsp"),
            );
        }
        if !l.mode.client_tls() && !l.tls.is_empty() {
            bad(
                "tls",
                format!("mode {mode} does not terminate client TLS: remove [listener.tls]"),
            );
        }
        if l.mode.client_tls() {
            if l.cert.is_none() {
                bad("cert", format!("mode {mode} needs a certificate chain"));
            }
            if l.key.is_none() {
                bad(
                    "key",
                    format!("mode {mode} needs the certificate's private key"),
                );
            }
        } else {
            if l.client_ca.is_some() {
                bad(
                    "client_ca",
                    format!("mode {mode} does not terminate client TLS: remove client_ca"),
                );
            }
            if l.cert.is_some() || l.key.is_some() || !l.certs.is_empty() {
                bad(
                    if l.cert.is_some() {
                        "cert"
                    } else if l.key.is_some() {
                        "key"
                    } else {
                        "certs"
                    },
                    format!(
                        "mode {mode} takes no certificates: its clients do not speak TLS to the agent"
                    ),
                );
            }
        }
        for (i, c) in l.certs.iter().enumerate() {
            for name in &c.server_names {
                let plain = name.strip_prefix("*.").unwrap_or(name);
                if plain.is_empty() || plain.contains('*') || plain.contains(' ') {
                    bad(
                        &format!("certs[{i}].server_names"),
                        format!("{name:?} is not a server name (a wildcard is only \"*.\" first)"),
                    );
                }
            }
        }
        match (&l.upstream_tls, l.mode.upstream_tls()) {
            (None, true) => bad(
                "upstream_tls",
                format!("mode {mode} needs an [listener.upstream_tls] table"),
            ),
            (Some(_), false) => bad(
                "upstream_tls",
                format!("mode {mode} sends plaintext upstream: remove upstream_tls"),
            ),
            (Some(u), true) if u.client_cert.is_some() != u.client_key.is_some() => bad(
                if u.client_cert.is_some() {
                    "upstream_tls.client_key"
                } else {
                    "upstream_tls.client_cert"
                },
                "upstream_tls needs both client_cert and client_key, or neither".into(),
            ),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::*;

    #[test]
    fn each_mode_checks_its_tls_material() {
        let base = |mode: &str, extra: &str| {
            format!(
                "[[listener]]\nname = \"l\"\nmode = \"{mode}\"\nlisten = \"127.0.0.1:1\"\nupstream = \"127.0.0.1:2\"\n{extra}"
            )
        };
        let err = |text: String| {
            Config::parse(&text, Path::new("c.toml"))
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            err(base("terminate", "")),
            "c.toml: listener \"l\": cert: mode terminate needs a certificate chain\nc.toml: listener \"l\": key: mode terminate needs the certificate's private key"
        );
        assert_eq!(
            err(base("originate", "cert = \"c\"\nkey = \"k\"\n")),
            "c.toml: listener \"l\": cert: mode originate takes no certificates: its clients do not speak TLS to the agent\nc.toml: listener \"l\": upstream_tls: mode originate needs an [listener.upstream_tls] table"
        );
        assert_eq!(
            err(base("reencrypt", "cert = \"c\"\nkey = \"k\"\n")),
            "c.toml: listener \"l\": upstream_tls: mode reencrypt needs an [listener.upstream_tls] table"
        );
        assert_eq!(
            err(base(
                "originate",
                "[listener.upstream_tls]\nserver_name = \"s\"\nca = \"a\"\nclient_cert = \"x\"\n"
            )),
            "c.toml: listener \"l\": upstream_tls.client_key: upstream_tls needs both client_cert and client_key, or neither"
        );
        assert_eq!(
            err(base(
                "originate",
                "client_ca = \"ca.pem\"\n[listener.upstream_tls]\nserver_name = \"s\"\nca = \"a\"\n"
            )),
            "c.toml: listener \"l\": client_ca: mode originate does not terminate client TLS: remove client_ca"
        );
        assert_eq!(
            err(base(
                "terminate",
                "cert = \"c\"\nkey = \"k\"\nupstream_unix = \"/run/app.sock\"\n"
            )),
            "c.toml: listener \"l\": upstream_unix: upstream and upstream_unix are exclusive: pick one"
        );
        assert!(
            Config::parse(
                "[[listener]]\nname = \"l\"\nmode = \"terminate\"\nlisten = \"127.0.0.1:1\"\nupstream_unix = \"/run/app.sock\"\ncert = \"c\"\nkey = \"k\"\n",
                Path::new("c.toml")
            )
            .is_ok()
        );
        assert!(
            Config::parse(
                &base(
                    "originate",
                    "[listener.upstream_tls]\nserver_name = \"s\"\nca = \"a\"\n"
                ),
                Path::new("c.toml")
            )
            .is_ok()
        );
    }

    #[test]
    fn worker_threads_are_between_1_and_1024() {
        let limits = |n: &str| {
            Config::parse(
                &format!(
                    "[limits]\nworker_threads = {n}\n[[listener]]\nname = \"l\"\nmode = \"terminate\"\n\
                     listen = \"127.0.0.1:1\"\nupstream = \"127.0.0.1:2\"\ncert = \"c\"\nkey = \"k\"\n"
                ),
                Path::new("c.toml"),
            )
            .map(|c| c.limits.worker_threads)
            .map_err(|e| e.to_string())
        };
        assert_eq!(limits("1"), Ok(Some(1)));
        assert_eq!(limits("1024"), Ok(Some(1024)));
        for bad in ["0", "1025"] {
            assert_eq!(
                limits(bad),
                Err("c.toml: limits.worker_threads: must be between 1 and 1,024".to_owned()),
                "{bad}"
            );
        }
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
        assert_eq!(e, "f.toml: listener \"a\": name: duplicate listener name");
        let e = Config::parse("[[listener]]\nname = 1\n", Path::new("g.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("g.toml: ") && e.contains("line 2"), "{e}");
    }

    /// `tlsplice check` prints every problem, each with its listener and key, not the first.
    #[test]
    fn every_problem_is_reported_with_its_location() {
        let text = r#"
            [limits]
            max_connections = 0
            source_prefix_v4 = 33
            [[listener]]
            name = "web"
            mode = "terminate"
            listen = "127.0.0.1:1"
            upstream = "127.0.0.1:2"
            key = "k"
            handshake_timeout_ms = 0
            per_source_handshakes_per_second = 0
            [[listener.certs]]
            cert = "a.pem"
            key = "a.key"
            server_names = ["*.*.example"]
            [[listener]]
            name = "pt"
            mode = "passthrough"
            listen = "127.0.0.1:3"
            alpn = ["h2"]
        "#;
        let e = Config::parse(text, Path::new("node.toml"))
            .unwrap_err()
            .to_string();
        let lines: Vec<&str> = e.lines().collect();
        assert_eq!(
            lines,
            [
                "node.toml: limits.max_connections: must be above 0",
                "node.toml: limits.source_prefix_v4: must be between 0 and 32",
                "node.toml: listener \"web\": handshake_timeout_ms: must be above 0",
                "node.toml: listener \"web\": per_source_handshakes_per_second: must be above 0",
                "node.toml: listener \"web\": cert: mode terminate needs a certificate chain",
                "node.toml: listener \"web\": certs[0].server_names: \"*.*.example\" is not a server name (a wildcard is only \"*.\" first)",
                "node.toml: listener \"pt\": upstream: mode passthrough needs sni routes or an upstream",
                "node.toml: listener \"pt\": alpn: mode passthrough leaves ALPN to the endpoints: remove alpn",
            ]
        );
    }
}
