//! The newest Debian benchmark peers for the guest: nginx 1.30 and OpenSSL 3.6 from sid,
//! HAProxy from experimental (3.4, which has kTLS: `ktls on`), with every shared library they
//! load, taken from sid too. Beside them sid's `perf` (linux-perf, the guest kernel's own
//! version), for the report's profile of where a relay's instructions go.
//!
//! The packages are downloaded with apt against private state (like the guest kernels, see
//! [`kernels::AptState`]), never installed: they are unpacked into the cache and run through
//! sid's own dynamic loader, so they work on this Debian 12 host and in the guest beside its
//! Debian 12 programs. The libraries are found from the programs' `NEEDED` entries, not from a
//! list: each missing one is looked for among the dependencies of the package that needs it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::cmd::{self, cache_dir};
use crate::initramfs::Contents;
use crate::kernels::{self, AptState, Archive};

/// Where the unpacked packages are in the guest: a file of the packages at `usr/sbin/nginx` is
/// `/opt/sid/usr/sbin/nginx`.
pub const GUEST_ROOT: &str = "/opt/sid";
/// The sid nginx in the guest (a wrapper script; the arguments are nginx's).
pub const NGINX: &str = "/usr/bin/nginx-sid";
/// The sid HAProxy in the guest (a wrapper script; the arguments are HAProxy's).
pub const HAPROXY: &str = "/usr/bin/haproxy-sid";
/// The sid openssl command in the guest (a wrapper script; the arguments are openssl's).
pub const OPENSSL: &str = "/usr/bin/openssl-sid";
/// sid's perf in the guest (a wrapper script; the arguments are perf's).
pub const PERF: &str = "/usr/bin/perf-sid";
/// The sid nginx's stream module in the guest, for `load_module` (nginx only has the stream
/// module it was built with when told to load it).
pub const NGINX_STREAM_MODULE: &str = "/opt/sid/usr/lib/nginx/modules/ngx_stream_module.so";

/// The suites searched: sid for everything, experimental for HAProxy (sid's is older than 3.3,
/// the first with kTLS). Experimental packages are only taken when asked for by suite.
const SUITES: &[(Archive, &str)] = &[(Archive::Main, "sid"), (Archive::Main, "experimental")];
/// The packages downloaded by name; the libraries they need follow from their programs.
const PACKAGES: &[&str] = &[
    "nginx",
    "libnginx-mod-stream",
    "openssl",
    "libssl3t64",
    "haproxy/experimental",
    "linux-perf",
];
/// The wrappers: (guest command, the program's path in the packages).
const PROGRAMS: [(&str, &str); 4] = [
    (NGINX, "usr/sbin/nginx"),
    (HAPROXY, "usr/sbin/haproxy"),
    (OPENSSL, "usr/bin/openssl"),
    (PERF, "usr/bin/perf"),
];
/// The stream module in the packages (see [`NGINX_STREAM_MODULE`]).
const STREAM_MODULE: &str = "usr/lib/nginx/modules/ngx_stream_module.so";
/// OpenSSL's configuration in the packages (a link to etc/ssl/openssl.cnf).
const OPENSSL_CNF: &str = "usr/lib/ssl/openssl.cnf";
/// Where sid's libcrypto looks for providers (none is needed: the default one is built in, and
/// pointing here keeps the guest's Debian 12 providers out).
const OSSL_MODULES: &str = "usr/lib/x86_64-linux-gnu/ossl-modules";
/// The dynamic loader's name (sid's libc.so.6 needs it, so it is in the closure).
const LOADER: &str = "ld-linux-x86-64.so.2";
/// Where the packages put shared libraries: the multiarch directory (sid is merged-/usr; the
/// others are for a package that still ships there).
const LIB_DIRS: &[&str] = &[
    "usr/lib/x86_64-linux-gnu",
    "lib/x86_64-linux-gnu",
    "usr/lib",
];
/// Symlinks followed in a row before giving up on a path.
const MAX_LINKS: usize = 16;

