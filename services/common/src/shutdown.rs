//! Clean shutdown on SIGTERM and SIGINT, so that `systemctl stop` and `svcadm disable` return
//! quickly and the service exits with status 0.

use crate::http::Stopper;
use crate::{error, info};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use std::io;
use std::thread;

/// Starts a thread that, on the first SIGTERM or SIGINT, stops the server behind `stopper`.
///
/// The server's `serve` then returns and `main` exits 0. If the listener cannot be woken the
/// process exits 0 straight away: the service was asked to stop and must not linger.
pub fn stop_on_signal(stopper: Stopper) -> io::Result<()> {
    let mut signals = Signals::new([SIGTERM, SIGINT])?;
    thread::Builder::new().name("signals".to_owned()).spawn(move || {
        if let Some(signal) = signals.forever().next() {
            let name = if signal == SIGTERM { "SIGTERM" } else { "SIGINT" };
            info!("received {name}, shutting down");
            if let Err(e) = stopper.stop() {
                error!("{e}; exiting now");
                std::process::exit(0);
            }
        }
    })?;
    Ok(())
}
