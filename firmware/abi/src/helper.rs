//! The migration helper (MH) ABI: what the VMM and the MH firmware share.
//!
//! The MH runs on the mirror vCPUs. Its image starts with an
//! [`ImageHeader`](crate::ImageHeader) of kind
//! [`IMAGE_KIND_HELPER`](crate::IMAGE_KIND_HELPER) followed at once by a
//! [`HelperHeader`], which tells the VMM where the launch configuration, the
//! secret page, the mailboxes and the generation table are: nothing about
//! their location is hard-coded in the VMM.
//!
//! # Mailbox layout (one per helper vCPU, shared/unencrypted pages)
//!
//! ```text
//! +0x0000 SeedParams      QEMU RFC cmd_params (packed, 32 B)
//! +0x0400 MailboxControl  cgsvmm protocol control block
//! +0x0800 seed header     u32 len + envelope (len <= 1024)
//! +0x1000 seed page       4 KiB
//! +0x2000 batch           MAX_BATCH records, RECORD_STRIDE apart:
//!                         RecordHeader (64 B) + 4096 B ciphertext
//! ```
//!
//! # Seed protocol (QEMU RFC v2, one page per round trip)
//!
//! ```text
//! host                                 MH (helper 0)
//!  | params: cmd_type, gpa             |
//!  | ret = -1, done = 0, barrier       |
//!  | go = 1  ------------------------> | sees go; go = 0
//!  |                                   | ENCRYPT: page at gpa -> seed page,
//!  |                                   |   envelope -> seed header
//!  |                                   | DECRYPT: seed page + header -> gpa
//!  | <------------------- done = 1     | ret = status
//! ```
//!
//! # cgsvmm protocol (batched, queued, one mailbox per helper, idle helpers sleep)
//!
//! Requests are numbered 1, 2, ... and request `n` lives in
//! `MailboxControl::slots[n % QUEUE_DEPTH]`. The host may have up to
//! [`QUEUE_DEPTH`] requests outstanding (posted, `n > resp_seq`); the MH
//! answers them strictly in order. So while the helper works on one part of
//! the batch area, the host copies another part out (or in) and the next
//! request is already waiting: the helper never idles between requests.
//! Commands that use `arg` (all but the batches) are posted alone.
//!
//! ```text
//! host                                          MH (helper i)
//!  | HELLO                    slot 1, req_seq = 1 -->|
//!  | <-- resp_seq = 1, slot status, arg = HelloReply {version, caps, max_batch}
//!  | SESSION_BEGIN / SESSION_PEER: exchange 32-byte nonces (RDSEED/RDRAND,
//!  |   else NO_ENTROPY); both MHs derive key, session id, digest key =
//!  |   HKDF-SHA256(transport key, nonce_src || nonce_tgt, HKDF_INFO ||
//!  |   the VM's identity); BEGIN while a session is open: SESSION_OPEN
//!  | snapshots (a file has no target helper to answer): BEGIN(SNAPSHOT_SOURCE)
//!  |   opens at once with salt = own nonce only and info = SNAPSHOT_HKDF_LABEL
//!  |   || HKDF_INFO || identity; BEGIN(SNAPSHOT_TARGET) takes that nonce from
//!  |   the file. The same file can be restored again: each restore is a new
//!  |   incoming VM
//!  | ENCRYPT_BATCH n:   part p = records [p*16, p*16+16): RecordHeader
//!  |   {gpa, generation} x count, then slot n, then req_seq = n -------->|
//!  | ENCRYPT_BATCH n+1 (part p+1, flag CHAIN) ...  up to QUEUE_DEPTH      |
//!  |                                   seals each page of part p: AES-256-GCM,
//!  |                                   nonce = helper || counter, AAD =
//!  |                                   session id || gpa || generation;
//!  |                                   digest += AES-256(digest key, gpa ||
//!  |                                   generation)
//!  | <------------------- slot n {status, count, busy_cycles}, resp_seq = n
//!  | copy part p out; headers of request n+QUEUE_DEPTH into part p; post it
//!  | DECRYPT_BATCH: the same with records copied in; the MH checks the gpa,
//!  |   authenticates, rejects generations not newer than the last it wrote,
//!  |   then writes the page
//!  | a CHAIN request whose predecessor failed is answered SKIPPED, unrun:
//!  |   after a failing record, nothing later in the stream is applied
//!  | ENCRYPT: each page's generation above its last seal in the session
//!  | SEAL (source): shared ranges in the batch area, SealArgs in `arg`;
//!  |   refused (INCOMPLETE, the page) until every other RAM page was sealed
//!  |   in this session; then -> sealed {count, digest, hash of the ranges}
//!  |   and the session is closed (no ENCRYPT, no second SEAL)
//!  | both also take the host's stream hash (what the helpers do not see),
//!  |   sealed and compared; SEAL draws ack and nack tokens into the seal and
//!  |   hands out their commitments; VERIFY_SEAL reveals the ack token if it
//!  |   verifies, the nack token if the seal opens but does not match
//!  | VERIFY_SEAL (target) <- the seal and the same ranges: authentic, every
//!  |   other page written, count, digest and hash equal; closes the session
//!  |   whatever it finds (no DECRYPT after it)
//!  | SESSION_END: keys wiped, back to no session (nonce counters go on)
//!  | idle MH: state = SLEEPING, re-check req_seq, `out LAB_PORT,
//!  |   LAB_CMD_WAIT | i << 16`; the VMM re-enters it when the host rings
//! ```
//!
//! A request is posted by writing its slot (and `arg`), then `req_seq`
//! (release); the MH answers by writing the slot's answer fields, then
//! `resp_seq = n` (release).
//!
//! # Session lifecycle
//!
//! ```text
//!          BEGIN(SOURCE)            PEER               SEAL (complete)
//!   Idle ---------------> Begun -----------> Open -------------------> Sealed
//!     |   BEGIN(TARGET), incoming VMs only, until one verified
//!     |                                                VERIFY_SEAL (any outcome)
//!     +-------------------------------------> Open -------------------> Closed
//!   every state --- SESSION_END (or seed RESET) ---> Idle
//! ```
//!
//! What the host can and cannot do to a helper (the threat model) is in the
//! helper firmware's module doc, `firmware/guests/src/bin/mh/main.rs`.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::GpaRange;

