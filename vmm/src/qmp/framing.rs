//! Cutting a QMP input stream into messages, without parsing them.
//!
//! QMP input is a stream of JSON values with no framing. [`Framer`] finds
//! where each top-level value ends by counting braces and brackets outside
//! strings (as QEMU's JSON streamer does), so a message split across reads
//! or several messages in one read come out whole and one at a time.
//!
//! What it guarantees, whatever the bytes:
//! - a [`Frame::Message`] is always a top-level `{...}` or `[...]` span that
//!   started at a top-level boundary and ended when every brace and bracket
//!   it opened was closed: a command can only run if it is a whole message;
//! - a message longer than [`MAX_MESSAGE`] or nested deeper than
//!   [`MAX_DEPTH`] is discarded *whole*: the framer keeps following its
//!   structure without storing it until the stream is back at a top-level
//!   boundary, then reports it once. Its tail is never read as new input;
//! - bytes outside any message (stray closers, bare words, top-level
//!   strings) are skipped as one run and reported once;
//! - a control character inside a string, a control character other than
//!   tab, CR and LF outside one, and the bytes 0xFE and 0xFF (none of which
//!   a JSON encoder ever sends) reset the framer to the top level with one
//!   error, whatever it was in the middle of: the qmp-spec's way for a
//!   client to force the parser into a known-good state, and what keeps one
//!   stray quote from swallowing the rest of a session;
//! - how the input is split into reads changes nothing.
//!
//! Memory stays bounded by [`MAX_MESSAGE`] per client.

/// Largest message accepted (QEMU answers messages of tens of KiB; JSON
/// arguments of a migration can be large).
pub const MAX_MESSAGE: usize = 1 << 20;
/// Deepest nesting accepted (QEMU's limit).
pub const MAX_DEPTH: usize = 1024;

/// What the framer found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A whole top-level message, to be parsed.
    Message(Vec<u8>),
    /// A message longer than [`MAX_MESSAGE`], discarded whole.
    TooLarge,
    /// A message nested deeper than [`MAX_DEPTH`], discarded whole.
    TooDeep,
    /// Bytes that cannot start a message (or a closer with nothing open),
    /// skipped up to the next boundary.
    Stray,
    /// A byte no JSON text holds there: what was being read is dropped and
    /// the framer starts afresh at the top level.
    Reset,
}

/// Why the message being read is discarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Discard {
    TooLarge,
    TooDeep,
}

/// Where the framer is between two bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Place {
    /// Between messages.
    #[default]
    TopLevel,
    /// In a message (braces/brackets open).
    Message,
    /// In a run of stray bytes at the top level.
    Stray,
    /// In a string at the top level (part of a stray run).
    StrayString,
}

/// Cuts a byte stream into [`Frame`]s.
#[derive(Debug)]
pub struct Framer {
    /// [`MAX_MESSAGE`] and [`MAX_DEPTH`] (smaller in tests).
    max_message: usize,
    max_depth: usize,
    place: Place,
    /// The message so far (empty while discarding).
    message: Vec<u8>,
    braces: usize,
    brackets: usize,
    in_string: bool,
    escaped: bool,
    discard: Option<Discard>,
}

impl Default for Framer {
    fn default() -> Self {
        Self::with_limits(MAX_MESSAGE, MAX_DEPTH)
    }
}

impl Framer {
    /// A framer with other limits than QMP's (tests reach them quicker).
    pub fn with_limits(max_message: usize, max_depth: usize) -> Self {
        Self {
            max_message,
            max_depth,
            place: Place::default(),
            message: Vec::new(),
            braces: 0,
            brackets: 0,
            in_string: false,
            escaped: false,
            discard: None,
        }
    }

    /// Takes `bytes` and appends every frame they complete to `out`.
    pub fn push(&mut self, bytes: &[u8], out: &mut Vec<Frame>) {
        for &b in bytes {
            self.byte(b, out);
        }
    }

