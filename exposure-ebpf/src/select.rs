//! Backend selection, shared by new flows at XDP and the node's own sockets (`sock`).

use aya_ebpf::bindings::BPF_ANY;
use exposure_common::*;

use crate::maps::{AFFINITY, MAGLEV};

/// Maglev: the hash picks an entry of the service's table; one array lookup, whatever the number
/// of services and backends, and the same backend on every node for the same flow.
#[inline(always)]
pub fn select_backend(service: &Service, hash: u32) -> Option<u32> {
    if service.backend_count == 0 || service.table_size == 0 {
        return None;
    }
    let entry = service.table_offset.wrapping_add(hash % service.table_size);
    let element = MAGLEV.get(entry / MAGLEV_ENTRIES_PER_ELEMENT).copied()?;
    let id = maglev_entry(element, entry);
    (id != 0).then_some(id)
}

/// `sessionAffinity: ClientIP`: the backend this client last got, while it is fresh; else a new one,
/// remembered. (The agent forgets entries of backends that leave the service.)
#[inline(always)]
pub fn sticky_backend(
    client: &Addr,
    service_id: u32,
    service: &Service,
    hash: u32,
    now: u64,
) -> Option<u32> {
    if service.backend_count == 0 {
        return None;
    }
    let key = AffinityKey {
        service_id,
        client: *client,
    };
    let timeout = service.affinity_timeout_s as u64 * 1_000_000_000;
    if let Some(a) = AFFINITY.get_ptr_mut(&key) {
        let a = unsafe { &mut *a };
        if now.wrapping_sub(a.last_seen_ns) < timeout {
            a.last_seen_ns = now;
            return Some(a.backend_id);
        }
    }
    let backend_id = select_backend(service, hash)?;
    let _ = AFFINITY.insert(
        &key,
        &Affinity {
            last_seen_ns: now,
            backend_id,
            _pad: 0,
        },
        BPF_ANY as u64,
    );
    Some(backend_id)
}
