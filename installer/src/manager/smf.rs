//! The SMF driver (illumos): `svccfg import` of each service's manifest, `svcadm enable -s`,
//! `svcadm restart`, `svcs` for state and diagnosis.

use super::{same_contents, Action, ManagerKind, Plan, ServiceManager, ServiceRef};
use crate::accounts::ServiceUser;
use crate::runner::{Cmd, Output, Step};

const SVCADM: &str = "/usr/sbin/svcadm";
const SVCCFG: &str = "/usr/sbin/svccfg";
const SVCS: &str = "/usr/bin/svcs";

/// The file in a service's `pkg/` directory that SMF imports.
pub const MANIFEST: &str = "manifest.xml";

/// The SMF driver.
#[derive(Debug, Clone, Copy, Default)]
pub struct Smf;

/// What the installer needs from an SMF manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmfManifest {
    /// The service FMRI without instance, for example `svc:/oxide/node-agent`.
    pub service_fmri: String,
    /// The instance FMRI, for example `svc:/oxide/node-agent:default`.
    pub fmri: String,
    /// The service FMRIs (without instance) of the manifest's dependencies.
    pub dependencies: Vec<String>,
    /// The user the start method runs as: its `<method_credential>`, or the service's when the
    /// method has none. `None` means root.
    pub credential: Option<ServiceUser>,
}

/// Parses an SMF manifest and checks the elements SMF requires of it: a `service_bundle` of
/// type `manifest`, one `service` with a name, an instance (or `create_default_instance`), and
/// a `start` and a `stop` exec method.
pub fn parse_manifest(text: &str) -> Result<SmfManifest, String> {
    // SMF manifests carry a DOCTYPE naming the system DTD; it is allowed but never fetched.
    let options = roxmltree::ParsingOptions { allow_dtd: true, ..Default::default() };
    let doc = roxmltree::Document::parse_with_options(text, options)
        .map_err(|e| format!("not valid XML: {e}"))?;
    let bundle = doc.root_element();
    if bundle.tag_name().name() != "service_bundle" {
        return Err(format!(
            "the root element is <{}>, not <service_bundle>",
            bundle.tag_name().name()
        ));
    }
    if bundle.attribute("type") != Some("manifest") {
        return Err("<service_bundle> must have type=\"manifest\"".into());
    }
    let services: Vec<_> = bundle.children().filter(|n| n.has_tag_name("service")).collect();
    let [service] = services.as_slice() else {
        return Err(format!(
            "expected one <service> in <service_bundle>, found {}",
            services.len()
        ));
    };
    let name =
        service.attribute("name").filter(|n| !n.is_empty()).ok_or("<service> has no name")?;
    let instance = if let Some(instance) = service.children().find(|n| n.has_tag_name("instance")) {
        instance.attribute("name").ok_or("<instance> has no name")?.to_owned()
    } else if service.children().any(|n| n.has_tag_name("create_default_instance")) {
        "default".to_owned()
    } else {
        return Err(format!("service {name} has neither <instance> nor <create_default_instance>"));
    };
    for method in ["start", "stop"] {
        let found = service.descendants().any(|n| {
            n.has_tag_name("exec_method")
                && n.attribute("name") == Some(method)
                && n.attribute("exec").is_some_and(|e| !e.is_empty())
        });
        if !found {
            return Err(format!(
                "service {name} has no <exec_method name=\"{method}\"> with an exec"
            ));
        }
    }
    let dependencies = service
        .descendants()
        .filter(|n| n.has_tag_name("service_fmri"))
        .filter_map(|n| n.attribute("value"))
        .map(|v| strip_instance(v).to_owned())
        .collect();
    let start = service
        .descendants()
        .find(|n| n.has_tag_name("exec_method") && n.attribute("name") == Some("start"));
    // SMF applies the method's own context first, then the service's.
    let credential = start
        .into_iter()
        .chain([*service])
        .find_map(|n| {
            n.children()
                .filter(|c| c.has_tag_name("method_context"))
                .flat_map(|c| c.children())
                .find(|c| c.has_tag_name("method_credential"))
        })
        .map(|c| {
            let user = c.attribute("user").filter(|u| !u.is_empty()).ok_or_else(|| {
                format!("service {name}: <method_credential> has no user attribute")
            })?;
            // `:default` (SMF's default) is the user's primary group.
            let group = c.attribute("group").filter(|g| !g.is_empty() && *g != ":default");
            Ok::<_, String>(ServiceUser { user: user.to_owned(), group: group.map(str::to_owned) })
        })
        .transpose()?;
    let service_fmri = format!("svc:/{}", name.trim_start_matches('/'));
    Ok(SmfManifest {
        fmri: format!("{service_fmri}:{instance}"),
        service_fmri,
        dependencies,
        credential,
    })
}

