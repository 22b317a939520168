//! The installer's commands: install (unpack + activate), rollback, deactivate, uninstall,
//! clean and status.

use std::collections::BTreeMap;
use std::fs;
use std::sync::Arc;
use std::time::{Duration, Instant};

use camino::{Utf8Path, Utf8PathBuf};
use flotilla_contracts::atomic::{create_dir, create_dir_all};
use flotilla_contracts::Prefix;
use serde::Serialize;

use crate::accounts::{self, Accounts, HostAccounts, Owner, ServiceUser};
use crate::confirm::{self, Awaiting};
use crate::digests::{verify_dir, VerifiedPackage};
use crate::error::{io, Error, Result};
use crate::health::{self, HEALTH_FILE};
use crate::lock::{who, InstallLock};
use crate::manager::{
    self, parse_manifest, unit_dependencies, Action, ManagerKind, Plan, Planned, ServiceManager,
    ServiceRef, Settled,
};
use crate::release::{
    dependency_order, fsync_dir, now, release_id, tree_digest, write_atomic, write_atomic_owned,
    Activation, Layout, PackageInfo, Pending, ReleaseInfo, Releases, ServiceInfo, State,
};
use crate::runner::{Runner, Step};
use crate::unpack::{ensure_dirs, unpack, ArchiveKind};

/// How a host is installed on. Every field matters, so there is no `Default`.
#[derive(Debug, Clone)]
pub struct Config {
    /// The installation prefix, `/opt/flotilla` on servers unless configured.
    pub prefix: Utf8PathBuf,
    /// The prefix the packages were built for: zone images hold their files under
    /// `root<packages_prefix>/`, overlays under `<packages_prefix>/` without the leading `/`,
    /// and service definitions name paths under it. Usually `prefix`; when they differ (tests,
    /// side-by-side installs), the definitions are rewritten to `prefix`.
    pub packages_prefix: Prefix,
    /// Where systemd unit files go, `/etc/systemd/system` on servers.
    pub unit_dir: Utf8PathBuf,
    /// The host's service manager (detected or given).
    pub manager: ManagerKind,
    /// How many releases to keep, the active one included (at least 1).
    pub keep: usize,
    /// How long to wait for another install to release the host's lock.
    pub lock_wait: Duration,
    /// Create the users (and groups) the services declare when this host lacks them, before
    /// anything is placed; otherwise a missing one is an error.
    pub create_users: bool,
    /// After an install that activated a new release: how long the deployer has to confirm
    /// it (see [`crate::confirm`]) before the previous release is put back. `None`: no
    /// confirmation is asked for.
    pub confirm_timeout: Option<Duration>,
}

/// What an install or rollback did.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub release: String,
    /// Whether the release was unpacked now (false: it was already on the host).
    pub unpacked: bool,
    /// The services restarted because their files changed (or started for the first time).
    pub restarted: Vec<String>,
    /// The services whose files did not change; started only if they were not running.
    pub unchanged: Vec<String>,
    /// Services of the previous release that the new one does not have.
    pub removed: Vec<String>,
    /// Releases removed to keep the configured number.
    pub pruned: Vec<String>,
    /// The confirmation this activation awaits (`install --confirm-timeout`), if any.
    pub awaiting: Option<Awaiting>,
}

/// What `status` reports.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub manager: String,
    pub prefix: Utf8PathBuf,
    pub active: Option<String>,
    pub releases: Vec<ReleaseStatus>,
    pub services: Vec<ServiceStatus>,
    /// The latest activation of the history: what made the active release active.
    pub last_activation: Option<Activation>,
    /// An activation awaiting its confirmation.
    pub awaiting_confirmation: Option<Awaiting>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReleaseStatus {
    pub id: String,
    pub created_at: u64,
    pub active: bool,
    pub packages: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ServiceStatus {
    pub name: String,
    pub state: String,
    pub running: bool,
    /// `None` when the service declares no health check.
    pub healthy: Option<bool>,
    pub health_detail: Option<String>,
}

fn list(items: &[String]) -> String {
    if items.is_empty() {
        "none".to_owned()
    } else {
        items.join(", ")
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "active release: {}", self.release)?;
        writeln!(f, "restarted: {}", list(&self.restarted))?;
        write!(f, "unchanged: {}", list(&self.unchanged))?;
        if !self.removed.is_empty() {
            write!(f, "\nremoved services: {}", list(&self.removed))?;
        }
        if !self.pruned.is_empty() {
            write!(f, "\npruned releases: {}", list(&self.pruned))?;
        }
        if let Some(a) = &self.awaiting {
            write!(
                f,
                "\nawaiting confirmation within {} s, else reverting to release {}",
                a.timeout_secs, a.previous
            )?;
        }
        Ok(())
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "service manager: {}", self.manager)?;
        writeln!(f, "prefix: {}", self.prefix)?;
        write!(f, "active release: {}", self.active.as_deref().unwrap_or("none"))?;
        if let Some(last) = &self.last_activation {
            write!(f, " (by {} at {}: {})", last.kind, last.at, last.by)?;
            if last.kind == crate::confirm::REVERT_KIND {
                write!(f, "; the release before it was not confirmed in time and was reverted")?;
            }
        }
        if let Some(a) = &self.awaiting_confirmation {
            write!(
                f,
                "\nawaiting confirmation of release {} until {}, else reverting to {}",
                a.release, a.deadline, a.previous
            )?;
        }
        for release in &self.releases {
            let mark = if release.active { "*" } else { " " };
            let packages = release.packages.join(", ");
            write!(f, "\n{mark} {} (unpacked at {}): {packages}", release.id, release.created_at)?;
        }
        for service in &self.services {
            let health = match (service.healthy, &service.health_detail) {
                (None, _) => "no health check".to_owned(),
                (Some(true), _) => "healthy".to_owned(),
                (Some(false), detail) => format!("unhealthy: {}", detail.as_deref().unwrap_or("")),
            };
            write!(f, "\n  {}: {} ({health})", service.name, service.state)?;
        }
        Ok(())
    }
}

