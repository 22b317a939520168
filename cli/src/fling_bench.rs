//! `fling bench`: `deploy install` to 1, 4 and 8 servers next to the plainest baseline, and a
//! no-op `deploy plan` next to a no-op redeploy, in
//! one run, on a testbed whose builder is this machine.
//!
//! The baseline does, per host and all hosts in parallel, what a shell script would: `ssh
//! mkdir`, `scp` the tarballs, `ssh` extract + install the units + restart. It checks nothing.
//! fling is timed as a user runs it: a whole `cargo xtask fling ... install` (run in this
//! process, through the same entry point as the command line), from reading the config to the
//! report, including its own connection to the builder.
//!
//! With `[artifacts]` in the config, the tables above push (the bench's configs leave the
//! store out), and two more compare the builder's egress of a deploy that pushes with one
//! through the store: to fresh servers (no installer either), and a new release to servers
//! that have the installer and lack the packages (after `deploy clean`). Each shows what ssh
//! carried (rsync's counters, plus the fetch lists), what was uploaded to the store (under a
//! key prefix of the run's own, so every object is uploaded), and the deploy's time. The
//! scripts' own text over ssh is counted on neither side.

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use camino::{Utf8Path, Utf8PathBuf};
use xshell::{cmd, Shell};

use flotilla_fling::config::{Config, Server};

use crate::cli::{FlingArgs, FlingCommand};

/// One row of the egress table: push against store, to `nodes` servers in one state.
struct Egress {
    nodes: usize,
    push: Duration,
    push_ssh: u64,
    store: Duration,
    /// rsync's counters plus the fetch lists the builder sent the servers.
    store_ssh: u64,
    uploaded: u64,
}

/// One row of the result table.
struct Row {
    nodes: usize,
    fling: Duration,
    fling_sent: u64,
    connections: Option<f64>,
    noop: Duration,
    noop_sent: u64,
    /// `deploy plan` with nothing to do, right after the no-op redeploy.
    plan: Duration,
    baseline: Duration,
}

