//! Measuring what a network fault does: TCP request/response round trips, UDP loss, and their statistics.
//!
//! Used inside the VM guest (`chaos-vm-guest`) first against raw `tc netem` and then against the agent, in the same
//! boot, so both numbers come from the same kernel, the same TCG clock and the same code path.
//!
//! # Layout
//! ```text
//! pin_to_cpu(0)            ── keep client, servers and the netem timer on one vCPU (see below)
//! EchoServer::start(addr)  ── accept thread ── one thread per connection: read → write back (TCP_NODELAY)
//! tcp_rtt(addr, probe)     ── one connection, TCP_NODELAY: write `payload` bytes, read them back, time it;
//!                             `warmup` unrecorded rounds first, then `samples` recorded ones  → Vec<Duration>
//! Stats::of(&samples)      ── n, min, p10, median, p90, max, mean, standard deviation in milliseconds
//! udp_loss(target, probe)  ── binds a counting sink on `target`, sends `packets` numbered datagrams to it in paced
//!                             bursts, counts distinct sequence numbers that arrived            → LossReport
//! ReplyServer::start(addr) ── a lymph-style service: requests arrive on one connection, each reply goes out on a
//!                             SEPARATE connection the server opens to the caller's own listening port
//! reply_rtt(addr, probe)   ── the caller side of that: listens on an ephemeral port, sends requests naming it,
//!                             times request → reply (arriving on the other connection)         → Vec<Duration>
//! in_netns(path, f)        ── runs `f` on a thread that entered the network namespace at `path` (/run/netns/x)
//! pin_command_to_cpu(cmd)  ── a child process (e.g. the agent) on another vCPU than the prober
//! ```
//!
//! Only loopback (or addresses inside a namespace the test created) is ever used: callers pass `127.0.0.1`/`::1`.
//!
//! In a TCG guest with several vCPUs, call [`pin_to_cpu`] before starting servers and probes: a wake-up that crosses
//! vCPUs there waits for the target's next tick (4 ms at HZ=250), which measured a 100 ms netem delay as
//! 101.6–106 ms median (p90 up to 112 ms) instead of 101.0–101.1 ms (p90 ≤ 101.4 ms) when pinned.

use std::{
    collections::{HashMap, HashSet, hash_map::Entry},
    io::{self, Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::unix::process::CommandExt,
    path::Path,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

/// Pins the calling thread — and every thread it starts afterwards, which inherit the mask — to one CPU.
///
/// # Errors
/// When `cpu` is beyond `CPU_SETSIZE` or `sched_setaffinity(2)` fails (e.g. the CPU does not exist).
pub fn pin_to_cpu(cpu: usize) -> io::Result<()> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("CPU {cpu} is beyond CPU_SETSIZE")));
    }
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET only write inside it, and sched_setaffinity reads
    // size_of::<cpu_set_t>() bytes of it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The number of CPUs this process may run on.
pub fn available_cpus() -> usize {
    thread::available_parallelism().map_or(1, std::num::NonZero::get)
}

