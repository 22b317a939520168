//! `control-plane --config <path>`: see the library for what it does.

use std::process::ExitCode;

fn main() -> ExitCode {
    service_common::main(
        control_plane::SERVICE,
        control_plane::VERSION,
        control_plane::config::load,
        control_plane::start,
    )
}
