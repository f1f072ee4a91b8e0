//! virtio-vsock counters. Updated on the VMM thread, read from anywhere without the device
//! lock (`Vsock::metrics()` hands out the `Arc`).

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of one virtio-vsock device.
#[derive(Debug, Default)]
pub struct VsockMetrics {
    host_connections: AtomicU64,
    guest_connections: AtomicU64,
    closed_connections: AtomicU64,
    refused_connections: AtomicU64,
    active_connections: AtomicU64,
    rx_bytes: AtomicU64,
    tx_bytes: AtomicU64,
    rx_packets: AtomicU64,
    tx_packets: AtomicU64,
    malformed_packets: AtomicU64,
    resets_sent: AtomicU64,
    conn_errors: AtomicU64,
    dropped_resets: AtomicU64,
}

/// A point-in-time copy of [`VsockMetrics`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VsockMetricsSnapshot {
    /// Host-initiated connections the guest accepted (`OK` sent to the host client).
    pub host_connections: u64,
    /// Guest-initiated connections that reached a host listener.
    pub guest_connections: u64,
    /// Established connections that ended (either side, reset or clean).
    pub closed_connections: u64,
    /// Connection attempts that never got established: no listener on either side, guest
    /// timeout, bad `CONNECT` line, connection limit.
    pub refused_connections: u64,
    /// Connections in the table now (established or being set up).
    pub active_connections: u64,
    /// Data bytes sent to the guest (read from host sockets).
    pub rx_bytes: u64,
    /// Data bytes the guest sent that were written to host sockets.
    pub tx_bytes: u64,
    /// Packets put in the guest's RX queue.
    pub rx_packets: u64,
    /// Chains taken from the guest's TX queue, well-formed or not.
    pub tx_packets: u64,
    /// TX chains or RX buffers refused by the parser.
    pub malformed_packets: u64,
    /// OP_RST packets sent to the guest.
    pub resets_sent: u64,
    /// Connections reset because of an error (protocol violation, credit overrun, host I/O).
    pub conn_errors: u64,
    /// Resets for unknown connections dropped because too many were queued.
    pub dropped_resets: u64,
}

#[derive(Clone, Copy, Debug)]
pub(crate) enum Counter {
    HostConnections,
    GuestConnections,
    ClosedConnections,
    RefusedConnections,
    RxBytes,
    TxBytes,
    RxPackets,
    TxPackets,
    MalformedPackets,
    ResetsSent,
    ConnErrors,
    DroppedResets,
}

impl VsockMetrics {
    pub(crate) fn add(&self, counter: Counter, n: u64) {
        let c = match counter {
            Counter::HostConnections => &self.host_connections,
            Counter::GuestConnections => &self.guest_connections,
            Counter::ClosedConnections => &self.closed_connections,
            Counter::RefusedConnections => &self.refused_connections,
            Counter::RxBytes => &self.rx_bytes,
            Counter::TxBytes => &self.tx_bytes,
            Counter::RxPackets => &self.rx_packets,
            Counter::TxPackets => &self.tx_packets,
            Counter::MalformedPackets => &self.malformed_packets,
            Counter::ResetsSent => &self.resets_sent,
            Counter::ConnErrors => &self.conn_errors,
            Counter::DroppedResets => &self.dropped_resets,
        };
        c.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn inc(&self, counter: Counter) {
        self.add(counter, 1);
    }

    pub(crate) fn set_active(&self, n: usize) {
        self.active_connections
            .store(u64::try_from(n).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> VsockMetricsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        VsockMetricsSnapshot {
            host_connections: get(&self.host_connections),
            guest_connections: get(&self.guest_connections),
            closed_connections: get(&self.closed_connections),
            refused_connections: get(&self.refused_connections),
            active_connections: get(&self.active_connections),
            rx_bytes: get(&self.rx_bytes),
            tx_bytes: get(&self.tx_bytes),
            rx_packets: get(&self.rx_packets),
            tx_packets: get(&self.tx_packets),
            malformed_packets: get(&self.malformed_packets),
            resets_sent: get(&self.resets_sent),
            conn_errors: get(&self.conn_errors),
            dropped_resets: get(&self.dropped_resets),
        }
    }
}
