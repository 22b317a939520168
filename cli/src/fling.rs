//! `cargo xtask fling`: the arguments to a plan of the fling library, its dry run or its run,
//! and the recap. See `flotilla_fling` for what runs where.

use std::{
    io::Read,
    process::{Child, Command, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context as _};
use camino::{Utf8Path, Utf8PathBuf};
use xshell::{cmd, Shell};

use flotilla_fling::config::{self, Config};
use flotilla_fling::flags::{Artifacts, Build, ManifestFlags, PackageFlags};
use flotilla_fling::overlay::{self, Identities};
use flotilla_fling::plan::{self, DeployAction};
use flotilla_fling::{batch, exec, journal, quote, ssh, survey};

use crate::{
    cli::{
        self, FlingBuildCommand, FlingCommand, FlingDeployCommand, FlingLockCommand,
        FlingManifestArgs, FlingPackageArgs,
    },
    Context,
};

/// Runs a fling command; the exit code is the run's (see `flotilla_fling`).
pub fn run(
    sh: &Shell,
    ctx: &Context,
    args: cli::FlingArgs,
) -> anyhow::Result<std::process::ExitCode> {
    let code = run_code(sh, ctx, args)?;
    Ok(std::process::ExitCode::from(u8::try_from(code).unwrap_or(1)))
}

/// [`run`], with the run's exit code as a number.
pub fn run_code(sh: &Shell, ctx: &Context, args: cli::FlingArgs) -> anyhow::Result<i32> {
    Ok(run_with(sh, ctx, args, false)?.0)
}

/// Runs a fling command that reaches hosts without printing anything, and returns its report:
/// for callers that measure or inspect a run (`fling bench`). A dry run has no report.
pub fn run_report(sh: &Shell, ctx: &Context, args: cli::FlingArgs) -> anyhow::Result<exec::Report> {
    match run_with(sh, ctx, args, true)? {
        (_, Some(report)) => Ok(report),
        (code, None) => anyhow::bail!("the fling command ran no plan (exit {code})"),
    }
}

/// The exit code of the command, and the report of its run when it ran a plan. `quiet`: no
/// progress, warnings or recap.
fn run_with(
    sh: &Shell,
    ctx: &Context,
    args: cli::FlingArgs,
    quiet: bool,
) -> anyhow::Result<(i32, Option<exec::Report>)> {
    // Everything the command would send the builder is checked before anything else.
    let command = Typed::of(&args)?;
    let config = if args.config.as_str() == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("read the deployment config from stdin")?;
        Config::parse(Utf8Path::new("<stdin>"), &text)?
    } else {
        Config::load(&ctx.user_path(&args.config))?
    };

    if let FlingCommand::Overlay { generate_here: true, rotate } = &args.command {
        // This half runs on the builder, started by the client's `overlay` below from the
        // root of the builder's workspace. The generators run as the `flotilla-overlay`
        // binary, which prints the one-line summary.
        let identities = if *rotate { Identities::Rotate } else { Identities::Keep };
        overlay::generate(sh, &config, &ctx.invoked_from, ctx.root(), identities)?;
        return Ok((exec::EXIT_OK, None));
    }

    if !args.json && !quiet {
        for name in config::unused_servers(&config) {
            eprintln!(
                "warning: {}: servers.{name} is neither the builder nor a deployment server",
                config.path
            );
        }
    }
    if let FlingCommand::StoreSync { artifacts, sign } = &args.command {
        // The builder's half of a deploy through the store, run in its workspace.
        let Some(store) = &config.artifacts else {
            bail!("{}: no [artifacts] store configured", config.path);
        };
        let client = crate::store::Client::for_builder(store)?;
        let root = ctx.root();
        let installer = root.join("target/release").join(plan::INSTALLER);
        match crate::store::sync(&client, &root.join(artifacts.as_str()), &installer, *sign) {
            Ok(done) => {
                println!(
                    "{}{}",
                    flotilla_contracts::store::SYNC_LINE,
                    serde_json::to_string(&done).context("write the store's answer")?
                );
                eprintln!(
                    "store {}: uploaded {} file(s), {} bytes; {} already there",
                    store.endpoint,
                    done.uploaded.len(),
                    done.uploaded_bytes,
                    done.present.len()
                );
                return Ok((exec::EXIT_OK, None));
            }
            Err(crate::store::StoreError::Unreachable(why)) => {
                eprintln!("the store cannot be reached: {why}");
                return Ok((flotilla_fling::plan::STORE_UNREACHABLE, None));
            }
            Err(e) => bail!("{e}"),
        }
    }
    if let FlingCommand::Bench { nodes, runs } = &args.command {
        let path = ctx.user_path(&args.config);
        crate::fling_bench::run(sh, ctx, &config, &path, nodes, (*runs).max(1))?;
        return Ok((exec::EXIT_OK, None));
    }
    let servers = config.select_servers(&args.servers)?;
    let run_id = run_id();
    let control = ControlDir::new(&run_id, args.dry_run)?;
    let local_source = match &config.source_path {
        Some(path) => path.clone(),
        None => ctx.root().to_owned(),
    };
    let cx = plan::Context {
        config: &config,
        builder: ssh::BuilderHop::new(&config, &control.path)?,
        // Not the local directory's name: the builder may be this very machine.
        builder_control_dir: format!("/tmp/fling-b-{run_id}"),
        run_id,
        local_source,
        who: who(),
        lock_wait: args.lock_wait,
    };
    if let FlingCommand::History { last } = &args.command {
        let entries = read_journal(sh, &cx, &args)?;
        let runs = journal::last_runs(&entries, *last);
        if args.json {
            for e in runs.iter().flatten() {
                println!("{}", serde_json::to_string(e).context("write the journal as JSON")?);
            }
        } else {
            print!("{}", journal::render(&runs));
        }
        return Ok((exec::EXIT_OK, None));
    }
    let mut servers = servers;
    let mut expect = std::collections::BTreeMap::new();
    if let Typed::Install(artifacts, flags) = &command {
        if let Some(path) = &flags.plan {
            let path = ctx.user_path(path);
            match held_to_plan(sh, &cx, &args, &control.path, &path, artifacts, quiet)? {
                Applying::Nothing(why) => {
                    if !quiet {
                        println!("{why}");
                    }
                    return Ok((exec::EXIT_OK, None));
                }
                Applying::Stale(problems) => {
                    eprintln!(
                        "error: {path} is no longer what a deploy would do; nothing was \
                         installed; plan again:"
                    );
                    for p in problems {
                        eprintln!("  {p}");
                    }
                    return Ok((exec::EXIT_PLAN_STALE, None));
                }
                Applying::Servers(names, expectations) => {
                    servers = names
                        .iter()
                        .map(|n| {
                            config
                                .deployment
                                .servers
                                .iter()
                                .find(|s| s.as_str() == n)
                                .map(|s| config.server(s))
                                .with_context(|| {
                                    format!(
                                        "{path}: server {n} is not a deployment server of {}",
                                        config.path
                                    )
                                })
                        })
                        .collect::<anyhow::Result<_>>()?;
                    expect = expectations;
                }
            }
        } else if flags.retry_failed && !args.dry_run {
            let entries = read_journal(sh, &cx, &args)?;
            let Some((last, failed)) = journal::to_retry(&entries, "deploy install") else {
                bail!("--retry-failed: the builder's journal records no `deploy install` to retry");
            };
            let before = servers.len();
            servers.retain(|s| failed.iter().any(|f| f == s.name.as_str()));
            if servers.is_empty() {
                if !quiet {
                    println!(
                        "nothing to retry: the last install (run {}, {}) failed on none of the {} \
                         selected servers",
                        last.run,
                        journal::utc(last.at),
                        before
                    );
                }
                return Ok((exec::EXIT_OK, None));
            }
            if !quiet && !args.json {
                println!(
                    "retrying the servers the last install (run {}, {}) did not finish on: {}",
                    last.run,
                    journal::utc(last.at),
                    servers.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", ")
                );
            }
        }
    }
    // Through the store: the builder uploads what it lacks and signs this run's URLs first.
    let mut fetch: Option<flotilla_contracts::store::FetchList> = None;
    if let Typed::Install(artifacts, flags) = &command {
        match (&config.artifacts, args.dry_run) {
            (None, _) if flags.require_store => {
                bail!("--require-store: {} has no [artifacts] store", config.path)
            }
            (None, _) => {}
            (Some(_), true) => fetch = Some(signed_when_run()),
            (Some(store), false) => match store_urls(sh, &cx, &args, artifacts)? {
                Ok(list) => fetch = Some(list),
                Err(why) if flags.require_store => {
                    bail!("--require-store: the store {} cannot be reached: {why}", store.endpoint)
                }
                Err(why) => {
                    if !quiet {
                        eprintln!(
                            "warning: the store {} cannot be reached ({why}): pushing over ssh \
                             instead (--require-store refuses)",
                            store.endpoint
                        );
                    }
                }
            },
        }
    }
    if let Typed::Install(artifacts, rollout) = &command {
        if rollout.rolling() {
            let rollout_cx = RolloutCx { args: &args, control: &control.path, quiet };
            return rolling_install(
                sh,
                &rollout_cx,
                &cx,
                &servers,
                artifacts,
                rollout,
                (expect, fetch),
            );
        }
    }
    // An install that asks some server for a confirmation confirms after it.
    let mut confirming = false;
    let survey_of = match &command {
        Typed::Survey(artifacts, out) => Some((artifacts.clone(), out.clone())),
        _ => None,
    };
    let plan = match command {
        Typed::Build(build) => plan::build(&cx, &build),
        Typed::Install(artifacts, rollout) => {
            let confirm = |s: &config::Server| {
                flotilla_fling::rolling::confirm_timeout(rollout.confirm_timeout, s, 0)
            };
            confirming = servers.iter().any(|s| confirm(s).is_some());
            plan::deploy_with(
                &cx,
                DeployAction::Install(artifacts),
                &servers,
                &plan::DeployOptions {
                    locking: plan::Locking::Lock,
                    confirm_timeout: &confirm,
                    expect: &|s| expect.get(s.name.as_str()).cloned(),
                    fetch: fetch.as_ref(),
                },
            )
        }
        Typed::Survey(ref artifacts, _) => plan::survey(&cx, &servers, artifacts),
        Typed::Deploy(action) => plan::deploy(&cx, action, &servers),
        Typed::Exec(line) => plan::exec(&cx, &servers, &line),
        Typed::Other => match &args.command {
            FlingCommand::Sync => plan::sync(&cx),
            FlingCommand::InstallPrereqs => plan::install_prereqs(&cx, &servers),
            FlingCommand::Overlay { rotate, .. } => plan::overlay(&cx, *rotate),
            FlingCommand::Lock { command } => {
                plan::lock(&cx, matches!(command, FlingLockCommand::Release))
            }
            FlingCommand::Bench { .. } => unreachable!("handled above"),
            _ => unreachable!("Typed::of types every other command"),
        },
    };
    // `build dot` writes the graph to standard output as it is, for graphviz; the recap goes
    // to standard error then.
    let graph = plan.command == "build dot" && !args.json;

    // Keys named in the config are offered to the builder through a private agent, started
    // for this run only, so the user's own agent is neither needed nor changed.
    let identities = agent_identities(&config, &servers);
    let needs_agent = plan.hosts.iter().any(|h| h.host != plan.builder) && !identities.is_empty();

    if args.dry_run {
        if needs_agent {
            let sock = control.path.join("agent");
            let ids: Vec<String> = identities.iter().map(|p| p.to_string()).collect();
            let start = vec!["ssh-agent".to_owned(), "-D".into(), "-a".into(), sock.to_string()];
            let mut add = vec!["ssh-add".to_owned(), "-q".into(), "--".into()];
            add.extend(ids);
            for (step, argv) in [("agent", start), ("agent-add", add)] {
                if args.json {
                    let event = serde_json::json!({
                        "event": "plan", "host": "client", "step": step, "runs_on": "client",
                        "argv": argv, "env": {"SSH_AUTH_SOCK": sock},
                    });
                    println!("{event}");
                } else if args.show_commands {
                    println!("[client] {step} (runs on client):");
                    println!("    SSH_AUTH_SOCK={sock} {}", quote::quote_words(&argv));
                } else if step == "agent" {
                    println!(
                        "[client] agent (client): a private ssh-agent holding the config's {} \
                         key(s), forwarded to the builder only",
                        identities.len()
                    );
                }
            }
        }
        let parallel = args.parallel.unwrap_or(config.deployment.parallel).max(1);
        let connect_parallel =
            args.connect_parallel.unwrap_or(config.deployment.connect_parallel).max(1);
        let session_script =
            plan.session.as_ref().map(|_| batch::script(&plan, parallel, connect_parallel));
        if args.json {
            for (host, step) in plan
                .setup
                .iter()
                .map(|s| (&plan.builder, s))
                .chain(plan.hosts.iter().flat_map(|h| h.steps.iter().map(move |s| (&h.host, s))))
                .chain(plan.teardown.iter().map(|s| (&plan.builder, s)))
            {
                let event = serde_json::json!({
                    "event": "plan", "host": host, "step": step.name, "runs_on": step.runs_on,
                    "argv": step.argv,
                });
                println!("{event}");
            }
            if let (Some(session), Some(script)) = (&plan.session, &session_script) {
                let event = serde_json::json!({
                    "event": "plan", "host": plan.builder, "step": "session", "runs_on": "client",
                    "argv": session.argv, "stdin": script,
                });
                println!("{event}");
            }
        } else {
            print!("{}", plan::describe(&plan));
            if args.show_commands {
                println!();
                print!("{}", plan::render(&plan, session_script.as_deref()));
            }
        }
        return Ok((exec::EXIT_OK, None));
    }

    let agent =
        if needs_agent { Some(Agent::start(sh, &control.path, &identities)?) } else { None };
    let options = run_options(&args, &config, agent.as_ref());
    if let Some((artifacts, out)) = &survey_of {
        let (report, surveyed) = run_survey(sh, &plan, &options, artifacts, args.json || quiet);
        drop(agent);
        if let Some(out) = out {
            let path = ctx.user_path(out);
            let text = serde_json::to_string_pretty(&surveyed).context("write the plan as JSON")?;
            flotilla_contracts::atomic::write_atomic(&path, format!("{text}\n").as_bytes(), 0o644)
                .map_err(|e| anyhow::anyhow!("write the plan {}: {}", e.path, e.source))?;
        }
        if !quiet {
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&surveyed).context("write the plan as JSON")?
                );
            } else {
                print!("{}", survey::render(&surveyed));
                if let Some(out) = out {
                    println!("plan written to {out}: `deploy install --plan {out}` applies it");
                }
            }
        }
        let code = if report.setup_failure.is_some() {
            report.exit_code
        } else {
            exec::exit_code(None, &report.hosts)
        };
        return Ok((code, Some(report)));
    }
    let report = if quiet {
        exec::execute(sh, &plan, &options, &exec::Quiet)
    } else {
        let ui = crate::fling_ui::Ui::new(args.json, &plan);
        if graph {
            exec::execute(sh, &plan, &options, &crate::fling_ui::StdoutOf { step: "dot", ui })
        } else {
            exec::execute(sh, &plan, &options, &ui)
        }
    };
    let report = if confirming && !matches!(report.exit_code, 3 | 130) {
        confirm_after(sh, &cx, &servers, report, &options, args.json, quiet)
    } else {
        report
    };
    drop(agent);
    if !quiet {
        if args.json {
            println!("{}", report.summary());
        } else if graph {
            eprint!("{}", report.recap());
        } else {
            print!("{}", report.recap());
        }
    }
    Ok((report.exit_code, Some(report)))
}

