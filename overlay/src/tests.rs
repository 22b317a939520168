use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;

use camino::{Utf8Path, Utf8PathBuf};
use x509_parser::extensions::GeneralName;
use x509_parser::pem::parse_x509_pem;

use super::*;

fn node(name: &str, addresses: &[&str]) -> Node {
    Node {
        name: name.into(),
        addresses: addresses.iter().map(|a| a.to_string()).collect(),
        vars: BTreeMap::from([("rack".to_owned(), format!("rack-of-{name}"))]),
    }
}

fn config(state: &Utf8Path, identities: Identities) -> Config {
    Config {
        cluster: Cluster {
            nodes: vec![
                node("node1", &["fd00::11", "10.0.0.11"]),
                node("node2", &["fd00::12"]),
                node("node3", &["node3.example"]),
            ],
            threshold: 2,
            vars: BTreeMap::from([("cluster".to_owned(), "test".to_owned())]),
        },
        state_dir: state.to_owned(),
        identities,
        tls_services: vec!["node-agent".into(), "control-plane".into()],
        secret_services: vec!["node-agent".into()],
        prefix: "opt/flotilla".into(),
        templates: vec![Template {
            source: "templates/node-agent/node.toml".into(),
            dest: "opt/flotilla/node-agent/pkg/node.toml".into(),
            text: "node = \"{{ node.name }}\"\nindex = {{ node.index }}\nlisten = \"{{ node.host }}:1\"\n\
                   peers = [{% for p in peers %}\"{{ p.name }}\"{% if not loop.last %}, {% endif %}{% endfor %}]\n\
                   rack = \"{{ node.vars.rack }}\"\ncluster = \"{{ cluster.vars.cluster }}\"\n\
                   size = {{ cluster.size }}\n"
                .into(),
        }],
    }
}

fn tempdir() -> (tempfile::TempDir, Utf8PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = Utf8PathBuf::try_from(dir.path().to_owned()).unwrap();
    (dir, path)
}

fn file<'a>(overlay: &'a Overlay, server: &str, path: &str) -> &'a [u8] {
    let files = &overlay.servers[server];
    let found = files.iter().find(|f| f.path == path);
    &found.unwrap_or_else(|| panic!("{server} has no {path}: {files:?}")).contents
}

fn share(overlay: &Overlay, server: &str) -> ShareFile {
    let bytes = file(overlay, server, "opt/flotilla/node-agent/pkg/secret/share.json");
    serde_json::from_slice(bytes).unwrap()
}

