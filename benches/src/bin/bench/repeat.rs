//! Rows measured more than once: each figure is the median of the runs, with its smallest and
//! largest value beside it, so a reader (and the report's ratios) can tell a difference from
//! the noise between runs. Host rows moved by up to 4x between two runs of the same build.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{Results, Row};

/// A figure whose runs spread wider than this fraction of their median is flagged in the
/// report and left out of its ratios.
pub const SPREAD_LIMIT: f64 = 0.20;

/// Runs whose clock counts instructions (a guest under QEMU's icount) should give the same cost
/// figures: two that differ by more than this fraction of their median are marked.
pub const AGREEMENT_LIMIT: f64 = 0.02;

/// The smallest and largest value of one figure over a row's runs (the row holds the median).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Spread {
    pub min: f64,
    pub max: f64,
}

impl Spread {
    /// (largest - smallest) / median: 0 for runs that agree. `None` when the median is 0 or not
    /// a number (nothing to compare against).
    pub fn relative(&self, median: f64) -> Option<f64> {
        (median.is_finite() && median != 0.0).then(|| (self.max - self.min) / median.abs())
    }
}

/// A figure of a row that is the median of its runs: its name (the `spread` key) and how to
/// read and write it.
struct Figure {
    name: &'static str,
    get: fn(&Row) -> Option<f64>,
    set: fn(&mut Row, f64),
}

/// Every such figure, in the report's order (the first a row has leads, see [`combine`]).
const FIGURES: [Figure; 12] = [
    Figure {
        name: "throughput_mib_s",
        get: |r| r.throughput_mib_s,
        set: |r, v| r.throughput_mib_s = Some(v),
    },
    Figure {
        name: "cpu_s_per_gib",
        get: |r| r.cpu_s_per_gib,
        set: |r, v| r.cpu_s_per_gib = Some(v),
    },
    Figure {
        name: "node_cpu_s_per_gib",
        get: |r| r.node_cpu_s_per_gib,
        set: |r, v| r.node_cpu_s_per_gib = Some(v),
    },
    Figure {
        name: "p50_us",
        get: |r| r.p50_us,
        set: |r, v| r.p50_us = Some(v),
    },
    Figure {
        name: "p99_us",
        get: |r| r.p99_us,
        set: |r, v| r.p99_us = Some(v),
    },
    Figure {
        name: "p999_us",
        get: |r| r.p999_us,
        set: |r, v| r.p999_us = Some(v),
    },
    Figure {
        name: "handshakes_per_s",
        get: |r| r.handshakes_per_s,
        set: |r, v| r.handshakes_per_s = Some(v),
    },
    Figure {
        name: "resumed_fraction",
        get: |r| r.resumed_fraction,
        set: |r, v| r.resumed_fraction = Some(v),
    },
    Figure {
        name: "cpu_ms_per_handshake",
        get: |r| r.cpu_ms_per_handshake,
        set: |r, v| r.cpu_ms_per_handshake = Some(v),
    },
    Figure {
        name: "rss_per_connection_bytes",
        get: |r| r.rss_per_connection_bytes,
        set: |r, v| r.rss_per_connection_bytes = Some(v),
    },
    Figure {
        name: "fds_per_connection",
        get: |r| r.fds_per_connection,
        set: |r, v| r.fds_per_connection = Some(v),
    },
    Figure {
        name: "kernel_bytes_per_connection",
        get: |r| r.kernel_bytes_per_connection,
        set: |r, v| r.kernel_bytes_per_connection = Some(v),
    },
];

/// The median of `values` (the mean of the middle two for an even count), `None` for none.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

/// One row from several runs of the same (mode, relay, workload): every figure the median of
/// the runs that have it, with its spread; errors summed (the first one kept); the paths
/// observed summed; the rest (bytes, samples, latency curve) from the run whose leading figure
/// is nearest its median, so a curve drawn beside a median is one that was measured.
pub fn combine(mut runs: Vec<Row>) -> Row {
    let count = runs.len() as u32;
    if runs.len() <= 1 {
        let mut row = runs.pop().unwrap_or_default();
        row.runs = count;
        return row;
    }
    let mut medians: Vec<(&Figure, f64, Spread)> = Vec::new();
    for figure in &FIGURES {
        let values: Vec<f64> = runs
            .iter()
            .filter_map(figure.get)
            .filter(|v| v.is_finite())
            .collect();
        let Some(m) = median(&values) else { continue };
        let spread = Spread {
            min: values.iter().copied().fold(f64::INFINITY, f64::min),
            max: values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        };
        medians.push((figure, m, spread));
    }
    // The run whose leading figure is nearest its median.
    let representative = medians.first().map_or(0, |&(figure, m, _)| {
        let distance = |r: &Row| (figure.get)(r).map_or(f64::INFINITY, |v| (v - m).abs());
        (0..runs.len())
            .min_by(|&a, &b| distance(&runs[a]).total_cmp(&distance(&runs[b])))
            .unwrap_or(0)
    });
    let errors = runs.iter().map(|r| r.errors).sum();
    let first_error = runs.iter().find_map(|r| r.first_error.clone());
    let paths = sum_paths(runs.iter().map(|r| r.path_observed.as_str()));
    let mut row = runs.swap_remove(representative);
    for (figure, m, spread) in medians {
        (figure.set)(&mut row, m);
        row.spread.insert(figure.name.to_owned(), spread);
    }
    row.errors = errors;
    row.first_error = first_error;
    row.path_observed = paths;
    row.runs = count;
    row
}

