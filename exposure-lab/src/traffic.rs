//! A packet generator that outruns a node: BPF_PROG_TEST_RUN in live-frames mode
//! (`BPF_F_TEST_XDP_LIVE_FRAMES`, the kernel's in-kernel traffic generator mode) runs an XDP program
//! that returns XDP_TX over copies of one frame, so each copy leaves the client's interface as a
//! real packet, with no socket or syscall per packet.
//!
//! [`Flows::New`] gives every packet a new flow: the program writes a random 16 bits into the low
//! half of the source address and a random source port, and the complement of the address bits into
//! the IP ID, so the header checksum stays valid without recomputing it (the UDP checksum is 0).

use std::{
    os::fd::{AsRawFd as _, OwnedFd},
    time::Duration,
};

use anyhow::{bail, Context as _};

use crate::xdp_pass::{load_insns, prog_test_run};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flows {
    /// Every packet the same: one established flow.
    One,
    /// A random source (within the frame's /16) and source port per packet: new flows.
    New,
}

const BPF_F_TEST_XDP_LIVE_FRAMES: u64 = 1 << 1;

/// One BPF instruction: opcode, dst/src registers, offset, immediate.
const fn insn(op: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    let o = off.to_le_bytes();
    let i = imm.to_le_bytes();
    u64::from_le_bytes([op, dst | (src << 4), o[0], o[1], i[0], i[1], i[2], i[3]])
}

/// Offsets in an Ethernet + IPv4 (no options) + UDP frame.
const IP_ID: i16 = 14 + 4;
const IP_SADDR_LOW: i16 = 14 + 12 + 2;
const UDP_SPORT: i16 = 14 + 20;

/// Header bytes the program rewrites on every packet: Ethernet + IPv4 + UDP.
const HEADERS: usize = 42;

/// The generator program. Live frames come from a page pool and are recycled after the receiver
/// frees them, with whatever the stack wrote into them (a forwarding node rewrites the MACs and
/// TTL): so every packet gets its headers written afresh from `template` first.
fn program(flows: Flows, template: &[u8]) -> anyhow::Result<OwnedFd> {
    const XDP_TX: i32 = 3;
    let mut insns = vec![
        insn(0xbf, 6, 1, 0, 0),              // r6 = ctx
        insn(0x85, 0, 0, 0, 7),              // r0 = bpf_get_prandom_u32()
        insn(0xbf, 7, 0, 0, 0),              // r7 = r0
        insn(0x85, 0, 0, 0, 7),              // r0 = bpf_get_prandom_u32()
        insn(0xbf, 8, 0, 0, 0),              // r8 = r0
        insn(0x61, 2, 6, 0, 0),              // r2 = ctx->data
        insn(0x61, 3, 6, 4, 0),              // r3 = ctx->data_end
        insn(0xbf, 4, 2, 0, 0),              // r4 = r2
        insn(0x07, 4, 0, 0, HEADERS as i32), // r4 += 42
    ];
    let mut body = Vec::new();
    for (i, chunk) in template[..40].chunks(4).enumerate() {
        let word = i32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        body.push(insn(0x62, 2, 0, (i * 4) as i16, word)); // *(u32 *)(r2 + 4i) = word
    }
    let tail = u16::from_le_bytes([template[40], template[41]]) as i32;
    body.push(insn(0x6a, 2, 0, 40, tail)); // *(u16 *)(r2 + 40) = tail
    if flows == Flows::New {
        body.extend([
            insn(0x6b, 2, 7, IP_SADDR_LOW, 0), // *(u16 *)(saddr low half) = r7
            insn(0xa7, 7, 0, 0, 0xffff),       // r7 ^= 0xffff
            insn(0x6b, 2, 7, IP_ID, 0),        // *(u16 *)(ip id) = r7: the sum is unchanged
            insn(0x6b, 2, 8, UDP_SPORT, 0),    // *(u16 *)(udp source port) = r8
        ]);
    }
    // if r4 > r3 goto exit (past the body)
    insns.push(insn(0x2d, 4, 3, body.len() as i16, 0));
    insns.extend(body);
    insns.extend([insn(0xb7, 0, 0, 0, XDP_TX), insn(0x95, 0, 0, 0, 0)]);
    load_insns(&insns)
}

pub struct Generator {
    prog: OwnedFd,
    frame: Vec<u8>,
}

