//! The QMP socket against clients that misbehave, end to end: real cgsvmm
//! processes and real sockets. A message that hides a command past the
//! size limit, clients that send and never read, a deep pipeline read late,
//! a process out of file descriptors.
#![allow(clippy::unwrap_used)]

use cgsvmm_test_support::{self as support, named};

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use support::{cpu_ticks, one_vm, tmp_path, Qmp, Vm, VmArgs};

/// A running guest with a QMP socket and nothing on the serial port.
fn vm_with_qmp(name: &str) -> (Vm, std::path::PathBuf) {
    let sock = tmp_path(name);
    let mut vm = VmArgs::new()
        .memory("64M")
        .serial("null")
        .qmp(&sock)
        .start();
    let sock = vm.own(sock);
    (vm, sock)
}

/// A raw connection, once the socket is there, reads unbounded.
fn connect(path: &Path) -> UnixStream {
    let s = support::connect_raw(path);
    s.set_read_timeout(None).unwrap();
    s
}

fn a_command_hidden_in_an_oversized_message_never_runs() {
    let _one = one_vm();
    let (mut vm, sock) = vm_with_qmp("qmp-big.sock");
    let mut q = Qmp::negotiate(&sock);
    // Past the 1 MiB limit, the message's tail holds a `quit`, outside any
    // string: a server that went back to the top level at the limit would
    // run it.
    let mut big = String::from("[");
    big.push_str(&"0,".repeat(600_000));
    big.push_str(r#"{"execute": "quit"}]"#);
    big.push('\n');
    let reply = q.send_raw(&big);
    assert!(
        reply["error"]["desc"].as_str().unwrap().contains("exceeds"),
        "{reply}"
    );
    // One error only, and the session goes on: the next reply is this one.
    let status = q.send_raw("{\"execute\": \"query-status\", \"id\": \"after\"}\n");
    assert_eq!(status["id"], "after", "{status}");
    assert_eq!(status["return"]["running"], true);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(vm.child.try_wait().unwrap(), None, "the hidden quit ran");
    // A 70 KB message is answered as QEMU answers it.
    let id = "i".repeat(70_000);
    let reply = q.send_raw(&format!(
        "{}\n",
        json!({"execute": "query-status", "id": id})
    ));
    assert_eq!(reply["id"], json!(id));
    q.cmd("quit");
    assert_eq!(vm.wait_exit(Duration::from_secs(10)), Some(0));
}

/// A client that sends commands as fast as it can and never reads.
fn flood(path: &Path, stop: &std::sync::atomic::AtomicBool) {
    let mut s = connect(path);
    s.set_nonblocking(true).unwrap();
    let line = b"{\"execute\": \"query-status\"}\n";
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        match s.write(line) {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(1))
            }
            Err(_) => return,
        }
    }
}

fn clients_that_never_read_stall_nobody() {
    let _one = one_vm();
    let (mut vm, sock) = vm_with_qmp("qmp-flood.sock");
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| flood(&sock, &stop));
        s.spawn(|| flood(&sock, &stop));
        std::thread::sleep(Duration::from_millis(500));
        let mut q = Qmp::negotiate(&sock);
        let mut worst = Duration::ZERO;
        for _ in 0..20 {
            let start = Instant::now();
            let r = q.cmd("query-status");
            worst = worst.max(start.elapsed());
            assert_eq!(r["running"], true);
            std::thread::sleep(Duration::from_millis(20));
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        println!("slowest query-status beside two flooding clients: {worst:?}");
        assert!(
            worst < Duration::from_millis(500),
            "slowest reply {worst:?}"
        );
        // Signals are handled too.
        vm.signal(libc::SIGTERM);
    });
    assert_eq!(vm.wait_exit(Duration::from_secs(10)), Some(0));
}

fn twenty_thousand_pipelined_commands_read_late_are_all_answered() {
    const N: usize = 20_000;
    let _one = one_vm();
    let (mut vm, sock) = vm_with_qmp("qmp-pipeline.sock");
    let stream = connect(&sock);
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let mut all = String::from("{\"execute\": \"qmp_capabilities\"}\n");
        for i in 0..N {
            all.push_str(&format!("{{\"execute\": \"query-status\", \"id\": {i}}}\n"));
        }
        writer.write_all(all.as_bytes()).unwrap();
    });
    // Read nothing for a while: the replies pile up.
    std::thread::sleep(Duration::from_secs(1));
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    let mut next = 0;
    let mut lines = 0;
    while next < N {
        line.clear();
        assert!(
            reader.read_line(&mut line).unwrap() > 0,
            "EOF after {next} replies"
        );
        lines += 1;
        let v: Value = serde_json::from_str(&line).unwrap();
        if let Some(id) = v.get("id") {
            assert_eq!(id, next, "replies out of order");
            assert_eq!(v["return"]["running"], true);
            next += 1;
        }
    }
    sender.join().unwrap();
    assert_eq!(lines, N + 2, "greeting, capabilities, then one reply each");
    vm.signal(libc::SIGTERM);
    assert_eq!(vm.wait_exit(Duration::from_secs(10)), Some(0));
}

