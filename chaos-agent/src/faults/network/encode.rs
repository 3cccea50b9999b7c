//! Pure encoders for the `TCA_OPTIONS` payloads of the tc objects the agent installs.
//!
//! Every `*_options` function returns the bytes that go *inside* the `TCA_OPTIONS` (= 2)
//! attribute of an `RTM_NEWQDISC` / `RTM_NEWTCLASS` / `RTM_NEWTFILTER` message, without that
//! attribute's own 4-byte header. Nothing here does I/O; the byte layout is what `tc` from
//! iproute2 6.1.0 sends for the equivalent command line, which the tests check byte for byte
//! against fixtures captured with `strace` (see the test module).
//!
//! # Conventions
//!
//! * **Byte order**: netlink carries integers in *host* byte order (it never leaves the machine),
//!   so every field is written with `to_ne_bytes`. On the x86-64/aarch64 hosts we run on that is
//!   little-endian, which is what the fixtures hold (the test module only builds on
//!   little-endian targets).
//! * **Attributes** are `struct rtattr { u16 rta_len; u16 rta_type; }` followed by the payload;
//!   `rta_len` counts header + payload (not the padding) and the next attribute starts at the
//!   next multiple of 4 (`RTA_ALIGN`), the gap zero-filled. A nest's `rta_len` covers its
//!   padded children. tc's `addattr_nest()` does *not* set `NLA_F_NESTED` on `TCA_OPTIONS` or
//!   on `TCA_BPF_ACT`; it is set only on `TCA_ACT_OPTIONS`, and we do the same.
//! * **Time** in the legacy structs is in packet-scheduler *ticks*: one tick is 64 ns
//!   (`PSCHED_SHIFT` = 6, fixed since Linux 2.6.31), which tc derives from `/proc/net/psched`
//!   (`000003e8 00000040 000f4240 …` → 1000/64 = 15.625 ticks per µs). tc first truncates
//!   times to whole microseconds, then multiplies; so do we.
//! * **Percentages** become `u32` probabilities scaled to `u32::MAX`, rounded half-to-even
//!   exactly like tc 6.1's `get_percent()` → `set_percent()`: `rint(percent / 100 * UINT32_MAX)`
//!   (older iproute2 called this `percent2prob`).
//!
//! # Layout
//!
//! ```text
//! netem (sch_netem.c parse_attr(): a struct, then attributes; not a proper nest)
//!   struct tc_netem_qopt { u32 latency /*ticks*/, limit /*packets*/, loss, gap, duplicate,
//!                          jitter /*ticks*/ }                                        24 B
//!   TCA_NETEM_CORR (1)      struct tc_netem_corr { delay_corr, loss_corr, dup_corr }  12 B
//!   TCA_NETEM_REORDER (3)   struct tc_netem_reorder { probability, correlation }       8 B
//!   TCA_NETEM_CORRUPT (4)   struct tc_netem_corrupt { probability, correlation }       8 B
//!   TCA_NETEM_RATE64 (8)    u64 bytes/s                 (only when rate >= 2^32 B/s)
//!   TCA_NETEM_RATE (6)      struct tc_netem_rate { u32 rate, s32 packet_overhead,
//!                                                  u32 cell_size, s32 cell_overhead } 16 B
//!   TCA_NETEM_LATENCY64 (10) / TCA_NETEM_JITTER64 (11)  s64 ns
//!                           (only beyond the 32-bit tick range, where tc 6.1 refuses)
//!   TCA_NETEM_PRNG_SEED (14) u64                        (order as iproute2 >= 6.6 sends it)
//!   TCA_NETEM_DELAY_DIST (2) s16[4096]                  (distribution table)
//!
//! htb qdisc (nest)
//!   TCA_HTB_INIT (2)        struct tc_htb_glob { version = 3, rate2quantum, defcls,
//!                                                debug, direct_pkts }                 20 B
//!   TCA_HTB_DIRECT_QLEN (5) u32                         (only when given)
//!
//! htb class (nest)
//!   TCA_HTB_RATE64 (6) / TCA_HTB_CEIL64 (7)  u64 B/s    (only when >= 2^32 B/s)
//!   TCA_HTB_PARMS (1)       struct tc_htb_opt { tc_ratespec rate, ceil; u32 buffer, cbuffer
//!                                               /*ticks*/, quantum, level, prio }     44 B
//!   TCA_HTB_RTAB (4) / TCA_HTB_CTAB (3)      u32[256]  transmit time per size cell
//!
//!   struct tc_ratespec { u8 cell_log; u8 linklayer; u16 overhead; s16 cell_align;
//!                        u16 mpu; u32 rate /*B/s, saturated at u32::MAX*/ }           12 B
//!
//! tbf (nest)
//!   TCA_TBF_PARMS (1)       struct tc_tbf_qopt { tc_ratespec rate, peakrate;
//!                                                u32 limit /*bytes*/, buffer, mtu /*ticks*/ } 36 B
//!   TCA_TBF_BURST (6)       u32 bytes
//!   TCA_TBF_RATE64 (4)      u64                         (only when rate >= 2^32 B/s)
//!   TCA_TBF_RTAB (2)        u32[256]
//!   TCA_TBF_PRATE64 (5), TCA_TBF_PBURST (7), TCA_TBF_PTAB (3)   (only with a peak rate)
//!
//! pfifo / bfifo
//!   struct tc_fifo_qopt { u32 limit /*packets resp. bytes*/ }                          4 B
//!
//! cls_bpf (nest)
//!   [TCA_BPF_ACT (1) { 1 { TCA_ACT_KIND (1) "mirred\0",
//!                          TCA_ACT_OPTIONS|NLA_F_NESTED (2) { TCA_MIRRED_PARMS (2)
//!                            struct tc_mirred { u32 index, capab; s32 action, refcnt,
//!                                               bindcnt; s32 eaction; u32 ifindex } 28 B } } }]
//!   [TCA_BPF_CLASSID (3)    u32]
//!   TCA_BPF_FD (6)          u32 program fd
//!   TCA_BPF_NAME (7)        NUL-terminated annotation
//!   [TCA_BPF_FLAGS (8)      u32 TCA_BPF_FLAG_ACT_DIRECT]
//! ```
//!
//! Structs and numbers are those of `include/uapi/linux/pkt_sched.h`, `pkt_cls.h` and
//! `tc_act/tc_mirred.h`; the computations (`tc_calc_rtable`, `tc_calc_xmittime`, default HTB
//! burst, TBF limit from latency) follow `tc/tc_core.c`, `tc/q_htb.c`, `tc/q_tbf.c`,
//! `tc/q_netem.c`, `tc/f_bpf.c` and `tc/m_mirred.c` of iproute2 6.1.0, including their
//! double-precision arithmetic and C truncations, so the results are bit-identical.
//!
//! # Kernel caveats
//!
//! * On `tc qdisc change`/`replace` of an existing netem, the kernel keeps the previous value of
//!   every *attribute* that is absent (correlations, reorder, corrupt, rate, distribution); only
//!   `tc_netem_qopt` is always replaced. Since these encoders omit zero-valued attributes (like
//!   tc omits keywords not given), clearing e.g. a correlation needs delete + add, not change.
//! * `TCA_NETEM_PRNG_SEED` exists since Linux 6.6 (2023). Older kernels parse netem attributes
//!   with `nla_parse_deprecated()`, which silently ignores types above their `TCA_NETEM_MAX`:
//!   the seed is dropped without error and the losses stay unseeded. A 6.6+ kernel echoes the
//!   seed in its qdisc dump, which is how a caller can tell.
//! * Current kernels cap netem jitter at `INT_MAX` ns (≈ 2.1 s), and netem's distribution
//!   tables scale jitter by up to ±4 (table values span ±32767/8192).
//! * HTB has no byte-valued burst attribute: the kernel uses `tc_htb_opt.buffer`, which tc
//!   computes as whole microseconds of transmit time, then ticks. Above ~12.8 Gbit/s tc's
//!   default burst (1600 B + rate/1e9) lasts under 1 µs and becomes **0** (`tc class show`
//!   prints `burst 0b`, seen on Linux 6.18): give an explicit burst at multi-gigabit rates.
//!   TBF does not suffer from this: the kernel prefers `TCA_TBF_BURST` (bytes).

use std::fmt;
use std::sync::OnceLock;
use std::time::Duration;

// ---------------------------------------------------------------------------------------------
// Netlink attribute plumbing
// ---------------------------------------------------------------------------------------------

/// Size of `struct rtattr`, the header in front of every attribute payload.
pub const RTA_HDRLEN: usize = 4;
/// Attributes start at multiples of this (`RTA_ALIGNTO`).
pub const RTA_ALIGNTO: usize = 4;
/// Flag or-ed into an attribute type to mark a nest (`NLA_F_NESTED`, `linux/netlink.h`).
pub const NLA_F_NESTED: u16 = 1 << 15;
/// The attribute type whose payload all encoders here produce (`TCA_OPTIONS`, `linux/rtnetlink.h`).
pub const TCA_OPTIONS: u16 = 2;

/// `rta_len` of an attribute with `len` bytes of header + payload. Every payload built here is
/// bounded (the largest is the 8 KiB netem distribution table), so saturation never happens.
fn rta_len(len: usize) -> u16 {
    debug_assert!(len <= usize::from(u16::MAX), "attribute of {len} bytes");
    u16::try_from(len).unwrap_or(u16::MAX)
}

/// Zero-fill `buf` up to the next attribute boundary (`RTA_ALIGN`).
fn pad(buf: &mut Vec<u8>) {
    let aligned = buf.len().next_multiple_of(RTA_ALIGNTO);
    buf.resize(aligned, 0);
}

