//! The page seal against known answers and independent implementations.
//!
//! - building blocks: AES-256 (FIPS 197, appendix C.3), POLYVAL (RFC 8452,
//!   appendix A), `mulX` against a plain 128-bit reference;
//! - whole pages: the vectors in `vectors/page_gcm.txt` (made once with
//!   pyca/cryptography, i.e. OpenSSL; `vectors/generate.py`), thousands of
//!   pseudo-random cases against RustCrypto `aes-gcm` and `ring` (aligned and
//!   misaligned buffers, all-zero and all-one inputs), every single-bit
//!   change of ciphertext, tag, nonce and AAD refused, a proptest round trip
//!   with a fixed case count, and a count of how often each piece of the
//!   source is read.
//!
//! Its own harness: a test this CPU cannot run is reported as ignored, with
//! the reason printed, never as passed. A CPU that has every feature the
//! page path needs but on which the crate declines it fails.
#![allow(clippy::unwrap_used)]

use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::Aes256Gcm;
use libtest_mimic::{Arguments, Failed, Trial};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

use cgsvmm_page_gcm::{supported, testing, PageGcm, AAD, PAGE};

/// Pseudo-random cases compared with the references.
const DIFFERENTIAL_CASES: u64 = 2000;
/// proptest cases of the round trip.
const PROPTEST_CASES: u32 = 512;

/// A test of this binary.
type Test = fn() -> Result<(), Failed>;

/// A committed vector.
struct Vector {
    name: String,
    key: [u8; 32],
    nonce: [u8; 12],
    aad: [u8; 32],
    plaintext: Vec<u8>,
    ciphertext: Vec<u8>,
    tag: [u8; 16],
}

fn main() {
    let args = Arguments::from_args();
    let blocks = testing::blocks_supported();
    let page = supported();
    if !blocks {
        println!("SKIPPED (ignored below): this CPU lacks AES-NI, PCLMULQDQ, SSSE3 or SSE4.1");
    }
    if !page {
        println!(
            "SKIPPED (ignored below): this CPU lacks AVX2, VAES or VPCLMULQDQ; the migration \
             helper seals through ring here"
        );
    }
    let block_tests: [(&str, Test); 3] = [
        ("aes256_matches_fips_197", aes256_matches_fips_197),
        ("polyval_matches_rfc_8452", polyval_matches_rfc_8452),
        (
            "mul_x_matches_a_plain_reference",
            mul_x_matches_a_plain_reference,
        ),
    ];
    let page_tests: [(&str, Test); 7] = [
        ("seals_the_committed_vectors", seals_the_committed_vectors),
        (
            "matches_aes_gcm_and_ring_on_thousands_of_inputs",
            matches_aes_gcm_and_ring_on_thousands_of_inputs,
        ),
        (
            "refuses_every_single_bit_change",
            refuses_every_single_bit_change,
        ),
        ("round_trips_under_proptest", round_trips_under_proptest),
        ("reads_each_source_byte_once", reads_each_source_byte_once),
        (
            "in_place_copied_and_streamed_seals_are_alike",
            in_place_copied_and_streamed_seals_are_alike,
        ),
        ("wipes_its_keys_when_dropped", wipes_its_keys_when_dropped),
    ];
    let mut trials = vec![Trial::test(
        "the_page_path_runs_wherever_the_cpu_has_it",
        the_page_path_runs_wherever_the_cpu_has_it,
    )];
    trials.extend(
        block_tests
            .into_iter()
            .map(|(name, f)| Trial::test(name, f).with_ignored_flag(!blocks)),
    );
    trials.extend(
        page_tests
            .into_iter()
            .map(|(name, f)| Trial::test(name, f).with_ignored_flag(!page)),
    );
    libtest_mimic::run(&args, trials).exit();
}

fn check(ok: bool, what: impl FnOnce() -> String) -> Result<(), Failed> {
    if ok {
        Ok(())
    } else {
        Err(what().into())
    }
}

