//! The QMP-compatible control socket: protocol and server.
//!
//! Speaks the QEMU Machine Protocol (QEMU docs/interop/qmp-spec.rst) over a
//! Unix socket so existing QMP clients drive cgsvmm unchanged. This module
//! owns the wire protocol (greeting, capabilities negotiation, JSON framing,
//! `id` echo, error classes, events with timestamps) and the sockets; what
//! each command does is the [`QmpBackend`]'s business (`control.rs`).
//!
//! ```text
//! client                                  cgsvmm
//!  |  <-------- {"QMP": {"version": ..., "capabilities": []}}
//!  |  {"execute": "qmp_capabilities"} ---->
//!  |  <-------- {"return": {}}
//!  |  {"execute": "stop", "id": 1} ------->   pause main vCPUs
//!  |  <-------- {"event": "STOP", "data": {}, "timestamp": {...}}
//!  |  <-------- {"return": {}, "id": 1}
//! ```
//!
//! Input is a stream of JSON objects (no framing needed); one message may
//! not exceed [`MAX_MESSAGE`] bytes. Malformed input gets a `GenericError`
//! and the connection stays usable.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use serde_json::{json, Map, Value};

/// Largest JSON message accepted.
pub const MAX_MESSAGE: usize = 64 * 1024;
/// How long a write to a client may block before the client is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// What the loop watches on a client socket.
const CLIENT_EVENTS: EventSet = EventSet::IN
    .union(EventSet::HANG_UP)
    .union(EventSet::READ_HANG_UP);
/// The QEMU version we report: QMP clients check the protocol, not this.
const QEMU_VERSION: (u32, u32, u32) = (9, 2, 0);

/// A QMP error: a class QEMU defines and a human description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpError {
    /// `GenericError`, `CommandNotFound`, ...
    pub class: &'static str,
    /// What went wrong.
    pub desc: String,
}

impl QmpError {
    /// A `GenericError`.
    pub fn generic(desc: impl Into<String>) -> Self {
        Self {
            class: "GenericError",
            desc: desc.into(),
        }
    }

    /// A `CommandNotFound` error.
    pub fn not_found(desc: impl Into<String>) -> Self {
        Self {
            class: "CommandNotFound",
            desc: desc.into(),
        }
    }
}

/// Executes commands and produces asynchronous events.
pub trait QmpBackend: Send {
    /// Runs `command` with `args`; returns the `return` value.
    fn execute(&mut self, command: &str, args: &Map<String, Value>) -> Result<Value, QmpError>;
    /// Events raised since the last call, as (name, data).
    fn take_events(&mut self) -> Vec<(String, Value)>;
}

/// Rejects any argument: for commands that take none.
pub fn no_args(args: &Map<String, Value>) -> Result<(), QmpError> {
    match args.keys().next() {
        Some(k) => Err(QmpError::generic(format!("Parameter '{k}' is unexpected"))),
        None => Ok(()),
    }
}

/// The greeting sent when a client connects.
pub fn greeting() -> Value {
    let (major, minor, micro) = QEMU_VERSION;
    json!({"QMP": {
        "version": {"qemu": {"major": major, "minor": minor, "micro": micro},
                    "package": concat!("cgsvmm ", env!("CARGO_PKG_VERSION"))},
        "capabilities": []
    }})
}

/// An event message with the current time.
pub fn event_message(name: &str, data: Value) -> Value {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    json!({"event": name, "data": data,
           "timestamp": {"seconds": now.as_secs(), "microseconds": now.subsec_micros()}})
}

fn error_message(e: QmpError, id: Option<Value>) -> Value {
    let mut v = json!({"error": {"class": e.class, "desc": e.desc}});
    if let Some(id) = id {
        v["id"] = id;
    }
    v
}

/// One client's protocol state.
#[derive(Default)]
pub struct Session {
    negotiated: bool,
    input: Vec<u8>,
}

impl Session {
    /// Whether the client finished capabilities negotiation (gets events).
    pub fn negotiated(&self) -> bool {
        self.negotiated
    }

