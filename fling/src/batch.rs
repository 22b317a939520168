//! One builder session for a whole plan that reaches servers.
//!
//! Every session on the builder costs a login shell there (with the user's shell start-up
//! files) and a channel set-up in the builder's sshd, which handles the channels of one
//! connection one after the other. A session per server made eight servers queue behind each
//! other on the builder before any of them was contacted. Instead, the client sends the
//! builder one POSIX shell script on the standard input of one session (`ssh builder 'exec sh
//! -s'`): it runs the setup step (the deploy lock), then every host's step in the background,
//! at most `parallel` at a time and at most `connect_parallel` connection starts at a time
//! (tokens in two named pipes), then the release, and closes every server connection on any
//! exit.
//!
//! Every line the steps write comes back tagged, one `write` per line so that lines of hosts
//! running at once never mix: `@@fling <tag> o <line>` (standard output), `@@fling <tag> e
//! <line>` (standard error), `@@fling <tag> s` when a host starts and `@@fling <tag> x <status>`
//! after its last line. The tag is `S` for setup, `T` for the release and the host's index
//! otherwise. `exec` turns them back into per-host steps, phases and outcomes.

use std::fmt::Write as _;

use super::{plan::Plan, quote::quote};

pub use super::protocol::{CONNECT_FD, TAG};
/// The descriptor of the host-slot tokens, used by the dispatcher only.
const SLOT_FD: u32 = 6;
/// The descriptor of the session's standard output inside the tagging pipelines.
const OUT_FD: u32 = 4;
/// A token pipe holds one byte per token; a pipe's buffer holds at least 4096 of them.
const MAX_TOKENS: usize = 4096;

/// The tag of the setup step.
pub const SETUP: &str = "S";
/// The tag of the release step.
pub const TEARDOWN: &str = "T";

