//! The node image: a minimal Debian root filesystem built once with debootstrap and shared
//! read-only by every node (each node writes to its own overlay layer).
//!
//! The image lives in `<testbed dir>/images/<recipe hash>/rootfs`. The hash covers everything
//! below that shapes the image, so changing the recipe builds a new image next to the old one.
//! A build happens in a temporary directory renamed into place only when complete: a crash
//! never leaves a half image that looks valid.

use std::io::Write as _;

use anyhow::{bail, Context as _};
use camino::{Utf8Path, Utf8PathBuf};
use xshell::{cmd, Shell};

use super::layout::fnv1a64;

/// Bump when the steps of `build` change in a way the constants below do not show.
const RECIPE_VERSION: u32 = 1;

const SUITE: &str = "bookworm";

/// What nodes need at runtime. They cannot reach a package registry, so everything a deploy
/// uses on a node must be here: sshd and rsync to receive files, curl for health checks,
/// ca-certificates for TLS, procps and iproute2 for inspection, the ssh client for node-to-node
/// hops with agent forwarding.
const PACKAGES: &[&str] = &[
    "systemd",
    "systemd-sysv",
    "dbus",
    "openssh-server",
    "openssh-client",
    "rsync",
    "iproute2",
    "iputils-ping",
    "curl",
    "ca-certificates",
    "procps",
];

/// Root logs in by key only; agent forwarding is allowed because deploys hop from the builder
/// to the servers with the user's agent. Only the ed25519 host key exists (each node gets its
/// own in its overlay), so sshd is told not to look for the others.
const SSHD_CONFIG: &str = "\
# Written by the flotilla testbed image recipe.
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
AllowAgentForwarding yes
HostKey /etc/ssh/ssh_host_ed25519_key
";

/// Nodes ssh to each other by name with strict host key checking; their known_hosts is written
/// per testbed.
const SSH_CLIENT_CONFIG: &str = "\
# Written by the flotilla testbed image recipe.
Host *
    StrictHostKeyChecking yes
";

/// Where images are kept, under the testbed directory.
pub fn images_dir(root: &Utf8Path) -> Utf8PathBuf {
    root.join("images")
}

/// The text that defines an image; its hash names the image directory.
pub fn recipe() -> String {
    format!(
        "flotilla testbed image recipe {RECIPE_VERSION}\nsuite: {SUITE}\nvariant: minbase\n\
         packages: {}\n--- sshd_config.d/flotilla.conf\n{SSHD_CONFIG}--- ssh_config.d/flotilla.conf\n\
         {SSH_CLIENT_CONFIG}",
        PACKAGES.join(",")
    )
}

pub fn recipe_hash() -> String {
    format!("{:016x}", fnv1a64(recipe().as_bytes()))
}

/// Returns the image's root filesystem, building it first when it is missing.
pub fn ensure(sh: &Shell, tb: &super::Testbeds<'_>) -> anyhow::Result<Utf8PathBuf> {
    let root = &tb.root;
    let dir = images_dir(root).join(recipe_hash());
    let rootfs = dir.join("rootfs");
    if dir.join("recipe.txt").is_file() && rootfs.is_dir() {
        return Ok(rootfs);
    }
    // Testbeds of one process (tests running in parallel) build the image once: the build
    // directory is named by the process, so two builds in one process would share it. The
    // first builds; the others wait and use its image.
    static BUILD: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_build = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    if dir.join("recipe.txt").is_file() && rootfs.is_dir() {
        return Ok(rootfs);
    }
    remove_abandoned_builds(root);
    let mirror = mirror()?;
    let tmp = images_dir(root).join(format!(".build-{}-{}", recipe_hash(), std::process::id()));
    let guard = RemoveOnDrop(tmp.clone());
    (tb.log)(&format!(
        "testbed: building the node image from {mirror} into {dir} (about a minute, once)"
    ));
    let started = std::time::Instant::now();
    build(sh, &tmp, &mirror).with_context(|| format!("build the node image in {tmp}"))?;
    match std::fs::rename(&tmp, &dir) {
        Ok(()) => std::mem::forget(guard),
        // Another `up` finished the same image first; theirs is as good as ours.
        Err(_) if dir.join("recipe.txt").is_file() => drop(guard),
        Err(err) => bail!("move the finished node image from {tmp} to {dir}: {err}"),
    }
    (tb.log)(&format!("testbed: node image built in {:.1} s", started.elapsed().as_secs_f64()));
    Ok(rootfs)
}

