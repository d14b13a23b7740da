//! The sending side: a VM leaves through a [`Channel`].
//!
//! [`send`] agrees a session with the target's helpers (or, for a
//! snapshot, with none), then sends the shared map, the shared pages as
//! plaintext and every other page as the helpers sealed it: every page
//! while the guest runs, then the pages it dirtied since, round after round
//! (precopy), until [`crate::policy`] says switch over; then it pauses the
//! main vCPUs only (the mirror vCPUs run on, so the helpers answer), sends
//! the last dirty pages, device, VM and vCPU state and the helpers' seal,
//! and waits for the target's authenticated answer. A snapshot pauses the
//! guest first and sends one round. Frame order: `protocol`'s sequence
//! diagram.
//!
//! Private pages are encrypted by every helper at once, one thread per
//! helper client, while this thread writes: the socket never waits on a
//! page it could have had. Any failure, or [`Cancel::cancel`], before the
//! acknowledgement ends the helper sessions and resumes the guest if it was
//! running; a partly written snapshot file is removed.

use std::io::{BufWriter, Write};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{sync_channel, TryRecvError};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use zerocopy::IntoBytes;

use crate::buffers as buffers_for;
use crate::helper::{token_matches, HelperClient, HelperError, Sealed, RECORD_STRIDE};
use crate::policy::{self, Decision, Limits, LowWater, RoundStats};
use crate::protocol::{self, FrameKind, ProtocolError, StreamHash};
use crate::ranges::SharedMap;
use crate::state::{self, StreamMode};
pub use crate::transport::Cancel;
use crate::transport::{self, Channel, TransportError, Uri};
use crate::{MigratableVm, MigrationError, Progress, SavedState, Side, VmError};

/// Why two sides' session ids differ.
pub const KEY_MISMATCH: &str = "the two sides' migration helpers derived different session keys: \
     they do not share one transport key and one VM identity (--transport-key-file, --uuid)";

/// Pages per page frame (the frame kinds' bound).
pub const PAGES_PER_FRAME: usize = 256;
/// Bytes of a shared page in a SharedPages frame: gpa (u64 LE) + page.
pub const SHARED_PAGE_STRIDE: usize = 8 + PAGE;
/// Bytes buffered before the socket is written.
const WRITE_BUFFER: usize = 1 << 20;
use cgsvmm_fw_abi::PAGE_SIZE as PAGE;

/// Migrates `vm` to `uri`; on success the guest stays paused here. The
/// guest is paused only once the target has answered the handshake (it
/// speaks this protocol, takes this configuration and shares the transport
/// key), so a wrong target never stops it.
pub fn send(
    vm: &dyn MigratableVm,
    uri: &Uri,
    params: &Params,
    progress: &Progress,
    cancel: &Cancel,
) -> Result<(), MigrationError> {
    let began = Instant::now();
    progress
        .downtime_limit_ms
        .store(params.downtime_limit.as_millis() as u64, Ordering::Relaxed);
    progress
        .max_bandwidth
        .store(params.max_bandwidth, Ordering::Relaxed);
    let channel = transport::connect_unless(uri, cancel).map_err(|e| match e {
        TransportError::Cancelled(_) => MigrationError::Cancelled,
        e => e.into(),
    })?;
    // A target that stops reading fails the migration, rather than hold
    // the guest paused until someone cancels.
    channel
        .set_write_timeout(Some(WRITE_TIMEOUT))
        .map_err(ProtocolError::Io)?;
    cancel.attach(&channel);
    let mut helpers = Vec::new();
    let mut sender = Sender {
        vm,
        progress,
        cancel,
        live: channel.is_live(),
        reader: channel.try_clone().ok(),
        out: BufWriter::with_capacity(WRITE_BUFFER, channel),
        began,
        paused: None,
        hash: StreamHash::default(),
        nacked: false,
        params: *params,
        logging: false,
        sent_since: (Instant::now(), 0),
        buffers: Buffers::default(),
    };
    let result = sender.run(&mut helpers);
    vm.throttle(0);
    if sender.logging {
        vm.stop_dirty_log();
    }
    let paused = sender.paused;
    // The guest goes on (or its outcome is settled) before the helper
    // sessions end: a hung helper must not keep it paused for its timeout.
    let outcome = match result {
        Ok(()) => {
            if let Some((at, _)) = paused {
                progress
                    .downtime_us
                    .store(at.elapsed().as_micros() as u64, Ordering::Relaxed);
            }
            Ok(())
        }
        Err(e) => {
            // After the seal went out, only the target's authenticated
            // refusal lets the guest run here again: it may run there.
            let resume = !matches!(e, MigrationError::OutcomeUnknown(_));
            let e = if cancel.is_cancelled() && resume {
                MigrationError::Cancelled
            } else {
                e
            };
            if let Uri::File(path) = uri {
                let _ = std::fs::remove_file(path);
            }
            if let (Some((_, true)), true) = (paused, resume) {
                if let Err(r) = vm.resume() {
                    log::error!("Cannot resume the guest after a failed migration: {r}");
                }
            }
            Err(e)
        }
    };
    for h in &mut helpers {
        let _ = h.end();
    }
    outcome
}

