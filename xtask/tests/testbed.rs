//! End-to-end tests of `cargo xtask testbed`: real namespaces, real containers, real sshd.
//!
//! They need root. Elsewhere they skip and say why, except with `CI=true`, where they must run.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use flotilla_testbed::test_support::{can_run, Testbed};

const XTASK: &str = env!("CARGO_BIN_EXE_xtask");

#[test]
fn three_nodes_are_distinct_real_servers_and_down_leaves_nothing() {
    if !can_run("three_nodes_are_distinct_real_servers_and_down_leaves_nothing") {
        return;
    }
    let testbed = Testbed::up(&workspace(), "t3", 3);

    // Every node answers over IPv4 and IPv6 with strict host key checking, using only the
    // written ssh config, key and known_hosts, and names itself as expected.
    for node in &testbed.nodes {
        assert_eq!(testbed.ssh_ok(node, "hostname"), *node);
        assert_eq!(testbed.ssh_ok(&format!("{node}-v6"), "hostname"), *node);
        let v6 = testbed.ssh_ok(&format!("{node}-v6"), "echo $SSH_CONNECTION");
        assert!(v6.contains(":"), "{node}-v6 was not reached over IPv6: {v6}");
        // `--wait` lets a node that answers ssh before the end of its boot finish booting.
        let out = testbed.ssh(node, "systemctl is-system-running --wait");
        let state = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if state != "running" {
            let failed = testbed.ssh_ok(
                node,
                "systemctl --failed --no-legend --plain; for u in $(systemctl --failed \
                 --no-legend --plain | cut -d' ' -f1); do journalctl -b -u $u --no-pager | tail; done",
            );
            panic!("{node} is {state}, not running; the image must boot clean. failed units:\n{failed}");
        }
    }

    // Host keys are real and distinct: the keys the nodes present (accepted above under strict
    // checking) are the ones in known_hosts, one per node.
    let known_hosts = std::fs::read_to_string(&testbed.known_hosts).unwrap();
    let mut keys: Vec<&str> = known_hosts
        .lines()
        .filter(|l| l.starts_with("node"))
        .map(|l| l.split_whitespace().nth(2).unwrap())
        .collect();
    assert_eq!(keys.len(), 3, "{known_hosts}");
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), 3, "nodes share host keys:\n{known_hosts}");
    let machine_ids: Vec<String> =
        testbed.nodes.iter().map(|n| testbed.ssh_ok(n, "cat /etc/machine-id")).collect();
    assert!(
        machine_ids[0] != machine_ids[1] && machine_ids[1] != machine_ids[2],
        "{machine_ids:?}"
    );

    // Each node has its own filesystem layer.
    let marker = format!("/root/written-on-node1-{}", testbed.name);
    testbed.ssh_ok("node1", &format!("echo hello > {marker}"));
    assert_eq!(testbed.ssh_ok("node1", &format!("cat {marker}")), "hello");
    assert_eq!(
        testbed.ssh_ok("node2", &format!("test -e {marker} && echo present || echo absent")),
        "absent"
    );

    // Node-to-node ssh authenticates with the key held by an agent on this machine.
    let agent = Agent::start(&testbed.dir.join("test-agent.sock"));
    let add = Command::new("ssh-add")
        .arg(&testbed.identity)
        .env("SSH_AUTH_SOCK", &agent.socket)
        .output()
        .unwrap();
    assert!(add.status.success(), "ssh-add: {}", String::from_utf8_lossy(&add.stderr));
    let hop = testbed
        .ssh_command("node1", &["-A"])
        .arg("ssh -o BatchMode=yes node2 hostname && ssh -o BatchMode=yes node3-v6 hostname")
        .env("SSH_AUTH_SOCK", &agent.socket)
        .output()
        .unwrap();
    assert!(
        hop.status.success(),
        "agent-forwarded hop failed: {}",
        String::from_utf8_lossy(&hop.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&hop.stdout), "node2\nnode3\n");
    // Without the agent the same hop must fail: node1 holds no key of its own.
    let no_agent = testbed
        .ssh_command("node1", &[])
        .arg("ssh -o BatchMode=yes node2 hostname")
        .env_remove("SSH_AUTH_SOCK")
        .output()
        .unwrap();
    assert!(!no_agent.status.success(), "node1 reached node2 without the forwarded agent");
    drop(agent);

    // The builder is this machine over loopback, and the deployment config describes it all.
    assert!(testbed.ssh_ok("builder", "echo $SSH_CONNECTION").contains("127.0.0.1"));
    let text = std::fs::read_to_string(&testbed.deployment).unwrap();
    let doc: toml::Table = text.parse().unwrap();
    assert_eq!(doc["builder"]["server"].as_str(), Some("builder"));
    assert_eq!(doc["deployment"]["servers"].as_array().unwrap().len(), 3);
    let node1 = doc["servers"]["node1"].as_table().unwrap();
    let addr = node1["addr"].as_str().unwrap();
    let via_addr = Command::new("ssh")
        .args(["-F", testbed.ssh_config.to_str().unwrap(), "-o", "BatchMode=yes"])
        .args(["-o", "StrictHostKeyChecking=yes", "-o", "IdentitiesOnly=yes"])
        .args(["-i", testbed.identity.to_str().unwrap()])
        .arg(format!("-oUserKnownHostsFile={}", testbed.known_hosts.display()))
        .arg(format!("root@{addr}"))
        .arg("hostname")
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&via_addr.stdout).trim(), "node1", "ssh root@{addr}");

    // Down removes every namespace, interface, process, mount and file.
    let left = Leftovers::of(&testbed);
    assert!(left.live_processes().len() == 4, "expected 3 nodes and a builder: {left:?}");
    assert!(!left.system_names().is_empty());
    testbed.down().expect("testbed down");
    left.assert_none_remain();
    // A second down finds nothing to do and succeeds.
    testbed.down().expect("a second testbed down");
}

