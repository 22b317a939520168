//! `testbed up`: check, build the image if needed, record the state, then create the network,
//! the nodes and the builder's sshd, and wait until every sshd answers.

use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use camino::{Utf8Path, Utf8PathBuf};
use xshell::{cmd, Shell};

use super::layout::{clashing_route, Layout, NodeLayout, TestbedName};
use super::render::{self, AddressFamily, BuilderEntry, Files, NodeEntry};
use super::state::{self, State};
use super::{cgroups, down, image, preflight, sshd_answers, store, Paths, Testbeds};

/// How long nodes get to boot until their sshd answers.
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);

/// A testbed that came up: what `up` prints.
pub struct Up {
    pub name: String,
    /// Each node's name and addresses.
    pub nodes: Vec<(String, String, String)>,
    pub builder_port: Option<u16>,
    /// The artifact store, with `--store`.
    pub store: Option<store::StoreState>,
    pub paths: Paths,
    pub took: Duration,
}

/// What `up` boots.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    pub nodes: u32,
    /// Also start an S3-compatible artifact store and name it in the deployment configs.
    pub store: bool,
}

pub fn up(
    sh: &Shell,
    tb: &Testbeds<'_>,
    name: &TestbedName,
    options: Options,
) -> anyhow::Result<Up> {
    let root = &tb.root;
    let nodes = options.nodes;
    preflight()?;
    if options.store {
        // Checked before anything is created.
        store::require_weed()?;
    }
    let started = Instant::now();
    let layout = Layout::new(name, nodes)?;
    let paths = Paths::new(root, name);
    if paths.state.exists() {
        bail!(
            "testbed {name}: already up (state in {}); run `cargo xtask testbed down --name {name}` \
             first",
            paths.state
        );
    }
    let leftovers = down::system_names(Some(&layout.tag));
    if !leftovers.is_empty() {
        bail!(
            "testbed {name}: leftovers of an earlier run exist ({}); run `cargo xtask testbed down \
             --name {name}`",
            leftovers.join(", ")
        );
    }
    check_routes(sh, &layout)?;
    let image = image::ensure(sh, tb)?;

    std::fs::create_dir_all(&paths.dir).with_context(|| format!("create {}", paths.dir))?;
    let mut state = State {
        name: name.to_string(),
        nodes,
        image: image.clone(),
        node_pids: vec![],
        builder: None,
        store: None,
    };
    state.save(&paths.state)?;
    match create(sh, tb, &layout, &paths, &mut state, options.store) {
        Ok(()) => Ok(Up {
            name: name.to_string(),
            nodes: layout
                .nodes
                .iter()
                .map(|n| (n.name.clone(), n.ipv4.to_string(), n.ipv6.to_string()))
                .collect(),
            builder_port: state.builder.as_ref().map(|b| b.port),
            store: state.store.clone(),
            paths,
            took: started.elapsed(),
        }),
        Err(err) => {
            (tb.log)(&format!("testbed {name}: up failed, removing what it created"));
            if let Err(down_err) = down::down(sh, tb, name) {
                (tb.log)(&format!("testbed {name}: cleaning up also failed: {down_err:#}"));
            }
            Err(err)
        }
    }
}

/// Refuses a subnet that overlaps a route of this machine: addresses there would be ambiguous.
fn check_routes(sh: &Shell, layout: &Layout) -> anyhow::Result<()> {
    let v4 = cmd!(sh, "ip -4 route show table all").quiet().read().context("list IPv4 routes")?;
    let v6 = cmd!(sh, "ip -6 route show table all").quiet().read().context("list IPv6 routes")?;
    let (net4, len4) = layout.net_v4();
    let (net6, len6) = layout.net_v6();
    let clash = clashing_route(&v4, (u128::from(u32::from(net4)), len4), false)
        .map(|r| (format!("{net4}/{len4}"), r))
        .or_else(|| {
            clashing_route(&v6, (u128::from(net6), len6), true)
                .map(|r| (format!("{net6}/{len6}"), r))
        });
    if let Some((net, route)) = clash {
        bail!(
            "testbed {}: its subnet {net} overlaps the route `{route}` of this machine; choose \
             another --name (the subnet is derived from it)",
            layout.name
        );
    }
    Ok(())
}

