//! Builds the guest's initramfs: busybox, the kTLS kernel modules with their dependencies,
//! the binaries under test with every shared library they link, and an /init that loads the
//! modules, runs one command and powers off, printing its exit status.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::cmd;
use crate::kernels::GuestKernel;

/// Modules the guests load: the TLS ULP and the AEADs it offloads to, with their accelerated
/// x86 implementations. Names missing from a kernel (built in, or renamed) are skipped; each
/// module's own dependencies are added from its .modinfo.
const WANTED_MODULES: &[&str] = &[
    // Two nodes joined by a veth pair (tests/tests/policy.rs).
    "veth",
    "tls",
    "gcm",
    "ctr",
    "ghash_generic",
    "ghash_clmulni_intel",
    "aesni_intel",
    "chacha20poly1305",
    "chacha",
    "chacha_generic",
    "chacha_x86_64",
    "poly1305_generic",
    "poly1305_x86_64",
    // The network card of `cargo xtask vm --forward` (built in on some kernels).
    "virtio_pci",
    "virtio_net",
];

/// Line printed by /init before the command runs.
pub const READY_MARKER: &str = "TLSPLICE-GUEST-READY";
/// Line printed by /init with the command's exit status.
pub const EXIT_MARKER: &str = "TLSPLICE-EXIT";

/// What goes into one guest image.
#[derive(Debug, Default)]
pub struct Contents {
    files: BTreeMap<PathBuf, FileSource>,
    modules: Vec<String>,
    env: Vec<(String, String)>,
    script: String,
}

#[derive(Debug)]
enum FileSource {
    Host(PathBuf),
    Bytes(Vec<u8>),
}

impl Contents {
    /// A host executable at `guest_path`, with its shared libraries at their host paths.
    pub fn add_program(&mut self, host: &Path, guest_path: &str) -> Result<()> {
        self.files
            .insert(PathBuf::from(guest_path), FileSource::Host(host.to_owned()));
        for lib in shared_libraries(host)? {
            self.files.insert(lib.clone(), FileSource::Host(lib));
        }
        Ok(())
    }

    /// A file with the given contents. Every file of the image is written executable (see
    /// [`write`]), so a script added here can be run.
    pub fn add_bytes(&mut self, guest_path: &str, bytes: Vec<u8>) {
        self.files
            .insert(PathBuf::from(guest_path), FileSource::Bytes(bytes));
    }

    /// A host file at `guest_path`, read when the image is written (a symlink is followed).
    /// Unlike [`Contents::add_program`], no libraries are looked up: the file may belong to
    /// another root (the sid peers), whose libraries the host's `ldd` would get wrong.
    pub fn add_file(&mut self, host: &Path, guest_path: &str) {
        self.files
            .insert(PathBuf::from(guest_path), FileSource::Host(host.to_owned()));
    }

    /// An environment variable for the command.
    pub fn env(&mut self, key: &str, value: &str) {
        self.env.push((key.to_owned(), value.to_owned()));
    }

    /// The shell command the guest runs (busybox sh).
    pub fn script(&mut self, script: &str) {
        script.clone_into(&mut self.script);
    }
}

