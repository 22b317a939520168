//! The systemd driver: unit files in `/etc/systemd/system`, one `daemon-reload`, `enable`,
//! and `start`/`restart` of several units per `systemctl` call.
//!
//! Every `systemctl` call is a process and, on a loaded host, a round trip of 100-300 ms to
//! the manager, so an activation makes as few as keep its guarantees: one reload, one
//! transaction per verb unless the plan's order needs more.

use std::collections::{BTreeMap, BTreeSet};

use camino::Utf8PathBuf;

use super::{
    same_contents, Action, ManagerKind, Plan, Planned, ServiceManager, ServiceRef, Settled,
};
use crate::runner::{Cmd, Output, Step};

/// Where unit files go unless configured otherwise.
pub const DEFAULT_UNIT_DIR: &str = "/etc/systemd/system";

/// The systemd driver.
#[derive(Debug, Clone)]
pub struct Systemd {
    pub unit_dir: Utf8PathBuf,
}

fn unit(service: &ServiceRef) -> String {
    format!("{}.service", service.name)
}

fn systemctl(description: String, args: &[&str]) -> Step {
    Step::Run(Cmd::new(description, "systemctl", args))
}

/// `systemctl <args> <units...>`: one call, so one transaction, for several units.
fn systemctl_units(description: String, args: &[&str], units: &[String]) -> Step {
    let mut all: Vec<&str> = args.to_vec();
    all.extend(units.iter().map(String::as_str));
    systemctl(description, &all)
}

fn names<'a>(services: impl Iterator<Item = &'a ServiceRef>) -> String {
    services.map(|s| s.name.as_str()).collect::<Vec<_>>().join(", ")
}

/// Splits the plan's starts and restarts into as few `systemctl` calls as keep its order.
///
/// A call is one systemd transaction, in which a job waits for the jobs of the units it is
/// ordered after (`After=`, or `Before=` on the other side), whatever their order on the
/// command line. A dependency that systemd does not order by itself (a bare `Requires=` or
/// `Wants=`, or one recorded from the SMF manifest only), or one between a start and a restart,
/// needs the dependency's call to finish before the dependent's call begins. Calls alternate
/// between `restart` and `start`; each service goes into the earliest call its dependencies
/// allow, and of the two possible first verbs the one giving fewer calls wins (restart on a
/// tie).
fn start_calls<'a>(
    plan: &'a Plan,
    ordered: &BTreeSet<(String, String)>,
) -> Vec<(Action, Vec<&'a Planned>)> {
    let by_restart = calls_starting_with(plan, ordered, Action::Restart);
    let by_start = calls_starting_with(plan, ordered, Action::Start);
    if by_start.len() < by_restart.len() {
        by_start
    } else {
        by_restart
    }
}

fn calls_starting_with<'a>(
    plan: &'a Plan,
    ordered: &BTreeSet<(String, String)>,
    first: Action,
) -> Vec<(Action, Vec<&'a Planned>)> {
    let parity = |action: Action| usize::from(action != first);
    let mut slot: BTreeMap<&str, usize> = BTreeMap::new();
    // The plan lists services in dependency order, so every dependency has its slot already;
    // one the plan does not hold is the manager's business, not an ordering of this plan.
    for planned in &plan.services {
        let mut earliest = 0;
        for dep in &planned.after {
            let Some(&dep_slot) = slot.get(dep.as_str()) else { continue };
            let same_action =
                plan.services.iter().any(|p| p.service.name == *dep && p.action == planned.action);
            let systemd_orders = ordered.contains(&(dep.clone(), planned.service.name.clone()));
            let needed = if same_action && systemd_orders { dep_slot } else { dep_slot + 1 };
            earliest = earliest.max(needed);
        }
        if earliest % 2 != parity(planned.action) {
            earliest += 1;
        }
        slot.insert(&planned.service.name, earliest);
    }
    let mut calls: BTreeMap<usize, Vec<&Planned>> = BTreeMap::new();
    for planned in &plan.services {
        calls.entry(slot[planned.service.name.as_str()]).or_default().push(planned);
    }
    calls.into_values().map(|group| (group[0].action, group)).collect()
}

/// The `[Unit]` section's `After=` and `Before=` entries of a unit file.
fn unit_orderings(text: &str) -> (Vec<String>, Vec<String>) {
    let (mut after, mut before) = (Vec::new(), Vec::new());
    for (key, value) in unit_section_entries(text) {
        match key {
            "After" => after.extend(value.split_whitespace().map(str::to_owned)),
            "Before" => before.extend(value.split_whitespace().map(str::to_owned)),
            _ => {}
        }
    }
    (after, before)
}