fn create(
    sh: &Shell,
    tb: &Testbeds<'_>,
    layout: &Layout,
    paths: &Paths,
    state: &mut State,
    with_store: bool,
) -> anyhow::Result<()> {
    let name = &layout.name;
    keygen(sh, &paths.identity, &format!("flotilla-testbed-{name}"))?;
    let client_key = read(&paths.identity.with_extension("pub"))?;

    // Every node's identity is made before any node boots, so every node's known_hosts (for
    // node-to-node hops) and the user's are complete from the start.
    let mut host_keys = Vec::new();
    for node in &layout.nodes {
        host_keys.push(prepare_node(sh, layout, node, paths, &client_key)?);
    }
    let entries: Vec<NodeEntry<'_>> = layout
        .nodes
        .iter()
        .zip(&host_keys)
        .map(|(n, key)| NodeEntry { name: &n.name, ipv4: n.ipv4, ipv6: n.ipv6, host_key: key })
        .collect();
    let nodes_known_hosts = render::known_hosts(&entries, None);
    for node in &layout.nodes {
        let file = paths.node_dir(&node.name).join("upper/root/.ssh/known_hosts");
        write_mode(&file, &nodes_known_hosts, 0o644)?;
    }

    create_network(sh, layout)?;
    // The store starts first and gets ready while the nodes boot.
    let mut store_child = None;
    if with_store {
        let run_dir = super::run_dir(&layout.tag).join("store");
        let (child, started) = store::start(sh, layout.bridge_v4, &paths.store, &run_dir)?;
        state.store = Some(started);
        state.save(&paths.state)?;
        store_child = Some(child);
    }
    let mut children = Vec::new();
    for node in &layout.nodes {
        let child = boot(sh, node, paths, &state.image)?;
        state.node_pids.push((node.name.clone(), child.id()));
        state.save(&paths.state)?;
        children.push(child);
    }
    let (builder_child, builder_key, port) = start_builder(sh, paths, &layout.tag, &client_key)?;
    state.builder = Some(state::Builder { port, pid: builder_child.id() });
    state.save(&paths.state)?;

    // Not created here: fling creates the builder's copy of the workspace itself, with the
    // marker that lets `sync` fill it.
    let source_path = paths.builder.join("flotilla");
    let builder =
        BuilderEntry { port, username: "root", host_key: &builder_key, source_path: &source_path };
    let files = Files {
        identity: &paths.identity,
        known_hosts: &paths.known_hosts,
        ssh_config: &paths.ssh_config,
    };
    write_mode(&paths.known_hosts, &render::known_hosts(&entries, Some(&builder)), 0o644)?;
    write_mode(
        &paths.ssh_config,
        &render::ssh_config(name.as_str(), &entries, Some(&builder), &files),
        0o644,
    )?;
    let root = &tb.workspace;
    // What the workspace says of its own system (its overlay services, its install prefix)
    // comes from its example config, so the testbed deploys any workspace as that one would.
    let system = render::system_tables(root)?;
    for (file, family) in
        [(&paths.deployment, AddressFamily::V4), (&paths.deployment_v6, AddressFamily::V6)]
    {
        let mut text = render::with_system(
            &render::deployment(name.as_str(), root, &entries, &builder, &files, family),
            &system,
        );
        if let Some(store) = &state.store {
            text.push_str(&store.artifacts_table());
        }
        write_mode(file, &text, 0o644)?;
    }

    wait_for_sshd(layout, paths, &mut children, port)?;
    check_ssh(sh, layout, paths)?;
    if let (Some(child), Some(started)) = (store_child.as_mut(), &state.store) {
        store::wait_until_ready(child, started, &paths.store)?;
    }
    Ok(())
}

