//! Reading TOML config files with errors that name the file, the line and column, and the field.
//!
//! A service's config is one file (the one its unit passes with `--config`) plus, optionally, a
//! per-node file named by its `node_config` key. Deployments ship the same main file to every
//! server and put what differs per server (node name, TLS key and certificate, secret share) in the
//! node file, so the node file's top-level keys replace those of the main file. Relative paths in a
//! file are relative to the directory of that file, which keeps a package directory relocatable.

use camino::{Utf8Path, Utf8PathBuf};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use std::fmt;
use std::ops::Range;
pub use toml::Spanned;

/// A config problem, always naming the file and, where known, the line, column and field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("read config {path}: {error}")]
    Read { path: Utf8PathBuf, error: std::io::Error },
    #[error("parse config {path}{location}: {message}")]
    Parse { path: Utf8PathBuf, location: Location, message: String },
    #[error("config {path}{location}: {field}: {message}")]
    Invalid { path: Utf8PathBuf, location: Location, field: String, message: String },
}

/// A 1-based line and column in a config file, rendered as `:line:column`, or nothing when the
/// problem concerns the file as a whole.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub struct Location(pub Option<(usize, usize)>);

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some((line, column)) => write!(f, ":{line}:{column}"),
            None => Ok(()),
        }
    }
}

/// The `[tls]` table: the node's certificate and private key and the cluster CA that signs its
/// peers. Loaded by the services for mutually authenticated TLS between them.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFile {
    pub cert: Spanned<Utf8PathBuf>,
    pub key: Spanned<Utf8PathBuf>,
    pub ca: Spanned<Utf8PathBuf>,
}

/// The checked `[tls]` table: absolute or config-relative paths resolved, each an existing file.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct TlsPaths {
    pub cert: Utf8PathBuf,
    pub key: Utf8PathBuf,
    pub ca: Utf8PathBuf,
}

impl TlsFile {
    /// Resolves the paths against `source` and checks that each names an existing file.
    pub fn check(&self, source: &Source) -> Result<TlsPaths, ConfigError> {
        Ok(TlsPaths {
            cert: source.existing_file("tls.cert", &self.cert)?,
            key: source.existing_file("tls.key", &self.key)?,
            ca: source.existing_file("tls.ca", &self.ca)?,
        })
    }
}

/// The text of one config file, kept to turn byte offsets into line and column numbers.
#[derive(Debug)]
pub struct Source {
    path: Utf8PathBuf,
    text: String,
}

impl Source {
    /// Reads a config file.
    pub fn read(path: &Utf8Path) -> Result<Source, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Ok(Source { path: path.to_owned(), text }),
            Err(error) => Err(ConfigError::Read { path: path.to_owned(), error }),
        }
    }

    /// A config file from text already in memory; `path` is only used in messages and to
    /// resolve relative paths.
    pub fn from_text(path: &Utf8Path, text: &str) -> Source {
        Source { path: path.to_owned(), text: text.to_owned() }
    }

    /// The path of this file.
    pub fn path(&self) -> &Utf8Path {
        &self.path
    }

    /// Deserialises the whole file; types use `deny_unknown_fields` so typos are errors.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, ConfigError> {
        match toml::from_str(&self.text) {
            Ok(value) => Ok(value),
            Err(error) => Err(ConfigError::Parse {
                path: self.path.clone(),
                location: self.location(error.span()),
                message: error.message().trim_end().to_owned(),
            }),
        }
    }

    /// An error about `field`, located at `span` (from a [`Spanned`] value) in this file.
    pub fn invalid(
        &self,
        field: &str,
        span: Option<Range<usize>>,
        message: impl Into<String>,
    ) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.clone(),
            location: self.location(span),
            field: field.to_owned(),
            message: message.into(),
        }
    }

    /// Resolves a path from this file: relative paths are relative to the file's directory.
    pub fn resolve(&self, path: &Utf8Path) -> Utf8PathBuf {
        match self.path.parent() {
            Some(dir) if path.is_relative() => dir.join(path),
            _ => path.to_owned(),
        }
    }

    /// Resolves `value` and checks that it names an existing regular file (following symlinks).
    ///
    /// Only existence is checked: a key that is readable only by the service's own user must
    /// not make `--check`, run by an operator, fail.
    pub fn existing_file(
        &self,
        field: &str,
        value: &Spanned<Utf8PathBuf>,
    ) -> Result<Utf8PathBuf, ConfigError> {
        let span = Some(value.span());
        if value.get_ref().as_str().is_empty() {
            return Err(self.invalid(field, span, "the path is empty"));
        }
        let path = self.resolve(value.get_ref());
        match std::fs::metadata(&path) {
            Ok(meta) if meta.is_file() => Ok(path),
            Ok(_) => Err(self.invalid(field, span, format!("{path} is not a regular file"))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(self.invalid(field, span, format!("{path} does not exist")))
            }
            Err(e) => Err(self.invalid(field, span, format!("{path}: {e}"))),
        }
    }

    /// Checks a node name: the identity reported by `/health` and used to match per-node files.
    pub fn node_name(&self, value: &Spanned<String>) -> Result<String, ConfigError> {
        let name = value.get_ref();
        let valid = !name.is_empty()
            && name.len() <= 253
            && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !valid {
            return Err(self.invalid(
                "node",
                Some(value.span()),
                format!("`{name}` is not a node name (1 to 253 of A-Z a-z 0-9 - _ .)"),
            ));
        }
        Ok(name.clone())
    }

    fn location(&self, span: Option<Range<usize>>) -> Location {
        let Some(span) = span else { return Location(None) };
        let start = span.start.min(self.text.len());
        let before = &self.text[..start];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = before[line_start..].chars().count() + 1;
        Location(Some((line, column)))
    }
}

