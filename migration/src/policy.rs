//! Convergence: when precopy stops sending rounds and switches over (the
//! main vCPUs pause and the last dirty pages go). A pure function of the
//! round statistics and the limits, so every case is a unit test.
//!
//! QEMU's semantics: the expected downtime is what is still dirty divided
//! by the bandwidth measured in the last round; once it fits the
//! `downtime-limit`, switch over. A guest that dirties memory faster than
//! it can be sent never gets there: when the dirty set stops shrinking,
//! the guest is slowed down, step after step ([`next_throttle`], QEMU's
//! auto-converge: its main vCPUs paused part of the time); and the rounds
//! are bounded: after [`Limits::max_rounds`], or once the dirty set has
//! stopped shrinking for [`Limits::stall_rounds`] rounds at the strongest
//! throttle, switch over anyway (the downtime is then longer than asked,
//! and `query-migrate` shows it).

use std::time::Duration;

/// The operator's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest pause the guest should see (`downtime-limit`).
    pub downtime_limit: Duration,
    /// Rounds after round 0 before switching over whatever happens.
    pub max_rounds: u32,
    /// Rounds without a new low of the dirty set before switching over.
    pub stall_rounds: u32,
    /// The guest is slowed down when precopy does not converge (then a
    /// stall counts only at the strongest throttle).
    pub auto_converge: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            downtime_limit: Duration::from_millis(300),
            max_rounds: 30,
            stall_rounds: 3,
            auto_converge: true,
        }
    }
}

/// What the last round found.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoundStats {
    /// Rounds done so far (round 0, which sends everything, is 1).
    pub rounds: u32,
    /// Bytes dirty now (what the next round, or the switchover, sends).
    pub dirty_bytes: u64,
    /// Bytes per second the last round achieved.
    pub bandwidth: f64,
    /// Time since the migration started.
    pub elapsed: Duration,
    /// Rounds since the dirty set was last at its smallest.
    pub rounds_since_low: u32,
    /// The guest's throttle now (percent of time paused).
    pub throttle: u8,
}

/// The strongest throttle: the guest still runs 5% of the time.
pub const MAX_THROTTLE: u8 = 95;
/// The steps the throttle takes (QEMU starts at 20% and adds 10%; the lab
/// host's guests outrun that by far, so steps are bigger).
const THROTTLE_STEPS: [u8; 5] = [30, 60, 80, 90, MAX_THROTTLE];

/// The throttle after a round that did not make the dirty set smaller
/// (`rounds_since_low > 0`): one step up; otherwise unchanged.
pub fn next_throttle(stats: &RoundStats) -> u8 {
    if stats.rounds_since_low == 0 {
        return stats.throttle;
    }
    THROTTLE_STEPS
        .into_iter()
        .find(|&t| t > stats.throttle)
        .unwrap_or(MAX_THROTTLE)
}

/// Why precopy ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Switchover {
    /// What is left fits the downtime limit.
    Converged,
    /// The round limit.
    MaxRounds,
    /// The dirty set stopped shrinking.
    Stalled,
}

/// The decision after a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Send another round.
    Continue,
    /// Pause the guest and send the rest.
    Switchover(Switchover),
}

/// The time sending `bytes` takes at `bandwidth` (bytes/s); unbounded when
/// nothing was measured.
pub fn expected_downtime(bytes: u64, bandwidth: f64) -> Duration {
    if bytes == 0 {
        return Duration::ZERO;
    }
    if !(bandwidth.is_finite() && bandwidth > 0.0) {
        return Duration::MAX;
    }
    Duration::try_from_secs_f64(bytes as f64 / bandwidth).unwrap_or(Duration::MAX)
}

/// Whether precopy is too slow to converge in a few rounds on its own:
/// the dirty set did not shrink by a quarter since the last round, or,
/// after round 0, the guest already rewrote nine tenths of its `total`
/// memory. Then the throttle takes its next step.
pub fn too_slow(dirty: u64, previous: Option<u64>, total: u64) -> bool {
    match previous {
        Some(p) => dirty.saturating_mul(4) > p.saturating_mul(3),
        None => dirty.saturating_mul(10) >= total.saturating_mul(9),
    }
}

/// Whether to switch over now.
pub fn decide(stats: &RoundStats, limits: &Limits) -> Decision {
    if expected_downtime(stats.dirty_bytes, stats.bandwidth) <= limits.downtime_limit {
        return Decision::Switchover(Switchover::Converged);
    }
    if stats.rounds > limits.max_rounds {
        return Decision::Switchover(Switchover::MaxRounds);
    }
    let strongest = !limits.auto_converge || stats.throttle >= MAX_THROTTLE;
    if stats.rounds_since_low >= limits.stall_rounds && strongest {
        return Decision::Switchover(Switchover::Stalled);
    }
    Decision::Continue
}

