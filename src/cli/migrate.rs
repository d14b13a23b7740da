//! `cgsvmm migrate`: drives a running cgsvmm's migration over its QMP
//! socket as an operator would (`migrate-set-parameters`, `migrate`, then
//! `query-migrate` ten times a second), with a progress bar (round,
//! throughput, what is left) and a one-screen summary at the end.

use std::path::{Path, PathBuf};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{json, Map, Value};

use super::qmp::{QmpClientError, Session};

/// `cgsvmm migrate`'s arguments.
#[derive(clap::Args)]
pub struct MigrateArgs {
    /// The source's QMP socket: unix:PATH, as given to `run --qmp`.
    #[arg(long, value_parser = super::parse_qmp_socket)]
    qmp: PathBuf,
    /// Where the guest goes: tcp:HOST:PORT or unix:PATH (a target started
    /// with --incoming), or file:PATH (a snapshot).
    #[arg(value_parser = parse_migration_uri)]
    uri: String,
    /// Longest pause the guest should see, in milliseconds (QEMU's
    /// downtime-limit; default 300).
    #[arg(long = "downtime-limit")]
    downtime_limit: Option<u64>,
    /// Bytes per second at most on the wire, with K/M/G for KiB/MiB/GiB
    /// (QEMU's max-bandwidth; 0, the default, for no limit).
    #[arg(long = "max-bandwidth", value_parser = parse_bandwidth)]
    max_bandwidth: Option<u64>,
    /// Migration helpers to use (default: all the VM has).
    #[arg(long)]
    helpers: Option<u64>,
    /// No progress bar (only the summary).
    #[arg(long = "no-progress")]
    no_progress: bool,
    /// Migrate even after a migration whose outcome is unknown (the source
    /// in `outcome-unknown`; QMP's `x-force`): only when you know the
    /// target of that migration does not run the guest.
    #[arg(long)]
    force: bool,
}

