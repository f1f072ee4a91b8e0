//! Threads that confine themselves before they work: [`spawn_confined`] starts a thread,
//! runs its `confine` step there (the VMM installs a seccomp filter, which applies only
//! to the calling thread) and returns only once that step has succeeded, so a caller never
//! gets a thread that serves the guest unconfined.

use std::io;
use std::sync::mpsc;
use std::thread::{Builder, JoinHandle};

/// Errors starting a confined thread.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError<E: std::error::Error + 'static> {
    #[error("cannot start the thread")]
    Spawn(#[source] io::Error),
    #[error("the thread cannot confine itself")]
    Confine(#[source] E),
    #[error("the thread ended before confining itself")]
    Gone,
}

/// Starts `work` on a new thread made by `builder`, after `confine` has run on that thread;
/// waits for `confine`'s result. When it fails, `work` never runs and the thread ends.
pub fn spawn_confined<E>(
    builder: Builder,
    confine: impl FnOnce() -> Result<(), E> + Send + 'static,
    work: impl FnOnce() + Send + 'static,
) -> Result<JoinHandle<()>, SpawnError<E>>
where
    E: std::error::Error + Send + 'static,
{
    let (tx, rx) = mpsc::sync_channel(1);
    let handle = builder
        .spawn(move || {
            let confined = confine();
            let ok = confined.is_ok();
            let _ = tx.send(confined);
            if ok {
                work();
            }
        })
        .map_err(SpawnError::Spawn)?;
    match rx.recv() {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(e)) => {
            let _ = handle.join();
            Err(SpawnError::Confine(e))
        }
        Err(_) => {
            let _ = handle.join();
            Err(SpawnError::Gone)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[test]
    fn work_runs_only_after_confine_succeeds() {
        let ran = Arc::new(AtomicBool::new(false));
        let r = ran.clone();
        let h = spawn_confined(
            Builder::new(),
            || Ok::<(), io::Error>(()),
            move || r.store(true, Ordering::SeqCst),
        )
        .unwrap();
        h.join().unwrap();
        assert!(ran.load(Ordering::SeqCst));

        let ran = Arc::new(AtomicBool::new(false));
        let r = ran.clone();
        let err = spawn_confined(
            Builder::new(),
            || Err(io::Error::other("no filter")),
            move || r.store(true, Ordering::SeqCst),
        )
        .unwrap_err();
        assert!(matches!(err, SpawnError::Confine(ref e) if e.to_string() == "no filter"));
        assert!(
            !ran.load(Ordering::SeqCst),
            "work ran although confine failed"
        );
    }
}