    /// Takes bytes from the client and returns the replies to send.
    pub fn feed(&mut self, bytes: &[u8], backend: &mut dyn QmpBackend) -> Vec<Value> {
        self.input.extend_from_slice(bytes);
        let mut replies = Vec::new();
        loop {
            let start = self
                .input
                .iter()
                .position(|b| !b.is_ascii_whitespace())
                .unwrap_or(self.input.len());
            self.input.drain(..start);
            if self.input.is_empty() {
                break;
            }
            let mut stream = serde_json::Deserializer::from_slice(&self.input).into_iter::<Value>();
            match stream.next() {
                Some(Ok(value)) => {
                    let used = stream.byte_offset();
                    self.input.drain(..used);
                    replies.push(self.dispatch(value, backend));
                }
                Some(Err(e)) if e.is_eof() => {
                    if self.input.len() > MAX_MESSAGE {
                        self.input.clear();
                        replies.push(error_message(
                            QmpError::generic(format!("JSON message exceeds {MAX_MESSAGE} bytes")),
                            None,
                        ));
                    }
                    break;
                }
                Some(Err(e)) => {
                    // Resynchronise at the next line, or drop what we have.
                    let skip = self
                        .input
                        .iter()
                        .position(|&b| b == b'\n')
                        .map_or(self.input.len(), |p| p + 1);
                    self.input.drain(..skip);
                    replies.push(error_message(
                        QmpError::generic(format!("JSON parse error, {e}")),
                        None,
                    ));
                }
                None => break,
            }
        }
        replies
    }

    fn dispatch(&mut self, value: Value, backend: &mut dyn QmpBackend) -> Value {
        let Value::Object(mut msg) = value else {
            return error_message(QmpError::generic("QMP input must be a JSON object"), None);
        };
        let id = msg.remove("id");
        let result = self.check_and_run(msg, backend);
        let mut reply = match result {
            Ok(ret) => json!({"return": ret}),
            Err(e) => return error_message(e, id),
        };
        if let Some(id) = id {
            reply["id"] = id;
        }
        reply
    }

    fn check_and_run(
        &mut self,
        mut msg: Map<String, Value>,
        backend: &mut dyn QmpBackend,
    ) -> Result<Value, QmpError> {
        let command = match msg.remove("execute") {
            Some(Value::String(c)) => c,
            Some(_) => {
                return Err(QmpError::generic(
                    "QMP input member 'execute' must be a string",
                ))
            }
            None => return Err(QmpError::generic("QMP input lacks member 'execute'")),
        };
        let args = match msg.remove("arguments") {
            Some(Value::Object(a)) => a,
            None => Map::new(),
            Some(_) => {
                return Err(QmpError::generic(
                    "QMP input member 'arguments' must be an object",
                ))
            }
        };
        if let Some(k) = msg.keys().next() {
            return Err(QmpError::generic(format!(
                "QMP input member '{k}' is unexpected"
            )));
        }
        if command == "qmp_capabilities" {
            if self.negotiated {
                return Err(QmpError::not_found(
                    "Capabilities negotiation is already complete, command ignored",
                ));
            }
            match args.get("enable") {
                None => {}
                Some(Value::Array(caps)) if caps.is_empty() => {}
                Some(Value::Array(caps)) => {
                    return Err(QmpError::generic(format!(
                        "Capability '{}' not available",
                        caps[0].as_str().unwrap_or("?")
                    )));
                }
                Some(_) => {
                    return Err(QmpError::generic(
                        "Invalid parameter type for 'enable', expected: array",
                    ))
                }
            }
            if let Some(k) = args.keys().find(|k| *k != "enable") {
                return Err(QmpError::generic(format!("Parameter '{k}' is unexpected")));
            }
            self.negotiated = true;
            return Ok(json!({}));
        }
        if !self.negotiated {
            return Err(QmpError::not_found(
                "Expecting capabilities negotiation with 'qmp_capabilities'",
            ));
        }
        backend.execute(&command, &args)
    }
}

/// Errors of starting the server.
#[derive(Debug, thiserror::Error)]
pub enum QmpServerError {
    /// Something other than a stale socket is at the path.
    #[error("QMP path {0} exists and is not a socket")]
    PathInUse(PathBuf),
    /// Socket creation failed.
    #[error("Cannot listen on QMP socket {0}: {1}")]
    Listen(PathBuf, std::io::Error),
}

struct Connection {
    stream: UnixStream,
    session: Session,
    /// Closed or unwritable; removed from the event loop at the end of
    /// the current dispatch.
    dead: bool,
}

/// The listening socket and its clients; an event-loop subscriber.
pub struct QmpServer {
    path: PathBuf,
    listener: UnixListener,
    connections: HashMap<i32, Connection>,
    backend: std::sync::Arc<std::sync::Mutex<dyn QmpBackend>>,
}

