//! Transport encryption: the session (keys, id, nonce counters, digest of
//! what was sent or received, where it stands) and the page operations.
//!
//! - key, session id, digest key = HKDF-SHA256(ikm = transport key, salt =
//!   source nonce || target nonce, info = HKDF_INFO || the VM's identity
//!   from the measured launch configuration), 32 + 16 + 32 bytes; for a
//!   snapshot (no target helper to answer), salt = the source nonce alone
//!   and info = SNAPSHOT_HKDF_LABEL || the same;
//! - page nonce = helper index (u32 LE) || that helper's counter (u64 LE).
//!   The counters live in the session state, are reserved only under the
//!   session lock and are never reset within a boot, so no (key, nonce)
//!   pair can repeat whatever the host does (and keys are fresh per session
//!   anyway); the seal uses helper u32::MAX;
//! - AAD = session id || gpa || generation: a record moved to another GPA,
//!   replayed with another generation or taken from another session fails
//!   authentication;
//! - digest: count and two u64 lanes, the wrapping sums over records of the
//!   two halves of AES-256(digest key, gpa || generation). The same on both
//!   sides whatever the order in which records travel; keyed, so the host,
//!   which sees every (gpa, generation), cannot know the terms and so cannot
//!   pick records to drop whose terms sum to zero.
//!
//! A session goes Idle -> (source) Begun -> Open -> Sealed, or Idle ->
//! (target) Open -> Closed, and back to Idle only by SESSION_END. BEGIN,
//! PEER, SEAL, VERIFY_SEAL and END take the session lock exclusively, so no
//! batch runs while keys, counters, the digest or the generation table
//! change; batches share it. Keys are wiped when dropped: at SEAL, at
//! VERIFY_SEAL and at END.

use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use aes::cipher::{BlockCipherEncrypt, KeyInit};
use aes::Aes256;
use hkdf::Hkdf;
use ring::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey, AES_256_GCM};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroize;

use cgsvmm_guests::abi::helper::{self as h, offsets, role, status};
use cgsvmm_guests::abi::GpaRange;
use cgsvmm_guests::memcpy;
use cgsvmm_guests::ranges::{coverage, Coverage};
use cgsvmm_guests::sync::RwSpin;
use cgsvmm_guests::wiped::Wiped;
use cgsvmm_page_gcm::PageGcm;

use crate::mailbox::Mailbox;
use crate::Env;

const PAGE: usize = h::PAGE_SIZE;
// The AEAD's unit is the guest page.
const _: () = assert!(cgsvmm_page_gcm::PAGE == PAGE);
/// Nonce "helper index" of the sealed end record.
const SEAL_HELPER: u32 = u32::MAX;
/// Nonce counters: one per helper and one for the seal.
const COUNTERS: usize = h::MAX_HELPERS as usize + 1;

/// A failed command: (status code, index of the failing record).
pub type Failure = (i32, u32);

/// Where the session stands.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No session: SESSION_BEGIN may start one.
    Idle,
    /// Source: own nonce handed out, waiting for the target's (PEER).
    SourceBegun,
    /// Source: keys derived; ENCRYPT until SEAL.
    SourceOpen,
    /// Source: sealed; only SESSION_END.
    SourceSealed,
    /// Target: keys derived; DECRYPT until VERIFY_SEAL.
    TargetOpen,
    /// Target: VERIFY_SEAL ran, whatever it found; only SESSION_END.
    TargetClosed,
}

/// The one session of this MH, shared by every helper vCPU (behind
/// [`SESSION`]'s lock).
pub struct State {
    phase: Phase,
    own_nonce: [u8; 32],
    keys: Option<Keys>,
    session_id: [u8; 16],
    /// Next nonce counter of each helper (and of the seal), minus one.
    /// Never reset: see the module doc.
    counters: [AtomicU64; COUNTERS],
    digest_count: AtomicU64,
    digest: [AtomicU64; DIGEST_LANES],
}

/// What a session's key derivation yields; every part is wiped when it is
/// dropped.
struct Keys {
    /// Opens pages; seals and opens the end record; seals pages where
    /// `page` cannot run.
    aead: Wiped<LessSafeKey>,
    /// The same key for sealing whole pages straight from guest memory to
    /// the mailbox (CPUs with VAES and VPCLMULQDQ).
    page: Option<PageGcm>,
    /// The digest's keyed terms.
    digest: Wiped<Aes256>,
}

/// u64 lanes of the digest (one AES block).
const DIGEST_LANES: usize = 2;

