//! `cargo xtask demo`: the whole system on a three-node testbed in one command.
//!
//! It drives the same commands a user types, through this very binary: `testbed up`, then
//! `fling install-prereqs`, `sync`, `build package`, `overlay` and `install` (which waits for
//! every service's health check), then prints the nodes, their services and each control
//! plane's rack unlock, then upgrades etcd with `install --rolling` while a client writes every
//! 50 ms, and prints that no write failed. The testbed is torn down at the end, even on failure, unless `--keep`.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use camino::Utf8PathBuf;
use flotilla_cli::cli::{FlingArgs, FlingCommand, FlingDeployCommand};
use flotilla_cli::Context;
use flotilla_fling::config::Config;
use flotilla_testbed::TestbedName;
use xshell::{cmd, Shell};

/// The demo's testbed name, distinct from the default one a user may have up.
const NAME: &str = "demo";
/// How many nodes the demo boots: the smallest cluster in which one node may fail.
const NODES: u32 = 3;
/// The control plane's HTTP port (see `smf/control-plane/config.toml`).
const CONTROL_PLANE_PORT: u16 = 12221;
/// How long the control planes get to gather the shares after the deploy.
const UNLOCK_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Leave the testbed up at the end (`cargo xtask testbed down --name demo` removes it).
    #[arg(long)]
    pub keep: bool,
}

pub fn run(sh: &Shell, ctx: &Context, args: DemoArgs) -> anyhow::Result<()> {
    if !cfg!(target_os = "linux") {
        bail!("cargo xtask demo: the testbed needs Linux (network namespaces and systemd-nspawn)");
    }
    if !flotilla_testbed::is_root() {
        bail!(
            "cargo xtask demo: run as root (it creates network namespaces and boots containers); \
             without root, `cargo xtask package` builds the packages"
        );
    }
    // A newcomer's first command: install what the testbed needs rather than send them to
    // another command first (a no-op when everything is there).
    flotilla_cli::testbed::prereqs(sh, ctx).context("install the testbed's prerequisites")?;
    let testbeds = flotilla_cli::testbed::testbeds(ctx);
    let name = TestbedName::new(NAME)?;
    step(&format!("boot a testbed of {NODES} nodes ({NAME})"));
    let _teardown = Teardown { sh, ctx, keep: args.keep };
    let up = flotilla_testbed::up(sh, &testbeds, &name, NODES).context("testbed up")?;
    println!("{up}");
    let config_path = up.paths.deployment.clone();

    let fling = |what: &str, command: FlingCommand| -> anyhow::Result<()> {
        step(what);
        let args = FlingArgs::new(config_path.clone(), command);
        match flotilla_cli::fling::run_code(sh, ctx, args)? {
            0 => Ok(()),
            code => bail!("{what}: fling exited with {code}"),
        }
    };
    fling("check the builder and the servers", FlingCommand::InstallPrereqs)?;
    fling("copy the workspace to the builder", FlingCommand::Sync)?;
    fling(
        "build the packages on the builder",
        FlingCommand::Build { command: flotilla_cli::cli::FlingBuildCommand::package() },
    )?;
    fling(
        "generate each server's overlay (shares, TLS, configs)",
        FlingCommand::Overlay { generate_here: false, rotate: false },
    )?;
    fling(
        "install on every server and wait for health",
        FlingCommand::Install { rollout: Default::default() },
    )?;
    fling(
        "every server's release and services",
        FlingCommand::Deploy { command: FlingDeployCommand::Status },
    )?;

    step("the rack unlock, as each control plane reports it");
    let config = Config::load(&config_path)?;
    let unlocked = wait_for_unlock(&config)?;
    println!();
    for (server, message) in &unlocked {
        println!("  {server}: {message}");
    }
    etcd_health(sh, &config)?;

    step("upgrade etcd with a rolling install while a client writes every 50 ms");
    let up = crate::upgrade::upgrade(sh, ctx, &config_path, true, "demo")?;
    let load = &up.load;
    println!(
        "\n  rolling upgrade of etcd on {NODES} nodes in {:.1} s: {} writes, {} failed ({} \
         retried once after a timeout), longest gap between writes {} ms",
        up.deploy.as_secs_f64(),
        load.writes,
        load.failed,
        load.retried,
        load.longest_outage.as_millis()
    );
    if up.exit_code != 0 {
        bail!("the rolling install exited with {}", up.exit_code);
    }
    if load.failed > 0 {
        bail!("{} writes failed during the rolling upgrade: {:?}", load.failed, load.errors);
    }
    println!("  no write failed: the cluster kept its quorum throughout");
    if args.keep {
        println!(
            "\nthe testbed stays up: `cargo xtask testbed ssh --name {NAME} node1`, \
             `cargo xtask fling --config {config_path} deploy status`, and \
             `cargo xtask testbed down --name {NAME}` when done"
        );
    }
    Ok(())
}

