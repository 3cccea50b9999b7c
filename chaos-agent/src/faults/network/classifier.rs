//! The eBPF classifier: the embedded object, loading its programs, and typed access to its maps.
//!
//! The object is built by `cargo xtask build-ebpf` and embedded by `build.rs`; an agent built without it
//! reports [`ClassifierError::NotBuilt`]. Maps are pinned under the agent's pin directory (bpffs), which marks
//! them as ours and lets operators inspect them (`bpftool map dump pinned …`); the pins are removed on cleanup.

use std::{
    io,
    mem::size_of,
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuValues,
        lpm_trie::{Key as LpmKey, LpmTrie},
    },
    programs::{CgroupAttachMode, CgroupSockAddr, ProgramError, SchedClassifier},
};
use chaos_common::{
    Counters, EdtClass, EdtDistTable, Iface, MAP_COUNTERS, MAP_EDT_CLASSES, MAP_EDT_DIST, MAP_IFACES, MAP_LOCAL_ADDRS,
    MAP_RULES, PROG_EGRESS, PROG_IFB, PROG_INGRESS, PROG_STEER, PeerAddrKey, PeerProcKey, Rule, RuleKey,
    peer::{MAP_PEER_ADDR_RULES, MAP_PEER_PROC_RULES, MAP_SOCK_OWNERS, SOCK_OWNER_PROGRAMS},
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

/// The embedded BPF object (empty when it was not built).
pub fn embedded_object() -> &'static [u8] {
    OBJECT
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
    local_addrs: BpfHashMap<MapData, [u8; 16], u8>,
    edt_classes: Array<MapData, EdtClass>,
    slots: u32,
    pins: Vec<PathBuf>,
    /// Peer-scoped rules (absent in builds of the classifier that predate them).
    peer: Option<PeerMaps>,
}