#[test]
fn down_cleans_up_after_crashed_processes_and_up_refuses_a_second_start() {
    if !can_run("down_cleans_up_after_crashed_processes_and_up_refuses_a_second_start") {
        return;
    }
    let testbed = Testbed::up(&workspace(), "tcrash", 1);
    let again = Command::new(XTASK)
        .args(["testbed", "up", "--nodes", "1", "--name", &testbed.name])
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already up"));

    // The builder's sshd dies as in a crash; down must still remove everything else.
    let left = Leftovers::of(&testbed);
    let builder_pid = left.builder_pid;
    assert!(is_alive(builder_pid));
    // SAFETY: this pid is the builder sshd the testbed started for this test, read from its
    // state file.
    unsafe { kill(builder_pid as i32, 9) };
    testbed.down().expect("testbed down");
    left.assert_none_remain();
}

#[test]
fn up_failing_after_the_nodes_booted_removes_everything_it_created() {
    if !can_run("up_failing_after_the_nodes_booted_removes_everything_it_created") {
        return;
    }
    let name = flotilla_testbed::test_support::unique_name("tfail");
    let dir: std::path::PathBuf =
        flotilla_testbed::testbed_root(&workspace()).join("beds").join(&name).into();
    // A file where the builder's directory goes makes `up` fail after it has created the
    // network and started the nodes, the latest point a failure can happen.
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("builder"), "in the way").unwrap();
    let _cleanup = RemoveDir(dir.clone());
    let out = Command::new(XTASK)
        .args(["testbed", "up", "--nodes", "2", "--name", &name])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "up succeeded despite the obstacle");
    assert!(stderr.contains("up failed, removing what it created"), "{stderr}");
    let left = Leftovers { dir, tag: tag_of(&name), pids: vec![], builder_pid: 0 };
    left.assert_none_remain();
}

/// The six hex digits a testbed's system names carry: FNV-1a of its name, as the testbed
/// module computes it.
fn tag_of(name: &str) -> String {
    let hash = name
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    format!("{:06x}", hash & 0xff_ffff)
}

/// Removes a directory a test made, whatever happens.
struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn without_root_up_says_what_to_run_and_creates_nothing() {
    // As root, the command runs as `nobody`; elsewhere the test already runs unprivileged.
    let name = flotilla_testbed::test_support::unique_name("tnoroot");
    let args = ["testbed", "up", "--nodes", "1", "--name", &name];
    // SAFETY: geteuid has no preconditions and cannot fail.
    let out = if unsafe { geteuid() } == 0 {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", XTASK])
            .args(args)
            .output()
            .expect("run setpriv")
    } else {
        Command::new(XTASK).args(args).output().unwrap()
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("needs root") && stderr.contains("sudo -E cargo xtask testbed up"),
        "{stderr}"
    );
    assert!(!flotilla_testbed::testbed_root(&workspace()).join("beds").join(&name).exists());
}

