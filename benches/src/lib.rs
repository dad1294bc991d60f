//! Shared pieces of the benchmarks: CPU accounting for a process and for the whole node.

/// Clock ticks per second of /proc CPU times: USER_HZ, which the kernel ABI fixes at 100.
pub fn clock_ticks() -> f64 {
    100.0
}

/// CPU seconds (user + system) a process has used, from /proc/<pid>/stat.
pub fn process_cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line: 12 and 13 after the name.
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|f| f.parse::<f64>().ok()))
        .sum();
    ticks / clock_ticks()
}

/// Busy CPU seconds of the whole node (see [`tlsplice::probe::node_busy_seconds`]).
pub fn node_busy_seconds() -> f64 {
    tlsplice::probe::node_busy_seconds().unwrap_or(0.0)
}

/// The value at `q` (0..=1) of sorted samples.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}