/// How a run's plans execute: the parallelism asked for (or the config's) and the private
/// agent's socket.
fn run_options(args: &cli::FlingArgs, config: &Config, agent: Option<&Agent>) -> exec::Options {
    exec::Options {
        parallel: args.parallel.unwrap_or(config.deployment.parallel).max(1),
        connect_parallel: args
            .connect_parallel
            .unwrap_or(config.deployment.connect_parallel)
            .max(1),
        env: agent
            .map(|a| vec![("SSH_AUTH_SOCK".to_owned(), a.socket.to_string())])
            .unwrap_or_default(),
    }
}

/// After a parallel install that asked for confirmations: confirms, over new connections, on
/// every server that installed; a server that cannot be reached now puts its previous release
/// back by itself, and counts as unreachable in the returned report.
fn confirm_after(
    sh: &Shell,
    cx: &plan::Context<'_>,
    servers: &[&config::Server],
    mut report: exec::Report,
    options: &exec::Options,
    json: bool,
    quiet: bool,
) -> exec::Report {
    let installed: Vec<&config::Server> = servers
        .iter()
        .copied()
        .filter(|s| {
            report.hosts.iter().any(|h| h.host == s.name.as_str() && h.outcome == exec::Outcome::Ok)
        })
        .collect();
    if installed.is_empty() {
        return report;
    }
    let plan = plan::confirm(cx, &installed);
    let confirmed = if quiet {
        exec::execute(sh, &plan, options, &exec::Quiet)
    } else {
        exec::execute(sh, &plan, options, &crate::fling_ui::Ui::new(json, &plan))
    };
    for host in confirmed.hosts {
        if host.outcome != exec::Outcome::Ok {
            if let Some(h) = report.hosts.iter_mut().find(|h| h.host == host.host) {
                *h = host;
            }
        }
    }
    report.exit_code = exec::exit_code(report.setup_failure.as_ref(), &report.hosts);
    report.duration += confirmed.duration;
    report
}