impl QmpServer {
    /// Listens at `path` (owner-only permissions), replacing a stale socket.
    pub fn bind(
        path: &Path,
        backend: std::sync::Arc<std::sync::Mutex<dyn QmpBackend>>,
    ) -> Result<Self, QmpServerError> {
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(QmpServerError::PathInUse(path.to_path_buf()));
            }
            let _ = std::fs::remove_file(path);
        }
        let fail = |e| QmpServerError::Listen(path.to_path_buf(), e);
        // Create the socket with no group/other access from the start.
        // SAFETY: umask only changes this process's file creation mask.
        let old = unsafe { libc::umask(0o077) };
        let bound = UnixListener::bind(path);
        // SAFETY: as above; restores the previous mask.
        unsafe { libc::umask(old) };
        let listener = bound.map_err(fail)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(fail)?;
        listener.set_nonblocking(true).map_err(fail)?;
        Ok(Self {
            path: path.to_path_buf(),
            listener,
            connections: HashMap::new(),
            backend,
        })
    }

    fn send(conn: &mut Connection, msg: &Value) -> bool {
        let mut line = msg.to_string();
        line.push_str("\r\n");
        conn.stream.write_all(line.as_bytes()).is_ok()
    }

    /// Sends an event to every negotiated client.
    pub fn broadcast(&mut self, name: &str, data: Value) {
        let msg = event_message(name, data);
        for c in self
            .connections
            .values_mut()
            .filter(|c| c.session.negotiated() && !c.dead)
        {
            c.dead = !Self::send(c, &msg);
        }
    }

    fn flush_events(&mut self) {
        let events = self
            .backend
            .lock()
            .expect("backend lock poisoned")
            .take_events();
        for (name, data) in events {
            self.broadcast(&name, data);
        }
    }

    fn accept(&mut self, ops: &mut EventOps) {
        while let Ok((stream, _)) = self.listener.accept() {
            // Reads happen only when epoll says so; writes block at most
            // WRITE_TIMEOUT, so a client that stops reading is dropped.
            if stream.set_nonblocking(false).is_err()
                || stream.set_write_timeout(Some(WRITE_TIMEOUT)).is_err()
            {
                continue;
            }
            let mut conn = Connection {
                stream,
                session: Session::default(),
                dead: false,
            };
            if !Self::send(&mut conn, &greeting()) {
                continue;
            }
            let fd = conn.stream.as_raw_fd();
            if let Err(e) = ops.add(Events::new(&conn.stream, CLIENT_EVENTS)) {
                log::warn!("QMP: cannot watch client: {e:?}");
                continue;
            }
            self.connections.insert(fd, conn);
        }
    }

    fn serve(&mut self, fd: i32) {
        let Some(conn) = self.connections.get_mut(&fd) else {
            return;
        };
        let mut buf = [0u8; 4096];
        let replies = match conn.stream.read(&mut buf) {
            Ok(0) | Err(_) => None,
            Ok(n) => {
                let mut backend = self.backend.lock().expect("backend lock poisoned");
                Some(conn.session.feed(&buf[..n], &mut *backend))
            }
        };
        // Events a command raised go out before its reply, as in QEMU.
        self.flush_events();
        if let Some(conn) = self.connections.get_mut(&fd) {
            conn.dead = !replies.is_some_and(|r| r.iter().all(|r| Self::send(conn, r)));
        }
    }

    fn reap(&mut self, ops: &mut EventOps) {
        self.connections.retain(|_, c| {
            if c.dead {
                let _ = ops.remove(Events::new(&c.stream, CLIENT_EVENTS));
            }
            !c.dead
        });
    }
}

impl Drop for QmpServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl MutEventSubscriber for QmpServer {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.listener, EventSet::IN)) {
            log::error!("QMP: cannot watch the listening socket: {e:?}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.listener.as_raw_fd() {
            self.accept(ops);
        } else {
            self.serve(events.fd());
        }
        self.flush_events();
        self.reap(ops);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Fake {
        calls: Vec<String>,
        events: Vec<(String, Value)>,
    }

    impl QmpBackend for Fake {
        fn execute(&mut self, command: &str, args: &Map<String, Value>) -> Result<Value, QmpError> {
            self.calls.push(command.to_string());
            match command {
                "stop" => {
                    no_args(args)?;
                    self.events.push(("STOP".into(), json!({})));
                    Ok(json!({}))
                }
                "query-status" => {
                    Ok(json!({"status": "running", "running": true, "singlestep": false}))
                }
                _ => Err(QmpError::not_found(format!(
                    "The command {command} has not been found"
                ))),
            }
        }
        fn take_events(&mut self) -> Vec<(String, Value)> {
            std::mem::take(&mut self.events)
        }
    }

    fn feed(s: &mut Session, b: &mut Fake, input: &str) -> Vec<Value> {
        s.feed(input.as_bytes(), b)
    }

