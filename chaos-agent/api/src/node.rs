//! A lymph RPC node: the ROUTER socket pair, the I/O thread, request dispatch and the client side.
//!
//! # Layout
//!
//! ```text
//!             ┌──────────────── I/O thread (owns both zmq sockets) ────────────────┐
//! peers ────▶ │ recv ROUTER (bound, identity = our endpoint)                        │
//!             │   lymph.ping ─────────────▶ answered right here (never waits)      │
//!             │   other REQ ──────────────▶ requests channel ──▶ tokio dispatcher  │
//!             │   REP/ACK/NACK/ERROR ─────▶ pending[request id] (client side)       │
//! peers ◀──── │ send ROUTER (connects out, identity = our endpoint, MANDATORY)      │
//!             │   ◀── outgoing queue + eventfd wake-up ◀── replies and requests     │
//!             └─────────────────────────────────────────────────────────────────────┘
//! ```
//!
//! lymph's asymmetric pair (`lymph/core/rpc.py`): both sockets carry our advertised endpoint as routing id, peers
//! answer by connecting back to it. A ROUTER drops messages for peers whose handshake has not finished; with
//! `ROUTER_MANDATORY` we get `EHOSTUNREACH` instead and retry until the message's deadline. Our send socket names
//! each of its connections itself (`ZMQ_CONNECT_ROUTING_ID`): what a peer announces never decides where a message
//! to another endpoint goes.

use std::{
    collections::HashMap,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc as std_mpsc,
    },
    time::{Duration, Instant},
};

use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::{
    error::{ClientError, ErrorCode, RpcError},
    value::{self, Value},
    wire::{self, FrameError, Headers, Incoming, Kind},
};

/// Bodies larger than this are refused with an ERROR (a chaos request is a few hundred bytes).
pub const MAX_BODY: usize = 1 << 20;

/// An error of a [`Gatekeeper`] or [`Gate`], kept with its source.
pub type GateError = Box<dyn std::error::Error + Send + Sync>;

/// Who may connect to a node's bound socket: a policy that starts a [`Gate`] in the node's ZeroMQ context (the
/// agent's ZAP handler checking peer addresses and CURVE keys). Client-only nodes have none.
pub trait Gatekeeper: Send + Sync + std::fmt::Debug {
    /// Starts checking connections in `ctx`, before the bound socket exists (the first handshake must find it).
    ///
    /// # Errors
    /// When the check cannot run (e.g. another handler is already bound in this context).
    fn start(&self, ctx: &zmq::Context) -> Result<Box<dyn Gate>, GateError>;
}

/// A running connection check, owned by the node's I/O thread and dropped after the sockets it protects.
pub trait Gate: Send {
    /// Configures a socket before it binds (ZAP domain, CURVE server keys).
    ///
    /// # Errors
    /// When ZeroMQ refuses an option.
    fn protect(&self, socket: &zmq::Socket) -> Result<(), GateError>;
    /// Whether the check still runs; while it does not, the node drops every request (fail closed).
    fn alive(&self) -> bool;
}

/// Largest message zmq accepts before dropping the connection (a DoS guard; oversize bodies below this get a
/// clear ERROR from the dispatcher instead).
const ZMQ_MAX_MESSAGE: i64 = 64 << 20;
/// How long a reply may wait for the peer's handshake before it is dropped.
const REPLY_DEADLINE: Duration = Duration::from_secs(5);
/// Connections to peers unused for this long are closed (lymph clients are short-lived processes).
const IDLE_PEER: Duration = Duration::from_secs(120);
/// Poll timeout while nothing needs retrying: bounds how long shutdown takes.
const IDLE_POLL_MS: i64 = 100;
/// Poll timeout while messages wait for a handshake.
const RETRY_POLL_MS: i64 = 2;
/// Requests queued for the dispatcher before new ones are refused with an ERROR.
pub const REQUEST_QUEUE: usize = 4096;

/// How to bind the node.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// Address to bind (`0.0.0.0` for all).
    pub bind_ip: String,
    /// Port to bind; `None` picks a free one.
    pub port: Option<u16>,
    /// Address peers use to reach us (goes into the endpoint and routing id); defaults to `bind_ip`.
    pub advertise_ip: Option<String>,
    /// Who may connect to the bound socket (`rpc.allowed_clients`, CURVE keys); `None` = anyone who can reach it
    /// (client-only nodes; the agent always sets a policy).
    pub access: Option<std::sync::Arc<dyn Gatekeeper>>,
}

