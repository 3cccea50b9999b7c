//! The VM test tier: build a small initramfs guest, boot it with qemu (TCG) on a stock Debian 12 kernel, read the
//! results from its serial console.
//!
//! The host kernel has no `sch_netem`/`sch_prio`/`sch_fq`; Debian's kernel ships them as modules. `cargo xtask
//! vm-prepare` fetches that kernel (pinned ABI, cached under `target/vm/`) and writes `target/vm/assets.env`, which
//! [`VmAssets::locate`] reads.
//!
//! # Why an initramfs, not a debootstrap image
//! Both were measured on the machines this tier runs on:
//! - **initramfs** (busybox-static + host binaries with their `ldd` libraries + the modules, gzip cpio): without
//!   the agent 6–9 MB, built in ~1 s with no root and no network, boots to `/init` at 1.8 s guest time,
//!   boot → tests → `poweroff -f` in 6–12 s wall under TCG plus what the scenarios take. With the debug agent
//!   (33 MB once its debug info is stripped) 17.5 MB, built in 3.5–5 s, `/init` at ~3 s; the whole scenario set
//!   of `tests/tests/vm.rs` (raw netem and the agent interleaved) runs in 150–160 s on an idle host, 200–330 s
//!   beside a CPU hog. Every file the guest has is listed here, so a test cannot depend on something it did not ask
//!   for; results come back over the serial console, no shared filesystem needed.
//! - **debootstrap** (minbase + systemd + iproute2): 47 s to build (network, root), 17–18 s per boot, and needs a
//!   9p share or disk image to get results out. Its only advantage — a real init system — buys nothing for tc
//!   scenarios.
//!
//! So: initramfs. What needs a full distribution — the .deb and the service under systemd — is the systemd tier
//! (`tests/tests/systemd.rs`): an mmdebstrap image booted through a small initramfs built here
//! ([`GuestBuilder::qemu_arg`] adds its disks, [`GuestBuilder::command`] `switch_root`s to systemd).
//!
//! # Layout
//! ```text
//! Guest::builder(&assets)                 GuestBuilder
//!   .binary(host_path, "/usr/local/bin/x")  debug info stripped (objcopy) + its ldd libraries at their paths
//!   .file(host_path, "/etc/x") / .bytes("/etc/y", data, 0o644)
//!   .module("sch_netem")                    + its modules.dep dependencies, insmod'ed deps first
//!   .command("/usr/local/bin/x --all")      what the shell /init runs after setting the guest up, or
//!   .init(chaos-vm-init).exec([argv]).env(k, v)   a Rust /init (tests/src/bin/chaos-vm-init.rs, like aya's
//!                                            test-distro) running argv — the VM tier's libtest binary — directly
//!   .cpus(2) / .kernel_arg("idle=poll")     -smp (default DEFAULT_CPUS) / extra kernel command line
//!   .build()?                             → Guest { tempdir with initrd.cpio.gz }
//!       always in the image: /bin/busybox (as /bin/sh + applets), /usr/sbin/{ip,tc} + libs,
//!       /usr/lib/x86_64-linux-gnu/tc/*.dist (netem distributions), DEFAULT_MODULES, /init (shell script, or the
//!       Rust init with /etc/chaos-vm-init.conf: modules, environment, argv)
//! guest.run(timeout)?                     → GuestRun { results: Vec<ScenarioResult>, tests, console, done, … }
//!   timeout --kill-after=5 <N> qemu-system-x86_64 -accel tcg -smp 2 -m 1024 -nographic -nic none -no-reboot \
//!       -kernel vmlinuz -initrd initrd.cpio.gz -append 'console=ttyS0 quiet panic=-1'
//! ```
//!
//! # Console protocol (what the guest prints, one line each)
//! ```text
//! GUEST-BOOT uptime=1.84 kernel=6.1.0-56-amd64       /init started (guest uptime in seconds)
//! GUEST-MODULE-FAILED <path> <error>                  an insmod failed (the run goes on; scenarios will tell)
//! RESULT <row> <pass|fail> key=value …                one per scenario row; values are measured numbers
//! DETAIL <row>: <text>                                why a row failed (the guest's tests; not parsed)
//! test <name> ... ok|FAILED|ignored                   libtest's verdicts (with --nocapture and one thread the
//!                                                     test's own output comes between `... ` and the verdict)
//! GUEST-DONE exit=<status> uptime=<s>                 the guest command returned; missing → the run failed
//! ```
//!
//! Traffic stays inside the guest: qemu gets `-nic none`, the guest only has `lo` (and whatever veth pairs and
//! namespaces its command creates).

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    fs,
    io::{self, BufRead, BufReader, Write},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use flate2::{Compression, write::GzEncoder};

/// Environment variable naming an `assets.env` to use instead of `target/vm/assets.env`.
pub const ASSETS_ENV_VAR: &str = "CHAOS_VM_ASSETS";
/// Set to `1` to echo the guest console to stderr while it runs.
pub const ECHO_ENV_VAR: &str = "CHAOS_VM_ECHO";
/// Modules every guest loads (autoload of tc modules is unreliable on 6.1; `ifb` creates ifb0/ifb1 on load).
pub const DEFAULT_MODULES: &[&str] = &[
    "sch_netem",
    "sch_prio",
    "sch_htb",
    "sch_tbf",
    "sch_ingress",
    "sch_fq",
    "cls_bpf",
    "cls_u32",
    "act_mirred",
    "ifb",
    "veth",
];
/// The guest's shell and applets. Debian's build prefers its own applets (`tc`, `ip`, `ping`) over PATH: call the
/// real tools by absolute path.
const BUSYBOX: &str = "/bin/busybox";
/// iproute2 tools copied from the host (with their libraries).
const IPROUTE2: &[&str] = &["/usr/sbin/ip", "/usr/sbin/tc"];
/// netem's delay distribution tables (`normal.dist`, `pareto.dist`, …): `tc … netem delay 100ms 10ms` reads them.
const TC_DIST_DIR: &str = "/usr/lib/x86_64-linux-gnu/tc";
const QEMU: &str = "qemu-system-x86_64";
const KERNEL_CMDLINE: &str = "console=ttyS0 quiet panic=-1";
/// vCPUs by default: room for the agent next to the measuring program. Under TCG a wake-up that crosses vCPUs waits
/// for the target's next tick (4 ms at HZ=250): a 100 ms netem delay measured 101.6–106 ms median (p90 up to 112 ms)
/// with an unpinned prober, 101.0–101.1 ms (p90 ≤ 101.4 ms) with the prober pinned to one vCPU
/// (`chaos_tests::measure::pin_to_cpu`) or with `-smp 1`. `idle=poll` also helps but burns 4× the host CPU.
pub const DEFAULT_CPUS: u8 = 2;
/// Extra seconds `timeout` waits after SIGTERM before SIGKILL.
const KILL_AFTER_SECS: u64 = 5;

