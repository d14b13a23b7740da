//! The migration stream's wire format, and nothing else: how a frame is
//! laid out, which kinds exist, how long each may be, and how a reader
//! tells a good frame from a damaged one. What the frames say, and in which
//! order they must come, belongs to the sender and the receiver.
//!
//! # Layout
//!
//! A stream is a sequence of frames. Each is a 16-byte [`FrameHeader`]
//! (little endian) followed by `length` bytes of payload:
//!
//! ```text
//! +0  u16 kind       FrameKind; 0 is Invalid and never sent
//! +2  u16 flags      reserved, 0
//! +4  u32 length     payload bytes, at most FrameKind::max_length()
//! +8  u32 checksum   CRC32C over the header (checksum field zero) and payload
//! +12 u32 reserved   0
//! +16 payload
//! ```
//!
//! The first frame is a [`FrameKind::Hello`] whose payload is [`MAGIC`] and
//! the [`VERSION`] (u32 LE): a reader that finds anything else stops before
//! it writes a byte of guest memory. The length is checked against the
//! kind's bound *before* any allocation, and the checksum covers every byte
//! of the frame, so a flipped bit anywhere in the stream (in private pages
//! or not) is caught here; helper records are in addition authenticated by
//! the helpers.
//!
//! # Sequence
//!
//! ```text
//! source (guest running)                                   target (inmigrate)
//!  |<--------------------------------- Hello {magic, version}  | (live: the target speaks first)
//!  | Hello {magic, version} ---------------------------------->|
//!  | Config {RAM layout, vCPUs, helpers, backend, helper ABI,  |
//!  |         CPUID, MSR list, live|snapshot} ----------------->| checked before anything is written
//!  | SessionOffer {source helper nonce} ---------------------->| target helpers: BEGIN(TARGET)
//!  |<---------------------- SessionAnswer {target nonce, id}   | (live only)
//!  |   source helpers: PEER; ids differ -> another transport key: Error
//!  | SharedMap {ranges} -------------------------------------->| validated: aligned, ordered, in RAM
//!  | SharedPages {gpa, page} x <=256 ... --------------------->| only into pages the map shares
//!  | HelperRecords {record} x <=256 ... ---------------------->| to the target helpers (authenticated)
//!  |   round 0: every page; precopy rounds: the pages dirtied since (at
//!  |   ever newer generations), with a new SharedMap first if the guest
//!  |   converted pages; a snapshot has round 0 only, its guest paused first
//!  | -- switchover: the source pauses its main vCPUs (the mirror runs on) --
//!  | SharedMap, SharedPages, HelperRecords: the last dirty pages -------->| every page of the last map
//!  |                                                           |   must have arrived
//!  | DeviceState, VmState, VcpuState x vCPUs ---------------->| decoded, bounded, versioned
//!  | Seal {the source helpers' seal, over the stream hash} --->|
//!  | End ----------------------------------------------------->| state restored (not run), then
//!  |                                                           |   VERIFY_SEAL (every private page
//!  |                                                           |   written, stream hash equal),
//!  |<------------------------------------ Ack {ack token}      |   guest may run (or stays paused)
//!  |   or <------------------------- Nack {nack token, reason} |   (a refused restore: nack too)
//!  | postmigrate (ack) / running again (nack)                  |
//!  either side may send Error {reason} instead of its next frame and hang up; after the
//!  Seal only a token the target's helpers revealed counts (checked against the commitments
//!  SEAL gave the source): without one the source leaves its guest paused
//! ```
//!
//! The stream hash ([`StreamHash`]) covers every frame from the Config to
//! the Seal in order: whole the frames the helpers do not see
//! (configuration, session offer, shared map and pages, device, VM and
//! vCPU state), and each helper record's header with its tag. The seal
//! carries it, so a man in the middle who recomputes checksums still
//! cannot change, drop, add, split or move any frame: the order in which
//! plaintext and helper records of a page that changed hands arrive is
//! the order the source sent. Frame headers' reserved bytes must be 0.
//!
//! A snapshot file holds the same frames without the answers: the session
//! is the source helpers' nonce alone (`SESSION_BEGIN(SNAPSHOT_*)`), and a
//! file can be restored more than once.
//!
//! # Payloads
//!
//! | kind | payload |
//! |---|---|
//! | Hello | `MAGIC` (8) + `VERSION` (u32 LE) |
//! | Config, DeviceState, VmState, VcpuState | a state record (`state.rs`: u16 version, u16 0, postcard) |
//! | SessionOffer | nonce (32); a snapshot's also the session id (16) |
//! | SessionAnswer | nonce (32) + session id (16) |
//! | SharedMap | `GpaRange` {start, end: u64 LE} per range, ascending |
//! | SharedPages | per page: gpa (u64 LE) + 4096 bytes |
//! | HelperRecords | helper records, `RECORD_STRIDE` (4160) bytes each, as the helpers made them |
//! | Seal | `SealRecord` (136) |
//! | End | empty |
//! | Ack | the ack token (16) |
//! | Nack | the nack token (16) + UTF-8 text |
//! | Error | UTF-8 text |

