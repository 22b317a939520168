//! The installer's command line as the deploy side relies on it: its exit codes. fling reads
//! them from a server's step; the installer binary returns them.

/// Every asked-for change is done.
pub const EXIT_OK: u8 = 0;
/// Anything else failed; the previous release stays active.
pub const EXIT_FAILED: u8 = 1;
/// Another install holds the host's lock.
pub const EXIT_LOCKED: u8 = 2;
/// The new release was activated but a service did not become healthy; the previous release
/// was restored.
pub const EXIT_UNHEALTHY: u8 = 3;
/// `install --if-staged`: the staging directory does not hold what the given staged key names
/// (or installing from it failed before anything changed), so the deploy must push first.
pub const EXIT_NOT_STAGED: u8 = 4;
/// `install --expect-release`: the host's active release is not the one given (someone
/// installed, rolled back or reverted since the deploy plan looked), so nothing was changed.
pub const EXIT_STATE_CHANGED: u8 = 5;

/// The name, file and digest of one package, as `digests.b3` lists it and a release records it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PackageDigest {
    /// The file name without `.tar.gz` or `.tar`.
    pub name: String,
    pub file: String,
    pub digest: String,
}

/// One file of a server's overlay: its path under the overlay's root (the packages' prefix
/// without its leading `/`, then the service), the service whose directory holds it, and its
/// blake3 digest. Never its contents.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct OverlayFile {
    pub path: String,
    pub service: String,
    pub digest: String,
}

/// What the builder would send one server (`flotilla-installer payload`): the release it would
/// become, its packages, the server's overlay files and the installer binary's digest.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Payload {
    /// The release id the installer would give these packages with this overlay.
    pub release: String,
    pub installer: String,
    pub packages: Vec<PackageDigest>,
    pub overlay: Vec<OverlayFile>,
}

/// What a server holds (`flotilla-installer state`): what the deploy plan compares a payload
/// with.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HostState {
    /// The digest of the installer binary that answered.
    pub installer: String,
    pub active: Option<ActiveRelease>,
    /// The release awaiting confirmation (`install --confirm-timeout`), if any.
    pub awaiting_confirmation: Option<String>,
}

/// The active release of a server, as its record describes it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ActiveRelease {
    pub id: String,
    pub packages: Vec<PackageDigest>,
    /// `None` for a release unpacked by an installer that did not record its overlay's files.
    pub overlay: Option<Vec<OverlayFile>>,
    /// Each service and the packages that fill its directory, in start order.
    pub services: Vec<ReleaseService>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReleaseService {
    pub name: String,
    pub packages: Vec<String>,
}

/// The line prefix before a [`Payload`]'s JSON on standard output.
pub const PAYLOAD_LINE: &str = "flotilla-payload ";
/// The line prefix before a [`HostState`]'s JSON on standard output.
pub const STATE_LINE: &str = "flotilla-state ";
