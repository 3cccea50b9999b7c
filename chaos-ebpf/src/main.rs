//! lymph-chaos tc classifier (kernel side).
//!
//! Four programs share the maps defined in `chaos-common` (see its module docs for the data path):
//!
//! - `chaos_ingress` / `chaos_egress` (clsact, direct action): parse Ethernet/loopback or bare L3, optional
//!   802.1Q tag, IPv4 (non-first fragments skipped) or IPv6 (up to four extension headers), TCP/UDP ports; look
//!   the destination port, then the source port, up in `CHAOS_RULES`; ignore expired rules; count; drop for
//!   blackhole or random loss; mark packets to shape in `tc_index`. Anything that is not ours returns
//!   `TC_ACT_UNSPEC` so the next filter (ours or the operator's) still runs.
//! - `chaos_steer` (clsact, classic mode with an `act_mirred` redirect to the agent's IFB): matches marked packets.
//! - `chaos_ifb` (on the IFB's root HTB, direct action): turns the mark into the HTB class and clears it.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
#![cfg_attr(not(target_arch = "bpf"), allow(dead_code, unused_imports))]

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
    macros::{classifier, map},
    maps::{HashMap, PerCpuArray},
    programs::TcContext,
};
use chaos_common::{
    Counters, Iface, MAX_IFACES, MAX_RULE_KEYS, MAX_RULES, Rule, RuleKey, action, proto,
    scope::{self, HOOK_NONE},
};

/// `tc_index` bits. The kernel leaves `tc_index` alone on the way through mirred and the IFB (it is only used by
/// the long-gone dsmark/tcindex qdiscs), which makes it the one field that can carry our decision from the device
/// hook to the IFB and back:
/// - [`SHAPE_MARK`] | [`EGRESS_ORIGIN`]? | class minor: set by `chaos_ingress`/`chaos_egress`, read by `chaos_steer`
///   (redirect) and `chaos_ifb` (class);
/// - [`RETURN_MARK`]: set by `chaos_ifb` on packets that came from an egress hook. The IFB sends those back into
///   the device's egress path, where our filters see them a second time; the mark makes `chaos_egress` leave them
///   alone and `chaos_steer` match them without redirecting (the IFB's `tc_skip_classify` makes mirred a no-op for
///   exactly that one pass), like the u32 + mirred setups every IFB user relies on.
const SHAPE_MARK: u16 = 0x8000;
const RETURN_MARK: u16 = 0x4000;
const EGRESS_ORIGIN: u16 = 0x2000;
const MINOR_MASK: u16 = 0x1fff;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;
const IPV6_HDR_LEN: usize = 40;
const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_DSTOPTS: u8 = 60;
const IPV6_MAX_EXT_HEADERS: usize = 4;

#[map(name = "CHAOS_RULES")]
static RULES: HashMap<RuleKey, Rule> = HashMap::with_max_entries(MAX_RULE_KEYS, 0);

#[map(name = "CHAOS_COUNTERS")]
static COUNTERS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(MAX_RULES, 0);

#[map(name = "CHAOS_IFACES")]
static IFACES: HashMap<u32, Iface> = HashMap::with_max_entries(MAX_IFACES, 0);

#[classifier]
pub fn chaos_ingress(ctx: TcContext) -> i32 {
    classify(&ctx, true)
}

#[classifier]
pub fn chaos_egress(ctx: TcContext) -> i32 {
    classify(&ctx, false)
}

/// Classic-mode classifier: a non-zero return means "match" and runs the filter's mirred action.
#[classifier]
pub fn chaos_steer(ctx: TcContext) -> i32 {
    // SAFETY: `skb` is the context pointer the kernel handed us.
    let tc_index = unsafe { (*ctx.skb.skb).tc_index } as u16;
    if tc_index & RETURN_MARK != 0 {
        // Back from the IFB: match so mirred's action runs and consumes the IFB's skip flag (no redirect).
        // SAFETY: `tc_index` is writable for tc programs.
        unsafe { (*ctx.skb.skb).tc_index = 0 };
        -1
    } else if tc_index & SHAPE_MARK != 0 {
        -1 // match: redirect to the IFB, keep the filter's own classid
    } else {
        0 // no match: the next filter runs
    }
}

/// Direct-action classifier on the IFB's HTB root: `tc_classid` takes the minor (the filter carries the major).
#[classifier]
pub fn chaos_ifb(ctx: TcContext) -> i32 {
    // SAFETY: `skb` is the context pointer; `tc_index` and `tc_classid` are writable for tc programs.
    unsafe {
        let skb = ctx.skb.skb;
        let tc_index = (*skb).tc_index as u16;
        if tc_index & SHAPE_MARK != 0 {
            (*skb).tc_classid = u32::from(tc_index & MINOR_MASK);
            (*skb).tc_index = if tc_index & EGRESS_ORIGIN != 0 { u32::from(RETURN_MARK) } else { 0 };
        }
    }
    TC_ACT_OK
}

