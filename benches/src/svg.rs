//! Three small SVG chart kinds for the benchmark report, written by hand: a plotting crate would
//! add far more build than these few lines.

use std::fmt::Write;

const PALETTE: [&str; 8] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
];

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Horizontal bars, one per `(label, value)`; NaN values are drawn as "n/a".
pub fn bars(title: &str, unit: &str, items: &[(String, f64)]) -> String {
    let (label_w, bar_w, row_h) = (260.0, 420.0, 22.0);
    let height = 40.0 + row_h * items.len() as f64 + 10.0;
    let max = items
        .iter()
        .map(|(_, v)| *v)
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"8\" y=\"20\" font-size=\"14\" font-weight=\"bold\">{t} ({u})</text>\n",
        w = label_w + bar_w + 90.0,
        t = escape(title),
        u = escape(unit)
    );
    for (i, (label, value)) in items.iter().enumerate() {
        let y = 34.0 + row_h * i as f64;
        let _ = writeln!(
            s,
            "<text x=\"{x}\" y=\"{ty}\" text-anchor=\"end\">{l}</text>",
            x = label_w - 6.0,
            ty = y + 14.0,
            l = escape(label)
        );
        if value.is_finite() && max > 0.0 {
            let w = (value / max * bar_w).max(1.0);
            let _ = writeln!(
                s,
                "<rect x=\"{label_w}\" y=\"{y}\" width=\"{w:.1}\" height=\"{h}\" fill=\"{c}\"/>\n\
                 <text x=\"{tx:.1}\" y=\"{ty}\">{v}</text>",
                h = row_h - 6.0,
                c = PALETTE[i % PALETTE.len()],
                tx = label_w + w + 4.0,
                ty = y + 13.0,
                v = short(*value)
            );
        } else {
            let _ = writeln!(
                s,
                "<text x=\"{x}\" y=\"{ty}\" fill=\"#777\">n/a</text>",
                x = label_w + 4.0,
                ty = y + 13.0
            );
        }
    }
    s.push_str("</svg>\n");
    s
}

/// Latency distributions: x is latency (log scale, microseconds), y is the percentile on a
/// "nines" scale (50%, 90%, 99%, 99.9%), so the tail is as wide as the body.
pub fn latency_cdf(title: &str, series: &[(String, Vec<[f64; 2]>)]) -> String {
    let (left, top, w, h) = (60.0, 30.0, 560.0, 260.0);
    let points: Vec<f64> = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|[x, _]| *x))
        .filter(|x| x.is_finite() && *x > 0.0)
        .collect();
    if points.is_empty() {
        return format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"400\" height=\"40\" font-family=\"sans-serif\" font-size=\"12\">\
             <text x=\"8\" y=\"24\">{}: no samples</text></svg>\n",
            escape(title)
        );
    }
    let lo = points
        .iter()
        .copied()
        .fold(f64::INFINITY, f64::min)
        .max(1.0);
    let hi = points.iter().copied().fold(0.0f64, f64::max).max(lo * 10.0);
    let (llo, lhi) = (lo.log10().floor(), hi.log10().ceil());
    let x_of = |us: f64| left + (us.max(lo).log10() - llo) / (lhi - llo) * w;
    let nines = |p: f64| -(1.0 - p).max(1e-4).log10();
    let y_of = |p: f64| top + h - nines(p) / 3.0 * h;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{sw}\" height=\"{sh}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"8\" y=\"18\" font-size=\"14\" font-weight=\"bold\">{t}</text>\n\
         <rect x=\"{left}\" y=\"{top}\" width=\"{w}\" height=\"{h}\" fill=\"none\" stroke=\"#999\"/>\n",
        sw = left + w + 200.0,
        sh = top + h + 40.0,
        t = escape(title)
    );
    let decades = (lhi - llo).clamp(1.0, 12.0) as i32;
    for step in 0..=decades {
        let decade = llo + f64::from(step);
        let x = x_of(10f64.powf(decade));
        let _ = writeln!(
            s,
            "<line x1=\"{x:.1}\" y1=\"{top}\" x2=\"{x:.1}\" y2=\"{b}\" stroke=\"#eee\"/>\
             <text x=\"{x:.1}\" y=\"{ty}\" text-anchor=\"middle\">{v} us</text>",
            b = top + h,
            ty = top + h + 16.0,
            v = short(10f64.powf(decade))
        );
    }
    for (p, label) in [(0.5, "p50"), (0.9, "p90"), (0.99, "p99"), (0.999, "p99.9")] {
        let y = y_of(p);
        let _ = writeln!(
            s,
            "<line x1=\"{left}\" y1=\"{y:.1}\" x2=\"{r}\" y2=\"{y:.1}\" stroke=\"#eee\"/>\
             <text x=\"{lx}\" y=\"{ty:.1}\" text-anchor=\"end\">{label}</text>",
            r = left + w,
            lx = left - 4.0,
            ty = y + 4.0
        );
    }
    for (i, (name, pts)) in series.iter().enumerate() {
        let placed: Vec<(f64, f64)> = pts
            .iter()
            .filter(|[x, p]| x.is_finite() && *p >= 0.5)
            .map(|[x, p]| (x_of(*x), y_of(*p)))
            .collect();
        line_with_legend(&mut s, &placed, (left + w + 10.0, top), i, name);
    }
    s.push_str("</svg>\n");
    s
}

