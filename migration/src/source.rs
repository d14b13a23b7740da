//! The sending side: a paused VM leaves through a [`Channel`].
//!
//! [`send`] pauses the main vCPUs (the mirror vCPUs run on, so the helpers
//! answer), agrees a session with the target's helpers (or, for a
//! snapshot, with none), sends the shared map, the shared pages as
//! plaintext and every other page as the helpers sealed it, then device,
//! VM and vCPU state and the helpers' seal, and waits for the target's
//! acknowledgement. Frame order: `protocol`'s sequence diagram.
//!
//! Private pages are encrypted by every helper at once, one thread per
//! helper client, while this thread writes: the socket never waits on a
//! page it could have had. Any failure, or [`Cancel::cancel`], before the
//! acknowledgement ends the helper sessions and resumes the guest if it was
//! running; a partly written snapshot file is removed.

use std::io::{BufWriter, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::sync_channel;
use std::sync::Mutex;
use std::time::Instant;

use zerocopy::IntoBytes;

use crate::helper::{HelperClient, HelperError, RECORD_STRIDE};
use crate::protocol::{self, FrameKind, ProtocolError};
use crate::state::{self, StreamMode};
use crate::transport::{self, Channel, Uri};
use crate::{MigratableVm, MigrationError, Progress, SavedState};

/// Pages per page frame (the frame kinds' bound).
pub const PAGES_PER_FRAME: usize = 256;
/// Bytes of a shared page in a SharedPages frame: gpa (u64 LE) + page.
pub const SHARED_PAGE_STRIDE: usize = 8 + PAGE;
/// The generation every page of a stopped migration carries.
pub const STOPPED_GENERATION: u64 = 1;
/// Bytes buffered before the socket is written.
const WRITE_BUFFER: usize = 1 << 20;
const PAGE: usize = 4096;

/// Cancels a migration from another thread.
#[derive(Default)]
pub struct Cancel {
    flag: AtomicBool,
    channel: Mutex<Option<Channel>>,
}

impl Cancel {
    /// Asks the migration to stop: it notices between frames, and a
    /// connection it waits on is shut down at once.
    pub fn cancel(&self) {
        self.flag.store(true, Ordering::SeqCst);
        if let Some(c) = self.channel.lock().expect("cancel lock poisoned").as_ref() {
            c.shutdown();
        }
    }

    /// Whether [`Cancel::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    fn attach(&self, channel: &Channel) {
        if let Ok(c) = channel.try_clone() {
            *self.channel.lock().expect("cancel lock poisoned") = Some(c);
        }
        if self.is_cancelled() {
            channel.shutdown();
        }
    }

    fn check(&self) -> Result<(), MigrationError> {
        if self.is_cancelled() {
            Err(MigrationError::Cancelled)
        } else {
            Ok(())
        }
    }
}

/// Migrates `vm` to `uri`; on success the guest stays paused here.
pub fn send(
    vm: &dyn MigratableVm,
    uri: &Uri,
    progress: &Progress,
    cancel: &Cancel,
) -> Result<(), MigrationError> {
    let began = Instant::now();
    let channel = transport::connect(uri)?;
    cancel.attach(&channel);
    let was_running = vm.pause().map_err(MigrationError::Vm)?;
    let paused = Instant::now();
    Progress::add(&progress.setup_us, began.elapsed().as_micros() as u64);
    let mut helpers = Vec::new();
    let result = Sender {
        vm,
        progress,
        cancel,
        live: channel.is_live(),
        reader: channel.try_clone().ok(),
        out: BufWriter::with_capacity(WRITE_BUFFER, channel),
    }
    .run(&mut helpers);
    for h in &mut helpers {
        let _ = h.end();
    }
    match result {
        Ok(()) => {
            progress
                .downtime_us
                .store(paused.elapsed().as_micros() as u64, Ordering::Relaxed);
            Ok(())
        }
        Err(e) => {
            let e = if cancel.is_cancelled() {
                MigrationError::Cancelled
            } else {
                e
            };
            if let Uri::File(path) = uri {
                let _ = std::fs::remove_file(path);
            }
            if was_running {
                if let Err(r) = vm.resume() {
                    log::error!("Cannot resume the guest after a failed migration: {r}");
                }
            }
            Err(e)
        }
    }
}