pub fn run(
    sh: &Shell,
    ctx: &crate::Context,
    config: &Config,
    config_path: &Utf8Path,
    nodes: &[usize],
    runs: usize,
) -> anyhow::Result<()> {
    let builder = config.builder_server();
    if !matches!(builder.addr.for_ssh().as_str(), "127.0.0.1" | "::1" | "localhost") {
        bail!("fling bench: the baseline runs from the builder's files, so the builder must be this machine (as on a testbed), not {}", builder.addr);
    }
    let source = config
        .builder
        .source_path
        .local()
        .map_err(|e| anyhow::anyhow!("builder.source_path: {e}"))?;
    let mut tarballs: Vec<Utf8PathBuf> = std::fs::read_dir(source.join("out"))
        .with_context(|| format!("read {source}/out: run `fling build package` first"))?
        .filter_map(|e| Utf8PathBuf::try_from(e.ok()?.path()).ok())
        .filter(|p| p.as_str().ends_with(".tar.gz"))
        .collect();
    tarballs.sort();
    if tarballs.is_empty() {
        bail!("no packages under {source}/out: run `fling build package` first");
    }
    let payload: u64 = tarballs.iter().filter_map(|p| p.metadata().ok()).map(|m| m.len()).sum();

    for &n in nodes {
        if n == 0 || n > config.deployment.servers.len() {
            bail!(
                "fling bench: --nodes {n}: the config has {} deployment servers",
                config.deployment.servers.len()
            );
        }
    }
    let scratch = Scratch::new()?;
    let mut rows = Vec::new();
    let mut fresh_rows = Vec::new();
    let mut release_rows = Vec::new();
    for &n in nodes {
        let servers: Vec<&Server> =
            config.deployment.servers[..n].iter().map(|s| config.server(s)).collect();
        let names = servers.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(",");
        // The first n servers are a cluster of their own (a database's members, the rack
        // secret's shares): a config that names only them, and their overlay generated from it.
        let config_path = &first_servers_config(config, n, &scratch.0, None)?;
        overlay(sh, ctx, config_path)?;
        let mut samples = Vec::new();
        for _ in 0..runs {
            // Start from nothing installed: fling's releases and the baseline's files gone,
            // and no service data of a cluster with other members.
            let _ = fling(sh, ctx, config_path, &names, "uninstall");
            baseline_clean(sh, config, &servers);

            let accepted_before = count_accepted(sh, config, &servers);
            let (fling_time, fling_sent) = fling(sh, ctx, config_path, &names, "install")?;
            let connections = match (accepted_before, count_accepted(sh, config, &servers)) {
                // The counting session itself is one accepted connection per host.
                (Some(before), Some(after)) => Some((after - before) as f64 / n as f64 - 1.0),
                _ => None,
            };
            let (noop, noop_sent) = fling(sh, ctx, config_path, &names, "install")?;
            // A plan with nothing to do, between two no-op redeploys; the faster of those is
            // its yardstick.
            let (plan, _) = fling(sh, ctx, config_path, &names, "plan")?;
            let (noop_again, _) = fling(sh, ctx, config_path, &names, "install")?;
            let noop = noop.min(noop_again);
            let _ = fling(sh, ctx, config_path, &names, "uninstall");

            let baseline = baseline(sh, config, &servers, &tarballs)?;
            baseline_clean(sh, config, &servers);
            samples.push(Row {
                nodes: n,
                fling: fling_time,
                fling_sent,
                connections,
                noop,
                noop_sent,
                plan,
                baseline,
            });
        }
        samples.sort_by_key(|r| r.fling);
        rows.push(samples.swap_remove(samples.len() / 2));
        if let Some(store) = &config.artifacts {
            let mut fresh = Vec::new();
            let mut release = Vec::new();
            for run in 0..runs {
                let target = EgressTarget { config, store, n, run, names: &names };
                let (f, r) = egress(sh, ctx, &target, &scratch.0, &source)?;
                fresh.push(f);
                release.push(r);
            }
            for (mut samples, rows) in [(fresh, &mut fresh_rows), (release, &mut release_rows)] {
                samples.sort_by_key(|r| r.store);
                rows.push(samples.swap_remove(samples.len() / 2));
            }
        }
    }
    // Leave the overlay of the whole deployment, as `fling overlay` made it.
    overlay(sh, ctx, config_path)?;

    println!(
        "\npayload: {} packages, {:.1} MB, plus the installer; median of {runs} run(s)\n",
        tarballs.len(),
        payload as f64 / 1e6
    );
    println!(
        "| nodes | fling install | sent | ssh conns/host | no-op redeploy | sent | no-op deploy plan | plan / no-op | baseline (ssh+scp+ssh) |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for r in &rows {
        println!(
            "| {} | {:.2} s | {:.1} MB | {} | {:.2} s | {:.1} kB | {:.2} s | {:.2}x | {:.2} s |",
            r.nodes,
            r.fling.as_secs_f64(),
            r.fling_sent as f64 / 1e6,
            r.connections.map_or("?".into(), |c| format!("{c:.1}")),
            r.noop.as_secs_f64(),
            r.noop_sent as f64 / 1e3,
            r.plan.as_secs_f64(),
            r.plan.as_secs_f64() / r.noop.as_secs_f64(),
            r.baseline.as_secs_f64()
        );
    }
    if !fresh_rows.is_empty() {
        let installer = source.join("target/release").join(flotilla_fling::plan::INSTALLER);
        let installer_size = installer.metadata().map(|m| m.len()).unwrap_or(0);
        let one = payload + installer_size;
        println!(
            "\nbuilder egress, push against the store: what left the builder over ssh (rsync's \
             counters; through the store, plus the fetch lists) and to the store (uploads under \
             a key prefix of the run's own, so every object is uploaded); one server's payload \
             is {:.1} MB ({:.1} MB packages + {:.1} MB installer)",
            one as f64 / 1e6,
            payload as f64 / 1e6,
            installer_size as f64 / 1e6
        );
        for (title, rows) in [
            ("fresh servers (nothing installed, no installer)", &fresh_rows),
            (
                "a new release to servers that have the installer and no staged packages \
                 (after `deploy clean`)",
                &release_rows,
            ),
        ] {
            println!("\n{title}\n");
            println!(
                "| nodes | push: ssh | push: time | store: upload | store: ssh | store: time | egress push / one payload | egress store / one payload |"
            );
            println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
            for r in rows {
                println!(
                    "| {} | {:.1} MB | {:.2} s | {:.1} MB | {:.1} kB | {:.2} s | {:.2}x | {:.2}x |",
                    r.nodes,
                    r.push_ssh as f64 / 1e6,
                    r.push.as_secs_f64(),
                    r.uploaded as f64 / 1e6,
                    r.store_ssh as f64 / 1e3,
                    r.store.as_secs_f64(),
                    r.push_ssh as f64 / one as f64,
                    (r.uploaded + r.store_ssh) as f64 / one as f64
                );
            }
        }
    }
    Ok(())
}