/// What a rolling install takes from the command besides its plans' context.
struct RolloutCx<'a> {
    args: &'a cli::FlingArgs,
    /// The run's private directory of local sockets.
    control: &'a Utf8Path,
    quiet: bool,
}

/// `install --rolling`: the batches, each plan run with the progress display, then the
/// rollout's recap.
fn rolling_install(
    sh: &Shell,
    rcx: &RolloutCx<'_>,
    cx: &plan::Context<'_>,
    servers: &[&config::Server],
    artifacts: &Artifacts,
    flags: &cli::FlingRolloutArgs,
    (expect, fetch): (
        std::collections::BTreeMap<String, plan::Expectation>,
        Option<flotilla_contracts::store::FetchList>,
    ),
) -> anyhow::Result<(i32, Option<exec::Report>)> {
    let (args, quiet) = (rcx.args, rcx.quiet);
    let config = cx.config;
    let mut rolling =
        flotilla_fling::rolling::Rolling::new(config, artifacts.clone(), servers.to_vec());
    rolling.expect = expect;
    rolling.fetch = fetch;
    if !flags.batch.is_empty() {
        rolling.ramp = flags.batch.clone();
    }
    if let Some(budget) = flags.max_failed {
        rolling.max_failed = budget;
    }
    if let Some(pause) = flags.pause {
        rolling.pause = Duration::from_secs(pause);
    }
    rolling.confirm_flag = flags.confirm_timeout;
    if args.dry_run {
        if args.json {
            let event = serde_json::json!({
                "event": "rollout-plan",
                "batches": rolling.batches(config, &[]),
                "describe": rolling.describe(config),
            });
            println!("{event}");
        } else {
            print!("{}", rolling.describe(config));
            let confirm = |s: &config::Server| rolling.confirm_timeout_of(s);
            let plan = plan::deploy_with(
                cx,
                DeployAction::Install(artifacts.clone()),
                servers,
                &plan::DeployOptions {
                    locking: plan::Locking::Keep,
                    confirm_timeout: &confirm,
                    expect: &|s| rolling.expect.get(s.name.as_str()).cloned(),
                    fetch: rolling.fetch.as_ref(),
                },
            );
            println!("each batch, for each of its servers:");
            print!("{}", plan::describe(&plan));
        }
        return Ok((exec::EXIT_OK, None));
    }
    let identities = agent_identities(config, servers);
    let agent = if identities.is_empty() {
        None
    } else {
        Some(Agent::start(sh, rcx.control, &identities)?)
    };
    let options = run_options(args, config, agent.as_ref());
    let mut last: Option<exec::Report> = None;
    let report = rolling.run(cx, &mut |what, plan| {
        if !quiet && !args.json {
            println!("== {what}");
        }
        let report = if quiet {
            exec::execute(sh, plan, &options, &exec::Quiet)
        } else {
            let ui = crate::fling_ui::Ui::new(args.json, plan);
            exec::execute(sh, plan, &options, &ui)
        };
        if !quiet {
            if args.json {
                println!("{}", report.summary());
            } else if !plan.hosts.is_empty() {
                print!("{}", report.recap());
            }
        }
        if plan.command.starts_with("deploy install") {
            last = Some(report.clone());
        }
        report
    });
    drop(agent);
    if !quiet {
        if args.json {
            println!("{}", report.summary());
        } else {
            print!("{}", report.recap());
        }
    }
    Ok((report.exit_code, last))
}

