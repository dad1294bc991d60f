//! report.md, the SVG charts and the combined raw JSON, from the results of one or more runs.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Result;

use super::repeat::{AGREEMENT_LIMIT, SPREAD_LIMIT, path_totals, relative_spread, steady};
use super::{Clock, GIB, MIB, Results, Row, svg};

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

/// A row of tlsplice's for a ratio: one with errors, or whose connections were not all on
/// the path its relay stands for, gives none.
fn clean<'a>(rows: &'a [Row], mode: &str, relay: &str, workload: &str) -> Option<&'a Row> {
    find(rows, mode, relay, workload).filter(|r| r.errors == 0 && !super::mismatched(r))
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
    figure: (&str, impl Fn(&Row) -> Option<f64>),
    higher: bool,
) -> Option<(String, f64)> {
    best_peer_of(rows, mode, workload, figure, higher, |_| true)
}

/// [`best_peer`] among the peers `which` accepts.
fn best_peer_of(
    rows: &[Row],
    mode: &str,
    workload: &str,
    (name, figure): (&str, impl Fn(&Row) -> Option<f64>),
    higher: bool,
    which: impl Fn(&Row) -> bool,
) -> Option<(String, f64)> {
    rows.iter()
        .filter(|r| r.mode == mode && r.peer && r.workload == workload && r.errors == 0)
        // A kTLS peer whose rows did not show the kernel's counters is not a kTLS peer.
        .filter(|r| !super::mismatched(r))
        .filter(|r| which(r) && steady(r, name, figure(r)))
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

/// A figure measured in several runs, with each run's extremes and how far apart they are:
/// "12.31 (12.30 / 12.33, 0.2%)", marked when past [`AGREEMENT_LIMIT`].
fn with_runs(r: &Row, name: &str, v: Option<f64>, digits: usize) -> String {
    let value = fmt(v, digits);
    match (r.spread.get(name), relative_spread(r, name, v)) {
        (Some(s), Some(rel)) => format!(
            "{value} ({} / {}, {:.1}%{})",
            fmt(Some(s.min), digits),
            fmt(Some(s.max), digits),
            rel * 100.0,
            if rel > AGREEMENT_LIMIT { " ⚠" } else { "" }
        ),
        _ => value,
    }
}

/// The deterministic figures of each row (CPU per GiB, per handshake, per idle connection), by
/// instruction count, with the runs beside each and whether they agree within
/// [`AGREEMENT_LIMIT`]; then the goals they are measured against.
fn costs_by_instructions(md: &mut String, run: &Results) {
    let runs = if run.repeat > 1 {
        format!(
            "{} guests ran the same build and image side by side; each figure is their median with \
             the runs' smallest and largest in brackets and how far apart they are (largest minus \
             smallest, over the median; ⚠ past {:.0}%).",
            run.repeat,
            AGREEMENT_LIMIT * 100.0
        )
    } else {
        "One guest's figures only (the other did not finish: see the run's output), so nothing \
         here says whether they repeat."
            .to_owned()
    };
    let _ = writeln!(
        md,
        "### Cost by instruction count\n\n{runs} Relay: the relay's threads and every kernel \
         thread; node: the whole guest, traffic generator and upstream included.\n"
    );
    let _ = writeln!(
        md,
        "| mode | relay | relay G instr/GiB, bulk ×1 | node G instr/GiB, bulk ×1 | relay G instr/GiB, bulk ×16 | relay M instr per full handshake | relay KiB per idle connection | relay vs crypto bound |\n\
         |---|---|---|---|---|---|---|---|"
    );
    let (mut agree, mut total, mut apart) = (0, 0, Vec::new());
    for mode in ["terminate", "reencrypt"] {
        let bound = run.crypto_bytes_per_s.map(|s| match mode {
            "terminate" => GIB / s,
            _ => 2.0 * GIB / s,
        });
        for relay in relays_of(&run.rows, mode) {
            let get = |w: &str| clean(&run.rows, mode, &relay, w);
            let mut cell = |w: &str, name: &'static str, f: fn(&Row) -> Option<f64>, div: f64| {
                let Some(r) = get(w) else {
                    return "–".to_owned();
                };
                let v = f(r).map(|x| x / div);
                // Memory is not an instruction count: shown with its runs, not counted.
                if let Some(rel) =
                    relative_spread(r, name, f(r)).filter(|_| name != "rss_per_connection_bytes")
                {
                    total += 1;
                    if rel <= AGREEMENT_LIMIT {
                        agree += 1;
                    } else {
                        apart.push(format!("{mode} {relay} {name} {:.1}%", rel * 100.0));
                    }
                }
                let mut r2 = r.clone();
                if let Some(s) = r2.spread.get_mut(name) {
                    s.min /= div;
                    s.max /= div;
                }
                with_runs(&r2, name, v, 2)
            };
            let b1 = cell(
                "bulk, 1 connection",
                "cpu_s_per_gib",
                |r| r.cpu_s_per_gib,
                1.0,
            );
            let n1 = cell(
                "bulk, 1 connection",
                "node_cpu_s_per_gib",
                |r| r.node_cpu_s_per_gib,
                1.0,
            );
            let b16 = cell(
                "bulk, 16 connections",
                "cpu_s_per_gib",
                |r| r.cpu_s_per_gib,
                1.0,
            );
            let hs = cell(
                "handshakes, full",
                "cpu_ms_per_handshake",
                |r| r.cpu_ms_per_handshake,
                1.0,
            );
            let idle = cell(
                "idle connections",
                "rss_per_connection_bytes",
                |r| r.rss_per_connection_bytes,
                1024.0,
            );
            let vs_bound = bound
                .zip(get("bulk, 1 connection").and_then(|r| r.cpu_s_per_gib))
                .map_or("–".into(), |(b, c)| format!("{:.2}×", c / b));
            let _ = writeln!(
                md,
                "| {mode} | {relay} | {b1} | {n1} | {b16} | {hs} | {idle} | {vs_bound} |"
            );
        }
    }
    md.push('\n');
    if total > 0 {
        let _ = writeln!(
            md,
            "**{agree} of {total} CPU figures measured in both runs agree within {:.0}%**{} \
             (memory per connection is not an instruction count: shown, not counted).\n",
            AGREEMENT_LIMIT * 100.0,
            if apart.is_empty() {
                String::new()
            } else {
                format!("; apart: {}", apart.join(", "))
            }
        );
    }
    goals(md, run);
}