/// The maps of peer-scoped rules and where the socket-owner programs are attached.
struct PeerMaps {
    addr_rules: LpmTrie<MapData, PeerAddrKey, Rule>,
    proc_rules: BpfHashMap<MapData, PeerProcKey, Rule>,
    sock_owners: BpfHashMap<MapData, u64, u32>,
    /// The cgroup v2 root the socket-owner programs (`chaos_connect4/6`, `chaos_sendmsg4/6`) are attached to (BPF
    /// links owned by this process: the kernel detaches them when the classifier is dropped or the agent dies), or
    /// why they are not.
    tracking: Result<PathBuf, String>,
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
        Classifier::load_object(OBJECT, pin_dir)
    }

    /// Loads `object` (the embedded one, or another build of the classifier for comparisons).
    ///
    /// # Errors
    /// As [`Classifier::load`].
    pub fn load_object(object: &[u8], pin_dir: Option<&Path>) -> Result<Classifier, ClassifierError> {
        // The per-CPU counters take `slots × 24 bytes × possible CPUs`: size them to the machine.
        let cpus = aya::util::nr_cpus().map_err(|(what, source)| ClassifierError::Io { what, source })?;
        let slots = chaos_common::counter_slots(cpus as u32);
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(MAP_COUNTERS, slots)
            .load(object)
            .map_err(|source| ClassifierError::Load { source })?;
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
        let local_map = take(&mut ebpf, MAP_LOCAL_ADDRS)?;
        let edt_classes = Array::try_from(take(&mut ebpf, MAP_EDT_CLASSES)?)
            .map_err(|source| ClassifierError::Map { map: MAP_EDT_CLASSES, source })?;
        // netem's jitter tables, for EDT classes with a distribution (the same tables tc loads into netem).
        let mut dist: Array<MapData, EdtDistTable> = Array::try_from(take(&mut ebpf, MAP_EDT_DIST)?)
            .map_err(|source| ClassifierError::Map { map: MAP_EDT_DIST, source })?;
        for (index, d) in super::encode::Distribution::ALL.into_iter().enumerate() {
            let mut table: EdtDistTable = [0; chaos_common::EDT_DIST_LEN];
            for (slot, v) in table.iter_mut().zip(d.table().iter().copied()) {
                *slot = v;
            }
            dist.set(index as u32, table, 0).map_err(|source| ClassifierError::Map { map: MAP_EDT_DIST, source })?;
        }
        let mut pins = Vec::new();
        if let Some(dir) = pin_dir {
            ensure_bpffs(dir)?;
            for (name, map) in [
                (MAP_RULES, &rules_map),
                (MAP_COUNTERS, &counters_map),
                (MAP_IFACES, &ifaces_map),
                (MAP_LOCAL_ADDRS, &local_map),
            ] {
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
        let local_addrs =
            BpfHashMap::try_from(local_map).map_err(|source| ClassifierError::Map { map: MAP_LOCAL_ADDRS, source })?;
        let peer = load_peer(&mut ebpf, pin_dir, &mut pins)?;
        Ok(Classifier { ebpf, rules, counters, ifaces, local_addrs, edt_classes, slots, pins, peer })
    }

    /// Whether peer rules whose sender is a process of this host work: `Err` says why not.
    pub fn sock_tracking(&self) -> Result<&Path, String> {
        match &self.peer {
            None => Err("this build of the classifier has no peer rules".into()),
            Some(p) => p.tracking.as_deref().map_err(Clone::clone),
        }
    }

    fn peer_maps(&mut self) -> Result<&mut PeerMaps, aya::maps::MapError> {
        self.peer.as_mut().ok_or(aya::maps::MapError::InvalidName { name: MAP_PEER_ADDR_RULES.into() })
    }

    /// Inserts or replaces a peer rule whose sender is an address prefix (`prefix_len` counts the key's bits,
    /// see `chaos_common::peer::ADDR_KEY_FIXED_BITS`).
    ///
    /// # Errors
    /// When the map is full or the kernel refuses the update.
    pub fn set_peer_addr_rule(
        &mut self,
        prefix_len: u32,
        key: PeerAddrKey,
        rule: Rule,
    ) -> Result<(), aya::maps::MapError> {
        self.peer_maps()?.addr_rules.insert(&LpmKey::new(prefix_len, key), rule, 0)
    }

    /// Removes a peer rule by sender prefix (absent is fine).
    ///
    /// # Errors
    /// When the kernel refuses the delete for another reason than absence.
    pub fn remove_peer_addr_rule(&mut self, prefix_len: u32, key: PeerAddrKey) -> Result<(), aya::maps::MapError> {
        match self.peer_maps()?.addr_rules.remove(&LpmKey::new(prefix_len, key)) {
            Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            other => other,
        }
    }

    /// A peer rule by sender prefix.
    pub fn peer_addr_rule(&self, prefix_len: u32, key: PeerAddrKey) -> Option<Rule> {
        self.peer.as_ref()?.addr_rules.get(&LpmKey::new(prefix_len, key), 0).ok()
    }

    /// Inserts or replaces a peer rule whose sender is a process of this host.
    ///
    /// # Errors
    /// When the map is full or the kernel refuses the update.
    pub fn set_peer_proc_rule(&mut self, key: PeerProcKey, rule: Rule) -> Result<(), aya::maps::MapError> {
        self.peer_maps()?.proc_rules.insert(key, rule, 0)
    }

    /// Removes a peer rule by sender process (absent is fine).
    ///
    /// # Errors
    /// When the kernel refuses the delete for another reason than absence.
    pub fn remove_peer_proc_rule(&mut self, key: &PeerProcKey) -> Result<(), aya::maps::MapError> {
        match self.peer_maps()?.proc_rules.remove(key) {
            Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            other => other,
        }
    }

    /// A peer rule by sender process.
    pub fn peer_proc_rule(&self, key: &PeerProcKey) -> Option<Rule> {
        self.peer.as_ref()?.proc_rules.get(key, 0).ok()
    }

    /// Number of peer rules in both maps.
    pub fn peer_rule_count(&self) -> usize {
        self.peer.as_ref().map_or(0, |p| p.addr_rules.keys().count() + p.proc_rules.keys().count())
    }

    /// Records that the socket with `cookie` belongs to `tgid` (connections made before the socket-owner programs
    /// were attached; later ones the programs record themselves).
    ///
    /// # Errors
    /// When the kernel refuses the update.
    pub fn set_sock_owner(&mut self, cookie: u64, tgid: u32) -> Result<(), aya::maps::MapError> {
        self.peer_maps()?.sock_owners.insert(cookie, tgid, 0)
    }

    /// The process recorded for a socket cookie.
    pub fn sock_owner(&self, cookie: u64) -> Option<u32> {
        self.peer.as_ref()?.sock_owners.get(&cookie, 0).ok()
    }

    /// Counter slots (the most network faults at once on this machine).
    pub fn slots(&self) -> u32 {
        self.slots
    }

    /// Makes [`MAP_LOCAL_ADDRS`] hold exactly `addrs` (IPv4 as `::ffff:a.b.c.d`).
    ///
    /// # Errors
    /// When the kernel refuses an update.
    pub fn set_local_addrs(&mut self, addrs: &std::collections::BTreeSet<[u8; 16]>) -> Result<(), aya::maps::MapError> {
        let present: Vec<[u8; 16]> = self.local_addrs.keys().filter_map(Result::ok).collect();
        for old in present.iter().filter(|a| !addrs.contains(*a)) {
            let _ = self.local_addrs.remove(old);
        }
        for new in addrs.iter().filter(|a| !present.contains(a)) {
            self.local_addrs.insert(new, 1, 0)?;
        }
        Ok(())
    }

    /// Addresses in [`MAP_LOCAL_ADDRS`].
    pub fn local_addrs(&self) -> Vec<[u8; 16]> {
        self.local_addrs.keys().filter_map(Result::ok).collect()
    }

    /// ifindexes in [`MAP_IFACES`].
    pub fn ifaces(&self) -> Vec<u32> {
        self.ifaces.keys().filter_map(Result::ok).collect()
    }

    /// Runs a program once per `repeat` on a copy of `frame` (an Ethernet frame) in the kernel
    /// (`BPF_PROG_TEST_RUN`; the packet is not sent anywhere, the maps are the live ones). The skb's device is the
    /// loopback device of the calling thread's network namespace (ifindex 1).
    ///
    /// # Errors
    /// When the kernel refuses the run.
    pub fn test_run(&self, program: &str, frame: &[u8], repeat: u32) -> io::Result<TestRun> {
        let program: &SchedClassifier = self
            .ebpf
            .program(program)
            .ok_or_else(|| io::Error::other(format!("no program {program}")))?
            .try_into()
            .map_err(io::Error::other)?;
        let fd = program.fd().map_err(io::Error::other)?.as_fd().as_raw_fd();
        test_run_fd(fd, frame, repeat)
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

    /// Serves IFB class `minor` through the EDT backend with `class` (see [`EdtClass`]), or, with `None`, stops
    /// (the class is then left alone by `chaos_ifb`).
    ///
    /// # Errors
    /// When the kernel refuses the update.
    pub fn set_edt_class(&mut self, minor: u32, class: Option<EdtClass>) -> Result<(), aya::maps::MapError> {
        self.edt_classes.set(minor, class.unwrap_or_default(), 0)
    }

    /// The EDT entry of class `minor` (`enabled == 0` when the class is not served by EDT).
    pub fn edt_class(&self, minor: u32) -> Option<EdtClass> {
        self.edt_classes.get(&minor, 0).ok()
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

/// What one `BPF_PROG_TEST_RUN` gave.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TestRun {
    /// The program's return value (`TC_ACT_*`).
    pub retval: i32,
    /// Mean run time per repetition in ns, as the kernel measured it.
    pub duration_ns: u32,
}

/// `BPF_PROG_TEST_RUN` on a program fd (see [`Classifier::test_run`]).
///
/// # Errors
/// When the kernel refuses the run.
pub fn test_run_fd(fd: i32, frame: &[u8], repeat: u32) -> io::Result<TestRun> {
    const BPF_PROG_TEST_RUN: libc::c_long = 10;
    // `union bpf_attr`'s `test` member, up to `batch_size`.
    #[repr(C)]
    #[derive(Default)]
    struct TestAttr {
        prog_fd: u32,
        retval: u32,
        data_size_in: u32,
        data_size_out: u32,
        data_in: u64,
        data_out: u64,
        repeat: u32,
        duration: u32,
        ctx_size_in: u32,
        ctx_size_out: u32,
        ctx_in: u64,
        ctx_out: u64,
        flags: u32,
        cpu: u32,
        batch_size: u32,
        _pad: u32,
    }
    let mut attr = TestAttr {
        prog_fd: fd as u32,
        data_size_in: frame.len() as u32,
        data_in: frame.as_ptr() as u64,
        repeat,
        ..Default::default()
    };
    // SAFETY: bpf(2) reads `attr` (and `frame` through its pointer, valid for its length) and writes `retval` and
    // `duration` into `attr`, which we own.
    let rc = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_PROG_TEST_RUN, &mut attr as *mut TestAttr, size_of::<TestAttr>() as u32)
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(TestRun { retval: attr.retval as i32, duration_ns: attr.duration })
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

/// Loads the peer-rule maps and the socket-owner programs (when the object has them), pins the maps, and
/// attaches the programs to the cgroup v2 root. A kernel that refuses the programs or has no cgroup v2 leaves
/// peer rules by address working and says why peer rules by process do not.
fn load_peer(
    ebpf: &mut Ebpf,
    pin_dir: Option<&Path>,
    pins: &mut Vec<PathBuf>,
) -> Result<Option<PeerMaps>, ClassifierError> {
    if ebpf.map(MAP_PEER_ADDR_RULES).is_none() {
        return Ok(None);
    }
    let take = |ebpf: &mut Ebpf, map: &'static str| {
        ebpf.take_map(map)
            .ok_or(ClassifierError::Map { map, source: aya::maps::MapError::InvalidName { name: map.into() } })
    };
    let addr_map = take(ebpf, MAP_PEER_ADDR_RULES)?;
    let proc_map = take(ebpf, MAP_PEER_PROC_RULES)?;
    let owners_map = take(ebpf, MAP_SOCK_OWNERS)?;
    if let Some(dir) = pin_dir {
        for (name, map) in
            [(MAP_PEER_ADDR_RULES, &addr_map), (MAP_PEER_PROC_RULES, &proc_map), (MAP_SOCK_OWNERS, &owners_map)]
        {
            let path = dir.join(name);
            let _ = std::fs::remove_file(&path);
            map.pin(&path).map_err(|e| ClassifierError::Pin { dir: dir.to_owned(), reason: e.to_string() })?;
            pins.push(path);
        }
    }
    let addr_rules =
        LpmTrie::try_from(addr_map).map_err(|source| ClassifierError::Map { map: MAP_PEER_ADDR_RULES, source })?;
    let proc_rules =
        BpfHashMap::try_from(proc_map).map_err(|source| ClassifierError::Map { map: MAP_PEER_PROC_RULES, source })?;
    let sock_owners =
        BpfHashMap::try_from(owners_map).map_err(|source| ClassifierError::Map { map: MAP_SOCK_OWNERS, source })?;
    let tracking = attach_sock_tracking(ebpf);
    if let Err(why) = &tracking {
        tracing::warn!(%why, "peer faults by process unavailable (peer faults by address still work)");
    }
    Ok(Some(PeerMaps { addr_rules, proc_rules, sock_owners, tracking }))
}

/// Loads `chaos_connect4`/`chaos_connect6`/`chaos_sendmsg4`/`chaos_sendmsg6` and attaches them to the cgroup v2
/// root (found in `/proc/mounts`, or a cgroup2 mount of our own that is detached again right after: the
/// attachment lives on the cgroup, not the mount). Links on a cgroup are always multi-attach, which leaves other
/// programs there alone; the attachments are BPF links owned by this process, never pinned, so nothing of them
/// outlives the agent.
fn attach_sock_tracking(ebpf: &mut Ebpf) -> Result<PathBuf, String> {
    let (root, own_mount) = match cgroup2_mount() {
        Some(path) => (path, false),
        None => {
            let dir = PathBuf::from(crate::paths::CGROUP2_MOUNT);
            std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
            nix::mount::mount(Some("cgroup2"), &dir, Some("cgroup2"), nix::mount::MsFlags::empty(), None::<&str>)
                .map_err(|e| format!("no cgroup v2 mounted and mounting one on {} failed: {e}", dir.display()))?;
            (dir, true)
        }
    };
    let result = (|| {
        let cgroup = std::fs::File::open(&root).map_err(|e| format!("opening cgroup {}: {e}", root.display()))?;
        for name in SOCK_OWNER_PROGRAMS {
            let program: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .ok_or_else(|| format!("no program {name} in the object"))?
                .try_into()
                .map_err(|e| format!("{name}: {e}"))?;
            program.load().map_err(|e| format!("the kernel refused {name}: {}", error_chain(&e)))?;
            // A BPF link on a cgroup is always attached as BPF_F_ALLOW_MULTI, and `bpf_link_create` refuses any
            // flag (EINVAL): `Single` is aya's "no flags" (aya uses links on kernels ≥ 5.7).
            program
                .attach(&cgroup, CgroupAttachMode::Single)
                .map_err(|e| format!("attaching {name} to {}: {}", root.display(), error_chain(&e)))?;
        }
        Ok(root.clone())
    })();
    if own_mount {
        let _ = nix::mount::umount2(&root, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir(&root);
    }
    result
}

/// An error and its sources, one sentence (aya puts the errno in the source).
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The first cgroup v2 mount in `/proc/mounts`.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|line| {
        let mut f = line.split_whitespace();
        let (_, path, fstype) = (f.next()?, f.next()?, f.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(path.replace("\\040", " ")))
    })
}

/// Removes leftover pins of an earlier run (and the directory, when empty).
pub fn remove_pins(dir: &Path) -> io::Result<usize> {
    let mut removed = 0;
    for name in [
        MAP_RULES,
        MAP_COUNTERS,
        MAP_IFACES,
        MAP_LOCAL_ADDRS,
        MAP_PEER_ADDR_RULES,
        MAP_PEER_PROC_RULES,
        MAP_SOCK_OWNERS,
    ] {
        match std::fs::remove_file(dir.join(name)) {
            Ok(()) => removed += 1,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    let _ = std::fs::remove_dir(dir);
    Ok(removed)
}
