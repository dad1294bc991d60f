//! report.md, the SVG charts and the combined raw JSON, from the results of one or more runs.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::repeat::{SPREAD_LIMIT, path_totals, relative_spread, steady};
use super::{GIB, MIB, Results, Row, svg};

const MODES: [&str; 3] = ["terminate", "reencrypt", "passthrough"];

fn fmt(v: Option<f64>, digits: usize) -> String {
    match v {
        Some(x) if x.is_finite() => format!("{x:.digits$}"),
        _ => "–".into(),
    }
}

/// A figure of a row as the report shows it: the value, and for a row of several runs how far
/// they spread (`±`: largest minus smallest over the median), flagged past [`SPREAD_LIMIT`].
fn figure(r: &Row, name: &str, v: Option<f64>, digits: usize) -> String {
    scaled(r, name, v, 1.0, digits)
}

/// [`figure`] for a value shown divided by `divisor` (bytes as KiB): the spread is the same
/// fraction either way, computed on the value as the row holds it.
fn scaled(r: &Row, name: &str, v: Option<f64>, divisor: f64, digits: usize) -> String {
    let value = fmt(v.map(|x| x / divisor), digits);
    match relative_spread(r, name, v) {
        Some(spread) if spread > SPREAD_LIMIT => format!("{value} ±{:.0}% ⚠", spread * 100.0),
        Some(spread) => format!("{value} ±{:.0}%", spread * 100.0),
        None => value,
    }
}

/// A percentile is shown only when at least 10 samples lie beyond it; otherwise it is little
/// more than the maximum.
fn tail(v: Option<f64>, q: f64, samples: Option<u64>) -> Option<f64> {
    let n = samples.unwrap_or(0) as f64;
    v.filter(|_| n * (1.0 - q) >= 10.0)
}

/// A row of tlsplice's for a ratio: one with errors gives none.
fn clean<'a>(rows: &'a [Row], mode: &str, relay: &str, workload: &str) -> Option<&'a Row> {
    find(rows, mode, relay, workload).filter(|r| r.errors == 0)
}

fn find<'a>(rows: &'a [Row], mode: &str, relay: &str, workload: &str) -> Option<&'a Row> {
    rows.iter()
        .find(|r| r.mode == mode && r.relay == relay && r.workload == workload)
}

fn relays_of(rows: &[Row], mode: &str) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for r in rows.iter().filter(|r| r.mode == mode) {
        if !names.contains(&r.relay) {
            names.push(r.relay.clone());
        }
    }
    names
}

/// The best peer's value for one figure (`higher` is better or not), with its name; a peer
/// whose runs spread past [`SPREAD_LIMIT`] on it is left out.
fn best_peer(
    rows: &[Row],
    mode: &str,
    workload: &str,
    (name, figure): (&str, impl Fn(&Row) -> Option<f64>),
    higher: bool,
) -> Option<(String, f64)> {
    rows.iter()
        .filter(|r| r.mode == mode && r.peer && r.workload == workload && r.errors == 0)
        .filter(|r| steady(r, name, figure(r)))
        .filter_map(|r| {
            figure(r)
                .filter(|v| v.is_finite())
                .map(|v| (r.relay.clone(), v))
        })
        .reduce(|a, b| if (b.1 > a.1) == higher { b } else { a })
}

/// tlsplice's figure `name` of `row` (`get` reads it) against the best peer's; none for a row
/// with errors, and none but the spread for one whose runs spread past [`SPREAD_LIMIT`].
fn our_ratio(
    row: Option<&Row>,
    (name, get): (&str, impl Fn(&Row) -> Option<f64>),
    best: &Option<(String, f64)>,
) -> String {
    let Some(row) = row else {
        return "–".into();
    };
    let ours = get(row);
    match relative_spread(row, name, ours) {
        Some(spread) if spread > SPREAD_LIMIT => {
            format!("– (runs spread {:.0}%)", spread * 100.0)
        }
        _ => ratio(ours, best),
    }
}

fn ratio(ours: Option<f64>, best: &Option<(String, f64)>) -> String {
    match (ours, best) {
        (Some(o), Some((name, b))) if o.is_finite() && *b > 0.0 => {
            format!("{:.2}× ({name})", o / b)
        }
        _ => "–".into(),
    }
}