/// The first `n` servers of a config with a store, for one egress sample.
struct EgressTarget<'a> {
    config: &'a Config,
    store: &'a flotilla_fling::config::Store,
    n: usize,
    run: usize,
    names: &'a str,
}

/// Two egress samples for the first `n` servers, each a deploy that pushes next to one
/// through the store with every object uploaded under a fresh key prefix: to fresh servers
/// (uninstalled: no release, no staging directory, no installer), then a new release to
/// servers that have the installer and lack the packages (`deploy clean` removes them, as
/// between two releases). Uninstalled at the end.
fn egress(
    sh: &Shell,
    ctx: &crate::Context,
    target: &EgressTarget<'_>,
    dir: &Utf8Path,
    source: &Utf8Path,
) -> anyhow::Result<(Egress, Egress)> {
    let EgressTarget { config, store, n, run, names } = *target;
    let push_config = first_servers_config(config, n, dir, None)?;
    let installer = source.join("target/release").join(flotilla_fling::plan::INSTALLER);
    // Every object uploaded again under a prefix of this sample's own; the size of the fetch
    // list a deploy sends each server (its URLs are as long as the deploy's).
    let upload = |tag: &str| -> anyhow::Result<(Utf8PathBuf, u64, u64)> {
        let prefix = format!("{}/bench-{}-{n}-{run}-{tag}", store.prefix, std::process::id());
        let prefix = prefix.trim_start_matches('/').to_owned();
        let store_config = first_servers_config(config, n, dir, Some(&prefix))?;
        let mut fresh = store.clone();
        fresh.prefix = prefix;
        let client = crate::store::Client::for_builder(&fresh)?;
        let done = crate::store::sync(&client, &source.join("out"), &installer, true)
            .map_err(|e| anyhow::anyhow!("upload to the store: {e}"))?;
        let list = serde_json::to_string(&done.fetch).context("the fetch list")?;
        Ok((store_config, done.uploaded_bytes, list.len() as u64))
    };

    // `reset` brings the servers to the sample's state before each of the two deploys.
    let sample = |reset: &str, tag: &str| -> anyhow::Result<Egress> {
        fling(sh, ctx, &push_config, names, reset)?;
        let (push, push_ssh) = fling(sh, ctx, &push_config, names, "install")?;
        fling(sh, ctx, &push_config, names, reset)?;
        let (store_config, uploaded, list) = upload(tag)?;
        let (store, store_ssh) = fling(sh, ctx, &store_config, names, "install-from-store")?;
        let store_ssh = store_ssh + n as u64 * list;
        Ok(Egress { nodes: n, push, push_ssh, store, store_ssh, uploaded })
    };
    let fresh = sample("uninstall", "fresh")?;
    let release = sample("clean", "release")?;
    let _ = fling(sh, ctx, &push_config, names, "uninstall");
    Ok((fresh, release))
}

/// A private directory of the bench's derived configs, removed when dropped.
struct Scratch(Utf8PathBuf);

