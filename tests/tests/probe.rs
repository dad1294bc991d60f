//! `tlsplice probe` against the running kernel: what it says about kTLS must match what the
//! kernel does, and with `--config` it must fail (status 2) exactly when a listener cannot run.

use std::process::Command;

use tlsplice_tests::{TestPki, agent_binary};

fn probe(args: &[&str]) -> (Option<i32>, String) {
    let bin = agent_binary();
    let out = Command::new(&bin)
        .arg("probe")
        .args(args)
        .env_remove("TLSPLICE_CONFIG")
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", bin.display()));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("$ tlsplice probe {}\n{stdout}{stderr}", args.join(" "));
    (out.status.code(), stdout)
}

fn terminate(name: &str, port: u16, dir: &std::path::Path, data_path: &str) -> String {
    format!(
        "[[listener]]\nname = \"{name}\"\nmode = \"terminate\"\nlisten = \"127.0.0.1:{port}\"\n\
         upstream = \"127.0.0.1:1\"\ncert = \"{cert}\"\nkey = \"{key}\"\ndata_path = \"{data_path}\"\n",
        cert = dir.join("server.pem").display(),
        key = dir.join("server.key").display(),
    )
}

#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
fn probe_matches_the_kernel_and_judges_each_listener() {
    let ktls = tlsplice::probe::ktls_available();
    let (code, out) = probe(&[]);
    assert_eq!(code, Some(0), "{out}");
    match &ktls {
        Ok(()) => {
            assert!(out.contains("ktls: available"), "{out}");
            assert!(
                out.contains("ktls TLSv1.3 AES-128-GCM: tx yes, rx yes"),
                "{out}"
            );
            assert!(out.contains("ktls splice (RX -> pipe -> TX): yes"), "{out}");
            // Rekey is probed by installing a second key, and must agree with the version.
            let release = tlsplice::probe::kernel_release();
            let rekey_expected =
                tlsplice::probe::parse_release(&release).is_some_and(|v| v >= (6, 14));
            assert_eq!(
                out.contains("ktls tls1.3 rekey: yes"),
                rekey_expected,
                "{release}: {out}"
            );
        }
        Err(e) => {
            assert!(
                std::env::var_os(tlsplice_tests::REQUIRE_ENV).is_none(),
                "this guest must have kTLS: {e}"
            );
            assert!(out.contains("ktls: unavailable: "), "{out}");
        }
    }
    let (code, _) = probe(&["--require-ktls"]);
    assert_eq!(code, Some(if ktls.is_ok() { 0 } else { 2 }));

    let pki = TestPki::generate();
    let dir = pki.write_files();
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        terminate("auto", 18443, &dir, "auto") + &terminate("strict", 18444, &dir, "ktls"),
    )
    .expect("write config");
    let (code, out) = probe(&["--config", config.to_str().expect("utf-8 path")]);
    if ktls.is_ok() {
        assert_eq!(code, Some(0), "{out}");
        assert!(
            out.contains("listener auto (terminate): ok: data path ktls for "),
            "{out}"
        );
        assert!(
            out.contains("listener strict (terminate): ok: data path ktls for "),
            "{out}"
        );
    } else {
        assert_eq!(code, Some(2), "{out}");
        assert!(
            out.contains("listener auto (terminate): ok: data path userspace: kernel has no kTLS"),
            "{out}"
        );
        assert!(
            out.contains(
                "listener strict (terminate): cannot run: data_path = \"ktls\" but kernel has no kTLS"
            ),
            "{out}"
        );
    }

    // TLS material that does not load means the listener cannot run on any kernel.
    std::fs::remove_file(dir.join("server.key")).expect("remove key");
    std::fs::write(&config, terminate("auto", 18443, &dir, "auto")).expect("write config");
    let (code, out) = probe(&["--config", config.to_str().expect("utf-8 path")]);
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("listener auto (terminate): cannot run: listener \"auto\": key "),
        "{out}"
    );
    let _ = std::fs::remove_dir_all(dir);
}
