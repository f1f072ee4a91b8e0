//! rtnetlink, synchronously, for the pod network: the shim reads the interface CNI set up
//! in the pod's network namespace into a [`PodNetwork`] ([`Netlink::scan`]), and the agent
//! gives the guest's NIC the same configuration ([`Netlink::apply`]). One module for both
//! sides, so what one writes is what the other reads, and the round trip is tested on the
//! host between two network namespaces.
//!
//! A [`Netlink`] talks to the network namespace of the thread that opened it.

use std::io;
use std::net::IpAddr;

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL,
    NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

use crate::pod::{IpNet, Neighbour, PodNetwork, Route};

pub use netlink_packet_route as route;

/// Errors of a netlink request.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("cannot open a netlink socket")]
    Socket(#[source] io::Error),
    #[error("netlink I/O failed")]
    Io(#[source] io::Error),
    #[error("the kernel refused to {what}")]
    Refused {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot decode the kernel's netlink answer: {0}")]
    Decode(String),
    #[error("no interface with MAC address {0}")]
    NoInterface(String),
    #[error("bad MAC address {0:?}")]
    BadMac(String),
}

/// A link of the namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Vec<u8>,
    pub mtu: u32,
    /// `veth`, `tun`, `bridge`… (IFLA_INFO_KIND), if the kernel says.
    pub kind: Option<String>,
    pub up: bool,
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

pub fn parse_mac(text: &str) -> Result<[u8; 6], NetlinkError> {
    let bad = || NetlinkError::BadMac(text.to_string());
    let mut out = [0u8; 6];
    let mut parts = text.split(':');
    for b in &mut out {
        *b = u8::from_str_radix(parts.next().ok_or_else(bad)?, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    Ok(out)
}

/// A netlink socket in the calling thread's network namespace.
pub struct Netlink {
    socket: Socket,
    seq: u32,
}

fn family(addr: &IpAddr) -> AddressFamily {
    match addr {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

fn route_addr(addr: IpAddr) -> RouteAddress {
    match addr {
        IpAddr::V4(a) => RouteAddress::Inet(a),
        IpAddr::V6(a) => RouteAddress::Inet6(a),
    }
}

impl Netlink {
    pub fn open() -> Result<Netlink, NetlinkError> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(NetlinkError::Socket)?;
        socket.bind_auto().map_err(NetlinkError::Socket)?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(NetlinkError::Socket)?;
        Ok(Netlink { socket, seq: 0 })
    }

    /// Sends `msg` and collects the answers until the dump's end or the ACK.
    pub fn request(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
        what: &str,
    ) -> Result<Vec<RouteNetlinkMessage>, NetlinkError> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        packet.finalize();
        let mut buf = vec![0u8; packet.buffer_len()];
        packet.serialize(&mut buf);
        self.socket.send(&buf, 0).map_err(NetlinkError::Io)?;
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let mut out = Vec::new();
        let mut rx = Vec::with_capacity(64 * 1024);
        loop {
            rx.clear();
            let n = self.socket.recv(&mut rx, 0).map_err(NetlinkError::Io)?;
            let mut at = 0;
            while at < n.min(rx.len()) {
                let bytes = rx.get(at..).unwrap_or_default();
                let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(bytes)
                    .map_err(|e| NetlinkError::Decode(e.to_string()))?;
                let len = reply.header.length as usize;
                if len == 0 {
                    return Err(NetlinkError::Decode("a message of length 0".into()));
                }
                at += len;
                if reply.header.sequence_number != self.seq {
                    continue;
                }
                match reply.payload {
                    NetlinkPayload::InnerMessage(m) => out.push(m),
                    NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(out),
                            Some(code) => Err(NetlinkError::Refused {
                                what: what.to_string(),
                                source: io::Error::from_raw_os_error(-code.get()),
                            }),
                        }
                    }
                    // Noop, Overrun, and whatever later versions add: nothing to collect.
                    _ => {}
                }
            }
            if !dump && flags & NLM_F_ACK == 0 {
                return Ok(out);
            }
        }
    }

    /// Creates or changes something; the kernel's ACK is awaited.
    pub fn change(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
        what: &str,
    ) -> Result<(), NetlinkError> {
        self.request(msg, NLM_F_ACK | flags, what).map(drop)
    }

    pub fn links(&mut self) -> Result<Vec<Link>, NetlinkError> {
        let answers = self.request(
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            NLM_F_DUMP,
            "list the links",
        )?;
        Ok(answers
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(link_of(&l)),
                _ => None,
            })
            .collect())
    }

    /// Sets a link's MTU (if given) and brings it up.
    pub fn set_up(&mut self, index: u32, mtu: Option<u32>) -> Result<(), NetlinkError> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.header.flags = LinkFlags::Up;
        msg.header.change_mask = LinkFlags::Up;
        if let Some(mtu) = mtu {
            msg.attributes.push(LinkAttribute::Mtu(mtu));
        }
        self.change(
            RouteNetlinkMessage::SetLink(msg),
            0,
            &format!("bring link {index} up"),
        )
    }

    /// The addresses of link `index`, without IPv6 link-local ones (every link makes its own).
    pub fn addresses(&mut self, index: u32) -> Result<Vec<IpNet>, NetlinkError> {
        let answers = self.request(
            RouteNetlinkMessage::GetAddress(AddressMessage::default()),
            NLM_F_DUMP,
            "list the addresses",
        )?;
        let mut out = Vec::new();
        for m in answers {
            let RouteNetlinkMessage::NewAddress(a) = m else {
                continue;
            };
            if a.header.index != index {
                continue;
            }
            let addr = a.attributes.iter().find_map(|at| match at {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            });
            match addr {
                Some(IpAddr::V6(v6)) if v6.segments()[0] & 0xffc0 == 0xfe80 => {}
                Some(addr) => out.push(IpNet {
                    addr,
                    prefix: a.header.prefix_len,
                }),
                None => {}
            }
        }
        Ok(out)
    }

    pub fn add_address(&mut self, index: u32, net: IpNet) -> Result<(), NetlinkError> {
        let mut msg = AddressMessage::default();
        msg.header.family = family(&net.addr);
        msg.header.prefix_len = net.prefix;
        msg.header.index = index;
        msg.attributes.push(AddressAttribute::Local(net.addr));
        msg.attributes.push(AddressAttribute::Address(net.addr));
        self.change(
            RouteNetlinkMessage::NewAddress(msg),
            NLM_F_CREATE | NLM_F_EXCL,
            &format!("add address {net}"),
        )
    }

    /// The main table's routes through link `index`, without those the kernel made for an
    /// address's own prefix (adding the address makes them again).
    pub fn routes(&mut self, index: u32) -> Result<Vec<Route>, NetlinkError> {
        let mut out = Vec::new();
        for fam in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut req = RouteMessage::default();
            req.header.address_family = fam;
            let answers = self.request(
                RouteNetlinkMessage::GetRoute(req),
                NLM_F_DUMP,
                "list the routes",
            )?;
            for m in answers {
                let RouteNetlinkMessage::NewRoute(r) = m else {
                    continue;
                };
                if r.header.table != 254
                    || r.header.kind != RouteType::Unicast
                    || r.header.protocol == RouteProtocol::Kernel
                {
                    continue;
                }
                let mut oif = None;
                let mut dst = None;
                let mut gateway = None;
                for at in &r.attributes {
                    match at {
                        RouteAttribute::Oif(i) => oif = Some(*i),
                        RouteAttribute::Destination(a) => dst = ip_of(a),
                        RouteAttribute::Gateway(a) => gateway = ip_of(a),
                        _ => {}
                    }
                }
                if oif != Some(index) {
                    continue;
                }
                let addr = dst.unwrap_or(match fam {
                    AddressFamily::Inet6 => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
                    _ => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
                });
                out.push(Route {
                    destination: IpNet {
                        addr,
                        prefix: r.header.destination_prefix_length,
                    },
                    gateway,
                    onlink: r.header.flags.contains(RouteFlags::Onlink),
                });
            }
        }
        Ok(out)
    }

    pub fn add_route(&mut self, index: u32, route: &Route) -> Result<(), NetlinkError> {
        let mut msg = RouteMessage::default();
        let dst = route.destination;
        msg.header.address_family = family(&dst.addr);
        msg.header.destination_prefix_length = dst.prefix;
        msg.header.table = 254;
        msg.header.protocol = RouteProtocol::Boot;
        msg.header.kind = RouteType::Unicast;
        msg.header.scope = if route.gateway.is_some() {
            RouteScope::Universe
        } else {
            RouteScope::Link
        };
        if route.onlink {
            msg.header.flags = RouteFlags::Onlink;
        }
        if dst.prefix > 0 {
            msg.attributes
                .push(RouteAttribute::Destination(route_addr(dst.addr)));
        }
        if let Some(gw) = route.gateway {
            msg.attributes.push(RouteAttribute::Gateway(route_addr(gw)));
        }
        msg.attributes.push(RouteAttribute::Oif(index));
        let via = route
            .gateway
            .map(|g| format!(" via {g}"))
            .unwrap_or_default();
        self.change(
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_CREATE | NLM_F_EXCL,
            &format!("add the route to {dst}{via}"),
        )
    }

    /// The permanent neighbour entries of link `index`.
    pub fn neighbours(&mut self, index: u32) -> Result<Vec<Neighbour>, NetlinkError> {
        let answers = self.request(
            RouteNetlinkMessage::GetNeighbour(NeighbourMessage::default()),
            NLM_F_DUMP,
            "list the neighbours",
        )?;
        let mut out = Vec::new();
        for m in answers {
            let RouteNetlinkMessage::NewNeighbour(n) = m else {
                continue;
            };
            if n.header.ifindex != index || n.header.state != NeighbourState::Permanent {
                continue;
            }
            let mut addr = None;
            let mut mac = None;
            for at in &n.attributes {
                match at {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => {
                        addr = Some(IpAddr::V4(*a))
                    }
                    NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => {
                        addr = Some(IpAddr::V6(*a))
                    }
                    NeighbourAttribute::LinkLayerAddress(m) => mac = Some(format_mac(m)),
                    _ => {}
                }
            }
            if let (Some(addr), Some(mac)) = (addr, mac) {
                out.push(Neighbour { addr, mac });
            }
        }
        Ok(out)
    }

    pub fn add_neighbour(&mut self, index: u32, n: &Neighbour) -> Result<(), NetlinkError> {
        let mut msg = NeighbourMessage::default();
        msg.header.family = family(&n.addr);
        msg.header.ifindex = index;
        msg.header.state = NeighbourState::Permanent;
        msg.attributes
            .push(NeighbourAttribute::Destination(match n.addr {
                IpAddr::V4(a) => NeighbourAddress::Inet(a),
                IpAddr::V6(a) => NeighbourAddress::Inet6(a),
            }));
        msg.attributes.push(NeighbourAttribute::LinkLayerAddress(
            parse_mac(&n.mac)?.to_vec(),
        ));
        self.change(
            RouteNetlinkMessage::NewNeighbour(msg),
            NLM_F_CREATE | NLM_F_EXCL,
            &format!("add the neighbour {} at {}", n.addr, n.mac),
        )
    }

    /// The configuration of `link` as the guest should take it over.
    pub fn scan(&mut self, link: &Link) -> Result<PodNetwork, NetlinkError> {
        Ok(PodNetwork {
            mac: format_mac(&link.mac),
            mtu: link.mtu,
            addresses: self.addresses(link.index)?,
            routes: self.routes(link.index)?,
            neighbours: self.neighbours(link.index)?,
        })
    }

    /// Gives the link whose MAC is `net.mac` that configuration, and brings `lo` up.
    /// Routes are added after every address (a gateway must be reachable first), those
    /// without a gateway before those with one.
    pub fn apply(&mut self, net: &PodNetwork) -> Result<(), NetlinkError> {
        let links = self.links()?;
        if let Some(lo) = links.iter().find(|l| l.name == "lo") {
            self.set_up(lo.index, None)?;
        }
        let mac = parse_mac(&net.mac)?;
        let link = links
            .iter()
            .find(|l| l.mac == mac)
            .ok_or_else(|| NetlinkError::NoInterface(net.mac.clone()))?;
        self.set_up(link.index, Some(net.mtu))?;
        for a in &net.addresses {
            self.add_address(link.index, *a)?;
        }
        for n in &net.neighbours {
            self.add_neighbour(link.index, n)?;
        }
        let (direct, via): (Vec<&Route>, Vec<&Route>) =
            net.routes.iter().partition(|r| r.gateway.is_none());
        for r in direct.into_iter().chain(via) {
            self.add_route(link.index, r)?;
        }
        Ok(())
    }
}

