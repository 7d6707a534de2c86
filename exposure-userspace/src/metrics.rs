//! Prometheus metrics (text exposition format) on `--metrics-bind-address`: per-frontend traffic
//! from the datapath's per-CPU counters, service/backend/frontend gauges, conntrack entries, sync
//! duration histogram and errors, API watch restarts, and the datapath's event counters.

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, SystemTime},
};

use exposure_common::FrontendKey;

use crate::{datapath::KernelMaps, endpoint_slice::EndpointSlice, kube_source::WatchStats};

/// Upper bounds (seconds) of the histograms (a sync, and a change's way from the API to the maps).
const SYNC_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5, 10.0, 60.0,
];

#[derive(Default)]
pub struct Histogram {
    counts: [u64; SYNC_BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    pub fn observe(&mut self, d: Duration) {
        let secs = d.as_secs_f64();
        for (i, le) in SYNC_BUCKETS.iter().enumerate() {
            if secs <= *le {
                self.counts[i] += 1;
            }
        }
        self.count += 1;
        self.sum += secs;
    }
}

/// A frontend's labels, by its counter index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendLabel {
    pub id: u32,
    pub frontend: String,
    pub service: String,
}

/// The annotation the EndpointSlice controller sets: when the change a slice carries was triggered
/// (a Pod or Service change), RFC 3339.
pub const LAST_CHANGE_TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// A slice's namespace and name.
fn slice_id(slice: &EndpointSlice) -> (&str, &str) {
    let meta = &slice.metadata;
    let namespace = meta.namespace.as_deref().unwrap_or_default();
    (namespace, meta.name.as_deref().unwrap_or_default())
}

/// Network programming latency, as kube-proxy measures it
/// (`network_programming_duration_seconds`): from the trigger time an EndpointSlice carries to the
/// sync that programmed it. Each trigger time counts once, and only those after the agent started
/// (the first list brings old ones).
pub struct ProgrammingLatency {
    started: SystemTime,
    /// Namespace -> slice name -> the trigger time last seen on it.
    seen: HashMap<String, HashMap<String, String>>,
}

impl ProgrammingLatency {
    pub fn new(started: SystemTime) -> Self {
        ProgrammingLatency {
            started,
            seen: HashMap::new(),
        }
    }

    /// The latencies of the trigger times not seen before on the slice objects that came
    /// (`added`: new, or a new version of one), programmed at `now`. Slices that went (`removed`,
    /// and not back under the same name) are forgotten. Only changed slices are looked at.
    pub fn programmed<E: std::borrow::Borrow<EndpointSlice>>(
        &mut self,
        added: &[E],
        removed: &[E],
        now: SystemTime,
    ) -> Vec<Duration> {
        let mut latencies = Vec::new();
        let mut here = std::collections::HashSet::new();
        for slice in added {
            let (namespace, name) = slice_id(slice.borrow());
            here.insert((namespace, name));
            let trigger = slice
                .borrow()
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(LAST_CHANGE_TRIGGER_TIME));
            let Some(trigger) = trigger else {
                self.forget(namespace, name);
                continue;
            };
            let names = self.seen.entry(namespace.to_string()).or_default();
            match names.get_mut(name) {
                Some(seen) if seen == trigger => continue,
                Some(seen) => seen.clone_from(trigger),
                None => {
                    names.insert(name.to_string(), trigger.clone());
                }
            }
            if let Some(at) = parse_time(trigger).filter(|at| *at > self.started) {
                latencies.push(now.duration_since(at).unwrap_or_default());
            }
        }
        for (namespace, name) in removed.iter().map(|s| slice_id(s.borrow())) {
            if !here.contains(&(namespace, name)) {
                self.forget(namespace, name);
            }
        }
        latencies
    }

    fn forget(&mut self, namespace: &str, name: &str) {
        if let Some(names) = self.seen.get_mut(namespace) {
            names.remove(name);
            if names.is_empty() {
                self.seen.remove(namespace);
            }
        }
    }
}