/// Runs a survey plan (`plan::survey`) and turns what it found into a deploy plan. `quiet`:
/// no progress display.
fn run_survey(
    sh: &Shell,
    plan: &plan::Plan,
    options: &exec::Options,
    artifacts: &Artifacts,
    quiet: bool,
) -> (exec::Report, survey::DeployPlan) {
    let report = if quiet {
        let collector = survey::Collector::new(&exec::Quiet);
        let report = exec::execute(sh, plan, options, &collector);
        (collector.seen(&report), report)
    } else {
        let ui = crate::fling_ui::Ui::new(false, plan);
        let collector = survey::Collector::new(&ui);
        let report = exec::execute(sh, plan, options, &collector);
        (collector.seen(&report), report)
    };
    let (seen, report) = report;
    let mut servers: Vec<survey::ServerPlan> =
        seen.into_iter().map(|(host, seen)| survey::server_plan(&host, seen)).collect();
    if let Some(failure) = &report.setup_failure {
        for s in &mut servers {
            s.notes = vec![format!(
                "the builder: {} {}",
                failure.step,
                exec::outcome_name(&failure.outcome)
            )];
        }
    }
    let planned = survey::DeployPlan {
        format: survey::FORMAT,
        command: "deploy install".into(),
        artifacts: artifacts.to_string(),
        builder: plan.builder.clone(),
        planned_at: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        servers,
    };
    (report, planned)
}