impl Scratch {
    fn new() -> anyhow::Result<Scratch> {
        let base = Utf8PathBuf::try_from(std::env::temp_dir())?;
        let dir = base.join(format!("fling-bench-{}", std::process::id()));
        std::fs::create_dir(&dir).with_context(|| format!("create {dir}"))?;
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes a copy of the config whose deployment is its first `n` servers: without its store,
/// or with the store under `store_prefix`.
fn first_servers_config(
    config: &Config,
    n: usize,
    dir: &Utf8Path,
    store_prefix: Option<&str>,
) -> anyhow::Result<Utf8PathBuf> {
    let mut table: toml::Table =
        toml::from_str(&config.text).with_context(|| format!("parse {} again", config.path))?;
    let servers = config.deployment.servers[..n]
        .iter()
        .map(|s| toml::Value::String(s.as_str().to_owned()))
        .collect();
    let Some(toml::Value::Table(deployment)) = table.get_mut("deployment") else {
        bail!("{}: no [deployment] table", config.path);
    };
    deployment.insert("servers".into(), toml::Value::Array(servers));
    // A threshold fitted to the whole deployment may be more than n servers hold.
    deployment.remove("rack_threshold");
    let name = match store_prefix {
        None => {
            table.remove("artifacts");
            format!("first-{n}.toml")
        }
        Some(prefix) => {
            let Some(toml::Value::Table(artifacts)) = table.get_mut("artifacts") else {
                bail!("{}: no [artifacts] table", config.path);
            };
            artifacts.insert("prefix".into(), prefix.into());
            format!("first-{n}-store.toml")
        }
    };
    let path = dir.join(name);
    std::fs::write(&path, toml::to_string(&table)?).with_context(|| format!("write {path}"))?;
    Ok(path)
}

/// `fling` with `config` and `command`, quietly, in this process.
fn args(config: &Utf8Path, servers: &[&str], command: FlingCommand) -> FlingArgs {
    let mut args = FlingArgs::new(config.to_owned(), command);
    args.servers = servers.iter().map(|s| s.to_string()).collect();
    args
}

/// `fling ... overlay`: the builder generates the config's overlays.
fn overlay(sh: &Shell, ctx: &crate::Context, config: &Utf8Path) -> anyhow::Result<()> {
    let command = FlingCommand::Overlay { generate_here: false, rotate: false };
    let report = crate::fling::run_report(sh, ctx, args(config, &[], command))?;
    if report.exit_code != 0 {
        bail!("fling overlay with {config} failed: {}", report.recap());
    }
    Ok(())
}

/// `fling ... install|uninstall` to `servers`: its wall time and the bytes it sent.
fn fling(
    sh: &Shell,
    ctx: &crate::Context,
    config: &Utf8Path,
    servers: &str,
    command: &str,
) -> anyhow::Result<(Duration, u64)> {
    let servers: Vec<&str> = servers.split(',').collect();
    let command = match command {
        "install" => FlingCommand::Install { rollout: Default::default() },
        "install-from-store" => {
            let rollout =
                crate::cli::FlingRolloutArgs { require_store: true, ..Default::default() };
            FlingCommand::Install { rollout }
        }
        "clean" => FlingCommand::Deploy { command: crate::cli::FlingDeployCommand::Clean },
        "uninstall" => FlingCommand::Uninstall,
        "plan" => FlingCommand::Deploy {
            command: crate::cli::FlingDeployCommand::Plan { artifacts: None, out: None },
        },
        other => bail!("fling bench runs install, clean, plan and uninstall, not {other}"),
    };
    let started = Instant::now();
    let report = crate::fling::run_report(sh, ctx, args(config, &servers, command))?;
    let took = started.elapsed();
    if report.exit_code != 0 {
        bail!("fling to {} failed: {}", servers.join(","), report.recap());
    }
    Ok((took, report.hosts.iter().map(|h| h.bytes_sent).sum()))
}

/// The ssh words that reach a server straight from this machine, as the baseline does.
fn ssh_words(config: &Config, server: &Server) -> anyhow::Result<Vec<String>> {
    // The config's own options (a key exchange, say) apply to the baseline too, so that both
    // sides pay for the same handshakes.
    let mut words: Vec<String> = config
        .ssh
        .options
        .iter()
        .chain(&server.ssh_options)
        .flat_map(|o| ["-o".to_owned(), o.clone()])
        .collect();
    words.extend(["-o".into(), "BatchMode=yes".into()]);
    words.extend(["-o".into(), "StrictHostKeyChecking=yes".into()]);
    if let Some(kh) = &config.ssh.known_hosts {
        let kh = kh.local().map_err(|e| anyhow::anyhow!("ssh.known_hosts: {e}"))?;
        words.extend(["-o".into(), format!("UserKnownHostsFile={kh}")]);
    }
    if let Some(id) = server.identity_file.as_ref().or(config.ssh.identity_file.as_ref()) {
        words.extend(["-i".into(), id.to_string(), "-o".into(), "IdentitiesOnly=yes".into()]);
    }
    words.extend(["-o".into(), format!("Port={}", server.port)]);
    Ok(words)
}

/// The plain parallel baseline: per host `ssh mkdir`, `scp`, `ssh` extract + units + restart.
fn baseline(
    sh: &Shell,
    config: &Config,
    servers: &[&Server],
    tarballs: &[Utf8PathBuf],
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let results: Vec<anyhow::Result<()>> = std::thread::scope(|scope| {
        let handles: Vec<_> = servers
            .iter()
            .map(|server| {
                let sh = sh.clone();
                scope.spawn(move || -> anyhow::Result<()> {
                    let opts = &ssh_words(config, server)?;
                    let dest = format!("{}@{}", server.username, server.addr.for_ssh());
                    let scp_dest = format!(
                        "{}@{}:/var/tmp/baseline/",
                        server.username,
                        server.addr.for_rsync()
                    );
                    cmd!(sh, "ssh {opts...} {dest} 'mkdir -p /var/tmp/baseline'").quiet().run()?;
                    cmd!(sh, "scp -q {opts...} {tarballs...} {scp_dest}").quiet().run()?;
                    let script = "set -e; mkdir -p /opt/flotilla/current; for p in \
                        /var/tmp/baseline/*.tar.gz; do tar -xzf \"$p\" --strip-components=3 -C \
                        /opt/flotilla/current root/opt/flotilla; done; \
                        cp /opt/flotilla/current/*/pkg/*.service /etc/systemd/system/; \
                        systemctl daemon-reload; for u in /opt/flotilla/current/*/pkg/*.service; \
                        do systemctl restart \"$(basename \"$u\")\"; done";
                    cmd!(sh, "ssh {opts...} {dest} {script}").quiet().run()?;
                    Ok(())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("a baseline thread panicked")).collect()
    });
    let took = started.elapsed();
    for result in results {
        result.context("the baseline failed")?;
    }
    Ok(took)
}

/// Removes what the baseline installed.
fn baseline_clean(sh: &Shell, config: &Config, servers: &[&Server]) {
    for server in servers {
        let Ok(opts) = ssh_words(config, server) else { continue };
        let dest = format!("{}@{}", server.username, server.addr.for_ssh());
        let script = "if [ -d /opt/flotilla/current ] && [ ! -L /opt/flotilla/current ]; then \
            for u in /opt/flotilla/current/*/pkg/*.service; do [ -e \"$u\" ] || continue; \
            n=$(basename \"$u\"); systemctl stop \"$n\" || true; rm -f /etc/systemd/system/\"$n\"; \
            done; rm -rf /opt/flotilla; systemctl daemon-reload; fi; rm -rf /var/tmp/baseline \
            /var/lib/flotilla";
        let _ = cmd!(sh, "ssh {opts...} {dest} {script}").quiet().ignore_status().output();
    }
}

/// Sums sshd's accepted connections over the servers, from their journals; `None` when a
/// journal cannot be read.
fn count_accepted(sh: &Shell, config: &Config, servers: &[&Server]) -> Option<u64> {
    let mut total = 0;
    for server in servers {
        let opts = ssh_words(config, server).ok()?;
        let dest = format!("{}@{}", server.username, server.addr.for_ssh());
        let script = "journalctl -q --no-pager -t sshd -o cat | grep -c '^Accepted '";
        let out =
            cmd!(sh, "ssh {opts...} {dest} {script}").quiet().ignore_status().output().ok()?;
        total += String::from_utf8_lossy(&out.stdout).trim().parse::<u64>().ok()?;
    }
    Some(total)
}