/// An RFC 3339 time; `None` when it is not one.
fn parse_time(text: &str) -> Option<SystemTime> {
    let at: k8s_openapi::jiff::Timestamp = text.parse().ok()?;
    Some(SystemTime::from(at))
}

#[derive(Default)]
pub struct Metrics {
    pub sync_duration: Mutex<Histogram>,
    pub network_programming: Mutex<Histogram>,
    pub sync_errors: AtomicU64,
    /// Checks that found the Service maps changed by something else (and rewrote them).
    pub map_repairs: AtomicU64,
    /// How long the last check of the maps took (reading them back and comparing), in µs.
    pub maps_check_us: AtomicU64,
    /// When the maps were last synced to, or checked against, the desired state (ms since the
    /// Unix epoch; 0 before the first sync).
    pub last_synced_ms: AtomicU64,
    /// The last sync's.
    pub no_local_endpoints: Mutex<crate::model::NoLocalEndpoints>,
    pub skipped_objects: AtomicU64,
    pub services: AtomicU64,
    pub backends: AtomicU64,
    pub frontends: Mutex<BTreeMap<FrontendKey, FrontendLabel>>,
    /// Frontends left by their Services, kept for the connections made through them.
    pub frontends_draining: AtomicU64,
    pub watch: Mutex<Option<Arc<WatchStats>>>,
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"")
}

fn gauge(out: &mut String, name: &str, help: &str, v: impl std::fmt::Display) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
}

impl Metrics {
    /// Notes that the maps match the desired state as of `now`.
    pub fn synced_at(&self, now: SystemTime) {
        let ms = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        self.last_synced_ms.store(ms, Ordering::Relaxed);
    }

