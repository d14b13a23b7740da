//! QMP's commands, replies and events as JSON, in one place: a message's
//! `execute` and `arguments` become a [`Command`] the controller executes,
//! its [`Reply`] and [`Event`]s become QEMU-shaped JSON. Nothing else in
//! cgsvmm builds QMP JSON.

use serde_json::{json, Map, Value};

use cgsvmm_migration::transport::{TransportError, Uri};

use crate::control::job::{MigrationInfo, MigrationStatus};
use crate::control::{CapabilityName, Command, Controller, CpuInfo, Event, ParamsChange, Reply};

use super::{event_message_at, no_args, only_args, QmpBackend, QmpError};

/// Every command, for `query-commands` (`qmp_capabilities` is the
/// session's own).
pub const COMMANDS: [&str; 20] = [
    "qmp_capabilities",
    "query-status",
    "stop",
    "cont",
    "quit",
    "query-cpus-fast",
    "query-version",
    "query-commands",
    "x-query-mirror",
    "system_powerdown",
    "query-sev-launch-measure",
    "migrate",
    "migrate_cancel",
    "query-migrate",
    "migrate-incoming",
    "x-query-ram-digest",
    "migrate-set-parameters",
    "query-migrate-parameters",
    "migrate-set-capabilities",
    "query-migrate-capabilities",
];

/// The command a QMP message names, with its arguments checked; `None`
/// for the commands QMP answers itself.
pub fn parse(command: &str, args: &Map<String, Value>) -> Result<Option<Command>, QmpError> {
    let plain = |c: Command| no_args(args).map(|()| Some(c));
    match command {
        "query-status" => plain(Command::QueryStatus),
        "stop" => plain(Command::Stop),
        "cont" => {
            only_args(args, &["x-force"])?;
            Ok(Some(Command::Cont {
                force: force_arg(args)?,
            }))
        }
        "quit" => plain(Command::Quit),
        "system_powerdown" => plain(Command::SystemPowerdown),
        "query-cpus-fast" => plain(Command::QueryCpus),
        "x-query-mirror" => plain(Command::QueryMirror),
        "query-sev-launch-measure" => plain(Command::QuerySevLaunchMeasure),
        "migrate_cancel" => plain(Command::MigrateCancel),
        "query-migrate" => plain(Command::QueryMigrate),
        "x-query-ram-digest" => plain(Command::QueryRamDigest),
        // QEMU's deprecated flags are accepted and mean nothing here.
        "migrate" => Ok(Some(Command::Migrate {
            uri: uri_arg(args, &["uri", "detach", "resume", "x-force"])?,
            force: force_arg(args)?,
        })),
        "migrate-incoming" => Ok(Some(Command::MigrateIncoming {
            uri: uri_arg(args, &["uri", "exit-on-error"])?,
        })),
        "query-migrate-parameters" => plain(Command::QueryMigrateParameters),
        "query-migrate-capabilities" => plain(Command::QueryMigrateCapabilities),
        "migrate-set-capabilities" => {
            caps_arg(args).map(|c| Some(Command::MigrateSetCapabilities(c)))
        }
        "migrate-set-parameters" => {
            params_arg(args).map(|c| Some(Command::MigrateSetParameters(c)))
        }
        "query-version" | "query-commands" => no_args(args).map(|()| None),
        _ => Err(QmpError::not_found(format!(
            "The command {command} has not been found"
        ))),
    }
}

/// `x-force` (cgsvmm's: go ahead after a migration whose outcome is
/// unknown), false when absent.
fn force_arg(args: &Map<String, Value>) -> Result<bool, QmpError> {
    args.get("x-force")
        .map_or(Ok(false), |v| boolean("x-force", v))
}

/// Argument `name`'s value `v`, which must be a boolean.
fn boolean(name: &str, v: &Value) -> Result<bool, QmpError> {
    v.as_bool().ok_or_else(|| {
        QmpError::generic(format!(
            "Invalid parameter type for '{name}', expected: boolean"
        ))
    })
}

/// The `uri` argument; every other argument must be one of `allowed`.
fn uri_arg(args: &Map<String, Value>, allowed: &[&str]) -> Result<Uri, QmpError> {
    only_args(args, allowed)?;
    match args.get("uri") {
        Some(Value::String(u)) => u
            .parse()
            .map_err(|e: TransportError| QmpError::generic(e.to_string())),
        Some(_) => Err(QmpError::generic(
            "Invalid parameter type for 'uri', expected: string",
        )),
        None => Err(QmpError::generic("Parameter 'uri' is missing")),
    }
}

/// `migrate-set-capabilities`' `capabilities`: [{"capability", "state"}].
fn caps_arg(args: &Map<String, Value>) -> Result<Vec<(CapabilityName, bool)>, QmpError> {
    only_args(args, &["capabilities"])?;
    let list = args
        .get("capabilities")
        .and_then(Value::as_array)
        .ok_or_else(|| QmpError::generic("Parameter 'capabilities' is missing or not a list"))?;
    list.iter()
        .map(|c| match (c["capability"].as_str(), c["state"].as_bool()) {
            (Some(name), Some(state)) => Ok((CapabilityName::from(name), state)),
            _ => Err(QmpError::generic(
                "Each capability is {\"capability\": NAME, \"state\": true|false}",
            )),
        })
        .collect()
}

