//! The QMP-compatible control socket: protocol and server.
//!
//! Speaks the QEMU Machine Protocol (QEMU docs/interop/qmp-spec.rst) over a
//! Unix socket so existing QMP clients drive cgsvmm unchanged. This module
//! owns the wire protocol (greeting, capabilities negotiation, JSON framing,
//! `id` echo, error classes, events with timestamps) and the sockets.
//! [`commands`] turns each message into a typed `control::Command` and the
//! controller's typed replies and events into JSON, the only place QMP JSON
//! is built; what a command does is the controller's business.
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
//! Input is a stream of JSON objects (no framing needed), cut into messages
//! by [`framing`]: one message may not exceed [`MAX_MESSAGE`] bytes nor nest
//! deeper than [`framing::MAX_DEPTH`]; a message past either limit is
//! discarded whole with one error. Malformed input gets a `GenericError` and
//! the connection stays usable. Sockets, per-client output queues and flow
//! control are [`QmpServer`]'s.

pub mod commands;
pub mod framing;
mod server;

pub use framing::MAX_MESSAGE;
pub use server::{QmpServer, QmpServerError};

use std::time::{SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use serde_json::{json, Map, Value};

use framing::{Frame, Framer};

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
    /// Events raised since the last call, as whole QMP event messages
    /// timestamped when they were raised ([`event_message`]).
    fn take_events(&mut self) -> Vec<Value>;
}

/// Rejects any argument: for commands that take none.
pub fn no_args(args: &Map<String, Value>) -> Result<(), QmpError> {
    only_args(args, &[])
}

