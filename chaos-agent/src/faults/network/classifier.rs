//! The eBPF classifier: the embedded object, loading its programs, and typed access to its maps.
//!
//! The object is built by `cargo xtask build-ebpf` and embedded by `build.rs`; an agent built without it
//! reports [`ClassifierError::NotBuilt`]. Maps are pinned under the agent's pin directory (bpffs), which marks
//! them as ours and lets operators inspect them (`bpftool map dump pinned …`); the pins are removed on cleanup.

use std::{
    io,
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuValues},
    programs::{ProgramError, SchedClassifier},
};
use chaos_common::{
    Counters, Iface, MAP_COUNTERS, MAP_IFACES, MAP_RULES, PROG_EGRESS, PROG_IFB, PROG_INGRESS, PROG_STEER, Rule,
    RuleKey,
};

/// The classifier object built by `cargo xtask build-ebpf` (empty when it was not built).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/chaos-ebpf.o"));

/// Why the classifier is not usable.
#[derive(Debug, thiserror::Error)]
pub enum ClassifierError {
    /// The agent was built without the BPF object.
    #[error("BPF object not built: run cargo xtask build-ebpf (then rebuild the agent)")]
    NotBuilt,
    /// The kernel or aya refused the object.
    #[error(
        "the kernel refused the BPF object: {source} (needs CONFIG_BPF_SYSCALL, cls_bpf and root/CAP_BPF+CAP_NET_ADMIN)"
    )]
    Load {
        /// aya's error.
        #[source]
        source: aya::EbpfError,
    },
    /// The verifier or the kernel refused a program.
    #[error("the kernel refused BPF program {program}: {source}")]
    Program {
        /// Program name.
        program: &'static str,
        /// aya's error.
        #[source]
        source: ProgramError,
    },
    /// A map is missing or has the wrong type.
    #[error("BPF map {map}: {source}")]
    Map {
        /// Map name.
        map: &'static str,
        /// aya's error.
        #[source]
        source: aya::maps::MapError,
    },
    /// An OS call failed.
    #[error("{what}: {source}")]
    Io {
        /// What we were doing.
        what: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Pinning failed.
    #[error("cannot pin BPF maps under {dir}: {reason}")]
    Pin {
        /// Pin directory.
        dir: PathBuf,
        /// Why.
        reason: String,
    },
}

/// Whether the agent carries a BPF object.
pub fn object_available() -> bool {
    !OBJECT.is_empty()
}

/// The loaded classifier. Dropping it unloads the programs and maps unless a tc filter still holds them.
pub struct Classifier {
    // Keeps the programs alive while we hold fds to them.
    ebpf: Ebpf,
    rules: BpfHashMap<MapData, RuleKey, Rule>,
    counters: PerCpuArray<MapData, Counters>,
    ifaces: BpfHashMap<MapData, u32, Iface>,
    pins: Vec<PathBuf>,
}

/// File descriptors of the four programs, for tc filters.
#[derive(Clone, Copy, Debug)]
pub struct ProgramFds {
    /// `chaos_ingress`.
    pub ingress: i32,
    /// `chaos_egress`.
    pub egress: i32,
    /// `chaos_steer`.
    pub steer: i32,
    /// `chaos_ifb`.
    pub ifb: i32,
}

