//! Types shared by the XDP/tc programs and the agent: map keys and values (`#[repr(C)]`, no implicit
//! padding) and the pure per-packet arithmetic (checksums, flow hashing) so it is unit-tested on the host.
//!
//! Conventions: addresses ([`Addr`], IPv4 as IPv4-mapped) and L4 ports are kept exactly as they sit
//! in the packet (network byte order, read as native integers). Use `Addr::from`/[`port`] on the host.
#![cfg_attr(not(test), no_std)]

pub mod addr;
pub mod checksum;
pub mod hash;
pub mod maps;

pub use addr::*;
pub use maps::*;
