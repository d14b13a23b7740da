//! What cgsvmm's test binaries share (as Cloud Hypervisor's `test_infra`):
//! - [`harness`]: the test runner (libtest's output; tests that cannot
//!   run here are ignored with their reason, never passed), one VM at a time;
//! - [`process`]: a `cgsvmm` child process with its output collected, and
//!   one-shot runs of the binary;
//! - [`qmp`]: the QMP client the tests drive the VMM with (and raw
//!   connections for the tests that misbehave on purpose);
//! - [`relay`]: a TCP relay the migration tests tamper with;
//! - [`wait_until`], [`TempPath`], [`free_port`], [`key_file`],
//!   [`readme_block`].
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

pub mod harness;
pub mod process;
pub mod qmp;
pub mod relay;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use harness::{kvm_missing, one_vm, run_tests, NamedTest, TestGroup};
pub use process::{binary, cgsvmm, run_ok, succeeded, Vm, VmArgs};
pub use qmp::connect_raw;
pub use qmp::Qmp;

/// Polls `ready` every 20 ms until it holds (true) or `limit` passes
/// (false).
pub fn wait_until(limit: Duration, mut ready: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if ready() {
            return true;
        }
        if start.elapsed() >= limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A path of this test process's in the temp directory: empty when made
/// (whatever an earlier run left is removed), removed when dropped.
#[derive(Debug)]
pub struct TempPath(PathBuf);

/// This test process's path for `name` in the temp directory (the one a
/// [`TempPath`] of that name has), touching nothing.
pub fn tmp_name(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("cgsvmm-e2e-{name}-{}", std::process::id()))
}

impl TempPath {
    /// `name`, made unique to this process.
    pub fn new(name: &str) -> Self {
        let path = tmp_name(name);
        let _ = std::fs::remove_file(&path);
        Self(path)
    }

    /// The path.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// `unix:PATH`, as `--qmp` and migration URIs take it.
    pub fn unix(&self) -> String {
        format!("unix:{}", self.0.display())
    }
}

impl std::ops::Deref for TempPath {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TempPath {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<std::ffi::OsStr> for TempPath {
    fn as_ref(&self) -> &std::ffi::OsStr {
        self.0.as_os_str()
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// [`TempPath::new`].
pub fn tmp_path(name: &str) -> TempPath {
    TempPath::new(name)
}

/// A transport key file holding `key` (64 hex digits), removed when
/// dropped.
pub fn key_file(name: &str, key: &str) -> TempPath {
    let path = TempPath::new(name);
    std::fs::write(path.path(), format!("{key}\n")).unwrap();
    path
}

/// A TCP port nobody listens on now (for a target to take).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
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

/// The first ```sh block after `marker` in the README (the examples the
/// tests run as pasted).
pub fn readme_block(marker: &str) -> String {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    let start = readme
        .find(marker)
        .unwrap_or_else(|| panic!("{marker:?} in README"));
    let block = &readme[start..];
    let block = &block[block.find("```sh\n").unwrap() + 6..];
    block[..block.find("```").unwrap()].to_string()
}
