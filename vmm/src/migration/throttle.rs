//! QEMU's auto-converge: a thread that keeps the main vCPUs paused part of
//! every period while precopy runs, so a guest that dirties memory faster
//! than it can be sent slows down. It pauses and resumes only through the
//! controller, and only a running guest (a `stop` meanwhile wins); it is
//! joined when the throttle goes back to 0 and when it is dropped.
//!
//! Locks: the throttle's own slot, then the controller (the thread takes
//! the controller each period; whoever joins it holds the slot, never the
//! controller).

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::control::Controller;

/// The throttle's period: the guest runs (100 - percent)% of it.
const THROTTLE_PERIOD: Duration = Duration::from_millis(20);

/// The throttle of one VM: no thread while at 0.
#[derive(Default)]
pub struct Throttle {
    running: Mutex<Option<Running>>,
}

/// The thread, while the throttle is above 0.
struct Running {
    percent: Arc<AtomicU8>,
    thread: JoinHandle<()>,
}

impl Throttle {
    /// Keeps the guest paused `percent`% of the time (at most 99; 0 ends
    /// the thread and joins it).
    pub fn set(&self, percent: u8, controller: &Weak<Mutex<Controller>>) {
        let percent = percent.min(99);
        let mut slot = self.running.lock().expect("throttle lock poisoned");
        if let Some(t) = slot.as_ref() {
            t.percent.store(percent, Ordering::SeqCst);
            if percent == 0 {
                if let Some(t) = slot.take() {
                    let _ = t.thread.join();
                }
            }
            return;
        }
        if percent == 0 {
            return;
        }
        let shared = Arc::new(AtomicU8::new(percent));
        let (level, controller) = (shared.clone(), controller.clone());
        let spawned = std::thread::Builder::new()
            .name("throttle".into())
            .spawn(move || throttle_loop(&level, &controller));
        match spawned {
            Ok(thread) => {
                log::debug!("Throttling the guest to {}%", 100 - percent);
                *slot = Some(Running {
                    percent: shared,
                    thread,
                });
            }
            Err(e) => log::warn!("Cannot throttle the guest: {e}"),
        }
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        if let Some(t) = self.running.get_mut().ok().and_then(Option::take) {
            t.percent.store(0, Ordering::SeqCst);
            let _ = t.thread.join();
        }
    }
}

/// Pauses the main vCPUs `level`% of every period until `level` is 0 (or
/// the VM is gone); leaves them as the run state says.
fn throttle_loop(level: &AtomicU8, controller: &Weak<Mutex<Controller>>) {
    let with = |f: &dyn Fn(&Controller)| -> bool {
        match controller.upgrade() {
            Some(c) => {
                f(&c.lock().expect("controller lock poisoned"));
                true
            }
            None => false,
        }
    };
    loop {
        let p = u32::from(level.load(Ordering::SeqCst));
        if p == 0 || !with(&Controller::throttle_pause) {
            return;
        }
        std::thread::sleep(THROTTLE_PERIOD * p / 100);
        if !with(&Controller::throttle_resume) {
            return;
        }
        std::thread::sleep(THROTTLE_PERIOD * (100 - p) / 100);
    }
}
