//! AES-256-GCM over exactly one 4 KiB page with 32 bytes of associated
//! data, out of place: the migration helper's page seal.
//!
//! Why not a general AEAD library: the helper reads a page of guest memory
//! and must leave only ciphertext in shared memory. In-place APIs (ring's)
//! make it copy the page into private memory, seal it there and copy the
//! ciphertext out: two extra passes over every page, a third of the
//! helper's time. This seals straight from the page to the mailbox, reading
//! each plaintext byte once and authenticating the ciphertext from
//! registers, never from the shared destination (which the host could
//! change between a write and a read-back).
//!
//! The output is standard AES-256-GCM (SP 800-38D): 96-bit nonce, counter
//! blocks from 2, GHASH over AAD || ciphertext || lengths; any AES-256-GCM
//! opens it. GHASH is computed as POLYVAL (RFC 8452, appendix A):
//! GHASH(H, X) = rev(POLYVAL(mulX(rev(H)), rev(X))), where rev reverses a
//! block's bytes. POLYVAL's multiplication is a carry-less product and a
//! Montgomery fold by x^-128 with two multiplications by 0xc2 << 56.
//!
//! Sixteen blocks per step: eight 256-bit VAES counter vectors (enough
//! independent chains to keep VAES busy through its latency), and the
//! sixteen ciphertext blocks multiplied by H^16..H^1 (Karatsuba) and summed
//! before one reduction. The steps are software-pipelined: the GHASH
//! multiplications of step n - 1 are issued between the AES rounds of step
//! n, so the AES and carry-less-multiply units work at the same time
//! (measured on this lab's EPYC: 0.85-1.0x ring's hot-loop rate, from
//! 0.8x without the pipeline). [`PageGcm::new`] returns `None` on CPUs without AES-NI,
//! PCLMULQDQ, AVX2, VAES and VPCLMULQDQ (or without the OS saving YMM
//! state); callers keep their general path for those.
#![cfg_attr(not(test), no_std)]
#![cfg(target_arch = "x86_64")]

use core::arch::x86_64::*;

use subtle::ConstantTimeEq;
use zeroize::Zeroize;

/// Bytes sealed per call.
pub const PAGE: usize = 4096;
/// Bytes of associated data per call.
pub const AAD: usize = 32;
/// 256-bit vectors (two blocks each) per step: sixteen blocks, enough
/// independent AES chains to cover VAES's latency.
const LANES: usize = 8;
/// Bytes per step.
const STEP: usize = LANES * 32;

/// An AES-256 key with its GHASH powers, ready to seal pages.
pub struct PageGcm {
    round_keys: [__m128i; 15],
    /// H^1 (POLYVAL domain).
    h: __m128i,
    /// [H^16, H^15], [H^14, H^13], ..., [H^2, H^1]: lane 0 multiplies
    /// the earlier block.
    powers: [__m256i; LANES],
    /// The same powers with each lane's low half XORed with its high half
    /// (Karatsuba's middle product).
    folded: [__m256i; LANES],
}

impl Drop for PageGcm {
    /// The key schedule and the GHASH powers are key material: wiped when
    /// the session that owns them ends.
    fn drop(&mut self) {
        self.round_keys.zeroize();
        self.h.zeroize();
        self.powers.zeroize();
        self.folded.zeroize();
    }
}

/// Which way [`PageGcm::crypt`] goes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Seal,
    Open,
}

/// Where [`PageGcm::crypt`] reads its input from, 32 bytes at a time; it
/// asks for each piece of the page exactly once, in order.
trait Source {
    /// The 32 bytes at offset `at`.
    ///
    /// # Safety
    /// `at + 32 <= PAGE`, the source is readable for [`PAGE`] bytes and the
    /// CPU has AVX.
    unsafe fn load(&mut self, at: usize) -> __m256i;
}

/// A page that others may change while it is read (guest memory, the
/// helper's mailbox). Each piece is read by one `vmovdqu` in an `asm!`
/// statement with side effects, which the compiler may neither repeat nor
/// split: every byte is read once by construction, not by what the
/// optimiser happens to emit, so what is authenticated is exactly what was
/// read.
struct SharedPage(*const u8);

