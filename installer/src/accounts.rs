//! The users services run as: read from their definitions, looked up on the host, and made the
//! owners of the service's overlay files.
//!
//! A service declares its user where its service manager reads it: `User=` and `Group=` in the
//! `[Service]` section of a systemd unit, or the start method's `<method_credential>` in an SMF
//! manifest. A service that declares none runs as root, and so do its files. A declared user
//! or group that the host does not have is an error before anything is activated: a secret
//! silently left to root:root would make the service fail later, far from the cause.

use std::ffi::{CStr, CString};

pub use flotilla_contracts::atomic::Owner;
pub use flotilla_contracts::services::{unit_user, ServiceUser};

use crate::manager::ManagerKind;
use crate::runner::Cmd;

/// A user account as the host's user database knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Account {
    pub uid: u32,
    /// The primary group.
    pub gid: u32,
}

/// Where users and groups are looked up. The installer uses [`HostAccounts`]; tests give a
/// table of their own so that they do not depend on the accounts of the machine.
pub trait Accounts: Send + Sync {
    /// The user named `name`, `Ok(None)` when there is none.
    fn user(&self, name: &str) -> Result<Option<Account>, String>;
    /// The id of the group named `name`, `Ok(None)` when there is none.
    fn group(&self, name: &str) -> Result<Option<u32>, String>;
}

/// The host's user database through the C library (`getpwnam_r`, `getgrnam_r`), which is what
/// systemd and SMF consult when they start the service, so both agree on who exists (NSS
/// sources included, not only /etc/passwd).
#[derive(Debug, Clone, Copy, Default)]
pub struct HostAccounts;

impl Accounts for HostAccounts {
    fn user(&self, name: &str) -> Result<Option<Account>, String> {
        let cname = c_name(name)?;
        with_buffer(|buf| {
            // SAFETY: `passwd` is plain data that getpwnam_r fills; `buf` outlives the call
            // and its length is passed; `result` is either null or points at `passwd`.
            let mut passwd: libc::passwd = unsafe { std::mem::zeroed() };
            let mut result: *mut libc::passwd = std::ptr::null_mut();
            let rc = unsafe {
                libc::getpwnam_r(
                    cname.as_ptr(),
                    &mut passwd,
                    buf.as_mut_ptr(),
                    buf.len(),
                    &mut result,
                )
            };
            (rc, (!result.is_null()).then_some(Account { uid: passwd.pw_uid, gid: passwd.pw_gid }))
        })
        .map_err(|e| format!("look up user {name}: {e}"))
    }

    fn group(&self, name: &str) -> Result<Option<u32>, String> {
        let cname = c_name(name)?;
        with_buffer(|buf| {
            // SAFETY: as in `user`, for getgrnam_r and `group`.
            let mut group: libc::group = unsafe { std::mem::zeroed() };
            let mut result: *mut libc::group = std::ptr::null_mut();
            let rc = unsafe {
                libc::getgrnam_r(
                    cname.as_ptr(),
                    &mut group,
                    buf.as_mut_ptr(),
                    buf.len(),
                    &mut result,
                )
            };
            (rc, (!result.is_null()).then_some(group.gr_gid))
        })
        .map_err(|e| format!("look up group {name}: {e}"))
    }
}

fn c_name(name: &str) -> Result<CString, String> {
    CString::new(name).map_err(|_| format!("the name {name:?} holds a NUL byte"))
}

/// Calls `f` with a buffer for the `_r` lookups, growing it while the C library says it is too
/// small (ERANGE). "Not found" is a null result with status 0, or one of the statuses POSIX
/// lists for an unknown name (ENOENT, ESRCH, EBADF, EPERM), which some C libraries return.
fn with_buffer<T>(
    mut f: impl FnMut(&mut [libc::c_char]) -> (libc::c_int, Option<T>),
) -> Result<Option<T>, String> {
    let mut size = 1024;
    loop {
        let mut buf: Vec<libc::c_char> = vec![0; size];
        let (rc, found) = f(&mut buf);
        match rc {
            0 => return Ok(found),
            libc::ERANGE if size < 1 << 20 => size *= 4,
            libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM => return Ok(None),
            rc => {
                // SAFETY: strerror returns a pointer to a static, NUL-terminated message.
                let message = unsafe { CStr::from_ptr(libc::strerror(rc)) };
                return Err(message.to_string_lossy().into_owned());
            }
        }
    }
}