/// The installer of one host.
pub struct Installer {
    config: Config,
    layout: Layout,
    manager: Box<dyn ServiceManager>,
    runner: Arc<dyn Runner>,
    accounts: Arc<dyn Accounts>,
    log: Box<dyn Fn(&str) + Send + Sync>,
    /// `install --expect-release`: the active release an install requires (`Some(None)`: none).
    expect: Option<Option<String>>,
}

impl Installer {
    /// An installer that runs commands through `runner`.
    pub fn new(config: Config, runner: Arc<dyn Runner>) -> Installer {
        let layout = Layout { prefix: config.prefix.clone() };
        let manager = manager::driver(config.manager, &config.unit_dir);
        Installer {
            config,
            layout,
            manager,
            runner,
            accounts: Arc::new(HostAccounts),
            log: Box::new(|_| {}),
            expect: None,
        }
    }

    /// Installs only while the active release is `release` (`None`: while none is), checked
    /// under the host's lock before anything changes; otherwise [`Error::StateChanged`]. What a
    /// deploy plan saw is what the install applies to.
    pub fn expecting_release(mut self, release: Option<String>) -> Installer {
        self.expect = Some(release);
        self
    }

    /// Looks the services' users up in `accounts` instead of the host's user database.
    pub fn with_accounts(mut self, accounts: Arc<dyn Accounts>) -> Installer {
        self.accounts = accounts;
        self
    }

    /// Sends a line per step to `log` (the binary prints them; the library never does).
    pub fn with_log(mut self, log: impl Fn(&str) + Send + Sync + 'static) -> Installer {
        self.log = Box::new(log);
        self
    }