impl Source for SharedPage {
    #[inline]
    #[target_feature(enable = "avx")]
    unsafe fn load(&mut self, at: usize) -> __m256i {
        let v: __m256i;
        // SAFETY: the caller keeps `at + 32` inside the readable page; the
        // instruction reads those 32 bytes (no alignment needed) and
        // touches nothing else.
        unsafe {
            core::arch::asm!(
                "vmovdqu {v}, ymmword ptr [{p}]",
                v = out(ymm_reg) v,
                p = in(reg) self.0.add(at),
                options(nostack, preserves_flags, readonly),
            );
        }
        v
    }
}

/// Whether this CPU (and OS) can run [`PageGcm`].
pub fn supported() -> bool {
    let (max, leaf1) = (__cpuid(0).eax, __cpuid(1));
    if max < 7 {
        return false;
    }
    let bit = |reg: u32, n: u32| reg & (1 << n) != 0;
    let ssse3 = bit(leaf1.ecx, 9);
    let sse41 = bit(leaf1.ecx, 19);
    let aes = bit(leaf1.ecx, 25);
    let pclmul = bit(leaf1.ecx, 1);
    let osxsave = bit(leaf1.ecx, 27);
    let avx = bit(leaf1.ecx, 28);
    if !(ssse3 && sse41 && aes && pclmul && osxsave && avx) {
        return false;
    }
    // SAFETY: OSXSAVE is set, so XGETBV is enabled.
    let xcr0 = unsafe { _xgetbv(0) };
    if xcr0 & 0b110 != 0b110 {
        return false;
    }
    let leaf7 = __cpuid_count(7, 0);
    bit(leaf7.ebx, 5) && bit(leaf7.ecx, 9) && bit(leaf7.ecx, 10) // AVX2, VAES, VPCLMULQDQ
}

impl PageGcm {
    /// The key schedule and GHASH powers of `key`, or `None` if this CPU
    /// cannot run the fast path.
    pub fn new(key: &[u8; 32]) -> Option<Self> {
        if !supported() {
            return None;
        }
        // SAFETY: the features `setup` needs were checked just above.
        Some(unsafe { Self::setup(key) })
    }

    #[target_feature(enable = "aes,pclmulqdq,sse4.1,ssse3,avx2,vaes,vpclmulqdq")]
    unsafe fn setup(key: &[u8; 32]) -> Self {
        let round_keys = expand_key(key);
        let zero = _mm_setzero_si128();
        let h_block = encrypt_block(&round_keys, zero);
        let h = mul_x(byte_reverse(h_block));
        let mut pow = [h; 2 * LANES + 1];
        for i in 2..pow.len() {
            pow[i] = dot(pow[i - 1], h);
        }
        let pair =
            |a: __m128i, b: __m128i| _mm256_inserti128_si256::<1>(_mm256_zextsi128_si256(a), b);
        let powers: [__m256i; LANES] =
            core::array::from_fn(|i| pair(pow[2 * (LANES - i)], pow[2 * (LANES - i) - 1]));
        let folded = powers.map(|p| _mm256_xor_si256(p, _mm256_shuffle_epi32::<0x4e>(p)));
        // The powers of H are key material: no copy left behind.
        pow.zeroize();
        Self {
            round_keys,
            h,
            powers,
            folded,
        }
    }

    /// Seals the page at `src` under `nonce` and `aad` into `dst`; returns
    /// the tag. Each byte of `src` is read once.
    ///
    /// # Safety
    /// `src` must be readable and `dst` writable for [`PAGE`] bytes; they
    /// may be changed by others meanwhile (guest or host memory), which
    /// only changes what is sealed, never what is authenticated against
    /// what is written.
    pub unsafe fn seal(
        &self,
        nonce: &[u8; 12],
        aad: &[u8; AAD],
        src: *const u8,
        dst: *mut u8,
    ) -> [u8; 16] {
        // SAFETY: `self` exists only if `supported()` held (see `new`); the
        // caller vouches for the pointers.
        unsafe {
            self.crypt(
                nonce,
                aad,
                &mut SharedPage(src),
                dst,
                Direction::Seal,
                false,
            )
        }
    }

