//! Fuzzes the shim's reader of the guest agent's events stream (vsock port 1025), which a
//! compromised guest writes: the input is the stream. Checked: the reader ends, holds no
//! line longer than the protocol's limit, passes on no OOM kill of a container that is not
//! the VM's, and every port list it passes on is sorted, without repeats and bounded.
//! `cargo fuzz run agent_events` from the repository root.

#![no_main]

use std::cell::RefCell;
use std::sync::OnceLock;

use kestrel_agent_protocol::{GuestEvent, MAX_LISTENING_PORTS};
use kestrel_shim::untrusted::read_event_stream;
use libfuzzer_sys::fuzz_target;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a tokio runtime")
    })
}

fuzz_target!(|stream: &[u8]| {
    let seen = RefCell::new(0usize);
    runtime().block_on(read_event_stream(
        stream,
        |id: &str| id == "c1" || id == "c2",
        |event| {
            *seen.borrow_mut() += 1;
            match event {
                GuestEvent::Oom { container_id } => {
                    assert!(container_id == "c1" || container_id == "c2")
                }
                GuestEvent::Listening { ports } => {
                    assert!(ports.len() <= MAX_LISTENING_PORTS);
                    assert!(ports.windows(2).all(|w| w[0] < w[1]));
                }
            }
        },
    ));
    // No event comes out of less than its smallest line.
    assert!(*seen.borrow() <= stream.len() / 16 + 1);
});