    /// The paths of this installation.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    fn lock(&self, what: &str) -> Result<InstallLock> {
        create_dir_all(&self.layout.prefix, 0o755).map_err(io("create", &self.layout.prefix))?;
        InstallLock::acquire(&self.layout.lock_file(), what, self.config.lock_wait)
    }

    /// Verifies and unpacks the packages of `packages_dir` (plus this host's `overlay`) into a
    /// release, then activates it. Nothing is activated unless every package verified and
    /// unpacked; if a service does not become healthy, the previous release is restored.
    pub fn install(&self, packages_dir: &Utf8Path, overlay: Option<&Utf8Path>) -> Result<Outcome> {
        let _lock = self.lock(&format!("install {packages_dir}"))?;
        if let Some(expected) = &self.expect {
            let found = self.layout.active()?;
            if &found != expected {
                return Err(Error::StateChanged {
                    expected: expected.clone().unwrap_or_else(|| "none".into()),
                    found: found.unwrap_or_else(|| "none".into()),
                });
            }
        }
        // A confirmation still awaited is superseded: this install is the deployer's next word.
        if let Some(old) = crate::confirm::disarm(&self.layout)? {
            (self.log)(&format!(
                "superseding the confirmation awaited for release {}",
                old.release
            ));
        }
        let before = self.layout.active()?;
        let verified = verify_dir(packages_dir)?;
        (self.log)(&format!("verified {} packages against {}", verified.len(), crate::DIGEST_LIST));
        let overlay_digest = match overlay {
            Some(dir) => {
                check_overlay(dir, self.config.packages_prefix.relative())?;
                Some(tree_digest(dir)?)
            }
            None => None,
        };
        let packages: Vec<PackageInfo> = verified
            .iter()
            .map(|v| PackageInfo {
                name: ArchiveKind::from_file_name(&v.file)
                    .map_or(v.file.clone(), |(_, stem)| stem.to_owned()),
                file: v.file.clone(),
                digest: v.digest.clone(),
            })
            .collect();
        let id = release_id(&packages, overlay_digest.as_deref());
        let dir = self.layout.release(&id);
        let unpacked = if dir.join(crate::release::RELEASE_RECORD).is_file() {
            (self.log)(&format!("release {id} is already unpacked"));
            false
        } else {
            self.unpack_release(&id, &verified, packages, overlay, overlay_digest)?;
            (self.log)(&format!("unpacked release {id}"));
            true
        };
        let mut outcome = self.activate(&id, "install")?;
        outcome.unpacked = unpacked;
        outcome.pruned = self.prune()?;
        if let (Some(timeout), Some(previous)) = (self.config.confirm_timeout, before) {
            if previous != id {
                let awaiting = Awaiting {
                    release: id.clone(),
                    previous,
                    deadline: now() + timeout.as_secs(),
                    timeout_secs: timeout.as_secs(),
                };
                crate::confirm::arm(&self.layout, &awaiting)?;
                (self.log)(&format!(
                    "release {id} awaits confirmation within {} s, else release {} comes back",
                    awaiting.timeout_secs, awaiting.previous
                ));
                outcome.awaiting = Some(awaiting);
            }
        }
        Ok(outcome)
    }

    /// Activates an earlier release: the one before the active one, or `to`.
    pub fn rollback(&self, to: Option<&str>) -> Result<Outcome> {
        let _lock = self.lock(&format!("rollback to {}", to.unwrap_or("the previous release")))?;
        let active = self.layout.active()?;
        let state = State::read(&self.layout)?;
        let target = match to {
            Some(id) => {
                if !self.layout.release(id).join(crate::release::RELEASE_RECORD).is_file() {
                    let known: Vec<String> =
                        self.layout.releases_list()?.into_iter().map(|r| r.id).collect();
                    return Err(Error::Release {
                        action: "rollback",
                        message: format!(
                            "no release {id} on this host (releases: {})",
                            known.join(", ")
                        ),
                    });
                }
                id.to_owned()
            }
            None => state.previous(active.as_deref(), &self.layout).ok_or(Error::Release {
                action: "rollback",
                message: "no previous release on this host to roll back to".into(),
            })?,
        };
        self.activate(&target, "rollback")
    }

    /// The watcher of `install --confirm-timeout`: waits for the confirmation of `release`
    /// until its deadline; when none came, takes the install lock and, if `release` is still
    /// the active one, activates the release before it (kind [`confirm::REVERT_KIND`]).
    /// Returns what happened, for the watcher's log.
    pub fn await_confirmation(&self, release: &str, poll: Duration) -> Result<String> {
        loop {
            match confirm::pending(&self.layout)? {
                Some(a) if a.release == release => {
                    if now() >= a.deadline {
                        break;
                    }
                }
                _ => return Ok(format!("release {release} was confirmed (or superseded)")),
            }
            std::thread::sleep(poll);
        }
        let _lock = self.lock(&format!("revert unconfirmed release {release}"))?;
        let Some(expired) = confirm::expire(&self.layout, release)? else {
            return Ok(format!("release {release} was confirmed as its deadline passed"));
        };
        if self.layout.active()?.as_deref() != Some(release) {
            return Ok(format!("release {release} is no longer active: nothing to revert"));
        }
        let outcome = self.activate(&expired.previous, confirm::REVERT_KIND)?;
        Ok(format!(
            "release {release} was not confirmed within {} s: reverted to release {}",
            expired.timeout_secs, outcome.release
        ))
    }

    /// Stops and disables the active release's services; files stay.
    pub fn deactivate(&self) -> Result<Vec<String>> {
        let _lock = self.lock("deactivate")?;
        let Some(active) = self.layout.active()? else { return Ok(Vec::new()) };
        let info = ReleaseInfo::read(&self.layout.release(&active))?;
        let mut services = info.service_refs(&self.layout.release(&active));
        services.reverse();
        self.execute(&self.manager.deactivate(&services))?;
        Ok(services.into_iter().map(|s| s.name).collect())
    }

    /// Stops the services, removes their definitions, every release and the state; the data
    /// directory stays unless `purge`. Keeps going past errors so one stuck service does not
    /// leave the rest installed, and reports them all at the end.
    pub fn uninstall(&self, purge: bool) -> Result<Vec<String>> {
        let lock = self.lock("uninstall")?;
        let mut errors = Vec::new();
        let active = self.layout.active()?;
        // Every service any release on the host has, so a service that a failed or older
        // release defined is removed too; the active release's view wins.
        let mut services: BTreeMap<String, ServiceRef> = BTreeMap::new();
        let mut running: Vec<ServiceRef> = Vec::new();
        for info in self.layout.releases_list()? {
            let dir = self.layout.release(&info.id);
            for service in info.service_refs(&dir) {
                if Some(&info.id) == active.as_ref() {
                    running.push(service.clone());
                    services.insert(service.name.clone(), service);
                } else {
                    services.entry(service.name.clone()).or_insert(service);
                }
            }
        }
        running.reverse();
        let all: Vec<ServiceRef> = services.into_values().collect();
        let mut steps = self.manager.deactivate(&running);
        steps.extend(self.manager.remove(&all));
        for step in &steps {
            if let Err(e) = self.execute_step(step) {
                errors.push(e.to_string());
            }
        }
        if let Err(e) = self.layout.switch_current(None) {
            errors.push(e.to_string());
        }
        for path in [self.layout.releases(), self.layout.state_file()] {
            if let Err(e) = remove_path(&path) {
                errors.push(e.to_string());
            }
        }
        if purge {
            if let Err(e) = remove_path(&self.layout.data()) {
                errors.push(e.to_string());
            }
        }
        drop(lock);
        // The lock file goes last, and only if nothing else is left in the prefix (data).
        let _ = fs::remove_file(self.layout.lock_file());
        let _ = fs::remove_dir(&self.layout.prefix);
        if !errors.is_empty() {
            return Err(Error::Release { action: "uninstall", message: errors.join("; ") });
        }
        Ok(all.into_iter().map(|s| s.name).collect())
    }

    /// Removes every release but the active one, and leftovers of interrupted unpacks.
    pub fn clean(&self) -> Result<Vec<String>> {
        let _lock = self.lock("clean")?;
        let active = self.layout.active()?;
        let mut removed = Vec::new();
        let dir = self.layout.releases();
        let entries = match dir.read_dir_utf8() {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
            Err(e) => return Err(Error::Io { action: "list releases", path: dir, source: e }),
        };
        for entry in entries {
            let entry = entry.map_err(io("list releases", &dir))?;
            let name = entry.file_name().to_owned();
            if Some(&name) != active.as_ref() {
                remove_path(entry.path())?;
                removed.push(name);
            }
        }
        removed.sort();
        Ok(removed)
    }

    /// The active release, every release, and each active service's state and health.
    pub fn status(&self) -> Result<Status> {
        let active = self.layout.active()?;
        let releases = self.layout.releases_list()?;
        let mut services = Vec::new();
        if let Some(info) = releases.iter().find(|r| Some(&r.id) == active.as_ref()) {
            let dir = self.layout.release(&info.id);
            for (service, spec) in info.service_refs(&dir).iter().zip(&info.services) {
                let (state, running) = self.state_of(service)?;
                let (healthy, health_detail) = match &spec.health {
                    None => (None, None),
                    Some(check) => match health::probe(&check.probe) {
                        Ok(()) => (Some(true), None),
                        Err(e) => (Some(false), Some(e)),
                    },
                };
                services.push(ServiceStatus {
                    name: service.name.clone(),
                    state,
                    running,
                    healthy,
                    health_detail,
                });
            }
        }
        Ok(Status {
            manager: self.config.manager.to_string(),
            prefix: self.layout.prefix.clone(),
            releases: releases
                .iter()
                .map(|r| ReleaseStatus {
                    id: r.id.clone(),
                    created_at: r.created_at,
                    active: Some(&r.id) == active.as_ref(),
                    packages: r
                        .packages
                        .iter()
                        .map(|p| format!("{} {}", p.file, &p.digest[..12]))
                        .collect(),
                })
                .collect(),
            active,
            services,
            last_activation: State::read(&self.layout)?.history.last().cloned(),
            awaiting_confirmation: crate::confirm::pending(&self.layout)?,
        })
    }

    fn unpack_release(
        &self,
        id: &str,
        verified: &[VerifiedPackage],
        packages: Vec<PackageInfo>,
        overlay: Option<&Utf8Path>,
        overlay_digest: Option<String>,
    ) -> Result<ReleaseInfo> {
        let releases = self.layout.releases();
        create_dir_all(&releases, 0o755).map_err(io("create", &releases))?;
        let temp = releases.join(format!(".tmp-{id}-{}", std::process::id()));
        remove_path(&temp)?;
        create_dir(&temp, 0o755).map_err(io("create", &temp))?;
        let guard = RemoveOnDrop(Some(temp.clone()));
        let mut owners: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (package, info) in verified.iter().zip(&packages) {
            let (kind, _) =
                ArchiveKind::from_file_name(&package.file).expect("verify_dir lists archives only");
            let zone_root = self.config.packages_prefix.zone_root();
            let unpacked = unpack(&package.path, kind, &info.name, &temp, &zone_root)?;
            if kind == ArchiveKind::Zone {
                if unpacked.top_dirs.is_empty() {
                    return Err(Error::Package {
                        package: info.name.clone(),
                        message: format!("holds no service under {zone_root}/"),
                    });
                }
                for dir in unpacked.top_dirs {
                    owners.entry(dir).or_default().push(info.name.clone());
                }
            }
        }
        // Every service's user must exist before anything is placed or activated: the
        // overlay's secrets are handed to it, and the service manager would refuse to start
        // the service without it.
        let mut users: BTreeMap<String, ServiceUser> = BTreeMap::new();
        let mut file_owners: BTreeMap<String, Owner> = BTreeMap::new();
        for name in owners.keys() {
            let Some((declared, declared_in)) = self.declared_user(&temp, name)? else {
                continue;
            };
            if self.config.create_users {
                self.create_accounts(name, &declared)?;
            }
            let owner = accounts::resolve(self.accounts.as_ref(), &declared, &declared_in)
                .map_err(|message| {
                    let owned = overlay
                        .and_then(|dir| {
                            first_file(&dir.join(self.config.packages_prefix.relative()).join(name))
                        })
                        .map(|file| format!(", so it cannot own the overlay file {file}"))
                        .unwrap_or_default();
                    Error::Service {
                        service: name.clone(),
                        message: format!(
                            "{message}{owned}; {}",
                            accounts::create_hint(&declared.user)
                        ),
                    }
                })?;
            users.insert(name.clone(), declared);
            file_owners.insert(name.clone(), owner);
        }
        if let Some(overlay) = overlay {
            place_overlay(overlay, &temp, &file_owners, self.config.packages_prefix.relative())?;
        }
        let mut services = Vec::new();
        let mut smf_names: BTreeMap<String, String> = BTreeMap::new();
        let mut raw_after: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (name, pkgs) in &owners {
            let pkg = temp.join(name).join("pkg");
            let definition = self.manager.definition_file(name);
            let bad = |message: String| Error::Package { package: pkgs.join(", "), message };
            if !pkg.join(&definition).is_file() {
                return Err(bad(format!(
                    "service {name} has no {} service definition: pkg/{definition} is missing",
                    self.config.manager
                )));
            }
            if self.layout.prefix != self.config.packages_prefix.as_path() {
                self.rewrite_prefix(&pkg.join(format!("{name}.service")))?;
                self.rewrite_prefix(&pkg.join(crate::manager::SMF_MANIFEST))?;
            }
            let mut after = Vec::new();
            let unit = pkg.join(format!("{name}.service"));
            if unit.is_file() {
                let text = fs::read_to_string(&unit).map_err(io("read", &unit))?;
                after.extend(unit_dependencies(&text));
            }
            let manifest_path = pkg.join(crate::manager::SMF_MANIFEST);
            let mut fmri = None;
            if manifest_path.is_file() {
                let text =
                    fs::read_to_string(&manifest_path).map_err(io("read", &manifest_path))?;
                let manifest = parse_manifest(&text)
                    .map_err(|m| bad(format!("service {name}: pkg/manifest.xml: {m}")))?;
                smf_names.insert(manifest.service_fmri.clone(), name.clone());
                after.extend(manifest.dependencies);
                fmri = Some(manifest.fmri);
            }
            raw_after.insert(name.clone(), after);
            let health_path = pkg.join(HEALTH_FILE);
            let health = if health_path.is_file() {
                let text = fs::read_to_string(&health_path).map_err(io("read", &health_path))?;
                Some(health::parse(&text).map_err(|m| Error::Service {
                    service: name.clone(),
                    message: format!("pkg/{HEALTH_FILE}: {m}"),
                })?)
            } else {
                None
            };
            let fingerprint = tree_digest(&temp.join(name))?;
            services.push(ServiceInfo {
                name: name.clone(),
                packages: pkgs.clone(),
                fingerprint,
                after: Vec::new(),
                health,
                fmri,
                user: users.get(name).cloned(),
            });
        }
        // Dependencies name units or FMRIs; only those that are services of this release
        // order the start, the rest (network targets, milestones) are the manager's business.
        for service in &mut services {
            let mut after: Vec<String> = raw_after[&service.name]
                .iter()
                .filter_map(|d| {
                    let by_unit = d.strip_suffix(".service").filter(|n| owners.contains_key(*n));
                    by_unit.map(str::to_owned).or_else(|| smf_names.get(d).cloned())
                })
                .filter(|d| d != &service.name)
                .collect();
            after.sort();
            after.dedup();
            service.after = after;
        }
        let services = dependency_order(services)?;
        let overlay_files = match overlay {
            Some(dir) => crate::survey::overlay_files(dir, self.config.packages_prefix.relative())?,
            None => Vec::new(),
        };
        let info = ReleaseInfo {
            id: id.to_owned(),
            created_at: now(),
            packages,
            overlay: overlay_digest,
            overlay_files: Some(overlay_files),
            services,
        };
        info.write(&temp)?;
        let dir = self.layout.release(id);
        remove_path(&dir)?;
        fs::rename(&temp, &dir).map_err(io("move the unpacked release into place", &dir))?;
        fsync_dir(&releases);
        guard.disarm();
        Ok(info)
    }

    /// Creates the user and group `service` declares when this host lacks them, saying so.
    fn create_accounts(&self, service: &str, declared: &ServiceUser) -> Result<()> {
        let commands =
            accounts::create_commands(self.accounts.as_ref(), self.config.manager, declared)
                .map_err(|message| Error::Service { service: service.to_owned(), message })?;
        for cmd in commands {
            self.runner.run(&cmd)?;
            let what = cmd.description.strip_prefix("create ").unwrap_or(&cmd.description);
            (self.log)(&format!("created {what} for {service}"));
        }
        Ok(())
    }

    /// The user service `name` declares in its definition for this host's manager, and the
    /// file that declares it (relative to the release); `None` when it declares none (root).
    fn declared_user(
        &self,
        release: &Utf8Path,
        name: &str,
    ) -> Result<Option<(ServiceUser, String)>> {
        let definition = self.manager.definition_file(name);
        let rel = format!("{name}/pkg/{definition}");
        let path = release.join(&rel);
        if !path.is_file() {
            // The missing definition is reported with the package that lacks it.
            return Ok(None);
        }
        let text = fs::read_to_string(&path).map_err(io("read", &path))?;
        // Read as the service manager reads it, with the names checked: they become
        // arguments of `useradd`, and a service manager refuses what `useradd` would refuse.
        let declared = flotilla_contracts::services::declared_user(
            self.config.manager,
            Utf8Path::new(&format!("pkg/{definition}")),
            &text,
        )
        .map_err(|message| Error::Service { service: name.to_owned(), message })?;
        Ok(declared.map(|d| (d, format!("{}/{rel}", self.config.packages_prefix.relative()))))
    }

    /// Service definitions name paths under the default prefix; under another prefix (tests,
    /// side-by-side installs) they are rewritten to it.
    fn rewrite_prefix(&self, path: &Utf8Path) -> Result<()> {
        if !path.is_file() {
            return Ok(());
        }
        let text = fs::read_to_string(path).map_err(io("read", path))?;
        let rewritten = text.replace(
            &format!("{}/", self.config.packages_prefix),
            &format!("{}/", self.layout.prefix),
        );
        write_atomic(path, rewritten.as_bytes(), 0o644)
    }

    fn plan(&self, target: &ReleaseInfo, previous: Option<&ReleaseInfo>) -> Plan {
        let target_dir = self.layout.release(&target.id);
        let prev_refs: Vec<(ServiceRef, &ServiceInfo)> = match previous {
            Some(p) => {
                p.service_refs(&self.layout.release(&p.id)).into_iter().zip(&p.services).collect()
            }
            None => Vec::new(),
        };
        let services = target
            .service_refs(&target_dir)
            .into_iter()
            .zip(&target.services)
            .map(|(service, info)| {
                let old = prev_refs.iter().find(|(r, _)| r.name == service.name);
                let action = match old {
                    Some((_, old)) if old.fingerprint == info.fingerprint => Action::Start,
                    _ => Action::Restart,
                };
                let definition_changed =
                    self.manager.definition_changed(&service, old.map(|(r, _)| r));
                Planned { service, action, definition_changed, after: info.after.clone() }
            })
            .collect();
        let mut removed: Vec<ServiceRef> = prev_refs
            .into_iter()
            .map(|(r, _)| r)
            .filter(|r| !target.services.iter().any(|s| s.name == r.name))
            .collect();
        removed.reverse();
        Plan { services, removed }
    }

    fn activate(&self, id: &str, kind: &str) -> Result<Outcome> {
        let target = ReleaseInfo::read(&self.layout.release(id))?;
        let mut state = State::read(&self.layout)?;
        let previous_id = match &state.pending {
            // The last activation was interrupted: its services may still run the release it
            // started from, so that release is what this one is compared against.
            Some(pending) => pending.from.clone(),
            None => self.layout.active()?,
        };
        let previous = match &previous_id {
            Some(p) if self.layout.release(p).join(crate::release::RELEASE_RECORD).is_file() => {
                Some(ReleaseInfo::read(&self.layout.release(p))?)
            }
            _ => None,
        };
        let plan = self.plan(&target, previous.as_ref());
        let settled = self.already_settled(id, &state, previous_id.as_deref(), &plan);
        let steps = if settled.is_some() {
            // Nothing would change: no pending record, no symlink swap, no manager calls.
            // The health checks below still run, as after every activation.
            (self.log)(&format!(
                "release {id} is already active, its services run and are enabled: nothing to change"
            ));
            Vec::new()
        } else {
            state.pending = Some(Pending { from: previous_id.clone(), to: id.to_owned() });
            state.write(&self.layout)?;
            self.layout.switch_current(Some(id))?;
            (self.log)(&format!("activating release {id} ({kind})"));
            self.manager.activate(&plan)
        };
        let mut failure = None;
        for step in steps {
            (self.log)(&format!("  {step}"));
            if let Err(e) = self.execute_step(&step) {
                let service = failed_service(&plan, &step, &e)
                    .map_or_else(|| "(activation)".to_owned(), |p| p.service.name.clone());
                failure = Some((service, e.to_string()));
                break;
            }
        }
        if failure.is_none() {
            failure = self.wait_healthy_known(&target, settled.as_deref()).err();
        }
        if let Some((service, reason)) = failure {
            let logs = target
                .service_refs(&self.layout.release(id))
                .into_iter()
                .find(|s| s.name == service)
                .map(|s| self.logs(&s))
                .unwrap_or_default();
            let mut outcome = self.revert(
                &target,
                previous.as_ref(),
                previous_id.is_some() && previous.is_none(),
            );
            let mut state = State::read(&self.layout).unwrap_or_default();
            state.pending = None;
            if let Err(e) = state.write(&self.layout) {
                outcome.push_str(&format!("; {e}"));
            }
            if kind == "install" && previous_id.as_deref() != Some(id) {
                let _ = remove_path(&self.layout.release(id));
            }
            return Err(Error::Unhealthy {
                release: id.to_owned(),
                service,
                reason,
                outcome,
                logs,
            });
        }
        state.pending = None;
        state.history.push(Activation {
            release: id.to_owned(),
            at: now(),
            by: who(),
            kind: kind.to_owned(),
        });
        state.write(&self.layout)?;
        let mut outcome = Outcome {
            release: id.to_owned(),
            unpacked: false,
            restarted: Vec::new(),
            unchanged: Vec::new(),
            removed: plan.removed.iter().map(|s| s.name.clone()).collect(),
            pruned: Vec::new(),
            awaiting: None,
        };
        for planned in plan.services {
            match planned.action {
                Action::Restart => outcome.restarted.push(planned.service.name),
                Action::Start => outcome.unchanged.push(planned.service.name),
            }
        }
        (self.log)(&format!("release {id} is active and healthy"));
        Ok(outcome)
    }

    /// Puts the previous release back after a failed activation; returns what happened, for
    /// the error message.
    fn revert(
        &self,
        failed: &ReleaseInfo,
        previous: Option<&ReleaseInfo>,
        previous_lost: bool,
    ) -> String {
        let failed_dir = self.layout.release(&failed.id);
        let Some(previous) = previous else {
            let mut services = failed.service_refs(&failed_dir);
            services.reverse();
            let mut steps = self.manager.deactivate(&services);
            steps.extend(self.manager.remove(&services));
            let mut problems: Vec<String> = steps
                .iter()
                .filter_map(|s| self.execute_step(s).err())
                .map(|e| e.to_string())
                .collect();
            if let Err(e) = self.layout.switch_current(None) {
                problems.push(e.to_string());
            }
            let lost = if previous_lost {
                " (the previously active release's files are missing)"
            } else {
                ""
            };
            return if problems.is_empty() {
                format!("no previous release{lost}: the new services were stopped and removed")
            } else {
                format!(
                    "no previous release{lost}; stopping the new services also failed: {}",
                    problems.join("; ")
                )
            };
        };
        (self.log)(&format!("reverting to release {}", previous.id));
        let plan = self.plan(previous, Some(failed));
        let mut problems = Vec::new();
        if let Err(e) = self.layout.switch_current(Some(&previous.id)) {
            problems.push(e.to_string());
        }
        for step in self.manager.activate(&plan) {
            if let Err(e) = self.execute_step(&step) {
                problems.push(e.to_string());
            }
        }
        if problems.is_empty() {
            if let Err((service, reason)) = self.wait_healthy(previous) {
                problems.push(format!(
                    "service {service} of the restored release is not healthy either: {reason}"
                ));
            }
        }
        let mut state = State::read(&self.layout).unwrap_or_default();
        state.history.push(Activation {
            release: previous.id.clone(),
            at: now(),
            by: who(),
            kind: "revert".into(),
        });
        if let Err(e) = state.write(&self.layout) {
            problems.push(e.to_string());
        }
        if problems.is_empty() {
            format!("reverted to release {}, which is active and healthy", previous.id)
        } else {
            format!("reverting to release {} had problems: {}", previous.id, problems.join("; "))
        }
    }

    /// Whether activating `id` would change nothing: it is the active release, no earlier
    /// activation was interrupted, no service is added, removed, changed or has a changed
    /// definition, and the manager reports every service running and enabled (one command
    /// for all of them). Returns what the manager reported, for the health checks.
    fn already_settled(
        &self,
        id: &str,
        state: &State,
        previous_id: Option<&str>,
        plan: &Plan,
    ) -> Option<Vec<Settled>> {
        let unchanged = state.pending.is_none()
            && previous_id == Some(id)
            && plan.removed.is_empty()
            && plan.services.iter().all(|p| p.action == Action::Start && !p.definition_changed);
        if !unchanged || plan.services.is_empty() {
            return None;
        }
        let services: Vec<ServiceRef> = plan.services.iter().map(|p| p.service.clone()).collect();
        let cmd = self.manager.states_command(&services)?;
        let out = self.runner.output(&cmd).ok().filter(|o| o.success)?;
        let states = self.manager.parse_states(&services, &out);
        states.iter().all(|s| s.running && s.enabled).then_some(states)
    }

    /// Waits until every service of the release runs and passes its health check, each
    /// within its timeout counted from now. Returns the first service that did not, and why.
    fn wait_healthy(&self, release: &ReleaseInfo) -> Result<(), (String, String)> {
        self.wait_healthy_known(release, None)
    }

    /// `wait_healthy`, where `known` (in the release's service order) is what the manager
    /// has just reported: a service it reported running is not asked again before its first
    /// health check. One that fails the check is asked again, like any other.
    ///
    /// All services are polled together: each round asks the manager for the state of every
    /// service not yet healthy (one command when it has [`ServiceManager::states_command`],
    /// one per service otherwise), then probes those that run. Rounds start 50 ms apart and
    /// back off to 250 ms, so a service that is up at once costs one short round rather than
    /// a fixed sleep. A service fails when it is not healthy within its own timeout, counted
    /// from the start of the wait; the first such service, in the release's order, is named.
    fn wait_healthy_known(
        &self,
        release: &ReleaseInfo,
        known: Option<&[Settled]>,
    ) -> Result<(), (String, String)> {
        let start = Instant::now();
        let dir = self.layout.release(&release.id);
        let refs = release.service_refs(&dir);
        let timeouts: Vec<Duration> = release
            .services
            .iter()
            .map(|info| {
                Duration::from_secs(
                    info.health.as_ref().map_or(health::DEFAULT_TIMEOUT_SECS, |h| h.timeout_secs),
                )
            })
            .collect();
        let mut waiting: Vec<usize> = (0..refs.len()).collect();
        let mut known = known;
        let mut interval = HEALTH_POLL_FIRST;
        loop {
            let asked: Vec<ServiceRef> = waiting.iter().map(|&i| refs[i].clone()).collect();
            let observed: Vec<Result<(String, bool), String>> = match known.take() {
                Some(known) => waiting
                    .iter()
                    .map(|&i| match known.get(i) {
                        Some(s) if s.running => Ok(("running".to_owned(), true)),
                        _ => self.observe_one(&refs[i]),
                    })
                    .collect(),
                None => self.observe(&asked),
            };
            let mut still = Vec::new();
            let mut why_not: Vec<(usize, String)> = Vec::new();
            for (&i, observed) in waiting.iter().zip(observed) {
                let why = match observed {
                    Err(e) => Some(e),
                    Ok((state, false)) => Some(format!("its state is `{state}`")),
                    Ok((_, true)) => release.services[i].health.as_ref().and_then(|check| {
                        health::probe(&check.probe)
                            .err()
                            .map(|e| format!("health check failed: {e}"))
                    }),
                };
                match why {
                    None => (self.log)(&format!("  {} is running and healthy", refs[i].name)),
                    Some(why) => {
                        still.push(i);
                        why_not.push((i, why));
                    }
                }
            }
            waiting = still;
            if waiting.is_empty() {
                return Ok(());
            }
            let elapsed = start.elapsed();
            if let Some((i, why)) = why_not.into_iter().find(|(i, _)| elapsed >= timeouts[*i]) {
                return Err((
                    refs[i].name.clone(),
                    format!("{why} (after {}s)", timeouts[i].as_secs()),
                ));
            }
            std::thread::sleep(interval);
            interval = (interval * 2).min(HEALTH_POLL_MAX);
        }
    }

    /// The state of each service, and whether it runs: one command for all of them when the
    /// manager has one, else one per service. An error is why the state is not known.
    fn observe(&self, services: &[ServiceRef]) -> Vec<Result<(String, bool), String>> {
        if services.is_empty() {
            return Vec::new();
        }
        let Some(cmd) = self.manager.states_command(services) else {
            return services.iter().map(|s| self.observe_one(s)).collect();
        };
        match self.runner.run(&cmd) {
            Ok(out) => {
                self.manager.parse_active_states(services, &out).into_iter().map(Ok).collect()
            }
            Err(e) => vec![Err(e.to_string()); services.len()],
        }
    }

    fn observe_one(&self, service: &ServiceRef) -> Result<(String, bool), String> {
        self.state_of(service).map_err(|e| e.to_string())
    }

    /// A service's state as its manager reports it. A state command exits non-zero for a
    /// service that is not running (`systemctl is-active` prints `inactive` and exits 3), but
    /// one that prints no state is a manager that could not answer (PID 1 is not systemd, no
    /// bus): an error, never a state.
    fn state_of(&self, service: &ServiceRef) -> Result<(String, bool)> {
        let cmd = self.manager.state_command(service);
        let out = self.runner.output(&cmd)?;
        if !out.success && out.stdout.trim().is_empty() {
            return Err(Error::Command {
                description: cmd.description.clone(),
                command: cmd.to_string(),
                status: out.status,
                stderr: out.stderr.trim().to_owned(),
            });
        }
        Ok(self.manager.parse_state(&out))
    }

    fn logs(&self, service: &ServiceRef) -> String {
        match self.runner.output(&self.manager.logs_command(service)) {
            Ok(out) => {
                let text = format!("{}{}", out.stdout, out.stderr);
                let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
                if lines.is_empty() {
                    return format!("(`{}` printed nothing)", self.manager.logs_command(service));
                }
                lines[lines.len().saturating_sub(20)..].join("\n")
            }
            Err(e) => format!("(could not read the log: {e})"),
        }
    }

    fn execute(&self, steps: &[Step]) -> Result<()> {
        for step in steps {
            self.execute_step(step)?;
        }
        Ok(())
    }

    fn execute_step(&self, step: &Step) -> Result<()> {
        match step {
            Step::Run(cmd) => self.runner.run(cmd).map(|_| ()),
            Step::Install { from, to } => {
                let contents = fs::read(from).map_err(io("read", from))?;
                if let Some(parent) = to.parent() {
                    create_dir_all(parent, 0o755).map_err(io("create", parent))?;
                }
                write_atomic(to, &contents, 0o644)
            }
            Step::Remove { path } => match fs::remove_file(path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(Error::Io { action: "remove", path: path.clone(), source: e })
                }
                _ => Ok(()),
            },
        }
    }

    /// Removes the oldest releases beyond `keep`, never the active one.
    fn prune(&self) -> Result<Vec<String>> {
        let active = self.layout.active()?;
        let releases = self.layout.releases_list()?;
        let keep = self.config.keep.max(1);
        let mut excess = releases.len().saturating_sub(keep);
        let mut pruned = Vec::new();
        for release in releases {
            if excess == 0 {
                break;
            }
            if Some(&release.id) == active.as_ref() {
                continue;
            }
            remove_path(&self.layout.release(&release.id))?;
            pruned.push(release.id);
            excess -= 1;
        }
        Ok(pruned)
    }
}