/// What `install --plan` found.
enum Applying {
    /// Nothing to install: why.
    Nothing(String),
    /// The plan no longer holds: each server's differences.
    Stale(Vec<String>),
    /// Install on these servers, each held to what the plan saw.
    Servers(Vec<String>, std::collections::BTreeMap<String, plan::Expectation>),
}

/// `install --plan`: reads the plan, surveys its servers again and compares.
fn held_to_plan(
    sh: &Shell,
    cx: &plan::Context<'_>,
    args: &cli::FlingArgs,
    control: &Utf8Path,
    path: &Utf8Path,
    artifacts: &Artifacts,
    quiet: bool,
) -> anyhow::Result<Applying> {
    if !args.servers.is_empty() {
        bail!("--plan decides the servers (those it would change): leave out -s/--servers");
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("read the plan {path}"))?;
    let saved = survey::DeployPlan::parse(path.as_str(), &text).map_err(anyhow::Error::msg)?;
    if saved.artifacts != artifacts.as_str() {
        bail!(
            "{path}: artifacts: the plan is for {}/, this install pushes {artifacts}/",
            saved.artifacts
        );
    }
    let names: Vec<String> = saved.to_apply().iter().map(|s| s.server.clone()).collect();
    if names.is_empty() {
        return Ok(Applying::Nothing(format!("{path} changes nothing: nothing to install")));
    }
    let mut servers = Vec::new();
    for name in &names {
        let Some(s) = cx.config.deployment.servers.iter().find(|s| s.as_str() == name) else {
            bail!("{path}: server {name} is not a deployment server of {}", cx.config.path);
        };
        servers.push(cx.config.server(s));
    }
    if args.dry_run {
        // What the install would be held to; the survey that checks it runs only for real.
        return Ok(Applying::Servers(names, saved.expectations()));
    }
    let plan = plan::survey(cx, &servers, artifacts);
    let identities = agent_identities(cx.config, &servers);
    let agent =
        if identities.is_empty() { None } else { Some(Agent::start(sh, control, &identities)?) };
    let options = run_options(args, cx.config, agent.as_ref());
    let (_, fresh) = run_survey(sh, &plan, &options, artifacts, quiet || args.json);
    let problems = survey::stale(&saved, &fresh);
    if !problems.is_empty() {
        return Ok(Applying::Stale(problems));
    }
    Ok(Applying::Servers(names, saved.expectations()))
}