/// Separate runs of the same rows (two guests booted side by side) as one result: each row
/// [`combine`]d from the runs that have it, in the first run's order (rows only a later run has
/// follow); the crypto bounds their medians; the machine, versions and skips of the first run.
/// `None` for no runs.
pub fn merge_runs(runs: Vec<Results>) -> Option<Results> {
    let count = runs.len() as u32;
    let mut runs = runs.into_iter();
    let mut merged = runs.next()?;
    let rest: Vec<Results> = runs.collect();
    let same =
        |a: &Row, b: &Row| a.mode == b.mode && a.relay == b.relay && a.workload == b.workload;
    let mut rows: Vec<Row> = Vec::new();
    let mut later: Vec<Row> = rest.iter().flat_map(|r| r.rows.iter().cloned()).collect();
    for row in std::mem::take(&mut merged.rows) {
        let mut group = vec![row];
        let (matching, others): (Vec<Row>, Vec<Row>) =
            later.into_iter().partition(|r| same(r, &group[0]));
        group.extend(matching);
        later = others;
        rows.push(combine(group));
    }
    while let Some(row) = later.first().cloned() {
        let (group, others): (Vec<Row>, Vec<Row>) = later.into_iter().partition(|r| same(r, &row));
        later = others;
        rows.push(combine(group));
    }
    merged.rows = rows;
    let bound = |get: fn(&Results) -> Option<f64>, merged: &Results| {
        let values: Vec<f64> = std::iter::once(merged)
            .chain(&rest)
            .filter_map(get)
            .collect();
        median(&values)
    };
    // What any run skipped, once.
    for skip in rest.iter().flat_map(|r| &r.skipped) {
        if !merged
            .skipped
            .iter()
            .any(|s| s.mode == skip.mode && s.relay == skip.relay)
        {
            merged.skipped.push(skip.clone());
        }
    }
    merged.crypto_bytes_per_s = bound(|r| r.crypto_bytes_per_s, &merged);
    merged.chacha_bytes_per_s = bound(|r| r.chacha_bytes_per_s, &merged);
    merged.repeat = count;
    Some(merged)
}

/// The connections per path of `observed` texts ("ktls connections +12, splice connections
/// +3"), summed by path, in the order first seen.
pub fn path_totals<'a>(observed: impl IntoIterator<Item = &'a str>) -> Vec<(String, f64)> {
    let mut totals: Vec<(String, f64)> = Vec::new();
    for text in observed {
        for part in text.split(", ").filter(|p| !p.is_empty()) {
            let (name, n) = part.rsplit_once(" +").unwrap_or((part, "0"));
            let n: f64 = n.parse().unwrap_or(0.0);
            match totals.iter_mut().find(|(k, _)| k == name) {
                Some((_, t)) => *t += n,
                None => totals.push((name.to_owned(), n)),
            }
        }
    }
    totals
}

/// `observed` texts summed by path, written as one observed text.
fn sum_paths<'a>(observed: impl IntoIterator<Item = &'a str>) -> String {
    let parts: Vec<String> = path_totals(observed)
        .into_iter()
        .map(|(k, n)| format!("{k} +{n}"))
        .collect();
    parts.join(", ")
}

/// How far a row's runs spread for `figure`, as a fraction of the median; `None` for a row of
/// one run or a figure without a spread.
pub fn relative_spread(row: &Row, figure: &str, median: Option<f64>) -> Option<f64> {
    row.spread.get(figure)?.relative(median?)
}

/// Whether `figure` of `row` is steady enough for a ratio (one run, or runs within
/// [`SPREAD_LIMIT`]).
pub fn steady(row: &Row, figure: &str, median: Option<f64>) -> bool {
    relative_spread(row, figure, median).is_none_or(|s| s <= SPREAD_LIMIT)
}