fn hex(s: &str) -> Vec<u8> {
    assert!(s.len().is_multiple_of(2), "odd hex length");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn array<const N: usize>(s: &str) -> [u8; N] {
    hex(s).try_into().unwrap()
}

/// A small deterministic generator (xorshift64) for reproducible cases.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn fill(&mut self, out: &mut [u8]) {
        for b in out {
            *b = self.next() as u8;
        }
    }
}

fn aes_gcm_seal(key: &[u8; 32], nonce: &[u8; 12], aad: &[u8], page: &[u8]) -> (Vec<u8>, [u8; 16]) {
    let cipher = Aes256Gcm::new_from_slice(key).unwrap();
    let mut buf = page.to_vec();
    let tag = cipher
        .encrypt_inout_detached(nonce.into(), aad, buf.as_mut_slice().into())
        .unwrap();
    (buf, tag.into())
}

fn ring_open(
    key: &[u8; 32],
    nonce: &[u8; 12],
    aad: &[u8],
    ct: &[u8],
    tag: &[u8; 16],
) -> Option<Vec<u8>> {
    let key = ring::aead::LessSafeKey::new(
        ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, key).unwrap(),
    );
    let mut buf = ct.to_vec();
    key.open_in_place_separate_tag(
        ring::aead::Nonce::assume_unique_for_key(*nonce),
        ring::aead::Aad::from(aad),
        ring::aead::Tag::from(*tag),
        &mut buf,
        0..,
    )
    .ok()
    .map(|p| p.to_vec())
}

fn seal(gcm: &PageGcm, nonce: &[u8; 12], aad: &[u8; AAD], src: &[u8]) -> (Vec<u8>, [u8; 16]) {
    assert_eq!(src.len(), PAGE);
    let mut out = vec![0u8; PAGE];
    // SAFETY: both buffers are PAGE bytes.
    let tag = unsafe { gcm.seal(nonce, aad, src.as_ptr(), out.as_mut_ptr()) };
    (out, tag)
}

fn open(
    gcm: &PageGcm,
    nonce: &[u8; 12],
    aad: &[u8; AAD],
    tag: &[u8; 16],
    ct: &[u8],
) -> Option<Vec<u8>> {
    assert_eq!(ct.len(), PAGE);
    let mut out = vec![0u8; PAGE];
    // SAFETY: both buffers are PAGE bytes.
    unsafe { gcm.open(nonce, aad, tag, ct.as_ptr(), out.as_mut_ptr()) }.then_some(out)
}

fn the_page_path_runs_wherever_the_cpu_has_it() -> Result<(), Failed> {
    let has_all = std::arch::is_x86_feature_detected!("ssse3")
        && std::arch::is_x86_feature_detected!("sse4.1")
        && std::arch::is_x86_feature_detected!("aes")
        && std::arch::is_x86_feature_detected!("pclmulqdq")
        && std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("vaes")
        && std::arch::is_x86_feature_detected!("vpclmulqdq");
    check(supported() == has_all, || {
        format!(
            "the CPU has every feature of the page path: {has_all}, but supported() says {}",
            supported()
        )
    })?;
    check(PageGcm::new(&[0; 32]).is_some() == has_all, || {
        "PageGcm::new disagrees with the CPU's features".into()
    })
}

fn aes256_matches_fips_197() -> Result<(), Failed> {
    // FIPS 197, appendix C.3 (AES-256).
    let key: [u8; 32] = array("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f");
    let plaintext: [u8; 16] = array("00112233445566778899aabbccddeeff");
    let want: [u8; 16] = array("8ea2b7ca516745bfeafc49904b496089");
    let got = testing::aes256_encrypt_block(&key, &plaintext).unwrap();
    check(got == want, || format!("AES-256 gave {got:02x?}"))
}