/// The `key=value` lines of a unit file's `[Unit]` section, keys trimmed.
fn unit_section_entries(text: &str) -> Vec<(&str, &str)> {
    let mut entries = Vec::new();
    let mut in_unit = false;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_unit = line == "[Unit]";
            continue;
        }
        if !in_unit {
            continue;
        }
        if let Some((key, value)) = line.split_once('=') {
            entries.push((key.trim(), value));
        }
    }
    entries
}

impl Systemd {
    /// The pairs `(first, then)` of planned services that systemd itself orders, read from the
    /// unit files the plan puts in place (`then` has `After=first`, or `first` has
    /// `Before=then`). A unit file that cannot be read orders nothing: activation installs or
    /// compares every one of them before any service starts, and fails there first.
    fn orderings(&self, plan: &Plan) -> BTreeSet<(String, String)> {
        let planned: BTreeSet<String> = plan.services.iter().map(|p| unit(&p.service)).collect();
        let name = |u: &str| u.strip_suffix(".service").map(str::to_owned);
        let mut pairs = BTreeSet::new();
        for p in &plan.services {
            let path = p.service.pkg().join(unit(&p.service));
            let Ok(text) = std::fs::read_to_string(&path) else { continue };
            let (after, before) = unit_orderings(&text);
            for first in after.iter().filter(|u| planned.contains(*u)).filter_map(|u| name(u)) {
                pairs.insert((first, p.service.name.clone()));
            }
            for then in before.iter().filter(|u| planned.contains(*u)).filter_map(|u| name(u)) {
                pairs.insert((p.service.name.clone(), then));
            }
        }
        pairs
    }
}

impl ServiceManager for Systemd {
    fn kind(&self) -> ManagerKind {
        ManagerKind::Systemd
    }

    fn definition_file(&self, service: &str) -> String {
        format!("{service}.service")
    }

    fn definition_changed(&self, new: &ServiceRef, _old: Option<&ServiceRef>) -> bool {
        // The installed unit file is the truth: comparing against it also repairs a unit that
        // someone edited or deleted by hand.
        !same_contents(&new.pkg().join(unit(new)), &self.unit_dir.join(unit(new)))
    }

    fn activate(&self, plan: &Plan) -> Vec<Step> {
        let mut steps = Vec::new();
        if !plan.removed.is_empty() {
            // One transaction stops them all, in the reverse of their `After=` order; the
            // reload that follows the removal of their unit files is the only one.
            let units: Vec<String> = plan.removed.iter().map(unit).collect();
            steps.push(systemctl_units(
                format!("stop removed services {}", names(plan.removed.iter())),
                &["disable", "--now", "--no-reload"],
                &units,
            ));
            for service in &plan.removed {
                steps.push(Step::Remove { path: self.unit_dir.join(unit(service)) });
            }
        }
        for planned in plan.services.iter().filter(|p| p.definition_changed) {
            let u = unit(&planned.service);
            steps.push(Step::Install {
                from: planned.service.pkg().join(&u),
                to: self.unit_dir.join(&u),
            });
        }
        let reload = !plan.removed.is_empty() || plan.services.iter().any(|p| p.definition_changed);
        if !plan.services.is_empty() {
            // `enable` reads `[Install]` from the unit files on disk, so it can run before the
            // manager has loaded them; without `--no-reload` it would reload the manager a
            // second time. When nothing else needs a reload, its own reload is the one that
            // makes the manager see a repaired `enable`.
            let units: Vec<String> = plan.services.iter().map(|p| unit(&p.service)).collect();
            let args: &[&str] = if reload { &["enable", "--no-reload"] } else { &["enable"] };
            steps.push(systemctl_units("enable services".into(), args, &units));
        }
        if reload {
            steps.push(systemctl("reload systemd unit files".into(), &["daemon-reload"]));
        }
        let ordered = self.orderings(plan);
        for (action, group) in start_calls(plan, &ordered) {
            let units: Vec<String> = group.iter().map(|p| unit(&p.service)).collect();
            let verb = match action {
                Action::Start => "start",
                Action::Restart => "restart",
            };
            let what = names(group.iter().map(|p| &p.service));
            steps.push(systemctl_units(format!("{verb} services {what}"), &[verb], &units));
        }
        steps
    }

    fn deactivate(&self, services: &[ServiceRef]) -> Vec<Step> {
        services
            .iter()
            .map(|s| systemctl(format!("stop service {}", s.name), &["disable", "--now", &unit(s)]))
            .collect()
    }

    fn remove(&self, services: &[ServiceRef]) -> Vec<Step> {
        let mut steps: Vec<Step> =
            services.iter().map(|s| Step::Remove { path: self.unit_dir.join(unit(s)) }).collect();
        if !steps.is_empty() {
            steps.push(systemctl("reload systemd unit files".into(), &["daemon-reload"]));
        }
        steps
    }

