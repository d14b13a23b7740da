//! A `cgsvmm` child process with its stdout lines and stderr collected,
//! and one-shot runs of the binary.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The `cgsvmm` binary under test: `CGSVMM_TEST_BIN`, or the one cargo
/// built beside this test binary (`target/<profile>/cgsvmm`).
pub fn binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("CGSVMM_TEST_BIN") {
        return PathBuf::from(bin);
    }
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test>-<hash> -> target/<profile>/cgsvmm
    let profile = exe.parent().and_then(|deps| deps.parent()).unwrap();
    let bin = profile.join("cgsvmm");
    assert!(bin.exists(), "no cgsvmm binary at {}", bin.display());
    bin
}

/// `cgsvmm ARGS` as a command, stdin closed.
pub fn cgsvmm<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut c = Command::new(binary());
    c.args(args).stdin(Stdio::null());
    c
}

/// Runs `cgsvmm ARGS` to its end and asserts it succeeded; its stdout and
/// stderr.
pub fn run_ok<I, S>(args: I) -> (String, String)
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    succeeded(&cgsvmm(args).output().unwrap())
}

/// A finished process's stdout and stderr, asserting it succeeded.
pub fn succeeded(out: &Output) -> (String, String) {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{}: {stdout}{stderr}", out.status);
    (stdout, stderr)
}

/// A running cgsvmm whose stdout lines are collected; killed when dropped.
pub struct Vm {
    /// The process.
    pub child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    /// Its stderr so far.
    pub stderr: Arc<Mutex<String>>,
    /// Files it uses (its QMP socket, its key), removed after it ends.
    files: Vec<crate::TempPath>,
}

impl Vm {
    /// `cgsvmm run ARGS`, stdout and stderr collected.
    pub fn start(args: &[&str]) -> Vm {
        let mut child = Command::new(binary())
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
            files: Vec::new(),
        }
    }

    /// Keeps `file` until the VM is dropped (then removes it); its path.
    pub fn own(&mut self, file: crate::TempPath) -> PathBuf {
        let path = file.path().to_path_buf();
        self.files.push(file);
        path
    }

    /// Its stdout lines so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Waits up to `timeout` for a line `pred` accepts.
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

    /// Waits up to `timeout` for the process to end; its exit code.
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

    /// Sends signal `sig`.
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