/// Append one attribute (header, payload, padding), like iproute2's `addattr_l()`.
fn push_attr(buf: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    buf.extend_from_slice(&rta_len(RTA_HDRLEN + payload.len()).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(payload);
    pad(buf);
}

fn push_u32_attr(buf: &mut Vec<u8>, kind: u16, value: u32) {
    push_attr(buf, kind, &value.to_ne_bytes());
}

fn push_u64_attr(buf: &mut Vec<u8>, kind: u16, value: u64) {
    push_attr(buf, kind, &value.to_ne_bytes());
}

/// Append a nest whose children `fill` writes, like `addattr_nest()` … `addattr_nest_end()`.
fn push_nest(buf: &mut Vec<u8>, kind: u16, fill: impl FnOnce(&mut Vec<u8>)) {
    let start = buf.len();
    buf.extend_from_slice(&[0; RTA_HDRLEN]);
    fill(buf);
    let len = rta_len(buf.len() - start).to_ne_bytes();
    let kind = kind.to_ne_bytes();
    buf[start..start + RTA_HDRLEN].copy_from_slice(&[len[0], len[1], kind[0], kind[1]]);
}

fn put_u32(buf: &mut Vec<u8>, value: u32) {
    buf.extend_from_slice(&value.to_ne_bytes());
}

fn put_i32(buf: &mut Vec<u8>, value: i32) {
    buf.extend_from_slice(&value.to_ne_bytes());
}

// ---------------------------------------------------------------------------------------------
// tc arithmetic (tc/tc_core.c, tc/q_netem.c), reproduced bit for bit
// ---------------------------------------------------------------------------------------------

/// `TIME_UNITS_PER_SEC` of iproute2: tc's time unit is the microsecond.
const USEC_PER_SEC: f64 = 1_000_000.0;
/// Packet-scheduler ticks per microsecond as tc computes it from `/proc/net/psched`
/// (`t2us / us2t * clock_res / 1e6` = 1000 / 64 * 1). Every kernel since 2.6.31 prints the same
/// first three words (`PSCHED_SHIFT` = 6), so this is a constant, not an input.
const TICKS_PER_USEC: f64 = 15.625;
/// Nanoseconds per tick (`PSCHED_TICKS2NS(1)`): the resolution of the legacy time fields.
pub const PSCHED_NS_PER_TICK: u64 = 64;
/// 2^32: tick counts from here on do not fit the u32 fields (tc's `tc_core_time2big()`).
const TICK_FIELD_LIMIT: f64 = 4_294_967_296.0;
/// Percent per unit probability.
const PERCENT: f64 = 100.0;

/// The fourth word of `/proc/net/psched` (tc's `get_hz()`) on a kernel with high-resolution
/// timers: `NSEC_PER_SEC / hrtimer_resolution` = 1e9. Only kernels without
/// `CONFIG_HIGH_RES_TIMERS` (or booted with `highres=off`) print `CONFIG_HZ` instead; read it
/// with [`psched_hz`] and pass it to [`htb_class_options_for_hz`] if that matters.
pub const PSCHED_HZ_HIGH_RES: u64 = 1_000_000_000;

/// `(unsigned int)x` exactly as gcc compiles it on x86-64 (`cvttsd2siq`, keep the low 32 bits):
/// truncation toward zero, wrapping modulo 2^32; NaN and |x| >= 2^63 give the "integer
/// indefinite" value, whose low half is 0. tc relies on this conversion everywhere.
fn c_double_to_u32(x: f64) -> u32 {
    const TWO_POW_63: f64 = 9_223_372_036_854_775_808.0;
    if x.is_finite() && x > -TWO_POW_63 && x < TWO_POW_63 {
        // Truncation to the low 32 bits is the point here.
        (x as i64) as u32
    } else {
        0
    }
}

/// `tc_core_time2tick()`: microseconds → ticks.
fn usec_to_ticks(usec: u32) -> u32 {
    c_double_to_u32(f64::from(usec) * TICKS_PER_USEC)
}

/// `tc_calc_xmittime()`: ticks needed to send `size` bytes at `rate` bytes/s.
fn xmit_ticks(rate: u64, size: u32) -> u32 {
    // `rate as f64` rounds to nearest like C's `(double)rate`.
    let usec = c_double_to_u32(USEC_PER_SEC * (f64::from(size) / rate as f64));
    usec_to_ticks(usec)
}

/// A duration in tc's 32-bit tick fields, or `None` when it does not fit (tc 6.1 refuses such
/// values with "Illegal … time (too large)"; we then send the exact 64-bit attribute as well).
fn duration_to_ticks(d: Duration) -> Option<u32> {
    // tc parses to whole microseconds first (`get_time()` truncates), then converts.
    let usec = d.as_micros();
    let ticks = usec as f64 * TICKS_PER_USEC;
    if ticks < TICK_FIELD_LIMIT { u32::try_from(usec).ok().map(usec_to_ticks) } else { None }
}

/// Nanoseconds as the kernel's `s64` time attributes want them (saturating).
fn duration_to_ns_i64(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

/// A percentage in `[0, 100]` as the kernel's `u32` probability, exactly like tc 6.1
/// (`rint(percent / 100. * UINT32_MAX)`, round half to even). Out-of-range inputs are clamped
/// (NaN counts as 0); [`NetemParams::validate`] reports them instead.
pub fn percent_to_probability(percent: f64) -> u32 {
    let clamped = if percent.is_nan() { 0.0 } else { percent.clamp(0.0, PERCENT) };
    c_double_to_u32((clamped / PERCENT * f64::from(u32::MAX)).round_ties_even())
}

/// A 64-bit rate as the legacy `u32` field: tc saturates at `~0U` and adds the 64-bit attribute.
fn rate_u32(rate: u64) -> u32 {
    u32::try_from(rate).unwrap_or(u32::MAX)
}

/// Whether a rate needs the `*_RATE64` attribute (tc: `rate64 >= (1ULL << 32)`).
fn needs_rate64(rate: u64) -> bool {
    u32::try_from(rate).is_err()
}

/// Parse the `hz` word of `/proc/net/psched` the way tc's `get_hz()` does: the fourth hex word,
/// taken only when the third is `000f4240` (1 000 000). `None` if the text does not look like
/// that file.
pub fn psched_hz(proc_net_psched: &str) -> Option<u64> {
    let mut words = proc_net_psched.split_whitespace();
    let _t2us = words.next()?;
    let _us2t = words.next()?;
    let clock_res = u32::from_str_radix(words.next()?, 16).ok()?;
    let hz = u32::from_str_radix(words.next()?, 16).ok()?;
    (clock_res == 1_000_000 && hz != 0).then_some(u64::from(hz))
}

// ---------------------------------------------------------------------------------------------
// Rate specs and rate tables (struct tc_ratespec, tc_calc_rtable)
// ---------------------------------------------------------------------------------------------

/// `TC_LINKLAYER_ETHERNET`: modern tc sets it, which tells the kernel (>= 3.11) to ignore the
/// legacy rate tables and compute transmit times itself.
const TC_LINKLAYER_ETHERNET: u8 = 1;
/// Entries in a legacy rate table (`TCA_*_RTAB`): 256 × u32 = 1024 bytes.
const RTAB_ENTRIES: usize = 256;
/// tc's `tc_calc_rtable()` sizes the table for this MTU when none is given.
const RTAB_DEFAULT_MTU: u32 = 2047;
/// Largest packet-size cell index: the table covers `(i + 1) << cell_log` for i in 0..=255.
const RTAB_MAX_CELL: u32 = 255;

/// `struct tc_ratespec` (12 bytes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct RateSpec {
    cell_log: u8,
    linklayer: u8,
    overhead: u16,
    cell_align: i16,
    mpu: u16,
    rate: u32,
}

impl RateSpec {
    fn write(&self, buf: &mut Vec<u8>) {
        buf.push(self.cell_log);
        buf.push(self.linklayer);
        buf.extend_from_slice(&self.overhead.to_ne_bytes());
        buf.extend_from_slice(&self.cell_align.to_ne_bytes());
        buf.extend_from_slice(&self.mpu.to_ne_bytes());
        put_u32(buf, self.rate);
    }
}

/// `tc_calc_rtable()` for Ethernet, mpu 0, automatic cell size: the rate spec (with the u32
/// rate, which is also what tc uses to fill the table) and the 1024-byte table.
fn rate_table(rate: u64, mtu: u32) -> (RateSpec, Vec<u8>) {
    let bps = rate_u32(rate);
    let mtu = if mtu == 0 { RTAB_DEFAULT_MTU } else { mtu };
    let mut cell_log: u8 = 0;
    while (mtu >> cell_log) > RTAB_MAX_CELL {
        cell_log += 1;
    }
    let mut table = Vec::with_capacity(RTAB_ENTRIES * std::mem::size_of::<u32>());
    for i in 1..=RTAB_ENTRIES {
        // tc's `(i + 1) << cell_log` for i in 0..256, in C `unsigned int` (bits shifted out
        // are lost, as in C, for MTUs near 2^32).
        let size = u32::try_from(i).unwrap_or(u32::MAX).wrapping_shl(u32::from(cell_log));
        put_u32(&mut table, xmit_ticks(u64::from(bps), size));
    }
    let spec =
        RateSpec { cell_log, linklayer: TC_LINKLAYER_ETHERNET, cell_align: -1, rate: bps, ..RateSpec::default() };
    (spec, table)
}

// ---------------------------------------------------------------------------------------------
// netem
// ---------------------------------------------------------------------------------------------

/// `TCA_NETEM_CORR`: struct tc_netem_corr.
pub const TCA_NETEM_CORR: u16 = 1;
/// `TCA_NETEM_DELAY_DIST`: s16 distribution table.
pub const TCA_NETEM_DELAY_DIST: u16 = 2;
/// `TCA_NETEM_REORDER`: struct tc_netem_reorder.
pub const TCA_NETEM_REORDER: u16 = 3;
/// `TCA_NETEM_CORRUPT`: struct tc_netem_corrupt.
pub const TCA_NETEM_CORRUPT: u16 = 4;
/// `TCA_NETEM_RATE`: struct tc_netem_rate.
pub const TCA_NETEM_RATE: u16 = 6;
/// `TCA_NETEM_RATE64`: u64 bytes/s.
pub const TCA_NETEM_RATE64: u16 = 8;
/// `TCA_NETEM_LATENCY64`: s64 ns (Linux 4.15+).
pub const TCA_NETEM_LATENCY64: u16 = 10;
/// `TCA_NETEM_JITTER64`: s64 ns (Linux 4.15+).
pub const TCA_NETEM_JITTER64: u16 = 11;
/// `TCA_NETEM_PRNG_SEED`: u64 (Linux 6.6+; ignored silently before).
pub const TCA_NETEM_PRNG_SEED: u16 = 14;

/// tc's default netem queue limit in packets (`struct tc_netem_qopt opt = { .limit = 1000 }`).
pub const NETEM_DEFAULT_LIMIT: u32 = 1000;
/// The gap tc sets when reordering is asked without one (every packet may be reordered).
pub const NETEM_DEFAULT_GAP: u32 = 1;
/// `NETEM_DIST_SCALE`: distribution table values are standard deviations × 8192.
pub const NETEM_DIST_SCALE: i32 = 8192;
/// Entries in the tables iproute2 ships (`normal.dist` etc.): 16384 CDF points, every 4th.
pub const NETEM_DIST_TABLE_LEN: usize = 4096;
/// Safety factor of [`netem_limit_for`] over the packets in flight.
const NETEM_LIMIT_HEADROOM_NUM: u128 = 3;
const NETEM_LIMIT_HEADROOM_DEN: u128 = 2;
const NANOS_PER_SEC: u128 = 1_000_000_000;

/// A netem delay distribution; the table is generated in Rust with the algorithms of iproute2's
/// `netem/normal.c`, `netem/pareto.c` and `netem/paretonormal.c` (and is equal to the
/// `/usr/lib/*/tc/*.dist` files tc loads).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Distribution {
    /// Normal distribution (`normal.dist`): values span about ±4 σ.
    Normal,
    /// Pareto distribution with shape 3 (`pareto.dist`), long tail to the right.
    Pareto,
    /// 0.25 × normal + 0.75 × pareto (`paretonormal.dist`).
    ParetoNormal,
}

impl Distribution {
    /// All distributions, in declaration order.
    pub const ALL: [Distribution; 3] = [Distribution::Normal, Distribution::Pareto, Distribution::ParetoNormal];

    /// The name tc uses (`distribution NAME`, file `NAME.dist`).
    pub fn name(self) -> &'static str {
        match self {
            Distribution::Normal => "normal",
            Distribution::Pareto => "pareto",
            Distribution::ParetoNormal => "paretonormal",
        }
    }

    /// The [`NETEM_DIST_TABLE_LEN`] table values (generated once, then cached).
    pub fn table(self) -> &'static [i16] {
        static NORMAL: OnceLock<Vec<i16>> = OnceLock::new();
        static PARETO: OnceLock<Vec<i16>> = OnceLock::new();
        static PARETO_NORMAL: OnceLock<Vec<i16>> = OnceLock::new();
        match self {
            Distribution::Normal => NORMAL.get_or_init(dist::normal_table),
            Distribution::Pareto => PARETO.get_or_init(dist::pareto_table),
            Distribution::ParetoNormal => PARETO_NORMAL.get_or_init(dist::pareto_normal_table),
        }
    }
}

/// Generators of the netem distribution tables (iproute2 `netem/*.c`, NISTnet heritage).
mod dist {
    use super::{NETEM_DIST_SCALE, NETEM_DIST_TABLE_LEN};

    /// Points of the inverse CDF the generators compute (`TABLESIZE`); they print every 4th.
    const CDF_POINTS: usize = 16384;
    const CDF_STRIDE: usize = CDF_POINTS / NETEM_DIST_TABLE_LEN;
    /// The normal generator sweeps x over [-10, 10.05) in steps of 0.00005 (accumulated).
    const SWEEP_START: f64 = -10.0;
    const SWEEP_END: f64 = 10.05;
    const SWEEP_STEP: f64 = 0.00005;
    /// Pareto shape parameter `a` of pareto.c / paretonormal.c.
    const PARETO_SHAPE: f64 = 3.0;
    /// pareto.c walks i = 65536, 65520, …, 16 (`dvalue = i / 65536`).
    const PARETO_STEPS: i32 = 65536;
    const PARETO_STRIDE: i32 = PARETO_STEPS / NETEM_DIST_TABLE_LEN as i32;
    /// pareto.c's upper clamp (it has no lower one; its minimum is about -5461).
    const PARETO_MAX: f64 = 32767.0;
    /// pareto.c centres and scales `x^(-1/a)` as `(x^(-1/a) - 1.5) * (4/3) * NETEM_DIST_SCALE`
    /// (for a = 3 the Pareto mean is 1.5; the 4/3 scale is NISTnet's choice, not exactly 1/σ).
    const PARETO_SHIFT: f64 = 1.5;
    const PARETO_SCALE: f64 = 4.0 / 3.0;
    /// paretonormal.c calls `paretovalue(i)` with the CDF index i and uses `65536 - 4 * i`.
    const PARETO_PER_CDF_POINT: i32 = PARETO_STEPS / CDF_POINTS as i32;
    /// paretonormal.c mixes `(normal + 3 * pareto) / 4` in C integer arithmetic.
    const MIX_PARETO_WEIGHT: i32 = 3;
    const MIX_TOTAL_WEIGHT: i32 = 4;
    /// The series stops once a term no longer changes the sum's last bit.
    const SERIES_TOLERANCE: f64 = f64::EPSILON * 0.25;
    /// Beyond this |t| erf(t) rounds to ±1 in double precision (erfc(6) ≈ 2e-17).
    const ERF_SATURATION: f64 = 6.0;

    /// erf(x) to about 1e-15 absolute, from the everywhere-positive series
    /// erf(x) = 2/√π · e^(−x²) · Σₙ 2ⁿ x^(2n+1) / (1·3·…·(2n+1)).
    /// The generators only need erf accurate enough that no `rint(16384 · Φ(x))` flips, which
    /// the test against the shipped `.dist` files confirms.
    pub(super) fn erf(x: f64) -> f64 {
        if x.is_nan() {
            return x;
        }
        let ax = x.abs();
        if ax >= ERF_SATURATION {
            return 1.0_f64.copysign(x);
        }
        let x2 = ax * ax;
        let mut term = ax;
        let mut sum = ax;
        let mut n = 0.0_f64;
        loop {
            n += 1.0;
            term *= 2.0 * x2 / (2.0 * n + 1.0);
            sum += term;
            if term <= sum * SERIES_TOLERANCE {
                break;
            }
        }
        (std::f64::consts::FRAC_2_SQRT_PI * (-x2).exp() * sum).copysign(x)
    }

    /// Standard normal CDF as normal.c writes it: `.5 + .5*erf((x-mu)/(sqrt(2.0)*sigma))`.
    fn normal_cdf(x: f64) -> f64 {
        0.5 + 0.5 * erf(x / std::f64::consts::SQRT_2)
    }

    /// normal.c's `table[]`: for each CDF point i, the last x of the sweep that rounds to it.
    fn inverse_normal_points() -> Vec<f64> {
        let mut table = vec![0.0_f64; CDF_POINTS + 1];
        let mut x = SWEEP_START;
        while x < SWEEP_END {
            let i = (CDF_POINTS as f64 * normal_cdf(x)).round_ties_even();
            if let Some(slot) = table.get_mut(i as usize) {
                *slot = x;
            }
            x += SWEEP_STEP;
        }
        table
    }

    fn clamp_i16(value: i32) -> i16 {
        i16::try_from(value.clamp(i32::from(i16::MIN), i32::from(i16::MAX))).unwrap_or(0)
    }

    /// `(int) rint(table[i] * TABLEFACTOR)`.
    fn scaled(x: f64) -> i32 {
        (x * f64::from(NETEM_DIST_SCALE)).round_ties_even() as i32
    }

    /// pareto.c / paretonormal.c `paretovalue()` for the numerator `i` of `i / 65536`.
    fn pareto_value(i: i32) -> i32 {
        let mut d = f64::from(i) / f64::from(PARETO_STEPS);
        d = 1.0 / d.powf(1.0 / PARETO_SHAPE);
        d -= PARETO_SHIFT;
        d *= PARETO_SCALE * f64::from(NETEM_DIST_SCALE);
        if d > PARETO_MAX {
            d = PARETO_MAX;
        }
        d.round_ties_even() as i32
    }

    pub(super) fn normal_table() -> Vec<i16> {
        let points = inverse_normal_points();
        points.iter().step_by(CDF_STRIDE).take(NETEM_DIST_TABLE_LEN).map(|&x| clamp_i16(scaled(x))).collect()
    }

    pub(super) fn pareto_table() -> Vec<i16> {
        (0..NETEM_DIST_TABLE_LEN as i32).map(|k| clamp_i16(pareto_value(PARETO_STEPS - k * PARETO_STRIDE))).collect()
    }

    pub(super) fn pareto_normal_table() -> Vec<i16> {
        let points = inverse_normal_points();
        points
            .iter()
            .step_by(CDF_STRIDE)
            .take(NETEM_DIST_TABLE_LEN)
            .zip((0..).step_by(CDF_STRIDE))
            .map(|(&x, i): (&f64, i32)| {
                let normal = scaled(x);
                let pareto = pareto_value(PARETO_STEPS - PARETO_PER_CDF_POINT * i);
                // C integer division truncates toward zero, as Rust's does.
                clamp_i16((normal + MIX_PARETO_WEIGHT * pareto) / MIX_TOTAL_WEIGHT)
            })
            .collect()
    }
}

/// Parameters of a netem qdisc. Percentages are `f64` in `[0, 100]`; a zero field means "not
/// given" (tc without that keyword). `Default` is tc's default: everything off, limit 1000.
#[derive(Debug, Clone, PartialEq)]
pub struct NetemParams {
    /// Added delay (`delay TIME`).
    pub delay: Duration,
    /// Delay variation (`delay TIME JITTER`).
    pub jitter: Duration,
    /// Correlation of successive delays, percent.
    pub delay_correlation: f64,
    /// Shape of the delay variation; `None` = uniform (no table sent).
    pub distribution: Option<Distribution>,
    /// Random loss, percent (`loss random P`).
    pub loss: f64,
    /// Loss correlation, percent.
    pub loss_correlation: f64,
    /// Duplication, percent.
    pub duplicate: f64,
    /// Duplication correlation, percent (tc 6.1 drops this one unless another correlation is
    /// given too — a tc bug we do not copy, see [`netem_options`]).
    pub duplicate_correlation: f64,
    /// Single-bit corruption, percent.
    pub corrupt: f64,
    /// Corruption correlation, percent.
    pub corrupt_correlation: f64,
    /// Reordering, percent (needs a delay: reordered packets are the ones sent *without* it).
    pub reorder: f64,
    /// Reorder correlation, percent.
    pub reorder_correlation: f64,
    /// Reorder every `gap`-th packet; 0 with `reorder > 0` becomes 1, as tc does.
    pub gap: u32,
    /// Rate limit in bytes per second (`rate`); `Some(0)` sends an explicit "no limit".
    pub rate: Option<u64>,
    /// Queue limit in packets; see [`netem_limit_for`].
    pub limit: u32,
    /// Seed of netem's PRNG (loss/corruption/duplication draws); `None` = kernel picks one.
    pub seed: Option<u64>,
}