pub static SESSION: RwSpin<State> = RwSpin::new(State {
    phase: Phase::Idle,
    own_nonce: [0; 32],
    keys: None,
    session_id: [0; 16],
    counters: [const { AtomicU64::new(0) }; COUNTERS],
    digest_count: AtomicU64::new(0),
    digest: [const { AtomicU64::new(0) }; DIGEST_LANES],
});

/// One batch's share of the digest, summed locally.
#[derive(Default)]
pub struct Tally {
    count: u64,
    lanes: [u64; DIGEST_LANES],
}

impl Tally {
    fn add(&mut self, key: &Aes256, gpa: u64, generation: u64) {
        let mut block = aes::Block::default();
        block[..8].copy_from_slice(&gpa.to_le_bytes());
        block[8..].copy_from_slice(&generation.to_le_bytes());
        key.encrypt_block(&mut block);
        for (lane, chunk) in self.lanes.iter_mut().zip(block.chunks_exact(8)) {
            *lane = lane.wrapping_add(u64::from_le_bytes(chunk.try_into().expect("8 bytes")));
        }
        self.count += 1;
    }
}

impl State {
    /// Reserves `n` nonce counters of `helper`; returns the first.
    fn reserve(&self, helper: u32, n: u64) -> u64 {
        let slot = (helper as usize).min(COUNTERS - 1);
        self.counters[slot].fetch_add(n, Ordering::Relaxed) + 1
    }

    /// Adds what a batch processed to the session's digest (once per
    /// batch: the shared atomics are touched by every helper).
    fn account(&self, tally: &Tally) {
        if tally.count == 0 {
            return;
        }
        for (lane, v) in self.digest.iter().zip(tally.lanes) {
            lane.fetch_add(v, Ordering::Relaxed);
        }
        self.digest_count.fetch_add(tally.count, Ordering::Relaxed);
    }

    /// Count, digest, the shared ranges' hash and the host's stream hash:
    /// the part of the seal both sides must agree on.
    fn seal_checked(
        &self,
        shared_hash: &[u8; 16],
        stream_hash: &[u8; 32],
    ) -> [u8; h::SEAL_CHECKED] {
        let mut out = [0u8; h::SEAL_CHECKED];
        out[..8].copy_from_slice(&self.digest_count.load(Ordering::Relaxed).to_le_bytes());
        for (i, lane) in self.digest.iter().enumerate() {
            out[8 + i * 8..16 + i * 8].copy_from_slice(&lane.load(Ordering::Relaxed).to_le_bytes());
        }
        out[24..40].copy_from_slice(shared_hash);
        out[40..].copy_from_slice(stream_hash);
        out
    }

    /// Back to no session: keys wiped (by their drop), ids forgotten.
    fn clear(&mut self) {
        self.keys = None;
        self.phase = Phase::Idle;
        self.own_nonce.zeroize();
        self.session_id.zeroize();
    }

    /// A fresh session's digest and generation table (every page unsent).
    fn reset_tallies(&mut self, env: &Env) {
        self.digest_count.store(0, Ordering::Relaxed);
        for d in &self.digest {
            d.store(0, Ordering::Relaxed);
        }
        for i in 0..env.ram_pages().min(env.gen_entries) {
            env.generation(i).store(0, Ordering::Relaxed);
        }
    }
}

/// Starts pulling a guest page into the cache while the current one is
/// being encrypted (the copy-in is otherwise a wait on DRAM). One prefetch
/// per two lines: the hardware fetches the pair, and a full 64 would stall
/// on the fill buffers (measured: 60-200 cycles a page more).
fn prefetch_page(gpa: u64) {
    for line in (0..PAGE as u64).step_by(128) {
        // SAFETY: prefetching has no architectural effect and never faults;
        // callers pass a validated page of guest RAM anyway.
        unsafe {
            core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(
                (gpa + line) as *const i8,
            )
        };
    }
}

/// Private per-helper page buffers: plaintext never touches shared memory.
#[repr(align(4096))]
struct Scratch(core::cell::UnsafeCell<[[u8; PAGE]; h::MAX_HELPERS as usize]>);
// SAFETY: helper i only ever touches entry i (see `scratch`).
unsafe impl Sync for Scratch {}
static SCRATCH: Scratch = Scratch(core::cell::UnsafeCell::new(
    [[0; PAGE]; h::MAX_HELPERS as usize],
));

/// Helper `index`'s scratch page. The index was claimed (`IndexClaims`):
/// below MAX_HELPERS and no other helper's.
fn scratch(index: u32) -> &'static mut [u8; PAGE] {
    // SAFETY: each helper vCPU calls this with its own claimed index only
    // and holds the reference for the duration of one page operation; an
    // index past the array would panic (a fault), never alias.
    unsafe { &mut (*SCRATCH.0.get())[index as usize] }
}

