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

use kvm_bindings::{
    kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_run,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use cgsvmm_devices::Bus;

use crate::exit::{ExitHandle, ExitReason};

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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuEvent {
    /// Stop running guest code (after draining any pending I/O).
    Pause,
    /// Run guest code.
    Resume,
    /// Report the architectural state (only while paused).
    SaveState,
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
    SavedState(Box<VcpuState>),
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

/// The architectural state of one vCPU, as KVM reports it. Pieces the host
/// does not support (no in-kernel LAPIC on the mirror VM) are `None`.
pub struct VcpuState {
    /// General registers.
    pub regs: kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_sregs,
    /// x87/SSE state.
    pub fpu: kvm_fpu,
    /// Extended state (4 KiB).
    pub xsave: kvm_xsave,
    /// XCR0.
    pub xcrs: kvm_xcrs,
    /// Every MSR of KVM_GET_MSR_INDEX_LIST that KVM could read.
    pub msrs: Vec<kvm_msr_entry>,
    /// Local APIC.
    pub lapic: Option<kvm_lapic_state>,
    /// Run state (runnable, halted, waiting for SIPI).
    pub mp_state: Option<kvm_mp_state>,
    /// Pending exceptions, interrupts, NMIs.
    pub events: kvm_vcpu_events,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("rip", &format_args!("{:#x}", self.regs.rip))
            .field("msrs", &self.msrs.len())
            .field("lapic", &self.lapic.is_some())
            .finish_non_exhaustive()
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
}

/// Where a vCPU reports its own fatal exit instead of stopping the VM.
pub type FaultSink = Arc<dyn Fn(usize, String) + Send + Sync>;

enum State {
    Paused,
    Running,
    Stopped(String),
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
        }
    }

    /// Reports this vCPU's fatal exits to `sink` rather than stopping the
    /// VM (mirror vCPUs: a broken helper must not take the guest down).
    pub fn with_fault_sink(mut self, sink: FaultSink) -> Self {
        self.on_fault = Some(sink);
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
            };
            if matches!(state, State::Stopped(ref s) if s == FINISHED) {
                break;
            }
        }
        KVM_RUN.with(|p| p.set(std::ptr::null_mut()));
        self.reply(VcpuResponse::Finished);
    }

    /// Handles an event while not running.
    fn on_event_stopped(&mut self, event: VcpuEvent, state: State) -> State {
        match (event, state) {
            (VcpuEvent::Finish, _) => State::Stopped(FINISHED.into()),
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
            (VcpuEvent::SaveState, s) => {
                let r = match self.save_state() {
                    Ok(st) => VcpuResponse::SavedState(Box::new(st)),
                    Err(e) => VcpuResponse::Error(e.to_string()),
                };
                self.reply(r);
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
                Ok(VcpuEvent::SaveState) => {
                    self.reply(VcpuResponse::NotAllowed(
                        "save state needs a paused vCPU".into(),
                    ));
                }
                Ok(VcpuEvent::Finish) | Err(TryRecvError::Disconnected) => {
                    self.drain();
                    return State::Stopped(FINISHED.into());
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
            ..
        } = &mut self.vcpu;
        let result = fd.run();
        let on_fault = on_fault.as_ref();
        let fatal = |exit: &ExitHandle, why: String| {
            match on_fault {
                Some(sink) => sink(*index, why.clone()),
                None => exit.request(ExitReason::Fault(format!("{} {index}: {why}", role.name()))),
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
            Ok(VcpuExit::Hlt) => Some("halted".into()),
            Ok(VcpuExit::Shutdown) => fatal(exit, "triple fault (KVM_EXIT_SHUTDOWN)".into()),
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                exit.request(if kind == kvm_bindings::KVM_SYSTEM_EVENT_RESET {
                    ExitReason::Reset
                } else {
                    ExitReason::PowerOff
                });
                Some(format!("system event {kind}"))
            }
            Ok(VcpuExit::InternalError) => {
                fatal(exit, "KVM internal error (emulation failure)".into())
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => fatal(
                exit,
                format!("VM entry failed: reason {reason:#x} on cpu {cpu}"),
            ),
            Ok(other) => {
                log::debug!("{} {index}: ignored exit {other:?}", role.name());
                None
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
            Err(e) => fatal(exit, format!("KVM_RUN failed: {e}")),
        }
    }

    fn save_state(&self) -> Result<VcpuState, kvm_ioctls::Error> {
        let fd = &self.vcpu.fd;
        Ok(VcpuState {
            regs: fd.get_regs()?,
            sregs: fd.get_sregs()?,
            fpu: fd.get_fpu()?,
            xsave: fd.get_xsave()?,
            xcrs: fd.get_xcrs()?,
            msrs: read_msrs(fd, &self.vcpu.msr_indices),
            lapic: fd.get_lapic().ok(),
            mp_state: fd.get_mp_state().ok(),
            events: fd.get_vcpu_events()?,
            debugregs: fd.get_debug_regs()?,
        })
    }
}

/// Marks the Stopped state that ends the thread.
const FINISHED: &str = "finished";

/// Reads every MSR KVM can read; KVM_GET_MSRS stops at the first it
/// cannot, so that one is dropped and the rest retried.
fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Vec<kvm_msr_entry> {
    let mut wanted: Vec<u32> = indices.to_vec();
    let mut out = Vec::new();
    while !wanted.is_empty() {
        let entries: Vec<kvm_msr_entry> = wanted
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let Ok(mut msrs) = Msrs::from_entries(&entries) else {
            break;
        };
        let n = fd.get_msrs(&mut msrs).unwrap_or(0);
        out.extend_from_slice(&msrs.as_slice()[..n]);
        wanted.drain(..(n + 1).min(wanted.len()));
    }
    out
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
        self.send(VcpuEvent::Finish)?;
        loop {
            match self.wait(RESPONSE_TIMEOUT)? {
                VcpuResponse::Finished => break,
                other => log::debug!("{}: {other:?} while finishing", self.label),
            }
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        Ok(())
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
        event: VcpuEvent,
        want: fn(&VcpuResponse) -> bool,
    ) -> Result<Vec<VcpuResponse>, VcpuError> {
        for h in &self.handles {
            h.send(event)?;
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
        self.broadcast(VcpuEvent::Pause, |r| matches!(r, VcpuResponse::Paused))
            .map(drop)
    }

    /// Resumes every vCPU.
    pub fn resume(&self) -> Result<(), VcpuError> {
        self.broadcast(VcpuEvent::Resume, |r| matches!(r, VcpuResponse::Resumed))
            .map(drop)
    }

    /// The state of every vCPU (they must be paused).
    pub fn save_state(&self) -> Result<Vec<VcpuState>, VcpuError> {
        let responses = self.broadcast(VcpuEvent::SaveState, |r| {
            matches!(r, VcpuResponse::SavedState(_))
        })?;
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