/// Longest the guest may stay paused before the seal goes out (a live
/// migration; then it runs again here).
pub const SWITCHOVER_LIMIT: Duration = Duration::from_secs(30);
/// How long a write may wait for the target to read.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the target may take to answer the handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the target may take, after the last frame, to verify the seal,
/// restore the state and acknowledge.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(60);

struct Sender<'a> {
    vm: &'a dyn MigratableVm,
    progress: &'a Progress,
    cancel: &'a Cancel,
    live: bool,
    reader: Option<Channel>,
    out: BufWriter<Channel>,
    began: Instant,
    /// When the main vCPUs were paused, and whether they ran before.
    paused: Option<(Instant, bool)>,
    /// Over the frames the helpers do not see.
    hash: StreamHash,
    /// The target proved it refused the seal.
    nacked: bool,
    params: Params,
    /// Dirty logging is on.
    logging: bool,
    /// For `max-bandwidth`: since when, and bytes written since.
    sent_since: (Instant, u64),
    /// Frame buffers, kept from round to round.
    buffers: Buffers,
}

/// Buffers for helper-record frames (handed to the helper threads and
/// back) and for one SharedPages frame.
#[derive(Default)]
struct Buffers {
    records: Vec<Vec<u8>>,
    plain: Vec<u8>,
}

/// How a migration goes (QMP `migrate-set-parameters`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    /// The longest pause the guest should see (QEMU's `downtime-limit`).
    pub downtime_limit: Duration,
    /// Bytes per second at most on the wire, 0 for no limit (QEMU's
    /// `max-bandwidth`).
    pub max_bandwidth: u64,
    /// Helpers that work on the migration (at most the VM's).
    pub helpers: usize,
    /// Pages per frame and per helper request (at most 256).
    pub batch: usize,
    /// Slow a guest down that dirties memory faster than it can be sent
    /// (QEMU's auto-converge capability; on here by default).
    pub auto_converge: bool,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            downtime_limit: Duration::from_millis(300),
            max_bandwidth: 0,
            helpers: crate::MAX_HELPERS,
            batch: PAGES_PER_FRAME,
            auto_converge: true,
        }
    }
}

