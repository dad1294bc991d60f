//! Where a relay's instructions go: `perf record` on every CPU while one workload runs, then
//! `perf report` over the relay's processes and the kernel's threads (the same CPU the rows
//! count). In the guest the clock follows executed instructions, so a `cpu-clock` sample is
//! taken every so many instructions and a function's share of the samples is its share of the
//! instructions.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

/// Samples a second of guest time: under the instruction clock, one every 100,000 instructions.
const SAMPLE_HZ: &str = "10000";
/// The (process, function) lines kept per profile, largest share first: enough that a
/// function several threads ran (tokio's workers, kworkers) adds up in the report.
const TOP_FUNCTIONS: usize = 40;
/// The objects (binaries, libraries, the kernel) kept per profile.
const TOP_OBJECTS: usize = 6;

/// One profile: a relay at one point of one workload.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Profile {
    pub mode: String,
    pub relay: String,
    /// The workload profiled, as its row is labelled.
    pub workload: String,
    /// CPU the relay and the kernel's threads ran while it was recorded, perf's sampling
    /// included (seconds; instructions / 10^9 under the instruction clock).
    #[serde(alias = "relay_cpu_s")]
    pub counted_cpu_s: f64,
    /// Samples in the relay's processes and the kernel's threads.
    pub samples: u64,
    /// The functions with the largest shares.
    pub functions: Vec<Share>,
    /// The objects with the largest shares (every function of each summed).
    pub objects: Vec<Share>,
    /// Why there is no profile, when there is none.
    pub error: Option<String>,
}

/// A function's (or an object's) share of a profile's samples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Share {
    /// Of the profile's samples, 0..=1.
    pub share: f64,
    /// The process (or thread) name; empty for an object's line.
    pub process: String,
    /// The binary, library or `[kernel.kallsyms]`.
    pub object: String,
    /// The function; empty for an object's line.
    pub function: String,
}

/// A running `perf record` over every CPU; stopped (SIGINT, which makes perf write its file)
/// by [`PerfRecord::stop`], killed if dropped before.
pub struct PerfRecord {
    child: super::Reaped,
    data: PathBuf,
}

impl PerfRecord {
    /// Starts recording into `data` and returns once perf has said its events are on. perf
    /// starts with them off (`-D -1`) and turns them on when told on its control FIFO, then
    /// acknowledges: it reads every process's maps first, which on an emulated CPU takes longer
    /// than a short workload.
    pub fn start(perf: &Path, data: &Path) -> Result<Self> {
        let _ = std::fs::remove_file(data);
        let control = data.with_extension("ctl");
        let ack = data.with_extension("ack");
        for fifo in [&control, &ack] {
            let _ = std::fs::remove_file(fifo);
            let made = Command::new("mkfifo").arg(fifo).status()?;
            if !made.success() {
                bail!("mkfifo {} failed: {made}", fifo.display());
            }
        }
        let child = Command::new(perf)
            .args([
                "record",
                "-a",
                "-e",
                "cpu-clock",
                "-F",
                SAMPLE_HZ,
                "-N",
                "-D",
                "-1",
            ])
            .arg(format!(
                "--control=fifo:{},{}",
                control.display(),
                ack.display()
            ))
            .arg("-o")
            .arg(data)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {} record", perf.display()))?;
        let mut recording = Self {
            child: super::Reaped(child),
            data: data.to_owned(),
        };
        // Opening a FIFO waits for the other end: on a thread, so that a perf that never gets
        // there fails the profile instead of holding the run.
        let (done, enabled) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let handshake = || -> std::io::Result<String> {
                use std::io::{Read, Write};
                let mut ctl = std::fs::OpenOptions::new().write(true).open(&control)?;
                let mut ack = std::fs::File::open(&ack)?;
                ctl.write_all(b"enable\n")?;
                let mut reply = [0u8; 16];
                let n = ack.read(&mut reply)?;
                Ok(String::from_utf8_lossy(&reply[..n]).into_owned())
            };
            let _ = done.send(handshake());
        });
        match enabled.recv_timeout(Duration::from_secs(60)) {
            Ok(Ok(reply)) if reply.starts_with("ack") => {}
            Ok(Ok(reply)) => bail!("perf record answered {reply:?} to enable"),
            Ok(Err(e)) => bail!("perf record's control FIFO: {e}"),
            Err(_) => {
                let status = recording.child.0.try_wait()?;
                // Both ends of both FIFOs, briefly: the thread's opens return, its write goes
                // into the pipe and its read sees the end, so it does not wait forever.
                for fifo in [data.with_extension("ctl"), data.with_extension("ack")] {
                    let _ = std::fs::OpenOptions::new()
                        .read(true)
                        .write(true)
                        .open(fifo);
                }
                bail!("perf record did not turn its events on in 60 s ({status:?})");
            }
        }
        Ok(recording)
    }

    /// Stops recording and returns the data file once perf has written it.
    pub fn stop(mut self) -> Result<PathBuf> {
        tlsplice_benches::signal_process(self.child.0.id(), libc::SIGINT);
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(status) = self.child.0.try_wait()? {
                // perf exits with the signal's status after writing the file on SIGINT.
                let written = std::fs::metadata(&self.data).is_ok_and(|m| m.len() > 0);
                if !written {
                    bail!("perf record ended ({status}) without its data");
                }
                return Ok(self.data.clone());
            }
            if Instant::now() > deadline {
                bail!("perf record did not stop within 120 s of SIGINT");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Reads `data` for the processes `pids` (the relay's and the kernel's threads): the top
/// functions and objects, and the samples counted.
pub fn read(perf: &Path, data: &Path, pids: &[u32]) -> Result<(u64, Vec<Share>, Vec<Share>)> {
    if pids.is_empty() {
        bail!("no processes to read the profile for");
    }
    let pid_list: Vec<String> = pids.iter().map(u32::to_string).collect();
    let out = output_within(
        Command::new(perf)
            .args(["report", "--stdio", "-q", "--no-children", "-n"])
            .args(["--sort", "comm,dso,sym", "-t", ";"])
            .arg(format!("--pid={}", pid_list.join(",")))
            .arg("-i")
            .arg(data),
        REPORT_LIMIT,
    )
    .with_context(|| format!("running {} report", perf.display()))?;
    if !out.status.success() {
        bail!(
            "perf report failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let lines = parse_report(&text);
    let samples: u64 = lines.iter().map(|l| l.1).sum();
    if samples == 0 {
        // What it did record, by process, to say why.
        let by_pid = output_within(
            Command::new(perf)
                .args([
                    "report", "--stdio", "-q", "-n", "--sort", "pid", "-t", ";", "-i",
                ])
                .arg(data),
            REPORT_LIMIT,
        )
        .map(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            text.lines().take(6).collect::<Vec<_>>().join(" | ")
        })
        .unwrap_or_default();
        bail!(
            "perf recorded no samples in the relay or the kernel's threads (pids {}); by process: {by_pid}",
            pid_list.join(",")
        );
    }
    Ok((
        samples,
        top_functions(&lines, samples),
        top_objects(&lines, samples),
    ))
}

/// How long a `perf report` may take: it reads the kernel's symbols and every binary's, on an
/// emulated CPU.
const REPORT_LIMIT: Duration = Duration::from_secs(300);

/// Runs `command` to its end and returns what it printed; past `limit` it is killed.
fn output_within(command: &mut Command, limit: Duration) -> Result<std::process::Output> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    // Read on threads: a full pipe would stop the child before it could end.
    let read = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            bytes
        })
    };
    let stdout = read(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = read(child.stderr.take().map(|p| Box::new(p) as _));
    let mut child = super::Reaped(child);
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.0.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            bail!("did not finish in {} s", limit.as_secs());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Ok(std::process::Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

/// `perf report -n -t ';' --sort comm,dso,sym` lines: (process, samples, object, function).
/// Header, blank and malformed lines are left out.
fn parse_report(text: &str) -> Vec<(String, u64, String, String)> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|line| {
            let mut fields = line.trim().splitn(5, ';');
            let _overhead = fields.next()?;
            let samples = fields.next()?.trim().parse::<u64>().ok()?;
            let process = fields.next()?.trim().to_owned();
            let object = fields.next()?.trim().to_owned();
            let symbol = fields.next()?.trim();
            // "[k] name" (kernel) or "[.] name" (user space): the object says which.
            let function = symbol
                .strip_prefix("[k] ")
                .or_else(|| symbol.strip_prefix("[.] "))
                .unwrap_or(symbol)
                .to_owned();
            Some((process, samples, object, function))
        })
        .collect()
}

