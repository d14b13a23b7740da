//! In-process tests: real KVM VMs built through the library, running the
//! embedded bare-metal guests. They need /dev/kvm; without it they are
//! reported as ignored, with the reason (`support::run_tests`).
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use cgsvmm_vmm::config::{BootConfig, LabGuest, SerialConfig, VmmConfig};
use cgsvmm_vmm::control::RunState;
use cgsvmm_vmm::machine::exit::ExitReason;
use cgsvmm_vmm::machine::mirror::PROBE_GPA;
use cgsvmm_vmm::memory::MIB;
use cgsvmm_vmm::x86::tsc::ClockMoment;
use cgsvmm_vmm::Vmm;

// Shared with the end-to-end tests: one VM at a time, KVM detection.
use cgsvmm_test_support::{self as support, named};
use support::{one_vm, wait_until};

fn serial_file(name: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("cgsvmm-{name}-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&path);
    path
}

fn lab_config(guest: LabGuest, cpus: usize, serial: &Path) -> VmmConfig {
    VmmConfig {
        memory: 64 * MIB,
        cpus,
        mirror_cpus: 1,
        boot: BootConfig::Lab(guest),
        qmp: None,
        serial: SerialConfig::File(serial.to_path_buf()),
        helper: None,
        ..Default::default()
    }
}

fn ram_word(vmm: &Vmm, gpa: u64) -> u64 {
    vmm.memory()
        .ram
        .read_obj::<u64>(GuestAddress(gpa))
        .expect("inside RAM")
}

fn hello_prints_and_powers_off() {
    let _one = one_vm();
    let log = serial_file("hello");
    let vmm = Vmm::try_from(lab_config(LabGuest::Hello, 2, &log)).expect("build VM");
    let reason = vmm.run().expect("run");
    assert_eq!(reason, ExitReason::PowerOff);
    let out = std::fs::read_to_string(&log).unwrap();
    assert_eq!(out, "hello: cgsvmm lab guest on 2 vcpu(s)\n");
    let _ = std::fs::remove_file(log);
}

fn mirror_vm_reads_what_the_main_vm_wrote() {
    let _one = one_vm();
    let log = serial_file("mirror-sees");
    let vmm = Vmm::try_from(lab_config(LabGuest::Dirtier, 1, &log)).expect("build VM");
    let controller = vmm.controller();
    vmm.start().expect("start");
    // The dirtier writes its pass number at PROBE_GPA; wait for a few passes.
    assert!(
        wait_until(Duration::from_secs(10), || ram_word(&vmm, PROBE_GPA) >= 3),
        "dirtier made no progress"
    );
    controller.lock().unwrap().stop().expect("stop");
    let written = ram_word(&vmm, PROBE_GPA);
    // The main VM is paused, so the word is stable; the mirror VM's payload
    // copies it into its status page on every iteration.
    assert!(
        wait_until(Duration::from_secs(5), || controller
            .lock()
            .unwrap()
            .mirror_info()[0]
            .probe
            == written),
        "mirror saw {} but the main VM wrote {written}",
        controller.lock().unwrap().mirror_info()[0].probe
    );
    assert_eq!(ram_word(&vmm, PROBE_GPA), written);
    vmm.shutdown();
    let _ = std::fs::remove_file(log);
}

fn pausing_main_vcpus_leaves_the_mirror_running() {
    let _one = one_vm();
    let log = serial_file("pause");
    let vmm = Vmm::try_from(lab_config(LabGuest::Dirtier, 2, &log)).expect("build VM");
    let controller = vmm.controller();
    vmm.start().expect("start");
    assert!(wait_until(Duration::from_secs(10), || ram_word(
        &vmm, PROBE_GPA
    ) >= 2));
    // Both vCPUs through a first pass before the pause (the host may run
    // one of them much later than the other; the check at the end needs
    // both).
    assert!(
        wait_until(Duration::from_secs(10), || std::fs::read_to_string(&log)
            .is_ok_and(|out| out.contains("dirtier: vcpu 1 pass"))),
        "vCPU 1 finished no pass in 10 s"
    );

    controller.lock().unwrap().stop().expect("stop");
    assert_eq!(controller.lock().unwrap().state(), RunState::Paused);
    let frozen = ram_word(&vmm, PROBE_GPA);
    let mirror_before = controller.lock().unwrap().mirror_info()[0].counter;
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        ram_word(&vmm, PROBE_GPA),
        frozen,
        "a main vCPU ran while paused"
    );
    let mirror_after = controller.lock().unwrap().mirror_info()[0].counter;
    assert!(
        mirror_after > mirror_before,
        "mirror stopped counting: {mirror_before} -> {mirror_after}"
    );

    // Saved state of a paused lab vCPU: user mode, inside the image.
    let states = controller
        .lock()
        .unwrap()
        .main_vcpus()
        .save_state(ClockMoment {
            at: Instant::now(),
            host_tsc: None,
            ran_ns: 0,
        })
        .expect("save state");
    assert_eq!(states.len(), 2);
    for s in &states {
        assert_eq!(s.sregs.cs.selector, 0x33);
        assert!(
            (0x10_0000..0x18_0000).contains(&s.regs.rip),
            "rip {:#x}",
            s.regs.rip
        );
        assert!(!s.msrs.is_empty());
        assert!(s.lapic.regs.iter().any(|&b| b != 0), "an empty LAPIC");
        assert!(s.tsc_khz > 0);
    }

    controller.lock().unwrap().cont().expect("cont");
    assert!(
        wait_until(Duration::from_secs(10), || ram_word(&vmm, PROBE_GPA)
            > frozen),
        "no progress after cont"
    );
    vmm.shutdown();
    let out = std::fs::read_to_string(&log).unwrap();
    assert!(!out.contains("MEMORY-ERROR"), "{out}");
    assert!(out.contains("dirtier: vcpu 1 pass"), "{out}");
    let _ = std::fs::remove_file(log);
}

