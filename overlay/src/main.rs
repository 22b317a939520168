//! `flotilla-overlay generate`: reads a [`Request`] in JSON on standard input, writes every
//! server's overlay under the request's `out_dir`, and prints one line saying what was kept and
//! made. `cargo xtask fling overlay --generate-here` runs it on the builder; it is a binary of
//! its own so that xtask does not link the certificate and template crates.

use std::io::Read;
use std::process::ExitCode;

use flotilla_overlay::{describe, parse_request, run, OverlayError};

const USAGE: &str = "usage: flotilla-overlay generate < request.json

Reads the overlay request (JSON, written by `cargo xtask fling overlay --generate-here`) on
standard input and writes each server's overlay under its `out_dir`.";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args != ["generate"] {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    }
    match generate() {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

fn generate() -> Result<String, OverlayError> {
    let mut text = String::new();
    if let Err(err) = std::io::stdin().read_to_string(&mut text) {
        return Err(OverlayError::Request {
            source_name: "stdin".into(),
            message: err.to_string(),
        });
    }
    let request = parse_request("stdin", &text)?;
    let summary = run(&request)?;
    Ok(format!(
        "wrote the overlay of {} servers under {}: {}",
        request.servers.len(),
        request.out_dir,
        describe(&summary)
    ))
}