/// `migrate-set-parameters`' arguments: QEMU's names where QEMU has them.
fn params_arg(args: &Map<String, Value>) -> Result<ParamsChange, QmpError> {
    let mut change = ParamsChange::default();
    for (k, v) in args {
        if k == "x-auto-converge" {
            change.auto_converge = Some(boolean(k, v)?);
            continue;
        }
        let n = v.as_u64().ok_or_else(|| {
            QmpError::generic(format!(
                "Invalid parameter type for '{k}', expected: integer"
            ))
        })?;
        match k.as_str() {
            "downtime-limit" => change.downtime_limit_ms = Some(n),
            "max-bandwidth" => change.max_bandwidth = Some(n),
            "x-helpers" => change.helpers = Some(n),
            "x-batch" => change.batch = Some(n),
            _ => return Err(QmpError::generic(format!("Parameter '{k}' is unexpected"))),
        }
    }
    Ok(change)
}

/// A reply's `return` value.
pub fn reply_json(reply: Reply) -> Value {
    match reply {
        Reply::Done => json!({}),
        Reply::Status(state) => json!({
            "status": state.name(),
            "running": state == crate::control::RunState::Running,
            "singlestep": false,
        }),
        Reply::Cpus(cpus) => Value::Array(cpus.iter().map(cpu_json).collect()),
        Reply::Mirror(mirrors) => Value::Array(
            mirrors
                .iter()
                .map(|m| {
                    json!({"cpu-index": m.index, "payload": m.payload.name(), "counter": m.counter,
                           "probe": m.probe, "thread-id": m.thread_id, "fault": m.fault})
                })
                .collect(),
        ),
        Reply::SevMeasurement(m) => {
            json!({"data": crate::confidential::sev::encode_base64(&m)})
        }
        Reply::Migration(None) => json!({}),
        Reply::Migration(Some(info)) => migration_json(&info),
        Reply::RamDigest(digest) => json!({ "digest": digest }),
        Reply::MigrationParameters(p) => json!({
            "downtime-limit": p.downtime_limit.as_millis() as u64,
            "max-bandwidth": p.max_bandwidth,
            "x-helpers": p.helpers,
            "x-batch": p.batch,
            "x-auto-converge": p.auto_converge,
        }),
        Reply::Capabilities(caps) => Value::Array(
            caps.iter()
                .map(|(c, state)| json!({"capability": c.name(), "state": state}))
                .collect(),
        ),
    }
}

fn cpu_json(c: &CpuInfo) -> Value {
    json!({
        "cpu-index": c.index,
        "qom-path": format!("/machine/unattached/device[{}]", c.index),
        "thread-id": c.thread_id,
        "target": "x86_64",
        "props": {"socket-id": c.index, "core-id": 0, "thread-id": 0},
    })
}

/// `query-migrate`'s answer: QEMU's names, plus a `confidential` object.
pub fn migration_json(info: &MigrationInfo) -> Value {
    let secs = info.total_ms.max(1) as f64 / 1000.0;
    let pages = info.private_pages + info.shared_pages;
    let mut v = json!({
        "status": info.status.name(),
        "total-time": info.total_ms,
        "setup-time": info.setup_ms,
        "ram": {
            "transferred": info.transferred,
            "remaining": info.remaining,
            "total": info.total,
            "mbps": info.transferred as f64 * 8.0 / 1e6 / secs,
            "pages-per-second": (pages as f64 / secs) as u64,
            "normal": pages,
            "normal-bytes": pages * 4096,
        },
        "confidential": {
            "private-pages": info.private_pages,
            "shared-pages": info.shared_pages,
            "helpers": info.helpers,
        },
    });
    if let Some(d) = info.downtime_ms {
        v["downtime"] = json!(d);
        v["confidential"]["downtime-private-pages"] = json!(info.downtime_private_pages);
    }
    if info.rounds > 0 {
        v["ram"]["dirty-sync-count"] = json!(info.rounds);
        v["ram"]["dirty-pages-rate"] = json!(info.dirty_pages_rate);
        // While it runs only, as QEMU reports them.
        if info.status == MigrationStatus::Active {
            if info.throttle_percent > 0 {
                v["cpu-throttle-percentage"] = json!(info.throttle_percent);
            }
            v["expected-downtime"] = json!(info.expected_downtime_ms.min(u64::from(u32::MAX)));
        }
    }
    if let Some(e) = &info.error {
        v["error-desc"] = json!(e);
    }
    v
}

/// An event as a QMP event message.
pub fn event_json(event: &Event, at: std::time::SystemTime) -> Value {
    match event {
        Event::Stop => event_message_at("STOP", json!({}), at),
        Event::Resume => event_message_at("RESUME", json!({}), at),
        Event::Migration(status) => {
            event_message_at("MIGRATION", json!({"status": status.name()}), at)
        }
    }
}

