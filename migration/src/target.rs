//! The receiving side: the stream read in its one fixed order, phase after
//! phase (`Receiver::run`), each frame checked against the kind its place
//! allows (`expect`); there is no state to go back to, so no state
//! machine beyond that order:
//!
//! ```text
//! Hello -> Config (checked against this VM before anything is written)
//!       -> SessionOffer (target helpers begin; live: SessionAnswer back)
//!       -> SharedMap (validated)
//!       -> Pages: SharedPages (only into shared pages, each once)
//!                 | HelperRecords (to the helpers, in parallel)
//!       -> DeviceState -> VmState -> VcpuState x vCPUs (index order)
//!       -> Seal -> End
//!       => every shared page arrived, state restored (the guest still
//!          cannot run), the helpers verify the seal (every private page
//!          written in this session), the guest may run, Ack (live; a
//!          guest that runs is never failed for an Ack that did not go)
//! ```
//!
//! Any other frame, any frame out of its place, a damaged or short stream,
//! or a refusal anywhere is one [`MigrationError`]: the helper sessions
//! end, a live source is told why, and the main vCPUs never run.

use std::io::{BufReader, BufWriter, Write};
use std::sync::mpsc::sync_channel;
use std::sync::Mutex;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};
use zerocopy::FromBytes;

use crate::buffers;
use crate::helper::{
    record_header, Answer, GpaRange, HelperClient, HelperError, HelperStatus, SealRecord,
    RECORD_STRIDE,
};
use crate::protocol::{self, FrameKind, ProtocolError, StreamHash};
use crate::ranges::SharedMap;
use crate::source::SHARED_PAGE_STRIDE;
use crate::state::{self, ConfigRecord, StreamMode, VcpuRecord, VmRecord};
use crate::transport::{Cancel, Channel};
use crate::{MigratableVm, MigrationError, Progress, SavedState, Side, VmError};

use cgsvmm_fw_abi::PAGE_SIZE_U64 as PAGE;
/// Bytes read ahead from the channel.
const READ_BUFFER: usize = 1 << 20;

/// How long a source may take to say who it is (a connection that says
/// nothing in this time, or something else, is not a migration).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the stream may stall between frames once it has begun.
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(60);

/// Receives a VM from `channel` into `vm`; on success the guest runs here
/// (or stays paused if the VM was told so) and a live source has its
/// acknowledgement. [`MigrationError::NotAMigration`]: the peer never
/// spoke the protocol (nothing was touched; the caller may wait for
/// another).
///
/// `cancel` is looked at between frames (a snapshot file, which no
/// shutdown interrupts, is read no further once it is set).
pub fn receive(
    vm: &dyn MigratableVm,
    channel: Channel,
    progress: &Progress,
    cancel: &Cancel,
) -> Result<(), MigrationError> {
    let live = channel.is_live();
    // A connection that cannot even be set up is gone already: not a
    // migration (the caller waits on for one).
    let gone = |e: std::io::Error| MigrationError::NotAMigration(format!("its connection: {e}"));
    let writer = if live {
        Some(BufWriter::new(channel.try_clone().map_err(gone)?))
    } else {
        None
    };
    if live {
        channel
            .set_read_timeout(Some(HANDSHAKE_TIMEOUT))
            .map_err(gone)?;
    }
    let mut helpers = Vec::new();
    let mut receiver = Receiver {
        vm,
        progress,
        cancel,
        mode: if live {
            StreamMode::Live
        } else {
            StreamMode::Snapshot
        },
        stop: channel.try_clone().ok(),
        input: BufReader::with_capacity(READ_BUFFER, channel),
        output: writer,
        buf: Vec::new(),
        hash: StreamHash::default(),
        seal: None,
        shared: Vec::new(),
        nack: None,
    };
    let result = receiver.run(&mut helpers);
    if result.is_err() && receiver.nack.is_none() {
        // The seal arrived but something else failed: have the helpers
        // refuse it for good, and so earn the token that proves it.
        if let (Some(seal), Some(lead)) = (receiver.seal, helpers.first_mut()) {
            if let (_, Some(Answer::Nack(t))) =
                lead.verify_stream(&seal, &receiver.shared, [0xff; 32])
            {
                receiver.nack = Some(t);
            }
        }
    }
    // Verified or not, the session is over: a VM that arrived may leave
    // again (as a source), and one that did not arrive exits.
    for h in &mut helpers {
        let _ = h.end();
    }
    if let Err(e) = &result {
        // A source that gave up needs no reason back, but an earned nack
        // always goes: it lets the source resume for sure.
        if !matches!(e, MigrationError::Peer { .. }) || receiver.nack.is_some() {
            let msg = e.to_string();
            let cut = msg.len().min(FrameKind::Error.max_length() as usize);
            let _ = match receiver.nack {
                Some(token) => {
                    let mut payload = token.to_vec();
                    payload.extend_from_slice(&msg.as_bytes()[..cut]);
                    receiver.send(FrameKind::Nack, &payload)
                }
                None => receiver.send(FrameKind::Error, &msg.as_bytes()[..cut]),
            };
        }
    }
    result
}

