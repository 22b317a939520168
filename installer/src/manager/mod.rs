//! Service managers: systemd on Linux, SMF on illumos, behind one trait.
//!
//! A driver turns "these services, started or restarted in this order" into [`Step`]s (commands
//! and definition-file changes) and never runs anything itself, so its exact command sequences
//! are unit-tested as data.

mod smf;
mod systemd;

use camino::{Utf8Path, Utf8PathBuf};

use crate::error::{Error, Result};
use crate::runner::{Cmd, Output, Step};

pub use smf::{parse_manifest, Smf, SmfManifest, MANIFEST as SMF_MANIFEST};
pub use systemd::{unit_dependencies, Systemd, DEFAULT_UNIT_DIR};

pub use flotilla_contracts::ManagerKind;

/// Detects the service manager of the host whose root directory is `root` (`/` for this
/// host): systemd when `/run/systemd/system` exists (systemd's own documented test, the one
/// `sd_booted` uses), SMF when `/usr/sbin/svcadm` exists.
pub fn detect(root: &Utf8Path) -> Result<ManagerKind> {
    let systemd = root.join("run/systemd/system");
    let smf = root.join("usr/sbin/svcadm");
    if systemd.is_dir() {
        return Ok(ManagerKind::Systemd);
    }
    if smf.exists() {
        return Ok(ManagerKind::Smf);
    }
    Err(Error::UnknownServiceManager { systemd, smf })
}

/// A service of one release, as a driver needs to see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRef {
    /// The service name, the directory under the release.
    pub name: String,
    /// `<prefix>/releases/<id>/<name>`.
    pub dir: Utf8PathBuf,
    /// The SMF FMRI of its instance, when the package carries a manifest.
    pub fmri: Option<String>,
}

impl ServiceRef {
    /// The `pkg/` directory holding the service's definitions and configuration.
    pub fn pkg(&self) -> Utf8PathBuf {
        self.dir.join("pkg")
    }
}

/// What happens to a service on activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Its files did not change: make sure it runs, without restarting it if it does.
    Start,
    /// Its files changed: restart it.
    Restart,
}

/// One service of an activation plan.
#[derive(Debug, Clone)]
pub struct Planned {
    pub service: ServiceRef,
    pub action: Action,
    /// Whether its definition (unit file or manifest) must be put in place again.
    pub definition_changed: bool,
    /// The services of this plan that must be up before this one starts (the release's
    /// recorded dependencies). The plan lists them earlier; a driver that starts several
    /// services with one command must keep this order.
    pub after: Vec<String>,
}

/// Everything one activation does to the service manager, in dependency order.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub services: Vec<Planned>,
    /// Services of the previously active release that the new one does not have.
    pub removed: Vec<ServiceRef>,
}

/// A service manager driver.
pub trait ServiceManager: Send + Sync {
    /// Which manager this drives.
    fn kind(&self) -> ManagerKind;
    /// The file in a service's `pkg/` directory that defines the service for this manager.
    fn definition_file(&self, service: &str) -> String;
    /// Whether `new`'s definition differs from what the manager has now (`old` is the same
    /// service in the active release, if any).
    fn definition_changed(&self, new: &ServiceRef, old: Option<&ServiceRef>) -> bool;
    /// The steps that put the plan into effect.
    fn activate(&self, plan: &Plan) -> Vec<Step>;
    /// The steps that stop and disable services, in the order given.
    fn deactivate(&self, services: &[ServiceRef]) -> Vec<Step>;
    /// The steps that remove services' definitions from the manager (after `deactivate`).
    fn remove(&self, services: &[ServiceRef]) -> Vec<Step>;
    /// The command that asks for a service's state.
    fn state_command(&self, service: &ServiceRef) -> Cmd;
    /// Reads the output of [`ServiceManager::state_command`]: the state, and whether it is
    /// the running one.
    fn parse_state(&self, output: &Output) -> (String, bool);
    /// The command that prints the service's recent log lines or diagnosis.
    fn logs_command(&self, service: &ServiceRef) -> Cmd;
    /// One command that asks for the state of every service at once, when the manager has
    /// one; a redeploy that changes nothing then costs one process instead of one per step.
    fn states_command(&self, _services: &[ServiceRef]) -> Option<Cmd> {
        None
    }
    /// Reads the output of [`ServiceManager::states_command`]: for each service in order,
    /// whether it runs and is enabled. A service the output does not mention is neither.
    fn parse_states(&self, services: &[ServiceRef], _output: &Output) -> Vec<Settled> {
        vec![Settled::default(); services.len()]
    }
    /// Reads the output of [`ServiceManager::states_command`] the way
    /// [`ServiceManager::parse_state`] reads that of `state_command`: for each service in
    /// order, its state and whether that is the running one. The health waits poll all
    /// services of a release with it, one process per round instead of one per service.
    fn parse_active_states(
        &self,
        services: &[ServiceRef],
        _output: &Output,
    ) -> Vec<(String, bool)> {
        vec![("unknown".to_owned(), false); services.len()]
    }
}

/// What a service manager reports of a service that a no-op activation must leave alone.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Settled {
    /// It runs now.
    pub running: bool,
    /// It starts at boot.
    pub enabled: bool,
}

/// The driver for a manager kind. `unit_dir` is where systemd unit files go.
pub fn driver(kind: ManagerKind, unit_dir: &Utf8Path) -> Box<dyn ServiceManager> {
    match kind {
        ManagerKind::Systemd => Box::new(Systemd { unit_dir: unit_dir.to_owned() }),
        ManagerKind::Smf => Box::new(Smf),
    }
}

/// Whether two files have the same contents; a missing or unreadable file differs from any.
pub(crate) fn same_contents(a: &Utf8Path, b: &Utf8Path) -> bool {
    match (std::fs::read(a), std::fs::read(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_each_manager_and_refuses_neither() {
        let dir = std::env::temp_dir().join(format!("flotilla-detect-{}", std::process::id()));
        let root = Utf8PathBuf::try_from(dir).unwrap();
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let err = detect(&root).unwrap_err().to_string();
        assert!(err.contains("neither") && err.contains("--service-manager"), "{err}");
        std::fs::create_dir_all(root.join("usr/sbin")).unwrap();
        std::fs::write(root.join("usr/sbin/svcadm"), "").unwrap();
        assert_eq!(detect(&root).unwrap(), ManagerKind::Smf);
        std::fs::create_dir_all(root.join("run/systemd/system")).unwrap();
        assert_eq!(detect(&root).unwrap(), ManagerKind::Systemd);
        std::fs::remove_dir_all(&root).unwrap();
        assert_eq!("smf".parse::<ManagerKind>().unwrap(), ManagerKind::Smf);
        assert!("upstart".parse::<ManagerKind>().unwrap_err().contains("unknown service manager"));
    }
}