/// Writes everything under `out`.
pub fn write(inputs: &[PathBuf], out: &Path) -> Result<()> {
    std::fs::create_dir_all(out)?;
    let mut runs = Vec::new();
    for input in inputs {
        let text = std::fs::read_to_string(input)
            .with_context(|| format!("reading {}", input.display()))?;
        let run: Results =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", input.display()))?;
        runs.push(run);
    }
    std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&runs)?,
    )?;
    let mut md = String::from("# tlsplice against user-space proxies\n\n");
    md.push_str(
        "Written by `cargo xtask bench` (raw figures: results.json beside this file). Every relay runs on the \
         same machine in the same run, against the same traffic generator and upstream (separate \
         processes, not counted). **CPU-s/GiB** is the relay's process tree plus every kernel thread \
         over the same interval (sockmap and kTLS work partly runs in kernel threads that no process \
         is charged for). Latency is measured at a fixed offered rate (open loop: a late response \
         delays the next request's clock start to its due time, so queueing counts). Ratios compare \
         with the best peer of the same run: above 1 means more (throughput, handshakes) or more \
         costly (CPU, latency, memory). **Path observed**: for tlsplice, its own per-connection data \
         path counters (a row whose connections did not all take the forced path fails the run); for \
         peers in the guest, the kernel's kTLS counters from /proc/net/tls_stat (`TlsTxSw` alone means \
         kTLS for sending only, decryption stayed in user space). **CPU**: *relay* is the relay's \
         process tree (every thread, ended children too) plus every kernel thread over the same \
         interval; *node* is every CPU of the machine (/proc/stat), traffic generator and upstream \
         included, which do the same work for every relay of a mode. On loopback the kernel's \
         receive work for a segment runs in the sender's context, so part of a relay's cost lands on \
         the generator (for sockmap, the verdict program itself): *node* is the fairer comparison, \
         *relay* the one the crypto bound applies to. **Runs**: a row measured more than once \
         (`--repeat`; `cargo xtask bench` measures host rows 3 times) shows each figure's median, \
         `±` how far the runs spread (largest minus smallest, over the median); past 20% it is \
         marked ⚠ and left out of every ratio. A row of one run has no `±`: differences of a few \
         percent there are noise.\n\n",
    );
    for run in &runs {
        section(&mut md, run, out)?;
    }
    std::fs::write(out.join("report.md"), md)?;
    println!("bench: wrote {}", out.join("report.md").display());
    Ok(())
}