/// Every argument must be one of `allowed`.
pub fn only_args(args: &Map<String, Value>, allowed: &[&str]) -> Result<(), QmpError> {
    match args.keys().find(|k| !allowed.contains(&k.as_str())) {
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
    event_message_at(name, data, SystemTime::now())
}

/// An event message stamped with the time it was raised.
pub fn event_message_at(name: &str, data: Value, at: SystemTime) -> Value {
    let now = at.duration_since(UNIX_EPOCH).unwrap_or_default();
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

/// One whole message as JSON, in one pass. The framer bounds its size and
/// depth, so serde's own recursion limit (128) gives way to QMP's (1024).
/// A message that names a top-level member twice is refused: a filter that
/// read the first `execute` must not see another command run.
fn parse(message: &[u8]) -> Result<Value, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(message);
    de.disable_recursion_limit();
    let value = TopLevel::deserialize(&mut de)?.0;
    de.end()?;
    Ok(value)
}

/// A JSON value whose top-level object (if it is one) names no member
/// twice; nested values are plain [`Value`]s.
struct TopLevel(Value);

impl<'de> Deserialize<'de> for TopLevel {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{MapAccess, SeqAccess, Visitor};
        struct Top;
        impl<'de> Visitor<'de> for Top {
            type Value = TopLevel;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<TopLevel, A::Error> {
                let mut members = Map::new();
                while let Some(key) = map.next_key::<String>()? {
                    let value = map.next_value::<Value>()?;
                    if members.contains_key(&key) {
                        return Err(serde::de::Error::custom(format!("duplicate key '{key}'")));
                    }
                    members.insert(key, value);
                }
                Ok(TopLevel(Value::Object(members)))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<TopLevel, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element::<Value>()? {
                    items.push(item);
                }
                Ok(TopLevel(Value::Array(items)))
            }
            fn visit_bool<E>(self, v: bool) -> Result<TopLevel, E> {
                Ok(TopLevel(Value::Bool(v)))
            }
            fn visit_i64<E>(self, v: i64) -> Result<TopLevel, E> {
                Ok(TopLevel(Value::from(v)))
            }
            fn visit_u64<E>(self, v: u64) -> Result<TopLevel, E> {
                Ok(TopLevel(Value::from(v)))
            }
            fn visit_f64<E>(self, v: f64) -> Result<TopLevel, E> {
                Ok(TopLevel(Value::from(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<TopLevel, E> {
                Ok(TopLevel(Value::from(v)))
            }
            fn visit_unit<E>(self) -> Result<TopLevel, E> {
                Ok(TopLevel(Value::Null))
            }
        }
        d.deserialize_any(Top)
    }
}

/// What a command leaves to send.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// An event, for every negotiated client.
    Event(Value),
    /// A reply, for the client that sent the command.
    Reply(Value),
}

/// One client's protocol state.
#[derive(Default)]
pub struct Session {
    negotiated: bool,
    framer: Framer,
}

impl Session {
    /// Whether the client finished capabilities negotiation (gets events).
    pub fn negotiated(&self) -> bool {
        self.negotiated
    }

    /// Takes bytes from the client; returns what to send, in order: the
    /// events each command raised (for every client), then its reply (for
    /// this one), command after command, as QEMU orders them.
    pub fn feed(&mut self, bytes: &[u8], backend: &mut dyn QmpBackend) -> Vec<Output> {
        let mut frames = Vec::new();
        self.framer.push(bytes, &mut frames);
        let mut out = Vec::new();
        for frame in frames {
            let reply = match frame {
                Frame::Message(m) => match parse(&m) {
                    Ok(value) => self.dispatch(value, backend),
                    Err(e) => {
                        error_message(QmpError::generic(format!("JSON parse error, {e}")), None)
                    }
                },
                Frame::TooLarge => error_message(
                    QmpError::generic(format!("JSON message exceeds {MAX_MESSAGE} bytes")),
                    None,
                ),
                Frame::TooDeep => error_message(
                    QmpError::generic(format!("JSON nesting depth exceeds {}", framing::MAX_DEPTH)),
                    None,
                ),
                Frame::Stray => error_message(
                    QmpError::generic("JSON parse error, expected a JSON object"),
                    None,
                ),
                Frame::Reset => error_message(
                    QmpError::generic("JSON parse error, invalid byte; input discarded"),
                    None,
                ),
            };
            out.extend(backend.take_events().into_iter().map(Output::Event));
            out.push(Output::Reply(reply));
        }
        out
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
        // QEMU checks every member before it looks for 'execute' (so an
        // 'exec-oob' without the oob capability is an unexpected member).
        if let Some(k) = msg
            .keys()
            .find(|k| !matches!(k.as_str(), "execute" | "arguments"))
        {
            return Err(QmpError::generic(format!(
                "QMP input member '{k}' is unexpected"
            )));
        }
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
        if log::log_enabled!(log::Level::Debug) {
            let mut shown = Value::Object(args.clone()).to_string();
            if shown.len() > 200 {
                let cut = (0..=200)
                    .rev()
                    .find(|&i| shown.is_char_boundary(i))
                    .unwrap_or(0);
                shown.truncate(cut);
                shown.push_str("...");
            }
            log::debug!("QMP: {command:?} {shown}");
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

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Fake {
        calls: Vec<String>,
        events: Vec<Value>,
    }

    impl QmpBackend for Fake {
        fn execute(&mut self, command: &str, args: &Map<String, Value>) -> Result<Value, QmpError> {
            self.calls.push(command.to_string());
            match command {
                "stop" => {
                    no_args(args)?;
                    self.events.push(event_message("STOP", json!({})));
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
        fn take_events(&mut self) -> Vec<Value> {
            std::mem::take(&mut self.events)
        }
    }

    /// The replies `input` gets (events left out).
    fn feed(s: &mut Session, b: &mut Fake, input: &str) -> Vec<Value> {
        s.feed(input.as_bytes(), b)
            .into_iter()
            .filter_map(|o| match o {
                Output::Reply(r) => Some(r),
                Output::Event(_) => None,
            })
            .collect()
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
    }

    #[test]
    fn each_commands_events_come_before_its_reply_and_after_the_previous_one() {
        let (mut s, mut b) = (Session::default(), Fake::default());
        let out = s.feed(
            br#"{"execute":"qmp_capabilities","id":0}{"execute":"stop","id":1}{"execute":"query-status","id":2}{"execute":"stop","id":3}"#,
            &mut b,
        );
        let order: Vec<String> = out
            .iter()
            .map(|o| match o {
                Output::Event(e) => e["event"].as_str().unwrap().to_string(),
                Output::Reply(r) => format!("reply {}", r["id"]),
            })
            .collect();
        assert_eq!(
            order,
            ["reply 0", "STOP", "reply 1", "reply 2", "STOP", "reply 3"]
        );
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
            (
                r#"{"execute": "query-status", "execute": "stop"}"#,
                "duplicate key 'execute'",
            ),
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
    fn oversized_messages_are_dropped_whole() {
        let (mut s, mut b) = (Session::default(), Fake::default());
        let mut big = String::from("{\"execute\": \"");
        big.push_str(&"x".repeat(MAX_MESSAGE + 10));
        // Nothing until the message ends: then one error, and its tail never
        // runs.
        assert!(feed(&mut s, &mut b, &big).is_empty());
        let r = feed(
            &mut s,
            &mut b,
            r#"", "a": {"execute": "qmp_capabilities"}}"#,
        );
        assert_eq!(r.len(), 1);
        assert!(r[0]["error"]["desc"].as_str().unwrap().contains("exceeds"));
        let r = feed(&mut s, &mut b, r#"{"execute":"qmp_capabilities"}"#);
        assert_eq!(r[0], json!({"return": {}}));
        // A message of 70 KB (which QEMU answers) is answered.
        let id = "i".repeat(70_000);
        let r = feed(
            &mut s,
            &mut b,
            &format!(r#"{{"execute":"query-status","id":"{id}"}}"#),
        );
        assert_eq!(r[0]["id"], json!(id));
        // And nesting to QEMU's depth.
        let deep = format!(
            "{{\"execute\":\"query-status\",\"id\":{}1{}}}",
            "[".repeat(1000),
            "]".repeat(1000)
        );
        let r = feed(&mut s, &mut b, &deep);
        assert_eq!(r[0]["return"]["running"], true, "{:?}", r[0]["error"]);
    }

    #[test]
    fn exec_oob_is_an_unexpected_member_as_in_qemu() {
        let (mut s, mut b) = (Session::default(), Fake::default());
        feed(&mut s, &mut b, r#"{"execute":"qmp_capabilities"}"#);
        let r = feed(&mut s, &mut b, r#"{"exec-oob": "query-status", "id": 1}"#);
        assert_eq!(
            r[0]["error"]["desc"],
            "QMP input member 'exec-oob' is unexpected"
        );
        assert_eq!(r[0]["id"], 1);
        assert_eq!(
            greeting()["QMP"]["capabilities"],
            json!([]),
            "oob is not offered"
        );
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