/// The headline: tlsplice's kernel path against the best user-space peer and the best kTLS
/// peer of the same run, in the guest whose clock counts instructions (the only place where
/// both kinds of peer and the kernel path run on one CPU and a figure repeats): CPU per GiB
/// (bulk, one connection), CPU per full handshake and memory per idle connection, each with
/// its runs' spread. README's table is copied from it. None without such a run.
fn headline(runs: &[Results]) -> Option<String> {
    let run = runs
        .iter()
        .find(|r| r.simulated && r.clock == Clock::Instructions)?;
    let mut md = headline_table(&run.rows);
    let _ = writeln!(
        md,
        "\nRun: {}, {} guest{} side by side (kernel {}, QEMU/TCG with `-icount shift=0,sleep=off`: \
         1 G instr is a second of the guest's CPU), {} build{}. Below 1× tlsplice costs less. \
         ±: the runs' largest minus smallest over the median. CPU: the relay's threads and every \
         kernel thread.",
        run.date,
        run.repeat.max(1),
        if run.repeat > 1 { "s" } else { "" },
        run.kernel,
        run.build,
        if run.quick {
            " (a quick smoke run: no conclusions)"
        } else {
            ""
        }
    );
    Some(md)
}

/// [`headline`]'s table, from one run's rows.
fn headline_table(rows: &[Row]) -> String {
    type Get = fn(&Row) -> Option<f64>;
    let figures: [(&str, &str, &str, Get, f64, usize); 4] = [
        (
            "CPU per GiB, bulk",
            "bulk, 1 connection",
            "cpu_s_per_gib",
            |r| r.cpu_s_per_gib,
            1.0,
            2,
        ),
        (
            "CPU per full handshake",
            "handshakes, full",
            "cpu_ms_per_handshake",
            |r| r.cpu_ms_per_handshake,
            1.0,
            2,
        ),
        (
            "memory per idle connection",
            "idle connections",
            "rss_per_connection_bytes",
            |r| r.rss_per_connection_bytes,
            1024.0,
            1,
        ),
        // kTLS keeps a connection's record state in the kernel, not in the relay: the same
        // with the kernel's memory per connection (node-wide, the same for every relay but
        // what the path itself holds).
        (
            "memory per idle connection, with the kernel's",
            "idle connections",
            "memory_with_kernel",
            |r| Some(r.rss_per_connection_bytes? + r.kernel_bytes_per_connection?),
            1024.0,
            1,
        ),
    ];
    let unit = |name: &str| match name {
        "cpu_s_per_gib" => "G instr",
        "cpu_ms_per_handshake" => "M instr",
        _ => "KiB",
    };
    // "5.56 G instr ±0.2%": the median with how far the runs were apart, marked where two
    // runs of instruction counts should have agreed and did not.
    let shown = |r: &Row, name: &str, v: f64, div: f64, digits: usize| {
        let spread = relative_spread(r, name, Some(v)).map_or(String::new(), |s| {
            let apart = name.starts_with("cpu") && s > AGREEMENT_LIMIT;
            format!(" ±{:.1}%{}", s * 100.0, if apart { " ⚠" } else { "" })
        });
        format!("{:.digits$} {}{spread}", v / div, unit(name))
    };
    let mut md = String::from(
        "| mode | figure | tlsplice ktls | vs best user-space peer | vs best kTLS peer |\n|---|---|---|---|---|\n",
    );
    for mode in ["terminate", "reencrypt"] {
        for (what, workload, name, get, div, digits) in figures {
            let ours = clean(rows, mode, "tlsplice ktls", workload)
                .and_then(|r| get(r).filter(|v| v.is_finite()).map(|v| (r, v)));
            let steady_ours = ours.filter(|(r, v)| steady(r, name, Some(*v)));
            let against = |ktls: bool| {
                let best = best_peer_of(rows, mode, workload, (name, get), false, |r| {
                    r.ktls_expected.is_some() == ktls
                });
                match (steady_ours, best) {
                    (Some((_, o)), Some((peer, b))) if b > 0.0 => {
                        let row = find(rows, mode, &peer, workload);
                        let theirs = row.map_or(String::new(), |r| shown(r, name, b, div, digits));
                        format!("**{:.2}×** ({peer}: {theirs})", o / b)
                    }
                    (None, _) if ours.is_some() => "– (our runs spread too far)".into(),
                    _ => "–".into(),
                }
            };
            let our_cell = ours.map_or("–".into(), |(r, v)| shown(r, name, v, div, digits));
            let _ = writeln!(
                md,
                "| {mode} | {what} | {our_cell} | {} | {} |",
                against(false),
                against(true)
            );
        }
    }
    md
}

