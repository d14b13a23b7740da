//! End-to-end tests: real `cgsvmm` processes, driven through their command
//! line, serial output, signals and QMP socket, as a user would.
//!
//! Those that need /dev/kvm are reported as ignored, with the reason, on a
//! host without it (`support::run_tests`).
//! Tests that need hardware this host lacks live in `hardware.rs`.
#![allow(clippy::unwrap_used)]

use cgsvmm_test_support::{self as support, named};

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use cgsvmm_vmm::machine::lab::last_pass;
use support::{one_vm, tmp_path, Qmp, VmArgs};

fn dirtier_runs_on_both_vcpus_until_quit() {
    let _one = one_vm();
    let sock = tmp_path("quit.sock");
    let mut vm = VmArgs::new().memory("256M").cpus(2).qmp(&sock).start();
    let start = Instant::now();
    for vcpu in 0..2 {
        let want = format!("dirtier: vcpu {vcpu} pass ");
        let line = vm.wait_for_line(
            Duration::from_secs(5).saturating_sub(start.elapsed()),
            |l| l.starts_with(&want),
        );
        assert!(
            line.is_some(),
            "no pass line from vcpu {vcpu} within 5 s: {:?} {}",
            vm.lines(),
            vm.stderr.lock().unwrap()
        );
    }
    println!("both vCPUs printed within {:?}", start.elapsed());
    // The socket is private to its owner.
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let mut qmp = Qmp::negotiate(&sock);
    assert_eq!(qmp.cmd("query-status")["status"], "running");
    qmp.cmd("quit");
    assert_eq!(
        vm.wait_exit(Duration::from_secs(10)),
        Some(0),
        "{}",
        vm.stderr.lock().unwrap()
    );
    let shutdown = qmp.read();
    assert_eq!(shutdown["event"], "SHUTDOWN");
    assert_eq!(shutdown["data"]["reason"], "host-qmp-quit");
    assert!(!vm.lines().iter().any(|l| l.contains("MEMORY-ERROR")));
    assert!(!sock.exists(), "socket left behind");
}

fn ctrl_c_exits_cleanly() {
    let _one = one_vm();
    let mut vm = VmArgs::new().cpus(1).start();
    assert!(vm
        .wait_for_line(Duration::from_secs(5), |l| l
            .starts_with("dirtier: vcpu 0 pass"))
        .is_some());
    vm.signal(libc::SIGINT);
    assert_eq!(
        vm.wait_exit(Duration::from_secs(10)),
        Some(0),
        "{}",
        vm.stderr.lock().unwrap()
    );
}

fn stop_pauses_the_guest_while_the_mirror_counts_and_cont_resumes() {
    let _one = one_vm();
    let sock = tmp_path("stop.sock");
    let vm = VmArgs::new().memory("256M").cpus(2).qmp(&sock).start();
    for vcpu in 0..2 {
        let want = format!("dirtier: vcpu {vcpu} pass");
        assert!(
            vm.wait_for_line(Duration::from_secs(5), |l| l.starts_with(&want))
                .is_some(),
            "{:?}",
            vm.lines()
        );
    }
    let mut qmp = Qmp::negotiate(&sock);

    qmp.cmd("stop");
    assert_eq!(
        qmp.events.last().map(|e| e["event"].clone()),
        Some(json!("STOP"))
    );
    let status = qmp.cmd("query-status");
    assert_eq!(
        (status["status"].as_str(), status["running"].as_bool()),
        (Some("paused"), Some(false))
    );
    // Let lines already in the pipe arrive, then watch for new ones.
    std::thread::sleep(Duration::from_millis(200));
    let paused_lines = vm.lines().len();
    let mirror_before = qmp.cmd("x-query-mirror")[0]["counter"].as_u64().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let mirror_after = qmp.cmd("x-query-mirror")[0]["counter"].as_u64().unwrap();
    assert_eq!(
        vm.lines().len(),
        paused_lines,
        "pass lines while paused: {:?}",
        &vm.lines()[paused_lines..]
    );
    assert!(
        mirror_after > mirror_before,
        "mirror did not count while paused: {mirror_before} -> {mirror_after}"
    );
    println!(
        "mirror counted {} iterations in 1.5 s while the guest was paused",
        mirror_after - mirror_before
    );

    let before = (
        last_pass(vm.lines(), 0).unwrap(),
        last_pass(vm.lines(), 1).unwrap(),
    );
    qmp.cmd("cont");
    assert_eq!(
        qmp.events.last().map(|e| e["event"].clone()),
        Some(json!("RESUME"))
    );
    assert_eq!(qmp.cmd("query-status")["status"], "running");
    let resumed = vm.wait_for_line(Duration::from_secs(5), |_| {
        let lines = vm.lines();
        last_pass(&lines, 0) > Some(before.0) && last_pass(&lines, 1) > Some(before.1)
    });
    assert!(resumed.is_some(), "passes did not resume: {:?}", vm.lines());
    std::thread::sleep(Duration::from_millis(500));
    // Every line is whole: vCPUs never interleave their output.
    for line in vm.lines() {
        let ok = line
            .strip_prefix("dirtier: vcpu ")
            .and_then(|r| r.strip_suffix(" ok"))
            .and_then(|r| {
                let (vcpu, pass) = r.split_once(" pass ")?;
                Some(vcpu.parse::<u32>().is_ok() && pass.parse::<u64>().is_ok())
            });
        assert_eq!(ok, Some(true), "malformed serial line {line:?}");
    }
    let cpus = qmp.cmd("query-cpus-fast");
    assert_eq!(cpus.as_array().map(Vec::len), Some(2));
}

