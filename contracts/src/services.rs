//! Service definitions, as far as more than one crate reads them: the user a service runs as
//! (`User=`/`Group=` of a systemd unit's `[Service]` section, the start method's
//! `<method_credential>` of an SMF manifest) and the SMF manifest's identity and dependencies.
//!
//! The installer reads them to create a service's user when the host lacks it, to hand the
//! service's overlay files to that user and to order SMF services; tests of the workspace's own
//! definitions read them through the same parser, so no two readers can disagree.

use camino::Utf8Path;
use serde::{Deserialize, Serialize};

use crate::manager::ManagerKind;

/// The directory of a service, inside a release, that holds its definitions and configs.
pub const PKG_DIR: &str = "pkg";
/// The file in a service's `pkg/` directory that SMF imports.
pub const SMF_MANIFEST: &str = "manifest.xml";
/// The file in a service's `pkg/` directory that declares its health check.
pub const HEALTH_FILE: &str = "health.toml";

/// The user (and group) a service declares.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ServiceUser {
    pub user: String,
    /// The group; `None` means the user's primary group, as both systemd and SMF do.
    pub group: Option<String>,
}

/// The `User=` and `Group=` of a systemd unit's `[Service]` section; `None` when it has no
/// `User=` (the service runs as root). Later assignments win, as in systemd; an empty one
/// resets the setting. Returns the line of the `User=` that counts, for messages.
pub fn unit_user_line(text: &str) -> Option<(ServiceUser, usize)> {
    let (mut user, mut group) = (None, None);
    let mut in_service = false;
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.starts_with('[') {
            in_service = line == "[Service]";
            continue;
        }
        if !in_service || line.starts_with(['#', ';']) {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else { continue };
        let value = value.trim();
        let value = (!value.is_empty()).then(|| value.to_owned());
        match key.trim() {
            "User" => user = value.map(|v| (v, index + 1)),
            "Group" => group = value,
            _ => {}
        }
    }
    user.map(|(user, line)| (ServiceUser { user, group }, line))
}

/// [`unit_user_line`] without the line.
pub fn unit_user(text: &str) -> Option<ServiceUser> {
    unit_user_line(text).map(|(user, _)| user)
}

/// What the installer needs from an SMF manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmfManifest {
    /// The service FMRI without instance, for example `svc:/oxide/nexus`.
    pub service_fmri: String,
    /// The instance FMRI, for example `svc:/oxide/nexus:default`.
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
pub fn parse_smf_manifest(text: &str) -> Result<SmfManifest, String> {
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
pub fn strip_instance(fmri: &str) -> &str {
    let body_start = fmri.find(":/").map_or(0, |i| i + 2);
    match fmri[body_start..].rfind(':') {
        Some(i) => &fmri[..body_start + i],
        None => fmri,
    }
}

/// Whether `name` is a portable system user or group name, `^[a-z_][a-z0-9_-]{0,31}$`, which
/// `useradd` on Linux and illumos both accept and which is one plain word in any shell.
pub fn valid_user_name(name: &str) -> bool {
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_lowercase() || c == '_');
    first_ok
        && name.len() <= 32
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

/// The user a service definition declares, read as its service manager reads it, with the
/// name checked: `Ok(None)` for a service that runs as root. `path` is only used in messages.
pub fn declared_user(
    kind: ManagerKind,
    path: &Utf8Path,
    text: &str,
) -> Result<Option<ServiceUser>, String> {
    let (user, line) = match kind {
        ManagerKind::Systemd => match unit_user_line(text) {
            Some((user, line)) => (user, Some(line)),
            None => return Ok(None),
        },
        ManagerKind::Smf => match parse_smf_manifest(text).map_err(|e| format!("{path}: {e}"))? {
            SmfManifest { credential: Some(user), .. } => (user, None),
            _ => return Ok(None),
        },
    };
    let at = line.map_or(String::new(), |l| format!(": line {l}"));
    for name in std::iter::once(&user.user).chain(&user.group) {
        if !valid_user_name(name) {
            return Err(format!(
                "{path}{at}: `{name}` is not a system user or group name (^[a-z_][a-z0-9_-]{{0,31}}$)"
            ));
        }
    }
    Ok(Some(user))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_user_and_group_from_the_service_section_only() {
        let unit = "[Unit]\nUser=wrong\n[Service]\nType=exec\n# User=commented\nUser = first\n\
                    User=svc-a\nGroup=grp-a\n[Install]\nGroup=wrong\n";
        assert_eq!(
            unit_user_line(unit),
            Some((ServiceUser { user: "svc-a".into(), group: Some("grp-a".into()) }, 7))
        );
        assert_eq!(
            unit_user("[Service]\nUser=svc\n"),
            Some(ServiceUser { user: "svc".into(), group: None })
        );
        // An empty assignment resets the user: root, as without one.
        assert_eq!(unit_user("[Service]\nUser=svc\nUser=\nGroup=g\n"), None);
        assert_eq!(unit_user("[Service]\nExecStart=/bin/true\n"), None);
    }

    #[test]
    fn declared_users_are_checked_with_their_file_and_line() {
        let path = Utf8Path::new("smf/s/s.service");
        for bad in ["Root", "a b", "x;reboot", "1abc", "$(id)", &"a".repeat(33)] {
            let err = declared_user(
                ManagerKind::Systemd,
                path,
                &format!("[Service]\nType=exec\nUser={bad}\n"),
            )
            .unwrap_err();
            assert!(err.starts_with("smf/s/s.service: line 3: `"), "{err}");
        }
        for good in ["_a", "a", "flotilla-node-agent", "a_b-9", &"a".repeat(32)] {
            assert!(valid_user_name(good), "{good}");
        }
        let smf = "<service_bundle type='manifest' name='x'><service name='site/x' version='1'>\
                   <create_default_instance enabled='false'/>\
                   <exec_method type='method' name='start' exec='/x'><method_context>\
                   <method_credential user='svc-x' group=':default'/></method_context></exec_method>\
                   <exec_method type='method' name='stop' exec=':kill'/></service></service_bundle>";
        let user = declared_user(ManagerKind::Smf, Utf8Path::new("m.xml"), smf).unwrap();
        assert_eq!(user, Some(ServiceUser { user: "svc-x".into(), group: None }));
        // A unit is not read as an SMF manifest, nor the other way round.
        assert!(declared_user(ManagerKind::Smf, path, "[Service]\nUser=a\n").is_err());
        assert_eq!(declared_user(ManagerKind::Systemd, path, smf).unwrap(), None);
    }

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
        let m = parse_smf_manifest(MANIFEST_XML).unwrap();
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
        let read = |text: String| parse_smf_manifest(&text).unwrap().credential;
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
        let err = parse_smf_manifest(&manifest("", &ctx("group='g'"))).unwrap_err();
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
            let err = parse_smf_manifest(text).unwrap_err();
            assert!(err.contains(expected), "{err:?} should contain {expected:?}");
        }
    }
}
