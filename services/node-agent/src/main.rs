//! `node-agent --config <path>`: see the library for what it does.

use std::process::ExitCode;

fn main() -> ExitCode {
    service_common::main(
        node_agent::SERVICE,
        node_agent::VERSION,
        node_agent::config::load,
        node_agent::start,
    )
}