/// SESSION_BEGIN: refused while a session is open; otherwise a fresh nonce
/// from the CPU, a fresh digest and generation table, and for the target
/// the keys at once.
pub fn begin(mbox: &Mailbox, env: &Env) -> Result<(), Failure> {
    let mut args: h::SessionArgs = mbox.read_arg();
    let incoming = args.role == role::TARGET || args.role == role::SNAPSHOT_TARGET;
    if !incoming && args.role != role::SOURCE && args.role != role::SNAPSHOT_SOURCE {
        return Err((status::BAD_ARGS, 0));
    }
    // Only a VM launched to receive a migration takes pages in, and only
    // until one migration into it verified: after that its guest may run,
    // and a new target session would let the host roll its pages back.
    if incoming && (!env.incoming || RECEIVED.load(Ordering::Acquire)) {
        return Err((status::NOT_INCOMING, 0));
    }
    // Entropy, the key and the derivation outside the lock: a fault there
    // (a CPUID lie) must not leave the lock held. A snapshot target makes
    // no nonce: its keys come from the one in the file.
    let nonce = if args.role == role::SNAPSHOT_TARGET {
        [0; 32]
    } else {
        fresh_nonce(env)?
    };
    let mut key = transport_key().ok_or((status::NO_KEY, 0))?;
    let derived = match args.role {
        role::TARGET => Some((derive(&key, &args.peer_nonce, &nonce, env), true)),
        role::SNAPSHOT_SOURCE => Some((derive_snapshot(&key, &nonce, env), false)),
        role::SNAPSHOT_TARGET => Some((derive_snapshot(&key, &args.peer_nonce, env), true)),
        _ => None,
    };
    key.zeroize();
    let session_id = SESSION.write(|s| {
        if s.phase != Phase::Idle {
            return Err((status::SESSION_OPEN, 0));
        }
        s.clear();
        s.reset_tallies(env);
        s.own_nonce = nonce;
        match derived {
            Some(((keys, id), target)) => {
                s.keys = Some(keys);
                s.session_id = id;
                s.phase = if target {
                    Phase::TargetOpen
                } else {
                    Phase::SourceOpen
                };
            }
            None => s.phase = Phase::SourceBegun,
        }
        Ok(s.session_id)
    })?;
    args.own_nonce = nonce;
    args.session_id = session_id;
    mbox.write_arg(&args);
    Ok(())
}

/// Set once a migration into this VM verified: no target session after it
/// in this boot.
static RECEIVED: AtomicBool = AtomicBool::new(false);

/// SESSION_PEER (source): the target's nonce completes the key.
pub fn peer(mbox: &Mailbox, env: &Env) -> Result<(), Failure> {
    let mut args: h::SessionArgs = mbox.read_arg();
    let begun = |s: &State| (s.phase == Phase::SourceBegun).then_some(s.own_nonce);
    let own_nonce = SESSION.read(begun).ok_or((status::NO_SESSION, 0))?;
    // The derivation outside the lock, as in `begin`; installed only if
    // the session is still the one it was derived for.
    let mut key = transport_key().ok_or((status::NO_KEY, 0))?;
    let (keys, id) = derive(&key, &own_nonce, &args.peer_nonce, env);
    key.zeroize();
    SESSION.write(|s| {
        if begun(s) != Some(own_nonce) {
            return Err((status::NO_SESSION, 0));
        }
        s.keys = Some(keys);
        s.session_id = id;
        s.phase = Phase::SourceOpen;
        Ok(())
    })?;
    args.session_id = id;
    mbox.write_arg(&args);
    Ok(())
}

/// SESSION_END (and the seed protocol's RESET): forgets the session; the
/// keys are wiped. Nonce counters go on.
pub fn end() {
    SESSION.write(State::clear);
}

fn transport_key() -> Option<[u8; 32]> {
    let header = crate::helper_header();
    // SAFETY: the secret page named by our header is mapped and private.
    let mut secret: h::HelperSecret =
        unsafe { core::ptr::read_volatile(header.secret_gpa as *const h::HelperSecret) };
    let key = (secret.magic == h::CONFIG_MAGIC).then_some(secret.key);
    secret.key.zeroize();
    key
}

/// A snapshot's keys: the source helper's nonce alone as the salt, and
/// the snapshot label before the info, so they are never a live session's.
/// The label is what separates them: HMAC pads a short salt with zeros, so
/// a 32-byte nonce salts exactly as that nonce followed by 32 zero bytes
/// would in a live session.
fn derive_snapshot(
    transport_key: &[u8; 32],
    source_nonce: &[u8; 32],
    env: &Env,
) -> (Keys, [u8; 16]) {
    hkdf_keys(transport_key, source_nonce, h::SNAPSHOT_HKDF_LABEL, env)
}

