//! A `cgsvmm` child process with its stdout lines and stderr collected,
//! and one-shot runs of the binary.

use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
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

/// The arguments of `cgsvmm run`, built by name (flags the builder does not
/// name go in with [`VmArgs::arg`]).
#[derive(Debug, Clone, Default)]
pub struct VmArgs(Vec<OsString>);

impl VmArgs {
    /// No flags: the embedded dirtier with cgsvmm's defaults.
    pub fn new() -> Self {
        Self::default()
    }

    fn flag(mut self, flag: &str, value: impl AsRef<OsStr>) -> Self {
        self.0.push(flag.into());
        self.0.push(value.as_ref().to_owned());
        self
    }

    /// `--memory SIZE` ("256M").
    pub fn memory(self, size: &str) -> Self {
        self.flag("--memory", size)
    }

    /// `--cpus N`.
    pub fn cpus(self, n: u32) -> Self {
        self.flag("--cpus", n.to_string())
    }

    /// `--mirror-cpus N`.
    pub fn mirror_cpus(self, n: u32) -> Self {
        self.flag("--mirror-cpus", n.to_string())
    }

    /// `--guest NAME` (an embedded lab guest).
    pub fn guest(self, name: &str) -> Self {
        self.flag("--guest", name)
    }

    /// `--serial SPEC` ("null", "stdio", "file:PATH").
    pub fn serial(self, spec: &str) -> Self {
        self.flag("--serial", spec)
    }

    /// `--qmp unix:SOCKET`.
    pub fn qmp(self, socket: &Path) -> Self {
        self.flag("--qmp", format!("unix:{}", socket.display()))
    }

    /// `--transport-key-file PATH`: the migration helper runs.
    pub fn transport_key(self, path: &Path) -> Self {
        self.flag("--transport-key-file", path)
    }

    /// `--incoming URI` ("tcp:HOST:PORT", "unix:PATH", "defer").
    pub fn incoming(self, uri: &str) -> Self {
        self.flag("--incoming", uri)
    }

    /// `--paused`: the guest waits for QMP `cont`.
    pub fn paused(self) -> Self {
        self.arg("--paused")
    }

    /// `--kernel PATH` (a Linux bzImage or ELF).
    pub fn kernel(self, path: &Path) -> Self {
        self.flag("--kernel", path)
    }

    /// `--cmdline LINE`.
    pub fn cmdline(self, line: &str) -> Self {
        self.flag("--cmdline", line)
    }

    /// `--firmware PATH` (OVMF).
    pub fn firmware(self, path: &Path) -> Self {
        self.flag("--firmware", path)
    }

    /// Any other argument, as it is.
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.0.push(arg.as_ref().to_owned());
        self
    }

    /// `cgsvmm run` with these arguments.
    pub fn start(&self) -> Vm {
        Vm::start(self)
    }
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
    /// The threads reading its stdout and stderr; they end when it does.
    readers: Vec<JoinHandle<()>>,
}

impl Vm {
    /// `cgsvmm run ARGS`, stdout and stderr collected.
    pub fn start(args: &VmArgs) -> Vm {
        let mut child = Command::new(binary())
            .arg("run")
            .args(&args.0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn cgsvmm");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().unwrap();
        let sink = lines.clone();
        let stdout_reader = std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let err = child.stderr.take().unwrap();
        let sink = stderr.clone();
        let stderr_reader = std::thread::spawn(move || {
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
            readers: vec![stdout_reader, stderr_reader],
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
        // Its pipes closed as it ended (cgsvmm run starts no children that
        // could hold them), so the readers are at their end.
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
    }
}
