//! `cgsvmm demo`: a newcomer's first live migration on this machine. It
//! starts a source and a target (this same binary, the embedded dirtier,
//! a fresh random transport key), lets the guest run, migrates it live with
//! the progress bar, lets the guest check its memory on the target, and
//! prints the summary and the verdict. Success only if the guest goes on
//! verifying on the target.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::migrate::{self as migrate_cmd, MigrateRequest};
use super::qmp::Session;

/// `cgsvmm demo`'s arguments.
#[derive(clap::Args)]
pub struct DemoArgs {
    /// Guest RAM.
    #[arg(long, default_value = "256M", value_parser = cgsvmm_vmm::config::parse_memory)]
    memory: u64,
    /// Guest vCPUs (1-8).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=8))]
    cpus: u8,
    /// Migration helpers on each side (1-4).
    #[arg(long = "mirror-cpus", default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=4))]
    mirror_cpus: u8,
    /// Longest pause the guest should see, in milliseconds.
    #[arg(long = "downtime-limit", default_value_t = 300)]
    downtime_limit: u64,
    /// Seconds the guest verifies itself on the target (1-60).
    #[arg(long = "verify-seconds", default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=60))]
    verify_seconds: u64,
    /// No progress bar.
    #[arg(long = "no-progress")]
    no_progress: bool,
}

