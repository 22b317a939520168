//! Health checks: how a service says it works, declared next to its service definition in
//! `pkg/health.toml`, and probed with nothing but the standard library.
//!
//! ```toml
//! # Either an HTTP URL that must answer 2xx to a GET ...
//! http = "http://127.0.0.1:12220/health"
//! # ... or a command (program and arguments, no shell) that must exit 0.
//! # command = ["/usr/bin/test", "-S", "/run/x.sock"]
//! # How long after activation the service may take to become healthy (default 30).
//! timeout_secs = 30
//! ```

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The file in a service's `pkg/` directory that declares its health check.
pub const HEALTH_FILE: &str = "health.toml";

/// How long a service may take to become healthy when its declaration does not say.
pub const DEFAULT_TIMEOUT_SECS: u64 = 30;

/// A declared health check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheck {
    pub probe: Probe,
    pub timeout_secs: u64,
}

/// What is probed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Probe {
    /// An `http://` URL that must answer a GET with a 2xx status.
    Http(String),
    /// A program and its arguments that must exit 0.
    Command(Vec<String>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HealthFile {
    http: Option<String>,
    command: Option<Vec<String>>,
    timeout_secs: Option<u64>,
}

/// Parses a `health.toml`; the error names the field at fault.
pub fn parse(text: &str) -> Result<HealthCheck, String> {
    let file: HealthFile = toml::from_str(text).map_err(|e| e.to_string().trim().to_owned())?;
    let probe = match (file.http, file.command) {
        (Some(url), None) => {
            parse_url(&url).map_err(|m| format!("field `http`: {m}"))?;
            Probe::Http(url)
        }
        (None, Some(command)) => {
            if command.is_empty() || command[0].is_empty() {
                return Err("field `command`: an empty command".into());
            }
            Probe::Command(command)
        }
        (Some(_), Some(_)) => return Err("give either `http` or `command`, not both".into()),
        (None, None) => {
            return Err("give `http` (a URL) or `command` (a program and arguments)".into())
        }
    };
    let timeout_secs = file.timeout_secs.unwrap_or(DEFAULT_TIMEOUT_SECS);
    if timeout_secs == 0 {
        return Err("field `timeout_secs`: must be at least 1".into());
    }
    Ok(HealthCheck { probe, timeout_secs })
}

/// Probes once: `Ok(())` when healthy, otherwise why not.
pub fn probe(probe: &Probe) -> Result<(), String> {
    match probe {
        Probe::Http(url) => http_get(url, Duration::from_secs(2)),
        Probe::Command(argv) => {
            let out = std::process::Command::new(&argv[0])
                .args(&argv[1..])
                .stdin(std::process::Stdio::null())
                .output()
                .map_err(|e| format!("run {}: {e}", argv[0]))?;
            if out.status.success() {
                Ok(())
            } else {
                let stderr = String::from_utf8_lossy(&out.stderr);
                Err(format!("`{}` {}: {}", argv.join(" "), out.status, stderr.trim()))
            }
        }
    }
}

/// A parsed `http://host:port/path` URL.
#[derive(Debug, PartialEq, Eq)]
struct Url<'a> {
    host: &'a str,
    port: u16,
    path: &'a str,
}