/// Magic of [`HelperHeader`] ("CGSVMH01").
pub const HELPER_MAGIC: [u8; 8] = *b"CGSVMH01";
/// Version of this ABI (HELLO reports it; the host refuses others).
pub const MH_ABI_VERSION: u32 = 5;
/// Most helper vCPUs (mailboxes) an MH image provides.
pub const MAX_HELPERS: u32 = 16;
/// Most pages in one batch.
pub const MAX_BATCH: u32 = 64;
/// Requests a mailbox holds at once.
pub const QUEUE_DEPTH: u32 = 4;
/// Guest page size the MH moves.
pub use crate::PAGE_SIZE;

/// Follows the image header in an MH image.
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct HelperHeader {
    /// [`HELPER_MAGIC`].
    pub magic: [u8; 8],
    /// [`MH_ABI_VERSION`].
    pub abi_version: u32,
    /// Mailboxes the image has.
    pub max_helpers: u32,
    /// [`HelperConfig`] page, written by the VMM before launch.
    pub config_gpa: u64,
    /// [`HelperSecret`] page (LAUNCH_SECRET on SEV).
    pub secret_gpa: u64,
    /// First mailbox.
    pub mailbox_gpa: u64,
    /// Distance between mailboxes.
    pub mailbox_stride: u64,
    /// Generation table: one u32 per guest page, in RAM-range order.
    pub gen_table_gpa: u64,
    /// Bytes available for the generation table.
    pub gen_table_size: u64,
}

/// Magic of [`HelperConfig`] and [`HelperSecret`] ("CGSVMHCF").
pub const CONFIG_MAGIC: u64 = u64::from_le_bytes(*b"CGSVMHCF");
/// The debug commands (hang, fault) are allowed: tests only.
pub const CONFIG_FLAG_DEBUG: u64 = 1;
/// Seal pages the general way (ring through a private copy) even where the
/// VAES page path could run: tests of the path other CPUs take.
pub const CONFIG_FLAG_GENERIC_SEAL: u64 = 2;
/// Behave as on a CPU without RDSEED and RDRAND (tests of the refusal; on
/// this lab's hosts CPUID at CPL3 is the host's and cannot hide them). It
/// can only make the helper refuse sessions.
pub const CONFIG_FLAG_NO_HW_ENTROPY: u64 = 4;
/// The VM was launched to receive a migration (measured on SEV): its helper
/// takes target sessions, until one of them verified. A VM launched to boot
/// never takes pages in, so the host cannot roll a running guest's pages
/// back to an earlier migration's.
pub const CONFIG_FLAG_INCOMING: u64 = 8;