/// The first pause between two rounds of health polling; it doubles up to [`HEALTH_POLL_MAX`].
const HEALTH_POLL_FIRST: Duration = Duration::from_millis(50);
/// The longest pause between two rounds of health polling.
const HEALTH_POLL_MAX: Duration = Duration::from_millis(250);

/// The planned service an activation step failed for. A step may name several services (one
/// `systemctl restart` for all of them); the command's stderr then tells which one failed
/// (systemd: "Job for b.service failed"), so the logs shown are that service's. Otherwise, the
/// last service the step names.
fn failed_service<'a>(plan: &'a Plan, step: &Step, error: &Error) -> Option<&'a Planned> {
    let text = step.to_string();
    let named: Vec<&Planned> = plan.services.iter().filter(|p| mentions(&text, p)).collect();
    if let Error::Command { stderr, .. } = error {
        let job_failed = named.iter().find(|p| {
            stderr
                .lines()
                .any(|l| l.starts_with("Job for ") && mentions(l, p) && l.contains(" failed"))
        });
        if let Some(p) = job_failed.or_else(|| named.iter().find(|p| mentions(stderr, p))) {
            return Some(p);
        }
    }
    named.last().copied()
}

/// Whether `text` names the service: as a word, its unit or FMRI, or a path of its own.
fn mentions(text: &str, planned: &Planned) -> bool {
    let name = planned.service.name.as_str();
    let (unit, dir) = (format!("{name}.service"), format!("/{name}/"));
    text.split(|c: char| c.is_whitespace() || matches!(c, '\'' | '"' | '`' | ',' | ';'))
        .map(|word| word.trim_end_matches(['.', ':']))
        .any(|word| {
            word == name
                || word == unit
                || word.ends_with(&format!("/{unit}"))
                || word.contains(&dir)
                || planned.service.fmri.as_deref() == Some(word)
        })
}

