//! The real-KVM lab: every scenario of `resources/kvm-lab` as a test.
//!
//! Each test boots the nested host (an ordinary SVM KVM that QEMU's TCG
//! emulates, `resources/kvm-lab/README.md`) and runs one scenario inside;
//! the scenario's `LAB-CHECK` lines say what held. The image is built (or
//! found up to date) once, by `resources/kvm-lab/build.sh`, from the
//! sources of this checkout. Where QEMU >= 10 is missing the tests are
//! reported ignored, with the reason; `CGSVMM_LAB=off` skips them on
//! purpose.
#![allow(clippy::unwrap_used)]

use cgsvmm_test_support as support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Instant;

fn lab_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("resources/kvm-lab")
}

/// Why the lab cannot run here, if it cannot.
fn lab_unavailable() -> Option<String> {
    if std::env::var("CGSVMM_LAB").is_ok_and(|v| v == "off") {
        return Some("CGSVMM_LAB=off".into());
    }
    let version = Command::new("qemu-system-x86_64").arg("--version").output();
    let Ok(out) = version else {
        return Some(
            "no qemu-system-x86_64: the real-KVM lab needs QEMU >= 10 \
             (resources/kvm-lab/build.sh installs it as root)"
                .into(),
        );
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let major = text
        .split_whitespace()
        .nth(3)
        .and_then(|v| v.split('.').next()?.parse::<u32>().ok())
        .unwrap_or(0);
    if major < 10 {
        return Some(format!(
            "the real-KVM lab needs QEMU >= 10 (older ones crashed the nested host), found: {}",
            text.lines().next().unwrap_or("?")
        ));
    }
    None
}

/// Builds the lab image once (cached by the script); the error otherwise.
fn image() -> Result<(), String> {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let out = Command::new("bash")
                .arg(lab_dir().join("build.sh"))
                .output()
                .map_err(|e| format!("build.sh: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "resources/kvm-lab/build.sh failed:\n{}",
                    String::from_utf8_lossy(&out.stderr)
                ))
            }
        })
        .clone()
}

/// run.sh's exit status when the emulator failed, not the scenario (README):
/// the nested host itself died, a guest died executing L1's own code, or
/// (suspected) a guest died of a #PF under the emulator's nested paging.
const EMULATOR_FAULT: i32 = 3;
/// How many boots a scenario gets while the emulator keeps failing it (L1
/// died in about 1 of 6 Linux runs; a guest ran L1's code in about 1 of 5
/// Linux boots); the scenario's own failures are never retried.
const L1_TRIES: usize = 3;

/// Runs `scenario` in the lab (killed after `limit_s`) and asserts that it
/// passed; prints its checks and numbers. A run the emulator failed (the
/// nested host's own kernel died, or a guest vCPU died at one of L1's own
/// instructions: nothing a VMM does can cause either; or a guest died of a
/// #PF with the emulator's nested paging on, suspected) is run again, up to
/// [`L1_TRIES`] boots, with the evidence printed; a scenario that fails
/// otherwise never is, and one that faults every time still fails.
fn scenario(name: &str, limit_s: u32) {
    let _one = support::one_vm();
    image().unwrap();
    let started = Instant::now();
    let run = || {
        Command::new("bash")
            .arg(lab_dir().join("run.sh"))
            .args([name, "--timeout", &limit_s.to_string()])
            .output()
            .unwrap()
    };
    let mut out = run();
    for _ in 1..L1_TRIES {
        if out.status.code() != Some(EMULATOR_FAULT) {
            break;
        }
        let log = String::from_utf8_lossy(&out.stdout);
        let evidence = log.lines().filter(|l| {
            l.starts_with("LAB-L1-DIED")
                || l.starts_with("LAB-EMULATOR")
                || l.contains("kvm_exit: ")
                || l.starts_with("CPU Reset")
                || l.starts_with("Triple fault")
        });
        println!(
            "LAB-RETRY {name}: the emulator failed, not the scenario; once more\n{}",
            evidence.collect::<Vec<_>>().join("\n")
        );
        out = run();
    }
    let log = String::from_utf8_lossy(&out.stdout);
    for line in log.lines() {
        if line.starts_with("LAB-CHECK") || line.starts_with("LAB-NOTE") {
            println!("{line}");
        }
    }
    println!(
        "lab scenario {name}: {:.1} s in all (QEMU boot included)",
        started.elapsed().as_secs_f64()
    );
    let ended = log
        .lines()
        .find(|l| l.starts_with(&format!("LAB-SCENARIO-END {name} ")));
    assert!(
        out.status.success() && ended.is_some_and(|l| l.contains(" pass ")),
        "scenario {name} failed (exit {:?}):\n{}\n{}",
        out.status.code(),
        log.lines()
            .filter(|l| !l.starts_with("LAB-CHECK ok") && !l.starts_with('['))
            .collect::<Vec<_>>()
            .join("\n"),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One test per scenario, with its time limit in seconds.
macro_rules! scenarios {
    ($($test:ident = $name:literal, $limit:literal;)*) => {
        $(fn $test() { scenario($name, $limit) })*
        const SCENARIOS: &[support::NamedTest] = &[$((stringify!($test), $test as fn())),*];
    };
}

scenarios! {
    hello_runs_at_cpl3 = "hello", 120;
    the_dirtier_runs_with_its_helpers_and_pauses_while_they_run = "dirtier-helpers", 240;
    linux_boots_a_bzimage_with_initrd_on_two_vcpus = "linux-bzimage", 300;
    linux_boots_an_elf_vmlinux = "linux-elf", 300;
    linux_boots_through_pvh = "linux-pvh", 300;
    a_linux_reboot_ends_cgsvmm = "linux-reboot", 300;
    a_stopped_dirtier_migrates = "mig-stopped", 300;
    a_running_dirtier_migrates_live = "mig-live", 300;
    a_running_dirtier_migrates_live_without_auto_converge = "mig-live-noconverge", 300;
    a_dirtier_snapshot_restores_in_a_new_process = "mig-snapshot", 300;
    the_dirtier_ping_pongs_over_three_hops = "mig-pingpong", 400;
    a_damaged_stream_fails_closed_and_the_source_resumes = "mig-damaged", 300;
    a_running_linux_guest_migrates_live = "linux-live", 400;
    a_linux_snapshot_restores_in_a_new_process = "linux-snapshot", 400;
    root_in_the_guest_cannot_read_the_transport_key = "linux-isolation", 300;
    map_gpa_range_hypercalls_feed_the_shared_map = "hypercall", 300;
}

fn main() {
    support::run_tests(&[(lab_unavailable(), SCENARIOS)]);
}