/// The spreads of a row, for its JSON: kept by figure name.
pub type Spreads = BTreeMap<String, Spread>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_empty_sets() {
        let cases: &[(&[f64], Option<f64>)] = &[
            (&[], None),
            (&[5.0], Some(5.0)),
            (&[3.0, 1.0, 2.0], Some(2.0)),
            (&[4.0, 1.0, 3.0, 2.0], Some(2.5)),
            (&[1.0, f64::NAN, 9.0, 5.0], Some(5.0)),
        ];
        for (values, want) in cases {
            assert_eq!(median(values), *want, "{values:?}");
        }
    }

    #[test]
    fn spread_is_relative_to_the_median() {
        let s = Spread {
            min: 90.0,
            max: 110.0,
        };
        assert_eq!(s.relative(100.0), Some(0.2));
        assert_eq!(s.relative(0.0), None);
        assert_eq!(s.relative(f64::NAN), None);
    }

    fn run(throughput: f64, cpu: f64, path: &str, errors: u64) -> Row {
        Row {
            throughput_mib_s: Some(throughput),
            cpu_s_per_gib: Some(cpu),
            path_observed: path.to_owned(),
            errors,
            first_error: (errors > 0).then(|| format!("error at {throughput}")),
            ..Row::default()
        }
    }

    #[test]
    fn three_runs_give_medians_spreads_and_summed_paths() {
        let row = combine(vec![
            run(520.0, 1.0, "sockmap connections +1", 0),
            run(2311.0, 0.4, "sockmap connections +1", 0),
            run(
                600.0,
                0.9,
                "sockmap connections +1, splice connections +1",
                0,
            ),
        ]);
        assert_eq!(row.runs, 3);
        assert_eq!(row.throughput_mib_s, Some(600.0));
        assert_eq!(row.cpu_s_per_gib, Some(0.9));
        let tp = row.spread["throughput_mib_s"];
        assert_eq!((tp.min, tp.max), (520.0, 2311.0));
        assert!(!steady(&row, "throughput_mib_s", row.throughput_mib_s));
        assert_eq!(
            row.path_observed,
            "sockmap connections +3, splice connections +1"
        );
        // The representative run is the median one: its path text was replaced, its other
        // fields kept.
        assert_eq!(row.errors, 0);
        assert!(!row.spread.contains_key("p99_us"));
    }

    #[test]
    fn errors_add_up_and_the_first_is_kept() {
        let row = combine(vec![
            run(100.0, 1.0, "", 0),
            run(101.0, 1.0, "", 2),
            run(102.0, 1.0, "", 1),
        ]);
        assert_eq!(row.errors, 3);
        assert_eq!(row.first_error.as_deref(), Some("error at 101"));
        assert!(steady(&row, "throughput_mib_s", row.throughput_mib_s));
    }

    fn results(rows: Vec<Row>, crypto: f64) -> Results {
        Results {
            scope: super::super::Scope::Guest,
            simulated: true,
            quick: false,
            build: "release".into(),
            date: String::new(),
            kernel: "7.2".into(),
            cpu: String::new(),
            cpus: 1,
            memory_gib: 2.0,
            versions: BTreeMap::new(),
            crypto_bytes_per_s: Some(crypto),
            chacha_bytes_per_s: None,
            crypto_openssl: "openssl".into(),
            sizes: super::super::Sizes::new(super::super::Scope::Guest, true),
            open_files_limit: 1024,
            repeat: 1,
            clock: super::super::Clock::Instructions,
            transparent_hugepages: None,
            rows,
            skipped: Vec::new(),
            profiles: Vec::new(),
        }
    }

    fn named(relay: &str, cpu: f64) -> Row {
        Row {
            mode: "terminate".into(),
            relay: relay.into(),
            workload: "bulk, 1 connection".into(),
            ..run(10.0, cpu, "", 0)
        }
    }

    #[test]
    fn two_guests_merge_row_by_row_with_both_figures_kept() {
        let merged = merge_runs(vec![
            results(vec![named("a", 10.0), named("b", 20.0)], 100.0),
            // Another order, a row the first run lacks, and one it has that this one lacks.
            results(vec![named("c", 5.0), named("a", 10.1)], 102.0),
        ])
        .unwrap();
        assert_eq!(merged.repeat, 2);
        let relays: Vec<&str> = merged.rows.iter().map(|r| r.relay.as_str()).collect();
        assert_eq!(relays, ["a", "b", "c"]);
        let a = &merged.rows[0];
        assert_eq!(a.runs, 2);
        let cpu = a.spread["cpu_s_per_gib"];
        assert_eq!((cpu.min, cpu.max), (10.0, 10.1));
        assert_eq!(merged.rows[1].runs, 1);
        assert_eq!(merged.crypto_bytes_per_s, Some(101.0));
        assert!(merge_runs(Vec::new()).is_none());
    }

    #[test]
    fn a_single_run_is_kept_as_it_is() {
        let row = combine(vec![run(7.0, 2.0, "ktls connections +4", 0)]);
        assert_eq!(row.runs, 1);
        assert_eq!(row.throughput_mib_s, Some(7.0));
        assert!(row.spread.is_empty());
        assert!(steady(&row, "throughput_mib_s", row.throughput_mib_s));
        assert_eq!(combine(Vec::new()).runs, 0);
    }
}