    fn state_command(&self, service: &ServiceRef) -> Cmd {
        Cmd::new(
            format!("ask the state of {}", service.name),
            "systemctl",
            &["is-active", &unit(service)],
        )
    }

    fn parse_state(&self, output: &Output) -> (String, bool) {
        let state = output.stdout.trim().to_owned();
        let active = state == "active";
        (state, active)
    }

    fn logs_command(&self, service: &ServiceRef) -> Cmd {
        Cmd::new(
            format!("read the log of {}", service.name),
            "journalctl",
            &["-u", &unit(service), "-n", "20", "--no-pager"],
        )
    }

    fn states_command(&self, services: &[ServiceRef]) -> Option<Cmd> {
        let units: Vec<String> = services.iter().map(unit).collect();
        let mut args = vec!["show", "--property=Id,ActiveState,UnitFileState", "--"];
        args.extend(units.iter().map(String::as_str));
        Some(Cmd::new("ask the state of every service", "systemctl", &args))
    }

    fn parse_states(&self, services: &[ServiceRef], output: &Output) -> Vec<Settled> {
        show_blocks(services, output)
            .into_iter()
            .map(|block| Settled {
                running: block.get("ActiveState") == Some(&"active"),
                enabled: block.get("UnitFileState") == Some(&"enabled"),
            })
            .collect()
    }

    fn parse_active_states(&self, services: &[ServiceRef], output: &Output) -> Vec<(String, bool)> {
        // The same reading as `parse_state` gives `systemctl is-active`: only `active` runs.
        // A unit `systemctl show` says nothing of is reported the way `is-active` reports an
        // unknown unit.
        show_blocks(services, output)
            .into_iter()
            .map(|block| {
                let state = block.get("ActiveState").copied().unwrap_or("inactive");
                (state.to_owned(), state == "active")
            })
            .collect()
    }
}

/// The `Key=Value` properties `systemctl show` printed for each service, in the order of
/// `services`. It prints one blank-line-separated block per unit; blocks are matched by `Id`
/// rather than by position, and a service without a block gets no properties.
fn show_blocks<'a>(services: &[ServiceRef], output: &'a Output) -> Vec<BTreeMap<&'a str, &'a str>> {
    let mut found: Vec<(&str, BTreeMap<&str, &str>)> = Vec::new();
    for block in output.stdout.split("\n\n") {
        let properties: BTreeMap<&str, &str> =
            block.lines().filter_map(|line| line.split_once('=')).collect();
        if let Some(id) = properties.get("Id").copied() {
            found.push((id, properties));
        }
    }
    services
        .iter()
        .map(|s| {
            let u = unit(s);
            found.iter().find(|(id, _)| *id == u).map(|(_, p)| p.clone()).unwrap_or_default()
        })
        .collect()
}

