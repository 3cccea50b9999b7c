//! What the running kernel offers network faults, asked once at start without leaving anything behind.
//!
//! - qdiscs (`netem`, `fq`, `htb`, `tbf`, `clsact`): each is added as the root (clsact: as the clsact) of a
//!   temporary IFB, [`PROBE_IFB`], and deleted again; the device is deleted at the end (and by
//!   [`super::NetworkEngine::cleanup`] if a crash left it). Adding a qdisc lets the kernel load its module, as the
//!   first fault would. An `ENOENT` answer is "this kernel has no such qdisc" (`tc`: "Specified qdisc kind is
//!   unknown").
//! - BPF helpers: a three-instruction tc program calling the helper is offered to the verifier
//!   (`BPF_PROG_LOAD`), which refuses unknown helpers; the program is closed at once.
//! - attach points: clsact (the qdisc above), TCX (`BPF_LINK_CREATE` on the probe device's ingress; the link
//!   dies with its descriptor).
//!
//! The result picks the latency backend: netem when the kernel has it, else EDT when it has `fq`, `htb` and
//! `ifb` (see [`chaos_api::reply::LatencyBackend`]).

use std::os::fd::{FromRawFd, OwnedFd};

use chaos_api::reply::{AttachSupport, HelperSupport, KernelCapabilities, LatencyBackend, QdiscSupport};
use tracing::debug;

use super::{
    encode,
    netlink::{CLSACT_HANDLE, Netlink, TC_H_CLSACT, TC_H_ROOT},
};

/// Name of the temporary device the probe creates (and deletes).
pub const PROBE_IFB: &str = "lchaos-probe";

const PROBE_HANDLE: u32 = 0xC4A1 << 16;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_TCX_INGRESS: u32 = 46;
const HELPER_KTIME_GET_NS: i32 = 5;
const HELPER_GET_PRANDOM_U32: i32 = 7;
const HELPER_GET_HASH_RECALC: i32 = 34;
const HELPER_SKB_SET_TSTAMP: i32 = 192;

/// Probes the kernel (see the module docs).
pub async fn probe(netlink: &Netlink) -> KernelCapabilities {
    let mut caps = KernelCapabilities {
        helpers: HelperSupport {
            ktime_get_ns: helper_supported(HELPER_KTIME_GET_NS),
            get_prandom_u32: helper_supported(HELPER_GET_PRANDOM_U32),
            get_hash_recalc: helper_supported(HELPER_GET_HASH_RECALC),
            skb_set_tstamp: helper_supported(HELPER_SKB_SET_TSTAMP),
        },
        ..Default::default()
    };
    // A probe device left by a crash between create and delete: ours by name and kind.
    if let Ok(Some(old)) = netlink.link_by_name(PROBE_IFB).await
        && old.kind.as_deref() == Some("ifb")
    {
        let _ = netlink.del_link(old.index).await;
    }
    match netlink.add_ifb(PROBE_IFB, 0).await {
        Ok(link) => {
            caps.ifb = true;
            caps.qdiscs = probe_qdiscs(netlink, link.index, &mut caps.notes).await;
            caps.attach = AttachSupport { clsact: caps.qdiscs.clsact, tcx: tcx_supported(link.index) };
            if let Err(err) = netlink.del_link(link.index).await {
                caps.notes.push(format!("could not delete the probe device {PROBE_IFB}: {err}"));
            }
        }
        Err(err) => caps.notes.push(format!("no ifb device ({err}): qdiscs not probed")),
    }
    caps.latency_backend = choose_backend(&caps);
    debug!(?caps, "kernel probed");
    caps
}

/// The backend a latency fault gets on a kernel with `caps`: netem first (every netem feature), else EDT.
pub fn choose_backend(caps: &KernelCapabilities) -> Option<LatencyBackend> {
    if !caps.ifb || !caps.qdiscs.htb {
        None
    } else if caps.qdiscs.netem {
        Some(LatencyBackend::Netem)
    } else if caps.qdiscs.fq {
        Some(LatencyBackend::Edt)
    } else {
        None
    }
}

async fn probe_qdiscs(netlink: &Netlink, index: u32, notes: &mut Vec<String>) -> QdiscSupport {
    let tbf = encode::tbf_options(&encode::TbfParams {
        rate: 125_000,
        burst: 10_000,
        limit: encode::TbfLimit::Bytes(10_000),
        peakrate: None,
        mtu: None,
    });
    let kinds: [(&str, Vec<u8>); 4] = [
        ("netem", encode::netem_options(&encode::NetemParams::default())),
        (
            "fq",
            encode::fq_options(&encode::FqParams {
                limit: 100,
                horizon: std::time::Duration::from_secs(1),
                horizon_drop: false,
            }),
        ),
        ("htb", encode::htb_qdisc_options(0, encode::HTB_DEFAULT_R2Q, None)),
        ("tbf", tbf),
    ];
    let mut found = [false; 4];
    for ((kind, options), found) in kinds.into_iter().zip(found.iter_mut()) {
        *found = root_qdisc_accepted(netlink, index, kind, PROBE_HANDLE, TC_H_ROOT, Some(options), notes).await;
    }
    let clsact = root_qdisc_accepted(netlink, index, "clsact", CLSACT_HANDLE, TC_H_CLSACT, None, notes).await;
    QdiscSupport { netem: found[0], fq: found[1], htb: found[2], tbf: found[3], clsact }
}