/// The kernel a guest boots, as written by `cargo xtask vm-prepare`.
#[derive(Debug, Clone)]
pub struct VmAssets {
    /// `vmlinuz-<abi>`.
    pub kernel: PathBuf,
    /// `lib/modules/<abi>` with a `modules.dep` built by `depmod -b`.
    pub modules_dir: PathBuf,
    /// Kernel release, e.g. `6.1.0-56-amd64`.
    pub abi: String,
}

impl VmAssets {
    /// Reads `$CHAOS_VM_ASSETS`, else `<target>/vm/assets.env` (`$CARGO_TARGET_DIR` or the workspace's `target/`).
    ///
    /// # Errors
    /// When the file is missing or incomplete, or names files that do not exist; the message says to run
    /// `cargo xtask vm-prepare`.
    pub fn locate() -> Result<Self> {
        let path = match std::env::var_os(ASSETS_ENV_VAR) {
            Some(path) => PathBuf::from(path),
            None => default_assets_env(),
        };
        Self::from_env_file(&path)
    }

    /// Parses an `assets.env` (`KERNEL=`, `MODULES_DIR=`, `ABI=` lines).
    ///
    /// # Errors
    /// As [`VmAssets::locate`].
    pub fn from_env_file(path: &Path) -> Result<Self> {
        let hint = "run `cargo xtask vm-prepare` (as root) to fetch qemu and the guest kernel";
        let text = fs::read_to_string(path).with_context(|| format!("no VM assets at {}: {hint}", path.display()))?;
        let vars: HashMap<&str, &str> =
            text.lines().filter(|l| !l.trim_start().starts_with('#')).filter_map(|l| l.split_once('=')).collect();
        let get = |key: &str| {
            vars.get(key)
                .map(|v| v.trim().to_string())
                .with_context(|| format!("{} has no {key}=: {hint}", path.display()))
        };
        let assets = Self { kernel: get("KERNEL")?.into(), modules_dir: get("MODULES_DIR")?.into(), abi: get("ABI")? };
        if !assets.kernel.is_file() {
            bail!("kernel {} (from {}) is missing: {hint}", assets.kernel.display(), path.display());
        }
        if !assets.modules_dir.join("modules.dep").is_file() {
            bail!("{}/modules.dep (from {}) is missing: {hint}", assets.modules_dir.display(), path.display());
        }
        Ok(assets)
    }
}

/// Environment variable naming the guest's test binary (default: built and located by [`guest_tests_binary`]).
pub const GUEST_TESTS_ENV: &str = "CHAOS_VM_GUEST_TESTS";
/// The test target of `tests/Cargo.toml` whose `#[test]`s run inside the guest (`test = false`: never on the host).
pub const GUEST_TESTS_TARGET: &str = "chaos-vm-guest";

/// The libtest binary of [`GUEST_TESTS_TARGET`]: `$CHAOS_VM_GUEST_TESTS`, else what `cargo test --no-run
/// --workspace --test chaos-vm-guest` (in the profile this process was built in; `--workspace` so features resolve
/// as in the runner's build and nothing is compiled twice) reports as its executable — test binaries carry a hash
/// in their name, so only cargo knows which is current. Builds it if needed.
///
/// # Errors
/// When cargo fails or reports no such executable.
pub fn guest_tests_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(GUEST_TESTS_ENV) {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().context("locating myself")?;
    // target/<profile>/deps/<test>-<hash> or target/<profile>/<bin>
    let mut dir = exe.parent().context("exe without a directory")?;
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir.parent().context("deps without a parent")?;
    }
    let profile = dir.file_name().and_then(|n| n.to_str()).unwrap_or("debug");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("Cargo.toml");
    let mut cmd = Command::new(cargo);
    cmd.args(["test", "--no-run", "--workspace", "--test", GUEST_TESTS_TARGET, "--message-format=json"])
        .arg("--manifest-path")
        .arg(&manifest)
        .args(["--profile", if profile == "debug" { "dev" } else { profile }])
        .stderr(Stdio::inherit());
    let out = cmd.output().context("running cargo test --no-run")?;
    if !out.status.success() {
        bail!("cargo test --no-run --test {GUEST_TESTS_TARGET} failed ({})", out.status);
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == GUEST_TESTS_TARGET)
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .with_context(|| format!("cargo reported no executable for the test target {GUEST_TESTS_TARGET}"))
}

fn default_assets_env() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ lives in the workspace").join("target")
    });
    target.join("vm").join("assets.env")
}

/// A built guest: a temporary directory holding `initrd.cpio.gz` (removed on drop), and the kernel to boot it with.
#[derive(Debug)]
pub struct Guest {
    dir: tempfile::TempDir,
    kernel: PathBuf,
    cpus: u8,
    memory_mib: u32,
    qemu_args: Vec<String>,
    kernel_args: Vec<String>,
    initrd_bytes: u64,
    build_time: Duration,
}

/// Collects what goes into a [`Guest`]; nothing is read from disk until [`GuestBuilder::build`].
#[derive(Debug)]
pub struct GuestBuilder {
    assets: VmAssets,
    binaries: Vec<(PathBuf, String)>,
    files: Vec<(PathBuf, String)>,
    bytes: Vec<(String, Vec<u8>, u32)>,
    modules: Vec<String>,
    command: Option<String>,
    init: Option<PathBuf>,
    exec: Vec<String>,
    env: Vec<(String, String)>,
    cpus: u8,
    memory_mib: u32,
    qemu_args: Vec<String>,
    kernel_args: Vec<String>,
}

