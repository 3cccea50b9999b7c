//! Who may command the agent: a ZAP handler (ZeroMQ Authentication Protocol, [RFC 27]) that accepts or rejects
//! every new connection to the RPC node's bound socket, by the peer's IP address (`rpc.allowed_clients`) and, with
//! CURVE configured, by the client's public key (`rpc.curve_client_keys`).
//!
//! # Layout
//!
//! ```text
//!  client ──TCP──▶ recv ROUTER  (ZAP domain "lymph-chaos"; CURVE server when rpc.curve_secret_key_file is set)
//!                     │  during the handshake libzmq asks, over inproc on the same zmq::Context:
//!                     ▼
//!            inproc://zeromq.zap.01 ◀── REP socket, owned by the ZAP thread of [`AccessControl`]
//!                     │  Policy::decide(domain, peer address, mechanism, client key)
//!                     ▼
//!            "200" → the connection completes;  "400" → libzmq closes it (the client's messages go nowhere:
//!                                                 a lymph client sees a timeout, never a reply)
//! ```
//!
//! Only the bound socket is checked: replies leave through the node's connecting socket, which authenticates
//! nothing. The agent's own addresses (the bind address when it is not `0.0.0.0`/`::`, and the advertised one)
//! are always allowed, because local lymph processes answering the agent's own requests (`lymph.inspect` during
//! discovery) connect back from them.
//!
//! # Failing closed
//! libzmq skips authentication when nobody is bound at `inproc://zeromq.zap.01` (`ZMQ_ZAP_ENFORCE_DOMAIN` is a
//! draft option, absent from the libzmq zmq-sys vendors). So the handler must live at least as long as the
//! protected socket: keep the [`AccessControl`] next to the socket and drop it after the socket (e.g. as a field
//! of the struct owning the socket, declared after it). The handler thread never exits on its own; a request it
//! cannot parse, or a decision that panics, gets status 500 (rejected). Should the thread end anyway,
//! [`AccessControl::alive`] turns false and the RPC node drops every request from then on: nobody is let in.
//!
//! # Defaults
//! Without `rpc.allowed_clients` and without CURVE, only loopback clients are let in, and a non-loopback bind is
//! refused at start ([`AccessError::OpenBind`]): access control is never off.
//!
//! # CURVE
//! CURVE needs a libzmq built with libsodium. zmq-sys 0.12 builds its vendored libzmq 4.3.4 *without* it, so
//! `zmq::has("curve")` is false in a default build and [`Policy::from_config`] refuses a CURVE configuration with
//! [`AccessError::CurveUnavailable`] rather than running unauthenticated. Linking Debian's `libzmq5` (built with
//! libsodium) instead needs `apt-get install libzmq3-dev` and a links override in `.cargo/config.toml`:
//!
//! ```toml
//! [target.x86_64-unknown-linux-gnu.zmq]
//! rustc-link-lib = ["zmq"]
//! ```
//!
//! [RFC 27]: https://rfc.zeromq.org/spec/27/

