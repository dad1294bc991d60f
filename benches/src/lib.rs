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

/// Every kernel thread (kworkers, ksoftirqd, ...): sockmap redirects and parts of kTLS run
/// there, and no process is charged for them.
pub fn kernel_threads() -> Vec<u32> {
    const PF_KTHREAD: u64 = 0x0020_0000;
    all_pids()
        .into_iter()
        .filter(|&p| {
            stat_fields(p)
                // flags is field 9: 6 after the name.
                .and_then(|f| f.get(6)?.parse::<u64>().ok())
                .is_some_and(|flags| flags & PF_KTHREAD != 0)
        })
        .collect()
}

/// The CPU time each thread of some processes has run, read at one moment, to the nanosecond,
/// and each process's own total.
///
/// From `/proc/<pid>/task/<tid>/schedstat`, the scheduler's own run time: utime and stime in
/// /proc/<pid>/stat come in 10 ms units, too coarse for a short row and, in a guest whose clock
/// counts instructions, for a figure that must repeat within 2%. A thread's figure is brought up
/// to date when it is switched out or at a timer tick, so a reading is taken when the relay is
/// idle (after its workload). A thread that ends between two readings takes its figure with it,
/// but not out of its process's total (/proc/<pid>/stat, every thread, live or ended, in ticks):
/// where that total grew by more than its ticks can blur, the difference is threads that ended
/// (stunnel runs a thread per connection) and is counted. A process whose threads cannot be
/// read (no schedstat in the kernel) is read from its total alone.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CpuReading {
    processes: std::collections::BTreeMap<u32, ProcessTimes>,
}

/// One process in a [`CpuReading`].
#[derive(Debug, Clone, Default, PartialEq)]
struct ProcessTimes {
    /// Run time by thread id, nanoseconds.
    threads: std::collections::BTreeMap<u32, u64>,
    /// The process's total (utime + stime, threads that ended included), nanoseconds, in
    /// whole 10 ms ticks.
    total_ns: u64,
}

/// How far a process's total (two fields, each cut to a tick, read twice) may be from its
/// threads' sum without any thread having ended.
const TICK_BLUR_NS: u64 = 4 * 10_000_000;

impl CpuReading {
    /// Reads every thread of `pids`.
    pub fn of(pids: impl IntoIterator<Item = u32>) -> Self {
        let mut processes = std::collections::BTreeMap::new();
        for pid in pids {
            let threads: std::collections::BTreeMap<u32, u64> =
                thread_run_times(pid).into_iter().collect();
            if threads.is_empty() && std::path::Path::new(&format!("/proc/{pid}")).exists() {
                static SAID: std::sync::Once = std::sync::Once::new();
                SAID.call_once(|| {
                    eprintln!(
                        "bench: no schedstat for pid {pid}: CPU read in 10 ms ticks from /proc/<pid>/stat"
                    );
                });
            }
            let total_ns = (process_cpu_seconds(pid) * 1e9).round() as u64;
            processes.insert(pid, ProcessTimes { threads, total_ns });
        }
        Self { processes }
    }

    /// CPU seconds run since `before` by the processes read now: their threads read both times
    /// or started since, and what threads that ended ran (see [`CpuReading`]).
    pub fn seconds_since(&self, before: &CpuReading) -> f64 {
        let mut ns = 0;
        for (pid, now) in &self.processes {
            let then = before.processes.get(pid);
            let by_total = now.total_ns.saturating_sub(then.map_or(0, |t| t.total_ns));
            if now.threads.is_empty() {
                ns += by_total;
                continue;
            }
            let by_threads: u64 = now
                .threads
                .iter()
                .map(|(tid, &run)| {
                    run.saturating_sub(then.and_then(|t| t.threads.get(tid)).copied().unwrap_or(0))
                })
                .sum();
            ns += if by_total > by_threads + TICK_BLUR_NS {
                by_total
            } else {
                by_threads
            };
        }
        ns as f64 / 1e9
    }
}

/// Run time in nanoseconds of each thread of `pid` (the first field of schedstat).
fn thread_run_times(pid: u32) -> Vec<(u32, u64)> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(|t| {
            let t = t.ok()?;
            let tid: u32 = t.file_name().to_str()?.parse().ok()?;
            let text = std::fs::read_to_string(t.path().join("schedstat")).ok()?;
            Some((tid, parse_schedstat(&text)?))
        })
        .collect()
}

