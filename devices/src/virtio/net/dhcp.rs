//! A DHCP server inside virtio-net, for VM images on a pod network (docs/pods.md §3): the
//! guest's DHCP client gets the pod's address, routes, DNS and hostname from the device
//! itself — no bridge, no server process, no extra address in the pod's namespace.
//!
//! [`reply`] is pure: it reads one Ethernet frame the guest sent and, if it is a DHCP
//! DISCOVER, REQUEST or INFORM from the guest's own MAC, returns the OFFER, ACK or NAK to
//! deliver back. [`DhcpBackend`] wraps the real backend (the tap): those frames never reach
//! the tap, the answers are read before the tap's frames. Everything else passes through.
//!
//! When routes other than the default one are configured, the default route is also
//! carried in option 121, which clients prefer over option 3 (RFC 3442; Virtlet learnt that
//! clients then ignore the router option).
//!
//! Guest input is hostile: every length is checked, nothing panics, a frame that is not a
//! well-formed request from the guest's MAC is simply not answered.

use std::collections::VecDeque;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, RawFd};

use super::backend::NetBackend;
use super::VNET_HDR_LEN;

const ETH_HLEN: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
const UDP: u8 = 17;
const SERVER_PORT: u16 = 67;
const CLIENT_PORT: u16 = 68;
const BOOTP_LEN: usize = 236;
const MAGIC: [u8; 4] = [99, 130, 83, 99];
/// The server's MAC in the frames it sends (locally administered).
pub const SERVER_MAC: [u8; 6] = [0x02, 0x6b, 0x65, 0x73, 0x74, 0x6c];

const DISCOVER: u8 = 1;
const OFFER: u8 = 2;
const REQUEST: u8 = 3;
const ACK: u8 = 5;
const NAK: u8 = 6;
const INFORM: u8 = 8;

/// What the guest is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpConfig {
    /// The guest NIC's MAC: only its requests are answered.
    pub client_mac: [u8; 6],
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Option<Ipv4Addr>,
    /// Further routes: (destination, prefix, gateway).
    pub routes: Vec<(Ipv4Addr, u8, Ipv4Addr)>,
    pub dns: Vec<Ipv4Addr>,
    pub domain: Option<String>,
    pub hostname: Option<String>,
    pub mtu: Option<u16>,
    /// The server identifier (the gateway, else the address itself).
    pub server: Ipv4Addr,
    pub lease_secs: u32,
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// The DHCP message type and options of a BOOTP payload.
struct Request<'a> {
    kind: u8,
    xid: [u8; 4],
    flags: [u8; 2],
    ciaddr: [u8; 4],
    chaddr: [u8; 6],
    options: &'a [u8],
}

fn option(options: &[u8], code: u8) -> Option<&[u8]> {
    let mut at = 0;
    while at < options.len() {
        let c = *options.get(at)?;
        match c {
            0 => at += 1,
            255 => return None,
            _ => {
                let len = usize::from(*options.get(at + 1)?);
                let value = options.get(at + 2..at + 2 + len)?;
                if c == code {
                    return Some(value);
                }
                at += 2 + len;
            }
        }
    }
    None
}

/// The BOOTP request in an Ethernet frame, if it is one for a DHCP server.
fn parse(frame: &[u8]) -> Option<Request<'_>> {
    if be16(frame, 12)? != ETHERTYPE_IPV4 {
        return None;
    }
    let ip = frame.get(ETH_HLEN..)?;
    let version_ihl = *ip.first()?;
    let ihl = usize::from(version_ihl & 0x0f) * 4;
    if version_ihl >> 4 != 4 || ihl < 20 || *ip.get(9)? != UDP {
        return None;
    }
    // Fragments are not DHCP.
    if be16(ip, 6)? & 0x3fff != 0 {
        return None;
    }
    let udp = ip.get(ihl..)?;
    if be16(udp, 2)? != SERVER_PORT || be16(udp, 0)? != CLIENT_PORT {
        return None;
    }
    let udp_len = usize::from(be16(udp, 4)?);
    let bootp = udp.get(8..udp_len.min(udp.len()))?;
    if bootp.len() < BOOTP_LEN + 4 || *bootp.first()? != 1 || bootp.get(1..3)? != [1, 6] {
        return None;
    }
    if bootp.get(BOOTP_LEN..BOOTP_LEN + 4)? != MAGIC {
        return None;
    }
    let options = bootp.get(BOOTP_LEN + 4..)?;
    let kind = *option(options, 53)?.first()?;
    Some(Request {
        kind,
        xid: bootp.get(4..8)?.try_into().ok()?,
        flags: bootp.get(10..12)?.try_into().ok()?,
        ciaddr: bootp.get(12..16)?.try_into().ok()?,
        chaddr: bootp.get(28..34)?.try_into().ok()?,
        options,
    })
}