/// The sid peers, unpacked in the cache.
#[derive(Debug, Clone)]
pub struct NewestPeers {
    /// The unpacked packages (what is under [`GUEST_ROOT`] in the guest).
    pub root: PathBuf,
    /// nginx's Debian version (e.g. 1.30.6-2).
    pub nginx: String,
    /// OpenSSL's Debian version (e.g. 3.6.5-1).
    pub openssl: String,
    /// HAProxy's Debian version (e.g. 3.4.7-1).
    pub haproxy: String,
    /// Every package unpacked (the peers and the libraries' packages), with its version.
    pub packages: BTreeMap<String, String>,
    /// The files the guest gets, relative to `root`: the programs, the stream module, OpenSSL's
    /// configuration and every library they load (at the name they load it by).
    files: BTreeSet<String>,
    /// The directories of `files` the libraries are in, relative to `root`.
    lib_dirs: BTreeSet<String>,
}

impl NewestPeers {
    /// The loader's path relative to `root`.
    fn loader(&self) -> Result<&str> {
        self.files
            .iter()
            .find(|f| f.rsplit('/').next() == Some(LOADER))
            .map(String::as_str)
            .with_context(|| format!("the sid peers have no {LOADER}"))
    }

    /// The stamp's text: the versions, then the packages, the library directories and the
    /// files, one a line (`key value`).
    fn render(&self) -> String {
        let mut s = format!(
            "nginx {}\nopenssl {}\nhaproxy {}\n",
            self.nginx, self.openssl, self.haproxy
        );
        for (name, version) in &self.packages {
            s.push_str(&format!("package {name} {version}\n"));
        }
        for dir in &self.lib_dirs {
            s.push_str(&format!("libdir {dir}\n"));
        }
        for file in &self.files {
            s.push_str(&format!("file {file}\n"));
        }
        s
    }

    /// Reads a stamp written by [`NewestPeers::render`] for the tree at `root`.
    fn parse(text: &str, root: &Path) -> Result<Self> {
        let mut peers = Self {
            root: root.to_owned(),
            nginx: String::new(),
            openssl: String::new(),
            haproxy: String::new(),
            packages: BTreeMap::new(),
            files: BTreeSet::new(),
            lib_dirs: BTreeSet::new(),
        };
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let (key, value) = line
                .split_once(' ')
                .with_context(|| format!("stamp line without a value: {line:?}"))?;
            let value = value.to_owned();
            match key {
                "nginx" => peers.nginx = value,
                "openssl" => peers.openssl = value,
                "haproxy" => peers.haproxy = value,
                "package" => {
                    let (name, version) = value
                        .split_once(' ')
                        .with_context(|| format!("package without a version: {line:?}"))?;
                    peers.packages.insert(name.to_owned(), version.to_owned());
                }
                "libdir" => {
                    peers.lib_dirs.insert(value);
                }
                "file" => {
                    peers.files.insert(value);
                }
                _ => bail!("unknown stamp line {line:?}"),
            }
        }
        for (name, version) in [
            ("nginx", &peers.nginx),
            ("openssl", &peers.openssl),
            ("haproxy", &peers.haproxy),
        ] {
            if version.is_empty() {
                bail!("the stamp has no {name} version");
            }
        }
        peers.loader()?;
        Ok(peers)
    }
}