/// Libraries `ldd` lists for a dynamically linked program (none for a static one).
fn shared_libraries(program: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(program).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || text.contains("not a dynamic executable") {
        return Ok(Vec::new());
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line
                .split_whitespace()
                .next()
                .filter(|p| p.starts_with('/')),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    Ok(libs)
}

/// Reads `depends=` from a module's .modinfo strings.
fn module_depends(ko: &[u8]) -> Vec<String> {
    ko.split(|&b| b == 0)
        .filter_map(|s| s.strip_prefix(b"depends="))
        .flat_map(|d| {
            String::from_utf8_lossy(d)
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Index of module name (with '_' for '-') to its file.
fn index_modules(dir: &Path, index: &mut BTreeMap<String, PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            index_modules(&path, index)?;
        } else if let Some(name) = path.file_name().and_then(|n| n.to_str())
            && let Some(stem) = name
                .strip_suffix(".ko.xz")
                .or_else(|| name.strip_suffix(".ko.zst"))
                .or_else(|| name.strip_suffix(".ko"))
        {
            index.insert(stem.replace('-', "_"), path);
        }
    }
    Ok(())
}

fn decompress(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    if name.ends_with(".xz") {
        Ok(Command::new("xz")
            .arg("-dc")
            .arg(path)
            .output()
            .with_context(|| format!("xz -dc {name}"))?
            .stdout)
    } else if name.ends_with(".zst") {
        Ok(Command::new("zstd")
            .arg("-dc")
            .arg(path)
            .output()
            .with_context(|| format!("zstd -dc {name}"))?
            .stdout)
    } else {
        Ok(std::fs::read(path)?)
    }
}

/// Adds the wanted modules and their dependencies, in load order (dependencies first).
pub fn add_kernel_modules(contents: &mut Contents, kernel: &GuestKernel) -> Result<()> {
    let mut index = BTreeMap::new();
    index_modules(&kernel.modules.join("kernel"), &mut index)?;
    let mut loaded = BTreeSet::new();
    fn visit(
        name: &str,
        index: &BTreeMap<String, PathBuf>,
        loaded: &mut BTreeSet<String>,
        contents: &mut Contents,
    ) -> Result<()> {
        let name = name.replace('-', "_");
        if loaded.contains(&name) {
            return Ok(());
        }
        let Some(path) = index.get(&name) else {
            return Ok(()); // built in, or not in this kernel
        };
        loaded.insert(name.clone());
        let ko = decompress(path)?;
        for dep in module_depends(&ko) {
            visit(&dep, index, loaded, contents)?;
        }
        contents.add_bytes(&format!("/lib/tlsplice-modules/{name}.ko"), ko);
        contents.modules.push(name);
        Ok(())
    }
    for wanted in WANTED_MODULES {
        visit(wanted, &index, &mut loaded, contents)?;
    }
    if !loaded.contains("tls") {
        bail!(
            "kernel {} has no tls module under {}",
            kernel.release,
            kernel.modules.display()
        );
    }
    Ok(())
}

fn init_script(contents: &Contents) -> String {
    let mut s = String::from(
        "#!/bin/busybox sh\n\
         /bin/busybox mkdir -p /proc /sys /dev /tmp /run /sbin /usr/bin /usr/sbin\n\
         /bin/busybox --install -s\n\
         mount -t proc proc /proc\n\
         mount -t sysfs sysfs /sys\n\
         mount -t devtmpfs devtmpfs /dev 2>/dev/null\n\
         mount -t tmpfs tmpfs /tmp\n\
         mount -t bpf bpf /sys/fs/bpf 2>/dev/null\n\
         mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null\n\
         ip link set lo up\n",
    );
    for m in &contents.modules {
        s.push_str(&format!(
            "insmod /lib/tlsplice-modules/{m}.ko 2>/tmp/insmod.err || {{ grep -q 'File exists' /tmp/insmod.err || echo \"tlsplice-init: insmod {m}: $(cat /tmp/insmod.err)\"; }}\n"
        ));
    }
    // `cargo xtask vm --forward`: QEMU's user network, the guest at its first DHCP address.
    s.push_str("if [ -e /sys/class/net/eth0 ]; then ip link set eth0 up; ip addr add 10.0.2.15/24 dev eth0; ip route add default via 10.0.2.2; fi\n");
    for (k, v) in &contents.env {
        s.push_str(&format!("export {k}='{}'\n", v.replace('\'', "'\\''")));
    }
    s.push_str("export PATH=/usr/bin:/bin:/usr/sbin:/sbin HOME=/tmp\n");
    s.push_str(&format!("echo \"{READY_MARKER} $(uname -r)\"\n"));
    s.push_str("cd /tmp\n/bin/busybox sh /tlsplice/command\n");
    s.push_str(&format!("echo \"{EXIT_MARKER} $?\"\n"));
    s.push_str("poweroff -f\n");
    s
}

/// Writes the image as an uncompressed cpio (newc) archive: the kernel unpacks it directly.
/// Every added file gets mode 0755: programs, scripts and data alike.
pub fn write(contents: &Contents, busybox: &Path, out: &Path) -> Result<()> {
    let mut archive = CpioWriter::default();
    archive.char_device("dev/console", 5, 1);
    archive.file("init", 0o755, init_script(contents).into_bytes());
    archive.file(
        "tlsplice/command",
        0o644,
        format!("{}\n", contents.script).into_bytes(),
    );
    archive.file("bin/busybox", 0o755, std::fs::read(busybox)?);
    for (guest, source) in &contents.files {
        let bytes = match source {
            FileSource::Host(p) => {
                std::fs::read(p).with_context(|| format!("reading {}", p.display()))?
            }
            FileSource::Bytes(b) => b.clone(),
        };
        let name = guest.to_string_lossy();
        archive.file(name.trim_start_matches('/'), 0o755, bytes);
    }
    let bytes = archive.finish();
    let mut f =
        std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    f.write_all(&bytes)?;
    Ok(())
}

/// A minimal writer for the "newc" cpio format the kernel's initramfs unpacker reads
/// (Documentation/driver-api/early-userspace/buffer-format.rst).
#[derive(Default)]
struct CpioWriter {
    out: Vec<u8>,
    dirs: BTreeSet<String>,
    next_ino: u32,
}

impl CpioWriter {
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.next_ino += 1;
        let fields = [
            self.next_ino,
            mode,
            0,
            0,
            1,
            0,
            u32::try_from(data.len()).unwrap_or(u32::MAX),
            0,
            0,
            rdev.0,
            rdev.1,
            u32::try_from(name.len() + 1).unwrap_or(u32::MAX),
            0,
        ];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    fn parents(&mut self, name: &str) {
        let mut prefix = String::new();
        let parts: Vec<&str> = name.split('/').collect();
        for part in &parts[..parts.len().saturating_sub(1)] {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(part);
            if self.dirs.insert(prefix.clone()) {
                let dir = prefix.clone();
                self.entry(&dir, 0o040_755, (0, 0), &[]);
            }
        }
    }

    fn file(&mut self, name: &str, perm: u32, data: Vec<u8>) {
        self.parents(name);
        self.entry(name, 0o100_000 | perm, (0, 0), &data);
    }

    fn char_device(&mut self, name: &str, major: u32, minor: u32) {
        self.parents(name);
        self.entry(name, 0o020_600, (major, minor), &[]);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.out
    }
}

/// Makes a stripped copy of a binary (debug info only slows the guest's boot).
pub fn stripped_copy(bin: &Path, dir: &Path) -> Result<PathBuf> {
    strip(bin, dir, &[])
}

/// Makes a copy of a binary without its debug info but with its symbol table, so that a
/// profile in the guest names its functions.
pub fn copy_keeping_symbols(bin: &Path, dir: &Path) -> Result<PathBuf> {
    strip(bin, dir, &["--strip-debug"])
}

fn strip(bin: &Path, dir: &Path, how: &[&str]) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let name = bin.file_name().context("binary without a file name")?;
    let out = dir.join(name);
    cmd::output(Command::new("strip").args(how).arg("-o").arg(&out).arg(bin))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modinfo_depends_are_parsed() {
        let ko = b"\x7fELF...\0license=GPL\0depends=cryptd,crypto_simd\0vermagic=6.1\0";
        assert_eq!(module_depends(ko), vec!["cryptd", "crypto_simd"]);
        assert!(module_depends(b"\0depends=\0").is_empty());
    }

    #[test]
    fn cpio_entries_are_aligned_and_terminated() {
        let mut w = CpioWriter::default();
        w.file("a/b/c", 0o644, b"hello".to_vec());
        let out = w.finish();
        assert_eq!(out.len() % 4, 0);
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("070701"));
        for name in ["a\0", "a/b\0", "a/b/c\0", "hello", "TRAILER!!!\0"] {
            assert!(text.contains(name), "{name:?} missing");
        }
    }
}
