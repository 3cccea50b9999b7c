//! Links, qdiscs, classes and filters over rtnetlink (what `ip link` and `tc` do, without spawning them).
//!
//! Every call is one netlink request with `NLM_F_ACK`; kernel errors come back as [`NetlinkError::Kernel`] with
//! the errno, which callers map to named conditions (`ENOENT` on a qdisc add = the qdisc kind is not in this
//! kernel; `EEXIST` = already there). Option payloads come from [`super::encode`].

use futures::StreamExt;
use rtnetlink::packet_core::{
    DefaultNla, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkMessage,
    NetlinkPayload,
};
use rtnetlink::packet_route::{
    AddressFamily, RouteNetlinkMessage,
    address::{AddressAttribute, AddressMessage},
    link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkLayerType, LinkMessage},
    tc::{TcAttribute, TcHandle, TcMessage, TcOption},
};

/// `TCA_OPTIONS`.
const TCA_OPTIONS: u16 = 2;
/// `TC_H_ROOT`.
pub const TC_H_ROOT: u32 = 0xFFFF_FFFF;
/// `TC_H_CLSACT` (= `TC_H_INGRESS`): parent of the clsact qdisc.
pub const TC_H_CLSACT: u32 = 0xFFFF_FFF1;
/// Handle of the clsact qdisc (`ffff:`).
pub const CLSACT_HANDLE: u32 = 0xFFFF_0000;
/// `TC_H_MIN_INGRESS`: parent minor of clsact's ingress hook (`ffff:fff2`).
pub const CLSACT_INGRESS: u32 = 0xFFFF_FFF2;
/// `TC_H_MIN_EGRESS`: parent minor of clsact's egress hook (`ffff:fff3`).
pub const CLSACT_EGRESS: u32 = 0xFFFF_FFF3;
/// `ETH_P_ALL` in network byte order, as filters carry it in `tcm_info`.
const ETH_P_ALL_BE: u16 = 0x0003u16.to_be();

/// Errors of netlink operations.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The kernel answered with an errno.
    #[error("{op}: {}", std::io::Error::from_raw_os_error(*errno))]
    Kernel {
        /// What we asked (e.g. "add netem qdisc on lchaos0").
        op: String,
        /// Positive errno.
        errno: i32,
    },
    /// The netlink socket failed.
    #[error("{op}: netlink transport: {source}")]
    Transport {
        /// What we asked.
        op: String,
        /// What failed underneath (the socket, or rtnetlink's request side).
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl NetlinkError {
    /// The errno, if the kernel refused.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetlinkError::Kernel { errno, .. } => Some(*errno),
            NetlinkError::Transport { .. } => None,
        }
    }
}

/// A link as we need to know it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    /// ifindex.
    pub index: u32,
    /// Name.
    pub name: String,
    /// Administratively up.
    pub up: bool,
    /// Loopback device.
    pub loopback: bool,
    /// Has an Ethernet-style L2 header in tc hooks (Ethernet, loopback); false for L3 devices (tun, wireguard).
    pub l2: bool,
    /// `kind` from IFLA_INFO_KIND (veth, ifb, …), if any.
    pub kind: Option<String>,
}

/// A qdisc, class or filter from a dump.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcObject {
    /// ifindex.
    pub index: u32,
    /// Kind ("htb", "clsact", "bpf" …).
    pub kind: String,
    /// Handle (`major << 16 | minor`).
    pub handle: u32,
    /// Parent.
    pub parent: u32,
    /// For filters: `prio << 16 | protocol`.
    pub info: u32,
    /// For bpf filters: TCA_BPF_NAME.
    pub bpf_name: Option<String>,
}

impl TcObject {
    /// Filter priority.
    pub fn prio(&self) -> u16 {
        (self.info >> 16) as u16
    }
}

/// A netlink connection (its socket lives in the network namespace of the thread that opened it).
#[derive(Clone)]
pub struct Netlink {
    handle: rtnetlink::Handle,
}

fn handle_of(h: u32) -> TcHandle {
    TcHandle { major: (h >> 16) as u16, minor: (h & 0xffff) as u16 }
}

fn u32_of(h: TcHandle) -> u32 {
    (u32::from(h.major) << 16) | u32::from(h.minor)
}

impl Netlink {
    /// Opens a connection; its driver task runs on the current tokio runtime.
    ///
    /// # Errors
    /// When the netlink socket cannot be created.
    pub fn open() -> Result<Netlink, NetlinkError> {
        let (conn, handle, _) = rtnetlink::new_connection()
            .map_err(|e| NetlinkError::Transport { op: "open rtnetlink socket".into(), source: e.into() })?;
        tokio::spawn(conn);
        Ok(Netlink { handle })
    }