/// Functions shown per profile (the results keep a few more).
const PROFILE_LINES: usize = 10;

/// Where the instructions go: each profile's objects and its top functions, with their share
/// of the samples and, under the instruction clock, the instructions that share stands for.
fn profiles(md: &mut String, run: &Results) {
    if run.profiles.is_empty() {
        return;
    }
    let instructions = run.clock == Clock::Instructions;
    let unit = if instructions { "G instr" } else { "CPU-s" };
    let _ = writeln!(
        md,
        "### Where the instructions go (perf)\n\n`perf record -a -e cpu-clock -F 10000` while \
         the workload runs again (not while its row was counted: sampling costs instructions of \
         its own, and its interrupt handlers run in the threads it samples, so they are in the \
         shares), read for the relay's processes and the kernel's threads: the CPU the rows \
         count. A function several threads ran (tokio's workers, kworkers) is one line. {}The \
         runs' profiles are the first guest's.\n",
        if instructions {
            "On the instruction clock a sample falls every 100,000 instructions, so a share of \
             the samples is a share of the instructions; *G instr* is that share of what the \
             workload's row counted. "
        } else {
            ""
        }
    );
    for p in &run.profiles {
        let _ = writeln!(md, "#### {} · {} · {}\n", p.mode, p.relay, p.workload);
        if let Some(e) = &p.error {
            let _ = writeln!(md, "No profile: {e}\n");
            continue;
        }
        // What the row counted without perf; the profile's own count where there is no row.
        let counted = find(&run.rows, &p.mode, &p.relay, &p.workload)
            .filter(|r| r.errors == 0)
            .map_or(p.counted_cpu_s, |r| r.relay_cpu_s + r.kernel_threads_cpu_s);
        let objects: Vec<String> = p
            .objects
            .iter()
            .map(|o| format!("{} {:.1}%", o.object, o.share * 100.0))
            .collect();
        let _ = writeln!(
            md,
            "{} samples; the row counted {counted:.3} {unit} of the relay and the kernel's \
             threads. By object: {}.\n",
            p.samples,
            objects.join(", ")
        );
        let _ = writeln!(
            md,
            "| share | {unit} | object | function | threads |\n|---|---|---|---|---|"
        );
        for f in by_function(&p.functions).iter().take(PROFILE_LINES) {
            let _ = writeln!(
                md,
                "| {:.1}% | {:.3} | {} | `{}` | {} |",
                f.share * 100.0,
                f.share * counted,
                f.object,
                f.function.replace('|', "\\|").replace('`', "'"),
                f.process
            );
        }
        md.push('\n');
    }
}

