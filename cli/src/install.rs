//! `cargo xtask install | rollback | status | deactivate | uninstall | clean-releases`: the
//! installer run on this machine, through the same library the `flotilla-installer` binary
//! uses on servers. Installing under the default prefix needs root.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use installer::runner::SystemRunner;
use installer::{Config, Installer, ManagerKind};

use crate::cli::{HostArgs, InstallArgs, RollbackArgs, StatusArgs, UninstallArgs};
use crate::Context;

pub fn install(ctx: &Context, args: InstallArgs) -> anyhow::Result<()> {
    let packages = ctx.user_path(&args.packages);
    let overlay = args.overlay.map(|o| ctx.user_path(&o));
    let outcome = installer(ctx, &args.host, args.create_users)?
        .install(&packages, overlay.as_deref())
        .with_context(|| format!("install the packages of {packages}"))?;
    println!("{outcome}");
    Ok(())
}

pub fn rollback(ctx: &Context, args: RollbackArgs) -> anyhow::Result<()> {
    let outcome = installer(ctx, &args.host, false)?.rollback(args.to.as_deref())?;
    println!("{outcome}");
    Ok(())
}

pub fn status(ctx: &Context, args: StatusArgs) -> anyhow::Result<()> {
    let status = installer(ctx, &args.host, false)?.status()?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status).context("write the status as JSON")?);
    } else {
        println!("{status}");
    }
    Ok(())
}

pub fn deactivate(ctx: &Context, args: HostArgs) -> anyhow::Result<()> {
    let services = installer(ctx, &args, false)?.deactivate()?;
    println!("stopped and disabled: {}", services.join(", "));
    Ok(())
}

pub fn uninstall(ctx: &Context, args: UninstallArgs) -> anyhow::Result<()> {
    let services = installer(ctx, &args.host, false)?.uninstall(args.purge)?;
    println!("uninstalled; removed services: {}", services.join(", "));
    Ok(())
}

pub fn clean_releases(ctx: &Context, args: HostArgs) -> anyhow::Result<()> {
    let removed = installer(ctx, &args, false)?.clean()?;
    println!("removed releases: {}", removed.join(", "));
    Ok(())
}

fn installer(ctx: &Context, args: &HostArgs, create_users: bool) -> anyhow::Result<Installer> {
    let manager: ManagerKind = match &args.service_manager {
        Some(kind) => kind.parse().map_err(anyhow::Error::msg)?,
        None => installer::detect("/".into())?,
    };
    let prefix = installer::Prefix::new(ctx.user_path(&args.prefix).as_str())
        .map_err(|e| anyhow::anyhow!("--prefix: {e}"))?;
    let config = Config {
        packages_prefix: args.packages_prefix.clone().unwrap_or_else(|| prefix.clone()),
        prefix: prefix.as_path().to_owned(),
        unit_dir: ctx.user_path(&args.unit_dir),
        manager,
        keep: args.keep,
        lock_wait: Duration::from_secs(args.lock_wait),
        create_users,
        confirm_timeout: None,
    };
    Ok(Installer::new(config, Arc::new(SystemRunner)).with_log(|line| eprintln!("{line}")))
}