impl QmpBackend for Controller {
    fn execute(&mut self, command: &str, args: &Map<String, Value>) -> Result<Value, QmpError> {
        match parse(command, args)? {
            Some(c) => self.execute(c).map(reply_json).map_err(|e| QmpError {
                class: e.qmp_class(),
                desc: e.to_string(),
            }),
            None if command == "query-version" => Ok(super::greeting()["QMP"]["version"].clone()),
            None => Ok(Value::Array(
                COMMANDS.iter().map(|c| json!({ "name": c })).collect(),
            )),
        }
    }

    fn take_events(&mut self) -> Vec<Value> {
        Controller::take_events(self)
            .iter()
            .map(|(e, at)| event_json(e, *at))
            .collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::control::RunState;

    fn args(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn every_listed_command_parses_and_nothing_else_does() {
        for c in COMMANDS.iter().filter(|c| **c != "qmp_capabilities") {
            let a = if matches!(*c, "migrate" | "migrate-incoming") {
                args(json!({"uri": "unix:/tmp/x"}))
            } else if *c == "migrate-set-capabilities" {
                args(json!({"capabilities": [{"capability": "auto-converge", "state": false}]}))
            } else {
                Map::new()
            };
            assert!(parse(c, &a).is_ok(), "{c}");
        }
        assert_eq!(
            parse("nope", &Map::new()).unwrap_err().class,
            "CommandNotFound"
        );
        assert!(parse("stop", &args(json!({"x": 1}))).is_err());
        assert_eq!(
            parse("migrate", &args(json!({"uri": "tcp:h:1", "detach": true}))).unwrap(),
            Some(Command::Migrate {
                uri: Uri::Tcp("h:1".into()),
                force: false,
            })
        );
        assert_eq!(
            parse("cont", &args(json!({"x-force": true}))).unwrap(),
            Some(Command::Cont { force: true })
        );
        assert_eq!(
            parse("cont", &Map::new()).unwrap(),
            Some(Command::Cont { force: false })
        );
        assert!(parse("cont", &args(json!({"x-force": 1}))).is_err());
        assert!(parse("cont", &args(json!({"force": true}))).is_err());
        for (bad, want) in [
            (json!({}), "missing"),
            (json!({"uri": 1}), "expected: string"),
            (json!({"uri": "tcp:h"}), "HOST:PORT"),
            (
                json!({"uri": "unix:/x", "blk": true}),
                "'blk' is unexpected",
            ),
        ] {
            let e = parse("migrate", &args(bad.clone())).unwrap_err();
            assert!(e.desc.contains(want), "{bad}: {}", e.desc);
        }
    }

    #[test]
    fn replies_and_events_have_qemus_shape() {
        let v = reply_json(Reply::Status(RunState::PostMigrate));
        assert_eq!(v["status"], "postmigrate");
        assert_eq!(v["running"], false);
        let info = MigrationInfo {
            status: MigrationStatus::Completed,
            total_ms: 500,
            setup_ms: 1,
            downtime_ms: Some(499),
            transferred: 125_000_000,
            remaining: 0,
            total: 256 << 20,
            private_pages: 3,
            shared_pages: 1,
            helpers: 2,
            error: None,
            rounds: 3,
            dirty_pages_rate: 1000,
            expected_downtime_ms: 20,
            downtime_private_pages: 2,
            throttle_percent: 0,
        };
        let v = migration_json(&info);
        assert_eq!(v["status"], "completed");
        assert_eq!(v["downtime"], 499);
        assert_eq!(v["ram"]["mbps"], 2000.0);
        assert_eq!(v["confidential"]["private-pages"], 3);
        assert_eq!(v["confidential"]["downtime-private-pages"], 2);
        assert_eq!(v["ram"]["dirty-sync-count"], 3);
        assert!(v.get("expected-downtime").is_none(), "only while it runs");
        let change = params_arg(&args(json!({"downtime-limit": 10, "x-batch": 64}))).unwrap();
        assert_eq!(change.downtime_limit_ms, Some(10));
        assert_eq!(change.batch, Some(64));
        assert!(params_arg(&args(json!({"downtime-limit": -1}))).is_err());
        assert!(params_arg(&args(json!({"announce-max": 1}))).is_err());
        let change = params_arg(&args(json!({"x-auto-converge": false}))).unwrap();
        assert_eq!(change.auto_converge, Some(false));
        assert!(params_arg(&args(json!({"x-auto-converge": 1}))).is_err());
        assert!(v.get("error-desc").is_none());
        let e = event_json(
            &Event::Migration(MigrationStatus::Failed),
            std::time::SystemTime::now(),
        );
        assert_eq!(e["event"], "MIGRATION");
        assert_eq!(e["data"]["status"], "failed");
        assert_eq!(reply_json(Reply::Migration(None)), json!({}));
    }
}
