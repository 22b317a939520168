//! `testbed down`: stop the testbed's processes by their recorded ids, then remove its
//! namespaces, interfaces, mounts and files. Every step tolerates what is already gone, so
//! `down` is idempotent and works after a crash.

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use camino::Utf8Path;
use xshell::{cmd, Shell};

use super::cgroups;
use super::layout::{self, Layout, TestbedName};
use super::state::State;
use super::Testbeds;

/// How long processes get to stop after SIGTERM before they are killed. A node's systemd
/// shuts down in about three seconds.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

pub fn down(sh: &Shell, tb: &Testbeds<'_>, name: &TestbedName) -> anyhow::Result<()> {
    let paths = tb.paths(name);
    let state = State::load(&paths.state)?;
    // A state file that cannot be read still leaves names to go by.
    let tag = Layout::new(name, 1)?.tag;

    let mut processes = Vec::new();
    if let Some(state) = &state {
        let layout = Layout::new(name, state.nodes)?;
        for (node, pid) in &state.node_pids {
            if let Some(node) = layout.node(node) {
                processes.push((*pid, node.machine.clone()));
            }
        }
        if let Some(builder) = &state.builder {
            processes.push((builder.pid, paths.builder_config().to_string()));
        }
        if let Some(store) = &state.store {
            processes.push((store.pid, store.marker.clone()));
        }
    }
    stop(tb, &processes);
    // What the store left behind that it made under the temporary directory.
    for socket in state.iter().flat_map(|s| &s.store).flat_map(|s| &s.sockets) {
        let _ = std::fs::remove_file(socket);
    }
    remove_network(sh, Some(&tag))?;
    let machine_prefix = format!("{}-{tag}-node", layout::PREFIX);
    cgroups::remove(|machine| machine.starts_with(&machine_prefix))?;
    unmount_under(sh, &paths.dir)?;
    remove_dir_if_present(&super::run_dir(&tag))?;
    if paths.dir.exists() {
        std::fs::remove_dir_all(&paths.dir).with_context(|| format!("remove {}", paths.dir))?;
    }
    if state.is_some() {
        (tb.log)(&format!("testbed {name}: down"));
    }
    Ok(())
}

/// Tears down every testbed with a state directory, then anything else named like the
/// project's own interfaces and namespaces.
pub fn down_all(sh: &Shell, tb: &Testbeds<'_>) -> anyhow::Result<()> {
    let beds = tb.root.join("beds");
    let mut names = Vec::new();
    if let Ok(entries) = beds.read_dir_utf8() {
        for entry in entries {
            names.push(entry?.file_name().to_owned());
        }
    }
    names.sort();
    for name in names {
        match TestbedName::new(&name) {
            Ok(name) => down(sh, tb, &name)?,
            Err(_) => (tb.log)(&format!("testbed: skipping {beds}/{name}: not a testbed name")),
        }
    }
    remove_network(sh, None)?;
    for name in list_dir(super::RUN_ROOT) {
        if layout::is_ours(&name, None) {
            remove_dir_if_present(&Utf8Path::new(super::RUN_ROOT).join(name))?;
        }
    }
    let prefix = format!("{}-", layout::PREFIX);
    cgroups::remove(|machine| machine.starts_with(&prefix))?;
    Ok(())
}

fn remove_dir_if_present(dir: &Utf8Path) -> anyhow::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
            Err(err).with_context(|| format!("remove {dir}"))
        }
        _ => Ok(()),
    }
}

/// Network namespaces and interfaces of this machine made by the testbed with `tag`, or by any
/// testbed.
pub fn system_names(tag: Option<&str>) -> Vec<String> {
    let mut names = list_dir("/run/netns");
    names.extend(list_dir("/sys/class/net"));
    names.retain(|n| layout::is_ours(n, tag));
    names.sort();
    names
}

/// Whether `pid` is alive and is the process we started, recognised by a word of its command
/// line; a recycled pid belongs to someone else and is never signalled.
pub fn is_our_process(pid: u32, marker: &str) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return false };
    // A zombie has finished; only its parent's wait is missing.
    !is_zombie(pid) && mentions(&cmdline, marker.as_bytes())
}

/// Whether `cmdline` names `marker` as a whole word, between NULs or spaces. sshd rewrites its command line into one
/// string (`sshd: /usr/sbin/sshd -D -f <config> [listener]`), so words are not split on NUL
/// alone; `node1` must still not match `node10`.
fn mentions(cmdline: &[u8], marker: &[u8]) -> bool {
    let boundary = |b: Option<&u8>| b.is_none_or(|b| *b == 0 || *b == b' ');
    (0..cmdline.len()).any(|i| {
        cmdline[i..].starts_with(marker)
            && boundary(i.checked_sub(1).map(|j| &cmdline[j]))
            && boundary(cmdline.get(i + marker.len()))
    })
}

