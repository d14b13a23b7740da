//! A TCP relay between a migration's source and its target that the test
//! tampers with: it listens on a free port, takes one connection, connects
//! it on to the target, hands the source's direction to the test's
//! `forward` and copies the target's bytes back unchanged. Its thread is
//! joined when the [`Relay`] is dropped (both connections are shut down
//! first, so nothing it waits on outlives the test).

use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A running relay; its port (what it displays as) is what the source
/// migrates to.
pub struct Relay {
    port: u16,
    stop: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
    thread: Option<JoinHandle<()>>,
}

/// Which way the target's bytes go back.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Back {
    /// When the target's direction ends, the source's connection is shut
    /// down (the source reads its end at once).
    ThenClose,
    /// The source's connection stays as the forward direction leaves it.
    Only,
}

impl Relay {
    /// Starts a relay to `127.0.0.1:to`. `forward` gets the source's
    /// stream, the target's and the stop flag (set when the relay is
    /// dropped: a `forward` that waits must watch it, see [`Relay::pause`]).
    pub fn start<F>(to: u16, back: Back, forward: F) -> Relay
    where
        F: FnOnce(TcpStream, TcpStream, &AtomicBool) + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let open = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (stop, open) = (Arc::clone(&stop), Arc::clone(&open));
            std::thread::spawn(move || relay(&listener, to, back, &stop, &open, forward))
        };
        Relay {
            port,
            stop,
            open,
            thread: Some(thread),
        }
    }

    /// Sleeps for `time`, or less if the relay is being dropped.
    pub fn pause(stop: &AtomicBool, time: Duration) {
        let until = Instant::now() + time;
        while !stop.load(Ordering::SeqCst) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn relay<F>(
    listener: &TcpListener,
    to: u16,
    back: Back,
    stop: &AtomicBool,
    open: &Mutex<Vec<TcpStream>>,
    forward: F,
) where
    F: FnOnce(TcpStream, TcpStream, &AtomicBool),
{
    let from_src = loop {
        match listener.accept() {
            Ok((stream, _)) => break stream,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => return,
        }
    };
    from_src.set_nonblocking(false).unwrap();
    let target = std::net::SocketAddr::from(([127, 0, 0, 1], to));
    let to_dst = match TcpStream::connect_timeout(&target, Duration::from_secs(5)) {
        Ok(s) => s,
        Err(e) => {
            // The source sees its connection close; say why here.
            eprintln!("relay: cannot connect to {target}: {e}");
            return;
        }
    };
    let (mut back_from_dst, mut back_to_src) =
        (to_dst.try_clone().unwrap(), from_src.try_clone().unwrap());
    {
        let mut open = open.lock().unwrap_or_else(PoisonError::into_inner);
        open.push(from_src.try_clone().unwrap());
        open.push(to_dst.try_clone().unwrap());
    }
    // A drop that came before the streams were listed shuts them here.
    if stop.load(Ordering::SeqCst) {
        let _ = from_src.shutdown(Shutdown::Both);
        let _ = to_dst.shutdown(Shutdown::Both);
    }
    std::thread::scope(|s| {
        s.spawn(move || {
            let _ = std::io::copy(&mut back_from_dst, &mut back_to_src);
            if back == Back::ThenClose {
                let _ = back_to_src.shutdown(Shutdown::Both);
            }
        });
        forward(from_src, to_dst, stop);
    });
    // Both directions are done: the connections close now.
    open.lock().unwrap_or_else(PoisonError::into_inner).clear();
}

impl std::fmt::Display for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.port)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for stream in self
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            let _ = stream.shutdown(Shutdown::Both);
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