/// Writes a node's overlay layer: hostname, hosts, machine id, host key, authorized_keys.
fn prepare_node(
    sh: &Shell,
    layout: &Layout,
    node: &NodeLayout,
    paths: &Paths,
    client_key: &str,
) -> anyhow::Result<String> {
    let upper = paths.node_dir(&node.name).join("upper");
    for dir in ["etc/ssh", "root/.ssh"] {
        std::fs::create_dir_all(upper.join(dir))
            .with_context(|| format!("create {upper}/{dir}"))?;
    }
    // The layer's directories replace the image's attributes; keep those the image has.
    set_mode(&upper, 0o755)?;
    set_mode(&upper.join("root"), 0o700)?;
    set_mode(&upper.join("root/.ssh"), 0o700)?;
    write_mode(&upper.join("etc/hostname"), &format!("{}\n", node.name), 0o644)?;
    let mut hosts =
        format!("127.0.0.1\tlocalhost\n127.0.1.1\t{}\n::1\tlocalhost ip6-localhost\n", node.name);
    for other in &layout.nodes {
        hosts.push_str(&format!(
            "{}\t{}\n{}\t{}-v6\n",
            other.ipv4, other.name, other.ipv6, other.name
        ));
    }
    write_mode(&upper.join("etc/hosts"), &hosts, 0o644)?;
    write_mode(&upper.join("etc/machine-id"), &format!("{}\n", random_hex(16)?), 0o444)?;
    write_mode(&upper.join("root/.ssh/authorized_keys"), client_key, 0o600)?;
    let host_key = upper.join("etc/ssh/ssh_host_ed25519_key");
    keygen(sh, &host_key, &format!("root@{}", node.name))?;
    read(&host_key.with_extension("pub"))
}