#[inline(always)]
fn classify(ctx: &TcContext, at_ingress: bool) -> i32 {
    match try_classify(ctx, at_ingress) {
        Some(verdict) => verdict,
        None => TC_ACT_UNSPEC,
    }
}

/// Returns `None` for packets that are not ours (parse failure, no rule, expired rule).
#[inline(always)]
fn try_classify(ctx: &TcContext, at_ingress: bool) -> Option<i32> {
    // SAFETY: reading plain fields of the context.
    let (ifindex, tc_index) = unsafe { ((*ctx.skb.skb).ifindex, (*ctx.skb.skb).tc_index as u16) };
    if tc_index & RETURN_MARK != 0 {
        return None; // already shaped on its way out; `chaos_steer` finishes the return trip
    }
    // SAFETY: the value is only read, and copied out immediately.
    let iface = *unsafe { IFACES.get(ifindex) }?;
    let hook = if at_ingress { iface.ingress_hook } else { iface.egress_hook };
    if hook == HOOK_NONE {
        return None;
    }
    let (proto, sport, dport) = parse_ports(ctx, iface.l3_offset as usize)?;

    let dst_key = RuleKey { port: dport, proto, scope: scope::encode(hook, scope::SIDE_DST) };
    let src_key = RuleKey { port: sport, proto, scope: scope::encode(hook, scope::SIDE_SRC) };
    // SAFETY: copied out of the map value right away.
    let rule = match unsafe { RULES.get(dst_key) } {
        Some(rule) => *rule,
        None => *unsafe { RULES.get(src_key) }?,
    };
    // SAFETY: helper without arguments.
    if unsafe { bpf_ktime_get_ns() } >= rule.expires_at_ns {
        return None;
    }
    let counters = COUNTERS.get_ptr_mut(rule.slot);
    if let Some(c) = counters {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += u64::from(ctx.len());
        }
    }
    // SAFETY: helper without arguments.
    let lost = rule.loss_threshold != 0 && unsafe { bpf_get_prandom_u32() } < rule.loss_threshold;
    if lost || rule.action == action::DROP {
        if let Some(c) = counters {
            // SAFETY: as above.
            unsafe { (*c).drops += 1 };
        }
        return Some(TC_ACT_SHOT);
    }
    if rule.action == action::SHAPE {
        let origin = if at_ingress { 0 } else { EGRESS_ORIGIN };
        let mark = SHAPE_MARK | origin | ((rule.class_minor as u16) & MINOR_MASK);
        // SAFETY: `tc_index` is writable for tc programs.
        unsafe { (*ctx.skb.skb).tc_index = u32::from(mark) };
    }
    // Fall through to the next filter: `chaos_steer` redirects marked packets, others pass untouched.
    None
}

/// Returns (IP protocol, source port, destination port) in host byte order for TCP and UDP packets.
#[inline(always)]
fn parse_ports(ctx: &TcContext, l3_offset: usize) -> Option<(u8, u16, u16)> {
    let mut off = l3_offset;
    let mut ethertype = if l3_offset >= 2 {
        u16::from_be(ctx.load::<u16>(l3_offset - 2).ok()?)
    } else {
        // Bare L3 device: skb->protocol says what follows (network byte order in the u32 field).
        // SAFETY: reading a plain field of the context.
        u16::from_be(unsafe { (*ctx.skb.skb).protocol } as u16)
    };
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        ethertype = u16::from_be(ctx.load::<u16>(off + 2).ok()?);
        off += 4;
    }
    let (proto, l4) = match ethertype {
        ETH_P_IP => {
            let ver_ihl: u8 = ctx.load(off).ok()?;
            let frag: u16 = u16::from_be(ctx.load(off + 6).ok()?);
            if frag & 0x1fff != 0 {
                return None; // not the first fragment: no L4 header
            }
            let proto: u8 = ctx.load(off + 9).ok()?;
            (proto, off + usize::from(ver_ihl & 0x0f) * 4)
        }
        ETH_P_IPV6 => {
            let mut next: u8 = ctx.load(off + 6).ok()?;
            let mut l4 = off + IPV6_HDR_LEN;
            for _ in 0..IPV6_MAX_EXT_HEADERS {
                match next {
                    IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                        let hdr: [u8; 2] = ctx.load(l4).ok()?;
                        next = hdr[0];
                        l4 += (usize::from(hdr[1]) + 1) * 8;
                    }
                    IPPROTO_FRAGMENT => {
                        let hdr: [u8; 4] = ctx.load(l4).ok()?;
                        if (u16::from_be_bytes([hdr[2], hdr[3]]) & 0xfff8) != 0 {
                            return None;
                        }
                        next = hdr[0];
                        l4 += 8;
                    }
                    _ => break,
                }
            }
            (next, l4)
        }
        _ => return None,
    };
    if proto != proto::TCP && proto != proto::UDP {
        return None;
    }
    let ports: [u16; 2] = ctx.load(l4).ok()?;
    Some((proto, u16::from_be(ports[0]), u16::from_be(ports[1])))
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {
    eprintln!("chaos-ebpf is a BPF object: build it with `cargo xtask build-ebpf`");
}
