//! Plain SVG bar charts for the bench report (no dependencies: rectangles and text).

use std::fmt::Write as _;

use exposure_lab::traffic::Flows;

use crate::forwarding::{Run, Target, Variant};

const COLORS: [&str; 4] = ["#9e9e9e", "#1f77b4", "#d62728", "#ff7f0e"];

/// Grouped bars: one panel per (backend, flows), a group per Service count, a bar per variant.
pub fn forwarding(runs: &[Run], sizes: &[usize]) -> String {
    let panels = [
        (Target::Local, Flows::One, "local backend, one flow"),
        (Target::Local, Flows::New, "local backend, new flows"),
        (Target::Remote, Flows::One, "remote backend, one flow"),
        (Target::Remote, Flows::New, "remote backend, new flows"),
    ];
    let max = runs.iter().map(|r| r.pps).fold(1.0, f64::max);
    let (panel_w, panel_h, top, left) = (420.0, 260.0, 60.0, 60.0);
    let bar_w = 16.0;
    let group_w = bar_w * Variant::ALL.len() as f64 + 24.0;
    let width = left + panel_w * 2.0 + 20.0;
    let height = top + (panel_h + 60.0) * 2.0;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(
        svg,
        r#"<text x="{left}" y="20" font-size="14">Thousand packets/s through a node (64-byte UDP), higher is better</text>"#
    );
    for (k, v) in Variant::ALL.iter().enumerate() {
        let x = left + k as f64 * 150.0;
        let _ = writeln!(
            svg,
            r#"<rect x="{x}" y="32" width="10" height="10" fill="{}"/><text x="{}" y="41">{}</text>"#,
            COLORS[k],
            x + 14.0,
            v.name()
        );
    }
    for (p, (target, flows, title)) in panels.iter().enumerate() {
        let x0 = left + (p % 2) as f64 * panel_w;
        let y0 = top + (p / 2) as f64 * (panel_h + 60.0) + 20.0;
        let base = y0 + panel_h;
        let _ = writeln!(svg, r#"<text x="{x0}" y="{}">{title}</text>"#, y0 - 4.0);
        let _ = writeln!(
            svg,
            r##"<line x1="{x0}" y1="{base}" x2="{}" y2="{base}" stroke="#333"/>"##,
            x0 + panel_w - 30.0
        );
        for (g, n) in sizes.iter().enumerate() {
            let gx = x0 + 10.0 + g as f64 * group_w;
            for (k, v) in Variant::ALL.iter().enumerate() {
                let Some(r) = runs.iter().find(|r| {
                    r.variant == *v && r.services == *n && r.target == *target && r.flows == *flows
                }) else {
                    continue;
                };
                let h = r.pps / max * (panel_h - 20.0);
                let x = gx + k as f64 * bar_w;
                let _ = writeln!(
                    svg,
                    r#"<rect x="{x:.1}" y="{:.1}" width="{}" height="{h:.1}" fill="{}"><title>{} {n} Services: {:.0} kpps</title></rect>"#,
                    base - h,
                    bar_w - 2.0,
                    COLORS[k],
                    v.name(),
                    r.pps / 1e3
                );
                let _ = writeln!(
                    svg,
                    r#"<text x="{:.1}" y="{:.1}" font-size="8" text-anchor="middle">{:.0}</text>"#,
                    x + bar_w / 2.0 - 1.0,
                    base - h - 3.0,
                    r.pps / 1e3
                );
            }
            let _ = writeln!(
                svg,
                r#"<text x="{:.1}" y="{}" text-anchor="middle">{n} Services</text>"#,
                gx + group_w / 2.0 - 12.0,
                base + 14.0
            );
        }
    }
    svg.push_str("</svg>\n");
    svg
}

/// One bar group per label, one bar per series: a generic grouped bar chart.
pub fn grouped(title: &str, unit: &str, series: &[&str], groups: &[(String, Vec<f64>)]) -> String {
    let max = groups
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .fold(1.0, f64::max);
    let (top, left, plot_h, bar_w) = (60.0, 60.0, 260.0, 18.0);
    let group_w = bar_w * series.len() as f64 + 30.0;
    let width = left + group_w * groups.len() as f64 + 40.0;
    let height = top + plot_h + 60.0;
    let base = top + plot_h;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(
        svg,
        r#"<text x="{left}" y="20" font-size="14">{title}</text>"#
    );
    for (k, name) in series.iter().enumerate() {
        let x = left + k as f64 * 150.0;
        let _ = writeln!(
            svg,
            r#"<rect x="{x}" y="32" width="10" height="10" fill="{}"/><text x="{}" y="41">{name}</text>"#,
            COLORS[k % COLORS.len()],
            x + 14.0
        );
    }
    let _ = writeln!(
        svg,
        r##"<line x1="{left}" y1="{base}" x2="{:.0}" y2="{base}" stroke="#333"/>"##,
        width - 20.0
    );
    for (g, (label, values)) in groups.iter().enumerate() {
        let gx = left + 10.0 + g as f64 * group_w;
        for (k, v) in values.iter().enumerate() {
            let h = v / max * (plot_h - 20.0);
            let x = gx + k as f64 * bar_w;
            let _ = writeln!(
                svg,
                r#"<rect x="{x:.1}" y="{:.1}" width="{}" height="{h:.1}" fill="{}"><title>{label} {}: {v:.0} {unit}</title></rect>"#,
                base - h,
                bar_w - 2.0,
                COLORS[k % COLORS.len()],
                series[k]
            );
            let _ = writeln!(
                svg,
                r#"<text x="{:.1}" y="{:.1}" font-size="8" text-anchor="middle">{v:.0}</text>"#,
                x + bar_w / 2.0 - 1.0,
                base - h - 3.0
            );
        }
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{label}</text>"#,
            gx + group_w / 2.0 - 15.0,
            base + 14.0
        );
    }
    svg.push_str("</svg>\n");
    svg
}
