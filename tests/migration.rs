//! Migration end to end: real cgsvmm processes, real sockets and files on
//! loopback. A running dirtier (2 vCPUs, 256 MiB, part of it declared
//! shared) is stopped and migrated over TCP, over a Unix socket and through
//! a snapshot file; it must keep verifying its memory on the other side.
//! Then the stream is damaged, cut short, sent to a target with another key
//! or another memory size, and cancelled: the target must never run the
//! guest and the source must run on.
#![allow(clippy::unwrap_used)]

use cgsvmm_test_support::{self as support, named};

use std::io::{Read, Write};
use std::net::Shutdown;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use cgsvmm_migration::protocol::{self, FrameKind};
use cgsvmm_vmm::machine::lab::last_pass;
use support::relay::{Back, Relay};
use support::{free_port, key_file, one_vm, tmp_path, wait_until, Qmp, Vm, VmArgs};

const KEY: &str = "4242424242424242424242424242424242424242424242424242424242424242";
const OTHER_KEY: &str = "1111111111111111111111111111111111111111111111111111111111111111";
const RAM_PAGES: u64 = 256 * 256;

/// `cgsvmm run` with a helper and a QMP socket, plus what `extra` adds.
fn start(
    name: &str,
    key: &Path,
    memory: &str,
    extra: impl FnOnce(VmArgs) -> VmArgs,
) -> (Vm, Qmp, PathBuf) {
    let sock = tmp_path(&format!("{name}.sock"));
    let args = VmArgs::new()
        .memory(memory)
        .cpus(2)
        .mirror_cpus(2)
        .transport_key(key)
        .qmp(&sock);
    let mut vm = extra(args).start();
    let q = Qmp::negotiate(&sock);
    let sock = vm.own(sock);
    (vm, q, sock)
}

/// A source dirtier that has made a few passes on both vCPUs, set to
/// switch over as soon as precopy's first round is sent (these tests are
/// about the stream; the live tests set their own limits).
fn source(name: &str, key: &Path) -> (Vm, Qmp) {
    source_of(name, key, "dirtier")
}

/// [`source`], running the lab guest `guest`.
fn source_of(name: &str, key: &Path, guest: &str) -> (Vm, Qmp) {
    let (vm, mut q, _) = start(name, key, "256M", |a| a.guest(guest));
    downtime_limit(&mut q, 60000);
    for vcpu in 0..2 {
        assert!(
            passes_beyond(&vm, vcpu, 2),
            "source made no progress: {}",
            vm.stderr.lock().unwrap()
        );
    }
    (vm, q)
}

/// Waits (up to 10 s) for vCPU `vcpu` to print a pass above `pass`.
fn passes_beyond(vm: &Vm, vcpu: usize, pass: u64) -> bool {
    wait_until(Duration::from_secs(10), || {
        last_pass(vm.lines(), vcpu).is_some_and(|p| p > pass)
    })
}

/// A target waiting at `incoming`, paused after the migration.
fn target(name: &str, key: &Path, memory: &str, incoming: &str) -> (Vm, Qmp) {
    let (vm, mut q, _) = start(name, key, memory, |a| a.incoming(incoming).paused());
    assert_eq!(status(&mut q), "inmigrate");
    (vm, q)
}

fn status(q: &mut Qmp) -> String {
    q.cmd("query-status")["status"]
        .as_str()
        .unwrap()
        .to_string()
}

fn call(q: &mut Qmp, execute: &str, arguments: Value) -> Value {
    q.send_raw(&format!(
        "{}\n",
        json!({"execute": execute, "arguments": arguments})
    ))
}

/// Sets `downtime-limit` (ms).
fn downtime_limit(q: &mut Qmp, ms: u64) {
    let r = call(q, "migrate-set-parameters", json!({ "downtime-limit": ms }));
    assert!(r.get("return").is_some(), "{r}");
}

fn migrate(q: &mut Qmp, uri: &str) {
    let r = call(q, "migrate", json!({ "uri": uri }));
    assert!(r.get("return").is_some(), "migrate: {r}");
}

