//! A tiny HTTP service for the installer's end-to-end tests on testbed nodes: it answers every
//! request with a configured status and its configured version, so a test can tell which
//! release is serving and make a release unhealthy on purpose.
//!
//! `test-service --config <file>`, where the file holds
//! `listen = "0.0.0.0:7001"`, `version = "1"` and optionally `status = 500`.

use std::io::{Read, Write};
use std::net::TcpListener;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    listen: String,
    version: String,
    #[serde(default = "ok")]
    status: u16,
}

fn ok() -> u16 {
    200
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, flag, path] = args.as_slice() else {
        eprintln!("usage: test-service --config <file>");
        std::process::exit(2);
    };
    assert_eq!(flag, "--config", "usage: test-service --config <file>");
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    let config: Config = toml::from_str(&text).unwrap_or_else(|e| panic!("parse {path}: {e}"));
    let listener = TcpListener::bind(&config.listen)
        .unwrap_or_else(|e| panic!("listen on {}: {e}", config.listen));
    eprintln!("test-service version {} listening on {}", config.version, config.listen);
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let mut buf = [0u8; 4096];
        let _ = stream.read(&mut buf);
        let body = format!("{{\"version\":\"{}\"}}", config.version);
        let response = format!(
            "HTTP/1.1 {} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            config.status,
            body.len()
        );
        let _ = stream.write_all(response.as_bytes());
        eprintln!("answered {} with version {}", config.status, config.version);
    }
}
