//! A small QMP client: [`call`] (`cgsvmm qmp`) connects, negotiates, runs
//! one command and returns its reply; a [`Session`] (`cgsvmm migrate`,
//! `cgsvmm demo`) runs many over one connection. Events that arrive
//! meanwhile are skipped.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

/// How long the socket may take to appear (a VMM just started).
const CONNECT_WAIT: Duration = Duration::from_secs(2);

/// `cgsvmm qmp`'s arguments.
#[derive(clap::Args)]
pub struct QmpArgs {
    /// The VMM's QMP socket: unix:PATH, as given to `run --qmp` (or just
    /// the path).
    #[arg(value_parser = super::parse_qmp_socket)]
    socket: PathBuf,
    /// The command, e.g. query-status, stop, cont, quit.
    command: String,
    /// Its arguments, as a JSON object.
    #[arg(value_parser = parse_json_object)]
    arguments: Option<serde_json::Map<String, serde_json::Value>>,
    /// Seconds to wait for the socket to appear (at most 2) and for the
    /// reply (0.05 to 60).
    #[arg(
        long,
        default_value = "10",
        allow_negative_numbers = true,
        value_parser = cgsvmm_vmm::config::parse_seconds
    )]
    timeout: std::time::Duration,
}

fn parse_json_object(s: &str) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    match serde_json::from_str(s) {
        Ok(serde_json::Value::Object(m)) => Ok(m),
        Ok(_) => Err("arguments must be a JSON object, e.g. '{\"name\": \"value\"}'".into()),
        Err(e) => Err(format!("not JSON ({e})")),
    }
}

/// `cgsvmm qmp`: one command, its reply pretty-printed.
pub fn exec(a: QmpArgs) -> std::process::ExitCode {
    match call(&a.socket, &a.command, a.arguments, a.timeout) {
        Ok(reply) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&reply).unwrap_or_else(|_| reply.to_string())
            );
            std::process::ExitCode::SUCCESS
        }
        Err(e) => super::report(&e),
    }
}

/// Errors of a QMP call.
#[derive(Debug, thiserror::Error)]
pub enum QmpClientError {
    /// No socket to talk to.
    #[error("Cannot connect to {0}: {1}")]
    Connect(PathBuf, std::io::Error),
    /// Reading or writing the socket failed (or timed out).
    #[error("QMP socket: {0}")]
    Io(#[from] std::io::Error),
    /// The server said something that is not QMP.
    #[error("Not a QMP reply: {0}")]
    Protocol(String),
    /// The server refused the command.
    #[error("{desc} ({class})")]
    Refused {
        /// QMP error class.
        class: String,
        /// Its description.
        desc: String,
    },
}

/// Runs `command` with `arguments` on the QMP socket at `path`; returns
/// the `return` value. Each read waits at most `timeout`.
pub fn call(
    path: &Path,
    command: &str,
    arguments: Option<Map<String, Value>>,
    timeout: Duration,
) -> Result<Value, QmpClientError> {
    Session::connect(path, timeout)?.call(command, arguments)
}

/// One negotiated QMP connection.
pub struct Session {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Session {
    /// Connects (waiting briefly for the socket to appear) and negotiates;
    /// each read then waits at most `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, QmpClientError> {
        let stream = connect(path, timeout.min(CONNECT_WAIT))?;
        stream.set_read_timeout(Some(timeout))?;
        let writer = stream.try_clone()?;
        let mut reader = BufReader::new(stream);
        let greeting = read_message(&mut reader)?;
        if greeting.get("QMP").is_none() {
            return Err(QmpClientError::Protocol(greeting.to_string()));
        }
        let mut session = Self { reader, writer };
        session.call("qmp_capabilities", None)?;
        Ok(session)
    }

    /// Runs `command`; its `return` value.
    pub fn call(
        &mut self,
        command: &str,
        arguments: Option<Map<String, Value>>,
    ) -> Result<Value, QmpClientError> {
        let mut request = json!({"execute": command, "id": "cgsvmm-qmp"});
        if let Some(args) = arguments {
            request["arguments"] = Value::Object(args);
        }
        exchange(&mut self.reader, &mut self.writer, &request)
    }
}

fn connect(path: &Path, wait: Duration) -> Result<UnixStream, QmpClientError> {
    let start = Instant::now();
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e)
                if start.elapsed() < wait
                    && matches!(
                        e.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                    ) =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(QmpClientError::Connect(path.to_path_buf(), e)),
        }
    }
}

fn read_message(reader: &mut impl BufRead) -> Result<Value, QmpClientError> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(QmpClientError::Protocol(
            "the server closed the connection".into(),
        ));
    }
    serde_json::from_str(&line).map_err(|e| QmpClientError::Protocol(format!("{e}: {line}")))
}

/// Sends `request` and returns the `return` of its reply.
fn exchange(
    reader: &mut impl BufRead,
    writer: &mut impl Write,
    request: &Value,
) -> Result<Value, QmpClientError> {
    writer.write_all(format!("{request}\n").as_bytes())?;
    loop {
        let mut reply = read_message(reader)?;
        if reply.get("event").is_some() {
            continue;
        }
        if let Some(ret) = reply.get_mut("return") {
            return Ok(ret.take());
        }
        let error = &reply["error"];
        return match (error["class"].as_str(), error["desc"].as_str()) {
            (Some(class), Some(desc)) => Err(QmpClientError::Refused {
                class: class.into(),
                desc: desc.into(),
            }),
            _ => Err(QmpClientError::Protocol(reply.to_string())),
        };
    }
}
