//! A rolling `deploy install`: the servers in batches ([`rollout::batches`]), each batch a
//! deploy plan of its own, then a confirmation over new connections, then every quorum group
//! the batch touched must be healthy again before the next batch starts. The client drives it,
//! plan after plan, holding the deploy lock from the first plan to the last.
//!
//! Before anything is installed, every quorum group's check must pass on all its members: a
//! rolling deploy upgrades a healthy cluster (a cluster being built, or one already degraded,
//! is installed all at once, which is what restarting it means anyway). The group's leader, when
//! its `leader` check can say, is asked then and restarted last.
//!
//! A batch stops the rollout when the servers that failed so far (a failed install, which the
//! installer reverted, an unreachable server, or a confirmation that did not arrive, after
//! which the server reverts by itself) exceed the fleet-wide budget, or when a group's check
//! does not pass within its timeout. No later batch starts; the servers not reached keep their
//! release.

use std::time::{Duration, Instant};

use super::config::{Config, Quorum, Server};
use super::exec::{Outcome, Report, EXIT_FAILED, EXIT_OK};
use super::plan::{self, Context, DeployAction, DeployOptions, Locking, Plan};
use super::rollout::{self, QuorumGroup};

/// The exit code of a rollout that stopped before its last batch (a failed batch beyond the
/// budget, a quorum that did not come back, or a cluster unhealthy before it started).
pub const EXIT_ROLLOUT_STOPPED: i32 = 5;

/// What runs a plan: the caller executes it (with its progress display) and returns the
/// report. `what` says what the plan is for, for the display.
pub type Runner<'r> = dyn FnMut(&str, &Plan) -> Report + 'r;

/// A rolling install of `servers` with the settings of `config.deployment.rollout`, as
/// overridden on the command line.
pub struct Rolling<'a> {
    pub artifacts: super::flags::Artifacts,
    pub servers: Vec<&'a Server>,
    pub ramp: Vec<rollout::BatchSize>,
    pub max_failed: rollout::Budget,
    pub pause: Duration,
    /// The confirmation every server is asked for unless its own config says otherwise (0:
    /// none).
    pub confirm_timeout: u64,
    /// `--confirm-timeout`: every server's, whatever the config says (0: none).
    pub confirm_flag: Option<u64>,
    /// `install --plan`: what the plan saw for each server, by name; each batch's installs
    /// are held to it.
    pub expect: std::collections::BTreeMap<String, super::plan::Expectation>,
    /// Through the store: the URLs the builder signed for the run, which every batch's
    /// servers fetch with (they must stay valid for the whole rollout: `url_ttl_secs`).
    pub fetch: Option<flotilla_contracts::store::FetchList>,
}

/// A server's confirmation timeout in seconds: `--confirm-timeout` when given, else the
/// server's own `confirm_timeout_secs`, else `default`; `None` when that is 0.
pub fn confirm_timeout(flag: Option<u64>, server: &Server, default: u64) -> Option<u64> {
    Some(flag.or(server.confirm_timeout_secs).unwrap_or(default)).filter(|&s| s > 0)
}

/// Why a rollout stopped early.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stopped {
    /// A group was not healthy before anything was installed.
    Unhealthy {
        group: String,
        detail: String,
    },
    /// The servers that failed, counted over the whole fleet, exceeded the budget.
    Budget {
        batch: usize,
        failed: Vec<String>,
        allowed: usize,
    },
    /// A group's check did not pass after the batch.
    Quorum {
        batch: usize,
        group: String,
        detail: String,
    },
    /// Another run holds the deploy lock.
    Locked {
        detail: String,
    },
    /// The builder could not be reached or a plan could not run; `code` is that plan's.
    Fling {
        detail: String,
        code: i32,
    },
    Interrupted {
        batch: usize,
    },
}