/// Launch-time configuration written by the VMM (measured on SEV).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct HelperConfig {
    /// [`CONFIG_MAGIC`].
    pub magic: u64,
    /// Helper vCPUs running.
    pub helper_count: u32,
    /// Position of the SEV C-bit in page-table entries (0: none).
    pub c_bit: u32,
    /// TSC rate in kHz (for idle timing).
    pub tsc_khz: u64,
    /// `CONFIG_FLAG_*`.
    pub flags: u64,
    /// Valid entries of `ram`.
    pub ram_range_count: u64,
    /// Guest RAM: the only GPAs ENCRYPT and DECRYPT accept. Page aligned,
    /// ascending, disjoint and outside the mirror region, or the helper
    /// serves nothing.
    pub ram: [GpaRange; 2],
    /// The VM's identity (its UUID, chosen by the guest owner): measured
    /// with the rest of this page and bound into every session key with
    /// the RAM ranges, so that a transport key shared by several VMs
    /// cannot carry one VM's pages into another.
    pub vm_id: [u8; 16],
}

/// The transport key page.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct HelperSecret {
    /// [`CONFIG_MAGIC`] once a key is present.
    pub magic: u64,
    /// Reserved.
    pub reserved: u64,
    /// The 256-bit transport key.
    pub key: [u8; 32],
}

/// Offsets inside a mailbox.
pub mod offsets {
    /// [`super::SeedParams`].
    pub const SEED_PARAMS: usize = 0x0;
    /// [`super::MailboxControl`].
    pub const CONTROL: usize = 0x400;
    /// Seed page header: u32 len + envelope.
    pub const SEED_HEADER: usize = 0x800;
    /// Seed page data.
    pub const SEED_PAGE: usize = 0x1000;
    /// Batch records.
    pub const BATCH: usize = 0x2000;
}
/// Distance between batch records.
pub const RECORD_STRIDE: usize = 64 + PAGE_SIZE;
/// Bytes of one mailbox.
pub const MAILBOX_SIZE: usize = offsets::BATCH + MAX_BATCH as usize * RECORD_STRIDE;

/// Offset within a mailbox of batch record `i`.
pub const fn record_offset(i: usize) -> usize {
    offsets::BATCH + i * RECORD_STRIDE
}

/// Offset within a mailbox of request `n`'s [`RequestSlot`].
pub const fn request_slot_offset(n: u64) -> usize {
    let index = (n % QUEUE_DEPTH as u64) as usize;
    offsets::CONTROL
        + core::mem::offset_of!(MailboxControl, slots)
        + index * core::mem::size_of::<RequestSlot>()
}
/// Largest seed envelope.
pub const SEED_ENVELOPE_MAX: usize = 1024;

/// Seed protocol commands (QEMU RFC).
pub mod seed {
    /// Set up (no arguments).
    pub const INIT: u64 = 0;
    /// Encrypt the page at `gpa` into the seed page.
    pub const ENCRYPT: u64 = 1;
    /// Decrypt the seed page into `gpa`.
    pub const DECRYPT: u64 = 2;
    /// Forget the session.
    pub const RESET: u64 = 3;
}

/// The RFC's `cmd_params`, packed exactly as QEMU has it.
#[repr(C, packed)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct SeedParams {
    /// `seed::*`.
    pub cmd_type: u64,
    /// Guest page.
    pub gpa: u64,
    /// Unused by cgsvmm (the RFC's prefetch hint).
    pub prefetch: i32,
    /// Result: 0 or a negative [`status`] code.
    pub ret: i32,
    /// Host sets 1 to start.
    pub go: i32,
    /// MH sets 1 when finished.
    pub done: i32,
}