/// Resolves a service's declared user on this host. The error says which user or group is
/// missing and where it was declared; [`create_hint`] says how to create it.
pub fn resolve(
    accounts: &dyn Accounts,
    declared: &ServiceUser,
    declared_in: &str,
) -> Result<Owner, String> {
    let Some(account) = accounts.user(&declared.user)? else {
        return Err(format!(
            "user {} (declared in {declared_in}) does not exist on this host",
            declared.user
        ));
    };
    let gid = match &declared.group {
        None => account.gid,
        Some(group) => match accounts.group(group)? {
            Some(gid) => gid,
            None => {
                return Err(format!(
                    "group {group} (declared in {declared_in}) does not exist on this host"
                ))
            }
        },
    };
    Ok(Owner { uid: account.uid, gid })
}

/// How to create a service user that is missing: the installer option that creates every
/// declared user, or the command that creates this one here.
pub fn create_hint(user: &str) -> String {
    format!(
        "install with --create-users (fling's deploys do), or create it on this host with \
         `useradd --system --user-group --no-create-home --home-dir /nonexistent --shell \
         /usr/sbin/nologin {user}`"
    )
}

/// The commands that create what `declared` names and `accounts` lacks, in order: the group
/// first (a declared `Group=` other than the user's own, or the user's own group on SMF),
/// then the user. A user without a declared group gets a group of its own name. Linux:
/// `useradd --system --user-group` with no home and no login shell. illumos (SMF): its
/// `useradd` has no `--system` or `--user-group`, so `groupadd` comes first, then
/// `useradd -g`; its shell that refuses logins is `/usr/bin/false`. Empty when everything
/// exists. The names were checked by the definition parser (portable user names only) and
/// travel as arguments, never through a shell.
pub fn create_commands(
    accounts: &dyn Accounts,
    manager: ManagerKind,
    declared: &ServiceUser,
) -> Result<Vec<Cmd>, String> {
    let user = declared.user.as_str();
    let mut commands = Vec::new();
    let group = match (&declared.group, manager) {
        (Some(group), _) => Some(group.as_str()),
        (None, ManagerKind::Smf) => Some(user),
        (None, ManagerKind::Systemd) => None,
    };
    if let Some(group) = group {
        if accounts.group(group)?.is_none() {
            let args: &[&str] = match manager {
                ManagerKind::Systemd => &["--system", group],
                ManagerKind::Smf => &[group],
            };
            commands.push(Cmd::new(format!("create group {group}"), "groupadd", args));
        }
    }
    if accounts.user(user)?.is_none() {
        let args: Vec<&str> = match manager {
            ManagerKind::Systemd => {
                let mut args = vec!["--system"];
                match group {
                    None => args.push("--user-group"),
                    Some(group) => args.extend(["--gid", group]),
                }
                args.extend([
                    "--no-create-home",
                    "--home-dir",
                    "/nonexistent",
                    "--shell",
                    "/usr/sbin/nologin",
                    user,
                ]);
                args
            }
            ManagerKind::Smf => {
                vec![
                    "-g",
                    group.unwrap_or(user),
                    "-d",
                    "/nonexistent",
                    "-s",
                    "/usr/bin/false",
                    user,
                ]
            }
        };
        commands.push(Cmd::new(format!("create user {user}"), "useradd", &args));
    }
    Ok(commands)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_lookups_find_root_and_refuse_unknown_names() {
        let root = HostAccounts.user("root").unwrap().expect("every host has root");
        assert_eq!(root, Account { uid: 0, gid: 0 });
        assert_eq!(HostAccounts.group("root").unwrap(), Some(0));
        let missing = format!("flotilla-none-{}", std::process::id());
        assert_eq!(HostAccounts.user(&missing).unwrap(), None);
        assert_eq!(HostAccounts.group(&missing).unwrap(), None);
        assert!(HostAccounts.user("a\0b").unwrap_err().contains("NUL"));
    }

    #[test]
    fn resolve_uses_the_primary_group_and_names_what_is_missing() {
        struct Table;
        impl Accounts for Table {
            fn user(&self, name: &str) -> Result<Option<Account>, String> {
                Ok((name == "svc").then_some(Account { uid: 900, gid: 901 }))
            }
            fn group(&self, name: &str) -> Result<Option<u32>, String> {
                Ok((name == "grp").then_some(902))
            }
        }
        let user =
            |u: &str, g: Option<&str>| ServiceUser { user: u.into(), group: g.map(Into::into) };
        assert_eq!(resolve(&Table, &user("svc", None), "x").unwrap(), Owner { uid: 900, gid: 901 });
        assert_eq!(
            resolve(&Table, &user("svc", Some("grp")), "x").unwrap(),
            Owner { uid: 900, gid: 902 }
        );
        let err = resolve(&Table, &user("nobody-here", None), "pkg/a.service").unwrap_err();
        assert_eq!(err, "user nobody-here (declared in pkg/a.service) does not exist on this host");
        let err = resolve(&Table, &user("svc", Some("nogrp")), "pkg/a.service").unwrap_err();
        assert_eq!(err, "group nogrp (declared in pkg/a.service) does not exist on this host");
        assert!(create_hint("svc").contains("--create-users"));
        assert!(create_hint("svc").ends_with("--shell /usr/sbin/nologin svc`"));
    }

    #[test]
    fn create_commands_make_what_is_missing_in_the_order_each_manager_needs() {
        struct Table;
        impl Accounts for Table {
            fn user(&self, name: &str) -> Result<Option<Account>, String> {
                Ok((name == "svc").then_some(Account { uid: 900, gid: 901 }))
            }
            fn group(&self, name: &str) -> Result<Option<u32>, String> {
                Ok((name == "grp").then_some(902))
            }
        }
        let user =
            |u: &str, g: Option<&str>| ServiceUser { user: u.into(), group: g.map(Into::into) };
        let lines = |manager, declared: &ServiceUser| -> Vec<String> {
            create_commands(&Table, manager, declared)
                .unwrap()
                .iter()
                .map(ToString::to_string)
                .collect()
        };
        assert!(lines(ManagerKind::Systemd, &user("svc", None)).is_empty());
        assert!(lines(ManagerKind::Systemd, &user("svc", Some("grp"))).is_empty());
        assert_eq!(
            lines(ManagerKind::Systemd, &user("new", None)),
            ["useradd --system --user-group --no-create-home --home-dir /nonexistent --shell \
              /usr/sbin/nologin new"]
        );
        assert_eq!(
            lines(ManagerKind::Systemd, &user("new", Some("newgrp"))),
            [
                "groupadd --system newgrp",
                "useradd --system --gid newgrp --no-create-home --home-dir /nonexistent \
                 --shell /usr/sbin/nologin new"
            ]
        );
        assert_eq!(
            lines(ManagerKind::Systemd, &user("new", Some("grp"))),
            ["useradd --system --gid grp --no-create-home --home-dir /nonexistent --shell \
              /usr/sbin/nologin new"]
        );
        assert_eq!(
            lines(ManagerKind::Smf, &user("new", None)),
            ["groupadd new", "useradd -g new -d /nonexistent -s /usr/bin/false new"]
        );
        // The user exists but its declared group does not: only the group is made.
        assert_eq!(lines(ManagerKind::Smf, &user("svc", Some("g2"))), ["groupadd g2"]);
    }
}
