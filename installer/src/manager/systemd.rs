//! The systemd driver: unit files in `/etc/systemd/system`, `daemon-reload`, `enable`,
//! `start`/`restart`.

use camino::Utf8PathBuf;

use super::{same_contents, Action, ManagerKind, Plan, ServiceManager, ServiceRef, Settled};
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
        for service in &plan.removed {
            let u = unit(service);
            steps.push(systemctl(
                format!("stop removed service {}", service.name),
                &["disable", "--now", &u],
            ));
            steps.push(Step::Remove { path: self.unit_dir.join(&u) });
        }
        for planned in plan.services.iter().filter(|p| p.definition_changed) {
            let u = unit(&planned.service);
            steps.push(Step::Install {
                from: planned.service.pkg().join(&u),
                to: self.unit_dir.join(&u),
            });
        }
        if !plan.removed.is_empty() || plan.services.iter().any(|p| p.definition_changed) {
            steps.push(systemctl("reload systemd unit files".into(), &["daemon-reload"]));
        }
        if !plan.services.is_empty() {
            let units: Vec<String> = plan.services.iter().map(|p| unit(&p.service)).collect();
            let mut args = vec!["enable"];
            args.extend(units.iter().map(String::as_str));
            steps.push(systemctl("enable services".into(), &args));
        }
        for planned in &plan.services {
            let u = unit(&planned.service);
            let (verb, what) = match planned.action {
                Action::Start => ("start", "start"),
                Action::Restart => ("restart", "restart"),
            };
            steps.push(systemctl(format!("{what} service {}", planned.service.name), &[verb, &u]));
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
        // `systemctl show` prints one block of `Key=Value` lines per unit, blank-line
        // separated; the blocks are matched by `Id` rather than by position.
        let mut found: Vec<(String, Settled)> = Vec::new();
        for block in output.stdout.split("\n\n") {
            let mut id = None;
            let mut settled = Settled::default();
            for line in block.lines() {
                match line.split_once('=') {
                    Some(("Id", value)) => id = Some(value.to_owned()),
                    Some(("ActiveState", value)) => settled.running = value == "active",
                    Some(("UnitFileState", value)) => settled.enabled = value == "enabled",
                    _ => {}
                }
            }
            if let Some(id) = id {
                found.push((id, settled));
            }
        }
        services
            .iter()
            .map(|s| {
                let u = unit(s);
                found.iter().find(|(id, _)| *id == u).map(|(_, st)| *st).unwrap_or_default()
            })
            .collect()
    }
}

/// The units a unit file orders itself after or depends on (`After=`, `Requires=`, `Wants=`,
/// `BindsTo=`, `Requisite=`), as unit names.
pub fn unit_dependencies(text: &str) -> Vec<String> {
    let mut deps = Vec::new();
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
        let Some((key, value)) = line.split_once('=') else { continue };
        if matches!(key.trim(), "After" | "Requires" | "Wants" | "BindsTo" | "Requisite") {
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

    #[test]
    fn activation_installs_reloads_enables_and_restarts_only_changed() {
        let driver = Systemd { unit_dir: "/etc/systemd/system".into() };
        let plan = Plan {
            services: vec![
                Planned { service: svc("a"), action: Action::Start, definition_changed: false },
                Planned { service: svc("b"), action: Action::Restart, definition_changed: true },
            ],
            removed: vec![svc("old")],
        };
        let steps: Vec<String> = driver.activate(&plan).iter().map(ToString::to_string).collect();
        assert_eq!(
            steps,
            [
                "systemctl disable --now old.service",
                "remove /etc/systemd/system/old.service",
                "install /p/releases/r2/b/pkg/b.service /etc/systemd/system/b.service",
                "systemctl daemon-reload",
                "systemctl enable a.service b.service",
                "systemctl start a.service",
                "systemctl restart b.service",
            ]
        );
        // Nothing changed: no reload, nothing restarted.
        let plan = Plan {
            services: vec![Planned {
                service: svc("a"),
                action: Action::Start,
                definition_changed: false,
            }],
            removed: vec![],
        };
        let steps: Vec<String> = driver.activate(&plan).iter().map(ToString::to_string).collect();
        assert_eq!(steps, ["systemctl enable a.service", "systemctl start a.service"]);
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
    }
}
