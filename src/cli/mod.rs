//! The `cgsvmm` command's front ends, one module per subcommand: each owns
//! its clap arguments and turns them into calls on the `cgsvmm` library
//! (`run` into a `VmmConfig`; `migrate`, `demo` and `qmp` into QMP over the
//! running VMM's socket; `bench` into VMs of its own). Nothing here is part
//! of the library: tests and other front ends use the library directly.

pub mod bench;
pub mod demo;
pub mod migrate;
pub mod qmp;
pub mod run;

use std::path::PathBuf;
use std::process::ExitCode;

/// Prints `e` and its causes on one line (`cgsvmm: error: ...`) and gives
/// the failure exit code: every subcommand reports its errors this way.
pub fn report(e: &dyn std::error::Error) -> ExitCode {
    eprintln!("cgsvmm: error: {}", one_line(e));
    ExitCode::FAILURE
}

/// The error and its causes on one line (a cause already in the message
/// is not repeated).
pub fn one_line(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        source = s.source();
    }
    msg
}

/// A running VMM's QMP socket as `run --qmp` took it (`unix:PATH`, the
/// same parser), or just its path.
pub fn parse_qmp_socket(s: &str) -> Result<PathBuf, cgsvmm_vmm::config::ConfigError> {
    if s.starts_with('/') || s.starts_with('.') || !s.contains(':') {
        return Ok(PathBuf::from(s));
    }
    cgsvmm_vmm::config::parse_qmp(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer: inner went wrong")]
    struct Outer(#[source] Inner);

    #[derive(Debug, thiserror::Error)]
    #[error("inner went wrong")]
    struct Inner(#[source] std::io::Error);

    #[test]
    fn one_line_names_each_cause_once() {
        let e = Outer(Inner(std::io::Error::other("disk on fire")));
        assert_eq!(one_line(&e), "outer: inner went wrong: disk on fire");
    }

    #[test]
    fn qmp_sockets_parse_as_run_takes_them_or_as_paths() {
        assert_eq!(
            parse_qmp_socket("unix:/tmp/a.sock").unwrap(),
            PathBuf::from("/tmp/a.sock")
        );
        assert_eq!(
            parse_qmp_socket("/tmp/b.sock").unwrap(),
            PathBuf::from("/tmp/b.sock")
        );
        assert_eq!(parse_qmp_socket("b.sock").unwrap(), PathBuf::from("b.sock"));
        assert!(parse_qmp_socket("unix:").is_err());
        assert!(parse_qmp_socket("tcp:localhost:4444").is_err());
    }
}