impl Sender<'_> {
    fn frame(&mut self, kind: FrameKind, payload: &[u8]) -> Result<(), MigrationError> {
        self.cancel.check()?;
        // The guest is paused: a target that takes its time (a trickle
        // beats every per-write timeout) may not keep it so for long.
        if let Some((at, _)) = self.paused {
            if self.live && at.elapsed() > SWITCHOVER_LIMIT && kind != FrameKind::End {
                return Err(MigrationError::Peer {
                    side: Side::Target,
                    why: format!(
                        "the switchover took over {SWITCHOVER_LIMIT:?}: the target reads too slowly"
                    ),
                });
            }
        }
        self.hash.frame(kind, payload);
        self.throttle(payload.len());
        protocol::write_frame(&mut self.out, kind, payload).map_err(|e| match e {
            ProtocolError::Io(io) if protocol::timed_out(&io) => MigrationError::Peer {
                side: Side::Target,
                why: format!("it stopped reading: nothing went out for {WRITE_TIMEOUT:?}"),
            },
            e => e.into(),
        })?;
        Progress::add(
            &self.progress.transferred,
            (protocol::HEADER_SIZE + payload.len()) as u64,
        );
        Ok(())
    }

    /// Keeps the wire at `max-bandwidth` (sleeping before a frame that
    /// would go past it).
    /// Not while the guest is paused: the switchover goes at full speed.
    fn throttle(&mut self, len: usize) {
        let limit = Progress::get(&self.progress.max_bandwidth);
        if limit == 0 || self.paused.is_some() {
            return;
        }
        let (since, bytes) = &mut self.sent_since;
        *bytes += len as u64;
        let due = Duration::from_secs_f64(*bytes as f64 / limit as f64);
        if let Some(mut wait) = due.checked_sub(since.elapsed()) {
            // In slices, so that migrate_cancel is noticed.
            while !wait.is_zero() && !self.cancel.is_cancelled() {
                let slice = wait.min(Duration::from_millis(50));
                std::thread::sleep(slice);
                wait -= slice;
            }
        }
    }

    fn flush(&mut self) -> Result<(), MigrationError> {
        self.out.flush().map_err(ProtocolError::Io)?;
        Ok(())
    }

    /// The way back from the target, waiting at most `limit` per read.
    fn reader(&mut self, limit: Duration) -> Result<&mut Channel, MigrationError> {
        let reader = self.reader.as_mut().ok_or_else(|| {
            MigrationError::Vm(VmError::refused("no way to read the target's answer"))
        })?;
        reader
            .set_read_timeout(Some(limit))
            .map_err(ProtocolError::Io)?;
        Ok(reader)
    }

    /// The target's next frame within `limit`: `want`, or its error, or a
    /// sequence error.
    fn answer(&mut self, want: FrameKind, limit: Duration) -> Result<Vec<u8>, MigrationError> {
        let reader = self.reader(limit)?;
        let frame = protocol::read_frame(reader).map_err(|e| match e {
            ProtocolError::Io(io) if protocol::timed_out(&io) => MigrationError::Peer {
                side: Side::Target,
                why: format!("no {want:?} within {limit:?}"),
            },
            e => e.into(),
        })?;
        match frame {
            Some(f) if f.kind == want => Ok(f.payload),
            Some(f) if f.kind == FrameKind::Error => Err(MigrationError::Peer {
                side: Side::Target,
                why: protocol::peer_text(&f.payload),
            }),
            Some(f) => Err(MigrationError::Sequence(format!(
                "{:?} from the target where {want:?} belongs",
                f.kind
            ))),
            None => Err(MigrationError::Peer {
                side: Side::Target,
                why: "it closed the connection".into(),
            }),
        }
    }

    /// Turns a failed write into the target's own reason when it sent one
    /// before it hung up.
    fn explain(&mut self, e: MigrationError) -> MigrationError {
        if !self.live || !matches!(e, MigrationError::Protocol(ProtocolError::Io(_))) {
            return e;
        }
        let Some(reader) = self.reader.as_mut() else {
            return e;
        };
        let _ = reader.set_read_timeout(Some(std::time::Duration::from_millis(200)));
        match protocol::read_frame(reader) {
            Ok(Some(f)) if f.kind == FrameKind::Error => MigrationError::Peer {
                side: Side::Target,
                why: protocol::peer_text(&f.payload),
            },
            _ => e,
        }
    }

    fn run(&mut self, helpers: &mut Vec<HelperClient>) -> Result<(), MigrationError> {
        let result = self.stream(helpers);
        match result {
            Ok(()) => Ok(()),
            Err(e) => {
                let e = self.explain(e);
                // Tell a live target why, if the connection still works,
                // briefly: the guest waits to resume until this is done.
                let connection_broke = matches!(
                    e,
                    MigrationError::Protocol(ProtocolError::Io(_))
                        | MigrationError::Peer { .. }
                        | MigrationError::Cancelled
                );
                if self.live && !connection_broke {
                    let _ = self
                        .out
                        .get_ref()
                        .set_write_timeout(Some(Duration::from_millis(200)));
                    let msg = e.to_string();
                    let cut = msg.len().min(FrameKind::Error.max_length() as usize);
                    let _ = protocol::write_frame(
                        &mut self.out,
                        FrameKind::Error,
                        &msg.as_bytes()[..cut],
                    );
                    let _ = self.out.flush();
                }
                Err(e)
            }
        }
    }

    fn stream(&mut self, helpers: &mut Vec<HelperClient>) -> Result<(), MigrationError> {
        let vm = self.vm;
        let mode = if self.live {
            StreamMode::Live
        } else {
            StreamMode::Snapshot
        };
        *helpers = vm.helpers()?;
        let lead = helpers.first_mut().ok_or_else(|| {
            MigrationError::Vm(VmError::refused("this VM runs no migration helper"))
        })?;
        // A live target speaks first: something else at that address (a
        // QMP socket, another program) is caught before anything is sent.
        if self.live {
            protocol::read_hello(self.reader(HANDSHAKE_TIMEOUT)?)?;
        }
        protocol::write_hello(&mut self.out)?;
        self.frame(FrameKind::Config, &state::encode(&vm.config(mode))?)?;

        // The session: both helpers' nonces, or the source's only. Either
        // way the session id travels, so that a target under another key
        // says so before it decrypts anything.
        match mode {
            StreamMode::Live => {
                let nonce = lead.begin_source()?;
                self.frame(FrameKind::SessionOffer, &nonce)?;
                self.flush()?;
                let answer = self.answer(FrameKind::SessionAnswer, HANDSHAKE_TIMEOUT)?;
                let (target_nonce, target_id) = parse_answer(&answer)?;
                let id = helpers[0].complete_source(target_nonce)?;
                if id != target_id {
                    return Err(MigrationError::Mismatch(KEY_MISMATCH.into()));
                }
            }
            StreamMode::Snapshot => {
                let (nonce, id) = lead.begin_snapshot_source()?;
                let mut offer = nonce.to_vec();
                offer.extend_from_slice(&id);
                self.frame(FrameKind::SessionOffer, &offer)?;
            }
        }

        // The target takes this VM. A live migration sends rounds while the
        // guest runs (precopy); a snapshot stops it first.
        let working = self.params.helpers.clamp(1, helpers.len());
        let helpers = &mut helpers[..working];
        let ram = vm.ram_ranges();
        let total: u64 = ram.iter().map(|r| r.1).sum();
        self.progress.total.store(total, Ordering::Relaxed);
        self.progress.remaining.store(total, Ordering::Relaxed);
        let precopy = self.live;
        if precopy {
            // Set first: a start that fails half way is undone too.
            self.logging = true;
            vm.start_dirty_log()?;
        } else {
            self.pause()?;
        }
        // QEMU's setup-time: until the pages start to go.
        self.progress
            .setup_us
            .store(self.began.elapsed().as_micros() as u64, Ordering::Relaxed);
        let mut map = vm.shared_map();
        let mut generation = 1;
        self.send_map(&map)?;
        let t = Instant::now();
        self.round(
            helpers,
            &map.shared_pages().collect::<Vec<_>>(),
            &map.private_pages(&ram),
            generation,
        )?;
        log::debug!(
            "Round 0: {} shared and {} private pages in {:?} (handshake {:?})",
            Progress::get(&self.progress.shared_pages),
            Progress::get(&self.progress.private_pages),
            t.elapsed(),
            t.duration_since(self.began)
        );
        if !precopy {
            // A snapshot's guest was paused all along: every page was
            // sealed while it was.
            self.progress.downtime_private_pages.store(
                Progress::get(&self.progress.private_pages),
                Ordering::Relaxed,
            );
        }
        if precopy {
            let mut dirty = self.precopy(helpers, &mut map, &mut generation, t.elapsed())?;
            // Switchover: the main vCPUs stop, the mirror runs on, and the
            // helpers seal what is still dirty.
            self.pause()?;
            dirty.extend(vm.dirty_pages()?);
            dirty.sort_unstable();
            dirty.dedup();
            generation += 1;
            let before = Progress::get(&self.progress.private_pages);
            self.dirty_round(helpers, &mut map, &dirty, generation)?;
            self.progress.downtime_private_pages.store(
                Progress::get(&self.progress.private_pages) - before,
                Ordering::Relaxed,
            );
            vm.stop_dirty_log();
            self.logging = false;
        }

        let saved = vm.save()?;
        self.state(&saved)?;
        let sealed = helpers[0].seal_stream(&map.ranges(), self.hash.value())?;
        if self.live {
            self.progress
                .sealed
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
        self.frame(FrameKind::Seal, sealed.record.as_bytes())?;
        self.frame(FrameKind::End, &[])?;
        if !self.live {
            return self.flush();
        }
        // From here the target may have everything: what it answers
        // decides, and only an answer its helpers vouch for counts.
        let t = Instant::now();
        let outcome = self.flush().and_then(|()| self.outcome(&sealed));
        log::debug!("The target answered in {:?}", t.elapsed());
        match outcome {
            Ok(()) => Ok(()),
            Err(e @ MigrationError::Peer { .. }) if self.nacked => Err(e),
            Err(e) => Err(MigrationError::OutcomeUnknown(e.to_string())),
        }
    }

    /// Pauses the main vCPUs (the mirror runs on) and notes when.
    fn pause(&mut self) -> Result<(), MigrationError> {
        self.vm.throttle(0);
        let was_running = self.vm.pause()?;
        self.paused = Some((Instant::now(), was_running));
        Ok(())
    }

    /// Sends the shared map (the target checks plaintext against it; the
    /// last one is what the seal covers).
    fn send_map(&mut self, map: &SharedMap) -> Result<(), MigrationError> {
        let bytes: Vec<u8> = map
            .ranges()
            .iter()
            .flat_map(|r| r.as_bytes().to_vec())
            .collect();
        self.frame(FrameKind::SharedMap, &bytes)
    }

    /// Rounds of dirty pages while the guest runs, until the policy says
    /// switch over; returns the pages dirty at that moment.
    fn precopy(
        &mut self,
        helpers: &mut [HelperClient],
        map: &mut SharedMap,
        generation: &mut u64,
        first_round: Duration,
    ) -> Result<Vec<u64>, MigrationError> {
        // The downtime limit is read each round (the operator may change it).
        let mut limits = Limits {
            auto_converge: self.params.auto_converge,
            ..Limits::default()
        };
        let mut low = LowWater::default();
        let mut throttle = 0u8;
        let mut previous = None;
        let total = Progress::get(&self.progress.total);
        let mut round_bytes = Progress::get(&self.progress.transferred);
        let mut round_time = first_round;
        loop {
            self.cancel.check()?;
            limits.downtime_limit =
                Duration::from_millis(Progress::get(&self.progress.downtime_limit_ms));
            let harvest = Instant::now();
            let dirty = self.vm.dirty_pages()?;
            let harvest = harvest.elapsed();
            let bandwidth = round_bytes as f64 / round_time.as_secs_f64().max(1e-6);
            let dirty_bytes = dirty.len() as u64 * PAGE as u64;
            let stats = RoundStats {
                rounds: *generation as u32,
                dirty_bytes,
                bandwidth,
                elapsed: self.began.elapsed(),
                rounds_since_low: low.record(dirty_bytes),
                throttle,
            };
            let p = self.progress;
            p.remaining.store(dirty_bytes, Ordering::Relaxed);
            p.rounds.store(*generation, Ordering::Relaxed);
            p.dirty_rate.store(
                (dirty.len() as f64 / round_time.as_secs_f64().max(1e-6)) as u64,
                Ordering::Relaxed,
            );
            p.expected_downtime_us.store(
                policy::expected_downtime(dirty_bytes, bandwidth)
                    .as_micros()
                    .min(u128::from(u64::MAX)) as u64,
                Ordering::Relaxed,
            );
            let decision = policy::decide(&stats, &limits);
            log::debug!(
                "Round {generation}: {} pages dirty (harvested in {harvest:?}), {:.0} MB/s, \
                 throttle {throttle}%: {decision:?}",
                dirty.len(),
                bandwidth / 1e6
            );
            if let Decision::Switchover(_) = decision {
                return Ok(dirty);
            }
            let next = policy::next_throttle(&policy::RoundStats {
                rounds_since_low: u32::from(policy::too_slow(dirty_bytes, previous, total)),
                ..stats
            });
            previous = Some(dirty_bytes);
            if next != throttle && self.params.auto_converge {
                throttle = next;
                self.vm.throttle(throttle);
                p.throttle.store(u64::from(throttle), Ordering::Relaxed);
            }
            let (before, t) = (Progress::get(&p.transferred), Instant::now());
            *generation += 1;
            self.dirty_round(helpers, map, &dirty, *generation)?;
            // Timed to what left the buffer, not what entered it.
            self.flush()?;
            round_bytes = Progress::get(&p.transferred) - before;
            round_time = t.elapsed();
        }
    }

    /// Sends `dirty` pages as the current map has them: shared ones as
    /// plaintext, the others through the helpers at `generation`.
    fn dirty_round(
        &mut self,
        helpers: &mut [HelperClient],
        map: &mut SharedMap,
        dirty: &[u64],
        generation: u64,
    ) -> Result<(), MigrationError> {
        let now = self.vm.shared_map();
        if now != *map {
            self.send_map(&now)?;
            *map = now;
        }
        let (shared, private): (Vec<u64>, Vec<u64>) =
            dirty.iter().partition(|&&gpa| map.is_shared(gpa));
        self.round(helpers, &shared, &private, generation)
    }

    /// The target's authenticated answer: Ok on its ack, its reason on its
    /// nack (then `self.nacked`), anything else an error.
    fn outcome(&mut self, sealed: &Sealed) -> Result<(), MigrationError> {
        let frame = protocol::read_frame(self.reader(ACK_TIMEOUT)?)?.ok_or_else(|| {
            MigrationError::Peer {
                side: Side::Target,
                why: "it closed the connection without an answer".into(),
            }
        })?;
        let token: Option<[u8; 16]> = frame
            .payload
            .get(..16)
            .map(|t| t.try_into().expect("16 bytes"));
        match (frame.kind, token) {
            (FrameKind::Ack, Some(t)) if token_matches(&t, &sealed.ack_commitment) => Ok(()),
            (FrameKind::Nack, Some(t)) if token_matches(&t, &sealed.nack_commitment) => {
                self.nacked = true;
                Err(MigrationError::Peer {
                    side: Side::Target,
                    why: protocol::peer_text(&frame.payload[16..]),
                })
            }
            (FrameKind::Error, _) => Err(MigrationError::Peer {
                side: Side::Target,
                why: protocol::peer_text(&frame.payload),
            }),
            (kind, _) => Err(MigrationError::Sequence(format!(
                "{kind:?} from the target whose token its helpers did not make"
            ))),
        }
    }

    fn state(&mut self, saved: &SavedState) -> Result<(), MigrationError> {
        self.frame(FrameKind::DeviceState, &saved.devices)?;
        self.frame(FrameKind::VmState, &state::encode(&saved.vm)?)?;
        for vcpu in &saved.vcpus {
            self.frame(FrameKind::VcpuState, &state::encode(vcpu)?)?;
        }
        Ok(())
    }

    /// Shared pages from this thread, private pages from one thread per
    /// helper, frames written as they come.
    fn round(
        &mut self,
        helpers: &mut [HelperClient],
        shared: &[u64],
        private: &[u64],
        generation: u64,
    ) -> Result<(), MigrationError> {
        let batch = self.params.batch.clamp(1, PAGES_PER_FRAME);
        let per_helper = private.len().div_ceil(helpers.len()).max(1);
        // The frame buffers live as long as the migration: made (and
        // touched) for the first round, lent to every later one.
        let mut buffers = std::mem::take(&mut self.buffers);
        if buffers.plain.is_empty() {
            buffers = Buffers {
                records: buffers_for(2 * helpers.len() + 2),
                plain: vec![0u8; PAGES_PER_FRAME * SHARED_PAGE_STRIDE],
            };
        }
        let pool = Mutex::new(std::mem::take(&mut buffers.records));
        let mut buf = std::mem::take(&mut buffers.plain);
        let cancel = self.cancel;
        let result = std::thread::scope(|scope| {
            let (tx, rx) = sync_channel::<Result<Vec<u8>, HelperError>>(2 * helpers.len());
            for (client, pages) in helpers.iter_mut().zip(private.chunks(per_helper)) {
                let (tx, pool) = (tx.clone(), &pool);
                scope.spawn(move || {
                    for chunk in pages.chunks(batch) {
                        if cancel.is_cancelled() {
                            return;
                        }
                        let mut out = pool.lock().expect("pool lock poisoned").pop();
                        let out = out.get_or_insert_with(|| {
                            Vec::with_capacity(PAGES_PER_FRAME * RECORD_STRIDE)
                        });
                        out.clear();
                        let list: Vec<(u64, u64)> =
                            chunk.iter().map(|&g| (g, generation)).collect();
                        let result = client.encrypt(&list, out).map(|()| std::mem::take(out));
                        let failed = result.is_err();
                        if tx.send(result).is_err() || failed {
                            return;
                        }
                    }
                });
            }
            drop(tx);
            // Helper frames first, as they come, so the helpers never wait
            // on the socket; shared pages whenever no helper frame is ready.
            let mut plain = shared.chunks(batch);
            loop {
                let next = match rx.try_recv() {
                    Ok(records) => Some(records),
                    Err(TryRecvError::Empty) => match plain.next() {
                        Some(batch) => {
                            self.shared_frame(batch, &mut buf)?;
                            continue;
                        }
                        None => rx.recv().ok(),
                    },
                    Err(TryRecvError::Disconnected) => None,
                };
                let Some(records) = next else { break };
                let records = records?;
                self.frame(FrameKind::HelperRecords, &records)?;
                let pages = (records.len() / RECORD_STRIDE) as u64;
                Progress::add(&self.progress.private_pages, pages);
                Progress::sub(&self.progress.remaining, pages * PAGE as u64);
                pool.lock().expect("pool lock poisoned").push(records);
            }
            for batch in plain {
                self.shared_frame(batch, &mut buf)?;
            }
            Ok(())
        });
        self.buffers = Buffers {
            records: pool.into_inner().expect("pool lock poisoned"),
            plain: buf,
        };
        result
    }

    /// One SharedPages frame of `batch` (at most [`PAGES_PER_FRAME`]), of
    /// the pages the live map still shares once they are copied. The guest
    /// makes a page private (the VMM's map changes) before it writes
    /// anything private into it, so a page still shared after its copy held
    /// nothing private when copied; one made private since the round began
    /// is dropped here and goes in a later round, through the helpers (its
    /// conversion makes it dirty).
    ///
    /// A page can also turn private and back while it is copied: if any
    /// conversion came during the copy, the batch is copied again (up to
    /// [`COPY_TRIES`] times; for a guest that converts without pause the
    /// check after the copy stands alone).
    fn shared_frame(&mut self, batch: &[u64], buf: &mut [u8]) -> Result<(), MigrationError> {
        let mut live = Vec::with_capacity(batch.len());
        for _ in 0..COPY_TRIES {
            let before = self.vm.conversions();
            for (i, &gpa) in batch.iter().enumerate() {
                let at = i * SHARED_PAGE_STRIDE;
                buf[at..at + 8].copy_from_slice(&gpa.to_le_bytes());
                read_page(
                    self.vm.ram(),
                    gpa,
                    &mut buf[at + 8..at + SHARED_PAGE_STRIDE],
                )?;
            }
            live.clear();
            live.extend_from_slice(batch);
            self.vm.keep_shared(&mut live);
            if self.vm.conversions() == before {
                break;
            }
        }
        let n = keep_pages(batch, &live, buf);
        if n < batch.len() {
            log::debug!(
                "{} of {} shared pages went private during the round: sent later",
                batch.len() - n,
                batch.len()
            );
        }
        if n == 0 {
            return Ok(());
        }
        self.frame(FrameKind::SharedPages, &buf[..n * SHARED_PAGE_STRIDE])?;
        Progress::add(&self.progress.shared_pages, n as u64);
        Progress::sub(&self.progress.remaining, (n * PAGE) as u64);
        Ok(())
    }
}