impl Classifier {
    /// Loads the embedded object and its programs; pins the maps under `pin_dir` when given.
    ///
    /// # Errors
    /// [`ClassifierError`] naming what the kernel refused.
    pub fn load(pin_dir: Option<&Path>) -> Result<Classifier, ClassifierError> {
        if OBJECT.is_empty() {
            return Err(ClassifierError::NotBuilt);
        }
        let mut ebpf = EbpfLoader::new().load(OBJECT).map_err(|source| ClassifierError::Load { source })?;
        for name in [PROG_INGRESS, PROG_EGRESS, PROG_STEER, PROG_IFB] {
            let program: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or(ClassifierError::Program { program: name, source: ProgramError::NotLoaded })?
                .try_into()
                .map_err(|source| ClassifierError::Program { program: name, source })?;
            program.load().map_err(|source| ClassifierError::Program { program: name, source })?;
        }
        let take = |ebpf: &mut Ebpf, map: &'static str| {
            ebpf.take_map(map)
                .ok_or(ClassifierError::Map { map, source: aya::maps::MapError::InvalidName { name: map.into() } })
        };
        let rules_map = take(&mut ebpf, MAP_RULES)?;
        let counters_map = take(&mut ebpf, MAP_COUNTERS)?;
        let ifaces_map = take(&mut ebpf, MAP_IFACES)?;
        let mut pins = Vec::new();
        if let Some(dir) = pin_dir {
            ensure_bpffs(dir)?;
            for (name, map) in [(MAP_RULES, &rules_map), (MAP_COUNTERS, &counters_map), (MAP_IFACES, &ifaces_map)] {
                let path = dir.join(name);
                // A pin left by a crashed run of ours: replace it.
                let _ = std::fs::remove_file(&path);
                map.pin(&path).map_err(|e| ClassifierError::Pin { dir: dir.to_owned(), reason: e.to_string() })?;
                pins.push(path);
            }
        }
        let rules =
            BpfHashMap::try_from(rules_map).map_err(|source| ClassifierError::Map { map: MAP_RULES, source })?;
        let counters =
            PerCpuArray::try_from(counters_map).map_err(|source| ClassifierError::Map { map: MAP_COUNTERS, source })?;
        let ifaces =
            BpfHashMap::try_from(ifaces_map).map_err(|source| ClassifierError::Map { map: MAP_IFACES, source })?;
        Ok(Classifier { ebpf, rules, counters, ifaces, pins })
    }

    /// Raw fds of the programs (valid while `self` lives).
    pub fn program_fds(&self) -> ProgramFds {
        let fd = |name: &str| -> i32 {
            let program: &SchedClassifier = self
                .ebpf
                .program(name)
                .expect("loaded in load()")
                .try_into()
                .expect("classifier type checked in load()");
            program.fd().expect("loaded in load()").as_fd().as_raw_fd()
        };
        ProgramFds { ingress: fd(PROG_INGRESS), egress: fd(PROG_EGRESS), steer: fd(PROG_STEER), ifb: fd(PROG_IFB) }
    }

    /// Inserts or replaces a rule.
    ///
    /// # Errors
    /// When the map is full or the kernel refuses the update.
    pub fn set_rule(&mut self, key: RuleKey, rule: Rule) -> Result<(), aya::maps::MapError> {
        self.rules.insert(key, rule, 0)
    }

    /// Removes a rule (absent is fine).
    ///
    /// # Errors
    /// When the kernel refuses the delete for another reason than absence.
    pub fn remove_rule(&mut self, key: &RuleKey) -> Result<(), aya::maps::MapError> {
        match self.rules.remove(key) {
            Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            other => other,
        }
    }

    /// Every rule in the map.
    pub fn rules(&self) -> Vec<(RuleKey, Rule)> {
        self.rules.iter().filter_map(Result::ok).collect()
    }

    /// Counters of a slot, summed over CPUs.
    pub fn counters(&self, slot: u32) -> Counters {
        let mut total = Counters::default();
        if let Ok(per_cpu) = self.counters.get(&slot, 0) {
            for c in per_cpu.iter() {
                total.packets += c.packets;
                total.bytes += c.bytes;
                total.drops += c.drops;
            }
        }
        total
    }

    /// Zeroes a slot's counters (before it is reused).
    ///
    /// # Errors
    /// When the kernel refuses the update.
    pub fn reset_counters(&mut self, slot: u32) -> Result<(), ClassifierError> {
        let cpus = aya::util::nr_cpus().map_err(|(what, source)| ClassifierError::Io { what, source })?;
        let zeros = PerCpuValues::try_from(vec![Counters::default(); cpus])
            .map_err(|source| ClassifierError::Io { what: "per-CPU values", source })?;
        self.counters.set(slot, zeros, 0).map_err(|source| ClassifierError::Map { map: MAP_COUNTERS, source })
    }

    /// Declares how packets on an interface are classified.
    ///
    /// # Errors
    /// When the kernel refuses the update.
    pub fn set_iface(&mut self, ifindex: u32, iface: Iface) -> Result<(), aya::maps::MapError> {
        self.ifaces.insert(ifindex, iface, 0)
    }

    /// Forgets an interface.
    pub fn remove_iface(&mut self, ifindex: u32) {
        let _ = self.ifaces.remove(&ifindex);
    }

    /// Paths of the pinned maps.
    pub fn pins(&self) -> &[PathBuf] {
        &self.pins
    }

    /// Removes the pins (the maps live on while filters use them).
    pub fn unpin(&mut self) {
        for pin in self.pins.drain(..) {
            let _ = std::fs::remove_file(&pin);
        }
    }
}

/// Capacity of the rule map.
pub const RULE_CAPACITY: u32 = chaos_common::MAX_RULE_KEYS;

/// Makes sure `dir` is on a bpffs (mounting one on `/sys/fs/bpf` if nothing is mounted there) and exists.
fn ensure_bpffs(dir: &Path) -> Result<(), ClassifierError> {
    let err = |reason: String| ClassifierError::Pin { dir: dir.to_owned(), reason };
    let root = Path::new("/sys/fs/bpf");
    if dir.starts_with(root) && !is_bpffs(root) {
        nix::mount::mount(Some("bpf"), root, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>)
            .map_err(|e| err(format!("mounting bpffs on /sys/fs/bpf: {e}")))?;
    }
    std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
    if !is_bpffs(dir) {
        return Err(err("not on a bpf filesystem".into()));
    }
    Ok(())
}

fn is_bpffs(path: &Path) -> bool {
    const BPF_FS_MAGIC: i64 = 0xcafe4a11;
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
}

/// Removes leftover pins of an earlier run (and the directory, when empty).
pub fn remove_pins(dir: &Path) -> io::Result<usize> {
    let mut removed = 0;
    for name in [MAP_RULES, MAP_COUNTERS, MAP_IFACES] {
        match std::fs::remove_file(dir.join(name)) {
            Ok(()) => removed += 1,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    let _ = std::fs::remove_dir(dir);
    Ok(removed)
}
