//! Which process listens on a TCP port (`sock_diag` netlink, fallback `/proc/net/tcp{,6}`) or is bound to a UDP
//! port (`/proc/net/udp{,6}`): the socket's inode, then `/proc/<pid>/fd` for the process holding it.
//!
//! Both views are per network namespace: the agent sees the sockets of the namespace it runs in, which is the
//! one whose ports it can fault.

use std::{
    collections::{HashMap, HashSet},
    fs, io,
    mem::size_of,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

/// A listening TCP socket.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Listener {
    /// Bound address (`0.0.0.0`/`::` for wildcard).
    pub(crate) addr: IpAddr,
    /// Port.
    pub(crate) port: u16,
    /// Socket inode (the `socket:[N]` of `/proc/<pid>/fd`).
    pub(crate) inode: u64,
}

impl Listener {
    /// Whether a connection to `ip:port` would reach this socket.
    pub(crate) fn accepts(&self, ip: IpAddr, port: u16) -> bool {
        if self.port != port {
            return false;
        }
        match (self.addr, ip) {
            (a, b) if a == b => true,
            (IpAddr::V4(a), _) if a.is_unspecified() => ip.is_ipv4() || is_v4_mapped(ip),
            // A `::` socket without IPV6_V6ONLY also takes IPv4; treat it as accepting both.
            (IpAddr::V6(a), _) if a.is_unspecified() => true,
            _ => false,
        }
    }
}

fn is_v4_mapped(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some())
}

/// Every listening TCP socket of this network namespace.
///
/// # Errors
/// When neither `sock_diag` nor `/proc/net/tcp` can be read.
pub(crate) fn tcp_listeners() -> io::Result<Vec<Listener>> {
    match sock_diag_listeners() {
        Ok(list) => Ok(list),
        Err(_) => proc_net_listeners(),
    }
}

/// The UDP sockets of this network namespace that receive from anyone (bound, not connected): (address, port).
pub(crate) fn udp_bound() -> Vec<(IpAddr, u16)> {
    udp_bound_sockets().into_iter().map(|l| (l.addr, l.port)).collect()
}

/// Like [`udp_bound`], with each socket's inode (to find the process holding it with [`owners_of`]).
pub(crate) fn udp_bound_sockets() -> Vec<Listener> {
    let mut out = Vec::new();
    for (file, v6) in [("/proc/net/udp", false), ("/proc/net/udp6", true)] {
        let Ok(text) = fs::read_to_string(file) else { continue };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // `sl local_address rem_address st …`: unconnected sockets have remote port 0 (state 07 = CLOSE).
            let Some(remote) = fields.get(2) else { continue };
            let rport = remote.rsplit_once(':').and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            if rport != Some(0) {
                continue;
            }
            // The local address and inode have the layout of a TCP listener's line; reuse its parser with a fake
            // state.
            let mut as_listen = fields.clone();
            if as_listen.len() < 10 {
                continue;
            }
            as_listen[3] = "0A";
            if let Some(l) = parse_proc_net_line(&as_listen.join(" "), v6)
                && l.port != 0
            {
                out.push(l);
            }
        }
    }
    out
}

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const TCP_LISTEN: u32 = 10;
const NLMSG_DONE: u16 = 3;
const NLMSG_ERROR: u16 = 2;

#[repr(C)]
#[derive(Default)]
struct InetDiagSockId {
    sport: [u8; 2],
    dport: [u8; 2],
    src: [u8; 16],
    dst: [u8; 16],
    ifindex: u32,
    cookie: [u32; 2],
}

#[repr(C)]
#[derive(Default)]
struct InetDiagReqV2 {
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: InetDiagSockId,
}

#[repr(C)]
struct NlRequest {
    header: libc::nlmsghdr,
    req: InetDiagReqV2,
}

fn sock_diag_listeners() -> io::Result<Vec<Listener>> {
    let mut out = Vec::new();
    sock_diag_dump(1 << TCP_LISTEN, |payload, family| {
        if let Some(l) = parse_diag_msg(payload, family) {
            out.push(l);
        }
    })?;
    Ok(out)
}

/// Socket inode → socket cookie (the kernel's `sock_gen_cookie`, what `bpf_get_socket_cookie` returns) of every
/// TCP socket of this network namespace that is not listening (connections, in any state).
///
/// # Errors
/// When `sock_diag` cannot be read.
pub(crate) fn tcp_socket_cookies() -> io::Result<HashMap<u64, u64>> {
    let mut out = HashMap::new();
    sock_diag_dump(!(1 << TCP_LISTEN), |payload, _| {
        // `struct inet_diag_msg`: the cookie (two u32, low word first) ends the 48-byte socket id at offset 4.
        if payload.len() >= 72 {
            let word = |at: usize| u64::from(u32::from_ne_bytes(payload[at..at + 4].try_into().expect("4 bytes")));
            let cookie = word(44) | (word(48) << 32);
            let inode = word(68);
            if inode != 0 {
                out.insert(inode, cookie);
            }
        }
    })?;
    Ok(out)
}