    async fn request(
        &self,
        op: &str,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Vec<RouteNetlinkMessage>, NetlinkError> {
        let mut req = NetlinkMessage::from(msg);
        req.header.flags = NLM_F_REQUEST | flags;
        let mut handle = self.handle.clone();
        let mut stream =
            handle.request(req).map_err(|e| NetlinkError::Transport { op: op.to_owned(), source: e.into() })?;
        let mut out = Vec::new();
        while let Some(msg) = stream.next().await {
            match msg.payload {
                NetlinkPayload::Error(err) => {
                    if let Some(code) = err.code {
                        return Err(NetlinkError::Kernel { op: op.to_owned(), errno: -code.get() });
                    }
                }
                NetlinkPayload::InnerMessage(inner) => out.push(inner),
                _ => {}
            }
        }
        Ok(out)
    }

    /// Every link of the namespace.
    ///
    /// # Errors
    /// Netlink failures.
    pub async fn links(&self) -> Result<Vec<Link>, NetlinkError> {
        let msgs = self.request("dump links", RouteNetlinkMessage::GetLink(LinkMessage::default()), NLM_F_DUMP).await?;
        Ok(msgs
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(link) => Some(link_of(&link)),
                _ => None,
            })
            .collect())
    }

    /// Every address of the namespace (IPv4 and IPv6, the local side of point-to-point links).
    ///
    /// # Errors
    /// Netlink failures.
    pub async fn addresses(&self) -> Result<Vec<std::net::IpAddr>, NetlinkError> {
        let msgs = self
            .request("dump addresses", RouteNetlinkMessage::GetAddress(AddressMessage::default()), NLM_F_DUMP)
            .await?;
        Ok(msgs
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) => {
                    let local = a.attributes.iter().find_map(|attr| match attr {
                        AddressAttribute::Local(ip) => Some(*ip),
                        _ => None,
                    });
                    local.or_else(|| {
                        a.attributes.iter().find_map(|attr| match attr {
                            AddressAttribute::Address(ip) => Some(*ip),
                            _ => None,
                        })
                    })
                }
                _ => None,
            })
            .collect())
    }

    /// A stream of "links or addresses changed" notifications of this namespace (one item per netlink
    /// notification; the content is not needed, callers re-read the state).
    ///
    /// # Errors
    /// When the netlink socket cannot be created or bound to the groups.
    pub fn watch() -> Result<futures::channel::mpsc::UnboundedReceiver<()>, NetlinkError> {
        use rtnetlink::{
            constants::{RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR, RTMGRP_LINK},
            sys::{AsyncSocket, SocketAddr},
        };
        let err = |e: std::io::Error| NetlinkError::Transport { op: "watch links".into(), source: e.into() };
        let (mut conn, _handle, mut messages) = rtnetlink::new_connection().map_err(err)?;
        conn.socket_mut()
            .socket_mut()
            .bind(&SocketAddr::new(0, RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR))
            .map_err(err)?;
        tokio::spawn(conn);
        let (tx, rx) = futures::channel::mpsc::unbounded();
        tokio::spawn(async move {
            // `_handle` keeps the connection's request side alive while this task runs.
            let _handle = _handle;
            while messages.next().await.is_some() {
                if tx.unbounded_send(()).is_err() {
                    return;
                }
            }
        });
        Ok(rx)
    }

    /// The link named `name`, if it exists.
    ///
    /// # Errors
    /// Netlink failures other than "no such device".
    pub async fn link_by_name(&self, name: &str) -> Result<Option<Link>, NetlinkError> {
        Ok(self.links().await?.into_iter().find(|l| l.name == name))
    }

    /// Creates an IFB device (`ip link add <name> txqueuelen <qlen> type ifb`) and brings it up.
    ///
    /// # Errors
    /// `EEXIST` if it exists; `EOPNOTSUPP` when the kernel has no ifb driver.
    pub async fn add_ifb(&self, name: &str, txqueuelen: u32) -> Result<Link, NetlinkError> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_owned()));
        msg.attributes.push(LinkAttribute::TxQueueLen(txqueuelen));
        msg.attributes.push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Ifb)]));
        let op = format!("ip link add {name} type ifb");
        self.request(&op, RouteNetlinkMessage::NewLink(msg), NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL).await?;
        let link = self.link_by_name(name).await?.ok_or_else(|| NetlinkError::Kernel {
            op: format!("find {name} after creating it"),
            errno: libc::ENODEV,
        })?;
        let mut up = LinkMessage::default();
        up.header.index = link.index;
        up.header.flags = LinkFlags::Up;
        up.header.change_mask = LinkFlags::Up;
        self.request(&format!("ip link set {name} up"), RouteNetlinkMessage::SetLink(up), NLM_F_ACK).await?;
        Ok(link)
    }

    /// Deletes a link.
    ///
    /// # Errors
    /// Netlink failures (`ENODEV` when it is already gone).
    pub async fn del_link(&self, index: u32) -> Result<(), NetlinkError> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        self.request(&format!("ip link del ifindex {index}"), RouteNetlinkMessage::DelLink(msg), NLM_F_ACK).await?;
        Ok(())
    }

    fn tc_message(index: u32, handle: u32, parent: u32, info: u32, kind: &str, options: Option<Vec<u8>>) -> TcMessage {
        let mut msg = TcMessage::with_index(index as i32);
        msg.header.family = AddressFamily::Unspec;
        msg.header.handle = handle_of(handle);
        msg.header.parent = handle_of(parent);
        msg.header.info = info;
        msg.attributes.push(TcAttribute::Kind(kind.to_owned()));
        if let Some(options) = options {
            msg.attributes.push(TcAttribute::Other(DefaultNla::new(TCA_OPTIONS, options)));
        }
        msg
    }

    /// Adds a qdisc (`tc qdisc add dev <index> parent <parent> handle <handle> <kind> <options>`).
    ///
    /// # Errors
    /// `EEXIST` when one is there, `ENOENT` when the kernel lacks the qdisc kind.
    pub async fn add_qdisc(
        &self,
        index: u32,
        handle: u32,
        parent: u32,
        kind: &str,
        options: Option<Vec<u8>>,
    ) -> Result<(), NetlinkError> {
        let msg = Self::tc_message(index, handle, parent, 0, kind, options);
        let op = format!("tc qdisc add dev #{index} parent {} handle {} {kind}", show(parent), show(handle));
        self.request(&op, RouteNetlinkMessage::NewQueueDiscipline(msg), NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL).await?;
        Ok(())
    }

    /// Changes a qdisc's options in place (`tc qdisc change`).
    ///
    /// # Errors
    /// Netlink failures.
    pub async fn change_qdisc(
        &self,
        index: u32,
        handle: u32,
        parent: u32,
        kind: &str,
        options: Vec<u8>,
    ) -> Result<(), NetlinkError> {
        let msg = Self::tc_message(index, handle, parent, 0, kind, Some(options));
        let op = format!("tc qdisc change dev #{index} handle {} {kind}", show(handle));
        self.request(&op, RouteNetlinkMessage::NewQueueDiscipline(msg), NLM_F_ACK).await?;
        Ok(())
    }

    /// Deletes a qdisc.
    ///
    /// # Errors
    /// Netlink failures (`ENOENT`/`EINVAL` when absent).
    pub async fn del_qdisc(&self, index: u32, handle: u32, parent: u32) -> Result<(), NetlinkError> {
        let mut msg = TcMessage::with_index(index as i32);
        msg.header.handle = handle_of(handle);
        msg.header.parent = handle_of(parent);
        let op = format!("tc qdisc del dev #{index} parent {} handle {}", show(parent), show(handle));
        self.request(&op, RouteNetlinkMessage::DelQueueDiscipline(msg), NLM_F_ACK).await?;
        Ok(())
    }

    /// Adds or replaces a class.
    ///
    /// # Errors
    /// Netlink failures.
    pub async fn put_class(
        &self,
        index: u32,
        classid: u32,
        parent: u32,
        kind: &str,
        options: Vec<u8>,
    ) -> Result<(), NetlinkError> {
        let msg = Self::tc_message(index, classid, parent, 0, kind, Some(options));
        let op = format!("tc class replace dev #{index} parent {} classid {} {kind}", show(parent), show(classid));
        self.request(&op, RouteNetlinkMessage::NewTrafficClass(msg), NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE).await?;
        Ok(())
    }

    /// Deletes a class.
    ///
    /// # Errors
    /// Netlink failures.
    pub async fn del_class(&self, index: u32, classid: u32) -> Result<(), NetlinkError> {
        let mut msg = TcMessage::with_index(index as i32);
        msg.header.handle = handle_of(classid);
        let op = format!("tc class del dev #{index} classid {}", show(classid));
        self.request(&op, RouteNetlinkMessage::DelTrafficClass(msg), NLM_F_ACK).await?;
        Ok(())
    }

    /// Adds a filter matching every protocol at `prio` under `parent` (`tc filter add … protocol all prio P
    /// handle H <kind> <options>`).
    ///
    /// # Errors
    /// Netlink failures.
    pub async fn add_filter(
        &self,
        index: u32,
        parent: u32,
        prio: u16,
        handle: u32,
        kind: &str,
        options: Vec<u8>,
    ) -> Result<(), NetlinkError> {
        let info = (u32::from(prio) << 16) | u32::from(ETH_P_ALL_BE);
        let msg = Self::tc_message(index, handle, parent, info, kind, Some(options));
        let op = format!("tc filter add dev #{index} parent {} prio {prio} {kind}", show(parent));
        self.request(&op, RouteNetlinkMessage::NewTrafficFilter(msg), NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL).await?;
        Ok(())
    }

    /// Deletes a filter by parent, priority and handle.
    ///
    /// # Errors
    /// Netlink failures.
    pub async fn del_filter(
        &self,
        index: u32,
        parent: u32,
        prio: u16,
        handle: u32,
        kind: &str,
    ) -> Result<(), NetlinkError> {
        let info = (u32::from(prio) << 16) | u32::from(ETH_P_ALL_BE);
        let msg = Self::tc_message(index, handle, parent, info, kind, None);
        let op = format!("tc filter del dev #{index} parent {} prio {prio}", show(parent));
        self.request(&op, RouteNetlinkMessage::DelTrafficFilter(msg), NLM_F_ACK).await?;
        Ok(())
    }

    /// Dumps qdiscs of one link (all links when `index` is 0).
    ///
    /// # Errors
    /// Netlink failures.
    pub async fn qdiscs(&self, index: u32) -> Result<Vec<TcObject>, NetlinkError> {
        let msg = TcMessage::with_index(index as i32);
        let msgs = self.request("dump qdiscs", RouteNetlinkMessage::GetQueueDiscipline(msg), NLM_F_DUMP).await?;
        Ok(tc_objects(msgs).into_iter().filter(|o| index == 0 || o.index == index).collect())
    }

    /// Dumps classes of one link.
    ///
    /// # Errors
    /// Netlink failures.
    pub async fn classes(&self, index: u32) -> Result<Vec<TcObject>, NetlinkError> {
        let msg = TcMessage::with_index(index as i32);
        let msgs = self.request("dump classes", RouteNetlinkMessage::GetTrafficClass(msg), NLM_F_DUMP).await?;
        Ok(tc_objects(msgs))
    }

    /// Dumps filters of one link under `parent`.
    ///
    /// # Errors
    /// Netlink failures.
    pub async fn filters(&self, index: u32, parent: u32) -> Result<Vec<TcObject>, NetlinkError> {
        let mut msg = TcMessage::with_index(index as i32);
        msg.header.parent = handle_of(parent);
        let msgs = self.request("dump filters", RouteNetlinkMessage::GetTrafficFilter(msg), NLM_F_DUMP).await?;
        // The kernel also reports a bare entry per priority (no handle); keep only real filters.
        Ok(tc_objects(msgs).into_iter().filter(|o| o.handle != 0).collect())
    }
}