/// Seed envelope (after the u32 len): what binds the seed page.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct SeedEnvelope {
    /// Generation of the page.
    pub generation: u64,
    /// AEAD nonce.
    pub nonce: [u8; 12],
    /// Reserved.
    pub reserved: u32,
    /// AEAD tag.
    pub tag: [u8; 16],
}

/// cgsvmm protocol commands.
pub mod cmd {
    /// Version/capability handshake.
    pub const HELLO: u32 = 0x10;
    /// Start a session: [`super::SessionArgs`] in, nonce out.
    pub const SESSION_BEGIN: u32 = 0x11;
    /// Source only: the target's nonce in, the session id out.
    pub const SESSION_PEER: u32 = 0x12;
    /// Encrypt `count` pages named by the record headers from `first`.
    pub const ENCRYPT_BATCH: u32 = 0x13;
    /// Decrypt `count` records from `first` into guest memory.
    pub const DECRYPT_BATCH: u32 = 0x14;
    /// Source: produce the sealed end record.
    pub const SEAL: u32 = 0x15;
    /// Target: verify the sealed end record against what it received.
    pub const VERIFY_SEAL: u32 = 0x16;
    /// Forget the session (keys, counters, digest).
    pub const SESSION_END: u32 = 0x17;
    /// Debug (CONFIG_FLAG_DEBUG only): stop answering.
    pub const DEBUG_HANG: u32 = 0x1e;
    /// Debug (CONFIG_FLAG_DEBUG only): fault the vCPU.
    pub const DEBUG_FAULT: u32 = 0x1f;
}

/// Status codes (`MailboxControl::status`, `SeedParams::ret`).
pub mod status {
    /// Success.
    pub const OK: i32 = 0;
    /// Unknown command.
    pub const BAD_COMMAND: i32 = -1;
    /// A GPA outside guest RAM or not page aligned.
    pub const BAD_GPA: i32 = -2;
    /// Authentication failed (tampered, moved, other session, wrong key).
    pub const AUTH_FAILED: i32 = -3;
    /// A generation not newer than the one already written (replay).
    pub const STALE_GENERATION: i32 = -4;
    /// No session (or the wrong role for the command).
    pub const NO_SESSION: i32 = -5;
    /// The sealed end record does not match what was received.
    pub const SEAL_MISMATCH: i32 = -6;
    /// Batch count out of range.
    pub const BAD_BATCH: i32 = -7;
    /// No transport key provisioned.
    pub const NO_KEY: i32 = -8;
    /// Malformed arguments.
    pub const BAD_ARGS: i32 = -9;
    /// Debug commands are disabled.
    pub const DEBUG_DISABLED: i32 = -10;
    /// Not run: a CHAIN request whose predecessor did not succeed.
    pub const SKIPPED: i32 = -11;
    /// SESSION_BEGIN while a session is open (SESSION_END first).
    pub const SESSION_OPEN: i32 = -12;
    /// The session is closed: no ENCRYPT after SEAL, no DECRYPT after
    /// VERIFY_SEAL, no second SEAL.
    pub const SESSION_CLOSED: i32 = -13;
    /// SEAL / VERIFY_SEAL: a RAM page outside the shared ranges was never
    /// sealed (source) or written (target) in this session; `fail_index`
    /// holds its page number (GPA / 4096, low 32 bits).
    pub const INCOMPLETE: i32 = -14;
    /// SEAL / VERIFY_SEAL: shared range `fail_index` is malformed
    /// (unaligned, empty, out of order, overlapping, outside RAM).
    pub const BAD_RANGES: i32 = -15;
    /// The CPU gives no usable randomness (no RDSEED/RDRAND, failing, or
    /// stuck): no session.
    pub const NO_ENTROPY: i32 = -16;
    /// SESSION_BEGIN(TARGET) on a VM not launched for incoming migration,
    /// or after a migration into it verified.
    pub const NOT_INCOMING: i32 = -17;
}

/// [`RequestSlot::flags`] bits.
pub mod flags {
    /// Run only if the request before it succeeded (the requests of one
    /// stream after the first carry it).
    pub const CHAIN: u32 = 1 << 0;
}

/// `MailboxControl::state` values.
pub mod state {
    /// Polling for work.
    pub const AWAKE: u32 = 0;
    /// About to leave the CPU: ring the doorbell after posting.
    pub const SLEEPING: u32 = 1;
}

