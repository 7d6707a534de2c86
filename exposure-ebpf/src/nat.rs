//! Address/port translation with incremental IPv4/IPv6 and TCP/UDP checksum updates.

use aya_ebpf::programs::XdpContext;
use aya_ebpf::{bindings::xdp_md, helpers::bpf_csum_diff};
use exposure_common::{
    checksum::{complete, fold64, is_partial, pseudo_header4, pseudo_header6, Delta},
    Addr, PROTO_TCP, PROTO_UDP, XDP_MODE_GENERIC,
};

use crate::{maps::xdp_mode, parse::*};

/// The 4-tuple a packet should carry after translation (same family as the packet). Addresses by
/// reference, usually into a map value: copies would cost stack, of which BPF has 512 bytes.
#[derive(Clone, Copy)]
pub struct Tuple<'a> {
    pub saddr: &'a Addr,
    pub daddr: &'a Addr,
    pub sport: u16,
    pub dport: u16,
}

#[inline(always)]
fn load<T: Copy>(p: *mut T) -> T {
    unsafe { p.read_unaligned() }
}

#[inline(always)]
fn store<T>(p: *mut T, v: T) {
    unsafe { p.write_unaligned(v) }
}

/// Writes an IPv6 address into the frame a word at a time. One 16-byte unaligned write of an
/// address read from elsewhere becomes a call of `memmove` (LLVM cannot tell the two apart),
/// which copies a byte per loop: two of them were about a seventh of an IPv6 packet's time.
#[inline(always)]
pub fn store_addr6(p: *mut [u32; 4], a: &[u32; 4]) {
    let p = p as *mut u32;
    for (i, w) in a.iter().enumerate() {
        store(unsafe { p.add(i) }, *w);
    }
}

/// Where a rewritten packet goes next.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Leaves {
    /// Sent from XDP (XDP_TX, XDP_REDIRECT): a bare frame, whose checksums must be whole (but
    /// in generic mode, where the skb goes on).
    FromXdp = 0,
    /// To the kernel (XDP_PASS): its skb, and whatever the sender left to a device, go on.
    ToKernel = 1,
}

impl Leaves {
    /// `ToKernel` when `bit` (0 or 1) is set, without a branch: the verifier then walks one path
    /// into [`rewrite`], not one for each.
    #[inline(always)]
    pub fn to_kernel_if(bit: u32) -> Leaves {
        // SAFETY: `bit & 1` is one of the two discriminants.
        unsafe { core::mem::transmute::<u8, Leaves>((bit & 1) as u8) }
    }
}

/// Rewrites the packet's addresses and ports to `to`, updating checksums incrementally. Not inlined:
/// the checksum arithmetic keeps many values live, and its spills would otherwise sit in the frame
/// of every caller, beside whatever else that caller calls.
///
/// A sender on this host that offloads its checksum (through a veth: a node in a container, as
/// with kind, reached from its host) leaves only the pseudo-header's sum in the field, which a
/// device completes; so does GRO, for the packets it merges. Such a sum gets the new addresses'
/// while an skb goes on (to the kernel, or anywhere from generic XDP), and is made a whole
/// checksum (the segment summed) for a bare frame sent from XDP.
#[inline(never)]
pub fn rewrite(ctx: &XdpContext, p: &Packet, to: &Tuple<'_>, leaves: Leaves) -> Result<(), ()> {
    let ctx = &own_ctx(ctx);
    // Every field's change is summed first and folded once per checksum.
    let addrs = if p.v6 {
        // No IP header checksum in IPv6; the pseudo-header's addresses are in the L4 checksum.
        let saddr: *mut [u32; 4] = ptr_at(ctx, ETH_LEN + IP6_SADDR)?;
        let daddr: *mut [u32; 4] = ptr_at(ctx, ETH_LEN + IP6_DADDR)?;
        store_addr6(saddr, &to.saddr.0);
        store_addr6(daddr, &to.daddr.0);
        Delta::default()
            .words(&p.saddr.0, &to.saddr.0)
            .words(&p.daddr.0, &to.daddr.0)
    } else {
        let ip_check: *mut u16 = ptr_at(ctx, ETH_LEN + IP_CHECK)?;
        let saddr: *mut u32 = ptr_at(ctx, ETH_LEN + IP_SADDR)?;
        let daddr: *mut u32 = ptr_at(ctx, ETH_LEN + IP_DADDR)?;
        let (new_s, new_d) = (to.saddr.v4_raw(), to.daddr.v4_raw());
        let addrs = Delta::default()
            .word(p.saddr.v4_raw(), new_s)
            .word(p.daddr.v4_raw(), new_d);
        store(ip_check, addrs.apply(load(ip_check)));
        store(saddr, new_s);
        store(daddr, new_d);
        addrs
    };
    // The ports and the L4 checksum (over the whole datagram) are in the first fragment only.
    if p.later_fragment {
        return Ok(());
    }
    // In the frame: the parser read the whole L4 header.
    let ports: *mut [u16; 2] = ptr_at(ctx, p.l4_off)?;
    let l4_check: *mut u16 = if p.proto == PROTO_TCP {
        ptr_at(ctx, p.l4_off + TCP_CHECK)?
    } else {
        ptr_at(ctx, p.l4_off + UDP_CHECK)?
    };
    let c = load(l4_check);
    let port_changes = Delta::default()
        .port(p.sport, to.sport)
        .port(p.dport, to.dport);
    let c = match checksum_kind(ctx, p, c) {
        Checksum::Whole => {
            let l4 = addrs.with(port_changes);
            if p.proto == PROTO_TCP {
                l4.apply(c)
            } else {
                l4.apply_udp(c)
            }
        }
        // A bare frame from XDP: no device will complete it.
        Checksum::Partial(Some(segment)) if leaves == Leaves::FromXdp && !on_skb(ctx) => {
            let pseudo = pseudo_header(p, to.saddr, to.daddr);
            match complete(segment, c, port_changes, pseudo) {
                0 if p.proto != PROTO_TCP => 0xffff,
                full => full,
            }
        }
        // The skb goes on, whatever the verdict, and with it what the kernel knows: the device
        // (or the kernel, at segmentation) completes the checksum.
        Checksum::Partial(_) => addrs.apply_partial(c),
    };
    store(l4_check, c);
    store(ports, [to.sport, to.dport]);
    Ok(())
}

