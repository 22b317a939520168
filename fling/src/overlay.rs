//! Overlays: the files that differ from server to server, generated on the builder under
//! `out/overlay/<server>/` and shipped to that server only.
//!
//! Two kinds of generators run. The simple ones here are functions from the config and one
//! server to that server's files (the node identity). The cluster generators of the
//! `flotilla-overlay` crate make the rack secret's shares, the cluster CA with each server's
//! key and certificate, and per-server configs rendered from the templates under
//! `overlay-templates/<service>/`. They run as that crate's binary, given this module's
//! [`Request`] in JSON, so that xtask's dependency graph (which `cargo run` checks before every
//! `cargo xtask` command) leaves out their certificate and template crates. Their identities are kept in `out/overlay-state/`, which
//! never leaves the builder, so regenerating keeps them unless `--rotate` is given. The
//! installer places an overlay's `opt/flotilla/<service>/...` into the release before any
//! service starts.

use camino::Utf8Path;
use xshell::{cmd, Shell};

use super::config::{Config, Server};

/// The builder-only directory of the kept identities, relative to the workspace root.
pub const STATE_DIR: &str = "out/overlay-state";
/// The directory of the overlays, one per server, relative to the workspace root.
pub const OUT_DIR: &str = "out/overlay";

pub use flotilla_contracts::overlay::{Identities, OverlayFile, Request, ServerRequest};

/// A generator of per-server files.
type Generator = fn(&Config, &Server) -> Vec<OverlayFile>;

/// Every simple generator, in order.
const GENERATORS: &[Generator] = &[node_identity];

/// The files of one server's overlay from the simple generators.
pub fn files_for(config: &Config, server: &Server) -> Vec<OverlayFile> {
    GENERATORS.iter().flat_map(|generate| generate(config, server)).collect()
}

/// The generators' input: the deployment servers in order with their address, variables and
/// simple generators' files (and, for the rss server, the file `rss_config_path` names, read
/// under `root`), the rack threshold, and where everything lives under `root`.
pub fn request(config: &Config, root: &Utf8Path, identities: Identities) -> crate::Result<Request> {
    let rss_config = match &config.rss_config_path {
        Some(path) => {
            let file = root.join(path);
            let contents = std::fs::read(&file).map_err(|e| crate::Error::Overlay {
                what: format!("read {file} (rss_config_path of {})", config.path),
                message: format!(
                    "{e}; `fling sync` sends the workspace without what .gitignore and \
                     builder.excludes leave out"
                ),
            })?;
            Some(contents)
        }
        None => None,
    };
    let servers = config
        .deployment
        .servers
        .iter()
        .map(|name| {
            let server = config.server(name);
            let mut files = files_for(config, server);
            if let Some(contents) = &rss_config {
                files.extend(rss_config_files(config, server, contents));
            }
            ServerRequest {
                name: server.name.as_str().to_owned(),
                addresses: vec![server.addr.for_ssh()],
                vars: server.vars.clone(),
                files,
            }
        })
        .collect();
    Ok(Request {
        servers,
        threshold: config.deployment.rack_threshold,
        vars: Default::default(),
        state_dir: root.join(STATE_DIR),
        identities,
        tls_services: config.overlay.tls_services.clone(),
        secret_services: config.overlay.secret_services.clone(),
        prefix: config.deployment.prefix.relative().to_owned(),
        templates_dir: root.join(&config.overlay.templates),
        out_dir: root.join(OUT_DIR),
    })
}

/// The rss server's copy of the file `rss_config_path` names, as `config-rss.toml` in the
/// `pkg/` directory of every identity service; nothing for any other server.
fn rss_config_files(config: &Config, server: &Server, contents: &[u8]) -> Vec<OverlayFile> {
    if config.deployment.rss_server.as_ref() != Some(&server.name) {
        return Vec::new();
    }
    config
        .overlay
        .identity_services
        .iter()
        .map(|service| OverlayFile {
            path: config
                .deployment
                .prefix
                .overlay_service_dir(service)
                .join("pkg")
                .join(super::config::RSS_CONFIG_FILE),
            contents: contents.to_vec(),
        })
        .collect()
}

