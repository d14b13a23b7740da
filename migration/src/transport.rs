//! Where a migration stream goes: `tcp:HOST:PORT`, `unix:PATH` or
//! `file:PATH` (QEMU's URI forms). The only module of the migration crate
//! that knows about sockets and files; the sender and receiver see a
//! [`Channel`] they read and write.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

use socket2::{SockAddr, Socket, Type};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// A migration URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Uri {
    /// `tcp:HOST:PORT`.
    Tcp(String),
    /// `unix:PATH`.
    Unix(PathBuf),
    /// `file:PATH`: a snapshot.
    File(PathBuf),
}

/// Errors of a transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The URI is not one of the forms.
    #[error("Invalid migration URI '{uri}': {why}")]
    BadUri {
        /// What was given.
        uri: String,
        /// What is wrong.
        why: &'static str,
    },
    /// Connecting, listening, opening or accepting failed.
    #[error("{what} {uri}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Where.
        uri: String,
        /// Why.
        source: std::io::Error,
    },
    /// The wait for a peer was cancelled.
    #[error("Stopped waiting on {0}")]
    Cancelled(Uri),
}

impl std::str::FromStr for Uri {
    type Err = TransportError;

    fn from_str(s: &str) -> Result<Self, TransportError> {
        let bad = |why| TransportError::BadUri {
            uri: s.to_string(),
            why,
        };
        let (scheme, rest) = s
            .split_once(':')
            .ok_or_else(|| bad("expected tcp:HOST:PORT, unix:PATH or file:PATH"))?;
        if rest.is_empty() {
            return Err(bad("nothing after the scheme"));
        }
        match scheme {
            "tcp" => {
                let (host, port) = rest
                    .rsplit_once(':')
                    .ok_or_else(|| bad("expected tcp:HOST:PORT"))?;
                if port.parse::<u16>().is_err() {
                    return Err(bad("expected tcp:HOST:PORT with a port from 0 to 65535"));
                }
                // QEMU's `tcp::PORT`: every interface (listening) or this
                // host (connecting).
                let host = if host.is_empty() { "0.0.0.0" } else { host };
                Ok(Uri::Tcp(format!("{host}:{port}")))
            }
            "unix" => Ok(Uri::Unix(PathBuf::from(rest))),
            "file" => Ok(Uri::File(PathBuf::from(rest))),
            _ => Err(bad("the scheme must be tcp, unix or file")),
        }
    }
}

impl std::fmt::Display for Uri {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            Uri::Tcp(addr) => write!(f, "tcp:{addr}"),
            Uri::Unix(path) => write!(f, "unix:{}", path.display()),
            Uri::File(path) => write!(f, "file:{}", path.display()),
        }
    }
}

/// One end of a migration stream.
pub enum Channel {
    /// A TCP connection.
    Tcp(TcpStream),
    /// A Unix socket connection.
    Unix(UnixStream),
    /// A snapshot file (written by the source, read by the target).
    File(File),
}

impl Channel {
    /// Ends a connection in both directions at once, so a thread blocked
    /// on it returns (a cancelled migration); a file is left alone.
    pub fn shutdown(&self) {
        let _ = match self {
            Channel::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            Channel::Unix(s) => s.shutdown(std::net::Shutdown::Both),
            Channel::File(_) => Ok(()),
        };
    }

    /// A second handle on the same stream (one thread reads, one writes).
    /// A file has one direction only: it is refused.
    pub fn try_clone(&self) -> std::io::Result<Channel> {
        match self {
            Channel::Tcp(s) => s.try_clone().map(Channel::Tcp),
            Channel::Unix(s) => s.try_clone().map(Channel::Unix),
            Channel::File(_) => Err(std::io::ErrorKind::Unsupported.into()),
        }
    }

    /// Whether the peer is a live process (not a file): it can answer.
    pub fn is_live(&self) -> bool {
        !matches!(self, Channel::File(_))
    }

    /// Bounds every read (None: wait for ever). Files never wait.
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        match self {
            Channel::Tcp(s) => s.set_read_timeout(timeout),
            Channel::Unix(s) => s.set_read_timeout(timeout),
            Channel::File(_) => Ok(()),
        }
    }

    /// Fails a write that cannot go on for `timeout` (a peer that stopped
    /// reading); a file never blocks.
    pub fn set_write_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        match self {
            Channel::Tcp(s) => s.set_write_timeout(timeout),
            Channel::Unix(s) => s.set_write_timeout(timeout),
            Channel::File(_) => Ok(()),
        }
    }
}

impl Read for Channel {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Channel::Tcp(s) => s.read(buf),
            Channel::Unix(s) => s.read(buf),
            Channel::File(f) => f.read(buf),
        }
    }
}