/// The fetch list a dry run shows: the URLs are signed only when the deploy runs.
fn signed_when_run() -> flotilla_contracts::store::FetchList {
    let placeholder = flotilla_contracts::store::FetchObject {
        file: plan::INSTALLER.into(),
        digest: "0".repeat(64),
        size: 0,
        url: "<signed by the builder when the deploy runs>".into(),
    };
    flotilla_contracts::store::FetchList {
        packages: Vec::new(),
        installer: placeholder,
        installer_sha256: Some("0".repeat(64)),
        expires_at: 0,
    }
}

/// The builder's store step: the URLs it signed, or why the store cannot be reached (a deploy
/// then pushes); any other failure is an error.
fn store_urls(
    sh: &Shell,
    cx: &plan::Context<'_>,
    args: &cli::FlingArgs,
    artifacts: &Artifacts,
) -> anyhow::Result<Result<flotilla_contracts::store::FetchList, String>> {
    let plan = plan::store_sync(cx, artifacts);
    let lines = StdoutLines::default();
    let report = exec::execute(sh, &plan, &run_options(args, cx.config, None), &lines);
    let host =
        report.setup_failure.iter().chain(&report.hosts).find(|h| h.outcome != exec::Outcome::Ok);
    if let Some(host) = host {
        let why = host.stderr_tail.join("; ");
        if host.outcome == (exec::Outcome::Failed { code: Some(plan::STORE_UNREACHABLE) }) {
            return Ok(Err(why));
        }
        bail!("the builder's store step ({}) failed: {why}", host.step);
    }
    let lines = lines.0.into_inner().expect("lines lock");
    let Some(json) =
        lines.iter().find_map(|l| l.strip_prefix(flotilla_contracts::store::SYNC_LINE))
    else {
        bail!("the builder's store step printed no {}line", flotilla_contracts::store::SYNC_LINE);
    };
    let done: flotilla_contracts::store::StoreSync =
        serde_json::from_str(json).context("read the builder's store answer")?;
    done.fetch.map(Ok).context("the builder's store step signed no URLs")
}