fn mask(prefix: u8) -> Ipv4Addr {
    let bits = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix.min(32)))
    };
    Ipv4Addr::from(bits)
}

fn push_option(out: &mut Vec<u8>, code: u8, value: &[u8]) {
    // Options longer than 255 bytes are cut to what fits (long search lists).
    let value = value.get(..value.len().min(255)).unwrap_or_default();
    out.push(code);
    out.push(value.len() as u8);
    out.extend_from_slice(value);
}

/// RFC 3442's encoding of one route: prefix length, the significant octets, the router.
fn classless(out: &mut Vec<u8>, dst: Ipv4Addr, prefix: u8, via: Ipv4Addr) {
    let prefix = prefix.min(32);
    out.push(prefix);
    let octets = dst.octets();
    out.extend_from_slice(
        octets
            .get(..usize::from(prefix).div_ceil(8))
            .unwrap_or_default(),
    );
    out.extend_from_slice(&via.octets());
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for pair in data.chunks(2) {
        let word = u16::from_be_bytes([
            pair.first().copied().unwrap_or(0),
            pair.get(1).copied().unwrap_or(0),
        ]);
        sum = sum.wrapping_add(u32::from(word));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The answer to `frame` (an Ethernet frame the guest sent), or `None` when it is not a
/// DHCP request of `cfg.client_mac` that the server answers.
pub fn reply(cfg: &DhcpConfig, frame: &[u8]) -> Option<Vec<u8>> {
    let req = parse(frame)?;
    if req.chaddr != cfg.client_mac {
        return None;
    }
    let kind = match req.kind {
        DISCOVER => OFFER,
        REQUEST => {
            let requested = option(req.options, 50)
                .and_then(|v| <[u8; 4]>::try_from(v).ok())
                .unwrap_or(req.ciaddr);
            if requested == cfg.address.octets() {
                ACK
            } else {
                NAK
            }
        }
        INFORM => ACK,
        _ => return None,
    };

    let mut fixed = [0u8; BOOTP_LEN];
    fixed[0] = 2; // BOOTREPLY
    fixed[1] = 1;
    fixed[2] = 6;
    fixed[4..8].copy_from_slice(&req.xid);
    fixed[10..12].copy_from_slice(&req.flags);
    if req.kind == INFORM {
        fixed[12..16].copy_from_slice(&req.ciaddr);
    } else if kind != NAK {
        fixed[16..20].copy_from_slice(&cfg.address.octets());
    }
    fixed[20..24].copy_from_slice(&cfg.server.octets());
    fixed[28..34].copy_from_slice(&req.chaddr);
    let mut bootp = fixed.to_vec();
    bootp.extend_from_slice(&MAGIC);
    push_option(&mut bootp, 53, &[kind]);
    push_option(&mut bootp, 54, &cfg.server.octets());
    if kind != NAK {
        if req.kind != INFORM {
            let lease = cfg.lease_secs;
            push_option(&mut bootp, 51, &lease.to_be_bytes());
            push_option(&mut bootp, 58, &(lease / 2).to_be_bytes());
            push_option(&mut bootp, 59, &(lease / 8 * 7).to_be_bytes());
        }
        push_option(&mut bootp, 1, &mask(cfg.prefix).octets());
        if let Some(gw) = cfg.gateway {
            push_option(&mut bootp, 3, &gw.octets());
        }
        if !cfg.routes.is_empty() {
            let mut routes = Vec::new();
            for &(dst, prefix, via) in &cfg.routes {
                classless(&mut routes, dst, prefix, via);
            }
            if let Some(gw) = cfg.gateway {
                classless(&mut routes, Ipv4Addr::UNSPECIFIED, 0, gw);
            }
            push_option(&mut bootp, 121, &routes);
        }
        if !cfg.dns.is_empty() {
            let dns: Vec<u8> = cfg.dns.iter().flat_map(|d| d.octets()).collect();
            push_option(&mut bootp, 6, &dns);
        }
        if let Some(d) = &cfg.domain {
            push_option(&mut bootp, 15, d.as_bytes());
        }
        if let Some(h) = &cfg.hostname {
            push_option(&mut bootp, 12, h.as_bytes());
        }
        if let Some(mtu) = cfg.mtu {
            push_option(&mut bootp, 26, &mtu.to_be_bytes());
        }
    }
    bootp.push(255);

    let broadcast = req.flags[0] & 0x80 != 0 || kind == NAK || req.ciaddr == [0; 4];
    let (dst_mac, dst_ip) = if broadcast {
        ([0xff; 6], Ipv4Addr::BROADCAST)
    } else {
        (req.chaddr, Ipv4Addr::from(req.ciaddr))
    };
    let udp_len = 8 + bootp.len();
    let ip_len = 20 + udp_len;
    let mut out = Vec::with_capacity(ETH_HLEN + ip_len);
    out.extend_from_slice(&dst_mac);
    out.extend_from_slice(&SERVER_MAC);
    out.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&(ip_len as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = UDP;
    ip[12..16].copy_from_slice(&cfg.server.octets());
    ip[16..20].copy_from_slice(&dst_ip.octets());
    let sum = checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    out.extend_from_slice(&ip);
    out.extend_from_slice(&SERVER_PORT.to_be_bytes());
    out.extend_from_slice(&CLIENT_PORT.to_be_bytes());
    out.extend_from_slice(&(udp_len as u16).to_be_bytes());
    // No UDP checksum (allowed for IPv4).
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&bootp);
    Some(out)
}

/// A backend that answers the guest's DHCP requests itself and passes everything else
/// to `inner` (see the module documentation).
pub struct DhcpBackend {
    inner: Box<dyn NetBackend>,
    config: DhcpConfig,
    answers: VecDeque<Vec<u8>>,
}

/// Answers waiting for the guest beyond this are dropped (a guest flooding requests).
const MAX_ANSWERS: usize = 16;

impl DhcpBackend {
    pub fn new(inner: Box<dyn NetBackend>, config: DhcpConfig) -> Self {
        DhcpBackend {
            inner,
            config,
            answers: VecDeque::new(),
        }
    }
}

impl AsRawFd for DhcpBackend {
    fn as_raw_fd(&self) -> RawFd {
        self.inner.as_raw_fd()
    }
}

impl NetBackend for DhcpBackend {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.answers.pop_front() {
            Some(frame) => {
                let dst = buf
                    .get_mut(..frame.len())
                    .ok_or_else(|| io::Error::other("DHCP answer larger than the buffer"))?;
                dst.copy_from_slice(&frame);
                Ok(frame.len())
            }
            None => self.inner.read_frame(buf),
        }
    }

    fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize> {
        let answer = frame
            .get(VNET_HDR_LEN..)
            .and_then(|eth| reply(&self.config, eth));
        match answer {
            Some(eth) => {
                if self.answers.len() < MAX_ANSWERS {
                    let mut framed = vec![0u8; VNET_HDR_LEN];
                    framed.extend_from_slice(&eth);
                    self.answers.push_back(framed);
                }
                Ok(frame.len())
            }
            None => self.inner.write_frame(frame),
        }
    }

    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        self.inner.set_offload(flags)
    }

    fn has_pending(&self) -> bool {
        !self.answers.is_empty()
    }
}

