//! The pod network on the host side (docs/pods.md §3, Kata's `tcfilter` model).
//!
//! CNI has put a veth with the pod's address and routes into the pod's network namespace
//! before the sandbox task is created. [`attach`] runs on the [`NetnsThread`] parked in that
//! namespace: it reads the veth's MAC, MTU, addresses, routes and permanent neighbours
//! (the [`PodNetwork`] the guest takes over), creates a tap there with the veth's MTU, and
//! redirects every frame veth → tap and tap → veth with an ingress qdisc and a match-all u32
//! filter with a `mirred` action on each. The host stack of the namespace never sees the
//! pod's frames; the guest NIC gets the veth's MAC, so bridges and CNIs see the address
//! they expect.
//!
//! The tap is non-persistent: it goes away (with its filters) when its fd closes, i.e.
//! when the VM stops, which is before containerd runs CNI DEL.

use std::os::fd::OwnedFd;

use devices::virtio::net::{Tap, TapError};
use kestrel_agent_protocol::netlink::route::tc::{
    TcAction, TcActionAttribute, TcActionGeneric, TcActionMirrorOption, TcActionOption,
    TcActionType, TcAttribute, TcFilterU32Option, TcHandle, TcMessage, TcMirror,
    TcMirrorActionType, TcOption, TcU32Key, TcU32Selector, TcU32SelectorFlags,
};
use kestrel_agent_protocol::netlink::route::RouteNetlinkMessage;
use kestrel_agent_protocol::netlink::{Link, Netlink, NetlinkError};
use kestrel_agent_protocol::pod::PodNetwork;
use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL};

use crate::netns::{NetnsError, NetnsThread};

/// The tap's name in the pod namespace (`%d`: the kernel picks the number).
const TAP_NAME: &str = "kestrel%d";
/// `ETH_P_ALL` in network byte order, as tc filters name the protocol.
const ETH_P_ALL_BE: u16 = 0x0003u16.to_be();
/// The ingress qdisc's handle, `ffff:`.
const INGRESS: TcHandle = TcHandle {
    major: 0xffff,
    minor: 0,
};