fn mode(path: &Utf8Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn any_k_shares_reconstruct_and_k_minus_one_do_not() {
    let names = ["a", "b", "c", "d", "e"];
    let shares = secret::deal(3, &names).unwrap();
    let all: Vec<ShareFile> = shares.values().cloned().collect();
    let mut secrets = Vec::new();
    for i in 0..5 {
        for j in i + 1..5 {
            for k in j + 1..5 {
                let chosen = [all[i].clone(), all[j].clone(), all[k].clone()];
                secrets.push(secret::combine(&chosen).unwrap());
            }
            // Two shares are refused outright ...
            let err = secret::combine(&[all[i].clone(), all[j].clone()]).unwrap_err();
            assert!(err.contains("3 of 5 shares needed"), "{err}");
            // ... and interpolating them anyway gives a value the verifier rejects.
            let forged: Vec<ShareFile> = [&all[i], &all[j]]
                .iter()
                .map(|s| ShareFile { threshold: 2, ..(*s).clone() })
                .collect();
            let err = secret::combine(&forged).unwrap_err();
            assert!(err.contains("does not match the verifier"), "{err}");
        }
    }
    assert_eq!(secrets.len(), 10);
    assert!(secrets.iter().all(|s| s == &secrets[0] && s.len() == secret::SECRET_LEN));
    assert_eq!(secret::verifier(&secrets[0]), all[0].verifier);
    // A second dealing is a different secret.
    let other = secret::deal(3, &names).unwrap();
    assert_ne!(other["a"].verifier, all[0].verifier);
    let mixed = [all[0].clone(), all[1].clone(), other["c"].clone()];
    assert!(secret::combine(&mixed).unwrap_err().contains("different secrets"));
    // Debug output never shows a share.
    assert!(!format!("{:?}", all[0]).contains(&all[0].share));
}

#[test]
fn each_server_gets_its_own_share_key_and_a_certificate_the_ca_signed() {
    let (_guard, dir) = tempdir();
    let overlay = generate(&config(&dir.join("state"), Identities::Keep)).unwrap();
    assert_eq!(overlay.servers.len(), 3);
    let ca_pem = file(&overlay, "node1", "opt/flotilla/node-agent/pkg/tls/ca.crt").to_vec();
    let (_, ca_pem) = parse_x509_pem(&ca_pem).unwrap();
    let ca = ca_pem.parse_x509().unwrap();
    assert!(ca.is_ca());
    let (_, other_pem) = parse_x509_pem(
        rcgen::generate_simple_self_signed(vec!["x".to_owned()]).unwrap().cert.pem().as_bytes(),
    )
    .unwrap();
    let other_ca = other_pem.parse_x509().unwrap();

    let mut keys = BTreeMap::new();
    let mut shares = Vec::new();
    for (name, expected) in [
        ("node1", vec!["node1", "fd00::11", "10.0.0.11"]),
        ("node2", vec!["node2", "fd00::12"]),
        ("node3", vec!["node3", "node3.example"]),
    ] {
        let cert = file(&overlay, name, "opt/flotilla/node-agent/pkg/tls/node.crt");
        assert_eq!(cert, file(&overlay, name, "opt/flotilla/control-plane/pkg/tls/node.crt"));
        let (_, pem) = parse_x509_pem(cert).unwrap();
        let cert = pem.parse_x509().unwrap();
        cert.verify_signature(Some(ca.public_key())).unwrap();
        assert!(cert.verify_signature(Some(other_ca.public_key())).is_err());
        let sans: Vec<String> = cert
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|n| match n {
                GeneralName::DNSName(d) => d.to_string(),
                GeneralName::IPAddress(ip) if ip.len() == 4 => {
                    std::net::IpAddr::from(<[u8; 4]>::try_from(*ip).unwrap()).to_string()
                }
                GeneralName::IPAddress(ip) => {
                    std::net::IpAddr::from(<[u8; 16]>::try_from(*ip).unwrap()).to_string()
                }
                other => panic!("unexpected name {other:?}"),
            })
            .collect();
        for name in expected.iter().chain(&["localhost", "127.0.0.1", "::1"]) {
            assert!(sans.iter().any(|s| s == name), "{name} not in {sans:?}");
        }
        keys.insert(
            name,
            file(&overlay, name, "opt/flotilla/node-agent/pkg/tls/node.key").to_vec(),
        );
        shares.push(share(&overlay, name));
    }
    // Each key and each share is in its own server's overlay only.
    for (server, files) in &overlay.servers {
        for (owner, key) in &keys {
            let holds = files.iter().any(|f| contains(&f.contents, key));
            assert_eq!(holds, server == owner, "{server} holding {owner}'s key: {holds}");
        }
        for (owner, share) in ["node1", "node2", "node3"].iter().zip(&shares) {
            let holds = files.iter().any(|f| contains(&f.contents, share.share.as_bytes()));
            assert_eq!(holds, server == owner, "{server} holding {owner}'s share: {holds}");
        }
    }
    assert!(overlay
        .servers
        .values()
        .flatten()
        .all(|f| !contains(&f.contents, b"PRIVATE KEY") || f.path.as_str().ends_with("node.key")));
    let secret = secret::combine(&shares[1..]).unwrap();
    assert_eq!(secret::verifier(&secret), shares[0].verifier);
    assert_eq!((shares[0].threshold, shares[0].total_shares), (2, 3));
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn regenerating_keeps_identities_and_rotate_replaces_them() {
    let (_guard, dir) = tempdir();
    let state = dir.join("state");
    let first = generate(&config(&state, Identities::Keep)).unwrap();
    assert_eq!(first.summary.ca, Fate::Created);
    assert_eq!(first.summary.shares, Fate::Created);
    assert!(first.summary.nodes.values().all(|f| *f == Fate::Created));

    let again = generate(&config(&state, Identities::Keep)).unwrap();
    assert_eq!(again.summary.ca, Fate::Kept);
    assert_eq!(again.summary.shares, Fate::Kept);
    assert!(again.summary.nodes.values().all(|f| *f == Fate::Kept));
    assert_eq!(first.servers, again.servers, "an unchanged cluster regenerates the same files");

    // A changed address issues a new certificate for the same key, on that server only.
    let mut moved = config(&state, Identities::Keep);
    moved.cluster.nodes[1].addresses = vec!["fd00::99".into()];
    let moved = generate(&moved).unwrap();
    assert_eq!(moved.summary.nodes["node2"], Fate::Reissued);
    assert_eq!(moved.summary.nodes["node1"], Fate::Kept);
    let key = "opt/flotilla/node-agent/pkg/tls/node.key";
    let crt = "opt/flotilla/node-agent/pkg/tls/node.crt";
    assert_eq!(file(&first, "node2", key), file(&moved, "node2", key));
    assert_ne!(file(&first, "node2", crt), file(&moved, "node2", crt));
    assert_eq!(share(&first, "node2"), share(&moved, "node2"));

    let rotated = generate(&config(&state, Identities::Rotate)).unwrap();
    assert_eq!(rotated.summary.ca, Fate::Created);
    assert_eq!(rotated.summary.shares, Fate::Created);
    for name in ["node1", "node2", "node3"] {
        assert_ne!(file(&first, name, key), file(&rotated, name, key));
        assert_ne!(file(&first, name, crt), file(&rotated, name, crt));
        assert_ne!(share(&first, name).verifier, share(&rotated, name).verifier);
    }
    // A different threshold deals new shares even without rotation.
    let mut stricter = config(&state, Identities::Keep);
    stricter.cluster.threshold = 3;
    let stricter = generate(&stricter).unwrap();
    assert_eq!(stricter.summary.shares, Fate::Created);
    assert_eq!(stricter.summary.ca, Fate::Kept);
    assert_eq!(share(&stricter, "node1").threshold, 3);
}

#[test]
fn secrets_are_private_on_the_builder_and_in_written_overlays() {
    let (_guard, dir) = tempdir();
    let state = dir.join("state");
    let overlay = generate(&config(&state, Identities::Keep)).unwrap();
    let out = dir.join("overlay");
    write(&overlay, &out).unwrap();
    let mut checked = 0;
    for root in [&state, &out] {
        let mut stack = vec![root.clone()];
        while let Some(d) = stack.pop() {
            assert_eq!(mode(&d), 0o700, "{d}");
            for entry in d.read_dir_utf8().unwrap() {
                let path = entry.unwrap().path().to_owned();
                if path.is_dir() {
                    stack.push(path);
                } else {
                    assert_eq!(mode(&path), 0o600, "{path}");
                    checked += 1;
                }
            }
        }
    }
    assert!(checked > 20, "only {checked} files");
    let written = std::fs::read(out.join("node3/opt/flotilla/node-agent/pkg/secret/share.json"));
    assert_eq!(
        serde_json::from_slice::<ShareFile>(&written.unwrap()).unwrap(),
        share(&overlay, "node3")
    );
    // No temporary file is left behind.
    assert!(!out
        .join("node3/opt/flotilla/node-agent/pkg/secret")
        .read_dir_utf8()
        .unwrap()
        .any(|e| e.unwrap().file_name().starts_with('.')));
    // The summary, which is what gets printed, holds no secret.
    let summary = serde_json::to_string(&overlay.summary).unwrap();
    assert!(!summary.contains(&share(&overlay, "node1").share));
    assert!(!format!("{overlay:?}").contains("PRIVATE KEY"));
}

#[test]
fn templates_render_per_server_and_cluster_variables() {
    let (_guard, dir) = tempdir();
    let overlay = generate(&config(&dir.join("state"), Identities::Keep)).unwrap();
    let rendered = String::from_utf8(
        file(&overlay, "node1", "opt/flotilla/node-agent/pkg/node.toml").to_vec(),
    )
    .unwrap();
    assert_eq!(
        rendered,
        "node = \"node1\"\nindex = 1\nlisten = \"[fd00::11]:1\"\npeers = [\"node2\", \"node3\"]\n\
         rack = \"rack-of-node1\"\ncluster = \"test\"\nsize = 3\n"
    );
    let rendered = String::from_utf8(
        file(&overlay, "node3", "opt/flotilla/node-agent/pkg/node.toml").to_vec(),
    )
    .unwrap();
    assert!(rendered.contains("listen = \"node3.example:1\""), "{rendered}");
    assert!(rendered.contains("index = 3"), "{rendered}");

    let mut broken = config(&dir.join("state"), Identities::Keep);
    broken.templates[0].text = "a = 1\nb = \"{{ node.nmae }}\"\n".into();
    let err = generate(&broken).unwrap_err().to_string();
    assert!(
        err.starts_with("render the template templates/node-agent/node.toml for node1: line 2"),
        "{err}"
    );
}

#[test]
fn templates_load_from_a_directory_per_service() {
    let (_guard, dir) = tempdir();
    std::fs::create_dir_all(dir.join("etcd/sub")).unwrap();
    std::fs::write(dir.join("etcd/etcd.conf.yml"), "name: {{ node.name }}\n").unwrap();
    std::fs::write(dir.join("etcd/sub/x"), "x").unwrap();
    let templates = template::load_dir(&dir, "opt/flotilla").unwrap();
    let dests: Vec<&str> = templates.iter().map(|t| t.dest.as_str()).collect();
    assert_eq!(dests, ["opt/flotilla/etcd/pkg/etcd.conf.yml", "opt/flotilla/etcd/pkg/sub/x"]);
    assert!(template::load_dir(&dir.join("missing"), "opt/flotilla").unwrap().is_empty());
    std::fs::write(dir.join("loose"), "x").unwrap();
    let err = template::load_dir(&dir, "opt/flotilla").unwrap_err().to_string();
    assert!(err.contains("directory named after their service"), "{err}");
}

#[test]
fn bad_clusters_are_refused_with_the_reason() {
    let (_guard, dir) = tempdir();
    let state = dir.join("state");
    for (change, expected) in [
        (
            Box::new(|c: &mut Config| c.cluster.threshold = 4) as Box<dyn Fn(&mut Config)>,
            "threshold 4",
        ),
        (Box::new(|c: &mut Config| c.cluster.threshold = 0), "threshold 0"),
        (Box::new(|c: &mut Config| c.cluster.nodes[1].name = "node1".into()), "listed twice"),
        (Box::new(|c: &mut Config| c.cluster.nodes[0].name = "../x".into()), "server name `../x`"),
        (Box::new(|c: &mut Config| c.cluster.nodes[0].addresses.clear()), "has no address"),
        (Box::new(|c: &mut Config| c.secret_services = vec!["a/b".into()]), "service name `a/b`"),
        (Box::new(|c: &mut Config| c.cluster.nodes.clear()), "no servers"),
    ] {
        let mut config = config(&state, Identities::Keep);
        change(&mut config);
        let err = generate(&config).unwrap_err().to_string();
        assert!(err.contains(expected), "{err:?} should contain {expected:?}");
    }
    assert!(!state.exists(), "a refused cluster created state");
}

/// A request as xtask writes it, for three servers, with one file of the caller's per server
/// and the template of [`config`] in a templates directory.
fn request(dir: &Utf8Path, identities: Identities) -> Request {
    let template = config(&dir.join("unused"), identities).templates.remove(0);
    let templates_dir = dir.join("templates");
    std::fs::create_dir_all(templates_dir.join("node-agent")).unwrap();
    std::fs::write(templates_dir.join("node-agent/node.toml"), &template.text).unwrap();
    let servers = config(&dir.join("unused"), identities)
        .cluster
        .nodes
        .into_iter()
        .map(|node| ServerRequest {
            files: vec![OverlayFile {
                path: "opt/flotilla/node-agent/pkg/identity.toml".into(),
                contents: format!("name = \"{}\"\n", node.name).into_bytes(),
            }],
            name: node.name,
            addresses: node.addresses,
            vars: node.vars,
        })
        .collect();
    Request {
        servers,
        threshold: 2,
        vars: BTreeMap::from([("cluster".to_owned(), "test".to_owned())]),
        state_dir: dir.join("out/overlay-state"),
        identities,
        tls_services: vec!["node-agent".into()],
        secret_services: vec!["node-agent".into()],
        prefix: "opt/flotilla".into(),
        templates_dir,
        out_dir: dir.join("out/overlay"),
    }
}

#[test]
fn a_request_writes_every_server_tree_and_replaces_the_previous_one_whole() {
    let (_guard, dir) = tempdir();
    let out = dir.join("out/overlay");
    // A file of an earlier generation that this one does not write must not survive.
    std::fs::create_dir_all(out.join("node9")).unwrap();
    std::fs::write(out.join("node9/stale"), "old").unwrap();
    let json = serde_json::to_string(&request(&dir, Identities::Keep)).unwrap();
    let first = run(&parse_request("test", &json).unwrap()).unwrap();
    assert_eq!(first.ca, Fate::Created);
    let mut servers: Vec<String> =
        out.read_dir_utf8().unwrap().map(|e| e.unwrap().file_name().to_owned()).collect();
    servers.sort();
    assert_eq!(servers, ["node1", "node2", "node3"]);
    let pkg = out.join("node2/opt/flotilla/node-agent/pkg");
    let identity = std::fs::read_to_string(pkg.join("identity.toml")).unwrap();
    assert_eq!(identity, "name = \"node2\"\n");
    let node = std::fs::read_to_string(pkg.join("node.toml")).unwrap();
    assert!(node.contains("index = 2") && node.contains("cluster = \"test\""), "{node}");
    for file in ["identity.toml", "node.toml", "tls/node.key", "secret/share.json"] {
        assert_eq!(mode(&pkg.join(file)), 0o600, "{file}");
    }
    assert_eq!(mode(&out), 0o700);
    let key = std::fs::read(pkg.join("tls/node.key")).unwrap();
    let second = run(&request(&dir, Identities::Keep)).unwrap();
    assert_eq!((second.ca, second.shares), (Fate::Kept, Fate::Kept));
    assert_eq!(std::fs::read(pkg.join("tls/node.key")).unwrap(), key);
    let rotated = run(&request(&dir, Identities::Rotate)).unwrap();
    assert_eq!(rotated.ca, Fate::Created);
    assert_ne!(std::fs::read(pkg.join("tls/node.key")).unwrap(), key);
    let line = describe(&rotated);
    assert_eq!(
        line,
        "ca created, server identities 0 kept 3 created 0 reissued, rack secret 2 of 3 created"
    );
    // Only the tree and the state directory are left: no staging or set-aside copy.
    let mut entries: Vec<String> = dir
        .join("out")
        .read_dir_utf8()
        .unwrap()
        .map(|e| e.unwrap().file_name().to_owned())
        .collect();
    entries.sort();
    assert_eq!(entries, ["overlay", "overlay-state"]);
}

#[test]
fn a_failed_request_leaves_the_previous_tree_untouched() {
    let (_guard, dir) = tempdir();
    run(&request(&dir, Identities::Keep)).unwrap();
    let share = dir.join("out/overlay/node1/opt/flotilla/node-agent/pkg/secret/share.json");
    let before = std::fs::read(&share).unwrap();
    let mut clash = request(&dir, Identities::Rotate);
    clash.servers[1].files[0].path = "opt/flotilla/node-agent/pkg/node.toml".into();
    let err = run(&clash).unwrap_err().to_string();
    assert_eq!(
        err,
        "overlay: two generators write opt/flotilla/node-agent/pkg/node.toml for node2"
    );
    let mut escape = request(&dir, Identities::Keep);
    escape.servers[0].files[0].path = "opt/../../../etc/passwd".into();
    let err = run(&escape).unwrap_err().to_string();
    assert!(err.contains("servers.node1.files: the path `opt/../../../etc/passwd`"), "{err}");
    escape.servers[0].files[0].path = "/etc/passwd".into();
    assert!(run(&escape).unwrap_err().to_string().contains("must be relative"));
    assert_eq!(std::fs::read(&share).unwrap(), before, "a failed run changed the overlay");
}

#[test]
fn a_malformed_request_names_the_field_and_the_position() {
    let (_guard, dir) = tempdir();
    let mut json = serde_json::to_value(request(&dir, Identities::Keep)).unwrap();
    json["thresold"] = 2.into();
    let err = parse_request("stdin", &json.to_string()).unwrap_err().to_string();
    assert!(
        err.starts_with("read the overlay request from stdin: unknown field `thresold`"),
        "{err}"
    );
    json.as_object_mut().unwrap().remove("thresold");
    json["identities"] = "forget".into();
    let err = parse_request("stdin", &json.to_string()).unwrap_err().to_string();
    assert!(err.contains("unknown variant `forget`") && err.contains("column"), "{err}");
}