/// Removes a file or directory tree if it exists.
fn remove_path(path: &Utf8Path) -> Result<()> {
    let result = match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    result.map_err(io("remove", path))
}

/// Removes a directory when dropped unless disarmed: a failed unpack leaves nothing behind.
struct RemoveOnDrop(Option<Utf8PathBuf>);

impl RemoveOnDrop {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = fs::remove_dir_all(path);
        }
    }
}

/// The overlay mirrors install paths: everything must be under `<root>/<service>/` (`root` is
/// the packages' prefix without its leading `/`, `opt/flotilla`), regular files and directories
/// only.
fn check_overlay(dir: &Utf8Path, root: &str) -> Result<()> {
    if !dir.is_dir() {
        return Err(Error::Overlay { path: dir.to_owned(), message: "not a directory".into() });
    }
    walk(dir, Utf8Path::new(""), &mut |rel, meta| {
        let bad = |message: &str| Error::Overlay { path: dir.join(rel), message: message.into() };
        if meta.file_type().is_symlink() {
            return Err(bad("a symbolic link; overlays hold regular files only"));
        }
        if !meta.is_dir() && !meta.is_file() {
            return Err(bad("not a regular file"));
        }
        let s = rel.as_str();
        let leads_to_root =
            root.strip_prefix(s).is_some_and(|rest| rest.is_empty() || rest.starts_with('/'));
        let inside = s.strip_prefix(root).is_some_and(|rest| rest.starts_with('/'));
        if !leads_to_root && !inside {
            return Err(bad(&format!("outside {root}/, the only tree the installer manages")));
        }
        let depth = Utf8Path::new(root).components().count();
        if meta.is_file() && rel.components().count() < depth + 2 {
            return Err(bad(&format!(
                "a file outside any service directory ({root}/<service>/...)"
            )));
        }
        Ok(())
    })
}