/// Lines through points, one per `(name, points)`: x on a log scale (connections, message
/// sizes), y linear from 0. Points that are not finite are left out of their line.
pub fn lines(
    title: &str,
    x_unit: &str,
    y_unit: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> String {
    let (left, top, w, h) = (70.0, 30.0, 520.0, 240.0);
    let finite: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|(_, p)| p.iter().copied())
        .filter(|(x, y)| x.is_finite() && *x > 0.0 && y.is_finite())
        .collect();
    if finite.is_empty() {
        return format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"400\" height=\"40\" font-family=\"sans-serif\" font-size=\"12\">\
             <text x=\"8\" y=\"24\">{}: no points</text></svg>\n",
            escape(title)
        );
    }
    let x_lo = finite.iter().map(|p| p.0).fold(f64::INFINITY, f64::min);
    let x_hi = finite
        .iter()
        .map(|p| p.0)
        .fold(0.0f64, f64::max)
        .max(x_lo * 2.0);
    let y_hi = finite
        .iter()
        .map(|p| p.1)
        .fold(0.0f64, f64::max)
        .max(f64::MIN_POSITIVE);
    let x_of = |x: f64| left + (x / x_lo).log10() / (x_hi / x_lo).log10() * w;
    let y_of = |y: f64| top + h - y / (y_hi * 1.1) * h;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{sw}\" height=\"{sh}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"8\" y=\"18\" font-size=\"14\" font-weight=\"bold\">{t} ({yu})</text>\n\
         <rect x=\"{left}\" y=\"{top}\" width=\"{w}\" height=\"{h}\" fill=\"none\" stroke=\"#999\"/>\n",
        sw = left + w + 200.0,
        sh = top + h + 40.0,
        t = escape(title),
        yu = escape(y_unit)
    );
    // A tick under every x value measured.
    let mut xs: Vec<f64> = finite.iter().map(|p| p.0).collect();
    xs.sort_by(f64::total_cmp);
    xs.dedup();
    for x in xs {
        let _ = writeln!(
            s,
            "<line x1=\"{px:.1}\" y1=\"{top}\" x2=\"{px:.1}\" y2=\"{b}\" stroke=\"#eee\"/>\
             <text x=\"{px:.1}\" y=\"{ty}\" text-anchor=\"middle\">{v}</text>",
            px = x_of(x),
            b = top + h,
            ty = top + h + 16.0,
            v = short(x)
        );
    }
    let _ = writeln!(
        s,
        "<text x=\"{x}\" y=\"{y}\" text-anchor=\"middle\">{u}</text>",
        x = left + w / 2.0,
        y = top + h + 32.0,
        u = escape(x_unit)
    );
    for step in 0..=4 {
        let y = y_hi * 1.1 * f64::from(step) / 4.0;
        let py = y_of(y);
        let _ = writeln!(
            s,
            "<line x1=\"{left}\" y1=\"{py:.1}\" x2=\"{r}\" y2=\"{py:.1}\" stroke=\"#eee\"/>\
             <text x=\"{lx}\" y=\"{ty:.1}\" text-anchor=\"end\">{v}</text>",
            r = left + w,
            lx = left - 4.0,
            ty = py + 4.0,
            v = short(y)
        );
    }
    for (i, (name, pts)) in series.iter().enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        let placed: Vec<(f64, f64)> = pts
            .iter()
            .filter(|(x, y)| x.is_finite() && *x > 0.0 && y.is_finite())
            .map(|&(x, y)| (x_of(x), y_of(y)))
            .collect();
        line_with_legend(&mut s, &placed, (left + w + 10.0, top), i, name);
        for (x, y) in placed {
            let _ = writeln!(
                s,
                "<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"2.5\" fill=\"{colour}\"/>"
            );
        }
    }
    s.push_str("</svg>\n");
    s
}

