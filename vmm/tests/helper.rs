//! The migration helper end to end inside one process: a source VM A whose
//! helper encrypts pages, a target VM B whose helper decrypts them, and the
//! host in between doing what a hostile host would do to the records.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use cgsvmm_fw_abi::helper::{caps, cmd};
use cgsvmm_migration::helper::{
    record_header, set_record_header, GpaRange, HelperClient, HelperError, HelperStatus,
    RECORD_STRIDE,
};
use cgsvmm_vmm::boot::cpl3::MIRROR_LAYOUT;
use cgsvmm_vmm::config::{BootConfig, HelperLaunch, LabGuest, SerialConfig, VmmConfig};
use cgsvmm_vmm::memory::MIB;
use cgsvmm_vmm::Vmm;

use cgsvmm_test_support::{self as support, named};
use support::one_vm;

const KEY: [u8; 32] = [0x42; 32];
const MEMORY: u64 = 32 * MIB;
use cgsvmm_fw_abi::PAGE_SIZE as PAGE;
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
            // Most of these VMs receive pages at some point.
            incoming: true,
            ..Default::default()
        }),
        ..Default::default()
    };
    Vmm::try_from(config).expect("build VM")
}

/// A source VM whose dirtier ran a few passes and is now paused.
fn source() -> Vmm {
    let a = vm(LabGuest::Dirtier, KEY, 2, false);
    a.start().expect("start A");
    let passes = || u64::from_le_bytes(page(&a, 0x40_0000)[..8].try_into().unwrap());
    assert!(
        support::wait_until(Duration::from_secs(10), || passes() >= 3),
        "dirtier made no progress"
    );
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

/// Source and target agree on a session (ending any before); returns its
/// id.
fn session(src: &mut HelperClient, dst: &mut HelperClient) -> [u8; 16] {
    src.end().expect("end source session");
    dst.end().expect("end target session");
    let source_nonce = src.begin_source().expect("begin source");
    let (target_nonce, target_id) = dst.begin_target(source_nonce).expect("begin target");
    let source_id = src.complete_source(target_nonce).expect("complete source");
    assert_eq!(source_id, target_id, "both sides derive the same session");
    source_id
}

/// Guest RAM outside `pages` (sorted), as the shared ranges SEAL and
/// VERIFY_SEAL take: the pages a test did not send are declared shared.
fn shared_except(pages: &[u64]) -> Vec<GpaRange> {
    let mut out = Vec::new();
    let mut cursor = 0;
    for &gpa in pages {
        if gpa > cursor {
            out.push(GpaRange {
                start: cursor,
                end: gpa,
            });
        }
        cursor = gpa + PAGE as u64;
    }
    if cursor < MEMORY {
        out.push(GpaRange {
            start: cursor,
            end: MEMORY,
        });
    }
    out
}

fn refused<T: std::fmt::Debug>(r: Result<T, HelperError>) -> HelperStatus {
    match r {
        Err(HelperError::Refused { status, .. }) => status,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn pages_round_trip_from_vm_a_into_vm_b_byte_for_byte() {
    let _one = one_vm();
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
    // Every page went through the helpers: nothing is declared shared.
    let seal = src0.seal(&[]).unwrap();
    dst1.verify_seal(&seal, &[]).expect("seal verifies");

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

fn two_helpers_writing_one_page_never_mix_its_generations() {
    let _one = one_vm();
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

fn both_seal_paths_interoperate() {
    let _one = one_vm();
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
    let gpas: Vec<u64> = pages.iter().map(|p| p.0).collect();
    let shared = shared_except(&gpas);
    dst.verify_seal(&src.seal(&shared).unwrap(), &shared)
        .unwrap();
    a.shutdown();
    b.shutdown();
}

fn tampered_moved_replayed_and_foreign_records_fail_closed() {
    let _one = one_vm();
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

fn a_failing_record_stops_its_stream_with_later_requests_already_queued() {
    let _one = one_vm();
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
    // (The pages were sealed at generation 1 already: newer ones now.)
    let mut with_bad: Vec<(u64, u64)> = pages.iter().map(|&(gpa, _)| (gpa, 2)).collect();
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
    let newer: Vec<(u64, u64)> = pages[..20].iter().map(|&(gpa, _)| (gpa, 3)).collect();
    src.encrypt(&newer, &mut again).unwrap();
    assert_eq!(again.len(), 20 * RECORD_STRIDE);
    a.shutdown();
    b.shutdown();
}

fn wrong_transport_key_is_an_authentication_failure() {
    let _one = one_vm();
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

fn the_sealed_end_record_catches_a_missing_page() {
    let _one = one_vm();
    let (a, b) = (source(), target(KEY));
    let (mut src, mut dst) = (client(&a, 0), client(&b, 0));
    let gpas = [0x40_0000u64, 0x40_1000, 0x40_2000];
    let pages: Vec<(u64, u64)> = gpas.iter().map(|&g| (g, 1)).collect();
    let declared = shared_except(&gpas);
    let without_middle = shared_except(&[gpas[0], gpas[2]]);
    let stream = |src: &mut HelperClient, dst: &mut HelperClient| {
        session(src, dst);
        let mut records = Vec::new();
        src.encrypt(&pages, &mut records).unwrap();
        records
    };
    let status = |r: Result<(), HelperError>| refused(r.map(|()| 0));

    // The host drops the middle record: the target never wrote that page.
    let records = stream(&mut src, &mut dst);
    let seal = src.seal(&declared).unwrap();
    let mut delivered = records[..RECORD_STRIDE].to_vec();
    delivered.extend_from_slice(&records[2 * RECORD_STRIDE..]);
    assert_eq!(dst.decrypt(&delivered).unwrap(), 2);
    assert_eq!(
        status(dst.verify_seal(&seal, &declared)),
        HelperStatus::Incomplete
    );
    // VERIFY_SEAL ended the session: the missing record cannot follow.
    assert_eq!(
        refused(dst.decrypt(&records[RECORD_STRIDE..2 * RECORD_STRIDE])),
        HelperStatus::SessionClosed
    );

    // The host drops it and declares that page shared on both sides: the
    // count in the seal gives it away.
    let records = stream(&mut src, &mut dst);
    let seal = src.seal(&without_middle).unwrap();
    assert_eq!(dst.decrypt(&delivered_from(&records)).unwrap(), 2);
    assert_eq!(
        status(dst.verify_seal(&seal, &without_middle)),
        HelperStatus::SealMismatch
    );

    // Everything delivered, but the target's host declares other shared
    // ranges than the source's: the seal carries their hash.
    let records = stream(&mut src, &mut dst);
    let seal = src.seal(&declared).unwrap();
    assert_eq!(dst.decrypt(&records).unwrap(), 3);
    let mut other = declared.clone();
    other[0].end -= PAGE as u64;
    other.insert(
        1,
        GpaRange {
            start: other[0].end,
            end: other[0].end + PAGE as u64,
        },
    );
    assert_eq!(
        status(dst.verify_seal(&seal, &other)),
        HelperStatus::SealMismatch
    );

    // A forged seal does not authenticate; the complete stream verifies.
    let records = stream(&mut src, &mut dst);
    let seal = src.seal(&declared).unwrap();
    assert_eq!(dst.decrypt(&records).unwrap(), 3);
    let mut forged = seal;
    forged.ciphertext[0] ^= 1;
    assert_eq!(
        status(dst.verify_seal(&forged, &declared)),
        HelperStatus::AuthFailed
    );
    let records = stream(&mut src, &mut dst);
    let seal = src.seal(&declared).unwrap();
    assert_eq!(dst.decrypt(&records).unwrap(), 3);
    dst.verify_seal(&seal, &declared)
        .expect("complete stream verifies");
    a.shutdown();
    b.shutdown();
}

/// Records 0 and 2 of a three-record stream.
fn delivered_from(records: &[u8]) -> Vec<u8> {
    let mut out = records[..RECORD_STRIDE].to_vec();
    out.extend_from_slice(&records[2 * RECORD_STRIDE..]);
    out
}

fn seed_protocol_round_trips_one_page_at_a_time() {
    let _one = one_vm();
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

fn a_hung_or_crashed_helper_is_a_typed_error_within_the_limit() {
    let _one = one_vm();
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

fn idle_helpers_leave_the_cpu_and_wake_for_work() {
    let _one = one_vm();
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
    let cpu = |tid: i32| support::cpu_ticks(std::process::id(), tid as u32);
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

/// A VM with `helpers` helper vCPUs launched as `launch` says (key and
/// anything else), its guest not started, its helpers not yet started.
fn vm_launch(helpers: usize, launch: HelperLaunch) -> Vmm {
    let config = VmmConfig {
        memory: MEMORY,
        cpus: 1,
        mirror_cpus: helpers,
        boot: BootConfig::Lab(LabGuest::Hello),
        serial: SerialConfig::Null,
        helper: Some(launch),
        ..Default::default()
    };
    Vmm::try_from(config).expect("build VM")
}

/// Launched with `key`, for incoming migration.
fn keyed(key: [u8; 32]) -> HelperLaunch {
    HelperLaunch {
        key: Some(key),
        incoming: true,
        ..Default::default()
    }
}

/// Gives mirror vCPU `vcpu` the helper index `index` (as a host could).
fn set_helper_index(v: &Vmm, vcpu: usize, index: u64) {
    let params = MIRROR_LAYOUT.params_gpa(vcpu);
    let offset = std::mem::offset_of!(cgsvmm_fw_abi::MirrorParams, vcpu_index) as u64;
    v.memory()
        .mirror
        .write_obj(index, GuestAddress(params + offset))
        .unwrap();
}

/// A HELLO to helper `i`'s mailbox, with a short limit: whether anybody
/// answers it.
fn answers(v: &Vmm, i: usize) -> bool {
    let mut c = v.helper_client(i, Duration::from_millis(300)).unwrap();
    match c.hello() {
        Ok(_) => true,
        Err(HelperError::Timeout { .. }) => false,
        Err(e) => panic!("helper {i}: {e}"),
    }
}

fn begin_racing_encrypt_on_another_helper_never_repeats_a_nonce() {
    let _one = one_vm();
    let a = vm(LabGuest::Hello, KEY, 2, false);
    a.start_mirror().unwrap();
    let b = target(KEY);
    let (mut s0, mut s1, mut dst) = (client(&a, 0), client(&a, 1), client(&b, 0));
    session(&mut s0, &mut dst);
    // BEGIN while a session is open is refused outright.
    assert_eq!(refused(s0.begin_source()), HelperStatus::SessionOpen);
    assert_eq!(
        refused(dst.begin_target([1; 32])),
        HelperStatus::SessionOpen
    );

    // Helper 0 ends and begins sessions while helper 1 encrypts: every
    // nonce of the run must be new (counters are never reset within a
    // boot, and reserved under the session lock). Every other session
    // ends as soon as it is complete, racing an encrypt in flight; the
    // others stay open until a batch got through (or 2 ms passed), so the
    // race runs on however loaded a host: the loop ends once both sides
    // have done enough, or at its deadline.
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::time::{Duration, Instant};
    const ENOUGH: u64 = 20;
    let stop = AtomicBool::new(false);
    let batches = AtomicU64::new(0);
    let sessions = AtomicU64::new(0);
    let pages: Vec<(u64, u64)> = (0..64).map(|i| (0x50_0000 + i * PAGE as u64, 1)).collect();
    let mut seen = std::collections::HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    std::thread::scope(|s| {
        let churn = s.spawn(|| {
            let mut n = 0u8;
            while !stop.load(Ordering::Relaxed) {
                s0.end().unwrap();
                s0.begin_source().unwrap();
                s0.complete_source([n; 32]).unwrap();
                if n % 2 == 1 {
                    let before = batches.load(Ordering::Relaxed);
                    let until = Instant::now() + Duration::from_millis(2);
                    while batches.load(Ordering::Relaxed) == before && Instant::now() < until {
                        std::thread::yield_now();
                    }
                }
                n = n.wrapping_add(1);
                sessions.fetch_add(1, Ordering::Relaxed);
            }
        });
        let mut failure = None;
        let mut round = 0u64;
        while Instant::now() < deadline
            && (batches.load(Ordering::Relaxed) < ENOUGH
                || sessions.load(Ordering::Relaxed) < ENOUGH)
        {
            // A new generation each round: the source seals a page only
            // at ever newer generations within a session.
            round += 1;
            let batch: Vec<(u64, u64)> = pages.iter().map(|&(gpa, _)| (gpa, round)).collect();
            let mut out = Vec::new();
            match s1.encrypt(&batch, &mut out) {
                Ok(()) => {
                    batches.fetch_add(1, Ordering::Relaxed);
                    for i in 0..pages.len() {
                        let nonce = record_header(&out, i).unwrap().nonce;
                        if !seen.insert(nonce) {
                            failure = Some(format!("nonce {nonce:02x?} used twice"));
                        }
                    }
                }
                Err(HelperError::Refused {
                    status: HelperStatus::NoSession,
                    ..
                }) => {}
                Err(e) => failure = Some(format!("encrypt: {e}")),
            }
            if failure.is_some() {
                break;
            }
        }
        stop.store(true, Ordering::Relaxed);
        churn.join().unwrap();
        assert_eq!(failure, None);
    });
    let (batches, sessions) = (batches.into_inner(), sessions.into_inner());
    println!(
        "{batches} batches in {sessions} sessions, {} nonces, none twice",
        seen.len()
    );
    assert!(
        batches >= ENOUGH && sessions >= ENOUGH,
        "the race did not happen in 30 s: {batches} batches, {sessions} sessions"
    );
    a.shutdown();
    b.shutdown();
}

fn begin_target_racing_decrypt_never_tears_or_replays_a_page() {
    let _one = one_vm();
    let a = vm(LabGuest::Hello, KEY, 1, false);
    a.start_mirror().unwrap();
    let b = vm(LabGuest::Hello, KEY, 3, false);
    b.start_mirror().unwrap();
    let mut src = client(&a, 0);
    let (mut dst0, mut dst1, mut dst2) = (client(&b, 0), client(&b, 1), client(&b, 2));
    let pages: Vec<u64> = (0..128).map(|i| 0x50_0000 + i * PAGE as u64).collect();
    let stream = |src: &mut HelperClient, fill: u8, generation: u64| {
        for &gpa in &pages {
            a.memory()
                .ram
                .write_slice(&[fill; PAGE], GuestAddress(gpa))
                .unwrap();
        }
        let list: Vec<(u64, u64)> = pages.iter().map(|&g| (g, generation)).collect();
        let mut records = Vec::new();
        src.encrypt(&list, &mut records).unwrap();
        records
    };
    // How many records of a stream applied (all before the one that failed,
    // when the race cut it).
    let applied = |r: Result<usize, HelperError>, what: &str| match r {
        Ok(n) => n,
        Err(HelperError::Refused {
            status:
                HelperStatus::AuthFailed | HelperStatus::NoSession | HelperStatus::StaleGeneration,
            record,
            ..
        }) => record as usize,
        Err(e) => panic!("{what}: {e}"),
    };
    for round in 1..=20u8 {
        session(&mut src, &mut dst0);
        let (older, newer) = (
            stream(&mut src, 2 * round - 1, 1),
            stream(&mut src, 2 * round, 2),
        );
        // Two helpers write both generations of every page at once while a
        // third ends the session and begins a new one (resetting the
        // generation table under the session lock).
        std::thread::scope(|s| {
            let old = s.spawn(|| dst0.decrypt(&older));
            let new = s.spawn(|| dst2.decrypt(&newer));
            std::thread::sleep(Duration::from_micros(40 * u64::from(round)));
            dst1.end().unwrap();
            dst1.begin_target([round; 32]).unwrap();
            let _ = applied(old.join().unwrap(), "older stream");
            let newer_applied = applied(new.join().unwrap(), "newer stream");
            // Every page is whole (one content the source sealed, never a
            // mix), and every page the newer stream wrote still holds it:
            // the older generation never lands over it.
            for (i, &gpa) in pages.iter().enumerate() {
                let p = page(&b, gpa);
                assert!(
                    p.iter().all(|&x| x == p[0]) && p[0] <= 2 * round,
                    "round {round}: torn page {gpa:#x}"
                );
                if i < newer_applied {
                    assert_eq!(
                        p[0],
                        2 * round,
                        "round {round}: older over newer at {gpa:#x}"
                    );
                }
            }
        });
        // The old session's records never apply in the new one.
        assert_eq!(refused(dst0.decrypt(&newer)), HelperStatus::AuthFailed);
    }
    // A clean session after all that applies every page and verifies.
    session(&mut src, &mut dst0);
    let records = stream(&mut src, 0xee, 1);
    assert_eq!(dst1.decrypt(&records).unwrap(), pages.len());
    let shared = shared_except(&pages);
    dst0.verify_seal(&src.seal(&shared).unwrap(), &shared)
        .unwrap();
    for &gpa in &pages {
        assert_eq!(page(&b, gpa), vec![0xee; PAGE]);
    }
    a.shutdown();
    b.shutdown();
}

fn sessions_close_no_encrypt_after_seal_no_decrypt_after_verify() {
    let _one = one_vm();
    let (a, b) = (source(), target(KEY));
    let (mut src, mut dst) = (client(&a, 0), client(&b, 0));
    session(&mut src, &mut dst);
    let first = [0x40_0000u64, 0x40_1000];
    let mut r = Vec::new();
    src.encrypt(&[(first[0], 1), (first[1], 1)], &mut r)
        .unwrap();
    let shared = shared_except(&first);
    let seal = src.seal(&shared).unwrap();
    let mut late = Vec::new();
    assert_eq!(
        refused(src.encrypt(&[(0x40_2000, 1)], &mut late)),
        HelperStatus::SessionClosed
    );
    assert_eq!(refused(src.seal(&shared)), HelperStatus::SessionClosed);
    assert!(late.is_empty());
    let (mut header, mut p) = (Vec::new(), [0u8; PAGE]);
    assert_eq!(
        refused(src.seed_encrypt(0x40_3000, &mut header, &mut p)),
        HelperStatus::SessionClosed
    );

    assert_eq!(dst.decrypt(&r).unwrap(), 2);
    dst.verify_seal(&seal, &shared).unwrap();
    let before = page(&b, first[0]);
    assert_eq!(refused(dst.decrypt(&r)), HelperStatus::SessionClosed);
    assert_eq!(
        refused(dst.verify_seal(&seal, &shared)),
        HelperStatus::SessionClosed
    );
    assert_eq!(page(&b, first[0]), before);
    // END, then the source can begin anew (the target took its one
    // migration: see the incoming test).
    src.end().unwrap();
    src.begin_source().unwrap();
    a.shutdown();
    b.shutdown();
}

fn a_stream_that_skips_a_private_page_fails_seal_and_verify() {
    let _one = one_vm();
    let (a, b) = (source(), target(KEY));
    let (mut src, mut dst) = (client(&a, 0), client(&b, 0));
    session(&mut src, &mut dst);
    // Half of RAM declared shared, the other half private: the host sends
    // all private pages but one.
    let private: Vec<u64> = (MEMORY / 2 / PAGE as u64..MEMORY / PAGE as u64)
        .map(|p| p * PAGE as u64)
        .collect();
    let shared = [GpaRange {
        start: 0,
        end: MEMORY / 2,
    }];
    let skipped = private[777];
    let sent: Vec<(u64, u64)> = private
        .iter()
        .filter(|&&g| g != skipped)
        .map(|&g| (g, 1))
        .collect();
    let mut records = Vec::new();
    src.encrypt(&sent, &mut records).unwrap();
    match src.seal(&shared) {
        Err(HelperError::Refused {
            status: HelperStatus::Incomplete,
            record,
            ..
        }) => assert_eq!(
            u64::from(record),
            skipped / PAGE as u64,
            "names the missing page"
        ),
        other => panic!("SEAL of an incomplete stream: {other:?}"),
    }
    // Malformed shared ranges are refused, not skipped over.
    let overlapping = [
        GpaRange {
            start: 0,
            end: 0x2000,
        },
        GpaRange {
            start: 0x1000,
            end: MEMORY / 2,
        },
    ];
    assert_eq!(refused(src.seal(&overlapping)), HelperStatus::BadRanges);
    let outside = [GpaRange {
        start: 0,
        end: MEMORY + PAGE as u64,
    }];
    assert_eq!(refused(src.seal(&outside)), HelperStatus::BadRanges);
    // A refused SEAL leaves the session open: the missing page follows.
    let mut last = Vec::new();
    src.encrypt(&[(skipped, 1)], &mut last).unwrap();
    let seal = src.seal(&shared).unwrap();

    // The target got everything but that page.
    assert_eq!(dst.decrypt(&records).unwrap(), sent.len());
    assert_eq!(
        refused(dst.verify_seal(&seal, &shared)),
        HelperStatus::Incomplete
    );
    a.shutdown();
    b.shutdown();
}

fn two_helpers_configured_with_one_index_never_share_a_mailbox() {
    let _one = one_vm();
    // Mirror vCPU 1 is told it is helper 0 too; vCPU 2 that it is helper 9
    // of 3.
    let b = vm_launch(3, keyed(KEY));
    set_helper_index(&b, 1, 0);
    set_helper_index(&b, 2, 9);
    b.start_mirror().unwrap();
    let a = vm(LabGuest::Hello, KEY, 1, false);
    a.start_mirror().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert!(answers(&b, 0), "the first claimant of index 0 serves it");
    assert!(!answers(&b, 1), "nobody claimed index 1");
    assert!(!answers(&b, 2), "index 9 of 3 was refused");
    // The one helper on mailbox 0 works it alone: streams apply whole.
    let (mut src, mut dst) = (client(&a, 0), client(&b, 0));
    session(&mut src, &mut dst);
    let pages: Vec<(u64, u64)> = (0..512).map(|i| (0x50_0000 + i * PAGE as u64, 1)).collect();
    for i in 0..pages.len() as u64 {
        a.memory()
            .ram
            .write_obj(i ^ 0x5a5a, GuestAddress(0x50_0000 + i * PAGE as u64))
            .unwrap();
    }
    let mut records = Vec::new();
    src.encrypt(&pages, &mut records).unwrap();
    assert_eq!(dst.decrypt(&records).unwrap(), pages.len());
    for &(gpa, _) in &pages {
        assert_eq!(page(&b, gpa), page(&a, gpa), "{gpa:#x}");
    }
    // Neither refused vCPU faulted or stopped the VM.
    assert_eq!(b.exit_handle().reason(), None);
    a.shutdown();
    b.shutdown();
}

fn a_helper_with_unusable_ram_ranges_serves_nothing() {
    let _one = one_vm();
    let header = cgsvmm_vmm::boot::images::HELPER.helper_header().unwrap();
    let ram = std::mem::offset_of!(cgsvmm_fw_abi::helper::HelperConfig, ram) as u64;
    // More pages than the generation table has entries (the completeness
    // walk would read past it).
    let past_the_table = 0x1_0000_0000 + (header.gen_table_size / 4 + 1) * PAGE as u64;
    let bad: [(u64, u64); 4] = [
        (0x1000, 0x800),        // reversed and unaligned
        (0, 0xf900_0000),       // over the helper's own region
        (0x10_0000, 0x10_0000), // empty
        (0x1_0000_0000, past_the_table),
    ];
    for (start, end) in bad {
        let b = vm_launch(1, keyed(KEY));
        let mem = &b.memory().mirror;
        mem.write_obj(start, GuestAddress(header.config_gpa + ram))
            .unwrap();
        mem.write_obj(end, GuestAddress(header.config_gpa + ram + 8))
            .unwrap();
        b.start_mirror().unwrap();
        assert!(
            !answers(&b, 0),
            "a helper configured with RAM {start:#x}..{end:#x} answered"
        );
        b.shutdown();
    }
}

fn no_session_without_hardware_entropy() {
    let _one = one_vm();
    let b = vm_launch(
        1,
        HelperLaunch {
            no_hw_entropy: true,
            ..keyed(KEY)
        },
    );
    b.start_mirror().unwrap();
    let mut c = client(&b, 0);
    assert_eq!(refused(c.begin_source()), HelperStatus::NoEntropy);
    assert_eq!(refused(c.begin_target([7; 32])), HelperStatus::NoEntropy);
    let mut out = Vec::new();
    assert_eq!(
        refused(c.encrypt(&[(0x40_0000, 1)], &mut out)),
        HelperStatus::NoSession
    );
    b.shutdown();
}

fn a_transport_key_shared_by_two_vms_does_not_carry_pages_between_them() {
    let _one = one_vm();
    let id = |b: u8| HelperLaunch {
        vm_id: [b; 16],
        ..keyed(KEY)
    };
    let a = vm_launch(1, id(1));
    a.start_mirror().unwrap();
    let same = vm_launch(1, id(1));
    same.start_mirror().unwrap();
    let other = vm_launch(1, id(2));
    other.start_mirror().unwrap();
    let mut src = client(&a, 0);
    a.memory()
        .ram
        .write_obj(0x1234_5678u64, GuestAddress(0x50_0000))
        .unwrap();
    for (target, opens) in [(&other, false), (&same, true)] {
        let mut dst = client(target, 0);
        src.end().unwrap();
        let (target_nonce, target_id) = dst.begin_target(src.begin_source().unwrap()).unwrap();
        let source_id = src.complete_source(target_nonce).unwrap();
        assert_eq!(source_id == target_id, opens, "session ids");
        let mut records = Vec::new();
        src.encrypt(&[(0x50_0000, 1)], &mut records).unwrap();
        let result = dst.decrypt(&records);
        if opens {
            assert_eq!(result.unwrap(), 1);
            assert_eq!(page(target, 0x50_0000), page(&a, 0x50_0000));
        } else {
            assert_eq!(refused(result), HelperStatus::AuthFailed);
            assert_ne!(page(target, 0x50_0000), page(&a, 0x50_0000));
        }
    }
    for v in [a, same, other] {
        v.shutdown();
    }
}

/// Why the helper cannot take its VAES page path on this CPU, if it cannot.
fn page_path_missing() -> Option<String> {
    use std::arch::is_x86_feature_detected as has_feature;
    let has = has_feature!("ssse3")
        && has_feature!("sse4.1")
        && has_feature!("aes")
        && has_feature!("pclmulqdq")
        && has_feature!("avx2")
        && has_feature!("vaes")
        && has_feature!("vpclmulqdq");
    (!has).then(|| "this CPU lacks VAES or VPCLMULQDQ (the helper seals through ring)".into())
}

/// Runs only where the CPU has every feature of the page path: the helper
/// must then take it (a helper that silently fell back would pass every
/// other test).
fn the_fast_page_path_runs_wherever_the_cpu_has_it() {
    let _one = one_vm();
    let b = target(KEY);
    let mut c = b.helper_client(0, TIMEOUT).unwrap();
    let caps = c.hello().unwrap().caps;
    assert_ne!(
        caps & caps::VAES_PAGE_SEAL,
        0,
        "the CPU has the page path's features, the helper does not use it"
    );
    b.shutdown();
}

fn a_target_takes_pages_in_only_when_launched_for_it_and_only_once() {
    let _one = one_vm();
    let (a, b) = (source(), target(KEY));
    // A VM launched to boot never takes a target session.
    let booted = vm_launch(
        1,
        HelperLaunch {
            incoming: false,
            ..keyed(KEY)
        },
    );
    booted.start_mirror().unwrap();
    assert_eq!(
        refused(client(&booted, 0).begin_target([1; 32])),
        HelperStatus::NotIncoming
    );
    // An incoming VM takes one migration; once it verified, its guest may
    // run and no later session may roll its pages back.
    let (mut src, mut dst) = (client(&a, 0), client(&b, 0));
    session(&mut src, &mut dst);
    let mut records = Vec::new();
    src.encrypt(&[(0x40_0000, 1)], &mut records).unwrap();
    assert_eq!(dst.decrypt(&records).unwrap(), 1);
    let shared = shared_except(&[0x40_0000]);
    dst.verify_seal(&src.seal(&shared).unwrap(), &shared)
        .unwrap();
    dst.end().unwrap();
    assert_eq!(
        refused(dst.begin_target([2; 32])),
        HelperStatus::NotIncoming
    );
    // It can still be a source.
    dst.begin_source().unwrap();
    for v in [a, b, booted] {
        v.shutdown();
    }
}

fn the_source_seals_each_page_at_ever_newer_generations() {
    let _one = one_vm();
    let (a, b) = (source(), target(KEY));
    let (mut src, mut dst) = (client(&a, 0), client(&b, 0));
    session(&mut src, &mut dst);
    let gpa = 0x50_0000u64;
    let mut out = Vec::new();
    src.encrypt(&[(gpa, 10)], &mut out).unwrap();
    // The host cannot have an older content sealed under a lower (or the
    // same) generation after a newer one, nor use generations the target
    // refuses.
    for generation in [5, 10, 0, u64::from(u32::MAX), u64::MAX] {
        assert_eq!(
            refused(src.encrypt(&[(gpa, generation)], &mut out)),
            HelperStatus::StaleGeneration,
            "generation {generation}"
        );
    }
    src.encrypt(&[(gpa, 11)], &mut out).unwrap();
    // Within one batch too.
    assert_eq!(
        refused(src.encrypt(&[(0x50_1000, 3), (0x50_1000, 2)], &mut out)),
        HelperStatus::StaleGeneration
    );
    a.shutdown();
    b.shutdown();
}

/// Why the helpers can hold no session on this CPU, if they cannot: they
/// take their nonces from RDSEED/RDRAND and refuse without them.
fn entropy_missing() -> Option<String> {
    let has = std::arch::is_x86_feature_detected!("rdseed")
        || std::arch::is_x86_feature_detected!("rdrand");
    (!has).then(|| "this CPU has neither RDSEED nor RDRAND: the helper refuses sessions".into())
}

fn main() {
    let kvm = support::kvm_missing();
    support::run_tests(&[
        (
            kvm.clone(),
            &named!(
                a_hung_or_crashed_helper_is_a_typed_error_within_the_limit,
                idle_helpers_leave_the_cpu_and_wake_for_work,
                a_helper_with_unusable_ram_ranges_serves_nothing,
                no_session_without_hardware_entropy,
            ),
        ),
        (
            kvm.clone().or_else(entropy_missing),
            &named!(
                pages_round_trip_from_vm_a_into_vm_b_byte_for_byte,
                two_helpers_writing_one_page_never_mix_its_generations,
                both_seal_paths_interoperate,
                tampered_moved_replayed_and_foreign_records_fail_closed,
                a_failing_record_stops_its_stream_with_later_requests_already_queued,
                wrong_transport_key_is_an_authentication_failure,
                the_sealed_end_record_catches_a_missing_page,
                seed_protocol_round_trips_one_page_at_a_time,
                begin_racing_encrypt_on_another_helper_never_repeats_a_nonce,
                begin_target_racing_decrypt_never_tears_or_replays_a_page,
                sessions_close_no_encrypt_after_seal_no_decrypt_after_verify,
                a_stream_that_skips_a_private_page_fails_seal_and_verify,
                two_helpers_configured_with_one_index_never_share_a_mailbox,
                a_transport_key_shared_by_two_vms_does_not_carry_pages_between_them,
                a_target_takes_pages_in_only_when_launched_for_it_and_only_once,
                the_source_seals_each_page_at_ever_newer_generations,
            ),
        ),
        (
            kvm.or_else(page_path_missing),
            &named!(the_fast_page_path_runs_wherever_the_cpu_has_it),
        ),
    ]);
}