    /// Renders everything; `maps` gives the datapath's live counters.
    pub fn render(&self, maps: Option<&KernelMaps>) -> String {
        let mut out = String::new();
        let frontends = self.frontends.lock().map(|f| f.clone()).unwrap_or_default();
        gauge(
            &mut out,
            "exposure_services",
            "Service ports programmed into the datapath.",
            self.services.load(Ordering::Relaxed),
        );
        gauge(
            &mut out,
            "exposure_backends",
            "Backends (endpoint address:port) programmed.",
            self.backends.load(Ordering::Relaxed),
        );
        gauge(
            &mut out,
            "exposure_frontends",
            "Frontends (address:port/protocol) programmed.",
            frontends.len() as u64,
        );
        gauge(
            &mut out,
            "exposure_frontends_draining",
            "Frontends their Services no longer have, kept while TCP connections made through them go on.",
            self.frontends_draining.load(Ordering::Relaxed),
        );
        gauge(
            &mut out,
            "exposure_skipped_objects",
            "Objects or files skipped as invalid at the last sync.",
            self.skipped_objects.load(Ordering::Relaxed),
        );

        let histograms = [
            (
                &self.sync_duration,
                "exposure_sync_duration_seconds",
                "Time to translate objects and write the maps.",
            ),
            (
                &self.network_programming,
                "exposure_network_programming_duration_seconds",
                "From an EndpointSlice's last-change-trigger-time to the sync that programmed it (kube-proxy's network programming latency).",
            ),
        ];
        for (histogram, name, help) in histograms {
            let Ok(h) = histogram.lock() else { continue };
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
            for (le, c) in SYNC_BUCKETS.iter().zip(h.counts.iter()) {
                let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {c}");
            }
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"+Inf\"}} {}\n{name}_sum {}\n{name}_count {}",
                h.count, h.sum, h.count
            );
        }
        let _ = writeln!(
            out,
            "# HELP exposure_sync_errors_total Map writes or limits that failed.\n# TYPE exposure_sync_errors_total counter\nexposure_sync_errors_total {}",
            self.sync_errors.load(Ordering::Relaxed)
        );
        let no_local = self
            .no_local_endpoints
            .lock()
            .map(|n| *n)
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "# HELP exposure_no_local_endpoints Service ports with a Local traffic policy whose endpoints are all on other nodes (kube-proxy's sync_proxy_rules_no_local_endpoints_total).\n# TYPE exposure_no_local_endpoints gauge\nexposure_no_local_endpoints{{traffic_policy=\"internal\"}} {}\nexposure_no_local_endpoints{{traffic_policy=\"external\"}} {}",
            no_local.internal,
            no_local.external
        );
        let synced_ms = self.last_synced_ms.load(Ordering::Relaxed);
        gauge(
            &mut out,
            "exposure_sync_last_timestamp_seconds",
            "When the maps were last synced to, or checked against, the desired state (kube-proxy's sync_proxy_rules_last_timestamp_seconds).",
            synced_ms as f64 / 1000.0,
        );
        gauge(
            &mut out,
            "exposure_maps_check_duration_seconds",
            "How long the last check of the Service maps took (--maps-check-period: reading them back and comparing).",
            self.maps_check_us.load(Ordering::Relaxed) as f64 / 1e6,
        );
        let _ = writeln!(
            out,
            "# HELP exposure_map_repairs_total Checks that found the Service maps changed by something else, and rewrote them.\n# TYPE exposure_map_repairs_total counter\nexposure_map_repairs_total {}",
            self.map_repairs.load(Ordering::Relaxed)
        );
        if let Some(w) = self.watch.lock().ok().and_then(|w| w.clone()) {
            let _ = writeln!(
                out,
                "# HELP exposure_api_watch_restarts_total Re-lists after the first (e.g. after 410 Gone).\n# TYPE exposure_api_watch_restarts_total counter\nexposure_api_watch_restarts_total {}",
                w.restarts.load(Ordering::Relaxed)
            );
            let _ = writeln!(
                out,
                "# HELP exposure_api_watch_errors_total Failed list/watch requests.\n# TYPE exposure_api_watch_errors_total counter\nexposure_api_watch_errors_total {}",
                w.errors.load(Ordering::Relaxed)
            );
        }

        let Some(maps) = maps else { return out };
        gauge(
            &mut out,
            "exposure_conntrack_entries",
            "Entries in the flow table.",
            maps.flow_count() as u64,
        );
        let _ = writeln!(out, "# HELP exposure_frontend_packets_total Packets received for a frontend.\n# TYPE exposure_frontend_packets_total counter");
        let mut bytes = String::new();
        for f in frontends.values() {
            let Ok(per_cpu) = maps.frontend_stats.get(&f.id, 0) else {
                continue;
            };
            let (p, b) = per_cpu
                .iter()
                .fold((0u64, 0u64), |(p, b), t| (p + t.packets, b + t.bytes));
            let labels = format!(
                "frontend=\"{}\",service=\"{}\"",
                escape(&f.frontend),
                escape(&f.service)
            );
            let _ = writeln!(out, "exposure_frontend_packets_total{{{labels}}} {p}");
            let _ = writeln!(bytes, "exposure_frontend_bytes_total{{{labels}}} {b}");
        }
        let _ = writeln!(out, "# HELP exposure_frontend_bytes_total Bytes received for a frontend.\n# TYPE exposure_frontend_bytes_total counter\n{bytes}");
        if let Ok(counters) = maps.counters() {
            let _ = writeln!(out, "# HELP exposure_datapath_events_total Datapath events by kind.\n# TYPE exposure_datapath_events_total counter");
            for (c, v) in counters {
                let _ = writeln!(
                    out,
                    "exposure_datapath_events_total{{event=\"{}\"}} {v}",
                    c.name()
                );
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(name: &str, trigger: Option<&str>) -> EndpointSlice {
        let mut s = EndpointSlice::default();
        s.metadata.name = Some(name.into());
        s.metadata.namespace = Some("default".into());
        s.metadata.annotations =
            trigger.map(|t| [(LAST_CHANGE_TRIGGER_TIME.to_string(), t.to_string())].into());
        s
    }

    #[test]
    fn programming_latency_counts_each_trigger_time_after_start_once() {
        let at = |t: &str| parse_time(t).unwrap();
        let mut latency = ProgrammingLatency::new(at("2026-11-27T10:00:00Z"));
        let now = at("2026-11-27T10:00:05Z");
        // The first list: an old trigger time, none at all, a bad one, and a new one.
        let slices = [
            slice("old", Some("2026-11-27T09:00:00Z")),
            slice("none", None),
            slice("bad", Some("yesterday")),
            slice("new", Some("2026-11-27T10:00:03.5Z")),
        ];
        assert_eq!(
            latency.programmed(&slices, &[], now),
            [Duration::from_millis(1500)]
        );
        // Nothing changed, or a new version of a slice with the same trigger time (a label
        // changed): nothing counted again.
        assert!(latency
            .programmed::<EndpointSlice>(&[], &[], now)
            .is_empty());
        let relabelled = [slice("new", Some("2026-11-27T10:00:03.5Z"))];
        assert!(latency
            .programmed(&relabelled, &slices[3..], now)
            .is_empty());
        // "old" changes, "new" goes and comes back with the same time: both count.
        let changed = [slice("old", Some("2026-11-27T10:00:04Z"))];
        let gone = [slices[0].clone(), relabelled[0].clone()];
        assert_eq!(
            latency.programmed(&changed, &gone, now),
            [Duration::from_secs(1)]
        );
        assert_eq!(
            latency.programmed(&relabelled, &[], now),
            [Duration::from_millis(1500)]
        );
        // A slice that loses its trigger time and gets the same one back counts again.
        let untriggered = [slice("old", None)];
        assert!(latency.programmed(&untriggered, &changed, now).is_empty());
        assert_eq!(
            latency.programmed(&changed, &untriggered, now),
            [Duration::from_secs(1)]
        );
    }

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.services.store(3, Ordering::Relaxed);
        m.sync_duration
            .lock()
            .unwrap()
            .observe(Duration::from_micros(700));
        m.sync_duration
            .lock()
            .unwrap()
            .observe(Duration::from_secs(1));
        m.frontends.lock().unwrap().insert(
            FrontendKey::default(),
            FrontendLabel {
                id: 1,
                frontend: "198.18.0.10:30600/TCP".into(),
                service: "default/a\"b".into(),
            },
        );
        m.no_local_endpoints.lock().unwrap().external = 2;
        let before = m.render(None);
        assert!(before.contains("exposure_sync_last_timestamp_seconds 0\n"));
        m.synced_at(SystemTime::UNIX_EPOCH + Duration::from_millis(1_764_230_400_250));
        let text = m.render(None);
        assert!(text.contains("exposure_sync_last_timestamp_seconds 1764230400.25\n"));
        m.maps_check_us.store(1_500, Ordering::Relaxed);
        assert!(m
            .render(None)
            .contains("exposure_maps_check_duration_seconds 0.0015\n"));
        assert!(text.contains("exposure_no_local_endpoints{traffic_policy=\"internal\"} 0\n"));
        assert!(text.contains("exposure_no_local_endpoints{traffic_policy=\"external\"} 2\n"));
        assert!(text.contains("exposure_services 3"));
        assert!(text.contains("exposure_frontends 1"));
        assert!(text.contains("exposure_sync_duration_seconds_bucket{le=\"0.0005\"} 0"));
        assert!(text.contains("exposure_sync_duration_seconds_bucket{le=\"0.001\"} 1"));
        assert!(text.contains("exposure_sync_duration_seconds_bucket{le=\"+Inf\"} 2"));
        assert!(text.contains("exposure_sync_duration_seconds_count 2"));
        assert!(escape("a\"b") == "a\\\"b");
        assert!(text.contains("exposure_network_programming_duration_seconds_count 0"));
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let value = line.rsplit(' ').next().unwrap();
            assert!(value.parse::<f64>().is_ok(), "not a sample line: {line}");
        }
    }
}
