//! `lab-checker`: the program in the kvm-lab Linux guest's initramfs that
//! checks its own memory and clock while the guest is migrated.
//!
//! It fills `--mib` MiB with a pattern derived from a seed, a block number
//! and the block's generation, then loops forever: each pass checks every
//! 64 KiB block against the generation it last wrote and rewrites it at the
//! next one, so the guest keeps dirtying all of its buffer (like the
//! `dirtier` lab guest) and a block that comes back stale or torn after a
//! migration is caught. Between blocks it reads `CLOCK_MONOTONIC`: the clock
//! must never go back, and the longest gap between two readings is how long
//! the guest was stopped as the guest itself saw it.
//!
//! Output, one line per pass (at least `--every-ms` apart), named by the
//! seed so that several checkers can share a console:
//!
//! ```text
//! checker 1: pass 12 ok mono_ms=5234 max_gap_ms=3
//! checker 1: MEMORY-ERROR block 7 word 19 expected 0x... found 0x...
//! checker 1: CLOCK-ERROR went back by 1.5s at 5234 ms
//! ```
//!
//! Errors exit with status 2 after their line. Built static (see the lab's
//! `build.sh`) so the initramfs needs no libraries.

use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// Words in a block: the unit checked and rewritten at once (64 KiB).
const BLOCK_WORDS: usize = 8192;

/// What the command line asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Options {
    mib: usize,
    seed: u64,
    every: Duration,
    passes: Option<u64>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            mib: 32,
            seed: 0x5eed,
            every: Duration::from_millis(1000),
            passes: None,
        }
    }
}

fn parse(args: impl IntoIterator<Item = String>) -> Result<Options, String> {
    let mut o = Options::default();
    let mut args = args.into_iter();
    while let Some(flag) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or_else(|| format!("{name} needs a number"))
        };
        match flag.as_str() {
            "--mib" => {
                o.mib = usize::try_from(value("--mib")?)
                    .ok()
                    .filter(|&m| (1..=4096).contains(&m))
                    .ok_or("--mib must be 1..=4096")?
            }
            "--seed" => o.seed = value("--seed")?,
            "--every-ms" => o.every = Duration::from_millis(value("--every-ms")?),
            "--passes" => o.passes = Some(value("--passes")?),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(o)
}

/// SplitMix64's finaliser: a cheap, well-mixed word for each position.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The word at `word` of block `block` in generation `generation`.
fn pattern(seed: u64, block: usize, generation: u64, word: usize) -> u64 {
    // usize -> u64 is lossless on every target this runs on (64-bit Linux).
    mix(seed ^ mix((block as u64) << 20 ^ word as u64) ^ generation.rotate_left(40))
}

/// The first word of `block` that does not hold `generation`'s pattern.
fn check(seed: u64, block: usize, generation: u64, words: &[u64]) -> Option<(usize, u64, u64)> {
    words.iter().enumerate().find_map(|(i, &found)| {
        let expected = pattern(seed, block, generation, i);
        (found != expected).then_some((i, expected, found))
    })
}

fn fill(seed: u64, block: usize, generation: u64, words: &mut [u64]) {
    for (i, w) in words.iter_mut().enumerate() {
        *w = pattern(seed, block, generation, i);
    }
}

/// Monotonic milliseconds since the clock's epoch (`CLOCK_MONOTONIC`, which
/// `Instant` reads on Linux), as the guest sees them.
struct Clock {
    start: Instant,
    offset_ms: u64,
}

impl Clock {
    fn new() -> Self {
        // Uptime as a base so lines from two boots are told apart; the
        // checks only use differences.
        let offset_ms = std::fs::read_to_string("/proc/uptime")
            .ok()
            .and_then(|s| s.split('.').next()?.parse::<u64>().ok())
            .map_or(0, |s| s * 1000);
        Self {
            start: Instant::now(),
            offset_ms,
        }
    }

    fn now_ms(&self) -> u64 {
        let elapsed = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.offset_ms.saturating_add(elapsed)
    }
}