/// A live session's keys: both nonces as the salt.
fn derive(
    transport_key: &[u8; 32],
    source_nonce: &[u8; 32],
    target_nonce: &[u8; 32],
    env: &Env,
) -> (Keys, [u8; 16]) {
    let mut salt = [0u8; 64];
    salt[..32].copy_from_slice(source_nonce);
    salt[32..].copy_from_slice(target_nonce);
    hkdf_keys(transport_key, &salt, b"", env)
}

/// HKDF output: AEAD key (32) || session id (16) || digest key (32). With
/// the page path, the AEAD key also goes to it.
fn hkdf_keys(transport_key: &[u8; 32], salt: &[u8], label: &[u8], env: &Env) -> (Keys, [u8; 16]) {
    let hk = Hkdf::<Sha256>::new(Some(salt), transport_key);
    let mut okm = [0u8; 80];
    hk.expand_multi_info(&[label, &env.hkdf_info], &mut okm)
        .expect("80 bytes is a valid HKDF-SHA256 length");
    let mut aead_key: [u8; 32] = okm[..32].try_into().expect("32 bytes");
    let aead = Wiped::new(LessSafeKey::new(
        UnboundKey::new(&AES_256_GCM, &aead_key).expect("32-byte key"),
    ));
    let page = if env.page_seal {
        PageGcm::new(&aead_key)
    } else {
        None
    };
    aead_key.zeroize();
    let mut id = [0u8; 16];
    id.copy_from_slice(&okm[32..48]);
    let digest = Wiped::new(Aes256::new_from_slice(&okm[48..]).expect("32-byte key"));
    okm.zeroize();
    (Keys { aead, page, digest }, id)
}

/// 32 fresh bytes from the CPU, or the session is refused.
fn fresh_nonce(env: &Env) -> Result<[u8; 32], Failure> {
    if env.no_hw_entropy {
        return Err((status::NO_ENTROPY, 0));
    }
    cgsvmm_guests::entropy::hardware().map_err(|_| (status::NO_ENTROPY, 0))
}

/// The nonce of `helper`'s `counter`th record.
fn page_nonce(helper: u32, counter: u64) -> [u8; 12] {
    let mut nonce = [0u8; 12];
    nonce[..4].copy_from_slice(&helper.to_le_bytes());
    nonce[4..].copy_from_slice(&counter.to_le_bytes());
    nonce
}

fn aad(session_id: &[u8; 16], gpa: u64, generation: u64) -> [u8; 32] {
    let mut a = [0u8; 32];
    a[..16].copy_from_slice(session_id);
    a[16..24].copy_from_slice(&gpa.to_le_bytes());
    a[24..].copy_from_slice(&generation.to_le_bytes());
    a
}

fn copy(dst: u64, src: u64, len: usize) {
    // SAFETY: callers pass a mapped guest page or mailbox area and a private
    // buffer of `len` bytes; `rep movsb` makes one pass over the source.
    unsafe { memcpy(dst as *mut u8, src as *const u8, len) };
}

/// Copies a page of ciphertext out to the mailbox with non-temporal
/// stores: the host core read these lines last, so ordinary stores would
/// first have to take them back from its cache (a read for ownership per
/// line, the most variable part of a page's cost here). The batch ends with
/// `sfence` before it is answered.
fn copy_out_nt(dst: u64, src: &[u8; PAGE]) {
    use core::arch::x86_64::{__m128i, _mm_load_si128, _mm_stream_si128};
    for off in (0..PAGE).step_by(16) {
        // SAFETY: `src` is a 16-byte aligned page (Scratch); `dst` is a
        // mailbox record's data, 64-byte aligned, PAGE bytes long, mapped.
        unsafe {
            let v = _mm_load_si128(src.as_ptr().add(off) as *const __m128i);
            _mm_stream_si128((dst + off as u64) as *mut __m128i, v);
        }
    }
}

/// Orders the non-temporal stores of `copy_out_nt` before the answer that
/// publishes them.
fn drain_stores() {
    // SAFETY: a fence; no memory is accessed.
    unsafe { core::arch::x86_64::_mm_sfence() };
}

/// What a batch works with, fixed for its duration: the session's keys and
/// id (under the session's read lock, taken once per batch: a locked
/// instruction per page would wait for every store before it, the copy-out
/// to lines the host has just read among them).
struct Batch<'a> {
    env: &'a Env,
    helper: u32,
    state: &'a State,
    keys: &'a Keys,
    session_id: &'a [u8; 16],
    tally: Tally,
}