/// Copies the overlay into the release being unpacked, replacing package files it names.
///
/// Overlay files are per-server secrets and configuration, so each is written 0600 (through a
/// temporary name, then renamed) and owned by the user of the service whose directory it is in,
/// `owners[service]`; a directory the overlay adds is 0700 and owned the same way. Directories
/// the packages already have stay as they are. A service without an entry runs as root and
/// its files belong to the installer's user (root on servers).
fn place_overlay(
    overlay: &Utf8Path,
    release: &Utf8Path,
    owners: &BTreeMap<String, Owner>,
    root: &str,
) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    walk(overlay, Utf8Path::new(""), &mut |rel, meta| {
        let Ok(inner) = rel.strip_prefix(root) else { return Ok(()) };
        let Some(service) = inner.components().next() else { return Ok(()) };
        let owner = owners.get(service.as_str()).copied();
        let bad = |message: String| Error::Overlay { path: overlay.join(rel), message };
        if let Some(parent) = inner.parent() {
            ensure_dirs(release, parent).map_err(bad)?;
        }
        let target = release.join(inner);
        let existing = fs::symlink_metadata(&target).ok();
        if existing.as_ref().is_some_and(|m| m.file_type().is_symlink()) {
            return Err(bad(format!("would replace the symbolic link {target} of a package")));
        }
        if meta.is_dir() {
            match existing {
                Some(m) if m.is_dir() => return Ok(()),
                Some(_) => return Err(bad(format!("{target} exists and is not a directory"))),
                None => {}
            }
            fs::DirBuilder::new().mode(0o700).create(&target).map_err(io("create", &target))?;
            // The mode is set again because the umask may have narrowed it; 0700 is exact.
            fs::set_permissions(&target, fs::Permissions::from_mode(0o700))
                .map_err(io("set the mode of", &target))?;
            if let Some(owner) = owner {
                std::os::unix::fs::lchown(&target, Some(owner.uid), Some(owner.gid))
                    .map_err(io("change the owner of", &target))?;
            }
            return Ok(());
        }
        let contents = fs::read(overlay.join(rel)).map_err(io("read", overlay.join(rel)))?;
        write_atomic_owned(&target, &contents, 0o600, owner)
    })
}