/// Writes every deployment server's overlay under `<root>/out/overlay/` by running the
/// workspace's `flotilla-overlay` binary, which replaces the previous overlays as a whole and
/// prints one line of what it kept and made. The binary is found through the workspace xtask
/// was built from, not the current directory, since `root` need not be a workspace.
pub fn generate(
    sh: &Shell,
    config: &Config,
    root: &Utf8Path,
    workspace: &Utf8Path,
    identities: Identities,
) -> crate::Result<()> {
    let failed = |what: String| {
        move |e: xshell::Error| crate::Error::Overlay { what, message: e.to_string() }
    };
    let input =
        serde_json::to_vec(&request(config, root, identities)?).expect("a request serializes");
    let manifest = workspace.join("Cargo.toml");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    // From the workspace root, so cargo reads the workspace's own `.cargo/config.toml`.
    let _dir = sh.push_dir(workspace);
    // Built, then run: `cargo run -p` takes only the workspace's own members, and in a
    // workspace that adopts flotilla the generators are a dependency (of its xtask), not one.
    let mut build = cmd!(
        sh,
        "{cargo} build -q -p flotilla-overlay --bin flotilla-overlay --manifest-path {manifest} --message-format=json-render-diagnostics"
    );
    // The variables cargo set for xtask would make the nested cargo rebuild needlessly.
    for (key, _) in std::env::vars_os() {
        if key.to_str().is_some_and(flotilla_package::cargo_stamp::is_set_by_cargo) {
            build = build.env_remove(key);
        }
    }
    let messages = build.quiet().read().map_err(failed(format!(
        "build flotilla-overlay in {workspace} (a member of the workspace or a dependency of its \
         xtask)"
    )))?;
    let binary = messages
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "flotilla-overlay")
        .find_map(|m| m["executable"].as_str().map(str::to_owned))
        .ok_or_else(|| crate::Error::Overlay {
            what: format!("build flotilla-overlay in {workspace}"),
            message: "cargo built no flotilla-overlay binary".into(),
        })?;
    cmd!(sh, "{binary} generate").stdin(input).quiet().run().map_err(failed(format!(
        "generate the overlays under {root}/{OUT_DIR} with flotilla-overlay"
    )))
}