fn qmp_survives_malformed_input() {
    let _one = one_vm();
    let sock = tmp_path("bad.sock");
    let mut vm = VmArgs::new()
        .guest("dirtier")
        .serial("null")
        .arg("--qmp")
        .arg(format!("unix:{},server,nowait", sock.display()))
        .start();
    let mut qmp = Qmp::connect(&sock);
    let early = qmp.send_raw("{\"execute\": \"stop\"}\n");
    assert_eq!(early["error"]["class"], "CommandNotFound");
    qmp.cmd("qmp_capabilities");
    for bad in [
        "{\"execute\": ",
        "}\n",
        "[]\n",
        "{\"execute\": \"stop\", \"arguments\": {\"now\": 1}}\n",
        "{\"execute\": \"nope\", \"id\": 9}\n",
    ] {
        if bad == "{\"execute\": " {
            qmp.stream.write_all(bad.as_bytes()).unwrap();
            continue;
        }
        let reply = qmp.send_raw(bad);
        assert!(reply.get("error").is_some(), "{bad:?}: {reply}");
    }
    // A VM without SEV has no launch measurement, and says so.
    let reply = qmp.send_raw("{\"execute\": \"query-sev-launch-measure\"}\n");
    assert_eq!(reply["error"]["class"], "GenericError", "{reply}");
    assert!(reply["error"]["desc"]
        .as_str()
        .unwrap()
        .contains("SEV is not enabled"));
    // A second client works alongside, and a client that vanishes is fine.
    drop(UnixStream::connect(&sock).unwrap());
    let mut other = Qmp::negotiate(&sock);
    assert_eq!(other.cmd("query-status")["status"], "running");
    assert_eq!(qmp.cmd("query-status")["running"], true);
    qmp.cmd("quit");
    assert_eq!(vm.wait_exit(Duration::from_secs(10)), Some(0));
}

