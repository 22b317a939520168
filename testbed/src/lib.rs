//! `cargo xtask testbed`: a local fleet of real servers.
//!
//! Each node is a network namespace plus a systemd-nspawn container booting systemd from a
//! cached Debian image, with its own sshd, host keys, hostname and overlay layer. Everything
//! lives under the testbed directory, `target/testbed/` of the workspace unless
//! `FLOTILLA_TESTBED_DIR` says otherwise:
//!
//! ```text
//! images/<recipe hash>/rootfs     the node image, shared read-only by every node
//! beds/<name>/state.json          what `down` needs: written before anything is created
//! beds/<name>/id_ed25519          the testbed's ssh key (0600) and its .pub
//! beds/<name>/known_hosts         every node's host key, by name, IPv4 and IPv6; the builder's
//! beds/<name>/ssh_config          a Host entry per node (`nodeN`, `nodeN-v6`) and `builder`
//! beds/<name>/deployment.toml     the topology for `cargo xtask fling` (IPv4 addresses)
//! beds/<name>/deployment-v6.toml  the same over IPv6
//! beds/<name>/nodes/<node>/       the node's overlay layer (`upper`) and console log
//! beds/<name>/builder/            the loopback sshd of the builder: config, host key, log
//! beds/<name>/store/              with `up --store`: the S3 store's data, logs, s3.json and
//!                                 the builder's credentials.toml (both 0600)
//! ```
//!
//! One file lives elsewhere: the builder sshd's `authorized_keys`, in
//! `/run/flotilla-testbed/flt-<tag>/`. sshd (StrictModes) refuses an authorized keys file
//! below a directory that others may write, such as a checkout under `/tmp`; `/run` is
//! root's alone wherever the checkout is.

mod cgroups;
mod down;
mod image;
mod layout;
mod render;
mod state;
pub mod store;
#[cfg(feature = "test-support")]
pub mod test_support;
mod up;

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{bail, Context as _};
use camino::{Utf8Path, Utf8PathBuf};
use xshell::{cmd, Shell};

use layout::Layout;
pub use layout::TestbedName;
use state::State;
pub use up::{Options, Up};

/// Where testbeds live and what they need to know of the workspace they serve; every command
/// takes one.
pub struct Testbeds<'a> {
    /// The directory of images and testbeds (see the module comment).
    pub root: Utf8PathBuf,
    /// The workspace whose deployment configs the testbeds write: their builder syncs it.
    pub workspace: Utf8PathBuf,
    /// Where the commands say what they are doing (`testbed: building the node image ...`).
    pub log: &'a (dyn Fn(&str) + Sync),
    /// Commands the workspace's own tests run beside the testbed, each with the Debian package
    /// that provides it: `prereqs` installs them with the testbed's own.
    pub extra_tools: Vec<(String, String)>,
}

impl<'a> Testbeds<'a> {
    /// The testbeds of `workspace`: under `FLOTILLA_TESTBED_DIR` when it is set, else under
    /// the workspace's `target/testbed/`.
    pub fn new(workspace: &Utf8Path, log: &'a (dyn Fn(&str) + Sync)) -> Testbeds<'a> {
        Testbeds {
            root: testbed_root(workspace),
            workspace: workspace.to_owned(),
            log,
            extra_tools: Vec::new(),
        }
    }

    /// The files of the testbed `name`.
    pub fn paths(&self, name: &TestbedName) -> Paths {
        Paths::new(&self.root, name)
    }
}

/// The directory that holds images and testbeds.
pub fn testbed_root(workspace: &Utf8Path) -> Utf8PathBuf {
    match std::env::var("FLOTILLA_TESTBED_DIR") {
        Ok(dir) if !dir.is_empty() => Utf8PathBuf::from(dir),
        _ => workspace.join("target/testbed"),
    }
}

/// Boots a testbed of `nodes` nodes named `name`.
pub fn up(sh: &Shell, tb: &Testbeds<'_>, name: &TestbedName, nodes: u32) -> anyhow::Result<Up> {
    up::up(sh, tb, name, Options { nodes, store: false })
}

/// Boots a testbed as `options` say (with `store`, an artifact store beside it).
pub fn up_with(
    sh: &Shell,
    tb: &Testbeds<'_>,
    name: &TestbedName,
    options: Options,
) -> anyhow::Result<Up> {
    up::up(sh, tb, name, options)
}

/// Tears the testbed `name` down, leaving nothing behind.
pub fn down(sh: &Shell, tb: &Testbeds<'_>, name: &TestbedName) -> anyhow::Result<()> {
    require_root("down")?;
    down::down(sh, tb, name)
}

/// Tears every testbed down, and the remains of crashed runs.
pub fn down_all(sh: &Shell, tb: &Testbeds<'_>) -> anyhow::Result<()> {
    require_root("down")?;
    down::down_all(sh, tb)
}

/// The files of one testbed.
#[derive(Debug, Clone)]
pub struct Paths {
    pub dir: Utf8PathBuf,
    pub state: Utf8PathBuf,
    pub identity: Utf8PathBuf,
    pub known_hosts: Utf8PathBuf,
    pub ssh_config: Utf8PathBuf,
    pub deployment: Utf8PathBuf,
    pub deployment_v6: Utf8PathBuf,
    pub builder: Utf8PathBuf,
    /// The artifact store's data, logs, config and credentials (`up --store`).
    pub store: Utf8PathBuf,
}

/// Where testbeds keep the files that must sit below root-owned directories only.
pub const RUN_ROOT: &str = "/run/flotilla-testbed";

/// The directory under `RUN_ROOT` of the testbed with `tag`.
pub fn run_dir(tag: &str) -> Utf8PathBuf {
    Utf8Path::new(RUN_ROOT).join(format!("{}-{tag}", layout::PREFIX))
}

impl Paths {
    pub fn new(root: &Utf8Path, name: &TestbedName) -> Paths {
        let dir = root.join("beds").join(name.as_str());
        Paths {
            state: dir.join("state.json"),
            identity: dir.join("id_ed25519"),
            known_hosts: dir.join("known_hosts"),
            ssh_config: dir.join("ssh_config"),
            deployment: dir.join("deployment.toml"),
            deployment_v6: dir.join("deployment-v6.toml"),
            builder: dir.join("builder"),
            store: dir.join("store"),
            dir,
        }
    }

