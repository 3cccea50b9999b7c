//! Resource faults: CPU burn, memory pressure, disk fill — bounded, attributable, always reverted.
//!
//! CPU and memory run in worker processes: the agent's own executable started again with
//! [`WORKER_ENV`] set (see [`worker_main`]), with `PR_SET_PDEATHSIG(SIGKILL)` so they die with the agent, placed in
//! the target's cgroup on request, and killed at the end of the fault's lifetime. A disk fill is a file the agent
//! owns (`<dir>/.lymph-chaos-fill-<fault>`), allocated with `fallocate` (falling back to writes), never leaving less
//! free space than the configured floor, and deleted at the end. Workers and files are in the journal, so a
//! restarted agent (or the guardian of a dead one) removes leftovers.

use std::{
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::process::{Child, Command};
use tracing::{info, warn};

use super::{FaultAction, process::ProcInfo};

/// Environment variable that turns the agent's executable into a worker (`cpu:<duty>` or `memory:<mib>`).
pub const WORKER_ENV: &str = "LYMPH_CHAOS_WORKER";
/// Free memory that a memory fault always leaves (MiB), on top of the request.
pub(crate) const MEMORY_MARGIN_MIB: u64 = 256;
/// Free space a disk fault always leaves (percent of the filesystem), unless the request asks for more.
pub(crate) const DISK_FLOOR_PERCENT: f64 = 5.0;

pub(crate) use chaos_api::fault::{CpuSpec, DiskSpec, MemorySpec};

/// Errors of resource faults.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ResourceError {
    /// The request would pass a safety limit.
    #[error("{0}")]
    Refused(String),
    /// Bad parameters.
    #[error("{0}")]
    Invalid(String),
    /// An OS operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What.
        what: String,
        /// Error.
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ResourceError {
    let what = what.into();
    move |source| ResourceError::Io { what, source }
}

/// A checked plan, ready to start.
pub(crate) enum Prepared {
    /// CPU workers.
    Cpu {
        /// How many.
        workers: u32,
        /// Duty cycle per worker (0–100).
        load: f64,
        /// cgroup.procs files to join.
        cgroup: Option<Vec<PathBuf>>,
    },
    /// A memory worker.
    Memory {
        /// MiB.
        mib: u64,
        /// cgroup.procs files to join.
        cgroup: Option<Vec<PathBuf>>,
    },
    /// A fill file.
    Disk {
        /// The directory, opened without following symlinks.
        dir: Arc<OwnedFd>,
        /// The file's name in it.
        name: String,
        /// The file (for reports and the journal).
        file: PathBuf,
        /// Bytes to allocate.
        bytes: u64,
        /// Free bytes to leave.
        floor: u64,
    },
}

/// Checks limits and builds the plan.
///
/// # Errors
/// [`ResourceError::Refused`] beyond a safety limit, [`ResourceError::Invalid`] for bad parameters.
pub(crate) fn prepare(
    action: &FaultAction,
    fault_id: &str,
    target_pid: Option<i32>,
    disk: Option<&DiskLimits>,
) -> Result<Prepared, ResourceError> {
    match action {
        FaultAction::Cpu(spec) => prepare_cpu(spec, target_pid),
        FaultAction::Memory(spec) => prepare_memory(spec, target_pid),
        FaultAction::Disk(spec) => prepare_disk(spec, fault_id, disk),
        _ => Err(ResourceError::Invalid("not a resource fault".into())),
    }
}

/// A CPU fault: how many workers at what load, refused beyond four workers per core.
fn prepare_cpu(spec: &CpuSpec, target_pid: Option<i32>) -> Result<Prepared, ResourceError> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
    let workers = match (spec.workers, spec.percent_cores) {
        (Some(_), Some(_)) => {
            return Err(ResourceError::Invalid("give workers or percent_cores, not both".into()));
        }
        (Some(0), _) => return Err(ResourceError::Invalid("workers must be at least 1".into())),
        (Some(w), None) => w,
        (None, Some(p)) if p > 0.0 && p <= 100.0 => ((f64::from(cores) * p / 100.0).ceil() as u32).max(1),
        (None, Some(p)) => {
            return Err(ResourceError::Invalid(format!("percent_cores must be in (0, 100], got {p}")));
        }
        (None, None) => 1,
    };
    if workers > cores * 4 {
        return Err(ResourceError::Refused(format!("{workers} CPU workers on {cores} cores is more than 4 per core")));
    }
    let load = spec.load.unwrap_or(100.0);
    if !(load > 0.0 && load <= 100.0) {
        return Err(ResourceError::Invalid(format!("load must be in (0, 100], got {load}")));
    }
    let cgroup = spec.in_target_cgroup.then(|| target_cgroup(target_pid)).transpose()?;
    Ok(Prepared::Cpu { workers, load, cgroup })
}