fn link_of(link: &LinkMessage) -> Link {
    let mut name = String::new();
    let mut kind = None;
    for attr in &link.attributes {
        match attr {
            LinkAttribute::IfName(n) => name = n.clone(),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    if let LinkInfo::Kind(k) = info {
                        kind = Some(k.to_string());
                    }
                }
            }
            _ => {}
        }
    }
    let loopback = link.header.link_layer_type == LinkLayerType::Loopback;
    let l2 = matches!(link.header.link_layer_type, LinkLayerType::Ether | LinkLayerType::Loopback);
    Link { index: link.header.index, name, up: link.header.flags.contains(LinkFlags::Up), loopback, l2, kind }
}

fn tc_objects(msgs: Vec<RouteNetlinkMessage>) -> Vec<TcObject> {
    msgs.into_iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewQueueDiscipline(t)
            | RouteNetlinkMessage::NewTrafficClass(t)
            | RouteNetlinkMessage::NewTrafficFilter(t) => Some(tc_object(&t)),
            _ => None,
        })
        .collect()
}

fn tc_object(t: &TcMessage) -> TcObject {
    let mut kind = String::new();
    let mut bpf_name = None;
    for attr in &t.attributes {
        match attr {
            TcAttribute::Kind(k) => kind = k.clone(),
            TcAttribute::Options(opts) => {
                for opt in opts {
                    if let TcOption::Bpf(rtnetlink::packet_route::tc::TcFilterBpfOption::ProgName(name)) = opt {
                        bpf_name = Some(name.clone());
                    }
                }
            }
            _ => {}
        }
    }
    TcObject {
        index: t.header.index as u32,
        kind,
        handle: u32_of(t.header.handle),
        parent: u32_of(t.header.parent),
        info: t.header.info,
        bpf_name,
    }
}

/// `major:minor` in hex, as tc prints handles.
pub fn show(handle: u32) -> String {
    match handle {
        TC_H_ROOT => "root".into(),
        TC_H_CLSACT => "clsact".into(),
        _ => format!("{:x}:{:x}", handle >> 16, handle & 0xffff),
    }
}