impl Default for NetemParams {
    fn default() -> Self {
        NetemParams {
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            delay_correlation: 0.0,
            distribution: None,
            loss: 0.0,
            loss_correlation: 0.0,
            duplicate: 0.0,
            duplicate_correlation: 0.0,
            corrupt: 0.0,
            corrupt_correlation: 0.0,
            reorder: 0.0,
            reorder_correlation: 0.0,
            gap: 0,
            rate: None,
            limit: NETEM_DEFAULT_LIMIT,
            seed: None,
        }
    }
}

/// Why a parameter set is refused by tc or the kernel (reported by the `validate` methods;
/// the encoders themselves never fail and produce what tc would send, clamped).
#[derive(Debug, Clone, PartialEq)]
pub enum ParamsError {
    /// A percentage is NaN or outside `[0, 100]` (tc: "Illegal …").
    PercentOutOfRange {
        /// The field name.
        field: &'static str,
        /// The value given.
        value: f64,
    },
    /// netem reorder without delay (tc: "reordering not possible without specifying some delay").
    ReorderWithoutDelay,
    /// netem gap without reorder (tc: "gap specified without reorder probability").
    GapWithoutReorder,
    /// netem distribution without delay and jitter (tc: "distribution specified but no latency
    /// and jitter values").
    DistributionWithoutJitter,
    /// A zero rate (the kernel refuses HTB classes and TBF qdiscs without a rate: `EINVAL`).
    ZeroRate {
        /// Which rate.
        field: &'static str,
    },
    /// A TBF without burst (tc: "the \"burst\" parameter is mandatory").
    ZeroBurst,
    /// A TBF with a zero limit / latency (tc: "either \"limit\" or \"latency\" is required").
    ZeroLimit,
    /// A TBF peak rate without MTU (tc: "when \"peakrate\" is specified, \"mtu\" must also be
    /// specified"; the kernel answers `EINVAL`).
    PeakrateWithoutMtu,
}

impl fmt::Display for ParamsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParamsError::PercentOutOfRange { field, value } => {
                write!(f, "{field} = {value} is not a percentage in [0, 100]")
            }
            ParamsError::ReorderWithoutDelay => f.write_str("netem reorder needs a delay (reordered packets skip it)"),
            ParamsError::GapWithoutReorder => f.write_str("netem gap given without reorder"),
            ParamsError::DistributionWithoutJitter => f.write_str("netem distribution needs both a delay and a jitter"),
            ParamsError::ZeroRate { field } => write!(f, "{field} must be greater than zero"),
            ParamsError::ZeroBurst => f.write_str("tbf burst must be greater than zero"),
            ParamsError::ZeroLimit => f.write_str("tbf limit (or latency) must be greater than zero"),
            ParamsError::PeakrateWithoutMtu => f.write_str("tbf peakrate needs an mtu"),
        }
    }
}

impl std::error::Error for ParamsError {}

fn check_percent(field: &'static str, value: f64) -> Result<(), ParamsError> {
    if (0.0..=PERCENT).contains(&value) { Ok(()) } else { Err(ParamsError::PercentOutOfRange { field, value }) }
}

impl NetemParams {
    /// Check the parameters the way tc's `netem_parse_opt()` does before it sends anything.
    ///
    /// # Errors
    /// [`ParamsError::PercentOutOfRange`] for a NaN or out-of-range percentage,
    /// [`ParamsError::ReorderWithoutDelay`], [`ParamsError::GapWithoutReorder`] and
    /// [`ParamsError::DistributionWithoutJitter`] for the combinations tc refuses.
    pub fn validate(&self) -> Result<(), ParamsError> {
        for (field, value) in [
            ("delay_correlation", self.delay_correlation),
            ("loss", self.loss),
            ("loss_correlation", self.loss_correlation),
            ("duplicate", self.duplicate),
            ("duplicate_correlation", self.duplicate_correlation),
            ("corrupt", self.corrupt),
            ("corrupt_correlation", self.corrupt_correlation),
            ("reorder", self.reorder),
            ("reorder_correlation", self.reorder_correlation),
        ] {
            check_percent(field, value)?;
        }
        let latency = duration_to_ticks(self.delay).unwrap_or(u32::MAX);
        let jitter = duration_to_ticks(self.jitter).unwrap_or(u32::MAX);
        if percent_to_probability(self.reorder) != 0 {
            if latency == 0 {
                return Err(ParamsError::ReorderWithoutDelay);
            }
        } else if self.gap > 0 {
            return Err(ParamsError::GapWithoutReorder);
        }
        if self.distribution.is_some() && (latency == 0 || jitter == 0) {
            return Err(ParamsError::DistributionWithoutJitter);
        }
        Ok(())
    }
}

/// The netem `TCA_OPTIONS` payload: `struct tc_netem_qopt` followed by the attributes, in the
/// order tc emits them (see the module docs).
///
/// An attribute is sent when it carries something non-zero, which is exactly what tc sends for
/// the equivalent command line, with one deliberate difference: tc 6.1 sends `TCA_NETEM_CORR`
/// only when a delay, loss, reorder or corrupt correlation is given, so `duplicate 5% 25%` on
/// its own loses the 25 %; we send `TCA_NETEM_CORR` whenever any correlation is non-zero.
///
/// Delays and jitters that do not fit the 32-bit tick fields (≥ ~274.9 s, which tc 6.1
/// refuses) saturate those fields and add `TCA_NETEM_LATENCY64`/`JITTER64` (Linux 4.15+),
/// which the kernel prefers. Like tc 6.1, nothing 64-bit is sent for times that fit.
pub fn netem_options(p: &NetemParams) -> Vec<u8> {
    let latency = duration_to_ticks(p.delay);
    let jitter = duration_to_ticks(p.jitter);
    let reorder = percent_to_probability(p.reorder);
    let reorder_corr = percent_to_probability(p.reorder_correlation);
    let corrupt = percent_to_probability(p.corrupt);
    let corrupt_corr = percent_to_probability(p.corrupt_correlation);
    let corr = [
        percent_to_probability(p.delay_correlation),
        percent_to_probability(p.loss_correlation),
        percent_to_probability(p.duplicate_correlation),
    ];
    // tc: `if (reorder.probability) { if (opt.gap == 0) opt.gap = 1; }`
    let gap = if reorder != 0 && p.gap == 0 { NETEM_DEFAULT_GAP } else { p.gap };

    let mut buf = Vec::new();
    // struct tc_netem_qopt
    put_u32(&mut buf, latency.unwrap_or(u32::MAX));
    put_u32(&mut buf, p.limit);
    put_u32(&mut buf, percent_to_probability(p.loss));
    put_u32(&mut buf, gap);
    put_u32(&mut buf, percent_to_probability(p.duplicate));
    put_u32(&mut buf, jitter.unwrap_or(u32::MAX));

    if corr.iter().any(|&c| c != 0) || reorder_corr != 0 || corrupt_corr != 0 {
        let mut s = Vec::new();
        corr.iter().for_each(|&c| put_u32(&mut s, c));
        push_attr(&mut buf, TCA_NETEM_CORR, &s);
    }
    if reorder != 0 || reorder_corr != 0 {
        let mut s = Vec::new();
        put_u32(&mut s, reorder);
        put_u32(&mut s, reorder_corr);
        push_attr(&mut buf, TCA_NETEM_REORDER, &s);
    }
    if corrupt != 0 || corrupt_corr != 0 {
        let mut s = Vec::new();
        put_u32(&mut s, corrupt);
        put_u32(&mut s, corrupt_corr);
        push_attr(&mut buf, TCA_NETEM_CORRUPT, &s);
    }
    if let Some(rate) = p.rate {
        if needs_rate64(rate) {
            push_u64_attr(&mut buf, TCA_NETEM_RATE64, rate);
        }
        // struct tc_netem_rate { rate, packet_overhead, cell_size, cell_overhead }
        let mut s = Vec::new();
        put_u32(&mut s, rate_u32(rate));
        put_i32(&mut s, 0);
        put_u32(&mut s, 0);
        put_i32(&mut s, 0);
        push_attr(&mut buf, TCA_NETEM_RATE, &s);
    }
    if latency.is_none() {
        push_attr(&mut buf, TCA_NETEM_LATENCY64, &duration_to_ns_i64(p.delay).to_ne_bytes());
    }
    if jitter.is_none() {
        push_attr(&mut buf, TCA_NETEM_JITTER64, &duration_to_ns_i64(p.jitter).to_ne_bytes());
    }
    if let Some(seed) = p.seed {
        push_u64_attr(&mut buf, TCA_NETEM_PRNG_SEED, seed);
    }
    if let Some(distribution) = p.distribution {
        let table: Vec<u8> = distribution.table().iter().flat_map(|v| v.to_ne_bytes()).collect();
        push_attr(&mut buf, TCA_NETEM_DELAY_DIST, &table);
    }
    buf
}

/// The netem queue limit (packets) for a flow of at most `max_packets_per_sec`, delayed by
/// `delay` ± `jitter`: `max(1000, ceil(pps × (delay + jitter) × 1.5))`.
///
/// Why: netem keeps every delayed packet in its own queue until it is due, so at `pps` packets
/// per second it holds about `pps × delay` packets (more with jitter). Once the queue holds
/// `limit` packets netem *drops* new ones — counted only in the qdisc's drop statistics, so a
/// "delay" fault would silently turn into a "delay + loss" fault. The 1.5 factor is headroom
/// for bursts above the average rate; 1000 is tc's default limit and the floor. Saturates at
/// `u32::MAX`. Not covered: a netem `rate` (its backlog adds to the queue) and the tails of the
/// normal/pareto tables, which hold single packets up to `delay + 4 × jitter`.
pub fn netem_limit_for(max_packets_per_sec: u64, delay: Duration, jitter: Duration) -> u32 {
    let needed = netem_queue_needed(max_packets_per_sec, delay, jitter);
    u32::try_from(needed).unwrap_or(u32::MAX).clamp(NETEM_DEFAULT_LIMIT, NETEM_MAX_LIMIT)
}

/// The packets netem would hold for a flow of `max_packets_per_sec` delayed by `delay` ± `jitter`, with the
/// headroom of [`netem_limit_for`], before any floor or bound.
pub fn netem_queue_needed(max_packets_per_sec: u64, delay: Duration, jitter: Duration) -> u128 {
    let hold_ns = delay.as_nanos().saturating_add(jitter.as_nanos());
    u128::from(max_packets_per_sec)
        .saturating_mul(hold_ns)
        .saturating_mul(NETEM_LIMIT_HEADROOM_NUM)
        .div_ceil(NETEM_LIMIT_HEADROOM_DEN * NANOS_PER_SEC)
}

/// Most packets one netem queue may hold, whatever the rate and delay (every queued packet is kernel memory).
pub const NETEM_MAX_LIMIT: u32 = 1_000_000;

// ---------------------------------------------------------------------------------------------
// htb
// ---------------------------------------------------------------------------------------------

/// `TCA_HTB_PARMS`: struct tc_htb_opt (class).
pub const TCA_HTB_PARMS: u16 = 1;
/// `TCA_HTB_INIT`: struct tc_htb_glob (qdisc).
pub const TCA_HTB_INIT: u16 = 2;
/// `TCA_HTB_CTAB`: ceil rate table.
pub const TCA_HTB_CTAB: u16 = 3;
/// `TCA_HTB_RTAB`: rate table.
pub const TCA_HTB_RTAB: u16 = 4;
/// `TCA_HTB_DIRECT_QLEN`: u32 packets.
pub const TCA_HTB_DIRECT_QLEN: u16 = 5;
/// `TCA_HTB_RATE64`: u64 bytes/s.
pub const TCA_HTB_RATE64: u16 = 6;
/// `TCA_HTB_CEIL64`: u64 bytes/s.
pub const TCA_HTB_CEIL64: u16 = 7;
/// `TC_HTB_PROTOVER`: the only `tc_htb_glob.version` the kernel accepts.
const HTB_PROTOVER: u32 = 3;
/// tc's default `r2q` (quantum = rate / r2q).
pub const HTB_DEFAULT_R2Q: u32 = 10;
/// tc's default MTU for HTB rate tables and the default burst (`mtu 1600`).
pub const HTB_DEFAULT_MTU: u32 = 1600;

/// The htb qdisc `TCA_OPTIONS` payload (`tc qdisc add … htb default MINOR r2q N
/// [direct_qlen P]`): `TCA_HTB_INIT` + optional `TCA_HTB_DIRECT_QLEN`.
///
/// `default_minor` is the class minor unclassified packets go to, as a number: tc parses
/// `default 10` as *hex* (0x10), so `tc … default 10` equals `default_minor = 0x10`.
pub fn htb_qdisc_options(default_minor: u32, r2q: u32, direct_qlen: Option<u32>) -> Vec<u8> {
    let mut glob = Vec::new();
    put_u32(&mut glob, HTB_PROTOVER); // version
    put_u32(&mut glob, r2q); // rate2quantum
    put_u32(&mut glob, default_minor); // defcls
    put_u32(&mut glob, 0); // debug
    put_u32(&mut glob, 0); // direct_pkts (output only)
    let mut buf = Vec::new();
    push_attr(&mut buf, TCA_HTB_INIT, &glob);
    if let Some(qlen) = direct_qlen {
        push_u32_attr(&mut buf, TCA_HTB_DIRECT_QLEN, qlen);
    }
    buf
}

/// Parameters of an htb class (`tc class add … htb rate R ceil C [burst B] [cburst CB]
/// [quantum Q] prio P`). Rates are bytes per second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HtbClassParams {
    /// Guaranteed rate, bytes/s (must be > 0).
    pub rate: u64,
    /// Upper rate when borrowing, bytes/s; 0 means "same as `rate`" (tc's default).
    pub ceil: u64,
    /// Bytes that may be sent at once at `ceil` speed after idling; `None` = tc's default
    /// `rate / hz + mtu` (with high-resolution timers: 1600 bytes + rate/1e9), which rounds to
    /// no burst at all above ~12.8 Gbit/s (see the module's kernel caveats).
    pub burst: Option<u32>,
    /// Like `burst`, for `ceil`.
    pub cburst: Option<u32>,
    /// DRR quantum in bytes; `None` = kernel computes `rate / r2q` (clamped to 1000..=200000
    /// with a warning).
    pub quantum: Option<u32>,
    /// Priority among siblings when borrowing; lower is served first.
    pub prio: u32,
}

impl HtbClassParams {
    /// A class of `rate` bytes/s with tc's defaults for everything else (ceil = rate, prio 0).
    pub fn with_rate(rate: u64) -> Self {
        HtbClassParams { rate, ceil: rate, burst: None, cburst: None, quantum: None, prio: 0 }
    }

