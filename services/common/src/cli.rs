//! The services' command line: `<service> --config <path> [--check]`.
//!
//! It is parsed by hand because it has one option and one flag; an argument parser would double
//! the build time of the packaged binaries.

use camino::Utf8PathBuf;
use std::ffi::OsString;

/// What the command line asks for.
#[derive(Debug, Eq, PartialEq)]
pub enum Command {
    /// Load the config and serve, or with `check` only validate the config and exit.
    Run { config: Utf8PathBuf, check: bool },
    /// Print the usage text.
    Help,
    /// Print the version.
    Version,
}

/// The usage text of a service.
pub fn usage(service: &str) -> String {
    format!(
        "usage: {service} --config <path> [--check]\n\n\
         options:\n  \
         --config <path>  the service's TOML config file\n  \
         --check          validate the config (and the files it names) and exit\n  \
         --help           print this text\n  \
         --version        print the version\n"
    )
}

/// Parses the arguments after the program name.
pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Command, String> {
    let mut config = None;
    let mut check = false;
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let Some(arg) = arg.to_str().map(str::to_owned) else {
            return Err(format!("argument {arg:?} is not UTF-8"));
        };
        match arg.as_str() {
            "--help" | "-h" => return Ok(Command::Help),
            "--version" | "-V" => return Ok(Command::Version),
            "--check" => check = true,
            "--config" => {
                let Some(value) = args.next() else {
                    return Err("--config needs a path".to_owned());
                };
                config = Some(utf8_path(value)?);
            }
            _ => match arg.strip_prefix("--config=") {
                Some(value) => config = Some(utf8_path(value.into())?),
                None => return Err(format!("unexpected argument `{arg}`")),
            },
        }
    }
    match config {
        Some(config) => Ok(Command::Run { config, check }),
        None => Err("missing --config <path>".to_owned()),
    }
}

fn utf8_path(value: OsString) -> Result<Utf8PathBuf, String> {
    match Utf8PathBuf::from_path_buf(value.into()) {
        Ok(path) if !path.as_str().is_empty() => Ok(path),
        Ok(_) => Err("--config needs a non-empty path".to_owned()),
        Err(path) => Err(format!("config path {} is not UTF-8", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_strs(args: &[&str]) -> Result<Command, String> {
        parse(args.iter().map(OsString::from))
    }

    #[test]
    fn config_in_both_spellings() {
        let want = Command::Run { config: "/a/config.toml".into(), check: false };
        assert_eq!(parse_strs(&["--config", "/a/config.toml"]), Ok(want));
        let want = Command::Run { config: "c.toml".into(), check: true };
        assert_eq!(parse_strs(&["--check", "--config=c.toml"]), Ok(want));
    }

    #[test]
    fn help_and_version() {
        assert_eq!(parse_strs(&["--help"]), Ok(Command::Help));
        assert_eq!(parse_strs(&["--config", "x", "--version"]), Ok(Command::Version));
    }

    #[test]
    fn mistakes_are_named() {
        assert_eq!(parse_strs(&[]), Err("missing --config <path>".to_owned()));
        assert_eq!(parse_strs(&["--config"]), Err("--config needs a path".to_owned()));
        assert_eq!(parse_strs(&["--config="]), Err("--config needs a non-empty path".to_owned()));
        assert_eq!(parse_strs(&["--port", "3"]), Err("unexpected argument `--port`".to_owned()));
    }
}