/// The builder's journal, parsed.
fn read_journal(
    sh: &Shell,
    cx: &plan::Context<'_>,
    args: &cli::FlingArgs,
) -> anyhow::Result<Vec<journal::Entry>> {
    let plan = plan::history(cx);
    let lines = StdoutLines::default();
    let report = exec::execute(sh, &plan, &run_options(args, cx.config, None), &lines);
    if report.exit_code != exec::EXIT_OK {
        let why = report
            .setup_failure
            .iter()
            .chain(&report.hosts)
            .flat_map(|h| h.stderr_tail.last())
            .next()
            .cloned()
            .unwrap_or_default();
        bail!("read the journal on the builder {}: {why}", plan.builder);
    }
    let text = lines.0.into_inner().expect("lines lock").join("\n");
    Ok(journal::parse(&text))
}

/// The standard output lines of a run.
#[derive(Default)]
struct StdoutLines(std::sync::Mutex<Vec<String>>);

impl exec::Events for StdoutLines {
    fn output(&self, _host: &str, _step: Option<&str>, stream: &str, line: &str) {
        if stream == "stdout" {
            self.0.lock().expect("lines lock").push(line.to_owned());
        }
    }
}

/// The commands whose arguments become the library's typed flags, checked before anything
/// runs; `Other` is every command without any.
enum Typed {
    Build(Build),
    /// `install` and `deploy install`: the outputs to push, and how to reach the servers.
    Install(flotilla_fling::flags::Artifacts, cli::FlingRolloutArgs),
    Deploy(DeployAction),
    /// `deploy plan`: the outputs directory and the file to keep the plan in.
    Survey(Artifacts, Option<Utf8PathBuf>),
    Exec(String),
    Other,
}

impl Typed {
    fn of(args: &cli::FlingArgs) -> anyhow::Result<Typed> {
        let before = (&args.target, &args.artifacts);
        let only_build = |what: &str| -> anyhow::Result<()> {
            match before {
                (Some(_), _) => bail!(
                    "-t/--target before the command applies to `build` (check, package, dot) \
                     only; {what} does not build"
                ),
                (None, Some(_)) => bail!(
                    "--artifacts before the command applies to `build` and `deploy install` \
                     only, not to {what}"
                ),
                (None, None) => Ok(()),
            }
        };
        let install =
            |after: &Option<Artifacts>, rollout: &cli::FlingRolloutArgs| -> anyhow::Result<Typed> {
                if args.target.is_some() {
                    bail!(
                    "-t/--target applies to `build` only: deploy install pushes what was built \
                     (name its outputs directory with --artifacts)"
                );
                }
                let artifacts = merge("--artifacts", &args.artifacts, after.clone())?;
                Ok(Typed::Install(artifacts.unwrap_or_default(), rollout.clone()))
            };
        let typed = match &args.command {
            FlingCommand::Build { command } => Typed::Build(match command {
                FlingBuildCommand::Check { manifest } => {
                    Build::Check(manifest_flags(args, manifest)?)
                }
                FlingBuildCommand::Package { manifest, package } => {
                    Build::Package(manifest_flags(args, manifest)?, package_flags(package))
                }
                FlingBuildCommand::Dot { manifest } => Build::Dot(manifest_flags(args, manifest)?),
            }),
            FlingCommand::Install { rollout } => install(&None, rollout)?,
            FlingCommand::Deploy { command } => {
                let action = match command {
                    FlingDeployCommand::Install { artifacts, rollout } => {
                        return install(artifacts, rollout)
                    }
                    FlingDeployCommand::Plan { artifacts, out } => {
                        if args.target.is_some() {
                            bail!("-t/--target applies to `build` only: a plan compares what was built");
                        }
                        let artifacts = merge("--artifacts", &args.artifacts, artifacts.clone())?;
                        return Ok(Typed::Survey(artifacts.unwrap_or_default(), out.clone()));
                    }
                    FlingDeployCommand::Uninstall => DeployAction::Uninstall,
                    FlingDeployCommand::Status => DeployAction::Status,
                    FlingDeployCommand::Rollback => DeployAction::Rollback,
                    FlingDeployCommand::Clean => DeployAction::Clean,
                };
                only_build("deploy")?;
                Typed::Deploy(action)
            }
            FlingCommand::Uninstall => {
                only_build("uninstall")?;
                Typed::Deploy(DeployAction::Uninstall)
            }
            FlingCommand::Exec { cmd, command } => {
                only_build("exec")?;
                Typed::Exec(match cmd {
                    Some(line) => line.clone(),
                    None => command.join(" "),
                })
            }
            _ => {
                only_build("this command")?;
                Typed::Other
            }
        };
        Ok(typed)
    }
}

