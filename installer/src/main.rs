//! `flotilla-installer`: the on-host half of a deploy. It is copied to each server next to the
//! packages and run there (by `cargo xtask fling`, or by `cargo xtask install` locally).
//!
//! Exit codes: 0 success; 1 any error before activation (nothing changed on the host); 2 the
//! install lock is held by someone else; 3 a service was not healthy after activation and the
//! previous release was restored; 4 `install --if-staged` found the staging directory not
//! holding what the deploy sends (push first); 5 `install --expect-release` or `payload
//! --expect-*` found another state than the deploy plan saw (nothing changed).

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use camino::Utf8PathBuf;
use clap::{Parser, Subcommand};
use flotilla_contracts::installer::{
    EXIT_FAILED, EXIT_LOCKED, EXIT_NOT_STAGED, EXIT_OK, EXIT_STATE_CHANGED, EXIT_UNHEALTHY,
    PAYLOAD_LINE, STATE_LINE,
};
use installer::runner::SystemRunner;
use installer::{detect, Config, Error, Installer, ManagerKind, Prefix, DEFAULT_PREFIX};

/// Install, activate, roll back and remove flotilla releases on this host [runs on: servers].
#[derive(Debug, Parser)]
#[command(name = "flotilla-installer", version)]
struct Cli {
    /// Where releases are installed.
    #[arg(long, default_value = DEFAULT_PREFIX, global = true)]
    prefix: Prefix,
    /// The prefix the packages were built for (their zone root is `root<prefix>`, their
    /// overlays sit under it); the install prefix when not given.
    #[arg(long, global = true)]
    packages_prefix: Option<Prefix>,
    /// Where systemd unit files are written.
    #[arg(long, default_value = installer::manager::DEFAULT_UNIT_DIR, global = true)]
    unit_dir: Utf8PathBuf,
    /// The service manager (`systemd` or `smf`); detected when not given.
    #[arg(long, global = true)]
    service_manager: Option<ManagerKind>,
    /// How many releases to keep, the active one included.
    #[arg(long, default_value_t = 3, global = true)]
    keep: usize,
    /// Seconds to wait for another install on this host to finish before giving up.
    #[arg(long, default_value_t = 0, global = true)]
    lock_wait: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Verify, unpack and activate the packages of a directory holding `digests.b3`.
    Install {
        /// The directory with the `*.tar.gz`/`*.tar` packages and `digests.b3`.
        packages: Utf8PathBuf,
        /// This server's overlay: files under `<packages prefix>/<service>/` placed into
        /// the release before any service starts.
        #[arg(long)]
        overlay: Option<Utf8PathBuf>,
        /// The staging directory fling filled: with `--staged-key`, where the key of what it
        /// holds is recorded.
        #[arg(long, requires = "staged_key")]
        staging: Option<Utf8PathBuf>,
        /// Record this key (64 hex digits, fling's digest of what it pushed) in the staging
        /// directory once the install succeeded; remove it when the install fails.
        #[arg(long, requires = "staging")]
        staged_key: Option<installer::staging::StagedKey>,
        /// Install only when the staging directory holds `--staged-key`; otherwise, or when
        /// installing from it fails before anything changed, exit with status 4 (push first).
        #[arg(long, requires = "staged_key")]
        if_staged: bool,
        /// Create the users and groups the services declare when this host lacks them
        /// (`useradd --system`, no home, no login shell), before anything is placed.
        #[arg(long)]
        create_users: bool,
        /// When this install activates a new release: wait this many seconds for `confirm`
        /// (over a new connection), and put the previous release back by itself when none
        /// comes. The install returns at once; a detached watcher keeps the deadline.
        #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..=86400))]
        confirm_timeout: Option<u64>,
        /// Install only while this release is the active one (`none`: while none is), checked
        /// under the lock before anything changes; otherwise exit with status 5. A deploy plan
        /// passes what it saw.
        #[arg(long, value_name = "RELEASE|none")]
        expect_release: Option<String>,
    },
    /// Download the packages and the installer a deploy lists on standard input (presigned
    /// URLs of an S3-compatible store, JSON) into the staging directory, each verified against
    /// its digest before it takes its name; resumed and retried, at most --attempts times.
    Fetch {
        /// The staging directory's packages directory: the archives and digests.b3 go there.
        #[arg(long)]
        packages: Utf8PathBuf,
        /// Where the installer binary goes, when the list's installer is wanted.
        #[arg(long)]
        installer: Option<Utf8PathBuf>,
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
        attempts: u32,
    },
    /// Print this host's active release, its packages and overlay files by digest, and the
    /// installer's own digest, as one `flotilla-state {json}` line: what a deploy plan reads.
    State,
    /// Print what installing PACKAGES (with --overlay) would make here, without installing:
    /// the release id, the packages of its digests.b3, the overlay's files by digest, this
    /// installer's digest, as one `flotilla-payload {json}` line. With --expect-release or
    /// --expect-installer, exit 5 when they differ. The builder runs it for a deploy plan.
    Payload {
        packages: Utf8PathBuf,
        #[arg(long)]
        overlay: Option<Utf8PathBuf>,
        #[arg(long)]
        expect_release: Option<String>,
        #[arg(long)]
        expect_installer: Option<String>,
    },
    /// Confirm the activation that awaits it (`install --confirm-timeout`), so it stays;
    /// fails when the deadline passed and the previous release came back.
    Confirm,
    /// The watcher `install --confirm-timeout` starts.
    #[command(hide = true)]
    AwaitConfirm {
        #[arg(long)]
        release: String,
    },
    /// Probe a check once, or until it passes within `--timeout`: an HTTP URL that must answer
    /// 2xx (and, with `--contains`, hold that text), or a command after `--` that must exit 0.
    /// Exit 0 when it passed, 1 when not.
    Probe {
        /// An `http://` URL to GET.
        #[arg(long, conflicts_with = "command", required_unless_present = "command")]
        http: Option<String>,
        /// Text the answer's body must contain.
        #[arg(long, requires = "http")]
        contains: Option<String>,
        /// Seconds to keep trying, every half second, until the check passes; 0 tries once.
        #[arg(long, default_value_t = 0)]
        timeout: u64,
        /// The program and its arguments.
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Activate the previous release, or the one given.
    Rollback {
        /// The release id to activate (see `status`).
        #[arg(long)]
        to: Option<String>,
    },
    /// Show the active release, every release, and each service's state and health.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Stop and disable the services; keep the files.
    Deactivate,
    /// Stop the services and remove them, every release and the state.
    Uninstall {
        /// Remove the services' data directory too.
        #[arg(long)]
        purge: bool,
    },
    /// Remove every release except the active one.
    Clean,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            eprintln!("error: {err:#}");
            match err.downcast_ref::<Error>() {
                Some(Error::Locked { .. }) => ExitCode::from(EXIT_LOCKED),
                Some(Error::Unhealthy { .. }) => ExitCode::from(EXIT_UNHEALTHY),
                Some(Error::StateChanged { .. }) => ExitCode::from(EXIT_STATE_CHANGED),
                _ => ExitCode::from(EXIT_FAILED),
            }
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<u8> {
    if let Command::Fetch { packages, installer, attempts } = &cli.command {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
            .context("read the fetch list from standard input")?;
        let list = installer::fetch::read_list(&text)?;
        installer::fetch::unstage_key(packages)?;
        let options = installer::fetch::FetchOptions { attempts: *attempts, ..Default::default() };
        let done = installer::fetch::fetch(&list, packages, installer.as_deref(), &options)?;
        println!(
            "fetched {} file(s), {} bytes, from the store; {} already staged{}",
            done.downloaded.len(),
            done.bytes,
            done.kept.len(),
            if done.removed.is_empty() {
                String::new()
            } else {
                format!("; removed {}", done.removed.join(", "))
            }
        );
        return Ok(EXIT_OK);
    }
    // `payload` runs on the builder, which need not have a service manager.
    if let Command::Payload { packages, overlay, expect_release, expect_installer } = &cli.command {
        let payload = installer::survey::payload(
            packages,
            overlay.as_deref(),
            cli.packages_prefix.as_ref().unwrap_or(&cli.prefix).relative(),
            installer::survey::own_digest()?,
        )?;
        let stale = [
            ("release", expect_release, &payload.release),
            ("installer", expect_installer, &payload.installer),
        ]
        .into_iter()
        .filter_map(|(what, expected, actual)| match expected {
            Some(e) if e != actual => {
                Some(format!("the {what} would be {actual}, the plan has {e}"))
            }
            _ => None,
        })
        .collect::<Vec<_>>();
        if !stale.is_empty() {
            eprintln!(
                "error: the builder's outputs changed since the deploy plan: {}",
                stale.join("; ")
            );
            return Ok(EXIT_STATE_CHANGED);
        }
        println!(
            "{PAYLOAD_LINE}{}",
            serde_json::to_string(&payload).context("write the payload as JSON")?
        );
        return Ok(EXIT_OK);
    }
    let manager = match cli.service_manager {
        Some(kind) => kind,
        None => detect("/".into())?,
    };
    let config = Config {
        packages_prefix: cli.packages_prefix.unwrap_or_else(|| cli.prefix.clone()),
        prefix: cli.prefix.as_path().to_owned(),
        unit_dir: cli.unit_dir,
        manager,
        keep: cli.keep,
        lock_wait: Duration::from_secs(cli.lock_wait),
        create_users: matches!(cli.command, Command::Install { create_users: true, .. }),
        confirm_timeout: match &cli.command {
            Command::Install { confirm_timeout: Some(secs), .. } => {
                Some(Duration::from_secs(*secs))
            }
            _ => None,
        },
    };
    let watcher_args = [
        "--prefix".to_owned(),
        config.prefix.to_string(),
        "--packages-prefix".to_owned(),
        config.packages_prefix.to_string(),
        "--unit-dir".to_owned(),
        config.unit_dir.to_string(),
        "--service-manager".to_owned(),
        config.manager.to_string(),
        "--keep".to_owned(),
        config.keep.to_string(),
        // The revert waits for an install that holds the lock at the deadline.
        "--lock-wait".to_owned(),
        "300".to_owned(),
    ];
    if let Command::Probe { http, contains, timeout, command } = &cli.command {
        return Ok(probe(http.as_deref(), contains.as_deref(), command, *timeout));
    }
    let expect = match &cli.command {
        Command::Install { expect_release: Some(r), .. } => {
            Some(if r == "none" { None } else { Some(r.clone()) })
        }
        _ => None,
    };
    let mut installer =
        Installer::new(config, Arc::new(SystemRunner)).with_log(|line| eprintln!("{line}"));
    if let Some(expect) = expect {
        installer = installer.expecting_release(expect);
    }
    match cli.command {
        Command::Install { packages, overlay, staging, staged_key, if_staged, .. } => {
            let outcome = match (&staging, &staged_key) {
                (Some(staging), Some(key)) => {
                    match installer::staging::install_staged(
                        &installer,
                        staging,
                        &packages,
                        overlay.as_deref(),
                        key,
                        if_staged,
                    )? {
                        installer::staging::Staged::Installed(outcome) => outcome,
                        installer::staging::Staged::NotStaged(why) => {
                            eprintln!("not staged: {why}");
                            return Ok(EXIT_NOT_STAGED);
                        }
                    }
                }
                _ => installer.install(&packages, overlay.as_deref())?,
            };
            if let Some(awaiting) = &outcome.awaiting {
                spawn_watcher(&installer, manager, &watcher_args, &awaiting.release)?;
            }
            println!("{outcome}");
        }
        Command::Confirm => match installer::confirm::confirm(installer.layout())? {
            installer::confirm::Confirmation::Confirmed(a) => {
                println!("confirmed release {}", a.release);
            }
            installer::confirm::Confirmation::Nothing => {
                println!("no activation awaits confirmation");
            }
            installer::confirm::Confirmation::TooLate(a) => {
                eprintln!(
                    "error: too late: release {} was not confirmed within {} s and release {} \
                     was put back",
                    a.release, a.timeout_secs, a.previous
                );
                return Ok(EXIT_FAILED);
            }
        },
        Command::AwaitConfirm { release } => {
            let layout = installer.layout().clone();
            installer::confirm::log(&layout, &format!("watching release {release}"));
            let installer = installer.with_log({
                let layout = layout.clone();
                move |line| installer::confirm::log(&layout, line)
            });
            match installer.await_confirmation(&release, Duration::from_millis(200)) {
                Ok(what) => installer::confirm::log(&layout, &what),
                Err(e) => {
                    installer::confirm::log(&layout, &format!("error: {e}"));
                    return Err(e.into());
                }
            }
        }
        Command::Probe { .. } | Command::Payload { .. } | Command::Fetch { .. } => {
            unreachable!("handled above")
        }
        Command::State => {
            let state = installer::survey::host_state(
                installer.layout(),
                installer::survey::own_digest()?,
            )?;
            println!(
                "{STATE_LINE}{}",
                serde_json::to_string(&state).context("write the state as JSON")?
            );
        }
        Command::Rollback { to } => {
            let outcome = installer.rollback(to.as_deref())?;
            println!("{outcome}");
        }
        Command::Status { json } => {
            let status = installer.status()?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&status).context("write the status as JSON")?
                );
            } else {
                println!("{status}");
            }
        }
        Command::Deactivate => {
            let services = installer.deactivate()?;
            println!("stopped and disabled: {}", services.join(", "));
        }
        Command::Uninstall { purge } => {
            let services = installer.uninstall(purge)?;
            println!("uninstalled; removed services: {}", services.join(", "));
        }
        Command::Clean => {
            let removed = installer.clean()?;
            println!("removed releases: {}", removed.join(", "));
        }
    }
    Ok(EXIT_OK)
}