impl Guest {
    /// Starts a guest with busybox, iproute2 and [`DEFAULT_MODULES`].
    pub fn builder(assets: &VmAssets) -> GuestBuilder {
        GuestBuilder {
            assets: assets.clone(),
            binaries: IPROUTE2.iter().map(|p| (PathBuf::from(p), (*p).to_string())).collect(),
            files: Vec::new(),
            bytes: Vec::new(),
            modules: DEFAULT_MODULES.iter().map(|m| (*m).to_string()).collect(),
            command: None,
            init: None,
            exec: Vec::new(),
            env: Vec::new(),
            cpus: DEFAULT_CPUS,
            memory_mib: 1024,
            qemu_args: Vec::new(),
            kernel_args: Vec::new(),
        }
    }

    /// The gzip cpio handed to qemu as `-initrd`.
    pub fn initrd(&self) -> PathBuf {
        self.dir.path().join("initrd.cpio.gz")
    }

    /// Size of the compressed initramfs.
    pub fn initrd_bytes(&self) -> u64 {
        self.initrd_bytes
    }

    /// Time [`GuestBuilder::build`] took.
    pub fn build_time(&self) -> Duration {
        self.build_time
    }

    /// Boots the guest under `timeout <limit> qemu-system-x86_64 -accel tcg …` and collects its console.
    ///
    /// A guest that hangs is killed by `timeout` (SIGTERM, SIGKILL 5 s later); the run then has `done == false`
    /// and [`GuestRun::console_tail`] shows how far it got.
    ///
    /// # Errors
    /// When `timeout` or qemu cannot be started or the console cannot be read. A guest that fails, panics or times
    /// out is not an error: look at [`GuestRun::ok`].
    pub fn run(&self, limit: Duration) -> Result<GuestRun> {
        let mut cmd = Command::new("timeout");
        cmd.arg(format!("--kill-after={KILL_AFTER_SECS}"))
            .arg(format!("{}", limit.as_secs().max(1)))
            .arg(QEMU)
            // TCG only: /dev/kvm here hangs a Debian kernel in the decompressor; never `-cpu host`.
            .args(["-accel", "tcg", "-smp", &self.cpus.to_string(), "-m", &self.memory_mib.to_string()])
            .args(["-nographic", "-no-reboot"])
            // No NIC at all: traffic stays inside the guest.
            .args(["-nic", "none"])
            .args(&self.qemu_args)
            .arg("-kernel")
            .arg(&self.kernel)
            .arg("-initrd")
            .arg(self.initrd())
            .arg("-append")
            .arg(
                std::iter::once(KERNEL_CMDLINE)
                    .chain(self.kernel_args.iter().map(String::as_str))
                    .collect::<Vec<_>>()
                    .join(" "),
            )
            // qemu would put a terminal on stdin into raw mode.
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let echo = std::env::var(ECHO_ENV_VAR).is_ok_and(|v| v == "1");
        let started = Instant::now();
        let mut child = cmd.spawn().with_context(|| format!("starting timeout {QEMU} (run cargo xtask vm-prepare)"))?;
        let stderr = child.stderr.take().expect("piped");
        let stderr = thread::spawn(move || {
            let mut text = String::new();
            let _ = io::Read::read_to_string(&mut BufReader::new(stderr), &mut text);
            text
        });
        let mut console = String::new();
        let mut reader = BufReader::new(child.stdout.take().expect("piped"));
        let mut line = Vec::new();
        loop {
            line.clear();
            if reader.read_until(b'\n', &mut line).context("reading the guest console")? == 0 {
                break;
            }
            let text = String::from_utf8_lossy(&line);
            let text = strip_terminal_escapes(text.trim_end_matches(['\r', '\n']));
            if echo {
                eprintln!("guest| {text}");
            }
            console.push_str(&text);
            console.push('\n');
        }
        let status = child.wait().context("waiting for qemu")?;
        let wall = started.elapsed();
        let qemu_stderr = stderr.join().unwrap_or_default();
        let (results, done) = parse_console(&console);
        let module_failures =
            console.lines().filter_map(|l| l.strip_prefix("GUEST-MODULE-FAILED ")).map(str::to_string).collect();
        let tests = parse_libtest(&console);
        Ok(GuestRun { results, tests, done, module_failures, console, qemu_stderr, status, wall })
    }
}

impl GuestBuilder {
    /// Adds a host executable at `guest_path`, with the shared libraries `ldd` lists (at the same paths).
    pub fn binary(mut self, host: impl Into<PathBuf>, guest_path: impl Into<String>) -> Self {
        self.binaries.push((host.into(), guest_path.into()));
        self
    }

    /// Adds a host file at `guest_path` (mode copied).
    pub fn file(mut self, host: impl Into<PathBuf>, guest_path: impl Into<String>) -> Self {
        self.files.push((host.into(), guest_path.into()));
        self
    }

    /// Adds a file with the given content and mode.
    pub fn bytes(mut self, guest_path: impl Into<String>, contents: impl Into<Vec<u8>>, mode: u32) -> Self {
        self.bytes.push((guest_path.into(), contents.into(), mode));
        self
    }

    /// Leaves one of [`DEFAULT_MODULES`] out: a guest whose kernel lacks it (its file is not in the image either,
    /// unless added with [`GuestBuilder::file`] elsewhere than the module tree).
    pub fn without_module(mut self, name: &str) -> Self {
        self.modules.retain(|m| m != name);
        self
    }

    /// Adds a kernel module by name (`sch_netem`, `crc32c-generic` ≡ `crc32c_generic`); its dependencies come
    /// along from `modules.dep`. `/init` loads modules in the order added, dependencies first.
    pub fn module(mut self, name: impl Into<String>) -> Self {
        self.modules.push(name.into());
        self
    }

    /// The shell command line `/init` runs once the guest is set up (stdout and stderr go to the console).
    pub fn command(mut self, command: impl Into<String>) -> Self {
        self.command = Some(command.into());
        self
    }

    /// A Rust `/init` instead of the shell script: the host binary `chaos-vm-init` (with its libraries), which
    /// mounts, loads the modules, brings `lo` up, runs [`GuestBuilder::exec`]'s command with
    /// [`GuestBuilder::env`], prints `GUEST-DONE` and powers off (see `tests/src/bin/chaos-vm-init.rs`).
    pub fn init(mut self, host_init: impl Into<PathBuf>) -> Self {
        self.init = Some(host_init.into());
        self
    }

    /// The command line the Rust `/init` runs (no shell involved), e.g. a libtest binary and its arguments.
    pub fn exec<S: Into<String>>(mut self, argv: impl IntoIterator<Item = S>) -> Self {
        self.exec = argv.into_iter().map(Into::into).collect();
        self
    }

