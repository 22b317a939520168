//! What a deploy plan asks of a host and of the builder: `state` (the active release, its
//! packages and overlay files by digest) and `payload` (what the builder would send: the
//! release those packages and this overlay would become). Both are read-only and cheap: no
//! package is unpacked and only the overlay files and the installer itself are hashed.

use std::fs;

use camino::Utf8Path;
use flotilla_contracts::digests::{file_digest, DIGEST_LIST};
use flotilla_contracts::installer::{
    ActiveRelease, HostState, OverlayFile, PackageDigest, Payload, ReleaseService,
};

use crate::error::{io, Error, Result};
use crate::release::{release_id, tree_digest, Layout, PackageInfo, ReleaseInfo, Releases};
use crate::unpack::ArchiveKind;

/// The digest of the running installer binary: what a server holds, what the builder sends.
pub fn own_digest() -> Result<String> {
    let exe = std::env::current_exe()
        .map_err(|e| Error::State { path: "/proc/self/exe".into(), message: e.to_string() })?;
    let exe = camino::Utf8PathBuf::try_from(exe)
        .map_err(|e| Error::State { path: "/proc/self/exe".into(), message: e.to_string() })?;
    file_digest(&exe).map_err(io("read", &exe))
}

/// The state of the host at `layout`, answered by the installer whose digest is `installer`.
pub fn host_state(layout: &Layout, installer: String) -> Result<HostState> {
    let active = match layout.active()? {
        None => None,
        Some(id) => {
            let info = ReleaseInfo::read(&layout.release(&id))?;
            Some(ActiveRelease {
                id: info.id,
                packages: info.packages.iter().map(package_digest).collect(),
                overlay: info.overlay_files,
                services: info
                    .services
                    .iter()
                    .map(|s| ReleaseService { name: s.name.clone(), packages: s.packages.clone() })
                    .collect(),
            })
        }
    };
    Ok(HostState {
        installer,
        active,
        awaiting_confirmation: crate::confirm::pending(layout)?.map(|a| a.release),
    })
}

fn package_digest(p: &PackageInfo) -> PackageDigest {
    PackageDigest { name: p.name.clone(), file: p.file.clone(), digest: p.digest.clone() }
}

/// The packages `digests.b3` of `packages_dir` lists, as a release records them. The digests
/// are the list's: the installer verifies every archive against them before unpacking.
pub fn listed_packages(packages_dir: &Utf8Path) -> Result<Vec<PackageInfo>> {
    let list_path = packages_dir.join(DIGEST_LIST);
    let text = fs::read_to_string(&list_path).map_err(io("read digest list", &list_path))?;
    let listed = crate::digests::parse(&list_path, &text)?;
    Ok(listed
        .into_iter()
        .map(|(file, digest)| PackageInfo {
            name: ArchiveKind::from_file_name(&file)
                .map_or(file.clone(), |(_, stem)| stem.to_owned()),
            file,
            digest,
        })
        .collect())
}

/// Every regular file of an overlay tree, sorted by path, with the service whose directory
/// holds it: the first component under `root` (the packages' prefix without its leading `/`).
pub fn overlay_files(dir: &Utf8Path, root: &str) -> Result<Vec<OverlayFile>> {
    let mut files = Vec::new();
    crate::install::walk_tree(dir, &mut |rel, meta| {
        if !meta.is_file() {
            return Ok(());
        }
        let service = rel
            .strip_prefix(root)
            .ok()
            .and_then(|inner| inner.components().next())
            .map(|c| c.as_str().to_owned())
            .unwrap_or_default();
        let path = dir.join(rel);
        files.push(OverlayFile {
            path: rel.to_string(),
            service,
            digest: file_digest(&path).map_err(io("read", &path))?,
        });
        Ok(())
    })?;
    files.sort();
    Ok(files)
}

/// What installing `packages_dir` with `overlay` would make: the release id the installer
/// would compute, the packages and the overlay's files.
pub fn payload(
    packages_dir: &Utf8Path,
    overlay: Option<&Utf8Path>,
    root: &str,
    installer: String,
) -> Result<Payload> {
    let packages = listed_packages(packages_dir)?;
    let (tree, files) = match overlay {
        Some(dir) => (Some(tree_digest(dir)?), overlay_files(dir, root)?),
        None => (None, Vec::new()),
    };
    Ok(Payload {
        release: release_id(&packages, tree.as_deref()),
        installer,
        packages: packages.iter().map(package_digest).collect(),
        overlay: files,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_files_name_their_service_and_digest() {
        let dir = tempfile::tempdir().unwrap();
        let root = Utf8Path::from_path(dir.path()).unwrap();
        fs::create_dir_all(root.join("opt/acme/web/etc")).unwrap();
        fs::write(root.join("opt/acme/web/etc/node.toml"), "a = 1\n").unwrap();
        fs::create_dir_all(root.join("opt/acme/db")).unwrap();
        fs::write(root.join("opt/acme/db/key.pem"), "secret").unwrap();
        let files = overlay_files(root, "opt/acme").unwrap();
        let names: Vec<(&str, &str)> =
            files.iter().map(|f| (f.path.as_str(), f.service.as_str())).collect();
        assert_eq!(names, [("opt/acme/db/key.pem", "db"), ("opt/acme/web/etc/node.toml", "web")]);
        assert_eq!(files[0].digest, blake3::hash(b"secret").to_hex().to_string());
    }
}