impl Write for Channel {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Channel::Tcp(s) => s.write(buf),
            Channel::Unix(s) => s.write(buf),
            Channel::File(f) => f.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Channel::Tcp(s) => s.flush(),
            Channel::Unix(s) => s.flush(),
            Channel::File(f) => f.sync_data(),
        }
    }
}

impl Uri {
    /// Turns an I/O error of doing `what` here into a [`TransportError`].
    fn failed(&self, what: &'static str) -> impl Fn(std::io::Error) -> TransportError + '_ {
        move |source| TransportError::Io {
            what,
            uri: self.to_string(),
            source,
        }
    }
}

/// The source's side: connects to a waiting target, or creates the
/// snapshot file (refusing to overwrite one).
pub fn connect(uri: &Uri) -> Result<Channel, TransportError> {
    connect_unless(uri, &Cancel::default())
}

/// [`connect`], given up with [`TransportError::Cancelled`] within
/// [`ACCEPT_POLL`] of `cancel` (a VMM that quits while a connection is
/// being made: an unanswered SYN, a target whose backlog is full). Name
/// resolution (getaddrinfo) is not cancellable; a numeric address, as
/// migration URIs usually give, needs none.
pub fn connect_unless(uri: &Uri, cancel: &Cancel) -> Result<Channel, TransportError> {
    match uri {
        Uri::Tcp(addr) => {
            let addrs: Vec<_> = addr
                .to_socket_addrs()
                .map_err(uri.failed("Cannot resolve"))?
                .collect();
            let mut last = None;
            for a in addrs {
                match connect_socket(&SockAddr::from(a), cancel, uri) {
                    Ok(socket) => {
                        let stream = TcpStream::from(socket);
                        // Frames are written whole; no need to wait for more.
                        stream
                            .set_nodelay(true)
                            .map_err(uri.failed("Cannot set up"))?;
                        return Ok(Channel::Tcp(stream));
                    }
                    Err(e @ TransportError::Cancelled(_)) => return Err(e),
                    Err(e) => last = Some(e),
                }
            }
            Err(last.unwrap_or_else(|| {
                uri.failed("Cannot resolve")(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no address",
                ))
            }))
        }
        Uri::Unix(path) => {
            let addr = SockAddr::unix(path).map_err(uri.failed("Cannot connect to"))?;
            connect_socket(&addr, cancel, uri).map(|s| Channel::Unix(UnixStream::from(s)))
        }
        // Owner-only: the snapshot holds the shared pages in plaintext.
        Uri::File(path) => OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map(Channel::File)
            .map_err(uri.failed("Cannot create")),
    }
}

/// A stream socket connected to `addr` without blocking in connect(2):
/// waits in [`ACCEPT_POLL`] slices, watching `cancel`, for the kernel to
/// finish (TCP) or for room in the listener's backlog (Unix).
fn connect_socket(addr: &SockAddr, cancel: &Cancel, uri: &Uri) -> Result<Socket, TransportError> {
    let failed = uri.failed("Cannot connect to");
    let socket = Socket::new(addr.domain(), Type::STREAM, None)
        .and_then(|s| s.set_nonblocking(true).map(|()| s))
        .map_err(&failed)?;
    loop {
        match socket.connect(addr) {
            // Connected (EISCONN: by the attempt a signal interrupted).
            Ok(()) => break,
            Err(e) if e.raw_os_error() == Some(libc::EISCONN) => break,
            // TCP: under way (EALREADY: since an interrupted attempt);
            // done when the socket is writable.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINPROGRESS | libc::EALREADY)) => {
                wait_for(socket.as_raw_fd(), libc::POLLOUT, cancel, uri)?;
                match socket.take_error() {
                    Ok(None) => break,
                    Ok(Some(e)) | Err(e) => return Err(failed(e)),
                }
            }
            // Unix: the listener's backlog is full; try again. (For TCP
            // EAGAIN means no local port is free: an error, as before.)
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    && addr.domain() == socket2::Domain::UNIX =>
            {
                if cancel.is_cancelled() {
                    return Err(TransportError::Cancelled(uri.clone()));
                }
                std::thread::sleep(ACCEPT_POLL);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(failed(e)),
        }
    }
    socket
        .set_nonblocking(false)
        .map_err(uri.failed("Cannot set up"))?;
    Ok(socket)
}