/// Returns the sid peers, downloading and unpacking them when the cache has none (or ones
/// older than a week, or `refresh`).
pub fn fetch(refresh: bool) -> Result<NewestPeers> {
    let dir = cache_dir().join("peers/sid");
    let stamp = dir.join("resolved");
    let root = dir.join("root");
    if !refresh
        && kernels::is_fresh(&stamp)
        && let Ok(text) = std::fs::read_to_string(&stamp)
        && let Ok(peers) = NewestPeers::parse(&text, &root)
        // A cache from before a program was added to the list is not complete.
        && PROGRAMS.iter().all(|(_, p)| peers.files.contains(*p))
        && peers
            .files
            .iter()
            .all(|f| resolve_in_root(&root, f).is_ok_and(|p| p.is_file()))
    {
        return Ok(peers);
    }
    println!("peers: resolving nginx, OpenSSL and perf in sid, HAProxy in experimental");
    // A tree left half-built by a failed run must not pass for a complete one.
    let _ = std::fs::remove_file(&stamp);
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root)?;
    let debs = dir.join("debs");
    let _ = std::fs::remove_dir_all(&debs);
    let apt = AptState::new(&dir, SUITES)?;
    apt.update()?;
    let peers = unpack_closure(&apt, &root, &debs);
    // The .debs are unpacked (or were not needed); drop them to keep the cache small.
    let _ = std::fs::remove_dir_all(&debs);
    let peers = peers?;
    check_loads(&peers)?;
    std::fs::write(&stamp, peers.render())?;
    println!(
        "peers: nginx {}, OpenSSL {}, HAProxy {} ({} packages, {} files)",
        peers.nginx,
        peers.openssl,
        peers.haproxy,
        peers.packages.len(),
        peers.files.len()
    );
    Ok(peers)
}

/// One unpacked package.
struct Unpacked {
    version: String,
    /// Names in Depends and Pre-Depends (every alternative).
    depends: Vec<String>,
}

/// Downloads and unpacks [`PACKAGES`], then the packages of the libraries they need until
/// every `NEEDED` entry of the programs and of those libraries is found.
fn unpack_closure(apt: &AptState, root: &Path, debs: &Path) -> Result<NewestPeers> {
    let mut unpacked: BTreeMap<String, Unpacked> = BTreeMap::new();
    // Which package each unpacked path came from: a missing library's provider is among the
    // dependencies of the package that needs it (dpkg-shlibdeps puts it there).
    let mut owner: BTreeMap<String, String> = BTreeMap::new();
    let names: Vec<String> = PACKAGES.iter().map(|p| (*p).to_owned()).collect();
    println!("peers: downloading {}", names.join(" "));
    let first = debs.join("peers");
    std::fs::create_dir_all(&first)?;
    apt.download(&names, &first)
        .context("downloading the peers (is HAProxy still in experimental?)")?;
    for entry in std::fs::read_dir(&first)? {
        let deb = entry?.path();
        if deb.extension().is_some_and(|e| e == "deb") {
            unpack(&deb, root, &mut unpacked, &mut owner)?;
        }
    }
    let version = |name: &str| {
        unpacked
            .get(name)
            .map(|u| u.version.clone())
            .with_context(|| format!("no {name} package was downloaded"))
    };
    let (nginx, stream) = (version("nginx")?, version("libnginx-mod-stream")?);
    let (openssl, haproxy) = (version("openssl")?, version("haproxy")?);
    if nginx != stream {
        // nginx refuses a module of another build; the archive is mid-upload.
        bail!("nginx is {nginx} but libnginx-mod-stream is {stream}");
    }

    let mut entries: Vec<String> = PROGRAMS.iter().map(|p| p.1.to_owned()).collect();
    entries.push(STREAM_MODULE.to_owned());
    let mut downloads = Downloads {
        apt,
        dir: debs,
        sections: BTreeMap::new(),
        debs: BTreeMap::new(),
    };
    let closure = loop {
        let closure = scan(root, &entries)?;
        if closure.missing.is_empty() {
            break closure;
        }
        for (soname, needers) in &closure.missing {
            if find_lib(root, soname).is_some() {
                continue; // unpacked for another name in this round
            }
            let needing: BTreeSet<&String> = needers.iter().filter_map(|f| owner.get(f)).collect();
            let mut candidates: Vec<String> = Vec::new();
            for (_, u) in unpacked
                .iter()
                .filter(|(name, _)| needing.is_empty() || needing.contains(name))
            {
                for d in &u.depends {
                    if !unpacked.contains_key(d) && !candidates.contains(d) {
                        candidates.push(d.clone());
                    }
                }
            }
            // Library packages first: a program's other dependencies (systemd, lsb-base, ...)
            // are only downloaded when no library package has the name.
            let mut ranked = Vec::new();
            for c in candidates {
                if let Some(section) = downloads.section(&c) {
                    ranked.push((!section.ends_with("libs"), c));
                }
            }
            ranked.sort_by_key(|(other, _)| *other);
            let mut provider = None;
            let mut failures = String::new();
            for (_, candidate) in ranked {
                match downloads.get(&candidate) {
                    Ok((deb, paths)) => {
                        if LIB_DIRS
                            .iter()
                            .any(|d| paths.contains(&format!("{d}/{soname}")))
                        {
                            provider = Some((candidate, deb.clone()));
                            break;
                        }
                    }
                    Err(why) => failures.push_str(&format!("\n  {candidate}: {why}")),
                }
            }
            let Some((package, deb)) = provider else {
                let files: Vec<&str> = needers.iter().map(String::as_str).collect();
                let packages: Vec<&str> = needing.iter().map(|p| p.as_str()).collect();
                bail!(
                    "no sid package provides {soname} (needed by {}; looked in the dependencies \
                     of {}){failures}",
                    files.join(", "),
                    packages.join(", ")
                );
            };
            println!("peers: {soname} is in {package}");
            unpack(&deb, root, &mut unpacked, &mut owner)?;
        }
    };

    let mut files = closure.files;
    // Read through its link into the packages' etc/ssl (a data file: not in the closure).
    resolve_in_root(root, OPENSSL_CNF)?;
    files.insert(OPENSSL_CNF.to_owned());
    let lib_dirs = closure
        .libs
        .iter()
        .filter_map(|l| l.rsplit_once('/').map(|(dir, _)| dir.to_owned()))
        .collect();
    let peers = NewestPeers {
        root: root.to_owned(),
        nginx,
        openssl,
        haproxy,
        packages: unpacked
            .into_iter()
            .map(|(name, u)| (name, u.version))
            .collect(),
        files,
        lib_dirs,
    };
    peers.loader()?;
    Ok(peers)
}