fn top_functions(lines: &[(String, u64, String, String)], samples: u64) -> Vec<Share> {
    let mut shares: Vec<Share> = lines
        .iter()
        .map(|(process, n, object, function)| Share {
            share: *n as f64 / samples as f64,
            process: process.clone(),
            object: object.clone(),
            function: function.clone(),
        })
        .collect();
    shares.sort_by(|a, b| b.share.total_cmp(&a.share));
    shares.truncate(TOP_FUNCTIONS);
    shares
}

fn top_objects(lines: &[(String, u64, String, String)], samples: u64) -> Vec<Share> {
    let mut by_object: Vec<(String, u64)> = Vec::new();
    for (_, n, object, _) in lines {
        match by_object.iter_mut().find(|(o, _)| o == object) {
            Some((_, total)) => *total += n,
            None => by_object.push((object.clone(), *n)),
        }
    }
    by_object.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
    by_object
        .into_iter()
        .take(TOP_OBJECTS)
        .map(|(object, n)| Share {
            share: n as f64 / samples as f64,
            process: String::new(),
            object,
            function: String::new(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_lines_become_shares_by_function_and_by_object() {
        let text = "# To display the perf.data header info, please use --header/--header-only options.\n\
                    #\n\
                    \n\
                    50.00%;500;tlsplice;[kernel.kallsyms];[k] gcm_ghash\n\
                    30.00%;300;kworker/0:1-eve;[kernel.kallsyms];[k] aes_encrypt\n\
                    15.00%;150;tokio-runtime-w;tlsplice;[.] <tlsplice::relay as core::ops::Drop>::drop\n\
                    5.00%;50;tlsplice;libc.so.6;[.] memcpy; with a separator\n\
                    garbage line\n";
        let lines = parse_report(text);
        assert_eq!(lines.len(), 4);
        assert_eq!(
            lines[2],
            (
                "tokio-runtime-w".into(),
                150,
                "tlsplice".into(),
                "<tlsplice::relay as core::ops::Drop>::drop".into()
            )
        );
        // A separator left in a name stays in the function's name.
        assert_eq!(lines[3].3, "memcpy; with a separator");
        let samples = 1000;
        let functions = top_functions(&lines, samples);
        assert_eq!(functions[0].function, "gcm_ghash");
        assert_eq!(functions[0].share, 0.5);
        let objects = top_objects(&lines, samples);
        assert_eq!(objects[0].object, "[kernel.kallsyms]");
        assert_eq!(objects[0].share, 0.8);
        assert_eq!(objects[1].object, "tlsplice");
        assert_eq!(objects.len(), 3);
    }
}