#[derive(Debug, thiserror::Error)]
pub enum PodNetError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("cannot read or change the pod network namespace")]
    Netlink(#[from] NetlinkError),
    #[error("cannot create the VM's tap in the pod network namespace")]
    Tap(#[source] TapError),
    #[error("the pod network namespace has {0} interfaces besides lo ({1}); kestrel takes over exactly one")]
    Interfaces(usize, String),
    #[error("the tap {0} vanished from the pod network namespace")]
    TapGone(String),
}

/// What the VM gets of the pod network.
pub struct Attached {
    /// The tap's fd, for the VM's virtio-net device.
    pub tap: OwnedFd,
    pub tap_name: String,
    /// What the guest configures on its NIC (whose MAC is the veth's).
    pub network: PodNetwork,
}

/// Wires a tap to the pod's interface inside `netns`; `None` when the namespace has no
/// interface but `lo` (a pod without a network).
pub fn attach(netns: &NetnsThread) -> Result<Option<Attached>, PodNetError> {
    netns.run(attach_here)?
}

fn attach_here() -> Result<Option<Attached>, PodNetError> {
    let mut nl = Netlink::open()?;
    let links = nl.links()?;
    let candidates: Vec<&Link> = links
        .iter()
        .filter(|l| l.name != "lo" && l.kind.as_deref() != Some("tun"))
        .collect();
    let veth = match candidates.as_slice() {
        [] => return Ok(None),
        [one] => *one,
        many => {
            let names: Vec<&str> = many.iter().map(|l| l.name.as_str()).collect();
            return Err(PodNetError::Interfaces(many.len(), names.join(", ")));
        }
    };
    let network = nl.scan(veth)?;
    let tap = Tap::create(TAP_NAME).map_err(PodNetError::Tap)?;
    let tap_name = tap.name().to_string();
    let tap_index = nl
        .links()?
        .into_iter()
        .find(|l| l.name == tap_name)
        .ok_or_else(|| PodNetError::TapGone(tap_name.clone()))?
        .index;
    nl.set_up(tap_index, Some(veth.mtu))?;
    redirect(&mut nl, veth.index, tap_index)?;
    redirect(&mut nl, tap_index, veth.index)?;
    log::info!(
        "pod network: {} ({}, MTU {}) ↔ {tap_name}, {} address(es), {} route(s)",
        veth.name,
        network.mac,
        network.mtu,
        network.addresses.len(),
        network.routes.len()
    );
    Ok(Some(Attached {
        tap: tap.into_fd(),
        tap_name,
        network,
    }))
}

/// Every frame arriving on `from` leaves through `to`: an ingress qdisc on `from` with a
/// u32 filter that matches everything and a mirred egress redirect.
fn redirect(nl: &mut Netlink, from: u32, to: u32) -> Result<(), NetlinkError> {
    let index = i32::try_from(from).unwrap_or(i32::MAX);
    let mut qdisc = TcMessage::default();
    qdisc.header.index = index;
    qdisc.header.handle = INGRESS;
    qdisc.header.parent = TcHandle::INGRESS;
    qdisc.attributes.push(TcAttribute::Kind("ingress".into()));
    nl.change(
        RouteNetlinkMessage::NewQueueDiscipline(qdisc),
        NLM_F_CREATE | NLM_F_EXCL,
        &format!("add an ingress qdisc to link {from}"),
    )?;

    let mut generic = TcActionGeneric::default();
    generic.action = TcActionType::Stolen;
    let mut mirror = TcMirror::default();
    mirror.generic = generic;
    mirror.eaction = TcMirrorActionType::EgressRedir;
    mirror.ifindex = to;
    let mut mirred = TcAction::default();
    mirred.tab = 1;
    mirred.attributes = vec![
        TcActionAttribute::Kind("mirred".into()),
        TcActionAttribute::Options(vec![TcActionOption::Mirror(TcActionMirrorOption::Parms(
            mirror,
        ))]),
    ];
    let mut selector = TcU32Selector::default();
    selector.flags = TcU32SelectorFlags::Terminal;
    selector.nkeys = 1;
    selector.keys = vec![TcU32Key::default()];
    let mut filter = TcMessage::default();
    filter.header.index = index;
    filter.header.parent = INGRESS;
    filter.header.info = (1u32 << 16) | u32::from(ETH_P_ALL_BE);
    filter.attributes.push(TcAttribute::Kind("u32".into()));
    filter.attributes.push(TcAttribute::Options(vec![
        TcOption::U32(TcFilterU32Option::Selector(selector)),
        TcOption::U32(TcFilterU32Option::Action(vec![mirred])),
    ]));
    nl.change(
        RouteNetlinkMessage::NewTrafficFilter(filter),
        NLM_F_CREATE | NLM_F_EXCL,
        &format!("redirect link {from} to link {to}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn ip(args: &[&str]) {
        let out = Command::new("ip").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A named netns with a veth as CNI's bridge plugin leaves it (a /24 with a default
    /// route, a /32-style on-link gateway route, a permanent neighbour), the tap and
    /// filters kestrel adds, and the same configuration applied to an interface of a
    /// second namespace standing in for the guest.
    #[test]
    fn the_pod_interface_is_read_wired_and_applied() {
        if !nix::unistd::Uid::effective().is_root()
            || !std::path::Path::new("/dev/net/tun").exists()
        {
            kestrel_test_support::skip("needs root and /dev/net/tun");
            return;
        }
        let name = format!("kpodnet{}", std::process::id());
        let guest = format!("kguest{}", std::process::id());
        ip(&["netns", "add", &name]);
        ip(&["netns", "add", &guest]);
        let _cleanup = Cleanup(vec![name.clone(), guest.clone()]);
        ip(&[
            "-n", &name, "link", "add", "eth0", "mtu", "1400", "type", "veth", "peer", "name",
            "peer0",
        ]);
        ip(&[
            "-n",
            &name,
            "link",
            "set",
            "eth0",
            "address",
            "0a:58:0a:58:00:07",
        ]);
        ip(&["-n", &name, "addr", "add", "10.77.0.7/24", "dev", "eth0"]);
        ip(&["-n", &name, "link", "set", "eth0", "up"]);
        ip(&["-n", &name, "link", "set", "peer0", "up"]);
        ip(&[
            "-n",
            &name,
            "route",
            "add",
            "default",
            "via",
            "10.77.0.1",
            "dev",
            "eth0",
        ]);
        ip(&[
            "-n",
            &name,
            "route",
            "add",
            "169.254.1.1",
            "dev",
            "eth0",
            "scope",
            "link",
        ]);
        ip(&[
            "-n",
            &name,
            "route",
            "add",
            "10.99.0.0/16",
            "via",
            "169.254.1.1",
            "dev",
            "eth0",
            "onlink",
        ]);
        ip(&[
            "-n",
            &name,
            "neigh",
            "add",
            "10.77.0.9",
            "lladdr",
            "0a:58:0a:58:00:09",
            "dev",
            "eth0",
            "nud",
            "permanent",
        ]);

        let netns =
            NetnsThread::start(Some(std::path::Path::new(&format!("/run/netns/{name}")))).unwrap();
        // Two interfaces besides lo: refused with their names.
        let err = attach(&netns).err().unwrap();
        assert!(matches!(err, PodNetError::Interfaces(2, _)), "{err}");
        ip(&["-n", &name, "link", "set", "peer0", "netns", &guest]);
        let attached = attach(&netns).unwrap().unwrap();
        let net = &attached.network;
        assert_eq!(net.mac, "0a:58:0a:58:00:07");
        assert_eq!(net.mtu, 1400);
        assert_eq!(net.addresses.len(), 1);
        assert_eq!(net.addresses[0].to_string(), "10.77.0.7/24");
        let routes: Vec<String> = net
            .routes
            .iter()
            .map(|r| format!("{} {:?} {}", r.destination, r.gateway, r.onlink))
            .collect();
        assert!(
            routes.contains(&"0.0.0.0/0 Some(10.77.0.1) false".to_string()),
            "{routes:?}"
        );
        assert!(
            routes.contains(&"169.254.1.1/32 None false".to_string()),
            "{routes:?}"
        );
        assert!(
            routes.contains(&"10.99.0.0/16 Some(169.254.1.1) true".to_string()),
            "{routes:?}"
        );
        assert!(
            !routes.iter().any(|r| r.starts_with("10.77.0.0/24")),
            "{routes:?}"
        );
        assert_eq!(net.neighbours.len(), 1);
        assert_eq!(net.neighbours[0].mac, "0a:58:0a:58:00:09");

        // The tap is there, up, with the veth's MTU, and both directions are redirected.
        let show = Command::new("ip")
            .args(["-n", &name, "-o", "link", "show", &attached.tap_name])
            .output()
            .unwrap();
        let show = String::from_utf8_lossy(&show.stdout);
        assert!(show.contains("mtu 1400") && show.contains(",UP"), "{show}");
        for dev in ["eth0", attached.tap_name.as_str()] {
            let out = Command::new("tc")
                .args(["-n", &name, "filter", "show", "dev", dev, "parent", "ffff:"])
                .output()
                .unwrap();
            let out = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.contains("mirred (Egress Redirect to device"),
                "{dev}: {out}"
            );
        }

        // The guest side: the configuration on an interface with the veth's MAC.
        ip(&[
            "-n",
            &guest,
            "link",
            "set",
            "peer0",
            "address",
            "0a:58:0a:58:00:07",
        ]);
        let g =
            NetnsThread::start(Some(std::path::Path::new(&format!("/run/netns/{guest}")))).unwrap();
        let applied = net.clone();
        g.run(move || Netlink::open()?.apply(&applied))
            .unwrap()
            .unwrap();
        let seen = g
            .run(|| -> Result<_, NetlinkError> {
                let mut nl = Netlink::open()?;
                let link = nl.links()?.into_iter().find(|l| l.name == "peer0").unwrap();
                nl.scan(&link)
            })
            .unwrap()
            .unwrap();
        assert_eq!(seen.mtu, 1400);
        assert_eq!(seen.addresses, net.addresses);
        let mut want = net.routes.clone();
        let mut got = seen.routes.clone();
        want.sort_by_key(|r| r.destination.to_string());
        got.sort_by_key(|r| r.destination.to_string());
        assert_eq!(got, want);
        assert_eq!(seen.neighbours, net.neighbours);

        // Closing the tap's fd removes the tap.
        let tap_name = attached.tap_name.clone();
        drop(attached);
        let out = Command::new("ip")
            .args(["-n", &name, "link", "show", &tap_name])
            .output()
            .unwrap();
        assert!(!out.status.success());
    }

    struct Cleanup(Vec<String>);

    impl Drop for Cleanup {
        fn drop(&mut self) {
            for n in &self.0 {
                let _ = Command::new("ip").args(["netns", "del", n]).status();
            }
        }
    }
}