/// Waits until `fd` has one of `events`, in [`ACCEPT_POLL`] slices,
/// watching `cancel`.
fn wait_for(
    fd: std::os::unix::io::RawFd,
    events: libc::c_short,
    cancel: &Cancel,
    uri: &Uri,
) -> Result<(), TransportError> {
    loop {
        if cancel.is_cancelled() {
            return Err(TransportError::Cancelled(uri.clone()));
        }
        let mut pfd = libc::pollfd {
            fd,
            events,
            revents: 0,
        };
        let ms = libc::c_int::try_from(ACCEPT_POLL.as_millis()).unwrap_or(100);
        // SAFETY: one pollfd, live for the call, over a socket the caller
        // owns for at least as long.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n > 0 {
            return Ok(());
        }
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(uri.failed("Cannot wait on")(e));
            }
        }
    }
}

/// Cancels a migration (or a wait for one) from another thread.
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

    /// Shuts `channel` down at [`Cancel::cancel`] (at once if that came
    /// already).
    pub fn attach(&self, channel: &Channel) {
        if let Ok(c) = channel.try_clone() {
            *self.channel.lock().expect("cancel lock poisoned") = Some(c);
        }
        if self.is_cancelled() {
            channel.shutdown();
        }
    }

    /// Forgets the channel [`Cancel::attach`] kept (the migration is over,
    /// its connection may close).
    pub fn detach(&self) {
        *self.channel.lock().expect("cancel lock poisoned") = None;
    }

    /// [`MigrationError::Cancelled`] once cancelled.
    pub(crate) fn check(&self) -> Result<(), crate::MigrationError> {
        if self.is_cancelled() {
            Err(crate::MigrationError::Cancelled)
        } else {
            Ok(())
        }
    }
}

/// How often a waiting [`Listener::accept_unless`] looks at its cancel.
pub const ACCEPT_POLL: Duration = Duration::from_millis(100);

/// The target's side, before the source comes.
pub struct Listener {
    uri: Uri,
    bound: Bound,
}

/// What a [`Listener`] holds.
enum Bound {
    /// Waiting for a TCP connection.
    Tcp(TcpListener),
    /// Waiting for a Unix socket connection (the socket is removed when
    /// the listener is dropped).
    Unix(UnixListener),
    /// A snapshot to read.
    File(PathBuf),
}

impl Listener {
    /// Listens at `uri` (a file is only checked to exist).
    pub fn bind(uri: &Uri) -> Result<Listener, TransportError> {
        let bound = match uri {
            Uri::Tcp(addr) => {
                let addrs: Vec<_> = addr
                    .to_socket_addrs()
                    .map_err(uri.failed("Cannot resolve"))?
                    .collect();
                TcpListener::bind(&addrs[..])
                    .map(Bound::Tcp)
                    .map_err(uri.failed("Cannot listen on"))?
            }
            Uri::Unix(path) => UnixListener::bind(path)
                .map(Bound::Unix)
                .map_err(uri.failed("Cannot listen on"))?,
            Uri::File(path) => {
                let meta = std::fs::metadata(path).map_err(uri.failed("Cannot read"))?;
                if !meta.is_file() {
                    return Err(uri.failed("Cannot read")(not_a_file()));
                }
                Bound::File(path.clone())
            }
        };
        let listener = Listener {
            uri: uri.clone(),
            bound,
        };
        // Accepts never block: a connection that goes away between poll
        // and accept must not stop a cancel.
        let nonblocking = match &listener.bound {
            Bound::Tcp(l) => l.set_nonblocking(true),
            Bound::Unix(l) => l.set_nonblocking(true),
            Bound::File(_) => Ok(()),
        };
        nonblocking.map_err(uri.failed("Cannot listen on"))?;
        Ok(listener)
    }

    /// The TCP port it listens on (for `tcp:HOST:0`).
    pub fn port(&self) -> Option<u16> {
        match &self.bound {
            Bound::Tcp(l) => l.local_addr().ok().map(|a| a.port()),
            _ => None,
        }
    }

    /// Waits for the source (or opens the snapshot).
    pub fn accept(&self) -> Result<Channel, TransportError> {
        self.accept_unless(&Cancel::default())
    }

    /// [`Listener::accept`], given up with [`TransportError::Cancelled`]
    /// within [`ACCEPT_POLL`] of `cancel` (a VMM that quits while it waits).
    pub fn accept_unless(&self, cancel: &Cancel) -> Result<Channel, TransportError> {
        let uri = &self.uri;
        loop {
            let got = match &self.bound {
                Bound::Tcp(l) => {
                    wait_for(l.as_raw_fd(), libc::POLLIN, cancel, uri)?;
                    l.accept().map(|(s, _)| {
                        // Frames are written whole; no need to wait for more.
                        let _ = s.set_nodelay(true);
                        Channel::Tcp(s)
                    })
                }
                Bound::Unix(l) => {
                    wait_for(l.as_raw_fd(), libc::POLLIN, cancel, uri)?;
                    l.accept().map(|(s, _)| Channel::Unix(s))
                }
                Bound::File(path) => return open_snapshot(path).map_err(uri.failed("Cannot read")),
            };
            match got {
                Ok(channel) => {
                    // Accepted sockets are not the listener's: blocking.
                    let blocking = match &channel {
                        Channel::Tcp(s) => s.set_nonblocking(false),
                        Channel::Unix(s) => s.set_nonblocking(false),
                        Channel::File(_) => Ok(()),
                    };
                    blocking.map_err(uri.failed("Cannot set up"))?;
                    return Ok(channel);
                }
                // Gone between poll and accept, or a signal: wait again.
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::Interrupted
                            | std::io::ErrorKind::ConnectionAborted
                    ) => {}
                Err(e) => return Err(uri.failed("Cannot accept on")(e)),
            }
        }
    }
}

