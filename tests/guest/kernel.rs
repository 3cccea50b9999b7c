//! Kernel objects: the topology the scenarios build (veth pair, device stacks), the operator's root qdiscs, what of
//! the agent's is in the kernel, and `tc`/`ip` run by absolute path.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    path::Path,
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use chaos_test_support::eventually;
use chaos_tests::measure::in_netns;

use crate::{Outcome, *};

/// A caller in a namespace of its own, joined to this host through a stack of devices: a veth pair whose host end
/// is a bridge port, carries a VLAN, or is a bond's slave; the host's address sits on the top device.
pub(crate) struct Stack {
    pub(crate) name: &'static str,
    pub(crate) netns: &'static str,
    /// The host end of the veth pair, and the caller's end.
    pub(crate) port: &'static str,
    pub(crate) peer: &'static str,
    /// The device the host's address sits on (the bridge, the VLAN device, the bond).
    pub(crate) top: &'static str,
    pub(crate) host: Ipv4Addr,
    pub(crate) caller: Ipv4Addr,
}

impl Stack {
    pub(crate) const BRIDGE: Stack = Stack {
        name: "bridge",
        netns: "chaos-br",
        port: "vbr-p",
        peer: "vbr-c",
        top: "br-chaos",
        host: Ipv4Addr::new(10, 78, 0, 1),
        caller: Ipv4Addr::new(10, 78, 0, 2),
    };
    pub(crate) const VLAN: Stack = Stack {
        name: "vlan",
        netns: "chaos-vlan",
        port: "vvl-p",
        peer: "vvl-c",
        top: "vvl-p.100",
        host: Ipv4Addr::new(10, 79, 0, 1),
        caller: Ipv4Addr::new(10, 79, 0, 2),
    };
    pub(crate) const BOND: Stack = Stack {
        name: "bond",
        netns: "chaos-bond",
        port: "vbd-p",
        peer: "vbd-c",
        top: "bond-chaos",
        host: Ipv4Addr::new(10, 80, 0, 1),
        caller: Ipv4Addr::new(10, 80, 0, 2),
    };
    pub(crate) const ALL: [&'static Stack; 3] = [&Self::BRIDGE, &Self::VLAN, &Self::BOND];

    pub(crate) fn create(&self) -> Result<()> {
        let ns = self.netns;
        ip(&["netns", "add", ns])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        ip(&["link", "add", self.port, "type", "veth", "peer", "name", self.peer, "netns", ns])?;
        let caller_dev = match self.name {
            "bridge" => {
                ip(&["link", "add", self.top, "type", "bridge"])?;
                ip(&["link", "set", self.port, "master", self.top])?;
                ip(&["link", "set", self.port, "up"])?;
                self.peer.to_owned()
            }
            "vlan" => {
                ip(&["link", "set", self.port, "up"])?;
                ip(&["link", "add", "link", self.port, "name", self.top, "type", "vlan", "id", "100"])?;
                let dev = format!("{}.100", self.peer);
                ip(&["-n", ns, "link", "set", self.peer, "up"])?;
                ip(&["-n", ns, "link", "add", "link", self.peer, "name", &dev, "type", "vlan", "id", "100"])?;
                dev
            }
            _ => {
                ip(&["link", "add", self.top, "type", "bond", "mode", "active-backup"])?;
                ip(&["link", "set", self.port, "master", self.top])?;
                self.peer.to_owned()
            }
        };
        ip(&["addr", "add", &format!("{}/24", self.host), "dev", self.top])?;
        ip(&["link", "set", self.top, "up"])?;
        ip(&["-n", ns, "addr", "add", &format!("{}/24", self.caller), "dev", &caller_dev])?;
        ip(&["-n", ns, "link", "set", self.peer, "up"])?;
        ip(&["-n", ns, "link", "set", &caller_dev, "up"])?;
        if self.name == "bridge" {
            tc_in(Some(ns), &["qdisc", "add", "dev", self.peer, "root", "handle", HTB_ROOT, "htb", "default", "1"])?;
        }
        // Up and forwarding before the scenarios: a bridge port learns and a bond elects its active slave.
        let probe = SocketAddr::new(IpAddr::V4(self.host), 9);
        let ns_path = Path::new("/run/netns").join(ns);
        eventually(
            format_args!("{}: {} reaching {} from {ns}", self.name, self.caller, self.host),
            Duration::from_secs(10),
            Duration::from_millis(200),
            || {
                in_netns(&ns_path, || {
                    // Refused (RST) means the host answered: the path works.
                    matches!(TcpStream::connect_timeout(&probe, Duration::from_millis(300)),
                        Err(ref e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
                })
            },
        )
    }

    pub(crate) fn teardown(&self) {
        let _ = Command::new(IP).args(["netns", "del", self.netns]).output();
        let _ = Command::new(IP).args(["link", "del", self.port]).output();
        let _ = Command::new(IP).args(["link", "del", self.top]).output();
    }
}

/// Everything of the agent's in the kernel: `lymph-chaos:` filters on lo and veth-srv, clsact qdiscs (nothing else
/// here creates one), the IFB, pins.
pub(crate) struct AgentObjects {
    pub(crate) filters: Vec<String>,
    pub(crate) clsact: Vec<String>,
    pub(crate) ifb: bool,
    pub(crate) pins: usize,
}

impl AgentObjects {
    pub(crate) fn now() -> Self {
        let mut filters = Vec::new();
        let mut clsact = Vec::new();
        for dev in [LO, VETH_SRV] {
            for hook in ["ingress", "egress"] {
                let text = tc_output(&["filter", "show", "dev", dev, hook]);
                let n = text.lines().filter(|l| l.contains(AGENT_FILTER_PREFIX)).count();
                if n > 0 {
                    filters.push(format!("{dev}/{hook}:{n}"));
                }
            }
            if tc_output(&["qdisc", "show", "dev", dev]).contains("qdisc clsact") {
                clsact.push(dev.to_string());
            }
        }
        let ifb = Path::new("/sys/class/net").join(AGENT_IFB).exists();
        let pins = std::fs::read_dir(AGENT_PIN_DIR).map_or(0, Iterator::count);
        Self { filters, clsact, ifb, pins }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.filters.is_empty() && self.clsact.is_empty() && !self.ifb && self.pins == 0
    }

    /// `filters=lo/egress:2,clsact=lo,ifb=1,pins=3` style (no spaces: one console value).
    pub(crate) fn summary(&self) -> String {
        if self.is_empty() {
            return "none".into();
        }
        let mut parts = Vec::new();
        if !self.filters.is_empty() {
            parts.push(format!("filters:{}", self.filters.join("+")));
        }
        if !self.clsact.is_empty() {
            parts.push(format!("clsact:{}", self.clsact.join("+")));
        }
        if self.ifb {
            parts.push(format!("ifb:{AGENT_IFB}"));
        }
        if self.pins > 0 {
            parts.push(format!("pins:{}", self.pins));
        }
        parts.join(",")
    }
}

/// The operator's root qdiscs, installed before the agent starts and compared after every step.
pub(crate) struct QdiscWatch {
    /// (device, expected `tc qdisc show` line start, e.g. `qdisc htb 1: root`)
    pub(crate) expected: Vec<(&'static str, String)>,
    pub(crate) checks: Vec<(String, bool)>,
}

impl QdiscWatch {
    pub(crate) fn install(veth: bool) -> Result<Self> {
        let mut expected = Vec::new();
        for (dev, kind, args) in OPERATOR_QDISCS {
            if *dev == VETH_SRV && !veth {
                continue;
            }
            let _ = Command::new(TC).args(["qdisc", "del", "dev", dev, "root"]).output();
            let mut full = vec!["qdisc", "add", "dev", dev, "root"];
            full.extend_from_slice(args);
            tc(&full)?;
            expected.push((*dev, format!("qdisc {kind} root")));
        }
        let mut watch = Self { expected, checks: Vec::new() };
        watch.check("before-agent");
        Ok(watch)
    }

    /// Whether every operator's root qdisc is still there (recorded, and printed when not).
    pub(crate) fn check(&mut self, step: &str) -> bool {
        let ok = self.expected.iter().all(|(dev, line)| {
            let text = tc_output(&["qdisc", "show", "dev", dev]);
            let found = text.lines().any(|l| l.starts_with(line.as_str()));
            if !found {
                println!("DETAIL agent-root-qdisc-kept: at {step}, `{line}` is gone from {dev}:\n{text}");
            }
            found
        });
        self.checks.push((step.to_string(), ok));
        ok
    }

    pub(crate) fn outcome(&self) -> Outcome {
        let failed: Vec<&str> = self.checks.iter().filter(|(_, ok)| !ok).map(|(s, _)| s.as_str()).collect();
        let qdiscs: Vec<String> =
            self.expected.iter().map(|(dev, line)| format!("{dev}:{}", line.replace(' ', "_"))).collect();
        Outcome {
            // before-agent, agent-started and the ones of the test asking; a full run checks after every test.
            passed: failed.is_empty() && self.checks.len() >= 3,
            values: vec![
                ("qdiscs", qdiscs.join(",")),
                ("checks", self.checks.len().to_string()),
                ("failed", if failed.is_empty() { "none".into() } else { failed.join(",") }),
            ],
        }
    }
}

/// The veth pair to the client namespace.
pub(crate) struct Topology;

impl Topology {
    pub(crate) fn create() -> Result<()> {
        ip(&["netns", "add", NETNS])?;
        ip(&["-n", NETNS, "link", "set", "lo", "up"])?;
        ip(&["link", "add", VETH_SRV, "type", "veth", "peer", "name", VETH_CLI, "netns", NETNS])?;
        // `nodad`: usable at once (duplicate address detection would keep them tentative for a second or two).
        ip(&["addr", "add", &format!("{SRV_V4}/24"), "dev", VETH_SRV])?;
        ip(&["-6", "addr", "add", &format!("{SRV_V6}/64"), "dev", VETH_SRV, "nodad"])?;
        ip(&["link", "set", VETH_SRV, "up"])?;
        ip(&["-n", NETNS, "addr", "add", &format!("{CLI_V4}/24"), "dev", VETH_CLI])?;
        ip(&["-n", NETNS, "-6", "addr", "add", &format!("{CLI_V6}/64"), "dev", VETH_CLI, "nodad"])?;
        ip(&["-n", NETNS, "link", "set", VETH_CLI, "up"])?;
        // The root the raw netem twin of the ingress scenarios hangs its class under.
        tc_in(Some(NETNS), &["qdisc", "add", "dev", VETH_CLI, "root", "handle", HTB_ROOT, "htb", "default", "1"])?;
        Ok(())
    }
}

/// Removes what the scenarios add to the machine (for runs by hand; the qemu guest powers off anyway).
pub(crate) fn teardown() {
    let _ = Command::new(IP).args(["netns", "del", NETNS]).output();
    let _ = Command::new(IP).args(["link", "del", VETH_SRV]).output();
    let _ = Command::new(TC).args(["qdisc", "del", "dev", LO, "root"]).output();
    for stack in Stack::ALL {
        stack.teardown();
    }
}

/// Runs `/usr/sbin/tc <args>`, echoing it; fails with tc's stderr.
pub(crate) fn tc(args: &[&str]) -> Result<()> {
    tc_in(None, args)
}

/// [`tc`] in a named network namespace (`tc -n NAME`), or in ours.
pub(crate) fn tc_in(netns: Option<&str>, args: &[&str]) -> Result<()> {
    let mut cmd = Command::new(TC);
    if let Some(ns) = netns {
        cmd.args(["-n", ns]);
        println!("+ tc -n {ns} {}", args.join(" "));
    } else {
        println!("+ tc {}", args.join(" "));
    }
    let out = cmd.args(args).output().with_context(|| format!("starting {TC}"))?;
    if !out.status.success() {
        bail!("tc {} failed ({}): {}", args.join(" "), out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// `tc <args>`'s stdout, empty when it fails (e.g. no clsact to list filters of).
pub(crate) fn tc_output(args: &[&str]) -> String {
    Command::new(TC).args(args).output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default()
}

/// Runs `/usr/sbin/ip <args>`, echoing it.
pub(crate) fn ip(args: &[&str]) -> Result<()> {
    println!("+ ip {}", args.join(" "));
    let out = Command::new(IP).args(args).output().with_context(|| format!("starting {IP}"))?;
    if !out.status.success() {
        bail!("ip {} failed ({}): {}", args.join(" "), out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}
