//! The report's picture: one SVG timeline a person can read instead of the logs.
//!
//! ```text
//!  title, verdict, reason
//!  phases    [ before ][        method        ][ after ]
//!  faults    ▬▬▬▬ loss Echo      ◆ kill Echo
//!  probe 1   latency dots (red × = failed), tolerance lines, fault windows shaded, verdict bar below
//!  probe 2   …
//!  abort     a red line where the safeguard failed, a dashed one where every fault was reverted
//! ```
//!
//! Plain SVG 1.1 (text, lines, rects, paths), no script, no external fonts: it opens in any browser or viewer.

use std::fmt::Write;

use super::{
    probe::Sample,
    report::{ProbeReport, Report, Status},
};

const WIDTH: f64 = 1000.0;
const LEFT: f64 = 170.0;
const RIGHT: f64 = 30.0;
const PANEL: f64 = 120.0;
const ROW: f64 = 18.0;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n { s.to_owned() } else { format!("{}…", s.chars().take(n - 1).collect::<String>()) }
}

/// Renders the report's timeline.
// Long on purpose: a flat writer of SVG elements, top of the picture to the bottom; the layout constants it
// computes first are shared by every part, and the probe panels are a function of their own.
pub(crate) fn render(report: &Report) -> String {
    let duration = report.duration.max(1.0);
    let plot_w = WIDTH - LEFT - RIGHT;
    let x = |t: f64| LEFT + (t.clamp(0.0, duration) / duration) * plot_w;
    let fault_rows = report.faults.len().clamp(1, 12);
    let top = 92.0;
    let faults_top = top + 30.0;
    let probes_top = faults_top + (fault_rows + 1) as f64 * ROW + 18.0;
    let height = probes_top + report.probes.len() as f64 * (PANEL + 46.0) + 86.0;
    let mut s = String::new();
    let _ = write!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height:.0}" viewBox="0 0 {WIDTH} {height:.0}" font-family="DejaVu Sans, Verdana, sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
