//! Prometheus metrics (text exposition format) on `--metrics-bind-address`: per-frontend traffic
//! from the datapath's per-CPU counters, service/backend/frontend gauges, conntrack entries, sync
//! duration histogram and errors, API watch restarts, and the datapath's event counters.

use std::{
    fmt::Write as _,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use crate::{datapath::KernelMaps, kube_source::WatchStats};

/// Upper bounds (seconds) of the sync duration histogram.
const SYNC_BUCKETS: [f64; 10] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5,
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
#[derive(Clone, Debug)]
pub struct FrontendLabel {
    pub id: u32,
    pub frontend: String,
    pub service: String,
}

#[derive(Default)]
pub struct Metrics {
    pub sync_duration: Mutex<Histogram>,
    pub sync_errors: AtomicU64,
    pub skipped_objects: AtomicU64,
    pub services: AtomicU64,
    pub backends: AtomicU64,
    pub frontends: Mutex<Vec<FrontendLabel>>,
    pub watch: Mutex<Option<Arc<WatchStats>>>,
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"")
}

impl Metrics {
    /// Renders everything; `maps` gives the datapath's live counters.
    pub fn render(&self, maps: Option<&KernelMaps>) -> String {
        let mut out = String::new();
        let gauge = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
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
            "exposure_skipped_objects",
            "Objects or files skipped as invalid at the last sync.",
            self.skipped_objects.load(Ordering::Relaxed),
        );

        if let Ok(h) = self.sync_duration.lock() {
            let name = "exposure_sync_duration_seconds";
            let _ = writeln!(out, "# HELP {name} Time to translate objects and write the maps.\n# TYPE {name} histogram");
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
        for f in &frontends {
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
        m.frontends.lock().unwrap().push(FrontendLabel {
            id: 1,
            frontend: "198.18.0.10:30600/TCP".into(),
            service: "default/a\"b".into(),
        });
        let text = m.render(None);
        assert!(text.contains("exposure_services 3"));
        assert!(text.contains("exposure_frontends 1"));
        assert!(text.contains("exposure_sync_duration_seconds_bucket{le=\"0.0005\"} 0"));
        assert!(text.contains("exposure_sync_duration_seconds_bucket{le=\"0.001\"} 1"));
        assert!(text.contains("exposure_sync_duration_seconds_bucket{le=\"+Inf\"} 2"));
        assert!(text.contains("exposure_sync_duration_seconds_count 2"));
        assert!(escape("a\"b") == "a\\\"b");
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let value = line.rsplit(' ').next().unwrap();
            assert!(value.parse::<f64>().is_ok(), "not a sample line: {line}");
        }
    }
}