/// SIGTERM to each process, then SIGKILL to those still running after the timeout.
fn stop(tb: &Testbeds<'_>, processes: &[(u32, String)]) {
    let ours: Vec<(u32, &str)> = processes
        .iter()
        .filter(|(pid, m)| is_our_process(*pid, m))
        .map(|(p, m)| (*p, m.as_str()))
        .collect();
    for (pid, _) in &ours {
        signal(*pid, Signal::Term);
    }
    let deadline = Instant::now() + STOP_TIMEOUT;
    while ours.iter().any(|(p, m)| is_our_process(*p, m)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    for (pid, marker) in &ours {
        if is_our_process(*pid, marker) {
            (tb.log)(&format!("testbed: process {pid} ({marker}) ignored SIGTERM; killing it"));
            signal(*pid, Signal::Kill);
        }
    }
    // `down` returns only once every process is gone, not merely finished: a finished child
    // of this process is reaped here, and one that another process started (`testbed up` from
    // the command line) is waited for until its parent or init has reaped it.
    // Those that had already died (a crash) are waited for too: a finished child of this
    // process is still in the process table until it is reaped. A recorded pid that now
    // belongs to a live process of someone else is left alone.
    let finished: Vec<(u32, &str)> = processes
        .iter()
        .filter(|(pid, _)| is_zombie(*pid))
        .map(|(p, m)| (*p, m.as_str()))
        .collect();
    let deadline = Instant::now() + STOP_TIMEOUT;
    for (pid, marker) in ours.iter().chain(&finished) {
        while Utf8Path::new("/proc").join(pid.to_string()).exists() && Instant::now() < deadline {
            if reap(*pid) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if Utf8Path::new("/proc").join(pid.to_string()).exists() {
            (tb.log)(&format!("testbed: process {pid} ({marker}) has not been reaped yet"));
        }
    }
}

/// Whether `pid` has finished and waits to be reaped.
fn is_zombie(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
}

/// Reaps `pid` if it is a finished child of this process; whether it is gone now.
fn reap(pid: u32) -> bool {
    let mut status = 0;
    // SAFETY: waitpid writes only the status integer it is given; WNOHANG keeps it from
    // blocking, and a pid that is not our child fails with ECHILD, which is left alone.
    let reaped = unsafe { waitpid(pid as i32, &mut status, WNOHANG) };
    reaped == pid as i32
}

const WNOHANG: i32 = 1;

/// Removes namespaces (after killing any process still inside one, found by the namespace,
/// not by name), veths and bridges, in that order.
fn remove_network(sh: &Shell, tag: Option<&str>) -> anyhow::Result<()> {
    let names = system_names(tag);
    for ns in names.iter().filter(|n| Utf8Path::new("/run/netns").join(n).exists()) {
        let pids =
            cmd!(sh, "ip netns pids {ns}").quiet().ignore_status().read().unwrap_or_default();
        let pids: Vec<u32> = pids.split_whitespace().filter_map(|p| p.parse().ok()).collect();
        for pid in &pids {
            signal(*pid, Signal::Kill);
        }
        cmd!(sh, "ip netns del {ns}")
            .quiet()
            .run()
            .with_context(|| format!("remove namespace {ns}"))?;
    }
    // Veths first: a bridge goes last so nothing is briefly left attached to nothing.
    let mut links: Vec<&String> =
        names.iter().filter(|n| Utf8Path::new("/sys/class/net").join(n).exists()).collect();
    links.sort_by_key(|n| !n.contains('v'));
    for link in links {
        // A veth also vanishes on its own, shortly after its namespace is removed, so a failed
        // delete only counts when the interface is still there.
        let exists = || Utf8Path::new("/sys/class/net").join(link).exists();
        if exists() {
            let out = cmd!(sh, "ip link del {link}").quiet().ignore_status().output()?;
            if !out.status.success() && exists() {
                bail!("remove interface {link}: {}", String::from_utf8_lossy(&out.stderr).trim());
            }
        }
    }
    Ok(())
}

/// Unmounts anything mounted below `dir`, deepest first. nspawn mounts the overlays in its own
/// mount namespace, so this only finds something after a tool mounted there by hand or a
/// crash in an unusual place.
fn unmount_under(sh: &Shell, dir: &Utf8Path) -> anyhow::Result<()> {
    let mut mounts = mounts_under(dir);
    mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for mount in mounts {
        cmd!(sh, "umount -l {mount}").quiet().run().with_context(|| format!("unmount {mount}"))?;
    }
    Ok(())
}

/// Mount points of this mount namespace at or below `dir`.
pub fn mounts_under(dir: &Utf8Path) -> Vec<String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|line| line.split(' ').nth(4))
        .filter(|mount| Utf8Path::new(mount).starts_with(dir))
        .map(str::to_owned)
        .collect()
}

enum Signal {
    Term,
    Kill,
}

fn signal(pid: u32, signal: Signal) {
    let number = match signal {
        Signal::Term => 15,
        Signal::Kill => 9,
    };
    // SAFETY: kill has no memory preconditions; a stale pid makes it fail with ESRCH, which is
    // what we want to ignore.
    unsafe {
        kill(pid as i32, number);
    }
}

extern "C" {
    fn kill(pid: i32, sig: i32) -> i32;
    fn waitpid(pid: i32, status: *mut i32, options: i32) -> i32;
}

fn list_dir(dir: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| entries.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn processes_are_recognised_by_whole_words_of_their_command_line() {
        let nspawn = b"systemd-nspawn\0-q\0-M\0flt-abcdef-node1\0--console=read-only\0";
        assert!(mentions(nspawn, b"flt-abcdef-node1"));
        assert!(!mentions(nspawn, b"flt-abcdef-node"));
        assert!(!mentions(b"-M\0flt-abcdef-node10\0", b"flt-abcdef-node1"));
        let sshd =
            b"sshd: /usr/sbin/sshd -D -e -f /t/beds/x/builder/sshd_config [listener] 0 of 10";
        assert!(mentions(sshd, b"/t/beds/x/builder/sshd_config"));
        assert!(!mentions(sshd, b"/t/beds/x/builder/sshd"));
    }
}
