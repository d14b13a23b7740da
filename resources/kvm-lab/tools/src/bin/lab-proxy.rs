//! `lab-proxy`: a TCP relay for the kvm-lab scenarios that damages a
//! migration stream on its way, so a scenario can show a damaged stream
//! failing closed on a real KVM.
//!
//! ```text
//! lab-proxy LISTEN_PORT TARGET_PORT --flip-at OFFSET
//! ```
//!
//! Accepts one connection on 127.0.0.1:LISTEN_PORT, connects to
//! 127.0.0.1:TARGET_PORT and relays both ways; the byte at OFFSET of the
//! source-to-target direction is XORed with 0x01. Prints `lab-proxy:
//! listening on PORT` once bound and `lab-proxy: flipped byte OFFSET` the
//! moment it flips, and exits when both directions end.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Copies `from` to `to`, XORing the byte at stream offset `flip` (if any)
/// with 0x01; sets `flipped` once it did.
fn relay(mut from: TcpStream, mut to: TcpStream, flip: Option<u64>, flipped: &AtomicBool) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut offset = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(at) = flip {
            // usize -> u64 is lossless on 64-bit Linux.
            let end = offset + n as u64;
            if (offset..end).contains(&at) {
                let i = usize::try_from(at - offset).expect("inside the buffer");
                buf[i] ^= 0x01;
                flipped.store(true, Ordering::SeqCst);
                println!("lab-proxy: flipped byte {at}");
            }
            offset = end;
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}

fn run(listen: u16, target: u16, flip: u64) -> std::io::Result<bool> {
    let listener = TcpListener::bind(("127.0.0.1", listen))?;
    println!("lab-proxy: listening on {listen}");
    let (client, _) = listener.accept()?;
    let server = TcpStream::connect(("127.0.0.1", target))?;
    let flipped = Arc::new(AtomicBool::new(false));
    let up = {
        let (c, s, f) = (client.try_clone()?, server.try_clone()?, flipped.clone());
        std::thread::spawn(move || relay(c, s, Some(flip), &f))
    };
    relay(server, client, None, &flipped);
    let _ = up.join();
    Ok(flipped.load(Ordering::SeqCst))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let parsed = match args.as_slice() {
        [listen, target, flag, at] if flag == "--flip-at" => {
            match (listen.parse(), target.parse(), at.parse()) {
                (Ok(l), Ok(t), Ok(a)) => Some((l, t, a)),
                _ => None,
            }
        }
        _ => None,
    };
    let Some((listen, target, at)) = parsed else {
        eprintln!("usage: lab-proxy LISTEN_PORT TARGET_PORT --flip-at OFFSET");
        return ExitCode::from(2);
    };
    match run(listen, target, at) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            println!("lab-proxy: the stream ended before byte {at}");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("lab-proxy: {e}");
            ExitCode::from(1)
        }
    }
}
