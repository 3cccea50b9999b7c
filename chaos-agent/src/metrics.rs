//! An optional Prometheus text endpoint (`GET /metrics`, loopback by default): active faults, per-fault
//! packets/bytes/drops and the effect measured beside them (added delay, loss, verdict), events by action and kind
//! (kills, refusals, warnings …), RPC calls, errors and latency.

use std::{fmt::Write as _, sync::Arc};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    task::JoinHandle,
};
use tracing::{info, warn};

use crate::{
    events::EventLog,
    faults::FaultManager,
    rpc::server::{LATENCY_BUCKETS, Server},
};

/// Scrapes served at once.
const MAX_CONNECTIONS: usize = 16;

/// Starts serving on `addr`.
///
/// # Errors
/// When the address cannot be bound.
pub(crate) async fn serve(
    addr: &str,
    server: Arc<Server>,
    manager: Arc<FaultManager>,
    events: Arc<EventLog>,
) -> std::io::Result<JoinHandle<()>> {
    let listener = TcpListener::bind(addr).await?;
    info!(addr = %listener.local_addr()?, "Prometheus metrics at /metrics");
    Ok(tokio::spawn(async move {
        let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        loop {
            // At most MAX_CONNECTIONS scrapes at once: the next connection waits in the kernel's backlog.
            let Ok(permit) = slots.clone().acquire_owned().await else { return };
            let mut sock = match listener.accept().await {
                Ok((sock, _)) => sock,
                Err(err) => {
                    // Out of descriptors or a transient error: back off instead of spinning on it.
                    warn!(%err, "metrics endpoint: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let (server, manager, events) = (server.clone(), manager.clone(), events.clone());
            tokio::spawn(async move {
                let _permit = permit;
                // Read the request head (it may arrive in pieces), bounded in size and time.
                let mut buf = [0u8; 2048];
                let mut n = 0;
                let read_head = async {
                    while n < buf.len() && !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                        match sock.read(&mut buf[n..]).await {
                            Ok(0) | Err(_) => break,
                            Ok(k) => n += k,
                        }
                    }
                };
                if tokio::time::timeout(std::time::Duration::from_secs(5), read_head).await.is_err() {
                    return;
                }
                let request = String::from_utf8_lossy(&buf[..n]);
                let (status, body) = if request.starts_with("GET /metrics") || request.starts_with("GET / ") {
                    ("200 OK", render(&server, &manager, &events).await)
                } else {
                    ("404 Not Found", "only /metrics here\n".to_owned())
                };
                let reply = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(reply.as_bytes()).await;
            });
        }
    }))
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Renders every metric in Prometheus text format.
pub(crate) async fn render(server: &Server, manager: &FaultManager, events: &EventLog) -> String {
    let mut out = String::new();
    let faults = manager.list(false).await;
    let _ = writeln!(out, "# HELP lymph_chaos_active_faults Faults in effect.\n# TYPE lymph_chaos_active_faults gauge");
    let _ = writeln!(out, "lymph_chaos_active_faults {}", faults.len());
    for (name, help, pick) in [
        ("packets", "Packets matched by a network fault.", 0),
        ("bytes", "Bytes matched by a network fault.", 1),
        ("drops", "Packets dropped by a network fault.", 2),
    ] {
        let _ = writeln!(
            out,
            "# HELP lymph_chaos_fault_{name}_total {help}\n# TYPE lymph_chaos_fault_{name}_total counter"
        );
        for f in &faults {
            if let Some(c) = f.counters {
                let v = [c.packets, c.bytes, c.drops][pick];
                let _ = writeln!(
                    out,
                    "lymph_chaos_fault_{name}_total{{fault=\"{}\",kind=\"{}\"}} {v}",
                    esc(&f.id),
                    esc(&f.kind)
                );
            }
        }
    }
    render_observed(&mut out, &faults);
    let _ = writeln!(
        out,
        "# HELP lymph_chaos_events_total Recorded events by action and fault kind.\n# TYPE lymph_chaos_events_total counter"
    );
    for ((action, kind), n) in events.counts() {
        let _ = writeln!(out, "lymph_chaos_events_total{{action=\"{}\",kind=\"{}\"}} {n}", esc(&action), esc(&kind));
    }
    let _ = writeln!(
        out,
        "# HELP lymph_chaos_rpc_requests_total RPC calls by method.\n# TYPE lymph_chaos_rpc_requests_total counter"
    );
    let stats = server.method_stats();
    for (method, s) in &stats {
        let _ = writeln!(out, "lymph_chaos_rpc_requests_total{{method=\"{}\"}} {}", esc(method), s.calls);
    }
    let _ = writeln!(
        out,
        "# HELP lymph_chaos_rpc_errors_total RPC calls answered with ERROR or NACK.\n# TYPE lymph_chaos_rpc_errors_total counter"
    );
    for (method, s) in &stats {
        let _ = writeln!(out, "lymph_chaos_rpc_errors_total{{method=\"{}\"}} {}", esc(method), s.errors);
    }
    let _ =
        writeln!(out, "# HELP lymph_chaos_rpc_seconds RPC handling time.\n# TYPE lymph_chaos_rpc_seconds histogram");
    for (method, s) in &stats {
        let m = esc(method);
        for (bound, count) in LATENCY_BUCKETS.iter().zip(s.buckets) {
            let _ = writeln!(out, "lymph_chaos_rpc_seconds_bucket{{method=\"{m}\",le=\"{bound}\"}} {count}");
        }
        let _ = writeln!(out, "lymph_chaos_rpc_seconds_bucket{{method=\"{m}\",le=\"+Inf\"}} {}", s.calls);
        let _ = writeln!(out, "lymph_chaos_rpc_seconds_sum{{method=\"{m}\"}} {}", s.seconds_sum);
        let _ = writeln!(out, "lymph_chaos_rpc_seconds_count{{method=\"{m}\"}} {}", s.calls);
    }
    let node = server.node().stats();
    let _ = writeln!(
        out,
        "# HELP lymph_chaos_rpc_pings_total Heartbeats answered.\n# TYPE lymph_chaos_rpc_pings_total counter"
    );
    let _ = writeln!(out, "lymph_chaos_rpc_pings_total {}", node.pings.load(std::sync::atomic::Ordering::Relaxed));
    let _ = writeln!(
        out,
        "# HELP lymph_chaos_rpc_malformed_total Malformed messages dropped.\n# TYPE lymph_chaos_rpc_malformed_total counter"
    );
    let _ =
        writeln!(out, "lymph_chaos_rpc_malformed_total {}", node.malformed.load(std::sync::atomic::Ordering::Relaxed));
    out
}

/// The measured effect of each network fault: added delay and loss where measured, and the verdict (1 on the
/// verdict's series).
fn render_observed(out: &mut String, faults: &[crate::faults::FaultReport]) {
    let observed: Vec<_> = faults.iter().filter_map(|f| f.observed.as_ref().map(|o| (f, o))).collect();
    let delays = observed.iter().filter_map(|(f, o)| Some((*f, o.added_delay_ms? / 1000.0)));
    fault_gauge(
        out,
        "lymph_chaos_fault_observed_added_delay_seconds",
        "Delay a probe handshake saw added by a network fault (against an unfaulted port on the same path).",
        delays,
    );
    let losses = observed.iter().filter_map(|(f, o)| Some((*f, o.loss_percent? / 100.0)));
    fault_gauge(
        out,
        "lymph_chaos_fault_observed_loss_ratio",
        "Share of probe handshakes a network fault left unanswered.",
        losses,
    );
    let _ = writeln!(
        out,
        "# HELP lymph_chaos_fault_effect Verdict on a network fault's measured effect (pending, observed, \
         not_observed, no_listener, not_measured).\n# TYPE lymph_chaos_fault_effect gauge"
    );
    for (f, o) in &observed {
        let verdict =
            serde_json::to_value(o.verdict).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
        let _ = writeln!(
            out,
            "lymph_chaos_fault_effect{{fault=\"{}\",kind=\"{}\",verdict=\"{}\"}} 1",
            esc(&f.id),
            esc(&f.kind),
            esc(&verdict)
        );
    }
}

/// One gauge with a sample per fault (labels `fault` and `kind`).
fn fault_gauge<'a>(
    out: &mut String,
    name: &str,
    help: &str,
    samples: impl Iterator<Item = (&'a crate::faults::FaultReport, f64)>,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
    for (f, value) in samples {
        let _ = writeln!(out, "{name}{{fault=\"{}\",kind=\"{}\"}} {value}", esc(&f.id), esc(&f.kind));
    }
}
