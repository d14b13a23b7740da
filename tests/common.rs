//! Helpers shared by the end-to-end test binaries: a `cgsvmm` child process
//! whose output is collected, and a small QMP client.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// One VM at a time: the host has two cores and the tests time progress.
static ONE_VM: Mutex<()> = Mutex::new(());

pub fn one_vm() -> std::sync::MutexGuard<'static, ()> {
    ONE_VM.lock().unwrap_or_else(|e| e.into_inner())
}

/// Why the tests that need KVM cannot run here, if they cannot.
pub fn kvm_missing() -> Option<String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .err()
        .map(|e| format!("/dev/kvm is not usable here ({e})"))
}

pub fn kvm_available() -> bool {
    match kvm_missing() {
        None => true,
        Some(why) => {
            println!("SKIPPED: {why}; this test needs KVM");
            false
        }
    }
}

/// A test function and its name.
pub type NamedTest = (&'static str, fn());

/// Tests that run together or are skipped together, with the reason they
/// cannot run here (`None`: they can).
pub type TestGroup<'a> = (Option<String>, &'a [NamedTest]);

/// `(name, function)` pairs of test functions, for [`run_tests`].
#[macro_export]
macro_rules! named {
    ($($f:ident),* $(,)?) => {
        [$((stringify!($f), $f as fn())),*]
    };
}

/// Runs this binary's tests (its own harness, libtest's output): each group
/// is ignored when its skip reason is `Some`, with the reason printed once,
/// so that a test that did not run is reported as ignored, never as passed.
pub fn run_tests(groups: &[TestGroup]) -> ! {
    let args = libtest_mimic::Arguments::from_args();
    let mut trials = Vec::new();
    for (skip, tests) in groups {
        if let Some(why) = skip {
            println!("SKIPPED (ignored below): {why}: {} test(s)", tests.len());
        }
        for &(name, f) in *tests {
            trials.push(
                libtest_mimic::Trial::test(name, move || {
                    f();
                    Ok(())
                })
                .with_ignored_flag(skip.is_some()),
            );
        }
    }
    libtest_mimic::run(&args, trials).exit()
}

/// Clock ticks (1/100 s) thread `tid` of process `pid` has used, user and
/// system.
pub fn cpu_ticks(pid: u32, tid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// This test process's path for `name` in the temp directory.
pub fn tmp_name(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("cgsvmm-e2e-{name}-{}", std::process::id()))
}

/// [`tmp_name`], with whatever an earlier run left there removed.
pub fn tmp_path(name: &str) -> PathBuf {
    let path = tmp_name(name);
    let _ = std::fs::remove_file(&path);
    path
}

/// A running cgsvmm whose stdout lines are collected; killed when dropped.
pub struct Vm {
    pub child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    pub stderr: Arc<Mutex<String>>,
}

impl Vm {
    pub fn start(args: &[&str]) -> Vm {
        let mut child = Command::new(env!("CARGO_BIN_EXE_cgsvmm"))
            .arg("run")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn cgsvmm");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().unwrap();
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let err = child.stderr.take().unwrap();
        let sink = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        Vm {
            child,
            lines,
            stderr,
        }
    }

    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    pub fn wait_for_line(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Some(l) = self.lines().into_iter().find(|l| pred(l)) {
                return Some(l);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Highest pass number vCPU `vcpu` printed.
pub fn last_pass(lines: &[String], vcpu: usize) -> Option<u64> {
    let prefix = format!("dirtier: vcpu {vcpu} pass ");
    lines
        .iter()
        .filter_map(|l| l.strip_prefix(&prefix)?.strip_suffix(" ok")?.parse().ok())
        .max()
}

/// A minimal QMP client that keeps the events it sees.
pub struct Qmp {
    pub stream: UnixStream,
    reader: BufReader<UnixStream>,
    pub events: Vec<Value>,
}

impl Qmp {
    pub fn connect(path: &Path) -> Qmp {
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

    pub fn read(&mut self) -> Value {
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("QMP read");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad QMP line {line:?}: {e}"))
    }

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

    pub fn cmd(&mut self, execute: &str) -> Value {
        let reply = self.send_raw(&format!("{}\n", json!({"execute": execute})));
        assert!(reply.get("return").is_some(), "{execute}: {reply}");
        reply["return"].clone()
    }

    pub fn negotiate(path: &Path) -> Qmp {
        let mut q = Qmp::connect(path);
        q.cmd("qmp_capabilities");
        q
    }
}

/// The first ```sh block after `marker` in the README (the examples the
/// tests run as pasted).
pub fn readme_block(marker: &str) -> String {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let start = readme
        .find(marker)
        .unwrap_or_else(|| panic!("{marker:?} in README"));
    let block = &readme[start..];
    let block = &block[block.find("```sh\n").unwrap() + 6..];
    block[..block.find("```").unwrap()].to_string()
}