    /// An environment variable of the command the Rust `/init` runs (besides `PATH` and `HOME`).
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// vCPUs for qemu's `-smp` (default [`DEFAULT_CPUS`]).
    pub fn cpus(mut self, cpus: u8) -> Self {
        self.cpus = cpus.max(1);
        self
    }

    /// Guest memory for qemu's `-m` (default 1024 MiB).
    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }

    /// Extra qemu arguments (e.g. `-drive file=…,if=virtio,snapshot=on`; never a NIC).
    pub fn qemu_arg(mut self, arg: impl Into<String>) -> Self {
        self.qemu_args.push(arg.into());
        self
    }

    /// An extra kernel command-line argument (e.g. `idle=poll`), after `console=ttyS0 quiet panic=-1`.
    pub fn kernel_arg(mut self, arg: impl Into<String>) -> Self {
        self.kernel_args.push(arg.into());
        self
    }

    /// Writes the initramfs into a new temporary directory.
    ///
    /// # Errors
    /// When a file, binary, library or module cannot be read, `ldd` fails on a binary, a module is unknown to
    /// `modules.dep`, or no command was given.
    pub fn build(self) -> Result<Guest> {
        let started = Instant::now();
        let mut image = Image::default();
        for dir in ["/dev", "/proc", "/sys", "/tmp", "/run", "/root", "/etc", "/bin", "/sbin", "/usr/bin", "/usr/sbin"]
        {
            image.dir(dir);
        }
        image.insert("/dev/console", Node::CharDevice { major: 5, minor: 1 });
        image.file_from_host(Path::new(BUSYBOX), BUSYBOX)?;
        image.insert("/bin/sh", Node::Symlink("busybox".into()));

        let scratch = tempfile::Builder::new().prefix("chaos-vm-strip.").tempdir().context("creating a temp dir")?;
        for (host, guest) in &self.binaries {
            image.executable_from_host(host, guest, scratch.path())?;
            for lib in shared_libraries(host)? {
                let guest_lib = lib.to_string_lossy().into_owned();
                if !image.contains(&guest_lib) {
                    image.file_from_host(&lib, &guest_lib)?;
                }
            }
        }
        for entry in fs::read_dir(TC_DIST_DIR).with_context(|| format!("reading {TC_DIST_DIR} (iproute2)"))? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "dist") {
                let guest = path.to_string_lossy().into_owned();
                image.file_from_host(&path, &guest)?;
            }
        }
        for (host, guest) in &self.files {
            image.file_from_host(host, guest)?;
        }
        for (guest, data, mode) in &self.bytes {
            image.insert(guest, Node::File { data: data.clone(), mode: *mode });
        }

        let index = ModuleIndex::read(&self.assets.modules_dir)?;
        let modules = index.load_order(&self.modules)?;
        let guest_modules_dir = format!("/lib/modules/{}", self.assets.abi);
        let mut module_paths = Vec::new();
        for relative in &modules {
            let guest = format!("{guest_modules_dir}/{relative}");
            image.file_from_host(&self.assets.modules_dir.join(relative), &guest)?;
            module_paths.push(guest);
        }
        self.write_init(&mut image, &module_paths, scratch.path())?;

        let dir = tempfile::Builder::new().prefix("chaos-vm-guest.").tempdir().context("creating a temp dir")?;
        let initrd = dir.path().join("initrd.cpio.gz");
        let file = fs::File::create(&initrd).with_context(|| format!("creating {}", initrd.display()))?;
        let mut gz = GzEncoder::new(io::BufWriter::new(file), Compression::fast());
        image.write_cpio(&mut gz).context("writing the initramfs")?;
        gz.finish()?.flush()?;
        let initrd_bytes = fs::metadata(&initrd)?.len();
        Ok(Guest {
            dir,
            kernel: self.assets.kernel.clone(),
            cpus: self.cpus,
            memory_mib: self.memory_mib,
            qemu_args: self.qemu_args,
            kernel_args: self.kernel_args,
            initrd_bytes,
            build_time: started.elapsed(),
        })
    }
}

impl GuestBuilder {
    /// `/init`: the Rust init and its configuration, or the shell script running [`GuestBuilder::command`].
    fn write_init(&self, image: &mut Image, module_paths: &[String], scratch: &Path) -> Result<()> {
        let Some(init) = &self.init else {
            let command = self.command.as_deref().context("GuestBuilder::command was not called")?;
            image.insert("/init", Node::File { data: init_script(module_paths, command).into_bytes(), mode: 0o755 });
            return Ok(());
        };
        if self.exec.is_empty() {
            bail!("GuestBuilder::init needs GuestBuilder::exec: the guest would do nothing");
        }
        image.executable_from_host(init, "/init", scratch)?;
        for lib in shared_libraries(init)? {
            let guest_lib = lib.to_string_lossy().into_owned();
            if !image.contains(&guest_lib) {
                image.file_from_host(&lib, &guest_lib)?;
            }
        }
        let mut conf = String::from("# read by /init (chaos-vm-init), written by chaos_tests::vm::GuestBuilder\n");
        for module in module_paths {
            let _ = writeln!(conf, "module {module}");
        }
        for (key, value) in &self.env {
            let _ = writeln!(conf, "env {key}={value}");
        }
        for arg in &self.exec {
            let _ = writeln!(conf, "arg {arg}");
        }
        image.insert("/etc/chaos-vm-init.conf", Node::File { data: conf.into_bytes(), mode: 0o644 });
        Ok(())
    }
}

/// `/init`: mount the pseudo filesystems, load the modules, bring up `lo`, run the command, report, power off.
fn init_script(modules: &[String], command: &str) -> String {
    let mut s = String::from(
        "#!/bin/sh\n\
         # Generated by chaos_tests::vm. PID 1 of the guest; its stdout is the serial console.\n\
         /bin/busybox mount -t proc proc /proc\n\
         /bin/busybox --install -s\n\
         export PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root\n\
         mount -t sysfs sysfs /sys\n\
         mount -t devtmpfs devtmpfs /dev\n\
         mkdir -p /sys/fs/bpf && mount -t bpf bpf /sys/fs/bpf\n\
         mount -t tmpfs tmpfs /tmp\n\
         mount -t tmpfs tmpfs /run\n\
         echo \"GUEST-BOOT uptime=$(cut -d' ' -f1 /proc/uptime) kernel=$(uname -r)\"\n\
         load() { insmod \"$1\" 2>/tmp/insmod.err || echo \"GUEST-MODULE-FAILED $1 $(cat /tmp/insmod.err)\"; }\n",
    );
    for module in modules {
        let _ = writeln!(s, "load {module}");
    }
    let _ = write!(
        s,
        "/usr/sbin/ip link set lo up\n\
         cd /root\n\
         {command}\n\
         status=$?\n\
         echo \"GUEST-DONE exit=$status uptime=$(cut -d' ' -f1 /proc/uptime)\"\n\
         poweroff -f\n"
    );
    s
}

