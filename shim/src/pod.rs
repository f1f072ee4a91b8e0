//! A CRI pod in one shim: its sandbox task, and the pod VM that its first container boots.
//!
//! RunPodSandbox creates the sandbox task ([`Sandbox`]): the shim joins the sandbox's
//! cgroup, parks a thread in the pod's network namespace (its tid is the task's pid) and
//! wires a tap to the pod's veth — no VM yet. The pod's first container decides what the
//! VM is (DESIGN.md, "Pods and their network"):
//!
//! - an ordinary container boots the agent VM, sized from the sandbox spec, with empty disk
//!   slots for this and later containers ([`PodVm::Agent`]);
//! - a VM image (a containerDisk) boots *as* the pod's VM ([`PodVm::Image`]), on the pod
//!   network: the device answers its DHCP ([`dhcp_config`]), the seed carries a cloud-init
//!   `network-config` ([`network_config`]) and the pod's files ([`write_files`]). It is the
//!   pod's only container.
//!
//! So one RuntimeClass serves both kinds, and nothing has to be declared up front. The VM
//! ends when the sandbox task is killed (before CNI DEL), or with a VM image's own end.

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use devices::virtio::net::{DhcpConfig, MacAddr};
use kestrel_agent_protocol::netlink;
use kestrel_agent_protocol::pod::PodNetwork;
use kestrel_agent_protocol::{CopiedEntry, EntryKind};
use tokio::sync::watch;
use vmm::VmExit;

use crate::agent::AgentVm;
use crate::cgroups;
use crate::netns::NetnsThread;
use crate::spec::ContainerVm;
use crate::vm_image::VmImageTask;
use crate::volumes::HostCopy;

/// How long a DHCP lease of the pod's address lasts (the address never changes).
const LEASE_SECS: u32 = 86_400;

/// The pod's DNS, from the resolv.conf CRI made for the sandbox.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dns {
    pub servers: Vec<IpAddr>,
    pub search: Vec<String>,
}

impl Dns {
    pub fn parse(resolv_conf: &str) -> Dns {
        let mut dns = Dns::default();
        for line in resolv_conf.lines() {
            let mut words = line.split_whitespace();
            match words.next() {
                Some("nameserver") => {
                    if let Some(ip) = words.next().and_then(|w| w.parse().ok()) {
                        dns.servers.push(ip);
                    }
                }
                Some("search" | "domain") => {
                    dns.search = words.map(str::to_string).collect();
                }
                _ => {}
            }
        }
        dns
    }
}

/// What the pod's VM will be, from the sandbox spec.
#[derive(Debug, Clone)]
pub struct PodPlan {
    pub vm: ContainerVm,
    pub slots: usize,
    pub hostname: String,
    pub dns: Dns,
}

/// The pod's VM, once its first container booted it.
pub enum PodVm {
    Agent(Arc<AgentVm>),
    Image(Arc<VmImageTask>),
}

/// The pod's sandbox task.
pub struct Sandbox {
    pub plan: PodPlan,
    pub netns: Arc<NetnsThread>,
    /// The pod network CNI set up (none: a namespace with only lo).
    pub network: Option<PodNetwork>,
    /// The tap in the pod namespace; the VM gets a duplicate. Dropped when the sandbox is
    /// killed, so the tap is gone before CNI DEL.
    tap: Mutex<Option<OwnedFd>>,
    /// Booting holds this lock (containers of a pod are created one at a time).
    pub vm: tokio::sync::Mutex<Option<PodVm>>,
    /// The agent VM once booted, for [`Sandbox::wait`].
    booted: watch::Sender<Option<Arc<AgentVm>>>,
    /// The shim process in the sandbox's cgroup (left when the pod is deleted).
    cgroup: Mutex<Option<cgroups::Joined>>,
    /// The exit status once killed (128 + signal).
    killed: watch::Sender<Option<u32>>,
}

impl Sandbox {
    pub fn new(
        plan: PodPlan,
        netns: Arc<NetnsThread>,
        attached: Option<crate::podnet::Attached>,
        cgroup: Option<cgroups::Joined>,
    ) -> Sandbox {
        let (tap, network) = match attached {
            Some(a) => (Some(a.tap), Some(a.network)),
            None => (None, None),
        };
        Sandbox {
            plan,
            netns,
            network,
            tap: Mutex::new(tap),
            vm: tokio::sync::Mutex::new(None),
            booted: watch::channel(None).0,
            cgroup: Mutex::new(cgroup),
            killed: watch::channel(None).0,
        }
    }

    pub fn memory_bytes(&self) -> u64 {
        self.plan.vm.memory_mib << 20
    }