    fn byte(&mut self, b: u8, out: &mut Vec<Frame>) {
        let in_a_string =
            self.place == Place::StrayString || (self.place == Place::Message && self.in_string);
        let never_json =
            b >= 0xfe || (b < 0x20 && (in_a_string || !matches!(b, b'\t' | b'\r' | b'\n')));
        if never_json {
            out.push(match (self.place, self.discard) {
                (Place::Message, Some(Discard::TooLarge)) => Frame::TooLarge,
                (Place::Message, Some(Discard::TooDeep)) => Frame::TooDeep,
                _ => Frame::Reset,
            });
            self.place = Place::TopLevel;
            self.message = Vec::new();
            self.discard = None;
            (self.in_string, self.escaped) = (false, false);
            return;
        }
        match self.place {
            Place::TopLevel => self.top_level(b),
            Place::Stray => {
                if b.is_ascii_whitespace() || b == b'{' || b == b'[' {
                    self.place = Place::TopLevel;
                    out.push(Frame::Stray);
                    self.top_level(b);
                } else if b == b'"' {
                    self.place = Place::StrayString;
                }
            }
            Place::StrayString => {
                if self.escaped {
                    self.escaped = false;
                } else if b == b'\\' {
                    self.escaped = true;
                } else if b == b'"' {
                    self.place = Place::Stray;
                }
            }
            Place::Message => self.in_message(b, out),
        }
    }

    fn top_level(&mut self, b: u8) {
        match b {
            b if b.is_ascii_whitespace() => {}
            b'{' | b'[' => {
                self.place = Place::Message;
                self.message.clear();
                self.discard = None;
                (self.braces, self.brackets) = (0, 0);
                (self.in_string, self.escaped) = (false, false);
                self.open(b);
                self.keep(b);
            }
            b'"' => self.place = Place::StrayString,
            _ => self.place = Place::Stray,
        }
    }

    fn open(&mut self, b: u8) {
        if b == b'{' {
            self.braces += 1;
        } else {
            self.brackets += 1;
        }
        if self.braces + self.brackets > self.max_depth {
            self.drop_message(Discard::TooDeep);
        }
    }

    fn in_message(&mut self, b: u8, out: &mut Vec<Frame>) {
        if self.in_string {
            if self.escaped {
                self.escaped = false;
            } else if b == b'\\' {
                self.escaped = true;
            } else if b == b'"' {
                self.in_string = false;
            }
            self.keep(b);
            return;
        }
        match b {
            b'"' => self.in_string = true,
            b'{' | b'[' => self.open(b),
            b'}' | b']' => {
                let count = if b == b'}' {
                    &mut self.braces
                } else {
                    &mut self.brackets
                };
                // A closer with nothing of its kind open closes nothing:
                // the (malformed) message still ends only where it
                // balances.
                if let Some(n) = count.checked_sub(1) {
                    *count = n;
                }
            }
            _ => {}
        }
        self.keep(b);
        if self.braces == 0 && self.brackets == 0 && !self.in_string {
            self.place = Place::TopLevel;
            out.push(match self.discard {
                None => Frame::Message(std::mem::take(&mut self.message)),
                Some(Discard::TooLarge) => Frame::TooLarge,
                Some(Discard::TooDeep) => Frame::TooDeep,
            });
            self.discard = None;
        }
    }

    /// Stores `b` unless the message is being discarded.
    fn keep(&mut self, b: u8) {
        if self.discard.is_some() {
            return;
        }
        if self.message.len() >= self.max_message {
            self.drop_message(Discard::TooLarge);
            return;
        }
        self.message.push(b);
    }