/// One `RESULT` line.
#[derive(Debug, Clone, PartialEq)]
pub struct ScenarioResult {
    pub name: String,
    pub passed: bool,
    /// `key=value` pairs in the order printed (measured numbers, e.g. `netem_ms=101.1`).
    pub values: Vec<(String, String)>,
}

impl ScenarioResult {
    /// The value printed for `key`.
    pub fn value(&self, key: &str) -> Option<&str> {
        self.values.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// The value printed for `key`, as a number.
    pub fn number(&self, key: &str) -> Option<f64> {
        self.value(key)?.parse().ok()
    }

    /// `key=value …` as printed.
    pub fn values_line(&self) -> String {
        self.values.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ")
    }
}

/// The end of a guest run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GuestDone {
    /// Exit status of the guest command.
    pub exit: i32,
    /// Guest uptime in seconds when it finished.
    pub uptime_s: Option<f64>,
}

/// What a boot produced.
#[derive(Debug)]
pub struct GuestRun {
    pub results: Vec<ScenarioResult>,
    /// The verdicts of a libtest binary the guest ran (`test <name> ... ok|FAILED|ignored`), in the order run.
    pub tests: Vec<TestOutcome>,
    /// `Some` when `GUEST-DONE` was printed; `None` means the guest hung, crashed or was killed by `timeout`.
    pub done: Option<GuestDone>,
    /// `GUEST-MODULE-FAILED` lines: modules `/init` could not load (`<path> <insmod's error>`).
    pub module_failures: Vec<String>,
    /// The whole serial console (`\r` stripped).
    pub console: String,
    pub qemu_stderr: String,
    /// `timeout`'s status: 124 when it had to stop qemu.
    pub status: ExitStatus,
    /// Wall time from starting qemu to its exit.
    pub wall: Duration,
}

impl GuestRun {
    /// `GUEST-DONE` seen, the guest command exited 0, every module loaded, at least one scenario, and all passed.
    pub fn ok(&self) -> bool {
        self.done.is_some_and(|d| d.exit == 0)
            && self.module_failures.is_empty()
            && !self.results.is_empty()
            && self.results.iter().all(|r| r.passed)
    }

    /// The scenarios that failed.
    pub fn failures(&self) -> impl Iterator<Item = &ScenarioResult> {
        self.results.iter().filter(|r| !r.passed)
    }

    /// libtest's verdict on one test of the guest's test binary.
    pub fn test(&self, name: &str) -> Option<TestVerdict> {
        self.tests.iter().find(|t| t.name == name).map(|t| t.verdict)
    }

    /// The result of one scenario.
    pub fn result(&self, name: &str) -> Option<&ScenarioResult> {
        self.results.iter().find(|r| r.name == name)
    }

    /// The last `lines` lines of the console (and qemu's stderr, if any).
    pub fn console_tail(&self, lines: usize) -> String {
        let mut tail = chaos_test_support::process::tail_of(&self.console, lines);
        if !self.qemu_stderr.trim().is_empty() {
            let _ = write!(tail, "\n--- qemu stderr ---\n{}", self.qemu_stderr.trim_end());
        }
        tail
    }

    /// A per-scenario table: scenario, pass/fail, measured numbers.
    pub fn table(&self) -> String {
        format_table(&self.results)
    }
}

/// Drops terminal control sequences (SeaBIOS clears the screen with `ESC c ESC [?7l ESC [2J` before the kernel
/// prints anything) so console lines start with what the guest printed.
fn strip_terminal_escapes(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\x1b' {
            out.push(c);
            continue;
        }
        if chars.next_if_eq(&'[').is_some() {
            // CSI: parameters and intermediates up to a final byte in @..~.
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        } else {
            // Two-byte sequence such as `ESC c`.
            chars.next();
        }
    }
    out
}

/// What libtest said about one test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestVerdict {
    Ok,
    Failed,
    Ignored,
}

/// One test of a libtest binary run in the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestOutcome {
    /// The test's path in its binary (e.g. `compare_delay_10ms`).
    pub name: String,
    pub verdict: TestVerdict,
}

/// libtest's lines in a console transcript: `test <name> ... <verdict>`, where with one test thread and
/// `--nocapture` the test's own output comes between `test <name> ... ` and its verdict, which then stands alone
/// on a line (`ok`, `FAILED`, `ignored[, reason]`). Other lines are ignored.
pub fn parse_libtest(console: &str) -> Vec<TestOutcome> {
    let verdict = |text: &str| match text.trim() {
        "ok" => Some(TestVerdict::Ok),
        "FAILED" => Some(TestVerdict::Failed),
        t if t == "ignored" || t.starts_with("ignored, ") => Some(TestVerdict::Ignored),
        _ => None,
    };
    let mut tests = Vec::new();
    let mut running: Option<String> = None;
    for line in console.lines() {
        if let Some((name, rest)) = line.strip_prefix("test ").and_then(|l| l.split_once(" ... "))
            && !name.contains(' ')
        {
            match verdict(rest) {
                Some(v) => tests.push(TestOutcome { name: name.to_owned(), verdict: v }),
                None => running = Some(name.to_owned()),
            }
            continue;
        }
        if let Some(v) = verdict(line)
            && let Some(name) = running.take()
        {
            tests.push(TestOutcome { name, verdict: v });
        }
    }
    tests
}