/// The error for a snapshot path that is not a regular file (a FIFO or a
/// device would block the reader, or never end).
fn not_a_file() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file")
}

/// Opens a snapshot for reading; what is not a regular file (a FIFO, a
/// device, a directory) is refused before anything opens it.
fn open_snapshot(path: &std::path::Path) -> std::io::Result<Channel> {
    // O_PATH opens nothing (no FIFO waits, no device's open runs): the
    // file's type is checked first, then that very file is opened to read.
    let probe = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH)
        .open(path)?;
    if !probe.metadata()?.is_file() {
        return Err(not_a_file());
    }
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOCTTY)
        .open(format!("/proc/self/fd/{}", probe.as_raw_fd()))?;
    Ok(Channel::File(file))
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let (Bound::Unix(_), Uri::Unix(path)) = (&self.bound, &self.uri) {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_parse_and_print_back() {
        for s in [
            "tcp:127.0.0.1:4444",
            "tcp:[::1]:0",
            "tcp:localhost:80",
            "unix:/tmp/m.sock",
            "file:/tmp/vm.snap",
        ] {
            let uri: Uri = s.parse().unwrap();
            assert_eq!(uri.to_string(), s);
        }
        // QEMU's `tcp::PORT`.
        assert_eq!(
            "tcp::4444".parse::<Uri>().unwrap(),
            Uri::Tcp("0.0.0.0:4444".into())
        );
        for bad in [
            "",
            "tcp",
            "tcp:",
            "tcp:host",
            "tcp:host:99999",
            "rdma:x:1",
            "unix:",
            "exec:cat",
        ] {
            assert!(bad.parse::<Uri>().is_err(), "{bad}");
        }
    }

    fn round_trip(uri: &Uri) {
        let listener = Listener::bind(uri).unwrap();
        let uri = match (uri, listener.port()) {
            (Uri::Tcp(_), Some(port)) => Uri::Tcp(format!("127.0.0.1:{port}")),
            (other, _) => other.clone(),
        };
        let sender = std::thread::spawn(move || {
            let mut c = connect(&uri).unwrap();
            c.write_all(b"frames").unwrap();
            let mut ack = [0u8; 3];
            c.read_exact(&mut ack).unwrap();
            ack
        });
        let mut c = listener.accept().unwrap();
        let mut got = [0u8; 6];
        c.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"frames");
        c.write_all(b"ack").unwrap();
        assert_eq!(&sender.join().unwrap(), b"ack");
    }

    #[test]
    fn tcp_and_unix_carry_both_ways() {
        round_trip(&Uri::Tcp("127.0.0.1:0".into()));
        let path =
            std::env::temp_dir().join(format!("cgsvmm-transport-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        round_trip(&Uri::Unix(path.clone()));
        assert!(!path.exists(), "the listener removes its socket");
    }

    #[test]
    fn a_file_is_written_once_and_read_back() {
        let path =
            std::env::temp_dir().join(format!("cgsvmm-transport-{}.snap", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let uri = Uri::File(path.clone());
        assert!(Listener::bind(&uri).is_err(), "no snapshot yet");
        let mut out = connect(&uri).unwrap();
        assert!(!out.is_live());
        out.write_all(b"snapshot").unwrap();
        out.flush().unwrap();
        assert!(
            connect(&uri).is_err(),
            "an existing snapshot is never overwritten"
        );
        let mut back = String::new();
        Listener::bind(&uri)
            .unwrap()
            .accept()
            .unwrap()
            .read_to_string(&mut back)
            .unwrap();
        assert_eq!(back, "snapshot");
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn nobody_listening_is_a_clear_error() {
        let err = connect(&Uri::Unix("/nonexistent/m.sock".into()))
            .err()
            .unwrap();
        assert!(
            err.to_string()
                .starts_with("Cannot connect to unix:/nonexistent/m.sock"),
            "{err}"
        );
    }
}
