//! The host side of the migration helper: one [`HelperClient`] per mailbox.
//!
//! The client talks to one helper vCPU through its mailbox in the mirror
//! region (layout and sequence: `cgsvmm_fw_abi::helper`). It never sees
//! plaintext of private pages: it asks the helper to encrypt pages into the
//! mailbox and copies the records out, or copies records in and asks the
//! helper to authenticate and write them. Every wait is bounded: a helper
//! that stops answering becomes [`HelperError::Timeout`], one whose vCPU
//! faulted becomes [`HelperError::Fault`], never a hang or a panic.
//!
//! Stream records are the mailbox records byte for byte:
//! `RecordHeader` (64 bytes: gpa, generation, nonce, tag) + 4096 bytes of
//! ciphertext = [`RECORD_STRIDE`] bytes.

use std::collections::VecDeque;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use zerocopy::{FromBytes, FromZeros, IntoBytes};

use cgsvmm_fw_abi::helper::{self as h, cmd, offsets, role, seed, status};
pub use cgsvmm_fw_abi::helper::{HelloReply, RecordHeader, SealRecord, RECORD_STRIDE};
pub use cgsvmm_fw_abi::GpaRange;

/// How the client reaches the helper's vCPU beyond the mailbox.
pub trait HelperLink: Send + Sync {
    /// Re-enters helper `index` if it left the CPU waiting for work.
    fn ring(&self, index: usize);
    /// Why helper `index`'s vCPU stopped, if it did.
    fn fault(&self, index: usize) -> Option<String>;
}

/// A helper status code, named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HelperStatus {
    /// Unknown command.
    BadCommand,
    /// A GPA outside guest RAM or unaligned.
    BadGpa,
    /// A record failed authentication.
    AuthFailed,
    /// A record's generation is not newer than the page's (replay).
    StaleGeneration,
    /// No session, or the wrong role.
    NoSession,
    /// The sealed end record does not match what was received.
    SealMismatch,
    /// Batch size out of range.
    BadBatch,
    /// The helper has no transport key.
    NoKey,
    /// Malformed arguments.
    BadArgs,
    /// Debug commands are disabled.
    DebugDisabled,
    /// Not run: an earlier request of the same stream failed.
    Skipped,
    /// A session is already open (end it first).
    SessionOpen,
    /// The session is closed (sealed or verified): end it and begin anew.
    SessionClosed,
    /// A private page was never sealed or written in this session.
    Incomplete,
    /// A declared shared range is malformed.
    BadRanges,
    /// The helper's CPU gives no usable randomness: no session.
    NoEntropy,
    /// A target session on a VM not launched for incoming migration, or
    /// after a migration into it verified.
    NotIncoming,
    /// A code this client does not know.
    Other(i32),
}

impl From<i32> for HelperStatus {
    fn from(code: i32) -> Self {
        match code {
            status::BAD_COMMAND => HelperStatus::BadCommand,
            status::BAD_GPA => HelperStatus::BadGpa,
            status::AUTH_FAILED => HelperStatus::AuthFailed,
            status::STALE_GENERATION => HelperStatus::StaleGeneration,
            status::NO_SESSION => HelperStatus::NoSession,
            status::SEAL_MISMATCH => HelperStatus::SealMismatch,
            status::BAD_BATCH => HelperStatus::BadBatch,
            status::NO_KEY => HelperStatus::NoKey,
            status::BAD_ARGS => HelperStatus::BadArgs,
            status::DEBUG_DISABLED => HelperStatus::DebugDisabled,
            status::SKIPPED => HelperStatus::Skipped,
            status::SESSION_OPEN => HelperStatus::SessionOpen,
            status::SESSION_CLOSED => HelperStatus::SessionClosed,
            status::INCOMPLETE => HelperStatus::Incomplete,
            status::BAD_RANGES => HelperStatus::BadRanges,
            status::NO_ENTROPY => HelperStatus::NoEntropy,
            status::NOT_INCOMING => HelperStatus::NotIncoming,
            other => HelperStatus::Other(other),
        }
    }
}