fn run(o: Options) -> ExitCode {
    let seed = o.seed;
    let blocks = o.mib * (1 << 20) / 8 / BLOCK_WORDS;
    let mut memory = vec![0u64; blocks * BLOCK_WORDS];
    for (b, words) in memory.chunks_mut(BLOCK_WORDS).enumerate() {
        fill(o.seed, b, 0, words);
    }
    let clock = Clock::new();
    let mut out = std::io::stdout().lock();
    // `Instant` is the raw CLOCK_MONOTONIC on Linux; std does not smooth it,
    // so a clock restored wrong makes `checked_duration_since` fail.
    let mut last = Instant::now();
    let mut last_print = Instant::now();
    let mut max_gap = 0u64;
    let mut generation = 0u64;
    let _ = writeln!(out, "checker {seed}: started mib={} blocks={blocks}", o.mib);
    loop {
        for (b, words) in memory.chunks_mut(BLOCK_WORDS).enumerate() {
            if let Some((w, expected, found)) = check(o.seed, b, generation, words) {
                let _ = writeln!(
                    out,
                    "checker {seed}: MEMORY-ERROR block {b} word {w} expected {expected:#x} found {found:#x}"
                );
                return ExitCode::from(2);
            }
            fill(o.seed, b, generation + 1, words);
            let now = Instant::now();
            let Some(gap) = now.checked_duration_since(last) else {
                let back = last.duration_since(now);
                let _ = writeln!(
                    out,
                    "checker {seed}: CLOCK-ERROR went back by {back:?} at {} ms",
                    clock.now_ms()
                );
                return ExitCode::from(2);
            };
            max_gap = max_gap.max(u64::try_from(gap.as_millis()).unwrap_or(u64::MAX));
            last = now;
        }
        generation += 1;
        if last_print.elapsed() >= o.every {
            let _ = writeln!(
                out,
                "checker {seed}: pass {generation} ok mono_ms={} max_gap_ms={max_gap}",
                clock.now_ms()
            );
            let _ = out.flush();
            last_print = Instant::now();
        }
        if o.passes.is_some_and(|p| generation >= p) {
            let _ = writeln!(out, "checker {seed}: done after {generation} passes");
            return ExitCode::SUCCESS;
        }
    }
}

fn main() -> ExitCode {
    match parse(std::env::args().skip(1)) {
        Ok(o) => run(o),
        Err(e) => {
            eprintln!("lab-checker: {e}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Result<Options, String> {
        parse(a.iter().map(|s| s.to_string()))
    }

    #[test]
    fn parses_its_flags_and_refuses_others() {
        assert_eq!(args(&[]).unwrap(), Options::default());
        let o = args(&["--mib", "8", "--seed", "3", "--passes", "2"]).unwrap();
        assert_eq!((o.mib, o.seed, o.passes), (8, 3, Some(2)));
        assert!(args(&["--mib", "0"]).is_err());
        assert!(args(&["--mib"]).is_err());
        assert!(args(&["--fast"]).is_err());
    }

    #[test]
    fn a_changed_word_is_found_and_named() {
        let mut words = vec![0u64; BLOCK_WORDS];
        fill(7, 3, 5, &mut words);
        assert_eq!(check(7, 3, 5, &words), None);
        // Another generation, block or seed does not pass for this one.
        assert!(check(7, 3, 4, &words).is_some());
        assert!(check(7, 2, 5, &words).is_some());
        assert!(check(8, 3, 5, &words).is_some());
        let expected = words[100];
        words[100] ^= 1 << 17;
        assert_eq!(
            check(7, 3, 5, &words),
            Some((100, expected, expected ^ 1 << 17))
        );
    }

    #[test]
    fn runs_a_bounded_number_of_passes() {
        let o = Options {
            mib: 1,
            passes: Some(3),
            every: Duration::ZERO,
            ..Options::default()
        };
        assert_eq!(run(o), ExitCode::SUCCESS);
    }
}
