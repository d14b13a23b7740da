//! The run state, and the only code that changes it.
//!
//! Each state carries what it needs (whether an arriving guest starts on
//! its own, what a failed migration goes back to, whether a migration was
//! a snapshot). A [`Transition`] is asked of [`Lifecycle::plan`], which
//! refuses it or answers a [`Step`]: what the main vCPUs must do, the
//! state after and the event to raise. The controller does what the step
//! asks of the vCPUs and commits it only then, so a failed pause or resume
//! leaves the state as it was.
//!
//! | from \ transition | start | stop | cont | forced cont | migrate pause | failed | done | unknown | arrived |
//! |---|---|---|---|---|---|---|---|---|---|
//! | built (paused) | running, or prelaunch (`-S`) | – | – | – | – | – | – | – | – |
//! | prelaunch | – | = | running | running | finish-migrate | – | – | – | – |
//! | running | – | paused | = | = | finish-migrate | – | – | – | – |
//! | paused | – | = | running | running | finish-migrate | – | – | – | – |
//! | inmigrate | = (mirror only) | autostart off | autostart on | autostart on | refused | – | – | – | running or paused |
//! | finish-migrate | – | refused | refused | refused | – | back as before | postmigrate | outcome-unknown | – |
//! | postmigrate | – | = | refused (snapshot: running) | as cont | snapshot only | – | – | – | – |
//! | outcome-unknown | – | = | refused | running | forced only (back here if it fails, or after a snapshot) | – | – | – | – |
//!
//! ("=": no change; "–": cannot happen, and refused if asked.)
//!
//! `outcome-unknown`: everything went to the target but no answer its
//! helpers made came back, so the guest may already run there. It stays
//! paused here until the operator, who can find out, says otherwise: a
//! plain `cont` or `migrate` is refused, a forced one (`"x-force": true`)
//! goes ahead; a forced migration that fails comes back here.

use super::{ControlError, Event};

/// What a refusal after an unknown outcome says first.
const UNKNOWN: &str = "The last migration's outcome is unknown (the target's answer never \
     came): the guest may be running on the target";

/// The VM's run state, as `query-status` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// Main vCPUs run.
    Running,
    /// Main vCPUs are paused (`stop`).
    Paused,
    /// Waiting for (or receiving) an incoming migration; the main vCPUs
    /// have never run.
    InMigrate,
    /// Paused to be migrated.
    FinishMigrate,
    /// Migrated away: the guest runs on the target now.
    PostMigrate,
    /// Built, never run: waits for `cont` (`--paused` without
    /// `--incoming`, QEMU's `-S`).
    Prelaunch,
    /// Paused after a migration whose outcome is unknown: the guest may
    /// run on the target.
    OutcomeUnknown,
}

impl RunState {
    /// QEMU's RunState name.
    pub fn name(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::InMigrate => "inmigrate",
            RunState::FinishMigrate => "finish-migrate",
            RunState::PostMigrate => "postmigrate",
            RunState::Prelaunch => "prelaunch",
            RunState::OutcomeUnknown => "outcome-unknown",
        }
    }
}

/// Where an outgoing migration found the guest: where a failed one puts
/// it back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Before {
    Running,
    Paused,
    Prelaunch,
    /// Postmigrate after a snapshot (the guest may go on here).
    Snapshotted,
    /// After an unknown outcome (a forced migration).
    Unknown,
}

/// The run state with what each state needs to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Built; [`Transition::Start`] decides.
    Built {
        autostart: bool,
    },
    Prelaunch,
    Running,
    Paused,
    /// Waiting for or receiving the guest: it runs once here only if
    /// `autostart` (cleared by `stop`, set by `cont`) and it ran on its
    /// source.
    InMigrate {
        autostart: bool,
        source_running: bool,
    },
    /// Paused for an outgoing migration.
    FinishMigrate {
        before: Before,
    },
    /// Migrated away; after a snapshot the guest may go on here.
    PostMigrate {
        snapshot: bool,
    },
    /// A migration ended without the target's answer.
    OutcomeUnknown,
}