use std::{
    collections::HashMap,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use tracing::{debug, info, warn};

use crate::config::{RpcConfig, parse_cidr};

/// Where libzmq sends ZAP requests (fixed by RFC 27).
pub(crate) const ZAP_ENDPOINT: &str = "inproc://zeromq.zap.01";
/// The ZAP domain set on protected sockets; requests for other domains are rejected.
pub(crate) const ZAP_DOMAIN: &str = "lymph-chaos";
/// The only ZAP version there is.
const ZAP_VERSION: &[u8] = b"1.0";
/// How often the handler thread checks whether it should stop.
const POLL_MS: i64 = 100;
/// A rejected address is logged at most this often.
const REJECT_LOG_EVERY: Duration = Duration::from_secs(60);
/// Rejected addresses remembered for rate-limited logging (the map is cleared when it grows past this).
const REJECT_LOG_MAX: usize = 1024;
/// Length of a binary CURVE key.
const KEY_LEN: usize = 32;
/// Length of a Z85-encoded CURVE key.
const Z85_KEY_LEN: usize = 40;

/// Why access control could not be set up.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AccessError {
    /// An `rpc.allowed_clients` entry is not an address or CIDR.
    #[error("rpc.allowed_clients: `{entry}` is not an address or CIDR network")]
    InvalidNetwork {
        /// The entry.
        entry: String,
    },
    /// A non-loopback bind with nobody allowed explicitly.
    #[error(
        "rpc.bind is {bind}, reachable from other hosts, but rpc.allowed_clients is empty and CURVE is off: anyone \
         who reaches the port could command this root agent. Set rpc.allowed_clients to your clients' networks \
         (e.g. [127.0.0.0/8, \"::1\", 10.20.0.0/16]), configure CURVE, or bind 127.0.0.1"
    )]
    OpenBind {
        /// The bind address.
        bind: String,
    },
    /// The secret key file cannot be read.
    #[error("rpc.curve_secret_key_file {path}: {source}")]
    KeyFile {
        /// The file.
        path: PathBuf,
        /// Error.
        source: std::io::Error,
    },
    /// The secret key file is readable by others.
    #[error("rpc.curve_secret_key_file {path} is readable by group or others (mode {mode:o}); run: chmod 600 {path}")]
    KeyFilePermissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A key is not a 40-character Z85 CURVE key.
    #[error("{what}: not a Z85 CURVE key (40 characters)")]
    InvalidKey {
        /// Which key (`rpc.curve_secret_key_file`, `rpc.curve_client_keys[2]`).
        what: String,
    },
    /// CURVE is configured but libzmq cannot do it.
    #[error(
        "CURVE is configured (rpc.curve_secret_key_file) but this build's libzmq has no CURVE support \
         (zmq-sys vendors libzmq without libsodium); remove the CURVE keys or build against Debian's libzmq5 \
         (see chaos_agent::rpc::access)"
    )]
    CurveUnavailable,
    /// A zmq call failed.
    #[error("zmq {op}: {source}")]
    Zmq {
        /// What we were doing.
        op: &'static str,
        /// zmq's error.
        source: zmq::Error,
    },
    /// The handler thread could not be started.
    #[error("starting the ZAP handler thread: {0}")]
    Thread(std::io::Error),
}

fn zmq_err(op: &'static str) -> impl FnOnce(zmq::Error) -> AccessError {
    move |source| AccessError::Zmq { op, source }
}

/// An IP network (`10.0.0.0/8`, `::1/128`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Network {
    addr: IpAddr,
    prefix: u8,
}

impl Network {
    /// Parses `a.b.c.d[/n]` or an IPv6 address with an optional prefix length.
    pub(crate) fn parse(s: &str) -> Option<Network> {
        let (addr, prefix) = parse_cidr(s.trim())?;
        // `::ffff:a.b.c.d/n` is the IPv4 network `a.b.c.d/(n-96)`: peers are compared as IPv4 addresses.
        match addr {
            IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => {
                let v4 = v6.to_ipv4_mapped()?;
                (prefix >= 96).then(|| Network { addr: IpAddr::V4(v4), prefix: prefix - 96 })
            }
            _ => Some(Network { addr, prefix }),
        }
    }

    /// A single host.
    pub(crate) fn host(addr: IpAddr) -> Network {
        let addr = addr.to_canonical();
        Network { addr, prefix: if addr.is_ipv4() { 32 } else { 128 } }
    }

    /// Whether `ip` is in this network (IPv4-mapped IPv6 addresses count as IPv4).
    pub(crate) fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            // A prefix above the family's width never matches anything wider than the host (no wrap, no panic);
            // prefix 0 is the only way to match everything.
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let bits = u32::from(self.prefix.min(32));
                let mask = if bits == 0 { 0 } else { u32::MAX << (32 - bits) };
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let bits = u32::from(self.prefix.min(128));
                let mask = if bits == 0 { 0 } else { u128::MAX << (128 - bits) };
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl std::fmt::Display for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// CURVE settings: our secret key and the client keys we accept.
#[derive(Clone)]
struct Curve {
    secret_key: [u8; KEY_LEN],
    /// Empty = any client that knows our public key.
    clients: Vec<[u8; KEY_LEN]>,
}

/// What is allowed: networks, and with CURVE the client keys. Built from `rpc.*` by [`Policy::from_config`].
#[derive(Clone)]
pub(crate) struct Policy {
    /// Empty = any address.
    networks: Vec<Network>,
    /// The agent's own addresses (always allowed when `networks` is not empty).
    own: Vec<Network>,
    curve: Option<Curve>,
}

impl std::fmt::Debug for Policy {
    // Never prints the secret key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("networks", &self.networks.iter().map(ToString::to_string).collect::<Vec<_>>())
            .field("own", &self.own.iter().map(ToString::to_string).collect::<Vec<_>>())
            .field("curve", &self.curve.as_ref().map(|c| format!("{} client key(s)", c.clients.len())))
            .finish()
    }
}