    /// Check what the kernel checks (`htb_change_class`: `!rate.rate || !ceil.rate` → `EINVAL`).
    ///
    /// # Errors
    /// [`ParamsError::ZeroRate`] when `rate` is 0.
    pub fn validate(&self) -> Result<(), ParamsError> {
        if self.rate == 0 {
            return Err(ParamsError::ZeroRate { field: "rate" });
        }
        Ok(())
    }
}

/// The htb class `TCA_OPTIONS` payload, as tc 6.1 builds it on a kernel with high-resolution
/// timers ([`PSCHED_HZ_HIGH_RES`]); see [`htb_class_options_for_hz`].
pub fn htb_class_options(p: &HtbClassParams) -> Vec<u8> {
    htb_class_options_for_hz(p, PSCHED_HZ_HIGH_RES)
}

/// The htb class `TCA_OPTIONS` payload for a given `/proc/net/psched` `hz` (see [`psched_hz`]),
/// which only matters for the default burst (`rate / hz + mtu`).
///
/// Like tc: `[TCA_HTB_RATE64] [TCA_HTB_CEIL64] TCA_HTB_PARMS TCA_HTB_RTAB TCA_HTB_CTAB`. The
/// 64-bit attributes appear only for rates of 2^32 bytes/s (≈ 34.4 Gbit/s) and more, with the
/// u32 fields saturated; the rate tables are always sent although kernels since 3.11 ignore
/// them when `linklayer` is set (tc sets Ethernet). The tables and the buffer ticks are
/// computed from the *saturated* u32 rate resp. the u64 rate exactly as tc does.
pub fn htb_class_options_for_hz(p: &HtbClassParams, hz: u64) -> Vec<u8> {
    let rate = p.rate;
    let ceil = if p.ceil == 0 { p.rate } else { p.ceil };
    let hz = hz.max(1);
    // `buffer = rate64 / get_hz() + mtu` in u64, stored in an unsigned int.
    let default_burst = |r: u64| (r / hz).wrapping_add(u64::from(HTB_DEFAULT_MTU)) as u32;
    let burst = p.burst.unwrap_or_else(|| default_burst(rate));
    let cburst = p.cburst.unwrap_or_else(|| default_burst(ceil));

    let (rate_spec, rtab) = rate_table(rate, HTB_DEFAULT_MTU);
    let (ceil_spec, ctab) = rate_table(ceil, HTB_DEFAULT_MTU);

    let mut opt = Vec::new();
    rate_spec.write(&mut opt);
    ceil_spec.write(&mut opt);
    put_u32(&mut opt, xmit_ticks(rate, burst)); // buffer
    put_u32(&mut opt, xmit_ticks(ceil, cburst)); // cbuffer
    put_u32(&mut opt, p.quantum.unwrap_or(0));
    put_u32(&mut opt, 0); // level (output only)
    put_u32(&mut opt, p.prio);

    let mut buf = Vec::new();
    if needs_rate64(rate) {
        push_u64_attr(&mut buf, TCA_HTB_RATE64, rate);
    }
    if needs_rate64(ceil) {
        push_u64_attr(&mut buf, TCA_HTB_CEIL64, ceil);
    }
    push_attr(&mut buf, TCA_HTB_PARMS, &opt);
    push_attr(&mut buf, TCA_HTB_RTAB, &rtab);
    push_attr(&mut buf, TCA_HTB_CTAB, &ctab);
    buf
}

// ---------------------------------------------------------------------------------------------
// pfifo / bfifo
// ---------------------------------------------------------------------------------------------

/// The pfifo/bfifo `TCA_OPTIONS` payload: `struct tc_fifo_qopt { u32 limit }`, the limit in
/// packets for pfifo, bytes for bfifo (`tc qdisc add … pfifo limit N`).
pub fn fifo_options(limit: u32) -> Vec<u8> {
    limit.to_ne_bytes().to_vec()
}

// ---------------------------------------------------------------------------------------------
// fq (the earliest-departure-time backend's leaf)
// ---------------------------------------------------------------------------------------------

/// `TCA_FQ_PLIMIT`: packets the qdisc holds at most (u32).
pub const TCA_FQ_PLIMIT: u16 = 1;
/// `TCA_FQ_FLOW_PLIMIT`: packets one flow holds at most (u32; tc's default 100 would drop a delayed bulk flow).
pub const TCA_FQ_FLOW_PLIMIT: u16 = 2;
/// `TCA_FQ_RATE_ENABLE`: 0 = `nopacing` (u32): fq then only honours departure times, never a socket's pacing rate.
pub const TCA_FQ_RATE_ENABLE: u16 = 5;
/// `TCA_FQ_HORIZON`: how far in the future a departure time may be, in µs (u32; Linux ≥ 5.7).
pub const TCA_FQ_HORIZON: u16 = 14;
/// `TCA_FQ_HORIZON_DROP`: 1 = drop packets beyond the horizon, 0 = send them at the horizon (`horizon_cap`; u8).
pub const TCA_FQ_HORIZON_DROP: u16 = 15;

/// Parameters of an fq qdisc used as an EDT delay line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FqParams {
    /// Packets held at most (`limit`), also the per-flow bound (`flow_limit`).
    pub limit: u32,
    /// Largest departure time ahead of now (`horizon`), rounded up to µs.
    pub horizon: Duration,
    /// Drop packets beyond the horizon (`horizon_drop`) instead of sending them at it (`horizon_cap`).
    pub horizon_drop: bool,
}

/// The fq `TCA_OPTIONS` payload of `tc qdisc add … fq limit L flow_limit L nopacing horizon H horizon_cap|drop`,
/// attributes in tc's order. The horizon saturates at `u32::MAX` µs (71 minutes).
pub fn fq_options(p: &FqParams) -> Vec<u8> {
    let mut buf = Vec::with_capacity(48);
    push_u32_attr(&mut buf, TCA_FQ_PLIMIT, p.limit);
    push_u32_attr(&mut buf, TCA_FQ_FLOW_PLIMIT, p.limit);
    push_u32_attr(&mut buf, TCA_FQ_RATE_ENABLE, 0);
    let horizon_us = u32::try_from(p.horizon.as_nanos().div_ceil(1000)).unwrap_or(u32::MAX);
    push_u32_attr(&mut buf, TCA_FQ_HORIZON, horizon_us);
    push_attr(&mut buf, TCA_FQ_HORIZON_DROP, &[u8::from(p.horizon_drop)]);
    buf
}

// ---------------------------------------------------------------------------------------------
// tbf
// ---------------------------------------------------------------------------------------------

/// `TCA_TBF_PARMS`: struct tc_tbf_qopt.
pub const TCA_TBF_PARMS: u16 = 1;
/// `TCA_TBF_RTAB`: rate table.
pub const TCA_TBF_RTAB: u16 = 2;
/// `TCA_TBF_PTAB`: peak rate table.
pub const TCA_TBF_PTAB: u16 = 3;
/// `TCA_TBF_RATE64`: u64 bytes/s.
pub const TCA_TBF_RATE64: u16 = 4;
/// `TCA_TBF_PRATE64`: u64 bytes/s.
pub const TCA_TBF_PRATE64: u16 = 5;
/// `TCA_TBF_BURST`: u32 bytes (the kernel prefers it over `tc_tbf_qopt.buffer` ticks).
pub const TCA_TBF_BURST: u16 = 6;
/// `TCA_TBF_PBURST`: u32 bytes (preferred over `tc_tbf_qopt.mtu` ticks).
pub const TCA_TBF_PBURST: u16 = 7;

/// How much a TBF may queue: tc's `limit BYTES` or `latency TIME`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TbfLimit {
    /// Queue at most this many bytes.
    Bytes(u32),
    /// Queue what waits at most this long: tc computes
    /// `limit = min(rate × latency + burst, peakrate × latency + mtu)` bytes.
    Latency(Duration),
}

/// Parameters of a token bucket filter (`tc qdisc add … tbf rate R burst B limit L|latency T
/// [peakrate P mtu M]`). Rates are bytes per second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TbfParams {
    /// Token rate, bytes/s (must be > 0).
    pub rate: u64,
    /// Bucket size in bytes (must be > 0, should be ≥ the device MTU).
    pub burst: u32,
    /// Queue size.
    pub limit: TbfLimit,
    /// Optional peak rate, bytes/s (`Some(0)` = none).
    pub peakrate: Option<u64>,
    /// Size of the peak-rate bucket (`mtu`/`minburst`), needed with a peak rate; without one it
    /// only sizes the rate table's cells like tc.
    pub mtu: Option<u32>,
}

impl TbfParams {
    /// Check what tc checks before sending.
    ///
    /// # Errors
    /// [`ParamsError::ZeroRate`], [`ParamsError::ZeroBurst`], [`ParamsError::ZeroLimit`] and
    /// [`ParamsError::PeakrateWithoutMtu`].
    pub fn validate(&self) -> Result<(), ParamsError> {
        if self.rate == 0 {
            return Err(ParamsError::ZeroRate { field: "rate" });
        }
        if self.burst == 0 {
            return Err(ParamsError::ZeroBurst);
        }
        let limit_is_zero = match self.limit {
            TbfLimit::Bytes(bytes) => bytes == 0,
            TbfLimit::Latency(latency) => latency.as_micros() == 0,
        };
        if limit_is_zero {
            return Err(ParamsError::ZeroLimit);
        }
        if self.peakrate.unwrap_or(0) != 0 && self.mtu.unwrap_or(0) == 0 {
            return Err(ParamsError::PeakrateWithoutMtu);
        }
        Ok(())
    }
}

/// The tbf `TCA_OPTIONS` payload, like tc 6.1: `TCA_TBF_PARMS TCA_TBF_BURST [TCA_TBF_RATE64]
/// TCA_TBF_RTAB [[TCA_TBF_PRATE64] TCA_TBF_PBURST TCA_TBF_PTAB]`.
///
/// As in tc, `tc_tbf_qopt.buffer` is computed from the *saturated* u32 rate (harmless: the
/// kernel recomputes it from `TCA_TBF_BURST`), and a latency is truncated to whole
/// microseconds (saturating at `u32::MAX` µs ≈ 71 min).
pub fn tbf_options(p: &TbfParams) -> Vec<u8> {
    let rate32 = rate_u32(p.rate);
    let peak = p.peakrate.unwrap_or(0);
    let peak32 = rate_u32(peak);
    let mtu = p.mtu.unwrap_or(0);

    let limit = match p.limit {
        TbfLimit::Bytes(bytes) => bytes,
        TbfLimit::Latency(latency) => {
            let usec = f64::from(u32::try_from(latency.as_micros()).unwrap_or(u32::MAX));
            let mut lim = p.rate as f64 * usec / USEC_PER_SEC + f64::from(p.burst);
            if peak != 0 {
                let lim2 = peak as f64 * usec / USEC_PER_SEC + f64::from(mtu);
                if lim2 < lim {
                    lim = lim2;
                }
            }
            c_double_to_u32(lim)
        }
    };

    let (rate_spec, rtab) = rate_table(p.rate, mtu);
    let peak_tables = (peak32 != 0).then(|| rate_table(peak, mtu));

    let mut opt = Vec::new();
    rate_spec.write(&mut opt);
    match &peak_tables {
        Some((peak_spec, _)) => peak_spec.write(&mut opt),
        None => RateSpec::default().write(&mut opt),
    }
    put_u32(&mut opt, limit);
    put_u32(&mut opt, xmit_ticks(u64::from(rate32), p.burst)); // buffer
    let mtu_ticks = if peak32 != 0 { xmit_ticks(u64::from(peak32), mtu) } else { 0 };
    put_u32(&mut opt, mtu_ticks);

    let mut buf = Vec::new();
    push_attr(&mut buf, TCA_TBF_PARMS, &opt);
    push_u32_attr(&mut buf, TCA_TBF_BURST, p.burst);
    if needs_rate64(p.rate) {
        push_u64_attr(&mut buf, TCA_TBF_RATE64, p.rate);
    }
    push_attr(&mut buf, TCA_TBF_RTAB, &rtab);
    if let Some((_, ptab)) = &peak_tables {
        if needs_rate64(peak) {
            push_u64_attr(&mut buf, TCA_TBF_PRATE64, peak);
        }
        push_u32_attr(&mut buf, TCA_TBF_PBURST, mtu);
        push_attr(&mut buf, TCA_TBF_PTAB, ptab);
    }
    buf
}

// ---------------------------------------------------------------------------------------------
// cls_bpf and act_mirred
// ---------------------------------------------------------------------------------------------

/// `TCA_BPF_ACT`: nest of actions run when the classifier matches (classic mode).
pub const TCA_BPF_ACT: u16 = 1;
/// `TCA_BPF_CLASSID`: u32 class the filter selects (`classid`/`flowid`).
pub const TCA_BPF_CLASSID: u16 = 3;
/// `TCA_BPF_FD`: u32 fd of the loaded `BPF_PROG_TYPE_SCHED_CLS` program.
pub const TCA_BPF_FD: u16 = 6;
/// `TCA_BPF_NAME`: NUL-terminated annotation shown by `tc filter show`.
pub const TCA_BPF_NAME: u16 = 7;
/// `TCA_BPF_FLAGS`: u32 `TCA_BPF_FLAG_*`.
pub const TCA_BPF_FLAGS: u16 = 8;
/// `TCA_BPF_FLAG_ACT_DIRECT`: the program's return value is the tc action (`direct-action`).
pub const TCA_BPF_FLAG_ACT_DIRECT: u32 = 1;
/// tc formats the annotation into `char annotation[256]`; the kernel accepts up to 256 bytes
/// before the NUL (`CLS_BPF_NAME_LEN`). We keep tc's 255.
pub const BPF_NAME_MAX_LEN: usize = 255;

/// `TCA_ACT_KIND`: NUL-terminated action kind.
pub const TCA_ACT_KIND: u16 = 1;
/// `TCA_ACT_OPTIONS`: the action's own attributes (sent with `NLA_F_NESTED`).
pub const TCA_ACT_OPTIONS: u16 = 2;
/// `TCA_MIRRED_PARMS`: struct tc_mirred.
pub const TCA_MIRRED_PARMS: u16 = 2;
/// `TCA_EGRESS_REDIR`: mirred redirects to the target device's egress.
pub const TCA_EGRESS_REDIR: i32 = 1;
/// `TC_ACT_STOLEN`: the verdict tc gives `mirred … redirect` (the skb is consumed).
pub const TC_ACT_STOLEN: i32 = 4;
/// Kind string of the mirred action.
const MIRRED_KIND: &str = "mirred";
/// Actions in a `TCA_*_ACT` list are nested under their 1-based order (`TCA_ACT_MAX_PRIO` 32).
const FIRST_ACTION_ORDER: u16 = 1;

/// `TCA_BPF_NAME` payload: the name (cut at an interior NUL and at [`BPF_NAME_MAX_LEN`] bytes,
/// like tc's `snprintf`) plus the terminating NUL.
fn bpf_name(name: &str) -> Vec<u8> {
    let bytes = name.as_bytes();
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len()).min(BPF_NAME_MAX_LEN);
    let mut out = bytes[..end].to_vec();
    out.push(0);
    out
}