/// A profile's (process, function) lines as one line per function, largest first: the share
/// summed, the threads' names (each once, kernel workers by kind) joined in `process`.
fn by_function(lines: &[super::profile::Share]) -> Vec<super::profile::Share> {
    let mut merged: Vec<super::profile::Share> = Vec::new();
    for l in lines {
        // "kworker/0:1-events" and "kworker/u4:2" are the same kind of thread.
        let process = l.process.split('/').next().unwrap_or(&l.process);
        match merged
            .iter_mut()
            .find(|m| m.object == l.object && m.function == l.function)
        {
            Some(m) => {
                m.share += l.share;
                if !m.process.split(", ").any(|p| p == process) {
                    m.process = format!("{}, {process}", m.process);
                }
            }
            None => merged.push(super::profile::Share {
                process: process.to_owned(),
                ..l.clone()
            }),
        }
    }
    merged.sort_by(|a, b| b.share.total_cmp(&a.share));
    merged
}

/// The goals for the kernel path, with the values this run measured. The figures are
/// what they are: the benchmark is not tuned to them.
fn goals(md: &mut String, run: &Results) {
    let rows = &run.rows;
    let cpu: (&str, fn(&Row) -> Option<f64>) = ("cpu_s_per_gib", |r| r.cpu_s_per_gib);
    let per_handshake: (&str, fn(&Row) -> Option<f64>) =
        ("cpu_ms_per_handshake", |r| r.cpu_ms_per_handshake);
    // A kTLS peer: one whose rows must show the kernel's counters (and did, or the run failed).
    let best = |mode: &str, w: &str, figure, ktls: bool| {
        best_peer_of(rows, mode, w, figure, false, |r| {
            r.ktls_expected.is_some() == ktls
        })
    };
    let ours = |mode: &str, w: &str, get: fn(&Row) -> Option<f64>| {
        clean(rows, mode, "tlsplice ktls", w).and_then(get)
    };
    let mut lines = Vec::new();
    let mut goal = |what: &str, mode: &str, best: Option<(String, f64)>, limit: f64| {
        let current = ours(mode, "bulk, 1 connection", |r| r.cpu_s_per_gib);
        lines.push(goal_line(what, current, best, limit));
    };
    goal(
        "reencrypt CPU/GiB ≤ 0.5× the best user-space peer",
        "reencrypt",
        best("reencrypt", "bulk, 1 connection", cpu, false),
        0.5,
    );
    goal(
        "reencrypt CPU/GiB ≤ 0.7× the best kTLS peer",
        "reencrypt",
        best("reencrypt", "bulk, 1 connection", cpu, true),
        0.7,
    );
    goal(
        "terminate CPU/GiB ≤ 0.6× the best user-space peer",
        "terminate",
        best("terminate", "bulk, 1 connection", cpu, false),
        0.6,
    );
    if let Some(speed) = run.crypto_bytes_per_s {
        for (mode, hops) in [("terminate", 1.0), ("reencrypt", 2.0)] {
            lines.push(goal_line(
                &format!("{mode} CPU/GiB within 1.5× of the crypto bound"),
                ours(mode, "bulk, 1 connection", |r| r.cpu_s_per_gib),
                Some(("crypto bound".into(), hops * GIB / speed)),
                1.5,
            ));
        }
    }
    for mode in ["terminate", "reencrypt"] {
        let peers = best_peer(rows, mode, "handshakes, full", per_handshake, false);
        lines.push(goal_line(
            &format!("{mode} handshakes per CPU-second ≥ the best peer's (CPU per handshake ≤ 1×)"),
            ours(mode, "handshakes, full", |r| r.cpu_ms_per_handshake),
            peers,
            1.0,
        ));
    }
    let _ = writeln!(
        md,
        "### Goals for the kernel path (tlsplice ktls)\n\n| goal | tlsplice ktls | against | ratio | met |\n|---|---|---|---|---|"
    );
    for l in lines {
        let _ = writeln!(md, "{l}");
    }
    md.push('\n');
}

/// One row of the goals table: ours against `against` (a name and its figure), met when the
/// ratio is at most `limit`.
fn goal_line(what: &str, ours: Option<f64>, against: Option<(String, f64)>, limit: f64) -> String {
    match (ours, against) {
        (Some(o), Some((name, b))) if b > 0.0 => {
            let r = o / b;
            format!(
                "| {what} | {o:.3} | {name}: {b:.3} | {r:.2}× | {} |",
                if r <= limit { "yes" } else { "no" }
            )
        }
        (o, a) => format!(
            "| {what} | {} | {} | – | not measured |",
            fmt(o, 3),
            a.map_or("–".into(), |(n, b)| format!("{n}: {b:.3}"))
        ),
    }
}