/// Candidate packages for a missing library, each looked up and downloaded at most once.
struct Downloads<'a> {
    apt: &'a AptState,
    /// Where the .debs go (one directory each).
    dir: &'a Path,
    /// Each name's Section; none for a name with nothing to download (a virtual package).
    sections: BTreeMap<String, Option<String>>,
    /// Each package's .deb and the paths in it, or why it could not be downloaded (a name
    /// whose only version is the one this host has installed, say).
    debs: BTreeMap<String, std::result::Result<(PathBuf, BTreeSet<String>), String>>,
}

impl Downloads<'_> {
    fn section(&mut self, package: &str) -> Option<String> {
        self.sections
            .entry(package.to_owned())
            .or_insert_with(|| self.apt.section(package))
            .clone()
    }

    /// The package's .deb and the paths in it, or why it could not be downloaded.
    fn get(&mut self, package: &str) -> std::result::Result<&(PathBuf, BTreeSet<String>), &str> {
        self.debs
            .entry(package.to_owned())
            .or_insert_with(|| download(self.apt, self.dir, package).map_err(|e| format!("{e:#}")))
            .as_ref()
            .map_err(String::as_str)
    }
}

/// Downloads one package into its own directory under `dir` and lists it.
fn download(apt: &AptState, dir: &Path, package: &str) -> Result<(PathBuf, BTreeSet<String>)> {
    let into = dir.join(package);
    std::fs::create_dir_all(&into)?;
    apt.download(&[package.to_owned()], &into)?;
    let deb = std::fs::read_dir(&into)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .with_context(|| format!("apt downloaded no .deb for {package}"))?;
    let listing = cmd::output(Command::new("dpkg-deb").arg("-c").arg(&deb))?;
    Ok((deb, deb_paths(&listing)))
}