/// One `sock_diag` TCP dump per address family for the sockets in `states` (a bit per TCP state); `each` gets
/// every `inet_diag_msg` and its family.
fn sock_diag_dump(states: u32, mut each: impl FnMut(&[u8], u8)) -> io::Result<()> {
    // SAFETY: plain socket(2); the fd is owned immediately.
    let raw = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, libc::NETLINK_SOCK_DIAG) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh fd we own.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        let request = NlRequest {
            header: libc::nlmsghdr {
                nlmsg_len: size_of::<NlRequest>() as u32,
                nlmsg_type: SOCK_DIAG_BY_FAMILY,
                nlmsg_flags: (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16,
                nlmsg_seq: u32::from(family),
                nlmsg_pid: 0,
            },
            req: InetDiagReqV2 { family, protocol: libc::IPPROTO_TCP as u8, states, ..Default::default() },
        };
        // SAFETY: sending the bytes of a #[repr(C)] struct we own.
        let sent =
            unsafe { libc::send(sock.as_raw_fd(), (&request as *const NlRequest).cast(), size_of::<NlRequest>(), 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        read_dump(&sock, family, &mut each)?;
    }
    Ok(())
}

fn read_dump(sock: &OwnedFd, family: u8, each: &mut impl FnMut(&[u8], u8)) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: receiving into a buffer we own, with its real length.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut msgs = &buf[..n as usize];
        while msgs.len() >= size_of::<libc::nlmsghdr>() {
            let len = u32::from_ne_bytes(msgs[0..4].try_into().expect("4 bytes")) as usize;
            let kind = u16::from_ne_bytes(msgs[4..6].try_into().expect("2 bytes"));
            if len < size_of::<libc::nlmsghdr>() || len > msgs.len() {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "truncated sock_diag message"));
            }
            match kind {
                NLMSG_DONE => return Ok(()),
                NLMSG_ERROR => return Err(io::Error::other("sock_diag dump refused")),
                _ => each(&msgs[size_of::<libc::nlmsghdr>()..len], family),
            }
            let aligned = (len + 3) & !3;
            msgs = &msgs[aligned.min(msgs.len())..];
        }
    }
}

/// `struct inet_diag_msg`: family, state, timer, retrans (4 bytes), inet_diag_sockid (48), expires, rqueue,
/// wqueue, uid, inode (5 × u32).
fn parse_diag_msg(payload: &[u8], family: u8) -> Option<Listener> {
    if payload.len() < 72 {
        return None;
    }
    let port = u16::from_be_bytes([payload[4], payload[5]]);
    let src = &payload[8..24];
    let addr = if family == libc::AF_INET as u8 {
        IpAddr::V4(Ipv4Addr::new(src[0], src[1], src[2], src[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(src).ok()?))
    };
    let inode = u32::from_ne_bytes(payload[68..72].try_into().ok()?);
    Some(Listener { addr, port, inode: u64::from(inode) })
}

fn proc_net_listeners() -> io::Result<Vec<Listener>> {
    let mut out = Vec::new();
    for (file, v6) in [("/proc/net/tcp", false), ("/proc/net/tcp6", true)] {
        let Ok(text) = fs::read_to_string(file) else { continue };
        out.extend(text.lines().skip(1).filter_map(|line| parse_proc_net_line(line, v6)));
    }
    Ok(out)
}

/// One line of `/proc/net/tcp{,6}`: `sl local_address rem_address st … inode`.
fn parse_proc_net_line(line: &str, v6: bool) -> Option<Listener> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    if fields.len() < 10 || fields[3] != "0A" {
        return None; // 0A = TCP_LISTEN
    }
    let (addr_hex, port_hex) = fields[1].split_once(':')?;
    let port = u16::from_str_radix(port_hex, 16).ok()?;
    let addr = if v6 {
        // Four u32 words, each printed in host (little-endian) order.
        let mut bytes = [0u8; 16];
        for (i, chunk) in bytes.chunks_mut(4).enumerate() {
            let word = u32::from_str_radix(addr_hex.get(i * 8..i * 8 + 8)?, 16).ok()?;
            chunk.copy_from_slice(&word.to_le_bytes());
        }
        IpAddr::V6(Ipv6Addr::from(bytes))
    } else {
        IpAddr::V4(Ipv4Addr::from(u32::from_str_radix(addr_hex, 16).ok()?.to_le_bytes()))
    };
    let inode = fields[9].parse().ok()?;
    Some(Listener { addr, port, inode })
}

