//! OOM events: one thread watches every container cgroup's `memory.events` with inotify
//! (cgroup v2 signals a change of that file as a modification) and, when its `oom_kill`
//! count goes up, reports [`GuestEvent::Oom`] on the events stream the agent opened to the
//! host at boot ([`EVENTS_PORT`]), which the shim publishes as containerd's TaskOOM.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use kestrel_agent_protocol::GuestEvent;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};

use crate::events::Events;

struct Watched {
    id: String,
    events_file: PathBuf,
    oom_kills: u64,
}

pub struct OomWatcher {
    inotify: Inotify,
    watched: Mutex<HashMap<WatchDescriptor, Watched>>,
    events: Arc<Events>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The `oom_kill` count of a `memory.events` file (0 when unreadable).
pub fn oom_kills(events: &str) -> u64 {
    events
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

impl OomWatcher {
    /// Starts the watching thread, reporting to `events`.
    pub fn start(events: Arc<Events>) -> io::Result<Arc<OomWatcher>> {
        let inotify = Inotify::init(InitFlags::IN_CLOEXEC)?;
        let w = Arc::new(OomWatcher {
            inotify,
            watched: Mutex::new(HashMap::new()),
            events,
        });
        let thread = w.clone();
        std::thread::Builder::new()
            .name("oom".into())
            .spawn(move || thread.run())?;
        Ok(w)
    }

    /// Watches the cgroup `group` of container `id`.
    pub fn watch(&self, id: &str, group: &Path) -> io::Result<WatchDescriptor> {
        let events_file = group.join("memory.events");
        let oom_kills = oom_kills(&std::fs::read_to_string(&events_file).unwrap_or_default());
        let wd = self
            .inotify
            .add_watch(&events_file, AddWatchFlags::IN_MODIFY)?;
        lock(&self.watched).insert(
            wd,
            Watched {
                id: id.to_string(),
                events_file,
                oom_kills,
            },
        );
        Ok(wd)
    }

    pub fn unwatch(&self, wd: WatchDescriptor) {
        if lock(&self.watched).remove(&wd).is_some() {
            let _ = self.inotify.rm_watch(wd);
        }
    }

    fn run(&self) {
        loop {
            let events = match self.inotify.read_events() {
                Ok(e) => e,
                Err(nix::Error::EINTR) => continue,
                Err(e) => {
                    log::warn!("OOM events stop: {e}");
                    return;
                }
            };
            for e in events {
                let report = {
                    let mut watched = lock(&self.watched);
                    let Some(w) = watched.get_mut(&e.wd) else {
                        continue;
                    };
                    let now =
                        oom_kills(&std::fs::read_to_string(&w.events_file).unwrap_or_default());
                    let new = now > w.oom_kills;
                    w.oom_kills = now;
                    new.then(|| w.id.clone())
                };
                if let Some(id) = report {
                    self.send(GuestEvent::Oom { container_id: id });
                }
            }
        }
    }

    fn send(&self, event: GuestEvent) {
        self.events.send(&event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_oom_kills() {
        assert_eq!(oom_kills("low 0\nhigh 0\nmax 3\noom 2\noom_kill 2\n"), 2);
        assert_eq!(oom_kills("oom 1\n"), 0);
        assert_eq!(oom_kills(""), 0);
    }
}