fn sev_on_a_host_without_it_fails_with_the_reason() {
    let out = Command::new(support::binary())
        .args(["run", "--confidential", "sev", "--guest", "hello"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("SEV is not available on this host: /dev/sev"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(out.stdout.is_empty());
}

fn hello_exits_zero_after_its_line() {
    let _one = one_vm();
    let mut vm = VmArgs::new().guest("hello").start();
    assert_eq!(
        vm.wait_exit(Duration::from_secs(20)),
        Some(0),
        "{}",
        vm.stderr.lock().unwrap()
    );
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        vm.lines(),
        vec!["hello: cgsvmm lab guest on 1 vcpu(s)".to_string()]
    );
}

fn bad_arguments_fail_with_one_clear_message() {
    let cases: &[(&[&str], &str)] = &[
        (&["--cpus", "0"], "--cpus must be between 1 and 32, got 0"),
        (
            &["--mirror-cpus", "99"],
            "--mirror-cpus must be between 1 and 16",
        ),
        (&["--memory", "12X"], "invalid memory size '12X'"),
        (&["--memory", "8M"], "--memory must be at least 16 MiB"),
        (&["--memory", "100T"], "does not fit this host"),
        (
            &["--kernel", "/nonexistent/bzImage"],
            "--kernel /nonexistent/bzImage: No such file",
        ),
        (
            &["--firmware", "/nonexistent/OVMF.fd"],
            "--firmware /nonexistent/OVMF.fd",
        ),
        (
            &["--qmp", "tcp:localhost:4444"],
            "only unix:PATH sockets are supported",
        ),
        (&["--serial", "pty"], "expected stdio, null or file:PATH"),
        (
            &["--guest", "dirtier", "--kernel", "/boot/vmlinuz"],
            "cannot be used with",
        ),
        (&["--initrd", "/tmp/x"], "--kernel"),
        (&["--guest", "nosuch"], "invalid value 'nosuch'"),
        (&["--bogus"], "unexpected argument '--bogus'"),
        (&["--uuid", "not-a-uuid"], "not a UUID"),
        (
            &["--uuid", "6a1d3c52-8f0e-4b6e-9a77-3c2b5d1e0f42"],
            "--uuid names the VM to its migration helper",
        ),
        (
            &["--transport-key-file", "/nonexistent/key"],
            "--transport-key-file /nonexistent/key: No such file",
        ),
        (&["--confidential", "tdx"], "invalid value 'tdx'"),
        (
            &["--sev-policy", "0x3"],
            "--sev-* flags need --confidential sev",
        ),
        (
            &["--confidential", "sev", "--sev-policy", "zz"],
            "invalid --sev-policy 'zz'",
        ),
        (
            &[
                "--confidential",
                "sev",
                "--sev-secret",
                "/nonexistent/s.json",
            ],
            "--sev-secret /nonexistent/s.json",
        ),
        (
            &["--confidential", "sev", "--transport-key-file", "/tmp/k"],
            "launch secret (--sev-secret), not --transport-key-file",
        ),
        // Negative numbers get the range error, not "unexpected argument".
        (&["--cpus", "-1"], "--cpus must be between 1 and 32, got -1"),
        (
            &["--mirror-cpus", "-3"],
            "--mirror-cpus must be between 1 and 16, got -3",
        ),
        // Flags that would be ignored are refused.
        (&["--cmdline", "quiet"], "--kernel"),
        (&["--guest", "hello", "--initrd", "/tmp/x"], "--kernel"),
    ];
    let bad_key = tmp_path("bad.key");
    std::fs::write(&bad_key, "not a key\n").unwrap();
    let bad_key_args = ["--transport-key-file", bad_key.to_str().unwrap()];
    // A sign, a prefix or separators are not a key.
    let signed_key = tmp_path("signed.key");
    std::fs::write(&signed_key, format!("+{}\n", "0".repeat(63))).unwrap();
    let signed_key_args = ["--transport-key-file", signed_key.to_str().unwrap()];
    let prefixed_key = tmp_path("prefixed.key");
    std::fs::write(&prefixed_key, format!("0x{}\n", "1".repeat(62))).unwrap();
    let prefixed_key_args = ["--transport-key-file", prefixed_key.to_str().unwrap()];
    let mut cases = cases.to_vec();
    cases.push((&bad_key_args, "expected 64 hex digits"));
    cases.push((&signed_key_args, "expected 64 hex digits"));
    cases.push((&prefixed_key_args, "expected 64 hex digits"));
    for (args, want) in cases {
        let out = Command::new(support::binary())
            .arg("run")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(
            stderr.contains(want),
            "{args:?}: wanted {want:?} in {stderr:?}"
        );
        let errors = stderr.lines().filter(|l| l.contains("error")).count();
        assert_eq!(errors, 1, "{args:?}: not one error line: {stderr:?}");
        assert!(out.stdout.is_empty(), "{args:?} printed to stdout");
    }
    // The other subcommands check their numbers too: no panic on NaN.
    for (args, want) in [
        (
            &["bench", "helper", "--host-seconds", "nan"][..],
            "between 0.05 and 60",
        ),
        (
            &["bench", "helper", "--host-seconds", "-1"][..],
            "between 0.05 and 60",
        ),
        (&["qmp", "tcp:x:1", "query-status"][..], "only unix:PATH"),
        (
            &["qmp", "unix:/tmp/x", "stop", "--timeout", "-1"][..],
            "between 0.05 and 60",
        ),
        (
            &["qmp", "unix:/tmp/x", "stop", "[1]"][..],
            "must be a JSON object",
        ),
    ] {
        let out = Command::new(support::binary())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(want),
            "{args:?}: wanted {want:?} in {stderr:?}"
        );
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

/// `cgsvmm run | head -1`: the closed pipe is reported once, the VMM goes
/// on, and Ctrl-C still ends it cleanly.
fn a_closed_serial_pipe_is_reported_once() {
    let _one = one_vm();
    let mut child = Command::new(support::binary())
        .args(["run", "--cpus", "2", "--memory", "64M"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    std::io::BufRead::read_line(&mut out, &mut first).unwrap();
    assert!(first.starts_with("dirtier: vcpu"), "{first}");
    drop(out);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(child.try_wait().unwrap(), None, "the VMM stopped");
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let result = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert_eq!(result.status.code(), Some(0), "{stderr}");
    let reports = stderr.matches("Serial output failed").count();
    assert_eq!(reports, 1, "{stderr}");
}

/// `RUST_LOG=debug` tells what a user debugging a VM wants: the layout,
/// devices, vCPUs starting, pausing and resuming (with timing), and every
/// QMP command.
fn debug_logging_shows_layout_vcpus_and_qmp_commands() {
    let _one = one_vm();
    let sock = tmp_path("debug.sock");
    let child = Command::new(support::binary())
        .args(["run", "--memory", "64M", "--serial", "null"])
        .arg("--qmp")
        .arg(format!("unix:{}", sock.display()))
        .env("RUST_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut q = Qmp::negotiate(&sock);
    q.cmd("stop");
    q.cmd("cont");
    q.cmd("quit");
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    for want in [
        "VM: 64 MiB of RAM",
        "Devices: COM1",
        "Started 1 main and 1 mirror vCPUs in",
        "QMP: \"stop\"",
        "Paused the main vCPUs in",
        "Resumed the main vCPUs in",
        "QMP: \"quit\"",
    ] {
        assert!(log.contains(want), "no {want:?} in the debug log:\n{log}");
    }
}

/// The README's QMP example, run as written (with this build's binary and
/// a socket of the test's own): every command succeeds and the VMM ends.
fn the_readme_qmp_example_runs_as_pasted() {
    let _one = one_vm();
    let block = support::readme_block("Pasted into a shell:");
    let sock = tmp_path("readme.sock");
    let script: String = block
        .lines()
        .filter(|l| !l.starts_with("cargo build"))
        .map(|l| {
            l.replace(
                "./target/release/cgsvmm",
                support::binary().to_str().unwrap(),
            )
            .replace("/tmp/cgsvmm.sock", sock.to_str().unwrap())
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        script.contains(" qmp ") && script.contains("&\n"),
        "{script}"
    );
    let out = Command::new("bash")
        .args(["-e", "-c", &format!("{script}\nwait")])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let (stdout, _) = support::succeeded(&out);
    assert!(stdout.contains("\"status\": \"paused\""), "{stdout}");
    assert!(stdout.contains("\"payload\""), "{stdout}");
}

/// `cgsvmm qmp` drives a running VMM as the README shows.
fn the_qmp_subcommand_runs_one_command_and_prints_its_reply() {
    let _one = one_vm();
    let sock = tmp_path("qmp-cli.sock");
    let mut vm = VmArgs::new().serial("null").qmp(&sock).start();
    let qmp = |args: &[&str]| {
        Command::new(support::binary())
            .arg("qmp")
            .arg(format!("unix:{}", sock.display()))
            .args(args)
            .output()
            .unwrap()
    };
    let stop = qmp(&["stop"]);
    assert!(
        stop.status.success(),
        "{}",
        String::from_utf8_lossy(&stop.stderr)
    );
    let status = qmp(&["query-status"]);
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(v["status"], "paused");
    // A second VMM cannot take the socket over.
    let second = Command::new(support::binary())
        .args(["run", "--serial", "null", "--qmp"])
        .arg(format!("unix:{}", sock.display()))
        .output()
        .unwrap();
    assert_eq!(second.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&second.stderr).contains("is in use"));
    let bad = qmp(&["stop", r#"{"force": true}"#]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("Parameter 'force' is unexpected"));
    assert!(qmp(&["cont"]).status.success());
    assert!(qmp(&["quit"]).status.success());
    assert_eq!(vm.wait_exit(Duration::from_secs(10)), Some(0));
}

fn the_migration_helper_runs_on_the_mirror_when_a_key_is_given() {
    let _one = one_vm();
    let key = tmp_path("transport.key");
    std::fs::write(&key, format!("{}\n", "ab".repeat(32))).unwrap();
    let sock = tmp_path("helper.sock");
    let mut vm = VmArgs::new()
        .cpus(2)
        .mirror_cpus(2)
        .transport_key(&key)
        .arg("--uuid")
        .arg("6a1d3c52-8f0e-4b6e-9a77-3c2b5d1e0f42")
        .qmp(&sock)
        .start();
    assert!(vm
        .wait_for_line(Duration::from_secs(5), |l| l
            .starts_with("dirtier: vcpu 1 pass"))
        .is_some());
    let mut qmp = Qmp::negotiate(&sock);
    let first = qmp.cmd("x-query-mirror");
    std::thread::sleep(Duration::from_millis(300));
    let second = qmp.cmd("x-query-mirror");
    for (i, (a, b)) in first
        .as_array()
        .unwrap()
        .iter()
        .zip(second.as_array().unwrap())
        .enumerate()
    {
        assert_eq!(b["payload"], "helper");
        assert!(b["fault"].is_null(), "helper {i} faulted: {b}");
        // Idle helpers wake now and then (and sleep in between).
        assert!(
            b["counter"].as_u64() > a["counter"].as_u64(),
            "helper {i} is not alive: {a} -> {b}"
        );
    }
    qmp.cmd("quit");
    assert_eq!(vm.wait_exit(Duration::from_secs(10)), Some(0));
    let _ = std::fs::remove_file(key);
}

fn bench_helper_prints_its_numbers_and_the_two_ratio_lines() {
    let _one = one_vm();
    let (stdout, _) = support::run_ok([
        "bench",
        "helper",
        "--pages",
        "1024",
        "--reps",
        "1",
        "--host-seconds",
        "0.05",
    ]);
    for row in [
        "seed (1 page/round trip)",
        "batched, 1 helper",
        "batched, 2 helpers",
        "host RustCrypto aes-gcm",
        "host ring",
    ] {
        assert!(stdout.contains(row), "missing {row:?} in {stdout}");
    }
    let lines: Vec<&str> = stdout.lines().collect();
    let ratio = |line: &str, prefix: &str| -> f64 {
        let v = line
            .strip_prefix(prefix)
            .unwrap_or_else(|| panic!("{line:?} does not start with {prefix:?}"));
        v.parse()
            .unwrap_or_else(|_| panic!("{v:?} is not a number"))
    };
    let batched = ratio(lines[lines.len() - 2], "batched/seed ratio: ");
    let helper = ratio(lines[lines.len() - 1], "helper/host-aead ratio: ");
    assert!(batched > 0.0 && helper > 0.0 && helper < 10.0, "{stdout}");
}

/// The README's usage block names every flag `cgsvmm run --help` lists.
fn the_readme_usage_block_matches_the_help() {
    let help = Command::new(support::binary())
        .args(["run", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    let flags: Vec<&str> = help
        .lines()
        .filter_map(|l| {
            l.trim_start()
                .split([' ', ',', '='])
                .find(|w| w.starts_with("--"))
        })
        .filter(|f| !matches!(*f, "--help" | "--version"))
        .collect();
    assert!(flags.len() > 10, "{help}");
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme.find("cgsvmm run [").expect("usage block");
    let usage = &readme[start..start + readme[start..].find("```").unwrap()];
    for flag in flags {
        assert!(
            usage.contains(&format!("{flag} ")) || usage.contains(&format!("{flag}]")),
            "README usage lacks {flag}"
        );
        assert!(
            readme.contains(&format!("`{flag}`")),
            "README never explains {flag}"
        );
    }
}

fn main() {
    let sev = std::path::Path::new("/dev/sev").exists().then(|| {
        "this host has /dev/sev: the refusal on hosts without SEV cannot be seen".to_string()
    });
    support::run_tests(&[
        (
            support::kvm_missing(),
            &named!(
                dirtier_runs_on_both_vcpus_until_quit,
                ctrl_c_exits_cleanly,
                stop_pauses_the_guest_while_the_mirror_counts_and_cont_resumes,
                qmp_survives_malformed_input,
                hello_exits_zero_after_its_line,
                the_migration_helper_runs_on_the_mirror_when_a_key_is_given,
                bench_helper_prints_its_numbers_and_the_two_ratio_lines,
                a_closed_serial_pipe_is_reported_once,
                the_qmp_subcommand_runs_one_command_and_prints_its_reply,
                debug_logging_shows_layout_vcpus_and_qmp_commands,
                the_readme_qmp_example_runs_as_pasted,
            ),
        ),
        (sev, &named!(sev_on_a_host_without_it_fails_with_the_reason)),
        (
            None,
            &named!(
                bad_arguments_fail_with_one_clear_message,
                the_readme_usage_block_matches_the_help
            ),
        ),
    ]);
}