    fn drop_message(&mut self, why: Discard) {
        if self.discard.is_none() {
            self.discard = Some(why);
            self.message = Vec::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frames(input: &[u8]) -> Vec<Frame> {
        let mut f = Framer::default();
        let mut out = Vec::new();
        f.push(input, &mut out);
        out
    }

    fn msg(s: &str) -> Frame {
        Frame::Message(s.as_bytes().to_vec())
    }

    #[test]
    fn messages_come_out_whole_and_one_at_a_time() {
        assert_eq!(
            frames(b" {\"a\": \"}{[\\\"\"}\n[1,{}] {}"),
            vec![msg("{\"a\": \"}{[\\\"\"}"), msg("[1,{}]"), msg("{}")]
        );
        assert_eq!(frames(b"{\"a\": [1, {\"b\""), vec![]);
    }

    #[test]
    fn stray_bytes_are_skipped_once_per_run() {
        assert_eq!(
            frames(b"abc \"x{y\" } ]{}"),
            vec![
                Frame::Stray,
                Frame::Stray,
                Frame::Stray,
                Frame::Stray,
                msg("{}")
            ]
        );
    }

    #[test]
    fn an_oversized_message_is_discarded_whole_with_its_tail() {
        // The tail holds what looks like a command: it must not come out.
        let mut big = b"{\"pad\": \"".to_vec();
        big.extend(std::iter::repeat_n(b'a', MAX_MESSAGE));
        big.extend_from_slice(b"\", \"x\": {\"execute\": \"quit\"}} {\"execute\": \"cont\"}");
        assert_eq!(
            frames(&big),
            vec![Frame::TooLarge, msg("{\"execute\": \"cont\"}")]
        );
        // Just below the limit it is a message.
        let mut fits = b"{\"pad\": \"".to_vec();
        fits.extend(std::iter::repeat_n(b'a', MAX_MESSAGE - 12));
        fits.extend_from_slice(b"\"}");
        assert_eq!(frames(&fits).len(), 1);
        assert!(matches!(frames(&fits)[0], Frame::Message(_)));
    }

    #[test]
    fn nesting_past_the_limit_is_discarded_whole() {
        let deep = |n: usize| {
            let mut v = "[".repeat(n).into_bytes();
            v.extend(b"{\"execute\": \"quit\"}");
            v.extend("]".repeat(n).into_bytes());
            v.extend(b" {}");
            v
        };
        assert!(matches!(frames(&deep(MAX_DEPTH - 1))[0], Frame::Message(_)));
        assert_eq!(frames(&deep(MAX_DEPTH)), vec![Frame::TooDeep, msg("{}")]);
    }

    #[test]
    fn a_closer_of_the_other_kind_does_not_end_a_message_early() {
        // `]` inside braces closes nothing: the message goes on until it
        // balances, so the command after it is part of the same (bad)
        // message, never a message of its own.
        assert_eq!(
            frames(b"{\"a\": ]} {\"execute\": \"quit\"}"),
            vec![msg("{\"a\": ]}"), msg("{\"execute\": \"quit\"}")]
        );
        assert_eq!(
            frames(b"{\"a\": [} {\"execute\": \"quit\"}] {}"),
            vec![msg("{\"a\": [} {\"execute\": \"quit\"}]"), msg("{}")]
        );
    }

    /// Whether `m` is one message by the framer's rule: braces and
    /// brackets counted apart outside strings, a closer with none of its
    /// kind open closing nothing, and both counts at zero only at its end.
    fn balanced(m: &[u8]) -> bool {
        let (mut braces, mut brackets) = (0usize, 0usize);
        let (mut in_string, mut escaped) = (false, false);
        for (i, &b) in m.iter().enumerate() {
            if in_string {
                if escaped {
                    escaped = false;
                } else if b == b'\\' {
                    escaped = true;
                } else if b == b'"' {
                    in_string = false;
                }
            } else {
                match b {
                    b'"' => in_string = true,
                    b'{' => braces += 1,
                    b'[' => brackets += 1,
                    b'}' => braces = braces.saturating_sub(1),
                    b']' => brackets = brackets.saturating_sub(1),
                    _ => {}
                }
            }
            let closed = braces == 0 && brackets == 0 && !in_string;
            if closed != (i + 1 == m.len()) {
                return false;
            }
        }
        true
    }

    /// Pieces a stream is built from: commands that must come out, and
    /// self-contained garbage that must not hide them.
    fn piece() -> impl Strategy<Value = (Vec<u8>, Option<String>)> {
        prop_oneof![
            "[a-z-]{1,12}".prop_map(|c| {
                let m = format!("{{\"execute\": \"{c}\", \"id\": \"{c}\"}}");
                (m.into_bytes(), Some(c))
            }),
            // Stray words and numbers between messages.
            "[a-z0-9:,.]{1,8}".prop_map(|s| (format!(" {s} ").into_bytes(), None)),
            // Balanced but not valid JSON, with braces inside strings.
            "[a-z{}\\[\\] ]{0,10}"
                .prop_map(|s| (format!("{{\"x\": [\"{s}\"] 1 2}}").into_bytes(), None)),
            Just((b" \n\t ".to_vec(), None)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn arbitrary_bytes_split_anywhere_frame_alike_and_stay_balanced(
            bytes in proptest::collection::vec(any::<u8>(), 0..600),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..8),
        ) {
            let whole = frames(&bytes);
            let mut points: Vec<usize> = cuts.iter().map(|c| c.index(bytes.len() + 1)).collect();
            points.sort_unstable();
            let mut f = Framer::default();
            let mut split = Vec::new();
            let mut last = 0;
            for p in points.into_iter().chain([bytes.len()]) {
                f.push(&bytes[last..p], &mut split);
                last = p;
            }
            prop_assert_eq!(&whole, &split);
            for frame in &whole {
                if let Frame::Message(m) = frame {
                    prop_assert!(m.len() <= MAX_MESSAGE);
                    let opens = matches!(m[0], b'{' | b'[');
                    prop_assert!(opens, "starts with {}", m[0]);
                    prop_assert!(balanced(m), "{:?}", String::from_utf8_lossy(m));
                }
            }
        }

        #[test]
        fn with_small_limits_discards_follow_the_structure_and_split_alike(
            bytes in proptest::collection::vec(
                prop_oneof![Just(b'{'), Just(b'}'), Just(b'['), Just(b']'), Just(b'"'), Just(b'\\'), Just(b'a'), Just(b' '), Just(b'\n')],
                0..400,
            ),
            cut in any::<prop::sample::Index>(),
        ) {
            let run = |parts: &[&[u8]]| {
                let mut f = Framer::with_limits(16, 3);
                let mut out = Vec::new();
                for p in parts {
                    f.push(p, &mut out);
                }
                out
            };
            let at = cut.index(bytes.len() + 1);
            let whole = run(&[&bytes]);
            prop_assert_eq!(&whole, &run(&[&bytes[..at], &bytes[at..]]));
            for frame in &whole {
                if let Frame::Message(m) = frame {
                    prop_assert!(m.len() <= 16);
                    prop_assert!(balanced(m), "{:?}", String::from_utf8_lossy(m));
                }
            }
        }

        #[test]
        fn commands_between_garbage_all_come_out_and_nothing_else_runs(
            pieces in proptest::collection::vec(piece(), 0..40),
            chunk in 1usize..64,
        ) {
            let stream: Vec<u8> = pieces.iter().flat_map(|(b, _)| b.clone()).collect();
            let want: Vec<String> = pieces.iter().filter_map(|(_, c)| c.clone()).collect();
            let mut f = Framer::default();
            let mut out = Vec::new();
            for part in stream.chunks(chunk) {
                f.push(part, &mut out);
            }
            let got: Vec<String> = out
                .iter()
                .filter_map(|frame| match frame {
                    Frame::Message(m) => serde_json::from_slice::<serde_json::Value>(m).ok(),
                    _ => None,
                })
                .filter_map(|v| v.get("execute")?.as_str().map(str::to_string))
                .collect();
            prop_assert_eq!(got, want);
        }
    }
}
