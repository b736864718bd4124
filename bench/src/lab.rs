//! Where a scenario's processes run: all on loopback, or each host in a network namespace of
//! its own behind a rate-limited uplink.
//!
//! The namespace lab is a hub namespace holding a bridge (10.77.0.1, where trackers run) and
//! one namespace per host (10.77.0.11, .12, ...), each joined to the bridge by a veth pair
//! whose host end has a `tbf` qdisc: the host's uplink. Nothing is added to the root
//! namespace; dropping the lab deletes every namespace it made (and with them the links).

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;

/// One machine of a scenario: how to start a process on it, and its address.
#[derive(Clone)]
pub struct Host {
    /// Command prefix (`ip netns exec NAME`), empty on loopback.
    pub prefix: Vec<String>,
    pub ip: IpAddr,
}

impl Host {
    pub fn loopback() -> Host {
        Host {
            prefix: Vec::new(),
            ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        }
    }

    pub fn prefix(&self) -> Vec<&str> {
        self.prefix.iter().map(String::as_str).collect()
    }

    /// A command running `program` on this host.
    pub fn command(&self, program: &str) -> Command {
        p2p_tests::prefixed(&self.prefix(), std::path::Path::new(program))
    }
}

/// The hosts of a scenario: `hub` runs trackers, `hosts` run peers.
pub struct Net {
    pub hub: Host,
    pub hosts: Vec<Host>,
    /// What the scenario's name says about the network.
    pub label: String,
    _lab: Option<Lab>,
}

impl Net {
    /// Everything on 127.0.0.1.
    pub fn loopback(hosts: usize) -> Net {
        Net {
            hub: Host::loopback(),
            hosts: vec![Host::loopback(); hosts],
            label: "loopback".into(),
            _lab: None,
        }
    }

    /// `hosts` namespaces, each uplink limited to `mbit` Mbit/s.
    pub fn namespaces(hosts: usize, mbit: u32) -> Result<Net, String> {
        let lab = Lab::create(hosts, mbit)?;
        let ns = |name: &str| Host {
            prefix: vec!["ip".into(), "netns".into(), "exec".into(), name.into()],
            ip: IpAddr::V4(Ipv4Addr::new(10, 77, 0, 1)),
        };
        let hub = ns(&lab.hub);
        let hosts = lab
            .hosts
            .iter()
            .enumerate()
            .map(|(i, name)| Host {
                ip: IpAddr::V4(Ipv4Addr::new(10, 77, 0, 11 + i as u8)),
                ..ns(name)
            })
            .collect();
        Ok(Net {
            hub,
            hosts,
            label: format!("{mbit} Mbit/s uplinks"),
            _lab: Some(lab),
        })
    }
}

/// Why namespace scenarios cannot run here, if they cannot.
pub fn unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("they need root (network namespaces and tc)".into());
    }
    for tool in ["ip", "tc"] {
        if !crate::measure::installed(tool) {
            return Some(format!(
                "`{tool}` is not installed (apt-get install iproute2)"
            ));
        }
    }
    match Lab::create(1, 100) {
        Ok(_) => None,
        Err(e) => Some(format!("cannot create a network namespace here: {e}")),
    }
}

/// The namespaces themselves.
struct Lab {
    hub: String,
    hosts: Vec<String>,
}

fn run(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{}`: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Lab {
    fn create(hosts: usize, mbit: u32) -> Result<Lab, String> {
        let tag = std::process::id();
        let mut lab = Lab {
            hub: format!("p2pb{tag}-hub"),
            hosts: Vec::new(),
        };
        run(&["ip", "netns", "add", &lab.hub])?;
        let hub = lab.hub.clone();
        run(&["ip", "-n", &hub, "link", "set", "lo", "up"])?;
        run(&["ip", "-n", &hub, "link", "add", "br0", "type", "bridge"])?;
        run(&[
            "ip",
            "-n",
            &hub,
            "addr",
            "add",
            "10.77.0.1/24",
            "dev",
            "br0",
        ])?;
        run(&["ip", "-n", &hub, "link", "set", "br0", "address", HUB_MAC])?;
        run(&["ip", "-n", &hub, "link", "set", "br0", "up"])?;
        for i in 0..hosts {
            let name = format!("p2pb{tag}-h{i}");
            run(&["ip", "netns", "add", &name])?;
            lab.hosts.push(name.clone());
            let port = format!("v{i}");
            let addr = format!("10.77.0.{}/24", 11 + i);
            run(&["ip", "-n", &name, "link", "set", "lo", "up"])?;
            run(&[
                "ip", "-n", &hub, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
                "netns", &name,
            ])?;
            run(&[
                "ip", "-n", &hub, "link", "set", &port, "master", "br0", "up",
            ])?;
            run(&["ip", "-n", &name, "link", "set", "eth0", "address", &mac(i)])?;
            run(&["ip", "-n", &name, "addr", "add", &addr, "dev", "eth0"])?;
            run(&["ip", "-n", &name, "link", "set", "eth0", "up"])?;
            // The uplink: a token bucket on the host's side of its link. The burst covers
            // a 64 KiB segmentation-offloaded packet.
            let rate = format!("{mbit}mbit");
            run(&[
                "ip", "netns", "exec", &name, "tc", "qdisc", "add", "dev", "eth0", "root", "tbf",
                "rate", &rate, "burst", "256kb", "latency", "50ms",
            ])?;
        }
        lab.know_each_other()?;
        Ok(lab)
    }

    /// Gives every namespace a permanent neighbour entry for every other host and the hub.
    /// The kernel's neighbour table is shared by all namespaces and holds 1,024 learned
    /// entries by default (`gc_thresh3`): a hundred hosts talking to each other need ten
    /// times that, and past it ARP fails ("neighbor table overflow", connections time out).
    /// Permanent entries are not counted against that limit, and no host setting changes.
    fn know_each_other(&self) -> Result<(), String> {
        let entry = |i: usize, dev: &str| {
            format!(
                "neigh replace 10.77.0.{} lladdr {} dev {dev} nud permanent\n",
                11 + i,
                mac(i)
            )
        };
        let mut hub = String::new();
        for (i, name) in self.hosts.iter().enumerate() {
            let mut lines =
                format!("neigh replace 10.77.0.1 lladdr {HUB_MAC} dev eth0 nud permanent\n");
            for j in (0..self.hosts.len()).filter(|&j| j != i) {
                lines.push_str(&entry(j, "eth0"));
            }
            batch(name, &lines)?;
            hub.push_str(&entry(i, "br0"));
        }
        batch(&self.hub, &hub)
    }
}

/// The hub's bridge's MAC address, and host `i`'s.
const HUB_MAC: &str = "02:77:01:00:00:01";

fn mac(i: usize) -> String {
    format!("02:77:00:00:{:02x}:{:02x}", (i >> 8) & 0xff, i & 0xff)
}

/// Runs `ip -batch` in namespace `ns` with `commands`, one per line.
fn batch(ns: &str, commands: &str) -> Result<(), String> {
    use std::io::Write;
    let mut child = Command::new("ip")
        .args(["-n", ns, "-batch", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("ip -batch: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(commands.as_bytes())
            .map_err(|e| format!("ip -batch: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("ip -batch: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip -n {ns} -batch`: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in self.hosts.iter().chain(std::iter::once(&self.hub)) {
            let _ = run(&["ip", "netns", "del", ns]);
        }
    }
}