/// How cost grows with connections and message size, for `mode`: a table of relay CPU per GiB
/// and p99 at each point for every relay, and four line charts (returned by name) of tlsplice's
/// kernel path beside the best user-space peer and the best kTLS peer (by relay CPU per GiB,
/// bulk on one connection). Nothing when the run has no scaling points.
fn scaling(
    md: &mut String,
    run: &Results,
    mode: &str,
    relays: &[String],
    scope: &str,
    out: &Path,
) -> Result<Vec<String>> {
    let sizes = &run.sizes;
    let by_conns: Vec<(f64, String)> = sizes
        .scale_conns
        .iter()
        .map(|&c| (c as f64, super::scale_label(c, sizes.scale_size)))
        .collect();
    let by_size: Vec<(f64, String)> = sizes
        .scale_sizes
        .iter()
        .map(|&z| {
            (
                z as f64 / 1024.0,
                super::scale_label(sizes.scale_size_conns, z),
            )
        })
        .collect();
    let rows = &run.rows;
    let measured = |label: &String| rows.iter().any(|r| r.mode == mode && &r.workload == label);
    if !by_conns.iter().chain(&by_size).any(|(_, l)| measured(l)) {
        return Ok(Vec::new());
    }
    let cpu = if run.clock == Clock::Instructions {
        "G instr/GiB"
    } else {
        "CPU-s/GiB"
    };
    let _ = writeln!(
        md,
        "#### {mode}: how cost grows\n\nRequest/response, each request echoed, at a fixed offered load \
         ({:.0} KiB/s each way, at most {:.0} requests/s, for {} s per point), every connection open \
         before the relay's CPU is read (handshakes not counted); relay {cpu} over the bytes relayed \
         both ways / p99 µs (a p99 of fewer than 100 samples is about the largest). First over \
         {} KiB messages and more connections, then over {} connections and larger messages.\n",
        sizes.scale_bytes_per_s / 1024.0,
        sizes.scale_max_rate,
        sizes.scale_secs,
        sizes.scale_size >> 10,
        sizes.scale_size_conns
    );
    let header: Vec<String> = by_conns
        .iter()
        .map(|(c, _)| format!("{c} conns"))
        .chain(by_size.iter().map(|(k, _)| format!("{k} KiB")))
        .collect();
    let _ = writeln!(
        md,
        "| relay | {} |\n|---|{}",
        header.join(" | "),
        "---|".repeat(header.len())
    );
    for relay in relays {
        let cells: Vec<String> = by_conns
            .iter()
            .chain(&by_size)
            .map(|(_, label)| {
                find(rows, mode, relay, label).map_or("–".into(), |r| {
                    if r.errors > 0 {
                        "errors".into()
                    } else {
                        format!("{} / {}", fmt(r.cpu_s_per_gib, 2), fmt(r.p99_us, 0))
                    }
                })
            })
            .collect();
        let _ = writeln!(md, "| {relay} | {} |", cells.join(" | "));
    }
    md.push('\n');
    // Charted: the kernel path and the best peer of each kind among those the sweep measured.
    let bulk_cpu: (&str, fn(&Row) -> Option<f64>) = ("cpu_s_per_gib", |r| r.cpu_s_per_gib);
    let swept = |relay: &str| {
        by_conns
            .iter()
            .chain(&by_size)
            .any(|(_, label)| find(rows, mode, relay, label).is_some())
    };
    let best = |ktls: bool| {
        best_peer_of(rows, mode, "bulk, 1 connection", bulk_cpu, false, |r| {
            r.ktls_expected.is_some() == ktls && swept(&r.relay)
        })
        .map(|(name, _)| name)
    };
    let charted: Vec<String> = ["tlsplice ktls".to_owned()]
        .into_iter()
        .chain(best(true))
        .chain(best(false))
        .filter(|r| relays.contains(r))
        .collect();
    let series = |points: &[(f64, String)], get: fn(&Row) -> Option<f64>| {
        charted
            .iter()
            .map(|relay| {
                let line = points
                    .iter()
                    .map(|(x, label)| {
                        let y = find(rows, mode, relay, label)
                            .filter(|r| r.errors == 0)
                            .and_then(get)
                            .unwrap_or(f64::NAN);
                        (*x, y)
                    })
                    .collect();
                (relay.clone(), line)
            })
            .collect::<Vec<_>>()
    };
    let mut charts = Vec::new();
    for (tag, points, x_unit) in [
        ("connections", &by_conns, "connections"),
        ("size", &by_size, "message KiB"),
    ] {
        if points.is_empty() {
            continue;
        }
        for (what, unit, get) in [
            ("cpu", cpu, (|r| r.cpu_s_per_gib) as fn(&Row) -> Option<f64>),
            ("p99", "p99 µs", |r: &Row| r.p99_us),
        ] {
            let name = format!("{scope}-{mode}-scale-{what}-by-{tag}.svg");
            std::fs::write(
                out.join(&name),
                svg::lines(
                    &format!("{mode}: {what} by {tag}"),
                    x_unit,
                    unit,
                    &series(points, get),
                ),
            )?;
            charts.push(name);
        }
    }
    Ok(charts)
}