/// `svc:/a/b:default` -> `svc:/a/b`.
fn strip_instance(fmri: &str) -> &str {
    let body_start = fmri.find(":/").map_or(0, |i| i + 2);
    match fmri[body_start..].rfind(':') {
        Some(i) => &fmri[..body_start + i],
        None => fmri,
    }
}

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

    const MANIFEST_XML: &str = r#"<?xml version="1.0"?>
<!DOCTYPE service_bundle SYSTEM "/usr/share/lib/xml/dtd/service_bundle.dtd.1">
<service_bundle type="manifest" name="control-plane">
  <service name="oxide/control-plane" type="service" version="1">
    <create_default_instance enabled="false"/>
    <dependency name="agent" grouping="require_all" restart_on="none" type="service">
      <service_fmri value="svc:/oxide/node-agent:default"/>
    </dependency>
    <dependency name="net" grouping="require_all" restart_on="none" type="service">
      <service_fmri value="svc:/milestone/network"/>
    </dependency>
    <exec_method type="method" name="start" exec="/opt/flotilla/current/control-plane/bin/control-plane --config /opt/flotilla/current/control-plane/pkg/config.toml &amp;" timeout_seconds="0"/>
    <exec_method type="method" name="stop" exec=":kill" timeout_seconds="0"/>
  </service>
</service_bundle>
"#;

    #[test]
    fn reads_fmri_and_dependencies() {
        let m = parse_manifest(MANIFEST_XML).unwrap();
        assert_eq!(m.fmri, "svc:/oxide/control-plane:default");
        assert_eq!(m.service_fmri, "svc:/oxide/control-plane");
        assert_eq!(m.dependencies, ["svc:/oxide/node-agent", "svc:/milestone/network"]);
        assert_eq!(m.credential, None);
    }

    #[test]
    fn reads_the_start_methods_credential_before_the_services() {
        let manifest = |service_ctx: &str, start_ctx: &str| {
            format!(
                "<service_bundle type=\"manifest\"><service name=\"a\">\
                 <create_default_instance enabled=\"false\"/>{service_ctx}\
                 <exec_method type=\"method\" name=\"start\" exec=\"/x\">{start_ctx}</exec_method>\
                 <exec_method type=\"method\" name=\"stop\" exec=\":kill\">\
                 <method_context><method_credential user=\"stopper\"/></method_context>\
                 </exec_method></service></service_bundle>"
            )
        };
        let ctx =
            |attrs: &str| format!("<method_context><method_credential {attrs}/></method_context>");
        let read = |text: String| parse_manifest(&text).unwrap().credential;
        let user = |u: &str, g: Option<&str>| {
            Some(ServiceUser { user: u.into(), group: g.map(Into::into) })
        };
        assert_eq!(read(manifest("", &ctx("user='svc' group='grp'"))), user("svc", Some("grp")));
        assert_eq!(
            read(manifest(&ctx("user='outer'"), &ctx("user='inner' group=':default'"))),
            user("inner", None)
        );
        assert_eq!(read(manifest(&ctx("user='outer' group='g'"), "")), user("outer", Some("g")));
        // The stop method's credential is not the service's user.
        assert_eq!(read(manifest("", "")), None);
        let err = parse_manifest(&manifest("", &ctx("group='g'"))).unwrap_err();
        assert!(err.contains("<method_credential> has no user"), "{err}");
    }

    #[test]
    fn rejects_manifests_smf_would_reject() {
        let cases = [
            ("<service_bundle", "not valid XML"),
            ("<x type=\"manifest\"/>", "not <service_bundle>"),
            ("<service_bundle type=\"profile\"/>", "type=\"manifest\""),
            ("<service_bundle type=\"manifest\"/>", "found 0"),
            (
                "<service_bundle type=\"manifest\"><service name=\"a\"/></service_bundle>",
                "neither <instance>",
            ),
            (
                "<service_bundle type=\"manifest\"><service name=\"a\"><instance name=\"i\"/>\
                 <exec_method name=\"start\" exec=\"/x\"/></service></service_bundle>",
                "no <exec_method name=\"stop\">",
            ),
        ];
        for (text, expected) in cases {
            let err = parse_manifest(text).unwrap_err();
            assert!(err.contains(expected), "{err:?} should contain {expected:?}");
        }
    }

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