/// A memory fault: how many MiB, refused when it would eat into the safety margin.
fn prepare_memory(spec: &MemorySpec, target_pid: Option<i32>) -> Result<Prepared, ResourceError> {
    let available =
        meminfo("MemAvailable:").ok_or_else(|| ResourceError::Invalid("cannot read /proc/meminfo".into()))?;
    let mib = match (spec.mib, spec.percent_available) {
        (Some(_), Some(_)) => {
            return Err(ResourceError::Invalid("give mib or percent_available, not both".into()));
        }
        (Some(0), _) => return Err(ResourceError::Invalid("mib must be at least 1".into())),
        (Some(m), None) => m,
        (None, Some(p)) if p > 0.0 && p <= 100.0 => ((available as f64 * p / 100.0) as u64).max(1),
        (None, Some(p)) => {
            return Err(ResourceError::Invalid(format!("percent_available must be in (0, 100], got {p}")));
        }
        (None, None) => {
            return Err(ResourceError::Invalid("a memory fault needs mib or percent_available".into()));
        }
    };
    if mib.saturating_add(MEMORY_MARGIN_MIB) > available {
        return Err(ResourceError::Refused(format!(
            "{mib} MiB would leave less than the {MEMORY_MARGIN_MIB} MiB safety margin: only {available} MiB are available"
        )));
    }
    let cgroup = spec.in_target_cgroup.then(|| target_cgroup(target_pid)).transpose()?;
    Ok(Prepared::Memory { mib, cgroup })
}

/// A disk fault: which directory (inside the configured roots) and how many bytes, refused below the floor.
fn prepare_disk(spec: &DiskSpec, fault_id: &str, disk: Option<&DiskLimits>) -> Result<Prepared, ResourceError> {
    let limits = disk.ok_or_else(|| ResourceError::Invalid("disk faults are not configured".into()))?;
    let root = limits
        .roots
        .first()
        .ok_or_else(|| ResourceError::Refused("disk faults are off: faults.disk_paths is empty".into()))?;
    let dir_path = spec.path.clone().unwrap_or_else(|| root.clone());
    let (dir, shown) = open_fill_dir(&dir_path, &limits.roots)?;
    if !limits.allow_memory_filesystems
        && super::fillfs::is_memory_backed(&dir).map_err(io(format!("statfs {shown}")))?
    {
        return Err(ResourceError::Refused(format!(
            "{shown} is on a memory-backed filesystem (tmpfs/ramfs): filling it takes memory, not disk \
                 (set faults.allow_memory_filesystems to allow it)"
        )));
    }
    let (free, total) = super::fillfs::space(&dir).map_err(io(format!("statvfs {shown}")))?;
    let floor_pct = spec.floor_percent.unwrap_or(DISK_FLOOR_PERCENT).max(DISK_FLOOR_PERCENT);
    if floor_pct >= 100.0 {
        return Err(ResourceError::Invalid("floor_percent must be below 100".into()));
    }
    let floor = (total as f64 * floor_pct / 100.0) as u64;
    let room = free.saturating_sub(floor);
    let bytes = match (spec.mib, spec.percent_free) {
        (Some(_), Some(_)) => return Err(ResourceError::Invalid("give mib or percent_free, not both".into())),
        (Some(0), _) => return Err(ResourceError::Invalid("mib must be at least 1".into())),
        // An explicit size that would pass the floor is refused: the caller asked for exactly that much.
        (Some(m), None) if m.checked_shl(20).is_none_or(|b| b >> 20 != m || b > room) => {
            return Err(ResourceError::Refused(format!(
                "filling {m} MiB of {shown} would leave {} MiB free, below the floor of {floor_pct} % ({} MiB)",
                free.saturating_sub(m.saturating_mul(1 << 20)) >> 20,
                floor >> 20
            )));
        }
        (Some(m), None) => m << 20,
        // A share of the free space stops at the floor ("fill the disk" = as full as allowed).
        (None, Some(p)) if p > 0.0 && p <= 100.0 => ((free as f64 * p / 100.0) as u64).min(room),
        (None, Some(p)) => {
            return Err(ResourceError::Invalid(format!("percent_free must be in (0, 100], got {p}")));
        }
        (None, None) => return Err(ResourceError::Invalid("a disk fault needs mib or percent_free".into())),
    };
    if bytes == 0 {
        return Err(ResourceError::Refused(format!(
            "{shown} has no room above the floor of {floor_pct} % ({} MiB free)",
            free >> 20
        )));
    }
    let name = format!("{}-{fault_id}", crate::paths::FILL_FILE_PREFIX);
    let file = dir_path.join(&name);
    Ok(Prepared::Disk { dir: Arc::new(dir), name, file, bytes, floor })
}