/// Makes `cmd`'s child run on `cpu` only (set between fork and exec; the child's own children inherit it).
///
/// `cpu` must exist (see [`available_cpus`]); otherwise spawning fails with `EINVAL`.
pub fn pin_command_to_cpu(cmd: &mut Command, cpu: usize) -> &mut Command {
    // SAFETY: the closure only calls sched_setaffinity (a plain syscall) on the child itself.
    unsafe {
        cmd.pre_exec(move || {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_ZERO(&mut set);
            libc::CPU_SET(cpu, &mut set);
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// Runs `f` on a new thread that first joins the network namespace bound at `netns` (e.g. `/run/netns/cli`, as
/// `ip netns add` creates it). The calling thread's namespace is left alone; the new thread inherits the caller's
/// CPU affinity.
///
/// # Errors
/// When the namespace file cannot be opened or `setns(2)` fails; a panic in `f` is propagated.
pub fn in_netns<T: Send>(netns: &Path, f: impl FnOnce() -> T + Send) -> io::Result<T> {
    chaos_test_support::netns::try_run_at(netns, f)
}

/// A TCP echo server on its own threads; stopped (and its listener closed) on drop.
#[derive(Debug)]
pub struct EchoServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl EchoServer {
    /// Binds `addr` (e.g. `127.0.0.1:5001`) and starts echoing every byte back on every accepted connection.
    ///
    /// # Errors
    /// When the address cannot be bound.
    pub fn start(addr: SocketAddr) -> io::Result<Self> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let accept = {
            let stop = Arc::clone(&stop);
            thread::Builder::new().name(format!("echo-{addr}")).spawn(move || accept_loop(&listener, &stop))?
        };
        Ok(Self { addr, stop, accept: Some(accept) })
    }

    /// The bound address (the port is the real one when `start` was given port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

fn accept_loop(listener: &TcpListener, stop: &AtomicBool) {
    // Non-blocking accept polled with a short sleep: a server in a network namespace cannot be woken by a
    // connection from the thread that drops it (which may live in another namespace).
    let _ = listener.set_nonblocking(true);
    while !stop.load(Ordering::Relaxed) {
        let mut conn = match listener.accept() {
            Ok((conn, _)) => conn,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(2));
                continue;
            }
            Err(_) => continue,
        };
        let _ = conn.set_nonblocking(false);
        // Without NODELAY the reply may wait for the ACK of the previous reply, which a fault on the client →
        // server direction delays: the measurement would show the fault twice.
        let _ = conn.set_nodelay(true);
        let _ = thread::Builder::new().name("echo-conn".into()).spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if conn.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                }
            }
        });
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
    }
}

/// How [`tcp_rtt`] probes.
#[derive(Debug, Clone, Copy)]
pub struct RttProbe {
    /// Recorded round trips.
    pub samples: usize,
    /// Unrecorded round trips first (the first ones pay for cold caches and slow paths).
    pub warmup: usize,
    /// Request size in bytes (small: one segment).
    pub payload: usize,
    /// Per-read/write timeout; a round trip slower than this is an error.
    pub timeout: Duration,
}

impl Default for RttProbe {
    fn default() -> Self {
        Self { samples: 50, warmup: 3, payload: 32, timeout: Duration::from_secs(10) }
    }
}

/// Round trips of `probe.payload` bytes over one TCP connection (TCP_NODELAY) to an echo server at `addr`.
///
/// # Errors
/// When connecting, writing or reading fails or times out, or the echo differs from the request.
pub fn tcp_rtt(addr: SocketAddr, probe: RttProbe) -> io::Result<Vec<Duration>> {
    let mut conn = TcpStream::connect_timeout(&addr, probe.timeout)?;
    conn.set_nodelay(true)?;
    conn.set_read_timeout(Some(probe.timeout))?;
    conn.set_write_timeout(Some(probe.timeout))?;
    let mut request = vec![0u8; probe.payload.max(1)];
    let mut reply = vec![0u8; request.len()];
    let mut samples = Vec::with_capacity(probe.samples);
    for round in 0..probe.warmup + probe.samples {
        request.fill(round as u8);
        let started = Instant::now();
        conn.write_all(&request)?;
        conn.read_exact(&mut reply)?;
        let elapsed = started.elapsed();
        if reply != request {
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("echo from {addr} differs from request")));
        }
        if round >= probe.warmup {
            samples.push(elapsed);
        }
    }
    Ok(samples)
}

/// Summary of a set of durations, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    pub n: usize,
    pub min_ms: f64,
    pub p10_ms: f64,
    pub median_ms: f64,
    pub p90_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
    /// Population standard deviation.
    pub stdev_ms: f64,
}