/// Capability bits in [`HelloReply::caps`].
pub mod caps {
    /// Batched ENCRYPT/DECRYPT.
    pub const BATCH: u64 = 1 << 0;
    /// Several helpers in parallel.
    pub const MULTI_HELPER: u64 = 1 << 1;
    /// Idle helpers leave the CPU (LAB_CMD_WAIT).
    pub const IDLE_WAIT: u64 = 1 << 2;
    /// AES-256-GCM transport encryption.
    pub const AES256_GCM: u64 = 1 << 3;
    /// Sealed end-of-stream record.
    pub const SEAL: u64 = 1 << 4;
    /// Up to `QUEUE_DEPTH` requests outstanding, CHAIN honoured.
    pub const QUEUE: u64 = 1 << 5;
    /// Pages are sealed straight from guest memory with VAES and
    /// VPCLMULQDQ (otherwise through a private copy with ring).
    pub const VAES_PAGE_SEAL: u64 = 1 << 6;
}

/// Size of the command argument area.
pub const ARG_SIZE: usize = 256;

/// One queued request and, once answered, its result.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct RequestSlot {
    /// `cmd::*`.
    pub cmd: u32,
    /// `flags::*`.
    pub flags: u32,
    /// Batches: the first record (hosts cycle through parts of the batch
    /// area).
    pub first: u32,
    /// Request: records in the batch. Answer: records processed.
    pub count: u32,
    /// Answer: `status::*`.
    pub status: i32,
    /// Answer: index of the record that failed (when status != OK).
    pub fail_index: u32,
    /// Answer: TSC cycles from taking the request to answering it (the
    /// helper's own time, without the host's or the scheduler's share).
    pub busy_cycles: u64,
}

/// The cgsvmm protocol control block.
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct MailboxControl {
    /// Host → MH: the last request posted (bumped last).
    pub req_seq: u64,
    /// MH → host: the last request answered (set last).
    pub resp_seq: u64,
    /// `state::*`.
    pub state: u32,
    /// Reserved.
    pub reserved: u32,
    /// Bumped by the MH every time it wakes up idle.
    pub heartbeat: u64,
    /// Request `n` is `slots[n % QUEUE_DEPTH]`.
    pub slots: [RequestSlot; QUEUE_DEPTH as usize],
    /// Command-specific arguments and results (one request at a time).
    pub arg: [u8; ARG_SIZE],
}

/// HELLO answer (in `arg`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct HelloReply {
    /// [`MH_ABI_VERSION`].
    pub version: u32,
    /// This helper's index.
    pub helper_index: u32,
    /// `caps::*`.
    pub caps: u64,
    /// Most records per batch.
    pub max_batch: u32,
    /// Helpers running.
    pub helper_count: u32,
}

/// Session roles.
pub mod role {
    /// Sends pages (encrypts).
    pub const SOURCE: u32 = 1;
    /// Receives pages (decrypts).
    pub const TARGET: u32 = 2;
    /// Writes a snapshot: keys from this helper's nonce alone under
    /// [`SNAPSHOT_HKDF_LABEL`](super::SNAPSHOT_HKDF_LABEL); open at once.
    pub const SNAPSHOT_SOURCE: u32 = 3;
    /// Restores a snapshot: keys from the nonce in it (`peer_nonce`);
    /// incoming VMs only, as TARGET.
    pub const SNAPSHOT_TARGET: u32 = 4;
}

/// Put before the HKDF info of snapshot sessions, so a snapshot's keys can
/// never be a live session's (whose salt has two nonces) and the reverse.
pub const SNAPSHOT_HKDF_LABEL: &[u8] = b"cgsvmm snapshot v1\0";

/// SESSION_BEGIN / SESSION_PEER arguments and results (in `arg`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct SessionArgs {
    /// `role::*` (SESSION_BEGIN).
    pub role: u32,
    /// Reserved.
    pub reserved: u32,
    /// In: the peer's nonce (target's BEGIN, source's PEER).
    pub peer_nonce: [u8; 32],
    /// Out: this MH's nonce (BEGIN).
    pub own_nonce: [u8; 32],
    /// Out: the session id, once both nonces are known.
    pub session_id: [u8; 16],
}