/// Finds the `RESULT` and `GUEST-DONE` lines in a console transcript (other lines are ignored).
pub fn parse_console(console: &str) -> (Vec<ScenarioResult>, Option<GuestDone>) {
    let mut results = Vec::new();
    let mut done = None;
    for line in console.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("RESULT") => {
                let (Some(name), Some(verdict)) = (words.next(), words.next()) else { continue };
                let passed = match verdict {
                    "pass" => true,
                    "fail" => false,
                    _ => continue,
                };
                let values =
                    words.filter_map(|w| w.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect();
                results.push(ScenarioResult { name: name.to_string(), passed, values });
            }
            Some("GUEST-DONE") => {
                let mut exit = None;
                let mut uptime_s = None;
                for (k, v) in words.filter_map(|w| w.split_once('=')) {
                    match k {
                        "exit" => exit = v.parse().ok(),
                        "uptime" => uptime_s = v.parse().ok(),
                        _ => {}
                    }
                }
                done = Some(GuestDone { exit: exit.unwrap_or(-1), uptime_s });
            }
            _ => {}
        }
    }
    (results, done)
}

/// Renders results as an aligned table.
pub fn format_table(results: &[ScenarioResult]) -> String {
    let width = results.iter().map(|r| r.name.len()).max().unwrap_or(0).max("scenario".len());
    let mut s = format!("{:<width$}  {:<6}  measured\n", "scenario", "result");
    for r in results {
        let _ = writeln!(s, "{:<width$}  {:<6}  {}", r.name, if r.passed { "pass" } else { "FAIL" }, r.values_line());
    }
    s
}

/// The raw-netem vs agent comparison: every `agent-<x>` result that has a `tc-<x>` twin from the same boot, one row
/// each. Delay rows show the median RTT, what the fault added to the no-fault median, p90 and the standard
/// deviation (ms), and the agent's accuracy: its median and p90 minus raw netem's (Δp50, Δp90); loss rows the
/// measured loss (%).
pub fn comparison_table(results: &[ScenarioResult]) -> String {
    let pairs: Vec<(&str, &ScenarioResult, &ScenarioResult)> = results
        .iter()
        .filter_map(|ours| {
            let name = ours.name.strip_prefix("agent-")?;
            let raw = results.iter().find(|r| r.name.strip_prefix("tc-") == Some(name))?;
            // Rows with neither a round trip nor a loss rate (e.g. TCP retransmissions) are not compared here.
            (ours.value("ms").is_some() || ours.value("loss_pct").is_some()).then_some((name, raw, ours))
        })
        .collect();
    if pairs.is_empty() {
        return "(no scenario ran both through raw tc netem and through the agent)\n".into();
    }
    let width = pairs.iter().map(|(n, ..)| n.len()).max().unwrap_or(0).max("scenario".len());
    let num = |r: &ScenarioResult, k: &str| r.number(k).map_or_else(|| "-".to_string(), |v| format!("{v:.2}"));
    let mut s = format!(
        "{:<width$}  {:>9}  {:^30}  {:^30}  {:^15}\n",
        "", "", "raw tc netem", "lymph-chaos agent", "agent − raw"
    );
    let _ = writeln!(
        s,
        "{:<width$}  {:>9}  {:>7} {:>7} {:>7} {:>6}  {:>7} {:>7} {:>7} {:>6}  {:>7} {:>7}",
        "scenario", "want", "median", "added", "p90", "stdev", "median", "added", "p90", "stdev", "Δp50", "Δp90",
    );
    for (name, raw, ours) in pairs {
        if let (Some(raw_loss), Some(our_loss)) = (raw.number("loss_pct"), ours.number("loss_pct")) {
            let want = ours.number("want_pct").map_or_else(|| "-".into(), |w| format!("{w:.0} %"));
            let _ = writeln!(
                s,
                "{name:<width$}  {want:>9}  {:>30}  {:>30}  {:>+7.2}",
                format!("loss {raw_loss:.2} %"),
                format!("loss {our_loss:.2} %"),
                our_loss - raw_loss
            );
            continue;
        }
        let want = match (ours.number("want_ms"), ours.number("jitter_ms")) {
            (Some(w), Some(j)) => format!("{w:.0}±{j:.0} ms"),
            (Some(w), None) => format!("{w:.0} ms"),
            _ => "-".into(),
        };
        let delta = |key: &str| match (raw.number(key), ours.number(key)) {
            (Some(r), Some(o)) => format!("{:+.2}", o - r),
            _ => "-".into(),
        };
        let (d50, d90) = (delta("ms"), delta("p90_ms"));
        let _ = writeln!(
            s,
            "{name:<width$}  {want:>9}  {:>7} {:>7} {:>7} {:>6}  {:>7} {:>7} {:>7} {:>6}  {d50:>7} {d90:>7}",
            num(raw, "ms"),
            num(raw, "extra_ms"),
            num(raw, "p90_ms"),
            num(raw, "stdev_ms"),
            num(ours, "ms"),
            num(ours, "extra_ms"),
            num(ours, "p90_ms"),
            num(ours, "stdev_ms"),
        );
    }
    s
}

/// Shared libraries of a dynamically linked executable, as `ldd` resolves them (loader included; vdso excluded).
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(binary).output().context("running ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        let all = format!("{text}{}", String::from_utf8_lossy(&out.stderr));
        if all.contains("not a dynamic executable") || all.contains("statically linked") {
            return Ok(Vec::new());
        }
        bail!("ldd {} failed: {}", binary.display(), all.trim());
    }
    parse_ldd(&text).with_context(|| format!("ldd {}", binary.display()))
}