/// Why a connection was rejected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Denied {
    /// The request was for another ZAP domain.
    Domain(String),
    /// The peer address is not in `rpc.allowed_clients`.
    Address(String),
    /// The client did not use CURVE although the agent requires it (or used it although the agent does not).
    Mechanism(String),
    /// The client's CURVE key is not in `rpc.curve_client_keys`.
    Key(String),
    /// The request did not follow RFC 27.
    Malformed(&'static str),
    /// The decision itself failed: nobody gets in then.
    Internal,
}

impl Denied {
    /// RFC 27 status code: 400 for a refused client, 500 for a request we cannot read.
    fn status(&self) -> &'static str {
        match self {
            Denied::Malformed(_) | Denied::Internal => "500",
            _ => "400",
        }
    }
}

impl std::fmt::Display for Denied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Denied::Domain(d) => write!(f, "unknown ZAP domain `{d}`"),
            Denied::Address(a) => write!(f, "address {a} is not in rpc.allowed_clients"),
            Denied::Mechanism(m) => write!(f, "security mechanism {m} is not what the agent requires"),
            Denied::Key(k) => write!(f, "CURVE key {k} is not in rpc.curve_client_keys"),
            Denied::Malformed(why) => write!(f, "malformed ZAP request: {why}"),
            Denied::Internal => write!(f, "the access check failed; refused"),
        }
    }
}

/// One ZAP request (RFC 27 frames after the REQ envelope).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct ZapRequest {
    /// Echoed in the reply.
    pub(crate) request_id: Vec<u8>,
    /// The socket's `ZMQ_ZAP_DOMAIN`.
    pub(crate) domain: String,
    /// The peer's IP address as libzmq reports it (no port).
    pub(crate) address: String,
    /// `NULL`, `PLAIN` or `CURVE`.
    pub(crate) mechanism: String,
    /// Mechanism credentials (CURVE: the client's 32-byte public key).
    pub(crate) credentials: Vec<Vec<u8>>,
}

impl ZapRequest {
    /// Parses the frames of a request.
    ///
    /// # Errors
    /// [`Denied::Malformed`] (with the request id when there is one, for the reply).
    pub(crate) fn parse(frames: &[Vec<u8>]) -> Result<ZapRequest, (Vec<u8>, Denied)> {
        let id = frames.get(1).cloned().unwrap_or_default();
        if frames.len() < 6 {
            return Err((id, Denied::Malformed("fewer than 6 frames")));
        }
        if frames[0] != ZAP_VERSION {
            return Err((id, Denied::Malformed("version is not 1.0")));
        }
        let text = |i: usize| String::from_utf8(frames[i].clone());
        let (Ok(domain), Ok(address), Ok(mechanism)) = (text(2), text(3), text(5)) else {
            return Err((id, Denied::Malformed("domain, address or mechanism is not UTF-8")));
        };
        Ok(ZapRequest { request_id: id, domain, address, mechanism, credentials: frames[6..].to_vec() })
    }
}

/// The peer address as ZAP gives it (`10.0.0.2`, `::1`, `[::1]`, `fe80::1%eth0`) → an IP.
fn parse_peer(address: &str) -> Option<IpAddr> {
    let a = address.trim().trim_start_matches('[').trim_end_matches(']');
    let a = a.split_once('%').map_or(a, |(ip, _scope)| ip);
    a.parse::<IpAddr>().ok().map(|ip| ip.to_canonical())
}

fn decode_key(text: &str, what: impl Fn() -> String) -> Result<[u8; KEY_LEN], AccessError> {
    let text = text.trim();
    if text.len() != Z85_KEY_LEN {
        return Err(AccessError::InvalidKey { what: what() });
    }
    let bytes = zmq::z85_decode(text).map_err(|_| AccessError::InvalidKey { what: what() })?;
    bytes.try_into().map_err(|_| AccessError::InvalidKey { what: what() })
}

/// Reads a secret key file: the 40-character Z85 key alone, or a ZeroMQ certificate (`zcert`) with a
/// `secret-key = "…"` line. Refuses files that group or others can read.
///
/// # Errors
/// [`AccessError::KeyFile`], [`AccessError::KeyFilePermissions`], [`AccessError::InvalidKey`].
pub(crate) fn read_secret_key(path: &Path) -> Result<[u8; KEY_LEN], AccessError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|source| AccessError::KeyFile { path: path.to_owned(), source })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(AccessError::KeyFilePermissions { path: path.to_owned(), mode });
    }
    let text =
        std::fs::read_to_string(path).map_err(|source| AccessError::KeyFile { path: path.to_owned(), source })?;
    let what = || format!("rpc.curve_secret_key_file {}", path.display());
    let key_text = text
        .lines()
        .map(str::trim)
        .find_map(|l| {
            let rest = l.strip_prefix("secret-key")?.trim_start().strip_prefix('=')?;
            Some(rest.trim().trim_matches('"').to_owned())
        })
        .unwrap_or_else(|| text.trim().to_owned());
    decode_key(&key_text, what)
}