fn dirtier_catches_a_stale_page() {
    let _one = one_vm();
    let log = serial_file("stale");
    let vmm = Vmm::try_from(lab_config(LabGuest::Dirtier, 1, &log)).expect("build VM");
    let controller = vmm.controller();
    let exit = vmm.exit_handle().clone();
    vmm.start().expect("start");
    assert!(wait_until(Duration::from_secs(10), || ram_word(
        &vmm, PROBE_GPA
    ) >= 2));
    controller.lock().unwrap().stop().expect("stop");
    // Roll one page back by a pass, as a migration that lost it would.
    let gpa = PROBE_GPA + 0x1_0000;
    let pass = ram_word(&vmm, gpa);
    vmm.memory()
        .ram
        .write_obj(pass - 1, GuestAddress(gpa))
        .unwrap();
    controller.lock().unwrap().cont().expect("cont");
    assert!(
        wait_until(Duration::from_secs(10), || exit.reason().is_some()),
        "the guest did not report"
    );
    assert_eq!(exit.reason(), Some(ExitReason::GuestFailure));
    vmm.shutdown();
    let out = std::fs::read_to_string(&log).unwrap();
    let want = format!(
        "dirtier: MEMORY-ERROR vcpu=0 gpa={gpa:#x} expected={pass} found={}",
        pass - 1
    );
    assert!(out.contains(&want), "wanted {want:?} in {out}");
    let _ = std::fs::remove_file(log);
}

fn dirtier_uses_ram_on_both_sides_of_the_hole() {
    let _one = one_vm();
    let log = serial_file("high");
    let config = VmmConfig {
        memory: 3584 * MIB,
        ..lab_config(LabGuest::Dirtier, 2, &log)
    };
    let vmm = Vmm::try_from(config).expect("build VM");
    vmm.start().expect("start");
    // The top 512 MiB live above 4 GiB, in vCPU 1's slice.
    let high = 4u64 << 30;
    let last_page = high + (512 * MIB) - 4096;
    let done = wait_until(Duration::from_secs(30), || {
        ram_word(&vmm, high) >= 2
            && ram_word(&vmm, last_page) >= 2
            && ram_word(&vmm, PROBE_GPA) >= 2
    });
    vmm.shutdown();
    assert!(
        done,
        "high RAM not written: {} {}",
        ram_word(&vmm, high),
        ram_word(&vmm, last_page)
    );
    // Nothing landed in the hole: the mirror region is not RAM.
    assert!(vmm
        .memory()
        .ram
        .read_obj::<u64>(GuestAddress(3 << 30))
        .is_err());
    let out = std::fs::read_to_string(&log).unwrap();
    assert!(!out.contains("MEMORY-ERROR"), "{out}");
    let _ = std::fs::remove_file(log);
}

fn main() {
    support::run_tests(&[(
        support::kvm_missing(),
        &named!(
            hello_prints_and_powers_off,
            mirror_vm_reads_what_the_main_vm_wrote,
            pausing_main_vcpus_leaves_the_mirror_running,
            dirtier_catches_a_stale_page,
            dirtier_uses_ram_on_both_sides_of_the_hole
        ),
    )]);
}