impl Prepared {
    /// Files this plan will create (for the journal, before anything exists).
    pub(crate) fn files(&self) -> Vec<PathBuf> {
        match self {
            Prepared::Disk { file, .. } => vec![file.clone()],
            _ => Vec::new(),
        }
    }

    /// Starts it.
    ///
    /// # Errors
    /// When workers cannot be spawned or the file cannot be created (nothing is left behind then).
    pub(crate) async fn start(self, lifetime: Duration) -> Result<ResourceFault, ResourceError> {
        let _ = lifetime;
        match self {
            Prepared::Cpu { workers, load, cgroup } => {
                let mut children = Vec::new();
                for _ in 0..workers {
                    match spawn_worker(&format!("cpu:{load}"), cgroup.as_deref()) {
                        Ok(c) => children.push(c),
                        Err(err) => {
                            kill_all(&mut children).await;
                            return Err(err);
                        }
                    }
                }
                info!(workers, load, "CPU burn started");
                Ok(ResourceFault::Workers {
                    kind: "cpu",
                    children,
                    detail: serde_json::json!({"workers": workers, "load": load, "cgroup": cgroup}),
                })
            }
            Prepared::Memory { mib, cgroup } => {
                let child = spawn_worker(&format!("memory:{mib}"), cgroup.as_deref())?;
                Ok(ResourceFault::Workers {
                    kind: "memory",
                    children: vec![child],
                    detail: serde_json::json!({"mib": mib, "cgroup": cgroup}),
                })
            }
            Prepared::Disk { dir, name, file, bytes, floor } => {
                let written = Arc::new(AtomicU64::new(0));
                let w = written.clone();
                let (d, n, shown) = (dir.clone(), name.clone(), file.display().to_string());
                let ident = tokio::task::spawn_blocking(move || fill(&d, &n, &shown, bytes, floor, &w))
                    .await
                    .map_err(|e| ResourceError::Invalid(format!("fill task failed: {e}")))??;
                Ok(ResourceFault::Fill { dir, name, ident, file, written })
            }
        }
    }
}

/// A running resource fault.
pub(crate) enum ResourceFault {
    /// Worker processes.
    Workers {
        /// cpu / memory.
        kind: &'static str,
        /// The workers.
        children: Vec<Child>,
        /// Parameters, for reports.
        detail: serde_json::Value,
    },
    /// A fill file.
    Fill {
        /// Its directory (opened without following symlinks, held until the file is removed).
        dir: Arc<OwnedFd>,
        /// Its name there.
        name: String,
        /// Device and inode of the file the agent created.
        ident: (u64, u64),
        /// The file.
        file: PathBuf,
        /// Bytes allocated.
        written: Arc<AtomicU64>,
    },
}

impl ResourceFault {
    /// Worker processes (for the journal).
    pub(crate) fn workers(&self) -> Vec<ProcInfo> {
        match self {
            ResourceFault::Workers { children, .. } => {
                children.iter().filter_map(|c| c.id()).filter_map(|pid| super::process::proc_info(pid as i32)).collect()
            }
            ResourceFault::Fill { .. } => Vec::new(),
        }
    }