/// Errors of talking to a helper.
#[derive(Debug, thiserror::Error)]
pub enum HelperError {
    /// The helper did not answer in time.
    #[error("Migration helper {index} did not answer within {after:?}")]
    Timeout {
        /// Helper index.
        index: usize,
        /// The limit.
        after: Duration,
    },
    /// The helper's vCPU stopped.
    #[error("Migration helper {index} faulted: {why}")]
    Fault {
        /// Helper index.
        index: usize,
        /// What the VMM saw.
        why: String,
    },
    /// The helper refused the request.
    #[error("Migration helper refused {command:#x}: {status:?} at record {record}")]
    Refused {
        /// Command.
        command: u32,
        /// Its status.
        status: HelperStatus,
        /// Index of the failing record in the batch.
        record: u32,
    },
    /// The helper speaks another ABI version.
    #[error("Migration helper speaks ABI version {0}, this VMM {version}", version = h::MH_ABI_VERSION)]
    Version(u32),
    /// Records whose length is not a whole number of records.
    #[error("Truncated batch: {0} bytes is not a whole number of {RECORD_STRIDE}-byte records")]
    Truncated(usize),
    /// The mailbox is not where the helper said.
    #[error("Mailbox access at {0:#x} failed")]
    Memory(u64),
    /// More shared ranges than the helper takes.
    #[error("{0} shared ranges: the helper takes at most {max}", max = h::MAX_SHARED_RANGES)]
    TooManyRanges(usize),
}

impl HelperError {
    /// A refusal's record index moved from its request to its stream, in
    /// which `before` records precede the request.
    fn at_stream_record(self, before: u32) -> Self {
        match self {
            HelperError::Refused {
                command,
                status,
                record,
            } => HelperError::Refused {
                command,
                status,
                record: record + before,
            },
            other => other,
        }
    }
}

/// What SEAL hands the source's host.
#[derive(Debug, Clone, Copy)]
pub struct Sealed {
    /// The sealed end record, for the stream.
    pub record: SealRecord,
    /// First 16 bytes of SHA-256 over the ack token inside the seal.
    pub ack_commitment: [u8; 16],
    /// The same over the nack token.
    pub nack_commitment: [u8; 16],
}

/// What the target's VERIFY_SEAL revealed, for the source to check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// The seal verified: the target took the VM.
    Ack([u8; 16]),
    /// The seal opened but did not match: the target can never take it.
    Nack([u8; 16]),
}

/// Whether `token` is the one `commitment` commits to.
pub fn token_matches(token: &[u8; 16], commitment: &[u8; 16]) -> bool {
    use sha2::Digest;
    sha2::Sha256::digest(token)[..16] == commitment[..]
}

/// Talks to one helper through its mailbox.
pub struct HelperClient {
    mem: GuestMemoryMmap,
    base: u64,
    index: usize,
    link: Arc<dyn HelperLink>,
    timeout: Duration,
    seq: u64,
    max_batch: u32,
    busy_cycles: u64,
}

const CONTROL: u64 = offsets::CONTROL as u64;
/// Offset of a `MailboxControl` field within the mailbox.
macro_rules! control {
    ($field:ident) => {
        CONTROL + std::mem::offset_of!(h::MailboxControl, $field) as u64
    };
}
const REQ_SEQ: u64 = control!(req_seq);
const RESP_SEQ: u64 = control!(resp_seq);
const STATE: u64 = control!(state);
const HEARTBEAT: u64 = control!(heartbeat);
const ARG: u64 = control!(arg);

/// Offset of request `n`'s slot within the mailbox.
fn slot_offset(n: u64) -> u64 {
    h::request_slot_offset(n) as u64
}

/// Offset of batch record `i` within the mailbox.
fn record_offset(i: usize) -> u64 {
    h::record_offset(i) as u64
}

/// Whether `resp_seq` says request `n` has been answered.
fn answered(resp_seq: u64, n: u64) -> bool {
    (resp_seq.wrapping_sub(n) as i64) >= 0
}

/// The flags of the `k`th request of a stream: all but the first run only
/// if the one before succeeded.
fn stream_flags(k: usize) -> u32 {
    if k == 0 {
        0
    } else {
        h::flags::CHAIN
    }
}
/// Offset of a `SeedParams` field within the mailbox.
macro_rules! seed_field {
    ($field:ident) => {
        (offsets::SEED_PARAMS + std::mem::offset_of!(h::SeedParams, $field)) as u64
    };
}
const SEED_RET: u64 = seed_field!(ret);
const SEED_GO: u64 = seed_field!(go);
const SEED_DONE: u64 = seed_field!(done);
/// Spin this long on a reply before also yielding the CPU (to the helper's
/// own vCPU thread, on a small host: 16 pages take a helper ~20 µs, and a
/// client that spins longer takes the CPU from the helpers it waits for).
const SPIN: Duration = Duration::from_micros(20);

impl HelperClient {
    /// A client for the mailbox at `mailbox_gpa` of `mem` (the mirror
    /// region), helper `index`, answering within `timeout` or failing.
    pub fn new(
        mem: GuestMemoryMmap,
        mailbox_gpa: u64,
        index: usize,
        link: Arc<dyn HelperLink>,
        timeout: Duration,
    ) -> Self {
        let seq = mem
            .load::<u64>(GuestAddress(mailbox_gpa + RESP_SEQ), Ordering::Acquire)
            .unwrap_or(0);
        Self {
            mem,
            base: mailbox_gpa,
            index,
            link,
            timeout,
            seq,
            max_batch: 1,
            busy_cycles: 0,
        }
    }

