//! Plain SVG bar charts for the bench report (no dependencies: rectangles and text).

use std::fmt::Write as _;

use exposure_lab::traffic::Flows;

use crate::forwarding::{Run, Target, Variant};

const COLORS: [&str; 7] = [
    "#9e9e9e", "#d0d0d0", "#1f77b4", "#17becf", "#2ca02c", "#d62728", "#ff7f0e",
];

/// Grouped bars: one panel per (backend, flows), a group per Service count, a bar per variant.
pub fn forwarding(runs: &[Run], sizes: &[usize]) -> String {
    let panels = [
        (Target::Local, Flows::One, "local backend, one flow"),
        (Target::Local, Flows::New, "local backend, new flows"),
        (Target::Remote, Flows::One, "remote backend, one flow"),
        (Target::Remote, Flows::New, "remote backend, new flows"),
    ];
    let max = runs.iter().map(|r| r.pps / 1e3).fold(1.0, f64::max);
    let names: Vec<&str> = Variant::ALL.iter().map(|v| v.name()).collect();
    let (panel_w, panel_h) = (420.0, 260.0);
    let mut svg = header(
        LEFT + panel_w * 2.0 + 20.0,
        TOP + (panel_h + 60.0) * 2.0,
        "Thousand packets/s through a node (64-byte UDP), higher is better",
        &names,
    );
    for (p, (target, flows, title)) in panels.iter().enumerate() {
        let x0 = LEFT + (p % 2) as f64 * panel_w;
        let y0 = TOP + (p / 2) as f64 * (panel_h + 60.0) + 20.0;
        let _ = writeln!(svg, r#"<text x="{x0}" y="{}">{title}</text>"#, y0 - 4.0);
        let groups: Vec<(String, Vec<f64>)> = sizes
            .iter()
            .map(|n| {
                let pps = |v: &Variant| {
                    runs.iter()
                        .find(|r| {
                            r.variant == *v
                                && r.services == *n
                                && r.target == *target
                                && r.flows == *flows
                        })
                        .map_or(0.0, |r| r.pps / 1e3)
                };
                (
                    format!("{n} Services"),
                    Variant::ALL.iter().map(pps).collect(),
                )
            })
            .collect();
        bars(
            &mut svg,
            (x0, y0),
            (panel_w - 30.0, panel_h),
            max,
            "kpps",
            &names,
            &groups,
        );
    }
    svg.push_str("</svg>\n");
    svg
}

const TOP: f64 = 60.0;
const LEFT: f64 = 60.0;
const BAR_W: f64 = 16.0;
/// Room for one legend entry (the longest name is about 30 characters).
const LEGEND_W: f64 = 200.0;

/// The document start, title and legend.
fn header(width: f64, height: f64, title: &str, series: &[&str]) -> String {
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(
        svg,
        r#"<text x="{LEFT}" y="20" font-size="14">{title}</text>"#
    );
    // The legend in rows of as many entries as fit (two rows fit above TOP).
    let per_row = (((width - LEFT) / LEGEND_W) as usize).max(1);
    for (k, name) in series.iter().enumerate() {
        let x = LEFT + (k % per_row) as f64 * LEGEND_W;
        let y = 32.0 + (k / per_row) as f64 * 14.0;
        let _ = writeln!(
            svg,
            r#"<rect x="{x}" y="{y}" width="10" height="10" fill="{}"/><text x="{}" y="{}">{name}</text>"#,
            COLORS[k % COLORS.len()],
            x + 14.0,
            y + 9.0
        );
    }
    svg
}

/// Bars of `groups` (label, one value per series) in the box at `origin` (top left) of `size`,
/// scaled so `max` fills it, each labelled with its value.
fn bars(
    svg: &mut String,
    origin: (f64, f64),
    size: (f64, f64),
    max: f64,
    unit: &str,
    series: &[&str],
    groups: &[(String, Vec<f64>)],
) {
    let (x0, y0) = origin;
    let base = y0 + size.1;
    let group_w = BAR_W * series.len() as f64 + 24.0;
    let _ = writeln!(
        svg,
        r##"<line x1="{x0}" y1="{base}" x2="{}" y2="{base}" stroke="#333"/>"##,
        x0 + size.0
    );
    for (g, (label, values)) in groups.iter().enumerate() {
        let gx = x0 + 10.0 + g as f64 * group_w;
        for (k, v) in values.iter().enumerate() {
            let h = v / max * (size.1 - 20.0);
            let x = gx + k as f64 * BAR_W;
            let _ = writeln!(
                svg,
                r#"<rect x="{x:.1}" y="{:.1}" width="{}" height="{h:.1}" fill="{}"><title>{label} {}: {v:.0} {unit}</title></rect>"#,
                base - h,
                BAR_W - 2.0,
                COLORS[k % COLORS.len()],
                series[k]
            );
            let _ = writeln!(
                svg,
                r#"<text x="{:.1}" y="{:.1}" font-size="8" text-anchor="middle">{v:.0}</text>"#,
                x + BAR_W / 2.0 - 1.0,
                base - h - 3.0
            );
        }
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{label}</text>"#,
            gx + group_w / 2.0 - 12.0,
            base + 14.0
        );
    }
}

/// One bar group per label, one bar per series: a single-panel grouped bar chart.
pub fn grouped(title: &str, unit: &str, series: &[&str], groups: &[(String, Vec<f64>)]) -> String {
    let max = groups
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .fold(1.0, f64::max);
    let plot_h = 260.0;
    let width = LEFT + (BAR_W * series.len() as f64 + 24.0) * groups.len() as f64 + 40.0;
    // Wide enough for the legend in two rows.
    let width = width.max(LEFT + LEGEND_W * series.len().div_ceil(2) as f64 + 20.0);
    let mut svg = header(width, TOP + plot_h + 60.0, title, series);
    bars(
        &mut svg,
        (LEFT, TOP),
        (width - LEFT - 20.0, plot_h),
        max,
        unit,
        series,
        groups,
    );
    svg.push_str("</svg>\n");
    svg
}
