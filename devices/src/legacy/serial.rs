//! COM1: the guest console, on vm-superio's 16550A model.
//!
//! Guest writes (vCPU thread) go straight to the host writer, one flushed byte at a time.
//! Host input is fed by the VMM thread through [`SerialConsole::enqueue_input`]; the UART's
//! receive FIFO holds 64 bytes, so the VMM thread stops reading its input source while the
//! FIFO is full and resumes when [`SerialConsole::input_drained_evt`] fires (the guest
//! emptied the FIFO).

use std::io::{self, Write};
use std::sync::Arc;

use vm_superio::serial::SerialEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::irq::IrqLine;

/// Adapts an [`IrqLine`] to vm-superio's `Trigger`.
pub struct IrqTrigger(Arc<dyn IrqLine>);

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.trigger()
    }
}

/// Signals the VMM thread when the guest has drained the receive FIFO.
pub struct InputEvents {
    drained: EventFd,
}

impl SerialEvents for InputEvents {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        // If the counter is saturated the VMM thread is already due to wake up.
        let _ = self.drained.write(1);
    }
}

/// Errors of the serial console.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    #[error("cannot create the serial input event")]
    EventFd(#[source] io::Error),
    #[error("cannot raise the serial interrupt")]
    Irq(#[source] io::Error),
}

/// The COM1 UART.
pub struct SerialConsole {
    uart: Serial<IrqTrigger, InputEvents, Box<dyn Write + Send>>,
}

impl SerialConsole {
    pub fn new(irq: Arc<dyn IrqLine>, out: Box<dyn Write + Send>) -> Result<Self, SerialError> {
        let drained = EventFd::new(libc::EFD_NONBLOCK).map_err(SerialError::EventFd)?;
        Ok(SerialConsole {
            uart: Serial::with_events(IrqTrigger(irq), InputEvents { drained }, out),
        })
    }

    /// Readable when the guest has emptied the receive FIFO after it was filled.
    pub fn input_drained_evt(&self) -> &EventFd {
        &self.uart.events().drained
    }

    /// How many input bytes the UART accepts right now.
    pub fn input_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Queues as much of `input` as fits; returns how many bytes were taken.
    pub fn enqueue_input(&mut self, input: &[u8]) -> Result<usize, SerialError> {
        let n = input.len().min(self.uart.fifo_capacity());
        let Some(chunk) = input.get(..n).filter(|c| !c.is_empty()) else {
            return Ok(0);
        };
        self.uart.enqueue_raw_bytes(chunk).map_err(|e| match e {
            vm_superio::serial::Error::Trigger(e) | vm_superio::serial::Error::IOError(e) => {
                SerialError::Irq(e)
            }
            vm_superio::serial::Error::FullFifo => {
                SerialError::Irq(io::Error::other("receive FIFO full"))
            }
        })
    }
}

impl BusDevice for SerialConsole {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Ok(off), Some(first)) = (u8::try_from(offset), data.first_mut()) {
            *first = self.uart.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(off), Some(&value)) = (u8::try_from(offset), data.first()) {
            if let Err(e) = self.uart.write(off, value) {
                log::warn!("serial console write failed: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::irq::CountingIrq;
    use std::sync::Mutex;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn guest_output_reaches_writer_and_input_is_bounded() {
        let sink = Sink::default();
        let irq = CountingIrq::default();
        let mut s = SerialConsole::new(Arc::new(irq.clone()), Box::new(sink.clone())).unwrap();
        for b in b"hi\n" {
            s.write(0, &[*b]);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi\n");

        // Enable the receive interrupt (IER bit 0), then overfill the FIFO.
        s.write(1, &[1]);
        let big = [b'x'; 100];
        let taken = s.enqueue_input(&big).unwrap();
        assert_eq!(taken, 64);
        assert_eq!(s.input_capacity(), 0);
        assert_eq!(s.enqueue_input(&big).unwrap(), 0);
        assert!(irq.count() >= 1);
        // The guest drains the FIFO: the drained event fires.
        let mut b = [0u8];
        for _ in 0..64 {
            s.read(0, &mut b);
        }
        assert_eq!(s.input_drained_evt().read().unwrap(), 1);
    }
}