/// Header of a batch record; the page's ciphertext follows at +64.
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct RecordHeader {
    /// Guest page.
    pub gpa: u64,
    /// Generation (the host's round number, from 1).
    pub generation: u64,
    /// AEAD nonce (helper index || counter).
    pub nonce: [u8; 12],
    /// Reserved.
    pub reserved: u32,
    /// AEAD tag.
    pub tag: [u8; 16],
    /// Reserved, up to 64 bytes.
    pub pad: [u8; 16],
}

/// The sealed end record: `count || digest || shared hash || stream hash
/// || ack token || nack token` encrypted.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct SealRecord {
    /// AEAD nonce.
    pub nonce: [u8; 12],
    /// Reserved.
    pub reserved: u32,
    /// Encrypted: page count (u64), digest (2 x u64), the first 16 bytes
    /// of SHA-256 over the declared shared ranges, the host's stream hash
    /// (32), and the two answer tokens (16 each) the source helper drew.
    pub ciphertext: [u8; SEAL_PLAINTEXT],
    /// AEAD tag.
    pub tag: [u8; 16],
}

/// Bytes sealed in a [`SealRecord`]: page count (u64), digest (2 x u64),
/// the shared ranges' hash (16), the stream hash (32), the ack and nack
/// tokens (16 each).
pub const SEAL_PLAINTEXT: usize = SEAL_CHECKED + 2 * TOKEN_SIZE;
/// The part of the seal's plaintext both sides must agree on (everything
/// but the tokens).
pub const SEAL_CHECKED: usize = 72;
/// Bytes of an answer token and of its commitment.
pub const TOKEN_SIZE: usize = 16;

/// What VERIFY_SEAL reveals (`SealArgs::token_kind`).
pub mod token {
    /// Nothing (the seal did not authenticate, or no VERIFY_SEAL).
    pub const NONE: u32 = 0;
    /// The ack token: the seal verified, this VM took the migration.
    pub const ACK: u32 = 1;
    /// The nack token: the seal is the source's, but what arrived does not
    /// match it; this session can never verify.
    pub const NACK: u32 = 2;
}

/// SEAL and VERIFY_SEAL arguments (in `arg`). The host declares which RAM
/// pages are shared (plaintext, not the helpers' business) as
/// `shared_count` [`GpaRange`]s at the start of the batch area: page
/// aligned, ascending, disjoint, each inside one RAM range. Every other
/// RAM page must have been sealed (source) or written (target) in this
/// session, and both sides must declare the same ranges (the seal carries
/// their hash).
///
/// The host also hashes what the helpers do not see (configuration, shared
/// pages, device and vCPU state: `stream_hash`); SEAL seals it and
/// VERIFY_SEAL compares, so none of it can be altered on the way. SEAL
/// draws two random tokens into the seal and gives the source host only
/// their commitments (first 16 bytes of SHA-256); VERIFY_SEAL reveals the
/// ack token when the seal verifies and the nack token when it opens but
/// does not match: the target host can prove either outcome to the source,
/// and nobody on the way can forge one.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct SealArgs {
    /// SEAL: out; VERIFY_SEAL: in.
    pub record: SealRecord,
    /// Shared ranges in the batch area.
    pub shared_count: u32,
    /// VERIFY_SEAL out: `token::*`.
    pub token_kind: u32,
    /// In (both): SHA-256 over the stream's frames the helpers do not see.
    pub stream_hash: [u8; 32],
    /// SEAL out: commitment to the ack token.
    pub ack_commitment: [u8; TOKEN_SIZE],
    /// SEAL out: commitment to the nack token.
    pub nack_commitment: [u8; TOKEN_SIZE],
    /// VERIFY_SEAL out: the token `token_kind` names.
    pub token: [u8; TOKEN_SIZE],
}

/// Most shared ranges SEAL and VERIFY_SEAL take (as many as fit in the
/// batch area).
pub const MAX_SHARED_RANGES: u32 = ((MAX_BATCH as usize * RECORD_STRIDE) / 16) as u32;