/// The run time (nanoseconds) in a schedstat line: "<run ns> <wait ns> <timeslices>".
fn parse_schedstat(text: &str) -> Option<u64> {
    text.split_whitespace().next()?.parse().ok()
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

/// Busy CPU seconds of the whole machine so far: every CPU's time since boot less its idle time
/// (/proc/uptime, in hundredths of a second). The kernel measures idle time as CPUs go idle and
/// wake, where the busy fields of /proc/stat are sampled at timer ticks: the same resolution, no
/// sampling error. NaN when the CPUs cannot be counted.
pub fn node_busy_seconds() -> f64 {
    let cpus = std::fs::read_to_string("/proc/stat")
        .map(|s| {
            s.lines()
                .filter(|l| l.starts_with("cpu") && !l.starts_with("cpu "))
                .count()
        })
        .unwrap_or(0);
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|u| parse_uptime(&u))
        .filter(|_| cpus > 0)
        .map_or(f64::NAN, |(up, idle)| up * cpus as f64 - idle)
}

/// (seconds since boot, idle seconds summed over CPUs) from /proc/uptime.
fn parse_uptime(text: &str) -> Option<(f64, f64)> {
    let mut f = text.split_whitespace().map(str::parse::<f64>);
    Some((f.next()?.ok()?, f.next()?.ok()?))
}

/// Sends `signal` to every process of the group `group` leads; a group already gone is fine.
pub fn signal_group(group: u32, signal: libc::c_int) {
    let Ok(group) = libc::pid_t::try_from(group) else {
        return;
    };
    // SAFETY: kill takes a (negated) process group id and a signal number; no memory is passed.
    unsafe { libc::kill(-group, signal) };
}

/// Sends `signal` to the process `pid`; one already gone is fine.
pub fn signal_process(pid: u32, signal: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill takes a process id and a signal number; no memory is passed.
    unsafe { libc::kill(pid, signal) };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uptime_is_two_figures() {
        assert_eq!(
            parse_uptime("12023.45 23511.02\n"),
            Some((12023.45, 23511.02))
        );
        assert_eq!(parse_uptime("12023.45"), None);
    }

    #[test]
    fn schedstat_run_time_is_its_first_field() {
        assert_eq!(parse_schedstat("97292 80790 2\n"), Some(97_292));
        assert_eq!(parse_schedstat(""), None);
        assert_eq!(parse_schedstat("x 1 2"), None);
    }

    /// (pid, its threads' (tid, run ns), its total ns).
    type Process<'a> = (u32, &'a [(u32, u64)], u64);

    fn reading(processes: &[Process]) -> CpuReading {
        CpuReading {
            processes: processes
                .iter()
                .map(|&(pid, threads, total_ns)| {
                    let threads = threads.iter().copied().collect();
                    (pid, ProcessTimes { threads, total_ns })
                })
                .collect(),
        }
    }

    #[test]
    fn cpu_since_counts_threads_by_run_time_and_ended_ones_by_the_process_total() {
        const MS: u64 = 1_000_000;
        let before = reading(&[(1, &[(1, 1_000 * MS), (2, 500 * MS)], 1_500 * MS)]);
        let cases: [(&str, CpuReading, f64); 5] = [
            (
                "the same threads: their run times, not the coarse total",
                reading(&[(1, &[(1, 1_250 * MS), (2, 600 * MS)], 1_860 * MS)]),
                0.35,
            ),
            (
                "thread 3 started since",
                reading(&[(
                    1,
                    &[(1, 1_250 * MS), (2, 500 * MS), (3, 100 * MS)],
                    1_850 * MS,
                )]),
                0.35,
            ),
            (
                "threads that ended ran 2 s: only the total has it",
                reading(&[(1, &[(1, 1_250 * MS), (2, 600 * MS)], 3_850 * MS)]),
                2.35,
            ),
            (
                "a process started since, no schedstat: its total",
                reading(&[
                    (1, &[(1, 1_000 * MS), (2, 500 * MS)], 1_500 * MS),
                    (9, &[], 70 * MS),
                ]),
                0.07,
            ),
            (
                "a process read before and gone now: nothing",
                reading(&[]),
                0.0,
            ),
        ];
        for (what, after, want) in cases {
            let got = after.seconds_since(&before);
            assert!((got - want).abs() < 1e-9, "{what}: {got} != {want}");
        }
        assert_eq!(before.seconds_since(&before), 0.0);
    }

    #[test]
    fn this_process_has_run() {
        let me = std::process::id();
        let first = CpuReading::of([me]);
        let start = std::time::Instant::now();
        let mut x = 0u64;
        // Until this thread has run 10 ms (on a busy machine that takes longer than 10 ms), or
        // give up after 20 s.
        loop {
            let spin = std::time::Instant::now();
            while spin.elapsed() < std::time::Duration::from_millis(5) {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(1));
            }
            // A running thread's figure is brought up to date when it is switched out.
            std::thread::sleep(std::time::Duration::from_millis(1));
            if CpuReading::of([me]).seconds_since(&first) > 0.01 {
                break;
            }
            assert!(
                start.elapsed() < std::time::Duration::from_secs(20),
                "20 s and this thread's schedstat has not moved 10 ms"
            );
        }
    }
}