/// Reads the per-node file named by a main file's `node_config` key, refusing a further include.
///
/// `T` is the service's file type; `nested` extracts its own `node_config` value, which must be
/// unset in a node file so that includes cannot chain or loop.
pub fn read_node_config<T: DeserializeOwned>(
    main: &Source,
    value: &Spanned<Utf8PathBuf>,
    nested: impl Fn(&T) -> Option<&Spanned<Utf8PathBuf>>,
) -> Result<(Source, T), ConfigError> {
    let path = main.existing_file("node_config", value)?;
    let source = Source::read(&path)?;
    let parsed: T = source.parse()?;
    if let Some(inner) = nested(&parsed) {
        return Err(source.invalid(
            "node_config",
            Some(inner.span()),
            "a node config file cannot name another node config file",
        ));
    }
    Ok((source, parsed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Sample {
        #[allow(dead_code)]
        listen: std::net::SocketAddr,
        node: Option<Spanned<String>>,
        tls: Option<TlsFile>,
    }

    fn src(text: &str) -> Source {
        Source::from_text(Utf8Path::new("/etc/svc/config.toml"), text)
    }

    #[test]
    fn unknown_field_names_file_line_and_column() {
        let err = src("listen = \"[::]:1\"\n\nlisten_port = 3\n").parse::<Sample>().unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("parse config /etc/svc/config.toml:3:1: unknown field `listen_port`"),
            "{msg}"
        );
        assert!(msg.contains("expected one of `listen`, `node`, `tls`"), "{msg}");
    }

    #[test]
    fn malformed_toml_and_bad_address_are_located() {
        let err = src("listen = [::]:1\n").parse::<Sample>().unwrap_err().to_string();
        assert!(err.starts_with("parse config /etc/svc/config.toml:1:"), "{err}");
        let err = src("node = \"a\"\nlisten = \"localhost\"\n").parse::<Sample>().unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("parse config /etc/svc/config.toml:2:10: invalid socket address"),
            "{msg}"
        );
    }

    #[test]
    fn missing_field_names_the_field() {
        let msg = src("node = \"a\"\n").parse::<Sample>().unwrap_err().to_string();
        assert!(msg.starts_with("parse config /etc/svc/config.toml"), "{msg}");
        assert!(msg.contains("missing field `listen`"), "{msg}");
    }

    #[test]
    fn tls_paths_resolve_relative_to_the_file_and_must_exist() {
        let temp = crate::testing::TempDir::new("config-test");
        let dir = temp.path();
        let config = dir.join("config.toml");
        std::fs::write(dir.join("cert.pem"), "c").unwrap();
        std::fs::write(dir.join("key.pem"), "k").unwrap();
        let text = "listen = \"127.0.0.1:1\"\n[tls]\ncert = \"cert.pem\"\nkey = \"key.pem\"\nca = \"ca.pem\"\n";
        let source = Source::from_text(&config, text);
        let sample: Sample = source.parse().unwrap();
        let err = sample.tls.as_ref().unwrap().check(&source).unwrap_err().to_string();
        assert_eq!(err, format!("config {config}:5:6: tls.ca: {dir}/ca.pem does not exist"));
        std::fs::write(dir.join("ca.pem"), "a").unwrap();
        let paths = sample.tls.unwrap().check(&source).unwrap();
        assert_eq!(paths.cert, dir.join("cert.pem"));
        assert_eq!(paths.ca, dir.join("ca.pem"));
    }

    #[test]
    fn node_names_are_checked() {
        let source = src("listen = \"[::]:1\"\nnode = \"bad name\"\n");
        let sample: Sample = source.parse().unwrap();
        let err = source.node_name(sample.node.as_ref().unwrap()).unwrap_err().to_string();
        assert!(
            err.starts_with("config /etc/svc/config.toml:2:8: node: `bad name` is not a node name"),
            "{err}"
        );
        let ok = src("listen = \"[::]:1\"\nnode = \"node-1.rack\"\n");
        let sample: Sample = ok.parse().unwrap();
        assert_eq!(ok.node_name(sample.node.as_ref().unwrap()).unwrap(), "node-1.rack");
    }

    #[test]
    fn missing_file_is_named() {
        let err = Source::read(Utf8Path::new("/nonexistent/flotilla/config.toml")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("read config /nonexistent/flotilla/config.toml: "), "{msg}");
    }
}