    /// TSC cycles the helper reported spending on batches so far (its own
    /// work, without the host's or the scheduler's share).
    pub fn busy_cycles(&self) -> u64 {
        self.busy_cycles
    }

    /// Whether the helper has announced it is leaving the CPU (idle).
    pub fn is_sleeping(&self) -> bool {
        matches!(
            self.load::<u32>(STATE, Ordering::Acquire),
            Ok(h::state::SLEEPING)
        )
    }

    /// Times the helper woke up idle (it sleeps between requests).
    pub fn heartbeat(&self) -> u64 {
        heartbeat(&self.mem, self.base)
    }

    fn write(&self, offset: u64, bytes: &[u8]) -> Result<(), HelperError> {
        self.mem
            .write_slice(bytes, GuestAddress(self.base + offset))
            .map_err(|_| HelperError::Memory(self.base + offset))
    }

    fn read(&self, offset: u64, bytes: &mut [u8]) -> Result<(), HelperError> {
        self.mem
            .read_slice(bytes, GuestAddress(self.base + offset))
            .map_err(|_| HelperError::Memory(self.base + offset))
    }

    /// The host address of `len` mailbox bytes at `offset`, checked to lie
    /// inside one mapping of `self.mem` (which keeps it alive).
    fn host_ptr(&self, offset: u64, len: usize) -> Result<*mut u8, HelperError> {
        let gpa = self.base + offset;
        let slice = self
            .mem
            .get_slice(GuestAddress(gpa), len)
            .map_err(|_| HelperError::Memory(gpa))?;
        Ok(slice.ptr_guard_mut().as_ptr())
    }

    /// Copies `dst.len()` mailbox bytes at `offset` into `dst` at memory
    /// speed (vm-memory's `read_slice` reads volatile words, ~2 GB/s here,
    /// which would make the host's copy, not the helper, the bottleneck).
    fn copy_out(&self, offset: u64, dst: &mut [u8]) -> Result<(), HelperError> {
        let src = self.host_ptr(offset, dst.len())?;
        // SAFETY: `src` covers `dst.len()` mapped bytes (host_ptr) that do
        // not overlap `dst`, host memory of ours. The helper does not write
        // them while we copy (it answered the request and works elsewhere);
        // if a buggy or hostile guest did, the bytes would be garbage, which
        // the receiver's authentication rejects.
        unsafe { bulk_copy(dst.as_mut_ptr(), src, dst.len()) };
        Ok(())
    }

    /// Appends `len` mailbox bytes at `offset` to `out`.
    fn append_out(&self, offset: u64, len: usize, out: &mut Vec<u8>) -> Result<(), HelperError> {
        let src = self.host_ptr(offset, len)?;
        out.reserve(len);
        let start = out.len();
        // SAFETY: `reserve` made room for `len` bytes after `start`; `src`
        // covers `len` mapped bytes (see `copy_out`); every byte of the new
        // length is written before `set_len` exposes it.
        unsafe {
            bulk_copy(out.as_mut_ptr().add(start), src, len);
            out.set_len(start + len);
        }
        Ok(())
    }

    /// Copies `src` into the mailbox at `offset`, at memory speed.
    fn copy_in(&self, offset: u64, src: &[u8]) -> Result<(), HelperError> {
        let dst = self.host_ptr(offset, src.len())?;
        // SAFETY: `dst` covers `src.len()` mapped bytes of the mirror region
        // (host_ptr), which no Rust reference aliases and which cannot
        // overlap `src`, a host buffer. The helper does not read this area
        // until the request is posted after the copy.
        unsafe { bulk_copy(dst, src.as_ptr(), src.len()) };
        Ok(())
    }

    fn read_obj<T: FromBytes + IntoBytes>(&self, offset: u64) -> Result<T, HelperError> {
        let mut v = T::new_zeroed();
        self.read(offset, v.as_mut_bytes())?;
        Ok(v)
    }

    fn store<T: vm_memory::AtomicAccess>(
        &self,
        offset: u64,
        v: T,
        order: Ordering,
    ) -> Result<(), HelperError> {
        self.mem
            .store(v, GuestAddress(self.base + offset), order)
            .map_err(|_| HelperError::Memory(self.base + offset))
    }