/// A change of the run state someone asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// The VMM starts the VM (after the mirror started).
    Start,
    /// QMP `stop`.
    Stop,
    /// QMP `cont`.
    Cont,
    /// QMP `cont` with `x-force`: also after an unknown outcome.
    ForceCont,
    /// An outgoing migration pauses the guest.
    PauseForMigration,
    /// It failed or was cancelled: back to where it was.
    MigrationFailed,
    /// It completed: the guest runs elsewhere (or, after a snapshot, may
    /// go on here).
    MigrationDone { snapshot: bool },
    /// Everything was sent but the target's answer never came: the guest
    /// stays paused here until a forced `cont` or `migrate`.
    OutcomeUnknown,
    /// The arriving guest's state is restored; it ran on its source or not.
    Restored { source_running: bool },
    /// The arriving guest verified: it runs here, or waits paused.
    Arrived,
}

/// What the main vCPUs must do for a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vcpus {
    /// Nothing.
    Stay,
    /// Pause them.
    Pause,
    /// Resume (or first start) them.
    Resume,
}

/// An allowed transition: what to do, then where it leads.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use = "a step does nothing until the controller does it and commits it"]
pub struct Step {
    /// What the main vCPUs must do first.
    pub vcpus: Vcpus,
    /// The event to raise once done.
    pub event: Option<Event>,
    next: Phase,
}

/// The run state's one owner.
#[derive(Debug)]
pub struct Lifecycle {
    phase: Phase,
}

impl Lifecycle {
    /// A built VM: to receive a migration, or to boot (and run at
    /// [`Transition::Start`] if `autostart`, else wait in prelaunch).
    pub fn new(incoming: bool, autostart: bool) -> Self {
        let phase = if incoming {
            Phase::InMigrate {
                autostart,
                source_running: true,
            }
        } else {
            Phase::Built { autostart }
        };
        Self { phase }
    }

    /// The state, as `query-status` names it.
    pub fn state(&self) -> RunState {
        match self.phase {
            Phase::Built { .. } | Phase::Paused => RunState::Paused,
            Phase::Prelaunch => RunState::Prelaunch,
            Phase::Running => RunState::Running,
            Phase::InMigrate { .. } => RunState::InMigrate,
            Phase::FinishMigrate { .. } => RunState::FinishMigrate,
            Phase::PostMigrate { .. } => RunState::PostMigrate,
            Phase::OutcomeUnknown => RunState::OutcomeUnknown,
        }
    }

    /// Whether the guest ran when the current outgoing migration paused it.
    pub fn ran_before_migration(&self) -> bool {
        self.phase
            == Phase::FinishMigrate {
                before: Before::Running,
            }
    }

    /// Whether an outgoing migration may start now (`force`: also after
    /// an unknown outcome).
    pub fn may_migrate(&self, force: bool) -> Result<(), ControlError> {
        match self.phase {
            Phase::Running | Phase::Paused | Phase::Prelaunch => Ok(()),
            Phase::PostMigrate { snapshot: true } => Ok(()),
            Phase::OutcomeUnknown if force => Ok(()),
            Phase::OutcomeUnknown => Err(ControlError::WrongState(format!(
                "{UNKNOWN}: migrate it from here only if it does not (\"x-force\": true)"
            ))),
            _ => Err(self.cannot_migrate()),
        }
    }

    fn cannot_migrate(&self) -> ControlError {
        ControlError::WrongState(format!(
            "The VM cannot be migrated while it is {}",
            self.state().name()
        ))
    }

