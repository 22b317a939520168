//! The flags of the builder's `cargo xtask check|package|dot` that `fling build` forwards, and
//! the outputs directory `deploy install` pushes from, as validated types.
//!
//! Everything fling sends to the builder is checked here, on the client: a mistyped flag or a
//! bad value fails before any connection is made, instead of on the builder after the deploy
//! lock was taken. What is sent is rendered back from these types ([`Build::words`]), one
//! flag per word, and quoted by `quote` like every other remote word.

use std::{fmt, num::NonZeroUsize, str::FromStr};

pub use flotilla_package::manifest::{PackageName, TargetName};
pub use flotilla_package::RetryDuration;

/// The outputs directory when none is given: `cargo xtask package`'s own default.
pub const DEFAULT_ARTIFACTS: &str = "out";

/// Directories under `out/` that fling fills itself, never an outputs directory: `fling
/// overlay` replaces `out/overlay/` as a whole, `out/overlay-state/` holds the builder-only
/// identities, and each push assembles its view in `out/.fling-push/` and removes it.
const FLING_DIRS: &[&str] = &["out/overlay", "out/overlay-state", "out/.fling-push"];

/// The builder's outputs directory (`cargo xtask package --out`), relative to its workspace:
/// `out` or a directory below it.
///
/// Below `out/` because `fling sync` mirrors the client's workspace into the builder's with
/// `--delete` and leaves only `out/` and `target/` alone: outputs anywhere else would be
/// deleted by the next sync. The characters are the portable ones of a path on another
/// machine, and the path is normalized (no `.`, `..` or `//`), so it cannot leave the
/// workspace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Artifacts(String);