    pub fn node_dir(&self, node: &str) -> Utf8PathBuf {
        self.dir.join("nodes").join(node)
    }

    /// The builder sshd's authorized keys, in a root-owned directory of the testbed's own (see
    /// the module comment for why it is not under the testbed directory).
    pub fn builder_authorized_keys(tag: &str) -> Utf8PathBuf {
        run_dir(tag).join("authorized_keys")
    }

    pub fn builder_config(&self) -> Utf8PathBuf {
        self.builder.join("sshd_config")
    }
}

/// The commands the testbed runs, with the Debian package that provides each.
const REQUIRED: &[(&str, &str)] = &[
    ("debootstrap", "debootstrap"),
    ("systemd-nspawn", "systemd-container"),
    ("ssh", "openssh-client"),
    ("ssh-keygen", "openssh-client"),
    ("sshd", "openssh-server"),
    ("ip", "iproute2"),
    ("rsync", "rsync"),
];

/// debootstrap verifies the Debian archive with this keyring.
const KEYRING: (&str, &str) =
    ("/usr/share/keyrings/debian-archive-keyring.gpg", "debian-archive-keyring");

fn missing_packages() -> Vec<String> {
    missing_of(REQUIRED.iter().map(|(b, p)| (*b, *p)))
}

/// The packages of `tools` (command, package) whose command is missing, and the keyring's.
fn missing_of<'t>(tools: impl Iterator<Item = (&'t str, &'t str)>) -> Vec<String> {
    let mut missing: Vec<String> = tools
        .filter(|(bin, _)| find_command(bin).is_none())
        .map(|(_, pkg)| pkg.to_owned())
        .collect();
    if !Utf8Path::new(KEYRING.0).is_file() {
        missing.push(KEYRING.1.to_owned());
    }
    missing.sort();
    missing.dedup();
    missing
}

/// Looks a command up in PATH and in the sbin directories, which a non-login root shell may
/// not have in PATH.
fn find_command(name: &str) -> Option<Utf8PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let dirs = path.split(':').chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"]);
    let found = dirs.map(|d| Utf8Path::new(d).join(name)).find(|p| p.is_file());
    found
}

/// Installs what the testbed needs with apt (as root), then caches the Debian files the
/// manifest at `manifest` pins (when given), so that packaging in a test's fresh checkout finds
/// them there and never reaches the network.
pub fn prereqs(sh: &Shell, tb: &Testbeds<'_>, manifest: Option<&Utf8Path>) -> anyhow::Result<()> {
    install_packages(sh, tb)?;
    store::install(sh, tb)?;
    let Some(path) = manifest else { return Ok(()) };
    let manifest =
        flotilla_package::manifest::Manifest::load(path).with_context(|| format!("load {path}"))?;
    let cached =
        flotilla_package::prefetch_debs(&manifest, &|m| (tb.log)(&format!("testbed: {m}")))
            .map_err(|e| anyhow::anyhow!("prefetch the manifest's Debian files: {e}"))?;
    for file in cached {
        (tb.log)(&format!("testbed: cached {file}"));
    }
    Ok(())
}

fn install_packages(sh: &Shell, tb: &Testbeds<'_>) -> anyhow::Result<()> {
    let all = || {
        let extra = tb.extra_tools.iter().map(|(b, p)| (b.as_str(), p.as_str()));
        missing_of(REQUIRED.iter().map(|(b, p)| (*b, *p)).chain(extra))
    };
    let missing = all();
    if missing.is_empty() {
        (tb.log)("testbed: every prerequisite is installed");
        return Ok(());
    }
    let list = missing.join(" ");
    if !is_root() {
        bail!(
            "testbed prerequisites missing ({list}); install them as root: \
             `sudo apt-get update && sudo apt-get install -y {list}`"
        );
    }
    let _env = sh.push_env("DEBIAN_FRONTEND", "noninteractive");
    cmd!(sh, "apt-get update").run().context("apt-get update")?;
    cmd!(sh, "apt-get install -y --no-install-recommends {missing...}")
        .run()
        .with_context(|| format!("install the testbed's prerequisites ({list})"))?;
    let still = all();
    if !still.is_empty() {
        bail!("testbed prerequisites still missing after apt-get install: {}", still.join(" "));
    }
    Ok(())
}