    /// A duplicate of the tap's fd and the MAC the guest NIC takes, for the VM's boot.
    pub fn tap_for_vm(&self) -> Result<Option<(OwnedFd, MacAddr)>, std::io::Error> {
        let tap = self.tap.lock().unwrap_or_else(|e| e.into_inner());
        let (Some(fd), Some(net)) = (tap.as_ref(), self.network.as_ref()) else {
            return Ok(None);
        };
        let mac = netlink::parse_mac(&net.mac).map_err(std::io::Error::other)?;
        Ok(Some((fd.try_clone()?, MacAddr(mac))))
    }

    /// Records the agent VM the first container booted.
    pub fn booted(&self, vm: &Arc<AgentVm>) {
        self.booted.send_replace(Some(vm.clone()));
    }

    /// Resolves with the task's exit status: once killed, or when the agent VM (once
    /// booted) ended on its own.
    pub async fn wait(&self) -> u32 {
        let mut killed = self.killed.subscribe();
        let mut booted = self.booted.subscribe();
        let vm_end = async {
            let vm = booted
                .wait_for(Option::is_some)
                .await
                .ok()
                .and_then(|v| v.clone());
            match vm {
                Some(vm) => vm.wait_ended().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            status = killed.wait_for(Option::is_some) => {
                status.ok().and_then(|s| *s).unwrap_or(128 + libc::SIGKILL as u32)
            }
            exit = vm_end => match exit {
                VmExit::Exited(status) => u32::from(status),
                VmExit::Stopped | VmExit::Reset => 128 + libc::SIGKILL as u32,
                _ => 255,
            },
        }
    }

    /// Any signal ends the pod: its VM stops and the tap goes, before CNI DEL runs.
    pub async fn kill(&self, signal: u32) {
        self.killed.send_if_modified(|k| {
            let first = k.is_none();
            if first {
                *k = Some(128 + signal);
            }
            first
        });
        self.stop_vm().await;
    }

    async fn stop_vm(&self) {
        match &*self.vm.lock().await {
            Some(PodVm::Agent(vm)) => vm.shutdown().await,
            Some(PodVm::Image(task)) => {
                let _ = task.kill("pod", libc::SIGKILL as u32).await;
            }
            None => {}
        }
        drop(self.tap.lock().unwrap_or_else(|e| e.into_inner()).take());
    }

    /// The pod is deleted: the VM stops (if it still runs), the shim leaves the cgroup.
    pub async fn end(&self) {
        self.stop_vm().await;
        let cgroup = self.cgroup.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(j) = cgroup {
            let _ = tokio::task::spawn_blocking(move || j.leave()).await;
        }
    }
}

fn first_v4(net: &PodNetwork) -> Option<(Ipv4Addr, u8)> {
    net.addresses.iter().find_map(|a| match a.addr {
        IpAddr::V4(v4) => Some((v4, a.prefix)),
        IpAddr::V6(_) => None,
    })
}

/// What virtio-net's DHCP server tells a VM image: the pod's first IPv4 address, the
/// default route's gateway, the other IPv4 routes, DNS, hostname, MTU.
pub fn dhcp_config(net: &PodNetwork, hostname: &str, dns: &Dns) -> Option<DhcpConfig> {
    let (address, prefix) = first_v4(net)?;
    let mac = netlink::parse_mac(&net.mac).ok()?;
    let mut gateway = None;
    let mut routes = Vec::new();
    for r in &net.routes {
        let (IpAddr::V4(dst), gw) = (r.destination.addr, r.gateway) else {
            continue;
        };
        let via = match gw {
            Some(IpAddr::V4(g)) => g,
            Some(IpAddr::V6(_)) => continue,
            None => Ipv4Addr::UNSPECIFIED,
        };
        if r.destination.prefix == 0 {
            gateway = Some(via).filter(|g| !g.is_unspecified());
        } else {
            routes.push((dst, r.destination.prefix, via));
        }
    }
    Some(DhcpConfig {
        client_mac: mac,
        address,
        prefix,
        gateway,
        routes,
        dns: dns
            .servers
            .iter()
            .filter_map(|s| match s {
                IpAddr::V4(v4) => Some(*v4),
                IpAddr::V6(_) => None,
            })
            .collect(),
        domain: dns.search.first().cloned(),
        hostname: Some(hostname.to_string()).filter(|h| !h.is_empty()),
        mtu: u16::try_from(net.mtu).ok().filter(|m| *m > 0),
        server: gateway.unwrap_or(address),
        lease_secs: LEASE_SECS,
    })
}

fn yaml_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

/// cloud-init's network configuration (version 2) for the NIC with the pod's MAC: every
/// address, route and the DNS, for images whose cloud-init renders it.
pub fn network_config(net: &PodNetwork, dns: &Dns) -> String {
    let mut y = String::from("version: 2\nethernets:\n  pod:\n    match:\n");
    y.push_str(&format!("      macaddress: {}\n", yaml_str(&net.mac)));
    y.push_str(&format!("    mtu: {}\n", net.mtu));
    y.push_str("    dhcp4: false\n    dhcp6: false\n    addresses:\n");
    for a in &net.addresses {
        y.push_str(&format!("      - {}\n", yaml_str(&a.to_string())));
    }
    if !net.routes.is_empty() {
        y.push_str("    routes:\n");
        for r in &net.routes {
            y.push_str(&format!(
                "      - to: {}\n",
                yaml_str(&r.destination.to_string())
            ));
            if let Some(gw) = r.gateway {
                y.push_str(&format!("        via: {}\n", yaml_str(&gw.to_string())));
            } else {
                y.push_str("        scope: link\n");
            }
            if r.onlink {
                y.push_str("        on-link: true\n");
            }
        }
    }
    if !dns.servers.is_empty() || !dns.search.is_empty() {
        y.push_str("    nameservers:\n");
        let servers: Vec<String> = dns
            .servers
            .iter()
            .map(|s| yaml_str(&s.to_string()))
            .collect();
        y.push_str(&format!("      addresses: [{}]\n", servers.join(", ")));
        let search: Vec<String> = dns.search.iter().map(|s| yaml_str(s)).collect();
        y.push_str(&format!("      search: [{}]\n", search.join(", ")));
    }
    y
}

/// Paths a VM image does not get as files: the container's plumbing, not the pod's data.
const NOT_FOR_VMS: [&str; 5] = [
    "/etc/hosts",
    "/etc/hostname",
    "/etc/resolv.conf",
    "/dev/shm",
    "/dev/termination-log",
];

/// A `#cloud-config` whose `write_files` puts the pod's volumes (ConfigMaps, Secrets, the
/// service-account token) into a VM image at their mount paths, as Virtlet did: each
/// visible file of a copied tree, with kubelet's `..data` symlinks resolved. `None` when
/// there is nothing to write.
pub fn write_files(copies: &[HostCopy]) -> Option<String> {
    let mut out = String::new();
    for c in copies {
        let dest = c.mount.destination.trim_end_matches('/');
        if NOT_FOR_VMS.contains(&dest) {
            continue;
        }
        let entries = &c.mount.entries;
        for e in entries {
            // Hidden entries are the atomic writer's versions; their files are reached
            // through the visible symlinks.
            if e.path.split('/').any(|p| p.starts_with("..")) {
                continue;
            }
            let Some((data, mode)) = resolve(entries, &e.path) else {
                continue;
            };
            let path = if e.path.is_empty() {
                dest.to_string()
            } else {
                format!("{dest}/{}", e.path)
            };
            out.push_str(&format!(
                "  - path: {}\n    encoding: b64\n    content: {}\n    permissions: '{:04o}'\n",
                yaml_str(&path),
                kestrel_seed::base64(data),
                mode & 0o7777
            ));
        }
    }
    (!out.is_empty())
        .then(|| format!("#cloud-config\n# kestrel: the pod's volumes\nwrite_files:\n{out}"))
}

/// The file at `path` in a copied tree, following symlinks (also through linked
/// directories, as kubelet's `key -> ..data/key`, `..data -> ..<version>`) within the tree,
/// at most 16 hops; `None` for a directory, a dangling link or one leaving the tree.
fn resolve<'a>(entries: &'a [CopiedEntry], path: &str) -> Option<(&'a [u8], u32)> {
    let find = |p: &str| entries.iter().find(|e| e.path == p);
    let mut pending: Vec<String> = path
        .split('/')
        .filter(|c| !c.is_empty())
        .map(str::to_string)
        .collect();
    pending.reverse();
    let mut done: Vec<String> = Vec::new();
    let mut hops = 0;
    while let Some(part) = pending.pop() {
        match part.as_str() {
            "." => continue,
            ".." => {
                done.pop()?;
                continue;
            }
            _ => {}
        }
        done.push(part);
        let here = done.join("/");
        if let Some(EntryKind::Symlink(to)) = find(&here).map(|e| &e.kind) {
            hops += 1;
            if hops > 16 || to.starts_with('/') {
                return None;
            }
            done.pop();
            pending.extend(
                to.split('/')
                    .filter(|c| !c.is_empty())
                    .rev()
                    .map(str::to_string),
            );
        }
    }
    match find(&done.join("/")) {
        Some(CopiedEntry {
            kind: EntryKind::File(d),
            mode,
            ..
        }) => Some((d, *mode)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kestrel_agent_protocol::pod::{IpNet, Route};
    use kestrel_agent_protocol::CopiedMount;

    fn net() -> PodNetwork {
        PodNetwork {
            mac: "0a:58:0a:58:00:07".into(),
            mtu: 1450,
            addresses: vec![IpNet {
                addr: "10.88.0.7".parse().unwrap(),
                prefix: 16,
            }],
            routes: vec![
                Route {
                    destination: IpNet {
                        addr: "0.0.0.0".parse().unwrap(),
                        prefix: 0,
                    },
                    gateway: Some("10.88.0.1".parse().unwrap()),
                    onlink: false,
                },
                Route {
                    destination: IpNet {
                        addr: "10.99.0.0".parse().unwrap(),
                        prefix: 16,
                    },
                    gateway: Some("10.88.0.254".parse().unwrap()),
                    onlink: true,
                },
            ],
            neighbours: vec![],
        }
    }

    #[test]
    fn resolv_conf_is_read() {
        let dns = Dns::parse("# comment\nsearch default.svc.cluster.local svc.cluster.local\nnameserver 10.96.0.10\nnameserver fd00::10\noptions ndots:5\n");
        assert_eq!(dns.servers.len(), 2);
        assert_eq!(
            dns.search,
            ["default.svc.cluster.local", "svc.cluster.local"]
        );
    }

    #[test]
    fn dhcp_gets_the_pods_address_and_routes() {
        let dns = Dns::parse("nameserver 10.96.0.10\nsearch default.svc\n");
        let c = dhcp_config(&net(), "vm-0", &dns).unwrap();
        assert_eq!(c.client_mac, [0x0a, 0x58, 0x0a, 0x58, 0, 7]);
        assert_eq!((c.address, c.prefix), (Ipv4Addr::new(10, 88, 0, 7), 16));
        assert_eq!(c.gateway, Some(Ipv4Addr::new(10, 88, 0, 1)));
        assert_eq!(c.server, Ipv4Addr::new(10, 88, 0, 1));
        assert_eq!(
            c.routes,
            [(
                Ipv4Addr::new(10, 99, 0, 0),
                16,
                Ipv4Addr::new(10, 88, 0, 254)
            )]
        );
        assert_eq!(c.dns, [Ipv4Addr::new(10, 96, 0, 10)]);
        assert_eq!(c.domain.as_deref(), Some("default.svc"));
        assert_eq!(c.mtu, Some(1450));
        let mut v6 = net();
        v6.addresses[0].addr = "fd00::7".parse().unwrap();
        assert!(dhcp_config(&v6, "vm-0", &dns).is_none());
    }

    #[test]
    fn network_config_names_the_nic_by_mac() {
        let y = network_config(&net(), &Dns::parse("nameserver 10.96.0.10\n"));
        assert!(y.starts_with("version: 2\n"), "{y}");
        assert!(y.contains("macaddress: \"0a:58:0a:58:00:07\""), "{y}");
        assert!(y.contains("- \"10.88.0.7/16\""), "{y}");
        assert!(
            y.contains(
                "- to: \"10.99.0.0/16\"\n        via: \"10.88.0.254\"\n        on-link: true"
            ),
            "{y}"
        );
        assert!(y.contains("addresses: [\"10.96.0.10\"]"), "{y}");
    }

    fn entry(path: &str, kind: EntryKind) -> CopiedEntry {
        CopiedEntry {
            path: path.into(),
            mode: 0o644,
            kind,
        }
    }

    #[test]
    fn volumes_become_write_files_with_links_resolved() {
        let configmap = HostCopy {
            mount: CopiedMount {
                source: "/var/lib/kubelet/pods/u/volumes/cm".into(),
                destination: "/etc/app".into(),
                entries: vec![
                    entry("", EntryKind::Dir),
                    entry("..2026_01", EntryKind::Dir),
                    entry("..2026_01/key", EntryKind::File(b"Man".to_vec())),
                    entry("..data", EntryKind::Symlink("..2026_01".into())),
                    entry("key", EntryKind::Symlink("..data/key".into())),
                    entry("loop", EntryKind::Symlink("loop".into())),
                ],
            },
            fingerprint: 0,
            copy_out: false,
        };
        let hosts = HostCopy {
            mount: CopiedMount {
                source: "/x/hosts".into(),
                destination: "/etc/hosts".into(),
                entries: vec![entry("", EntryKind::File(b"127.0.0.1 x\n".to_vec()))],
            },
            fingerprint: 0,
            copy_out: false,
        };
        let y = write_files(&[configmap, hosts.clone()]).unwrap();
        assert!(y.starts_with("#cloud-config\n"), "{y}");
        assert!(y.contains("  - path: \"/etc/app/key\"\n    encoding: b64\n    content: TWFu\n    permissions: '0644'\n"), "{y}");
        assert_eq!(y.matches("- path:").count(), 1, "{y}");
        assert!(write_files(&[hosts]).is_none());
    }
}