struct Receiver<'a> {
    vm: &'a dyn MigratableVm,
    progress: &'a Progress,
    cancel: &'a Cancel,
    mode: StreamMode,
    /// Shuts the stream when a helper fails, so the reader stops waiting.
    stop: Option<Channel>,
    input: BufReader<Channel>,
    output: Option<BufWriter<Channel>>,
    buf: Vec<u8>,
    /// Over the frames the helpers do not see, as they arrived.
    hash: StreamHash,
    /// The source's seal, once it arrived.
    seal: Option<SealRecord>,
    /// The shared ranges the stream declared.
    shared: Vec<GpaRange>,
    /// The nack token, once the helpers revealed it.
    nack: Option<[u8; 16]>,
}

impl Receiver<'_> {
    fn send(&mut self, kind: FrameKind, payload: &[u8]) -> Result<(), MigrationError> {
        if let Some(out) = self.output.as_mut() {
            protocol::write_frame(out, kind, payload)?;
            out.flush().map_err(ProtocolError::Io)?;
        }
        Ok(())
    }

    /// The next frame into `self.buf`; the stream may not end here.
    fn next(&mut self) -> Result<FrameKind, MigrationError> {
        self.cancel.check()?;
        let kind = protocol::read_frame_into(&mut self.input, &mut self.buf)?.ok_or(
            ProtocolError::Truncated {
                got: 0,
                want: protocol::HEADER_SIZE,
            },
        )?;
        Progress::add(
            &self.progress.transferred,
            (protocol::HEADER_SIZE + self.buf.len()) as u64,
        );
        self.hash.frame(kind, &self.buf);
        if kind == FrameKind::Error {
            return Err(MigrationError::Peer {
                side: Side::Source,
                why: protocol::peer_text(&self.buf),
            });
        }
        Ok(kind)
    }

    /// The next frame, which must be `want`.
    fn expect(&mut self, want: FrameKind) -> Result<(), MigrationError> {
        match self.next()? {
            k if k == want => Ok(()),
            k => Err(MigrationError::Sequence(format!(
                "{k:?} where {want:?} belongs"
            ))),
        }
    }

    /// The Hello and the source's configuration.
    fn opening(&mut self) -> Result<ConfigRecord, MigrationError> {
        protocol::read_hello(&mut self.input)?;
        self.expect(FrameKind::Config)?;
        Ok(state::decode(&self.buf)?)
    }

    fn run(&mut self, helpers: &mut Vec<HelperClient>) -> Result<(), MigrationError> {
        let vm = self.vm;
        // Speak first, so that a source that reached something else knows
        // before it pauses its guest.
        // A peer that hung up at once (a port scanner's reset) was not a
        // migration either.
        if let Some(out) = self.output.as_mut() {
            protocol::write_hello(out)
                .and_then(|()| out.flush().map_err(ProtocolError::Io))
                .map_err(|e| MigrationError::NotAMigration(format!("cannot greet it: {e}")))?;
        }
        // Until a well-formed configuration has come, the peer has shown
        // nothing of a cgsvmm source (the Hello is public): whatever goes
        // wrong, this was not a migration, and a live target waits on.
        let theirs = self.opening().map_err(|e| match e {
            MigrationError::Protocol(ProtocolError::Io(io)) if protocol::timed_out(&io) => {
                MigrationError::NotAMigration(format!(
                    "no configuration within {HANDSHAKE_TIMEOUT:?}"
                ))
            }
            e @ (MigrationError::Protocol(_)
            | MigrationError::State(_)
            | MigrationError::Sequence(_)) => MigrationError::NotAMigration(e.to_string()),
            e => e,
        })?;
        let ours = vm.config(self.mode);
        if let Some(why) = state::config_mismatch(&theirs, &ours) {
            return Err(MigrationError::Mismatch(why));
        }

        self.expect(FrameKind::SessionOffer)?;
        let offer_len = match self.mode {
            StreamMode::Live => 32,
            StreamMode::Snapshot => 48,
        };
        if self.buf.len() != offer_len {
            return Err(MigrationError::Sequence(format!(
                "a session offer of {} bytes",
                self.buf.len()
            )));
        }
        let source_nonce: [u8; 32] = self.buf[..32].try_into().expect("32 bytes");
        *helpers = vm.helpers()?;
        if helpers.is_empty() {
            return Err(MigrationError::Vm(VmError::refused(
                "this VM runs no migration helper",
            )));
        }
        match self.mode {
            StreamMode::Live => {
                let (nonce, id) = helpers[0].begin_target(source_nonce)?;
                let mut answer = nonce.to_vec();
                answer.extend_from_slice(&id);
                self.send(FrameKind::SessionAnswer, &answer)?;
            }
            StreamMode::Snapshot => {
                let id = helpers[0].begin_snapshot_target(source_nonce)?;
                if self.buf[32..] != id {
                    return Err(MigrationError::Mismatch(format!(
                        "the snapshot was not made by this VM's owner: {}",
                        crate::source::KEY_MISMATCH
                    )));
                }
            }
        }

        if self.output.is_some() {
            self.input
                .get_ref()
                .set_read_timeout(Some(FRAME_TIMEOUT))
                .map_err(ProtocolError::Io)?;
        }
        self.expect(FrameKind::SharedMap)?;
        let ram = vm.ram_ranges();
        let mut map = shared_map(&ram, &self.buf)?;
        self.shared = map.ranges();
        let total: u64 = ram.iter().map(|r| r.1).sum();
        self.progress
            .total
            .store(total, std::sync::atomic::Ordering::Relaxed);
        self.progress
            .remaining
            .store(total, std::sync::atomic::Ordering::Relaxed);

        let t = std::time::Instant::now();
        self.pages(helpers, &mut map, &ram)?;
        log::debug!("Received the pages in {:?}", t.elapsed());
        let t = std::time::Instant::now();

        // DeviceState ended the pages. The state is decoded only once the
        // seal is in: whatever is wrong with it is then refused with the
        // helpers' authenticated nack (`receive`).
        let devices = self.buf.clone();
        self.expect(FrameKind::VmState)?;
        let vm_bytes = self.buf.clone();
        let mut vcpu_bytes = Vec::with_capacity(theirs.vcpus as usize);
        for _ in 0..theirs.vcpus {
            self.expect(FrameKind::VcpuState)?;
            vcpu_bytes.push(self.buf.clone());
        }
        let hash = self.hash.value();
        self.expect(FrameKind::Seal)?;
        let seal = SealRecord::read_from_bytes(&self.buf)
            .map_err(|_| MigrationError::Sequence(format!("a seal of {} bytes", self.buf.len())))?;
        self.seal = Some(seal);
        self.expect(FrameKind::End)?;

        let vm_state: VmRecord = state::decode(&vm_bytes)?;
        let mut vcpus = Vec::with_capacity(vcpu_bytes.len());
        for (index, bytes) in (0..).zip(&vcpu_bytes) {
            let vcpu: VcpuRecord = state::decode(bytes)?;
            if vcpu.index != index {
                return Err(MigrationError::Sequence(format!(
                    "the state of vCPU {} where vCPU {index}'s belongs",
                    vcpu.index
                )));
            }
            vcpus.push(vcpu);
        }
        // Restored (decoded, checked, applied) before the helpers verify:
        // a state that does not restore is refused with their authenticated
        // nack, never after they revealed the ack token. The guest cannot
        // run before `start`, and a VM that does not verify exits.
        let saved = SavedState {
            vm: vm_state,
            vcpus,
            devices,
        };
        vm.set_shared_map(map);
        vm.restore(saved)?;
        let (verified, answer) = helpers[0].verify_stream(&seal, &self.shared, hash);
        let ack = match answer {
            Some(Answer::Ack(t)) => Some(t),
            Some(Answer::Nack(t)) => {
                self.nack = Some(t);
                None
            }
            None => None,
        };
        verified.map_err(|e| match e {
            HelperError::Refused {
                status: HelperStatus::SealMismatch,
                ..
            } => MigrationError::Sequence(
                "what arrived does not match what the source's helpers sealed: the stream was \
                 altered on the way (SealMismatch)"
                    .into(),
            ),
            HelperError::Refused {
                status: HelperStatus::Incomplete,
                record,
                ..
            } => MigrationError::Sequence(format!(
                "private page {:#x} never arrived (Incomplete)",
                u64::from(record) * PAGE
            )),
            e => e.into(),
        })?;
        let ack = ack.ok_or_else(|| {
            MigrationError::Vm(VmError::refused(
                "the helpers verified the seal but gave no token",
            ))
        })?;
        vm.start()?;
        log::debug!(
            "State, seal verification, restore and start in {:?}",
            t.elapsed()
        );
        // The guest runs here now: whatever happens to the answer, it is
        // not failed (a source that never hears it stays paused in
        // outcome-unknown, so the guest never runs twice).
        if let Err(e) = self.send(FrameKind::Ack, &ack) {
            log::warn!(
                "The guest runs here, but its acknowledgement did not reach the source \
                 (which stays paused, its outcome unknown): {e}"
            );
        }
        Ok(())
    }

    /// Page frames until DeviceState: shared pages written here, helper
    /// records decrypted by every helper at once.
    /// Precopy sends pages again, round after round, and the map again
    /// when the guest converted pages; the last map is the one every
    /// shared page must have arrived under.
    fn pages(
        &mut self,
        helpers: &mut [HelperClient],
        map: &mut SharedMap,
        ram: &[(u64, u64)],
    ) -> Result<(), MigrationError> {
        let failure: Mutex<Option<MigrationError>> = Mutex::new(None);
        let pool: Mutex<Vec<Vec<u8>>> = Mutex::new(buffers(3 * helpers.len() + 2));
        let mut seen = std::collections::HashSet::new();
        let stop = self.stop.take();
        // One queue every helper takes from: a frame goes to whichever
        // helper is free.
        let (work, queue) = sync_channel::<Vec<u8>>(2 * helpers.len());
        let queue = Mutex::new(queue);
        // Frames handed out and not yet done: a new round's frames wait for
        // the last round's, so that no helper writes a page's older
        // generation after another wrote its newer one.
        let inflight = std::sync::atomic::AtomicUsize::new(0);
        // Waits for the helpers to finish every frame handed out; false if
        // one failed meanwhile (its error is in `failure`).
        let settle = || {
            while inflight.load(std::sync::atomic::Ordering::Acquire) > 0 {
                if failure.lock().expect("failure lock poisoned").is_some() {
                    return false;
                }
                std::thread::yield_now();
            }
            true
        };
        let mut round_generation = None;
        let result = std::thread::scope(|scope| {
            // Dropped when the reader is done: the helpers' loops end.
            let work = work;
            for client in helpers.iter_mut() {
                let (failure, pool, progress, queue) = (&failure, &pool, self.progress, &queue);
                let inflight = &inflight;
                let stop = stop.as_ref();
                scope.spawn(move || {
                    loop {
                        let next = queue.lock().expect("queue lock poisoned").recv();
                        let Ok(records) = next else { return };
                        let done = || inflight.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
                        // After any failure, frames are taken and dropped
                        // (so the reader never blocks on a full queue) until
                        // the reader sees the failure and stops.
                        if failure.lock().expect("failure lock poisoned").is_some() {
                            done();
                            continue;
                        }
                        let outcome = client.decrypt(&records);
                        done();
                        match outcome {
                            Ok(n) => {
                                Progress::add(&progress.private_pages, n as u64);
                                Progress::sub(&progress.remaining, n as u64 * PAGE);
                                pool.lock().expect("pool lock poisoned").push(records);
                            }
                            Err(e) => {
                                failure
                                    .lock()
                                    .expect("failure lock poisoned")
                                    .get_or_insert(e.into());
                                // Wake the reader: it may wait on a source
                                // that has stalled.
                                if let Some(c) = stop {
                                    c.shutdown();
                                }
                            }
                        }
                    }
                });
            }
            loop {
                if self.buf.capacity() == 0 {
                    if let Some(buf) = pool.lock().expect("pool lock poisoned").pop() {
                        self.buf = buf;
                    }
                }
                match self.next()? {
                    FrameKind::SharedPages => self.shared_pages(map, &mut seen)?,
                    FrameKind::SharedMap => {
                        // A new map: pages changed hands. What the helpers
                        // still write of the last round goes first, so the
                        // plaintext of a page turned shared lands after it.
                        if !settle() {
                            return Ok(());
                        }
                        *map = shared_map(ram, &self.buf)?;
                        self.shared = map.ranges();
                    }
                    FrameKind::HelperRecords => {
                        if self.buf.is_empty() || !self.buf.len().is_multiple_of(RECORD_STRIDE) {
                            return Err(MigrationError::Sequence(format!(
                                "helper records of {} bytes",
                                self.buf.len()
                            )));
                        }
                        let generation = record_header(&self.buf, 0).map(|h| h.generation);
                        if round_generation.is_some() && generation != round_generation && !settle()
                        {
                            return Ok(());
                        }
                        round_generation = generation;
                        let records = std::mem::take(&mut self.buf);
                        inflight.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                        if work.send(records).is_err() {
                            // Every helper failed: the error is in `failure`.
                            return Ok(());
                        }
                    }
                    FrameKind::DeviceState => return Ok(()),
                    other => {
                        return Err(MigrationError::Sequence(format!(
                            "{other:?} among the pages"
                        )))
                    }
                }
                if failure.lock().expect("failure lock poisoned").is_some() {
                    return Ok(());
                }
            }
        });
        self.stop = stop;
        if let Some(e) = failure.into_inner().expect("failure lock poisoned") {
            return Err(e);
        }
        result?;
        let missing = map.shared_pages().find(|gpa| !seen.contains(gpa));
        if let Some(gpa) = missing {
            return Err(MigrationError::Sequence(format!(
                "shared page {gpa:#x} never arrived"
            )));
        }
        Ok(())
    }

    fn shared_pages(
        &mut self,
        map: &SharedMap,
        seen: &mut std::collections::HashSet<u64>,
    ) -> Result<(), MigrationError> {
        if self.buf.is_empty() || !self.buf.len().is_multiple_of(SHARED_PAGE_STRIDE) {
            return Err(MigrationError::Sequence(format!(
                "shared pages of {} bytes",
                self.buf.len()
            )));
        }
        for page in self.buf.chunks(SHARED_PAGE_STRIDE) {
            let gpa = u64::from_le_bytes(page[..8].try_into().expect("8 bytes"));
            if !plaintext_allowed(map, gpa) {
                return Err(MigrationError::Sequence(format!(
                    "plaintext for page {gpa:#x}, which is not shared"
                )));
            }
            seen.insert(gpa);
            self.vm
                .ram()
                .write_slice(&page[8..], GuestAddress(gpa))
                .map_err(|e| VmError::new(format!("Cannot write page {gpa:#x}"), e))?;
        }
        let n = (self.buf.len() / SHARED_PAGE_STRIDE) as u64;
        Progress::add(&self.progress.shared_pages, n);
        Progress::sub(&self.progress.remaining, n * PAGE);
        Ok(())
    }
}