fn build(sh: &Shell, tmp: &Utf8Path, mirror: &str) -> anyhow::Result<()> {
    let rootfs = tmp.join("rootfs");
    std::fs::create_dir_all(tmp).with_context(|| format!("create {tmp}"))?;
    let include = format!("--include={}", PACKAGES.join(","));
    let log = tmp.join("debootstrap.log");
    let out = cmd!(sh, "debootstrap --variant=minbase {include} {SUITE} {rootfs} {mirror}")
        .ignore_status()
        .output()
        .context("run debootstrap")?;
    std::fs::write(&log, [&out.stdout[..], &out.stderr[..]].concat())?;
    if !out.status.success() {
        let tail = tail(&String::from_utf8_lossy(&out.stdout), 15);
        bail!("debootstrap {SUITE} from {mirror} failed ({}); last lines:\n{tail}", out.status);
    }

    // Host keys made by the package's postinst would be shared by every node: each node gets
    // its own in its overlay instead.
    for entry in std::fs::read_dir(rootfs.join("etc/ssh"))? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with("ssh_host_") {
            std::fs::remove_file(entry.path())?;
        }
    }
    write(&rootfs.join("etc/ssh/sshd_config.d/flotilla.conf"), SSHD_CONFIG)?;
    write(&rootfs.join("etc/ssh/ssh_config.d/flotilla.conf"), SSH_CLIENT_CONFIG)?;
    // Each node writes its own machine id into its overlay; an empty one here keeps a node
    // booted without one from sharing the image's.
    write(&rootfs.join("etc/machine-id"), "")?;
    // Downloaded packages and indexes only take space: nodes never run apt.
    for dir in ["var/cache/apt/archives", "var/lib/apt/lists"] {
        let dir = rootfs.join(dir);
        for entry in std::fs::read_dir(&dir).with_context(|| format!("read {dir}"))? {
            let path = entry?.path();
            if path.is_file() {
                std::fs::remove_file(&path)?;
            }
        }
    }
    write(&tmp.join("recipe.txt"), &recipe())?;
    Ok(())
}

/// Removes the build directories of builds whose process is gone (killed before its cleanup
/// could run); a build still running elsewhere keeps its directory.
fn remove_abandoned_builds(root: &Utf8Path) {
    let Ok(entries) = images_dir(root).read_dir_utf8() else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.strip_prefix(".build-").and_then(|rest| rest.rsplit('-').next())
        else {
            continue;
        };
        let alive = Utf8Path::new("/proc").join(pid).exists();
        if !alive && pid.parse::<u32>().is_ok() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// The Debian mirror to debootstrap from: `FLOTILLA_TESTBED_MIRROR`, else the first apt source
/// of this machine that serves the suite.
pub fn mirror() -> anyhow::Result<String> {
    if let Ok(mirror) = std::env::var("FLOTILLA_TESTBED_MIRROR") {
        return Ok(mirror);
    }
    let mut texts = Vec::new();
    if let Ok(text) = std::fs::read_to_string("/etc/apt/sources.list") {
        texts.push(("/etc/apt/sources.list".to_owned(), text));
    }
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut paths: Vec<_> = dir.filter_map(|e| e.ok()).map(|e| e.path()).collect();
        paths.sort();
        for path in paths {
            let ext = path.extension().and_then(|e| e.to_str());
            if matches!(ext, Some("list" | "sources")) {
                if let Ok(text) = std::fs::read_to_string(&path) {
                    texts.push((path.display().to_string(), text));
                }
            }
        }
    }
    for (path, text) in &texts {
        let found = if path.ends_with(".sources") {
            mirror_from_deb822(text, SUITE)
        } else {
            mirror_from_one_line(text, SUITE)
        };
        if let Some(mirror) = found {
            return Ok(mirror);
        }
    }
    bail!(
        "find a Debian mirror: no apt source in /etc/apt serves {SUITE}; set \
         FLOTILLA_TESTBED_MIRROR to one (for example http://deb.debian.org/debian)"
    )
}