async fn root_qdisc_accepted(
    netlink: &Netlink,
    index: u32,
    kind: &str,
    handle: u32,
    parent: u32,
    options: Option<Vec<u8>>,
    notes: &mut Vec<String>,
) -> bool {
    match netlink.add_qdisc(index, handle, parent, kind, options).await {
        Ok(()) => {
            if let Err(err) = netlink.del_qdisc(index, handle, parent).await {
                notes.push(format!("could not delete the probe's {kind} qdisc: {err}"));
            }
            true
        }
        Err(err) if err.errno() == Some(libc::ENOENT) => false,
        Err(err) => {
            notes.push(format!("{kind}: {err}"));
            false
        }
    }
}

/// `struct bpf_insn` as bytes: opcode, dst/src registers, offset, immediate.
fn insn(code: u8, dst: u8, imm: i32) -> [u8; 8] {
    let mut b = [0u8; 8];
    b[0] = code;
    b[1] = dst & 0x0f;
    b[4..].copy_from_slice(&imm.to_ne_bytes());
    b
}

/// A tc program `r2 = 0; r3 = 0; call helper; r0 = 0; exit` (r1 is the skb): loads iff the verifier knows the
/// helper for tc programs.
fn load_probe_program(helper: Option<i32>) -> Option<OwnedFd> {
    const MOV64_K: u8 = 0xb7;
    const CALL: u8 = 0x85;
    const EXIT: u8 = 0x95;
    let mut insns = Vec::new();
    if let Some(id) = helper {
        insns.extend_from_slice(&insn(MOV64_K, 2, 0));
        insns.extend_from_slice(&insn(MOV64_K, 3, 0));
        insns.extend_from_slice(&insn(CALL, 0, id));
    }
    insns.extend_from_slice(&insn(MOV64_K, 0, 0));
    insns.extend_from_slice(&insn(EXIT, 0, 0));
    let license = c"GPL";
    // `union bpf_attr` for BPF_PROG_LOAD, up to `prog_flags`.
    #[repr(C)]
    #[derive(Default)]
    struct ProgLoad {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
        kern_version: u32,
        prog_flags: u32,
    }
    let attr = ProgLoad {
        prog_type: BPF_PROG_TYPE_SCHED_CLS,
        insn_cnt: (insns.len() / 8) as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        ..Default::default()
    };
    // SAFETY: bpf(2) reads `attr` and, through its pointers, `insns` and `license`, all alive for the call.
    let fd = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_PROG_LOAD, &attr as *const ProgLoad, std::mem::size_of::<ProgLoad>() as u32)
    };
    // SAFETY: a non-negative return is a new descriptor that nothing else owns.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn helper_supported(id: i32) -> bool {
    load_probe_program(Some(id)).is_some()
}

/// Whether a TCX link can be made on `ifindex` (the link is released with its descriptor, right away).
fn tcx_supported(ifindex: u32) -> bool {
    use std::os::fd::AsRawFd;
    let Some(prog) = load_probe_program(None) else { return false };
    #[repr(C)]
    #[derive(Default)]
    struct LinkCreate {
        prog_fd: u32,
        target_ifindex: u32,
        attach_type: u32,
        flags: u32,
        _rest: [u64; 4],
    }
    let attr = LinkCreate {
        prog_fd: prog.as_raw_fd() as u32,
        target_ifindex: ifindex,
        attach_type: BPF_TCX_INGRESS,
        ..Default::default()
    };
    // SAFETY: bpf(2) only reads `attr`.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_CREATE,
            &attr as *const LinkCreate,
            std::mem::size_of::<LinkCreate>() as u32,
        )
    };
    if fd < 0 {
        return false;
    }
    // SAFETY: a new descriptor nothing else owns; dropping it releases the link.
    drop(unsafe { OwnedFd::from_raw_fd(fd as i32) });
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netem_first_then_edt_then_nothing() {
        let mut caps = KernelCapabilities { ifb: true, ..Default::default() };
        caps.qdiscs = QdiscSupport { netem: true, fq: true, htb: true, tbf: true, clsact: true };
        assert_eq!(choose_backend(&caps), Some(LatencyBackend::Netem));
        caps.qdiscs.netem = false;
        assert_eq!(choose_backend(&caps), Some(LatencyBackend::Edt));
        caps.qdiscs.fq = false;
        assert_eq!(choose_backend(&caps), None);
        caps.qdiscs.fq = true;
        caps.qdiscs.htb = false;
        assert_eq!(choose_backend(&caps), None, "both backends are HTB classes on the IFB");
    }
}