    /// Files (for the journal).
    pub(crate) fn files(&self) -> Vec<PathBuf> {
        match self {
            ResourceFault::Fill { file, .. } => vec![file.clone()],
            ResourceFault::Workers { .. } => Vec::new(),
        }
    }

    /// A one-line description.
    pub(crate) fn describe(&self) -> String {
        match self {
            ResourceFault::Workers { kind, children, detail } => {
                let pids: Vec<u32> = children.iter().filter_map(Child::id).collect();
                format!("{kind} workers {pids:?} started ({detail})")
            }
            ResourceFault::Fill { file, written, .. } => {
                format!("{} filled with {} MiB", file.display(), written.load(Ordering::Relaxed) >> 20)
            }
        }
    }

    /// What it consumes now: worker RSS and CPU time, or the file's size.
    pub(crate) fn usage(&self) -> serde_json::Value {
        match self {
            ResourceFault::Workers { children, detail, .. } => {
                let workers: Vec<serde_json::Value> = children
                    .iter()
                    .filter_map(Child::id)
                    .map(|pid| {
                        let (rss, cpu) = proc_usage(pid as i32);
                        serde_json::json!({"pid": pid, "rss_mib": rss as f64 / 1048576.0, "cpu_seconds": cpu})
                    })
                    .collect();
                serde_json::json!({"workers": workers, "params": detail})
            }
            ResourceFault::Fill { file, written, .. } => {
                let size = written.load(Ordering::Relaxed);
                serde_json::json!({"file": file, "bytes": size, "allocated": written.load(Ordering::Relaxed)})
            }
        }
    }

    /// Stops it: kills workers (and reaps them), deletes the file.
    ///
    /// # Errors
    /// When the file cannot be deleted.
    pub(crate) async fn stop(self) -> Result<(), ResourceError> {
        match self {
            ResourceFault::Workers { mut children, .. } => {
                kill_all(&mut children).await;
                Ok(())
            }
            ResourceFault::Fill { dir, name, ident, file, .. } => super::fillfs::remove_file(&dir, &name, Some(ident))
                .map(|_| ())
                .map_err(io(format!("removing {}", file.display()))),
        }
    }
}

async fn kill_all(children: &mut [Child]) {
    for c in children.iter_mut() {
        let _ = c.start_kill();
    }
    for c in children.iter_mut() {
        let _ = tokio::time::timeout(Duration::from_secs(2), c.wait()).await;
    }
}

/// The executable used for workers: the agent's own (`LYMPH_CHAOS_WORKER_EXE` overrides it).
fn worker_exe() -> Result<PathBuf, ResourceError> {
    if let Some(exe) = std::env::var_os("LYMPH_CHAOS_WORKER_EXE") {
        return Ok(PathBuf::from(exe));
    }
    crate::procinfo::own_executable().ok_or_else(|| {
        ResourceError::Invalid(
            "CPU and memory faults run the lymph-chaos executable as workers; this process is not it".into(),
        )
    })
}

fn spawn_worker(job: &str, cgroup: Option<&[PathBuf]>) -> Result<Child, ResourceError> {
    let mut cmd = Command::new(worker_exe()?);
    cmd.arg0("lymph-chaos-worker").env(WORKER_ENV, job).stdin(std::process::Stdio::null()).kill_on_drop(true);
    // SAFETY: prctl in the child between fork and exec only touches the child's own state.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(io("spawning a worker"))?;
    if let (Some(files), Some(pid)) = (cgroup, child.id()) {
        for f in files {
            if let Err(e) = std::fs::write(f, pid.to_string()) {
                warn!(file = %f.display(), %e, "cannot move the worker into the target's cgroup");
            }
        }
    }
    Ok(child)
}