/// A client's DISCOVER from `mac`, for the device's tests.
#[cfg(test)]
pub(crate) fn test_discover(mac: [u8; 6]) -> Vec<u8> {
    tests::request(DISCOVER, mac, &[])
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x0a, 0x58, 0x0a, 0x58, 0, 7];

    fn config() -> DhcpConfig {
        DhcpConfig {
            client_mac: MAC,
            address: Ipv4Addr::new(10, 88, 0, 7),
            prefix: 16,
            gateway: Some(Ipv4Addr::new(10, 88, 0, 1)),
            routes: vec![],
            dns: vec![Ipv4Addr::new(10, 96, 0, 10)],
            domain: Some("default.svc.cluster.local".into()),
            hostname: Some("vm-0".into()),
            mtu: Some(1450),
            server: Ipv4Addr::new(10, 88, 0, 1),
            lease_secs: 86400,
        }
    }

    /// A client's request as the kernel's ipconfig or dhclient sends it.
    pub(super) fn request(kind: u8, mac: [u8; 6], extra: &[(u8, &[u8])]) -> Vec<u8> {
        let mut bootp = vec![0u8; BOOTP_LEN];
        bootp[0] = 1;
        bootp[1] = 1;
        bootp[2] = 6;
        bootp[4..8].copy_from_slice(&[1, 2, 3, 4]);
        bootp[10] = 0x80;
        bootp[28..34].copy_from_slice(&mac);
        bootp.extend_from_slice(&MAGIC);
        push_option(&mut bootp, 53, &[kind]);
        for (c, v) in extra {
            push_option(&mut bootp, *c, v);
        }
        bootp.push(255);
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&mac);
        f.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        let udp_len = 8 + bootp.len();
        let mut ip = [0u8; 20];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&((20 + udp_len) as u16).to_be_bytes());
        ip[8] = 64;
        ip[9] = UDP;
        ip[16..20].copy_from_slice(&[255; 4]);
        f.extend_from_slice(&ip);
        f.extend_from_slice(&CLIENT_PORT.to_be_bytes());
        f.extend_from_slice(&SERVER_PORT.to_be_bytes());
        f.extend_from_slice(&(udp_len as u16).to_be_bytes());
        f.extend_from_slice(&[0, 0]);
        f.extend_from_slice(&bootp);
        f
    }

    fn options_of(answer: &[u8]) -> &[u8] {
        &answer[ETH_HLEN + 28 + BOOTP_LEN + 4..]
    }

    #[test]
    fn discover_gets_an_offer_and_request_an_ack() {
        let cfg = config();
        let offer = reply(&cfg, &request(DISCOVER, MAC, &[])).unwrap();
        assert_eq!(&offer[0..6], &[0xff; 6]);
        assert_eq!(&offer[6..12], &SERVER_MAC);
        let ip = &offer[ETH_HLEN..ETH_HLEN + 20];
        assert_eq!(checksum(ip), 0, "IPv4 header checksum");
        assert_eq!(&ip[12..16], &[10, 88, 0, 1]);
        let bootp = &offer[ETH_HLEN + 28..];
        assert_eq!(bootp[0], 2);
        assert_eq!(&bootp[4..8], &[1, 2, 3, 4]);
        assert_eq!(&bootp[16..20], &[10, 88, 0, 7]);
        let opts = options_of(&offer);
        assert_eq!(option(opts, 53), Some(&[OFFER][..]));
        assert_eq!(option(opts, 1), Some(&[255, 255, 0, 0][..]));
        assert_eq!(option(opts, 3), Some(&[10, 88, 0, 1][..]));
        assert_eq!(option(opts, 6), Some(&[10, 96, 0, 10][..]));
        assert_eq!(option(opts, 12), Some(&b"vm-0"[..]));
        assert_eq!(option(opts, 26), Some(&1450u16.to_be_bytes()[..]));
        assert_eq!(option(opts, 51), Some(&86400u32.to_be_bytes()[..]));
        assert_eq!(option(opts, 121), None);

        let ack = reply(&cfg, &request(REQUEST, MAC, &[(50, &[10, 88, 0, 7])])).unwrap();
        assert_eq!(option(options_of(&ack), 53), Some(&[ACK][..]));
        let nak = reply(&cfg, &request(REQUEST, MAC, &[(50, &[10, 88, 0, 99])])).unwrap();
        assert_eq!(option(options_of(&nak), 53), Some(&[NAK][..]));
        assert_eq!(&nak[ETH_HLEN + 28 + 16..ETH_HLEN + 28 + 20], &[0; 4]);
    }

    #[test]
    fn an_on_link_gateway_goes_in_classless_routes_with_the_default() {
        let mut cfg = config();
        cfg.prefix = 32;
        cfg.gateway = Some(Ipv4Addr::new(169, 254, 1, 1));
        cfg.routes = vec![(Ipv4Addr::new(169, 254, 1, 1), 32, Ipv4Addr::UNSPECIFIED)];
        let offer = reply(&cfg, &request(DISCOVER, MAC, &[])).unwrap();
        assert_eq!(
            option(options_of(&offer), 121),
            Some(&[32, 169, 254, 1, 1, 0, 0, 0, 0, 0, 169, 254, 1, 1][..])
        );
    }

    #[test]
    fn other_frames_are_not_answered() {
        let cfg = config();
        // Another MAC, a reply, a release, garbage, truncations at every length.
        assert!(reply(&cfg, &request(DISCOVER, [2, 0, 0, 0, 0, 1], &[])).is_none());
        assert!(reply(&cfg, &request(7, MAC, &[])).is_none());
        let good = request(DISCOVER, MAC, &[]);
        for n in 0..good.len() {
            let _ = reply(&cfg, &good[..n]);
        }
        let mut bad_opts = good.clone();
        let at = ETH_HLEN + 28 + BOOTP_LEN + 4;
        bad_opts[at + 1] = 200; // an option running past the end
        assert!(reply(&cfg, &bad_opts).is_none());
        let mut not_udp = good.clone();
        not_udp[ETH_HLEN + 9] = 6;
        assert!(reply(&cfg, &not_udp).is_none());
        assert!(reply(&cfg, &[0u8; 64]).is_none());
    }

    #[test]
    fn the_backend_keeps_dhcp_off_the_tap_and_answers_first() {
        struct Sink(Vec<Vec<u8>>);
        impl AsRawFd for Sink {
            fn as_raw_fd(&self) -> RawFd {
                -1
            }
        }
        impl NetBackend for Sink {
            fn read_frame(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::ErrorKind::WouldBlock.into())
            }
            fn write_frame(&mut self, f: &[u8]) -> io::Result<usize> {
                self.0.push(f.to_vec());
                Ok(f.len())
            }
            fn set_offload(&mut self, _: u32) -> io::Result<()> {
                Ok(())
            }
        }
        let mut b = DhcpBackend::new(Box::new(Sink(Vec::new())), config());
        let mut framed = vec![0u8; VNET_HDR_LEN];
        framed.extend_from_slice(&request(DISCOVER, MAC, &[]));
        assert_eq!(b.write_frame(&framed).unwrap(), framed.len());
        assert!(b.has_pending());
        let mut other = vec![0u8; VNET_HDR_LEN];
        other.extend_from_slice(&[0u8; 60]);
        b.write_frame(&other).unwrap();
        let mut buf = vec![0u8; 2048];
        let n = b.read_frame(&mut buf).unwrap();
        assert_eq!(&buf[..VNET_HDR_LEN], &[0; VNET_HDR_LEN]);
        assert_eq!(buf[VNET_HDR_LEN + ETH_HLEN + 28], 2);
        assert!(n > VNET_HDR_LEN + ETH_HLEN + 28 + BOOTP_LEN);
        assert!(!b.has_pending());
        assert_eq!(
            b.read_frame(&mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        // A flood of requests queues a bounded number of answers.
        for _ in 0..100 {
            b.write_frame(&framed).unwrap();
        }
        assert_eq!(b.answers.len(), MAX_ANSWERS);
    }
}
