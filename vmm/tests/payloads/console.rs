//! A payload's console as the tests read it (shared by the `vmm` test suites through
//! `#[path]`): everything the guest writes to COM1, up to 1 MiB (a storm's random port
//! writes reach COM1 too).

use std::io::{self, Write};
use std::sync::{Arc, Mutex};

const LIMIT: usize = 1 << 20;

#[derive(Clone, Default)]
pub struct Console(Arc<Mutex<Vec<u8>>>);

impl Write for Console {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        let mut v = self.0.lock().unwrap();
        let room = LIMIT.saturating_sub(v.len());
        v.extend_from_slice(&b[..b.len().min(room)]);
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Console {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}