/// One batch as it went.
#[derive(Debug, Clone)]
pub struct BatchReport {
    pub servers: Vec<String>,
    /// The servers of the batch that failed: install, reachability or confirmation.
    pub failed: Vec<String>,
    /// Each group checked after the batch: its name, whether it passed, and how long it took.
    pub gates: Vec<(String, bool, Duration)>,
    pub duration: Duration,
}

/// What a rollout did.
#[derive(Debug, Clone)]
pub struct RolloutReport {
    /// The batches as planned.
    pub planned: Vec<Vec<String>>,
    /// The batches that ran, in order.
    pub batches: Vec<BatchReport>,
    /// Each group's leader as found before the first batch.
    pub leaders: Vec<(String, Option<String>)>,
    pub stopped: Option<Stopped>,
    pub exit_code: i32,
    pub duration: Duration,
}

impl<'a> Rolling<'a> {
    /// The settings of `config`, for `servers`.
    pub fn new(
        config: &Config,
        artifacts: super::flags::Artifacts,
        servers: Vec<&'a Server>,
    ) -> Rolling<'a> {
        let rollout = &config.deployment.rollout;
        Rolling {
            artifacts,
            servers,
            ramp: rollout.ramp.clone(),
            max_failed: rollout.max_failed,
            pause: Duration::from_secs(rollout.pause_secs),
            confirm_timeout: rollout.confirm_timeout_secs,
            confirm_flag: None,
            expect: std::collections::BTreeMap::new(),
            fetch: None,
        }
    }

    /// A server's confirmation timeout: its own, or the rollout's; `None` for none.
    pub fn confirm_timeout_of(&self, server: &Server) -> Option<u64> {
        confirm_timeout(self.confirm_flag, server, self.confirm_timeout)
    }

    /// The quorum groups of the config, restricted to the selected servers.
    fn groups<'c>(&self, config: &'c Config) -> Vec<(&'c Quorum, Vec<&'a Server>)> {
        config
            .quorum
            .iter()
            .map(|q| {
                let members =
                    self.servers.iter().copied().filter(|s| q.members.contains(&s.name)).collect();
                (q, members)
            })
            .filter(|(_, members): &(_, Vec<&Server>)| !members.is_empty())
            .collect()
    }

    /// The batches, given each group's leader.
    pub fn batches(
        &self,
        config: &Config,
        leaders: &[(String, Option<String>)],
    ) -> Vec<Vec<String>> {
        let names: Vec<String> = self.servers.iter().map(|s| s.name.to_string()).collect();
        let groups: Vec<QuorumGroup> = self
            .groups(config)
            .into_iter()
            .map(|(q, members)| QuorumGroup {
                name: q.service.clone(),
                members: members.iter().map(|s| s.name.to_string()).collect(),
                leader: leaders.iter().find(|(g, _)| g == &q.service).and_then(|(_, l)| l.clone()),
            })
            .collect();
        rollout::batches(&names, &self.ramp, &groups)
    }

    /// For `--dry-run`: the batches (leaders unknown until run time) and the rules.
    pub fn describe(&self, config: &Config) -> String {
        let mut out = String::new();
        let total = self.servers.len();
        let batches = self.batches(config, &[]);
        out.push_str(&format!(
            "rolling install of {total} server(s) in {} batch(es); no further batch starts once \
             more than {} server(s) failed\n",
            batches.len(),
            self.max_failed.allowed(total)
        ));
        for (q, members) in self.groups(config) {
            let group = QuorumGroup {
                name: q.service.clone(),
                members: members.iter().map(|s| s.name.to_string()).collect(),
                leader: None,
            };
            out.push_str(&format!(
                "quorum {}: {} member(s), at most {} restarting at once; before the first batch \
                 and after each batch with a member: {} on every member, within {} s{}\n",
                q.service,
                members.len(),
                group.max_restarting(),
                q.check,
                q.timeout_secs,
                match &q.leader {
                    Some(l) => format!("; the leader ({l} passes on it) goes last"),
                    None => String::new(),
                }
            ));
        }
        for (i, batch) in batches.iter().enumerate() {
            out.push_str(&format!("batch {}/{}: {}\n", i + 1, batches.len(), batch.join(", ")));
        }
        let confirming: Vec<String> = self
            .servers
            .iter()
            .filter_map(|s| self.confirm_timeout_of(s).map(|t| format!("{} {t} s", s.name)))
            .collect();
        if confirming.is_empty() {
            out.push_str("no confirmation asked for (dead-man's switch off)\n");
        } else {
            out.push_str(&format!(
                "after each batch, a new connection confirms each new release ({}); a server \
                 not confirmed in time puts its previous release back by itself\n",
                confirming.join(", ")
            ));
        }
        if !self.pause.is_zero() {
            out.push_str(&format!("{} s pause between batches\n", self.pause.as_secs()));
        }
        out
    }

    /// Runs the rollout, every plan through `run`; the deploy lock is released at the end
    /// whatever happened.
    pub fn run(&self, cx: &Context<'_>, run: &mut Runner<'_>) -> RolloutReport {
        let started = Instant::now();
        let mut report = RolloutReport {
            planned: Vec::new(),
            batches: Vec::new(),
            leaders: Vec::new(),
            stopped: None,
            exit_code: EXIT_OK,
            duration: Duration::ZERO,
        };
        report.stopped = self.roll(cx, run, &mut report);
        let release = run("release the deploy lock", &plan::release(cx));
        report.exit_code = match &report.stopped {
            Some(Stopped::Locked { .. }) => super::exec::EXIT_LOCKED,
            Some(Stopped::Interrupted { .. }) => super::interrupt::EXIT_INTERRUPTED,
            Some(Stopped::Fling { code, .. }) => *code,
            Some(_) => EXIT_ROLLOUT_STOPPED,
            None => {
                let failed: usize = report.batches.iter().map(|b| b.failed.len()).sum();
                if failed > 0 {
                    EXIT_FAILED
                } else {
                    release.exit_code
                }
            }
        };
        report.duration = started.elapsed();
        report
    }

    fn roll(
        &self,
        cx: &Context<'_>,
        run: &mut Runner<'_>,
        report: &mut RolloutReport,
    ) -> Option<Stopped> {
        let groups = self.groups(cx.config);
        // The cluster must be healthy before it is touched.
        for (q, members) in &groups {
            let plan =
                plan::probe(cx, &format!("quorum {} check", q.service), members, &q.check, 0);
            let checked = run(&format!("check quorum {} before the rollout", q.service), &plan);
            if let Some(stop) = plan_failure(&checked, 0) {
                return Some(stop);
            }
            let bad = not_ok(&checked);
            if !bad.is_empty() {
                return Some(Stopped::Unhealthy {
                    group: q.service.clone(),
                    detail: format!(
                        "{} does not pass on {}: a rolling deploy upgrades a healthy cluster \
                         (install a cluster being built, or a degraded one, all at once)",
                        q.check,
                        bad.join(", ")
                    ),
                });
            }
            let leader = match &q.leader {
                Some(check) => {
                    let plan =
                        plan::probe(cx, &format!("quorum {} leader", q.service), members, check, 0);
                    let asked = run(&format!("ask which member of {} leads", q.service), &plan);
                    if let Some(stop) = plan_failure(&asked, 0) {
                        return Some(stop);
                    }
                    let leads: Vec<&str> = asked
                        .hosts
                        .iter()
                        .filter(|h| h.outcome == Outcome::Ok)
                        .map(|h| h.host.as_str())
                        .collect();
                    // Two members that both say they lead (an election under way): no leader.
                    (leads.len() == 1).then(|| leads[0].to_owned())
                }
                None => None,
            };
            report.leaders.push((q.service.clone(), leader));
        }
        report.planned = self.batches(cx.config, &report.leaders);
        let total = self.servers.len();
        let allowed = self.max_failed.allowed(total);
        let mut failed_so_far: Vec<String> = Vec::new();
        let count = report.planned.len();
        for (i, batch) in report.planned.clone().iter().enumerate() {
            let number = i + 1;
            let batch_started = Instant::now();
            let servers: Vec<&Server> = self
                .servers
                .iter()
                .copied()
                .filter(|s| batch.contains(&s.name.to_string()))
                .collect();
            let confirm = |s: &Server| self.confirm_timeout_of(s);
            let plan = plan::deploy_with(
                cx,
                DeployAction::Install(self.artifacts.clone()),
                &servers,
                &DeployOptions {
                    locking: Locking::Keep,
                    confirm_timeout: &confirm,
                    expect: &|s| self.expect.get(s.name.as_str()).cloned(),
                    fetch: self.fetch.as_ref(),
                },
            );
            let deployed = run(&format!("batch {number}/{count}: install"), &plan);
            if let Some(stop) = plan_failure(&deployed, number) {
                return Some(stop);
            }
            let mut failed = not_ok(&deployed);
            let to_confirm: Vec<&Server> = servers
                .iter()
                .copied()
                .filter(|s| !failed.contains(&s.name.to_string()) && confirm(s).is_some())
                .collect();
            if !to_confirm.is_empty() {
                let confirmed = run(
                    &format!("batch {number}/{count}: confirm"),
                    &plan::confirm(cx, &to_confirm),
                );
                if let Some(stop) = plan_failure(&confirmed, number) {
                    return Some(stop);
                }
                failed.extend(not_ok(&confirmed));
            }
            failed_so_far.extend(failed.iter().cloned());
            let mut batch_report = BatchReport {
                servers: batch.clone(),
                failed,
                gates: Vec::new(),
                duration: Duration::ZERO,
            };
            if failed_so_far.len() > allowed {
                batch_report.duration = batch_started.elapsed();
                report.batches.push(batch_report);
                return Some(Stopped::Budget { batch: number, failed: failed_so_far, allowed });
            }
            for (q, members) in &groups {
                if !members.iter().any(|m| batch.contains(&m.name.to_string())) {
                    continue;
                }
                let gate_started = Instant::now();
                let plan = plan::probe(
                    cx,
                    &format!("quorum {} check", q.service),
                    members,
                    &q.check,
                    q.timeout_secs,
                );
                let checked = run(&format!("batch {number}/{count}: quorum {}", q.service), &plan);
                if let Some(stop) = plan_failure(&checked, number) {
                    return Some(stop);
                }
                let bad = not_ok(&checked);
                batch_report.gates.push((
                    q.service.clone(),
                    bad.is_empty(),
                    gate_started.elapsed(),
                ));
                if !bad.is_empty() {
                    batch_report.duration = batch_started.elapsed();
                    report.batches.push(batch_report);
                    return Some(Stopped::Quorum {
                        batch: number,
                        group: q.service.clone(),
                        detail: format!(
                            "{} did not pass on {} within {} s",
                            q.check,
                            bad.join(", "),
                            q.timeout_secs
                        ),
                    });
                }
            }
            batch_report.duration = batch_started.elapsed();
            report.batches.push(batch_report);
            if number < count && !self.pause.is_zero() {
                std::thread::sleep(self.pause);
            }
            if super::interrupt::interrupted() {
                return Some(Stopped::Interrupted { batch: number });
            }
        }
        None
    }
}