/// What a testbed is made of on this machine, read before `down` to check after it.
#[derive(Debug)]
struct Leftovers {
    dir: PathBuf,
    tag: String,
    pids: Vec<u32>,
    builder_pid: u32,
}

impl Leftovers {
    fn of(testbed: &Testbed) -> Leftovers {
        let state: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(testbed.dir.join("state.json")).unwrap())
                .unwrap();
        let mut pids: Vec<u32> = state["node_pids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p[1].as_u64().unwrap() as u32)
            .collect();
        let builder_pid = state["builder"]["pid"].as_u64().unwrap() as u32;
        pids.push(builder_pid);
        let status = Command::new(XTASK)
            .args(["testbed", "status", "--name", &testbed.name])
            .output()
            .unwrap();
        let status = String::from_utf8_lossy(&status.stdout).into_owned();
        let bridge =
            status.split("bridge ").nth(1).and_then(|s| s.split(',').next()).expect(&status);
        let tag = bridge.trim_start_matches("flt-").to_owned();
        assert_eq!(tag, tag_of(&testbed.name), "{status}");
        Leftovers { dir: testbed.dir.clone(), tag, pids, builder_pid }
    }

    fn live_processes(&self) -> Vec<u32> {
        self.pids.iter().copied().filter(|p| is_alive(*p)).collect()
    }

    /// Namespaces, interfaces and runtime directories carrying this testbed's tag.
    fn system_names(&self) -> Vec<String> {
        let mut names = Vec::new();
        for dir in ["/run/netns", "/sys/class/net", "/run/flotilla-testbed"] {
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with("flt") && name.contains(&self.tag) {
                    names.push(format!("{dir}/{name}"));
                }
            }
        }
        names
    }

    fn assert_none_remain(&self) {
        assert_eq!(self.live_processes(), Vec::<u32>::new(), "processes left running");
        // Not merely finished: gone, reaped, the moment `down` returns.
        let present: Vec<u32> = self
            .pids
            .iter()
            .copied()
            .filter(|p| Path::new(&format!("/proc/{p}")).exists())
            .collect();
        assert_eq!(present, Vec::<u32>::new(), "processes not yet gone after down");
        assert_eq!(self.system_names(), Vec::<String>::new(), "namespaces or interfaces left");
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let dir = self.dir.to_str().unwrap();
        let stray: Vec<&str> =
            mounts.lines().filter(|l| l.contains(dir) || l.contains(&self.tag)).collect();
        assert!(stray.is_empty(), "mounts left: {stray:?}");
        assert!(!self.dir.exists(), "{} left behind", self.dir.display());
        let cgroups: Vec<String> =
            ["/sys/fs/cgroup/systemd", "/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
                .iter()
                .flat_map(|h| {
                    std::fs::read_dir(Path::new(h).join("flotilla")).into_iter().flatten().flatten()
                })
                .map(|e| e.path().display().to_string())
                .filter(|p| p.contains(&format!("flt-{}-", self.tag)))
                .collect();
        assert!(cgroups.is_empty(), "cgroups left: {cgroups:?}");
        let ps = Command::new("ps").args(["-eo", "pid,stat,args"]).output().unwrap();
        let ps = String::from_utf8_lossy(&ps.stdout);
        let stray: Vec<&str> =
            ps.lines().filter(|l| l.contains(&format!("flt-{}", self.tag))).collect();
        assert!(stray.is_empty(), "container processes left: {stray:?}");
    }
}

/// An ssh-agent for one test, stopped by its pid when dropped.
struct Agent {
    child: Child,
    socket: PathBuf,
}

impl Agent {
    fn start(socket: &Path) -> Agent {
        let _ = std::fs::remove_file(socket);
        let child = Command::new("ssh-agent")
            .arg("-D")
            .arg("-a")
            .arg(socket)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start ssh-agent");
        let agent = Agent { child, socket: socket.to_owned() };
        for _ in 0..100 {
            if socket.exists() {
                return agent;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        panic!("ssh-agent did not create {}", socket.display());
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Alive and not a zombie waiting for its parent.
fn is_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            !stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        }
        Err(_) => false,
    }
}

extern "C" {
    fn kill(pid: i32, sig: i32) -> i32;
    fn geteuid() -> u32;
}

/// The root of this repository's workspace.
fn workspace() -> camino::Utf8PathBuf {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    camino::Utf8PathBuf::try_from(dir.canonicalize().unwrap()).unwrap()
}
