//! The service manager of a host: systemd on Linux, SMF on illumos.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Which service manager a host runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ManagerKind {
    Systemd,
    Smf,
}

impl ManagerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ManagerKind::Systemd => "systemd",
            ManagerKind::Smf => "smf",
        }
    }

    /// The file in a service's `pkg/` directory that this manager reads: `<service>.service`
    /// for systemd, `manifest.xml` for SMF.
    pub fn definition_file(self, service: &str) -> String {
        match self {
            ManagerKind::Systemd => format!("{service}.service"),
            ManagerKind::Smf => crate::services::SMF_MANIFEST.to_owned(),
        }
    }

    /// The program whose presence tells a host runs this manager.
    pub fn control_program(self) -> &'static str {
        match self {
            ManagerKind::Systemd => "systemctl",
            ManagerKind::Smf => "svcadm",
        }
    }
}

impl fmt::Display for ManagerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ManagerKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "systemd" => Ok(ManagerKind::Systemd),
            "smf" => Ok(ManagerKind::Smf),
            other => Err(format!("unknown service manager `{other}`: expected systemd or smf")),
        }
    }
}