fn push_bpf_program(buf: &mut Vec<u8>, prog_fd: u32, name: &str) {
    push_u32_attr(buf, TCA_BPF_FD, prog_fd);
    push_attr(buf, TCA_BPF_NAME, &bpf_name(name));
}

/// A direct-action cls_bpf filter (`tc filter add … bpf da obj F sec S [classid C]`):
/// `[TCA_BPF_CLASSID] TCA_BPF_FD TCA_BPF_NAME TCA_BPF_FLAGS`.
///
/// `prog_fd` is the caller's fd of the loaded program (the kernel takes its own reference; the
/// fd may be closed after the ack). `name` is the annotation (tc uses `"<object>:[<section>]"`).
/// `classid` (major:minor as `u32`) is the class selected when the program returns
/// `TC_ACT_OK` without setting `skb->tc_classid`; under an HTB root it must carry the major.
pub fn bpf_da_filter_options(prog_fd: u32, name: &str, classid: Option<u32>) -> Vec<u8> {
    let mut buf = Vec::new();
    // tc adds classid while parsing the command line, the program after it: classid first.
    if let Some(classid) = classid {
        push_u32_attr(&mut buf, TCA_BPF_CLASSID, classid);
    }
    push_bpf_program(&mut buf, prog_fd, name);
    push_u32_attr(&mut buf, TCA_BPF_FLAGS, TCA_BPF_FLAG_ACT_DIRECT);
    buf
}

/// A classic-mode cls_bpf filter whose match redirects to `redirect_ifindex`'s egress
/// (`tc filter add … bpf obj F sec S action mirred egress redirect dev IFB`):
/// `TCA_BPF_ACT { 1 { TCA_ACT_KIND "mirred", TCA_ACT_OPTIONS { TCA_MIRRED_PARMS } } }
/// TCA_BPF_FD TCA_BPF_NAME`, no flags. In classic mode a non-zero program return (-1 = the
/// filter's default class) means "match" and runs the action; 0 means "no match".
pub fn bpf_mirred_filter_options(prog_fd: u32, name: &str, redirect_ifindex: u32) -> Vec<u8> {
    let mut buf = Vec::new();
    push_nest(&mut buf, TCA_BPF_ACT, |acts| {
        push_nest(acts, FIRST_ACTION_ORDER, |act| {
            let mut kind = MIRRED_KIND.as_bytes().to_vec();
            kind.push(0);
            push_attr(act, TCA_ACT_KIND, &kind);
            push_nest(act, TCA_ACT_OPTIONS | NLA_F_NESTED, |opts| {
                // struct tc_mirred { tc_gen: index, capab, action, refcnt, bindcnt; eaction; ifindex }
                let mut parms = Vec::new();
                put_u32(&mut parms, 0); // index: 0 = new action
                put_u32(&mut parms, 0); // capab
                put_i32(&mut parms, TC_ACT_STOLEN); // action
                put_i32(&mut parms, 0); // refcnt
                put_i32(&mut parms, 0); // bindcnt
                put_i32(&mut parms, TCA_EGRESS_REDIR); // eaction
                put_u32(&mut parms, redirect_ifindex);
                push_attr(opts, TCA_MIRRED_PARMS, &parms);
            });
        });
    });
    push_bpf_program(&mut buf, prog_fd, name);
    buf
}

#[cfg(all(test, target_endian = "little"))]
mod tests {
    //! Fixtures: the `TCA_OPTIONS` payload of the request `tc` 6.1.0 (Debian 6.1.0-3, libbpf
    //! 1.1.2) sent on Linux 6.18, captured with
    //! `ip netns exec enc-test-$$ strace -f -e trace=sendmsg -e write=all -xx -s 65536 tc …`
    //! in a throwaway netns holding a veth pair `v0`/`v1` and `ifb0` (ifindex 2), deleted
    //! afterwards. The hex dump of each `RTM_NEWQDISC`/`RTM_NEWTCLASS`/`RTM_NEWTFILTER` was cut
    //! after `nlmsghdr` + `tcmsg` and the payload of attribute type 2 kept. This kernel has no
    //! sch_netem: tc still sends netem requests (the kernel answers "Specified qdisc kind is
    //! unknown"), so those payloads are what tc builds. `/proc/net/psched` was
    //! `000003e8 00000040 000f4240 3b9aca00` (hz = 1e9).
    //!
    //! cls_bpf: tc 6.1 loads objects with libbpf 1.x, which refuses the aya object's legacy
    //! `maps` section ("legacy map definitions in 'maps' section are not supported"), so the
    //! bpf fixtures load a one-instruction C program instead (`clang-22 -O2 -target bpf`,
    //! `SEC("classifier") int cls_main(void *skb) { return 0; }`, file `/tmp/encbpf/cls.o`).
    //! The layout does not depend on the program; tc's program fd was 6 and its annotation
    //! `cls.o:[classifier]`, which the tests pass in.
    //!
    //! Short payloads are kept whole. Long ones (rate tables, distribution tables) keep their
    //! leading bytes (structs, attribute headers, start of the first table) plus the length and
    //! FNV-1a-64 hash of the whole payload, which pins every byte without kilobytes of hex.
    use super::*;

    const TC_PROG_FD: u32 = 6;
    const TC_ANNOTATION: &str = "cls.o:[classifier]";
    const IFB0_IFINDEX: u32 = 2;
    /// `1:10` as tc parses it (hex minor).
    const CLASSID_1_10: u32 = 0x0001_0010;
    /// `default 10` as tc parses it (hex).
    const HTB_DEFAULT_0X10: u32 = 0x10;

    const MBIT: u64 = 1_000_000 / 8;
    const GBIT: u64 = 1_000_000_000 / 8;
    const KIB: u32 = 1024;

    /// A long captured payload: leading bytes plus length and FNV-1a-64 of the whole.
    struct Fixture {
        head: &'static [u8],
        len: usize,
        fnv1a64: u64,
    }

    fn assert_fixture(ours: &[u8], fixture: &Fixture) {
        assert_eq!(&ours[..fixture.head.len().min(ours.len())], fixture.head, "leading bytes");
        assert_eq!(ours.len(), fixture.len, "payload length");
        assert_eq!(chaos_test_support::fnv1a64(ours), fixture.fnv1a64, "payload hash");
    }

    fn attr(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut buf = Vec::new();
        push_attr(&mut buf, kind, payload);
        buf
    }

    fn ms(millis: u64) -> Duration {
        Duration::from_millis(millis)
    }

    // ---- conversions -------------------------------------------------------------------------

    #[test]
    fn percent_conversion_matches_tc() {
        assert_eq!(percent_to_probability(0.0), 0);
        assert_eq!(percent_to_probability(100.0), u32::MAX);
        // rint(0.015 * 4294967295) = rint(64424509.425)
        assert_eq!(percent_to_probability(1.5), 64_424_509);
        // rint(0.25 * 4294967295) = rint(1073741823.75)
        assert_eq!(percent_to_probability(25.0), 0x4000_0000);
        assert_eq!(percent_to_probability(f64::NAN), 0);
        assert_eq!(percent_to_probability(-3.0), 0);
        assert_eq!(percent_to_probability(150.0), u32::MAX);
    }

    #[test]
    fn c_conversion_wraps_like_gcc_x86_64() {
        assert_eq!(c_double_to_u32(3.99), 3);
        assert_eq!(c_double_to_u32(4_294_967_296.0 + 5.0), 5);
        assert_eq!(c_double_to_u32(f64::INFINITY), 0);
        assert_eq!(c_double_to_u32(f64::NAN), 0);
    }

    #[test]
    fn psched_hz_reads_the_fourth_word() {
        assert_eq!(psched_hz("000003e8 00000040 000f4240 3b9aca00\n"), Some(PSCHED_HZ_HIGH_RES));
        assert_eq!(psched_hz("000003e8 00000040 000f4240 000000fa\n"), Some(250));
        assert_eq!(psched_hz("000003e8 00000040 3b9aca00 3b9aca00\n"), None);
        assert_eq!(psched_hz("garbage"), None);
    }

    // ---- netem -------------------------------------------------------------------------------

    #[test]
    fn netem_delay_only() {
        let p = NetemParams { delay: ms(10), ..NetemParams::default() };
        assert_eq!(netem_options(&p), NETEM_DELAY);
    }

    #[test]
    fn netem_delay_truncates_to_whole_microseconds_then_ticks() {
        // 1500 µs → 23437.5 → 23437 ticks; 333 µs → 5203.125 → 5203 ticks.
        let p = NetemParams {
            delay: Duration::from_micros(1500),
            jitter: Duration::from_nanos(333_999),
            ..NetemParams::default()
        };
        assert_eq!(netem_options(&p), NETEM_DELAY_SUB_MS);
    }

    #[test]
    fn netem_delay_jitter_correlation_normal() {
        let p = NetemParams {
            delay: ms(100),
            jitter: ms(20),
            delay_correlation: 25.0,
            distribution: Some(Distribution::Normal),
            ..NetemParams::default()
        };
        assert_fixture(&netem_options(&p), &NETEM_DELAY_JITTER_CORR_NORMAL);
    }

    #[test]
    fn netem_delay_paretonormal() {
        let p = NetemParams {
            delay: ms(20),
            jitter: ms(5),
            distribution: Some(Distribution::ParetoNormal),
            ..NetemParams::default()
        };
        assert_fixture(&netem_options(&p), &NETEM_DELAY_PARETONORMAL);
    }

    #[test]
    fn netem_loss() {
        let p = NetemParams { loss: 1.5, loss_correlation: 25.0, ..NetemParams::default() };
        assert_eq!(netem_options(&p), NETEM_LOSS);
    }

    #[test]
    fn netem_duplicate() {
        let p = NetemParams { duplicate: 5.0, ..NetemParams::default() };
        assert_eq!(netem_options(&p), NETEM_DUPLICATE);
    }

    #[test]
    fn netem_duplicate_correlation_is_kept_unlike_tc() {
        // tc 6.1 forgets `++present[TCA_NETEM_CORR]` for the duplicate correlation: its request
        // for `duplicate 5% 25%` is the one for `duplicate 5%`.
        assert_eq!(NETEM_DUPLICATE_CORR, NETEM_DUPLICATE);
        let p = NetemParams { duplicate: 5.0, duplicate_correlation: 25.0, ..NetemParams::default() };
        let ours = netem_options(&p);
        let mut corr = Vec::new();
        put_u32(&mut corr, 0);
        put_u32(&mut corr, 0);
        put_u32(&mut corr, 0x4000_0000);
        let mut expected = NETEM_DUPLICATE_CORR.to_vec();
        expected.extend(attr(TCA_NETEM_CORR, &corr));
        assert_eq!(ours, expected);
    }

    #[test]
    fn netem_corrupt() {
        let p = NetemParams { corrupt: 0.1, corrupt_correlation: 10.0, ..NetemParams::default() };
        assert_eq!(netem_options(&p), NETEM_CORRUPT);
    }

    #[test]
    fn netem_reorder_and_gap() {
        let p =
            NetemParams { delay: ms(10), reorder: 25.0, reorder_correlation: 50.0, gap: 5, ..NetemParams::default() };
        assert_eq!(netem_options(&p), NETEM_REORDER_GAP);
    }

    #[test]
    fn netem_reorder_without_gap_gets_gap_one() {
        let p = NetemParams { delay: ms(10), reorder: 25.0, ..NetemParams::default() };
        assert_eq!(netem_options(&p), NETEM_REORDER_DEFAULT_GAP);
    }

    #[test]
    fn netem_rate_32bit() {
        let p = NetemParams { rate: Some(10 * MBIT), ..NetemParams::default() };
        assert_eq!(netem_options(&p), NETEM_RATE);
    }

    #[test]
    fn netem_rate_64bit() {
        let p = NetemParams { rate: Some(40 * GBIT), ..NetemParams::default() };
        assert_eq!(netem_options(&p), NETEM_RATE64);
    }

    #[test]
    fn netem_limit() {
        let p = NetemParams { delay: ms(10), limit: 5000, ..NetemParams::default() };
        assert_eq!(netem_options(&p), NETEM_LIMIT);
    }

    fn netem_all_params() -> NetemParams {
        NetemParams {
            delay: ms(50),
            jitter: ms(10),
            delay_correlation: 20.0,
            distribution: Some(Distribution::Pareto),
            loss: 2.0,
            loss_correlation: 30.0,
            duplicate: 1.0,
            duplicate_correlation: 15.0,
            corrupt: 0.5,
            corrupt_correlation: 5.0,
            reorder: 10.0,
            reorder_correlation: 40.0,
            gap: 3,
            rate: Some(100 * MBIT),
            limit: 20_000,
            seed: None,
        }
    }

    #[test]
    fn netem_all_together() {
        let p = netem_all_params();
        assert_eq!(p.validate(), Ok(()));
        assert_fixture(&netem_options(&p), &NETEM_ALL);
    }

    #[test]
    fn netem_seed_goes_after_rate_before_the_table() {
        // tc 6.1 has no `seed`; iproute2 >= 6.6 emits TCA_NETEM_PRNG_SEED after the rate and
        // before the distribution table.
        let seeded = NetemParams { seed: Some(0x0123_4567_89ab_cdef), ..netem_all_params() };
        let plain = netem_options(&netem_all_params());
        let ours = netem_options(&seeded);
        let table_start = NETEM_ALL.head.len() - 8 - RTA_HDRLEN;
        let seed_attr = attr(TCA_NETEM_PRNG_SEED, &0x0123_4567_89ab_cdef_u64.to_ne_bytes());
        assert_eq!(seed_attr.len(), 12);
        assert_eq!(ours[..table_start], plain[..table_start]);
        assert_eq!(ours[table_start..table_start + 12], seed_attr[..]);
        assert_eq!(ours[table_start + 12..], plain[table_start..]);
    }

    #[test]
    fn netem_times_beyond_ticks_use_64bit_attributes() {
        // 300 s = 4.6875e9 ticks: tc 6.1 refuses ("too large"); we saturate and add ns.
        let p = NetemParams { delay: Duration::from_secs(300), jitter: ms(1), ..NetemParams::default() };
        let ours = netem_options(&p);
        assert_eq!(ours[..4], u32::MAX.to_ne_bytes());
        assert_eq!(ours[20..24], 15_625_u32.to_ne_bytes());
        assert_eq!(ours[24..], attr(TCA_NETEM_LATENCY64, &300_000_000_000_i64.to_ne_bytes())[..]);
        // The largest delay that still fits: floor(u32::MAX / 15.625) µs.
        let fits = NetemParams { delay: Duration::from_micros(274_877_906), ..NetemParams::default() };
        assert_eq!(netem_options(&fits).len(), 24);
    }

    #[test]
    fn netem_validate_mirrors_tc_checks() {
        let reorder_only = NetemParams { reorder: 5.0, ..NetemParams::default() };
        assert_eq!(reorder_only.validate(), Err(ParamsError::ReorderWithoutDelay));
        let gap_only = NetemParams { gap: 2, ..NetemParams::default() };
        assert_eq!(gap_only.validate(), Err(ParamsError::GapWithoutReorder));
        let dist_no_jitter =
            NetemParams { delay: ms(5), distribution: Some(Distribution::Normal), ..NetemParams::default() };
        assert_eq!(dist_no_jitter.validate(), Err(ParamsError::DistributionWithoutJitter));
        let bad_loss = NetemParams { loss: 101.0, ..NetemParams::default() };
        assert!(matches!(bad_loss.validate(), Err(ParamsError::PercentOutOfRange { field: "loss", .. })));
        assert_eq!(NetemParams::default().validate(), Ok(()));
    }