fn require_root(what: &str) -> anyhow::Result<()> {
    if !is_root() {
        bail!(
            "testbed {what}: needs root (network namespaces, bridges and systemd-nspawn); \
             run it as root, for example `sudo -E cargo xtask testbed {what}`"
        );
    }
    Ok(())
}

/// Root and every package: what `up` needs before it creates anything.
fn preflight() -> anyhow::Result<()> {
    require_root("up")?;
    let missing = missing_packages();
    if !missing.is_empty() {
        bail!(
            "testbed up: missing packages {}; run `cargo xtask testbed prereqs` as root",
            missing.join(" ")
        );
    }
    Ok(())
}

/// The nodes of the testbed `name`, their addresses and whether sshd answers, as text.
pub fn status(tb: &Testbeds<'_>, name: &TestbedName) -> anyhow::Result<String> {
    use std::fmt::Write as _;
    let mut out = String::new();
    let paths = tb.paths(name);
    let Some(state) = State::load(&paths.state)? else {
        return Ok(format!("testbed {name}: not up (no state in {})\n", paths.dir));
    };
    let layout = Layout::new(name, state.nodes)?;
    let _ = writeln!(
        out,
        "testbed {name}: {} nodes, bridge {}, image {}",
        state.nodes, layout.bridge, state.image
    );
    let _ = writeln!(
        out,
        "{:<8} {:<16} {:<28} {:<9} {:<8} sshd",
        "node", "ipv4", "ipv6", "pid", "process"
    );
    for node in &layout.nodes {
        let pid = state.node_pids.iter().find(|(n, _)| *n == node.name).map(|(_, p)| *p);
        let alive = pid.is_some_and(|p| down::is_our_process(p, &node.machine));
        let sshd = sshd_answers(SocketAddr::new(node.ipv4.into(), 22), Duration::from_millis(500));
        let _ = writeln!(
            out,
            "{:<8} {:<16} {:<28} {:<9} {:<8} {}",
            node.name,
            node.ipv4,
            node.ipv6,
            pid.map_or("-".to_owned(), |p| p.to_string()),
            if alive { "running" } else { "gone" },
            if sshd { "answers" } else { "silent" }
        );
    }
    if let Some(b) = &state.builder {
        let sshd =
            sshd_answers(SocketAddr::from(([127, 0, 0, 1], b.port)), Duration::from_millis(500));
        let _ = writeln!(
            out,
            "builder  127.0.0.1:{} pid {} sshd {}",
            b.port,
            b.pid,
            if sshd { "answers" } else { "silent" }
        );
    }
    if let Some(store) = &state.store {
        let alive = down::is_our_process(store.pid, &store.marker);
        let _ = writeln!(
            out,
            "store    {} pid {} {}",
            store.endpoint,
            store.pid,
            if alive { "running" } else { "gone" }
        );
    }
    let _ = writeln!(out, "ssh config: {}", paths.ssh_config);
    Ok(out)
}

/// Opens an ssh session on a node of the testbed `name`, or runs `command` there.
pub fn ssh(
    sh: &Shell,
    tb: &Testbeds<'_>,
    name: &TestbedName,
    node: &str,
    command: &[String],
) -> anyhow::Result<()> {
    let paths = tb.paths(name);
    let Some(state) = State::load(&paths.state)? else {
        bail!("testbed {name}: not up; run `cargo xtask testbed up --name {name}`");
    };
    let layout = Layout::new(name, state.nodes)?;
    let known = node == render::BUILDER || layout.node(node.trim_end_matches("-v6")).is_some();
    if !known {
        let names: Vec<&str> = layout.nodes.iter().map(|n| n.name.as_str()).collect();
        bail!("testbed {name}: no node {node:?}; nodes are {} and builder", names.join(", "));
    }
    let config = &paths.ssh_config;
    // ssh joins its arguments with spaces for the remote shell, so each one is quoted here to
    // reach the remote command unchanged.
    let remote = (!command.is_empty()).then(|| flotilla_fling::quote::quote_words(command));
    let remote = remote.as_slice();
    cmd!(sh, "ssh -F {config} {node} {remote...}")
        .quiet()
        .run()
        .with_context(|| format!("testbed {name}: ssh {node}"))?;
    Ok(())
}

/// Whether this process runs as root, which the testbed needs.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Whether an ssh server answers at `addr` with its banner.
pub fn sshd_answers(addr: SocketAddr, timeout: Duration) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, timeout) else { return false };
    let _ = stream.set_read_timeout(Some(timeout));
    let mut banner = [0u8; 4];
    stream.read_exact(&mut banner).is_ok() && &banner == b"SSH-" && {
        // A polite end: identify ourselves so sshd does not log a protocol error.
        let _ = stream.write_all(b"SSH-2.0-flotilla-probe\r\n");
        true
    }
}