impl Stats {
    /// Statistics of `samples`; all zero for an empty slice. Percentiles are nearest-rank.
    pub fn of(samples: &[Duration]) -> Self {
        let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        ms.sort_by(f64::total_cmp);
        let n = ms.len();
        if n == 0 {
            return Self {
                n,
                min_ms: 0.0,
                p10_ms: 0.0,
                median_ms: 0.0,
                p90_ms: 0.0,
                max_ms: 0.0,
                mean_ms: 0.0,
                stdev_ms: 0.0,
            };
        }
        let mean_ms = ms.iter().sum::<f64>() / n as f64;
        let variance = ms.iter().map(|v| (v - mean_ms).powi(2)).sum::<f64>() / n as f64;
        Self {
            n,
            min_ms: ms[0],
            p10_ms: percentile(&ms, 10.0),
            median_ms: percentile(&ms, 50.0),
            p90_ms: percentile(&ms, 90.0),
            max_ms: ms[n - 1],
            mean_ms,
            stdev_ms: variance.sqrt(),
        }
    }
}

/// Nearest-rank percentile of sorted, non-empty values.
fn percentile(sorted: &[f64], pct: f64) -> f64 {
    let rank = ((pct / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// How [`udp_loss`] probes.
#[derive(Debug, Clone, Copy)]
pub struct LossProbe {
    /// Datagrams sent (≥ 1000 for a loss percentage worth comparing: at 30 % the standard deviation is ~1.4 points
    /// for 1000 and ~1 point for 2000).
    pub packets: u32,
    /// Datagrams per burst; the sender sleeps `pause` between bursts so the sink's socket buffer never overflows
    /// (an overflow would be counted as loss).
    pub burst: u32,
    pub pause: Duration,
    /// How long the sink keeps listening after the last datagram was sent.
    pub linger: Duration,
}

impl Default for LossProbe {
    fn default() -> Self {
        Self { packets: 2000, burst: 20, pause: Duration::from_millis(1), linger: Duration::from_millis(500) }
    }
}

/// What [`udp_loss`] measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossReport {
    pub sent: u32,
    /// Distinct sequence numbers that arrived (duplicates are not counted twice).
    pub received: u32,
}

impl LossReport {
    /// Lost datagrams in percent of the sent ones.
    pub fn loss_pct(&self) -> f64 {
        if self.sent == 0 {
            return 0.0;
        }
        f64::from(self.sent.saturating_sub(self.received)) * 100.0 / f64::from(self.sent)
    }
}

/// Sends `probe.packets` numbered datagrams to a counting sink bound on `target` and reports how many arrived.
///
/// The sink is bound by this function (so `target`'s port must be free); the sender uses an ephemeral port on the
/// same address family, so a filter on the destination port matches the probe's datagrams only.
///
/// # Errors
/// When binding or sending fails.
pub fn udp_loss(target: SocketAddr, probe: LossProbe) -> io::Result<LossReport> {
    udp_loss_from(None, target, probe)
}

/// [`udp_loss`] with the sender in another network namespace (`/run/netns/<name>`), the sink in the caller's: a
/// remote caller's datagrams arriving over whatever devices join the two.
///
/// # Errors
/// When binding or sending fails, or the namespace cannot be entered.
pub fn udp_loss_from(sender_netns: Option<&Path>, target: SocketAddr, probe: LossProbe) -> io::Result<LossReport> {
    let sink = UdpSocket::bind(target)?;
    let target = sink.local_addr()?;
    sink.set_read_timeout(Some(Duration::from_millis(50)))?;
    let sending = Arc::new(AtomicBool::new(true));
    let counter = {
        let sending = Arc::clone(&sending);
        let linger = probe.linger;
        thread::Builder::new()
            .name(format!("udp-sink-{target}"))
            .spawn(move || count_datagrams(&sink, &sending, linger))?
    };
    let send = || -> (u32, io::Result<()>) {
        let unspecified: SocketAddr = if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().expect("literal");
        let mut sent = 0u32;
        let result = (|| {
            let sender = UdpSocket::bind(unspecified)?;
            while sent < probe.packets {
                for _ in 0..probe.burst.max(1).min(probe.packets - sent) {
                    sender.send_to(&sent.to_be_bytes(), target)?;
                    sent += 1;
                }
                thread::sleep(probe.pause);
            }
            Ok(())
        })();
        (sent, result)
    };
    let (sent, result) = match sender_netns {
        None => send(),
        Some(ns) => in_netns(ns, send).unwrap_or_else(|err| (0, Err(err))),
    };
    sending.store(false, Ordering::Relaxed);
    let received = counter.join().map_err(|_| io::Error::other("UDP sink thread panicked"))?;
    result?;
    Ok(LossReport { sent, received })
}

fn count_datagrams(sink: &UdpSocket, sending: &AtomicBool, linger: Duration) -> u32 {
    let mut seen = HashSet::new();
    let mut buf = [0u8; 64];
    let mut quiet_since: Option<Instant> = None;
    loop {
        match sink.recv(&mut buf) {
            Ok(n) if n >= 4 => {
                seen.insert(u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]));
                quiet_since = None;
            }
            Ok(_) => {}
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                if !sending.load(Ordering::Relaxed) {
                    let since = *quiet_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= linger {
                        break;
                    }
                }
            }
            Err(_) => break,
        }
    }
    seen.len() as u32
}