    #[test]
    fn netem_limit_for_covers_packets_in_flight() {
        assert_eq!(netem_limit_for(0, ms(100), ms(0)), NETEM_DEFAULT_LIMIT);
        assert_eq!(netem_limit_for(100, ms(100), ms(0)), NETEM_DEFAULT_LIMIT);
        // 100 000 pps × 0.1 s × 1.5 = 15 000
        assert_eq!(netem_limit_for(100_000, ms(80), ms(20)), 15_000);
        // ceil(333 × 0.01 × 1.5) = ceil(4.995) = 5 → floor 1000; 1 000 001 pps × 1 s × 1.5
        assert_eq!(netem_limit_for(333, ms(10), ms(0)), NETEM_DEFAULT_LIMIT);
        assert_eq!(netem_limit_for(500_001, Duration::from_secs(1), ms(0)), 750_002);
        // Bounded: 1 M pps held 120 s would be 180 M packets.
        assert_eq!(netem_limit_for(1_000_000, Duration::from_secs(60), Duration::from_secs(60)), NETEM_MAX_LIMIT);
        assert_eq!(netem_limit_for(u64::MAX, Duration::MAX, Duration::MAX), NETEM_MAX_LIMIT);
    }

    // ---- distribution tables -----------------------------------------------------------------

    /// Where Debian's iproute2 installs the tables (tc's `get_tc_lib()`), newest layout first.
    const TC_LIB_DIRS: [&str; 3] = ["/usr/lib/x86_64-linux-gnu/tc", "/usr/lib/tc", "/usr/lib64/tc"];

    /// The `.dist` file as tc's `get_distribution()` reads it: skip lines starting with `#` or
    /// empty, every whitespace-separated integer is one `s16`.
    fn read_dist_file(name: &str) -> Option<(String, Vec<i16>)> {
        TC_LIB_DIRS.iter().find_map(|dir| {
            let path = format!("{dir}/{name}.dist");
            let text = std::fs::read_to_string(&path).ok()?;
            let values = text
                .lines()
                .filter(|line| !line.is_empty() && !line.starts_with('#'))
                .flat_map(str::split_whitespace)
                .map(|word| word.parse::<i16>().ok())
                .collect::<Option<Vec<i16>>>()?;
            Some((path, values))
        })
    }

    fn check_table_against_file(distribution: Distribution) {
        let Some((path, expected)) = read_dist_file(distribution.name()) else {
            eprintln!("SKIPPED: no {}.dist under {TC_LIB_DIRS:?} (install iproute2 to compare)", distribution.name());
            return;
        };
        let ours = distribution.table();
        assert_eq!(ours.len(), NETEM_DIST_TABLE_LEN);
        assert_eq!(expected.len(), NETEM_DIST_TABLE_LEN, "{path}");
        let diffs: Vec<_> = ours.iter().zip(&expected).enumerate().filter(|(_, (a, b))| a != b).take(10).collect();
        assert!(diffs.is_empty(), "{path}: first differences {diffs:?}");
    }

    #[test]
    fn normal_table_equals_normal_dist() {
        check_table_against_file(Distribution::Normal);
    }

    #[test]
    fn pareto_table_equals_pareto_dist() {
        check_table_against_file(Distribution::Pareto);
    }

    #[test]
    fn paretonormal_table_equals_paretonormal_dist() {
        check_table_against_file(Distribution::ParetoNormal);
    }

    #[test]
    fn fq_options_match_tc() {
        // Captured with `strace -e sendmsg -xx tc qdisc add dev lo root handle 1: fq limit 5000 flow_limit 5000
        // nopacing horizon 7s horizon_cap` (iproute2 6.1; the kernel refusing the qdisc does not change what tc
        // sends): TCA_OPTIONS of the RTM_NEWQDISC message.
        const FQ: &[u8] =
            b"\x08\x00\x01\x00\x88\x13\x00\x00\x08\x00\x02\x00\x88\x13\x00\x00\x08\x00\x05\x00\x00\x00\x00\x00\
            \x08\x00\x0e\x00\xc0\xcf\x6a\x00\x05\x00\x0f\x00\x00\x00\x00\x00";
        let p = FqParams { limit: 5000, horizon: Duration::from_secs(7), horizon_drop: false };
        assert_eq!(fq_options(&p), FQ);
        let drop = fq_options(&FqParams { horizon_drop: true, ..p });
        assert_eq!(drop[drop.len() - 4], 1);
    }

    #[test]
    fn tables_have_their_known_ends() {
        // Independent of the installed files: first/last values of iproute2's tables.
        let normal = Distribution::Normal.table();
        assert_eq!(normal[..4], [-32768, -28307, -26871, -25967]);
        let pareto = Distribution::Pareto.table();
        assert_eq!(pareto[0], -5461);
        assert_eq!(pareto[NETEM_DIST_TABLE_LEN - 1], 32767);
    }

    #[test]
    fn erf_is_accurate() {
        // Reference values of erf, rounded to double precision.
        for (x, expected) in [
            (0.1, 0.112_462_916_018_284_9),
            (0.5, 0.520_499_877_813_046_5),
            (1.0, 0.842_700_792_949_714_9),
            (2.0, 0.995_322_265_018_952_7),
            (3.0, 0.999_977_909_503_001_4),
        ] {
            assert!((dist::erf(x) - expected).abs() < 4e-16, "erf({x})");
            assert!((dist::erf(-x) + expected).abs() < 4e-16, "erf(-{x})");
        }
        assert_eq!(dist::erf(0.0), 0.0);
        assert_eq!(dist::erf(7.0), 1.0);
    }

    // ---- htb ---------------------------------------------------------------------------------

    #[test]
    fn htb_qdisc_default() {
        assert_eq!(htb_qdisc_options(HTB_DEFAULT_0X10, HTB_DEFAULT_R2Q, None), HTB_QDISC_DEFAULT);
    }

    #[test]
    fn htb_qdisc_direct_qlen() {
        assert_eq!(htb_qdisc_options(1, 20, Some(50)), HTB_QDISC_DIRECT_QLEN);
    }

    #[test]
    fn htb_class_rate_only() {
        let p = HtbClassParams::with_rate(10 * MBIT);
        assert_fixture(&htb_class_options(&p), &HTB_CLASS_RATE);
        // ceil 0 = ceil = rate, like tc without `ceil`.
        let zero_ceil = HtbClassParams { ceil: 0, ..p };
        assert_eq!(htb_class_options(&zero_ceil), htb_class_options(&p));
    }

    #[test]
    fn htb_class_all_options() {
        let p = HtbClassParams {
            rate: 5 * MBIT,
            ceil: 20 * MBIT,
            burst: Some(15 * KIB),
            cburst: Some(30 * KIB),
            quantum: Some(1514),
            prio: 3,
        };
        assert_fixture(&htb_class_options(&p), &HTB_CLASS_FULL);
    }

    #[test]
    fn htb_class_rates_beyond_u32() {
        let p = HtbClassParams { ceil: 50 * GBIT, ..HtbClassParams::with_rate(40 * GBIT) };
        assert_fixture(&htb_class_options(&p), &HTB_CLASS_RATE64);
    }

    #[test]
    fn htb_default_burst_depends_on_hz() {
        // With HZ = 250 tc's default burst is rate/250 + 1600 = 5000 + 1600 bytes at 10 Mbit/s.
        let p = HtbClassParams::with_rate(10 * MBIT);
        let explicit = HtbClassParams { burst: Some(6600), cburst: Some(6600), ..p };
        assert_eq!(htb_class_options_for_hz(&p, 250), htb_class_options(&explicit));
        assert_eq!(p.validate(), Ok(()));
        assert_eq!(HtbClassParams::with_rate(0).validate(), Err(ParamsError::ZeroRate { field: "rate" }));
    }

    // ---- tbf ---------------------------------------------------------------------------------

    #[test]
    fn tbf_limit_bytes() {
        let p = TbfParams { rate: MBIT, burst: 10 * KIB, limit: TbfLimit::Bytes(30_000), peakrate: None, mtu: None };
        assert_eq!(p.validate(), Ok(()));
        assert_fixture(&tbf_options(&p), &TBF_LIMIT);
    }

    #[test]
    fn tbf_latency() {
        let p = TbfParams { rate: MBIT, burst: 10 * KIB, limit: TbfLimit::Latency(ms(50)), peakrate: None, mtu: None };
        assert_fixture(&tbf_options(&p), &TBF_LATENCY);
    }

    #[test]
    fn tbf_peakrate() {
        let p = TbfParams {
            rate: 10 * MBIT,
            burst: 20 * KIB,
            limit: TbfLimit::Latency(ms(20)),
            peakrate: Some(20 * MBIT),
            mtu: Some(1600),
        };
        assert_eq!(p.validate(), Ok(()));
        assert_fixture(&tbf_options(&p), &TBF_PEAKRATE);
    }

    #[test]
    fn tbf_rate_beyond_u32() {
        let p = TbfParams {
            rate: 40 * GBIT,
            burst: 1024 * KIB,
            limit: TbfLimit::Latency(ms(10)),
            peakrate: None,
            mtu: None,
        };
        assert_fixture(&tbf_options(&p), &TBF_RATE64);
    }

    #[test]
    fn tbf_rate_and_peakrate_beyond_u32() {
        let p = TbfParams {
            rate: 40 * GBIT,
            burst: 1024 * KIB,
            limit: TbfLimit::Bytes(100_000),
            peakrate: Some(50 * GBIT),
            mtu: Some(9000),
        };
        assert_fixture(&tbf_options(&p), &TBF_RATE64_PEAKRATE64);
    }

    #[test]
    fn tbf_validate_mirrors_tc_checks() {
        let ok = TbfParams { rate: MBIT, burst: 10 * KIB, limit: TbfLimit::Bytes(30_000), peakrate: None, mtu: None };
        assert_eq!(TbfParams { rate: 0, ..ok }.validate(), Err(ParamsError::ZeroRate { field: "rate" }));
        assert_eq!(TbfParams { burst: 0, ..ok }.validate(), Err(ParamsError::ZeroBurst));
        assert_eq!(
            TbfParams { limit: TbfLimit::Latency(Duration::ZERO), ..ok }.validate(),
            Err(ParamsError::ZeroLimit)
        );
        assert_eq!(TbfParams { peakrate: Some(MBIT), ..ok }.validate(), Err(ParamsError::PeakrateWithoutMtu));
    }

    // ---- fifo --------------------------------------------------------------------------------

    #[test]
    fn pfifo_and_bfifo() {
        assert_eq!(fifo_options(100), PFIFO);
        assert_eq!(fifo_options(65_536), BFIFO);
    }

    // ---- cls_bpf -----------------------------------------------------------------------------

    #[test]
    fn bpf_direct_action() {
        assert_eq!(bpf_da_filter_options(TC_PROG_FD, TC_ANNOTATION, None), BPF_DA);
    }

    #[test]
    fn bpf_direct_action_with_classid() {
        assert_eq!(bpf_da_filter_options(TC_PROG_FD, TC_ANNOTATION, Some(CLASSID_1_10)), BPF_DA_CLASSID);
    }

    #[test]
    fn bpf_with_mirred_redirect() {
        assert_eq!(bpf_mirred_filter_options(TC_PROG_FD, TC_ANNOTATION, IFB0_IFINDEX), BPF_MIRRED);
    }

    #[test]
    fn bpf_name_is_cut_like_tc() {
        let long = "x".repeat(300);
        let ours = bpf_da_filter_options(3, &long, None);
        // FD attr (8) + NAME header (4) + 255 bytes + NUL = 256 → no padding.
        assert_eq!(ours[8..10], rta_len(RTA_HDRLEN + BPF_NAME_MAX_LEN + 1).to_ne_bytes());
        assert_eq!(bpf_name("a\0b"), b"a\0");
    }

    // ---- kernel acceptance (root only, run by hand) ------------------------------------------

    /// Just enough rtnetlink to hand our bytes to the kernel in
    /// [`kernel_accepts_encoded_options`].
    mod rtnl {
        use std::os::fd::{AsRawFd, OwnedFd};

        use nix::errno::Errno;
        use nix::sys::socket::{
            AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, send, socket,
        };

        use super::super::{RTA_HDRLEN, TCA_OPTIONS, push_attr};

        pub(super) const RTM_NEWQDISC: u16 = 36;
        pub(super) const RTM_NEWTCLASS: u16 = 40;
        pub(super) const RTM_NEWTFILTER: u16 = 44;
        const NLMSG_ERROR: u16 = 2;
        const NLM_F_REQUEST: u16 = 0x1;
        const NLM_F_ACK: u16 = 0x4;
        const NLM_F_EXCL: u16 = 0x200;
        const NLM_F_CREATE: u16 = 0x400;
        const NLMSG_HDRLEN: usize = 16;
        const TCA_KIND: u16 = 1;
        const RECV_BUF: usize = 64 * 1024;

        /// Where an object goes: `struct tcmsg` minus the family.
        pub(super) struct Target {
            pub(super) ifindex: i32,
            pub(super) handle: u32,
            pub(super) parent: u32,
            pub(super) info: u32,
        }

        pub(super) struct Rtnl {
            fd: OwnedFd,
            seq: u32,
        }

        impl Rtnl {
            pub(super) fn open() -> nix::Result<Self> {
                let fd =
                    socket(AddressFamily::Netlink, SockType::Raw, SockFlag::SOCK_CLOEXEC, SockProtocol::NetlinkRoute)?;
                bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
                Ok(Rtnl { fd, seq: 0 })
            }

            /// Send one create request and wait for its ack; `Err` carries the kernel's errno.
            pub(super) fn create(
                &mut self,
                msg_type: u16,
                target: &Target,
                kind: &str,
                options: Option<&[u8]>,
            ) -> Result<(), Errno> {
                self.seq += 1;
                let mut msg = vec![0; NLMSG_HDRLEN];
                msg.extend_from_slice(&[0; 4]); // tcm_family, pads
                msg.extend_from_slice(&target.ifindex.to_ne_bytes());
                msg.extend_from_slice(&target.handle.to_ne_bytes());
                msg.extend_from_slice(&target.parent.to_ne_bytes());
                msg.extend_from_slice(&target.info.to_ne_bytes());
                let mut kind_z = kind.as_bytes().to_vec();
                kind_z.push(0);
                push_attr(&mut msg, TCA_KIND, &kind_z);
                if let Some(options) = options {
                    push_attr(&mut msg, TCA_OPTIONS, options);
                }
                let len = u32::try_from(msg.len()).map_err(|_| Errno::EMSGSIZE)?;
                let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
                msg[0..4].copy_from_slice(&len.to_ne_bytes());
                msg[4..6].copy_from_slice(&msg_type.to_ne_bytes());
                msg[6..8].copy_from_slice(&flags.to_ne_bytes());
                msg[8..12].copy_from_slice(&self.seq.to_ne_bytes());
                send(self.fd.as_raw_fd(), &msg, MsgFlags::empty())?;

                let mut reply = vec![0; RECV_BUF];
                let n = recv(self.fd.as_raw_fd(), &mut reply, MsgFlags::empty())?;
                let field = |at: usize, width: usize| reply.get(at..at + width).filter(|_| at + width <= n);
                let kind = field(4, 2).map(|b| u16::from_ne_bytes([b[0], b[1]]));
                let error = field(NLMSG_HDRLEN, RTA_HDRLEN).map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
                match (kind, error) {
                    (Some(NLMSG_ERROR), Some(0)) => Ok(()),
                    (Some(NLMSG_ERROR), Some(err)) => Err(Errno::from_raw(-err)),
                    _ => Err(Errno::EBADMSG),
                }
            }
        }
    }

