//! Fresh randomness from the CPU (RDSEED, else RDRAND), failing closed.
//!
//! A session nonce that a host could predict or repeat would let it replay
//! an earlier session's records, so there is no fallback to the TSC: a CPU
//! without RDSEED and RDRAND, an instruction that keeps failing, or a
//! generator that returns all-zeros, all-ones or one value twice (known
//! errata) gives [`NoEntropy`] and the helper refuses the session.

use sha2::{Digest, Sha256};

/// The CPU gave no usable randomness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoEntropy;

/// Words drawn per 32-byte output.
const WORDS: usize = 4;
/// Attempts per word (Intel's guidance for RDRAND is 10; RDSEED may fail
/// more often under load).
const RETRIES: usize = 100;

/// 32 bytes from `draw` (one 64-bit word per call, `None` when the
/// instruction reported failure): four good words, each retried, hashed
/// together. Fails on words that are all-zeros or all-ones, on a word equal
/// to an earlier one, and when a word cannot be had.
pub fn gather(mut draw: impl FnMut() -> Option<u64>) -> Result<[u8; 32], NoEntropy> {
    let mut words = [0u64; WORDS];
    for i in 0..WORDS {
        let word = (0..RETRIES).find_map(|_| draw()).ok_or(NoEntropy)?;
        if word == 0 || word == u64::MAX || words[..i].contains(&word) {
            return Err(NoEntropy);
        }
        words[i] = word;
    }
    let mut hasher = Sha256::new();
    for w in words {
        hasher.update(w.to_le_bytes());
    }
    Ok(hasher.finalize().into())
}

/// 32 fresh bytes from RDSEED where the CPU has it, else RDRAND.
pub fn hardware() -> Result<[u8; 32], NoEntropy> {
    let leaf1 = core::arch::x86_64::__cpuid(1);
    let max = core::arch::x86_64::__cpuid(0).eax;
    let rdseed = max >= 7 && core::arch::x86_64::__cpuid_count(7, 0).ebx & (1 << 18) != 0;
    let rdrand = leaf1.ecx & (1 << 30) != 0;
    if rdseed {
        // SAFETY: the CPU has RDSEED (checked above).
        if let Ok(bytes) = gather(|| unsafe { rdseed_step() }) {
            return Ok(bytes);
        }
    }
    if rdrand {
        // SAFETY: the CPU has RDRAND (checked above).
        return gather(|| unsafe { rdrand_step() });
    }
    Err(NoEntropy)
}

/// One RDSEED.
///
/// # Safety
/// The CPU must have RDSEED.
#[target_feature(enable = "rdseed")]
unsafe fn rdseed_step() -> Option<u64> {
    let mut v = 0u64;
    (core::arch::x86_64::_rdseed64_step(&mut v) == 1).then_some(v)
}

/// One RDRAND.
///
/// # Safety
/// The CPU must have RDRAND.
#[target_feature(enable = "rdrand")]
unsafe fn rdrand_step() -> Option<u64> {
    let mut v = 0u64;
    (core::arch::x86_64::_rdrand64_step(&mut v) == 1).then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_words_give_bytes_and_bad_ones_fail_closed() {
        let mut n = 0u64;
        let counting = || {
            n += 0x1234_5678_9abc_def1;
            Some(n)
        };
        assert!(gather(counting).is_ok());
        assert_eq!(gather(|| Some(0)), Err(NoEntropy));
        assert_eq!(gather(|| Some(u64::MAX)), Err(NoEntropy));
        assert_eq!(gather(|| Some(42)), Err(NoEntropy), "a stuck generator");
        assert_eq!(
            gather(|| None),
            Err(NoEntropy),
            "an instruction that always fails"
        );
        // Occasional failures are retried.
        let mut calls = 0u64;
        let flaky = || {
            calls += 1;
            calls.is_multiple_of(3).then_some(calls * 0x9e37_79b9)
        };
        assert!(gather(flaky).is_ok());
    }

    #[test]
    fn this_cpu_gives_fresh_bytes_each_time() {
        let has = std::arch::is_x86_feature_detected!("rdseed")
            || std::arch::is_x86_feature_detected!("rdrand");
        if !has {
            assert_eq!(hardware(), Err(NoEntropy));
            return;
        }
        let (a, b) = (hardware().unwrap(), hardware().unwrap());
        assert_ne!(a, b);
    }
}