/// A tagged line of the session, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line<'a> {
    /// A host (or setup, or release) started.
    Started(&'a str),
    /// A line of output: the tag, `stdout` or `stderr`, and the text.
    Output(&'a str, &'static str, &'a str),
    /// A step ended with this status.
    Exited(&'a str, Option<i32>),
    /// Anything else the builder wrote: start-up files of the user's shell, say.
    Untagged(&'a str),
}

/// Parses one line of the session's standard output.
pub fn parse(line: &str) -> Line<'_> {
    let Some(rest) = line.strip_prefix(TAG) else { return Line::Untagged(line) };
    let mut parts = rest.splitn(3, ' ');
    let (Some(tag), Some(kind)) = (parts.next(), parts.next()) else {
        return Line::Untagged(line);
    };
    let text = parts.next().unwrap_or("");
    match kind {
        "s" => Line::Started(tag),
        "o" => Line::Output(tag, "stdout", text),
        "e" => Line::Output(tag, "stderr", text),
        "x" => Line::Exited(tag, text.trim().parse().ok()),
        _ => Line::Untagged(line),
    }
}

/// The script of the plan's session. Every host has exactly one step with a builder script.
pub fn script(plan: &Plan, parallel: usize, connect_parallel: usize) -> String {
    let session = plan.session.as_ref().expect("the plan runs as one builder session");
    let dir = quote(&session.dir);
    let parallel = parallel.clamp(1, MAX_TOKENS);
    let connect_parallel = connect_parallel.clamp(1, MAX_TOKENS);
    let script_of = |steps: &[super::plan::Step]| -> String {
        let scripts: Vec<String> = steps
            .iter()
            .filter_map(|s| s.script.as_ref())
            .map(|script| format!("( {script}\n)"))
            .collect();
        if scripts.is_empty() {
            "true".into()
        } else {
            scripts.join(" && ")
        }
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\
d={dir}
umask 077
mkdir -m 700 -- \"$d\" || exit 1
exec {OUT_FD}>&1
# One write per line as it comes, so that lines of hosts running at once never mix (awk
# may buffer its input; the shell's read does not).
fl_tag() {{
  while IFS= read -r l || [ -n \"$l\" ]; do printf '%s%.3000s\\n' \"{TAG}$1 \" \"$l\"; l=; done
}}
# Runs function $2 with its output tagged $1, then reports its exit status after its last line.
fl_run() {{
  {{ {{ \"$2\" </dev/null 2>&1 1>&3 3>&- {OUT_FD}>&- {SLOT_FD}>&-; echo \"$?\" >\"$d/rc.$1\"; }} \\
    | fl_tag \"$1 e\" >&{OUT_FD}; }} 3>&1 | fl_tag \"$1 o\"
  echo \"{TAG}$1 x $(cat -- \"$d/rc.$1\" 2>/dev/null)\"
}}
fl_close() {{
  for s in \"$d\"/*; do
    [ -S \"$s\" ] && ssh -o ControlPath=\"$s\" -O exit flotilla-fling >/dev/null 2>&1
  done
}}"
    );
    let teardown = script_of(&plan.teardown);
    let _ = writeln!(out, "fl_teardown() {{ {teardown}\n}}");
    // Whatever ends the script (a failed setup, the client gone, a signal), the lock this run
    // holds is released and every server connection closed.
    let _ = writeln!(
        out,
        "\
trap 'fl_teardown >/dev/null 2>&1; fl_close; rm -rf -- \"$d\"' EXIT
trap 'exit 129' HUP
trap 'exit 130' INT
trap 'exit 141' PIPE
trap 'exit 143' TERM"
    );
    let _ = writeln!(out, "fl_setup() {{ {}\n}}", script_of(&plan.setup));
    let _ = writeln!(
        out,
        "\
fl_run {SETUP} fl_setup
[ \"$(cat -- \"$d/rc.{SETUP}\" 2>/dev/null)\" = 0 ] || exit 0
mkfifo -m 600 -- \"$d/slots\" \"$d/connects\" || exit 1
exec {SLOT_FD}<>\"$d/slots\" {CONNECT_FD}<>\"$d/connects\"
n=0; while [ \"$n\" -lt {parallel} ]; do echo; n=$((n + 1)); done >&{SLOT_FD}
n=0; while [ \"$n\" -lt {connect_parallel} ]; do echo; n=$((n + 1)); done >&{CONNECT_FD}"
    );
    for (index, host) in plan.hosts.iter().enumerate() {
        let _ = writeln!(out, "fl_h{index}() {{ {}\n}}", script_of(&host.steps));
    }
    let indices: Vec<String> = (0..plan.hosts.len()).map(|i| i.to_string()).collect();
    let _ = writeln!(
        out,
        "\
for h in {}; do
  read -r _ <&{SLOT_FD}
  {{ echo \"{TAG}$h s\"; fl_run \"$h\" \"fl_h$h\"; echo >&{SLOT_FD}; }} &
done
wait
fl_run {TEARDOWN} fl_teardown
trap - EXIT
fl_close
rm -rf -- \"$d\"",
        indices.join(" ")
    );
    out
}

#[cfg(test)]
mod tests {
    use std::{
        collections::BTreeMap,
        io::Write as _,
        process::{Command, Stdio},
    };

    use super::*;
    use crate::plan::{HostPlan, Session, Step, StepKind};

    fn step(script: &str) -> Step {
        Step {
            name: "work",
            runs_on: "builder".into(),
            argv: Vec::new(),
            kind: StepKind::Work,
            stdin: None,
            phases: Vec::new(),
            what: Vec::new(),
            script: Some(script.to_owned()),
        }
    }

    fn plan(dir: &str, setup: &str, hosts: &[&str]) -> Plan {
        Plan {
            command: "test".into(),
            builder: "builder".into(),
            setup: vec![step(setup)],
            hosts: hosts
                .iter()
                .enumerate()
                .map(|(i, s)| HostPlan { host: format!("h{i}"), steps: vec![step(s)] })
                .collect(),
            teardown: vec![step(&format!("echo released > {}", quote(&format!("{dir}.released"))))],
            session: Some(Session { argv: Vec::new(), dir: dir.to_owned() }),
            journal: None,
        }
    }

    /// Runs the script with `sh -s`, as the builder does, and collects each tag's lines and
    /// exit status.
    fn run(script: &str) -> (BTreeMap<String, Vec<String>>, BTreeMap<String, Option<i32>>) {
        let mut child = Command::new("sh")
            .arg("-s")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "the session script failed");
        let mut lines: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut exits = BTreeMap::new();
        for line in String::from_utf8(out.stdout).unwrap().lines() {
            match parse(line) {
                Line::Output(tag, stream, text) => {
                    lines.entry(tag.to_owned()).or_default().push(format!("{stream}: {text}"))
                }
                Line::Exited(tag, code) => {
                    assert!(exits.insert(tag.to_owned(), code).is_none(), "two exits of {tag}");
                }
                Line::Started(_) => {}
                Line::Untagged(other) => panic!("untagged line {other:?}"),
            }
        }
        (lines, exits)
    }

    /// A private directory for one test, removed however the test ends.
    struct Scratch(String);

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// The scratch directory of a test and the path of its session directory inside it.
    fn temp_dir(tag: &str) -> (Scratch, String) {
        let root = format!(
            "{}/flotilla-batch-{tag}-{}",
            std::env::temp_dir().display(),
            std::process::id()
        );
        std::fs::create_dir_all(&root).unwrap();
        let session = format!("{root}/session");
        (Scratch(root), session)
    }

    #[test]
    fn every_host_runs_with_its_lines_tagged_and_its_own_exit_status() {
        let (_scratch, dir) = temp_dir("tags");
        let p = plan(
            &dir,
            "echo locked",
            &["echo one; echo err >&2", "echo 'two words'; exit 3", "printf 'no newline'"],
        );
        let (lines, exits) = run(&script(&p, 2, 1));
        assert_eq!(lines["S"], ["stdout: locked"]);
        let mut first = lines["0"].clone();
        first.sort();
        assert_eq!(first, ["stderr: err", "stdout: one"]);
        assert_eq!(lines["1"], ["stdout: two words"]);
        assert_eq!(lines["2"], ["stdout: no newline"]);
        let codes: Vec<_> = exits.iter().map(|(t, c)| (t.as_str(), *c)).collect();
        assert_eq!(
            codes,
            [("0", Some(0)), ("1", Some(3)), ("2", Some(0)), ("S", Some(0)), ("T", Some(0))]
        );
        assert!(!std::path::Path::new(&dir).exists(), "the session directory is removed");
        let released = format!("{dir}.released");
        assert!(std::path::Path::new(&released).exists(), "the release ran");
    }

    #[test]
    fn a_failed_setup_runs_no_host_but_still_releases() {
        let (_scratch, dir) = temp_dir("setup");
        let marker = format!("{dir}.host-ran");
        let host = format!("touch {}", quote(&marker));
        let p = plan(&dir, "echo 'the lock is held' >&2; exit 75", &[&host]);
        let (lines, exits) = run(&script(&p, 4, 4));
        assert_eq!(lines["S"], ["stderr: the lock is held"]);
        assert_eq!(exits.get("S"), Some(&Some(75)));
        assert!(!exits.contains_key("0"), "no host ran after a failed setup");
        assert!(!std::path::Path::new(&marker).exists());
        let released = format!("{dir}.released");
        assert!(std::path::Path::new(&released).exists(), "the release ran on exit");
        assert!(!std::path::Path::new(&dir).exists());
    }

    #[test]
    fn hosts_run_at_most_parallel_at_a_time_and_connections_start_one_by_one() {
        let (_scratch, dir) = temp_dir("bound");
        // Each host counts itself in and out of a shared directory and records how many were
        // inside at once; inside, a connection start holds a token of the connect pipe.
        let count = format!("{dir}.count");
        std::fs::create_dir_all(&count).unwrap();
        let c = quote(&count);
        let hosts: Vec<String> = (0..6)
            .map(|i| {
                format!(
                    "mkdir {c}/{i}; ls {c} | wc -l >> {c}.max; read -r _ <&{CONNECT_FD}; \
                     mkdir {c}.conn || echo 'two connection starts at once'; sleep 0.05; \
                     rmdir {c}.conn; echo >&{CONNECT_FD}; sleep 0.1; rmdir {c}/{i}"
                )
            })
            .collect();
        let hosts: Vec<&str> = hosts.iter().map(String::as_str).collect();
        let p = plan(&dir, "true", &hosts);
        let (lines, exits) = run(&script(&p, 3, 1));
        assert!(lines.values().flatten().all(|l| !l.contains("two connection")), "{lines:?}");
        assert_eq!(exits.values().filter(|c| **c == Some(0)).count(), 8, "{exits:?}");
        let max = std::fs::read_to_string(format!("{count}.max")).unwrap();
        let max = max.lines().map(|l| l.trim().parse::<u32>().unwrap()).max().unwrap();
        assert!(max <= 3, "{max} hosts ran at once with a bound of 3");
        assert!(max >= 2, "hosts ran one at a time: {max}");
    }

    #[test]
    fn lines_parse_into_tags_streams_and_statuses() {
        assert_eq!(parse("@@fling 3 o hello world"), Line::Output("3", "stdout", "hello world"));
        assert_eq!(parse("@@fling S e "), Line::Output("S", "stderr", ""));
        assert_eq!(parse("@@fling 0 x 255"), Line::Exited("0", Some(255)));
        assert_eq!(parse("@@fling 0 x "), Line::Exited("0", None));
        assert_eq!(parse("@@fling 12 s"), Line::Started("12"));
        assert_eq!(parse("welcome to the builder"), Line::Untagged("welcome to the builder"));
    }
}