    /// As [`PageGcm::seal`], but the ciphertext goes out with non-temporal
    /// stores (where `dst` is 32-byte aligned; ordinary ones otherwise): for
    /// a destination another core reads next, which then is not read for
    /// ownership first. The caller orders the stores (`sfence`) before
    /// publishing them.
    ///
    /// # Safety
    /// As [`PageGcm::seal`].
    pub unsafe fn seal_streaming(
        &self,
        nonce: &[u8; 12],
        aad: &[u8; AAD],
        src: *const u8,
        dst: *mut u8,
    ) -> [u8; 16] {
        let aligned = (dst as usize).is_multiple_of(32);
        // SAFETY: as for `seal`; streaming stores only to an aligned `dst`.
        unsafe {
            self.crypt(
                nonce,
                aad,
                &mut SharedPage(src),
                dst,
                Direction::Seal,
                aligned,
            )
        }
    }

    /// Opens the sealed page at `src` (nonce, aad, tag) into `dst`; returns
    /// whether it is authentic. Each byte of `src` is read once and the tag
    /// covers exactly the bytes read, so `src` may be shared memory the
    /// host can change; `dst` must be private: on `false` it holds
    /// unauthenticated bytes the caller must not use.
    ///
    /// # Safety
    /// As [`PageGcm::seal`].
    pub unsafe fn open(
        &self,
        nonce: &[u8; 12],
        aad: &[u8; AAD],
        tag: &[u8; 16],
        src: *const u8,
        dst: *mut u8,
    ) -> bool {
        // SAFETY: as for `seal`.
        let computed = unsafe {
            self.crypt(
                nonce,
                aad,
                &mut SharedPage(src),
                dst,
                Direction::Open,
                false,
            )
        };
        // Constant time: no branch on where the tags differ.
        computed.ct_eq(tag).into()
    }

    /// CTR over the page from `src` to `dst` and the tag over the
    /// ciphertext: what is written when sealing, what is read when opening.
    #[target_feature(enable = "aes,pclmulqdq,sse4.1,ssse3,avx2,vaes,vpclmulqdq")]
    unsafe fn crypt<S: Source>(
        &self,
        nonce: &[u8; 12],
        aad: &[u8; AAD],
        src: &mut S,
        dst: *mut u8,
        direction: Direction,
        stream: bool,
    ) -> [u8; 16] {
        let rk = &self.round_keys;
        let mut j0 = [0u8; 16];
        j0[..12].copy_from_slice(nonce);
        j0[15] = 1;
        // SAFETY: `j0` and `aad` are 16 and 32 readable bytes.
        let (j0, a0, a1) = unsafe {
            (
                _mm_loadu_si128(j0.as_ptr().cast()),
                _mm_loadu_si128(aad.as_ptr().cast()),
                _mm_loadu_si128(aad.as_ptr().add(16).cast()),
            )
        };
        // GHASH state (POLYVAL domain) after the associated data.
        let mut s = dot(byte_reverse(a0), self.h);
        s = dot(_mm_xor_si128(s, byte_reverse(a1)), self.h);

        // Counter blocks byte-reversed, so the counter is the low dword of
        // each lane and plain 32-bit adds advance it: lanes hold counters
        // 2 and 3 of the page's first step.
        let rev = _mm256_broadcastsi128_si256(rev_mask());
        let first =
            _mm256_broadcastsi128_si256(_mm_add_epi32(byte_reverse(j0), _mm_set_epi32(0, 0, 0, 1)));
        let mut counters = _mm256_add_epi32(first, _mm256_set_epi32(0, 0, 0, 1, 0, 0, 0, 0));
        let two = _mm256_set_epi32(0, 0, 0, 2, 0, 0, 0, 2);
        let keys: [__m256i; 15] = core::array::from_fn(|i| _mm256_broadcastsi128_si256(rk[i]));

        // Software pipeline: while the AES rounds of step n run, the
        // ciphertext of step n - 1 (kept in a private buffer, never read
        // back from `dst`) is multiplied into GHASH.
        let mut previous = [_mm256_setzero_si256(); LANES];
        for step in 0..=PAGE / STEP {
            let encrypting = step < PAGE / STEP;
            let hashing = step > 0;
            let mut x = [counters; LANES];
            if encrypting {
                for (i, xi) in x.iter_mut().enumerate() {
                    if i > 0 {
                        counters = _mm256_add_epi32(counters, two);
                    }
                    *xi = _mm256_xor_si256(_mm256_shuffle_epi8(counters, rev), keys[0]);
                }
                counters = _mm256_add_epi32(counters, two);
            }
            let (mut lo, mut mid, mut hi) = (
                _mm256_setzero_si256(),
                _mm256_setzero_si256(),
                _mm256_setzero_si256(),
            );
            for (r, key) in keys[1..14].iter().enumerate() {
                if encrypting {
                    for xi in x.iter_mut() {
                        *xi = _mm256_aesenc_epi128(*xi, *key);
                    }
                }
                if hashing && r < LANES {
                    let mut y = previous[r];
                    if r == 0 {
                        // The low lane takes the running state; the high
                        // lane must stay as it is (zero-extended, never the
                        // cast, whose upper half is undefined).
                        y = _mm256_xor_si256(y, _mm256_zextsi128_si256(s));
                    }
                    let hp = self.powers[r];
                    lo = _mm256_xor_si256(lo, _mm256_clmulepi64_epi128::<0x00>(y, hp));
                    hi = _mm256_xor_si256(hi, _mm256_clmulepi64_epi128::<0x11>(y, hp));
                    let y_folded = _mm256_xor_si256(y, _mm256_shuffle_epi32::<0x4e>(y));
                    mid = _mm256_xor_si256(
                        mid,
                        _mm256_clmulepi64_epi128::<0x00>(y_folded, self.folded[r]),
                    );
                }
            }
            if hashing {
                let fold = |v: __m256i| {
                    _mm_xor_si128(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v))
                };
                let (lo, hi) = (fold(lo), fold(hi));
                // Karatsuba: (a0+a1)(b0+b1) - a0b0 - a1b1.
                let mid = _mm_xor_si128(fold(mid), _mm_xor_si128(lo, hi));
                s = reduce(
                    _mm_xor_si128(hi, _mm_srli_si128::<8>(mid)),
                    _mm_xor_si128(lo, _mm_slli_si128::<8>(mid)),
                );
            }
            if encrypting {
                for (i, xi) in x.iter().enumerate() {
                    let at = step * STEP + i * 32;
                    // SAFETY: `at + 32 <= PAGE`: inside both pages.
                    let p = unsafe { src.load(at) };
                    let c = _mm256_xor_si256(_mm256_aesenclast_epi128(*xi, keys[14]), p);
                    // SAFETY: as above; `stream` only with `dst` 32-byte aligned.
                    unsafe {
                        if stream {
                            _mm256_stream_si256(dst.add(at).cast(), c);
                        } else {
                            _mm256_storeu_si256(dst.add(at).cast(), c);
                        }
                    }
                    let ciphertext = match direction {
                        Direction::Seal => c,
                        Direction::Open => p,
                    };
                    previous[i] = _mm256_shuffle_epi8(ciphertext, rev);
                }
            }
        }