fn polyval_matches_rfc_8452() -> Result<(), Failed> {
    // RFC 8452, appendix A.
    let h: [u8; 16] = array("25629347589242761d31f826ba4b757b");
    let x1: [u8; 16] = array("4f4f95668c83dfb6401762bb2d01a262");
    let x2: [u8; 16] = array("d1a24ddd2721d006bbe45f20d3c9f362");
    let want: [u8; 16] = array("f7a3b47b846119fae5b7866cf5e5b77e");
    let got = testing::polyval(&h, &[x1, x2]).unwrap();
    check(got == want, || format!("POLYVAL gave {got:02x?}"))
}

fn mul_x_matches_a_plain_reference() -> Result<(), Failed> {
    // mulX in POLYVAL's field: v * x mod x^128 + x^127 + x^126 + x^121 + 1,
    // little-endian: shift left by one, and if bit 127 fell out, add the
    // polynomial's low terms (bits 127, 126, 121 and 0).
    let reference = |v: u128| {
        let carry = v >> 127;
        (v << 1) ^ (carry * ((1 << 127) | (1 << 126) | (1 << 121) | 1))
    };
    let mut rng = Rng::new(11);
    let mut cases = vec![0u128, 1, 1 << 127, u128::MAX, (1 << 127) | 1];
    cases.extend((0..1000).map(|_| u128::from(rng.next()) << 64 | u128::from(rng.next())));
    for v in cases {
        let got = u128::from_le_bytes(testing::mul_x(&v.to_le_bytes()).unwrap());
        check(got == reference(v), || {
            format!("mulX({v:#x}) gave {got:#x}")
        })?;
    }
    Ok(())
}

/// The committed vectors.
fn vectors() -> Vec<Vector> {
    let text = include_str!("vectors/page_gcm.txt");
    let mut out = Vec::new();
    for block in text.split("\nname = ").skip(1) {
        let mut lines = block.lines();
        let name = lines.next().unwrap().to_string();
        let mut field = |label: &str| {
            let line = lines.next().unwrap();
            let value = line.strip_prefix(label).and_then(|l| l.strip_prefix(" = "));
            hex(value.unwrap_or_else(|| panic!("{name}: expected {label}, got {line}")))
        };
        out.push(Vector {
            key: field("key").try_into().unwrap(),
            nonce: field("nonce").try_into().unwrap(),
            aad: field("aad").try_into().unwrap(),
            plaintext: field("plaintext"),
            ciphertext: field("ciphertext"),
            tag: field("tag").try_into().unwrap(),
            name,
        });
    }
    out
}

fn seals_the_committed_vectors() -> Result<(), Failed> {
    let vectors = vectors();
    check(vectors.len() == 4, || {
        format!("{} vectors read", vectors.len())
    })?;
    for Vector {
        name,
        key,
        nonce,
        aad,
        plaintext,
        ciphertext,
        tag,
    } in vectors
    {
        let gcm = PageGcm::new(&key).unwrap();
        let (ct, t) = seal(&gcm, &nonce, &aad, &plaintext);
        check(ct == ciphertext, || format!("{name}: ciphertext differs"))?;
        check(t == tag, || format!("{name}: tag differs"))?;
        let opened = open(&gcm, &nonce, &aad, &tag, &ciphertext);
        check(opened.as_deref() == Some(&plaintext[..]), || {
            format!("{name}: does not open")
        })?;
    }
    Ok(())
}