/// Unpacks `deb` into `root`, recording the package and the paths it owns.
fn unpack(
    deb: &Path,
    root: &Path,
    unpacked: &mut BTreeMap<String, Unpacked>,
    owner: &mut BTreeMap<String, String>,
) -> Result<()> {
    let control = cmd::output(Command::new("dpkg-deb").arg("-f").arg(deb).args([
        "Package",
        "Version",
        "Depends",
        "Pre-Depends",
    ]))?;
    let fields = control_fields(&control);
    let name = fields
        .get("Package")
        .with_context(|| format!("{} has no Package field", deb.display()))?
        .clone();
    let mut depends = Vec::new();
    for field in ["Pre-Depends", "Depends"] {
        if let Some(value) = fields.get(field) {
            depends.extend(dependency_names(value));
        }
    }
    let listing = cmd::output(Command::new("dpkg-deb").arg("-c").arg(deb))?;
    for path in deb_paths(&listing) {
        owner.insert(path, name.clone());
    }
    cmd::output(Command::new("dpkg-deb").arg("-x").arg(deb).arg(root))?;
    let version = fields
        .get("Version")
        .with_context(|| format!("{} has no Version field", deb.display()))?
        .clone();
    unpacked.insert(name, Unpacked { version, depends });
    Ok(())
}

/// What the entry files load, as far as the unpacked packages have it.
struct Closure {
    /// The entries and every library found (at the path they are loaded by).
    files: BTreeSet<String>,
    /// The libraries among `files`.
    libs: BTreeSet<String>,
    /// Each name not found, with the files that need it.
    missing: BTreeMap<String, BTreeSet<String>>,
}

/// Follows the `NEEDED` entries from `entries` through the libraries unpacked in `root`.
fn scan(root: &Path, entries: &[String]) -> Result<Closure> {
    let mut closure = Closure {
        files: BTreeSet::new(),
        libs: BTreeSet::new(),
        missing: BTreeMap::new(),
    };
    let mut queue = entries.to_vec();
    while let Some(rel) = queue.pop() {
        if !closure.files.insert(rel.clone()) {
            continue;
        }
        let path = resolve_in_root(root, &rel)?;
        let dynamic = cmd::output(Command::new("readelf").arg("-dW").arg(&path))?;
        for soname in needed(&dynamic) {
            match find_lib(root, &soname) {
                Some(lib) => {
                    closure.libs.insert(lib.clone());
                    queue.push(lib);
                }
                None => {
                    closure
                        .missing
                        .entry(soname)
                        .or_default()
                        .insert(rel.clone());
                }
            }
        }
    }
    Ok(closure)
}

/// The path (relative to `root`) a library is loaded by, if a package unpacked there has it.
fn find_lib(root: &Path, soname: &str) -> Option<String> {
    LIB_DIRS
        .iter()
        .map(|dir| format!("{dir}/{soname}"))
        .find(|rel| resolve_in_root(root, rel).is_ok_and(|p| p.is_file()))
}

/// Runs each program and the stream module's dependencies through sid's loader, as the
/// wrappers do (`--list`): every library must come from the packages (not this host's
/// /etc/ld.so.cache) with the symbol versions they need.
fn check_loads(peers: &NewestPeers) -> Result<()> {
    let loader = peers.root.join(peers.loader()?);
    let lib_path = library_path(&peers.root.to_string_lossy(), peers);
    let mut objects: Vec<&str> = PROGRAMS.iter().map(|p| p.1).collect();
    objects.push(STREAM_MODULE);
    for object in objects {
        let out = Command::new(&loader)
            .args(["--list", "--library-path", &lib_path])
            .arg(peers.root.join(object))
            .output()
            .with_context(|| format!("starting {}", loader.display()))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let foreign: Vec<&str> = text
            .lines()
            .filter(|l| {
                l.contains("not found")
                    || l.split_once("=> ")
                        .is_some_and(|(_, p)| !p.starts_with(&*peers.root.to_string_lossy()))
            })
            .collect();
        if !out.status.success() || !foreign.is_empty() {
            bail!(
                "sid's loader does not load {object} from the sid packages alone:\n{}",
                text.trim_end()
            );
        }
    }
    Ok(())
}