/// The first URI of a deb822 stanza of type `deb` that lists `suite` itself.
fn mirror_from_deb822(text: &str, suite: &str) -> Option<String> {
    text.split("\n\n").find_map(|stanza| {
        let field = |name: &str| {
            stanza.lines().find_map(|line| {
                let (key, value) = line.split_once(':')?;
                key.trim().eq_ignore_ascii_case(name).then(|| value.trim().to_owned())
            })
        };
        let enabled = field("Enabled").is_none_or(|v| v != "no");
        let deb = field("Types")?.split_whitespace().any(|t| t == "deb");
        let serves = field("Suites")?.split_whitespace().any(|s| s == suite);
        let uri = field("URIs")?.split_whitespace().next()?.to_owned();
        (enabled && deb && serves).then_some(uri)
    })
}

/// The URI of the first `deb [options] URI suite ...` line for `suite`.
fn mirror_from_one_line(text: &str, suite: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let line = line.split('#').next()?.trim();
        let rest = line.strip_prefix("deb ")?.trim_start();
        let rest = match rest.strip_prefix('[') {
            Some(options) => options.split_once(']')?.1,
            None => rest,
        };
        let mut words = rest.split_whitespace();
        let uri = words.next()?;
        (words.next()? == suite).then(|| uri.to_owned())
    })
}

fn write(path: &Utf8Path, text: &str) -> anyhow::Result<()> {
    let mut file = std::fs::File::create(path).with_context(|| format!("create {path}"))?;
    file.write_all(text.as_bytes()).with_context(|| format!("write {path}"))?;
    Ok(())
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Removes a directory tree when dropped, so a failed or interrupted build leaves nothing.
struct RemoveOnDrop(Utf8PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mirror_is_read_from_deb822_sources() {
        let text = "Types: deb\n# comment\nURIs: http://mirror.example/debian\n\
                    Suites: bookworm bookworm-updates\nComponents: main\n\n\
                    Types: deb\nURIs: http://security.example/debian-security\n\
                    Suites: bookworm-security\n";
        assert_eq!(
            mirror_from_deb822(text, "bookworm").as_deref(),
            Some("http://mirror.example/debian")
        );
        assert_eq!(mirror_from_deb822(text, "trixie"), None);
        let disabled = "Enabled: no\nTypes: deb\nURIs: http://x/\nSuites: bookworm\n";
        assert_eq!(mirror_from_deb822(disabled, "bookworm"), None);
        let src_only = "Types: deb-src\nURIs: http://x/\nSuites: bookworm\n";
        assert_eq!(mirror_from_deb822(src_only, "bookworm"), None);
    }

    #[test]
    fn the_mirror_is_read_from_one_line_sources() {
        let text = "# deb http://old/ bookworm main\n\
                    deb-src http://src/ bookworm main\n\
                    deb [arch=amd64 signed-by=/k.gpg] http://m/debian bookworm main\n";
        assert_eq!(mirror_from_one_line(text, "bookworm").as_deref(), Some("http://m/debian"));
        assert_eq!(mirror_from_one_line("deb http://m/ bookworm-updates main\n", "bookworm"), None);
    }

    #[test]
    fn the_recipe_hash_follows_the_recipe() {
        assert_eq!(recipe_hash(), recipe_hash());
        assert_eq!(recipe_hash().len(), 16);
        assert!(recipe().contains("openssh-server") && recipe().contains("curl"));
        assert!(recipe().contains("PermitRootLogin prohibit-password"));
    }
}
