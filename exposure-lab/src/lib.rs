//! Test and demo support for Exposure, shared by the packet tests, the end-to-end tests and
//! `cargo xtask run`:
//! - [`netns`]: named network namespaces removed on drop, running code and processes inside them;
//! - [`lab`]: a client, two nodes with pods, on a bridged LAN, all in 198.18.0.0/15, no default routes;
//! - [`apps`]: TCP/UDP servers that say which pod answered, and clients;
//! - [`frame`]: Ethernet/IPv4/TCP/UDP frames with correct checksums, and a parser that checks them;
//! - [`rng`]: the seeded random numbers of the randomized tests.

pub mod agent;
pub mod apiserver;
pub mod apps;
pub mod control_plane;
pub mod frame;
pub mod kube_proxy;
pub mod lab;
pub mod netns;
pub mod rng;
pub mod scale;
pub mod traffic;
pub mod xdp_pass;