/// The loader's `--library-path` for the packages at `prefix`.
fn library_path(prefix: &str, peers: &NewestPeers) -> String {
    peers
        .lib_dirs
        .iter()
        .map(|d| format!("{prefix}/{d}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The wrapper script that runs `program` (a path in the packages) from the packages at
/// `prefix`, with the arguments it is given.
fn wrapper(prefix: &str, peers: &NewestPeers, program: &str) -> Result<String> {
    Ok(format!(
        "#!/bin/sh\n\
         # Debian sid's {program}, run by sid's loader on sid's libraries (the guest's own are\n\
         # Debian 12's); OpenSSL reads sid's configuration, not the guest's /usr/lib/ssl.\n\
         export OPENSSL_CONF='{prefix}/{OPENSSL_CNF}' OPENSSL_MODULES='{prefix}/{OSSL_MODULES}'\n\
         exec '{prefix}/{}' --library-path '{}' '{prefix}/{program}' \"$@\"\n",
        peers.loader()?,
        library_path(prefix, peers),
    ))
}

/// A wrapper script on this host that runs sid's openssl from the cache (Debian 12's OpenSSL
/// has no ML-KEM: the scan's post-quantum client is this one), with sid's configuration.
pub fn host_openssl(peers: &NewestPeers) -> Result<PathBuf> {
    let root = peers.root.display().to_string();
    let conf = resolve_in_root(&peers.root, OPENSSL_CNF)?;
    let script = format!(
        "#!/bin/sh\n\
         # Debian sid's openssl, run from the cache by sid's loader on sid's libraries.\n\
         export OPENSSL_CONF='{}' OPENSSL_MODULES='{root}/{OSSL_MODULES}'\n\
         exec '{root}/{}' --library-path '{}' '{root}/usr/bin/openssl' \"$@\"\n",
        conf.display(),
        peers.loader()?,
        library_path(&root, peers),
    );
    let path = peers
        .root
        .parent()
        .map_or_else(|| peers.root.clone(), Path::to_path_buf)
        .join("openssl-host");
    std::fs::write(&path, script)?;
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    Ok(path)
}

/// Puts the sid peers into a guest image: their files under [`GUEST_ROOT`] and the wrappers
/// [`NGINX`], [`HAPROXY`], [`OPENSSL`] and [`PERF`]. nginx then needs `load_module
/// <NGINX_STREAM_MODULE>;` for a `stream` block; HAProxy's kTLS is `ktls on` on a `bind` or
/// `server` line that has `ssl`, allowed by `expose-experimental-directives` in `global`.
pub fn add_to(contents: &mut Contents, peers: &NewestPeers) -> Result<()> {
    for rel in &peers.files {
        let host = resolve_in_root(&peers.root, rel)?;
        contents.add_file(&host, &format!("{GUEST_ROOT}/{rel}"));
    }
    for (command, program) in PROGRAMS {
        contents.add_bytes(command, wrapper(GUEST_ROOT, peers, program)?.into_bytes());
    }
    Ok(())
}

/// `rel` (a path in the unpacked packages) with its last component's links followed inside
/// `root`: the packages' absolute links (usr/lib/ssl/openssl.cnf -> /etc/ssl/openssl.cnf) mean
/// the packages' files, not this host's. The directories on the way are the packages' own.
fn resolve_in_root(root: &Path, rel: &str) -> Result<PathBuf> {
    let mut rel = rel.to_owned();
    for _ in 0..MAX_LINKS {
        let path = root.join(&rel);
        let meta = std::fs::symlink_metadata(&path)
            .with_context(|| format!("{rel} is not in {}", root.display()))?;
        if !meta.file_type().is_symlink() {
            return Ok(path);
        }
        let target = std::fs::read_link(&path)?;
        rel = follow_link(&rel, &target.to_string_lossy());
    }
    bail!("{rel} in {}: too many levels of links", root.display())
}

/// Where a link at `link` (relative to the packages' root) to `target` points, relative to the
/// same root.
fn follow_link(link: &str, target: &str) -> String {
    let mut parts: Vec<&str> = if target.starts_with('/') {
        Vec::new()
    } else {
        let mut dir: Vec<&str> = link.split('/').filter(|p| !p.is_empty()).collect();
        dir.pop();
        dir
    };
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    parts.join("/")
}

/// The `NEEDED` names in `readelf -d` output.
fn needed(readelf: &str) -> Vec<String> {
    readelf
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .filter_map(|l| {
            let (_, rest) = l.split_once('[')?;
            let (name, _) = rest.split_once(']')?;
            Some(name.to_owned())
        })
        .collect()
}

/// The fields of a control stanza (`dpkg-deb -f` output); continuation lines are joined.
fn control_fields(text: &str) -> BTreeMap<String, String> {
    let mut fields: BTreeMap<String, String> = BTreeMap::new();
    let mut last: Option<String> = None;
    for line in text.lines() {
        if line.starts_with([' ', '\t']) {
            if let Some(value) = last.as_ref().and_then(|k| fields.get_mut(k)) {
                value.push(' ');
                value.push_str(line.trim());
            }
        } else if let Some((key, value)) = line.split_once(':') {
            fields.insert(key.to_owned(), value.trim().to_owned());
            last = Some(key.to_owned());
        }
    }
    fields
}

/// The package names in a Depends value, every alternative included, in order and without
/// versions or architecture qualifiers.
fn dependency_names(value: &str) -> Vec<String> {
    value
        .split([',', '|'])
        .filter_map(|d| {
            let name = d.trim().split([' ', '(', ':', '[', '<']).next()?;
            (!name.is_empty()).then(|| name.to_owned())
        })
        .collect()
}

/// The paths in `dpkg-deb -c` output, relative to the root (`./usr/sbin/nginx` is
/// `usr/sbin/nginx`; a link is named without its target; directories are left out).
fn deb_paths(listing: &str) -> BTreeSet<String> {
    listing
        .lines()
        .filter_map(|line| {
            // "<mode> <owner> <size> <date> <time> <path>[ -> <target>]"
            let mut rest = line.trim_start();
            for _ in 0..5 {
                rest = rest.split_once(char::is_whitespace)?.1.trim_start();
            }
            let path = rest.split_once(" -> ").map_or(rest, |(p, _)| p);
            let path = path.strip_prefix("./").unwrap_or(path);
            (!path.is_empty() && !path.ends_with('/')).then(|| path.to_owned())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn needed_names_are_read_from_readelf() {
        let out = "\nDynamic section at offset 0x1f0d70 contains 31 entries:\n  \
            Tag        Type                         Name/Value\n \
            0x0000000000000001 (NEEDED)             Shared library: [libcrypt.so.1]\n \
            0x0000000000000001 (NEEDED)             Shared library: [libpcre2-8.so.0]\n \
            0x000000000000000e (SONAME)             Library soname: [libfoo.so.1]\n \
            0x000000000000000c (INIT)               0x1c000\n";
        assert_eq!(needed(out), vec!["libcrypt.so.1", "libpcre2-8.so.0"]);
        assert!(needed("There is no dynamic section in this file.\n").is_empty());
    }

    #[test]
    fn control_fields_and_dependencies_are_parsed() {
        let text = "Package: haproxy\nVersion: 3.4.7-1\nDepends: libc6 (>= 2.38), \
            libssl3t64 (>= 3.5.1),\n systemd | systemd-sysusers, foo:any [amd64]\n\
            Pre-Depends: dpkg (>= 1.17.14)\n";
        let fields = control_fields(text);
        assert_eq!(fields["Package"], "haproxy");
        assert_eq!(fields["Version"], "3.4.7-1");
        assert_eq!(
            dependency_names(&fields["Depends"]),
            vec!["libc6", "libssl3t64", "systemd", "systemd-sysusers", "foo"]
        );
        assert_eq!(dependency_names(&fields["Pre-Depends"]), vec!["dpkg"]);
        assert!(dependency_names("").is_empty());
    }

    #[test]
    fn deb_listing_paths() {
        let listing = "drwxr-xr-x root/root         0 2026-09-29 19:39 ./usr/lib/ssl/\n\
            -rwxr-xr-x root/root   1127912 2026-09-29 19:39 ./usr/bin/openssl\n\
            lrwxrwxrwx root/root         0 2026-09-29 19:39 ./usr/lib/ssl/openssl.cnf -> /etc/ssl/openssl.cnf\n";
        let paths: Vec<String> = deb_paths(listing).into_iter().collect();
        assert_eq!(paths, vec!["usr/bin/openssl", "usr/lib/ssl/openssl.cnf"]);
    }

    #[test]
    fn links_are_followed_inside_the_packages() {
        assert_eq!(
            follow_link("usr/lib/ssl/openssl.cnf", "/etc/ssl/openssl.cnf"),
            "etc/ssl/openssl.cnf"
        );
        assert_eq!(
            follow_link(
                "usr/lib64/ld-linux-x86-64.so.2",
                "../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
            ),
            "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
        );
        assert_eq!(
            follow_link("usr/lib/x86_64-linux-gnu/libz.so.1", "libz.so.1.3.1"),
            "usr/lib/x86_64-linux-gnu/libz.so.1.3.1"
        );
    }

    fn sample() -> NewestPeers {
        NewestPeers {
            root: PathBuf::from("/cache/peers/sid/root"),
            nginx: "1.30.6-2".into(),
            openssl: "3.6.5-1".into(),
            haproxy: "3.4.7-1".into(),
            packages: [("libc6", "2.43-7"), ("nginx", "1.30.6-2")]
                .into_iter()
                .map(|(n, v)| (n.to_owned(), v.to_owned()))
                .collect(),
            files: [
                "usr/sbin/nginx",
                "usr/lib/x86_64-linux-gnu/libc.so.6",
                "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
            ]
            .into_iter()
            .map(str::to_owned)
            .collect(),
            lib_dirs: ["usr/lib/x86_64-linux-gnu".to_owned()].into(),
        }
    }

    #[test]
    fn the_stamp_reads_back() {
        let peers = sample();
        let back = NewestPeers::parse(&peers.render(), &peers.root).expect("parses");
        assert_eq!(back.render(), peers.render());
        assert_eq!(back.haproxy, "3.4.7-1");
        assert!(NewestPeers::parse("nginx 1.30.6-2\n", &peers.root).is_err());
    }

    #[test]
    fn the_wrapper_runs_the_program_through_the_sid_loader() {
        let script = wrapper(GUEST_ROOT, &sample(), "usr/sbin/nginx").expect("wrapper");
        assert!(script.starts_with("#!/bin/sh\n"));
        assert!(script.contains(
            "exec '/opt/sid/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2' --library-path \
             '/opt/sid/usr/lib/x86_64-linux-gnu' '/opt/sid/usr/sbin/nginx' \"$@\"\n"
        ));
        assert!(script.contains("OPENSSL_CONF='/opt/sid/usr/lib/ssl/openssl.cnf'"));
        assert_eq!(
            NGINX_STREAM_MODULE,
            format!("{GUEST_ROOT}/{STREAM_MODULE}"),
            "the public path is the module's guest path"
        );
    }
}