/// Finds the processes holding the given socket inodes by reading `/proc/<pid>/fd`. `first` are pids to look at
/// before the full scan (e.g. lymph instances), which usually answers everything at once.
pub(crate) fn owners_of(inodes: &HashSet<u64>, first: &[i32]) -> HashMap<u64, i32> {
    let mut found = HashMap::new();
    if inodes.is_empty() {
        return found;
    }
    for &pid in first {
        scan_pid(pid, inodes, &mut found);
        if found.len() == inodes.len() {
            return found;
        }
    }
    for pid in all_pids() {
        if first.contains(&pid) {
            continue;
        }
        scan_pid(pid, inodes, &mut found);
        if found.len() == inodes.len() {
            break;
        }
    }
    found
}

/// Like [`owners_of`] but only looks at `pids` (no full `/proc` scan).
pub(crate) fn owners_among(inodes: &HashSet<u64>, pids: &[i32]) -> HashMap<u64, i32> {
    let mut found = HashMap::new();
    for &pid in pids {
        scan_pid(pid, inodes, &mut found);
    }
    found
}

/// The socket inodes a process holds open (`/proc/<pid>/fd`).
pub(crate) fn socket_inodes_of(pid: i32) -> Vec<u64> {
    let Ok(entries) = fs::read_dir(format!("/proc/{pid}/fd")) else { return Vec::new() };
    entries.flatten().filter_map(|e| socket_inode(&fs::read_link(e.path()).ok()?)).collect()
}

fn scan_pid(pid: i32, wanted: &HashSet<u64>, found: &mut HashMap<u64, i32>) {
    let Ok(entries) = fs::read_dir(format!("/proc/{pid}/fd")) else { return };
    for entry in entries.flatten() {
        let Ok(target) = fs::read_link(entry.path()) else { continue };
        if let Some(inode) = socket_inode(&target)
            && wanted.contains(&inode)
        {
            // Keep the first (lowest-scanned) owner: a socket shared after fork belongs to the parent too,
            // and lymph's node passes sockets to children, which are the ones serving.
            found.entry(inode).or_insert(pid);
        }
    }
}

fn socket_inode(link: &Path) -> Option<u64> {
    let s = link.to_str()?;
    s.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
}

/// Every numeric entry of `/proc`.
pub(crate) fn all_pids() -> Vec<i32> {
    let Ok(entries) = fs::read_dir("/proc") else { return Vec::new() };
    entries.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_our_own_listener_and_its_owner() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let all = tcp_listeners().unwrap();
        let ours = all.iter().find(|l| l.port == port).expect("our listener is listed");
        assert!(ours.accepts("127.0.0.1".parse().unwrap(), port));
        let owners = owners_of(&HashSet::from([ours.inode]), &[]);
        assert_eq!(owners.get(&ours.inode), Some(&(std::process::id() as i32)));
    }

    #[test]
    fn finds_our_own_udp_socket_and_its_owner() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = socket.local_addr().unwrap().port();
        let ours = udp_bound_sockets().into_iter().find(|l| l.port == port).expect("our UDP socket is listed");
        assert_eq!(ours.addr, "127.0.0.1".parse::<IpAddr>().unwrap());
        let owners = owners_of(&HashSet::from([ours.inode]), &[]);
        assert_eq!(owners.get(&ours.inode), Some(&(std::process::id() as i32)));
    }

    #[test]
    fn proc_net_parser_matches_sock_diag() {
        let listener =
            std::net::TcpListener::bind("[::1]:0").or_else(|_| std::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let port = listener.local_addr().unwrap().port();
        let from_proc = proc_net_listeners().unwrap();
        let from_diag = sock_diag_listeners().unwrap();
        let a = from_proc.iter().find(|l| l.port == port).unwrap();
        let b = from_diag.iter().find(|l| l.port == port).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn wildcard_listeners_accept_any_address_of_their_family() {
        let any4 = Listener { addr: "0.0.0.0".parse().unwrap(), port: 80, inode: 1 };
        assert!(any4.accepts("10.1.2.3".parse().unwrap(), 80));
        assert!(!any4.accepts("10.1.2.3".parse().unwrap(), 81));
        let lo = Listener { addr: "127.0.0.1".parse().unwrap(), port: 80, inode: 1 };
        assert!(!lo.accepts("10.1.2.3".parse().unwrap(), 80));
    }
}