use std::io::{ErrorKind, Read, Write};

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use cgsvmm_fw_abi::helper::RECORD_STRIDE;

/// First bytes of a stream's Hello payload.
pub const MAGIC: [u8; 8] = *b"CGSVMIG\0";
/// Version of this format (the Hello payload carries it).
pub const VERSION: u32 = 2;
/// Bytes of a [`FrameHeader`].
pub const HEADER_SIZE: usize = 16;

/// Frame header, as it is on the wire (little endian).
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct FrameHeader {
    /// [`FrameKind`].
    pub kind: u16,
    /// Reserved, 0.
    pub flags: u16,
    /// Payload bytes.
    pub length: u32,
    /// CRC32C of the header (with this field 0) and the payload.
    pub checksum: u32,
    /// Reserved, 0.
    pub reserved: u32,
}

/// Kinds of frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum FrameKind {
    /// Magic and version: the first frame.
    Hello = 1,
    /// The source's configuration, checked by the target first.
    Config = 2,
    /// The source helpers' session nonce.
    SessionOffer = 3,
    /// The target helpers' nonce (target to source).
    SessionAnswer = 4,
    /// Plaintext shared pages.
    SharedPages = 5,
    /// Helper records, byte for byte as the helpers produced them.
    HelperRecords = 6,
    /// The shared/private map (shared ranges).
    SharedMap = 7,
    /// Device state records.
    DeviceState = 8,
    /// VM-wide state (irqchip, PIT, clock).
    VmState = 9,
    /// One vCPU's state.
    VcpuState = 10,
    /// The source helpers' sealed end record.
    Seal = 11,
    /// No more frames.
    End = 12,
    /// The target took the VM: the ack token its helpers revealed (target
    /// to source).
    Ack = 13,
    /// The peer gives up, with a reason (either way).
    Error = 14,
    /// The target can never take this migration: the nack token its
    /// helpers revealed, then a reason (target to source).
    Nack = 15,
}

impl FrameKind {
    /// The kind numbered `n`, if there is one (0, Invalid, is none).
    pub fn from_u16(n: u16) -> Option<Self> {
        use FrameKind::*;
        Some(match n {
            1 => Hello,
            2 => Config,
            3 => SessionOffer,
            4 => SessionAnswer,
            5 => SharedPages,
            6 => HelperRecords,
            7 => SharedMap,
            8 => DeviceState,
            9 => VmState,
            10 => VcpuState,
            11 => Seal,
            12 => End,
            13 => Ack,
            14 => Error,
            15 => Nack,
            _ => return None,
        })
    }

    /// The longest payload this kind may have. Page frames hold up to 256
    /// pages (or helper records), state frames what a VM of the largest
    /// supported size needs, with room to grow.
    pub const fn max_length(self) -> u32 {
        use FrameKind::*;
        match self {
            Hello => 12,
            Config => 64 << 10,
            SessionOffer | SessionAnswer => 256,
            SharedPages => 256 * (8 + 4096),
            HelperRecords => 256 * (64 + 4096),
            SharedMap => 1 << 20,
            DeviceState | VmState => 256 << 10,
            VcpuState => 64 << 10,
            Seal => 1024,
            End => 0,
            Ack => 16,
            Error => 4096,
            Nack => 16 + 4096,
        }
    }
}

/// A frame read from a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Its kind.
    pub kind: FrameKind,
    /// Its payload.
    pub payload: Vec<u8>,
}