        // Lengths in bits: 256 of AAD, 32768 of ciphertext (big endian).
        let lengths = _mm_set_epi64x((AAD * 8) as i64, (PAGE * 8) as i64);
        s = dot(_mm_xor_si128(s, lengths), self.h);
        let tag = _mm_xor_si128(byte_reverse(s), encrypt_block(rk, j0));
        let mut out = [0u8; 16];
        // SAFETY: `out` is 16 writable bytes.
        unsafe { _mm_storeu_si128(out.as_mut_ptr().cast(), tag) };
        out
    }
}

/// Reverses the bytes of a 128-bit lane.
#[inline(always)]
fn rev_mask() -> __m128i {
    // SAFETY: SSE2 is baseline on x86-64.
    unsafe { _mm_set_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15) }
}

#[target_feature(enable = "ssse3")]
fn byte_reverse(v: __m128i) -> __m128i {
    _mm_shuffle_epi8(v, rev_mask())
}

/// POLYVAL's `mulX`: v * x.
#[target_feature(enable = "sse4.1")]
fn mul_x(v: __m128i) -> __m128i {
    // (v << 1) across the 128 bits.
    let shifted = _mm_or_si128(
        _mm_slli_epi64::<1>(v),
        _mm_slli_si128::<8>(_mm_srli_epi64::<63>(v)),
    );
    // All ones if bit 127 is set, else zero: no branch on the key's bits.
    let carry = _mm_shuffle_epi32::<0xff>(_mm_srai_epi32::<31>(v));
    let poly = _mm_set_epi64x(0xc200_0000_0000_0000u64 as i64, 1);
    _mm_xor_si128(shifted, _mm_and_si128(carry, poly))
}