/// The `cgroup.procs` files of a process's cgroups (v2 unified, and v1 cpu/cpuacct/memory).
fn target_cgroup(pid: Option<i32>) -> Result<Vec<PathBuf>, ResourceError> {
    let pid = pid.ok_or_else(|| ResourceError::Invalid("in_target_cgroup needs a target process".into()))?;
    let text =
        std::fs::read_to_string(format!("/proc/{pid}/cgroup")).map_err(io(format!("reading /proc/{pid}/cgroup")))?;
    let mut files = Vec::new();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next(), parts.next().unwrap_or(""), parts.next().unwrap_or("/"));
        let rel = path.trim_start_matches('/');
        if controllers.is_empty() {
            for root in ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"] {
                let f = Path::new(root).join(rel).join("cgroup.procs");
                if Path::new(root).join("cgroup.controllers").exists() && f.exists() {
                    files.push(f);
                    break;
                }
            }
        } else {
            for ctl in controllers.split(',') {
                if ["cpu", "cpuacct", "memory"].contains(&ctl) {
                    let f = Path::new("/sys/fs/cgroup").join(controllers).join(rel).join("cgroup.procs");
                    let g = Path::new("/sys/fs/cgroup").join(ctl).join(rel).join("cgroup.procs");
                    for c in [f, g] {
                        if c.exists() && !files.contains(&c) {
                            files.push(c);
                        }
                    }
                }
            }
        }
    }
    if files.is_empty() {
        return Err(ResourceError::Invalid(format!("no cgroup of pid {pid} found under /sys/fs/cgroup")));
    }
    Ok(files)
}

/// The machine's memory (MiB).
pub(crate) fn mem_total_mib() -> Option<u64> {
    meminfo("MemTotal:")
}

fn meminfo(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// RSS (bytes) and CPU time (seconds) of a process.
pub(crate) fn proc_usage(pid: i32) -> (u64, f64) {
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024);
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100) as f64;
    let cpu = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // utime (field 14) + stime (15).
            let (_, f) = crate::procinfo::split_stat(&s)?;
            Some((f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / ticks)
        })
        .unwrap_or(0.0);
    (rss, cpu)
}

/// Allocates `bytes` in a new file `name` in `dir`, stopping before free space drops under `floor`. Returns the
/// file's device and inode.
fn fill(
    dir: &OwnedFd,
    name: &str,
    shown: &str,
    bytes: u64,
    floor: u64,
    written: &AtomicU64,
) -> Result<(u64, u64), ResourceError> {
    use std::{io::Write, os::fd::AsRawFd};
    let f = super::fillfs::create_file(dir, name).map_err(io(format!("creating {shown}")))?;
    let ident = super::fillfs::identity(&f).map_err(io(format!("fstat {shown}")))?;
    let cleanup = |err: ResourceError| {
        let _ = super::fillfs::remove_file(dir, name, Some(ident));
        err
    };
    // SAFETY: fallocate on our own fd with a valid range.
    let rc = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, bytes as libc::off_t) };
    if rc == 0 {
        written.store(bytes, Ordering::Relaxed);
        return Ok(ident);
    }
    // No fallocate on this filesystem: write zeros in chunks, watching the floor.
    let chunk = vec![0u8; 1 << 20];
    let mut out = std::io::BufWriter::new(f);
    while written.load(Ordering::Relaxed) < bytes {
        let (free, _) = super::fillfs::space(dir).map_err(|e| cleanup(io("statvfs")(e)))?;
        if free <= floor + chunk.len() as u64 {
            break;
        }
        let n = chunk.len().min((bytes - written.load(Ordering::Relaxed)) as usize);
        out.write_all(&chunk[..n]).map_err(|e| cleanup(io(format!("writing {shown}"))(e)))?;
        written.fetch_add(n as u64, Ordering::Relaxed);
    }
    out.flush().map_err(|e| cleanup(io("flush")(e)))?;
    Ok(ident)
}

/// Where disk faults may create files.
#[derive(Clone, Debug)]
pub(crate) struct DiskLimits {
    /// Directories under which fills may be created (the first is the default).
    pub(crate) roots: Vec<PathBuf>,
    /// Allow tmpfs/ramfs.
    pub(crate) allow_memory_filesystems: bool,
}

/// Opens the directory to fill: it must be one of `roots` or lie below one; every component is opened without
/// following symlinks, `..` is refused.
fn open_fill_dir(dir: &Path, roots: &[PathBuf]) -> Result<(OwnedFd, String), ResourceError> {
    let shown = dir.display().to_string();
    if !dir.is_absolute() || dir.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
        return Err(ResourceError::Invalid(format!("disk fault path {shown} must be absolute, without `..`")));
    }
    if !roots.iter().any(|r| dir.starts_with(r)) {
        return Err(ResourceError::Refused(format!(
            "{shown} is not under faults.disk_paths ({}): disk faults only fill configured directories",
            roots.iter().map(|r| r.display().to_string()).collect::<Vec<_>>().join(", ")
        )));
    }
    // The default directory is created on first use, root-only (nothing is created before a disk fault is asked).
    let default = Path::new(crate::paths::DISK_FILL_DIR);
    if dir == default && roots.iter().any(|r| r == default) && !default.exists() {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(default)
            .map_err(io(format!("creating {}", default.display())))?;
    }
    let fd = super::fillfs::open_dir_nofollow(dir).map_err(|e| {
        ResourceError::Refused(format!("cannot open {shown} as a directory without following symlinks: {e}"))
    })?;
    Ok((fd, shown))
}

