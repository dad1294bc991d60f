//! The guest kernel matrix: Debian cloud kernels fetched with apt, unpacked into the cache.
//!
//! Each line names a Debian suite and a meta package; the newest image package it depends on is
//! resolved at run time. apt runs against private state directories (the system's source lists
//! are left alone), reusing the archive addresses the system is already configured with.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};

use crate::cmd::{self, cache_dir};

/// Which Debian archive a suite lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Archive {
    /// The main archive (bookworm, sid, ...).
    Main,
    /// The security archive (bookworm-security).
    Security,
}

/// One kernel of the matrix.
#[derive(Debug)]
pub struct KernelLine {
    /// Short name used on the command line.
    pub name: &'static str,
    /// Debian suites searched, with their archives; the highest version wins.
    pub suites: &'static [(Archive, &'static str)],
    /// Meta package whose dependency is the newest image of that line.
    pub meta: &'static str,
}

/// The guest kernels: the oldest supported LTS, the current LTS and the newest (TLS 1.3 rekey).
pub const MATRIX: [KernelLine; 3] = [
    KernelLine {
        name: "6.1",
        // Point releases lag: the newest 6.1 build is usually in bookworm-security.
        suites: &[
            (Archive::Main, "bookworm"),
            (Archive::Security, "bookworm-security"),
        ],
        meta: "linux-image-cloud-amd64",
    },
    KernelLine {
        name: "6.12",
        suites: &[(Archive::Security, "bookworm-security")],
        meta: "linux-image-6.12-cloud-amd64",
    },
    KernelLine {
        name: "sid",
        suites: &[(Archive::Main, "sid")],
        meta: "linux-image-cloud-amd64",
    },
];

/// Looks a kernel line up by name.
pub fn line(name: &str) -> Result<&'static KernelLine> {
    MATRIX.iter().find(|l| l.name == name).with_context(|| {
        let names: Vec<&str> = MATRIX.iter().map(|l| l.name).collect();
        format!(
            "unknown kernel {name:?}; the matrix has {}",
            names.join(", ")
        )
    })
}

/// An unpacked guest kernel.
#[derive(Debug, Clone)]
pub struct GuestKernel {
    /// `uname -r` inside the guest.
    pub release: String,
    /// The bootable image.
    pub vmlinuz: PathBuf,
    /// `lib/modules/<release>` of the unpacked packages.
    pub modules: PathBuf,
}

impl GuestKernel {
    /// (major, minor) of the release.
    pub fn version(&self) -> (u32, u32) {
        parse_version(&self.release)
    }
}

/// (major, minor) of a kernel release string; (0, 0) when it has none.
pub fn parse_version(release: &str) -> (u32, u32) {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let minor = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    (major, minor)
}

/// How long a resolved download (a kernel, the sid peers) is used before apt is asked for a
/// newer one.
const MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);

/// Whether the stamp written after a download exists and is younger than [`MAX_AGE`].
pub(crate) fn is_fresh(stamp: &Path) -> bool {
    std::fs::metadata(stamp)
        .ok()
        .and_then(|meta| meta.modified().ok())
        .and_then(|m| SystemTime::now().duration_since(m).ok())
        .is_some_and(|age| age < MAX_AGE)
}

/// Returns the kernel for `line`, downloading and unpacking it when the cache has none (or an
/// old one, or `refresh`).
pub fn fetch(line: &KernelLine, refresh: bool) -> Result<GuestKernel> {
    let dir = cache_dir().join("kernels").join(line.name);
    let stamp = dir.join("resolved");
    if !refresh
        && is_fresh(&stamp)
        && let Ok(kernel) = locate(&dir.join("root"))
    {
        return Ok(kernel);
    }
    let suites: Vec<&str> = line.suites.iter().map(|s| s.1).collect();
    println!(
        "kernels: resolving the newest {} kernel in {}",
        line.name,
        suites.join(" ")
    );
    let apt = AptState::new(&dir, line.suites)?;
    apt.update()?;
    let image = apt.resolve_image(line.meta)?;
    let mut packages = vec![image.clone()];
    // Newer kernels split the image package into linux-binary-* and linux-modules-*.
    let version = image.trim_start_matches("linux-image-");
    for dep in apt.depends(&image)? {
        if (dep.starts_with("linux-binary-") || dep.starts_with("linux-modules-"))
            && dep.contains(version)
        {
            packages.push(dep);
        }
    }
    let debs = dir.join("debs");
    let _ = std::fs::remove_dir_all(&debs);
    std::fs::create_dir_all(&debs)?;
    println!("kernels: downloading {}", packages.join(" "));
    apt.download(&packages, &debs)?;
    let root = dir.join("root");
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root)?;
    for entry in std::fs::read_dir(&debs)? {
        let deb = entry?.path();
        if deb.extension().is_some_and(|e| e == "deb") {
            cmd::output(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
        }
    }
    // The .debs are unpacked; drop them to keep the cache small.
    let _ = std::fs::remove_dir_all(&debs);
    let kernel = locate(&root)?;
    std::fs::write(&stamp, format!("{image}\n"))?;
    println!("kernels: {} is {}", line.name, kernel.release);
    Ok(kernel)
}

/// Finds the image and modules in an unpacked tree (bookworm: boot/vmlinuz-*, lib/modules;
/// newer: usr/lib/modules/<release>/vmlinuz).
fn locate(root: &Path) -> Result<GuestKernel> {
    for modules_root in [root.join("usr/lib/modules"), root.join("lib/modules")] {
        let Ok(entries) = std::fs::read_dir(&modules_root) else {
            continue;
        };
        for entry in entries {
            let modules = entry?.path();
            let release = modules
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            for vmlinuz in [
                modules.join("vmlinuz"),
                root.join("boot").join(format!("vmlinuz-{release}")),
            ] {
                if vmlinuz.is_file() {
                    return Ok(GuestKernel {
                        release,
                        vmlinuz,
                        modules,
                    });
                }
            }
        }
    }
    bail!("no kernel image and modules found under {}", root.display())
}