fn out_of_file_descriptors_the_loop_idles_and_recovers() {
    let _one = one_vm();
    let (mut vm, sock) = vm_with_qmp("qmp-fds.sock");
    let mut first = Qmp::negotiate(&sock);
    let pid = vm.child.id();
    // No descriptor left for another client: the limit is one past the
    // highest descriptor open (a new one must be numbered below it).
    let fds: Vec<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
        .collect();
    let highest = *fds.iter().max().unwrap();
    // Free numbers below the limit still take clients: come with more.
    let holes = highest + 1 - fds.len() as u64;
    let limit = libc::rlimit {
        rlim_cur: highest + 1,
        rlim_max: highest + 1,
    };
    // SAFETY: prlimit on our own child with a valid rlimit and no old value.
    let rc = unsafe {
        libc::prlimit(
            pid as i32,
            libc::RLIMIT_NOFILE,
            &limit,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    // More clients than descriptors: they are refused (closed), and the
    // event loop does not spin on the listener meanwhile.
    let mut refused = Vec::new();
    for _ in 0..holes + 8 {
        refused.push(UnixStream::connect(&sock).unwrap());
    }
    let before = cpu_ticks(pid, pid);
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu_ticks(pid, pid) - before;
    assert!(used <= 10, "the event loop used {used} ticks in 1 s");
    // Each is either served (a free low-numbered descriptor) or closed at
    // once; with 8 more than there is room for, some are closed.
    let mut closed = 0;
    for mut c in refused {
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 64];
        match c.read(&mut buf) {
            Ok(0) => closed += 1,
            Ok(_) => assert!(buf.starts_with(b"{\"QMP\""), "neither served nor closed"),
            Err(e) => panic!("a client neither served nor closed: {e}"),
        }
    }
    assert!(closed > 0, "no client was refused: the limit did not bite");
    // The client that got in is served throughout.
    assert_eq!(first.cmd("query-status")["running"], true);
    // A descriptor frees up: clients are served again.
    drop(first);
    std::thread::sleep(Duration::from_millis(100));
    let mut again = Qmp::negotiate(&sock);
    assert_eq!(again.cmd("query-status")["running"], true);
    assert!(
        vm.stderr
            .lock()
            .unwrap()
            .matches("out of file descriptors")
            .count()
            <= 1,
        "logged more than once"
    );
    again.cmd("quit");
    assert_eq!(vm.wait_exit(Duration::from_secs(10)), Some(0));
}

fn pipelined_commands_get_their_events_and_replies_in_order() {
    let _one = one_vm();
    let (mut vm, sock) = vm_with_qmp("qmp-order.sock");
    let mut q = Qmp::negotiate(&sock);
    q.stream
        .write_all(
            concat!(
                r#"{"execute": "stop", "id": 1}"#,
                r#"{"execute": "query-status", "id": 2}"#,
                r#"{"execute": "cont", "id": 3}"#,
                "\n"
            )
            .as_bytes(),
        )
        .unwrap();
    let mut order = Vec::new();
    let mut stamps = Vec::new();
    while order.len() < 5 {
        let v = q.read();
        match v.get("event") {
            Some(e) => {
                order.push(e.as_str().unwrap().to_string());
                stamps.push(v["timestamp"]["seconds"].as_u64().unwrap());
            }
            None => order.push(format!("reply {}", v["id"])),
        }
    }
    assert_eq!(order, ["STOP", "reply 1", "reply 2", "RESUME", "reply 3"]);
    assert!(stamps.iter().all(|&s| s > 1_600_000_000));
    // A stray quote does not swallow the session, and the qmp-spec's
    // recovery byte resets a half-sent message.
    let reply = q.send_raw("x\"\n");
    assert!(reply.get("error").is_some(), "{reply}");
    assert_eq!(q.cmd("query-status")["running"], true);
    q.stream
        .write_all(b"{\"execute\": \"stop\", \"id\": \"trunc")
        .unwrap();
    let reply = q.send_raw("\u{1}\n");
    assert!(reply.get("error").is_some(), "{reply}");
    assert_eq!(
        q.cmd("query-status")["running"],
        true,
        "the truncated stop ran"
    );
    q.cmd("quit");
    assert_eq!(vm.wait_exit(Duration::from_secs(10)), Some(0));
}

fn system_powerdown_names_the_host_as_its_cause() {
    let _one = one_vm();
    let (mut vm, sock) = vm_with_qmp("qmp-powerdown.sock");
    let mut q = Qmp::negotiate(&sock);
    q.cmd("system_powerdown");
    let event = loop {
        let v = q.read();
        if v["event"] == "SHUTDOWN" {
            break v;
        }
    };
    assert_eq!(
        event["data"],
        json!({"guest": false, "reason": "host-qmp-system-powerdown"})
    );
    assert_eq!(vm.wait_exit(Duration::from_secs(10)), Some(0));
}

fn main() {
    support::run_tests(&[(
        support::kvm_missing(),
        &named!(
            a_command_hidden_in_an_oversized_message_never_runs,
            clients_that_never_read_stall_nobody,
            twenty_thousand_pipelined_commands_read_late_are_all_answered,
            out_of_file_descriptors_the_loop_idles_and_recovers,
            system_powerdown_names_the_host_as_its_cause,
            pipelined_commands_get_their_events_and_replies_in_order,
        ),
    )]);
}
