//! What a pod's VM is told at boot: its hostname and the pod network the shim found in
//! the pod's network namespace (after CNI ADD), on the kernel command line as
//! `kestrel.pod=<base64url of the JSON>`. The agent applies it before it serves, so every
//! container of the pod starts on a configured network.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::ProtocolError;

/// Kernel command-line key of the pod configuration.
pub const POD_PARAM: &str = "kestrel.pod";

/// The pod-level setup of the VM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodConfig {
    /// The VM's hostname (the sandbox spec's), which the pod's containers share.
    #[serde(default)]
    pub hostname: String,
    /// The interface the guest's first NIC takes over; none for a pod without a network.
    #[serde(default)]
    pub network: Option<PodNetwork>,
}

/// The pod's interface as CNI configured it in the pod netns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodNetwork {
    /// The veth's MAC address, which the guest NIC has (`aa:bb:cc:dd:ee:ff`).
    pub mac: String,
    pub mtu: u32,
    pub addresses: Vec<IpNet>,
    /// Routes through the interface, in the order they were found.
    pub routes: Vec<Route>,
    /// Permanent neighbour entries (static ARP/NDP) of the interface.
    #[serde(default)]
    pub neighbours: Vec<Neighbour>,
}

/// An address with its prefix length (`10.88.0.5/16`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpNet {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl std::fmt::Display for IpNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// The destination (`0.0.0.0/0` for the default route).
    pub destination: IpNet,
    pub gateway: Option<IpAddr>,
    /// The gateway is on the link even though no address's prefix covers it (Calico's
    /// `169.254.1.1` next to a /32).
    #[serde(default)]
    pub onlink: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Neighbour {
    pub addr: IpAddr,
    pub mac: String,
}

impl PodConfig {
    /// The `kestrel.pod=…` word of the kernel command line.
    pub fn to_param(&self) -> Result<String, ProtocolError> {
        let json = serde_json::to_vec(self).map_err(ProtocolError::Json)?;
        Ok(format!("{POD_PARAM}={}", base64url(&json)))
    }

    /// The configuration in a kernel command line, if it has one.
    pub fn from_cmdline(cmdline: &str) -> Result<Option<PodConfig>, ProtocolError> {
        let prefix = format!("{POD_PARAM}=");
        let Some(value) = cmdline
            .split_ascii_whitespace()
            .find_map(|w| w.strip_prefix(prefix.as_str()))
        else {
            return Ok(None);
        };
        let json = from_base64url(value).ok_or(ProtocolError::BadPodParam)?;
        serde_json::from_slice(&json)
            .map(Some)
            .map_err(ProtocolError::Json)
    }
}

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// Base64 with the URL alphabet and no padding: no character the kernel's command-line
/// parser treats specially.
fn base64url(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk.first().copied().unwrap_or(0),
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..=chunk.len() {
            let idx = (n >> (18 - 6 * i)) & 63;
            if let Some(&c) = ALPHABET.get(idx as usize) {
                out.push(char::from(c));
            }
        }
    }
    out
}

fn from_base64url(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in text.bytes() {
        let v = ALPHABET.iter().position(|&a| a == c)? as u32;
        acc = acc << 6 | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64url_round_trips() {
        for n in 0..20usize {
            let data: Vec<u8> = (0..n).map(|i| (i * 37 + 5) as u8).collect();
            let text = base64url(&data);
            assert!(text
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'));
            assert_eq!(from_base64url(&text).unwrap(), data, "{n}");
        }
        assert_eq!(base64url(b"Man"), "TWFu");
        assert!(from_base64url("a b").is_none());
    }

    #[test]
    fn the_config_survives_the_command_line() {
        let config = PodConfig {
            hostname: "web-0".into(),
            network: Some(PodNetwork {
                mac: "0a:58:0a:58:00:05".into(),
                mtu: 1450,
                addresses: vec![IpNet {
                    addr: "10.88.0.5".parse().unwrap(),
                    prefix: 32,
                }],
                routes: vec![Route {
                    destination: IpNet {
                        addr: "0.0.0.0".parse().unwrap(),
                        prefix: 0,
                    },
                    gateway: Some("169.254.1.1".parse().unwrap()),
                    onlink: true,
                }],
                neighbours: vec![],
            }),
        };
        let cmdline = format!("console=ttyS0 {} quiet", config.to_param().unwrap());
        assert_eq!(PodConfig::from_cmdline(&cmdline).unwrap(), Some(config));
        assert_eq!(PodConfig::from_cmdline("console=ttyS0").unwrap(), None);
        assert!(PodConfig::from_cmdline("kestrel.pod=!!").is_err());
        assert!(PodConfig::from_cmdline("kestrel.pod=e30")
            .unwrap()
            .is_some());
    }
}
