//! The one place that turns values into text for a remote POSIX shell.
//!
//! ssh sends its command to the remote side as one string, which the login shell there parses.
//! Every value that reaches a remote command goes through `quote` (or `RemotePath::shell_word`),
//! so a value can never be read as more than one word, whatever it contains. Commands nest (the
//! client asks the builder to ask a server): the inner command is built first and then quoted
//! as one word of the outer one.

use std::fmt;

use camino::Utf8PathBuf;

/// Quotes one word for a POSIX shell (sh, dash, bash, zsh, ksh).
///
/// Words made only of characters no shell treats specially are left as they are, for
/// readable dry runs; everything else is wrapped in single quotes, inside which a shell
/// interprets nothing, and each single quote is written as `'\''` (close, escaped quote,
/// reopen). Quoting does not stop a program from reading a word that starts with `-` as an
/// option: callers put `--` before such operands.
pub fn quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word.chars().all(|c| c.is_ascii_alphanumeric() || "_-+=/.,:@%".contains(c));
    if plain {
        return word.to_owned();
    }
    let mut quoted = String::with_capacity(word.len() + 2);
    quoted.push('\'');
    for c in word.chars() {
        if c == '\'' {
            quoted.push_str("'\\''");
        } else {
            quoted.push(c);
        }
    }
    quoted.push('\'');
    quoted
}

/// Quotes each word and joins them with spaces: the remote command that runs exactly `words`.
pub fn quote_words<S: AsRef<str>>(words: &[S]) -> String {
    words.iter().map(|w| quote(w.as_ref())).collect::<Vec<_>>().join(" ")
}

/// A path on another machine: absolute, or relative to the home directory of the user there.
///
/// `$HOME` is kept symbolic until the remote shell expands it, so the config need not know
/// remote home directories.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemotePath {
    Absolute(String),
    /// The part after `$HOME/`; empty for `$HOME` itself.
    Home(String),
}

impl RemotePath {
    /// Accepts `/abs/path`, `$HOME`, `$HOME/rel` and `${HOME}/rel`.
    pub fn parse(path: &str) -> Result<RemotePath, String> {
        if path.contains('\0') {
            return Err("a path cannot contain a NUL byte".into());
        }
        if path.starts_with('/') {
            return Ok(RemotePath::Absolute(path.to_owned()));
        }
        for home in ["$HOME", "${HOME}"] {
            if let Some(rest) = path.strip_prefix(home) {
                if rest.is_empty() {
                    return Ok(RemotePath::Home(String::new()));
                }
                if let Some(rest) = rest.strip_prefix('/') {
                    return Ok(RemotePath::Home(rest.trim_start_matches('/').to_owned()));
                }
            }
        }
        Err(format!("{path:?} must be absolute or start with $HOME/"))
    }

    /// The path as one word for the remote shell, `$HOME` left for it to expand.
    pub fn shell_word(&self) -> String {
        match self {
            RemotePath::Absolute(path) => quote(path),
            RemotePath::Home(rest) if rest.is_empty() => "\"$HOME\"".to_owned(),
            RemotePath::Home(rest) => format!("\"$HOME\"/{}", quote(rest)),
        }
    }

    /// A path below this one, as one word for the remote shell.
    pub fn join(&self, child: &str) -> RemotePath {
        let join = |base: &str| {
            if base.is_empty() || base.ends_with('/') {
                format!("{base}{child}")
            } else {
                format!("{base}/{child}")
            }
        };
        match self {
            RemotePath::Absolute(path) => RemotePath::Absolute(join(path)),
            RemotePath::Home(rest) => RemotePath::Home(join(rest)),
        }
    }

    /// The path as rsync's remote side takes it after `host:`: rsync resolves relative paths
    /// against the login directory, which is `$HOME`.
    pub fn for_rsync(&self) -> String {
        match self {
            RemotePath::Absolute(path) => path.clone(),
            RemotePath::Home(rest) if rest.is_empty() => ".".to_owned(),
            RemotePath::Home(rest) => rest.clone(),
        }
    }

