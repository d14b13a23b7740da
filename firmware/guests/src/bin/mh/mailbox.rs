//! One helper's view of its mailbox (shared with the host), and the seed
//! protocol served from it.
//!
//! Every access is volatile or atomic: the host writes these pages while we
//! read them. Values are read once into locals before they are checked.

use core::mem::offset_of;
use core::sync::atomic::{fence, AtomicI32, AtomicU32, AtomicU64, Ordering};

use cgsvmm_guests::abi::helper::{self as h, offsets, seed, status};
use zerocopy::{FromBytes, IntoBytes};

use crate::crypto;
use crate::Env;

/// A mailbox at a fixed guest-physical (= virtual) address.
pub struct Mailbox {
    base: u64,
}

/// Offset of a control block field within the mailbox.
fn control(field: usize) -> u64 {
    (offsets::CONTROL + field) as u64
}

/// Offset of request `n`'s slot within the mailbox.
fn slot(n: u64) -> u64 {
    h::request_slot_offset(n) as u64
}

impl Mailbox {
    /// The mailbox at `base` (from our own HelperHeader).
    pub fn new(base: u64) -> Self {
        Self { base }
    }

    fn atomic_u64(&self, offset: u64) -> &AtomicU64 {
        // SAFETY: offset lies inside this mailbox, which the VMM mapped for
        // us; it is 8-byte aligned (mailboxes are page aligned, offsets are
        // multiples of 8); AtomicU64 has u64's layout.
        unsafe { &*((self.base + offset) as *const AtomicU64) }
    }

    fn atomic_u32(&self, offset: u64) -> &AtomicU32 {
        // SAFETY: as for atomic_u64, with 4-byte alignment.
        unsafe { &*((self.base + offset) as *const AtomicU32) }
    }

    fn atomic_i32(&self, offset: u64) -> &AtomicI32 {
        // SAFETY: as for atomic_u64, with 4-byte alignment.
        unsafe { &*((self.base + offset) as *const AtomicI32) }
    }

    /// Reads a `T` at `offset` (a snapshot: the host may change it after).
    pub fn read<T: FromBytes>(&self, offset: u64) -> T {
        // SAFETY: offset..offset+size_of::<T>() lies inside the mailbox; any
        // bit pattern is a valid T (FromBytes).
        unsafe { core::ptr::read_volatile((self.base + offset) as *const T) }
    }

    /// Writes `v` at `offset`: one volatile store of the whole value where
    /// it is aligned (record headers), byte by byte where not (the packed
    /// seed header).
    pub fn write<T: IntoBytes + zerocopy::Immutable + Copy>(&self, offset: u64, v: &T) {
        let at = self.base + offset;
        if at.is_multiple_of(core::mem::align_of::<T>() as u64) {
            // SAFETY: offset..offset+size_of::<T>() lies inside the mailbox
            // and `at` is aligned for T (checked).
            unsafe { core::ptr::write_volatile(at as *mut T, *v) };
            return;
        }
        for (i, b) in v.as_bytes().iter().enumerate() {
            // SAFETY: offset..offset+len lies inside the mailbox.
            unsafe { core::ptr::write_volatile((at + i as u64) as *mut u8, *b) };
        }
    }

    /// Address of `offset` (for bulk copies into and out of the mailbox).
    pub fn addr(&self, offset: u64) -> u64 {
        self.base + offset
    }

    pub fn req_seq(&self) -> u64 {
        self.atomic_u64(control(offset_of!(h::MailboxControl, req_seq)))
            .load(Ordering::Acquire)
    }

    /// The last request answered (survives a restart of the helper, so a
    /// request posted before it started is still served).
    pub fn resp_seq(&self) -> u64 {
        self.atomic_u64(control(offset_of!(h::MailboxControl, resp_seq)))
            .load(Ordering::Acquire)
    }

    /// Publishes the answer to request `n`.
    pub fn finish(&self, n: u64) {
        self.atomic_u64(control(offset_of!(h::MailboxControl, resp_seq)))
            .store(n, Ordering::Release);
    }

    /// Request `n` as the host posted it (a snapshot).
    pub fn request(&self, n: u64) -> h::RequestSlot {
        self.read(slot(n))
    }

    /// Request `n`'s answer.
    pub fn set_result(&self, n: u64, code: i32, count: u32, fail_index: u32, busy_cycles: u64) {
        let at = slot(n);
        self.atomic_i32(at + offset_of!(h::RequestSlot, status) as u64)
            .store(code, Ordering::Relaxed);
        self.atomic_u32(at + offset_of!(h::RequestSlot, count) as u64)
            .store(count, Ordering::Relaxed);
        self.atomic_u32(at + offset_of!(h::RequestSlot, fail_index) as u64)
            .store(fail_index, Ordering::Relaxed);
        self.atomic_u64(at + offset_of!(h::RequestSlot, busy_cycles) as u64)
            .store(busy_cycles, Ordering::Relaxed);
    }

    pub fn set_state(&self, state: u32) {
        self.atomic_u32(control(offset_of!(h::MailboxControl, state)))
            .store(state, Ordering::SeqCst);
        fence(Ordering::SeqCst);
    }

    pub fn bump_heartbeat(&self) {
        self.atomic_u64(control(offset_of!(h::MailboxControl, heartbeat)))
            .fetch_add(1, Ordering::Relaxed);
    }

    /// The command argument area.
    pub fn read_arg<T: FromBytes>(&self) -> T {
        self.read(control(offset_of!(h::MailboxControl, arg)))
    }

    pub fn write_arg<T: IntoBytes + zerocopy::Immutable + Copy>(&self, v: &T) {
        self.write(control(offset_of!(h::MailboxControl, arg)), v)
    }

    /// Offset of batch record `i`.
    pub fn record(i: u32) -> u64 {
        h::record_offset(i as usize) as u64
    }

    pub fn seed_go(&self) -> bool {
        self.atomic_i32(offsets::SEED_PARAMS as u64 + 24)
            .load(Ordering::Acquire)
            != 0
    }
}

/// Serves one seed-protocol command (helper 0).
pub fn serve_seed(mbox: &Mailbox, env: &Env) {
    let params: h::SeedParams = mbox.read(offsets::SEED_PARAMS as u64);
    let gpa = params.gpa;
    let ret = match params.cmd_type {
        seed::INIT => status::OK,
        seed::RESET => {
            crypto::end();
            status::OK
        }
        seed::ENCRYPT => match crypto::seed_encrypt(mbox, env, gpa) {
            Ok(()) => status::OK,
            Err(code) => code,
        },
        seed::DECRYPT => match crypto::seed_decrypt(mbox, env, gpa) {
            Ok(()) => status::OK,
            Err(code) => code,
        },
        _ => status::BAD_COMMAND,
    };
    let p = offsets::SEED_PARAMS as u64;
    mbox.atomic_i32(p + 20).store(ret, Ordering::Relaxed);
    mbox.atomic_i32(p + 24).store(0, Ordering::Relaxed);
    mbox.atomic_i32(p + 28).store(1, Ordering::Release);
}