/// Full handshakes per second by tlsplice's worker threads: a line and a chart, when measured.
fn worker_threads(md: &mut String, run: &Results, scope: &str, out: &Path) -> Result<()> {
    let points: Vec<(usize, &Row)> = run
        .rows
        .iter()
        .filter_map(|r| Some((super::threads_of_label(&r.workload)?, r)))
        .collect();
    let Some((_, first)) = points.first() else {
        return Ok(());
    };
    let cells: Vec<String> = points
        .iter()
        .map(|(n, r)| {
            format!(
                "{n}: {}",
                figure(
                    r,
                    "handshakes_per_s",
                    r.handshakes_per_s.filter(|_| r.errors == 0),
                    0
                )
            )
        })
        .collect();
    let _ = writeln!(
        md,
        "### Handshakes by worker threads\n\n{} {}, full handshakes per second by `--worker-threads` \
         ({} CPUs here; the load generator and upstream share them): {}.\n",
        first.relay,
        first.mode,
        run.cpus,
        cells.join(", ")
    );
    let name = format!("{scope}-handshakes-by-worker-threads.svg");
    let line: Vec<(f64, f64)> = points
        .iter()
        .map(|(n, r)| {
            let v = r.handshakes_per_s.filter(|_| r.errors == 0);
            (*n as f64, v.unwrap_or(f64::NAN))
        })
        .collect();
    std::fs::write(
        out.join(&name),
        svg::lines(
            "full handshakes by worker threads",
            "worker threads",
            "handshakes/s",
            &[(first.relay.clone(), line)],
        ),
    )?;
    let _ = writeln!(md, "![{name}]({name})\n");
    Ok(())
}

/// Writes everything under `out`.
pub fn write(inputs: &[PathBuf], out: &Path) -> Result<()> {
    std::fs::create_dir_all(out)?;
    let runs = super::read_results(inputs)?;
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
         interval; *node* is every CPU of the machine (time less idle, /proc/uptime), traffic generator and upstream \
         included, which do the same work for every relay of a mode. On loopback the kernel's \
         receive work for a segment runs in the sender's context, so part of a relay's cost lands on \
         the generator (for sockmap, the verdict program itself): *node* is the fairer comparison, \
         *relay* the one the crypto bound applies to. **Runs**: a row measured more than once \
         (`--repeat`; `cargo xtask bench` measures host rows 3 times) shows each figure's median, \
         `±` how far the runs spread (largest minus smallest, over the median); past 20% it is \
         marked ⚠ and left out of every ratio. A row of one run has no `±`: differences of a few \
         percent there are noise.\n\n",
    );
    // A headline from an earlier run must not outlive a run that has none.
    let _ = std::fs::remove_file(out.join("headline.md"));
    if let Some(table) = headline(&runs) {
        let _ = writeln!(
            md,
            "## Headline: the kernel path against the best peers\n\n{table}"
        );
        std::fs::write(out.join("headline.md"), table)?;
    }
    for run in &runs {
        section(&mut md, run, out)?;
    }
    std::fs::write(out.join("report.md"), md)?;
    println!("bench: wrote {}", out.join("report.md").display());
    Ok(())
}