/// The servers of a plan's report that did not succeed.
fn not_ok(report: &Report) -> Vec<String> {
    report.hosts.iter().filter(|h| h.outcome != Outcome::Ok).map(|h| h.host.clone()).collect()
}

/// A plan that did not get to its servers: the lock, the builder, an interrupt.
fn plan_failure(report: &Report, batch: usize) -> Option<Stopped> {
    if report.exit_code == super::interrupt::EXIT_INTERRUPTED {
        return Some(Stopped::Interrupted { batch });
    }
    let failure = report.setup_failure.as_ref()?;
    let detail = format!("{}: {}", failure.step, failure.stderr_tail.join(" ").trim());
    Some(if report.exit_code == super::exec::EXIT_LOCKED {
        Stopped::Locked { detail }
    } else {
        Stopped::Fling { detail, code: report.exit_code }
    })
}

impl RolloutReport {
    /// For people: each batch, then how the rollout ended.
    pub fn recap(&self) -> String {
        let mut out = String::from("rollout:\n");
        for (group, leader) in &self.leaders {
            out.push_str(&format!(
                "  quorum {group}: healthy before the rollout; {}\n",
                match leader {
                    Some(l) => format!("leader {l}, restarted last"),
                    None => "leader unknown".into(),
                }
            ));
        }
        let count = self.planned.len();
        for (i, batch) in self.batches.iter().enumerate() {
            let mut line = format!(
                "  batch {}/{count} [{}]: {} in {:.1} s",
                i + 1,
                batch.servers.join(", "),
                if batch.failed.is_empty() {
                    "installed".to_owned()
                } else {
                    format!("failed on {}", batch.failed.join(", "))
                },
                batch.duration.as_secs_f64()
            );
            for (group, ok, took) in &batch.gates {
                line.push_str(&format!(
                    "; quorum {group} {} ({:.1} s)",
                    if *ok { "healthy" } else { "NOT healthy" },
                    took.as_secs_f64()
                ));
            }
            out.push_str(&line);
            out.push('\n');
        }
        let reached: usize = self.batches.iter().map(|b| b.servers.len()).sum();
        let untouched: Vec<&str> =
            self.planned.iter().skip(self.batches.len()).flatten().map(String::as_str).collect();
        let end = match &self.stopped {
            None => format!("complete: {reached} server(s) in {count} batch(es)"),
            Some(stop) => {
                let why = match stop {
                    Stopped::Unhealthy { group, detail } => {
                        format!("quorum {group} is not healthy before the rollout: {detail}")
                    }
                    Stopped::Budget { batch, failed, allowed } => format!(
                        "batch {batch}/{count} stopped the rollout: {} server(s) failed ({}), \
                         more than max_failed allows ({allowed})",
                        failed.len(),
                        failed.join(", ")
                    ),
                    Stopped::Quorum { batch, group, detail } => format!(
                        "batch {batch}/{count} stopped the rollout: quorum {group}: {detail}"
                    ),
                    Stopped::Locked { detail } => format!("the deploy lock is held: {detail}"),
                    Stopped::Fling { detail, .. } => format!("fling could not run: {detail}"),
                    Stopped::Interrupted { batch } => format!("interrupted in batch {batch}"),
                };
                if untouched.is_empty() {
                    format!("STOPPED: {why}")
                } else {
                    format!(
                        "STOPPED: {why}; not reached, still on their release: {}",
                        untouched.join(", ")
                    )
                }
            }
        };
        out.push_str(&format!(
            "  {end} ({:.1} s, exit {})\n",
            self.duration.as_secs_f64(),
            self.exit_code
        ));
        out
    }

    /// For tools: one JSON object.
    pub fn summary(&self) -> serde_json::Value {
        serde_json::json!({
            "event": "rollout",
            "planned": self.planned,
            "batches": self.batches.iter().map(|b| serde_json::json!({
                "servers": b.servers,
                "failed": b.failed,
                "gates": b.gates.iter().map(|(g, ok, took)| serde_json::json!({
                    "group": g, "healthy": ok, "secs": took.as_secs_f64(),
                })).collect::<Vec<_>>(),
                "secs": b.duration.as_secs_f64(),
            })).collect::<Vec<_>>(),
            "leaders": self.leaders.iter().map(|(g, l)| serde_json::json!({"group": g, "leader": l})).collect::<Vec<_>>(),
            "stopped": self.stopped.as_ref().map(|s| format!("{s:?}")),
            "exit_code": self.exit_code,
            "secs": self.duration.as_secs_f64(),
        })
    }
}