struct Sender<'a> {
    vm: &'a dyn MigratableVm,
    progress: &'a Progress,
    cancel: &'a Cancel,
    live: bool,
    reader: Option<Channel>,
    out: BufWriter<Channel>,
}

impl Sender<'_> {
    fn frame(&mut self, kind: FrameKind, payload: &[u8]) -> Result<(), MigrationError> {
        self.cancel.check()?;
        protocol::write_frame(&mut self.out, kind, payload)?;
        Progress::add(
            &self.progress.transferred,
            (protocol::HEADER_SIZE + payload.len()) as u64,
        );
        Ok(())
    }

    fn flush(&mut self) -> Result<(), MigrationError> {
        self.out.flush().map_err(ProtocolError::Io)?;
        Ok(())
    }

    /// The target's next frame: `want`, or its error, or a sequence error.
    fn answer(&mut self, want: FrameKind) -> Result<Vec<u8>, MigrationError> {
        let reader = self
            .reader
            .as_mut()
            .ok_or_else(|| MigrationError::Vm("no way to read the target's answer".into()))?;
        match protocol::read_frame(reader)? {
            Some(f) if f.kind == want => Ok(f.payload),
            Some(f) if f.kind == FrameKind::Error => Err(MigrationError::Peer {
                side: "target",
                why: String::from_utf8_lossy(&f.payload).into_owned(),
            }),
            Some(f) => Err(MigrationError::Sequence(format!(
                "{:?} from the target where {want:?} belongs",
                f.kind
            ))),
            None => Err(MigrationError::Peer {
                side: "target",
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
                side: "target",
                why: String::from_utf8_lossy(&f.payload).into_owned(),
            },
            _ => e,
        }
    }

    fn run(mut self, helpers: &mut Vec<HelperClient>) -> Result<(), MigrationError> {
        let result = self.stream(helpers);
        match result {
            Ok(()) => Ok(()),
            Err(e) => {
                let e = self.explain(e);
                // Tell a live target why, if the connection still works.
                if self.live && !matches!(e, MigrationError::Peer { .. }) {
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
        *helpers = vm.helpers().map_err(MigrationError::Vm)?;
        let lead = helpers
            .first_mut()
            .ok_or_else(|| MigrationError::Vm("this VM runs no migration helper".into()))?;
        protocol::write_hello(&mut self.out)?;
        self.frame(FrameKind::Config, &state::encode(&vm.config(mode))?)?;

        // The session: both helpers' nonces, or the source's only.
        match mode {
            StreamMode::Live => {
                let nonce = lead.begin_source()?;
                self.frame(FrameKind::SessionOffer, &nonce)?;
                self.flush()?;
                let answer = self.answer(FrameKind::SessionAnswer)?;
                let (target_nonce, target_id) = parse_answer(&answer)?;
                let id = helpers[0].complete_source(target_nonce)?;
                if id != target_id {
                    return Err(MigrationError::Mismatch(
                        "its migration helpers derived another session key: the two VMs do not \
                         share one transport key and one VM identity (--transport-key-file, --uuid)"
                            .into(),
                    ));
                }
            }
            StreamMode::Snapshot => {
                let nonce = lead.begin_snapshot_source()?;
                self.frame(FrameKind::SessionOffer, &nonce)?;
            }
        }

        let map = vm.shared_map();
        let shared = map.ranges();
        let bytes: Vec<u8> = shared.iter().flat_map(|r| r.as_bytes().to_vec()).collect();
        self.frame(FrameKind::SharedMap, &bytes)?;
        let ram = vm.ram_ranges();
        let total: u64 = ram.iter().map(|r| r.1).sum();
        self.progress
            .total
            .store(total, std::sync::atomic::Ordering::Relaxed);
        self.progress.remaining.store(total, Ordering::Relaxed);
        let private = map.private_pages(&ram);
        self.pages(helpers, &shared_pages(&map), &private)?;

        let saved = vm.save().map_err(MigrationError::Vm)?;
        self.state(&saved)?;
        let seal = helpers[0].seal(&shared)?;
        self.frame(FrameKind::Seal, seal.as_bytes())?;
        self.frame(FrameKind::End, &[])?;
        self.flush()?;
        if self.live {
            self.answer(FrameKind::Ack)?;
        }
        Ok(())
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
    fn pages(
        &mut self,
        helpers: &mut [HelperClient],
        shared: &[u64],
        private: &[u64],
    ) -> Result<(), MigrationError> {
        let per_helper = private.len().div_ceil(helpers.len()).max(1);
        let pool: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());
        let cancel = self.cancel;
        std::thread::scope(|scope| {
            let (tx, rx) = sync_channel::<Result<Vec<u8>, HelperError>>(2 * helpers.len());
            for (client, pages) in helpers.iter_mut().zip(private.chunks(per_helper)) {
                let (tx, pool) = (tx.clone(), &pool);
                scope.spawn(move || {
                    for batch in pages.chunks(PAGES_PER_FRAME) {
                        if cancel.is_cancelled() {
                            return;
                        }
                        let mut out = pool.lock().expect("pool lock poisoned").pop();
                        let out = out.get_or_insert_with(|| {
                            Vec::with_capacity(PAGES_PER_FRAME * RECORD_STRIDE)
                        });
                        out.clear();
                        let list: Vec<(u64, u64)> =
                            batch.iter().map(|&g| (g, STOPPED_GENERATION)).collect();
                        let result = client.encrypt(&list, out).map(|()| std::mem::take(out));
                        let failed = result.is_err();
                        if tx.send(result).is_err() || failed {
                            return;
                        }
                    }
                });
            }
            drop(tx);
            self.shared_pages(shared)?;
            for records in rx {
                let records = records?;
                self.frame(FrameKind::HelperRecords, &records)?;
                let pages = (records.len() / RECORD_STRIDE) as u64;
                Progress::add(&self.progress.private_pages, pages);
                self.progress
                    .remaining
                    .fetch_sub(pages * PAGE as u64, Ordering::Relaxed);
                pool.lock().expect("pool lock poisoned").push(records);
            }
            Ok(())
        })
    }

    fn shared_pages(&mut self, pages: &[u64]) -> Result<(), MigrationError> {
        let mut buf = vec![0u8; PAGES_PER_FRAME * SHARED_PAGE_STRIDE];
        for batch in pages.chunks(PAGES_PER_FRAME) {
            for (i, &gpa) in batch.iter().enumerate() {
                let at = i * SHARED_PAGE_STRIDE;
                buf[at..at + 8].copy_from_slice(&gpa.to_le_bytes());
                read_page(
                    self.vm.ram(),
                    gpa,
                    &mut buf[at + 8..at + SHARED_PAGE_STRIDE],
                )?;
            }
            self.frame(
                FrameKind::SharedPages,
                &buf[..batch.len() * SHARED_PAGE_STRIDE],
            )?;
            Progress::add(&self.progress.shared_pages, batch.len() as u64);
            self.progress
                .remaining
                .fetch_sub((batch.len() * PAGE) as u64, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// The GPAs of every shared page.
fn shared_pages(map: &crate::ranges::SharedMap) -> Vec<u64> {
    map.ranges()
        .iter()
        .flat_map(|r| (r.start..r.end).step_by(PAGE))
        .collect()
}

/// Copies one guest page out.
pub(crate) fn read_page(
    ram: &vm_memory::GuestMemoryMmap,
    gpa: u64,
    dst: &mut [u8],
) -> Result<(), MigrationError> {
    use vm_memory::{Bytes, GuestAddress};
    ram.read_slice(dst, GuestAddress(gpa))
        .map_err(|e| MigrationError::Vm(format!("Cannot read guest page {gpa:#x}: {e}")))
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
