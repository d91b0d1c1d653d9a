//! `SandboxState`: the lifecycle of one sandbox and its single transition function.
//!
//! ```text
//!   Creating ──► Running ◄──► Paused
//!      │  │         │           │
//!      │  └────┐    ▼           │
//!      │       └► Stopping ◄────┘
//!      ▼            │  │
//!   Failed ─────────┘  ▼
//!   (from any live state)  Destroyed
//! ```
//!
//! `Failed` is reachable from every live state (the VMM died, the agent vanished); the only way
//! out of it is `Stopping`, so a failed sandbox is still cleaned up by `destroy()`.

use serde::{Deserialize, Serialize};

/// Result of a state transition.
pub type Result<T> = std::result::Result<T, StateError>;

/// A transition the table does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("A sandbox cannot go from {from:?} to {to:?}.")]
pub struct StateError {
    /// The current state.
    pub from: SandboxState,
    /// The requested state.
    pub to: SandboxState,
}

impl From<StateError> for crate::Error {
    fn from(e: StateError) -> Self {
        crate::Error::with_source(
            crate::ErrorKind::InvalidState,
            "The sandbox is not in a state that allows this.",
            e,
        )
    }
}

/// Where a sandbox is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum SandboxState {
    /// The backend is building the VM and waiting for the agent handshake.
    Creating,
    /// The agent answered; commands and file operations are accepted.
    Running,
    /// vCPUs are stopped; only resume or destroy are accepted.
    Paused,
    /// `destroy()` is tearing it down.
    Stopping,
    /// Gone: every resource it held has been released. Terminal.
    Destroyed,
    /// Something died underneath (VMM crash, agent lost, TTL); `destroy()` still cleans up.
    Failed,
}

impl SandboxState {
    /// Every state, for exhaustive tests.
    pub const ALL: [SandboxState; 6] = [
        SandboxState::Creating,
        SandboxState::Running,
        SandboxState::Paused,
        SandboxState::Stopping,
        SandboxState::Destroyed,
        SandboxState::Failed,
    ];

    /// The transition table: whether `self -> to` is allowed. Staying in the same state is not a
    /// transition and is refused, so callers notice double pauses and double destroys.
    pub fn can_transition_to(self, to: SandboxState) -> bool {
        use SandboxState::*;
        matches!(
            (self, to),
            (Creating, Running)
                | (Creating, Stopping)
                | (Creating, Failed)
                | (Running, Paused)
                | (Running, Stopping)
                | (Running, Failed)
                | (Paused, Running)
                | (Paused, Stopping)
                | (Paused, Failed)
                | (Stopping, Destroyed)
                | (Stopping, Failed)
                | (Failed, Stopping)
        )
    }

    /// The one transition function: returns the new state, or the refused pair.
    ///
    /// # Errors
    /// [`StateError`] when the table does not allow `self -> to`.
    pub fn transition(self, to: SandboxState) -> Result<SandboxState> {
        if self.can_transition_to(to) {
            Ok(to)
        } else {
            Err(StateError { from: self, to })
        }
    }

    /// Commands and file operations are accepted only while running.
    pub fn can_exec(self) -> bool {
        self == SandboxState::Running
    }
    /// Pausing needs a running sandbox.
    pub fn can_pause(self) -> bool {
        self.can_transition_to(SandboxState::Paused)
    }
    /// Resuming needs a paused sandbox.
    pub fn can_resume(self) -> bool {
        self == SandboxState::Paused
    }
    /// `destroy()` starts from every state but `Stopping` and `Destroyed`.
    pub fn can_destroy(self) -> bool {
        self.can_transition_to(SandboxState::Stopping)
    }
    /// No transition leaves this state.
    pub fn is_terminal(self) -> bool {
        SandboxState::ALL
            .iter()
            .all(|&to| !self.can_transition_to(to))
    }
}

#[cfg(test)]
mod tests {
    use super::SandboxState::{self, *};
    use proptest::prelude::*;

    /// The table written out a second time, as a list of allowed pairs.
    const ALLOWED: &[(SandboxState, SandboxState)] = &[
        (Creating, Running),
        (Creating, Stopping),
        (Creating, Failed),
        (Running, Paused),
        (Running, Stopping),
        (Running, Failed),
        (Paused, Running),
        (Paused, Stopping),
        (Paused, Failed),
        (Stopping, Destroyed),
        (Stopping, Failed),
        (Failed, Stopping),
    ];

    #[test]
    fn every_pair_matches_the_table() {
        for from in SandboxState::ALL {
            for to in SandboxState::ALL {
                let allowed = ALLOWED.contains(&(from, to));
                assert_eq!(from.can_transition_to(to), allowed, "{from:?} -> {to:?}");
                match from.transition(to) {
                    Ok(s) => assert!(allowed && s == to, "{from:?} -> {to:?}"),
                    Err(e) => assert!(
                        !allowed && e.from == from && e.to == to,
                        "{from:?} -> {to:?}"
                    ),
                }
            }
        }
    }

    #[test]
    fn predicates() {
        for s in SandboxState::ALL {
            assert_eq!(s.can_exec(), s == Running, "{s:?}");
            assert_eq!(s.can_pause(), s == Running, "{s:?}");
            assert_eq!(s.can_resume(), s == Paused, "{s:?}");
            assert_eq!(s.can_destroy(), !matches!(s, Stopping | Destroyed), "{s:?}");
            assert_eq!(s.is_terminal(), s == Destroyed, "{s:?}");
        }
    }

    fn any_state() -> impl Strategy<Value = SandboxState> {
        proptest::sample::select(SandboxState::ALL.to_vec())
    }

    proptest! {
        /// Driving the machine with arbitrary requests: refused requests leave the state alone,
        /// Destroyed is only reached through Stopping and is never left, and from every reachable
        /// state destroy() can still finish (or it is already done).
        #[test]
        fn random_walks_keep_invariants(steps in proptest::collection::vec(any_state(), 0..64)) {
            let mut s = Creating;
            for to in steps {
                let before = s;
                match s.transition(to) {
                    Ok(n) => {
                        prop_assert_eq!(n, to);
                        if n == Destroyed { prop_assert_eq!(before, Stopping); }
                        if n == Running { prop_assert!(matches!(before, Creating | Paused)); }
                        s = n;
                    }
                    Err(e) => {
                        prop_assert_eq!((e.from, e.to), (before, to));
                    }
                }
                prop_assert!(before != Destroyed || s == Destroyed);
                let cleanup_possible = s == Destroyed
                    || s.can_destroy()
                    || (s == Stopping && s.can_transition_to(Destroyed));
                prop_assert!(cleanup_possible, "stuck in {:?}", s);
            }
        }
    }
}
