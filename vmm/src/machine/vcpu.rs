//! vCPU threads driven by messages.
//!
//! Each vCPU runs on its own thread, which owns the `VcpuFd` and a small
//! state machine: **Paused** (waits for an event), **Running** (KVM_RUN loop,
//! polls for events between exits) and **Stopped** (the guest or KVM ended
//! this vCPU; it answers events but never runs again). A [`VcpuHandle`]
//! sends [`VcpuEvent`]s and waits, with a timeout, for the [`VcpuResponse`].
//!
//! ```text
//! handle                         vCPU thread (Running)
//!  | send(Pause)                   | ... in KVM_RUN
//!  | kick: SIGRTMIN --------------> | handler sets kvm_run.immediate_exit
//!  |                               | KVM_RUN returns EINTR
//!  |                               | sees Pause; drains: KVM_RUN with
//!  |                               |   immediate_exit=1 completes any I/O
//!  | <------------- Paused         | state Paused, blocks on the channel
//! ```
//!
//! Main and mirror vCPUs are separate [`VcpuGroup`]s, so migration can pause
//! the guest's vCPUs while the mirror vCPU keeps running the helper.

use std::cell::Cell;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{kvm_msr_entry, kvm_run, Msrs};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use cgsvmm_devices::Bus;
use cgsvmm_migration::state::{Fpu, VcpuRecord};

use crate::machine::exit::{ExitHandle, ExitReason, VcpuFault};
use crate::x86::msr::index::IA32_TSC;
use crate::x86::tsc::{self, ClockMoment, TscRestore};

/// How long a handle waits for a vCPU to answer an event. Pausing takes
/// 20 µs to 3 ms on the lab host; this is the bound for a vCPU stuck in a
/// device, not the expected latency.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Which group a vCPU belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuRole {
    /// A vCPU the guest sees.
    Main,
    /// A vCPU of the mirror VM (runs the helper; the guest never sees it).
    Mirror,
}

impl VcpuRole {
    fn name(self) -> &'static str {
        match self {
            VcpuRole::Main => "vcpu",
            VcpuRole::Mirror => "mirror",
        }
    }
}

/// What a handle asks of a vCPU thread.
#[derive(Debug)]
pub enum VcpuEvent {
    /// Stop running guest code (after draining any pending I/O).
    Pause,
    /// Run guest code.
    Resume,
    /// Report the architectural state (only while paused), its TSC as of
    /// the moment the VM's KVM clock was read.
    SaveState(ClockMoment),
    /// Take this architectural state (only while paused; an incoming VM's
    /// vCPUs before they ever run), its TSC against the VM's KVM clock just
    /// set to the saved value.
    RestoreState(Box<VcpuRecord>, ClockMoment),
    /// End the thread.
    Finish,
}

/// A vCPU thread's answer.
#[derive(Debug)]
pub enum VcpuResponse {
    /// The thread started; its kernel thread ID.
    Started(i32),
    /// The vCPU is paused.
    Paused,
    /// The vCPU is running.
    Resumed,
    /// The state, as asked.
    SavedState(Box<VcpuRecord>),
    /// The state was taken.
    Restored,
    /// The thread is ending.
    Finished,
    /// The event is not allowed in this state.
    NotAllowed(String),
    /// A KVM call failed while serving the event.
    Error(String),
}

/// Errors of driving a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// The thread could not be spawned.
    #[error("Cannot spawn vCPU thread: {0}")]
    Spawn(std::io::Error),
    /// The vCPU did not answer in time.
    #[error("{0} did not answer within {1:?}")]
    Timeout(String, Duration),
    /// The thread is gone.
    #[error("{0} thread has exited")]
    Gone(String),
    /// Kicking failed.
    #[error("Cannot signal {0}: {1}")]
    Kick(String, vmm_sys_util::errno::Error),
    /// The vCPU refused or failed the request.
    #[error("{0}: {1}")]
    Refused(String, String),
    /// Registering the kick signal handler failed.
    #[error("Cannot install the vCPU kick handler: {0}")]
    Signal(vmm_sys_util::errno::Error),
    /// An unexpected answer.
    #[error("{0} answered {1}")]
    Unexpected(String, String),
    /// The thread could not be pinned.
    #[error("Cannot pin {0} to CPU {1}: {2}")]
    Affinity(String, usize, std::io::Error),
}