impl NodeConfig {
    /// A client-only node on loopback with a random port.
    pub fn loopback() -> NodeConfig {
        NodeConfig { bind_ip: "127.0.0.1".into(), port: None, advertise_ip: None, access: None }
    }
}

/// Why the node could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// zmq refused a socket operation.
    #[error("zmq {op} failed: {source}")]
    Zmq {
        /// What we were doing.
        op: String,
        /// zmq's error.
        source: zmq::Error,
    },
    /// No usable port.
    #[error("could not bind {endpoint}: {source}")]
    Bind {
        /// The endpoint.
        endpoint: String,
        /// zmq's error.
        source: zmq::Error,
    },
    /// Access control could not be set up.
    #[error(transparent)]
    Access(GateError),
    /// eventfd or thread creation failed.
    #[error("{op}: {source}")]
    Os {
        /// What failed.
        op: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
}

fn zmq_err(op: impl Into<String>) -> impl FnOnce(zmq::Error) -> NodeError {
    let op = op.into();
    move |source| NodeError::Zmq { op, source }
}

/// A request handed to the dispatcher.
#[derive(Debug)]
pub struct Request {
    /// The envelope (source, id, subject, raw headers and body).
    pub msg: Incoming,
    /// When the I/O thread received it.
    pub received: Instant,
}

/// Outcome of handling a request, turned into a reply by [`RpcNode::reply`].
#[derive(Debug)]
pub enum Outcome {
    /// REP with this msgpack body.
    Reply(Vec<u8>),
    /// An error (ERROR or NACK, see [`RpcError`]).
    Failed(RpcError),
}

struct Outgoing {
    dest: String,
    frames: [Vec<u8>; 5],
    deadline: Instant,
}

/// Counters the node keeps (exposed by `lymph.get_metrics` and the Prometheus endpoint).
#[derive(Default, Debug)]
pub struct NodeStats {
    /// Requests received (all methods, pings included).
    pub requests: AtomicU64,
    /// Pings answered.
    pub pings: AtomicU64,
    /// Messages dropped because their envelope was malformed.
    pub malformed: AtomicU64,
    /// Replies dropped because the peer never completed its handshake.
    pub undeliverable: AtomicU64,
    /// Requests refused because the dispatcher queue was full.
    pub overloaded: AtomicU64,
}

struct Shared {
    endpoint: String,
    identity: String,
    out_tx: Mutex<std_mpsc::Sender<Outgoing>>,
    wake: OwnedFd,
    pending: Mutex<HashMap<String, oneshot::Sender<Incoming>>>,
    stats: NodeStats,
    stop: AtomicBool,
}

