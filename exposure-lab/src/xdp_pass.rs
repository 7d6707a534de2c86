//! A two-instruction `XDP_PASS` program attached to the LAN-side veth peers.
//!
//! Why: frames a node's XDP program transmits (XDP_TX) land in the peer veth's ring, but the kernel
//! only schedules the peer's NAPI when the peer has an XDP program of its own (`veth_xdp_flush()`),
//! so without one they sit there until unrelated traffic flushes them. A real NIC has no such quirk.

use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

use anyhow::Context as _;

use crate::netns::Netns;

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;

/// The `bpf()` system call with a prepared `union bpf_attr` (which the kernel may write results
/// back into); its non-negative return value.
fn sys_bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> std::io::Result<libc::c_long> {
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of_val(attr),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(rc)
}

/// A `bpf()` command that returns a file descriptor.
pub(crate) fn bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> std::io::Result<OwnedFd> {
    let fd = sys_bpf(cmd, attr)?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

const BPF_PROG_TEST_RUN: libc::c_long = 10;

/// Loads the two-instruction `XDP_PASS` program (the benchmarks' floor: what any XDP program costs).
pub fn load() -> anyhow::Result<OwnedFd> {
    load_returning(XDP_PASS).context("loading the XDP_PASS program")
}

pub const XDP_DROP: u8 = 1;
pub const XDP_PASS: u8 = 2;
pub const XDP_TX: u8 = 3;

/// `r0 = action; exit`.
pub fn load_returning(action: u8) -> anyhow::Result<OwnedFd> {
    load_insns(&[
        insn(MOV_IMM, 0, 0, 0, action as i32),
        insn(EXIT, 0, 0, 0, 0),
    ])
}

/// Loads raw BPF instructions as an XDP program.
pub fn load_insns(insns: &[u64]) -> anyhow::Result<OwnedFd> {
    load_program(BPF_PROG_TYPE_XDP, BPF_XDP, insns)
}

/// The floor of a tc program (`TC_ACT_OK`): what any tc classifier costs per packet.
pub fn load_tc_ok() -> anyhow::Result<OwnedFd> {
    const TC_ACT_OK: i32 = 0;
    load_tc_returning(TC_ACT_OK).context("loading the tc floor program")
}

pub const TC_ACT_SHOT: i32 = 2;

/// A tc classifier doing `r0 = action; exit`.
fn load_tc_returning(action: i32) -> anyhow::Result<OwnedFd> {
    const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
    let insns = [insn(MOV_IMM, 0, 0, 0, action), insn(EXIT, 0, 0, 0, 0)];
    load_program(BPF_PROG_TYPE_SCHED_CLS, 0, &insns)
}

fn load_program(prog_type: u32, attach_type: u32, insns: &[u64]) -> anyhow::Result<OwnedFd> {
    let license = c"GPL";
    let mut attr = [0u64; 16];
    attr[0] = prog_type as u64 | (insns.len() as u64) << 32;
    attr[1] = insns.as_ptr() as u64;
    attr[2] = license.as_ptr() as u64;
    // expected_attach_type sits at byte offset 68 (after prog_name[16] and prog_ifindex).
    attr[8] = (attach_type as u64) << 32;
    Ok(bpf(BPF_PROG_LOAD, &mut attr)?)
}

/// BPF_PROG_TEST_RUN of any program fd: (return value, mean ns per run as the kernel measured it).
pub fn test_run(prog: &OwnedFd, frame: &[u8], repeat: u32) -> anyhow::Result<(u32, u32)> {
    let mut out = vec![0u8; frame.len() + 256];
    let mut attr = [0u64; 16];
    // union bpf_attr.test: prog_fd, retval | data_size_in, data_size_out | data_in | data_out |
    // repeat, duration (u32 pairs packed into u64 words).
    attr[0] = prog.as_raw_fd() as u64;
    attr[1] = frame.len() as u64 | (out.len() as u64) << 32;
    attr[2] = frame.as_ptr() as u64;
    attr[3] = out.as_mut_ptr() as u64;
    attr[4] = repeat as u64;
    // A signal for the process (a child exiting, in a test that runs commands) stops a repeated
    // run with EINTR and no results: run it again (bounded).
    for _ in 0..100 {
        match sys_bpf(BPF_PROG_TEST_RUN, &mut attr) {
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            rc => {
                rc.context("BPF_PROG_TEST_RUN")?;
                return Ok(((attr[0] >> 32) as u32, (attr[4] >> 32) as u32));
            }
        }
    }
    anyhow::bail!("BPF_PROG_TEST_RUN: interrupted 100 times in a row")
}

/// The BPF_PROG_TEST_RUN command with a prepared `union bpf_attr`; the kernel writes the results
/// (return value, duration) back into it.
pub(crate) fn prog_test_run(attr: &mut [u64; 16]) -> anyhow::Result<()> {
    sys_bpf(BPF_PROG_TEST_RUN, attr).context("BPF_PROG_TEST_RUN")?;
    Ok(())
}

/// Attaches `XDP_PASS` to `ifname` in `ns`; detached when the returned link fd is dropped.
pub fn attach(ns: &Netns, ifname: &str) -> anyhow::Result<OwnedFd> {
    attach_returning(ns, ifname, XDP_PASS)
}

/// Attaches `r0 = action; exit` to `ifname` in `ns` (XDP_DROP: a sink that costs next to nothing).
pub fn attach_returning(ns: &Netns, ifname: &str, action: u8) -> anyhow::Result<OwnedFd> {
    attach_loaded(ns, ifname, BPF_XDP, 0, move || load_returning(action))
        .with_context(|| format!("XDP returning {action}"))
}

/// [`attach_returning`] in generic XDP, on the kernel's skb.
pub fn attach_generic_returning(ns: &Netns, ifname: &str, action: u8) -> anyhow::Result<OwnedFd> {
    const XDP_FLAGS_SKB_MODE: u32 = 1 << 1;
    attach_loaded(ns, ifname, BPF_XDP, XDP_FLAGS_SKB_MODE, move || {
        load_returning(action)
    })
    .with_context(|| format!("generic XDP returning {action}"))
}

/// Attaches a tc program returning `action` (e.g. `TC_ACT_SHOT`: a sink for packets that never
/// meet XDP, as those `bpf_redirect_peer` moves into a namespace) to `ifname`'s ingress in `ns`
/// (TCX); detached when the returned link fd is dropped.
pub fn attach_tc_ingress_returning(
    ns: &Netns,
    ifname: &str,
    action: i32,
) -> anyhow::Result<OwnedFd> {
    const BPF_TCX_INGRESS: u32 = 46;
    attach_loaded(ns, ifname, BPF_TCX_INGRESS, 0, move || {
        load_tc_returning(action)
    })
    .with_context(|| format!("tc returning {action}"))
}

/// Loads a program with `load` inside `ns` and links it to `ifname` there as `attach_type`, with
/// the link's `flags`; detached when the returned link fd is dropped.
fn attach_loaded(
    ns: &Netns,
    ifname: &str,
    attach_type: u32,
    flags: u32,
    load: impl FnOnce() -> anyhow::Result<OwnedFd> + Send + 'static,
) -> anyhow::Result<OwnedFd> {
    let ifname = ifname.to_string();
    ns.run(move || -> anyhow::Result<OwnedFd> {
        let prog = load()?;
        let ifindex = nix::net::if_::if_nametoindex(ifname.as_str())
            .with_context(|| format!("no interface {ifname}"))?;
        let mut attr = [0u64; 16];
        attr[0] = prog.as_raw_fd() as u64 | (ifindex as u64) << 32;
        attr[1] = attach_type as u64 | (flags as u64) << 32;
        bpf(BPF_LINK_CREATE, &mut attr).with_context(|| format!("attaching to {ifname}"))
    })?
}

/// One BPF instruction: opcode, registers, offset, immediate.
const fn insn(op: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    let [o0, o1] = off.to_le_bytes();
    let [i0, i1, i2, i3] = imm.to_le_bytes();
    u64::from_le_bytes([op, dst | src << 4, o0, o1, i0, i1, i2, i3])
}

/// The opcodes and helper numbers the hand-assembled programs use.
mod op {
    pub const LDXW: u8 = 0x61;
    pub const LDXH: u8 = 0x69;
    pub const STX_DW: u8 = 0x7b;
    pub const ST_DW: u8 = 0x7a;
    pub const MOV_REG: u8 = 0xbf;
    pub const MOV_IMM: u8 = 0xb7;
    pub const ADD_IMM: u8 = 0x07;
    pub const LD_IMM64: u8 = 0x18;
    pub const JGT_REG: u8 = 0x2d;
    pub const JEQ_IMM: u8 = 0x15;
    pub const JNE_IMM: u8 = 0x55;
    pub const JNE32_IMM: u8 = 0x56;
    pub const CALL: u8 = 0x85;
    pub const EXIT: u8 = 0x95;
    pub const BPF_FUNC_MAP_LOOKUP_ELEM: i32 = 1;
    pub const BPF_FUNC_MAP_UPDATE_ELEM: i32 = 2;
    pub const BPF_FUNC_GET_PRANDOM_U32: i32 = 7;
    pub const BPF_FUNC_REDIRECT: i32 = 23;
}
use op::*;

/// `r1 = map` (a 16-byte instruction: the map's fd, for the kernel to resolve at load).
fn load_map(map: &OwnedFd) -> [u64; 2] {
    const PSEUDO_MAP_FD: u8 = 1;
    [insn(LD_IMM64, 1, PSEUDO_MAP_FD, 0, map.as_raw_fd()), 0]
}

/// The end of a program that jumps past its first two instructions on failure: `XDP_PASS`, or
/// `XDP_DROP` there.
const PASS_ELSE_DROP: [u64; 4] = [
    insn(MOV_IMM, 0, 0, 0, XDP_PASS as i32),
    insn(EXIT, 0, 0, 0, 0),
    insn(MOV_IMM, 0, 0, 0, XDP_DROP as i32),
    insn(EXIT, 0, 0, 0, 0),
];

/// An L2 switch in XDP: a frame whose destination MAC is one of `ports`' sends it to that
/// interface with `bpf_redirect` (as XDP frames: no skb); anything else (broadcast, unknown) passes
/// to the stack, i.e. the bridge.
pub fn load_switch(ports: &[([u8; 6], u32)]) -> anyhow::Result<OwnedFd> {
    // Each rule: two compares, three moves/call, exit.
    const RULE: i16 = 6;
    let rules = ports.len() as i16;
    let mut p = vec![
        insn(LDXW, 2, 1, 0, 0), // r2 = data
        insn(LDXW, 3, 1, 4, 0), // r3 = data_end
        insn(MOV_REG, 4, 2, 0, 0),
        insn(ADD_IMM, 4, 0, 0, 6),
        insn(JGT_REG, 4, 3, 2 + rules * RULE, 0), // shorter than a MAC: pass
        insn(LDXW, 5, 2, 0, 0),                   // r5 = dst MAC bytes 0..4
        insn(LDXH, 6, 2, 4, 0),                   // r6 = dst MAC bytes 4..6
    ];
    for (mac, ifindex) in ports {
        let head = i32::from_le_bytes([mac[0], mac[1], mac[2], mac[3]]);
        let tail = u16::from_le_bytes([mac[4], mac[5]]) as i32;
        p.extend([
            insn(JNE32_IMM, 5, 0, RULE - 1, head),
            insn(JNE32_IMM, 6, 0, RULE - 2, tail),
            insn(MOV_IMM, 1, 0, 0, *ifindex as i32),
            insn(MOV_IMM, 2, 0, 0, 0),
            insn(CALL, 0, 0, 0, BPF_FUNC_REDIRECT),
            insn(EXIT, 0, 0, 0, 0),
        ]);
    }
    p.extend([
        insn(MOV_IMM, 0, 0, 0, XDP_PASS as i32),
        insn(EXIT, 0, 0, 0, 0),
    ]);
    load_insns(&p).context("loading the XDP switch")
}

/// Attaches [`load_switch`]`(ports)` to `ifname` in `ns`; detached when the link fd is dropped.
pub fn attach_switch(
    ns: &Netns,
    ifname: &str,
    ports: &[([u8; 6], u32)],
) -> anyhow::Result<OwnedFd> {
    let ports = ports.to_vec();
    attach_loaded(ns, ifname, BPF_XDP, 0, move || load_switch(&ports))
}

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_MAP_TYPE_LRU_HASH: u32 = 9;

/// Creates an LRU hash map with these sizes and map flags.
pub fn create_lru_hash(
    key: u32,
    value: u32,
    max_entries: u32,
    flags: u32,
) -> anyhow::Result<OwnedFd> {
    create_map(BPF_MAP_TYPE_LRU_HASH, key, value, max_entries, flags)
        .context("creating an LRU hash map")
}

/// Creates an array map (4-byte keys) of `value`-byte values.
pub fn create_array(value: u32, max_entries: u32, flags: u32) -> anyhow::Result<OwnedFd> {
    create_map(BPF_MAP_TYPE_ARRAY, 4, value, max_entries, flags).context("creating an array map")
}

fn create_map(
    map_type: u32,
    key: u32,
    value: u32,
    max_entries: u32,
    flags: u32,
) -> std::io::Result<OwnedFd> {
    let mut attr = [0u64; 16];
    attr[0] = map_type as u64 | (key as u64) << 32; // map_type, key_size
    attr[1] = value as u64 | (max_entries as u64) << 32;
    attr[2] = flags as u64;
    bpf(BPF_MAP_CREATE, &mut attr)
}

/// Writes one element of a map (`BPF_ANY`).
pub fn update_elem(map: &OwnedFd, key: &[u8], value: &[u8]) -> anyhow::Result<()> {
    let mut attr = [0u64; 16];
    attr[0] = map.as_raw_fd() as u64;
    attr[1] = key.as_ptr() as u64;
    attr[2] = value.as_ptr() as u64;
    sys_bpf(BPF_MAP_UPDATE_ELEM, &mut attr).context("writing a map element")?;
    Ok(())
}

/// Pins a map or program at `path` (on a bpffs).
pub fn pin(fd: &OwnedFd, path: &std::path::Path) -> anyhow::Result<()> {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    let mut attr = [0u64; 16];
    attr[0] = c_path.as_ptr() as u64; // pathname
    attr[1] = fd.as_raw_fd() as u64; // bpf_fd
    sys_bpf(BPF_OBJ_PIN, &mut attr).with_context(|| format!("pinning at {}", path.display()))?;
    Ok(())
}

/// What one connection-tracking lookup costs at least: an XDP program that looks up a 16-byte key
/// (an IPv4 5-tuple's, stored as whole words) in a one-entry LRU hash map and returns XDP_PASS when
/// found, XDP_DROP when not. Returns the program and its map.
pub fn load_one_lookup() -> anyhow::Result<(OwnedFd, OwnedFd)> {
    const KEY: usize = 16;
    let map = create_lru_hash(KEY as u32, 8, 1, 0).context("the lookup map")?;
    update_elem(&map, &[0u8; KEY], &[0u8; 8]).context("filling the lookup map")?;
    let mut p: Vec<u64> = (1..=KEY as i16 / 8)
        .map(|i| insn(ST_DW, 10, 0, -8 * i, 0)) // the key: zeros on the stack
        .collect();
    p.extend([
        insn(MOV_REG, 2, 10, 0, 0),
        insn(ADD_IMM, 2, 0, 0, -(KEY as i32)),
    ]);
    p.extend(load_map(&map));
    p.extend([
        insn(CALL, 0, 0, 0, BPF_FUNC_MAP_LOOKUP_ELEM),
        insn(JEQ_IMM, 0, 0, 2, 0), // not found: XDP_DROP
    ]);
    p.extend(PASS_ELSE_DROP);
    let prog = load_insns(&p).context("loading the one-lookup program")?;
    Ok((prog, map))
}

/// What one new flow costs at least: an XDP program that inserts a random 16-byte key (an IPv4
/// 5-tuple's size) into each of the LRU hash maps it returns, one per value size in `values`,
/// each of `entries` entries, and returns XDP_PASS (XDP_DROP if an insert fails). Once the maps
/// are full, every insert evicts, as in a node's full flow tables.
pub fn load_inserts(values: &[u32], entries: u32) -> anyhow::Result<(OwnedFd, Vec<OwnedFd>)> {
    const KEY: i16 = 16;
    let maps = values
        .iter()
        .map(|&value| create_lru_hash(KEY as u32, value, entries, 0))
        .collect::<anyhow::Result<Vec<_>>>()
        .context("the insert maps")?;
    // The value: zeros on the stack below the key.
    let largest = values.iter().copied().max().unwrap_or(8).div_ceil(8) as i16 * 8;
    let mut p: Vec<u64> = (0..largest / 8)
        .map(|i| insn(ST_DW, 10, 0, -KEY - largest + 8 * i, 0))
        .collect();
    let inserts = maps.len() as i16;
    for (i, map) in maps.iter().enumerate() {
        // Each half of the key a random 32 bits (zero-extended): a new flow each time.
        p.extend([
            insn(CALL, 0, 0, 0, BPF_FUNC_GET_PRANDOM_U32),
            insn(STX_DW, 10, 0, -KEY, 0),
            insn(CALL, 0, 0, 0, BPF_FUNC_GET_PRANDOM_U32),
            insn(STX_DW, 10, 0, -KEY + 8, 0),
            insn(MOV_REG, 2, 10, 0, 0),
            insn(ADD_IMM, 2, 0, 0, -(KEY as i32)),
            insn(MOV_REG, 3, 10, 0, 0),
            insn(ADD_IMM, 3, 0, 0, -((KEY + largest) as i32)),
            insn(MOV_IMM, 4, 0, 0, 0), // BPF_ANY
        ]);
        p.extend(load_map(map));
        p.extend([
            insn(CALL, 0, 0, 0, BPF_FUNC_MAP_UPDATE_ELEM),
            // Failed: on to the XDP_DROP at the end, past the other inserts' 13 instructions each.
            insn(JNE_IMM, 0, 0, (inserts - 1 - i as i16) * 13 + 2, 0),
        ]);
    }
    p.extend(PASS_ELSE_DROP);
    let prog = load_insns(&p).context("loading the inserts program")?;
    Ok((prog, maps))
}

/// How many entries an LRU hash map holds (by walking its keys).
pub fn count_keys(map: &OwnedFd, key_size: usize) -> anyhow::Result<usize> {
    const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
    let (mut key, mut next) = (vec![0u8; key_size], vec![0u8; key_size]);
    let mut count = 0;
    let mut first = true;
    loop {
        let mut attr = [0u64; 16];
        attr[0] = map.as_raw_fd() as u64;
        attr[1] = if first { 0 } else { key.as_ptr() as u64 };
        attr[2] = next.as_mut_ptr() as u64;
        match sys_bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(count),
            Err(e) => return Err(e).context("walking the map's keys"),
        }
        first = false;
        count += 1;
        std::mem::swap(&mut key, &mut next);
    }
}
