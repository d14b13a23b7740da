//! The migration helper end to end inside one process: a source VM A whose
//! helper encrypts pages, a target VM B whose helper decrypts them, and the
//! host in between doing what a hostile host would do to the records.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use cgsvmm::config::{BootConfig, HelperLaunch, LabGuest, SerialConfig, VmmConfig};
use cgsvmm::memory::MIB;
use cgsvmm::Vmm;
use cgsvmm_fw_abi::helper::{caps, cmd};
use cgsvmm_migration::helper::{
    record_header, set_record_header, HelperClient, HelperError, HelperStatus, RECORD_STRIDE,
};

#[path = "../../tests/common.rs"]
mod common;
use common::vm_test;

const KEY: [u8; 32] = [0x42; 32];
const MEMORY: u64 = 32 * MIB;
const PAGE: usize = 4096;
const TIMEOUT: Duration = Duration::from_secs(5);

fn vm(guest: LabGuest, key: [u8; 32], helpers: usize, debug: bool) -> Vmm {
    vm_sealing(guest, key, helpers, debug, false)
}

/// A VM whose helper seals pages the general way (`generic_seal`) or the
/// fastest way this CPU allows.
fn vm_sealing(
    guest: LabGuest,
    key: [u8; 32],
    helpers: usize,
    debug: bool,
    generic_seal: bool,
) -> Vmm {
    let config = VmmConfig {
        memory: MEMORY,
        cpus: 1,
        mirror_cpus: helpers,
        boot: BootConfig::Lab(guest),
        qmp: None,
        serial: SerialConfig::Null,
        helper: Some(HelperLaunch {
            key: Some(key),
            debug,
            generic_seal,
        }),
        ..Default::default()
    };
    Vmm::try_from(config).expect("build VM")
}