fn ip_of(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(a) => Some(IpAddr::V4(*a)),
        RouteAddress::Inet6(a) => Some(IpAddr::V6(*a)),
        _ => None,
    }
}

fn link_of(l: &LinkMessage) -> Link {
    let mut link = Link {
        index: l.header.index,
        name: String::new(),
        mac: Vec::new(),
        mtu: 0,
        kind: None,
        up: l.header.flags.contains(LinkFlags::Up),
    };
    for at in &l.attributes {
        match at {
            LinkAttribute::IfName(n) => link.name = n.clone(),
            LinkAttribute::Address(m) => link.mac = m.clone(),
            LinkAttribute::Mtu(m) => link.mtu = *m,
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    if let netlink_packet_route::link::LinkInfo::Kind(k) = i {
                        link.kind = Some(k.to_string());
                    }
                }
            }
            _ => {}
        }
    }
    link
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_and_print() {
        assert_eq!(
            parse_mac("0a:58:0A:58:00:ff").unwrap(),
            [0x0a, 0x58, 0x0a, 0x58, 0, 0xff]
        );
        assert_eq!(
            format_mac(&[0x0a, 0x58, 0, 1, 2, 0xff]),
            "0a:58:00:01:02:ff"
        );
        for bad in ["", "0a:58", "0a:58:0a:58:00:ff:00", "zz:58:0a:58:00:ff"] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
    }
}