/// The shared map a SharedMap frame declares, checked.
fn shared_map(ram: &[(u64, u64)], payload: &[u8]) -> Result<SharedMap, MigrationError> {
    let size = std::mem::size_of::<GpaRange>();
    if !payload.len().is_multiple_of(size) {
        return Err(MigrationError::Sequence(format!(
            "a shared map of {} bytes",
            payload.len()
        )));
    }
    let ranges: Vec<GpaRange> = payload
        .chunks(size)
        .map(|c| GpaRange::read_from_bytes(c).expect("chunk of a range's size"))
        .collect();
    let limit = cgsvmm_fw_abi::helper::MAX_SHARED_RANGES as usize;
    SharedMap::from_ranges(ram, &ranges, limit).map_err(|e| MigrationError::Sequence(e.to_string()))
}

/// Whether plaintext may be written at `gpa`: a whole page the map shares.
fn plaintext_allowed(map: &SharedMap, gpa: u64) -> bool {
    gpa.is_multiple_of(PAGE) && map.is_shared(gpa)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use zerocopy::IntoBytes;

    #[test]
    fn plaintext_goes_only_into_whole_shared_pages() {
        let r = |start, end| GpaRange { start, end };
        let shared = [r(0x1000, 0x3000), r(0x8000, 0x9000)];
        let bytes: Vec<u8> = shared.iter().flat_map(|r| r.as_bytes().to_vec()).collect();
        let ram = [(0u64, 0x10_0000u64)];
        let map = shared_map(&ram, &bytes).unwrap();
        for gpa in [0x1000, 0x2000, 0x8000] {
            assert!(plaintext_allowed(&map, gpa), "{gpa:#x}");
        }
        for gpa in [0x0, 0x3000, 0x9000, 0x1008] {
            assert!(!plaintext_allowed(&map, gpa), "{gpa:#x}");
        }
        assert!(!plaintext_allowed(&SharedMap::default(), 0));
        assert_eq!(map.pages(), 3);
        assert!(shared_map(&ram, &bytes[..20]).is_err());
        assert!(shared_map(&[(0, 0x4000)], &bytes).is_err());
    }
}