/// The node's identity for people and scripts on the server: its name, address, role and
/// config variables, in TOML (the services read their own `node.toml`, from a template).
fn node_identity(config: &Config, server: &Server) -> Vec<OverlayFile> {
    let mut node = toml::Table::new();
    node.insert("name".into(), server.name.as_str().into());
    node.insert("addr".into(), server.addr.for_ssh().into());
    let is_rss = config.deployment.rss_server.as_ref() == Some(&server.name);
    node.insert("rss".into(), is_rss.into());
    let vars: toml::Table =
        server.vars.iter().map(|(k, v)| (k.clone(), toml::Value::from(v.as_str()))).collect();
    node.insert("vars".into(), vars.into());
    let mut doc = toml::Table::new();
    doc.insert("node".into(), node.into());
    let contents = format!(
        "# Written by `cargo xtask fling overlay` for {}.\n{}",
        server.name,
        toml::to_string(&doc).expect("a table serializes")
    )
    .into_bytes();
    config
        .overlay
        .identity_services
        .iter()
        .map(|service| OverlayFile {
            path: config.deployment.prefix.overlay_service_dir(service).join("pkg/identity.toml"),
            contents: contents.clone(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use camino::Utf8PathBuf;
    use flotilla_overlay::{Fate, Summary};

    use super::*;

    const CONFIG: &str = r#"
[builder]
server = "b"
source_path = "/src"
[deployment]
servers = ["n1", "n2"]
staging_dir = "/var/tmp/staging"
rss_server = "n2"
[overlay]
tls_services = ["node-agent", "control-plane", "etcd"]
secret_services = ["node-agent"]
identity_services = ["node-agent"]
[servers.b]
username = "root"
addr = "127.0.0.1"
[servers.n1]
username = "root"
addr = "10.0.0.1"
vars = { secret = "only-n1", quote = "a\"b'c" }
[servers.n2]
username = "root"
addr = "fd00::2"
"#;

    /// Runs the generators as the binary would, on the JSON this module writes: the test checks
    /// that the request fits the binary's schema, and what the binary writes from it.
    fn generate_in_process(config: &Config, root: &Utf8Path, identities: Identities) -> Summary {
        let json = serde_json::to_string(&request(config, root, identities).unwrap()).unwrap();
        let request = flotilla_overlay::parse_request("test", &json).unwrap();
        flotilla_overlay::run(&request).unwrap()
    }

    #[test]
    fn the_request_lists_servers_in_order_with_their_own_files() {
        let config = Config::parse(Utf8Path::new("t.toml"), CONFIG).unwrap();
        let request = request(&config, Utf8Path::new("/w"), Identities::Rotate).unwrap();
        let names: Vec<&str> = request.servers.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["n1", "n2"], "deployment servers only, in order");
        assert_eq!(request.servers[1].addresses, ["fd00::2"]);
        assert_eq!(request.servers[0].vars["secret"], "only-n1");
        assert_eq!(
            request.servers[0].files,
            files_for(&config, config.server(&config.deployment.servers[0]))
        );
        assert_eq!(request.threshold, 2);
        assert_eq!(request.state_dir, "/w/out/overlay-state");
        assert_eq!(request.templates_dir, "/w/overlay-templates");
        assert_eq!(request.out_dir, "/w/out/overlay");
        let json: serde_json::Value = serde_json::to_value(&request).unwrap();
        assert_eq!(json["identities"], "rotate");
        assert_eq!(json["secret_services"], serde_json::json!(["node-agent"]));
        assert_eq!(json["prefix"], "opt/flotilla");
    }

    #[test]
    fn a_workspace_declares_its_own_services_templates_and_prefix() {
        let text = CONFIG
            .replace(
                "tls_services = [\"node-agent\", \"control-plane\", \"etcd\"]",
                "tls_services = [\"ledger\"]\ntemplates = \"deploy/templates\"",
            )
            .replace("secret_services = [\"node-agent\"]", "secret_services = []")
            .replace("identity_services = [\"node-agent\"]", "identity_services = [\"greeter\"]")
            .replace("rss_server = \"n2\"", "rss_server = \"n2\"\nprefix = \"/opt/acme\"");
        let config = Config::parse(Utf8Path::new("t.toml"), &text).unwrap();
        let asked = request(&config, Utf8Path::new("/w"), Identities::Keep).unwrap();
        assert_eq!(asked.tls_services, ["ledger"]);
        assert!(asked.secret_services.is_empty());
        assert_eq!(asked.prefix, "opt/acme");
        assert_eq!(asked.templates_dir, "/w/deploy/templates");
        let paths: Vec<&str> = asked.servers[0].files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["opt/acme/greeter/pkg/identity.toml"]);
        // Without an [overlay] table nothing is generated for any service.
        let bare = CONFIG.split("[overlay]").next().unwrap().to_owned()
            + &CONFIG[CONFIG.find("[servers.b]").unwrap()..];
        let config = Config::parse(Utf8Path::new("t.toml"), &bare).unwrap();
        let bare = request(&config, Utf8Path::new("/w"), Identities::Keep).unwrap();
        assert!(bare.tls_services.is_empty() && bare.secret_services.is_empty());
        assert!(bare.servers.iter().all(|s| s.files.is_empty()));
        for (bad, field) in [
            ("tls_services = [\"a/b\"]", "overlay.tls_services"),
            ("secret_services = [\"x\", \"x\"]", "overlay.secret_services"),
            ("templates = \"/etc\"", "overlay.templates"),
            ("templates = \"../up\"", "overlay.templates"),
        ] {
            let text = CONFIG.replace("[overlay]", &format!("[overlay]\n{bad}"));
            let text = if bad.starts_with("tls") {
                text.replace("tls_services = [\"node-agent\", \"control-plane\", \"etcd\"]\n", "")
            } else if bad.starts_with("secret") {
                text.replace("secret_services = [\"node-agent\"]\n", "")
            } else {
                text
            };
            let err = Config::parse(Utf8Path::new("t.toml"), &text).unwrap_err().to_string();
            assert!(err.contains(&format!(": {field}: ")), "{bad}: {err}");
        }
        let text = CONFIG.replace("rss_server = \"n2\"", "rss_server = \"n2\"\nprefix = \"/usr\"");
        let err = Config::parse(Utf8Path::new("t.toml"), &text).unwrap_err().to_string();
        assert!(err.contains(": deployment.prefix: "), "{err}");
    }

    #[test]
    fn each_server_gets_only_its_own_files_privately() {
        let config = Config::parse(Utf8Path::new("t.toml"), CONFIG).unwrap();
        let dir = std::env::temp_dir().join(format!("fling-overlay-test-{}", std::process::id()));
        let out = Utf8PathBuf::try_from(dir.clone()).unwrap();
        struct Cleanup(std::path::PathBuf);
        impl Drop for Cleanup {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        let _cleanup = Cleanup(dir);
        let first = generate_in_process(&config, &out, Identities::Keep);
        // Twice: a rerun replaces the tree and keeps the identities.
        let second = generate_in_process(&config, &out, Identities::Keep);
        assert_eq!(first.ca, Fate::Created);
        assert_eq!(second.ca, Fate::Kept);
        assert_eq!(second.shares, Fate::Kept);
        assert_eq!(second.threshold, 2, "a majority of two servers");
        let out_dir = out.join("out");
        let n1 = out_dir.join("overlay/n1/opt/flotilla/node-agent/pkg/identity.toml");
        let n2 = out_dir.join("overlay/n2/opt/flotilla/node-agent/pkg/identity.toml");
        let text1 = std::fs::read_to_string(&n1).unwrap();
        let text2 = std::fs::read_to_string(&n2).unwrap();
        let doc: toml::Table = text1.parse().unwrap();
        assert_eq!(doc["node"]["name"].as_str(), Some("n1"));
        assert_eq!(doc["node"]["vars"]["quote"].as_str(), Some("a\"b'c"));
        assert_eq!(doc["node"]["rss"].as_bool(), Some(false));
        assert!(text2.contains("rss = true"));
        assert!(!text2.contains("only-n1"), "n2's overlay holds n1's secret:\n{text2}");
        assert_eq!(std::fs::metadata(&n1).unwrap().permissions().mode() & 0o777, 0o600);
        let d = std::fs::metadata(out_dir.join("overlay/n1")).unwrap().permissions().mode();
        assert_eq!(d & 0o777, 0o700);
        let n1_pkg = out_dir.join("overlay/n1/opt/flotilla/node-agent/pkg");
        for file in ["tls/node.key", "tls/node.crt", "tls/ca.crt", "secret/share.json"] {
            let mode = std::fs::metadata(n1_pkg.join(file)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{file}");
        }
        let key1 = std::fs::read(n1_pkg.join("tls/node.key")).unwrap();
        let key2 =
            std::fs::read(out_dir.join("overlay/n2/opt/flotilla/node-agent/pkg/tls/node.key"));
        assert_ne!(key1, key2.unwrap());
        let mut entries: Vec<_> =
            std::fs::read_dir(&out_dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        entries.sort();
        assert_eq!(entries, ["overlay", "overlay-state"], "temporary trees are gone");
        let rotated = generate_in_process(&config, &out, Identities::Rotate);
        assert_eq!(rotated.ca, Fate::Created);
        assert_ne!(std::fs::read(n1_pkg.join("tls/node.key")).unwrap(), key1);
    }

    #[test]
    fn the_rss_config_reaches_the_rss_server_alone() {
        let dir = std::env::temp_dir().join(format!("fling-rss-test-{}", std::process::id()));
        let root = Utf8PathBuf::try_from(dir.clone()).unwrap();
        struct Cleanup(std::path::PathBuf);
        impl Drop for Cleanup {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        let _cleanup = Cleanup(dir);
        let text = format!("rss_config_path = \"rack/config-rss.toml\"\n{CONFIG}")
            .replace("identity_services = [\"node-agent\"]", "identity_services = [\"a\", \"b\"]");
        let config = Config::parse(Utf8Path::new("t.toml"), &text).unwrap();

        // The file is read on the builder, from its copy of the workspace.
        let err = request(&config, &root, Identities::Keep).unwrap_err().to_string();
        assert!(err.starts_with(&format!("read {root}/rack/config-rss.toml (rss_config_path")));
        assert!(err.contains(".gitignore"), "{err}");

        std::fs::create_dir_all(root.join("rack")).unwrap();
        std::fs::write(root.join("rack/config-rss.toml"), "rack = \"r1\"\n").unwrap();
        generate_in_process(&config, &root, Identities::Keep);
        let overlay = root.join("out/overlay");
        for service in ["a", "b"] {
            let file = overlay.join(format!("n2/opt/flotilla/{service}/pkg/config-rss.toml"));
            assert_eq!(std::fs::read_to_string(&file).unwrap(), "rack = \"r1\"\n");
            assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
            let other = overlay.join(format!("n1/opt/flotilla/{service}/pkg/config-rss.toml"));
            assert!(!other.exists(), "n1 is not the rss server but got {other}");
        }
    }
}
