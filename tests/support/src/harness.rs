//! The test runner: libtest's command line and output through
//! `libtest-mimic`; a test that cannot run here is ignored, with the
//! reason printed, so it is counted as skipped and never as passed.

use std::sync::Mutex;

/// One VM at a time: the host has two cores and the tests time progress.
static ONE_VM: Mutex<()> = Mutex::new(());

/// Holds the one-VM-at-a-time lock for the caller's test.
pub fn one_vm() -> std::sync::MutexGuard<'static, ()> {
    ONE_VM.lock().unwrap_or_else(|e| e.into_inner())
}

/// Why the tests that need KVM cannot run here, if they cannot.
pub fn kvm_missing() -> Option<String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .err()
        .map(|e| format!("/dev/kvm is not usable here ({e})"))
}

/// A test function and its name.
pub type NamedTest = (&'static str, fn());

/// Tests that run together or are skipped together, with the reason they
/// cannot run here (`None`: they can).
pub type TestGroup<'a> = (Option<String>, &'a [NamedTest]);

/// `(name, function)` pairs of test functions, for [`run_tests`].
#[macro_export]
macro_rules! named {
    ($($f:ident),* $(,)?) => {
        [$((stringify!($f), $f as fn())),*]
    };
}

/// Runs this binary's tests (its own harness, libtest's output): each group
/// is ignored when its skip reason is `Some`, with the reason printed once,
/// so that a test that did not run is reported as ignored, never as passed.
pub fn run_tests(groups: &[TestGroup]) -> ! {
    let args = libtest_mimic::Arguments::from_args();
    let mut trials = Vec::new();
    for (skip, tests) in groups {
        if let Some(why) = skip {
            println!("SKIPPED (ignored below): {why}: {} test(s)", tests.len());
        }
        for &(name, f) in *tests {
            trials.push(
                libtest_mimic::Trial::test(name, move || {
                    f();
                    Ok(())
                })
                .with_ignored_flag(skip.is_some()),
            );
        }
    }
    libtest_mimic::run(&args, trials).exit()
}