/// Byte string that starts the key derivation's HKDF info; the VM's
/// identity follows (`vm_id`, RAM range count and ranges, see
/// [`HelperConfig`]).
pub const HKDF_INFO: &[u8] = b"cgsvmm migration helper v4 session";

// The layout holds together (checked at compile time).
const _: () = {
    assert!(core::mem::size_of::<SeedParams>() == 32);
    assert!(core::mem::size_of::<MailboxControl>() <= offsets::SEED_HEADER - offsets::CONTROL);
    assert!(core::mem::size_of::<RecordHeader>() == 64);
    assert!(core::mem::size_of::<HelloReply>() <= ARG_SIZE);
    assert!(core::mem::size_of::<SessionArgs>() <= ARG_SIZE);
    assert!(core::mem::size_of::<SealArgs>() <= ARG_SIZE);
    assert!(4 + core::mem::size_of::<SeedEnvelope>() <= SEED_ENVELOPE_MAX);
    assert!(MAILBOX_SIZE.is_multiple_of(4096));
};

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};

    #[test]
    fn seed_params_match_the_rfc() {
        assert_eq!(size_of::<SeedParams>(), 32);
        assert_eq!(offset_of!(SeedParams, gpa), 8);
        assert_eq!(offset_of!(SeedParams, prefetch), 16);
        assert_eq!(offset_of!(SeedParams, ret), 20);
        assert_eq!(offset_of!(SeedParams, go), 24);
        assert_eq!(offset_of!(SeedParams, done), 28);
        assert_eq!((offsets::SEED_HEADER, offsets::SEED_PAGE), (0x800, 0x1000));
        assert_eq!(
            (seed::INIT, seed::ENCRYPT, seed::DECRYPT, seed::RESET),
            (0, 1, 2, 3)
        );
    }

    #[test]
    fn helper_structs_layout() {
        assert_eq!(size_of::<HelperHeader>(), 64);
        assert_eq!(offset_of!(HelperHeader, config_gpa), 16);
        assert_eq!(offset_of!(HelperHeader, gen_table_size), 56);
        assert_eq!(size_of::<HelperConfig>(), 88);
        assert_eq!(offset_of!(HelperConfig, ram), 40);
        assert_eq!(offset_of!(HelperConfig, vm_id), 72);
        assert_eq!(size_of::<HelperSecret>(), 48);
        assert_eq!(offset_of!(HelperSecret, key), 16);
        assert_eq!(size_of::<RequestSlot>(), 32);
        assert_eq!(offset_of!(RequestSlot, status), 16);
        assert_eq!(offset_of!(RequestSlot, busy_cycles), 24);
        assert_eq!(size_of::<MailboxControl>(), 32 + 4 * 32 + ARG_SIZE);
        assert_eq!(offset_of!(MailboxControl, resp_seq), 8);
        assert_eq!(offset_of!(MailboxControl, state), 16);
        assert_eq!(offset_of!(MailboxControl, heartbeat), 24);
        assert_eq!(offset_of!(MailboxControl, slots), 32);
        assert_eq!(offset_of!(MailboxControl, arg), 160);
        assert!(size_of::<MailboxControl>() <= 0x400);
        assert_eq!(offset_of!(RecordHeader, nonce), 16);
        assert_eq!(offset_of!(RecordHeader, tag), 32);
        assert_eq!(size_of::<SessionArgs>(), 88);
        assert_eq!(size_of::<SealRecord>(), 136);
        assert_eq!(size_of::<SealArgs>(), 224);
        assert_eq!(offset_of!(SealArgs, shared_count), 136);
        assert_eq!(offset_of!(SealArgs, stream_hash), 144);
        assert_eq!(offset_of!(SealArgs, ack_commitment), 176);
        assert_eq!(offset_of!(SealArgs, token), 208);
        assert_eq!(MAX_SHARED_RANGES, 16640);
        assert_eq!(size_of::<SeedEnvelope>(), 40);
        assert_eq!(MAILBOX_SIZE, 0x2000 + 64 * 4160);
        assert_eq!(record_offset(0), 0x2000);
        assert_eq!(record_offset(63) + RECORD_STRIDE, MAILBOX_SIZE);
        assert_eq!(request_slot_offset(1), 0x400 + 32 + 32);
        assert_eq!(request_slot_offset(4), request_slot_offset(0));
    }
}
