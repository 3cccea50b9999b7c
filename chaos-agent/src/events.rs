//! The event log: every action the agent takes or refuses, with time, fault, target, pids/ports/interfaces and
//! outcome. Kept in memory (bounded) for `Chaos.events` and appended to a JSON-lines file with size-bounded
//! rotation (`events.jsonl`, `.1`, `.2` …).

use std::{
    collections::VecDeque,
    fs::{File, OpenOptions},
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::PathBuf,
    sync::Mutex,
};

use tracing::warn;

use crate::config::EventsConfig;

pub(crate) use chaos_api::reply::{Action, Event};

/// Largest event kept (serialized); a larger one keeps its summary fields and loses the client-supplied rest.
pub(crate) const MAX_EVENT_BYTES: usize = 8 << 10;
/// Most bytes the in-memory log holds (serialized), whatever `events.memory` says.
pub(crate) const MAX_MEMORY_BYTES: usize = 16 << 20;

fn cut(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push_str(" …(truncated)");
    }
}

/// Bounds an event's size: strings clients choose (targets, messages, details) cannot grow the log.
fn bound(event: &mut Event, line_len: usize) -> bool {
    if line_len <= MAX_EVENT_BYTES {
        return false;
    }
    cut(&mut event.message, 1024);
    for v in [&mut event.target, &mut event.detail] {
        if let Some(json) = v.as_ref() {
            let text = json.to_string();
            if text.len() > 1024 {
                let mut short = text;
                cut(&mut short, 1024);
                *v = Some(serde_json::json!({"truncated": short}));
            }
        }
    }
    if let Some(f) = event.fault.as_mut() {
        cut(f, 128);
    }
    if let Some(k) = event.kind.as_mut() {
        cut(k, 128);
    }
    event.interfaces.truncate(16);
    event.pids.truncate(256);
    event.ports.truncate(256);
    true
}

struct Inner {
    counts: std::collections::BTreeMap<(String, String), u64>,
    next_seq: u64,
    memory: VecDeque<(Event, usize)>,
    memory_bytes: usize,
    file: Option<File>,
    written: u64,
}

/// The event log.
pub(crate) struct EventLog {
    config: EventsConfig,
    inner: Mutex<Inner>,
}

impl EventLog {
    /// Opens (appends to) the configured file.
    pub(crate) fn open(config: EventsConfig) -> EventLog {
        let (file, written, next_seq) = match &config.file {
            Some(path) => {
                if let Some(dir) = path.parent() {
                    let _ = std::fs::create_dir_all(dir);
                }
                let last_seq = last_seq(path);
                match OpenOptions::new().create(true).append(true).mode(0o600).open(path) {
                    Ok(f) => {
                        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
                        (Some(f), len, last_seq + 1)
                    }
                    Err(err) => {
                        warn!(file = %path.display(), %err, "cannot open the event log; keeping events in memory only");
                        (None, 0, 1)
                    }
                }
            }
            None => (None, 0, 1),
        };
        EventLog {
            inner: Mutex::new(Inner {
                counts: Default::default(),
                next_seq,
                memory: VecDeque::new(),
                memory_bytes: 0,
                file,
                written,
            }),
            config,
        }
    }