"##
    );
    let (color, label) = match report.status {
        Status::Held => ("#1b7f3b", report.status.label()),
        Status::Deviated => ("#c0392b", report.status.label()),
        Status::Aborted => ("#d35400", report.status.label()),
        Status::NotRun => ("#7f8c8d", report.status.label()),
    };
    let _ = writeln!(
        s,
        r##"<text x="20" y="28" font-size="16" font-weight="bold" fill="#222">{}</text>"##,
        esc(&clip(&report.title, 100))
    );
    let _ = writeln!(
        s,
        r##"<text x="20" y="50" font-size="14"><tspan fill="{color}" font-weight="bold">{label}</tspan><tspan fill="#444"> · {}</tspan></text>"##,
        esc(&clip(&report.reason, 110))
    );
    let _ = writeln!(
        s,
        r##"<text x="20" y="70" fill="#777" font-size="11">{:.1} s · seed {}{} · {}</text>"##,
        report.duration,
        report.seed,
        if report.dry_run { " · DRY RUN: nothing applied" } else { "" },
        esc(&report.file)
    );

    // Time axis ticks (shared by all rows).
    let step = nice_step(duration / 10.0);
    let bottom = height - 66.0;
    let mut t = 0.0;
    while t <= duration + 1e-9 {
        let _ = writeln!(s, r##"<line x1="{0:.1}" y1="{top}" x2="{0:.1}" y2="{bottom:.1}" stroke="#eee"/>"##, x(t));
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#555" font-size="11">{}s</text>"##,
            x(t),
            bottom + 14.0,
            fmt_num(t)
        );
        t += step;
    }
    let _ = writeln!(
        s,
        r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#555">seconds since the start</text>"##,
        LEFT + plot_w / 2.0,
        bottom + 30.0
    );

    // Phases.
    let _ = writeln!(s, r##"<text x="20" y="{:.1}" font-weight="bold" fill="#333">phases</text>"##, top + 14.0);
    for (name, span, fill) in [
        ("before", report.phases.before, "#d6e4f0"),
        ("method", report.phases.method, "#fde2c8"),
        ("after", report.phases.after, "#d5f0dc"),
    ] {
        if let Some(sp) = span {
            let (x0, x1) = (x(sp.from), x(sp.to));
            let _ = writeln!(
                s,
                r##"<rect x="{x0:.1}" y="{top}" width="{:.1}" height="20" fill="{fill}" stroke="#999"/>"##,
                (x1 - x0).max(1.0)
            );
            if x1 - x0 > 40.0 {
                let _ = writeln!(
                    s,
                    r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#333">{name}</text>"##,
                    (x0 + x1) / 2.0,
                    top + 14.0
                );
            }
        }
    }

    // Fault windows: shaded behind the probe panels, and one row each.
    let method_end = report.phases.method.map_or(report.duration, |m| m.to);
    let _ = writeln!(s, r##"<text x="20" y="{:.1}" font-weight="bold" fill="#333">faults</text>"##, faults_top + 12.0);
    if report.faults.is_empty() {
        let _ = writeln!(s, r##"<text x="{LEFT}" y="{:.1}" fill="#777">none applied</text>"##, faults_top + ROW + 12.0);
    }
    let panels_bottom = probes_top + report.probes.len() as f64 * (PANEL + 46.0);
    for f in report.faults.iter().filter(|f| f.lasting && f.outcome != "failed" && f.outcome != "dry_run") {
        let end = f.ended_at.or(f.planned_end.map(|p| p.min(method_end))).unwrap_or(method_end);
        let (x0, x1) = (x(f.applied_at), x(end));
        let _ = writeln!(
            s,
            r##"<rect x="{x0:.1}" y="{probes_top:.1}" width="{:.1}" height="{:.1}" fill="#e74c3c" fill-opacity="0.08"/>"##,
            (x1 - x0).max(1.0),
            panels_bottom - probes_top
        );
    }
    for (row, f) in report.faults.iter().take(12).enumerate() {
        let y = faults_top + (row + 1) as f64 * ROW;
        let label = f.name.clone().unwrap_or_else(|| f.description.clone());
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="end" fill="#444" font-size="11">{}</text>"##,
            LEFT - 6.0,
            y + 12.0,
            esc(&clip(&label, 26))
        );
        let color = match f.outcome.as_str() {
            "failed" | "revert_failed" => "#7f8c8d",
            "dry_run" => "#95a5a6",
            _ => "#e74c3c",
        };
        if f.lasting {
            let end = f.ended_at.or(f.planned_end.map(|p| p.min(method_end))).unwrap_or(method_end);
            let (x0, x1) = (x(f.applied_at), x(end));
            let _ = writeln!(
                s,
                r##"<rect x="{x0:.1}" y="{:.1}" width="{:.1}" height="12" rx="2" fill="{color}" fill-opacity="0.75"/>"##,
                y + 2.0,
                (x1 - x0).max(2.0)
            );
            let _ = writeln!(
                s,
                r##"<text x="{:.1}" y="{:.1}" fill="#333" font-size="10">{}</text>"##,
                x1 + 4.0,
                y + 12.0,
                esc(&f.outcome)
            );
        } else {
            let (cx, cy) = (x(f.applied_at), y + 8.0);
            let _ = writeln!(
                s,
                r##"<path d="M{cx:.1} {:.1} L{:.1} {cy:.1} L{cx:.1} {:.1} L{:.1} {cy:.1} Z" fill="{color}"/>"##,
                cy - 6.0,
                cx + 6.0,
                cy + 6.0,
                cx - 6.0
            );
            let pids: Vec<String> = f.pids.iter().map(i64::to_string).collect();
            let what = if pids.is_empty() { f.outcome.clone() } else { format!("pid {}", pids.join(",")) };
            let _ = writeln!(
                s,
                r##"<text x="{:.1}" y="{:.1}" fill="#333" font-size="10">{}</text>"##,
                cx + 9.0,
                y + 12.0,
                esc(&what)
            );
        }
    }
    if report.faults.len() > 12 {
        let _ = writeln!(
            s,
            r##"<text x="{LEFT}" y="{:.1}" fill="#777" font-size="10">… {} more in report.json</text>"##,
            faults_top + 12.0 * ROW + 10.0,
            report.faults.len() - 12
        );
    }

    // Probe panels.
    for (i, p) in report.probes.iter().enumerate() {
        let y0 = probes_top + i as f64 * (PANEL + 46.0);
        let aborted_by =
            |p: &ProbeReport| report.abort.as_ref().is_some_and(|a| a.probe.as_deref() == Some(p.name.as_str()));
        panel(&mut s, p, y0, &x, &aborted_by);
    }

    // Abort markers.
    if let Some(a) = &report.abort {
        let (xa, xr) = (x(a.at), x(a.reverted_at));
        let _ = writeln!(
            s,
            r##"<line x1="{xa:.1}" y1="{top}" x2="{xa:.1}" y2="{bottom:.1}" stroke="#c0392b" stroke-width="2"/>"##
        );
        let _ = writeln!(
            s,
            r##"<line x1="{xr:.1}" y1="{top}" x2="{xr:.1}" y2="{bottom:.1}" stroke="#c0392b" stroke-width="1.5" stroke-dasharray="5,3"/>"##
        );
        let text = format!(
            "abort at {:.2} s ({}) · all reverted {:.0} ms later",
            a.at,
            a.probe.as_deref().unwrap_or(&a.reason),
            (a.reverted_at - a.at) * 1e3
        );
        let anchor = if xa > WIDTH / 2.0 { "end" } else { "start" };
        let tx = if xa > WIDTH / 2.0 { xa - 6.0 } else { xa + 6.0 };
        let _ = writeln!(
            s,
            r##"<text x="{tx:.1}" y="{:.1}" text-anchor="{anchor}" fill="#c0392b" font-weight="bold" font-size="11">{}</text>"##,
            top - 4.0,
            esc(&text)
        );
    }

    // Legend.
    let ly = height - 14.0;
    let _ = writeln!(
        s,
        r##"<g font-size="11" fill="#444"><circle cx="26" cy="{0:.1}" r="3" fill="#2e86c1"/><text x="34" y="{1:.1}">sample ok</text><path d="M104 {2:.1} l6 6 m0 -6 l-6 6" stroke="#c0392b" stroke-width="1.6"/><text x="116" y="{1:.1}">failed (at its latency; timeouts on top)</text><rect x="340" y="{2:.1}" width="14" height="8" fill="#e74c3c" fill-opacity="0.3"/><text x="360" y="{1:.1}">fault active</text><line x1="450" y1="{0:.1}" x2="470" y2="{0:.1}" stroke="#8e44ad" stroke-dasharray="4,3"/><text x="476" y="{1:.1}">tolerance</text><rect x="550" y="{2:.1}" width="14" height="8" fill="#27ae60"/><rect x="566" y="{2:.1}" width="14" height="8" fill="#e74c3c"/><text x="586" y="{1:.1}">verdict per window: held / deviated</text></g>"##,
        ly - 4.0,
        ly,
        ly - 8.0
    );
    s.push_str("</svg>\n");
    s
}

/// One probe's panel: title, frame, y axis, threshold, samples (failures marked) and the verdict bar.
// Long on purpose: a flat writer of SVG elements in drawing order; each part is a few lines that read the same
// scale, so splitting it would only pass that scale around.
fn panel(s: &mut String, p: &ProbeReport, y0: f64, x: &dyn Fn(f64) -> f64, aborted_by: &dyn Fn(&ProbeReport) -> bool) {
    let plot_w = WIDTH - LEFT - RIGHT;
    let role = if p.role == "safeguard" { "safeguard" } else { "steady state" };
    let _ = writeln!(
        s,
        r##"<text x="20" y="{:.1}" font-weight="bold" fill="#222">{}</text>"##,
        y0 + 14.0,
        esc(&clip(&p.name, 24))
    );
    let _ = writeln!(s, r##"<text x="20" y="{:.1}" fill="#666" font-size="11">{role}</text>"##, y0 + 30.0);
    let _ = writeln!(
        s,
        r##"<text x="20" y="{:.1}" fill="#666" font-size="11">{}</text>"##,
        y0 + 45.0,
        esc(&clip(&p.target, 26))
    );
    let _ = writeln!(
        s,
        r##"<rect x="{LEFT}" y="{y0:.1}" width="{plot_w:.1}" height="{PANEL}" fill="none" stroke="#bbb"/>"##
    );
    let registry = p.kind == "registry";
    let value = |smp: &Sample| -> Option<f64> {
        if registry { smp.value.as_ref().and_then(serde_json::Value::as_f64) } else { smp.latency.map(|l| l * 1e3) }
    };
    let mut top = p.samples.iter().filter_map(value).fold(if registry { 2.0 } else { 10.0 }, f64::max);
    for (_, limit) in &p.limits {
        top = top.max(limit * 1e3);
    }
    let top = nice_ceiling(top * 1.1);
    let y = |v: f64| y0 + PANEL - (v / top).clamp(0.0, 1.0) * (PANEL - 8.0);
    // Y axis: 0, half, top.
    for v in [0.0, top / 2.0, top] {
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="end" fill="#777" font-size="10">{}{}</text>"##,
            LEFT - 4.0,
            y(v) + 3.0,
            fmt_num(v),
            if registry { "" } else { " ms" }
        );
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{0:.1}" x2="{1:.1}" y2="{0:.1}" stroke="#f0f0f0"/>"##,
            y(v),
            LEFT + plot_w
        );
    }
    let _ = writeln!(
        s,
        r##"<text x="{:.1}" y="{:.1}" text-anchor="end" fill="#777" font-size="10">{}</text>"##,
        LEFT - 4.0,
        y0 + PANEL + 14.0,
        if registry { "instances" } else { "latency" }
    );
    for (q, limit) in &p.limits {
        let ly = y(limit * 1e3);
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="#8e44ad" stroke-dasharray="4,3"/>"##,
            LEFT + plot_w
        );
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="end" fill="#8e44ad" font-size="10">{q} ≤ {} ms</text>"##,
            LEFT + plot_w - 4.0,
            ly - 3.0,
            fmt_num(limit * 1e3)
        );
    }
    if registry {
        let mut d = String::new();
        for smp in &p.samples {
            if let Some(v) = value(smp) {
                let _ = write!(d, "{}{:.1} {:.1} ", if d.is_empty() { "M" } else { "L" }, x(smp.t), y(v));
            }
        }
        if !d.is_empty() {
            let _ = writeln!(s, r##"<path d="{d}" fill="none" stroke="#2e86c1" stroke-width="1.5"/>"##);
        }
    }
    for smp in &p.samples {
        let cx = x(smp.t);
        let cy = value(smp).map_or(y0 + 6.0, y);
        if smp.ok {
            if !registry {
                let _ = writeln!(s, r##"<circle cx="{cx:.1}" cy="{cy:.1}" r="2.2" fill="#2e86c1"/>"##);
            }
        } else {
            let _ = writeln!(
                s,
                r##"<path d="M{:.1} {:.1} l6 6 m0 -6 l-6 6" stroke="#c0392b" stroke-width="1.6"/>"##,
                cx - 3.0,
                cy - 3.0
            );
        }
    }
    // Verdict bar.
    let vy = y0 + PANEL + 4.0;
    for v in &p.verdicts {
        let fill = match v.result.as_str() {
            "held" => "#27ae60",
            "deviated" => "#e74c3c",
            _ => "#95a5a6",
        };
        let (x0, x1) = (x(v.from), x(v.to));
        let _ = writeln!(
            s,
            r##"<rect x="{x0:.1}" y="{vy:.1}" width="{:.1}" height="6" fill="{fill}"><title>{}</title></rect>"##,
            (x1 - x0).max(1.0),
            esc(&format!("{} {}: {}", v.phase, v.result, v.failures.join("; ")))
        );
    }
    let failed: Vec<&str> =
        p.verdicts.iter().filter(|v| !v.held()).flat_map(|v| v.failures.iter().map(String::as_str)).collect();
    if let Some(first) = failed.first() {
        let _ = writeln!(
            s,
            r##"<text x="{LEFT}" y="{:.1}" fill="#c0392b" font-size="11">{}</text>"##,
            vy + 20.0,
            esc(&clip(first, 120))
        );
    } else if !p.verdicts.is_empty() {
        let _ = writeln!(
            s,
            r##"<text x="{LEFT}" y="{:.1}" fill="#1b7f3b" font-size="11">held in every window judged</text>"##,
            vy + 20.0
        );
    } else if p.role == "safeguard" && !aborted_by(p) {
        let _ = writeln!(
            s,
            r##"<text x="{LEFT}" y="{:.1}" fill="#1b7f3b" font-size="11">watched on every sample during the method: never failed</text>"##,
            vy + 20.0
        );
    }
}

fn nice_step(raw: f64) -> f64 {
    let raw = raw.max(1e-3);
    let mag = 10f64.powf(raw.log10().floor());
    for m in [1.0, 2.0, 5.0, 10.0] {
        if raw <= m * mag {
            return m * mag;
        }
    }
    10.0 * mag
}

fn nice_ceiling(v: f64) -> f64 {
    let step = nice_step(v / 4.0);
    (v / step).ceil() * step
}

fn fmt_num(v: f64) -> String {
    if (v - v.round()).abs() < 1e-6 { format!("{}", v.round() as i64) } else { format!("{v:.1}") }
}