    #[test]
    fn negotiation_is_required_first_and_only_once() {
        let (mut s, mut b) = (Session::default(), Fake::default());
        let r = feed(&mut s, &mut b, r#"{"execute": "query-status"}"#);
        assert_eq!(r[0]["error"]["class"], "CommandNotFound");
        assert!(b.calls.is_empty());
        let r = feed(
            &mut s,
            &mut b,
            r#"{"execute": "qmp_capabilities", "id": "a"}"#,
        );
        assert_eq!(r[0], json!({"return": {}, "id": "a"}));
        let r = feed(&mut s, &mut b, r#"{"execute": "qmp_capabilities"}"#);
        assert_eq!(r[0]["error"]["class"], "CommandNotFound");
        let r = feed(&mut s, &mut b, r#"{"execute": "query-status", "id": 7}"#);
        assert_eq!(r[0]["return"]["status"], "running");
        assert_eq!(r[0]["id"], 7);
    }

    #[test]
    fn framing_split_and_batched_input() {
        let (mut s, mut b) = (Session::default(), Fake::default());
        assert!(feed(&mut s, &mut b, r#"{"execute": "qmp_cap"#).is_empty());
        let r = feed(
            &mut s,
            &mut b,
            "abilities\"}\n{\"execute\":\"stop\"} {\"execute\":\"query-status\"}",
        );
        assert_eq!(r.len(), 3);
        assert_eq!(r[1], json!({"return": {}}));
        assert_eq!(b.take_events().len(), 1);
    }

    #[test]
    fn malformed_input_gets_errors_and_the_session_survives() {
        let (mut s, mut b) = (Session::default(), Fake::default());
        feed(&mut s, &mut b, r#"{"execute":"qmp_capabilities"}"#);
        let cases = [
            ("{\"execute\": }\n", "JSON parse error"),
            ("[1, 2]", "must be a JSON object"),
            (r#"{"arguments": {}}"#, "lacks member 'execute'"),
            (r#"{"execute": 5}"#, "must be a string"),
            (
                r#"{"execute": "stop", "arguments": []}"#,
                "must be an object",
            ),
            (
                r#"{"execute": "stop", "arguments": {"force": true}}"#,
                "Parameter 'force' is unexpected",
            ),
            (
                r#"{"execute": "stop", "bogus": 1}"#,
                "'bogus' is unexpected",
            ),
            (r#"{"execute": "no-such-command"}"#, "has not been found"),
            ("\u{7f}garbage\n", "JSON parse error"),
        ];
        for (input, want) in cases {
            let r = feed(&mut s, &mut b, input);
            assert_eq!(r.len(), 1, "{input}: {r:?}");
            let desc = r[0]["error"]["desc"].as_str().unwrap_or_default();
            assert!(desc.contains(want), "{input}: got {desc:?}");
        }
        let r = feed(&mut s, &mut b, r#"{"execute": "query-status"}"#);
        assert_eq!(r[0]["return"]["running"], true);
    }

    #[test]
    fn oversized_messages_are_dropped() {
        let (mut s, mut b) = (Session::default(), Fake::default());
        let mut big = String::from("{\"execute\": \"");
        big.push_str(&"x".repeat(MAX_MESSAGE + 10));
        let r = feed(&mut s, &mut b, &big);
        assert_eq!(r.len(), 1);
        assert!(r[0]["error"]["desc"].as_str().unwrap().contains("exceeds"));
        let r = feed(&mut s, &mut b, r#"{"execute":"qmp_capabilities"}"#);
        assert_eq!(r[0], json!({"return": {}}));
    }

    #[test]
    fn capabilities_arguments() {
        let (mut s, mut b) = (Session::default(), Fake::default());
        let r = feed(
            &mut s,
            &mut b,
            r#"{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}"#,
        );
        assert!(r[0]["error"]["desc"].as_str().unwrap().contains("oob"));
        let r = feed(
            &mut s,
            &mut b,
            r#"{"execute":"qmp_capabilities","arguments":{"enable":[]}}"#,
        );
        assert_eq!(r[0], json!({"return": {}}));
    }

    #[test]
    fn greeting_and_event_shapes() {
        let g = greeting();
        assert!(g["QMP"]["version"]["qemu"]["major"].is_u64());
        assert!(g["QMP"]["capabilities"].is_array());
        let e = event_message("STOP", json!({}));
        assert_eq!(e["event"], "STOP");
        assert!(e["timestamp"]["seconds"].as_u64().unwrap() > 1_600_000_000);
    }
}
