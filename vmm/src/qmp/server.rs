//! The QMP sockets: the listener and one [`Connection`] per client, driven
//! by the event loop and never blocking it.
//!
//! Every client has its own output queue. Replies and events are appended
//! to it and written when the socket is writable (the loop watches `OUT`
//! only while something is queued). A client whose queue passes
//! [`READ_PAUSE`] is not read from until it drains (flow control, as QEMU
//! does): a client that sends commands and never reads stops itself, not
//! the others, and pipelined commands wait in the kernel's socket buffer
//! instead of being dropped. A queue that still grows past [`QUEUE_LIMIT`]
//! (events only) loses its client. Each wake-up reads at most a few KiB of
//! one client's input, so the commands it runs are bounded too, and at most
//! [`MAX_CLIENTS`] are served at once: memory is bounded by the clients'
//! limits.
//!
//! Out of file descriptors, `accept` fails and the listener stays ready;
//! a spare descriptor is given up to accept and close the waiting client,
//! so the loop never spins, and the first such failure is logged.

use std::collections::HashMap;
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use serde_json::Value;

use super::{event_message, greeting, Output, QmpBackend, Session};

/// Queued output past which a client's input is no longer read.
pub const READ_PAUSE: usize = 256 * 1024;
/// Queued output past which a client is dropped (only events can get it
/// there: replies stop with its input).
pub const QUEUE_LIMIT: usize = 4 << 20;
/// Bytes read from a client per wake-up: what one wake-up may run is
/// bounded (about a hundred commands), so other clients and signals wait
/// little, and the replies it makes stay near the pause threshold.
const READ_CHUNK: usize = 4096;
/// Clients served at once; more are refused (closed at once). With the
/// per-client bounds (a 1 MiB message, a 4 MiB queue) this bounds memory.
pub const MAX_CLIENTS: usize = 64;

/// Errors of starting the server.
#[derive(Debug, thiserror::Error)]
pub enum QmpServerError {
    /// Something other than a stale socket is at the path.
    #[error("QMP path {0} exists and is not a socket")]
    PathInUse(PathBuf),
    /// A live process (another cgsvmm?) listens at the path.
    #[error("QMP socket {0} is in use: another process answers there")]
    SocketInUse(PathBuf),
    /// Socket creation failed.
    #[error("Cannot listen on QMP socket {0}: {1}")]
    Listen(PathBuf, std::io::Error),
}

/// One client.
struct Connection {
    stream: UnixStream,
    session: Session,
    /// Bytes to send, from `sent` on.
    queue: Vec<u8>,
    sent: usize,
    /// The client closed its side: no more input.
    eof: bool,
    /// What the loop watches now.
    watching: EventSet,
    /// Closed or broken: removed at the end of the current dispatch.
    dead: bool,
}

impl Connection {
    fn new(stream: UnixStream) -> Self {
        Self {
            stream,
            session: Session::default(),
            queue: Vec::new(),
            sent: 0,
            eof: false,
            watching: EventSet::empty(),
            dead: false,
        }
    }

    fn queued(&self) -> usize {
        self.queue.len() - self.sent
    }

    /// Appends one message (a line) to the output queue.
    fn enqueue(&mut self, msg: &Value) {
        if self.dead {
            return;
        }
        let line = msg.to_string();
        self.queue.extend_from_slice(line.as_bytes());
        self.queue.extend_from_slice(b"\r\n");
        if self.queued() > QUEUE_LIMIT {
            log::warn!("QMP: a client does not read its events; dropping it");
            self.dead = true;
        }
    }

    /// Writes what the socket takes now, without blocking.
    fn flush(&mut self) {
        while self.sent < self.queue.len() && !self.dead {
            match self.stream.write(&self.queue[self.sent..]) {
                Ok(0) => self.dead = true,
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => self.dead = true,
            }
        }
        if self.sent == self.queue.len() {
            self.queue.clear();
            self.sent = 0;
            // Give back what a burst made the queue grow to.
            self.queue.shrink_to(READ_CHUNK);
        } else if self.sent > READ_PAUSE {
            self.queue.drain(..self.sent);
            self.sent = 0;
        }
        if self.eof && self.queued() == 0 {
            self.dead = true;
        }
    }

    /// Reads one chunk of input and runs what it completes.
    fn read(&mut self, backend: &std::sync::Mutex<dyn QmpBackend>) -> Vec<Output> {
        let mut buf = [0u8; READ_CHUNK];
        match self.stream.read(&mut buf) {
            Ok(0) => {
                self.eof = true;
                Vec::new()
            }
            Ok(n) => {
                let mut backend = backend.lock().expect("backend lock poisoned");
                self.session.feed(&buf[..n], &mut *backend)
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
                Vec::new()
            }
            Err(_) => {
                self.dead = true;
                Vec::new()
            }
        }
    }

