//! A minimal i8042 keyboard controller: enough for Linux's i8042/atkbd drivers to probe a
//! keyboard, for the guest to reset the machine (command 0xFE, what `reboot=k` and
//! `panic=-1` use), and for the host to inject Ctrl-Alt-Del (a graceful shutdown request).
//!
//! Runs on vCPU threads (port accesses) and, for [`I8042::inject_ctrl_alt_del`], on the VMM
//! thread; the caller serialises both through the bus mutex.

use std::collections::VecDeque;
use std::sync::Arc;

use super::{ExitHook, PlatformExit};
use crate::bus::BusDevice;
use crate::irq::IrqLine;

const DATA: u64 = 0;
const COMMAND: u64 = 4;

const STATUS_OUT_FULL: u8 = 0x01;
const STATUS_SYS_FLAG: u8 = 0x04;
const STATUS_CMD_DATA: u8 = 0x08;
/// Set when the keyboard is *not* inhibited (the keylock is open).
const STATUS_NOT_INHIBITED: u8 = 0x10;

const CTR_KBD_INT: u8 = 0x01;

// Controller commands.
const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_AUX_TEST: u8 = 0xa9;
const CMD_READ_OUTP: u8 = 0xd0;
const CMD_WRITE_OUTP: u8 = 0xd1;
const CMD_RESET_CPU: u8 = 0xfe;

// Keyboard commands and replies.
const KBD_ACK: u8 = 0xfa;
const KBD_RESET: u8 = 0xff;
const KBD_GET_ID: u8 = 0xf2;
const KBD_SELF_TEST_OK: u8 = 0xaa;

/// Scan-code set 2 sequence for Ctrl-Alt-Del press and release (Linux's atkbd turns
/// translation off and uses set 2).
const CTRL_ALT_DEL: [u8; 10] = [
    0x14, 0x11, 0xe0, 0x71, // make: ctrl, alt, del
    0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, // break: del, alt (ctrl below)
];
const CTRL_BREAK: [u8; 2] = [0xf0, 0x14];

/// Errors of the i8042.
#[derive(Debug, thiserror::Error)]
pub enum I8042Error {
    #[error("the keyboard output buffer is full")]
    BufferFull,
    #[error("cannot raise the keyboard interrupt")]
    Irq(#[source] std::io::Error),
}

const BUFFER_LIMIT: usize = 64;

/// The keyboard controller.
pub struct I8042 {
    status: u8,
    ctr: u8,
    outp: u8,
    /// The controller command whose data byte the next data-port write carries.
    pending_cmd: Option<u8>,
    buffer: VecDeque<u8>,
    irq: Arc<dyn IrqLine>,
    exit: ExitHook,
}

impl I8042 {
    pub fn new(irq: Arc<dyn IrqLine>, exit: ExitHook) -> Self {
        I8042 {
            status: STATUS_SYS_FLAG | STATUS_NOT_INHIBITED,
            ctr: CTR_KBD_INT,
            outp: 0,
            pending_cmd: None,
            buffer: VecDeque::new(),
            irq,
            exit,
        }
    }

    /// Queues the Ctrl-Alt-Del key sequence and raises the keyboard interrupt: Linux
    /// answers by running its shutdown (`ctrlaltdel` → init gets SIGINT).
    pub fn inject_ctrl_alt_del(&mut self) -> Result<(), I8042Error> {
        if self.buffer.len() + CTRL_ALT_DEL.len() + CTRL_BREAK.len() > BUFFER_LIMIT {
            return Err(I8042Error::BufferFull);
        }
        self.buffer
            .extend(CTRL_ALT_DEL.iter().chain(CTRL_BREAK.iter()));
        self.update_status();
        self.irq.trigger().map_err(I8042Error::Irq)
    }

    fn push(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.buffer.len() < BUFFER_LIMIT {
                self.buffer.push_back(b);
            }
        }
        self.update_status();
        self.interrupt_if_pending();
    }

    /// Linux's handler takes one byte per interrupt: raise it again while bytes wait.
    fn interrupt_if_pending(&self) {
        if self.ctr & CTR_KBD_INT != 0 && !self.buffer.is_empty() {
            // A failed interrupt only delays the guest's read of the buffer (it polls).
            let _ = self.irq.trigger();
        }
    }

    fn update_status(&mut self) {
        if self.buffer.is_empty() {
            self.status &= !STATUS_OUT_FULL;
        } else {
            self.status |= STATUS_OUT_FULL;
        }
    }