/// `cgsvmm demo`: the same checks `run` makes on the memory size, before
/// anything starts; then the demo and its verdict.
pub fn exec(a: DemoArgs) -> std::process::ExitCode {
    let probe = cgsvmm_vmm::VmmConfig {
        memory: a.memory,
        ..Default::default()
    };
    if let Err(e) = probe.validate() {
        super::report(&e);
        return std::process::ExitCode::from(2);
    }
    let config = DemoConfig {
        memory: format!("{}M", a.memory >> 20),
        cpus: usize::from(a.cpus),
        helpers: usize::from(a.mirror_cpus),
        downtime_limit_ms: a.downtime_limit,
        verify_for: Duration::from_secs(a.verify_seconds),
        progress: !a.no_progress,
    };
    match run(&config) {
        Ok(report) => {
            print!("{report}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => super::report(&e),
    }
}

/// How the demo runs.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    /// Guest RAM, as `--memory` takes it.
    pub memory: String,
    /// Guest vCPUs.
    pub cpus: usize,
    /// Helpers on each side.
    pub helpers: usize,
    /// `downtime-limit`, ms.
    pub downtime_limit_ms: u64,
    /// How long the guest verifies itself on the target.
    pub verify_for: Duration,
    /// Draw the progress bar.
    pub progress: bool,
}

/// Why the demo did not show a verified migration.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// Setting up (files, processes).
    #[error("{0}: {1}")]
    Setup(String, std::io::Error),
    /// A VMM did not come up or stopped.
    #[error("{0}")]
    Vmm(String),
    /// The migration failed.
    #[error(transparent)]
    Migrate(#[from] migrate_cmd::MigrateCmdError),
    /// The guest did not verify on the target.
    #[error("the guest did not verify on the target: {0}")]
    NotVerified(String),
}

/// A child cgsvmm, killed if the demo ends early.
struct Vmm {
    child: Child,
    qmp: PathBuf,
    serial: PathBuf,
    name: &'static str,
}

impl Vmm {
    fn stop(&mut self) {
        if let Ok(mut s) = Session::connect(&self.qmp, Duration::from_secs(2)) {
            let _ = s.call("quit", None);
        }
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    fn stderr(&mut self) -> String {
        std::fs::read_to_string(self.serial.with_extension("err")).unwrap_or_default()
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The highest pass vCPU `vcpu` printed in `log`.
fn last_pass(log: &str, vcpu: usize) -> Option<u64> {
    cgsvmm_vmm::machine::lab::last_pass(log.lines(), vcpu)
}

fn random_bytes<const N: usize>() -> Result<[u8; N], DemoError> {
    let mut bytes = [0u8; N];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| DemoError::Setup("reading /dev/urandom".into(), e))?;
    Ok(bytes)
}

fn free_port() -> Result<u16, DemoError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| DemoError::Setup("finding a free port".into(), e))
}

fn spawn(
    name: &'static str,
    dir: &Path,
    config: &DemoConfig,
    key: &Path,
    extra: &[String],
) -> Result<Vmm, DemoError> {
    let exe = std::env::current_exe().map_err(|e| DemoError::Setup("finding cgsvmm".into(), e))?;
    let qmp = dir.join(format!("{name}.sock"));
    let serial = dir.join(format!("{name}.log"));
    let child = Command::new(exe)
        .arg("run")
        .args(["--memory", &config.memory])
        .args(["--cpus", &config.cpus.to_string()])
        .args(["--mirror-cpus", &config.helpers.to_string()])
        .arg("--transport-key-file")
        .arg(key)
        .arg("--qmp")
        .arg(format!("unix:{}", qmp.display()))
        .arg("--serial")
        .arg(format!("file:{}", serial.display()))
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        // A file, not a pipe: nobody reads a pipe while the VMM runs, and a
        // chatty RUST_LOG would fill it and stop the VMM.
        .stderr(
            std::fs::File::create(dir.join(format!("{name}.err")))
                .map_err(|e| DemoError::Setup(format!("{name}.err"), e))?,
        )
        .spawn()
        .map_err(|e| DemoError::Setup(format!("starting the {name}"), e))?;
    let mut vmm = Vmm {
        child,
        qmp,
        serial,
        name,
    };
    // Up when its QMP socket answers.
    let start = Instant::now();
    loop {
        if Session::connect(&vmm.qmp, Duration::from_secs(2)).is_ok() {
            return Ok(vmm);
        }
        if let Ok(Some(status)) = vmm.child.try_wait() {
            let err = vmm.stderr();
            return Err(DemoError::Vmm(format!(
                "the {} exited ({status}): {}",
                vmm.name,
                err.trim()
            )));
        }
        if start.elapsed() > Duration::from_secs(20) {
            return Err(DemoError::Vmm(format!("the {} did not come up", vmm.name)));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs the demo; its report (summary and verdict).
pub fn run(config: &DemoConfig) -> Result<String, DemoError> {
    use std::os::unix::fs::DirBuilderExt;
    // Owner-only and unguessable: it holds the transport key.
    let dir =
        std::env::temp_dir().join(format!("cgsvmm-demo-{}", hex::encode(random_bytes::<8>()?)));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(|e| DemoError::Setup(dir.display().to_string(), e))?;
    let result = demo_in(&dir, config);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn demo_in(dir: &Path, config: &DemoConfig) -> Result<String, DemoError> {
    let key = dir.join("transport.key");
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let secret = hex::encode(random_bytes::<32>()?);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&key)
            .and_then(|mut f| f.write_all(secret.as_bytes()))
            .map_err(|e| DemoError::Setup(key.display().to_string(), e))?;
    }
    let uri = format!("tcp:127.0.0.1:{}", free_port()?);
    println!(
        "cgsvmm demo: a {} guest on {} vCPUs (the dirtier: it writes and checks every page, \
         a quarter of them declared shared) migrates live to a second cgsvmm on this machine, \
         every private page through {} migration helpers a side.",
        config.memory, config.cpus, config.helpers
    );
    let mut source = spawn("source", dir, config, &key, &[])?;
    let mut target = spawn(
        "target",
        dir,
        config,
        &key,
        &["--incoming".into(), uri.clone()],
    )?;

    // Let the guest make a few passes first.
    let start = Instant::now();
    while (0..config.cpus).any(|v| last_pass(&source.log(), v).unwrap_or(0) < 3) {
        if start.elapsed() > Duration::from_secs(30) {
            return Err(DemoError::Vmm(
                "the guest made no progress on the source".into(),
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let request = MigrateRequest {
        uri: uri.clone(),
        downtime_limit_ms: Some(config.downtime_limit_ms),
        progress: config.progress,
        ..Default::default()
    };
    let summary = migrate_cmd::migrate(&source.qmp, &request)?;
    let before: Vec<u64> = (0..config.cpus)
        .map(|v| last_pass(&source.log(), v).unwrap_or(0))
        .collect();
    source.stop();

    // The guest goes on on the target, checking every page it wrote.
    std::thread::sleep(config.verify_for);
    let log = target.log();
    let running = Session::connect(&target.qmp, Duration::from_secs(5))
        .and_then(|mut s| s.call("query-status", None))
        .map(|v| v["status"].as_str().unwrap_or("?").to_string())
        .unwrap_or_else(|e| format!("unreachable ({e})"));
    target.stop();
    if log.contains("MEMORY-ERROR") {
        let line = log
            .lines()
            .find(|l| l.contains("MEMORY-ERROR"))
            .unwrap_or("");
        return Err(DemoError::NotVerified(line.to_string()));
    }
    if running != "running" {
        return Err(DemoError::NotVerified(format!("the target is {running}")));
    }
    let mut verdict = String::new();
    for (v, before) in before.iter().enumerate() {
        let after = last_pass(&log, v).unwrap_or(0);
        if after <= *before {
            return Err(DemoError::NotVerified(format!(
                "vCPU {v} stopped at pass {before} on the source and did not go on"
            )));
        }
        verdict.push_str(&format!(
            "  vcpu {v}: pass {before} on the source, pass {after} on the target\n"
        ));
    }
    Ok(format!(
        "{}verified: the guest checked its memory for {:?} on the target, no MEMORY-ERROR\n{verdict}",
        summary.render(&uri),
        config.verify_for
    ))
}
