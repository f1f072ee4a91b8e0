//! virtio-net counters. Updated on the VMM thread, read from anywhere without the device lock
//! (`Net::metrics` hands out the `Arc`).

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of one virtio-net device.
#[derive(Debug, Default)]
pub struct NetMetrics {
    rx_packets: AtomicU64,
    rx_bytes: AtomicU64,
    tx_packets: AtomicU64,
    tx_bytes: AtomicU64,
    rx_dropped_too_large: AtomicU64,
    rx_dropped: AtomicU64,
    tx_dropped_too_large: AtomicU64,
    rx_malformed_chains: AtomicU64,
    tx_malformed_chains: AtomicU64,
    rx_backend_errors: AtomicU64,
    tx_backend_errors: AtomicU64,
    rx_stalls: AtomicU64,
    offload_errors: AtomicU64,
}

/// A point-in-time copy of [`NetMetrics`]. Byte counts are Ethernet frames, without the
/// 12-byte virtio-net header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetMetricsSnapshot {
    /// Frames delivered into the guest.
    pub rx_packets: u64,
    pub rx_bytes: u64,
    /// Frames the guest sent that the backend accepted.
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Host frames larger than the buffers the guest offered (dropped).
    pub rx_dropped_too_large: u64,
    /// Host frames dropped for other reasons: shorter than the header, or pending when the
    /// driver reset the device.
    pub rx_dropped: u64,
    /// Guest frames over 64 KiB + headers (dropped).
    pub tx_dropped_too_large: u64,
    /// RX chains refused by the parser (returned to the guest with length 0).
    pub rx_malformed_chains: u64,
    /// TX chains refused by the parser (returned unsent).
    pub tx_malformed_chains: u64,
    /// Reads from the backend that failed (other than "nothing to read").
    pub rx_backend_errors: u64,
    /// Frames the backend refused or could not take (dropped).
    pub tx_backend_errors: u64,
    /// Times reception paused because the guest had no RX buffers.
    pub rx_stalls: u64,
    /// Failed TUNSETOFFLOAD calls at activation.
    pub offload_errors: u64,
}

#[derive(Clone, Copy, Debug)]
pub(crate) enum Counter {
    RxPackets,
    RxBytes,
    TxPackets,
    TxBytes,
    RxDroppedTooLarge,
    RxDropped,
    TxDroppedTooLarge,
    RxMalformedChains,
    TxMalformedChains,
    RxBackendErrors,
    TxBackendErrors,
    RxStalls,
    OffloadErrors,
}

impl NetMetrics {
    fn counter(&self, counter: Counter) -> &AtomicU64 {
        match counter {
            Counter::RxPackets => &self.rx_packets,
            Counter::RxBytes => &self.rx_bytes,
            Counter::TxPackets => &self.tx_packets,
            Counter::TxBytes => &self.tx_bytes,
            Counter::RxDroppedTooLarge => &self.rx_dropped_too_large,
            Counter::RxDropped => &self.rx_dropped,
            Counter::TxDroppedTooLarge => &self.tx_dropped_too_large,
            Counter::RxMalformedChains => &self.rx_malformed_chains,
            Counter::TxMalformedChains => &self.tx_malformed_chains,
            Counter::RxBackendErrors => &self.rx_backend_errors,
            Counter::TxBackendErrors => &self.tx_backend_errors,
            Counter::RxStalls => &self.rx_stalls,
            Counter::OffloadErrors => &self.offload_errors,
        }
    }

    pub(crate) fn add(&self, counter: Counter, n: u64) {
        self.counter(counter).fetch_add(n, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> NetMetricsSnapshot {
        let get = |c| self.counter(c).load(Ordering::Relaxed);
        NetMetricsSnapshot {
            rx_packets: get(Counter::RxPackets),
            rx_bytes: get(Counter::RxBytes),
            tx_packets: get(Counter::TxPackets),
            tx_bytes: get(Counter::TxBytes),
            rx_dropped_too_large: get(Counter::RxDroppedTooLarge),
            rx_dropped: get(Counter::RxDropped),
            tx_dropped_too_large: get(Counter::TxDroppedTooLarge),
            rx_malformed_chains: get(Counter::RxMalformedChains),
            tx_malformed_chains: get(Counter::TxMalformedChains),
            rx_backend_errors: get(Counter::RxBackendErrors),
            tx_backend_errors: get(Counter::TxBackendErrors),
            rx_stalls: get(Counter::RxStalls),
            offload_errors: get(Counter::OffloadErrors),
        }
    }
}
