//! The cleanup stack: setup pushes the undo of each step as soon as the step has an effect;
//! on failure the stack runs in reverse and goes on past individual errors. Teardown runs the
//! same undo actions, derived from the sandbox id, so it deletes exactly what setup creates and
//! is idempotent (each action treats "already gone" as done).

use std::future::Future;

/// One undo action. Objects inside the sandbox netns (tap, the sandbox veth end, addresses,
/// routes, the nft table, conntrack) need none: deleting the netns deletes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Undo {
    /// Give the veth slot back and forget the sandbox.
    Forget { id: String, slot: u32 },
    /// Unmount and remove `/run/netns/<name>`.
    DeleteNetns(String),
    /// Delete a link in the host netns (a veth end; its peer goes with it).
    DeleteHostLink(String),
}

/// The effects of the undo actions: the real one in [`crate::network`], a recording fake in
/// tests.
pub(crate) trait UndoOps {
    /// Performs `undo`. "Already gone" is success.
    fn undo(&self, undo: &Undo) -> impl Future<Output = Result<(), crate::NetError>> + Send;
}

/// Undo actions in the order they were armed.
#[derive(Debug, Default)]
pub(crate) struct CleanupStack {
    armed: Vec<Undo>,
}

impl CleanupStack {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Arms `undo`; it runs before everything armed earlier.
    pub(crate) fn push(&mut self, undo: Undo) {
        self.armed.push(undo);
    }

    /// Setup succeeded: nothing is undone.
    pub(crate) fn disarm(&mut self) {
        self.armed.clear();
    }

    /// Takes the armed actions out, newest first.
    pub(crate) fn take(&mut self) -> Vec<Undo> {
        let mut v = std::mem::take(&mut self.armed);
        v.reverse();
        v
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.armed.is_empty()
    }
}

/// Runs `undos` in order, every one of them, and returns the errors.
pub(crate) async fn run_all<O: UndoOps>(ops: &O, undos: &[Undo]) -> Vec<crate::NetError> {
    let mut errors = Vec::new();
    for u in undos {
        if let Err(e) = ops.undo(u).await {
            tracing::warn!(undo = ?u, error = %e, "network cleanup step failed");
            errors.push(e);
        }
    }
    errors
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Records every action and fails the ones listed.
    #[derive(Debug, Default)]
    pub(crate) struct Recorder {
        pub(crate) seen: Mutex<Vec<Undo>>,
        pub(crate) fail: Vec<Undo>,
    }

    impl UndoOps for Recorder {
        async fn undo(&self, undo: &Undo) -> Result<(), crate::NetError> {
            self.seen.lock().expect("not poisoned").push(undo.clone());
            if self.fail.contains(undo) {
                return Err(crate::NetError::Injected {
                    step: crate::SetupStep::Netns,
                });
            }
            Ok(())
        }
    }

    fn block_on<F: Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    #[test]
    fn runs_newest_first_and_past_errors() {
        let mut s = CleanupStack::new();
        let a = Undo::Forget {
            id: "a".into(),
            slot: 3,
        };
        let b = Undo::DeleteNetns("sbx-a".into());
        let c = Undo::DeleteHostLink("vsbx00000000".into());
        s.push(a.clone());
        s.push(b.clone());
        s.push(c.clone());
        let rec = Recorder {
            fail: vec![b.clone()],
            ..Recorder::default()
        };
        let undos = s.take();
        assert!(s.is_empty());
        let errors = block_on(run_all(&rec, &undos));
        assert_eq!(errors.len(), 1, "the failing step is reported");
        assert_eq!(*rec.seen.lock().expect("not poisoned"), vec![c, b, a]);
    }

    #[test]
    fn disarmed_runs_nothing() {
        let mut s = CleanupStack::new();
        s.push(Undo::DeleteNetns("x".into()));
        s.disarm();
        let rec = Recorder::default();
        let errors = block_on(run_all(&rec, &s.take()));
        assert!(errors.is_empty());
        assert!(rec.seen.lock().expect("not poisoned").is_empty());
    }
}