    /// What the loop should watch: input while the queue is short, output
    /// while anything is queued.
    fn wanted(&self) -> EventSet {
        let mut set = EventSet::HANG_UP;
        if !self.eof && self.queued() < READ_PAUSE {
            set |= EventSet::IN | EventSet::READ_HANG_UP;
        }
        if self.queued() > 0 {
            set |= EventSet::OUT;
        }
        set
    }
}

/// The listening socket and its clients; an event-loop subscriber.
pub struct QmpServer {
    path: PathBuf,
    listener: UnixListener,
    connections: HashMap<i32, Connection>,
    backend: std::sync::Arc<std::sync::Mutex<dyn QmpBackend>>,
    /// Given up when `accept` runs out of descriptors (see the module doc).
    spare_fd: Option<File>,
    /// The first descriptor shortage was logged.
    fd_shortage_logged: bool,
    /// The listener is watched (not while out of descriptors with no spare:
    /// until a client leaves).
    listening: bool,
    /// Written when the backend raises an event outside a command (a
    /// migration worker's MIGRATION events): they go out at once.
    event_wake: Option<vmm_sys_util::eventfd::EventFd>,
}

impl QmpServer {
    /// Listens at `path` (owner-only permissions), replacing a stale socket.
    pub fn bind(
        path: &Path,
        backend: std::sync::Arc<std::sync::Mutex<dyn QmpBackend>>,
    ) -> Result<Self, QmpServerError> {
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(QmpServerError::PathInUse(path.to_path_buf()));
            }
            // Replace only a stale socket, never another VMM's.
            if UnixStream::connect(path).is_ok() {
                return Err(QmpServerError::SocketInUse(path.to_path_buf()));
            }
            let _ = std::fs::remove_file(path);
        }
        let fail = |e| QmpServerError::Listen(path.to_path_buf(), e);
        // Create the socket with no group/other access from the start.
        // SAFETY: umask only changes this process's file creation mask.
        let old = unsafe { libc::umask(0o077) };
        let bound = UnixListener::bind(path);
        // SAFETY: as above; restores the previous mask.
        unsafe { libc::umask(old) };
        let listener = bound.map_err(fail)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(fail)?;
        listener.set_nonblocking(true).map_err(fail)?;
        log::debug!("QMP: listening on {}", path.display());
        Ok(Self {
            path: path.to_path_buf(),
            listener,
            connections: HashMap::new(),
            backend,
            spare_fd: File::open("/dev/null").ok(),
            fd_shortage_logged: false,
            listening: false,
            event_wake: None,
        })
    }

    /// Sends the backend's events whenever `wake` is written, not only
    /// after a command.
    pub fn with_event_wake(mut self, wake: vmm_sys_util::eventfd::EventFd) -> Self {
        self.event_wake = Some(wake);
        self
    }

    /// Queues an event for every negotiated client.
    pub fn broadcast(&mut self, name: &str, data: Value) {
        self.broadcast_message(&event_message(name, data));
    }

    fn broadcast_message(&mut self, msg: &Value) {
        for c in self
            .connections
            .values_mut()
            .filter(|c| c.session.negotiated())
        {
            c.enqueue(msg);
        }
    }

    /// Writes queued output for at most `limit` (at exit, when the loop no
    /// longer runs).
    pub fn drain(&mut self, limit: std::time::Duration) {
        let start = std::time::Instant::now();
        loop {
            self.connections.values_mut().for_each(Connection::flush);
            let pending = self.connections.values().any(|c| !c.dead && c.queued() > 0);
            if !pending || start.elapsed() >= limit {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    fn flush_events(&mut self) {
        let events = self
            .backend
            .lock()
            .expect("backend lock poisoned")
            .take_events();
        for event in events {
            self.broadcast_message(&event);
        }
    }

    fn accept(&mut self, ops: &mut EventOps) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) if self.connections.len() >= MAX_CLIENTS => {
                    log::warn!("QMP: {MAX_CLIENTS} clients already; refusing another");
                    drop(stream);
                }
                Ok((stream, _)) => self.add_client(stream, ops),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                    if !self.fd_shortage_logged {
                        log::warn!(
                            "QMP: out of file descriptors; refusing clients until some close"
                        );
                        self.fd_shortage_logged = true;
                    }
                    // Free the spare to take the waiting client off the
                    // backlog and close it: otherwise the listener stays
                    // ready and the loop spins.
                    // (`accept` takes a descriptor before it looks at the
                    // backlog, so EMFILE says nothing about waiting clients:
                    // stop once the backlog is empty.)
                    if let Some(spare) = self.spare_fd.take() {
                        drop(spare);
                        let refused = self.listener.accept().map(drop).is_ok();
                        self.spare_fd = File::open("/dev/null").ok();
                        match (refused, self.spare_fd.is_some()) {
                            (true, true) => continue,
                            (false, true) => return,
                            (_, false) => {}
                        }
                    }
                    // No spare to give up: stop watching the listener
                    // until a client leaves and frees a descriptor.
                    self.set_listening(false, ops);
                    return;
                }
                Err(e) => {
                    log::warn!("QMP: accept failed: {e}");
                    return;
                }
            }
        }
    }

    fn set_listening(&mut self, on: bool, ops: &mut EventOps) {
        if on == self.listening {
            return;
        }
        let events = Events::new(&self.listener, EventSet::IN);
        let done = if on {
            ops.add(events)
        } else {
            ops.remove(events)
        };
        match done {
            Ok(()) => self.listening = on,
            Err(e) => log::error!("QMP: cannot change the listener's watch: {e:?}"),
        }
    }

    fn add_client(&mut self, stream: UnixStream, ops: &mut EventOps) {
        if stream.set_nonblocking(true).is_err() {
            return;
        }
        let mut conn = Connection::new(stream);
        conn.enqueue(&greeting());
        conn.flush();
        conn.watching = conn.wanted();
        if let Err(e) = ops.add(Events::new(&conn.stream, conn.watching)) {
            log::warn!("QMP: cannot watch client: {e:?}");
            return;
        }
        log::debug!("QMP: client {} connected", conn.stream.as_raw_fd());
        self.connections.insert(conn.stream.as_raw_fd(), conn);
    }

    fn serve(&mut self, fd: i32, set: EventSet) {
        let Some(conn) = self.connections.get_mut(&fd) else {
            return;
        };
        if set.contains(EventSet::OUT) {
            conn.flush();
        }
        if set.intersects(EventSet::IN | EventSet::READ_HANG_UP)
            && conn.wanted().contains(EventSet::IN)
        {
            // In order: a command's events (to everyone), then its reply.
            for output in conn.read(&self.backend) {
                match output {
                    Output::Event(e) => self.broadcast_message(&e),
                    Output::Reply(r) => {
                        if let Some(conn) = self.connections.get_mut(&fd) {
                            conn.enqueue(&r);
                        }
                    }
                }
            }
        } else if set.contains(EventSet::HANG_UP) {
            conn.dead = true;
        }
    }

    /// Writes what every client can take, updates what the loop watches,
    /// and forgets dead clients.
    fn settle(&mut self, ops: &mut EventOps) {
        let before = self.connections.len();
        self.connections.retain(|fd, c| {
            c.flush();
            if c.dead {
                let _ = ops.remove(Events::new(&c.stream, c.watching));
                log::debug!("QMP: client {fd} gone");
                return false;
            }
            let wanted = c.wanted();
            if wanted != c.watching {
                match ops.modify(Events::new(&c.stream, wanted)) {
                    Ok(()) => c.watching = wanted,
                    Err(e) => {
                        log::warn!("QMP: cannot watch client: {e:?}");
                        let _ = ops.remove(Events::new(&c.stream, c.watching));
                        return false;
                    }
                }
            }
            true
        });
        // A client left: its descriptor is free for the spare, and the
        // listener is watched again if it was not.
        if self.connections.len() < before {
            if self.spare_fd.is_none() {
                self.spare_fd = File::open("/dev/null").ok();
            }
            self.set_listening(true, ops);
        }
    }
}

impl Drop for QmpServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl MutEventSubscriber for QmpServer {
    fn init(&mut self, ops: &mut EventOps) {
        self.set_listening(true, ops);
        if let Some(wake) = &self.event_wake {
            if let Err(e) = ops.add(Events::new(wake, EventSet::IN)) {
                log::warn!("QMP: events will wait for the next command: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let woken = self
            .event_wake
            .as_ref()
            .is_some_and(|w| w.as_raw_fd() == events.fd());
        if woken {
            if let Some(w) = &self.event_wake {
                let _ = w.read();
            }
        } else if events.fd() == self.listener.as_raw_fd() {
            self.accept(ops);
        } else {
            self.serve(events.fd(), events.event_set());
        }
        self.flush_events();
        self.settle(ops);
    }
}