fn matches_aes_gcm_and_ring_on_thousands_of_inputs() -> Result<(), Failed> {
    let mut rng = Rng::new(2024);
    // Room for a page at any of 64 offsets, source and destination.
    let mut src_buf = vec![0u8; PAGE + 64];
    let mut dst_buf = vec![0u8; PAGE + 64];
    for case in 0..DIFFERENTIAL_CASES {
        let (mut key, mut nonce, mut aad) = ([0u8; 32], [0u8; 12], [0u8; AAD]);
        let (s, d) = ((rng.next() % 64) as usize, (rng.next() % 64) as usize);
        match case % 50 {
            0 => src_buf.fill(0),
            1 => {
                src_buf.fill(0xff);
                key = [0xff; 32];
                nonce = [0xff; 12];
                aad = [0xff; AAD];
            }
            _ => {
                rng.fill(&mut key);
                rng.fill(&mut nonce);
                rng.fill(&mut aad);
                rng.fill(&mut src_buf);
            }
        }
        let page = &src_buf[s..s + PAGE];
        let gcm = PageGcm::new(&key).unwrap();
        // SAFETY: both ranges are PAGE bytes inside their buffers.
        let tag = unsafe { gcm.seal(&nonce, &aad, page.as_ptr(), dst_buf.as_mut_ptr().add(d)) };
        let ct = &dst_buf[d..d + PAGE];
        let (want_ct, want_tag) = aes_gcm_seal(&key, &nonce, &aad, page);
        check(ct == &want_ct[..] && tag == want_tag, || {
            format!("case {case} (offsets {s}, {d}) differs from aes-gcm")
        })?;
        let ring_plain = ring_open(&key, &nonce, &aad, ct, &tag);
        check(ring_plain.as_deref() == Some(page), || {
            format!("case {case}: ring does not open it")
        })?;
        let mut back = vec![0u8; PAGE + 64];
        // SAFETY: as above.
        let ok = unsafe { gcm.open(&nonce, &aad, &tag, ct.as_ptr(), back.as_mut_ptr().add(s)) };
        check(ok && &back[s..s + PAGE] == page, || {
            format!("case {case}: does not open its own seal")
        })?;
    }
    Ok(())
}

fn refuses_every_single_bit_change() -> Result<(), Failed> {
    let mut rng = Rng::new(7);
    let (mut key, mut nonce, mut aad) = ([0u8; 32], [0u8; 12], [0u8; AAD]);
    let mut page = vec![0u8; PAGE];
    rng.fill(&mut key);
    rng.fill(&mut nonce);
    rng.fill(&mut aad);
    rng.fill(&mut page);
    let gcm = PageGcm::new(&key).unwrap();
    let (ct, tag) = seal(&gcm, &nonce, &aad, &page);
    check(open(&gcm, &nonce, &aad, &tag, &ct).is_some(), || {
        "the genuine page does not open".into()
    })?;
    let mut bad = ct.clone();
    for bit in 0..PAGE * 8 {
        bad[bit / 8] ^= 1 << (bit % 8);
        check(open(&gcm, &nonce, &aad, &tag, &bad).is_none(), || {
            format!("ciphertext bit {bit} flipped was accepted")
        })?;
        bad[bit / 8] ^= 1 << (bit % 8);
    }
    for bit in 0..128 {
        let mut t = tag;
        t[bit / 8] ^= 1 << (bit % 8);
        check(open(&gcm, &nonce, &aad, &t, &ct).is_none(), || {
            format!("tag bit {bit} flipped was accepted")
        })?;
    }
    for bit in 0..96 {
        let mut n = nonce;
        n[bit / 8] ^= 1 << (bit % 8);
        check(open(&gcm, &n, &aad, &tag, &ct).is_none(), || {
            format!("nonce bit {bit} flipped was accepted")
        })?;
    }
    for bit in 0..AAD * 8 {
        let mut a = aad;
        a[bit / 8] ^= 1 << (bit % 8);
        check(open(&gcm, &nonce, &a, &tag, &ct).is_none(), || {
            format!("AAD bit {bit} flipped was accepted")
        })?;
    }
    Ok(())
}