impl Batch<'_> {
    /// Runs `f` on the session if it is `want` (SourceOpen or TargetOpen).
    fn run<R>(
        env: &Env,
        helper: u32,
        want: Phase,
        f: impl FnOnce(&mut Batch) -> R,
    ) -> Result<R, i32> {
        SESSION.read(|s| {
            let keys = match (s.phase, s.keys.as_ref()) {
                (phase, Some(keys)) if phase == want => keys,
                (Phase::SourceSealed | Phase::TargetClosed, _) => {
                    return Err(status::SESSION_CLOSED)
                }
                _ => return Err(status::NO_SESSION),
            };
            let mut batch = Batch {
                env,
                helper,
                state: s,
                keys,
                session_id: &s.session_id,
                tally: Tally::default(),
            };
            let r = f(&mut batch);
            s.account(&batch.tally);
            Ok(r)
        })
    }

    /// Reserves `n` nonces of this batch's helper; returns the first counter.
    fn reserve(&self, n: u64) -> u64 {
        self.state.reserve(self.helper, n)
    }

    /// Encrypts the page at `gpa` under `nonce` into `out` (shared): returns
    /// the tag. Plaintext never reaches shared memory: the fast path reads
    /// the page once into registers and writes only ciphertext; the
    /// general path copies it into the helper's private scratch page,
    /// encrypts it there and copies the ciphertext out.
    fn encrypt_page(
        &mut self,
        gpa: u64,
        generation: u64,
        nonce: [u8; 12],
        out: u64,
    ) -> Result<[u8; 16], i32> {
        let index = self.env.page_index(gpa).ok_or(status::BAD_GPA)?;
        // Each seal of a page in a session is newer than the one before:
        // the target can then never be made to apply an older content over
        // a newer one. The table keeps the last generation sealed.
        advance_generation(self.env.generation(index), generation)?;
        let aad = aad(self.session_id, gpa, generation);
        let tag = match &self.keys.page {
            // SAFETY: `gpa` is a page of guest RAM (checked above), mapped
            // at the same address; `out` is a record's 4 KiB of mailbox, 64-byte
            // aligned; the batch ends with `drain_stores`.
            Some(page) => unsafe {
                page.seal_streaming(&nonce, &aad, gpa as *const u8, out as *mut u8)
            },
            None => {
                let buf = scratch(self.helper);
                copy(buf.as_mut_ptr() as u64, gpa, PAGE);
                let tag = self
                    .keys
                    .aead
                    .seal_in_place_separate_tag(
                        Nonce::assume_unique_for_key(nonce),
                        Aad::from(&aad),
                        &mut buf[..],
                    )
                    .map_err(|_| status::AUTH_FAILED)?;
                copy_out_nt(out, buf);
                let mut tag_bytes = [0u8; 16];
                tag_bytes.copy_from_slice(tag.as_ref());
                tag_bytes
            }
        };
        self.tally.add(&self.keys.digest, gpa, generation);
        Ok(tag)
    }

    /// Authenticates the ciphertext at `ct` (shared) and, only if it is
    /// genuine and newer than what is there, writes it to `gpa`. Either path
    /// reads the shared ciphertext once into private memory (the VAES path
    /// decrypting as it reads), so the host cannot change it between the
    /// check and the write.
    fn decrypt_page(
        &mut self,
        gpa: u64,
        generation: u64,
        nonce: &[u8; 12],
        tag: &[u8; 16],
        ct: u64,
    ) -> Result<(), i32> {
        let index = self.env.page_index(gpa).ok_or(status::BAD_GPA)?;
        let buf = scratch(self.helper);
        let aad = aad(self.session_id, gpa, generation);
        match &self.keys.page {
            Some(page) => {
                // SAFETY: `ct` is a record's 4 KiB of mailbox, read once;
                // `buf` is this helper's private scratch page.
                let genuine =
                    unsafe { page.open(nonce, &aad, tag, ct as *const u8, buf.as_mut_ptr()) };
                if !genuine {
                    return Err(status::AUTH_FAILED);
                }
            }
            None => {
                copy(buf.as_mut_ptr() as u64, ct, PAGE);
                self.keys
                    .aead
                    .open_in_place_separate_tag(
                        Nonce::assume_unique_for_key(*nonce),
                        Aad::from(&aad),
                        Tag::from(*tag),
                        &mut buf[..],
                        0..,
                    )
                    .map_err(|_| status::AUTH_FAILED)?;
            }
        }
        let slot = self.env.generation(index);
        let claimed = claim_page(slot, generation)?;
        copy(gpa, buf.as_ptr() as u64, PAGE);
        slot.store(claimed, Ordering::Release);
        self.tally.add(&self.keys.digest, gpa, generation);
        Ok(())
    }
}

