//! The VMM's half of the helper's idle protocol and fault reporting.
//!
//! An idle helper vCPU exits with `LAB_CMD_WAIT | index << 16`; its vCPU
//! thread then waits here, out of KVM_RUN, until a [`HelperClient`] rings the
//! helper's doorbell (or [`WAIT_TIMEOUT`] passes, after which the helper
//! polls once and may wait again). A mirror vCPU that faults is recorded
//! here instead of stopping the VM: a broken helper must never take the
//! guest down, and the client turns the record into a typed error.
//!
//! [`HelperClient`]: cgsvmm_migration::helper::HelperClient

use std::sync::{Condvar, Mutex};
use std::time::Duration;

use cgsvmm_migration::helper::HelperLink;

/// Longest a waiting helper stays out of KVM_RUN without a doorbell.
pub const WAIT_TIMEOUT: Duration = Duration::from_millis(10);

#[derive(Default)]
struct Bell {
    rung: Mutex<bool>,
    cond: Condvar,
}

/// Doorbells and fault records of every mirror vCPU.
pub struct HelperLinks {
    bells: Vec<Bell>,
    faults: Vec<Mutex<Option<String>>>,
}

impl HelperLinks {
    /// Links for `count` mirror vCPUs.
    pub fn new(count: usize) -> Self {
        Self {
            bells: (0..count).map(|_| Bell::default()).collect(),
            faults: (0..count).map(|_| Mutex::new(None)).collect(),
        }
    }

    /// Called on helper `index`'s vCPU thread: waits for its doorbell.
    pub fn wait(&self, index: usize, timeout: Duration) {
        let Some(bell) = self.bells.get(index) else {
            log::warn!("Wait from unknown helper {index}");
            std::thread::sleep(timeout);
            return;
        };
        let rung = bell.rung.lock().expect("bell lock poisoned");
        let (mut rung, _) = bell
            .cond
            .wait_timeout_while(rung, timeout, |r| !*r)
            .expect("bell lock poisoned");
        *rung = false;
    }

    /// Records that mirror vCPU `index` stopped.
    pub fn record_fault(&self, index: usize, why: String) {
        if let Some(slot) = self.faults.get(index) {
            *slot.lock().expect("fault lock poisoned") = Some(why);
        }
    }
}

impl HelperLink for HelperLinks {
    fn ring(&self, index: usize) {
        if let Some(bell) = self.bells.get(index) {
            *bell.rung.lock().expect("bell lock poisoned") = true;
            bell.cond.notify_one();
        }
    }

    fn fault(&self, index: usize) -> Option<String> {
        self.faults
            .get(index)?
            .lock()
            .expect("fault lock poisoned")
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Instant;

    #[test]
    fn ring_wakes_a_waiter_and_timeouts_bound_the_wait() {
        let links = Arc::new(HelperLinks::new(2));
        let start = Instant::now();
        links.wait(0, Duration::from_millis(20));
        assert!(start.elapsed() >= Duration::from_millis(20));
        // A ring before the wait is not lost.
        links.ring(1);
        let start = Instant::now();
        links.wait(1, Duration::from_secs(5));
        assert!(start.elapsed() < Duration::from_secs(1));
        let l = links.clone();
        let waiter = std::thread::spawn(move || {
            let start = Instant::now();
            l.wait(0, Duration::from_secs(5));
            start.elapsed()
        });
        std::thread::sleep(Duration::from_millis(50));
        links.ring(0);
        assert!(waiter.join().unwrap() < Duration::from_secs(2));
        assert_eq!(links.fault(1), None);
        links.record_fault(1, "triple fault".into());
        assert_eq!(links.fault(1).as_deref(), Some("triple fault"));
        assert_eq!(links.fault(7), None);
    }
}