/// How often a batch of shared pages is copied again when the guest
/// converted pages during its copy.
const COPY_TRIES: usize = 4;

/// Moves the entries of `buf` (one per page of `batch`, in its order) whose
/// page is in `live` (a subsequence of `batch`) to its front; how many.
fn keep_pages(batch: &[u64], live: &[u64], buf: &mut [u8]) -> usize {
    let mut keep = live.iter().peekable();
    let mut n = 0;
    for (i, gpa) in batch.iter().enumerate() {
        if keep.peek() == Some(&gpa) {
            keep.next();
            if i != n {
                buf.copy_within(
                    i * SHARED_PAGE_STRIDE..(i + 1) * SHARED_PAGE_STRIDE,
                    n * SHARED_PAGE_STRIDE,
                );
            }
            n += 1;
        }
    }
    n
}

/// Copies one guest page out.
pub(crate) fn read_page(
    ram: &vm_memory::GuestMemoryMmap,
    gpa: u64,
    dst: &mut [u8],
) -> Result<(), MigrationError> {
    use vm_memory::{Bytes, GuestAddress};
    ram.read_slice(dst, GuestAddress(gpa))
        .map_err(|e| VmError::new(format!("Cannot read guest page {gpa:#x}"), e).into())
}

/// A SessionAnswer's payload: the target's nonce and session id.
pub(crate) fn parse_answer(payload: &[u8]) -> Result<([u8; 32], [u8; 16]), MigrationError> {
    if payload.len() != 48 {
        return Err(MigrationError::Sequence(format!(
            "a session answer of {} bytes",
            payload.len()
        )));
    }
    let nonce = payload[..32].try_into().expect("32 bytes");
    let id = payload[32..].try_into().expect("16 bytes");
    Ok((nonce, id))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn pages_made_private_during_a_round_leave_the_frame() {
        let batch = [0x1000u64, 0x2000, 0x3000, 0x4000];
        let mut buf = vec![0u8; batch.len() * SHARED_PAGE_STRIDE];
        for (i, entry) in buf.chunks_mut(SHARED_PAGE_STRIDE).enumerate() {
            entry.fill(i as u8 + 1);
        }
        let original = buf.clone();
        // All still shared: nothing moves.
        assert_eq!(keep_pages(&batch, &batch, &mut buf), 4);
        assert_eq!(buf, original);
        // The first and third went private.
        let n = keep_pages(&batch, &[0x2000, 0x4000], &mut buf);
        assert_eq!(n, 2);
        assert!(buf[..SHARED_PAGE_STRIDE].iter().all(|&b| b == 2));
        assert!(buf[SHARED_PAGE_STRIDE..2 * SHARED_PAGE_STRIDE]
            .iter()
            .all(|&b| b == 4));
        // None left.
        let mut buf = original.clone();
        assert_eq!(keep_pages(&batch, &[], &mut buf), 0);
    }
}