impl Artifacts {
    pub fn new(dir: &str) -> Result<Artifacts, String> {
        let trimmed = dir.strip_suffix('/').unwrap_or(dir);
        if !crate::config::remote_path_chars_ok(trimmed) {
            return Err(format!(
                "{dir:?}: use only ASCII letters, digits and / . _ - + @ , = % (it is a path on \
                 the builder)"
            ));
        }
        if trimmed.starts_with('/') {
            return Err(format!(
                "{dir:?} is absolute: name a directory of the builder's workspace, relative to \
                 it (out, or one below it)"
            ));
        }
        flotilla_contracts::layout::check_plain_path(trimmed)?;
        // `check_plain_path` reads the path as a file system would, which skips a `.` in the
        // middle: refuse it by its words too.
        if trimmed.split('/').any(|part| part == "." || part == "..") {
            return Err(format!("the path {dir:?} holds `.` or `..`: write it normalized"));
        }
        let under = |base: &str| {
            trimmed == base || trimmed.strip_prefix(base).is_some_and(|r| r.starts_with('/'))
        };
        if !under(DEFAULT_ARTIFACTS) {
            return Err(format!(
                "{dir:?} is not out or a directory below it: `fling sync` mirrors the workspace \
                 to the builder with --delete and leaves only out/ and target/ alone, so \
                 packages anywhere else would be deleted by the next sync"
            ));
        }
        if let Some(own) = FLING_DIRS.iter().find(|d| under(d)) {
            return Err(format!("{dir:?}: {own}/ is fling's own, which it replaces as a whole"));
        }
        Ok(Artifacts(trimmed.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for Artifacts {
    fn default() -> Artifacts {
        Artifacts(DEFAULT_ARTIFACTS.to_owned())
    }
}

impl FromStr for Artifacts {
    type Err = String;
    fn from_str(s: &str) -> Result<Artifacts, String> {
        Artifacts::new(s)
    }
}

impl fmt::Display for Artifacts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What every packaging command of the builder takes: the target and the outputs directory.
/// `None` leaves the builder's own choice (its active target, `out`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ManifestFlags {
    pub target: Option<TargetName>,
    pub artifacts: Option<Artifacts>,
}

/// `cargo xtask package`'s own flags; `None` and `false` leave the builder's defaults.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PackageFlags {
    /// Only these packages (and what they are composed of).
    pub only: Vec<PackageName>,
    /// Rebuild every output, whatever the cache says.
    pub disable_cache: bool,
    /// Do not run cargo: package the binaries already built.
    pub no_rebuild: bool,
    /// Print the builder's packaging plan and write nothing (the builder's `--dry-run`, not
    /// fling's, which runs nothing at all).
    pub plan_only: bool,
    pub jobs: Option<NonZeroUsize>,
    pub retry_count: Option<u32>,
    pub retry_duration: Option<RetryDuration>,
}

/// What `fling build` runs on the builder, with the flags it forwards.
#[derive(Debug, Clone, PartialEq)]
pub enum Build {
    /// `cargo xtask check`: the manifest, and `cargo check` of what is packaged.
    Check(ManifestFlags),
    /// `cargo xtask package`, then the installer and the overlay generators.
    Package(ManifestFlags, PackageFlags),
    /// `cargo xtask dot`: the package graph in graphviz's format, on standard output.
    Dot(ManifestFlags),
}

impl Build {
    /// The `cargo xtask` command: `check`, `package` or `dot`.
    pub fn command(&self) -> &'static str {
        match self {
            Build::Check(_) => "check",
            Build::Package(..) => "package",
            Build::Dot(_) => "dot",
        }
    }

    pub fn manifest(&self) -> &ManifestFlags {
        match self {
            Build::Check(m) | Build::Package(m, _) | Build::Dot(m) => m,
        }
    }

    /// The flags after `cargo xtask <command>`, one flag or value per word, unquoted; the
    /// caller quotes them.
    pub fn words(&self) -> Vec<String> {
        let mut words = Vec::new();
        let manifest = self.manifest();
        if let Some(target) = &manifest.target {
            words.extend(["--target".to_owned(), target.to_string()]);
        }
        if let Some(artifacts) = &manifest.artifacts {
            words.extend(["--out".to_owned(), artifacts.to_string()]);
        }
        if let Build::Package(_, p) = self {
            for name in &p.only {
                words.extend(["--only".to_owned(), name.to_string()]);
            }
            for (on, flag) in [
                (p.disable_cache, "--disable-cache"),
                (p.no_rebuild, "--no-rebuild"),
                (p.plan_only, "--dry-run"),
            ] {
                if on {
                    words.push(flag.to_owned());
                }
            }
            if let Some(jobs) = p.jobs {
                words.extend(["--jobs".to_owned(), jobs.to_string()]);
            }
            if let Some(count) = p.retry_count {
                words.extend(["--retry-count".to_owned(), count.to_string()]);
            }
            if let Some(duration) = p.retry_duration {
                words.extend(["--retry-duration".to_owned(), duration.seconds().to_string()]);
            }
        }
        words
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn artifacts_are_out_or_below_it_normalized_and_portable() {
        for good in ["out", "out/", "out/dev", "out/a/b-1.2_x", "out/@v=1,%"] {
            let a = Artifacts::new(good).unwrap_or_else(|e| panic!("{good}: {e}"));
            assert_eq!(a.as_str(), good.trim_end_matches('/'));
            // The push's globs (`<artifacts>/*.tar.gz`) rely on the word needing no quotes.
            assert_eq!(crate::quote::quote(a.as_str()), a.as_str());
        }
        for (bad, why) in [
            ("", "empty"),
            ("/srv/out", "is absolute"),
            ("out/../src", "`.` or `..`"),
            ("out/./x", "`.` or `..`"),
            ("..", "`.` or `..`"),
            ("out//x", "empty component"),
            ("dist", "deleted by the next sync"),
            ("outside", "deleted by the next sync"),
            ("target/x", "deleted by the next sync"),
            ("out/overlay", "fling's own"),
            ("out/overlay-state/x", "fling's own"),
            ("out/.fling-push", "fling's own"),
            ("out/a b", "use only ASCII"),
            ("out/$(reboot)", "use only ASCII"),
            ("out/x\n", "use only ASCII"),
            ("out/é", "use only ASCII"),
        ] {
            let err = Artifacts::new(bad).expect_err(bad);
            assert!(err.contains(why), "{bad:?}: {err}");
        }
        assert_eq!(Artifacts::default().as_str(), "out");
    }

    #[test]
    fn every_flag_is_rendered_as_the_builders_cargo_xtask_takes_it() {
        let manifest = ManifestFlags {
            target: Some(TargetName::new("dev").unwrap()),
            artifacts: Some(Artifacts::new("out/dev").unwrap()),
        };
        let package = PackageFlags {
            only: vec![PackageName::new("a").unwrap(), PackageName::new("b-c").unwrap()],
            disable_cache: true,
            no_rebuild: true,
            plan_only: true,
            jobs: NonZeroUsize::new(3),
            retry_count: Some(0),
            retry_duration: Some(RetryDuration::new(1.5).unwrap()),
        };
        assert_eq!(
            Build::Package(manifest.clone(), package).words().join(" "),
            "--target dev --out out/dev --only a --only b-c --disable-cache --no-rebuild \
             --dry-run --jobs 3 --retry-count 0 --retry-duration 1.5"
        );
        assert_eq!(Build::Dot(manifest).words().join(" "), "--target dev --out out/dev");
        assert!(Build::Check(ManifestFlags::default()).words().is_empty());
        assert!(Build::Package(ManifestFlags::default(), PackageFlags::default())
            .words()
            .is_empty());
    }
}