/// What is wrong with a stream.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The stream ended inside a frame.
    #[error(
        "The migration stream ends inside a frame ({got} of {want} bytes): the peer closed \
         the connection, or the file is cut short"
    )]
    Truncated {
        /// Bytes read.
        got: usize,
        /// Bytes the frame needs.
        want: usize,
    },
    /// A kind this version does not know (or Invalid).
    #[error("Unknown migration frame kind {0}")]
    UnknownKind(u16),
    /// A length past the kind's bound.
    #[error("Migration frame {kind:?} of {length} bytes exceeds its bound of {max}")]
    TooLong {
        /// The kind.
        kind: FrameKind,
        /// The length it claims.
        length: u32,
        /// Its bound.
        max: u32,
    },
    /// Reserved fields not zero.
    #[error("Migration frame header has reserved bits set")]
    Reserved,
    /// The checksum does not match: the stream was damaged.
    #[error(
        "Migration frame {kind:?} is damaged (checksum {found:#010x}, computed {computed:#010x})"
    )]
    Checksum {
        /// The kind.
        kind: FrameKind,
        /// The checksum in the header.
        found: u32,
        /// The checksum of what arrived.
        computed: u32,
    },
    /// The Hello frame is not ours, or of another version.
    #[error(
        "The peer does not speak cgsvmm migration version {VERSION} (not a cgsvmm migration \
         stream or target: a QMP socket, another program, another version?)"
    )]
    BadHello,
    /// Reading or writing failed.
    #[error("Migration stream I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// SHA-256 over the stream in its order: every frame between the Hello
/// and the Seal, each as kind (u16 LE), length (u32 LE) and what it
/// carries: the whole payload of the frames the helpers do not see
/// (configuration, session offer, shared map and pages, device, VM and
/// vCPU state), and of a HelperRecords frame each record's 64-byte header
/// (page, generation, nonce, tag and the reserved bytes; the tag binds the
/// ciphertext). Source and target compute it over what they sent and
/// received; the helpers seal and compare it, so no frame can be altered,
/// dropped, added, split or moved on the way, helper records included.
#[derive(Clone, Default)]
pub struct StreamHash(sha2::Sha256);

impl StreamHash {
    /// Adds a frame if it is of a hashed kind.
    pub fn frame(&mut self, kind: FrameKind, payload: &[u8]) {
        use sha2::Digest;
        use FrameKind::*;
        let whole = matches!(
            kind,
            Config | SessionOffer | SharedMap | SharedPages | DeviceState | VmState | VcpuState
        );
        if !whole && kind != HelperRecords {
            return;
        }
        self.0.update((kind as u16).to_le_bytes());
        self.0.update((payload.len() as u32).to_le_bytes());
        if whole || !payload.len().is_multiple_of(RECORD_STRIDE) {
            // (Records of another size are refused; hash them whole.)
            self.0.update(payload);
        } else {
            for record in payload.chunks(RECORD_STRIDE) {
                self.0.update(&record[..RECORD_HEADER]);
            }
        }
    }

    /// The hash so far.
    pub fn value(&self) -> [u8; 32] {
        use sha2::Digest;
        self.0.clone().finalize().into()
    }
}

/// Bytes of a helper record's header (before its page of ciphertext).
const RECORD_HEADER: usize = RECORD_STRIDE - cgsvmm_fw_abi::PAGE_SIZE;

/// The checksum of a frame: CRC32C over the header with its checksum zero,
/// then the payload.
fn checksum(header: &FrameHeader, payload: &[u8]) -> u32 {
    let mut h = *header;
    h.checksum = 0;
    crc32c::crc32c_append(crc32c::crc32c(h.as_bytes()), payload)
}

/// The header of a frame of `kind` carrying `payload`.
pub fn header(kind: FrameKind, payload: &[u8]) -> Result<FrameHeader, ProtocolError> {
    let max = kind.max_length();
    let length = u32::try_from(payload.len())
        .ok()
        .filter(|&l| l <= max)
        .ok_or(ProtocolError::TooLong {
            kind,
            length: payload.len().min(u32::MAX as usize) as u32,
            max,
        })?;
    let mut h = FrameHeader {
        kind: kind as u16,
        length,
        ..Default::default()
    };
    h.checksum = checksum(&h, payload);
    Ok(h)
}

/// Writes one frame.
pub fn write_frame(
    w: &mut impl Write,
    kind: FrameKind,
    payload: &[u8],
) -> Result<(), ProtocolError> {
    let h = header(kind, payload)?;
    w.write_all(h.as_bytes())?;
    w.write_all(payload)?;
    Ok(())
}

/// Writes the Hello frame that starts a stream.
pub fn write_hello(w: &mut impl Write) -> Result<(), ProtocolError> {
    let mut payload = MAGIC.to_vec();
    payload.extend_from_slice(&VERSION.to_le_bytes());
    write_frame(w, FrameKind::Hello, &payload)
}