/// Bytes of a [`ReplyServer`] request or reply: the caller's reply port (u16, big endian), a sequence number
/// (u32, big endian), padding.
const REPLY_FRAME: usize = 32;

/// A lymph-style service: a request arrives on one TCP connection to the service port; the reply goes back on a
/// **separate** connection from the service to the caller's own listening port (a lymph service's ZeroMQ socket
/// connects to the caller's endpoint to answer). One reply connection per request connection and reply port,
/// opened on the first request and kept. Every socket has `TCP_NODELAY`. Stopped on drop.
#[derive(Debug)]
pub struct ReplyServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl ReplyServer {
    /// Binds `addr` and serves every accepted connection on its own thread.
    ///
    /// # Errors
    /// When the address cannot be bound.
    pub fn start(addr: SocketAddr) -> io::Result<Self> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let accept = {
            let stop = Arc::clone(&stop);
            thread::Builder::new().name(format!("reply-{addr}")).spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((conn, peer)) => {
                            let _ = thread::Builder::new()
                                .name("reply-conn".into())
                                .spawn(move || serve_reply_connection(conn, peer.ip()));
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => thread::sleep(Duration::from_millis(2)),
                        Err(_) => {}
                    }
                }
            })?
        };
        Ok(Self { addr, stop, accept: Some(accept) })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

fn serve_reply_connection(mut conn: TcpStream, peer: IpAddr) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_nodelay(true);
    let mut replies: HashMap<u16, TcpStream> = HashMap::new();
    let mut frame = [0u8; REPLY_FRAME];
    while conn.read_exact(&mut frame).is_ok() {
        let port = u16::from_be_bytes([frame[0], frame[1]]);
        let reply = match replies.entry(port) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => {
                let Ok(out) = TcpStream::connect_timeout(&SocketAddr::new(peer, port), Duration::from_secs(10)) else {
                    return;
                };
                let _ = out.set_nodelay(true);
                e.insert(out)
            }
        };
        if reply.write_all(&frame).is_err() {
            return;
        }
    }
}

impl Drop for ReplyServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
    }
}

