//! The events stream the agent opens to the host at boot ([`EVENTS_PORT`]): one JSON
//! [`GuestEvent`] a line (OOM kills, a pod's listening ports). Shared by the threads that
//! report; a write error closes it for good.

use std::fs::File;
use std::io::Write;
use std::sync::{Arc, Mutex};

use kestrel_agent_protocol::{GuestEvent, StdioPort, EVENTS_PORT};

use crate::stdio;

pub struct Events {
    sink: Mutex<Option<File>>,
}

impl Events {
    /// Connects to the host; without a listener (`kestrel run`), events go nowhere.
    pub fn connect() -> Arc<Events> {
        let sink = match stdio::connect(StdioPort(EVENTS_PORT)) {
            Ok(f) => Some(f),
            Err(e) => {
                log::debug!("no events stream to the host: {e}");
                None
            }
        };
        Arc::new(Events {
            sink: Mutex::new(sink),
        })
    }

    pub fn send(&self, event: &GuestEvent) {
        let Ok(line) = event.to_line() else { return };
        let mut sink = self.sink.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = sink.as_mut() {
            if let Err(e) = f.write_all(line.as_bytes()) {
                log::warn!("cannot report {event:?}: {e}");
                *sink = None;
            }
        }
    }
}