    fn command(&mut self, cmd: u8) {
        self.status |= STATUS_CMD_DATA;
        match cmd {
            CMD_READ_CTR => self.push(&[self.ctr]),
            CMD_WRITE_CTR | CMD_WRITE_OUTP => self.pending_cmd = Some(cmd),
            CMD_READ_OUTP => self.push(&[self.outp]),
            CMD_SELF_TEST => self.push(&[0x55]),
            CMD_KBD_TEST | CMD_AUX_TEST => self.push(&[0x00]),
            CMD_RESET_CPU => (self.exit)(PlatformExit::Reset),
            _ => {}
        }
    }

    fn data(&mut self, value: u8) {
        self.status &= !STATUS_CMD_DATA;
        match self.pending_cmd.take() {
            Some(CMD_WRITE_CTR) => self.ctr = value,
            Some(CMD_WRITE_OUTP) => self.outp = value,
            _ => match value {
                KBD_RESET => self.push(&[KBD_ACK, KBD_SELF_TEST_OK]),
                KBD_GET_ID => self.push(&[KBD_ACK, 0xab, 0x83]),
                _ => self.push(&[KBD_ACK]),
            },
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            DATA => {
                let v = self.buffer.pop_front().unwrap_or(0);
                self.update_status();
                self.interrupt_if_pending();
                v
            }
            COMMAND => self.status,
            _ => 0xff,
        };
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            DATA => self.data(value),
            COMMAND => self.command(value),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::irq::CountingIrq;
    use std::sync::Mutex;

    fn dev() -> (I8042, CountingIrq, Arc<Mutex<Vec<PlatformExit>>>) {
        let irq = CountingIrq::default();
        let exits = Arc::new(Mutex::new(Vec::new()));
        let e = exits.clone();
        let d = I8042::new(
            Arc::new(irq.clone()),
            Arc::new(move |x| e.lock().unwrap().push(x)),
        );
        (d, irq, exits)
    }

    fn read(d: &mut I8042, off: u64) -> u8 {
        let mut b = [0u8];
        d.read(off, &mut b);
        b[0]
    }

    #[test]
    fn reset_command_requests_reset() {
        let (mut d, _, exits) = dev();
        d.write(COMMAND, &[CMD_RESET_CPU]);
        assert_eq!(*exits.lock().unwrap(), vec![PlatformExit::Reset]);
    }

    #[test]
    fn controller_self_test_and_ctr_round_trip() {
        let (mut d, _, _) = dev();
        d.write(COMMAND, &[CMD_SELF_TEST]);
        assert_eq!(read(&mut d, COMMAND) & STATUS_OUT_FULL, STATUS_OUT_FULL);
        assert_eq!(read(&mut d, DATA), 0x55);
        assert_eq!(read(&mut d, COMMAND) & STATUS_OUT_FULL, 0);
        d.write(COMMAND, &[CMD_WRITE_CTR]);
        d.write(DATA, &[0x47]);
        d.write(COMMAND, &[CMD_READ_CTR]);
        assert_eq!(read(&mut d, DATA), 0x47);
    }

    #[test]
    fn keyboard_reset_acks_and_passes_self_test() {
        let (mut d, irq, _) = dev();
        d.write(DATA, &[KBD_RESET]);
        assert_eq!(read(&mut d, DATA), KBD_ACK);
        assert_eq!(read(&mut d, DATA), KBD_SELF_TEST_OK);
        assert!(irq.count() >= 1);
    }

    #[test]
    fn ctrl_alt_del_interrupts_once_per_scancode_byte() {
        let (mut d, irq, _) = dev();
        d.inject_ctrl_alt_del().unwrap();
        assert_eq!(irq.count(), 1);
        let mut seq = Vec::new();
        while read(&mut d, COMMAND) & STATUS_OUT_FULL != 0 {
            seq.push(read(&mut d, DATA));
        }
        assert_eq!(&seq[..4], &[0x14, 0x11, 0xe0, 0x71]);
        assert_eq!(seq.len(), 12);
        // One interrupt per byte, as Linux's handler reads one byte per interrupt.
        assert_eq!(irq.count(), 12);
    }

    #[test]
    fn keyboard_is_not_inhibited() {
        let (mut d, _, _) = dev();
        assert_ne!(read(&mut d, COMMAND) & STATUS_NOT_INHIBITED, 0);
    }
}