/// The TCP/UDP segment's length, from the IP header (a short frame's padding is no part of it).
#[inline(always)]
fn l4_len(p: &Packet) -> u16 {
    p.ip_len.wrapping_sub((p.l4_off - ETH_LEN) as u16)
}

/// The pseudo-header's sum of packet `p`'s segment between `saddr` and `daddr`.
#[inline(always)]
fn pseudo_header(p: &Packet, saddr: &Addr, daddr: &Addr) -> u16 {
    if p.v6 {
        pseudo_header6(&saddr.0, &daddr.0, p.proto, l4_len(p))
    } else {
        pseudo_header4(saddr.v4_raw(), daddr.v4_raw(), p.proto, l4_len(p))
    }
}

/// The longest segment whose partial checksum is completed (a 9,000-byte jumbo frame's); longer
/// ones come only with an skb.
const SEGMENT_MAX: usize = CHUNKS * CHUNK + 255;
const CHUNK: usize = 256;
const CHUNKS: usize = 36;
/// Where a segment may start at the latest (Ethernet, IPv6 and its extension headers), and a mask
/// over every offset into the segments summed.
const HEADERS_MAX: usize = 1024;
const OFFSET_MASK: usize = 0x3fff;
const _: () = assert!(HEADERS_MAX + SEGMENT_MAX <= OFFSET_MASK);

/// What a packet's TCP/UDP checksum field holds.
enum Checksum {
    /// A whole checksum: the usual case.
    Whole,
    /// A sender's partial sum ([`is_partial`]), which a device completes, with the one's-complement
    /// sum of the segment (field included) when it was summed.
    Partial(Option<u32>),
}

/// Whether `check` is a whole checksum or a partial sum; the usual whole one costs one comparison.
/// A segment longer than [`SEGMENT_MAX`] is not summed: only an skb carries one that long (generic
/// XDP sees GRO's merged packets and a local sender's GSO ones), and its field is partial then.
#[inline(always)]
fn checksum_kind(ctx: &XdpContext, p: &Packet, check: u16) -> Checksum {
    let pseudo = pseudo_header(p, &p.saddr, &p.daddr);
    if check != pseudo {
        return Checksum::Whole;
    }
    let len = l4_len(p) as usize;
    if len > SEGMENT_MAX {
        return Checksum::Partial(None);
    }
    match u32::try_from(exposure_sum_segment(ctx.ctx, p.l4_off as u64, len as u64)) {
        Ok(segment) if is_partial(check, pseudo, segment) => Checksum::Partial(Some(segment)),
        _ => Checksum::Whole,
    }
}

/// Whether the packet's skb asks for its TCP/UDP checksum to be completed at its L4 header (as
/// far as XDP can tell): generic XDP, and a field holding the pseudo-header's sum. Taken for a
/// whole checksum that equals that sum (once in 65,536), it costs only that packet's quote a
/// field the device leaves as it is.
#[inline(always)]
pub fn left_to_device(ctx: &XdpContext, p: &Packet) -> bool {
    !p.later_fragment
        && exposure_left_to_device(
            ctx.ctx,
            p.l4_off as u64,
            l4_len(p) as u64,
            (p.proto == PROTO_TCP) as u64 | (p.v6 as u64) << 1,
        ) != 0
}