    /// Records an event (fills `seq` and `time`) and returns it.
    pub(crate) fn record(&self, mut event: Event) -> Event {
        let mut inner = self.inner.lock().expect("poisoned");
        event.seq = inner.next_seq;
        inner.next_seq += 1;
        event.time = crate::util::now_unix();
        let mut line = serde_json::to_vec(&event).expect("plain data");
        if bound(&mut event, line.len()) {
            line = serde_json::to_vec(&event).expect("plain data");
        }
        line.push(b'\n');
        tracing::info!(target: "lymph_chaos::events", event = %String::from_utf8_lossy(&line[..line.len() - 1]), "event");
        if inner.file.is_some() {
            if inner.written + line.len() as u64 > self.config.max_bytes {
                self.rotate(&mut inner);
            }
            if let Some(file) = inner.file.as_mut() {
                if let Err(err) = file.write_all(&line) {
                    warn!(%err, "cannot write the event log");
                } else {
                    inner.written += line.len() as u64;
                }
            }
        }
        let action = event
            .action
            .and_then(|a| serde_json::to_value(a).ok())
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        *inner.counts.entry((action, event.kind.clone().unwrap_or_default())).or_insert(0) += 1;
        inner.memory.push_back((event.clone(), line.len()));
        inner.memory_bytes += line.len();
        while inner.memory.len() > self.config.memory.max(1) || inner.memory_bytes > MAX_MEMORY_BYTES {
            let Some((_, n)) = inner.memory.pop_front() else { break };
            inner.memory_bytes -= n;
        }
        event
    }

    fn rotate(&self, inner: &mut Inner) {
        let Some(path) = &self.config.file else { return };
        inner.file = None;
        let name = |i: u32| PathBuf::from(format!("{}.{i}", path.display()));
        if self.config.keep == 0 {
            let _ = std::fs::remove_file(path);
        } else {
            let _ = std::fs::remove_file(name(self.config.keep));
            for i in (1..self.config.keep).rev() {
                let _ = std::fs::rename(name(i), name(i + 1));
            }
            let _ = std::fs::rename(path, name(1));
        }
        inner.file = OpenOptions::new().create(true).append(true).mode(0o600).open(path).ok();
        inner.written = 0;
    }

    /// Events with `seq > since`, oldest first, at most `limit` (the newest ones when more match).
    pub(crate) fn query(&self, since: u64, limit: usize) -> Vec<Event> {
        let inner = self.inner.lock().expect("poisoned");
        let matching: Vec<&Event> = inner.memory.iter().map(|(e, _)| e).filter(|e| e.seq > since).collect();
        let skip = matching.len().saturating_sub(limit);
        matching.into_iter().skip(skip).cloned().collect()
    }

    /// Events recorded since start, by (action, kind).
    pub(crate) fn counts(&self) -> Vec<((String, String), u64)> {
        self.inner.lock().expect("poisoned").counts.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }

    /// The last sequence number used.
    pub(crate) fn last_seq(&self) -> u64 {
        self.inner.lock().expect("poisoned").next_seq - 1
    }
}

/// The highest `seq` in an existing log, so numbering continues across restarts.
fn last_seq(path: &PathBuf) -> u64 {
    let Ok(text) = std::fs::read_to_string(path) else { return 0 };
    text.lines().rev().find_map(|l| serde_json::from_str::<Event>(l).ok()).map_or(0, |e| e.seq)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_queries_and_rotates_by_size() {
        let dir = std::env::temp_dir().join(format!("chaos-events-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let file = dir.join("events.jsonl");
        let log = EventLog::open(EventsConfig { file: Some(file.clone()), max_bytes: 400, keep: 2, memory: 5 });
        for i in 0..10 {
            log.record(Event { fault: Some(format!("f{i}")), ..Event::new(Action::Applied) });
        }
        let recent = log.query(0, 3);
        assert_eq!(recent.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![8, 9, 10]);
        assert_eq!(log.query(9, 100).len(), 1);
        // Memory is bounded.
        assert_eq!(log.query(0, 100).len(), 5);
        // Rotation kept the file under the bound and left .1 and .2.
        assert!(std::fs::metadata(&file).unwrap().len() <= 400);
        assert!(dir.join("events.jsonl.1").exists() && dir.join("events.jsonl.2").exists());
        assert!(!dir.join("events.jsonl.3").exists());
        // Numbering continues after a restart.
        drop(log);
        let log = EventLog::open(EventsConfig { file: Some(file), max_bytes: 400, keep: 2, memory: 5 });
        assert_eq!(log.record(Event::new(Action::AgentStart)).seq, 11);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