/// The text a peer sent (an Error or Nack reason), fit for a terminal or
/// a log: invalid UTF-8 replaced, control characters (escape sequences,
/// carriage returns, bells) shown escaped, at most [`PEER_TEXT_MAX`]
/// characters.
pub fn peer_text(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::new();
    for (n, c) in text.chars().enumerate() {
        if n == PEER_TEXT_MAX {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Most characters of a peer's text that are shown.
pub const PEER_TEXT_MAX: usize = 1024;

/// Whether a read failed because its timeout passed.
pub fn timed_out(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

/// Reads exactly `buf.len()` bytes; `Ok(0)` if the stream ended before the
/// first, the count read if it ended after.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> Result<usize, std::io::Error> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Reads the next frame: `None` at a clean end of stream (between frames).
/// The header is checked (kind, bound, reserved bits) before the payload is
/// allocated, and the checksum before the frame is returned.
pub fn read_frame(r: &mut impl Read) -> Result<Option<Frame>, ProtocolError> {
    let mut payload = Vec::new();
    Ok(read_frame_into(r, &mut payload)?.map(|kind| Frame { kind, payload }))
}

/// [`read_frame`] into a buffer the caller reuses: `payload` holds exactly
/// the payload when a kind is returned.
pub fn read_frame_into(
    r: &mut impl Read,
    payload: &mut Vec<u8>,
) -> Result<Option<FrameKind>, ProtocolError> {
    let mut raw = [0u8; HEADER_SIZE];
    match read_full(r, &mut raw)? {
        0 => return Ok(None),
        HEADER_SIZE => {}
        got => {
            return Err(ProtocolError::Truncated {
                got,
                want: HEADER_SIZE,
            })
        }
    }
    let h = FrameHeader::read_from_bytes(&raw).expect("16 bytes make a header");
    let kind = FrameKind::from_u16(h.kind).ok_or(ProtocolError::UnknownKind(h.kind))?;
    if h.flags != 0 || h.reserved != 0 {
        return Err(ProtocolError::Reserved);
    }
    let max = kind.max_length();
    if h.length > max {
        return Err(ProtocolError::TooLong {
            kind,
            length: h.length,
            max,
        });
    }
    payload.resize(h.length as usize, 0);
    let got = read_full(r, payload)?;
    if got < payload.len() {
        return Err(ProtocolError::Truncated {
            got: HEADER_SIZE + got,
            want: HEADER_SIZE + payload.len(),
        });
    }
    let computed = checksum(&h, payload);
    if computed != h.checksum {
        return Err(ProtocolError::Checksum {
            kind,
            found: h.checksum,
            computed,
        });
    }
    Ok(Some(kind))
}

/// Reads the Hello frame that must start a stream. Anything else in its
/// place, whatever its bytes, is [`ProtocolError::BadHello`]: the peer is
/// not a cgsvmm migration stream of this version.
pub fn read_hello(r: &mut impl Read) -> Result<(), ProtocolError> {
    let mut raw = [0u8; HEADER_SIZE + 12];
    let got = read_full(r, &mut raw)?;
    if got == 0 {
        return Err(ProtocolError::Truncated {
            got: 0,
            want: HEADER_SIZE,
        });
    }
    let want = {
        let mut hello = Vec::with_capacity(raw.len());
        write_hello(&mut hello)?;
        hello
    };
    if got < raw.len() || raw[..] != want[..] {
        return Err(ProtocolError::BadHello);
    }
    Ok(())
}
#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ALL: [FrameKind; 15] = [
        FrameKind::Hello,
        FrameKind::Config,
        FrameKind::SessionOffer,
        FrameKind::SessionAnswer,
        FrameKind::SharedPages,
        FrameKind::HelperRecords,
        FrameKind::SharedMap,
        FrameKind::DeviceState,
        FrameKind::VmState,
        FrameKind::VcpuState,
        FrameKind::Seal,
        FrameKind::End,
        FrameKind::Ack,
        FrameKind::Error,
        FrameKind::Nack,
    ];

    #[test]
    fn header_layout() {
        assert_eq!(size_of::<FrameHeader>(), HEADER_SIZE);
        assert_eq!(std::mem::offset_of!(FrameHeader, length), 4);
        assert_eq!(std::mem::offset_of!(FrameHeader, checksum), 8);
        for kind in ALL {
            assert_eq!(FrameKind::from_u16(kind as u16), Some(kind));
        }
        assert_eq!(FrameKind::from_u16(0), None, "0 is Invalid");
        assert_eq!(FrameKind::from_u16(16), None);
    }

    /// A stream of one frame of every kind (payloads at their bound or
    /// patterned), ended cleanly.
    fn sample() -> (Vec<u8>, Vec<(FrameKind, Vec<u8>)>) {
        let mut stream = Vec::new();
        write_hello(&mut stream).unwrap();
        let mut frames = vec![(
            FrameKind::Hello,
            [&MAGIC[..], &VERSION.to_le_bytes()].concat(),
        )];
        for kind in &ALL[1..] {
            let len = (kind.max_length() as usize).min(3000);
            let payload: Vec<u8> = (0..len).map(|i| (i * 7 + *kind as usize) as u8).collect();
            write_frame(&mut stream, *kind, &payload).unwrap();
            frames.push((*kind, payload));
        }
        (stream, frames)
    }

    #[test]
    fn every_kind_round_trips_and_the_stream_ends_cleanly() {
        let (stream, frames) = sample();
        let mut r = &stream[..];
        read_hello(&mut &stream[..]).unwrap();
        for (kind, payload) in frames {
            let f = read_frame(&mut r).unwrap().unwrap();
            assert_eq!((f.kind, f.payload), (kind, payload));
        }
        assert!(read_frame(&mut r).unwrap().is_none());
    }

    #[test]
    fn lengths_past_their_bound_are_refused_before_any_allocation() {
        assert!(matches!(
            header(FrameKind::End, &[1]),
            Err(ProtocolError::TooLong { .. })
        ));
        // A header claiming 4 GiB: refused from the header alone (the
        // reader has nothing more to give).
        let mut h = FrameHeader {
            kind: FrameKind::SharedPages as u16,
            length: u32::MAX,
            ..Default::default()
        };
        h.checksum = checksum(&h, &[]);
        assert!(matches!(
            read_frame(&mut h.as_bytes()),
            Err(ProtocolError::TooLong {
                length: u32::MAX,
                ..
            })
        ));
    }

    #[test]
    fn unknown_kinds_reserved_bits_and_foreign_hellos_are_refused() {
        let mut h = FrameHeader {
            kind: 99,
            ..Default::default()
        };
        assert!(matches!(
            read_frame(&mut h.as_bytes()),
            Err(ProtocolError::UnknownKind(99))
        ));
        h.kind = 0;
        assert!(matches!(
            read_frame(&mut h.as_bytes()),
            Err(ProtocolError::UnknownKind(0))
        ));
        let mut s = Vec::new();
        let h = header(FrameKind::End, &[]).unwrap();
        let mut raw = h.as_bytes().to_vec();
        raw[2] = 1;
        assert!(matches!(
            read_frame(&mut &raw[..]),
            Err(ProtocolError::Reserved)
        ));
        // Another version.
        let other = [&MAGIC[..], &(VERSION + 1).to_le_bytes()].concat();
        write_frame(&mut s, FrameKind::Hello, &other).unwrap();
        assert!(matches!(
            read_hello(&mut &s[..]),
            Err(ProtocolError::BadHello)
        ));
        let mut s = Vec::new();
        write_frame(&mut s, FrameKind::Config, b"{}").unwrap();
        assert!(matches!(
            read_hello(&mut &s[..]),
            Err(ProtocolError::BadHello)
        ));
        assert!(matches!(
            read_hello(&mut &[][..]),
            Err(ProtocolError::Truncated { .. })
        ));
    }

    /// Reads a whole stream; the first error, if any.
    fn read_all(mut r: &[u8]) -> Result<usize, ProtocolError> {
        let mut n = 0;
        while read_frame(&mut r)?.is_some() {
            n += 1;
        }
        Ok(n)
    }

    #[test]
    fn a_stream_cut_anywhere_inside_a_frame_is_truncated() {
        let (stream, frames) = sample();
        let mut boundaries = vec![0];
        let mut at = 0;
        for (_, p) in &frames {
            at += HEADER_SIZE + p.len();
            boundaries.push(at);
        }
        for cut in 0..stream.len() {
            let result = read_all(&stream[..cut]);
            if boundaries.contains(&cut) {
                assert!(result.is_ok(), "cut at a boundary {cut}: {result:?}");
            } else {
                assert!(
                    matches!(result, Err(ProtocolError::Truncated { .. })),
                    "cut at {cut}: {result:?}"
                );
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 3000, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn any_flipped_bit_anywhere_is_caught(at in any::<prop::sample::Index>(), bit in 0u8..8) {
            let (mut stream, frames) = sample();
            let i = at.index(stream.len());
            stream[i] ^= 1 << bit;
            // Never the frames that were sent: an error (a checksum, a kind,
            // a bound, a cut) somewhere.
            let mut r = &stream[..];
            let mut same = true;
            let mut failed = false;
            for (kind, payload) in &frames {
                match read_frame(&mut r) {
                    Ok(Some(f)) => same &= f.kind == *kind && &f.payload == payload,
                    Ok(None) => { same = false; break; }
                    Err(_) => { failed = true; break; }
                }
            }
            prop_assert!(failed, "flipped bit {} of byte {} went unnoticed (frames alike: {})", bit, i, same);
        }

        #[test]
        fn arbitrary_bytes_never_panic_or_allocate_past_a_bound(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut r = &bytes[..];
            while let Ok(Some(f)) = read_frame(&mut r) {
                prop_assert!(f.payload.len() <= f.kind.max_length() as usize);
            }
        }
    }

    #[test]
    fn a_peers_text_cannot_drive_a_terminal() {
        assert_eq!(peer_text(b"plain reason"), "plain reason");
        let hostile = b"ok\x1b[2J\x1b]0;owned\x07\rdone\n\xff";
        let shown = peer_text(hostile);
        assert!(!shown.chars().any(char::is_control), "{shown:?}");
        assert!(
            shown.contains("\\u{1b}[2J") && shown.contains('\u{fffd}'),
            "{shown:?}"
        );
        let long = vec![b'a'; 5000];
        assert_eq!(peer_text(&long).chars().count(), PEER_TEXT_MAX + 1);
    }

    #[test]
    fn the_stream_hash_binds_every_frame_in_order() {
        let mut a = StreamHash::default();
        a.frame(FrameKind::Config, b"config");
        a.frame(FrameKind::SharedPages, b"pages");
        let base = a.value();
        // The Hello, the seal and what follows are not hashed.
        for kind in [
            FrameKind::Seal,
            FrameKind::End,
            FrameKind::Ack,
            FrameKind::Hello,
        ] {
            let mut b = a.clone();
            b.frame(kind, b"x");
            assert_eq!(b.value(), base, "{kind:?}");
        }
        // Every hashed byte counts, and where a payload ends does too.
        let mut b = StreamHash::default();
        b.frame(FrameKind::Config, b"confi");
        b.frame(FrameKind::SharedPages, b"gpages");
        assert_ne!(b.value(), base);
        let mut c = StreamHash::default();
        c.frame(FrameKind::Config, b"config");
        c.frame(FrameKind::SharedPages, b"pageS");
        assert_ne!(c.value(), base);
        // Helper records: their headers (every byte of them, tag and
        // reserved bytes included), where they sit and how they are cut
        // into frames; not their ciphertext, which the tag binds.
        let records =
            |n: usize| -> Vec<u8> { (0..n * RECORD_STRIDE).map(|i| (i % 251) as u8).collect() };
        let with = |frames: &[(FrameKind, &[u8])]| {
            let mut h = StreamHash::default();
            for (kind, payload) in frames {
                h.frame(*kind, payload);
            }
            h.value()
        };
        let two = records(2);
        let plain: &[u8] = b"pages";
        let sent = with(&[
            (FrameKind::HelperRecords, &two),
            (FrameKind::SharedPages, plain),
        ]);
        assert_ne!(sent, base);
        let moved = with(&[
            (FrameKind::SharedPages, plain),
            (FrameKind::HelperRecords, &two),
        ]);
        assert_ne!(moved, sent, "a record frame moved past a page frame");
        let (first, second) = two.split_at(RECORD_STRIDE);
        let split = with(&[
            (FrameKind::HelperRecords, first),
            (FrameKind::HelperRecords, second),
            (FrameKind::SharedPages, plain),
        ]);
        assert_ne!(split, sent, "the records cut into two frames");
        for at in 0..RECORD_HEADER {
            let mut changed = two.clone();
            changed[RECORD_STRIDE + at] ^= 1;
            let h = with(&[
                (FrameKind::HelperRecords, &changed),
                (FrameKind::SharedPages, plain),
            ]);
            assert_ne!(h, sent, "header byte {at} of the second record");
        }
        let mut ciphertext = two.clone();
        ciphertext[RECORD_HEADER + 7] ^= 1;
        let h = with(&[
            (FrameKind::HelperRecords, &ciphertext),
            (FrameKind::SharedPages, plain),
        ]);
        assert_eq!(h, sent, "the ciphertext is the tag's to bind");
    }
}