/// Restricts thread `tid` (0: the calling thread) to CPU `cpu`.
pub fn pin_thread(tid: i32, cpu: usize) -> std::io::Result<()> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: cpu_set_t is plain data; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` is below CPU_SETSIZE (checked), inside `set`.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size passed; the kernel only
    // reads it.
    let rc = unsafe { libc::sched_setaffinity(tid, std::mem::size_of_val(&set), &set) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

thread_local! {
    /// This thread's `kvm_run` page, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer is this thread's mapped kvm_run page; it is set
        // after the VcpuFd exists and cleared before the VcpuFd is dropped.
        // A single byte store is async-signal-safe.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// Installs the SIGRTMIN handler that kicks a vCPU out of KVM_RUN (once).
pub fn install_kick_handler() -> Result<(), VcpuError> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = register_signal_handler(SIGRTMIN(), handle_kick).map_err(VcpuError::Signal)
    });
    result
}

/// The MSR indices worth saving: KVM's list.
pub fn msr_index_list(kvm: &kvm_ioctls::Kvm) -> Vec<u32> {
    kvm.get_msr_index_list()
        .map(|l| l.as_slice().to_vec())
        .unwrap_or_default()
}

/// A vCPU before its thread starts.
pub struct Vcpu {
    fd: VcpuFd,
    index: usize,
    role: VcpuRole,
    bus: Arc<Bus>,
    exit: ExitHandle,
    msr_indices: Arc<Vec<u32>>,
    on_fault: Option<FaultSink>,
    map_gpa: Option<MapGpa>,
    /// What the VM's memslots map, kept for as long as this vCPU's thread
    /// lives (one that never answers its Finish is left running, see
    /// [`VcpuHandle`]'s drop): while a thread can enter the guest, the host
    /// memory behind the guest stays mapped.
    _mappings: Option<Mappings>,
}

/// Whatever owns the host mappings behind a VM's memslots.
pub type Mappings = Arc<dyn std::any::Any + Send + Sync>;

/// Converts guest pages between private and shared (gpa, pages, shared);
/// whether it was taken.
pub type MapGpa = Arc<dyn Fn(u64, u64, bool) -> bool + Send + Sync>;

/// Where a vCPU reports its own fatal exit instead of stopping the VM.
pub type FaultSink = Arc<dyn Fn(usize, String) + Send + Sync>;

enum State {
    /// Waits for an event.
    Paused,
    /// Runs guest code between events.
    Running,
    /// The guest or KVM ended this vCPU (why); answers events, never runs.
    Stopped(String),
    /// Asked to finish: the thread ends.
    Finished,
}

struct Thread {
    vcpu: Vcpu,
    events: Receiver<VcpuEvent>,
    responses: Sender<VcpuResponse>,
}

impl Vcpu {
    /// A vCPU whose port I/O goes to `bus` and whose fatal exits go to `exit`.
    pub fn new(
        fd: VcpuFd,
        index: usize,
        role: VcpuRole,
        bus: Arc<Bus>,
        exit: ExitHandle,
        msr_indices: Arc<Vec<u32>>,
    ) -> Self {
        Self {
            fd,
            index,
            role,
            bus,
            exit,
            msr_indices,
            on_fault: None,
            map_gpa: None,
            _mappings: None,
        }
    }

    /// Keeps `mappings` (the memory behind the VM's memslots) alive for as
    /// long as this vCPU's thread.
    pub fn with_mappings(mut self, mappings: Mappings) -> Self {
        self._mappings = Some(mappings);
        self
    }

    /// Reports this vCPU's fatal exits to `sink` rather than stopping the
    /// VM (mirror vCPUs: a broken helper must not take the guest down).
    pub fn with_fault_sink(mut self, sink: FaultSink) -> Self {
        self.on_fault = Some(sink);
        self
    }

    /// Answers the guest's KVM_HC_MAP_GPA_RANGE hypercalls with `map`.
    pub fn with_map_gpa(mut self, map: MapGpa) -> Self {
        self.map_gpa = Some(map);
        self
    }

    /// The vCPU's fd (for boot-time setup before the thread starts).
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    fn label(&self) -> String {
        format!("{} {}", self.role.name(), self.index)
    }

    /// Starts the thread, paused; resume it through the handle.
    pub fn start(self) -> Result<VcpuHandle, VcpuError> {
        install_kick_handler()?;
        let (event_tx, event_rx) = mpsc::channel();
        let (resp_tx, resp_rx) = mpsc::channel();
        let (index, role, label) = (self.index, self.role, self.label());
        let thread = std::thread::Builder::new()
            .name(format!("{}{}", role.name(), index))
            .spawn(move || {
                Thread {
                    vcpu: self,
                    events: event_rx,
                    responses: resp_tx,
                }
                .run()
            })
            .map_err(VcpuError::Spawn)?;
        let mut handle = VcpuHandle {
            index,
            label,
            events: event_tx,
            responses: resp_rx,
            thread: Some(thread),
            tid: 0,
        };
        match handle.wait(RESPONSE_TIMEOUT)? {
            VcpuResponse::Started(tid) => handle.tid = tid,
            other => {
                return Err(VcpuError::Unexpected(
                    handle.label.clone(),
                    format!("{other:?}"),
                ))
            }
        }
        Ok(handle)
    }
}

impl Thread {
    fn reply(&self, r: VcpuResponse) {
        // The handle may be gone during teardown; nothing to tell then.
        let _ = self.responses.send(r);
    }

    fn run(mut self) {
        KVM_RUN.with(|p| p.set(self.vcpu.fd.get_kvm_run() as *mut kvm_run));
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::syscall(libc::SYS_gettid) } as i32;
        self.reply(VcpuResponse::Started(tid));
        let mut state = State::Paused;
        loop {
            state = match state {
                State::Paused | State::Stopped(_) => match self.events.recv() {
                    Ok(event) => self.on_event_stopped(event, state),
                    Err(_) => break,
                },
                State::Running => self.run_until_event(),
                State::Finished => break,
            };
        }
        KVM_RUN.with(|p| p.set(std::ptr::null_mut()));
        self.reply(VcpuResponse::Finished);
    }

    /// Handles an event while not running.
    fn on_event_stopped(&mut self, event: VcpuEvent, state: State) -> State {
        match (event, state) {
            (VcpuEvent::Finish, _) => State::Finished,
            (VcpuEvent::Pause, s) => {
                self.reply(VcpuResponse::Paused);
                s
            }
            (VcpuEvent::Resume, State::Stopped(why)) => {
                self.reply(VcpuResponse::NotAllowed(format!(
                    "the vCPU has stopped: {why}"
                )));
                State::Stopped(why)
            }
            (VcpuEvent::Resume, _) => {
                self.reply(VcpuResponse::Resumed);
                State::Running
            }
            (VcpuEvent::SaveState(clock_read), s) => {
                let r = match self.save_state(clock_read) {
                    Ok(st) => VcpuResponse::SavedState(Box::new(st)),
                    Err(e) => VcpuResponse::Error(e),
                };
                self.reply(r);
                s
            }
            (VcpuEvent::RestoreState(..), State::Stopped(why)) => {
                self.reply(VcpuResponse::NotAllowed(format!(
                    "the vCPU has stopped: {why}"
                )));
                State::Stopped(why)
            }
            (VcpuEvent::RestoreState(record, clock_set), s) => {
                self.reply(match self.restore_state(&record, clock_set) {
                    Ok(()) => VcpuResponse::Restored,
                    Err(e) => VcpuResponse::Error(e),
                });
                s
            }
        }
    }

    /// Runs guest code until an event or a fatal exit changes the state.
    fn run_until_event(&mut self) -> State {
        loop {
            // Clear a stale kick first, then look for events: an event is sent
            // before its kick, so either we see it here or KVM_RUN returns
            // at once with EINTR.
            self.vcpu.fd.set_kvm_immediate_exit(0);
            match self.events.try_recv() {
                Ok(VcpuEvent::Resume) => self.reply(VcpuResponse::Resumed),
                Ok(VcpuEvent::Pause) => {
                    self.drain();
                    self.reply(VcpuResponse::Paused);
                    return State::Paused;
                }
                Ok(VcpuEvent::SaveState(_) | VcpuEvent::RestoreState(..)) => {
                    self.reply(VcpuResponse::NotAllowed(
                        "saving or restoring state needs a paused vCPU".into(),
                    ));
                }
                Ok(VcpuEvent::Finish) | Err(TryRecvError::Disconnected) => {
                    self.drain();
                    return State::Finished;
                }
                Err(TryRecvError::Empty) => {}
            }
            if let Some(why) = self.run_once() {
                log::error!("{}: {why}", self.vcpu.label());
                return State::Stopped(why);
            }
        }
    }

    /// Completes a pending I/O or MMIO exit without running more guest code
    /// (KVM API: re-enter with immediate_exit set).
    fn drain(&mut self) {
        self.vcpu.fd.set_kvm_immediate_exit(1);
        let label = self.vcpu.label();
        match self.vcpu.fd.run() {
            Err(e) if e.errno() == libc::EINTR => {}
            other => log::debug!("{label}: drain returned {:?}", other.map(|_| ())),
        }
        self.vcpu.fd.set_kvm_immediate_exit(0);
    }

    /// One KVM_RUN; returns why the vCPU must stop, if it must.
    fn run_once(&mut self) -> Option<String> {
        let Vcpu {
            fd,
            bus,
            exit,
            role,
            index,
            on_fault,
            map_gpa,
            ..
        } = &mut self.vcpu;
        let result = fd.run();
        let on_fault = on_fault.as_ref();
        let fatal = |exit: &ExitHandle, fault: VcpuFault| {
            let why = fault.to_string();
            match on_fault {
                Some(sink) => sink(*index, why.clone()),
                None => exit.request(ExitReason::Fault {
                    vcpu: format!("{} {index}", role.name()),
                    fault,
                }),
            }
            Some(why)
        };
        match result {
            Ok(VcpuExit::IoOut(port, data)) => {
                if !bus.write(u64::from(port), data) {
                    log::debug!("{} {index}: unhandled out {port:#x} {data:?}", role.name());
                }
                None
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                if !bus.read(u64::from(port), data) {
                    log::debug!("{} {index}: unhandled in {port:#x}", role.name());
                }
                None
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                log::debug!("{} {index}: unhandled MMIO read at {addr:#x}", role.name());
                data.fill(0xff);
                None
            }
            Ok(VcpuExit::MmioWrite(addr, _)) => {
                log::debug!("{} {index}: unhandled MMIO write at {addr:#x}", role.name());
                None
            }
            Ok(VcpuExit::Hypercall(call)) => {
                *call.ret = match (call.nr, map_gpa.as_ref()) {
                    (crate::machine::vm::KVM_HC_MAP_GPA_RANGE, Some(map)) => {
                        let [gpa, pages, attrs, ..] = call.args;
                        let shared = attrs & crate::machine::vm::KVM_MAP_GPA_RANGE_ENCRYPTED == 0;
                        if map(gpa, pages, shared) {
                            0
                        } else {
                            (-i64::from(libc::EINVAL)) as u64
                        }
                    }
                    _ => (-i64::from(libc::ENOSYS)) as u64,
                };
                None
            }
            Ok(VcpuExit::Hlt) => Some("halted".into()),
            Ok(VcpuExit::Shutdown) => fatal(exit, VcpuFault::TripleFault),
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                exit.request(if kind == kvm_bindings::KVM_SYSTEM_EVENT_RESET {
                    ExitReason::Reset
                } else {
                    ExitReason::PowerOff
                });
                Some(format!("system event {kind}"))
            }
            Ok(VcpuExit::InternalError) => fatal(exit, VcpuFault::InternalError),
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                fatal(exit, VcpuFault::FailEntry { reason, cpu })
            }
            Ok(other) => {
                log::debug!("{} {index}: ignored exit {other:?}", role.name());
                None
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
            Err(e) => fatal(exit, VcpuFault::Run { errno: e.errno() }),
        }
    }

    /// Everything KVM keeps of this vCPU; any piece it will not give
    /// (an MSR it lists but cannot read) is an error that names it.
    ///
    /// The TSC runs while the vCPU is paused, and so does the KVM clock the
    /// guest checks it against: the TSC saved is the one of the clock's
    /// moment, so the pair the target gets agrees (`x86::tsc`).
    fn save_state(&self, clock: ClockMoment) -> Result<VcpuRecord, String> {
        let fd = &self.vcpu.fd;
        let e = |what: &'static str| move |err: kvm_ioctls::Error| format!("{what}: {err}");
        let tsc_khz = fd.get_tsc_khz().map_err(e("KVM_GET_TSC_KHZ"))?;
        let mut msrs = read_msrs(fd, &self.vcpu.msr_indices)?;
        if let Some(read) = tsc::saved(&msrs) {
            let offset = tsc::unscaled_offset(fd);
            let exact = offset.is_some() && clock.host_tsc.is_some();
            log::debug!(
                "vcpu {}: TSC saved as of the clock, {}",
                self.vcpu.index,
                if exact { "exactly (offset)" } else { "timed" }
            );
            tsc::set_saved(&mut msrs, tsc::at_clock(read, offset, tsc_khz, &clock));
        }
        Ok(VcpuRecord {
            index: self.vcpu.index as u32,
            regs: fd.get_regs().map_err(e("KVM_GET_REGS"))?,
            sregs: fd.get_sregs().map_err(e("KVM_GET_SREGS"))?,
            fpu: Fpu::from(&fd.get_fpu().map_err(e("KVM_GET_FPU"))?),
            xsave: fd.get_xsave().map_err(e("KVM_GET_XSAVE"))?,
            xcrs: fd.get_xcrs().map_err(e("KVM_GET_XCRS"))?,
            msrs,
            lapic: fd.get_lapic().map_err(e("KVM_GET_LAPIC"))?,
            mp_state: fd.get_mp_state().map_err(e("KVM_GET_MP_STATE"))?,
            events: fd.get_vcpu_events().map_err(e("KVM_GET_VCPU_EVENTS"))?,
            debugregs: fd.get_debug_regs().map_err(e("KVM_GET_DEBUGREGS"))?,
            tsc_khz,
        })
    }

    /// Gives KVM a saved state, in the order KVM's dependencies need
    /// (TSC rate before the TSC MSR, sregs before the LAPIC, events last).
    /// The saved TSC is the one of the saved KVM clock, which `clock`
    /// describes just after it was set: the TSC goes back before the other
    /// MSRs (the TSC deadline is read against it), moved on by as much as
    /// the clock ran.
    fn restore_state(&self, r: &VcpuRecord, clock: ClockMoment) -> Result<(), String> {
        let fd = &self.vcpu.fd;
        let e = |what: &'static str| move |err: kvm_ioctls::Error| format!("{what}: {err}");
        if fd.get_tsc_khz().ok() != Some(r.tsc_khz) {
            fd.set_tsc_khz(r.tsc_khz)
                .map_err(e("KVM_SET_TSC_KHZ (the source's TSC rate)"))?;
        }
        fd.set_regs(&r.regs).map_err(e("KVM_SET_REGS"))?;
        fd.set_sregs(&r.sregs).map_err(e("KVM_SET_SREGS"))?;
        fd.set_fpu(&(&r.fpu).into()).map_err(e("KVM_SET_FPU"))?;
        // SAFETY: the record's xsave area came from KVM_GET_XSAVE of the same
        // size (kvm_xsave); KVM checks its contents against this vCPU's CPUID
        // and refuses what it cannot take.
        unsafe { fd.set_xsave(&r.xsave) }.map_err(e("KVM_SET_XSAVE"))?;
        fd.set_xcrs(&r.xcrs).map_err(e("KVM_SET_XCRS"))?;
        fd.set_debug_regs(&r.debugregs)
            .map_err(e("KVM_SET_DEBUGREGS"))?;
        fd.set_lapic(&r.lapic).map_err(e("KVM_SET_LAPIC"))?;
        let mut msrs = r.msrs.clone();
        if let Some(saved) = tsc::saved(&msrs) {
            msrs.retain(|&(index, _)| index != IA32_TSC);
            // Checked after the rate is set: the offset arithmetic holds
            // only for a TSC KVM does not scale.
            let unscaled = tsc::unscaled_offset(fd).is_some();
            let how = tsc::to_restore(saved, r.tsc_khz, &clock, unscaled);
            log::debug!("vcpu {}: TSC restored as {how:?}", self.vcpu.index);
            match how {
                TscRestore::Offset(offset) => {
                    tsc::set_offset(fd, offset).map_err(e("KVM_SET_DEVICE_ATTR (TSC offset)"))?
                }
                // First, before the MSRs read against it.
                TscRestore::Msr(value) => write_msrs(fd, &[(IA32_TSC, value)])?,
            }
        }
        write_msrs(fd, &msrs)?;
        fd.set_mp_state(r.mp_state).map_err(e("KVM_SET_MP_STATE"))?;
        fd.set_vcpu_events(&r.events)
            .map_err(e("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }
}

/// Reads every MSR of `indices`; one KVM will not read is an error that
/// names it (KVM_GET_MSRS stops at the first it cannot).
fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<(u32, u64)>, String> {
    let entries: Vec<kvm_msr_entry> = indices
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut msrs = Msrs::from_entries(&entries).map_err(|e| format!("MSR list: {e:?}"))?;
    let n = fd
        .get_msrs(&mut msrs)
        .map_err(|e| format!("KVM_GET_MSRS: {e}"))?;
    if n < indices.len() {
        return Err(format!(
            "KVM cannot read MSR {:#x}, which it lists as saveable",
            indices[n]
        ));
    }
    Ok(msrs.as_slice().iter().map(|m| (m.index, m.data)).collect())
}

/// Writes every saved MSR; one KVM refuses is an error that names it.
fn write_msrs(fd: &VcpuFd, saved: &[(u32, u64)]) -> Result<(), String> {
    let entries: Vec<kvm_msr_entry> = saved
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|e| format!("MSR list: {e:?}"))?;
    let n = fd
        .set_msrs(&msrs)
        .map_err(|e| format!("KVM_SET_MSRS: {e}"))?;
    if n < saved.len() {
        return Err(format!(
            "KVM refuses MSR {:#x} = {:#x} from the source",
            saved[n].0, saved[n].1
        ));
    }
    Ok(())
}

/// Controls one vCPU thread.
pub struct VcpuHandle {
    index: usize,
    label: String,
    events: Sender<VcpuEvent>,
    responses: Receiver<VcpuResponse>,
    thread: Option<JoinHandle<()>>,
    tid: i32,
}

impl VcpuHandle {
    /// Index within its group.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Kernel thread ID of the vCPU thread.
    pub fn thread_id(&self) -> i32 {
        self.tid
    }

    /// Runs the vCPU thread on `cpu` only.
    pub fn pin(&self, cpu: usize) -> Result<(), VcpuError> {
        pin_thread(self.tid, cpu).map_err(|e| VcpuError::Affinity(self.label.clone(), cpu, e))
    }

    /// Sends an event and kicks the thread out of KVM_RUN.
    pub fn send(&self, event: VcpuEvent) -> Result<(), VcpuError> {
        self.events
            .send(event)
            .map_err(|_| VcpuError::Gone(self.label.clone()))?;
        if let Some(thread) = &self.thread {
            thread
                .kill(SIGRTMIN())
                .map_err(|e| VcpuError::Kick(self.label.clone(), e))?;
        }
        Ok(())
    }

    /// Waits for the next response.
    pub fn wait(&self, timeout: Duration) -> Result<VcpuResponse, VcpuError> {
        self.responses.recv_timeout(timeout).map_err(|e| match e {
            RecvTimeoutError::Timeout => VcpuError::Timeout(self.label.clone(), timeout),
            RecvTimeoutError::Disconnected => VcpuError::Gone(self.label.clone()),
        })
    }

    /// Waits for `want`, turning refusals and errors into `VcpuError`.
    fn expect(&self, want: fn(&VcpuResponse) -> bool) -> Result<VcpuResponse, VcpuError> {
        match self.wait(RESPONSE_TIMEOUT)? {
            r if want(&r) => Ok(r),
            VcpuResponse::NotAllowed(why) | VcpuResponse::Error(why) => {
                Err(VcpuError::Refused(self.label.clone(), why))
            }
            other => Err(VcpuError::Unexpected(
                self.label.clone(),
                format!("{other:?}"),
            )),
        }
    }

    /// Ends the thread and joins it (bounded by [`RESPONSE_TIMEOUT`]).
    pub fn finish(mut self) -> Result<(), VcpuError> {
        self.end()
    }

    /// [`VcpuHandle::finish`] in place (a dropped handle does it too). A
    /// thread that does not answer within the timeout (stuck in KVM, deaf
    /// to its kick) is the one thread cgsvmm does not join, since joining
    /// would hang the caller: it is reported, and it keeps the guest's
    /// memory mapped for as long as it lives (`Vcpu::with_mappings`).
    fn end(&mut self) -> Result<(), VcpuError> {
        if self.thread.is_none() {
            return Ok(());
        }
        let answered = self.send(VcpuEvent::Finish).and_then(|()| loop {
            match self.wait(RESPONSE_TIMEOUT)? {
                VcpuResponse::Finished => break Ok(()),
                other => log::debug!("{}: {other:?} while finishing", self.label),
            }
        });
        let thread = self.thread.take();
        match answered {
            // Finished, or already gone (its channels closed as it ended).
            Ok(()) | Err(VcpuError::Gone(_)) => {
                if let Some(t) = thread {
                    let _ = t.join();
                }
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        if let Err(e) = self.end() {
            log::warn!("{}: {e}", self.label);
        }
    }
}

/// A set of vCPUs paused and resumed together.
#[derive(Default)]
pub struct VcpuGroup {
    handles: Vec<VcpuHandle>,
}

impl VcpuGroup {
    /// A group of started vCPU threads.
    pub fn new(handles: Vec<VcpuHandle>) -> Self {
        Self { handles }
    }

    /// The handles.
    pub fn handles(&self) -> &[VcpuHandle] {
        &self.handles
    }

    /// Sends `event` to every vCPU first, then collects every answer, so the
    /// vCPUs act in parallel.
    fn broadcast(
        &self,
        event: impl Fn() -> VcpuEvent,
        want: fn(&VcpuResponse) -> bool,
    ) -> Result<Vec<VcpuResponse>, VcpuError> {
        for h in &self.handles {
            h.send(event())?;
        }
        let mut out = Vec::with_capacity(self.handles.len());
        let mut first_err = None;
        for h in &self.handles {
            match h.expect(want) {
                Ok(r) => out.push(r),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        first_err.map_or(Ok(out), Err)
    }

    /// Pauses every vCPU (drained: no I/O left half done).
    pub fn pause(&self) -> Result<(), VcpuError> {
        self.broadcast(|| VcpuEvent::Pause, |r| matches!(r, VcpuResponse::Paused))
            .map(drop)
    }

    /// Resumes every vCPU.
    pub fn resume(&self) -> Result<(), VcpuError> {
        self.broadcast(|| VcpuEvent::Resume, |r| matches!(r, VcpuResponse::Resumed))
            .map(drop)
    }

    /// Gives each vCPU its saved state (they must be paused), in parallel;
    /// `clock` is the VM's KVM clock just after it took the saved value.
    pub fn restore_state(
        &self,
        records: Vec<VcpuRecord>,
        clock: ClockMoment,
    ) -> Result<(), VcpuError> {
        if records.len() != self.handles.len() {
            return Err(VcpuError::Unexpected(
                "vCPU group".into(),
                format!("{} states for {} vCPUs", records.len(), self.handles.len()),
            ));
        }
        for (h, r) in self.handles.iter().zip(records) {
            h.send(VcpuEvent::RestoreState(Box::new(r), clock))?;
        }
        let mut first_err = None;
        for h in &self.handles {
            if let Err(e) = h.expect(|r| matches!(r, VcpuResponse::Restored)) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// The state of every vCPU (they must be paused), the TSCs as of
    /// `clock`, the moment the VM's KVM clock was read.
    pub fn save_state(&self, clock: ClockMoment) -> Result<Vec<VcpuRecord>, VcpuError> {
        let responses = self.broadcast(
            move || VcpuEvent::SaveState(clock),
            |r| matches!(r, VcpuResponse::SavedState(_)),
        )?;
        Ok(responses
            .into_iter()
            .filter_map(|r| match r {
                VcpuResponse::SavedState(s) => Some(*s),
                _ => None,
            })
            .collect())
    }

    /// Ends every thread.
    pub fn finish(self) {
        for h in self.handles {
            let label = h.label.clone();
            if let Err(e) = h.finish() {
                log::warn!("{label}: {e}");
            }
        }
    }
}