/// Request → reply round trips against a [`ReplyServer`] at `addr`: requests go out on one connection, replies
/// come in on a connection the server opens to a listener of ours (an ephemeral port on `addr`'s IP).
/// `probe.payload` is ignored (frames are fixed-size and small).
///
/// # Errors
/// When connecting, sending or receiving fails or times out, or a reply does not match its request.
pub fn reply_rtt(addr: SocketAddr, probe: RttProbe) -> io::Result<Vec<Duration>> {
    let listener = TcpListener::bind(SocketAddr::new(addr.ip(), 0))?;
    let reply_port = listener.local_addr()?.port();
    listener.set_nonblocking(true)?;
    let mut requests = TcpStream::connect_timeout(&addr, probe.timeout)?;
    requests.set_nodelay(true)?;
    requests.set_write_timeout(Some(probe.timeout))?;
    let mut replies: Option<TcpStream> = None;
    let mut frame = [0u8; REPLY_FRAME];
    let mut reply = [0u8; REPLY_FRAME];
    let mut samples = Vec::with_capacity(probe.samples);
    for round in 0..probe.warmup + probe.samples {
        frame[..2].copy_from_slice(&reply_port.to_be_bytes());
        frame[2..6].copy_from_slice(&(round as u32).to_be_bytes());
        let started = Instant::now();
        requests.write_all(&frame)?;
        let conn = match &mut replies {
            Some(conn) => conn,
            None => {
                // The first reply opens the reply connection (polled: std has no accept timeout).
                let deadline = started + probe.timeout;
                let conn = loop {
                    match listener.accept() {
                        Ok((conn, _)) => break conn,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                            thread::sleep(Duration::from_millis(1));
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            return Err(io::Error::new(
                                io::ErrorKind::TimedOut,
                                "no reply connection from the service",
                            ));
                        }
                        Err(e) => return Err(e),
                    }
                };
                conn.set_nonblocking(false)?;
                conn.set_nodelay(true)?;
                conn.set_read_timeout(Some(probe.timeout))?;
                replies.insert(conn)
            }
        };
        conn.read_exact(&mut reply)?;
        let elapsed = started.elapsed();
        if reply != frame {
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("reply {round} from {addr} differs")));
        }
        if round >= probe.warmup {
            samples.push(elapsed);
        }
    }
    Ok(samples)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_come_back_on_a_separate_connection() {
        let server = ReplyServer::start("127.0.0.1:0".parse().unwrap()).unwrap();
        let samples = reply_rtt(server.addr(), RttProbe { samples: 5, warmup: 1, ..RttProbe::default() }).unwrap();
        assert_eq!(samples.len(), 5);
    }

    #[test]
    fn stats_use_nearest_rank() {
        let samples: Vec<Duration> = (1..=10).map(Duration::from_millis).collect();
        let stats = Stats::of(&samples);
        assert_eq!(stats.n, 10);
        assert_eq!(stats.min_ms, 1.0);
        assert_eq!(stats.p10_ms, 1.0);
        assert_eq!(stats.median_ms, 5.0);
        assert_eq!(stats.p90_ms, 9.0);
        assert_eq!(stats.max_ms, 10.0);
        assert!((stats.mean_ms - 5.5).abs() < 1e-9);
        assert!((stats.stdev_ms - 8.25f64.sqrt()).abs() < 1e-9);
        assert_eq!(Stats::of(&[]).n, 0);
    }

    #[test]
    fn pins_a_thread() {
        std::thread::spawn(|| pin_to_cpu(0)).join().unwrap().unwrap();
        assert!(std::thread::spawn(|| pin_to_cpu(1023)).join().unwrap().is_err(), "no machine here has 1024 CPUs");
        assert!(pin_to_cpu(100_000).is_err());
    }

    #[test]
    fn loss_percentage() {
        assert_eq!(LossReport { sent: 1000, received: 700 }.loss_pct(), 30.0);
        assert_eq!(LossReport { sent: 0, received: 0 }.loss_pct(), 0.0);
    }

    #[test]
    fn echo_round_trips_on_loopback() {
        let server = EchoServer::start("127.0.0.1:0".parse().unwrap()).unwrap();
        let samples = tcp_rtt(server.addr(), RttProbe { samples: 5, warmup: 1, ..RttProbe::default() }).unwrap();
        assert_eq!(samples.len(), 5);
    }

    #[test]
    fn udp_probe_without_fault_loses_nothing() {
        let report =
            udp_loss("127.0.0.1:0".parse().unwrap(), LossProbe { packets: 200, ..LossProbe::default() }).unwrap();
        assert_eq!(report, LossReport { sent: 200, received: 200 });
    }
}