impl Shared {
    fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writing 8 bytes from a valid u64 to our eventfd.
        let _ = unsafe { libc::write(self.wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    fn queue(&self, out: Outgoing) {
        if self.out_tx.lock().expect("poisoned").send(out).is_ok() {
            self.wake();
        }
    }

    fn reply(&self, req: &Incoming, outcome: Outcome) {
        let (kind, body) = match outcome {
            Outcome::Reply(body) => (Kind::Rep, body),
            Outcome::Failed(RpcError::Nack { .. }) => (Kind::Nack, value::encode(&Value::Nil)),
            Outcome::Failed(RpcError::Error { type_name, message }) => {
                (Kind::Error, wire::error_body(&type_name, &message))
            }
        };
        let headers = Headers { trace_id: req.headers().ok().and_then(|h| h.trace_id), version: None };
        self.queue(Outgoing {
            dest: req.source.clone(),
            frames: wire::frames(&wire::new_id(), kind, &req.id, &headers, body),
            deadline: Instant::now() + REPLY_DEADLINE,
        });
    }
}

/// Stops and joins the I/O thread when the last [`RpcNode`] clone goes away.
struct ThreadGuard {
    shared: Arc<Shared>,
    handle: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl ThreadGuard {
    fn stop(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.wake();
        let handle = self.handle.lock().expect("poisoned").take();
        if let Some(handle) = handle
            && handle.thread().id() != std::thread::current().id()
        {
            let _ = handle.join();
        }
    }
}

impl Drop for ThreadGuard {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A running lymph RPC node. Cheap to clone; the I/O thread stops when [`RpcNode::shutdown`] is called or the last
/// clone is dropped.
#[derive(Clone)]
pub struct RpcNode {
    shared: Arc<Shared>,
    guard: Arc<ThreadGuard>,
}

impl std::fmt::Debug for RpcNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcNode").field("endpoint", &self.shared.endpoint).finish()
    }
}

/// lymph's `hash_id(*bits)`: md5 of the Python repr of the tuple of arguments (`lymph/utils/__init__.py`).
pub fn hash_id(bits: &[Option<&str>]) -> String {
    let parts: Vec<String> = bits
        .iter()
        .map(|b| match b {
            Some(s) => format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'")),
            None => "None".into(),
        })
        .collect();
    let repr = if parts.len() == 1 { format!("({},)", parts[0]) } else { format!("({})", parts.join(", ")) };
    format!("{:x}", md5::compute(repr.as_bytes()))
}

impl RpcNode {
    /// Binds the sockets and starts the I/O thread. Requests (other than `lymph.ping`) go to `requests`; a node
    /// without one answers them with NACK (a pure client).
    ///
    /// # Errors
    /// [`NodeError`] when zmq cannot bind or configure the sockets.
    pub fn start(config: &NodeConfig, requests: Option<mpsc::Sender<Request>>) -> Result<RpcNode, NodeError> {
        let ctx = zmq::Context::new();
        let advertise = config.advertise_ip.clone().unwrap_or_else(|| config.bind_ip.clone());
        // Before the recv socket binds: the ZAP handler must answer the first handshake, and outlive the socket.
        let access = config.access.as_ref().map(|policy| policy.start(&ctx)).transpose().map_err(NodeError::Access)?;
        let (recv, endpoint) = bind_recv(&ctx, &config.bind_ip, &advertise, config.port, access.as_deref())?;
        // Connections are counted through the socket's monitor, and the ones above the bound are shut down.
        static MONITORS: AtomicU64 = AtomicU64::new(0);
        let monitor_endpoint = format!("inproc://lymph-rpc-monitor-{}", MONITORS.fetch_add(1, Ordering::Relaxed));
        let events = zmq::SocketEvent::ACCEPTED.to_raw()
            | zmq::SocketEvent::DISCONNECTED.to_raw()
            | zmq::SocketEvent::CLOSED.to_raw();
        recv.monitor(&monitor_endpoint, i32::from(events)).map_err(zmq_err("monitor"))?;
        let monitor = ctx.socket(zmq::PAIR).map_err(zmq_err("socket(PAIR)"))?;
        monitor.set_linger(0).map_err(zmq_err("set_linger"))?;
        monitor.connect(&monitor_endpoint).map_err(zmq_err("connect monitor"))?;
        let send = ctx.socket(zmq::ROUTER).map_err(zmq_err("socket(ROUTER)"))?;
        send.set_identity(endpoint.as_bytes()).map_err(zmq_err("set_identity"))?;
        send.set_router_mandatory(true).map_err(zmq_err("set_router_mandatory"))?;
        send.set_linger(0).map_err(zmq_err("set_linger"))?;
        // SAFETY: eventfd has no memory preconditions; the fd is owned right away.
        let raw = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if raw < 0 {
            return Err(NodeError::Os { op: "eventfd", source: std::io::Error::last_os_error() });
        }
        // SAFETY: `raw` is a fresh fd we own.
        let wake = unsafe { OwnedFd::from_raw_fd(raw) };
        let (out_tx, out_rx) = std_mpsc::channel();
        let shared = Arc::new(Shared {
            identity: hash_id(&[Some(&endpoint)]),
            endpoint,
            out_tx: Mutex::new(out_tx),
            wake,
            pending: Mutex::new(HashMap::new()),
            stats: NodeStats::default(),
            stop: AtomicBool::new(false),
        });
        let io = IoThread {
            shared: shared.clone(),
            recv,
            send,
            out_rx,
            requests,
            peers: HashMap::new(),
            next_route: 0,
            retry: Vec::new(),
            monitor,
            connections: std::collections::HashSet::new(),
            local_addresses: local_addresses(),
            _access: access,
        };
        let thread = std::thread::Builder::new()
            .name("lymph-rpc-io".into())
            .spawn(move || io.run(ctx))
            .map_err(|source| NodeError::Os { op: "spawning the RPC I/O thread", source })?;
        info!(endpoint = %shared.endpoint, "lymph RPC node listening");
        let guard = Arc::new(ThreadGuard { shared: shared.clone(), handle: Mutex::new(Some(thread)) });
        Ok(RpcNode { shared, guard })
    }

    /// Our advertised endpoint, e.g. `tcp://127.0.0.1:4575` (also our routing id).
    pub fn endpoint(&self) -> &str {
        &self.shared.endpoint
    }

    /// lymph's container identity for this endpoint (`hash_id(endpoint)`).
    pub fn identity(&self) -> &str {
        &self.shared.identity
    }

    /// The node's counters.
    pub fn stats(&self) -> &NodeStats {
        &self.shared.stats
    }

    /// Sends the reply for `req`.
    pub fn reply(&self, req: &Incoming, outcome: Outcome) {
        self.shared.reply(req, outcome);
    }

    /// Sends a request to `endpoint` and waits for its reply.
    ///
    /// # Errors
    /// [`ClientError::Nack`], [`ClientError::Remote`] for ERROR replies, [`ClientError::Timeout`].
    pub async fn request(
        &self,
        endpoint: &str,
        subject: &str,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, ClientError> {
        let id = wire::new_id();
        let (tx, rx) = oneshot::channel();
        self.shared.pending.lock().expect("poisoned").insert(id.clone(), tx);
        let headers = Headers { trace_id: Some(wire::new_id()), version: None };
        self.shared.queue(Outgoing {
            dest: endpoint.to_owned(),
            frames: wire::frames(&id, Kind::Req, subject, &headers, body),
            deadline: Instant::now() + timeout,
        });
        let reply = tokio::time::timeout(timeout, rx).await;
        self.shared.pending.lock().expect("poisoned").remove(&id);
        let timeout_err =
            || ClientError::Timeout { subject: subject.to_owned(), endpoint: endpoint.to_owned(), after: timeout };
        let reply = match reply {
            Ok(Ok(reply)) => reply,
            Ok(Err(_)) | Err(_) => return Err(timeout_err()),
        };
        match reply.kind {
            Kind::Rep | Kind::Ack => Ok(reply.body),
            Kind::Nack => Err(ClientError::Nack { subject: subject.to_owned(), endpoint: endpoint.to_owned() }),
            Kind::Error => {
                let (type_name, message) = match value::decode(&reply.body) {
                    Ok(Value::Map(entries)) => {
                        let get = |key: &str| {
                            entries.iter().find(|(k, _)| k.as_str() == Some(key)).map(|(_, v)| match v {
                                Value::Str(s) => s.clone(),
                                other => other.to_string(),
                            })
                        };
                        (get("type").unwrap_or_else(|| "Exception".into()), get("message").unwrap_or_default())
                    }
                    _ => ("Exception".into(), String::new()),
                };
                Err(ClientError::Remote { type_name, message })
            }
            Kind::Req => Err(timeout_err()),
        }
    }

    /// Stops the I/O thread and closes the sockets.
    pub fn shutdown(&self) {
        self.guard.stop();
    }
}

/// Most connections the bound socket holds at once.
const MAX_CONNECTIONS: usize = 1000;
/// Longest ZeroMQ handshake accepted on the bound socket (ms).
const HANDSHAKE_IVL_MS: i32 = 5000;

fn bind_recv(
    ctx: &zmq::Context,
    bind_ip: &str,
    advertise_ip: &str,
    port: Option<u16>,
    access: Option<&dyn Gate>,
) -> Result<(zmq::Socket, String), NodeError> {
    let host = |ip: &str| if ip.contains(':') { format!("[{ip}]") } else { ip.to_owned() };
    let attempts = if port.is_some() { 1 } else { 5 };
    let mut last_err = None;
    for _ in 0..attempts {
        let port = match port {
            Some(p) => p,
            None => free_port(bind_ip),
        };
        let endpoint = format!("tcp://{}:{port}", host(advertise_ip));
        let recv = ctx.socket(zmq::ROUTER).map_err(zmq_err("socket(ROUTER)"))?;
        recv.set_identity(endpoint.as_bytes()).map_err(zmq_err("set_identity"))?;
        recv.set_linger(0).map_err(zmq_err("set_linger"))?;
        recv.set_maxmsgsize(ZMQ_MAX_MESSAGE).map_err(zmq_err("set_maxmsgsize"))?;
        // A peer that connects and never completes the handshake is dropped after this long.
        recv.set_handshake_ivl(HANDSHAKE_IVL_MS).map_err(zmq_err("set_handshake_ivl"))?;
        if bind_ip.contains(':') {
            recv.set_ipv6(true).map_err(zmq_err("set_ipv6"))?;
        }
        if let Some(access) = access {
            access.protect(&recv).map_err(NodeError::Access)?;
        }
        let bind = format!("tcp://{}:{port}", host(bind_ip));
        match recv.bind(&bind) {
            Ok(()) => return Ok((recv, endpoint)),
            Err(source) => last_err = Some(NodeError::Bind { endpoint: bind, source }),
        }
    }
    Err(last_err.expect("at least one attempt"))
}

/// A port that was free a moment ago (lymph picks random ports the same way and retries on EADDRINUSE).
fn free_port(ip: &str) -> u16 {
    std::net::TcpListener::bind((ip, 0)).and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(0)
}

struct IoThread {
    shared: Arc<Shared>,
    recv: zmq::Socket,
    send: zmq::Socket,
    out_rx: std_mpsc::Receiver<Outgoing>,
    requests: Option<mpsc::Sender<Request>>,
    /// Endpoints our send socket is connected to: when we last sent there, and the routing id we gave that
    /// connection.
    peers: HashMap<String, Peer>,
    /// Numbers the routing ids of our outgoing connections.
    next_route: u64,
    retry: Vec<Outgoing>,
    /// Events of `recv` (connections accepted and closed).
    monitor: zmq::Socket,
    /// Descriptors of the connections `recv` holds now.
    connections: std::collections::HashSet<i32>,
    /// This host's addresses (refreshed with each idle sweep), for [`reply_endpoint_allowed`].
    local_addresses: std::collections::HashSet<std::net::IpAddr>,
    /// The ZAP handler: dropped with the rest of `self` at the end of [`IoThread::run`], after the sockets it
    /// protects are closed (libzmq skips authentication when no handler is bound).
    _access: Option<Box<dyn Gate>>,
}

impl IoThread {
    fn run(mut self, ctx: zmq::Context) {
        let mut last_sweep = Instant::now();
        while !self.shared.stop.load(Ordering::SeqCst) {
            let timeout = if self.retry.is_empty() { IDLE_POLL_MS } else { RETRY_POLL_MS };
            let (readable, woken, monitored) = {
                let mut items = [
                    self.recv.as_poll_item(zmq::POLLIN),
                    zmq::PollItem::from_fd(self.shared.wake.as_raw_fd(), zmq::POLLIN),
                    self.monitor.as_poll_item(zmq::POLLIN),
                ];
                if let Err(err) = zmq::poll(&mut items, timeout) {
                    if err != zmq::Error::EINTR {
                        warn!(%err, "zmq poll failed");
                    }
                    continue;
                }
                (items[0].is_readable(), items[1].is_readable(), items[2].is_readable())
            };
            if monitored {
                self.count_connections();
            }
            if readable {
                self.receive_all();
            }
            if woken {
                let mut buf = [0u8; 8];
                // SAFETY: reading 8 bytes into a valid buffer from our eventfd.
                let _ = unsafe { libc::read(self.shared.wake.as_raw_fd(), buf.as_mut_ptr().cast(), 8) };
            }
            while let Ok(out) = self.out_rx.try_recv() {
                self.send_or_queue(out);
            }
            if !self.retry.is_empty() {
                for out in std::mem::take(&mut self.retry) {
                    self.send_or_queue(out);
                }
            }
            if last_sweep.elapsed() > Duration::from_secs(10) {
                self.close_idle_peers();
                last_sweep = Instant::now();
            }
        }
        drop(self.monitor);
        drop(self.recv);
        drop(self.send);
        drop(ctx);
        debug!("lymph RPC I/O thread stopped");
    }

    fn receive_all(&mut self) {
        // Bounded so a flood cannot starve the outgoing queue.
        for _ in 0..1024 {
            match self.recv_with_peer() {
                // The access check is gone: libzmq would let anyone in unchecked, so nobody's request is handled.
                Ok(_) if self._access.as_ref().is_some_and(|a| !a.alive()) => {
                    self.shared.stats.malformed.fetch_add(1, Ordering::Relaxed);
                    tracing::error!("RPC access control stopped: request dropped (restart the agent)");
                }
                Ok((frames, peer)) => {
                    // Replies go to the routing id the peer chose: only to the peer's own address, over tcp.
                    let is_request = frames.get(2).is_some_and(|k| k.as_slice() == Kind::Req.as_bytes());
                    if is_request
                        && let Err(why) = reply_endpoint_allowed(
                            frames.first().map_or(&[][..], Vec::as_slice),
                            peer.as_deref(),
                            &self.local_addresses,
                        )
                    {
                        self.shared.stats.malformed.fetch_add(1, Ordering::Relaxed);
                        warn!(peer = ?peer, %why, "request dropped: its reply endpoint is not the peer's");
                        continue;
                    }
                    self.handle(frames)
                }
                Err(zmq::Error::EAGAIN) => return,
                Err(err) => {
                    warn!(%err, "zmq recv failed");
                    return;
                }
            }
        }
    }

    /// Follows the monitor: connections above [`MAX_CONNECTIONS`] are shut down as they come (zmq then closes
    /// them), so idle or slow peers cannot take every descriptor.
    fn count_connections(&mut self) {
        for _ in 0..4096 {
            let Ok(frames) = self.monitor.recv_multipart(zmq::DONTWAIT) else { return };
            let Some(head) = frames.first().filter(|f| f.len() >= 6) else { continue };
            let event = u16::from_ne_bytes([head[0], head[1]]);
            let fd = i32::from_ne_bytes([head[2], head[3], head[4], head[5]]);
            if event == zmq::SocketEvent::ACCEPTED.to_raw() {
                if self.connections.len() >= MAX_CONNECTIONS {
                    // SAFETY: shutting down (not closing) a socket zmq owns: zmq sees the end and closes it itself.
                    unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
                    self.shared.stats.overloaded.fetch_add(1, Ordering::Relaxed);
                    debug!(fd, "RPC connection refused: {MAX_CONNECTIONS} connections open");
                } else {
                    self.connections.insert(fd);
                }
            } else {
                self.connections.remove(&fd);
            }
        }
    }

    /// One message and the peer's address (`Peer-Address` metadata).
    fn recv_with_peer(&mut self) -> Result<(Vec<Vec<u8>>, Option<String>), zmq::Error> {
        // The first frame is the routing id the ROUTER socket prepends (no metadata): the peer's address comes
        // with the frames it sent.
        let first = self.recv.recv_bytes(zmq::DONTWAIT)?;
        let mut frames = vec![first];
        let mut peer = None;
        while self.recv.get_rcvmore()? {
            let mut part = self.recv.recv_msg(0)?;
            if peer.is_none() {
                peer = part.gets("Peer-Address").map(str::to_owned);
            }
            frames.push(part.to_vec());
        }
        Ok((frames, peer))
    }

    fn handle(&mut self, frames: Vec<Vec<u8>>) {
        let msg = match Incoming::from_frames(frames) {
            Ok(msg) => msg,
            Err(err) => {
                self.shared.stats.malformed.fetch_add(1, Ordering::Relaxed);
                log_malformed(&err);
                return;
            }
        };
        match msg.kind {
            Kind::Req => {
                self.shared.stats.requests.fetch_add(1, Ordering::Relaxed);
                if msg.subject == "lymph.ping" {
                    self.answer_ping(&msg);
                    return;
                }
                let Some(requests) = &self.requests else {
                    self.shared
                        .reply(&msg, Outcome::Failed(RpcError::Nack { reason: "this node serves no methods".into() }));
                    return;
                };
                match requests.try_send(Request { msg, received: Instant::now() }) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(r)) => {
                        self.shared.stats.overloaded.fetch_add(1, Ordering::Relaxed);
                        self.shared.reply(
                            &r.msg,
                            Outcome::Failed(RpcError::error(
                                ErrorCode::Overloaded,
                                "the agent is busy: too many requests queued; retry later",
                            )),
                        );
                    }
                    // The server stopped taking requests: the agent is shutting down.
                    Err(mpsc::error::TrySendError::Closed(r)) => {
                        self.shared.reply(
                            &r.msg,
                            Outcome::Failed(RpcError::error(
                                ErrorCode::ShuttingDown,
                                "the agent is shutting down; nothing was done",
                            )),
                        );
                    }
                }
            }
            _ => {
                let waiter = self.shared.pending.lock().expect("poisoned").remove(&msg.subject);
                match waiter {
                    Some(tx) => {
                        let _ = tx.send(msg);
                    }
                    None => {
                        debug!(subject = %msg.subject, source = %msg.source, "reply to an unknown or expired request dropped")
                    }
                }
            }
        }
    }

    /// `lymph.ping(payload)` returns the payload (`lymph/core/interfaces.py`); answered on the I/O thread so a
    /// slow handler can never delay a heartbeat.
    fn answer_ping(&mut self, msg: &Incoming) {
        self.shared.stats.pings.fetch_add(1, Ordering::Relaxed);
        // The echo is as large as the request: bounded like every other body.
        if msg.body.len() > MAX_BODY {
            self.shared.reply(
                msg,
                Outcome::Failed(RpcError::error(
                    ErrorCode::BadRequest,
                    format!("request body is {} bytes; the agent accepts at most {}", msg.body.len(), MAX_BODY),
                )),
            );
            return;
        }
        let payload = match value::decode(&msg.body) {
            Ok(Value::Map(entries)) => {
                entries.into_iter().find(|(k, _)| k.as_str() == Some("payload")).map(|(_, v)| v).unwrap_or(Value::Nil)
            }
            _ => Value::Nil,
        };
        let headers = Headers { trace_id: msg.headers().ok().and_then(|h| h.trace_id), version: None };
        let out = Outgoing {
            dest: msg.source.clone(),
            frames: wire::frames(&wire::new_id(), Kind::Rep, &msg.id, &headers, value::encode(&payload)),
            deadline: Instant::now() + REPLY_DEADLINE,
        };
        self.send_or_queue(out);
    }

    fn send_or_queue(&mut self, out: Outgoing) {
        let route = match self.peers.get_mut(&out.dest) {
            Some(peer) => {
                peer.last = Instant::now();
                peer.route.clone()
            }
            None => {
                // The connection's routing id is ours to choose (ZMQ_CONNECT_ROUTING_ID), never the one the peer
                // announces: a local client whose reply socket announced another client's endpoint would
                // otherwise own that routing id here, and receive that client's replies.
                self.next_route += 1;
                let route = format!("{}|{}", self.next_route, out.dest).into_bytes();
                if let Err(err) =
                    set_connect_routing_id(&mut self.send, &route).and_then(|()| self.send.connect(&out.dest))
                {
                    warn!(dest = %out.dest, %err, "cannot connect to peer; message dropped");
                    self.shared.stats.undeliverable.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                self.peers.insert(out.dest.clone(), Peer { last: Instant::now(), route: route.clone() });
                route
            }
        };
        let parts = std::iter::once(route).chain(out.frames.iter().cloned());
        match self.send.send_multipart(parts, zmq::DONTWAIT) {
            Ok(()) => {}
            Err(zmq::Error::EHOSTUNREACH | zmq::Error::EAGAIN) if Instant::now() < out.deadline => self.retry.push(out),
            Err(err) => {
                self.shared.stats.undeliverable.fetch_add(1, Ordering::Relaxed);
                debug!(dest = %out.dest, %err, "message not delivered");
            }
        }
    }

    fn close_idle_peers(&mut self) {
        self.local_addresses = local_addresses();
        let now = Instant::now();
        let waiting: Vec<&str> = self.retry.iter().map(|o| o.dest.as_str()).collect();
        let idle: Vec<String> = self
            .peers
            .iter()
            .filter(|(dest, peer)| now.duration_since(peer.last) > IDLE_PEER && !waiting.contains(&dest.as_str()))
            .map(|(dest, _)| dest.clone())
            .collect();
        for dest in idle {
            let _ = self.send.disconnect(&dest);
            self.peers.remove(&dest);
        }
    }
}

/// An endpoint our send socket is connected to.
struct Peer {
    /// When we last sent there.
    last: Instant,
    /// The routing id we gave the connection.
    route: Vec<u8>,
}

/// `ZMQ_CONNECT_ROUTING_ID` (not wrapped by the zmq crate): the routing id of the socket's next `connect`.
fn set_connect_routing_id(socket: &mut zmq::Socket, id: &[u8]) -> Result<(), zmq::Error> {
    const ZMQ_CONNECT_ROUTING_ID: libc::c_int = 61;
    unsafe extern "C" {
        fn zmq_setsockopt(
            socket: *mut libc::c_void,
            option: libc::c_int,
            value: *const libc::c_void,
            len: libc::size_t,
        ) -> libc::c_int;
        fn zmq_errno() -> libc::c_int;
    }
    // SAFETY: a live socket's handle, and a buffer with its real length (libzmq copies it).
    let rc = unsafe { zmq_setsockopt(socket.as_mut_ptr(), ZMQ_CONNECT_ROUTING_ID, id.as_ptr().cast(), id.len()) };
    if rc == 0 {
        Ok(())
    } else {
        // SAFETY: reads libzmq's thread-local error number.
        Err(zmq::Error::from_raw(unsafe { zmq_errno() }))
    }
}

/// Whether the agent may connect to `source` (the routing id a peer chose, where its replies go): a `tcp://`
/// endpoint on the peer's own address, or, for a peer on this host, on any address of this host. A peer is on this
/// host when its address is loopback or one of this host's: a TCP connection from outside cannot complete its
/// handshake with one of our own addresses as its source (the answers go to us).
fn reply_endpoint_allowed(
    source: &[u8],
    peer: Option<&str>,
    local: &std::collections::HashSet<std::net::IpAddr>,
) -> Result<(), String> {
    let source = std::str::from_utf8(source).map_err(|_| "not UTF-8".to_owned())?;
    let rest = source.strip_prefix("tcp://").ok_or_else(|| format!("{source:.64} is not a tcp:// endpoint"))?;
    let (host, port) = rest.rsplit_once(':').ok_or_else(|| format!("{source:.64} has no port"))?;
    port.parse::<u16>().map_err(|_| format!("{source:.64} has no valid port"))?;
    let host: std::net::IpAddr = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .map_err(|_| format!("{source:.64} names no IP address"))?;
    let peer: std::net::IpAddr = peer
        .map(|p| p.trim_start_matches('[').trim_end_matches(']'))
        .and_then(|p| p.split('%').next())
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| "the peer's address is unknown".to_owned())?;
    let (host, peer) = (host.to_canonical(), peer.to_canonical());
    // A peer on this host may name any address of this host (a client that dialled our host address from here
    // may well have bound its reply socket to loopback).
    let here = |ip: &std::net::IpAddr| ip.is_loopback() || local.contains(ip);
    if host == peer || (here(&peer) && here(&host)) {
        Ok(())
    } else {
        Err(format!("{source:.64} is not on the peer's address {peer}"))
    }
}

/// Addresses of this network namespace's interfaces (loopback always included).
pub fn local_addresses() -> std::collections::HashSet<std::net::IpAddr> {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    let mut out = std::collections::HashSet::from([IpAddr::V4(Ipv4Addr::LOCALHOST), IpAddr::V6(Ipv6Addr::LOCALHOST)]);
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return out;
    }
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, alive until freeifaddrs.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr points to a sockaddr whose family says which struct it is.
            match i32::from(unsafe { (*ifa.ifa_addr).sa_family }) {
                libc::AF_INET => {
                    // SAFETY: an AF_INET address is a sockaddr_in.
                    let sin = unsafe { &*ifa.ifa_addr.cast::<libc::sockaddr_in>() };
                    out.insert(IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))));
                }
                libc::AF_INET6 => {
                    // SAFETY: an AF_INET6 address is a sockaddr_in6.
                    let sin6 = unsafe { &*ifa.ifa_addr.cast::<libc::sockaddr_in6>() };
                    out.insert(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)));
                }
                _ => {}
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: frees the list getifaddrs allocated, once.
    unsafe { libc::freeifaddrs(head) };
    out
}