/// The build's target and outputs directory, given before the command (thing-flinger's
/// place) or after it.
fn manifest_flags(
    args: &cli::FlingArgs,
    after: &FlingManifestArgs,
) -> anyhow::Result<ManifestFlags> {
    Ok(ManifestFlags {
        target: merge("-t/--target", &args.target, after.target.clone())?,
        artifacts: merge("--artifacts", &args.artifacts, after.artifacts.clone())?,
    })
}

fn package_flags(args: &FlingPackageArgs) -> PackageFlags {
    PackageFlags {
        only: args.only.clone(),
        disable_cache: args.disable_cache,
        no_rebuild: args.no_rebuild,
        plan_only: args.builder_dry_run,
        jobs: args.jobs,
        retry_count: args.retry_count,
        retry_duration: args.retry_duration,
    }
}

/// A flag given before the command or after it (see `cli::before_or_after`).
fn merge<T: PartialEq + Clone + std::fmt::Display>(
    flag: &str,
    before: &Option<T>,
    after: Option<T>,
) -> anyhow::Result<Option<T>> {
    cli::before_or_after(flag, before, after).map_err(anyhow::Error::msg)
}

/// The private keys to offer the builder for the servers.
fn agent_identities(config: &Config, servers: &[&config::Server]) -> Vec<Utf8PathBuf> {
    let mut ids: Vec<Utf8PathBuf> = servers
        .iter()
        .filter_map(|s| s.identity_file.clone().or_else(|| config.ssh.identity_file.clone()))
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

/// A unique id for this run: time and process id, hex.
fn run_id() -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("{:08x}{:04x}", (nanos as u64 >> 16) as u32, std::process::id() & 0xffff)
}

/// `user@host` of the client, for the lock record.
fn who() -> String {
    let uid = || {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let uid = status.lines().find_map(|l| l.strip_prefix("Uid:")).unwrap_or("?");
        format!("uid {}", uid.split_whitespace().next().unwrap_or("?"))
    };
    let user =
        std::env::var("USER").or_else(|_| std::env::var("LOGNAME")).unwrap_or_else(|_| uid());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_owned())
        .unwrap_or("?".into());
    format!("{user}@{host} (pid {})", std::process::id())
}

/// The private directory of this run's local sockets: the shared connection to the builder
/// and the agent. Created 0700, removed on drop.
struct ControlDir {
    path: Utf8PathBuf,
    created: bool,
}

impl ControlDir {
    fn new(run_id: &str, dry_run: bool) -> anyhow::Result<ControlDir> {
        // Short, because a unix socket path is limited to about 100 bytes.
        let path = Utf8PathBuf::from(format!("/tmp/fling-{run_id}"));
        if dry_run {
            return Ok(ControlDir { path, created: false });
        }
        use std::os::unix::fs::DirBuilderExt;
        if let Err(err) = std::fs::DirBuilder::new().mode(0o700).create(&path) {
            bail!("create the private socket directory {path}: {err}");
        }
        Ok(ControlDir { path, created: true })
    }
}

impl Drop for ControlDir {
    fn drop(&mut self) {
        if self.created {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// An ssh-agent started for this run, holding the config's keys; stopped by pid on drop.
struct Agent {
    child: Child,
    socket: Utf8PathBuf,
}

impl Agent {
    fn start(sh: &Shell, dir: &Utf8Path, identities: &[Utf8PathBuf]) -> anyhow::Result<Agent> {
        let socket = dir.join("agent");
        // An agent of an earlier plan of this run (`install --plan`'s survey) left its socket.
        let _ = std::fs::remove_file(&socket);
        let child = Command::from(cmd!(sh, "ssh-agent -D -a {socket}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start a private ssh-agent for this run")?;
        let agent = Agent { child, socket };
        let deadline = Instant::now() + Duration::from_secs(5);
        while !agent.socket.exists() {
            if Instant::now() > deadline {
                bail!("start a private ssh-agent: its socket {} did not appear", agent.socket);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let added = cmd!(sh, "ssh-add -q -- {identities...}")
            .env("SSH_AUTH_SOCK", &agent.socket)
            .ignore_status()
            .ignore_stdout()
            .quiet()
            .output();
        match added {
            Ok(out) if out.status.success() => Ok(agent),
            Ok(out) => bail!(
                "add the config's keys to the private agent: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(err) => bail!("add the config's keys to the private agent: {err}"),
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