/// The units a unit file orders itself after or depends on (`After=`, `Requires=`, `Wants=`,
/// `BindsTo=`, `Requisite=`), as unit names.
pub fn unit_dependencies(text: &str) -> Vec<String> {
    let mut deps = Vec::new();
    for (key, value) in unit_section_entries(text) {
        if matches!(key, "After" | "Requires" | "Wants" | "BindsTo" | "Requisite") {
            deps.extend(value.split_whitespace().map(str::to_owned));
        }
    }
    deps
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manager::Planned;

    fn svc(name: &str) -> ServiceRef {
        ServiceRef { name: name.into(), dir: format!("/p/releases/r2/{name}").into(), fmri: None }
    }

    fn planned(name: &str, action: Action, definition_changed: bool, after: &[&str]) -> Planned {
        Planned {
            service: svc(name),
            action,
            definition_changed,
            after: after.iter().map(|a| (*a).to_owned()).collect(),
        }
    }

    fn lines(steps: &[Step]) -> Vec<String> {
        steps.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn activation_reloads_once_and_starts_each_verb_in_one_call() {
        let driver = Systemd { unit_dir: "/etc/systemd/system".into() };
        let plan = Plan {
            services: vec![
                planned("a", Action::Start, false, &[]),
                planned("b", Action::Restart, true, &[]),
                planned("c", Action::Restart, false, &[]),
            ],
            removed: vec![svc("old2"), svc("old1")],
        };
        assert_eq!(
            lines(&driver.activate(&plan)),
            [
                "systemctl disable --now --no-reload old2.service old1.service",
                "remove /etc/systemd/system/old2.service",
                "remove /etc/systemd/system/old1.service",
                "install /p/releases/r2/b/pkg/b.service /etc/systemd/system/b.service",
                "systemctl enable --no-reload a.service b.service c.service",
                "systemctl daemon-reload",
                "systemctl restart b.service c.service",
                "systemctl start a.service",
            ]
        );
        // A first install: every unit is new, one reload, one restart call.
        let plan = Plan {
            services: vec![
                planned("a", Action::Restart, true, &[]),
                planned("b", Action::Restart, true, &[]),
            ],
            removed: vec![],
        };
        let steps = lines(&driver.activate(&plan));
        assert_eq!(steps.iter().filter(|s| s.contains("reload")).count(), 2, "{steps:?}");
        assert_eq!(
            steps[2..],
            [
                "systemctl enable --no-reload a.service b.service",
                "systemctl daemon-reload",
                "systemctl restart a.service b.service",
            ]
        );
        // No unit file changed: `enable` does the only reload, nothing is restarted.
        let plan =
            Plan { services: vec![planned("a", Action::Start, false, &[])], removed: vec![] };
        assert_eq!(
            lines(&driver.activate(&plan)),
            ["systemctl enable a.service", "systemctl start a.service"]
        );
    }

    #[test]
    fn dependencies_systemd_does_not_order_get_their_own_call() {
        let dir = std::env::temp_dir().join(format!("flotilla-order-{}", std::process::id()));
        let root = Utf8PathBuf::try_from(dir).unwrap();
        struct Cleanup(Utf8PathBuf);
        impl Drop for Cleanup {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        let _cleanup = Cleanup(root.clone());
        let unit_text = [
            // a orders b after itself from its side, with Before=.
            ("a", "[Unit]\nBefore=b.service\n"),
            ("b", "[Unit]\nRequires=a.service\n"),
            // c needs a but says nothing of order: systemd would start both at once.
            ("c", "[Unit]\nRequires=a.service\n"),
            ("d", "[Unit]\nAfter=b.service\n"),
            ("e", "[Unit]\nAfter=a.service\n"),
        ];
        let mut services = Vec::new();
        for (name, text) in unit_text {
            let service = ServiceRef {
                name: name.into(),
                dir: root.join("releases/r2").join(name),
                fmri: None,
            };
            std::fs::create_dir_all(service.pkg()).unwrap();
            std::fs::write(service.pkg().join(format!("{name}.service")), text).unwrap();
            services.push(service);
        }
        let driver = Systemd { unit_dir: root.join("units") };
        let with = |i: usize, action: Action, after: &[&str]| Planned {
            service: services[i].clone(),
            action,
            definition_changed: false,
            after: after.iter().map(|a| (*a).to_owned()).collect(),
        };
        let plan = Plan {
            services: vec![
                with(0, Action::Restart, &[]),
                with(1, Action::Restart, &["a"]),
                with(2, Action::Restart, &["a"]),
                // d is unchanged but must start after the restarted b.
                with(3, Action::Start, &["b"]),
                with(4, Action::Restart, &["a"]),
            ],
            removed: vec![],
        };
        let steps = lines(&driver.activate(&plan));
        assert_eq!(
            steps[1..],
            [
                "systemctl restart a.service b.service e.service",
                "systemctl start d.service",
                "systemctl restart c.service",
            ]
        );
        // Unchanged services that the restarted ones need go first when that saves a call.
        let plan = Plan {
            services: vec![with(0, Action::Start, &[]), with(1, Action::Restart, &["a"])],
            removed: vec![],
        };
        assert_eq!(
            lines(&driver.activate(&plan))[1..],
            ["systemctl start a.service", "systemctl restart b.service"]
        );
    }

    #[test]
    fn reads_dependencies_from_the_unit_section_only() {
        let text =
            "[Unit]\nAfter=network-online.target node-agent.service\nWants=network-online.target\n\
                    [Service]\nAfter=nonsense.service\n";
        assert_eq!(
            unit_dependencies(text),
            ["network-online.target", "node-agent.service", "network-online.target"]
        );
    }

    #[test]
    fn states_are_matched_by_unit_id_and_missing_units_are_neither() {
        let driver = Systemd { unit_dir: "/etc/systemd/system".into() };
        let services = [svc("a"), svc("b"), svc("c")];
        let cmd = driver.states_command(&services).unwrap();
        assert_eq!(
            cmd.to_string(),
            "systemctl show --property=Id,ActiveState,UnitFileState -- a.service b.service c.service"
        );
        // Blocks in another order than asked, and no block for c.
        let output = Output {
            success: true,
            stdout: "Id=b.service\nActiveState=activating\nUnitFileState=enabled\n\n\
                     Id=a.service\nActiveState=active\nUnitFileState=enabled\n"
                .into(),
            ..Output::default()
        };
        assert_eq!(
            driver.parse_states(&services, &output),
            [
                Settled { running: true, enabled: true },
                Settled { running: false, enabled: true },
                Settled { running: false, enabled: false },
            ]
        );
        assert_eq!(
            driver.parse_active_states(&services, &output),
            [
                ("active".to_owned(), true),
                ("activating".to_owned(), false),
                ("inactive".to_owned(), false),
            ]
        );
    }
}