fn log_malformed(err: &FrameError) {
    warn!(%err, "malformed lymph message dropped");
}

#[cfg(test)]
mod tests {
    use std::{collections::HashSet, net::IpAddr};

    use super::reply_endpoint_allowed;

    #[test]
    fn replies_go_to_the_peers_own_address_or_within_this_host() {
        let local: HashSet<IpAddr> =
            ["127.0.0.1", "10.41.0.1", "10.42.0.1"].iter().map(|a| a.parse().unwrap()).collect();
        let ok = |source: &str, peer: &str| reply_endpoint_allowed(source.as_bytes(), Some(peer), &local).is_ok();
        // A remote peer: only its own address.
        assert!(ok("tcp://10.41.0.2:5000", "10.41.0.2"));
        assert!(ok("tcp://[::ffff:10.41.0.2]:5000", "::ffff:10.41.0.2"));
        assert!(!ok("tcp://10.41.0.9:5000", "10.41.0.2"));
        assert!(!ok("tcp://127.0.0.1:5000", "10.41.0.2"));
        assert!(!ok("tcp://10.42.0.1:5000", "10.41.0.2"));
        // A peer on this host (loopback, or one of this host's addresses): any address of this host.
        assert!(ok("tcp://10.41.0.1:5000", "127.0.0.1"));
        assert!(ok("tcp://127.0.0.1:5000", "10.42.0.1"));
        assert!(ok("tcp://10.41.0.1:5000", "10.42.0.1"));
        assert!(!ok("tcp://10.41.0.2:5000", "10.42.0.1"));
        assert!(!ok("tcp://10.41.0.2:5000", "127.0.0.1"));
        // Not tcp, no address, unknown peer.
        assert!(!ok("ipc:///tmp/x", "127.0.0.1"));
        assert!(!ok("tcp://localhost:5000", "127.0.0.1"));
        assert!(reply_endpoint_allowed(b"tcp://127.0.0.1:1", None, &local).is_err());
    }
}