/// Parses `ldd` output: `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)` and `/lib64/ld-linux-x86-64.so.2 (0x…)`.
fn parse_ldd(text: &str) -> Result<Vec<PathBuf>> {
    let mut libs = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let path = match line.split_once("=>") {
            Some((name, rest)) => {
                let target = rest.trim();
                if target.starts_with("not found") {
                    bail!("{} not found", name.trim());
                }
                target.split_whitespace().next().unwrap_or_default()
            }
            None => line.split_whitespace().next().unwrap_or_default(),
        };
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

/// `modules.dep` of the guest kernel.
struct ModuleIndex {
    /// Normalised module name (`-` → `_`) → path relative to the modules dir.
    paths: HashMap<String, String>,
    /// Relative path → its dependencies' relative paths.
    deps: HashMap<String, Vec<String>>,
    builtin: Vec<String>,
}

impl ModuleIndex {
    fn read(modules_dir: &Path) -> Result<Self> {
        let dep_file = modules_dir.join("modules.dep");
        let text = fs::read_to_string(&dep_file).with_context(|| format!("reading {}", dep_file.display()))?;
        let mut index = Self::parse(&text);
        if let Ok(builtin) = fs::read_to_string(modules_dir.join("modules.builtin")) {
            index.builtin = builtin.lines().filter_map(module_name).collect();
        }
        Ok(index)
    }

    fn parse(modules_dep: &str) -> Self {
        let mut paths = HashMap::new();
        let mut deps = HashMap::new();
        for line in modules_dep.lines() {
            let Some((module, rest)) = line.split_once(':') else { continue };
            if let Some(name) = module_name(module) {
                paths.insert(name, module.to_string());
            }
            deps.insert(module.to_string(), rest.split_whitespace().map(str::to_string).collect());
        }
        Self { paths, deps, builtin: Vec::new() }
    }

    /// Relative paths to insmod, dependencies before their users, each once.
    fn load_order(&self, names: &[String]) -> Result<Vec<String>> {
        let mut order = Vec::new();
        for name in names {
            let normalised = name.replace('-', "_");
            match self.paths.get(&normalised) {
                Some(path) => self.visit(path, &mut order, 0)?,
                None if self.builtin.contains(&normalised) => {}
                None => bail!("kernel module {name} is neither in modules.dep nor built in"),
            }
        }
        Ok(order)
    }

    fn visit(&self, path: &str, order: &mut Vec<String>, depth: usize) -> Result<()> {
        if order.iter().any(|p| p == path) {
            return Ok(());
        }
        if depth > 64 {
            bail!("module dependency cycle at {path}");
        }
        for dep in self.deps.get(path).map(Vec::as_slice).unwrap_or_default() {
            self.visit(dep, order, depth + 1)?;
        }
        order.push(path.to_string());
        Ok(())
    }
}

/// `kernel/net/sched/sch_netem.ko[.xz]` → `sch_netem`.
fn module_name(path: &str) -> Option<String> {
    let file = path.rsplit('/').next()?;
    let stem = file.split(".ko").next()?;
    (!stem.is_empty() && file.contains(".ko")).then(|| stem.replace('-', "_"))
}

/// The initramfs being assembled: guest path → node. Parents are created on insert.
#[derive(Default)]
struct Image {
    nodes: BTreeMap<String, Node>,
}

enum Node {
    Dir,
    File { data: Vec<u8>, mode: u32 },
    Symlink(String),
    CharDevice { major: u32, minor: u32 },
}

impl Image {
    fn contains(&self, path: &str) -> bool {
        self.nodes.contains_key(path.trim_start_matches('/'))
    }

    fn dir(&mut self, path: &str) {
        self.insert(path, Node::Dir);
    }

    fn insert(&mut self, path: &str, node: Node) {
        let path = path.trim_start_matches('/').to_string();
        let mut parent = String::new();
        for part in path.split('/').collect::<Vec<_>>().split_last().map(|(_, p)| p).unwrap_or_default() {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(part);
            self.nodes.entry(parent.clone()).or_insert(Node::Dir);
        }
        self.nodes.insert(path, node);
    }

    /// Copies a host executable without its debug information (`objcopy --strip-debug`, symbols kept for
    /// backtraces): a debug `lymph-chaos` is 160 MB with and 33 MB without. Copied as is when `objcopy` is missing
    /// or fails (e.g. not an ELF file).
    fn executable_from_host(&mut self, host: &Path, guest: &str, scratch: &Path) -> Result<()> {
        let stripped = scratch.join(format!("{}.stripped", self.nodes.len()));
        let ok = Command::new("objcopy")
            .arg("--strip-debug")
            .arg(host)
            .arg(&stripped)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return self.file_from_host(host, guest);
        }
        let data = fs::read(&stripped).with_context(|| format!("reading {}", stripped.display()))?;
        let _ = fs::remove_file(&stripped);
        let mode =
            fs::metadata(host).with_context(|| format!("reading {}", host.display()))?.permissions().mode() & 0o7777;
        self.insert(guest, Node::File { data, mode });
        Ok(())
    }

    /// Copies a host file's content (symlinks followed) and permission bits.
    fn file_from_host(&mut self, host: &Path, guest: &str) -> Result<()> {
        let data = fs::read(host).with_context(|| format!("reading {}", host.display()))?;
        let mode = fs::metadata(host)?.permissions().mode() & 0o7777;
        self.insert(guest, Node::File { data, mode });
        Ok(())
    }

    /// Writes a `newc` cpio archive (owner root, mtime 0), parents before children.
    fn write_cpio(&self, out: &mut impl Write) -> io::Result<()> {
        for (ino, (path, node)) in (1..).zip(&self.nodes) {
            let (mode, data, rdev): (u32, &[u8], (u32, u32)) = match node {
                Node::Dir => (0o040_755, &[], (0, 0)),
                Node::File { data, mode } => (0o100_000 | mode, data, (0, 0)),
                Node::Symlink(target) => (0o120_777, target.as_bytes(), (0, 0)),
                Node::CharDevice { major, minor } => (0o020_600, &[], (*major, *minor)),
            };
            write_cpio_entry(out, path, ino, mode, data, rdev)?;
        }
        write_cpio_entry(out, "TRAILER!!!", 0, 0, &[], (0, 0))
    }
}

/// One `newc` entry: 110-byte ASCII header, NUL-terminated name, data, each padded to 4 bytes.
fn write_cpio_entry(
    out: &mut impl Write,
    name: &str,
    ino: u32,
    mode: u32,
    data: &[u8],
    (rdev_major, rdev_minor): (u32, u32),
) -> io::Result<()> {
    let nlink = if mode & 0o170_000 == 0o040_000 { 2 } else { 1 };
    let name_size = name.len() + 1;
    let header = format!(
        "070701{ino:08x}{mode:08x}{uid:08x}{gid:08x}{nlink:08x}{mtime:08x}{size:08x}{maj:08x}{min:08x}\
         {rmaj:08x}{rmin:08x}{name_size:08x}{check:08x}",
        uid = 0,
        gid = 0,
        mtime = 0,
        size = data.len(),
        maj = 0,
        min = 0,
        rmaj = rdev_major,
        rmin = rdev_minor,
        check = 0,
    );
    out.write_all(header.as_bytes())?;
    out.write_all(name.as_bytes())?;
    out.write_all(&[0])?;
    out.write_all(&[0; 3][..pad4(header.len() + name_size)])?;
    out.write_all(data)?;
    out.write_all(&[0; 3][..pad4(data.len())])
}