/// Generation-table value of a page being written by some helper.
const CLAIMED: u32 = u32::MAX;

/// `generation` as the generation table holds it: above 0 and below
/// [`CLAIMED`]; the target takes no other, so the source seals no other.
fn table_generation(generation: u64) -> Result<u32, i32> {
    u32::try_from(generation)
        .ok()
        .filter(|&g| g != 0 && g != CLAIMED)
        .ok_or(status::STALE_GENERATION)
}

/// Source: records that a page is sealed at `generation`, which must be
/// newer than the page's last seal in this session.
fn advance_generation(slot: &AtomicU32, generation: u64) -> Result<(), i32> {
    let generation = table_generation(generation)?;
    slot.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| {
        (generation > last).then_some(generation)
    })
    .map(drop)
    .map_err(|_| status::STALE_GENERATION)
}

/// Takes the right to write a page at `generation` (returned as the table
/// holds it): it must be newer than the page's last generation, and no
/// other helper may be writing the page
/// (the host could hand two generations of one page to two helpers at once;
/// interleaved copies would leave a page the guest never had).
fn claim_page(slot: &AtomicU32, generation: u64) -> Result<u32, i32> {
    let generation = table_generation(generation)?;
    loop {
        let current = slot.load(Ordering::Acquire);
        if current == CLAIMED {
            core::hint::spin_loop();
            continue;
        }
        if generation <= current {
            return Err(status::STALE_GENERATION);
        }
        if slot
            .compare_exchange_weak(current, CLAIMED, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
        {
            return Ok(generation);
        }
    }
}

/// The batch's records: `first..first + count`, inside the batch area.
fn batch_range(request: &h::RequestSlot) -> Result<core::ops::Range<u32>, Failure> {
    let (first, count) = (request.first, request.count);
    match first.checked_add(count) {
        Some(end) if count > 0 && end <= h::MAX_BATCH => Ok(first..end),
        _ => Err((status::BAD_BATCH, 0)),
    }
}

/// ENCRYPT_BATCH: for each record header {gpa, generation}, seal the page.
pub fn encrypt_batch(
    mbox: &Mailbox,
    request: &h::RequestSlot,
    env: &Env,
    helper: u32,
) -> Result<u32, Failure> {
    let records = batch_range(request)?;
    let count = records.len() as u32;
    let result = Batch::run(env, helper, Phase::SourceOpen, |batch| {
        let first_nonce = batch.reserve(u64::from(count));
        let mut next: h::RecordHeader = mbox.read(Mailbox::record(records.start));
        records
            .clone()
            .zip(first_nonce..)
            .try_for_each(|(i, counter)| {
                let at = Mailbox::record(i);
                let mut header = next;
                if i + 1 < records.end {
                    next = mbox.read(Mailbox::record(i + 1));
                    if env.page_index(next.gpa).is_some() {
                        prefetch_page(next.gpa);
                    }
                }
                let nonce = page_nonce(helper, counter);
                header.tag = batch
                    .encrypt_page(header.gpa, header.generation, nonce, mbox.addr(at + 64))
                    .map_err(|e| (e, i))?;
                header.nonce = nonce;
                mbox.write(at, &header);
                Ok(())
            })
    });
    drain_stores();
    result.map_err(|e| (e, records.start))?.map(|()| count)
}

/// DECRYPT_BATCH: verify and write each record; stop at the first failure
/// (records before it were applied, none after it).
pub fn decrypt_batch(
    mbox: &Mailbox,
    request: &h::RequestSlot,
    env: &Env,
    helper: u32,
) -> Result<u32, Failure> {
    let records = batch_range(request)?;
    let count = records.len() as u32;
    let result = Batch::run(env, helper, Phase::TargetOpen, |batch| {
        records.clone().try_for_each(|i| {
            let at = Mailbox::record(i);
            let header: h::RecordHeader = mbox.read(at);
            batch
                .decrypt_page(
                    header.gpa,
                    header.generation,
                    &header.nonce,
                    &header.tag,
                    mbox.addr(at + 64),
                )
                .map_err(|e| (e, i))
        })
    });
    result.map_err(|e| (e, records.start))?.map(|()| count)
}

/// Reads the `count` shared ranges the host put at the start of the batch
/// area, each once, and checks them against the generation table: every
/// RAM page outside them must be `marked`. Returns the first 16 bytes of
/// SHA-256 over the ranges as read.
fn check_shared(
    mbox: &Mailbox,
    env: &Env,
    count: u32,
    marked: impl Fn(u64) -> bool,
) -> Result<[u8; 16], Failure> {
    if count > h::MAX_SHARED_RANGES {
        return Err((status::BAD_ARGS, 0));
    }
    let mut hasher = Sha256::new();
    let ranges = (0..count).map(|i| {
        let r: GpaRange = mbox.read(offsets::BATCH as u64 + u64::from(i) * 16);
        hasher.update(r.start.to_le_bytes());
        hasher.update(r.end.to_le_bytes());
        r
    });
    match coverage(&env.ram[..env.ram_count], ranges, marked) {
        Coverage::Complete => {}
        Coverage::Missing(gpa) => return Err((status::INCOMPLETE, (gpa / PAGE as u64) as u32)),
        Coverage::BadRange(n) => return Err((status::BAD_RANGES, n)),
    }
    let digest: [u8; 32] = hasher.finalize().into();
    Ok(digest[..16].try_into().expect("16 bytes"))
}

/// SEAL: once every private page was sealed, the source's count, digest
/// and shared ranges' hash, encrypted and bound to the session. Ends the
/// session's encryption: no ENCRYPT and no SEAL after it; keys wiped. A
/// refused SEAL (a page missing) leaves the session open to send it.
pub fn seal(mbox: &Mailbox, env: &Env) -> Result<(), Failure> {
    let mut args: h::SealArgs = mbox.read_arg();
    // The answer tokens: fresh, drawn outside the lock like every nonce.
    let mut tokens = fresh_nonce(env)?;
    let commit = |t: &[u8]| -> [u8; h::TOKEN_SIZE] {
        Sha256::digest(t)[..h::TOKEN_SIZE]
            .try_into()
            .expect("16 bytes")
    };
    args.ack_commitment = commit(&tokens[..h::TOKEN_SIZE]);
    args.nack_commitment = commit(&tokens[h::TOKEN_SIZE..]);
    let stream_hash = args.stream_hash;
    let record = SESSION.write(|s| {
        let keys = match (s.phase, s.keys.as_ref()) {
            (Phase::SourceOpen, Some(keys)) => keys,
            (Phase::SourceSealed, _) => return Err((status::SESSION_CLOSED, 0)),
            _ => return Err((status::NO_SESSION, 0)),
        };
        let hash = check_shared(mbox, env, args.shared_count, |i| {
            env.generation(i).load(Ordering::Relaxed) != 0
        })?;
        let nonce = page_nonce(SEAL_HELPER, s.reserve(SEAL_HELPER, 1));
        let mut record = <h::SealRecord as zerocopy::FromZeros>::new_zeroed();
        record.nonce = nonce;
        record.ciphertext[..h::SEAL_CHECKED].copy_from_slice(&s.seal_checked(&hash, &stream_hash));
        record.ciphertext[h::SEAL_CHECKED..].copy_from_slice(&tokens);
        let tag = keys
            .aead
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&s.session_id),
                &mut record.ciphertext[..],
            )
            .map_err(|_| (status::AUTH_FAILED, 0))?;
        record.tag.copy_from_slice(tag.as_ref());
        s.keys = None;
        s.phase = Phase::SourceSealed;
        Ok(record)
    });
    tokens.zeroize();
    args.record = record?;
    mbox.write_arg(&args);
    Ok(())
}