    /// What `t` takes from here, or why it is refused.
    pub fn plan(&self, t: Transition) -> Result<Step, ControlError> {
        use Phase as P;
        use Transition as T;
        let to = |vcpus, next, event| Ok(Step { vcpus, event, next });
        let stay = |next| to(Vcpus::Stay, next, None);
        match (self.phase, t) {
            (P::Built { autostart: true }, T::Start) => to(Vcpus::Resume, P::Running, None),
            (P::Built { autostart: false }, T::Start) => stay(P::Prelaunch),
            (p @ P::InMigrate { .. }, T::Start) => stay(p),

            (P::Running, T::Stop) => to(Vcpus::Pause, P::Paused, Some(Event::Stop)),
            (P::Paused | P::Prelaunch, T::Cont | T::ForceCont) => {
                to(Vcpus::Resume, P::Running, Some(Event::Resume))
            }
            (P::OutcomeUnknown, T::ForceCont) => to(Vcpus::Resume, P::Running, Some(Event::Resume)),
            (P::OutcomeUnknown, T::Cont) => Err(ControlError::WrongState(format!(
                "{UNKNOWN}: resume it here only if it does not (\"x-force\": true)"
            ))),
            (P::PostMigrate { snapshot: true }, T::Cont | T::ForceCont) => {
                to(Vcpus::Resume, P::Running, Some(Event::Resume))
            }
            (
                p @ (P::Paused | P::Prelaunch | P::PostMigrate { .. } | P::OutcomeUnknown),
                T::Stop,
            ) => stay(p),
            (P::Running, T::Cont | T::ForceCont) => stay(P::Running),
            (P::InMigrate { source_running, .. }, T::Stop | T::Cont | T::ForceCont) => {
                stay(P::InMigrate {
                    autostart: t != T::Stop,
                    source_running,
                })
            }
            (P::FinishMigrate { .. }, T::Stop) => Err(ControlError::WrongState(
                "The guest is being migrated".into(),
            )),
            (P::FinishMigrate { .. }, T::Cont | T::ForceCont) => Err(ControlError::WrongState(
                "The guest is being migrated; it resumes here if the migration fails".into(),
            )),
            (P::PostMigrate { snapshot: false }, T::Cont | T::ForceCont) => {
                Err(ControlError::WrongState(
                    "The guest was migrated and runs on the target; it cannot resume here".into(),
                ))
            }

            (p, T::PauseForMigration) => {
                let before = match p {
                    P::Running => Before::Running,
                    P::Paused => Before::Paused,
                    P::Prelaunch => Before::Prelaunch,
                    P::PostMigrate { snapshot: true } => Before::Snapshotted,
                    P::OutcomeUnknown => Before::Unknown,
                    _ => return Err(self.cannot_migrate()),
                };
                let vcpus = if before == Before::Running {
                    Vcpus::Pause
                } else {
                    Vcpus::Stay
                };
                let event = (before == Before::Running).then_some(Event::Stop);
                to(vcpus, P::FinishMigrate { before }, event)
            }
            (P::FinishMigrate { before }, T::MigrationFailed) => match before {
                Before::Running => to(Vcpus::Resume, P::Running, Some(Event::Resume)),
                Before::Paused => stay(P::Paused),
                Before::Prelaunch => stay(P::Prelaunch),
                Before::Snapshotted => stay(P::PostMigrate { snapshot: true }),
                Before::Unknown => stay(P::OutcomeUnknown),
            },
            // A snapshot taken after an unknown outcome does not make the
            // guest's own copy safe to run again.
            (
                P::FinishMigrate {
                    before: Before::Unknown,
                },
                T::MigrationDone { snapshot: true },
            ) => stay(P::OutcomeUnknown),
            (P::FinishMigrate { .. }, T::MigrationDone { snapshot }) => {
                stay(P::PostMigrate { snapshot })
            }
            (P::FinishMigrate { .. }, T::OutcomeUnknown) => stay(P::OutcomeUnknown),

            (P::InMigrate { autostart, .. }, T::Restored { source_running }) => {
                stay(P::InMigrate {
                    autostart,
                    source_running,
                })
            }
            (
                P::InMigrate {
                    autostart,
                    source_running,
                },
                T::Arrived,
            ) => {
                if autostart && source_running {
                    to(Vcpus::Resume, P::Running, Some(Event::Resume))
                } else {
                    stay(P::Paused)
                }
            }
            (_, t) => Err(ControlError::WrongState(format!(
                "{t:?} cannot happen while the VM is {}",
                self.state().name()
            ))),
        }
    }