fn pad4(len: usize) -> usize {
    (4 - len % 4) % 4
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_results_and_done() {
        let console = "GUEST-BOOT uptime=1.80 kernel=6.1.0-56-amd64\r\n\
                       RESULT netem-100ms pass netem_ms=101.1 base_ms=0.2\n\
                       noise\n\
                       RESULT loss-30 fail loss_pct=41.0\n\
                       GUEST-DONE exit=1 uptime=9.5\n";
        let (results, done) = parse_console(console);
        assert_eq!(results.len(), 2);
        assert!(results[0].passed);
        assert_eq!(results[0].number("netem_ms"), Some(101.1));
        assert_eq!(results[1].value("loss_pct"), Some("41.0"));
        assert_eq!(done, Some(GuestDone { exit: 1, uptime_s: Some(9.5) }));
        assert_eq!(parse_console("RESULT x pass\n").1, None);
    }

    #[test]
    fn parses_libtest_verdicts_around_test_output() {
        // One test thread with --nocapture: the output sits between the name and the verdict.
        let console = "running 4 tests\n\
                       test baseline ... \n\
                       + tc qdisc add dev lo root handle 1: htb default 1\n\
                       RESULT baseline pass v4_a_ms=0.30\n\
                       ok\n\
                       test compare_delay_10ms ... \n\
                       thread 'compare_delay_10ms' panicked at tests/guest/main.rs:1:1:\n\
                       FAILED\n\
                       test quick ... ok\n\
                       test skipped ... ignored, runs as root\n\
                       test result: FAILED. 2 passed; 1 failed; 1 ignored; 0 measured; 0 filtered out\n";
        let tests = parse_libtest(console);
        let verdicts: Vec<(&str, TestVerdict)> = tests.iter().map(|t| (t.name.as_str(), t.verdict)).collect();
        assert_eq!(
            verdicts,
            [
                ("baseline", TestVerdict::Ok),
                ("compare_delay_10ms", TestVerdict::Failed),
                ("quick", TestVerdict::Ok),
                ("skipped", TestVerdict::Ignored)
            ]
        );
        assert_eq!(parse_console(console).0.len(), 1, "RESULT lines inside a test's output still count");
    }

    #[test]
    fn compares_agent_rows_with_their_raw_twins() {
        let (results, _) = parse_console(
            "RESULT tc-delay-10ms-v4 pass ms=10.70 extra_ms=10.50 want_ms=10.00 p90_ms=10.90 stdev_ms=0.10\n\
             RESULT agent-delay-10ms-v4 pass ms=10.90 extra_ms=10.60 want_ms=10.00 p90_ms=11.00 stdev_ms=0.20\n\
             RESULT tc-loss-30pct-udp pass loss_pct=29.50 want_pct=30.00\n\
             RESULT agent-loss-30pct-udp pass loss_pct=30.25 want_pct=30.00\n\
             RESULT agent-reply-conn pass ms=100.3 extra_ms=100.1\n",
        );
        let table = comparison_table(&results);
        let row = table.lines().find(|l| l.starts_with("delay-10ms-v4")).unwrap();
        assert!(row.contains("10.70") && row.contains("10.90") && row.trim_end().ends_with("+0.20   +0.10"), "{table}");
        let loss = table.lines().find(|l| l.starts_with("loss-30pct-udp")).unwrap();
        assert!(loss.contains("loss 29.50 %") && loss.contains("loss 30.25 %") && loss.contains("+0.75"), "{table}");
        assert!(!table.contains("reply-conn"), "no raw twin, no row: {table}");
    }

    #[test]
    fn strips_seabios_screen_clearing() {
        assert_eq!(strip_terminal_escapes("\x1bc\x1b[?7l\x1b[2JGUEST-BOOT uptime=1.81"), "GUEST-BOOT uptime=1.81");
        assert_eq!(strip_terminal_escapes("plain"), "plain");
    }

    #[test]
    fn parses_ldd_output() {
        // `ldd /usr/sbin/tc` on Debian 12 (iproute2 6.1.0-3), trimmed.
        let text = "\tlinux-vdso.so.1 (0x00007fa8bd0d5000)\n\
                    \tlibbpf.so.1 => /lib/x86_64-linux-gnu/libbpf.so.1 (0x00007fa8bcfd3000)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007fa8bccb6000)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007fa8bd0d7000)\n";
        let libs = parse_ldd(text).unwrap();
        assert_eq!(
            libs,
            ["/lib/x86_64-linux-gnu/libbpf.so.1", "/lib/x86_64-linux-gnu/libc.so.6", "/lib64/ld-linux-x86-64.so.2"]
                .map(PathBuf::from)
        );
        assert!(parse_ldd("\tlibfoo.so.1 => not found\n").is_err());
    }

    #[test]
    fn module_dependencies_load_first() {
        let index = ModuleIndex::parse(
            "kernel/net/sched/sch_netem.ko:\n\
             kernel/net/sched/act_mirred.ko: kernel/net/sched/act_base.ko\n\
             kernel/net/sched/act_base.ko: kernel/lib/x.ko\n\
             kernel/lib/x.ko:\n\
             kernel/crypto/crc32c-generic.ko:\n",
        );
        let order = index.load_order(&["act_mirred".into(), "sch_netem".into(), "crc32c_generic".into()]).unwrap();
        assert_eq!(
            order,
            [
                "kernel/lib/x.ko",
                "kernel/net/sched/act_base.ko",
                "kernel/net/sched/act_mirred.ko",
                "kernel/net/sched/sch_netem.ko",
                "kernel/crypto/crc32c-generic.ko"
            ]
        );
        assert!(index.load_order(&["nope".into()]).is_err());
    }

    #[test]
    fn cpio_entries_are_padded_and_parents_come_first() {
        let mut image = Image::default();
        image.insert("/usr/sbin/tc", Node::File { data: b"abcde".to_vec(), mode: 0o755 });
        let mut out = Vec::new();
        image.write_cpio(&mut out).unwrap();
        let text = String::from_utf8_lossy(&out);
        let usr = text.find("usr\0").unwrap();
        let sbin = text.find("usr/sbin\0").unwrap();
        let tc = text.find("usr/sbin/tc\0").unwrap();
        assert!(usr < sbin && sbin < tc);
        assert!(text.ends_with("TRAILER!!!\0\0\0\0"), "trailer is padded to 4");
        assert_eq!(out.len() % 4, 0);
    }
}
