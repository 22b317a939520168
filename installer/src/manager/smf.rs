//! The SMF driver (illumos): `svccfg import` of each service's manifest, `svcadm enable -s`,
//! `svcadm restart`, `svcs` for state and diagnosis.

use super::{same_contents, Action, ManagerKind, Plan, ServiceManager, ServiceRef};
use crate::runner::{Cmd, Output, Step};

const SVCADM: &str = "/usr/sbin/svcadm";
const SVCCFG: &str = "/usr/sbin/svccfg";
const SVCS: &str = "/usr/bin/svcs";

use flotilla_contracts::services::strip_instance;
pub use flotilla_contracts::services::{
    parse_smf_manifest as parse_manifest, SmfManifest, SMF_MANIFEST as MANIFEST,
};

/// The SMF driver.
#[derive(Debug, Clone, Copy, Default)]
pub struct Smf;

fn fmri(service: &ServiceRef) -> &str {
    service.fmri.as_deref().unwrap_or(&service.name)
}

fn run(description: String, program: &str, args: &[&str]) -> Step {
    Step::Run(Cmd::new(description, program, args))
}

impl ServiceManager for Smf {
    fn kind(&self) -> ManagerKind {
        ManagerKind::Smf
    }

    fn definition_file(&self, _service: &str) -> String {
        MANIFEST.to_owned()
    }

    fn definition_changed(&self, new: &ServiceRef, old: Option<&ServiceRef>) -> bool {
        // The SMF repository cannot be compared with a file, so the manifest of the release
        // that was active stands for what was imported.
        match old {
            Some(old) => !same_contents(&new.pkg().join(MANIFEST), &old.pkg().join(MANIFEST)),
            None => true,
        }
    }

    fn activate(&self, plan: &Plan) -> Vec<Step> {
        let mut steps = Vec::new();
        for service in &plan.removed {
            steps.push(run(
                format!("stop removed service {}", service.name),
                SVCADM,
                &["disable", "-s", fmri(service)],
            ));
            steps.extend(self.remove(std::slice::from_ref(service)));
        }
        for planned in plan.services.iter().filter(|p| p.definition_changed) {
            let manifest = planned.service.pkg().join(MANIFEST);
            steps.push(run(
                format!("import the manifest of {}", planned.service.name),
                SVCCFG,
                &["import", manifest.as_str()],
            ));
        }
        for planned in &plan.services {
            let (name, f) = (&planned.service.name, fmri(&planned.service));
            steps.push(run(format!("enable service {name}"), SVCADM, &["enable", "-s", f]));
            if planned.action == Action::Restart {
                steps.push(run(format!("restart service {name}"), SVCADM, &["restart", f]));
            }
        }
        steps
    }

    fn deactivate(&self, services: &[ServiceRef]) -> Vec<Step> {
        services
            .iter()
            .map(|s| run(format!("stop service {}", s.name), SVCADM, &["disable", "-s", fmri(s)]))
            .collect()
    }

    fn remove(&self, services: &[ServiceRef]) -> Vec<Step> {
        services
            .iter()
            .map(|s| {
                let service_fmri = strip_instance(fmri(s)).to_owned();
                run(
                    format!("delete service {} from SMF", s.name),
                    SVCCFG,
                    &["delete", "-f", &service_fmri],
                )
            })
            .collect()
    }

    fn state_command(&self, service: &ServiceRef) -> Cmd {
        Cmd::new(
            format!("ask the state of {}", service.name),
            SVCS,
            &["-H", "-o", "state", fmri(service)],
        )
    }

    fn parse_state(&self, output: &Output) -> (String, bool) {
        let state = output.stdout.trim().to_owned();
        let online = state == "online";
        (state, online)
    }

    fn logs_command(&self, service: &ServiceRef) -> Cmd {
        Cmd::new(format!("diagnose {}", service.name), SVCS, &["-xv", fmri(service)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manager::Planned;

    fn svc(name: &str, release: &str) -> ServiceRef {
        ServiceRef {
            name: name.into(),
            dir: format!("/opt/flotilla/releases/{release}/{name}").into(),
            fmri: Some(format!("svc:/oxide/{name}:default")),
        }
    }

    #[test]
    fn activation_imports_changed_manifests_and_restarts_changed_services() {
        let plan = Plan {
            services: vec![
                Planned {
                    service: svc("node-agent", "r2"),
                    action: Action::Start,
                    definition_changed: false,
                    after: vec![],
                },
                Planned {
                    service: svc("control-plane", "r2"),
                    action: Action::Restart,
                    definition_changed: true,
                    after: vec!["node-agent".into()],
                },
            ],
            removed: vec![svc("old", "r1")],
        };
        let steps: Vec<String> = Smf.activate(&plan).iter().map(ToString::to_string).collect();
        assert_eq!(
            steps,
            [
                "/usr/sbin/svcadm disable -s svc:/oxide/old:default",
                "/usr/sbin/svccfg delete -f svc:/oxide/old",
                "/usr/sbin/svccfg import /opt/flotilla/releases/r2/control-plane/pkg/manifest.xml",
                "/usr/sbin/svcadm enable -s svc:/oxide/node-agent:default",
                "/usr/sbin/svcadm enable -s svc:/oxide/control-plane:default",
                "/usr/sbin/svcadm restart svc:/oxide/control-plane:default",
            ]
        );
    }

    #[test]
    fn deactivation_state_and_logs() {
        let services = [svc("control-plane", "r1"), svc("node-agent", "r1")];
        let steps: Vec<String> =
            Smf.deactivate(&services).iter().map(ToString::to_string).collect();
        assert_eq!(
            steps,
            [
                "/usr/sbin/svcadm disable -s svc:/oxide/control-plane:default",
                "/usr/sbin/svcadm disable -s svc:/oxide/node-agent:default",
            ]
        );
        let steps: Vec<String> =
            Smf.remove(&services[..1]).iter().map(ToString::to_string).collect();
        assert_eq!(steps, ["/usr/sbin/svccfg delete -f svc:/oxide/control-plane"]);
        assert_eq!(
            Smf.state_command(&services[0]).to_string(),
            "/usr/bin/svcs -H -o state svc:/oxide/control-plane:default"
        );
        assert_eq!(
            Smf.logs_command(&services[0]).to_string(),
            "/usr/bin/svcs -xv svc:/oxide/control-plane:default"
        );
        let online = Output { success: true, stdout: "online\n".into(), ..Output::default() };
        assert_eq!(Smf.parse_state(&online), ("online".to_owned(), true));
        assert_eq!(strip_instance("svc:/a/b"), "svc:/a/b");
    }
}