fn parse_url(url: &str) -> Result<Url<'_>, String> {
    let rest =
        url.strip_prefix("http://").ok_or_else(|| format!("`{url}` is not an http:// URL"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or_else(|| format!("`{url}`: unclosed `[`"))?;
        (host, after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(format!("`{url}` has no host"));
    }
    let port = match port {
        Some(p) => p.parse().map_err(|_| format!("`{url}`: `{p}` is not a port"))?,
        None => 80,
    };
    Ok(Url { host, port, path })
}

/// A GET with a connect and read timeout; healthy when the status is 2xx.
pub fn http_get(url: &str, timeout: Duration) -> Result<(), String> {
    http_check(url, timeout, None)
}

/// The most of an answer's body that is searched for `contains` (a metrics page is a few
/// hundred kilobytes).
const BODY_LIMIT: u64 = 8 << 20;

/// [`http_get`], and when `contains` is given, the answer's body must hold that text (for a
/// leader check: the line of a metrics page that says this member leads).
pub fn http_check(url: &str, timeout: Duration, contains: Option<&str>) -> Result<(), String> {
    let parsed = parse_url(url)?;
    let addrs =
        (parsed.host, parsed.port).to_socket_addrs().map_err(|e| format!("resolve {url}: {e}"))?;
    let mut last = format!("resolve {url}: no address");
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(mut stream) => {
                stream.set_read_timeout(Some(timeout)).ok();
                stream.set_write_timeout(Some(timeout)).ok();
                let host = if parsed.host.contains(':') {
                    format!("[{}]:{}", parsed.host, parsed.port)
                } else {
                    format!("{}:{}", parsed.host, parsed.port)
                };
                let request = format!(
                    "GET {} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n",
                    parsed.path
                );
                stream.write_all(request.as_bytes()).map_err(|e| format!("GET {url}: {e}"))?;
                // The status line is all that matters unless the body is searched; a bounded
                // read keeps a misbehaving service from holding the installer.
                let limit = if contains.is_some() { BODY_LIMIT } else { 4096 };
                let mut head = Vec::new();
                stream.take(limit).read_to_end(&mut head).map_err(|e| format!("GET {url}: {e}"))?;
                let text = String::from_utf8_lossy(&head);
                let status = text.lines().next().unwrap_or_default();
                let code = status.split_whitespace().nth(1).unwrap_or_default();
                if !(code.starts_with('2') && code.len() == 3) {
                    return Err(format!("GET {url}: answered `{status}`"));
                }
                return match contains {
                    Some(needle) => {
                        let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
                        if body.contains(needle) {
                            Ok(())
                        } else {
                            Err(format!("GET {url}: the answer does not contain {needle:?}"))
                        }
                    }
                    None => Ok(()),
                };
            }
            Err(e) => last = format!("GET {url}: connect to {addr}: {e}"),
        }
    }
    Err(last)
}

/// Checks that `url` is an `http://` URL that [`http_check`] can reach.
pub fn check_url(url: &str) -> Result<(), String> {
    parse_url(url).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn parses_declarations() {
        let check = parse("http = \"http://127.0.0.1:80/health\"\ntimeout_secs = 5").unwrap();
        assert_eq!(check.probe, Probe::Http("http://127.0.0.1:80/health".into()));
        assert_eq!(check.timeout_secs, 5);
        let check = parse("command = [\"/bin/true\"]").unwrap();
        assert_eq!(check.timeout_secs, DEFAULT_TIMEOUT_SECS);
        for (text, expected) in [
            ("", "give `http`"),
            ("http = \"https://x\"", "not an http:// URL"),
            ("http = \"http://x\"\ncommand = [\"a\"]", "not both"),
            ("command = []", "empty command"),
            ("url = \"http://x\"", "unknown field `url`"),
            ("http = \"http://x\"\ntimeout_secs = 0", "at least 1"),
        ] {
            let err = parse(text).unwrap_err();
            assert!(err.contains(expected), "{err:?} should contain {expected:?}");
        }
    }

    #[test]
    fn parses_urls() {
        assert_eq!(
            parse_url("http://[::1]:8080/h").unwrap(),
            Url { host: "::1", port: 8080, path: "/h" }
        );
        assert_eq!(parse_url("http://a").unwrap(), Url { host: "a", port: 80, path: "/" });
    }

    fn serve_once(response: &'static str) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut buf = [0u8; 1024];
            let _ = stream.read(&mut buf);
            stream.write_all(response.as_bytes()).unwrap();
        });
        format!("http://{addr}/health")
    }

    #[test]
    fn http_get_needs_a_2xx_answer() {
        let url = serve_once("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
        http_get(&url, Duration::from_secs(5)).unwrap();
        let url = serve_once("HTTP/1.1 503 Service Unavailable\r\n\r\n");
        let err = http_get(&url, Duration::from_secs(5)).unwrap_err();
        assert!(err.contains("503"), "{err}");
        // A port nobody listens on: bind one, then drop it.
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let err =
            http_get(&format!("http://127.0.0.1:{port}/"), Duration::from_secs(5)).unwrap_err();
        assert!(err.contains("connect"), "{err}");
    }

    #[test]
    fn http_check_can_look_for_text_in_the_body() {
        let url = serve_once("HTTP/1.1 200 OK\r\n\r\netcd_server_is_leader 1\n");
        http_check(&url, Duration::from_secs(5), Some("etcd_server_is_leader 1")).unwrap();
        let url = serve_once("HTTP/1.1 200 OK\r\n\r\netcd_server_is_leader 0\n");
        let err =
            http_check(&url, Duration::from_secs(5), Some("etcd_server_is_leader 1")).unwrap_err();
        assert!(err.contains("does not contain"), "{err}");
    }

    #[test]
    fn command_probes_use_the_exit_status() {
        probe(&Probe::Command(vec!["true".into()])).unwrap();
        assert!(probe(&Probe::Command(vec!["false".into()])).is_err());
    }
}