fn section(md: &mut String, run: &Results, out: &Path) -> Result<()> {
    let scope = if run.simulated { "guest" } else { "host" };
    if run.simulated {
        let _ = writeln!(
            md,
            "## In a QEMU/TCG guest — simulated (emulated CPU)\n\nKernel {}, 1 emulated CPU ({}). Every figure here comes from an emulated CPU: \
             compare ratios **inside this section only**, never with the host's figures. The one CPU runs \
             the traffic generator, the upstream and the relay together, and emulation costs differ by \
             code path (the kernel's AES-GCM, ring's, OpenSSL's): read these rows as what each relay \
             does (which path, how many descriptors, how much memory per connection) more than how \
             fast.\n",
            run.kernel, run.cpu
        );
    } else {
        let _ = writeln!(
            md,
            "## On the host (real CPU)\n\nKernel {} (no kTLS), {} × {}, {:.0} GiB.\n",
            run.kernel, run.cpus, run.cpu, run.memory_gib
        );
    }
    let _ = writeln!(
        md,
        "Measured {}{}. Sizes: bulk {} MiB on 1 connection and {} MiB on each of 16; \
         request/response for {} s at {} req/s (1 KiB) and {} req/s (64 KiB) over 4 connections; \
         handshakes for {} s over 8 connections; {} idle connections (a process may hold {} \
         descriptors here). Idle memory is the relay's (proportional set size, per connection, \
         after one small exchange each) / the kernel's, node-wide (/proc/meminfo Slab and \
         /proc/net/sockstat TCP pages: every socket of the path, client and upstream included, \
         which is the same for every relay but kTLS contexts).\n",
        run.date,
        if run.quick {
            " (quick smoke run: sizes too small and builds unoptimised, so no conclusions)"
        } else {
            ""
        },
        run.sizes.bulk_bytes >> 20,
        run.sizes.bulk16_bytes >> 20,
        run.sizes.rr_secs,
        run.sizes.rr_small_rate,
        run.sizes.rr_large_rate,
        run.sizes.handshake_secs,
        run.sizes.idle_count,
        run.open_files_limit
    );
    if run.repeat > 1 {
        let _ = writeln!(
            md,
            "Each row: the median of {} runs, `±` their spread ({}% flags it).\n",
            run.repeat,
            SPREAD_LIMIT * 100.0
        );
    }
    let versions: Vec<String> = run.versions.values().cloned().collect();
    let _ = writeln!(md, "Versions: {}.\n", versions.join("; "));
    if let Some(speed) = run.crypto_bytes_per_s {
        let _ = writeln!(
            md,
            "Crypto bound (`openssl speed -evp aes-128-gcm`, 16 KiB, one core): {:.0} MiB/s, i.e. {:.2} CPU-s/GiB \
             to decrypt (terminate); a decrypt + encrypt hop (reencrypt) is bounded at half: {:.0} MiB/s, {:.2} CPU-s/GiB.\n",
            speed / MIB,
            GIB / speed,
            speed / MIB / 2.0,
            2.0 * GIB / speed
        );
    }
    for mode in MODES {
        let relays = relays_of(&run.rows, mode);
        if relays.is_empty() {
            continue;
        }
        let rows = &run.rows;
        let _ = writeln!(md, "### {mode}\n");
        let _ = writeln!(
            md,
            "| relay | bulk ×1 MiB/s | CPU-s/GiB relay / node | bulk ×16 MiB/s | CPU-s/GiB relay / node | 1 KiB p50 / p99 / p99.9 µs | 64 KiB p50 / p99 / p99.9 µs | handshakes/s, full (relay CPU ms each) | handshakes/s, resumption offered (% resumed) | idle KiB/conn relay / kernel (fds/conn) | path observed |\n\
             |---|---|---|---|---|---|---|---|---|---|---|"
        );
        for relay in &relays {
            let get = |w: &str| find(rows, mode, relay, w);
            let bulk = |w: &str| {
                get(w).map_or(("–".into(), "–".into()), |r| {
                    (
                        figure(r, "throughput_mib_s", r.throughput_mib_s, 0),
                        format!(
                            "{} / {}",
                            figure(r, "cpu_s_per_gib", r.cpu_s_per_gib, 2),
                            figure(r, "node_cpu_s_per_gib", r.node_cpu_s_per_gib, 2)
                        ),
                    )
                })
            };
            let lat = |w: &str| {
                get(w).map_or("–".into(), |r| {
                    format!(
                        "{} / {} / {} (n={})",
                        fmt(r.p50_us, 0),
                        figure(r, "p99_us", tail(r.p99_us, 0.99, r.samples), 0),
                        fmt(tail(r.p999_us, 0.999, r.samples), 0),
                        r.samples.unwrap_or(0)
                    )
                })
            };
            let (b1, c1) = bulk("bulk, 1 connection");
            let (b16, c16) = bulk("bulk, 16 connections");
            let hs = get("handshakes, full").map_or("–".into(), |r| {
                format!(
                    "{} ({})",
                    figure(r, "handshakes_per_s", r.handshakes_per_s, 0),
                    fmt(r.cpu_ms_per_handshake, 2)
                )
            });
            let rs = get("handshakes, resumption offered").map_or("–".into(), |r| {
                format!(
                    "{} ({}%)",
                    fmt(r.handshakes_per_s, 0),
                    fmt(r.resumed_fraction.map(|f| f * 100.0), 0)
                )
            });
            let idle = get("idle connections").map_or("–".into(), |r| {
                format!(
                    "{} / {} ({})",
                    scaled(
                        r,
                        "rss_per_connection_bytes",
                        r.rss_per_connection_bytes,
                        1024.0,
                        1
                    ),
                    fmt(r.kernel_bytes_per_connection.map(|b| b / 1024.0), 1),
                    fmt(r.fds_per_connection, 2)
                )
            });
            // What carried this relay's connections over all its workloads, summed.
            let totals = path_totals(
                rows.iter()
                    .filter(|r| r.mode == mode && &r.relay == relay)
                    .map(|r| r.path_observed.as_str()),
            );
            let paths: Vec<String> = totals.iter().map(|(k, n)| format!("{k}: {n}")).collect();
            let errors: u64 = rows
                .iter()
                .filter(|r| r.mode == mode && &r.relay == relay)
                .map(|r| r.errors)
                .sum();
            let path = if errors > 0 {
                format!("{} **{errors} errors**", paths.join("; "))
            } else {
                paths.join("; ")
            };
            let _ = writeln!(
                md,
                "| {relay} | {b1} | {c1} | {b16} | {c16} | {} | {} | {hs} | {rs} | {idle} | {path} |",
                lat("request/response 1 KiB"),
                lat("request/response 64 KiB")
            );
        }
        md.push('\n');
        // Ratios of each tlsplice path against the best peer, and against the crypto bound.
        let bound = run.crypto_bytes_per_s.and_then(|s| match mode {
            "terminate" => Some(s),
            "reencrypt" => Some(s / 2.0),
            _ => None,
        });
        // Each figure a ratio is taken of: its name (for its spread) and how to read it.
        type Named = (&'static str, fn(&Row) -> Option<f64>);
        let throughput: Named = ("throughput_mib_s", |r| r.throughput_mib_s);
        let cpu: Named = ("cpu_s_per_gib", |r| r.cpu_s_per_gib);
        let node: Named = ("node_cpu_s_per_gib", |r| r.node_cpu_s_per_gib);
        let p99: Named = ("p99_us", |r| tail(r.p99_us, 0.99, r.samples));
        let handshakes: Named = ("handshakes_per_s", |r| r.handshakes_per_s);
        let idle: Named = ("rss_per_connection_bytes", |r| r.rss_per_connection_bytes);
        let best_tp = best_peer(rows, mode, "bulk, 1 connection", throughput, true);
        let best_cpu = best_peer(rows, mode, "bulk, 1 connection", cpu, false);
        let best_node = best_peer(rows, mode, "bulk, 1 connection", node, false);
        let best_p99 = best_peer(rows, mode, "request/response 1 KiB", p99, false);
        let best_hs = best_peer(rows, mode, "handshakes, full", handshakes, true);
        let best_idle = best_peer(rows, mode, "idle connections", idle, false);
        let _ = writeln!(
            md,
            "| tlsplice | throughput vs best peer | relay CPU-s/GiB vs best peer | node CPU-s/GiB vs best peer | throughput vs crypto bound | relay CPU-s/GiB vs crypto bound | 1 KiB p99 vs best peer | handshakes/s vs best peer | idle memory/conn vs best peer |\n\
             |---|---|---|---|---|---|---|---|---|"
        );
        for relay in relays.iter().filter(|r| r.starts_with("tlsplice")) {
            let bulk = clean(rows, mode, relay, "bulk, 1 connection");
            // Against the crypto bound only a figure whose runs agree.
            let steady_figure =
                |(name, get): Named| bulk.filter(|r| steady(r, name, get(r))).and_then(get);
            let tp = steady_figure(throughput);
            let cpu_s = steady_figure(cpu);
            let (vs_bound_tp, vs_bound_cpu) = match bound {
                Some(b) => (
                    fmt(tp.map(|t| t * MIB / b), 2),
                    fmt(cpu_s.map(|c| c / (GIB / b)), 2),
                ),
                None => ("– (no crypto)".into(), "– (no crypto)".into()),
            };
            let _ = writeln!(
                md,
                "| {relay} | {} | {} | {} | {vs_bound_tp} | {vs_bound_cpu} | {} | {} | {} |",
                our_ratio(bulk, throughput, &best_tp),
                our_ratio(bulk, cpu, &best_cpu),
                our_ratio(bulk, node, &best_node),
                our_ratio(
                    clean(rows, mode, relay, "request/response 1 KiB"),
                    p99,
                    &best_p99
                ),
                our_ratio(
                    clean(rows, mode, relay, "handshakes, full"),
                    handshakes,
                    &best_hs
                ),
                our_ratio(
                    clean(rows, mode, relay, "idle connections"),
                    idle,
                    &best_idle
                ),
            );
        }
        md.push('\n');
        // Charts.
        let series = |w: &str, figure: &dyn Fn(&Row) -> Option<f64>| -> Vec<(String, f64)> {
            relays
                .iter()
                .map(|relay| {
                    (
                        relay.clone(),
                        find(rows, mode, relay, w)
                            .and_then(figure)
                            .unwrap_or(f64::NAN),
                    )
                })
                .collect()
        };
        let mut charts = Vec::new();
        for (w, tag) in [
            ("bulk, 1 connection", "x1"),
            ("bulk, 16 connections", "x16"),
        ] {
            let name = format!("{scope}-{mode}-throughput-{tag}.svg");
            std::fs::write(
                out.join(&name),
                svg::bars(
                    &format!("{mode}, {w}: throughput"),
                    "MiB/s",
                    &series(w, &|r| r.throughput_mib_s),
                ),
            )?;
            charts.push(name);
            let name = format!("{scope}-{mode}-cpu-{tag}.svg");
            std::fs::write(
                out.join(&name),
                svg::bars(
                    &format!("{mode}, {w}: relay + kernel threads CPU"),
                    "CPU-s/GiB, lower is better",
                    &series(w, &|r| r.cpu_s_per_gib),
                ),
            )?;
            charts.push(name);
        }
        for (w, tag) in [
            ("request/response 1 KiB", "1k"),
            ("request/response 64 KiB", "64k"),
        ] {
            let cdf: Vec<(String, Vec<[f64; 2]>)> = relays
                .iter()
                .filter_map(|relay| {
                    find(rows, mode, relay, w)
                        .and_then(|r| r.cdf.clone())
                        .map(|c| (relay.clone(), c))
                })
                .collect();
            let name = format!("{scope}-{mode}-latency-{tag}.svg");
            std::fs::write(
                out.join(&name),
                svg::latency_cdf(&format!("{mode}: {w} latency at a fixed rate"), &cdf),
            )?;
            charts.push(name);
        }
        for c in charts {
            let _ = writeln!(md, "![{c}]({c})");
        }
        md.push('\n');
    }
    if !run.skipped.is_empty() {
        let _ = writeln!(md, "Not run here, and why:\n");
        for s in &run.skipped {
            let _ = writeln!(md, "- {} / {}: {}", s.mode, s.relay, s.why);
        }
        md.push('\n');
    }
    Ok(())
}
