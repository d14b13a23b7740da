//! Locks and claims shared by the helper vCPUs, in the image's private
//! memory: a reader-writer spin lock that serves a waiting writer before new
//! readers, and the bitmap through which each helper claims its index.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU32, Ordering};

/// Set while a writer holds the lock.
const WRITER: u32 = 1 << 31;
/// Set while a writer waits: new readers stay out until it has run.
const WAITING: u32 = 1 << 30;
/// The readers' count.
const READERS: u32 = WAITING - 1;

/// A reader-writer spin lock around a `T`. Readers share it; a writer has it
/// alone, and once a writer waits no new reader gets in, so a stream of
/// batches on other helpers cannot keep a session command out.
pub struct RwSpin<T> {
    state: AtomicU32,
    value: UnsafeCell<T>,
}

// SAFETY: `value` is reached only through `read` (shared, no writer) and
// `write` (exclusive); T must be shareable between the vCPUs for the
// former and sendable for the latter.
unsafe impl<T: Send + Sync> Sync for RwSpin<T> {}

impl<T> RwSpin<T> {
    /// A lock around `value`.
    pub const fn new(value: T) -> Self {
        Self {
            state: AtomicU32::new(0),
            value: UnsafeCell::new(value),
        }
    }

    /// Runs `f` with shared access (other readers may run at once).
    pub fn read<R>(&self, f: impl FnOnce(&T) -> R) -> R {
        loop {
            let s = self.state.load(Ordering::Relaxed);
            if s & (WRITER | WAITING) == 0
                && s & READERS < READERS
                && self
                    .state
                    .compare_exchange_weak(s, s + 1, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
            {
                break;
            }
            core::hint::spin_loop();
        }
        // SAFETY: a reader holds the lock: no writer runs until it leaves.
        let r = f(unsafe { &*self.value.get() });
        self.state.fetch_sub(1, Ordering::Release);
        r
    }

    /// Runs `f` with exclusive access, after the readers inside have left.
    pub fn write<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        loop {
            let s = self.state.load(Ordering::Relaxed);
            if s & (WRITER | READERS) == 0 {
                // Clears WAITING too; another waiting writer sets it again.
                if self
                    .state
                    .compare_exchange_weak(s, WRITER, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
                {
                    break;
                }
            } else if s & WAITING == 0 {
                self.state.fetch_or(WAITING, Ordering::Relaxed);
            }
            core::hint::spin_loop();
        }
        // SAFETY: the writer holds the lock alone.
        let r = f(unsafe { &mut *self.value.get() });
        self.state.fetch_and(!WRITER, Ordering::Release);
        r
    }
}

/// The helper indices taken so far, one bit each.
pub struct IndexClaims(AtomicU32);

impl IndexClaims {
    /// No index taken.
    pub const fn new() -> Self {
        Self(AtomicU32::new(0))
    }

    /// Takes `index` for the caller if it is below `limit` (and below 32)
    /// and nobody took it before: two helpers never share an index, so
    /// never a mailbox, a nonce counter or a scratch page.
    pub fn claim(&self, index: u64, limit: u32) -> bool {
        if index >= u64::from(limit.min(32)) {
            return false;
        }
        let bit = 1u32 << index;
        self.0.fetch_or(bit, Ordering::AcqRel) & bit == 0
    }
}

impl Default for IndexClaims {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    #[test]
    fn a_writer_excludes_readers_and_other_writers() {
        let lock = Arc::new(RwSpin::new((0u64, 0u64)));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let lock = lock.clone();
                std::thread::spawn(move || {
                    for _ in 0..20_000 {
                        if t % 2 == 0 {
                            lock.write(|v| {
                                v.0 += 1;
                                v.1 += 1;
                            });
                        } else {
                            lock.read(|v| assert_eq!(v.0, v.1, "a reader saw a half write"));
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(lock.read(|v| *v), (40_000, 40_000));
    }

    #[test]
    fn a_waiting_writer_is_served_before_new_readers() {
        use std::sync::Barrier;
        let lock = Arc::new(RwSpin::new(0u32));
        let release = Arc::new(AtomicBool::new(false));
        let inside = Arc::new(Barrier::new(2));
        // Reader A holds the lock until told to leave.
        let a = {
            let (lock, release, inside) = (lock.clone(), release.clone(), inside.clone());
            std::thread::spawn(move || {
                lock.read(|_| {
                    inside.wait();
                    while !release.load(Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                })
            })
        };
        inside.wait();
        // A writer comes and waits for A.
        let w = {
            let lock = lock.clone();
            std::thread::spawn(move || lock.write(|v| *v = 1))
        };
        let start = Instant::now();
        while lock.state.load(Ordering::Relaxed) & WAITING == 0 {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "the writer never waited"
            );
            std::hint::spin_loop();
        }
        // A new reader arrives after the writer: it must get in only after
        // the writer, so it sees the write. (A lock that lets new readers
        // in while a writer waits would let it read 0 now.)
        let b = {
            let lock = lock.clone();
            std::thread::spawn(move || lock.read(|v| *v))
        };
        std::thread::sleep(Duration::from_millis(20));
        release.store(true, Ordering::Relaxed);
        a.join().unwrap();
        w.join().unwrap();
        assert_eq!(
            b.join().unwrap(),
            1,
            "a new reader overtook a waiting writer"
        );
    }

    #[test]
    fn each_index_is_claimed_once_and_only_below_the_limit() {
        let claims = Arc::new(IndexClaims::new());
        let winners: Vec<_> = (0..8)
            .map(|_| {
                let c = claims.clone();
                std::thread::spawn(move || (0..4).filter(|&i| c.claim(i, 4)).count())
            })
            .collect();
        let total: usize = winners.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(total, 4, "every index of 0..4 exactly once");
        let claims = IndexClaims::new();
        assert!(!claims.claim(4, 4));
        assert!(!claims.claim(40, 64));
        assert!(!claims.claim(u64::MAX, u32::MAX));
        assert!(claims.claim(31, 64));
    }
}