/// A private apt configuration (sources, lists, cache under `<dir>/apt`) for some suites' main
/// components: the system's own apt state and sources are only read, never changed.
pub(crate) struct AptState {
    options: Vec<String>,
}

impl AptState {
    /// The state under `dir` for `suites`, each in its archive.
    pub(crate) fn new(dir: &Path, suites: &[(Archive, &str)]) -> Result<Self> {
        let state = dir.join("apt");
        for sub in ["lists/partial", "cache/archives/partial"] {
            std::fs::create_dir_all(state.join(sub))?;
        }
        let mut list = String::new();
        for (archive, suite) in suites {
            let uri = archive_uri(*archive)?;
            list.push_str(&format!(
                "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {uri} {suite} main\n"
            ));
        }
        let sources = state.join("sources.list");
        std::fs::write(&sources, list)?;
        let options = vec![
            format!("Dir::Etc::SourceList={}", sources.display()),
            "Dir::Etc::SourceParts=-".to_owned(),
            format!("Dir::State::Lists={}", state.join("lists").display()),
            format!("Dir::Cache={}", state.join("cache").display()),
            // Downloads land in our cache directory, which the _apt user cannot write.
            "APT::Sandbox::User=root".to_owned(),
        ];
        Ok(Self { options })
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        for o in &self.options {
            c.arg("-o").arg(o);
        }
        c
    }

    /// Downloads the suites' package lists.
    pub(crate) fn update(&self) -> Result<()> {
        cmd::output(self.command("apt-get").args(["-qq", "update"])).map(|_| ())
    }

    /// Names of the packages `package` depends on.
    fn depends(&self, package: &str) -> Result<Vec<String>> {
        let out = cmd::output(self.command("apt-cache").args(["depends", package]))?;
        Ok(out
            .lines()
            .filter_map(|l| l.trim().strip_prefix("Depends:"))
            .map(|d| d.trim().trim_matches(['<', '>']).to_owned())
            .collect())
    }

    /// The Section of `package`'s candidate version (`libs` for a shared library package);
    /// none for a name no version of which can be downloaded, such as a virtual package.
    pub(crate) fn section(&self, package: &str) -> Option<String> {
        let out =
            cmd::output(
                self.command("apt-cache")
                    .args(["show", "--no-all-versions", package]),
            )
            .ok()?;
        out.lines()
            .find_map(|l| l.strip_prefix("Section:"))
            .map(|s| s.trim().to_owned())
    }

    /// The concrete `linux-image-<version>` package the meta package points to.
    fn resolve_image(&self, meta: &str) -> Result<String> {
        self.depends(meta)?
            .into_iter()
            .find(|d| {
                d.strip_prefix("linux-image-")
                    .is_some_and(|v| v.starts_with(|c: char| c.is_ascii_digit()))
            })
            .with_context(|| format!("{meta} depends on no linux-image-<version> package"))
    }

    /// Downloads the packages' .debs into `into` (nothing is installed). A name may carry a
    /// suite (`haproxy/experimental`) or a version (`haproxy=3.4.1-1`).
    pub(crate) fn download(&self, packages: &[String], into: &Path) -> Result<()> {
        cmd::output(
            self.command("apt-get")
                .args(["-qq", "download"])
                .args(packages)
                .current_dir(into),
        )
        .map(|_| ())
    }
}

/// The archive address this machine's apt is configured with, so no host name is hard-coded.
fn archive_uri(archive: Archive) -> Result<String> {
    let mut uris = BTreeSet::new();
    let mut texts = Vec::new();
    for path in ["/etc/apt/sources.list"] {
        if let Ok(t) = std::fs::read_to_string(path) {
            texts.push(t);
        }
    }
    if let Ok(entries) = std::fs::read_dir("/etc/apt/sources.list.d") {
        for e in entries.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "list" || x == "sources")
                && let Ok(t) = std::fs::read_to_string(&p)
            {
                texts.push(t);
            }
        }
    }
    for text in &texts {
        // deb822 stanzas ("URIs: ..." / "Suites: ...") and one-line "deb URI suite ..." entries.
        for stanza in text.split("\n\n") {
            let field = |name: &str| {
                stanza
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(|v| v.trim().to_owned())
            };
            if let (Some(u), Some(s)) = (field("URIs:"), field("Suites:")) {
                for uri in u.split_whitespace() {
                    uris.insert((uri.to_owned(), s.clone()));
                }
            }
        }
        for l in text.lines() {
            let words: Vec<&str> = l
                .split_whitespace()
                .filter(|w| !w.starts_with('[') && !w.ends_with(']'))
                .collect();
            if words.first() == Some(&"deb") && words.len() >= 3 {
                uris.insert((words[1].to_owned(), words[2].to_owned()));
            }
        }
    }
    let wanted = |suites: &str| {
        let security = suites.contains("-security");
        let debian = suites.split_whitespace().any(|s| {
            ["bookworm", "trixie", "sid", "forky", "stable"]
                .iter()
                .any(|d| s.starts_with(d))
        });
        debian && security == (archive == Archive::Security)
    };
    uris.into_iter()
        .find(|(_, suites)| wanted(suites))
        .map(|(uri, _)| uri)
        .with_context(|| {
            format!("no Debian {archive:?} archive is configured in /etc/apt/sources.list(.d)")
        })
}