/// Entry point of a worker process (called by `main` when [`WORKER_ENV`] is set). Never returns.
pub fn worker_main(job: &str) -> ! {
    // Die with the agent even if it was started before PR_SET_PDEATHSIG took effect.
    let parent = nix::unistd::getppid();
    if parent.as_raw() == 1 {
        std::process::exit(1);
    }
    match job.split_once(':') {
        Some(("cpu", load)) => {
            let load: f64 = load.parse::<f64>().unwrap_or(100.0).clamp(1.0, 100.0);
            let period = Duration::from_millis(100);
            loop {
                let start = std::time::Instant::now();
                let busy = period.mul_f64(load / 100.0);
                let mut x: u64 = 0;
                while start.elapsed() < busy {
                    for _ in 0..10_000 {
                        x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                    }
                }
                if let Some(rest) = period.checked_sub(start.elapsed()) {
                    std::thread::sleep(rest);
                }
            }
        }
        Some(("memory", mib)) => {
            let mib: usize = mib.parse().unwrap_or(0);
            let mut blocks: Vec<Vec<u8>> = Vec::with_capacity(mib);
            for _ in 0..mib {
                // Touch every page so it is resident.
                let mut block = vec![0u8; 1 << 20];
                for i in (0..block.len()).step_by(4096) {
                    block[i] = 1;
                }
                blocks.push(block);
            }
            loop {
                std::thread::sleep(Duration::from_secs(3600));
                std::hint::black_box(&blocks);
            }
        }
        _ => {
            eprintln!("lymph-chaos worker: unknown job `{job}`");
            std::process::exit(2);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_beyond_the_margin_is_refused() {
        let available = meminfo("MemAvailable:").unwrap();
        let spec = MemorySpec { mib: Some(available), percent_available: None, in_target_cgroup: false };
        let err = prepare(&FaultAction::Memory(spec), "t", None, None).err().unwrap();
        assert!(matches!(err, ResourceError::Refused(_)), "{err}");
        assert!(err.to_string().contains("safety margin"));
    }

    #[test]
    fn disk_fill_respects_the_floor_and_roots() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let limits = DiskLimits { roots: vec![dir.clone()], allow_memory_filesystems: true };
        let st = nix::sys::statvfs::statvfs(&dir).unwrap();
        let free = st.blocks_available() * st.fragment_size();
        let spec = |path: Option<PathBuf>, mib: u64| {
            FaultAction::Disk(DiskSpec { path, mib: Some(mib), percent_free: None, floor_percent: None })
        };
        let refused = |r: Result<Prepared, ResourceError>| matches!(r, Err(ResourceError::Refused(_)));
        assert!(refused(prepare(&spec(Some(dir.clone()), (free >> 20) + 1), "t", None, Some(&limits))));
        assert!(refused(prepare(&spec(Some(dir.clone()), u64::MAX), "t", None, Some(&limits))));
        // Outside the roots, through a symlink, or a path that does not exist: refused, nothing created.
        assert!(refused(prepare(&spec(Some("/etc".into()), 1), "t", None, Some(&limits))));
        std::os::unix::fs::symlink("/etc", dir.join("link")).unwrap();
        assert!(refused(prepare(&spec(Some(dir.join("link")), 1), "t", None, Some(&limits))));
        assert!(prepare(&spec(Some(dir.join("missing")), 1), "t", None, Some(&limits)).is_err());
        assert!(matches!(
            prepare(&spec(Some(dir.join("../x")), 1), "t", None, Some(&limits)),
            Err(ResourceError::Invalid(_))
        ));
        assert!(prepare(&spec(None, 1), "t", None, Some(&limits)).is_ok());
    }
}
