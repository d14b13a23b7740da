use super::*;

use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::Aes256Gcm;

/// A small deterministic generator for test inputs.
fn fill(seed: u64, out: &mut [u8]) {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for b in out {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
}

fn reference(
    key: &[u8; 32],
    nonce: &[u8; 12],
    aad: &[u8; AAD],
    page: &[u8],
) -> (Vec<u8>, [u8; 16]) {
    let cipher = Aes256Gcm::new_from_slice(key).unwrap();
    let mut buf = page.to_vec();
    let tag = cipher
        .encrypt_inout_detached(nonce.into(), aad, buf.as_mut_slice().into())
        .unwrap();
    (buf, tag.into())
}

#[test]
fn seals_exactly_as_aes_256_gcm_does() {
    let Some(_) = PageGcm::new(&[0; 32]) else {
        println!("SKIPPED: this CPU lacks VAES/VPCLMULQDQ; the helper uses ring here");
        return;
    };
    for seed in 0..32u64 {
        let (mut key, mut nonce, mut aad) = ([0u8; 32], [0u8; 12], [0u8; AAD]);
        let mut page = vec![0u8; PAGE];
        fill(seed, &mut key);
        fill(seed + 1000, &mut nonce);
        fill(seed + 2000, &mut aad);
        fill(seed + 3000, &mut page);
        let gcm = PageGcm::new(&key).unwrap();
        let mut out = vec![0u8; PAGE];
        // SAFETY: both buffers are PAGE bytes.
        let tag = unsafe { gcm.seal(&nonce, &aad, page.as_ptr(), out.as_mut_ptr()) };
        let (ct, want) = reference(&key, &nonce, &aad, &page);
        assert!(out == ct, "ciphertext differs (seed {seed})");
        assert_eq!(tag, want, "tag differs (seed {seed})");
    }
}

#[test]
fn ring_opens_what_it_seals_and_refuses_a_flipped_bit() {
    let Some(gcm) = PageGcm::new(&[7; 32]) else {
        println!("SKIPPED: this CPU lacks VAES/VPCLMULQDQ; the helper uses ring here");
        return;
    };
    let mut page = vec![0u8; PAGE];
    fill(99, &mut page);
    let nonce = [3u8; 12];
    let aad = [9u8; AAD];
    let mut out = vec![0u8; PAGE];
    // SAFETY: both buffers are PAGE bytes.
    let tag = unsafe { gcm.seal(&nonce, &aad, page.as_ptr(), out.as_mut_ptr()) };
    let key = ring::aead::LessSafeKey::new(
        ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, &[7; 32]).unwrap(),
    );
    let open = |ct: &mut Vec<u8>| {
        key.open_in_place_separate_tag(
            ring::aead::Nonce::assume_unique_for_key(nonce),
            ring::aead::Aad::from(&aad),
            ring::aead::Tag::from(tag),
            ct,
            0..,
        )
        .map(|p| p.to_vec())
    };
    assert_eq!(open(&mut out.clone()).unwrap(), page);
    let mut flipped = out.clone();
    flipped[4000] ^= 1;
    assert!(open(&mut flipped).is_err());
}

#[test]
fn in_place_copied_and_streamed_seals_are_alike() {
    let Some(gcm) = PageGcm::new(&[1; 32]) else {
        println!("SKIPPED: this CPU lacks VAES/VPCLMULQDQ; the helper uses ring here");
        return;
    };
    let mut page = vec![0u8; PAGE];
    fill(5, &mut page);
    let (nonce, aad) = ([2u8; 12], [4u8; AAD]);
    let mut out = vec![0u8; PAGE];
    // SAFETY: both buffers are PAGE bytes.
    let t1 = unsafe { gcm.seal(&nonce, &aad, page.as_ptr(), out.as_mut_ptr()) };
    let mut aligned = vec![0u8; PAGE + 32];
    let at = aligned.as_ptr().align_offset(32);
    // SAFETY: `at..at + PAGE` lies in `aligned` and is 32-byte aligned.
    let t3 =
        unsafe { gcm.seal_streaming(&nonce, &aad, page.as_ptr(), aligned.as_mut_ptr().add(at)) };
    assert_eq!(t1, t3);
    assert!(aligned[at..at + PAGE] == out[..]);
    let mut inplace = page.clone();
    let p = inplace.as_mut_ptr();
    // SAFETY: one buffer of PAGE bytes, read before written block by block.
    let t2 = unsafe { gcm.seal(&nonce, &aad, p, p) };
    assert_eq!(t1, t2);
    assert!(inplace == out);
}

#[test]
fn opens_what_aes_256_gcm_sealed_and_nothing_else() {
    let Some(_) = PageGcm::new(&[0; 32]) else {
        println!("SKIPPED: this CPU lacks VAES/VPCLMULQDQ; the helper uses ring here");
        return;
    };
    for seed in 0..8u64 {
        let (mut key, mut nonce, mut aad) = ([0u8; 32], [0u8; 12], [0u8; AAD]);
        let mut page = vec![0u8; PAGE];
        fill(seed + 50, &mut key);
        fill(seed + 60, &mut nonce);
        fill(seed + 70, &mut aad);
        fill(seed + 80, &mut page);
        let gcm = PageGcm::new(&key).unwrap();
        let (ct, tag) = reference(&key, &nonce, &aad, &page);
        let mut out = vec![0u8; PAGE];
        // SAFETY: both buffers are PAGE bytes.
        assert!(unsafe { gcm.open(&nonce, &aad, &tag, ct.as_ptr(), out.as_mut_ptr()) });
        assert!(out == page, "plaintext differs (seed {seed})");
        // Any flipped bit of ciphertext, tag, nonce or AAD is refused.
        let mut bad_ct = ct.clone();
        bad_ct[(seed as usize * 509) % PAGE] ^= 0x80;
        let mut bad_tag = tag;
        bad_tag[15] ^= 1;
        let mut bad_nonce = nonce;
        bad_nonce[0] ^= 1;
        let mut bad_aad = aad;
        bad_aad[31] ^= 1;
        // SAFETY: as above.
        unsafe {
            assert!(!gcm.open(&nonce, &aad, &tag, bad_ct.as_ptr(), out.as_mut_ptr()));
            assert!(!gcm.open(&nonce, &aad, &bad_tag, ct.as_ptr(), out.as_mut_ptr()));
            assert!(!gcm.open(&bad_nonce, &aad, &tag, ct.as_ptr(), out.as_mut_ptr()));
            assert!(!gcm.open(&nonce, &bad_aad, &tag, ct.as_ptr(), out.as_mut_ptr()));
        }
    }
}