/// `probe`: once, or every half second until it passes or `timeout` seconds went by.
fn probe(http: Option<&str>, contains: Option<&str>, command: &[String], timeout: u64) -> u8 {
    let deadline = std::time::Instant::now() + Duration::from_secs(timeout);
    loop {
        let result = match http {
            Some(url) => installer::health::http_check(url, Duration::from_secs(2), contains),
            None if command.is_empty() => Err("give --http URL or a command after --".into()),
            None => installer::health::probe(&installer::health::Probe::Command(command.to_vec())),
        };
        match result {
            Ok(()) => return EXIT_OK,
            Err(why) if std::time::Instant::now() >= deadline => {
                eprintln!("check failed: {why}");
                return EXIT_FAILED;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

/// Starts the watcher of an activation awaiting confirmation, detached from this session so
/// that it outlives the connection that started it and a release that stops sshd: a transient
/// systemd unit of its own where systemd manages the host, otherwise a new session.
fn spawn_watcher(
    installer: &Installer,
    manager: ManagerKind,
    globals: &[String],
    release: &str,
) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    use std::process::{Command as Process, Stdio};
    let exe = std::env::current_exe().context("find the installer's own binary")?;
    let mut args: Vec<String> = globals.to_vec();
    args.extend(["await-confirm".to_owned(), "--release".to_owned(), release.to_owned()]);
    if manager == ManagerKind::Systemd {
        let unit = format!(
            "flotilla-confirm-{}-{}",
            &release[..release.len().min(12)],
            installer::release::now()
        );
        let started = Process::new("systemd-run")
            .args(["--quiet", "--collect", "--no-block", "--unit", &unit, "--"])
            .arg(&exe)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output();
        match started {
            Ok(out) if out.status.success() => return Ok(()),
            Ok(out) => eprintln!(
                "systemd-run could not start the confirmation watcher ({}); starting it in a \
                 session of its own",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(e) => eprintln!("systemd-run: {e}; starting the watcher in a session of its own"),
        }
    }
    let mut child = Process::new(&exe);
    child.args(&args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    // SAFETY: setsid is async-signal-safe and touches nothing of the parent.
    unsafe {
        child.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    child.spawn().with_context(|| {
        format!("start the confirmation watcher of {}", installer.layout().prefix)
    })?;
    Ok(())
}