    /// The path on this machine, with `$HOME` expanded from the environment.
    pub fn local(&self) -> Result<Utf8PathBuf, String> {
        match self {
            RemotePath::Absolute(path) => Ok(path.into()),
            RemotePath::Home(rest) => match std::env::var("HOME") {
                Ok(home) if home.starts_with('/') => Ok(Utf8PathBuf::from(home).join(rest)),
                _ => Err("$HOME is not set to an absolute path on this machine".into()),
            },
        }
    }

    /// The path as the user wrote it, for messages.
    pub fn as_str(&self) -> String {
        match self {
            RemotePath::Absolute(path) => path.clone(),
            RemotePath::Home(rest) => format!("$HOME/{rest}"),
        }
    }
}

impl fmt::Display for RemotePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    /// Values that break naive quoting: command separators, substitutions, quotes of both
    /// kinds, whitespace, newlines, globs, a leading dash and non-ASCII text.
    pub const HOSTILE: &[&str] = &[
        "; touch /tmp/pwned",
        "$(touch /tmp/pwned)",
        "`touch /tmp/pwned`",
        "it's",
        "'; touch /tmp/pwned; '",
        "\"; touch /tmp/pwned; \"",
        "two words",
        "line\nbreak",
        "-rf",
        "--help",
        "*",
        "$HOME",
        "${IFS}",
        "a\\b",
        "\\'",
        "&& || | > < >> 2>&1",
        "\t tab",
        "",
        "'",
        "''",
        "ünïcödé ☃",
        "!event",
        "#comment",
        "~root",
    ];

    /// Runs `printf '%s\0' <quoted words>` through `sh -c` and returns the words it printed.
    fn through_sh(command: &str) -> Vec<String> {
        let out = Command::new("sh").arg("-c").arg(command).output().expect("run sh");
        assert!(
            out.status.success(),
            "sh -c {command:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        text.split_terminator('\0').map(str::to_owned).collect()
    }

    #[test]
    fn every_hostile_value_is_one_word_unchanged() {
        for value in HOSTILE {
            let words = through_sh(&format!("printf '%s\\0' {}", quote(value)));
            assert_eq!(words, [*value], "quote({value:?}) = {}", quote(value));
        }
        let all = through_sh(&format!("printf '%s\\0' {}", quote_words(HOSTILE)));
        assert_eq!(all, HOSTILE);
    }

    #[test]
    fn nested_quoting_survives_two_shells() {
        // The builder's shell runs `sh -c <inner>`, as the builder's ssh hands the inner
        // command to a server's shell.
        for value in HOSTILE {
            let inner = format!("printf '%s\\0' {}", quote(value));
            let outer = format!("sh -c {}", quote(&inner));
            assert_eq!(through_sh(&outer), [*value], "outer command {outer:?}");
        }
    }

    #[test]
    fn plain_words_stay_readable() {
        assert_eq!(quote("/var/tmp/flotilla-staging"), "/var/tmp/flotilla-staging");
        assert_eq!(quote("ControlPath=/tmp/x/%C"), "ControlPath=/tmp/x/%C");
        assert_eq!(quote("it's"), "'it'\\''s'");
        assert_eq!(quote(""), "''");
    }

    #[test]
    fn home_paths_expand_remotely_and_nothing_else_does() {
        let home = std::env::var("HOME").unwrap();
        for value in HOSTILE.iter().filter(|v| !v.is_empty()) {
            let path = RemotePath::parse(&format!("$HOME/{value}")).unwrap();
            let words = through_sh(&format!("printf '%s\\0' {}", path.shell_word()));
            assert_eq!(words, [format!("{home}/{}", value.trim_start_matches('/'))]);
        }
        assert_eq!(RemotePath::parse("$HOME").unwrap().shell_word(), "\"$HOME\"");
        assert_eq!(RemotePath::parse("${HOME}/x").unwrap().for_rsync(), "x");
        assert!(RemotePath::parse("relative").is_err());
        assert!(RemotePath::parse("$HOMEX/y").is_err());
        assert!(RemotePath::parse("-rf").is_err());
    }
}