fn create_network(sh: &Shell, layout: &Layout) -> anyhow::Result<()> {
    let bridge = &layout.bridge;
    let (v4, v6) = (format!("{}/24", layout.bridge_v4), format!("{}/64", layout.bridge_v6));
    let step = |what: &str, cmd: xshell::Cmd<'_>| -> anyhow::Result<()> {
        let out = cmd.quiet().ignore_status().output()?;
        if !out.status.success() {
            bail!(
                "testbed {}: {what}: {}",
                layout.name,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    };
    step("create bridge", cmd!(sh, "ip link add {bridge} type bridge"))?;
    step("address bridge", cmd!(sh, "ip addr add {v4} dev {bridge}"))?;
    step("address bridge", cmd!(sh, "ip -6 addr add {v6} dev {bridge} nodad"))?;
    step("start bridge", cmd!(sh, "ip link set {bridge} up"))?;
    for node in &layout.nodes {
        let (ns, veth) = (&node.netns, &node.veth);
        let (v4, v6) = (format!("{}/24", node.ipv4), format!("{}/64", node.ipv6));
        let what = |step: &str| format!("{} {step}", node.name);
        step(&what("create namespace"), cmd!(sh, "ip netns add {ns}"))?;
        step(
            &what("create veth"),
            cmd!(sh, "ip link add {veth} type veth peer name eth0 netns {ns}"),
        )?;
        step(&what("attach veth"), cmd!(sh, "ip link set {veth} master {bridge} up"))?;
        step(&what("address eth0"), cmd!(sh, "ip -n {ns} addr add {v4} dev eth0"))?;
        step(&what("address eth0"), cmd!(sh, "ip -n {ns} -6 addr add {v6} dev eth0 nodad"))?;
        step(&what("start eth0"), cmd!(sh, "ip -n {ns} link set eth0 up"))?;
        step(&what("start lo"), cmd!(sh, "ip -n {ns} link set lo up"))?;
    }
    Ok(())
}

/// Starts a node's systemd-nspawn in the background, logging its console to a file.
fn boot(sh: &Shell, node: &NodeLayout, paths: &Paths, image: &Utf8Path) -> anyhow::Result<Child> {
    let dir = paths.node_dir(&node.name);
    let overlay = format!("--overlay={image}:{}:/", dir.join("upper"));
    let machine = &node.machine;
    let netns = format!("--network-namespace-path=/run/netns/{}", node.netns);
    let log = dir.join("console.log");
    // With --keep-unit and no machined, nspawn hands the container its caller's cgroup: nodes
    // booted side by side would share one, and each node's systemd would create and remove
    // the same unit cgroups as the others (units fail at random with status 219/CGROUP). So
    // each node starts in a cgroup of its own, joined by a shell that then execs nspawn, which
    // keeps the pid recorded for `down`.
    let cgroups = cgroups::create(machine)?;
    let join = r#"for procs in "$@"; do [ "$procs" = -- ] && break; echo $$ > "$procs" || exit 1; shift; done; shift; exec "$@""#;
    let cmd = cmd!(
        sh,
        "sh -c {join} flotilla-node {cgroups...} -- systemd-nspawn -q -D {image} {overlay} --register=no --keep-unit -b -M {machine} {netns} --console=read-only"
    )
    // Every node boots the same image directory, which nspawn would otherwise lock for one.
    .env("SYSTEMD_NSPAWN_LOCK", "0");
    spawn(cmd, &log).with_context(|| format!("testbed: boot {} (console log {log})", node.name))
}

/// Starts the builder's sshd on a free loopback port: this machine, as `cargo xtask fling`
/// reaches its builder, with its own host key and only the testbed key authorized.
fn start_builder(
    sh: &Shell,
    paths: &Paths,
    tag: &str,
    client_key: &str,
) -> anyhow::Result<(Child, String, u16)> {
    let dir = &paths.builder;
    std::fs::create_dir_all(dir)?;
    set_mode(dir, 0o700)?;
    let host_key = dir.join("ssh_host_ed25519_key");
    keygen(sh, &host_key, "flotilla-testbed-builder")?;
    let authorized = Paths::builder_authorized_keys(tag);
    let run_dir = authorized.parent().expect("authorized_keys has a directory");
    std::fs::create_dir_all(run_dir).with_context(|| format!("create {run_dir}"))?;
    set_mode(run_dir, 0o700)?;
    write_mode(&authorized, client_key, 0o600)?;
    // sshd needs its privilege separation directory, which only its own service unit creates.
    std::fs::create_dir_all("/run/sshd").context("create /run/sshd")?;
    let port = free_port()?;
    let config = paths.builder_config();
    let text = format!(
        "# The builder of testbed {}: this machine over loopback.\nPort {port}\nListenAddress 127.0.0.1\n\
         HostKey {host_key}\nAuthorizedKeysFile {authorized}\nPermitRootLogin prohibit-password\n\
         PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n\
         AllowAgentForwarding yes\nPidFile none\nSubsystem sftp internal-sftp\n",
        paths.dir
    );
    write_mode(&config, &text, 0o600)?;
    let sshd = super::find_command("sshd").context("find sshd")?;
    let log = dir.join("sshd.log");
    let child = spawn(cmd!(sh, "{sshd} -D -e -f {config}"), &log)
        .with_context(|| format!("testbed: start the builder's sshd (log {log})"))?;
    Ok((child, read(&host_key.with_extension("pub"))?, port))
}

pub(crate) fn spawn(cmd: xshell::Cmd<'_>, log: &Utf8Path) -> anyhow::Result<Child> {
    let log_file = std::fs::File::create(log).with_context(|| format!("create {log}"))?;
    let mut command = std::process::Command::from(cmd);
    command.stdin(Stdio::null()).stdout(log_file.try_clone()?).stderr(log_file);
    // Its own process group keeps a Ctrl-C meant for `cargo xtask` from reaching the testbed,
    // which lives until `down`.
    command.process_group(0);
    Ok(command.spawn()?)
}

fn wait_for_sshd(
    layout: &Layout,
    paths: &Paths,
    children: &mut [Child],
    builder_port: u16,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + BOOT_TIMEOUT;
    let mut pending: Vec<usize> = (0..layout.nodes.len()).collect();
    let mut builder_up = false;
    while !pending.is_empty() || !builder_up {
        if !builder_up {
            builder_up =
                sshd_answers(([127, 0, 0, 1], builder_port).into(), Duration::from_millis(200));
        }
        let mut still = Vec::new();
        for i in pending {
            let node = &layout.nodes[i];
            if let Some(status) = children[i].try_wait()? {
                let log = paths.node_dir(&node.name).join("console.log");
                let tail = std::fs::read_to_string(&log).unwrap_or_default();
                let tail: Vec<&str> =
                    tail.lines().rev().take(10).collect::<Vec<_>>().into_iter().rev().collect();
                bail!(
                    "testbed: {} stopped while booting ({status}); console log {log}:\n{}",
                    node.name,
                    tail.join("\n")
                );
            }
            if !sshd_answers((node.ipv4, 22).into(), Duration::from_millis(200)) {
                still.push(i);
            }
        }
        pending = still;
        if Instant::now() > deadline {
            let names: Vec<&str> = pending.iter().map(|&i| layout.nodes[i].name.as_str()).collect();
            bail!(
                "testbed: sshd did not answer within {} s on {}{}",
                BOOT_TIMEOUT.as_secs(),
                names.join(", "),
                if builder_up { "" } else { " and the builder" }
            );
        }
        if !pending.is_empty() || !builder_up {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(())
}

/// Logs in to every node and the builder once with the written files, concurrently, so `up`
/// only succeeds when strict host key checking and key login really work.
fn check_ssh(sh: &Shell, layout: &Layout, paths: &Paths) -> anyhow::Result<()> {
    let config = &paths.ssh_config;
    let hosts: Vec<&str> =
        layout.nodes.iter().map(|n| n.name.as_str()).chain([render::BUILDER]).collect();
    std::thread::scope(|scope| {
        let handles: Vec<_> = hosts
            .iter()
            .map(|host| {
                let sh = sh.clone();
                scope.spawn(move || {
                    cmd!(sh, "ssh -F {config} -o BatchMode=yes {host} true")
                        .quiet()
                        .ignore_stdout()
                        .read_stderr()
                })
            })
            .collect();
        for (host, handle) in hosts.iter().zip(handles) {
            let result = handle.join().expect("ssh check thread panicked");
            if let Err(err) = result {
                bail!("testbed: ssh to {host} with {config} failed: {err}");
            }
        }
        Ok(())
    })
}

impl std::fmt::Display for Up {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = &self.name;
        let count = self.nodes.len();
        let plural = if count == 1 { "" } else { "s" };
        writeln!(f, "testbed {name}: {count} node{plural} up in {:.1} s", self.took.as_secs_f64())?;
        for (node, ipv4, ipv6) in &self.nodes {
            writeln!(f, "  {node:<8} {ipv4:<16} {ipv6}")?;
        }
        if let Some(port) = self.builder_port {
            writeln!(f, "  {:<8} 127.0.0.1:{port}", render::BUILDER)?;
        }
        if let Some(store) = &self.store {
            writeln!(f, "  {:<8} {} (S3, bucket {})", "store", store.endpoint, store::BUCKET)?;
        }
        writeln!(f, "ssh config:    {}", self.paths.ssh_config)?;
        writeln!(f, "known_hosts:   {}", self.paths.known_hosts)?;
        writeln!(f, "ssh key:       {}", self.paths.identity)?;
        writeln!(f, "deployment:    {}", self.paths.deployment)?;
        writeln!(f, "deployment v6: {}", self.paths.deployment_v6)?;
        write!(f, "try: cargo xtask testbed ssh --name {name} node1 -- systemctl is-system-running")
    }
}

/// Makes an ed25519 key pair. ssh-keygen writes to temporary names renamed into place, so a
/// half-written key is never found at the real path.
fn keygen(sh: &Shell, path: &Utf8Path, comment: &str) -> anyhow::Result<()> {
    let tmp = Utf8PathBuf::from(format!("{path}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let _ = std::fs::remove_file(format!("{tmp}.pub"));
    let empty = "";
    cmd!(sh, "ssh-keygen -q -t ed25519 -N {empty} -C {comment} -f {tmp}")
        .quiet()
        .ignore_stdout()
        .run()
        .with_context(|| format!("generate the ssh key {path}"))?;
    std::fs::rename(format!("{tmp}.pub"), format!("{path}.pub"))?;
    std::fs::rename(&tmp, path).with_context(|| format!("rename {tmp} to {path}"))?;
    Ok(())
}

/// Writes a file with a mode through a temporary name and a rename.
pub(crate) fn write_mode(path: &Utf8Path, text: &str, mode: u32) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = Utf8PathBuf::from(format!("{path}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("create {tmp}"))?;
    file.write_all(text.as_bytes()).with_context(|| format!("write {tmp}"))?;
    drop(file);
    set_mode(&tmp, mode)?;
    std::fs::rename(&tmp, path).with_context(|| format!("rename {tmp} to {path}"))?;
    Ok(())
}

pub(crate) fn set_mode(path: &Utf8Path, mode: u32) -> anyhow::Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("set the mode of {path}"))
}

fn read(path: &Utf8Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("read {path}"))
}

pub(crate) fn random_hex(bytes: usize) -> anyhow::Result<String> {
    use std::io::Read as _;
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .context("read /dev/urandom")?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

fn free_port() -> anyhow::Result<u16> {
    // The port is free now; sshd binds it a few milliseconds later, and a loser of that race
    // fails `up` with sshd's log rather than connecting to a stranger.
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").context("find a free loopback port")?;
    Ok(listener.local_addr()?.port())
}