fn section(md: &mut String, run: &Results, out: &Path) -> Result<()> {
    let scope = if run.simulated { "guest" } else { "host" };
    if run.simulated && run.clock == Clock::Instructions {
        let _ = writeln!(
            md,
            "## In a QEMU/TCG guest — CPU counted in instructions\n\nKernel {}, 1 emulated CPU ({}). The guest's \
             clock follows executed instructions (QEMU `-icount shift=0,sleep=off`: one instruction is one \
             nanosecond of guest time, an idle guest skips to its next timer). **Every CPU figure in this \
             section is an instruction count**: 1 CPU-s is 10⁹ instructions (G instr), 1 CPU-ms 10⁶, counted \
             by the guest's scheduler per thread to the nanosecond, so a figure repeats from run to run \
             where a timed one on a real or emulated CPU moves. An instruction is not a cycle: compare \
             these figures **inside this section only**. Throughput and latency here are those of an \
             imaginary CPU that runs one instruction per nanosecond: shapes, not speeds. The one CPU runs \
             the traffic generator, the upstream and the relay together. {}\n",
            run.kernel,
            run.cpu,
            match run.transparent_hugepages.as_deref() {
                Some("never") => "Transparent huge pages are off for every relay (`never`): \
                                  khugepaged's work, for any process, would otherwise count \
                                  against whichever relay ran, as kernel-thread CPU (tlsplice \
                                  turns them off for itself)."
                    .to_owned(),
                Some(mode) => format!(
                    "Transparent huge pages: `{mode}`: khugepaged's work, for any process, counts \
                     against whichever relay ran, as kernel-thread CPU."
                ),
                None => String::new(),
            }
        );
        costs_by_instructions(md, run);
    } else if run.simulated {
        let _ = writeln!(
            md,
            "## In a QEMU/TCG guest — simulated (emulated CPU)\n\nKernel {}, 1 emulated CPU ({}). Every figure here comes from an emulated CPU: \
             compare ratios **inside this section only**, never with the host's figures. The one CPU runs \
             the traffic generator, the upstream and the relay together, and emulation costs differ by \
             code path (the kernel's AES-GCM, aws-lc's, OpenSSL's): read these rows as what each relay \
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
            " (quick smoke run: sizes too small and builds with debug assertions, so no conclusions)"
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
    if let Some(speed) = run.chacha_bytes_per_s {
        let _ = writeln!(
            md,
            "For CPUs without AES instructions, chacha20-poly1305 (`{} speed -evp chacha20-poly1305`, \
             16 KiB, one core): {:.0} MiB/s, {:.2} CPU-s/GiB to decrypt (no row here runs it: the load \
             generator offers AES-128-GCM).\n",
            run.crypto_openssl,
            speed / MIB,
            GIB / speed
        );
    }
    if let Some(speed) = run.crypto_bytes_per_s {
        let _ = writeln!(
            md,
            "Crypto bound (`{} speed -evp aes-128-gcm`, 16 KiB, one core): {:.0} MiB/s, i.e. {:.2} CPU-s/GiB \
             to decrypt (terminate); a decrypt + encrypt hop (reencrypt) is bounded at half: {:.0} MiB/s, {:.2} CPU-s/GiB.\n",
            run.crypto_openssl,
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
        charts.extend(scaling(md, run, mode, &relays, scope, out)?);
        for c in charts {
            let _ = writeln!(md, "![{c}]({c})");
        }
        md.push('\n');
    }
    worker_threads(md, run, scope, out)?;
    profiles(md, run);
    let known: Vec<&Row> = run
        .rows
        .iter()
        .filter(|r| r.known_failure.is_some())
        .collect();
    if !known.is_empty() {
        let _ = writeln!(
            md,
            "Known failures of peers (run, and reported with their errors):\n"
        );
        for r in known {
            let _ = writeln!(
                md,
                "- {} / {} / {}: {} (first error: {})",
                r.mode,
                r.relay,
                r.workload,
                r.known_failure.as_deref().unwrap_or(""),
                r.first_error.as_deref().unwrap_or("–")
            );
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

#[cfg(test)]
mod tests {
    use super::super::repeat::Spread;
    use super::*;

    #[test]
    fn goals_are_met_at_or_under_their_ratio() {
        let cases = [
            (
                Some(5.0),
                Some(("nginx-sid ktls", 10.0)),
                0.5,
                "0.50× | yes",
            ),
            (Some(5.1), Some(("nginx-sid ktls", 10.0)), 0.5, "0.51× | no"),
            (Some(2.0), Some(("crypto bound", 1.0)), 1.5, "2.00× | no"),
            (Some(2.0), None, 0.7, "not measured"),
            (None, Some(("haproxy-sid", 3.0)), 0.6, "not measured"),
        ];
        for (ours, against, limit, want) in cases {
            let line = goal_line("g", ours, against.map(|(n, v)| (n.to_owned(), v)), limit);
            assert!(line.contains(want), "{line}");
        }
    }

    #[test]
    fn the_headline_compares_with_the_best_steady_clean_peer_of_each_kind() {
        let ktls = Some(super::super::KtlsDirections { tx: true, rx: true });
        let bulk = |relay: &str, peer: bool, cpu: f64, min: f64, max: f64| {
            let mut r = Row {
                mode: "terminate".into(),
                relay: relay.into(),
                peer,
                workload: "bulk, 1 connection".into(),
                cpu_s_per_gib: Some(cpu),
                ..Row::default()
            };
            r.spread.insert("cpu_s_per_gib".into(), Spread { min, max });
            r
        };
        let mut rows = vec![
            bulk("tlsplice ktls", false, 5.0, 4.95, 5.05),
            bulk("nginx-sid", true, 10.0, 10.0, 10.0),
            // Cheaper, but its runs spread 50%: not a figure to compare with.
            bulk("haproxy-sid", true, 2.0, 1.5, 2.5),
            bulk("nginx-sid ktls", true, 8.0, 7.9, 8.1),
        ];
        // Cheaper, but it failed.
        let mut failed = bulk("haproxy-sid ktls", true, 1.0, 1.0, 1.0);
        failed.errors = 1;
        rows.push(failed);
        rows[3].ktls_expected = ktls;
        rows[4].ktls_expected = ktls;
        rows[0].path_observed = "ktls connections +1".into();
        rows[3].path_observed = "kTLS TlsRxSw +1, kTLS TlsTxSw +1".into();
        // Cheaper, but the kernel's counters did not show its kTLS: not a kTLS peer's figure.
        let mut quiet = bulk("nginx ktls", true, 4.0, 4.0, 4.0);
        quiet.ktls_expected = ktls;
        rows.push(quiet);
        let table = headline_table(&rows);
        let line = table
            .lines()
            .find(|l| l.starts_with("| terminate | CPU per GiB"))
            .expect("a terminate CPU line");
        assert_eq!(
            line,
            "| terminate | CPU per GiB, bulk | 5.00 G instr ±2.0% | **0.50×** (nginx-sid: 10.00 G instr ±0.0%) | **0.62×** (nginx-sid ktls: 8.00 G instr ±2.5% ⚠) |"
        );
        // No figure: dashes, not a ratio of nothing.
        assert!(table.contains("| reencrypt | CPU per full handshake | – | – | – |"));
        // Our own runs too far apart: no ratio.
        rows[0]
            .spread
            .insert("cpu_s_per_gib".into(), Spread { min: 3.0, max: 7.0 });
        assert!(headline_table(&rows).contains("– (our runs spread too far)"));
    }

    #[test]
    fn a_function_several_threads_ran_is_one_line() {
        let share = |process: &str, object: &str, function: &str, share: f64| {
            super::super::profile::Share {
                share,
                process: process.into(),
                object: object.into(),
                function: function.into(),
            }
        };
        let lines = [
            share("tokio-rt-worker", "[kernel.kallsyms]", "aes_gcm_dec", 0.30),
            share("tlsplice", "tlsplice", "relay", 0.25),
            share("kworker/0:1-eve", "[kernel.kallsyms]", "aes_gcm_dec", 0.10),
            share("tlsplice", "[kernel.kallsyms]", "aes_gcm_dec", 0.05),
            share("kworker/u4:2", "[kernel.kallsyms]", "aes_gcm_dec", 0.05),
            // The same name in another object is another function.
            share("tlsplice", "libc.so.6", "relay", 0.20),
        ];
        let merged = by_function(&lines);
        assert_eq!(merged.len(), 3);
        assert_eq!(merged[0].function, "aes_gcm_dec");
        assert!((merged[0].share - 0.50).abs() < 1e-12);
        assert_eq!(merged[0].process, "tokio-rt-worker, kworker, tlsplice");
        assert_eq!(
            (merged[1].object.as_str(), merged[1].share),
            ("tlsplice", 0.25)
        );
        assert_eq!(
            (merged[2].object.as_str(), merged[2].share),
            ("libc.so.6", 0.20)
        );
    }

    #[test]
    fn two_runs_show_both_figures_and_whether_they_agree() {
        let mut row = Row::default();
        row.spread.insert(
            "cpu_s_per_gib".into(),
            Spread {
                min: 9.92,
                max: 9.93,
            },
        );
        row.spread.insert(
            "node_cpu_s_per_gib".into(),
            Spread {
                min: 15.52,
                max: 15.88,
            },
        );
        assert_eq!(
            with_runs(&row, "cpu_s_per_gib", Some(9.925), 2),
            "9.93 (9.92 / 9.93, 0.1%)"
        );
        assert_eq!(
            with_runs(&row, "node_cpu_s_per_gib", Some(15.70), 2),
            "15.70 (15.52 / 15.88, 2.3% ⚠)"
        );
        // One run: the figure alone.
        assert_eq!(with_runs(&row, "p99_us", Some(120.0), 0), "120");
    }
}