/// VERIFY_SEAL: the source's record must authenticate and match exactly
/// what this side received, under the same shared ranges, and every other
/// RAM page must have been written in this session. Ends the session
/// whatever it finds: no DECRYPT after it; keys wiped.
pub fn verify_seal(mbox: &Mailbox, env: &Env) -> Result<(), Failure> {
    let mut args: h::SealArgs = mbox.read_arg();
    SESSION.write(|s| {
        match s.phase {
            Phase::TargetOpen => {}
            Phase::TargetClosed => return Err((status::SESSION_CLOSED, 0)),
            _ => return Err((status::NO_SESSION, 0)),
        }
        s.phase = Phase::TargetClosed;
        let outcome = verify(s, &mut args, mbox, env);
        // The keys are dropped in place (wiping the session's own storage),
        // whatever the outcome.
        s.keys = None;
        if outcome.is_ok() {
            RECEIVED.store(true, Ordering::Release);
        }
        // The token (or none) goes out whatever the outcome; the opened
        // seal's plaintext does not.
        args.record.ciphertext.zeroize();
        mbox.write_arg(&args);
        outcome
    })
}

/// VERIFY_SEAL's checks, under the session's write lock. Once the seal
/// opens, its ack token goes to `args` if everything matches and its nack
/// token if anything does not.
fn verify(s: &State, args: &mut h::SealArgs, mbox: &Mailbox, env: &Env) -> Result<(), Failure> {
    args.token_kind = h::token::NONE;
    args.token = [0; h::TOKEN_SIZE];
    let keys = s.keys.as_ref().ok_or((status::NO_SESSION, 0))?;
    let record = &mut args.record;
    keys.aead
        .open_in_place_separate_tag(
            Nonce::assume_unique_for_key(record.nonce),
            Aad::from(&s.session_id),
            Tag::from(record.tag),
            &mut record.ciphertext[..],
            0..,
        )
        .map_err(|_| (status::AUTH_FAILED, 0))?;
    let plaintext = record.ciphertext;
    let token_at = |kind: usize| h::SEAL_CHECKED + kind * h::TOKEN_SIZE;
    let mut reveal = |kind: u32| {
        let at = token_at(kind as usize - 1);
        args.token_kind = kind;
        args.token
            .copy_from_slice(&plaintext[at..at + h::TOKEN_SIZE]);
    };
    let checked = check_shared(mbox, env, args.shared_count, |i| {
        !matches!(env.generation(i).load(Ordering::Relaxed), 0 | CLAIMED)
    })
    .and_then(|hash| {
        // Constant time, like every other comparison of secret-derived bytes.
        let want = s.seal_checked(&hash, &args.stream_hash);
        if bool::from(plaintext[..h::SEAL_CHECKED].ct_eq(&want)) {
            Ok(())
        } else {
            Err((status::SEAL_MISMATCH, 0))
        }
    });
    if checked.is_err() {
        // The nack token tells the source it may run its guest again: it
        // must mean this VM cannot, so what this session wrote goes first.
        wipe_received(env);
    }
    reveal(if checked.is_ok() {
        h::token::ACK
    } else {
        h::token::NACK
    });
    checked
}