impl Generator {
    /// A generator of `frame` (Ethernet + IPv4 without options + UDP, at least 42 bytes): sent with
    /// a zero UDP checksum and, for new flows, from the address low half 0 and IP ID 0xffff that the
    /// program's checksum trick starts from.
    pub fn new(flows: Flows, frame: &[u8]) -> anyhow::Result<Self> {
        if frame.len() < HEADERS || frame[12..14] != [0x08, 0x00] || frame[14] != 0x45 {
            bail!("the generator sends Ethernet + IPv4 (no options) + UDP frames");
        }
        let mut f = frame.to_vec();
        f[14 + 20 + 6..14 + 20 + 8].copy_from_slice(&[0, 0]);
        if flows == Flows::New {
            f[IP_SADDR_LOW as usize..IP_SADDR_LOW as usize + 2].copy_from_slice(&[0, 0]);
            f[IP_ID as usize..IP_ID as usize + 2].copy_from_slice(&[0xff, 0xff]);
            f[24..26].copy_from_slice(&[0, 0]);
            let c = exposure_common::checksum::checksum(&f[14..34]);
            f[24..26].copy_from_slice(&c.to_ne_bytes());
        }
        Ok(Generator {
            prog: program(flows, &f)?,
            frame: f,
        })
    }

    /// Sends `count` packets out of `ifindex` of the calling thread's network namespace; returns how
    /// long the kernel's loop took, as it measures it (setting up and tearing down its frame pool,
    /// tens of milliseconds, not included). The loop's time includes the softirq work each batch
    /// causes down the path, which runs when the batch ends.
    pub fn send(&self, ifindex: u32, count: u32) -> anyhow::Result<Duration> {
        let frame = &self.frame;
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
        let ctx: [u32; 6] = [0, frame.len() as u32, 0, ifindex, 0, 0];
        let mut attr = [0u64; 16];
        attr[0] = self.prog.as_raw_fd() as u64;
        attr[1] = frame.len() as u64;
        attr[2] = frame.as_ptr() as u64;
        attr[4] = count as u64;
        attr[5] = std::mem::size_of_val(&ctx) as u64;
        attr[6] = ctx.as_ptr() as u64;
        attr[8] = BPF_F_TEST_XDP_LIVE_FRAMES;
        // Small batches: the frames of one batch, with everything they cause down the path, are
        // handled in the softirq that runs when the batch ends; past netdev_budget (300) the kernel
        // defers to ksoftirqd, the generator runs ahead and the first ring on the path overflows.
        attr[9] = 16;
        prog_test_run(&mut attr).context("live frames")?;
        // `duration` (the high half of the word holding `repeat`): mean ns per packet.
        let ns_per_packet = attr[4] >> 32;
        Ok(Duration::from_nanos(ns_per_packet * count as u64))
    }
}

/// Packet counters of one interface, from `/proc/thread-self/net/dev` (the calling thread's
/// namespace; sysfs would show the namespace it was mounted in).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub rx_packets: u64,
    pub rx_dropped: u64,
    pub tx_packets: u64,
    pub tx_dropped: u64,
}

pub fn counters(ifname: &str) -> anyhow::Result<Counters> {
    let text = std::fs::read_to_string("/proc/thread-self/net/dev")?;
    for line in text.lines() {
        let Some((name, rest)) = line.split_once(':') else {
            continue;
        };
        if name.trim() != ifname {
            continue;
        }
        let v: Vec<u64> = rest
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        if v.len() < 16 {
            bail!("unexpected /proc/net/dev line: {line}");
        }
        return Ok(Counters {
            rx_packets: v[1],
            rx_dropped: v[3],
            tx_packets: v[9],
            tx_dropped: v[11],
        });
    }
    bail!("no interface {ifname} in /proc/net/dev")
}

/// The median (by packets/s) of `runs` runs of `count` packets, each giving (packets delivered,
/// time taken). A run that delivers less than 99% is run again, up to `again` more times: the
/// generator and the node share a CPU, so a loss means the node's receive work was deferred to
/// ksoftirqd behind the generator, and the run timed that, not the node (rare, but a share of 40%
/// was once reported for an otherwise steady variant). If losses persist they are the variant's
/// own, and every run counts.
pub fn median_run(
    runs: usize,
    again: usize,
    count: u32,
    mut run: impl FnMut() -> (u64, Duration),
) -> (u64, Duration) {
    let whole = |s: &(u64, Duration)| s.0 * 100 >= count as u64 * 99;
    let mut samples = Vec::new();
    while samples.len() < runs + again {
        samples.push(run());
        if samples.iter().filter(|s| whole(s)).count() == runs {
            samples.retain(whole);
            break;
        }
    }
    let rate = |s: &(u64, Duration)| s.0 as f64 / s.1.as_secs_f64();
    samples.sort_by(|a, b| rate(a).total_cmp(&rate(b)));
    samples[samples.len() / 2]
}