/// D * x^-128 mod POLYVAL's polynomial for the 256-bit D = d1 * x^128 + d0.
#[target_feature(enable = "pclmulqdq,sse2")]
fn reduce(d1: __m128i, d0: __m128i) -> __m128i {
    let poly = _mm_set_epi64x(0, 0xc200_0000_0000_0000u64 as i64);
    let t = _mm_clmulepi64_si128::<0x00>(d0, poly);
    let d0 = _mm_xor_si128(_mm_shuffle_epi32::<0x4e>(d0), t);
    let t = _mm_clmulepi64_si128::<0x00>(d0, poly);
    let d0 = _mm_xor_si128(_mm_shuffle_epi32::<0x4e>(d0), t);
    _mm_xor_si128(d1, d0)
}

/// POLYVAL's dot: a * b * x^-128.
#[target_feature(enable = "pclmulqdq,sse2")]
fn dot(a: __m128i, b: __m128i) -> __m128i {
    let lo = _mm_clmulepi64_si128::<0x00>(a, b);
    let hi = _mm_clmulepi64_si128::<0x11>(a, b);
    let mid = _mm_xor_si128(
        _mm_clmulepi64_si128::<0x01>(a, b),
        _mm_clmulepi64_si128::<0x10>(a, b),
    );
    reduce(
        _mm_xor_si128(hi, _mm_srli_si128::<8>(mid)),
        _mm_xor_si128(lo, _mm_slli_si128::<8>(mid)),
    )
}

/// The key schedule's running XOR of a round key's words:
/// [w0, w0^w1, w0^w1^w2, w0^w1^w2^w3].
#[target_feature(enable = "sse2")]
fn spread(k: __m128i) -> __m128i {
    let t = _mm_slli_si128::<4>(k);
    let k = _mm_xor_si128(k, t);
    let t = _mm_slli_si128::<4>(t);
    let k = _mm_xor_si128(k, t);
    _mm_xor_si128(k, _mm_slli_si128::<4>(t))
}

/// The next even round key: the previous even one spread, XOR the odd one
/// rotated, substituted and XORed with `RCON`.
#[target_feature(enable = "aes,sse2")]
fn next_even<const RCON: i32>(even: __m128i, odd: __m128i) -> __m128i {
    _mm_xor_si128(
        spread(even),
        _mm_shuffle_epi32::<0xff>(_mm_aeskeygenassist_si128::<RCON>(odd)),
    )
}

/// The next odd round key: the previous odd one spread, XOR the new even
/// one substituted.
#[target_feature(enable = "aes,sse2")]
fn next_odd(even: __m128i, odd: __m128i) -> __m128i {
    _mm_xor_si128(
        spread(odd),
        _mm_shuffle_epi32::<0xaa>(_mm_aeskeygenassist_si128::<0>(even)),
    )
}

/// The next two round keys.
#[target_feature(enable = "aes,sse2")]
fn next_pair<const RCON: i32>(even: __m128i, odd: __m128i) -> (__m128i, __m128i) {
    let even = next_even::<RCON>(even, odd);
    (even, next_odd(even, odd))
}

/// The AES-256 key schedule (FIPS 197, 5.2): fifteen round keys.
#[target_feature(enable = "aes,sse2")]
fn expand_key(key: &[u8; 32]) -> [__m128i; 15] {
    // SAFETY: `key` is 32 readable bytes.
    let (even, odd) = unsafe {
        (
            _mm_loadu_si128(key.as_ptr().cast()),
            _mm_loadu_si128(key.as_ptr().add(16).cast()),
        )
    };
    let mut rk = [even; 15];
    rk[1] = odd;
    (rk[2], rk[3]) = next_pair::<0x01>(rk[0], rk[1]);
    (rk[4], rk[5]) = next_pair::<0x02>(rk[2], rk[3]);
    (rk[6], rk[7]) = next_pair::<0x04>(rk[4], rk[5]);
    (rk[8], rk[9]) = next_pair::<0x08>(rk[6], rk[7]);
    (rk[10], rk[11]) = next_pair::<0x10>(rk[8], rk[9]);
    (rk[12], rk[13]) = next_pair::<0x20>(rk[10], rk[11]);
    rk[14] = next_even::<0x40>(rk[12], rk[13]);
    rk
}