    fn load<T: vm_memory::AtomicAccess>(
        &self,
        offset: u64,
        order: Ordering,
    ) -> Result<T, HelperError> {
        self.mem
            .load(GuestAddress(self.base + offset), order)
            .map_err(|_| HelperError::Memory(self.base + offset))
    }

    /// Wakes the helper if it announced it is going to sleep.
    fn nudge(&self) -> Result<(), HelperError> {
        fence(Ordering::SeqCst);
        if self.load::<u32>(STATE, Ordering::SeqCst)? == h::state::SLEEPING {
            self.link.ring(self.index);
        }
        Ok(())
    }

    /// Waits until `done()` holds, bounded by the timeout and by faults.
    fn wait_until(
        &self,
        mut done: impl FnMut() -> Result<bool, HelperError>,
    ) -> Result<(), HelperError> {
        let start = Instant::now();
        let mut rung = Instant::now();
        loop {
            if done()? {
                return Ok(());
            }
            let elapsed = start.elapsed();
            if elapsed > SPIN {
                if let Some(why) = self.link.fault(self.index) {
                    return Err(HelperError::Fault {
                        index: self.index,
                        why,
                    });
                }
                if elapsed > self.timeout {
                    return Err(HelperError::Timeout {
                        index: self.index,
                        after: self.timeout,
                    });
                }
                // A wake-up can race with the helper going to sleep; ring
                // again now and then rather than wait for its own timeout.
                if rung.elapsed() > Duration::from_millis(2) {
                    self.nudge()?;
                    rung = Instant::now();
                }
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
    }

    /// Posts a request without waiting; returns its number. The caller
    /// keeps at most `QUEUE_DEPTH` requests outstanding, and posts commands
    /// that use `arg` alone.
    fn post(
        &mut self,
        command: u32,
        flags: u32,
        first: u32,
        count: u32,
        arg: &[u8],
    ) -> Result<u64, HelperError> {
        let n = self.seq.wrapping_add(1);
        let request = h::RequestSlot {
            cmd: command,
            flags,
            first,
            count,
            ..Default::default()
        };
        self.write(slot_offset(n), request.as_bytes())?;
        if !arg.is_empty() {
            self.write(ARG, arg)?;
        }
        self.store(REQ_SEQ, n, Ordering::Release)?;
        self.seq = n;
        self.nudge()?;
        Ok(n)
    }

    /// Waits for the answer to request `n`; returns the answered count, or
    /// the refusal with the failing record's index relative to `first`.
    fn finish(&mut self, command: u32, first: u32, n: u64) -> Result<u32, HelperError> {
        self.wait_answered(n)?;
        let answer: h::RequestSlot = self.read_obj(slot_offset(n))?;
        self.busy_cycles = self.busy_cycles.wrapping_add(answer.busy_cycles);
        if answer.status != status::OK {
            return Err(HelperError::Refused {
                command,
                status: answer.status.into(),
                record: answer.fail_index.saturating_sub(first),
            });
        }
        Ok(answer.count)
    }

    /// Waits out requests still queued after a refusal (CHAIN makes the
    /// helper skip them), so the queue is empty for the next call. A helper
    /// that stops answering or faults ends the wait: the first error is
    /// what the caller reports anyway.
    fn abandon(&mut self, inflight: &mut VecDeque<(usize, u64)>) {
        while let Some((_, n)) = inflight.pop_front() {
            if self.wait_answered(n).is_err() {
                break;
            }
        }
    }

    /// Waits until request `n` has been answered.
    fn wait_answered(&self, n: u64) -> Result<(), HelperError> {
        self.wait_until(|| Ok(answered(self.load::<u64>(RESP_SEQ, Ordering::Acquire)?, n)))
    }

    /// Posts a request (cmd, count, arg) and waits for its answer; returns
    /// the answered count.
    fn call(&mut self, command: u32, count: u32, arg: &[u8]) -> Result<u32, HelperError> {
        let n = self.post(command, 0, 0, count, arg)?;
        self.finish(command, 0, n)
    }

    fn arg<T: FromBytes + IntoBytes>(&self) -> Result<T, HelperError> {
        self.read_obj(ARG)
    }

    /// The version/capability handshake; remembers the helper's batch size.
    pub fn hello(&mut self) -> Result<HelloReply, HelperError> {
        self.call(cmd::HELLO, 0, &[])?;
        let reply: HelloReply = self.arg()?;
        if reply.version != h::MH_ABI_VERSION {
            return Err(HelperError::Version(reply.version));
        }
        self.max_batch = reply.max_batch.clamp(1, h::MAX_BATCH);
        Ok(reply)
    }

    fn session(
        &mut self,
        command: u32,
        args: h::SessionArgs,
    ) -> Result<h::SessionArgs, HelperError> {
        self.call(command, 0, args.as_bytes())?;
        self.arg()
    }

    /// Source: starts a session; returns the source helper's nonce.
    pub fn begin_source(&mut self) -> Result<[u8; 32], HelperError> {
        let args = h::SessionArgs {
            role: role::SOURCE,
            ..Default::default()
        };
        Ok(self.session(cmd::SESSION_BEGIN, args)?.own_nonce)
    }

    /// Target: starts a session from the source's nonce; returns the target
    /// helper's nonce and the session id.
    pub fn begin_target(
        &mut self,
        source_nonce: [u8; 32],
    ) -> Result<([u8; 32], [u8; 16]), HelperError> {
        let args = h::SessionArgs {
            role: role::TARGET,
            peer_nonce: source_nonce,
            ..Default::default()
        };
        let out = self.session(cmd::SESSION_BEGIN, args)?;
        Ok((out.own_nonce, out.session_id))
    }

    /// Snapshot source: starts a session that needs no answer (keys from
    /// this helper's nonce alone); returns the nonce the file carries and
    /// the session id.
    pub fn begin_snapshot_source(&mut self) -> Result<([u8; 32], [u8; 16]), HelperError> {
        let args = h::SessionArgs {
            role: role::SNAPSHOT_SOURCE,
            ..Default::default()
        };
        let out = self.session(cmd::SESSION_BEGIN, args)?;
        Ok((out.own_nonce, out.session_id))
    }

    /// Snapshot target: starts a session from the nonce in the file;
    /// returns the session id.
    pub fn begin_snapshot_target(
        &mut self,
        source_nonce: [u8; 32],
    ) -> Result<[u8; 16], HelperError> {
        let args = h::SessionArgs {
            role: role::SNAPSHOT_TARGET,
            peer_nonce: source_nonce,
            ..Default::default()
        };
        Ok(self.session(cmd::SESSION_BEGIN, args)?.session_id)
    }

    /// Source: completes the session with the target's nonce; returns the
    /// session id (equal to the target's when both share the transport key).
    pub fn complete_source(&mut self, target_nonce: [u8; 32]) -> Result<[u8; 16], HelperError> {
        let args = h::SessionArgs {
            peer_nonce: target_nonce,
            ..Default::default()
        };
        Ok(self.session(cmd::SESSION_PEER, args)?.session_id)
    }

    /// Ends the session (both sides).
    pub fn end(&mut self) -> Result<(), HelperError> {
        self.call(cmd::SESSION_END, 0, &[]).map(drop)
    }

    /// Records per request of a stream: the batch area cut in
    /// `QUEUE_DEPTH` parts, so the host copies one part while the helper
    /// works through the others.
    fn part(&self) -> usize {
        (self.max_batch / h::QUEUE_DEPTH).max(1) as usize
    }

    /// Requests of a stream outstanding at once (one per part).
    fn depth(&self) -> usize {
        (self.max_batch as usize / self.part()).clamp(1, h::QUEUE_DEPTH as usize)
    }

    /// The first record of the part that request `k` of a stream uses.
    fn part_first(&self, k: usize) -> u32 {
        ((k % self.depth()) * self.part()) as u32
    }

    /// Encrypts `pages` (gpa, generation) and appends one record per page
    /// to `out`, in order. Up to `QUEUE_DEPTH` requests are queued: while
    /// the helper works on them, the oldest answered part is copied out and
    /// its next request posted.
    pub fn encrypt(&mut self, pages: &[(u64, u64)], out: &mut Vec<u8>) -> Result<(), HelperError> {
        let mut inflight = VecDeque::new();
        let result = self.encrypt_stream(pages, out, &mut inflight);
        if result.is_err() {
            self.abandon(&mut inflight);
        }
        result
    }

    fn encrypt_stream(
        &mut self,
        pages: &[(u64, u64)],
        out: &mut Vec<u8>,
        inflight: &mut VecDeque<(usize, u64)>,
    ) -> Result<(), HelperError> {
        let chunks: Vec<&[(u64, u64)]> = pages.chunks(self.part()).collect();
        for (k, chunk) in chunks.iter().enumerate() {
            if inflight.len() == self.depth() {
                if let Some((p, n)) = inflight.pop_front() {
                    self.finish_encrypt(p, n)?;
                    self.copy_records_out(p, chunks[p].len(), out)?;
                }
            }
            let first = self.part_first(k);
            for (i, &(gpa, generation)) in chunk.iter().enumerate() {
                let header = RecordHeader {
                    gpa,
                    generation,
                    ..Default::default()
                };
                self.write(record_offset(first as usize + i), header.as_bytes())?;
            }
            let n = self.post(
                cmd::ENCRYPT_BATCH,
                stream_flags(k),
                first,
                chunk.len() as u32,
                &[],
            )?;
            inflight.push_back((k, n));
        }
        while let Some((p, n)) = inflight.pop_front() {
            self.finish_encrypt(p, n)?;
            self.copy_records_out(p, chunks[p].len(), out)?;
        }
        Ok(())
    }

    /// Waits for request `k` of an encrypt stream; a refusal names the
    /// failing record's index in the stream.
    fn finish_encrypt(&mut self, k: usize, n: u64) -> Result<u32, HelperError> {
        let before = (k * self.part()) as u32;
        self.finish(cmd::ENCRYPT_BATCH, self.part_first(k), n)
            .map_err(|e| e.at_stream_record(before))
    }

    fn copy_records_out(
        &self,
        k: usize,
        count: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), HelperError> {
        let offset = record_offset(self.part_first(k) as usize);
        self.append_out(offset, count * RECORD_STRIDE, out)
    }

    /// Hands `records` (whole records, as [`HelperClient::encrypt`] made
    /// them) to the helper, which writes each page only if it
    /// authenticates; returns the number applied. On an error, records
    /// before the failing one were applied, none after it. Parts are
    /// copied in while the helper works on the requests already queued.
    pub fn decrypt(&mut self, records: &[u8]) -> Result<usize, HelperError> {
        if !records.len().is_multiple_of(RECORD_STRIDE) {
            return Err(HelperError::Truncated(records.len()));
        }
        let mut inflight = VecDeque::new();
        let result = self.decrypt_stream(records, &mut inflight);
        if result.is_err() {
            self.abandon(&mut inflight);
        }
        result
    }

    fn decrypt_stream(
        &mut self,
        records: &[u8],
        inflight: &mut VecDeque<(usize, u64)>,
    ) -> Result<usize, HelperError> {
        let mut applied = 0;
        for (k, chunk) in records.chunks(self.part() * RECORD_STRIDE).enumerate() {
            if inflight.len() == self.depth() {
                if let Some((p, n)) = inflight.pop_front() {
                    applied += self.finish_decrypt(p, n, applied)?;
                }
            }
            let first = self.part_first(k);
            self.copy_in(record_offset(first as usize), chunk)?;
            let count = (chunk.len() / RECORD_STRIDE) as u32;
            let n = self.post(cmd::DECRYPT_BATCH, stream_flags(k), first, count, &[])?;
            inflight.push_back((k, n));
        }
        while let Some((p, n)) = inflight.pop_front() {
            applied += self.finish_decrypt(p, n, applied)?;
        }
        Ok(applied)
    }

    /// Waits for request `k` of a decrypt stream (`applied` records before
    /// it succeeded); a refusal names the failing record's index in the
    /// stream.
    fn finish_decrypt(&mut self, k: usize, n: u64, applied: usize) -> Result<usize, HelperError> {
        self.finish(cmd::DECRYPT_BATCH, self.part_first(k), n)
            .map(|count| count as usize)
            .map_err(|e| e.at_stream_record(applied as u32))
    }

    /// Writes the declared shared ranges where SEAL and VERIFY_SEAL read
    /// them and returns their arguments.
    fn seal_args(
        &self,
        shared: &[GpaRange],
        record: SealRecord,
        stream_hash: [u8; 32],
    ) -> Result<h::SealArgs, HelperError> {
        if shared.len() > h::MAX_SHARED_RANGES as usize {
            return Err(HelperError::TooManyRanges(shared.len()));
        }
        let bytes: Vec<u8> = shared
            .iter()
            .flat_map(|r| r.as_bytes().iter().copied())
            .collect();
        self.copy_in(record_offset(0), &bytes)?;
        let mut args = h::SealArgs::new_zeroed();
        args.record = record;
        args.shared_count = shared.len() as u32;
        args.stream_hash = stream_hash;
        Ok(args)
    }

    /// Source: the sealed end-of-stream record, once every RAM page outside
    /// `shared` (ascending, disjoint, page-aligned ranges the guest
    /// declared shared) was encrypted in this session. Ends the session's
    /// encryption. (No stream hash: for tests of the page path.)
    pub fn seal(&mut self, shared: &[GpaRange]) -> Result<SealRecord, HelperError> {
        Ok(self.seal_stream(shared, [0; 32])?.record)
    }

    /// Source: [`HelperClient::seal`] that also seals `stream_hash` (what
    /// the helpers do not see), and the commitments to the target's
    /// possible answers.
    pub fn seal_stream(
        &mut self,
        shared: &[GpaRange],
        stream_hash: [u8; 32],
    ) -> Result<Sealed, HelperError> {
        let args = self.seal_args(shared, SealRecord::new_zeroed(), stream_hash)?;
        self.call(cmd::SEAL, 0, args.as_bytes())?;
        let out = self.arg::<h::SealArgs>()?;
        Ok(Sealed {
            record: out.record,
            ack_commitment: out.ack_commitment,
            nack_commitment: out.nack_commitment,
        })
    }

    /// Target: verifies the source's sealed record against what arrived,
    /// under the same `shared` ranges; every other RAM page must have been
    /// written in this session. Ends the session, whatever the outcome.
    pub fn verify_seal(
        &mut self,
        record: &SealRecord,
        shared: &[GpaRange],
    ) -> Result<(), HelperError> {
        self.verify_stream(record, shared, [0; 32]).0
    }

    /// Target: [`HelperClient::verify_seal`] that also compares the stream
    /// hash; returns the outcome and the token the helper revealed (the
    /// ack token if it verified, the nack token if the seal opened but did
    /// not match, none if it did not open).
    pub fn verify_stream(
        &mut self,
        record: &SealRecord,
        shared: &[GpaRange],
        stream_hash: [u8; 32],
    ) -> (Result<(), HelperError>, Option<Answer>) {
        let args = match self.seal_args(shared, *record, stream_hash) {
            Ok(a) => a,
            Err(e) => return (Err(e), None),
        };
        let result = self.call(cmd::VERIFY_SEAL, 0, args.as_bytes()).map(drop);
        let answer = match self.arg::<h::SealArgs>() {
            Ok(out) if out.token_kind == h::token::ACK && result.is_ok() => {
                Some(Answer::Ack(out.token))
            }
            Ok(out) if out.token_kind == h::token::NACK => Some(Answer::Nack(out.token)),
            _ => None,
        };
        (result, answer)
    }

    /// Sends a raw command (for tests of the helper's debug commands).
    pub fn raw_command(&mut self, command: u32) -> Result<u32, HelperError> {
        self.call(command, 0, &[])
    }

    /// One seed-protocol round trip (QEMU RFC): params, `ret = -1`,
    /// `done = 0`, barrier, `go = 1`, wait for `done`.
    fn seed_call(&mut self, cmd_type: u64, gpa: u64) -> Result<(), HelperError> {
        let params = h::SeedParams {
            cmd_type,
            gpa,
            prefetch: 0,
            ret: -1,
            go: 0,
            done: 0,
        };
        self.write(offsets::SEED_PARAMS as u64, params.as_bytes())?;
        fence(Ordering::SeqCst);
        self.store(SEED_GO, 1i32, Ordering::Release)?;
        self.nudge()?;
        self.wait_until(|| Ok(self.load::<i32>(SEED_DONE, Ordering::Acquire)? == 1))?;
        let ret = self.load::<i32>(SEED_RET, Ordering::Relaxed)?;
        if ret != status::OK {
            let command = cmd_type as u32;
            return Err(HelperError::Refused {
                command,
                status: ret.into(),
                record: 0,
            });
        }
        Ok(())
    }

    /// Seed ENCRYPT of one page: returns header (u32 len + envelope) and the
    /// encrypted page, as the RFC's host copies them out.
    pub fn seed_encrypt(
        &mut self,
        gpa: u64,
        header: &mut Vec<u8>,
        page: &mut [u8; h::PAGE_SIZE],
    ) -> Result<(), HelperError> {
        self.seed_call(seed::ENCRYPT, gpa)?;
        let len: u32 = self.read_obj(offsets::SEED_HEADER as u64)?;
        let len = (len as usize).min(h::SEED_ENVELOPE_MAX);
        header.resize(4 + len, 0);
        self.read(offsets::SEED_HEADER as u64, header)?;
        // The same bulk copy as batches use, so the baseline is not slowed
        // by a slower copy.
        self.copy_out(offsets::SEED_PAGE as u64, page)
    }

    /// Seed DECRYPT of one page into `gpa`.
    pub fn seed_decrypt(
        &mut self,
        gpa: u64,
        header: &[u8],
        page: &[u8; h::PAGE_SIZE],
    ) -> Result<(), HelperError> {
        if header.len() > 4 + h::SEED_ENVELOPE_MAX {
            return Err(HelperError::Truncated(header.len()));
        }
        self.write(offsets::SEED_HEADER as u64, header)?;
        self.copy_in(offsets::SEED_PAGE as u64, page)?;
        self.seed_call(seed::DECRYPT, gpa)
    }

    /// Seed INIT.
    pub fn seed_init(&mut self) -> Result<(), HelperError> {
        self.seed_call(seed::INIT, 0)
    }
}

/// Pieces a copy is cut into when destination and source are a short
/// distance apart: below the size where the C library switches to
/// `rep movsb`.
const COPY_PIECE: usize = 2048;

/// Copies `len` bytes from `src` to `dst` as fast as the host allows.
///
/// On this lab's AMD EPYC, `rep movsb` (which glibc's `memcpy` uses from
/// 4 KiB up) runs 15x slower when `dst` lies 1..31 bytes after `src`
/// modulo 4 KiB (measured; pieces are used up to 63, a margin for other
/// CPUs): 45 µs instead of 3 µs for 32 records. A heap buffer
/// starts 16 bytes past a page boundary and mailbox records are page
/// aligned, so a plain copy hits exactly that case; 2 KiB pieces keep to
/// the C library's vector loop.
///
/// # Safety
/// `src` must be valid for reads and `dst` for writes of `len` bytes, and
/// the ranges must not overlap.
unsafe fn bulk_copy(dst: *mut u8, src: *const u8, len: usize) {
    let distance = (dst as usize).wrapping_sub(src as usize) % 4096;
    let piece = if (1..64).contains(&distance) {
        COPY_PIECE
    } else {
        len.max(1)
    };
    let mut done = 0;
    while done < len {
        let n = piece.min(len - done);
        // SAFETY: `done + n <= len`, inside both ranges (caller's contract).
        unsafe { std::ptr::copy_nonoverlapping(src.add(done), dst.add(done), n) };
        done += n;
    }
}

/// The idle wake-ups of the helper whose mailbox is at `mailbox_gpa` of
/// `mem` (0 if the mailbox is not mapped).
pub fn heartbeat(mem: &GuestMemoryMmap, mailbox_gpa: u64) -> u64 {
    mem.load::<u64>(GuestAddress(mailbox_gpa + HEARTBEAT), Ordering::Relaxed)
        .unwrap_or(0)
}

/// The header of the record at `i` in `records`.
pub fn record_header(records: &[u8], i: usize) -> Option<RecordHeader> {
    let at = i.checked_mul(RECORD_STRIDE)?;
    RecordHeader::read_from_prefix(records.get(at..)?)
        .ok()
        .map(|(h, _)| h)
}

/// Overwrites the header of record `i` (tests build forged records so).
pub fn set_record_header(records: &mut [u8], i: usize, header: &RecordHeader) -> bool {
    let at = i * RECORD_STRIDE;
    match records.get_mut(at..at + size_of::<RecordHeader>()) {
        Some(dst) => {
            dst.copy_from_slice(header.as_bytes());
            true
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_have_names() {
        assert_eq!(
            HelperStatus::from(status::AUTH_FAILED),
            HelperStatus::AuthFailed
        );
        assert_eq!(
            HelperStatus::from(status::STALE_GENERATION),
            HelperStatus::StaleGeneration
        );
        assert_eq!(HelperStatus::from(-99), HelperStatus::Other(-99));
    }

    #[test]
    fn bulk_copy_is_exact_at_every_distance() {
        let src: Vec<u8> = (0..3 * 4096 + 333).map(|i| (i * 7 + 3) as u8).collect();
        let mut backing = vec![0u8; src.len() + 8192];
        let base = backing.as_ptr() as usize;
        let src_mod = src.as_ptr() as usize % 4096;
        // Distances inside and around the slow window, and odd lengths.
        for distance in [0usize, 1, 16, 31, 63, 64, 65, 2048] {
            for len in [0usize, 1, 2047, 2048, 2049, src.len()] {
                backing.fill(0xee);
                let start = (src_mod + distance + 4096 - base % 4096) % 4096;
                let dst = &mut backing[start..start + len];
                // SAFETY: both ranges are valid for `len` bytes and distinct
                // allocations.
                unsafe { bulk_copy(dst.as_mut_ptr(), src.as_ptr(), len) };
                assert_eq!(dst, &src[..len], "distance {distance}, length {len}");
                assert!(backing[..start].iter().all(|&b| b == 0xee));
                assert!(backing[start + len..].iter().all(|&b| b == 0xee));
            }
        }
    }

    #[test]
    fn record_headers_round_trip() {
        let mut records = vec![0u8; 2 * RECORD_STRIDE];
        let header = RecordHeader {
            gpa: 0x5000,
            generation: 3,
            ..Default::default()
        };
        assert!(set_record_header(&mut records, 1, &header));
        assert_eq!(record_header(&records, 1), Some(header));
        assert_eq!(record_header(&records, 0).map(|h| h.gpa), Some(0));
        assert_eq!(record_header(&records, 2), None);
        assert!(!set_record_header(&mut records, 2, &header));
    }
}