/// Zeroes every RAM page this session wrote (generation set), under the
/// session's write lock (no batch runs). Under plain SEV a host could still
/// replay the old ciphertext of guest memory: memory integrity is SNP's.
fn wipe_received(env: &Env) {
    let mut index = 0u64;
    for r in &env.ram[..env.ram_count] {
        let mut gpa = r.start;
        while gpa < r.end {
            if env.generation(index).load(Ordering::Relaxed) != 0 {
                // SAFETY: `gpa` is a page of guest RAM (read_env validated the
                // ranges), mapped writable for the helper.
                unsafe { cgsvmm_guests::memset(gpa as *mut u8, 0, PAGE) };
            }
            gpa += PAGE as u64;
            index += 1;
        }
    }
}

/// Seed ENCRYPT: the page at `gpa` into the seed page, the envelope into
/// the seed header. The generation is the nonce counter: always newer.
pub fn seed_encrypt(mbox: &Mailbox, env: &Env, gpa: u64) -> Result<(), i32> {
    let (generation, nonce, tag) = Batch::run(env, 0, Phase::SourceOpen, |batch| {
        let generation = batch.reserve(1);
        let nonce = page_nonce(0, generation);
        batch
            .encrypt_page(gpa, generation, nonce, mbox.addr(offsets::SEED_PAGE as u64))
            .map(|tag| (generation, nonce, tag))
    })??;
    drain_stores();
    let envelope = h::SeedEnvelope {
        generation,
        nonce,
        tag,
        reserved: 0,
    };
    mbox.write(
        offsets::SEED_HEADER as u64,
        &(core::mem::size_of::<h::SeedEnvelope>() as u32),
    );
    mbox.write(offsets::SEED_HEADER as u64 + 4, &envelope);
    Ok(())
}

/// Seed DECRYPT: the seed page into `gpa`, as its envelope allows.
pub fn seed_decrypt(mbox: &Mailbox, env: &Env, gpa: u64) -> Result<(), i32> {
    let len: u32 = mbox.read(offsets::SEED_HEADER as u64);
    if len as usize != core::mem::size_of::<h::SeedEnvelope>() {
        return Err(status::BAD_ARGS);
    }
    let e: h::SeedEnvelope = mbox.read(offsets::SEED_HEADER as u64 + 4);
    Batch::run(env, 0, Phase::TargetOpen, |batch| {
        batch.decrypt_page(
            gpa,
            e.generation,
            &e.nonce,
            &e.tag,
            mbox.addr(offsets::SEED_PAGE as u64),
        )
    })?
}
