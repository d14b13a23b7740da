//! Key material that is wiped when it is dropped, for types that cannot
//! wipe themselves (ring's keys, the AES key schedule).

use core::mem::{ManuallyDrop, MaybeUninit};
use core::sync::atomic::{compiler_fence, Ordering};

/// A `T` whose bytes are overwritten with zeros once it has been dropped.
/// `T` must own no memory elsewhere (the key types it holds are plain
/// arrays and schedules).
pub struct Wiped<T>(ManuallyDrop<T>);

impl<T> Wiped<T> {
    /// Wraps `value`.
    pub fn new(value: T) -> Self {
        Self(ManuallyDrop::new(value))
    }
}

impl<T> core::ops::Deref for Wiped<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T> Drop for Wiped<T> {
    fn drop(&mut self) {
        // SAFETY: dropped once, here; nothing reads `self.0` as a T after.
        unsafe { ManuallyDrop::drop(&mut self.0) };
        let bytes = (&mut self.0 as *mut ManuallyDrop<T>).cast::<MaybeUninit<u8>>();
        for i in 0..size_of::<T>() {
            // SAFETY: `i` lies inside the value's own storage, which is
            // ours until this drop returns; volatile so the compiler
            // cannot drop stores to memory that is about to go away.
            unsafe { bytes.add(i).write_volatile(MaybeUninit::new(0)) };
        }
        compiler_fence(Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropping_wipes_the_bytes() {
        let mut slot = MaybeUninit::new(Wiped::new([0xa5u8; 300]));
        assert_eq!(slot_bytes(&slot)[..300], [0xa5; 300]);
        assert_eq!(unsafe_deref(&slot)[299], 0xa5);
        // SAFETY: the slot holds a value, dropped once in place.
        unsafe { slot.assume_init_drop() };
        assert!(slot_bytes(&slot).iter().all(|&b| b == 0));
    }

    fn slot_bytes<T>(slot: &MaybeUninit<T>) -> Vec<u8> {
        // SAFETY: reads the slot's storage as bytes (every byte written).
        unsafe { std::slice::from_raw_parts(slot.as_ptr().cast::<u8>(), size_of::<T>()).to_vec() }
    }

    fn unsafe_deref(slot: &MaybeUninit<Wiped<[u8; 300]>>) -> [u8; 300] {
        // SAFETY: the slot holds an initialised value.
        **unsafe { slot.assume_init_ref() }
    }
}