#[target_feature(enable = "aes,sse2")]
fn encrypt_block(rk: &[__m128i; 15], block: __m128i) -> __m128i {
    let mut x = _mm_xor_si128(block, rk[0]);
    for key in &rk[1..14] {
        x = _mm_aesenc_si128(x, *key);
    }
    _mm_aesenclast_si128(x, rk[14])
}

/// Hooks for the crate's tests (`tests/page_seal.rs`): the building blocks
/// alone, for known-answer tests, and how often the page seal reads each
/// piece of its source. Not part of the API.
#[doc(hidden)]
pub mod testing {
    use super::*;

    /// Whether the building blocks (AES-NI, PCLMULQDQ, SSSE3, SSE4.1) run
    /// on this CPU.
    pub fn blocks_supported() -> bool {
        let leaf1 = __cpuid(1);
        [1, 9, 19, 25].iter().all(|&n| leaf1.ecx & (1 << n) != 0)
    }

    /// AES-256 of one block (FIPS 197), through the crate's key schedule.
    pub fn aes256_encrypt_block(key: &[u8; 32], block: &[u8; 16]) -> Option<[u8; 16]> {
        if !blocks_supported() {
            return None;
        }
        // SAFETY: the features the functions need were checked above; the
        // loads and stores touch 16-byte arrays of ours.
        unsafe {
            let rk = expand_key(key);
            let c = encrypt_block(&rk, _mm_loadu_si128(block.as_ptr().cast()));
            let mut out = [0u8; 16];
            _mm_storeu_si128(out.as_mut_ptr().cast(), c);
            Some(out)
        }
    }

    /// POLYVAL(H, X_1, ..., X_n) (RFC 8452), with the crate's field
    /// arithmetic.
    pub fn polyval(h: &[u8; 16], blocks: &[[u8; 16]]) -> Option<[u8; 16]> {
        if !blocks_supported() {
            return None;
        }
        // SAFETY: as above.
        unsafe {
            let h = _mm_loadu_si128(h.as_ptr().cast());
            let mut s = _mm_setzero_si128();
            for x in blocks {
                s = dot(_mm_xor_si128(s, _mm_loadu_si128(x.as_ptr().cast())), h);
            }
            let mut out = [0u8; 16];
            _mm_storeu_si128(out.as_mut_ptr().cast(), s);
            Some(out)
        }
    }

    /// POLYVAL's `mulX` of one element.
    pub fn mul_x(v: &[u8; 16]) -> Option<[u8; 16]> {
        if !blocks_supported() {
            return None;
        }
        // SAFETY: as above.
        unsafe {
            let r = super::mul_x(_mm_loadu_si128(v.as_ptr().cast()));
            let mut out = [0u8; 16];
            _mm_storeu_si128(out.as_mut_ptr().cast(), r);
            Some(out)
        }
    }

    /// A source that counts the reads of each 32-byte piece.
    struct Counting<'a> {
        page: &'a [u8; PAGE],
        reads: [u32; PAGE / 32],
    }

    impl Source for Counting<'_> {
        #[target_feature(enable = "avx")]
        unsafe fn load(&mut self, at: usize) -> __m256i {
            self.reads[at / 32] += 1;
            // SAFETY: `at + 32 <= PAGE` (the caller's contract).
            unsafe { _mm256_loadu_si256(self.page.as_ptr().add(at).cast()) }
        }
    }

    /// Seals (`seal`) or opens `page` as [`PageGcm`] does and returns the
    /// tag and how many times each 32-byte piece of `page` was read.
    pub fn read_counts(
        gcm: &PageGcm,
        nonce: &[u8; 12],
        aad: &[u8; AAD],
        page: &[u8; PAGE],
        seal: bool,
    ) -> ([u8; 16], [u32; PAGE / 32]) {
        let mut out = [0u8; PAGE];
        let mut src = Counting {
            page,
            reads: [0; PAGE / 32],
        };
        let direction = if seal {
            Direction::Seal
        } else {
            Direction::Open
        };
        // SAFETY: `gcm` exists only where `supported()` held; `out` is a
        // writable page of ours.
        let tag = unsafe { gcm.crypt(nonce, aad, &mut src, out.as_mut_ptr(), direction, false) };
        (tag, src.reads)
    }
}