    /// Takes a planned step (its vCPU part done); the event to raise.
    pub fn commit(&mut self, step: Step) -> Option<Event> {
        self.phase = step.next;
        step.event
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Plans and commits `t`; the vCPU action it asked for.
    fn go(l: &mut Lifecycle, t: Transition) -> Result<Vcpus, ControlError> {
        let step = l.plan(t)?;
        let vcpus = step.vcpus;
        l.commit(step);
        Ok(vcpus)
    }

    #[test]
    fn a_booted_guest_runs_stops_and_goes_on() {
        let mut l = Lifecycle::new(false, true);
        assert_eq!(l.state(), RunState::Paused);
        assert_eq!(go(&mut l, Transition::Start).unwrap(), Vcpus::Resume);
        assert_eq!(l.state(), RunState::Running);
        assert_eq!(go(&mut l, Transition::Cont).unwrap(), Vcpus::Stay);
        assert_eq!(go(&mut l, Transition::Stop).unwrap(), Vcpus::Pause);
        assert_eq!(go(&mut l, Transition::Stop).unwrap(), Vcpus::Stay);
        assert_eq!(l.state(), RunState::Paused);
        assert_eq!(go(&mut l, Transition::Cont).unwrap(), Vcpus::Resume);
        assert_eq!(l.state(), RunState::Running);
        // Started once only.
        assert!(l.plan(Transition::Start).is_err());
        let mut s = Lifecycle::new(false, false);
        assert_eq!(go(&mut s, Transition::Start).unwrap(), Vcpus::Stay);
        assert_eq!(s.state(), RunState::Prelaunch);
        assert_eq!(go(&mut s, Transition::Cont).unwrap(), Vcpus::Resume);
    }

    #[test]
    fn a_failed_migration_goes_back_to_where_it_found_the_guest() {
        for (stop_first, state, vcpus) in [
            (false, RunState::Running, Vcpus::Resume),
            (true, RunState::Paused, Vcpus::Stay),
        ] {
            let mut l = Lifecycle::new(false, true);
            go(&mut l, Transition::Start).unwrap();
            if stop_first {
                go(&mut l, Transition::Stop).unwrap();
            }
            let step = l.plan(Transition::PauseForMigration).unwrap();
            assert_eq!(step.event.is_some(), !stop_first);
            l.commit(step);
            assert_eq!(l.state(), RunState::FinishMigrate);
            assert_eq!(l.ran_before_migration(), !stop_first);
            assert!(l.plan(Transition::Stop).is_err());
            assert!(l.plan(Transition::Cont).is_err());
            assert!(l.may_migrate(false).is_err());
            assert_eq!(go(&mut l, Transition::MigrationFailed).unwrap(), vcpus);
            assert_eq!(l.state(), state);
        }
    }

    #[test]
    fn a_migrated_guest_stays_away_unless_it_was_a_snapshot() {
        for snapshot in [false, true] {
            let mut l = Lifecycle::new(false, true);
            go(&mut l, Transition::Start).unwrap();
            go(&mut l, Transition::PauseForMigration).unwrap();
            go(&mut l, Transition::MigrationDone { snapshot }).unwrap();
            assert_eq!(l.state(), RunState::PostMigrate);
            assert_eq!(l.may_migrate(false).is_ok(), snapshot);
            assert_eq!(l.plan(Transition::Cont).is_ok(), snapshot);
        }
        // An unknown outcome leaves the guest paused in its own state:
        // only a forced cont or migration takes it on, and a forced
        // migration that fails comes back to it.
        let mut l = Lifecycle::new(false, true);
        go(&mut l, Transition::Start).unwrap();
        go(&mut l, Transition::PauseForMigration).unwrap();
        go(&mut l, Transition::OutcomeUnknown).unwrap();
        assert_eq!(l.state(), RunState::OutcomeUnknown);
        assert_eq!(l.state().name(), "outcome-unknown");
        let refused = l.plan(Transition::Cont).unwrap_err().to_string();
        assert!(refused.contains("x-force"), "{refused}");
        assert!(l.may_migrate(false).is_err());
        assert!(l.may_migrate(true).is_ok());
        assert_eq!(go(&mut l, Transition::Stop).unwrap(), Vcpus::Stay);
        assert_eq!(
            go(&mut l, Transition::PauseForMigration).unwrap(),
            Vcpus::Stay
        );
        assert_eq!(
            go(&mut l, Transition::MigrationFailed).unwrap(),
            Vcpus::Stay
        );
        assert_eq!(l.state(), RunState::OutcomeUnknown);
        // A forced snapshot leaves it so too; a forced live migration that
        // completes moves the guest away.
        go(&mut l, Transition::PauseForMigration).unwrap();
        go(&mut l, Transition::MigrationDone { snapshot: true }).unwrap();
        assert_eq!(l.state(), RunState::OutcomeUnknown);
        assert!(l.plan(Transition::Cont).is_err());
        assert_eq!(go(&mut l, Transition::ForceCont).unwrap(), Vcpus::Resume);
        assert_eq!(l.state(), RunState::Running);
        let mut away = Lifecycle::new(false, true);
        go(&mut away, Transition::Start).unwrap();
        go(&mut away, Transition::PauseForMigration).unwrap();
        go(&mut away, Transition::OutcomeUnknown).unwrap();
        go(&mut away, Transition::PauseForMigration).unwrap();
        go(&mut away, Transition::MigrationDone { snapshot: false }).unwrap();
        assert_eq!(away.state(), RunState::PostMigrate);
        assert!(away.plan(Transition::Cont).is_err());
    }

    #[test]
    fn an_arriving_guest_runs_only_if_it_ran_and_nobody_said_stop() {
        for (stop, source_running, runs) in [
            (false, true, true),
            (true, true, false),
            (false, false, false),
        ] {
            let mut l = Lifecycle::new(true, true);
            assert_eq!(l.state(), RunState::InMigrate);
            assert_eq!(go(&mut l, Transition::Start).unwrap(), Vcpus::Stay);
            assert!(l.may_migrate(false).is_err());
            if stop {
                go(&mut l, Transition::Stop).unwrap();
            }
            go(&mut l, Transition::Restored { source_running }).unwrap();
            assert_eq!(l.state(), RunState::InMigrate);
            let vcpus = go(&mut l, Transition::Arrived).unwrap();
            assert_eq!(vcpus == Vcpus::Resume, runs);
            let want = if runs {
                RunState::Running
            } else {
                RunState::Paused
            };
            assert_eq!(l.state(), want);
        }
        // `cont` during the wait brings back a `-S` target's autostart.
        let mut l = Lifecycle::new(true, false);
        go(&mut l, Transition::Cont).unwrap();
        assert_eq!(go(&mut l, Transition::Arrived).unwrap(), Vcpus::Resume);
    }

    #[test]
    fn what_cannot_happen_is_refused_and_changes_nothing() {
        let mut l = Lifecycle::new(false, true);
        go(&mut l, Transition::Start).unwrap();
        for t in [
            Transition::MigrationFailed,
            Transition::MigrationDone { snapshot: false },
            Transition::OutcomeUnknown,
            Transition::Arrived,
            Transition::Restored {
                source_running: true,
            },
        ] {
            assert!(l.plan(t).is_err(), "{t:?}");
            assert_eq!(l.state(), RunState::Running);
        }
    }
}