fn round_trips_under_proptest() -> Result<(), Failed> {
    let mut runner = TestRunner::new(Config {
        cases: PROPTEST_CASES,
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = (
        any::<[u8; 32]>(),
        any::<[u8; 12]>(),
        any::<[u8; 32]>(),
        proptest::collection::vec(any::<u8>(), PAGE),
        0usize..64,
    );
    runner
        .run(&strategy, |(key, nonce, aad, page, offset)| {
            let gcm = PageGcm::new(&key).unwrap();
            let mut src = vec![0u8; PAGE + 64];
            src[offset..offset + PAGE].copy_from_slice(&page);
            let (ct, tag) = seal(&gcm, &nonce, &aad, &src[offset..offset + PAGE]);
            let (want_ct, want_tag) = aes_gcm_seal(&key, &nonce, &aad, &page);
            prop_assert!(ct == want_ct);
            prop_assert_eq!(tag, want_tag);
            prop_assert_eq!(open(&gcm, &nonce, &aad, &tag, &ct), Some(page));
            Ok(())
        })
        .map_err(|e| Failed::from(e.to_string()))
}

fn reads_each_source_byte_once() -> Result<(), Failed> {
    let mut page = [0u8; PAGE];
    Rng::new(3).fill(&mut page);
    let (key, nonce, aad) = ([5u8; 32], [6u8; 12], [7u8; AAD]);
    let gcm = PageGcm::new(&key).unwrap();
    let (tag, reads) = testing::read_counts(&gcm, &nonce, &aad, &page, true);
    check(reads.iter().all(|&n| n == 1), || {
        format!("seal reads per piece: {reads:?}")
    })?;
    let (_, want_tag) = seal(&gcm, &nonce, &aad, &page);
    check(tag == want_tag, || {
        "the counting source seals differently".into()
    })?;
    let (ct, _) = seal(&gcm, &nonce, &aad, &page);
    let ct: [u8; PAGE] = ct.try_into().unwrap();
    let (open_tag, reads) = testing::read_counts(&gcm, &nonce, &aad, &ct, false);
    check(reads.iter().all(|&n| n == 1), || {
        format!("open reads per piece: {reads:?}")
    })?;
    check(open_tag == tag, || "opening computes another tag".into())
}

fn in_place_copied_and_streamed_seals_are_alike() -> Result<(), Failed> {
    let gcm = PageGcm::new(&[1; 32]).unwrap();
    let mut page = vec![0u8; PAGE];
    Rng::new(5).fill(&mut page);
    let (nonce, aad) = ([2u8; 12], [4u8; AAD]);
    let (out, t1) = seal(&gcm, &nonce, &aad, &page);
    let mut aligned = vec![0u8; PAGE + 32];
    let at = aligned.as_ptr().align_offset(32);
    // SAFETY: `at..at + PAGE` lies in `aligned` and is 32-byte aligned.
    let t3 =
        unsafe { gcm.seal_streaming(&nonce, &aad, page.as_ptr(), aligned.as_mut_ptr().add(at)) };
    check(t1 == t3 && aligned[at..at + PAGE] == out[..], || {
        "streamed seal differs".into()
    })?;
    let mut inplace = page.clone();
    let p = inplace.as_mut_ptr();
    // SAFETY: one buffer of PAGE bytes, read before written piece by piece.
    let t2 = unsafe { gcm.seal(&nonce, &aad, p, p) };
    check(t1 == t2 && inplace == out, || {
        "in-place seal differs".into()
    })
}

fn wipes_its_keys_when_dropped() -> Result<(), Failed> {
    let key = [0x5a; 32];
    let mut slot = std::mem::MaybeUninit::new(PageGcm::new(&key).unwrap());
    let bytes = |slot: &std::mem::MaybeUninit<PageGcm>| {
        // SAFETY: reading the slot's bytes as bytes; PageGcm has no padding
        // (arrays of vectors only).
        unsafe {
            std::slice::from_raw_parts(slot.as_ptr().cast::<u8>(), size_of::<PageGcm>()).to_vec()
        }
    };
    check(bytes(&slot).iter().any(|&b| b != 0), || {
        "no key material to begin with".into()
    })?;
    // SAFETY: the slot holds a PageGcm, dropped once in place and never
    // used again as one.
    unsafe { slot.assume_init_drop() };
    let after = bytes(&slot);
    check(after.iter().all(|&b| b == 0), || {
        format!(
            "{} key bytes left after drop",
            after.iter().filter(|&&b| b != 0).count()
        )
    })
}