/// Whether a bind address only accepts connections from this host.
fn is_loopback_bind(bind: &str) -> bool {
    let b = bind.trim().trim_start_matches('[').trim_end_matches(']');
    b == "localhost" || b.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

impl Policy {
    /// The policy `rpc` asks for: with neither `allowed_clients` nor CURVE, loopback clients only, and a
    /// non-loopback bind is refused ([`AccessError::OpenBind`]). Always `Some`.
    /// `advertised` is the address the agent advertises (always allowed, see the module docs).
    ///
    /// # Errors
    /// Bad networks or keys, an unreadable or too open key file, CURVE without libzmq support.
    pub(crate) fn from_config(rpc: &RpcConfig, advertised: &str) -> Result<Option<Policy>, AccessError> {
        let networks = rpc
            .allowed_clients
            .iter()
            .map(|entry| Network::parse(entry).ok_or_else(|| AccessError::InvalidNetwork { entry: entry.clone() }))
            .collect::<Result<Vec<_>, _>>()?;
        let curve = match &rpc.curve_secret_key_file {
            None => None,
            Some(path) => {
                if zmq::has("curve") != Some(true) {
                    return Err(AccessError::CurveUnavailable);
                }
                let secret_key = read_secret_key(path)?;
                let clients = rpc
                    .curve_client_keys
                    .iter()
                    .enumerate()
                    .map(|(i, k)| decode_key(k, || format!("rpc.curve_client_keys[{i}]")))
                    .collect::<Result<Vec<_>, _>>()?;
                Some(Curve { secret_key, clients })
            }
        };
        let mut networks = networks;
        if networks.is_empty() && curve.is_none() {
            // Secure by default: nothing configured = this host only, and only on a loopback bind.
            if !is_loopback_bind(&rpc.bind) {
                return Err(AccessError::OpenBind { bind: rpc.bind.clone() });
            }
            networks = vec![Network::parse("127.0.0.0/8").expect("net"), Network::parse("::1/128").expect("net")];
        }
        let own = [rpc.bind.as_str(), advertised]
            .into_iter()
            .filter_map(parse_peer)
            .filter(|ip| !ip.is_unspecified())
            .map(Network::host)
            .collect();
        Ok(Some(Policy { networks, own, curve }))
    }

    /// An address-only policy (tests).
    #[cfg(test)]
    pub(crate) fn networks(networks: Vec<Network>) -> Policy {
        Policy { networks, own: Vec::new(), curve: None }
    }

    /// Whether the connection described by `req` may go on.
    ///
    /// # Errors
    /// The reason it may not.
    pub(crate) fn decide(&self, req: &ZapRequest) -> Result<(), Denied> {
        if req.domain != ZAP_DOMAIN {
            return Err(Denied::Domain(req.domain.clone()));
        }
        if !self.networks.is_empty() {
            let ip = parse_peer(&req.address).ok_or(Denied::Address(req.address.clone()))?;
            let allowed = self.networks.iter().chain(&self.own).any(|n| n.contains(ip));
            if !allowed {
                return Err(Denied::Address(ip.to_string()));
            }
        }
        match &self.curve {
            None if req.mechanism == "NULL" => Ok(()),
            None => Err(Denied::Mechanism(req.mechanism.clone())),
            Some(_) if req.mechanism != "CURVE" => Err(Denied::Mechanism(req.mechanism.clone())),
            Some(curve) => {
                let key = req.credentials.first().map(Vec::as_slice).unwrap_or_default();
                if curve.clients.is_empty() || curve.clients.iter().any(|k| k.as_slice() == key) {
                    Ok(())
                } else {
                    Err(Denied::Key(zmq::z85_encode(key).unwrap_or_else(|_| format!("{} bytes", key.len()))))
                }
            }
        }
    }
}

/// Counters of the handler.
#[derive(Debug, Default)]
pub(crate) struct AccessStats {
    /// Connections accepted.
    pub(crate) accepted: AtomicU64,
    /// Connections rejected.
    pub(crate) rejected: AtomicU64,
}

/// The running ZAP handler. Stops (and unbinds `inproc://zeromq.zap.01`) when dropped: drop it only after the
/// sockets it protects are closed.
pub(crate) struct AccessControl {
    policy: Arc<Policy>,
    #[cfg_attr(not(test), expect(dead_code, reason = "only the tests read the counters so far"))]
    stats: Arc<AccessStats>,
    stop: Arc<AtomicBool>,
    alive: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for AccessControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessControl").field("policy", &self.policy).finish()
    }
}