fn parse_bandwidth(s: &str) -> Result<u64, String> {
    let (digits, shift) = match s.as_bytes().last() {
        Some(b'K' | b'k') => (&s[..s.len() - 1], 10),
        Some(b'M' | b'm') => (&s[..s.len() - 1], 20),
        Some(b'G' | b'g') => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .ok_or_else(|| format!("expected bytes per second, e.g. 50000000 or 50M, got '{s}'"))
}

fn parse_migration_uri(s: &str) -> Result<String, String> {
    s.parse::<cgsvmm_migration::transport::Uri>()
        .map(|u| u.to_string())
        .map_err(|e| e.to_string())
}

/// `cgsvmm migrate`: the migration with its progress, then the summary.
pub fn exec(a: MigrateArgs) -> std::process::ExitCode {
    let request = MigrateRequest {
        uri: a.uri.clone(),
        downtime_limit_ms: a.downtime_limit,
        max_bandwidth: a.max_bandwidth,
        helpers: a.helpers,
        progress: !a.no_progress,
        force: a.force,
    };
    match migrate(&a.qmp, &request) {
        Ok(summary) => {
            print!("{}", summary.render(&a.uri));
            std::process::ExitCode::SUCCESS
        }
        Err(e) => super::report(&e),
    }
}

/// How often the progress is asked for.
const POLL: Duration = Duration::from_millis(100);
/// How long one QMP answer may take.
const QMP_TIMEOUT: Duration = Duration::from_secs(10);

/// What to migrate where, and how.
#[derive(Debug, Clone, Default)]
pub struct MigrateRequest {
    /// Where the VM goes (tcp:, unix:, file:).
    pub uri: String,
    /// `downtime-limit`, milliseconds.
    pub downtime_limit_ms: Option<u64>,
    /// `max-bandwidth`, bytes per second.
    pub max_bandwidth: Option<u64>,
    /// `x-helpers`.
    pub helpers: Option<u64>,
    /// Draw the progress bar (else only the summary).
    pub progress: bool,
    /// `x-force`: also from `outcome-unknown`.
    pub force: bool,
}

/// Errors of `cgsvmm migrate`.
#[derive(Debug, thiserror::Error)]
pub enum MigrateCmdError {
    /// QMP failed or refused.
    #[error(transparent)]
    Qmp(#[from] QmpClientError),
    /// The migration failed (its error-desc).
    #[error("migration {status}: {why}")]
    Failed {
        /// failed or cancelled.
        status: String,
        /// Why.
        why: String,
    },
}

/// The end of a migration, as `query-migrate` reported it.
#[derive(Debug, Clone)]
pub struct Summary {
    /// `query-migrate`'s last answer.
    pub info: Value,
    /// The downtime limit in force (ms).
    pub limit: Option<u64>,
}

impl Summary {
    fn u(&self, path: &[&str]) -> u64 {
        path.iter()
            .fold(&self.info, |v, k| &v[*k])
            .as_u64()
            .unwrap_or(0)
    }

    /// The summary, one screen.
    pub fn render(&self, uri: &str) -> String {
        let mbps = self.info["ram"]["mbps"].as_f64().unwrap_or(0.0);
        let down = self.u(&["downtime"]);
        let limit = self.limit.map_or(String::new(), |l| {
            let over = if down > l { ", over it" } else { "" };
            format!(" (limit {l} ms{over})")
        });
        let helpers = self.u(&["confidential", "helpers"]);
        format!(
            "migrated to {uri}: {status}\n\
             \x20 total time    {total} ms\n\
             \x20 downtime      {down} ms{limit}, {sealed} pages sealed by the helpers while paused\n\
             \x20 rounds        {rounds} (the first sends every page){throttle}\n\
             \x20 throughput    {mbps:.0} Mbit/s ({mbs:.0} MB/s on average), {gib:.2} GiB sent\n\
             \x20 pages sent    {private} private (through {helpers} helper{s}), {shared} shared\n",
            status = self.info["status"].as_str().unwrap_or("?"),
            total = self.u(&["total-time"]),
            s = if helpers == 1 { "" } else { "s" },
            sealed = self.u(&["confidential", "downtime-private-pages"]),
            rounds = self.u(&["ram", "dirty-sync-count"]) + 1,
            throttle = match self.u(&["cpu-throttle-percentage"]) {
                0 => String::new(),
                t => format!(", the guest slowed to {}% of its speed at most", 100 - t),
            },
            mbs = mbps / 8.0,
            gib = self.u(&["ram", "transferred"]) as f64 / (1u64 << 30) as f64,
            private = self.u(&["confidential", "private-pages"]),
            shared = self.u(&["confidential", "shared-pages"]),
        )
    }
}

/// Migrates the VM behind `qmp` to `request.uri` and waits for the end.
pub fn migrate(qmp: &Path, request: &MigrateRequest) -> Result<Summary, MigrateCmdError> {
    let mut session = Session::connect(qmp, QMP_TIMEOUT)?;
    let mut params = Map::new();
    for (name, value) in [
        ("downtime-limit", request.downtime_limit_ms),
        ("max-bandwidth", request.max_bandwidth),
        ("x-helpers", request.helpers),
    ] {
        if let Some(v) = value {
            params.insert(name.into(), json!(v));
        }
    }
    if !params.is_empty() {
        session.call("migrate-set-parameters", Some(params))?;
    }
    let limit = session.call("query-migrate-parameters", None)?["downtime-limit"].as_u64();
    let mut args = Map::new();
    args.insert("uri".into(), json!(request.uri));
    if request.force {
        args.insert("x-force".into(), json!(true));
    }
    session.call("migrate", Some(args))?;

    let bar = ProgressBar::new(1);
    if request.progress {
        eprintln!(
            "(Ctrl-C stops watching; the migration goes on: cancel it with \
             `cgsvmm qmp unix:{} migrate_cancel`)",
            qmp.display()
        );
    } else {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    bar.set_style(
        ProgressStyle::with_template("{spinner} {elapsed} [{bar:20}] {msg}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    let info = loop {
        let info = session.call("query-migrate", None)?;
        let status = info["status"].as_str().unwrap_or("setup").to_string();
        let total = info["ram"]["total"].as_u64().unwrap_or(0);
        let remaining = info["ram"]["remaining"].as_u64().unwrap_or(total);
        bar.set_length(total.max(1));
        bar.set_position(total.saturating_sub(remaining));
        bar.set_message(format!(
            "round {} {:.0} MB/s {} MiB left{}",
            info["ram"]["dirty-sync-count"].as_u64().unwrap_or(0) + 1,
            info["ram"]["mbps"].as_f64().unwrap_or(0.0) / 8.0,
            remaining >> 20,
            info["expected-downtime"]
                .as_u64()
                .map_or(String::new(), |d| format!(" pause~{d}ms")),
        ));
        if matches!(status.as_str(), "completed" | "failed" | "cancelled") {
            break info;
        }
        bar.tick();
        std::thread::sleep(POLL);
    };
    bar.finish_and_clear();
    match info["status"].as_str() {
        Some("completed") => Ok(Summary { info, limit }),
        status => Err(MigrateCmdError::Failed {
            status: status.unwrap_or("?").into(),
            why: info["error-desc"]
                .as_str()
                .unwrap_or("cancelled")
                .to_string(),
        }),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_has_every_number() {
        let s = Summary {
            info: json!({
                "status": "completed", "total-time": 4475, "downtime": 508,
                "ram": {"mbps": 2398.0, "transferred": 1_000_000_000u64, "dirty-sync-count": 4},
                "confidential": {"private-pages": 241676, "shared-pages": 81920, "helpers": 2,
                                 "downtime-private-pages": 48131}
            }),
            limit: Some(300),
        };
        let text = s.render("tcp:h:1");
        for want in [
            "completed",
            "4475 ms",
            "508 ms (limit 300 ms, over it)",
            "48131 pages sealed",
            "rounds        5",
            "2398 Mbit/s (300 MB/s on average)",
            "241676 private (through 2 helpers), 81920 shared",
        ] {
            assert!(text.contains(want), "{want:?} in\n{text}");
        }
    }
}