    /// The aya object (`cargo xtask build-ebpf`); override with `CHAOS_EBPF_OBJECT`.
    const EBPF_OBJECT: &str =
        concat!(env!("CARGO_MANIFEST_DIR"), "/../target/bpf-build/bpfel-unknown-none/release/chaos-ebpf");
    const LO_IFINDEX: i32 = 1;
    const TC_H_ROOT: u32 = 0xFFFF_FFFF;
    const TC_H_CLSACT: u32 = 0xFFFF_FFF1;
    const TC_H_CLSACT_EGRESS: u32 = 0xFFFF_FFF3;
    const CLSACT_HANDLE: u32 = 0xFFFF_0000;
    /// `tcm_info` of a filter: priority 1 in the high half, `htons(ETH_P_ALL)` in the low half.
    const FILTER_INFO_PRIO1_ALL: u32 = (1 << 16) | 0x0300;

    fn handle(major: u32, minor: u32) -> u32 {
        (major << 16) | minor
    }

    fn tc_show(args: &[&str]) -> anyhow::Result<String> {
        let out = std::process::Command::new("tc").args(args).output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        println!("$ tc {}\n{text}", args.join(" "));
        Ok(text)
    }

    /// How the encoders were verified against a real kernel (done on Linux 6.18 with the
    /// bytes of this module; netem skipped there: no sch_netem). Run as root:
    /// `cargo test -p chaos-agent --lib faults::network::encode -- --ignored --nocapture`.
    ///
    /// A thread moves into a fresh network namespace (`unshare(CLONE_NEWNET)`: nothing to clean
    /// up, the namespace dies with the thread) and installs on its `lo`, over a raw rtnetlink
    /// socket carrying exactly our `TCA_OPTIONS` bytes: an htb root (`default 0x10`,
    /// `direct_qlen`), htb classes with 32- and 64-bit rates, tbf (latency, peak rate, 64-bit
    /// rates), pfifo and bfifo leaves, a netem leaf (the kernel must accept it or answer ENOENT
    /// = no sch_netem, printed as skipped), and, when the aya object exists, a direct-action
    /// cls_bpf filter with classid under htb plus a clsact-egress cls_bpf with a mirred
    /// redirect. Every request must be acked, and `tc -d … show`, run from the same thread (so
    /// in the namespace), must read the values back.
    #[test]
    #[ignore = "needs root: creates a network namespace and tc objects"]
    fn kernel_accepts_encoded_options() -> anyhow::Result<()> {
        match std::thread::spawn(verify_in_fresh_netns).join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    fn verify_in_fresh_netns() -> anyhow::Result<()> {
        use anyhow::Context as _;
        use nix::errno::Errno;
        use rtnl::{RTM_NEWQDISC, RTM_NEWTCLASS, Rtnl, Target};

        if let Err(errno) = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET) {
            println!("SKIPPED: unshare(CLONE_NEWNET) failed ({errno}); run as root");
            return Ok(());
        }
        let mut nl = Rtnl::open()?;
        let on = |handle, parent| Target { ifindex: LO_IFINDEX, handle, parent, info: 0 };

        let root = handle(1, 0);
        nl.create(RTM_NEWQDISC, &on(root, TC_H_ROOT), "htb", Some(&htb_qdisc_options(0x10, HTB_DEFAULT_R2Q, Some(50))))
            .context("htb qdisc")?;

        let classes = [
            (0x10, HtbClassParams::with_rate(10 * MBIT)),
            (
                0x20,
                HtbClassParams {
                    rate: 5 * MBIT,
                    ceil: 20 * MBIT,
                    burst: Some(15 * KIB),
                    cburst: Some(30 * KIB),
                    quantum: Some(1514),
                    prio: 3,
                },
            ),
            (0x30, HtbClassParams { ceil: 50 * GBIT, ..HtbClassParams::with_rate(40 * GBIT) }),
            (0x40, HtbClassParams::with_rate(MBIT)),
            (0x50, HtbClassParams::with_rate(MBIT)),
            (0x60, HtbClassParams::with_rate(MBIT)),
        ];
        for (minor, params) in &classes {
            nl.create(RTM_NEWTCLASS, &on(handle(1, *minor), root), "htb", Some(&htb_class_options(params)))
                .with_context(|| format!("htb class 1:{minor:x} {params:?}"))?;
        }

        let tbfs = [
            (
                0x10,
                TbfParams { rate: MBIT, burst: 10 * KIB, limit: TbfLimit::Latency(ms(50)), peakrate: None, mtu: None },
            ),
            (
                0x20,
                TbfParams {
                    rate: 10 * MBIT,
                    burst: 20 * KIB,
                    limit: TbfLimit::Latency(ms(20)),
                    peakrate: Some(20 * MBIT),
                    mtu: Some(1600),
                },
            ),
            (
                0x30,
                TbfParams {
                    rate: 40 * GBIT,
                    burst: 1024 * KIB,
                    limit: TbfLimit::Bytes(100_000),
                    peakrate: Some(50 * GBIT),
                    mtu: Some(9000),
                },
            ),
        ];
        for (minor, params) in &tbfs {
            nl.create(RTM_NEWQDISC, &on(handle(*minor, 0), handle(1, *minor)), "tbf", Some(&tbf_options(params)))
                .with_context(|| format!("tbf under 1:{minor:x} {params:?}"))?;
        }
        nl.create(RTM_NEWQDISC, &on(handle(0x40, 0), handle(1, 0x40)), "pfifo", Some(&fifo_options(100)))
            .context("pfifo")?;
        nl.create(RTM_NEWQDISC, &on(handle(0x50, 0), handle(1, 0x50)), "bfifo", Some(&fifo_options(65_536)))
            .context("bfifo")?;
        match nl.create(
            RTM_NEWQDISC,
            &on(handle(0x60, 0), handle(1, 0x60)),
            "netem",
            Some(&netem_options(&netem_all_params())),
        ) {
            Ok(()) => println!("netem accepted"),
            Err(Errno::ENOENT) => println!("SKIPPED netem: this kernel has no sch_netem (ENOENT)"),
            Err(errno) => anyhow::bail!("netem refused: {errno}"),
        }

        let classes_shown = tc_show(&["-d", "class", "show", "dev", "lo"])?;
        for expected in [
            "class htb 1:10 root leaf 10: prio 0 quantum 125000 rate 10Mbit ceil 10Mbit linklayer ethernet burst 1600b",
            "class htb 1:20 root leaf 20: prio 3 quantum 1514 rate 5Mbit ceil 20Mbit linklayer ethernet burst 15Kb",
            "cburst 30Kb",
            "rate 40Gbit ceil 50Gbit",
        ] {
            anyhow::ensure!(classes_shown.contains(expected), "class show lacks {expected:?}");
        }
        let qdiscs_shown = tc_show(&["-d", "qdisc", "show", "dev", "lo"])?;
        for expected in [
            "qdisc htb 1: root refcnt 2 r2q 10 default 0x10 direct_packets_stat 0",
            "direct_qlen 50",
            "qdisc tbf 10: parent 1:10 rate 1Mbit burst 10Kb/1 mpu 0b lat 50ms",
            "qdisc tbf 20: parent 1:20 rate 10Mbit burst 20Kb/1 mpu 0b peakrate 20Mbit mtu 1600b/1 mpu 0b lat 20ms",
            "qdisc tbf 30: parent 1:30 rate 40Gbit",
            "peakrate 50Gbit",
            "qdisc pfifo 40: parent 1:40 limit 100p",
            "qdisc bfifo 50: parent 1:50 limit 64Kb",
        ] {
            anyhow::ensure!(qdiscs_shown.contains(expected), "qdisc show lacks {expected:?}");
        }

        let object = std::env::var("CHAOS_EBPF_OBJECT").unwrap_or_else(|_| EBPF_OBJECT.into());
        if !std::path::Path::new(&object).exists() {
            println!("SKIPPED cls_bpf: no BPF object at {object} (cargo xtask build-ebpf)");
            return Ok(());
        }
        verify_bpf_filters(&mut nl, &object, root)
    }

    fn verify_bpf_filters(nl: &mut rtnl::Rtnl, object: &str, root: u32) -> anyhow::Result<()> {
        use std::os::fd::{AsFd as _, AsRawFd as _};

        use anyhow::Context as _;
        use aya::programs::SchedClassifier;
        use rtnl::{RTM_NEWQDISC, RTM_NEWTFILTER, Target};

        const PROGRAM: &str = "chaos_steer";
        const ANNOTATION: &str = "chaos-ebpf:[classifier]";
        let mut ebpf = aya::Ebpf::load_file(object).with_context(|| format!("load {object}"))?;
        let program: &mut SchedClassifier =
            ebpf.program_mut(PROGRAM).with_context(|| format!("{object} has no {PROGRAM}"))?.try_into()?;
        program.load()?;
        let fd = u32::try_from(program.fd()?.as_fd().as_raw_fd())?;

        nl.create(
            RTM_NEWTFILTER,
            &Target { ifindex: LO_IFINDEX, handle: 0, parent: root, info: FILTER_INFO_PRIO1_ALL },
            "bpf",
            Some(&bpf_da_filter_options(fd, ANNOTATION, Some(handle(1, 0x10)))),
        )
        .context("cls_bpf direct-action under htb")?;
        nl.create(
            RTM_NEWQDISC,
            &Target { ifindex: LO_IFINDEX, handle: CLSACT_HANDLE, parent: TC_H_CLSACT, info: 0 },
            "clsact",
            None,
        )
        .context("clsact")?;
        let lo = u32::try_from(LO_IFINDEX)?;
        nl.create(
            RTM_NEWTFILTER,
            &Target { ifindex: LO_IFINDEX, handle: 0, parent: TC_H_CLSACT_EGRESS, info: FILTER_INFO_PRIO1_ALL },
            "bpf",
            Some(&bpf_mirred_filter_options(fd, ANNOTATION, lo)),
        )
        .context("cls_bpf + mirred on clsact egress")?;

        let htb_filters = tc_show(&["filter", "show", "dev", "lo"])?;
        let expected = "flowid 1:10 chaos-ebpf:[classifier] direct-action";
        anyhow::ensure!(htb_filters.contains(expected), "filter show lacks {expected:?}");
        let egress = tc_show(&["filter", "show", "dev", "lo", "egress"])?;
        for expected in ["chaos-ebpf:[classifier]", "mirred (Egress Redirect to device lo) stolen"] {
            anyhow::ensure!(egress.contains(expected), "egress filter show lacks {expected:?}");
        }
        anyhow::ensure!(!egress.contains("direct-action"), "mirred filter must be classic mode");
        Ok(())
    }

    // ---- fixtures ------------------------------------------------------------------------------

    /// iproute2 6.1.0: `tc qdisc add dev v0 root netem delay 10ms`
    const NETEM_DELAY: &[u8] = &[
        0x5a, 0x62, 0x02, 0x00, 0xe8, 0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    ];

    /// iproute2 6.1.0: `tc qdisc add dev v0 root netem delay 1.5ms 0.333ms`
    const NETEM_DELAY_SUB_MS: &[u8] = &[
        0x8d, 0x5b, 0x00, 0x00, 0xe8, 0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x53, 0x14, 0x00, 0x00,
    ];

    /// iproute2 6.1.0: `tc qdisc add dev v0 root netem delay 100ms 20ms 25% distribution normal`
    const NETEM_DELAY_JITTER_CORR_NORMAL: Fixture = Fixture {
        head: &[
            0x84, 0xd7, 0x17, 0x00, 0xe8, 0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0xb4, 0xc4, 0x04, 0x00, 0x10, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x40, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x04, 0x20, 0x02, 0x00, 0x00, 0x80, 0x6d, 0x91,
        ],
        len: 8236,
        fnv1a64: 0x14548d6ffc029040,
    };

    /// iproute2 6.1.0: `tc qdisc add dev v0 root netem delay 20ms 5ms distribution paretonormal`
    const NETEM_DELAY_PARETONORMAL: Fixture = Fixture {
        head: &[
            0xb4, 0xc4, 0x04, 0x00, 0xe8, 0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x2d, 0x31, 0x01, 0x00, 0x04, 0x20, 0x02, 0x00, 0xef, 0xcf, 0x5d, 0xd4,
        ],
        len: 8220,
        fnv1a64: 0xbed09c782aed32a1,
    };

    /// iproute2 6.1.0: `tc qdisc add dev v0 root netem loss random 1.5% 25%`
    const NETEM_LOSS: &[u8] = &[
        0x00, 0x00, 0x00, 0x00, 0xe8, 0x03, 0x00, 0x00, 0x3d, 0x0a, 0xd7, 0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x10, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x40,
        0x00, 0x00, 0x00, 0x00,
    ];

    /// iproute2 6.1.0: `tc qdisc add dev v0 root netem duplicate 5%`
    const NETEM_DUPLICATE: &[u8] = &[
        0x00, 0x00, 0x00, 0x00, 0xe8, 0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xcd, 0xcc,
        0xcc, 0x0c, 0x00, 0x00, 0x00, 0x00,
    ];

    /// iproute2 6.1.0: `tc qdisc add dev v0 root netem duplicate 5% 25%`
    const NETEM_DUPLICATE_CORR: &[u8] = &[
        0x00, 0x00, 0x00, 0x00, 0xe8, 0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xcd, 0xcc,
        0xcc, 0x0c, 0x00, 0x00, 0x00, 0x00,
    ];

    /// iproute2 6.1.0: `tc qdisc add dev v0 root netem corrupt 0.1% 10%`
    const NETEM_CORRUPT: &[u8] = &[
        0x00, 0x00, 0x00, 0x00, 0xe8, 0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x10, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x0c, 0x00, 0x04, 0x00, 0x37, 0x89, 0x41, 0x00, 0x9a, 0x99, 0x99, 0x19,
    ];

    /// iproute2 6.1.0: `tc qdisc add dev v0 root netem delay 10ms reorder 25% 50% gap 5`
    const NETEM_REORDER_GAP: &[u8] = &[
        0x5a, 0x62, 0x02, 0x00, 0xe8, 0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x05, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x10, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x0c, 0x00, 0x03, 0x00, 0x00, 0x00, 0x00, 0x40, 0x00, 0x00, 0x00, 0x80,
    ];

    /// iproute2 6.1.0: `tc qdisc add dev v0 root netem delay 10ms reorder 25%`
    const NETEM_REORDER_DEFAULT_GAP: &[u8] = &[
        0x5a, 0x62, 0x02, 0x00, 0xe8, 0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x0c, 0x00, 0x03, 0x00, 0x00, 0x00, 0x00, 0x40, 0x00, 0x00, 0x00, 0x00,
    ];