impl AccessControl {
    /// Binds the ZAP handler on `ctx` (once per context) and starts its thread.
    ///
    /// # Errors
    /// [`AccessError::Zmq`] (e.g. another handler is already bound in this context), [`AccessError::Thread`].
    pub(crate) fn start(ctx: &zmq::Context, policy: Policy) -> Result<AccessControl, AccessError> {
        let socket = ctx.socket(zmq::REP).map_err(zmq_err("socket(REP)"))?;
        socket.set_linger(0).map_err(zmq_err("set_linger"))?;
        socket.bind(ZAP_ENDPOINT).map_err(zmq_err("bind inproc://zeromq.zap.01"))?;
        let policy = Arc::new(policy);
        let stats = Arc::new(AccessStats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let alive = Arc::new(AtomicBool::new(true));
        let handler = Handler {
            socket,
            policy: policy.clone(),
            stats: stats.clone(),
            logged: HashMap::new(),
            _alive: Alive(alive.clone()),
        };
        let thread = std::thread::Builder::new()
            .name("lymph-rpc-zap".into())
            .spawn({
                let stop = stop.clone();
                move || handler.run(&stop)
            })
            .map_err(AccessError::Thread)?;
        info!(policy = ?policy, "RPC access control on (ZAP)");
        Ok(AccessControl { policy, stats, stop, alive, thread: Some(thread) })
    }

    /// Whether the handler still runs. When it is gone libzmq would let every connection in unchecked, so the
    /// node drops every request while this is false (fail closed).
    pub(crate) fn alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }

    /// Configures a socket before it binds: the ZAP domain (which makes libzmq consult the handler even for
    /// unauthenticated NULL connections), and with CURVE the server role and our secret key.
    ///
    /// # Errors
    /// [`AccessError::Zmq`].
    pub(crate) fn protect(&self, socket: &zmq::Socket) -> Result<(), AccessError> {
        socket.set_zap_domain(ZAP_DOMAIN).map_err(zmq_err("set_zap_domain"))?;
        if let Some(curve) = &self.policy.curve {
            socket.set_curve_server(true).map_err(zmq_err("set_curve_server"))?;
            socket.set_curve_secretkey(&curve.secret_key).map_err(zmq_err("set_curve_secretkey"))?;
        }
        Ok(())
    }

    /// Accepted and rejected connections so far.
    #[cfg(test)]
    pub(crate) fn stats(&self) -> &AccessStats {
        &self.stats
    }
}

impl super::node::Gatekeeper for Policy {
    fn start(&self, ctx: &zmq::Context) -> Result<Box<dyn super::node::Gate>, super::node::GateError> {
        Ok(Box::new(AccessControl::start(ctx, self.clone())?))
    }
}

impl super::node::Gate for AccessControl {
    fn protect(&self, socket: &zmq::Socket) -> Result<(), super::node::GateError> {
        Ok(AccessControl::protect(self, socket)?)
    }

    fn alive(&self) -> bool {
        AccessControl::alive(self)
    }
}

impl Drop for AccessControl {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct Handler {
    socket: zmq::Socket,
    policy: Arc<Policy>,
    stats: Arc<AccessStats>,
    /// When each rejected address was last logged.
    logged: HashMap<String, Instant>,
    /// Cleared when the handler stops, however it stops (a panic included).
    _alive: Alive,
}

struct Alive(Arc<AtomicBool>);

impl Drop for Alive {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

impl Handler {
    fn run(mut self, stop: &AtomicBool) {
        while !stop.load(Ordering::SeqCst) {
            let mut items = [self.socket.as_poll_item(zmq::POLLIN)];
            match zmq::poll(&mut items, POLL_MS) {
                Ok(_) => {}
                Err(zmq::Error::EINTR) => continue,
                Err(err) => {
                    // Keep the socket bound (see "Failing closed"); back off instead of spinning.
                    warn!(%err, "ZAP handler: poll failed");
                    std::thread::sleep(Duration::from_millis(POLL_MS.unsigned_abs()));
                    continue;
                }
            }
            if !items[0].is_readable() {
                continue;
            }
            let frames = match self.socket.recv_multipart(zmq::DONTWAIT) {
                Ok(frames) => frames,
                Err(zmq::Error::EAGAIN | zmq::Error::EINTR) => continue,
                Err(err) => {
                    warn!(%err, "ZAP handler: recv failed");
                    continue;
                }
            };
            let (id, verdict) = match ZapRequest::parse(&frames) {
                Ok(req) => {
                    // A decision that panics is a refusal, and the handler lives on (fail closed).
                    let verdict = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.policy.decide(&req)))
                        .unwrap_or(Err(Denied::Internal));
                    (req.request_id, verdict.map_err(|d| (d, req.address)))
                }
                Err((id, denied)) => (id, Err((denied, String::new()))),
            };
            let (status, text) = match &verdict {
                Ok(()) => {
                    self.stats.accepted.fetch_add(1, Ordering::Relaxed);
                    ("200", "OK".to_owned())
                }
                Err((denied, address)) => {
                    self.stats.rejected.fetch_add(1, Ordering::Relaxed);
                    self.log_rejection(address, denied);
                    (denied.status(), denied.to_string())
                }
            };
            let reply: [&[u8]; 6] = [ZAP_VERSION, &id, status.as_bytes(), text.as_bytes(), b"", b""];
            if let Err(err) = self.socket.send_multipart(reply, 0) {
                warn!(%err, "ZAP handler: reply not sent");
            }
        }
        debug!("ZAP handler stopped");
    }