/// Prints the etcd cluster's health as `etcdctl` (from `etcd-client`, which the prerequisites
/// install) sees it from here, with the cluster CA and the first server's client certificate
/// from the overlay on the builder, which for a testbed is this machine.
fn etcd_health(sh: &Shell, config: &Config) -> anyhow::Result<()> {
    step("the etcd cluster's health, as etcdctl sees it with the cluster CA");
    let flotilla_fling::quote::RemotePath::Absolute(source) = &config.builder.source_path else {
        bail!("the testbed's builder keeps its workspace at an absolute path");
    };
    let Some(first) = config.deployment.servers.first() else { return Ok(()) };
    let tls = Utf8PathBuf::from(source)
        .join("out/overlay")
        .join(first.as_str())
        .join("opt/flotilla/etcd/pkg/tls");
    let (ca, cert, key) = (tls.join("ca.crt"), tls.join("node.crt"), tls.join("node.key"));
    let endpoints: Vec<String> = config
        .deployment
        .servers
        .iter()
        .map(|name| format!("https://{}:2379", config.server(name).addr.for_rsync()))
        .collect();
    let endpoints = format!("--endpoints={}", endpoints.join(","));
    cmd!(
        sh,
        "etcdctl --cacert {ca} --cert {cert} --key {key} {endpoints} --dial-timeout=5s endpoint health --cluster"
    )
    .env("ETCDCTL_API", "3")
    .run()
    .context("etcdctl endpoint health --cluster")?;
    Ok(())
}

/// Polls every server's control plane until each reports the rack unlocked, and returns each
/// one's message (`rack unlocked (2 of 3)`).
fn wait_for_unlock(config: &Config) -> anyhow::Result<Vec<(String, String)>> {
    let deadline = Instant::now() + UNLOCK_TIMEOUT;
    let mut done = Vec::new();
    for name in &config.deployment.servers {
        let host = config.server(name).addr.for_rsync();
        let address = format!("{host}:{CONTROL_PLANE_PORT}");
        loop {
            let last = match get_json(&address, "/status") {
                Ok(status) if status["rack"]["state"] == "unlocked" => {
                    let message = status["rack"]["message"].as_str().unwrap_or("").to_owned();
                    done.push((name.as_str().to_owned(), message));
                    break;
                }
                Ok(status) => status["rack"]["message"].as_str().unwrap_or("no rack").to_owned(),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() > deadline {
                bail!("the control plane of {name} did not unlock the rack: {last}");
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    Ok(done)
}

/// A GET over plain HTTP/1.1 returning the parsed JSON body.
pub fn get_json(address: &str, path: &str) -> anyhow::Result<serde_json::Value> {
    let addr = address
        .to_socket_addrs()
        .with_context(|| format!("resolve {address}"))?
        .next()
        .with_context(|| format!("resolve {address}: no address"))?;
    let timeout = Duration::from_secs(5);
    let mut stream = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("connect to {address}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n")
        .with_context(|| format!("GET {path} from {address}"))?;
    let mut raw = Vec::new();
    stream
        .take(1 << 20)
        .read_to_end(&mut raw)
        .with_context(|| format!("GET {path} from {address}"))?;
    let text = String::from_utf8_lossy(&raw);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!("GET {path} from {address}: an incomplete response");
    };
    if !head.starts_with("HTTP/1.1 200") {
        bail!("GET {path} from {address}: {}", head.lines().next().unwrap_or_default());
    }
    serde_json::from_str(body).with_context(|| format!("GET {path} from {address}: not JSON"))
}

fn step(what: &str) {
    println!("\n==> {what}");
}

/// Tears the demo's testbed down when the demo ends, however it ends, unless `--keep`.
struct Teardown<'a> {
    sh: &'a Shell,
    ctx: &'a Context,
    keep: bool,
}

impl Drop for Teardown<'_> {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        step(&format!("tear the testbed down ({NAME})"));
        let testbeds = flotilla_cli::testbed::testbeds(self.ctx);
        let down = TestbedName::new(NAME)
            .and_then(|name| flotilla_testbed::down(self.sh, &testbeds, &name));
        if let Err(e) = down {
            eprintln!(
                "error: tear the demo testbed down: {e:#}; run `cargo xtask testbed down --name {NAME}`"
            );
        }
    }
}