    /// iproute2 6.1.0: `tc qdisc add dev v0 root netem rate 40gbit`
    const NETEM_RATE64: &[u8] = &[
        0x00, 0x00, 0x00, 0x00, 0xe8, 0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x0c, 0x00, 0x08, 0x00, 0x00, 0xf2, 0x05, 0x2a, 0x01, 0x00, 0x00, 0x00,
        0x14, 0x00, 0x06, 0x00, 0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00,
    ];

    /// iproute2 6.1.0: `tc qdisc add dev v0 root netem rate 10mbit`
    const NETEM_RATE: &[u8] = &[
        0x00, 0x00, 0x00, 0x00, 0xe8, 0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x14, 0x00, 0x06, 0x00, 0xd0, 0x12, 0x13, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    ];

    /// iproute2 6.1.0: `tc qdisc add dev v0 root netem limit 5000 delay 10ms`
    const NETEM_LIMIT: &[u8] = &[
        0x5a, 0x62, 0x02, 0x00, 0x88, 0x13, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    ];

    /// iproute2 6.1.0: `tc qdisc add dev v0 root netem limit 20000 delay 50ms 10ms 20% distribution pareto loss random 2% 30% duplicate 1% 15% corrupt 0.5% 5% reorder 10% 40% gap 3 rate 100mbit`
    const NETEM_ALL: Fixture = Fixture {
        head: &[
            0xc2, 0xeb, 0x0b, 0x00, 0x20, 0x4e, 0x00, 0x00, 0x52, 0xb8, 0x1e, 0x05, 0x03, 0x00, 0x00, 0x00, 0x29, 0x5c,
            0x8f, 0x02, 0x5a, 0x62, 0x02, 0x00, 0x10, 0x00, 0x01, 0x00, 0x33, 0x33, 0x33, 0x33, 0xcc, 0xcc, 0xcc, 0x4c,
            0x66, 0x66, 0x66, 0x26, 0x0c, 0x00, 0x03, 0x00, 0x9a, 0x99, 0x99, 0x19, 0x66, 0x66, 0x66, 0x66, 0x0c, 0x00,
            0x04, 0x00, 0x14, 0xae, 0x47, 0x01, 0xcd, 0xcc, 0xcc, 0x0c, 0x14, 0x00, 0x06, 0x00, 0x20, 0xbc, 0xbe, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x04, 0x20, 0x02, 0x00, 0xab, 0xea,
            0xac, 0xea, 0xac, 0xea, 0xad, 0xea,
        ],
        len: 8280,
        fnv1a64: 0x1426b4c9f6c7f816,
    };

    /// iproute2 6.1.0: `tc qdisc add dev v0 root handle 1: htb default 10`
    const HTB_QDISC_DEFAULT: &[u8] = &[
        0x18, 0x00, 0x02, 0x00, 0x03, 0x00, 0x00, 0x00, 0x0a, 0x00, 0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    ];

    /// iproute2 6.1.0: `tc qdisc add dev v0 root handle 1: htb default 1 r2q 20 direct_qlen 50`
    const HTB_QDISC_DIRECT_QLEN: &[u8] = &[
        0x18, 0x00, 0x02, 0x00, 0x03, 0x00, 0x00, 0x00, 0x14, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x08, 0x00, 0x05, 0x00, 0x32, 0x00, 0x00, 0x00,
    ];

    /// iproute2 6.1.0: `tc class add dev v0 parent 1: classid 1:10 htb rate 10mbit`
    const HTB_CLASS_RATE: Fixture = Fixture {
        head: &[
            0x30, 0x00, 0x01, 0x00, 0x03, 0x01, 0x00, 0x00, 0xff, 0xff, 0x00, 0x00, 0xd0, 0x12, 0x13, 0x00, 0x03, 0x01,
            0x00, 0x00, 0xff, 0xff, 0x00, 0x00, 0xd0, 0x12, 0x13, 0x00, 0x20, 0x4e, 0x00, 0x00, 0x20, 0x4e, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x04, 0x04, 0x04, 0x00, 0x5d, 0x00,
            0x00, 0x00, 0xbb, 0x00, 0x00, 0x00, 0x28, 0x01, 0x00, 0x00, 0x86, 0x01, 0x00, 0x00, 0xf4, 0x01, 0x00, 0x00,
            0x51, 0x02, 0x00, 0x00, 0xaf, 0x02, 0x00, 0x00, 0x1c, 0x03, 0x00, 0x00,
        ],
        len: 2104,
        fnv1a64: 0x0532ef5f424f15a3,
    };

    /// iproute2 6.1.0: `tc class add dev v0 parent 1: classid 1:20 htb rate 5mbit ceil 20mbit burst 15k cburst 30k quantum 1514 prio 3`
    const HTB_CLASS_FULL: Fixture = Fixture {
        head: &[
            0x30, 0x00, 0x01, 0x00, 0x03, 0x01, 0x00, 0x00, 0xff, 0xff, 0x00, 0x00, 0x68, 0x89, 0x09, 0x00, 0x03, 0x01,
            0x00, 0x00, 0xff, 0xff, 0x00, 0x00, 0xa0, 0x25, 0x26, 0x00, 0x00, 0xdc, 0x05, 0x00, 0x00, 0xee, 0x02, 0x00,
            0xea, 0x05, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x03, 0x00, 0x00, 0x00, 0x04, 0x04, 0x04, 0x00, 0xbb, 0x00,
            0x00, 0x00, 0x86, 0x01, 0x00, 0x00, 0x51, 0x02, 0x00, 0x00, 0x1c, 0x03, 0x00, 0x00, 0xe8, 0x03, 0x00, 0x00,
            0xa3, 0x04, 0x00, 0x00, 0x6e, 0x05, 0x00, 0x00, 0x39, 0x06, 0x00, 0x00,
        ],
        len: 2104,
        fnv1a64: 0xcfdc1fc729c3e439,
    };

    /// iproute2 6.1.0: `tc class add dev v0 parent 1: classid 1:30 htb rate 40gbit ceil 50gbit`
    const HTB_CLASS_RATE64: Fixture = Fixture {
        head: &[
            0x0c, 0x00, 0x06, 0x00, 0x00, 0xf2, 0x05, 0x2a, 0x01, 0x00, 0x00, 0x00, 0x0c, 0x00, 0x07, 0x00, 0x80, 0x6e,
            0x87, 0x74, 0x01, 0x00, 0x00, 0x00, 0x30, 0x00, 0x01, 0x00, 0x03, 0x01, 0x00, 0x00, 0xff, 0xff, 0x00, 0x00,
            0xff, 0xff, 0xff, 0xff, 0x03, 0x01, 0x00, 0x00, 0xff, 0xff, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x04, 0x04, 0x04, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        ],
        len: 2128,
        fnv1a64: 0x8258b2a00276973a,
    };

    /// iproute2 6.1.0: `tc qdisc add dev v1 root tbf rate 1mbit burst 10k limit 30000`
    const TBF_LIMIT: Fixture = Fixture {
        head: &[
            0x28, 0x00, 0x01, 0x00, 0x03, 0x01, 0x00, 0x00, 0xff, 0xff, 0x00, 0x00, 0x48, 0xe8, 0x01, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x30, 0x75, 0x00, 0x00, 0x00, 0x88, 0x13, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x08, 0x00, 0x06, 0x00, 0x00, 0x28, 0x00, 0x00, 0x04, 0x04, 0x02, 0x00, 0xe8, 0x03,
            0x00, 0x00, 0xd0, 0x07, 0x00, 0x00, 0xb8, 0x0b, 0x00, 0x00, 0xa0, 0x0f, 0x00, 0x00, 0x88, 0x13, 0x00, 0x00,
            0x70, 0x17, 0x00, 0x00, 0x58, 0x1b, 0x00, 0x00, 0x40, 0x1f, 0x00, 0x00,
        ],
        len: 1076,
        fnv1a64: 0x1b376a6e75b40351,
    };

    /// iproute2 6.1.0: `tc qdisc add dev v1 root tbf rate 1mbit burst 10k latency 50ms`
    const TBF_LATENCY: Fixture = Fixture {
        head: &[
            0x28, 0x00, 0x01, 0x00, 0x03, 0x01, 0x00, 0x00, 0xff, 0xff, 0x00, 0x00, 0x48, 0xe8, 0x01, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x6a, 0x40, 0x00, 0x00, 0x00, 0x88, 0x13, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x08, 0x00, 0x06, 0x00, 0x00, 0x28, 0x00, 0x00, 0x04, 0x04, 0x02, 0x00, 0xe8, 0x03,
            0x00, 0x00, 0xd0, 0x07, 0x00, 0x00, 0xb8, 0x0b, 0x00, 0x00, 0xa0, 0x0f, 0x00, 0x00, 0x88, 0x13, 0x00, 0x00,
            0x70, 0x17, 0x00, 0x00, 0x58, 0x1b, 0x00, 0x00, 0x40, 0x1f, 0x00, 0x00,
        ],
        len: 1076,
        fnv1a64: 0xee2eda1dc876617c,
    };

    /// iproute2 6.1.0: `tc qdisc add dev v1 root tbf rate 10mbit burst 20k latency 20ms peakrate 20mbit mtu 1600`
    const TBF_PEAKRATE: Fixture = Fixture {
        head: &[
            0x28, 0x00, 0x01, 0x00, 0x03, 0x01, 0x00, 0x00, 0xff, 0xff, 0x00, 0x00, 0xd0, 0x12, 0x13, 0x00, 0x03, 0x01,
            0x00, 0x00, 0xff, 0xff, 0x00, 0x00, 0xa0, 0x25, 0x26, 0x00, 0xa8, 0xb1, 0x00, 0x00, 0x00, 0xe8, 0x03, 0x00,
            0x10, 0x27, 0x00, 0x00, 0x08, 0x00, 0x06, 0x00, 0x00, 0x50, 0x00, 0x00, 0x04, 0x04, 0x02, 0x00, 0x5d, 0x00,
            0x00, 0x00, 0xbb, 0x00, 0x00, 0x00, 0x28, 0x01, 0x00, 0x00, 0x86, 0x01, 0x00, 0x00, 0xf4, 0x01, 0x00, 0x00,
            0x51, 0x02, 0x00, 0x00, 0xaf, 0x02, 0x00, 0x00, 0x1c, 0x03, 0x00, 0x00,
        ],
        len: 2112,
        fnv1a64: 0xed8742959ca8c603,
    };

    /// iproute2 6.1.0: `tc qdisc add dev v1 root tbf rate 40gbit burst 1m latency 10ms`
    const TBF_RATE64: Fixture = Fixture {
        head: &[
            0x28, 0x00, 0x01, 0x00, 0x03, 0x01, 0x00, 0x00, 0xff, 0xff, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x80, 0xf0, 0x0a, 0x03, 0xe4, 0x0e, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x08, 0x00, 0x06, 0x00, 0x00, 0x00, 0x10, 0x00, 0x0c, 0x00, 0x04, 0x00, 0x00, 0xf2,
            0x05, 0x2a, 0x01, 0x00, 0x00, 0x00, 0x04, 0x04, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        ],
        len: 1088,
        fnv1a64: 0xb5fa822915ca54f3,
    };

    /// iproute2 6.1.0: `tc qdisc add dev v1 root tbf rate 40gbit burst 1m limit 100000 peakrate 50gbit mtu 9000`
    const TBF_RATE64_PEAKRATE64: Fixture = Fixture {
        head: &[
            0x28, 0x00, 0x01, 0x00, 0x06, 0x01, 0x00, 0x00, 0xff, 0xff, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0x06, 0x01,
            0x00, 0x00, 0xff, 0xff, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0xa0, 0x86, 0x01, 0x00, 0xe4, 0x0e, 0x00, 0x00,
            0x1f, 0x00, 0x00, 0x00, 0x08, 0x00, 0x06, 0x00, 0x00, 0x00, 0x10, 0x00, 0x0c, 0x00, 0x04, 0x00, 0x00, 0xf2,
            0x05, 0x2a, 0x01, 0x00, 0x00, 0x00, 0x04, 0x04, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        ],
        len: 2136,
        fnv1a64: 0x089eb26c54909066,
    };

    /// iproute2 6.1.0: `tc qdisc add dev v1 root pfifo limit 100`
    const PFIFO: &[u8] = &[0x64, 0x00, 0x00, 0x00];

    /// iproute2 6.1.0: `tc qdisc add dev v1 root bfifo limit 65536`
    const BFIFO: &[u8] = &[0x00, 0x00, 0x01, 0x00];

    /// iproute2 6.1.0: `tc filter add dev v0 egress bpf da obj /tmp/encbpf/cls.o sec classifier`
    const BPF_DA: &[u8] = &[
        0x08, 0x00, 0x06, 0x00, 0x06, 0x00, 0x00, 0x00, 0x17, 0x00, 0x07, 0x00, 0x63, 0x6c, 0x73, 0x2e, 0x6f, 0x3a,
        0x5b, 0x63, 0x6c, 0x61, 0x73, 0x73, 0x69, 0x66, 0x69, 0x65, 0x72, 0x5d, 0x00, 0x00, 0x08, 0x00, 0x08, 0x00,
        0x01, 0x00, 0x00, 0x00,
    ];

    /// iproute2 6.1.0: `tc filter add dev v0 parent 1: bpf obj /tmp/encbpf/cls.o sec classifier classid 1:10 da`
    const BPF_DA_CLASSID: &[u8] = &[
        0x08, 0x00, 0x03, 0x00, 0x10, 0x00, 0x01, 0x00, 0x08, 0x00, 0x06, 0x00, 0x06, 0x00, 0x00, 0x00, 0x17, 0x00,
        0x07, 0x00, 0x63, 0x6c, 0x73, 0x2e, 0x6f, 0x3a, 0x5b, 0x63, 0x6c, 0x61, 0x73, 0x73, 0x69, 0x66, 0x69, 0x65,
        0x72, 0x5d, 0x00, 0x00, 0x08, 0x00, 0x08, 0x00, 0x01, 0x00, 0x00, 0x00,
    ];

    /// iproute2 6.1.0: `tc filter add dev v0 egress bpf obj /tmp/encbpf/cls.o sec classifier action mirred egress redirect dev ifb0`
    const BPF_MIRRED: &[u8] = &[
        0x38, 0x00, 0x01, 0x00, 0x34, 0x00, 0x01, 0x00, 0x0b, 0x00, 0x01, 0x00, 0x6d, 0x69, 0x72, 0x72, 0x65, 0x64,
        0x00, 0x00, 0x24, 0x00, 0x02, 0x80, 0x20, 0x00, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x04, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x02, 0x00,
        0x00, 0x00, 0x08, 0x00, 0x06, 0x00, 0x06, 0x00, 0x00, 0x00, 0x17, 0x00, 0x07, 0x00, 0x63, 0x6c, 0x73, 0x2e,
        0x6f, 0x3a, 0x5b, 0x63, 0x6c, 0x61, 0x73, 0x73, 0x69, 0x66, 0x69, 0x65, 0x72, 0x5d, 0x00, 0x00,
    ];
}
