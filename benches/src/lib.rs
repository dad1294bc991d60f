//! Shared pieces of the benchmarks: CPU and memory accounting from /proc, percentiles, and the
//! SVG charts of the report.

pub mod svg;

/// Clock ticks per second of /proc CPU times: USER_HZ, which the kernel ABI fixes at 100.
pub const CLOCK_TICKS: f64 = 100.0;

/// The fields of /proc/<pid>/stat after the command name (which may hold spaces and parens).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// CPU seconds (user + system, every thread, live or ended) a process has used.
pub fn process_cpu_seconds(pid: u32) -> f64 {
    // utime and stime are fields 14 and 15 of the line: 11 and 12 after the name.
    stat_fields(pid).map_or(0.0, |f| {
        [11, 12]
            .iter()
            .filter_map(|&i| f.get(i).and_then(|v| v.parse::<f64>().ok()))
            .sum::<f64>()
            / CLOCK_TICKS
    })
}

/// CPU seconds (user + system) of a process's children that ended and were waited for
/// (cutime and cstime).
pub fn reaped_children_cpu_seconds(pid: u32) -> f64 {
    // cutime and cstime are fields 16 and 17 of the line: 13 and 14 after the name.
    stat_fields(pid).map_or(0.0, |f| {
        [13, 14]
            .iter()
            .filter_map(|&i| f.get(i).and_then(|v| v.parse::<f64>().ok()))
            .sum::<f64>()
            / CLOCK_TICKS
    })
}

fn all_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// `pid` and every process below it (HAProxy and nginx run workers; socat forks per connection).
pub fn process_tree(pid: u32) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = all_pids()
        .into_iter()
        .filter_map(|p| {
            let ppid = stat_fields(p)?.get(1)?.parse().ok()?;
            Some((p, ppid))
        })
        .collect();
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(
            parents
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    tree
}

/// CPU seconds of every kernel thread (kworkers, ksoftirqd, ...): sockmap redirects and parts
/// of kTLS run there, and no process is charged for them.
pub fn kernel_threads_cpu_seconds() -> f64 {
    const PF_KTHREAD: u64 = 0x0020_0000;
    all_pids()
        .into_iter()
        .filter_map(|p| {
            let f = stat_fields(p)?;
            // flags is field 9: 6 after the name.
            let flags: u64 = f.get(6)?.parse().ok()?;
            (flags & PF_KTHREAD != 0).then(|| process_cpu_seconds(p))
        })
        .sum()
}

/// Proportional set size of a process, bytes (Pss from /proc/<pid>/smaps_rollup: shared pages
/// divided among the processes that map them).
pub fn pss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Pss:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

/// The kernel's memory that grows with connections, node-wide: slab objects (sockets, their
/// inodes and dentries, epoll items, kTLS contexts) from /proc/meminfo, and TCP buffer pages
/// from /proc/net/sockstat. `None` when either cannot be read.
pub fn kernel_connection_memory_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let slab_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("Slab:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let sockstat = std::fs::read_to_string("/proc/net/sockstat").ok()?;
    // "TCP: inuse 5 orphan 0 tw 0 alloc 7 mem 1": `mem` counts pages.
    let tcp = sockstat.lines().find_map(|l| l.strip_prefix("TCP:"))?;
    let words: Vec<&str> = tcp.split_whitespace().collect();
    let pages: u64 = words
        .iter()
        .position(|w| *w == "mem")
        .and_then(|i| words.get(i + 1)?.parse().ok())?;
    Some(slab_kib * 1024 + pages * 4096)
}

/// Busy CPU seconds of the whole machine (see [`tlsplice::probe::node_busy_seconds`]).
pub fn node_busy_seconds() -> f64 {
    tlsplice::probe::node_busy_seconds().unwrap_or(0.0)
}

/// Sends `signal` to every process of the group `group` leads; a group already gone is fine.
pub fn signal_group(group: u32, signal: libc::c_int) {
    let Ok(group) = libc::pid_t::try_from(group) else {
        return;
    };
    // SAFETY: kill takes a (negated) process group id and a signal number; no memory is passed.
    unsafe { libc::kill(-group, signal) };
}

/// The value at `q` (0..=1) of sorted samples.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Raises this process's open-file limit to its hard limit (10,000 connections need more than
/// the usual 1,024 descriptors); children inherit it.
pub fn raise_open_files_limit() {
    let Some(mut limit) = nofile_limit() else {
        return;
    };
    // As root the hard limit can go up to fs.nr_open; otherwise raise the soft one to it.
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<libc::rlim_t>().ok())
        .unwrap_or(limit.rlim_max);
    let wanted = libc::rlimit {
        rlim_cur: nr_open.min(1 << 20),
        rlim_max: nr_open.min(1 << 20),
    };
    // SAFETY: setrlimit reads the struct we pass; failure (not root) leaves the limit as it was.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) } != 0 {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: as above.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
    }
}

/// The path of `program` on PATH, if it is there.
pub fn which(program: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// This process's open-file limit (soft).
pub fn open_files_limit() -> u64 {
    nofile_limit().map_or(0, |l| l.rlim_cur)
}

fn nofile_limit() -> Option<libc::rlimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct we pass and keeps no pointer.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0).then_some(limit)
}