/// A source VM whose dirtier ran a few passes and is now paused.
fn source() -> Vmm {
    let a = vm(LabGuest::Dirtier, KEY, 2, false);
    a.start().expect("start A");
    let start = Instant::now();
    while page(&a, 0x40_0000)[..8] == [0; 8]
        || u64::from_le_bytes(page(&a, 0x40_0000)[..8].try_into().unwrap()) < 3
    {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "dirtier made no progress"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    a.controller().lock().unwrap().stop().expect("pause A");
    a
}

/// A target VM: its helper runs, its guest never starts.
fn target(key: [u8; 32]) -> Vmm {
    let b = vm(LabGuest::Hello, key, 2, false);
    b.start_mirror().expect("start B's helpers");
    b
}

fn client(v: &Vmm, i: usize) -> HelperClient {
    let mut c = v.helper_client(i, TIMEOUT).expect("helper present");
    let hello = c.hello().expect("hello");
    assert_eq!(hello.helper_index as usize, i);
    c
}

fn page(v: &Vmm, gpa: u64) -> Vec<u8> {
    let mut buf = vec![0u8; PAGE];
    v.memory()
        .ram
        .read_slice(&mut buf, GuestAddress(gpa))
        .unwrap();
    buf
}

/// Source and target agree on a session; returns its id.
fn session(src: &mut HelperClient, dst: &mut HelperClient) -> [u8; 16] {
    let source_nonce = src.begin_source().expect("begin source");
    let (target_nonce, target_id) = dst.begin_target(source_nonce).expect("begin target");
    let source_id = src.complete_source(target_nonce).expect("complete source");
    assert_eq!(source_id, target_id, "both sides derive the same session");
    source_id
}

fn refused(r: Result<usize, HelperError>) -> HelperStatus {
    match r {
        Err(HelperError::Refused { status, .. }) => status,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn pages_round_trip_from_vm_a_into_vm_b_byte_for_byte() {
    let Some(_one) = vm_test() else { return };
    let (a, b) = (source(), target(KEY));
    let (mut src0, mut src1) = (client(&a, 0), client(&a, 1));
    let (mut dst0, mut dst1) = (client(&b, 0), client(&b, 1));
    session(&mut src0, &mut dst0);

    // Every page of guest RAM, split over both helpers on each side.
    let pages: Vec<(u64, u64)> = (0..MEMORY / PAGE as u64)
        .map(|p| (p * PAGE as u64, 1))
        .collect();
    let (first, second) = pages.split_at(pages.len() / 2);
    let mut records = (Vec::new(), Vec::new());
    src0.encrypt(first, &mut records.0).unwrap();
    src1.encrypt(second, &mut records.1).unwrap();
    assert_eq!(
        records.0.len() + records.1.len(),
        pages.len() * RECORD_STRIDE
    );
    // The records are not the plaintext.
    let a_page = page(&a, 0x40_0000);
    let at = (0x40_0000 / PAGE) * RECORD_STRIDE + 64;
    assert_ne!(&records.0[at..at + PAGE], &a_page[..]);

    assert_eq!(dst1.decrypt(&records.1).unwrap(), second.len());
    assert_eq!(dst0.decrypt(&records.0).unwrap(), first.len());
    let seal = src0.seal().unwrap();
    dst1.verify_seal(&seal).expect("seal verifies");

    let mut ram_a = vec![0u8; MEMORY as usize];
    let mut ram_b = vec![0u8; MEMORY as usize];
    a.memory()
        .ram
        .read_slice(&mut ram_a, GuestAddress(0))
        .unwrap();
    b.memory()
        .ram
        .read_slice(&mut ram_b, GuestAddress(0))
        .unwrap();
    assert!(ram_a == ram_b, "B's RAM differs from A's");
    a.shutdown();
    b.shutdown();
}

#[test]
fn two_helpers_writing_one_page_never_mix_its_generations() {
    let Some(_one) = vm_test() else { return };
    let a = vm(LabGuest::Hello, KEY, 1, false);
    a.start_mirror().unwrap();
    let b = target(KEY);
    let mut src = client(&a, 0);
    let (mut dst0, mut dst1) = (client(&b, 0), client(&b, 1));
    let pages: Vec<u64> = (0..256).map(|i| 0x50_0000 + i * PAGE as u64).collect();
    let fill = |v: u8| {
        for &gpa in &pages {
            a.memory()
                .ram
                .write_slice(&[v; PAGE], GuestAddress(gpa))
                .unwrap();
        }
    };
    for round in 0..4u8 {
        session(&mut src, &mut dst0);
        let stream = |src: &mut HelperClient, generation| {
            let list: Vec<(u64, u64)> = pages.iter().map(|&g| (g, generation)).collect();
            let mut out = Vec::new();
            src.encrypt(&list, &mut out).unwrap();
            out
        };
        fill(2 * round + 1);
        let older = stream(&mut src, 1);
        fill(2 * round + 2);
        let newer = stream(&mut src, 2);
        // A host hands both generations of every page to two helpers at
        // once: each page must end whole, and the newer.
        std::thread::scope(|s| {
            let old = s.spawn(|| dst0.decrypt(&older));
            let new = s.spawn(|| dst1.decrypt(&newer));
            assert_eq!(new.join().unwrap().unwrap(), pages.len());
            match old.join().unwrap() {
                Ok(_) => {}
                Err(HelperError::Refused {
                    status: HelperStatus::StaleGeneration,
                    ..
                }) => {}
                Err(e) => panic!("older stream: {e}"),
            }
        });
        for &gpa in &pages {
            assert_eq!(
                page(&b, gpa),
                vec![2 * round + 2; PAGE],
                "round {round}, {gpa:#x}"
            );
        }
    }
    a.shutdown();
    b.shutdown();
}

#[test]
fn both_seal_paths_interoperate() {
    let Some(_one) = vm_test() else { return };
    // The source seals through ring (what CPUs without VAES do); the target
    // opens with ring whatever the source's path. The VAES path is the
    // default elsewhere in these tests.
    let a = vm_sealing(LabGuest::Hello, KEY, 1, false, true);
    a.start_mirror().unwrap();
    let b = target(KEY);
    let mut src = a.helper_client(0, TIMEOUT).unwrap();
    let hello = src.hello().unwrap();
    assert_eq!(
        hello.caps & caps::VAES_PAGE_SEAL,
        0,
        "generic seal asked for"
    );
    let mut dst = client(&b, 0);
    session(&mut src, &mut dst);
    for i in 0..64u64 {
        a.memory()
            .ram
            .write_obj(i * 0x0101_0101, GuestAddress(0x50_0000 + i * 4096 + 8 * i))
            .unwrap();
    }
    let pages: Vec<(u64, u64)> = (0..64).map(|i| (0x50_0000 + i * 4096, 1)).collect();
    let mut records = Vec::new();
    src.encrypt(&pages, &mut records).unwrap();
    let mut flipped = records.clone();
    flipped[3 * RECORD_STRIDE + 64 + 7] ^= 4;
    // Records 0..3 apply, the flipped one fails, nothing after it applies.
    assert_eq!(refused(dst.decrypt(&flipped)), HelperStatus::AuthFailed);
    assert_ne!(page(&b, pages[4].0), page(&a, pages[4].0));
    assert_eq!(dst.decrypt(&records[3 * RECORD_STRIDE..]).unwrap(), 61);
    for &(gpa, _) in &pages {
        assert_eq!(page(&b, gpa), page(&a, gpa), "{gpa:#x}");
    }
    dst.verify_seal(&src.seal().unwrap()).unwrap();
    a.shutdown();
    b.shutdown();
}

#[test]
fn tampered_moved_replayed_and_foreign_records_fail_closed() {
    let Some(_one) = vm_test() else { return };
    let (a, b) = (source(), target(KEY));
    let (mut src, mut dst) = (client(&a, 0), client(&b, 0));
    session(&mut src, &mut dst);
    let gpa = 0x50_0000u64;
    let other = 0x60_0000u64;
    let untouched = (page(&b, gpa), page(&b, other));

    let mut gen1 = Vec::new();
    src.encrypt(&[(gpa, 1)], &mut gen1).unwrap();

    // Ciphertext bit flip.
    let mut flipped = gen1.clone();
    flipped[64 + 100] ^= 0x01;
    assert_eq!(refused(dst.decrypt(&flipped)), HelperStatus::AuthFailed);
    // Tag bit flip.
    let mut bad_tag = gen1.clone();
    bad_tag[32] ^= 0x80;
    assert_eq!(refused(dst.decrypt(&bad_tag)), HelperStatus::AuthFailed);
    // The record moved to another GPA.
    let mut moved = gen1.clone();
    let mut h = record_header(&moved, 0).unwrap();
    h.gpa = other;
    set_record_header(&mut moved, 0, &h);
    assert_eq!(refused(dst.decrypt(&moved)), HelperStatus::AuthFailed);
    // The record relabelled with another generation.
    let mut relabelled = gen1.clone();
    let mut h = record_header(&relabelled, 0).unwrap();
    h.generation = 7;
    set_record_header(&mut relabelled, 0, &h);
    assert_eq!(refused(dst.decrypt(&relabelled)), HelperStatus::AuthFailed);
    // A truncated batch never reaches the helper.
    assert!(matches!(
        dst.decrypt(&gen1[..RECORD_STRIDE - 100]),
        Err(HelperError::Truncated(_))
    ));
    assert_eq!(
        (page(&b, gpa), page(&b, other)),
        untouched,
        "B changed after rejected records"
    );

    // A newer generation applies; the older one replayed afterwards does not.
    a.memory()
        .ram
        .write_obj(0xdead_beef_u64, GuestAddress(gpa + 8))
        .unwrap();
    let mut gen2 = Vec::new();
    src.encrypt(&[(gpa, 2)], &mut gen2).unwrap();
    assert_eq!(dst.decrypt(&gen2).unwrap(), 1);
    assert_eq!(page(&b, gpa), page(&a, gpa));
    assert_eq!(refused(dst.decrypt(&gen1)), HelperStatus::StaleGeneration);
    assert_eq!(refused(dst.decrypt(&gen2)), HelperStatus::StaleGeneration);
    assert_eq!(page(&b, gpa), page(&a, gpa), "a replay changed the page");

    // A record of an earlier session is refused in a new one.
    session(&mut src, &mut dst);
    let before = page(&b, gpa);
    let mut h = record_header(&gen2, 0).unwrap();
    h.generation = 3;
    let mut old_session = gen2.clone();
    set_record_header(&mut old_session, 0, &h);
    assert_eq!(refused(dst.decrypt(&gen2)), HelperStatus::AuthFailed);
    assert_eq!(refused(dst.decrypt(&old_session)), HelperStatus::AuthFailed);
    assert_eq!(page(&b, gpa), before);

    // GPAs outside guest RAM are refused on both sides.
    let mut out = Vec::new();
    for bad in [MEMORY, 0xf800_0000, 0xf810_0000, 0x40_0010] {
        assert!(matches!(
            src.encrypt(&[(bad, 1)], &mut out),
            Err(HelperError::Refused {
                status: HelperStatus::BadGpa,
                ..
            })
        ));
    }
    let mut into_helper = gen1.clone();
    let mut h = record_header(&into_helper, 0).unwrap();
    h.gpa = 0xf810_0000;
    set_record_header(&mut into_helper, 0, &h);
    assert_eq!(refused(dst.decrypt(&into_helper)), HelperStatus::BadGpa);
    a.shutdown();
    b.shutdown();
}

#[test]
fn a_failing_record_stops_its_stream_with_later_requests_already_queued() {
    let Some(_one) = vm_test() else { return };
    let (a, b) = (source(), target(KEY));
    let (mut src, mut dst) = (client(&a, 0), client(&b, 0));
    session(&mut src, &mut dst);
    // 100 pages: several requests, up to QUEUE_DEPTH of them queued at once.
    let base = 0x50_0000u64;
    let pages: Vec<(u64, u64)> = (0..100).map(|i| (base + i * PAGE as u64, 1)).collect();
    let mut records = Vec::new();
    src.encrypt(&pages, &mut records).unwrap();
    let before: Vec<Vec<u8>> = pages.iter().map(|&(gpa, _)| page(&b, gpa)).collect();

    let bad = 37;
    let mut tampered = records.clone();
    tampered[bad * RECORD_STRIDE + 64 + 5] ^= 0x10;
    match dst.decrypt(&tampered) {
        Err(HelperError::Refused {
            status: HelperStatus::AuthFailed,
            record,
            ..
        }) => assert_eq!(record as usize, bad),
        other => panic!("expected an authentication failure, got {other:?}"),
    }
    for (i, &(gpa, _)) in pages.iter().enumerate() {
        if i < bad {
            assert_eq!(page(&b, gpa), page(&a, gpa), "record {i} was not applied");
        } else {
            assert_eq!(
                page(&b, gpa),
                before[i],
                "record {i} applied after the failure"
            );
        }
    }

    // The client's queue is clean: the rest of the stream goes through.
    let rest = &records[(bad + 1) * RECORD_STRIDE..];
    assert_eq!(dst.decrypt(rest).unwrap(), pages.len() - bad - 1);
    assert_eq!(
        page(&b, pages[99].0),
        page(&a, pages[99].0),
        "the stream after the failure did not apply"
    );

    // An encrypt stream stops at a bad GPA in the same way, and the next
    // stream works.
    let mut with_bad = pages.clone();
    with_bad[70].0 = MEMORY;
    let mut out = Vec::new();
    match src.encrypt(&with_bad, &mut out) {
        Err(HelperError::Refused {
            status: HelperStatus::BadGpa,
            record,
            ..
        }) => assert_eq!(record, 70),
        other => panic!("expected a bad GPA, got {other:?}"),
    }
    let mut again = Vec::new();
    src.encrypt(&pages[..20], &mut again).unwrap();
    assert_eq!(again.len(), 20 * RECORD_STRIDE);
    a.shutdown();
    b.shutdown();
}

#[test]
fn wrong_transport_key_is_an_authentication_failure() {
    let Some(_one) = vm_test() else { return };
    let (a, b) = (source(), target([0x43; 32]));
    let (mut src, mut dst) = (client(&a, 0), client(&b, 0));
    let source_nonce = src.begin_source().unwrap();
    let (target_nonce, target_id) = dst.begin_target(source_nonce).unwrap();
    let source_id = src.complete_source(target_nonce).unwrap();
    assert_ne!(source_id, target_id);
    let before = page(&b, 0x40_0000);
    let mut records = Vec::new();
    src.encrypt(&[(0x40_0000, 1)], &mut records).unwrap();
    assert_eq!(refused(dst.decrypt(&records)), HelperStatus::AuthFailed);
    assert_eq!(page(&b, 0x40_0000), before);
    a.shutdown();
    b.shutdown();
}

#[test]
fn the_sealed_end_record_catches_a_missing_page() {
    let Some(_one) = vm_test() else { return };
    let (a, b) = (source(), target(KEY));
    let (mut src, mut dst) = (client(&a, 0), client(&b, 0));
    session(&mut src, &mut dst);
    let mut records = Vec::new();
    src.encrypt(
        &[(0x40_0000, 1), (0x40_1000, 1), (0x40_2000, 1)],
        &mut records,
    )
    .unwrap();
    // The host drops the middle record.
    let mut delivered = records[..RECORD_STRIDE].to_vec();
    delivered.extend_from_slice(&records[2 * RECORD_STRIDE..]);
    assert_eq!(dst.decrypt(&delivered).unwrap(), 2);
    let seal = src.seal().unwrap();
    let err = dst.verify_seal(&seal).unwrap_err();
    assert!(
        matches!(
            err,
            HelperError::Refused {
                status: HelperStatus::SealMismatch,
                ..
            }
        ),
        "{err}"
    );
    // A forged seal does not authenticate; the complete stream verifies.
    let mut forged = seal;
    forged.ciphertext[0] ^= 1;
    let err = dst.verify_seal(&forged).unwrap_err();
    assert!(
        matches!(
            err,
            HelperError::Refused {
                status: HelperStatus::AuthFailed,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        dst.decrypt(&records[RECORD_STRIDE..2 * RECORD_STRIDE])
            .unwrap(),
        1
    );
    dst.verify_seal(&seal).expect("complete stream verifies");
    a.shutdown();
    b.shutdown();
}

#[test]
fn seed_protocol_round_trips_one_page_at_a_time() {
    let Some(_one) = vm_test() else { return };
    let (a, b) = (source(), target(KEY));
    let (mut src, mut dst) = (client(&a, 0), client(&b, 0));
    session(&mut src, &mut dst);
    src.seed_init().unwrap();
    let mut header = Vec::new();
    let mut enc = [0u8; PAGE];
    for gpa in [0x40_0000u64, 0x41_0000, 0x1f_f000] {
        src.seed_encrypt(gpa, &mut header, &mut enc).unwrap();
        assert_ne!(&enc[..], &page(&a, gpa)[..]);
        dst.seed_decrypt(gpa, &header, &enc).unwrap();
        assert_eq!(page(&b, gpa), page(&a, gpa));
    }
    // Replaying the last page's envelope is refused.
    let err = dst.seed_decrypt(0x1f_f000, &header, &enc).unwrap_err();
    assert!(
        matches!(
            err,
            HelperError::Refused {
                status: HelperStatus::StaleGeneration,
                ..
            }
        ),
        "{err}"
    );
    a.shutdown();
    b.shutdown();
}

#[test]
fn a_hung_or_crashed_helper_is_a_typed_error_within_the_limit() {
    let Some(_one) = vm_test() else { return };
    let v = vm(LabGuest::Hello, KEY, 2, true);
    v.start_mirror().unwrap();
    let limit = Duration::from_millis(500);
    let mut hang = v.helper_client(0, limit).unwrap();
    hang.hello().unwrap();
    let start = Instant::now();
    let err = hang.raw_command(cmd::DEBUG_HANG).unwrap_err();
    let took = start.elapsed();
    assert!(
        matches!(err, HelperError::Timeout { index: 0, .. }),
        "{err}"
    );
    assert!(
        took >= limit && took < limit + Duration::from_secs(1),
        "took {took:?}"
    );

    let mut crash = v.helper_client(1, TIMEOUT).unwrap();
    crash.hello().unwrap();
    let start = Instant::now();
    let err = crash.raw_command(cmd::DEBUG_FAULT).unwrap_err();
    assert!(matches!(err, HelperError::Fault { index: 1, .. }), "{err}");
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "fault took {:?}",
        start.elapsed()
    );
    // The VM itself is unaffected.
    assert_eq!(v.exit_handle().reason(), None);
    v.shutdown();

    // Without the debug flag the commands are refused.
    let w = vm(LabGuest::Hello, KEY, 1, false);
    w.start_mirror().unwrap();
    let mut c = client(&w, 0);
    assert!(matches!(
        c.raw_command(cmd::DEBUG_FAULT),
        Err(HelperError::Refused {
            status: HelperStatus::DebugDisabled,
            ..
        })
    ));
    w.shutdown();
}

#[test]
fn idle_helpers_leave_the_cpu_and_wake_for_work() {
    let Some(_one) = vm_test() else { return };
    let b = target(KEY);
    let mut c = client(&b, 0);
    let before = c.heartbeat();
    std::thread::sleep(Duration::from_millis(200));
    let woke = c.heartbeat() - before;
    // Waiting 10 ms at a time, an idle helper wakes ~20 times in 200 ms;
    // one that spun would never have bumped its heartbeat at all.
    assert!((3..=100).contains(&woke), "idle wake-ups in 200 ms: {woke}");
    // A request to a sleeping helper is answered promptly (the doorbell).
    let start = Instant::now();
    c.hello().unwrap();
    assert!(
        start.elapsed() < Duration::from_millis(8),
        "hello took {:?}",
        start.elapsed()
    );
    // Its vCPU thread is mostly asleep: little CPU over 300 ms.
    let cpu = |tid: i32| {
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
        let fields: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap()
            .split_whitespace()
            .collect();
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    };
    let tids: Vec<i32> = b
        .controller()
        .lock()
        .unwrap()
        .mirror_info()
        .iter()
        .map(|m| m.thread_id)
        .collect();
    let t0: u64 = tids.iter().map(|&t| cpu(t)).sum();
    std::thread::sleep(Duration::from_millis(300));
    let ticks: u64 = tids.iter().map(|&t| cpu(t)).sum::<u64>() - t0;
    // 300 ms of one busy core would be ~30 ticks per helper.
    assert!(
        ticks <= 6,
        "idle helpers used {ticks} clock ticks in 300 ms"
    );
    b.shutdown();
}