/// The first regular file under `dir` in sorted order, for messages; `None` when there is none.
fn first_file(dir: &Utf8Path) -> Option<Utf8PathBuf> {
    let mut found = None;
    let _ = walk(dir, Utf8Path::new(""), &mut |rel, meta| {
        if found.is_none() && meta.is_file() {
            found = Some(dir.join(rel));
        }
        Ok(())
    });
    found
}

/// Calls `f` for every entry under `root` (relative path, metadata), parents before children,
/// in sorted order, without following symbolic links.
pub(crate) fn walk_tree(
    root: &Utf8Path,
    f: &mut dyn FnMut(&Utf8Path, &fs::Metadata) -> Result<()>,
) -> Result<()> {
    walk(root, Utf8Path::new(""), f)
}

/// [`walk_tree`] below `rel`.
fn walk(
    root: &Utf8Path,
    rel: &Utf8Path,
    f: &mut dyn FnMut(&Utf8Path, &fs::Metadata) -> Result<()>,
) -> Result<()> {
    let dir = root.join(rel);
    let mut names: Vec<String> = dir
        .read_dir_utf8()
        .map_err(io("list", &dir))?
        .map(|e| e.map(|e| e.file_name().to_owned()))
        .collect::<Result<_, _>>()
        .map_err(io("list", &dir))?;
    names.sort();
    for name in names {
        let rel = rel.join(name);
        let meta = fs::symlink_metadata(root.join(&rel)).map_err(io("inspect", root.join(&rel)))?;
        f(&rel, &meta)?;
        if meta.is_dir() {
            walk(root, &rel, f)?;
        }
    }
    Ok(())
}
