//! A host thread parked in a container's network namespace, so that the pid the OCI hooks
//! get in the container's state (`/proc/<pid>/ns/net`) names that namespace, as it does
//! with runc. nerdctl's `createRuntime` hook and Docker's `libnetwork-setkey` wire the
//! container's network into the namespace of the state's pid.
//!
//! A spec that asks for a new network namespace (no path) gets one, made by the thread
//! with `unshare(CLONE_NEWNET)` (allowed in a multi-threaded process: it changes only the
//! calling thread); a spec that names one (`path`) gets a thread that joined it. The
//! namespace lives as long as the thread: dropping the [`NetnsThread`] ends it. Work that
//! must happen inside the namespace (opening the pod's tap, netlink) runs on the thread
//! through [`NetnsThread::run`] ([`crate::podnet`]).

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;

use nix::sched::CloneFlags;
use oci_spec::runtime::{LinuxNamespaceType, Spec};

type Job = Box<dyn FnOnce() + Send>;

/// The thread; its tid is a host pid whose `/proc/<tid>/ns/net` is the namespace.
pub struct NetnsThread {
    tid: u32,
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("cannot open the network namespace {}", .0.display())]
    Open(PathBuf, #[source] io::Error),
    #[error("cannot enter the network namespace {}", .0.display())]
    Enter(PathBuf, #[source] nix::Error),
    #[error("cannot make a network namespace")]
    Unshare(#[source] nix::Error),
    #[error("cannot start the network namespace thread")]
    Thread(#[source] io::Error),
}

/// What the spec asks for: `None` for the host's network (no network namespace),
/// `Some(None)` for a new one, `Some(Some(path))` for an existing one.
pub fn requested(spec: &Spec) -> Option<Option<PathBuf>> {
    let namespaces = spec.linux().as_ref()?.namespaces().as_ref()?;
    let ns = namespaces
        .iter()
        .find(|n| n.typ() == LinuxNamespaceType::Network)?;
    Some(ns.path().clone())
}

impl NetnsThread {
    /// Starts the thread in a new namespace, or in the one at `path`.
    pub fn start(path: Option<&Path>) -> Result<NetnsThread, NetnsError> {
        let target = match path {
            Some(p) => Some((
                File::open(p).map_err(|e| NetnsError::Open(p.to_path_buf(), e))?,
                p.to_path_buf(),
            )),
            None => None,
        };
        let (ready_tx, ready_rx) = mpsc::channel::<Result<u32, NetnsError>>();
        let (jobs_tx, jobs_rx) = mpsc::channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("netns".into())
            .spawn(move || {
                let entered = match &target {
                    Some((file, p)) => nix::sched::setns(file, CloneFlags::CLONE_NEWNET)
                        .map_err(|e| NetnsError::Enter(p.clone(), e)),
                    None => {
                        nix::sched::unshare(CloneFlags::CLONE_NEWNET).map_err(NetnsError::Unshare)
                    }
                };
                let tid = u32::try_from(nix::unistd::gettid().as_raw()).unwrap_or(0);
                let ok = entered.is_ok();
                let _ = ready_tx.send(entered.map(|()| tid));
                if ok {
                    // Parked, running what the owner sends, until it drops its sender.
                    while let Ok(job) = jobs_rx.recv() {
                        job();
                    }
                }
            })
            .map_err(NetnsError::Thread)?;
        let tid = ready_rx
            .recv()
            .unwrap_or_else(|_| Err(NetnsError::Thread(io::Error::other("the thread died"))))?;
        Ok(NetnsThread {
            tid,
            jobs: Some(jobs_tx),
            thread: Some(thread),
        })
    }

    pub fn tid(&self) -> u32 {
        self.tid
    }

    /// Runs `f` on the thread, inside the namespace, and returns its result. Blocks the
    /// caller (call it from the blocking pool).
    pub fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> Result<R, NetnsError> {
        let gone = || NetnsError::Thread(io::Error::other("the namespace thread has ended"));
        let (tx, rx) = mpsc::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        self.jobs
            .as_ref()
            .ok_or_else(gone)?
            .send(job)
            .map_err(|_| gone())?;
        rx.recv().map_err(|_| gone())
    }
}

impl Drop for NetnsThread {
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn netns_of(pid: u32) -> PathBuf {
        std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap()
    }

    #[test]
    fn a_new_namespace_is_the_threads_and_ends_with_it() {
        let t = NetnsThread::start(None).unwrap();
        let mine = netns_of(std::process::id());
        assert_ne!(netns_of(t.tid()), mine);
        // Another thread joins it by path.
        let path = PathBuf::from(format!("/proc/{}/ns/net", t.tid()));
        let joined = NetnsThread::start(Some(&path)).unwrap();
        assert_eq!(netns_of(joined.tid()), netns_of(t.tid()));
        // Work sent to the thread runs in the namespace.
        let inside = joined
            .run(|| std::fs::read_link("/proc/thread-self/ns/net").unwrap())
            .unwrap();
        assert_eq!(inside, netns_of(t.tid()));
        let tid = t.tid();
        drop(t);
        assert!(
            !Path::new(&format!("/proc/{tid}")).exists() || {
                // The tid may be reused at once by another thread of this test process.
                netns_of(tid) == mine
            }
        );
        assert!(matches!(
            NetnsThread::start(Some(Path::new("/nonexistent/ns"))),
            Err(NetnsError::Open(..))
        ));
    }

    #[test]
    fn reads_what_the_spec_asks_for() {
        let spec = |ns: &str| -> Spec {
            serde_json::from_str(&format!(
                r#"{{"ociVersion":"1.0.2","linux":{{"namespaces":{ns}}}}}"#
            ))
            .unwrap()
        };
        assert_eq!(requested(&spec(r#"[{"type":"pid"}]"#)), None);
        assert_eq!(requested(&spec(r#"[{"type":"network"}]"#)), Some(None));
        assert_eq!(
            requested(&spec(
                r#"[{"type":"network","path":"/var/run/netns/cni-1"}]"#
            )),
            Some(Some(PathBuf::from("/var/run/netns/cni-1")))
        );
    }
}