/// Polls `query-migrate` until the migration is over; its last answer.
fn wait_migration(q: &mut Qmp, limit: Duration) -> Value {
    let start = Instant::now();
    loop {
        let info = q.cmd("query-migrate");
        let s = info["status"].as_str().unwrap_or("none");
        if matches!(s, "completed" | "failed" | "cancelled") {
            return info;
        }
        assert!(
            start.elapsed() < limit,
            "migration still {s} after {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn digest(q: &mut Qmp) -> String {
    q.cmd("x-query-ram-digest")["digest"]
        .as_str()
        .unwrap()
        .to_string()
}

/// The target ran the migrated guest: after `cont`, both vCPUs verify
/// their memory for 3 s, passes going on from where the source stopped.
fn verifies_on(vm: &Vm, q: &mut Qmp, source_lines: &[String]) {
    let before: Vec<u64> = (0..2)
        .map(|v| last_pass(source_lines, v).unwrap())
        .collect();
    q.cmd("cont");
    assert_eq!(status(q), "running");
    std::thread::sleep(Duration::from_secs(3));
    let lines = vm.lines();
    assert!(
        !lines.iter().any(|l| l.contains("MEMORY-ERROR")),
        "{lines:?}"
    );
    for (v, before) in before.iter().enumerate() {
        let after = last_pass(&lines, v).unwrap_or(0);
        assert!(
            after > before + 2,
            "vCPU {v} did not go on on the target: pass {before} there, {after} here"
        );
    }
    assert_eq!(status(q), "running", "{}", vm.stderr.lock().unwrap());
}

/// Checks a completed migration's report: both kinds of page, adding up
/// to guest RAM (`exact`: a stopped migration sends each page once; a
/// live one may send some again).
fn check_report(info: &Value, exact: bool) {
    assert_eq!(info["status"], "completed", "{info}");
    let private = info["confidential"]["private-pages"].as_u64().unwrap();
    let shared = info["confidential"]["shared-pages"].as_u64().unwrap();
    assert!(private > 0 && shared > 0, "{info}");
    if exact {
        assert_eq!(private + shared, RAM_PAGES, "{info}");
    } else {
        assert!(private + shared >= RAM_PAGES, "{info}");
    }
    assert_eq!(info["ram"]["remaining"], 0, "{info}");
    println!(
        "migrated 256 MiB in {} ms ({} ms paused), {:.0} Mbit/s, {private} private and {shared} shared pages",
        info["total-time"], info["downtime"], info["ram"]["mbps"].as_f64().unwrap()
    );
}

/// Stops a dirtier, migrates it to a target at `uri`, checks digests
/// before the target resumes, then the guest on the target.
fn stopped_migration_and_verify(name: &str, uri: &str) {
    let _one = one_vm();
    let key = key_file(&format!("{name}.key"), KEY);
    let (src_vm, mut src) = source(&format!("{name}-src"), &key);
    let (dst_vm, mut dst) = target(&format!("{name}-dst"), &key, "256M", uri);
    src.cmd("stop");
    migrate(&mut src, uri);
    let info = wait_migration(&mut src, Duration::from_secs(30));
    check_report(&info, true);
    assert_eq!(status(&mut src), "postmigrate");
    assert_eq!(
        wait_migration(&mut dst, Duration::from_secs(10))["status"],
        "completed"
    );
    assert_eq!(status(&mut dst), "paused");
    assert_eq!(digest(&mut src), digest(&mut dst), "RAM differs");
    let refused = call(&mut src, "cont", json!({}));
    assert!(
        refused["error"]["desc"]
            .as_str()
            .unwrap()
            .contains("runs on the target"),
        "{refused}"
    );
    let events: Vec<&Value> = src
        .events
        .iter()
        .filter(|e| e["event"] == "MIGRATION")
        .collect();
    assert!(
        events.iter().any(|e| e["data"]["status"] == "completed") || {
            // The event may still be on its way: one more command brings it.
            status(&mut src);
            src.events
                .iter()
                .any(|e| e["event"] == "MIGRATION" && e["data"]["status"] == "completed")
        },
        "{:?}",
        src.events
    );
    verifies_on(&dst_vm, &mut dst, &src_vm.lines());
    drop(src_vm);
    let _ = std::fs::remove_file(key);
}

fn a_stopped_dirtier_migrates_over_tcp_and_verifies_there() {
    let port = free_port();
    stopped_migration_and_verify("tcp", &format!("tcp:127.0.0.1:{port}"));
}

fn a_stopped_dirtier_migrates_over_a_unix_socket_and_verifies_there() {
    let sock = tmp_path("migration-unix.sock");
    stopped_migration_and_verify("unix", &format!("unix:{}", sock.display()));
}

/// Save, quit, restore in a new process (twice: a snapshot can be restored
/// more than once), verify.
fn a_snapshot_file_restores_in_new_processes() {
    let _one = one_vm();
    let key = key_file("snap.key", KEY);
    let file = tmp_path("snapshot.cgsv");
    let uri = format!("file:{}", file.display());
    let (mut src_vm, mut src) = source("snap-src", &key);
    migrate(&mut src, &uri);
    check_report(&wait_migration(&mut src, Duration::from_secs(30)), true);
    let saved = digest(&mut src);
    let source_lines = src_vm.lines();
    src.cmd("quit");
    assert_eq!(src_vm.wait_exit(Duration::from_secs(10)), Some(0));
    for round in 0..2 {
        let (dst_vm, mut dst) = target(&format!("snap-dst{round}"), &key, "256M", &uri);
        assert_eq!(
            wait_migration(&mut dst, Duration::from_secs(30))["status"],
            "completed"
        );
        assert_eq!(status(&mut dst), "paused");
        assert_eq!(digest(&mut dst), saved, "restore {round}: RAM differs");
        verifies_on(&dst_vm, &mut dst, &source_lines);
    }
    // An existing file is never overwritten.
    let (_vm, mut again) = source("snap-again", &key);
    let r = call(&mut again, "migrate", json!({ "uri": uri }));
    assert!(
        r["error"]["desc"].as_str().unwrap().contains("exists"),
        "{r}"
    );
    assert_eq!(status(&mut again), "running");
    // After a snapshot the guest may go on (no other copy runs).
    migrate(&mut again, &format!("{uri}.2"));
    check_report(&wait_migration(&mut again, Duration::from_secs(30)), true);
    assert_eq!(status(&mut again), "postmigrate");
    again.cmd("cont");
    assert_eq!(status(&mut again), "running");
    let _ = std::fs::remove_file(format!("{}.2", file.display()));
    let _ = std::fs::remove_file(file);
    let _ = std::fs::remove_file(key);
}

/// What a proxy does to the source's bytes on their way to the target.
#[derive(Clone, Copy)]
enum Damage {
    /// XOR this byte at this offset.
    Flip(u64, u8),
    /// Close both ways after this many bytes.
    Cut(u64),
    /// Forward at most this many bytes per second.
    Throttle(u64),
    /// Stop reading after this many bytes, keeping the connection open.
    Stall(u64),
}

/// A relay to `to` that does `damage` to the source's direction.
fn proxy(to: u16, damage: Damage) -> Relay {
    Relay::start(
        to,
        Back::ThenClose,
        move |mut from_src, mut to_dst, stop| {
            let mut buf = vec![0u8; 64 << 10];
            let mut at = 0u64;
            let start = Instant::now();
            loop {
                let want = match damage {
                    Damage::Throttle(rate) => (rate / 100).min(buf.len() as u64) as usize,
                    _ => buf.len(),
                };
                let n = match from_src.read(&mut buf[..want]) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                match damage {
                    Damage::Flip(offset, mask) if (at..at + n as u64).contains(&offset) => {
                        buf[(offset - at) as usize] ^= mask;
                    }
                    Damage::Cut(limit) if at + n as u64 >= limit => {
                        let keep = (limit - at) as usize;
                        let _ = to_dst.write_all(&buf[..keep]);
                        break;
                    }
                    Damage::Stall(limit) if at + n as u64 >= limit => {
                        Relay::pause(stop, Duration::from_secs(30));
                        break;
                    }
                    Damage::Throttle(rate) => {
                        let due = Duration::from_secs_f64((at + n as u64) as f64 / rate as f64);
                        if let Some(wait) = due.checked_sub(start.elapsed()) {
                            Relay::pause(stop, wait);
                        }
                    }
                    _ => {}
                }
                if to_dst.write_all(&buf[..n]).is_err() {
                    break;
                }
                at += n as u64;
            }
            let _ = to_dst.shutdown(Shutdown::Both);
            let _ = from_src.shutdown(Shutdown::Both);
        },
    )
}

/// What a frame-level relay does to the source's frames.
#[derive(Clone, Copy, Debug)]
enum Forge {
    /// Changes one byte of the first frame of this kind, with a good
    /// checksum (what a man in the middle can do).
    Alter(FrameKind),
    /// Changes a reserved byte of the first helper record's header (one
    /// the helpers' AEAD does not cover), with a good checksum.
    RecordPad,
    /// Holds the first helper-record frame back and forwards it after the
    /// next shared-pages frame: every byte arrives, in another order.
    Reorder,
    /// Keeps the seal and what follows from the target and answers the
    /// source with an acknowledgement of its own.
    FakeAck,
}

/// A relay to `to` that parses the source's frames and does `forge` to
/// them (the target's go back as they are).
fn frame_proxy(to: u16, forge: Forge) -> Relay {
    Relay::start(to, Back::Only, move |from_src, to_dst, stop| {
        let mut to_src = from_src.try_clone().unwrap();
        let mut from_src = std::io::BufReader::new(from_src);
        let mut to_dst = std::io::BufWriter::new(to_dst);
        let mut altered = false;
        let mut held: Option<protocol::Frame> = None;
        while let Ok(Some(mut frame)) = protocol::read_frame(&mut from_src) {
            let mut after = None;
            match forge {
                Forge::RecordPad if frame.kind == FrameKind::HelperRecords && !altered => {
                    // RecordHeader: gpa, generation, nonce, reserved, tag, pad.
                    frame.payload[48] ^= 0x01;
                    altered = true;
                }
                Forge::Reorder if frame.kind == FrameKind::HelperRecords && !altered => {
                    held = Some(frame);
                    altered = true;
                    continue;
                }
                Forge::Reorder if held.is_some() => {
                    // Right after a shared-pages frame, or (if none came)
                    // before the state, where it belonged anyway.
                    if frame.kind == FrameKind::SharedPages {
                        after = held.take();
                    } else if frame.kind == FrameKind::DeviceState {
                        let early = held.take().unwrap();
                        let _ = protocol::write_frame(&mut to_dst, early.kind, &early.payload);
                    }
                }
                Forge::Alter(kind) if frame.kind == kind && !altered => {
                    // Inside the first page's bytes, or mid-record.
                    let at = if kind == FrameKind::SharedPages {
                        8 + 100
                    } else {
                        frame.payload.len() / 2
                    };
                    frame.payload[at] ^= 0x01;
                    altered = true;
                }
                Forge::FakeAck if frame.kind == FrameKind::Seal => {
                    let _ = to_dst.flush();
                    let _ = protocol::write_frame(&mut to_src, FrameKind::Ack, &[0u8; 16]);
                    Relay::pause(stop, Duration::from_secs(3));
                    return;
                }
                _ => {}
            }
            if protocol::write_frame(&mut to_dst, frame.kind, &frame.payload).is_err() {
                break;
            }
            if let Some(late) = after {
                if protocol::write_frame(&mut to_dst, late.kind, &late.payload).is_err() {
                    break;
                }
            }
            if matches!(frame.kind, FrameKind::End | FrameKind::SessionOffer) {
                let _ = to_dst.flush();
            }
        }
        let _ = to_dst.flush();
    })
}

/// A relay to `to` that forwards every frame as it is and counts the
/// plaintext pages that carry the converter guest's private mark (word 1
/// of the page is `LAB_SECRET_MARK`): what a host sniffing the stream
/// would see of a page while it was private.
fn sniff_proxy(to: u16) -> (Relay, Arc<AtomicU64>) {
    let leaks = Arc::new(AtomicU64::new(0));
    let seen = Arc::clone(&leaks);
    let relay = Relay::start(to, Back::Only, move |from_src, to_dst, _| {
        let mut from_src = std::io::BufReader::new(from_src);
        let mut to_dst = std::io::BufWriter::new(to_dst);
        let mark = cgsvmm_fw_abi::LAB_SECRET_MARK.to_le_bytes();
        while let Ok(Some(frame)) = protocol::read_frame(&mut from_src) {
            if frame.kind == FrameKind::SharedPages {
                // Per page: gpa (8), then the page; word 1 at page + 8.
                let marked = frame
                    .payload
                    .chunks(8 + 4096)
                    .filter(|p| p.len() >= 24 && p[16..24] == mark)
                    .count();
                seen.fetch_add(marked as u64, Ordering::SeqCst);
            }
            if protocol::write_frame(&mut to_dst, frame.kind, &frame.payload).is_err() {
                break;
            }
            if matches!(frame.kind, FrameKind::End | FrameKind::SessionOffer) {
                let _ = to_dst.flush();
            }
        }
        let _ = to_dst.flush();
    });
    (relay, leaks)
}

/// The migration to `uri` fails: the target exits non-zero without ever
/// running the guest, saying why; the source runs again within 1 s of the
/// failure and keeps verifying. Returns the target's error output.
fn fails_closed(src_vm: &Vm, src: &mut Qmp, dst_vm: &mut Vm, uri: &str) -> String {
    migrate(src, uri);
    let code = dst_vm.wait_exit(Duration::from_secs(30));
    let failed_at = Instant::now();
    assert!(
        matches!(code, Some(c) if c != 0),
        "the target exited with {code:?}"
    );
    source_runs_on(src_vm, src, dst_vm, failed_at)
}

/// The migration to `uri` fails before the source showed it is one (a
/// damaged configuration): the target says why and waits on for a real
/// source; the source, which never paused, runs on.
fn fails_before_it_began(src_vm: &Vm, src: &mut Qmp, dst_vm: &mut Vm, uri: &str) -> String {
    migrate(src, uri);
    let info = wait_migration(src, Duration::from_secs(15));
    assert_eq!(info["status"], "failed", "{info}");
    assert!(
        dst_vm.child.try_wait().unwrap().is_none(),
        "the target gave up"
    );
    source_runs_on(src_vm, src, dst_vm, Instant::now())
}

/// After a failure at `failed_at`: the source runs within 1 s and keeps
/// verifying, the target never ran the guest. The target's error output.
fn source_runs_on(src_vm: &Vm, src: &mut Qmp, dst_vm: &Vm, failed_at: Instant) -> String {
    loop {
        if status(src) == "running" {
            break;
        }
        assert!(
            failed_at.elapsed() < Duration::from_secs(1),
            "the source did not run again within 1 s: {}",
            src.cmd("query-migrate")
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let info = wait_migration(src, Duration::from_secs(5));
    assert_eq!(info["status"], "failed", "{info}");
    // The target says why (it may be a moment behind the source, which
    // saw its connection close first).
    let said = || {
        let stderr = dst_vm.stderr.lock().unwrap();
        stderr.contains("error") || stderr.contains("Ignored")
    };
    assert!(
        wait_until(Duration::from_secs(5), said),
        "the target said nothing; the source: {}",
        info["error-desc"]
    );
    let stderr = dst_vm.stderr.lock().unwrap().clone();
    assert!(
        !dst_vm.lines().iter().any(|l| l.starts_with("dirtier:")),
        "the target ran the guest: {:?}",
        dst_vm.lines()
    );
    let before = last_pass(src_vm.lines(), 0).unwrap();
    assert!(
        passes_beyond(src_vm, 0, before),
        "the source's guest does not go on"
    );
    assert!(!src_vm.lines().iter().any(|l| l.contains("MEMORY-ERROR")));
    println!("target: {}", stderr.trim());
    stderr
}

fn damaged_cut_short_or_mismatched_streams_fail_closed() {
    let _one = one_vm();
    let key = key_file("bad.key", KEY);
    let other = key_file("bad-other.key", OTHER_KEY);
    let (src_vm, mut src) = source("bad-src", &key);
    // CGSVMM_TEST_SEED repeats a run's offsets (it prints them).
    let seed = std::env::var("CGSVMM_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(u64::from(std::process::id()));
    println!("seed {seed}");
    // A flipped byte somewhere in the first 200 MiB of the stream (~272 MiB
    // long), and one in its first KiB (the configuration and session).
    for (i, offset) in [(seed * 7919) % (200 << 20), (seed * 31) % 1024]
        .into_iter()
        .enumerate()
    {
        let port = free_port();
        let (mut dst_vm, _dst) = target(
            &format!("bad-flip{i}"),
            &key,
            "256M",
            &format!("tcp:127.0.0.1:{port}"),
        );
        let via = proxy(port, Damage::Flip(offset, 0x10));
        let uri = format!("tcp:127.0.0.1:{via}");
        // A flip in the Hello or the configuration: nothing shows the peer
        // is a source, so the target waits on for one.
        let why = if offset < 1024 {
            fails_before_it_began(&src_vm, &mut src, &mut dst_vm, &uri)
        } else {
            fails_closed(&src_vm, &mut src, &mut dst_vm, &uri)
        };
        println!("flipped byte at {offset}");
        assert!(
            ["damaged", "Hello", "stream", "frame"]
                .iter()
                .any(|w| why.contains(w)),
            "{why}"
        );
    }
    // Cut short.
    let port = free_port();
    let (mut dst_vm, _dst) = target("bad-cut", &key, "256M", &format!("tcp:127.0.0.1:{port}"));
    let via = proxy(port, Damage::Cut(100 << 20));
    let why = fails_closed(
        &src_vm,
        &mut src,
        &mut dst_vm,
        &format!("tcp:127.0.0.1:{via}"),
    );
    assert!(
        why.contains("ends inside") || why.contains("closed"),
        "{why}"
    );
    // Another transport key: refused at the session, before any page.
    let port = free_port();
    let uri = format!("tcp:127.0.0.1:{port}");
    let (mut dst_vm, _dst) = target("bad-key", &other, "256M", &uri);
    fails_closed(&src_vm, &mut src, &mut dst_vm, &uri);
    let info = src.cmd("query-migrate");
    assert!(
        info["error-desc"]
            .as_str()
            .unwrap()
            .contains("transport key"),
        "{info}"
    );
    // Another memory size.
    let port = free_port();
    let uri = format!("tcp:127.0.0.1:{port}");
    let (mut dst_vm, _dst) = target("bad-size", &key, "128M", &uri);
    let why = fails_closed(&src_vm, &mut src, &mut dst_vm, &uri);
    assert!(why.contains("256 MiB"), "{why}");
    let _ = std::fs::remove_file(key);
    let _ = std::fs::remove_file(other);
}

/// A man in the middle who rewrites a frame the helpers do not see or a
/// helper record's reserved bytes (with good checksums), or who moves a
/// helper record past shared pages (of a guest that converts a block
/// during precopy), is caught by the seal: the stream hash
/// binds every frame in order. The target proves its refusal and the
/// source runs on.
fn frames_altered_or_moved_on_the_way_are_refused() {
    let _one = one_vm();
    let key = key_file("forge.key", KEY);
    // Its guest converts a block all the while: the map changes mid-stream.
    let (src_vm, mut src) = source_of("forge-src", &key, "converter");
    for (i, forge) in [
        Forge::Alter(FrameKind::VcpuState),
        Forge::Alter(FrameKind::SharedPages),
        Forge::Alter(FrameKind::DeviceState),
        Forge::RecordPad,
        Forge::Reorder,
    ]
    .into_iter()
    .enumerate()
    {
        let port = free_port();
        let (mut dst_vm, _dst) = target(
            &format!("forge{i}"),
            &key,
            "256M",
            &format!("tcp:127.0.0.1:{port}"),
        );
        let via = frame_proxy(port, forge);
        let why = fails_closed(
            &src_vm,
            &mut src,
            &mut dst_vm,
            &format!("tcp:127.0.0.1:{via}"),
        );
        // A changed state record may already fail to restore (restored
        // before the helpers verify): refused with their nack all the same.
        let refused_restore = matches!(
            forge,
            Forge::Alter(FrameKind::VcpuState | FrameKind::DeviceState)
        ) && ["Cannot restore", "Cannot decode", "record"]
            .iter()
            .any(|w| why.contains(w));
        assert!(
            why.contains("SealMismatch") || refused_restore,
            "{forge:?}: {why}"
        );
    }
    let _ = std::fs::remove_file(key);
}

/// An acknowledgement the target's helpers did not make is not believed:
/// the guest stays paused in `outcome-unknown` (it may run on the target),
/// where only the operator's forced `cont` or `migrate` takes it on.
fn a_forged_acknowledgement_is_not_believed() {
    let _one = one_vm();
    let key = key_file("fakeack.key", KEY);
    let (_src_vm, mut src) = source("fakeack-src", &key);
    let port = free_port();
    let (_dst_vm, _dst) = target(
        "fakeack-dst",
        &key,
        "256M",
        &format!("tcp:127.0.0.1:{port}"),
    );
    let via = frame_proxy(port, Forge::FakeAck);
    migrate(&mut src, &format!("tcp:127.0.0.1:{via}"));
    let info = wait_migration(&mut src, Duration::from_secs(30));
    assert_eq!(info["status"], "failed", "{info}");
    assert!(
        info["error-desc"]
            .as_str()
            .unwrap()
            .contains("No authenticated answer"),
        "{info}"
    );
    assert_eq!(status(&mut src), "outcome-unknown");
    for (cmd, args) in [
        ("cont", json!({})),
        ("migrate", json!({"uri": "tcp:127.0.0.1:1"})),
    ] {
        let r = call(&mut src, cmd, args);
        let desc = r["error"]["desc"].as_str().unwrap_or_default();
        assert!(
            desc.contains("outcome is unknown") && desc.contains("x-force"),
            "{cmd}: {r}"
        );
    }
    assert_eq!(status(&mut src), "outcome-unknown");
    // `cgsvmm migrate` is refused as well; with --force it tries, and a
    // forced migration that fails leaves the state as it was.
    let qmp = format!("unix:{}", support::tmp_name("fakeack-src.sock").display());
    let nowhere = "tcp:127.0.0.1:1";
    // `cgsvmm migrate` with `extra` flags: its exit code and stderr.
    let migrate_cli = |extra: &[&str]| {
        let mut args = vec!["migrate", "--qmp", &qmp, "--no-progress"];
        args.extend_from_slice(extra);
        args.push(nowhere);
        let out = support::cgsvmm(args).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, said) = migrate_cli(&[]);
    assert!(
        code == Some(1) && said.contains("outcome is unknown"),
        "{code:?}: {said}"
    );
    let (code, said) = migrate_cli(&["--force"]);
    assert!(
        code == Some(1) && said.contains("migration failed"),
        "{code:?}: {said}"
    );
    assert_eq!(status(&mut src), "outcome-unknown");
    let r = call(&mut src, "cont", json!({"x-force": true}));
    assert!(r.get("return").is_some(), "{r}");
    assert_eq!(status(&mut src), "running");
    let _ = std::fs::remove_file(key);
}

/// A guest that arrived leaves again: A to B to C, verified at the end;
/// the source reports QEMU's events in order.
fn a_migrated_guest_migrates_on() {
    let _one = one_vm();
    let key = key_file("chain.key", KEY);
    let (a_vm, mut a) = source("chain-a", &key);
    let uri_b = format!("tcp:127.0.0.1:{}", free_port());
    let (b_vm, mut b, _) = start("chain-b", &key, "256M", |a| a.incoming(&uri_b));
    migrate(&mut a, &uri_b);
    check_report(&wait_migration(&mut a, Duration::from_secs(30)), false);
    assert_eq!(
        wait_migration(&mut b, Duration::from_secs(10))["status"],
        "completed"
    );
    assert_eq!(status(&mut b), "running");
    status(&mut a);
    let names: Vec<String> = a
        .events
        .iter()
        .map(|e| match e["event"].as_str().unwrap() {
            "MIGRATION" => format!("MIGRATION {}", e["data"]["status"].as_str().unwrap()),
            other => other.to_string(),
        })
        .collect();
    assert_eq!(
        names,
        [
            "MIGRATION setup",
            "MIGRATION active",
            "STOP",
            "MIGRATION completed"
        ],
        "{:?}",
        a.events
    );
    drop(a_vm);
    assert!(passes_beyond(&b_vm, 0, 0));
    downtime_limit(&mut b, 60000);
    let uri_c = format!("unix:{}", tmp_path("chain-c.mig").display());
    let (c_vm, mut c) = target("chain-c", &key, "256M", &uri_c);
    migrate(&mut b, &uri_c);
    check_report(&wait_migration(&mut b, Duration::from_secs(30)), false);
    assert_eq!(status(&mut b), "postmigrate");
    assert_eq!(digest(&mut b), digest(&mut c));
    verifies_on(&c_vm, &mut c, &b_vm.lines());
    let _ = std::fs::remove_file(key);
}

/// A snapshot with a flipped byte, or cut short, restores nothing.
fn a_damaged_or_truncated_snapshot_is_refused() {
    let _one = one_vm();
    let key = key_file("badsnap.key", KEY);
    let file = tmp_path("badsnap.cgsv");
    let (_src_vm, mut src) = source("badsnap-src", &key);
    migrate(&mut src, &format!("file:{}", file.display()));
    check_report(&wait_migration(&mut src, Duration::from_secs(30)), true);
    let good = std::fs::read(&file).unwrap();
    let at = (std::process::id() as usize * 104_729) % good.len();
    let mut flipped = good.clone();
    flipped[at] ^= 0x01;
    for (what, bytes) in [
        ("flipped", flipped),
        ("truncated", good[..good.len() / 2].to_vec()),
    ] {
        let path = tmp_path(&format!("badsnap-{what}.cgsv"));
        std::fs::write(&path, bytes).unwrap();
        let (mut vm, _q) = target(
            &format!("badsnap-{what}"),
            &key,
            "256M",
            &format!("file:{}", path.display()),
        );
        let code = vm.wait_exit(Duration::from_secs(30));
        assert!(matches!(code, Some(c) if c != 0), "{what}: exit {code:?}");
        let err = vm.stderr.lock().unwrap().clone();
        println!("{what} at {at}: {}", err.trim());
        assert!(err.contains("error"), "{err}");
        assert!(!vm.lines().iter().any(|l| l.starts_with("dirtier:")));
        let _ = std::fs::remove_file(path);
    }
    let _ = std::fs::remove_file(file);
    let _ = std::fs::remove_file(key);
}

fn migrate_cancel_during_the_transfer_then_a_second_migration_succeeds() {
    let _one = one_vm();
    let key = key_file("cancel.key", KEY);
    let (src_vm, mut src) = source("cancel-src", &key);
    let port = free_port();
    let (mut dst_vm, _dst) = target("cancel-dst", &key, "256M", &format!("tcp:127.0.0.1:{port}"));
    // 64 MiB/s: the transfer takes 4 s; the cancel comes once pages flow
    // (before the source's configuration is out, a target takes the broken
    // connection for a stray one and waits on for a real source).
    let via = proxy(port, Damage::Throttle(64 << 20));
    migrate(&mut src, &format!("tcp:127.0.0.1:{via}"));
    let flowing = Instant::now();
    let during = loop {
        let q = src.cmd("query-migrate");
        if q["confidential"]["private-pages"].as_u64().unwrap_or(0) > 0 {
            break q;
        }
        assert!(
            flowing.elapsed() < Duration::from_secs(10),
            "no page went in 10 s: {q}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(during["status"], "active", "{during}");
    // Precopy: the guest runs while its pages go.
    assert_eq!(status(&mut src), "running");
    let cancelled_at = Instant::now();
    src.cmd("migrate_cancel");
    loop {
        if status(&mut src) == "running" {
            break;
        }
        assert!(
            cancelled_at.elapsed() < Duration::from_secs(1),
            "the source did not run again within 1 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let info = wait_migration(&mut src, Duration::from_secs(5));
    assert_eq!(info["status"], "cancelled", "{info}");
    // The target gives up (its stream broke) without running the guest.
    let code = dst_vm.wait_exit(Duration::from_secs(30));
    assert!(
        matches!(code, Some(c) if c != 0),
        "the target after the cancel: exit {code:?}; its stderr:\n{}",
        dst_vm.stderr.lock().unwrap()
    );
    assert!(!dst_vm.lines().iter().any(|l| l.starts_with("dirtier:")));
    // The guest runs on, then a second migration goes through.
    let before = last_pass(src_vm.lines(), 1).unwrap();
    assert!(passes_beyond(&src_vm, 1, before));
    let port = free_port();
    let uri = format!("tcp:127.0.0.1:{port}");
    let (dst_vm, mut dst) = target("cancel-dst2", &key, "256M", &uri);
    migrate(&mut src, &uri);
    check_report(&wait_migration(&mut src, Duration::from_secs(30)), false);
    assert_eq!(digest(&mut src), digest(&mut dst));
    verifies_on(&dst_vm, &mut dst, &src_vm.lines());
    let _ = std::fs::remove_file(key);
}

/// `--incoming defer` waits for QMP `migrate-incoming`; bad arguments and
/// commands in the wrong state get clear errors.
fn incoming_defer_and_bad_requests() {
    let _one = one_vm();
    let key = key_file("defer.key", KEY);
    let (src_vm, mut src) = source("defer-src", &key);
    let (mut dst_vm, mut dst, _) = start("defer-dst", &key, "256M", |a| a.incoming("defer"));
    assert_eq!(status(&mut dst), "inmigrate");
    for (cmd, args, want) in [
        ("migrate", json!({}), "'uri' is missing"),
        ("migrate", json!({"uri": 5}), "expected: string"),
        ("migrate", json!({"uri": "ftp:x"}), "scheme"),
        (
            "migrate",
            json!({"uri": "tcp:x:1", "x": 1}),
            "'x' is unexpected",
        ),
        (
            "migrate-incoming",
            json!({"uri": "tcp:127.0.0.1:1"}),
            "-incoming",
        ),
    ] {
        let r = call(&mut src, cmd, args.clone());
        let desc = r["error"]["desc"].as_str().unwrap_or_default();
        assert!(desc.contains(want), "{cmd} {args}: {r}");
    }
    let r = call(&mut dst, "migrate", json!({"uri": "tcp:127.0.0.1:1"}));
    assert!(
        r["error"]["desc"].as_str().unwrap().contains("inmigrate"),
        "{r}"
    );
    let r = call(&mut dst, "cont", json!({}));
    assert!(r.get("return").is_some(), "{r}");
    // `stop` before the guest arrives keeps it paused after (QEMU's
    // autostart); then migrate-incoming starts listening.
    dst.cmd("stop");
    let port = free_port();
    let uri = format!("tcp:127.0.0.1:{port}");
    let r = call(&mut dst, "migrate-incoming", json!({ "uri": uri }));
    assert!(r.get("return").is_some(), "{r}");
    let r = call(&mut dst, "migrate-incoming", json!({ "uri": uri }));
    assert!(
        r["error"]["desc"].as_str().unwrap().contains("already"),
        "{r}"
    );
    // What a port scanner does (connect, then reset) or a stray client
    // (a few bytes, then gone) is ignored: the target waits on.
    for garbage in [None, Some(&b"GET / HTTP/1.0\r\n\r\n"[..])] {
        let stray = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        match garbage {
            Some(bytes) => (&stray).write_all(bytes).unwrap(),
            None => socket2::SockRef::from(&stray)
                .set_linger(Some(Duration::ZERO))
                .unwrap(),
        }
        drop(stray);
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            dst_vm.child.try_wait().unwrap().is_none(),
            "a stray connection ended the target: {}",
            dst_vm.stderr.lock().unwrap()
        );
    }
    migrate(&mut src, &uri);
    check_report(&wait_migration(&mut src, Duration::from_secs(30)), false);
    assert_eq!(
        wait_migration(&mut dst, Duration::from_secs(10))["status"],
        "completed"
    );
    assert_eq!(status(&mut dst), "paused");
    verifies_on(&dst_vm, &mut dst, &src_vm.lines());
    let _ = std::fs::remove_file(key);
}

/// A running dirtier moves live: precopy rounds while it runs (it stays
/// `running` and makes passes), the main vCPUs paused only at the
/// switchover while the helpers seal the last pages, and it goes on
/// verifying on the target.
fn a_running_dirtier_migrates_live_in_rounds() {
    let _one = one_vm();
    let key = key_file("live.key", KEY);
    let (src_vm, mut src) = source("live-src", &key);
    downtime_limit(&mut src, 300);
    // QEMU's capability form of auto-converge, which is on.
    let caps = src.cmd("query-migrate-capabilities");
    assert!(
        caps.as_array()
            .unwrap()
            .contains(&json!({"capability": "auto-converge", "state": true})),
        "{caps}"
    );
    let r = call(
        &mut src,
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "xbzrle", "state": true}]}),
    );
    assert!(
        r["error"]["desc"]
            .as_str()
            .unwrap()
            .contains("not supported"),
        "{r}"
    );
    let uri = format!("tcp:127.0.0.1:{}", free_port());
    let (dst_vm, mut dst, _) = start("live-dst", &key, "256M", |a| a.incoming(&uri));
    let before = last_pass(src_vm.lines(), 0).unwrap();
    migrate(&mut src, &uri);
    // During precopy the guest runs and works.
    std::thread::sleep(Duration::from_millis(300));
    let during = src.cmd("query-migrate");
    if during["status"] == "active" {
        assert_eq!(status(&mut src), "running", "{during}");
        // As in QEMU, the limits may change while it runs; the rest not.
        downtime_limit(&mut src, 300);
        let r = call(&mut src, "migrate-set-parameters", json!({"x-batch": 16}));
        assert!(
            r["error"]["desc"].as_str().unwrap().contains("in progress"),
            "{r}"
        );
    }
    let info = wait_migration(&mut src, Duration::from_secs(60));
    check_report(&info, false);
    let rounds = info["ram"]["dirty-sync-count"].as_u64().unwrap();
    assert!(rounds >= 2, "{info}");
    let sealed_paused = info["confidential"]["downtime-private-pages"]
        .as_u64()
        .unwrap();
    assert!(
        sealed_paused > 0,
        "the helpers sealed nothing in the pause: {info}"
    );
    assert!(
        last_pass(src_vm.lines(), 0).unwrap() > before,
        "the guest did not run during precopy"
    );
    println!(
        "live: {rounds} rounds, {} ms in all, {} ms paused, {sealed_paused} pages sealed by the helpers in the pause",
        info["total-time"], info["downtime"]
    );
    assert_eq!(status(&mut src), "postmigrate");
    assert_eq!(
        wait_migration(&mut dst, Duration::from_secs(10))["status"],
        "completed"
    );
    assert_eq!(status(&mut dst), "running");
    std::thread::sleep(Duration::from_secs(3));
    let lines = dst_vm.lines();
    assert!(
        !lines.iter().any(|l| l.contains("MEMORY-ERROR")),
        "{lines:?}"
    );
    assert!(
        last_pass(&lines, 0).unwrap_or(0) > last_pass(src_vm.lines(), 0).unwrap() + 2,
        "the guest does not go on on the target"
    );
    let _ = std::fs::remove_file(key);
}

/// A guest that turns a block private and back all through precopy (and
/// marks it while private): no page of it ever leaves as plaintext while
/// private (the sender checks the live map once it copied a page), and
/// the guest verifies on the target.
fn a_block_converted_during_precopy_never_leaves_as_plaintext() {
    let _one = one_vm();
    let key = key_file("conv.key", KEY);
    let (src_vm, mut src, _) = start("conv-src", &key, "256M", |a| a.guest("converter"));
    assert!(
        passes_beyond(&src_vm, 0, 4),
        "{}",
        src_vm.stderr.lock().unwrap()
    );
    // One round while the guest runs (it converts the block many times
    // meanwhile), then the switchover.
    downtime_limit(&mut src, 60000);
    let port = free_port();
    let (dst_vm, mut dst) = target("conv-dst", &key, "256M", &format!("tcp:127.0.0.1:{port}"));
    let (via, leaks) = sniff_proxy(port);
    let before = last_pass(src_vm.lines(), 0).unwrap();
    migrate(&mut src, &format!("tcp:127.0.0.1:{via}"));
    let info = wait_migration(&mut src, Duration::from_secs(60));
    check_report(&info, false);
    let during = last_pass(src_vm.lines(), 0).unwrap() - before;
    println!(
        "converter: {during} passes (as many conversions) during the migration, {} rounds; \
         marked plaintext pages seen: {}",
        info["ram"]["dirty-sync-count"],
        leaks.load(Ordering::SeqCst)
    );
    assert!(
        during >= 2,
        "the guest converted nothing during precopy: {info}"
    );
    assert_eq!(
        leaks.load(Ordering::SeqCst),
        0,
        "pages of the block left as plaintext while private"
    );
    verifies_on(&dst_vm, &mut dst, &src_vm.lines());
    let _ = std::fs::remove_file(key);
}

/// A target that dies, or stops reading, in the middle of precopy: the
/// source's guest never stopped running, the migration fails, and the
/// next one goes through.
fn a_target_killed_or_stalled_in_precopy_leaves_the_source_running() {
    let _one = one_vm();
    let key = key_file("gone.key", KEY);
    let (src_vm, mut src) = source("gone-src", &key);
    downtime_limit(&mut src, 1);
    // Killed: after 0.5 s of a transfer slowed to 64 MiB/s.
    let port = free_port();
    let (mut dst_vm, _dst) = target("gone-dst", &key, "256M", &format!("tcp:127.0.0.1:{port}"));
    let via = proxy(port, Damage::Throttle(64 << 20));
    migrate(&mut src, &format!("tcp:127.0.0.1:{via}"));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(status(&mut src), "running");
    dst_vm.child.kill().unwrap();
    let info = wait_migration(&mut src, Duration::from_secs(15));
    assert_eq!(info["status"], "failed", "{info}");
    assert_eq!(status(&mut src), "running");
    // Stalled: the target stops reading after 20 MiB.
    let port = free_port();
    let (_dst_vm, _dst) = target("gone-dst2", &key, "256M", &format!("tcp:127.0.0.1:{port}"));
    let via = proxy(port, Damage::Stall(20 << 20));
    let t = Instant::now();
    migrate(&mut src, &format!("tcp:127.0.0.1:{via}"));
    let info = wait_migration(&mut src, Duration::from_secs(30));
    assert_eq!(info["status"], "failed", "{info}");
    println!(
        "a stalled target failed the migration after {:?}: {}",
        t.elapsed(),
        info["error-desc"]
    );
    assert_eq!(status(&mut src), "running");
    let before = last_pass(src_vm.lines(), 0).unwrap();
    assert!(passes_beyond(&src_vm, 0, before));
    // And then one that works.
    downtime_limit(&mut src, 60000);
    let uri = format!("tcp:127.0.0.1:{}", free_port());
    let (dst_vm, mut dst) = target("gone-dst3", &key, "256M", &uri);
    migrate(&mut src, &uri);
    check_report(&wait_migration(&mut src, Duration::from_secs(30)), false);
    verifies_on(&dst_vm, &mut dst, &src_vm.lines());
    let _ = std::fs::remove_file(key);
}

/// One guest, hop after hop between new processes, verified after each:
/// A to B to A to B to A to B.
fn ping_pong_five_hops() {
    let _one = one_vm();
    let key = key_file("pingpong.key", KEY);
    let (mut vm, mut q) = source("hop0", &key);
    for hop in 1..=5 {
        let uri = format!("tcp:127.0.0.1:{}", free_port());
        let (next_vm, mut next, _) =
            start(&format!("hop{hop}"), &key, "256M", |a| a.incoming(&uri));
        let before = last_pass(vm.lines(), 0).unwrap_or(0);
        migrate(&mut q, &uri);
        check_report(&wait_migration(&mut q, Duration::from_secs(30)), false);
        assert_eq!(
            wait_migration(&mut next, Duration::from_secs(10))["status"],
            "completed"
        );
        assert_eq!(status(&mut next), "running", "hop {hop}");
        assert!(
            passes_beyond(&next_vm, 0, before + 1),
            "hop {hop}: the guest does not go on"
        );
        let lines = next_vm.lines();
        assert!(
            !lines.iter().any(|l| l.contains("MEMORY-ERROR")),
            "hop {hop}: {lines:?}"
        );
        downtime_limit(&mut next, 60000);
        drop(vm);
        (vm, q) = (next_vm, next);
        println!("hop {hop} verified");
    }
    let _ = std::fs::remove_file(key);
}

/// `cgsvmm migrate` drives a running source to a target and prints its
/// summary; `cgsvmm demo` does the whole thing on its own.
fn the_migrate_and_demo_commands_report_and_verify() {
    let _one = one_vm();
    let key = key_file("cmd.key", KEY);
    let (_src_vm, _src) = source("cmd-src", &key);
    let uri = format!("tcp:127.0.0.1:{}", free_port());
    let (dst_vm, mut dst, _) = start("cmd-dst", &key, "256M", |a| a.incoming(&uri));
    // The source's socket, as `start` named it (tmp_path would remove it).
    let sock = support::tmp_name("cmd-src.sock");
    let qmp = format!("unix:{}", sock.display());
    let (stdout, _) =
        support::run_ok(["migrate", "--qmp", &qmp, "--downtime-limit", "60000", &uri]);
    for want in [
        "completed",
        "total time",
        "downtime",
        "rounds",
        "Mbit/s",
        "private (through 2 helpers)",
    ] {
        assert!(stdout.contains(want), "{want:?} in {stdout}");
    }
    assert_eq!(status(&mut dst), "running");
    assert!(passes_beyond(&dst_vm, 0, 0));
    // A refused migration: the error, exit 1.
    let out = std::process::Command::new(support::binary())
        .args([
            "migrate",
            "--qmp",
            &format!("unix:{}", sock.display()),
            &uri,
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("postmigrate"));
    drop(dst_vm);
    let out = std::process::Command::new(support::binary())
        .args([
            "demo",
            "--memory",
            "128M",
            "--verify-seconds",
            "2",
            "--downtime-limit",
            "60000",
        ])
        .output()
        .unwrap();
    let (stdout, _) = support::succeeded(&out);
    assert!(
        stdout.contains("verified: the guest checked its memory"),
        "{stdout}"
    );
    println!("{stdout}");
    let _ = std::fs::remove_file(key);
}

/// The README's first migration, pasted into bash as a user would (with
/// this build's binary, a free port and private paths).
fn the_readme_migration_example_runs_as_pasted() {
    let _one = one_vm();
    let block = support::readme_block("## Migrating guests");
    let prefix = tmp_path("readme-mig").display().to_string();
    let port = free_port();
    let script = block
        .lines()
        .filter(|l| !l.starts_with("cargo build"))
        .collect::<Vec<_>>()
        .join("\n")
        .replace(
            "./target/release/cgsvmm",
            support::binary().to_str().unwrap(),
        )
        .replace("/tmp/cgsvmm-", &format!("{prefix}-"))
        .replace("127.0.0.1:4444", &format!("127.0.0.1:{port}"));
    assert!(
        script.contains(" migrate ") && script.contains("&\n"),
        "{script}"
    );
    let out = std::process::Command::new("timeout")
        .args(["120", "bash", "-e", "-c", &format!("{script}\nwait")])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let (stdout, _) = support::succeeded(&out);
    assert!(stdout.contains("\"status\": \"completed\""), "{stdout}");
    assert!(stdout.contains("\"status\": \"running\""), "{stdout}");
    assert!(stdout.contains("dirtier: vcpu"), "{stdout}");
    assert!(!stdout.contains("MEMORY-ERROR"), "{stdout}");
    for f in ["mig.key", "src.log", "dst.log"] {
        let _ = std::fs::remove_file(format!("{prefix}-{f}"));
    }
}

/// `quit` while the migration cannot connect (a Unix listener whose
/// backlog is full never completes connect(2)) or waits on a snapshot that
/// is a FIFO ends the process at once: nothing the VMM joins at exit
/// blocks.
fn quit_while_a_migration_is_stuck_connecting_exits_at_once() {
    let _one = one_vm();
    let key = key_file("trap.key", KEY);
    let (mut vm, mut q, _) = start("trap", &key, "256M", |a| a);
    let trap = tmp_path("trap.mig");
    let listener =
        socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None).unwrap();
    listener
        .bind(&socket2::SockAddr::unix(trap.path()).unwrap())
        .unwrap();
    listener.listen(0).unwrap();
    // Backlog 0 holds one connection; the VMM's is the second.
    let _first = std::os::unix::net::UnixStream::connect(trap.path()).unwrap();
    let r = call(
        &mut q,
        "migrate",
        json!({"uri": format!("unix:{}", trap.display())}),
    );
    assert!(r.get("return").is_some(), "{r}");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(q.cmd("query-migrate")["status"], "active");
    q.cmd("quit");
    let asked = Instant::now();
    assert_eq!(
        vm.wait_exit(Duration::from_secs(10)),
        Some(0),
        "{}",
        vm.stderr.lock().unwrap()
    );
    eprintln!("quit while connecting: exited in {:?}", asked.elapsed());

    let (mut dst_vm, mut dst, _) = start("fifo-dst", &key, "256M", |a| a.incoming("defer"));
    let fifo = tmp_path("snapshot.fifo");
    let path = std::ffi::CString::new(fifo.path().as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
    let r = call(
        &mut dst,
        "migrate-incoming",
        json!({"uri": format!("file:{}", fifo.display())}),
    );
    let desc = r["error"]["desc"].as_str().unwrap_or_default();
    assert!(desc.contains("not a regular file"), "{r}");
    dst.cmd("quit");
    assert_eq!(dst_vm.wait_exit(Duration::from_secs(10)), Some(0));
}

fn main() {
    support::run_tests(&[(
        support::kvm_missing(),
        &named!(
            a_stopped_dirtier_migrates_over_tcp_and_verifies_there,
            a_stopped_dirtier_migrates_over_a_unix_socket_and_verifies_there,
            a_snapshot_file_restores_in_new_processes,
            damaged_cut_short_or_mismatched_streams_fail_closed,
            a_damaged_or_truncated_snapshot_is_refused,
            migrate_cancel_during_the_transfer_then_a_second_migration_succeeds,
            incoming_defer_and_bad_requests,
            frames_altered_or_moved_on_the_way_are_refused,
            a_forged_acknowledgement_is_not_believed,
            a_migrated_guest_migrates_on,
            the_readme_migration_example_runs_as_pasted,
            a_running_dirtier_migrates_live_in_rounds,
            a_block_converted_during_precopy_never_leaves_as_plaintext,
            a_target_killed_or_stalled_in_precopy_leaves_the_source_running,
            ping_pong_five_hops,
            the_migrate_and_demo_commands_report_and_verify,
            quit_while_a_migration_is_stuck_connecting_exits_at_once,
        ),
    )]);
}