/// How far apart measurements of one thing came out in one run: the highest over the lowest,
/// less one (0.25: the highest is 25% above the lowest); `None` with fewer than two positive
/// rates. Plain forwarding does the same work at every Service count, so its spread across a
/// bench run shows how much the host's other work moved the figures.
pub fn spread(rates: &[f64]) -> Option<f64> {
    let positive = || rates.iter().copied().filter(|r| *r > 0.0);
    if positive().count() < 2 {
        return None;
    }
    let low = positive().fold(f64::INFINITY, f64::min);
    let high = positive().fold(0.0, f64::max);
    Some(high / low - 1.0)
}

/// The most `spread` a quiet host gave plain forwarding across a full bench run (up to 12%); busy
/// runs gave 25-52%.
pub const STEADY_SPREAD: f64 = 0.20;

#[cfg(test)]
mod tests {
    use super::*;

    /// `median_run` over scripted (delivered, ms) results: what it picks, and how many it ran.
    fn median_of(runs: usize, again: usize, results: &[(u64, u64)]) -> ((u64, Duration), usize) {
        let mut taken = 0;
        let picked = median_run(runs, again, 1000, || {
            let (delivered, ms) = results[taken];
            taken += 1;
            (delivered, Duration::from_millis(ms))
        });
        (picked, taken)
    }

    #[test]
    fn whole_runs_give_their_median() {
        let (picked, taken) = median_of(3, 3, &[(1000, 10), (1000, 30), (1000, 20)]);
        assert_eq!(picked, (1000, Duration::from_millis(20)));
        assert_eq!(taken, 3, "no run again when none lost packets");
    }

    #[test]
    fn a_lossy_run_is_run_again_and_left_out() {
        // The lossy run (400 of 1000) is also the fastest by packets/s: it must not count.
        let (picked, taken) = median_of(3, 3, &[(1000, 40), (400, 1), (1000, 10), (990, 20)]);
        assert_eq!(picked, (990, Duration::from_millis(20)));
        assert_eq!(taken, 4);
    }

    #[test]
    fn without_runs_again_losses_count() {
        let (picked, taken) = median_of(3, 0, &[(400, 1), (1000, 10), (1000, 20)]);
        assert_eq!(picked, (1000, Duration::from_millis(10)));
        assert_eq!(taken, 3);
    }

    #[test]
    fn persistent_losses_count_after_the_runs_again() {
        // All six count: by packets/s the runs of 60, 50, 40, 30 (1000 packets), 20, 10 ms.
        let (picked, taken) = median_of(
            3,
            3,
            &[
                (900, 10),
                (900, 20),
                (1000, 30),
                (900, 40),
                (900, 50),
                (900, 60),
            ],
        );
        assert_eq!(picked, (1000, Duration::from_millis(30)));
        assert_eq!(taken, 6, "at most `again` more");
    }

    #[test]
    fn spread_is_the_highest_over_the_lowest() {
        let s = spread(&[2188.0, 2101.0, 2188.0]).unwrap();
        assert!((s - (2188.0 / 2101.0 - 1.0)).abs() < 1e-12, "{s}");
        assert!(s < STEADY_SPREAD);
        // A busy run's plain forwarding (thousands of packets/s at 10, 1,000, 10,000 Services).
        let busy = spread(&[1471.0, 1282.0, 1799.0]).unwrap();
        assert!((busy - (1799.0 / 1282.0 - 1.0)).abs() < 1e-12, "{busy}");
        assert!(busy > STEADY_SPREAD);
    }

    #[test]
    fn spread_needs_two_measured_rates() {
        assert_eq!(spread(&[]), None);
        assert_eq!(spread(&[1000.0]), None);
        // A missing run (rate 0) is no measurement, not an infinite spread.
        assert_eq!(spread(&[1000.0, 0.0]), None);
        assert_eq!(
            spread(&[1000.0, 0.0, 1100.0]).map(|s| (s * 100.0).round()),
            Some(10.0)
        );
    }
}