/// Series `i`'s line through `placed` (chart coordinates) in its colour, and its name in the
/// legend whose top left is `legend`.
fn line_with_legend(
    s: &mut String,
    placed: &[(f64, f64)],
    legend: (f64, f64),
    i: usize,
    name: &str,
) {
    let colour = PALETTE[i % PALETTE.len()];
    let path: Vec<String> = placed
        .iter()
        .map(|(x, y)| format!("{x:.1},{y:.1}"))
        .collect();
    let _ = writeln!(
        s,
        "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"1.5\" points=\"{}\"/>\
         <text x=\"{lx}\" y=\"{ly}\" fill=\"{colour}\">{n}</text>",
        path.join(" "),
        lx = legend.0,
        ly = legend.1 + 14.0 + 16.0 * i as f64,
        n = escape(name)
    );
}

/// A number in a few significant digits.
pub fn short(v: f64) -> String {
    if !v.is_finite() {
        "n/a".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_well_formed_and_show_missing_values() {
        let b = bars("t", "MiB/s", &[("a".into(), 10.0), ("b<".into(), f64::NAN)]);
        assert!(b.starts_with("<svg") && b.trim_end().ends_with("</svg>"));
        assert!(b.contains("n/a") && b.contains("b&lt;"));
        let c = latency_cdf("l", &[("x".into(), vec![[10.0, 0.5], [100.0, 0.999]])]);
        assert!(c.contains("<polyline") && c.contains("p99.9"));
        let empty = latency_cdf("l", &[("x".into(), vec![[f64::NAN, 0.5]])]);
        assert!(empty.contains("no samples"));
        let l = lines(
            "cost",
            "connections",
            "G instr/GiB",
            &[
                (
                    "a".into(),
                    vec![(1.0, 5.0), (16.0, 6.0), (1000.0, f64::NAN)],
                ),
                ("b".into(), vec![(1.0, 7.0), (1000.0, 9.0)]),
            ],
        );
        assert!(l.starts_with("<svg") && l.trim_end().ends_with("</svg>"));
        // Two lines, four points drawn (the NaN left out), ticks at 1, 16 and 1000.
        assert_eq!(l.matches("<polyline").count(), 2);
        assert_eq!(l.matches("<circle").count(), 4);
        assert!(l.contains(">1000<") && l.contains(">16.0<"));
        assert!(lines("e", "x", "y", &[("a".into(), vec![])]).contains("no points"));
    }
}
