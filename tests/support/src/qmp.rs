//! The QMP client the tests drive a VMM with: one line in, replies and
//! events apart; and raw connections for tests that misbehave on purpose.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// A raw connection to the QMP socket at `path` (waiting up to 10 s for
/// it to appear), reads bounded by 10 s.
pub fn connect_raw(path: &Path) -> UnixStream {
    let start = Instant::now();
    let stream = loop {
        match UnixStream::connect(path) {
            Ok(s) => break s,
            Err(e) if start.elapsed() > Duration::from_secs(10) => {
                panic!("QMP socket never appeared: {e}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
}

/// A QMP client that keeps the events it sees.
pub struct Qmp {
    /// The connection.
    pub stream: UnixStream,
    reader: BufReader<UnixStream>,
    /// Events seen so far.
    pub events: Vec<Value>,
}

impl Qmp {
    /// Connects and reads the greeting (no negotiation yet).
    pub fn connect(path: &Path) -> Qmp {
        let stream = connect_raw(path);
        let reader = BufReader::new(stream.try_clone().unwrap());
        let mut qmp = Qmp {
            stream,
            reader,
            events: Vec::new(),
        };
        let greeting = qmp.read();
        assert!(greeting["QMP"]["version"].is_object(), "{greeting}");
        qmp
    }

    /// The next message.
    pub fn read(&mut self) -> Value {
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("QMP read");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad QMP line {line:?}: {e}"))
    }

    /// Sends `raw`; the next reply (events meanwhile are kept).
    pub fn send_raw(&mut self, raw: &str) -> Value {
        self.stream.write_all(raw.as_bytes()).unwrap();
        loop {
            let v = self.read();
            if v.get("event").is_some() {
                self.events.push(v);
            } else {
                return v;
            }
        }
    }

    /// `execute` without arguments; its `return` (anything else panics).
    pub fn cmd(&mut self, execute: &str) -> Value {
        let reply = self.send_raw(&format!("{}\n", json!({"execute": execute})));
        assert!(reply.get("return").is_some(), "{execute}: {reply}");
        reply["return"].clone()
    }

    /// `execute` with `arguments`; its whole reply (`return` or `error`).
    pub fn call(&mut self, execute: &str, arguments: Value) -> Value {
        self.send_raw(&format!(
            "{}\n",
            json!({"execute": execute, "arguments": arguments})
        ))
    }

    /// The run state `query-status` reports.
    pub fn status(&mut self) -> String {
        self.cmd("query-status")["status"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// Connects and negotiates capabilities.
    pub fn negotiate(path: &Path) -> Qmp {
        let mut q = Qmp::connect(path);
        q.cmd("qmp_capabilities");
        q
    }
}