/// [`left_to_device`] as a global function, checked once by the verifier rather than on every
/// way to a refusal. `kind`: bit 0 TCP (else UDP), bit 1 IPv6.
#[no_mangle]
#[inline(never)]
pub extern "C" fn exposure_left_to_device(
    ctx: *mut xdp_md,
    l4_off: u64,
    l4_len: u64,
    kind: u64,
) -> i32 {
    let ctx = &XdpContext::new(ctx);
    if !on_skb(ctx) {
        return 0;
    }
    let field = if kind & 1 != 0 { TCP_CHECK } else { UDP_CHECK };
    let proto = if kind & 1 != 0 { PROTO_TCP } else { PROTO_UDP };
    // A bound the verifier can see (a global function knows nothing of its arguments).
    let Ok(check) = ptr_at::<u16, _>(ctx, (l4_off as usize & 0x3ff) + field) else {
        return 0;
    };
    let pseudo = if kind & 2 != 0 {
        let (Ok(s), Ok(d)) = (
            ptr_at::<[u32; 4], _>(ctx, ETH_LEN + IP6_SADDR),
            ptr_at::<[u32; 4], _>(ctx, ETH_LEN + IP6_DADDR),
        ) else {
            return 0;
        };
        pseudo_header6(&load(s), &load(d), proto, l4_len as u16)
    } else {
        let (Ok(s), Ok(d)) = (
            ptr_at::<u32, _>(ctx, ETH_LEN + IP_SADDR),
            ptr_at::<u32, _>(ctx, ETH_LEN + IP_DADDR),
        ) else {
            return 0;
        };
        pseudo_header4(load(s), load(d), proto, l4_len as u16)
    };
    (load(check) == pseudo) as i32
}

/// Whether this packet came in by an interface whose XDP runs on the kernel's skb (generic mode):
/// then the skb goes on whatever the verdict, XDP_TX and XDP_REDIRECT included.
#[inline(always)]
pub fn on_skb(ctx: &XdpContext) -> bool {
    xdp_mode(ctx.ingress_ifindex() as u32) == XDP_MODE_GENERIC
}

/// The one's-complement sum of `len` bytes at `off` (at most [`SEGMENT_MAX`]; `u64::MAX` when it
/// cannot be read): 256-byte chunks through `bpf_csum_diff`, then 4-byte words, then the last
/// bytes. A global function, like `exposure_claim_snat_port`: the verifier checks its loops once,
/// on their own, not once for every way a packet reaches a rewrite. Its sum folds after each
/// addition, branch-free, so the same bounds hold after one addition as after many.
#[no_mangle]
#[inline(never)]
pub extern "C" fn exposure_sum_segment(ctx: *mut xdp_md, off: u64, len: u64) -> u64 {
    sum_segment(&XdpContext::new(ctx), off as usize, len as usize).map_or(u64::MAX, u64::from)
}

#[inline(always)]
fn sum_segment(ctx: &XdpContext, off: usize, len: usize) -> Result<u32, ()> {
    // Bounds the verifier can see (a global function knows nothing of its arguments).
    if len > SEGMENT_MAX || len < 8 || off > HEADERS_MAX {
        return Err(());
    }
    // Each loop compares its counter with a count of its own, never with `len`: what a loop
    // learns about its count stays with that count, which is not used after it.
    let mut sum: u64 = 0;
    let chunks = len / CHUNK;
    for i in 0..CHUNKS {
        if i >= chunks {
            break;
        }
        let chunk: *mut [u32; CHUNK / 4] = ptr_at(ctx, off + i * CHUNK)?;
        let s = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, chunk.cast(), CHUNK as u32, 0) };
        sum = add_folded(sum, s as u32);
    }
    let words_at = off + (len & !(CHUNK - 1));
    let words = (len & (CHUNK - 1)) / 4;
    for i in 0..CHUNK / 4 {
        if i >= words {
            break;
        }
        // (Opaque to the compiler, which would otherwise fold the bounds check into a form
        // the verifier refuses: arithmetic on the packet's end; masked, so the verifier still
        // knows its bounds.)
        let word: *mut u32 = ptr_at(ctx, core::hint::black_box(words_at + i * 4) & OFFSET_MASK)?;
        sum = add_folded(sum, load(word));
    }
    // The last 1-3 bytes: the segment's last four (a segment has at least its 8-byte UDP header),
    // shifted down (little-endian, as `bpfel` is) to where they would stand in a word of their own.
    let last: *mut u32 = ptr_at(ctx, (off + len - 4) & OFFSET_MASK)?;
    let last = (load(last) as u64 >> (8 * (4 - (len & 3)))) as u32;
    Ok(fold64(add_folded(sum, last)) as u32)
}

/// Adds a 32-bit word to a one's-complement sum and folds the carries back in.
#[inline(always)]
fn add_folded(sum: u64, v: u32) -> u64 {
    let sum = sum + v as u64;
    (sum & 0xffff_ffff) + (sum >> 32)
}

/// Sets the Ethernet addresses for a frame we transmit ourselves.
#[inline(always)]
pub fn set_macs(ctx: &XdpContext, dst: &[u8; 6], src: &[u8; 6]) -> Result<(), ()> {
    let eth: *mut [[u8; 6]; 2] = ptr_at(ctx, 0)?;
    store(eth, [*dst, *src]);
    Ok(())
}