    fn log_rejection(&mut self, address: &str, denied: &Denied) {
        let now = Instant::now();
        if self.logged.len() > REJECT_LOG_MAX {
            self.logged.clear();
        }
        let due = self.logged.get(address).is_none_or(|last| now.duration_since(*last) >= REJECT_LOG_EVERY);
        if due {
            self.logged.insert(address.to_owned(), now);
            warn!(peer = %address, reason = %denied, "RPC connection rejected (logged once a minute per address)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(address: &str, mechanism: &str, key: Option<&[u8]>) -> ZapRequest {
        ZapRequest {
            request_id: b"1".to_vec(),
            domain: ZAP_DOMAIN.into(),
            address: address.into(),
            mechanism: mechanism.into(),
            credentials: key.map(|k| vec![k.to_vec()]).unwrap_or_default(),
        }
    }

    fn rpc(allowed: &[&str]) -> RpcConfig {
        RpcConfig { allowed_clients: allowed.iter().map(|s| s.to_string()).collect(), ..RpcConfig::default() }
    }

    #[test]
    fn networks_match_v4_v6_and_mapped_addresses() {
        let lo = Network::parse("127.0.0.0/8").unwrap();
        assert!(lo.contains("127.1.2.3".parse().unwrap()));
        assert!(lo.contains("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!lo.contains("10.0.0.1".parse().unwrap()));
        assert!(!lo.contains("::1".parse().unwrap()));
        let v6 = Network::parse("fd00:31::/64").unwrap();
        assert!(v6.contains("fd00:31::2".parse().unwrap()));
        assert!(!v6.contains("fd00:32::2".parse().unwrap()));
        assert!(Network::parse("0.0.0.0/0").unwrap().contains("192.0.2.1".parse().unwrap()));
        assert!(Network::parse("::/0").unwrap().contains("2001:db8::1".parse().unwrap()));
        assert!(Network::parse("10.0.0.1").unwrap().contains("10.0.0.1".parse().unwrap()));
        assert!(!Network::parse("10.0.0.1").unwrap().contains("10.0.0.2".parse().unwrap()));
        assert_eq!(Network::parse("10.0.0.0/33"), None);
    }

    #[test]
    fn peer_addresses_in_every_spelling() {
        assert_eq!(parse_peer("10.0.0.2"), Some("10.0.0.2".parse().unwrap()));
        assert_eq!(parse_peer("[::1]"), Some("::1".parse().unwrap()));
        assert_eq!(parse_peer("fe80::1%veth0"), Some("fe80::1".parse().unwrap()));
        assert_eq!(parse_peer("::ffff:10.1.0.2"), Some("10.1.0.2".parse().unwrap()));
        assert_eq!(parse_peer("nonsense"), None);
    }

    #[test]
    fn without_allowlist_or_curve_only_loopback_and_only_on_a_loopback_bind() {
        let policy = Policy::from_config(&rpc(&[]), "127.0.0.1").unwrap().unwrap();
        assert_eq!(policy.decide(&req("127.0.0.1", "NULL", None)), Ok(()));
        assert_eq!(policy.decide(&req("::1", "NULL", None)), Ok(()));
        assert!(policy.decide(&req("10.0.0.2", "NULL", None)).is_err());
        for bind in ["0.0.0.0", "::", "10.0.0.1", "node.example"] {
            let config = RpcConfig { bind: bind.into(), ..rpc(&[]) };
            let err = Policy::from_config(&config, "10.0.0.1").unwrap_err();
            assert!(matches!(err, AccessError::OpenBind { .. }), "{bind}: {err}");
        }
        for bad in ["10.0.0.0/40", "10.0.0.0/+8", "10.0.0.0/", "::ffff:10.0.0.0/64", "10.0.0.0/ 8"] {
            assert!(
                matches!(Policy::from_config(&rpc(&[bad]), "127.0.0.1"), Err(AccessError::InvalidNetwork { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn ipv4_mapped_entries_keep_their_prefix() {
        let host = Network::parse("::ffff:10.0.0.5").unwrap();
        assert_eq!(host.to_string(), "10.0.0.5/32");
        assert!(host.contains("10.0.0.5".parse().unwrap()));
        assert!(host.contains("::ffff:10.0.0.5".parse().unwrap()));
        assert!(!host.contains("10.0.0.6".parse().unwrap()));
        assert!(!host.contains("192.168.1.1".parse().unwrap()));
        let net = Network::parse("::ffff:10.0.0.0/104").unwrap();
        assert_eq!(net.to_string(), "10.0.0.0/8");
        assert!(net.contains("10.200.0.1".parse().unwrap()) && !net.contains("11.0.0.1".parse().unwrap()));
        // Out-of-range prefixes built by hand never widen to everything nor panic.
        let odd = Network { addr: "10.0.0.5".parse().unwrap(), prefix: 128 };
        assert!(odd.contains("10.0.0.5".parse().unwrap()) && !odd.contains("10.0.0.6".parse().unwrap()));
    }

    #[test]
    fn the_allowlist_decides_and_own_addresses_are_always_allowed() {
        let mut config = rpc(&["10.1.0.0/16"]);
        config.bind = "0.0.0.0".into();
        let policy = Policy::from_config(&config, "192.0.2.7").unwrap().unwrap();
        assert_eq!(policy.decide(&req("10.1.2.3", "NULL", None)), Ok(()));
        assert_eq!(policy.decide(&req("192.0.2.7", "NULL", None)), Ok(()), "the advertised address");
        assert_eq!(policy.decide(&req("10.2.0.1", "NULL", None)), Err(Denied::Address("10.2.0.1".into())));
        assert_eq!(policy.decide(&req("127.0.0.1", "NULL", None)), Err(Denied::Address("127.0.0.1".into())));
        assert!(matches!(policy.decide(&req("garbage", "NULL", None)), Err(Denied::Address(_))));
        assert!(matches!(policy.decide(&req("10.1.2.3", "PLAIN", None)), Err(Denied::Mechanism(_))));
        let other = ZapRequest { domain: "global".into(), ..req("10.1.2.3", "NULL", None) };
        assert_eq!(policy.decide(&other), Err(Denied::Domain("global".into())));
        // The shipped default: loopback only, bound to loopback.
        let policy = Policy::from_config(&rpc(&["127.0.0.0/8", "::1"]), "127.0.0.1").unwrap().unwrap();
        assert_eq!(policy.decide(&req("127.0.0.1", "NULL", None)), Ok(()));
        assert_eq!(policy.decide(&req("::1", "NULL", None)), Ok(()));
        assert!(policy.decide(&req("10.0.0.2", "NULL", None)).is_err());
    }

    #[test]
    fn curve_keys_decide_when_configured() {
        let known = [7u8; KEY_LEN];
        let policy = Policy {
            networks: Vec::new(),
            own: Vec::new(),
            curve: Some(Curve { secret_key: [1; KEY_LEN], clients: vec![known] }),
        };
        assert_eq!(policy.decide(&req("10.9.9.9", "CURVE", Some(&known))), Ok(()));
        assert!(matches!(policy.decide(&req("10.9.9.9", "CURVE", Some(&[8; KEY_LEN]))), Err(Denied::Key(_))));
        assert!(matches!(policy.decide(&req("10.9.9.9", "CURVE", None)), Err(Denied::Key(_))));
        assert!(matches!(policy.decide(&req("10.9.9.9", "NULL", None)), Err(Denied::Mechanism(_))));
        let any = Policy { curve: Some(Curve { secret_key: [1; KEY_LEN], clients: Vec::new() }), ..policy.clone() };
        assert_eq!(any.decide(&req("10.9.9.9", "CURVE", Some(&[8; KEY_LEN]))), Ok(()));
        assert!(!format!("{policy:?}").contains("secret"), "{policy:?}");
    }

    #[test]
    fn zap_frames_parse_and_malformed_ones_are_refused() {
        let frames: Vec<Vec<u8>> = vec![
            b"1.0".to_vec(),
            b"42".to_vec(),
            ZAP_DOMAIN.into(),
            b"10.0.0.2".to_vec(),
            b"identity".to_vec(),
            b"CURVE".to_vec(),
            vec![9; KEY_LEN],
        ];
        let req = ZapRequest::parse(&frames).unwrap();
        assert_eq!(
            (req.request_id.as_slice(), req.address.as_str(), req.mechanism.as_str()),
            (&b"42"[..], "10.0.0.2", "CURVE")
        );
        assert_eq!(req.credentials, vec![vec![9; KEY_LEN]]);
        let (id, denied) = ZapRequest::parse(&frames[..4]).unwrap_err();
        assert_eq!((id.as_slice(), denied.status()), (&b"42"[..], "500"));
        let mut bad = frames.clone();
        bad[0] = b"2.0".to_vec();
        assert!(ZapRequest::parse(&bad).is_err());
    }

    #[test]
    fn secret_key_files_plain_or_zcert_and_never_world_readable() {
        use std::os::unix::fs::PermissionsExt;
        // A Z85 key from RFC 32's test vector alphabet: 32 bytes → 40 characters.
        let key = zmq::z85_encode(&[0x42; KEY_LEN]).unwrap();
        let dir = tempfile_dir();
        let plain = dir.join("plain.key");
        std::fs::write(&plain, format!("{key}\n")).unwrap();
        std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_secret_key(&plain).unwrap(), [0x42; KEY_LEN]);
        let zcert = dir.join("server.key_secret");
        std::fs::write(&zcert, format!("#   ZeroMQ CURVE **Secret** Certificate\ncurve\n    public-key = \"{key}\"\n    secret-key = \"{key}\"\n")).unwrap();
        std::fs::set_permissions(&zcert, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert_eq!(read_secret_key(&zcert).unwrap(), [0x42; KEY_LEN]);
        std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(read_secret_key(&plain), Err(AccessError::KeyFilePermissions { mode: 0o644, .. })));
        let short = dir.join("short.key");
        std::fs::write(&short, "abc").unwrap();
        std::fs::set_permissions(&short, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(read_secret_key(&short), Err(AccessError::InvalidKey { .. })));
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn tempfile_dir() -> PathBuf {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "chaos-access-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A ROUTER on loopback, protected by `policy`; a DEALER client connects and sends one message. Returns whether
    /// the server received it.
    fn delivered(policy: Policy) -> (bool, u64, u64) {
        let ctx = zmq::Context::new();
        let control = AccessControl::start(&ctx, policy).unwrap();
        let server = ctx.socket(zmq::ROUTER).unwrap();
        control.protect(&server).unwrap();
        server.set_rcvtimeo(1500).unwrap();
        server.set_linger(0).unwrap();
        server.bind("tcp://127.0.0.1:*").unwrap();
        let endpoint = server.get_last_endpoint().unwrap().unwrap();
        let client_ctx = zmq::Context::new();
        let client = client_ctx.socket(zmq::DEALER).unwrap();
        client.set_linger(0).unwrap();
        client.connect(&endpoint).unwrap();
        client.send("hello", 0).unwrap();
        let got = server.recv_multipart(0).is_ok();
        drop(client);
        drop(server);
        let stats =
            (control.stats().accepted.load(Ordering::Relaxed), control.stats().rejected.load(Ordering::Relaxed));
        drop(control);
        (got, stats.0, stats.1)
    }

    #[test]
    fn a_real_socket_accepts_allowed_and_drops_other_peers() {
        let (got, accepted, rejected) = delivered(Policy::networks(vec![Network::parse("127.0.0.0/8").unwrap()]));
        assert!(
            got && accepted >= 1 && rejected == 0,
            "allowed peer: got={got} accepted={accepted} rejected={rejected}"
        );
        let (got, accepted, rejected) = delivered(Policy::networks(vec![Network::parse("10.0.0.0/8").unwrap()]));
        assert!(
            !got && accepted == 0 && rejected >= 1,
            "refused peer: got={got} accepted={accepted} rejected={rejected}"
        );
    }

    #[test]
    fn a_second_handler_in_the_same_context_is_refused() {
        let ctx = zmq::Context::new();
        let _first = AccessControl::start(&ctx, Policy::networks(Vec::new())).unwrap();
        assert!(matches!(AccessControl::start(&ctx, Policy::networks(Vec::new())), Err(AccessError::Zmq { .. })));
    }
}
