//! The block device's `event_manager` subscriber. Runs on the disk's **device thread**
//! ([`crate::virtio::worker::DeviceThread`]) only; the
//! protocol is every one-queue device's ([`crate::virtio::single_queue`]).

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

use super::device::Block;
use crate::virtio::device::VirtioDevice;
use crate::virtio::single_queue::{self, SingleQueue};
use crate::virtio::RateLimitedLog;

impl SingleQueue for Block {
    const NAME: &'static str = "virtio-blk";

    fn activate_evt(&self) -> &EventFd {
        &self.activate_evt
    }

    fn queue_evt(&self) -> &EventFd {
        Block::queue_evt(self)
    }

    fn queue_evt_registered(&mut self) -> &mut bool {
        &mut self.queue_evt_registered
    }

    fn is_active(&self) -> bool {
        self.is_activated()
    }

    fn log(&mut self) -> &mut RateLimitedLog {
        Block::log(self)
    }

    fn process_queue(&mut self) {
        Block::process_queue(self);
    }
}

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        single_queue::init(self, ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        single_queue::process(self, events, ops);
    }
}