/// Keeps the smallest dirty set seen, for [`RoundStats::rounds_since_low`].
#[derive(Debug, Default, Clone, Copy)]
pub struct LowWater {
    low: Option<u64>,
    since: u32,
}

impl LowWater {
    /// Records a round's dirty bytes; returns the rounds since the low.
    pub fn record(&mut self, dirty: u64) -> u32 {
        match self.low {
            Some(low) if dirty >= low => self.since += 1,
            _ => {
                self.low = Some(dirty);
                self.since = 0;
            }
        }
        self.since
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn stats(rounds: u32, dirty_bytes: u64, bandwidth: f64, since: u32) -> RoundStats {
        RoundStats {
            rounds,
            dirty_bytes,
            bandwidth,
            elapsed: Duration::from_secs(1),
            rounds_since_low: since,
            throttle: MAX_THROTTLE,
        }
    }

    #[test]
    fn switches_over_once_the_rest_fits_the_limit() {
        let limits = Limits::default();
        // 100 MiB at 500 MB/s: 210 ms, within 300 ms.
        assert_eq!(
            decide(&stats(2, 100 * MIB, 500e6, 0), &limits),
            Decision::Switchover(Switchover::Converged)
        );
        // 200 MiB at 500 MB/s: 420 ms: another round.
        assert_eq!(
            decide(&stats(2, 200 * MIB, 500e6, 0), &limits),
            Decision::Continue
        );
        // At 10 ms even 4 MiB is too much at 300 MB/s, 2 MiB is not.
        let tight = Limits {
            downtime_limit: Duration::from_millis(10),
            ..limits
        };
        assert_eq!(
            decide(&stats(3, 4 * MIB, 300e6, 0), &tight),
            Decision::Continue
        );
        assert_eq!(
            decide(&stats(3, 2 * MIB, 300e6, 0), &tight),
            Decision::Switchover(Switchover::Converged)
        );
        // Nothing dirty: always.
        assert_eq!(
            decide(&stats(1, 0, 0.0, 0), &tight),
            Decision::Switchover(Switchover::Converged)
        );
    }

    #[test]
    fn a_guest_that_outruns_the_link_still_moves() {
        let limits = Limits::default();
        // Not shrinking for as many rounds as allowed.
        assert_eq!(
            decide(&stats(4, 256 * MIB, 100e6, 3), &limits),
            Decision::Switchover(Switchover::Stalled)
        );
        assert_eq!(
            decide(&stats(4, 256 * MIB, 100e6, 2), &limits),
            Decision::Continue
        );
        // The round bound, whatever else.
        assert_eq!(
            decide(&stats(31, 256 * MIB, 100e6, 0), &limits),
            Decision::Switchover(Switchover::MaxRounds)
        );
        // Nothing measured yet: no convergence by rate.
        assert_eq!(decide(&stats(1, MIB, 0.0, 0), &limits), Decision::Continue);
        assert_eq!(expected_downtime(MIB, f64::NAN), Duration::MAX);
    }

    #[test]
    fn a_guest_that_does_not_slow_down_is_throttled_step_by_step() {
        let mut s = stats(2, 256 * MIB, 100e6, 0);
        s.throttle = 0;
        assert_eq!(next_throttle(&s), 0, "progress: no throttle");
        s.rounds_since_low = 1;
        let mut seen = vec![];
        for _ in 0..7 {
            s.throttle = next_throttle(&s);
            seen.push(s.throttle);
        }
        assert_eq!(seen, [30, 60, 80, 90, 95, 95, 95]);
        // Below the strongest throttle, no progress is not yet a stall.
        s.rounds_since_low = 5;
        s.throttle = 60;
        assert_eq!(decide(&s, &Limits::default()), Decision::Continue);
        s.throttle = MAX_THROTTLE;
        assert_eq!(
            decide(&s, &Limits::default()),
            Decision::Switchover(Switchover::Stalled)
        );
        // Without auto-converge a stall is a stall at once.
        s.throttle = 0;
        let off = Limits {
            auto_converge: false,
            ..Limits::default()
        };
        assert_eq!(decide(&s, &off), Decision::Switchover(Switchover::Stalled));
    }

    #[test]
    fn too_slow_means_less_than_a_quarter_less_or_nearly_all_rewritten() {
        assert!(too_slow(100, Some(100), 1000));
        assert!(too_slow(80, Some(100), 1000));
        assert!(!too_slow(75, Some(100), 1000));
        assert!(too_slow(950, None, 1000));
        assert!(!too_slow(500, None, 1000));
        assert!(!too_slow(0, Some(0), 1000));
    }

    #[test]
    fn the_low_water_mark_counts_rounds_without_progress() {
        let mut w = LowWater::default();
        assert_eq!(w.record(100), 0);
        assert_eq!(w.record(80), 0);
        assert_eq!(w.record(90), 1);
        assert_eq!(w.record(80), 2, "equal to the low is no progress");
        assert_eq!(w.record(79), 0);
    }
}
