//! A workflow drawn as an SVG graph: services as boxes grouped by actor (one colour per actor) on a
//! circle, each step an arrow labelled with its methods and paths. Plain SVG 1.1 text, no dependencies, so
//! it opens in any browser and diffs in review.

use std::fmt::Write as _;

use crate::workflow::Workflow;

const PALETTE: [&str; 8] = [
    "#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#9c755f",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Renders `wf` as a standalone SVG document.
pub fn svg(wf: &Workflow) -> String {
    // Services in actor order, so one actor's services sit next to each other on the circle.
    let mut nodes: Vec<(&str, usize)> = Vec::new();
    for (ai, a) in wf.actors.iter().enumerate() {
        for s in &a.services {
            nodes.push((s.name.as_str(), ai));
        }
    }
    let n = nodes.len().max(1) as f64;
    let (w, h) = (900.0_f64, 760.0_f64);
    let (cx, cy, r) = (w / 2.0, h / 2.0 + 20.0, (h / 2.0 - 110.0).max(120.0));
    let pos = |i: usize| {
        let a = -std::f64::consts::FRAC_PI_2 + 2.0 * std::f64::consts::PI * i as f64 / n;
        (cx + r * a.cos(), cy + r * a.sin())
    };
    let index = |name: &str| nodes.iter().position(|(s, _)| *s == name);
    let (bw, bh) = (110.0, 40.0);

    let mut out = String::new();
    let _ = writeln!(
        out,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif">
<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="8" markerHeight="8" orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="#333"/></marker></defs>
<rect width="100%" height="100%" fill="white"/>
<text x="20" y="32" font-size="20" font-weight="bold">workflow {}</text>
<text x="20" y="54" font-size="13" fill="#555">{} services, {} steps; every arrow is allowed, everything else is denied</text>"##,
        esc(&wf.metadata.name),
        nodes.len(),
        wf.steps.len()
    );
    // Legend: actors.
    for (ai, a) in wf.actors.iter().enumerate() {
        let y = 80.0 + ai as f64 * 20.0;
        let _ = writeln!(
            out,
            r#"<rect x="20" y="{}" width="14" height="14" fill="{}"/><text x="40" y="{}" font-size="13">{}</text>"#,
            y - 11.0,
            PALETTE[ai % PALETTE.len()],
            y,
            esc(&a.name)
        );
    }
    // Arrows first, boxes on top.
    for s in &wf.steps {
        let (Some(a), Some(b)) = (index(&s.from), index(&s.to)) else {
            continue;
        };
        let ((x1, y1), (x2, y2)) = (pos(a), pos(b));
        let (dx, dy) = (x2 - x1, y2 - y1);
        let len = (dx * dx + dy * dy).sqrt().max(1.0);
        // Stop at the box edges (approximately: the boxes are wider than tall).
        let pad = |ux: f64, uy: f64| {
            let tx = if ux.abs() > 1e-9 {
                (bw / 2.0) / ux.abs()
            } else {
                f64::MAX
            };
            let ty = if uy.abs() > 1e-9 {
                (bh / 2.0) / uy.abs()
            } else {
                f64::MAX
            };
            tx.min(ty) + 4.0
        };
        let (ux, uy) = (dx / len, dy / len);
        let p = pad(ux, uy);
        let (sx, sy, ex, ey) = (x1 + ux * p, y1 + uy * p, x2 - ux * p, y2 - uy * p);
        let methods = if s.methods.is_empty() {
            "any method".to_owned()
        } else {
            s.methods.join(",")
        };
        let label = if !s.tcp.is_empty() {
            let ports: Vec<String> = s.tcp.iter().map(u16::to_string).collect();
            format!("TCP {}", ports.join(","))
        } else if s.paths.is_empty() {
            methods
        } else {
            format!("{methods} {}", s.paths.join(" "))
        };
        let (mx, my) = ((sx + ex) / 2.0 - uy * 12.0, (sy + ey) / 2.0 + ux * 12.0);
        let _ = writeln!(
            out,
            r##"<line x1="{sx:.1}" y1="{sy:.1}" x2="{ex:.1}" y2="{ey:.1}" stroke="#333" stroke-width="1.6" marker-end="url(#arrow)"/>
<text x="{mx:.1}" y="{my:.1}" font-size="11" text-anchor="middle" fill="#222">{}</text>"##,
            esc(&label)
        );
    }
    for (i, (name, actor)) in nodes.iter().enumerate() {
        let (x, y) = pos(i);
        let _ = writeln!(
            out,
            r##"<rect x="{:.1}" y="{:.1}" width="{bw}" height="{bh}" rx="8" fill="{}" stroke="#222"/>
<text x="{x:.1}" y="{:.1}" font-size="14" text-anchor="middle" fill="white" font-weight="bold">{}</text>"##,
            x - bw / 2.0,
            y - bh / 2.0,
            PALETTE[actor % PALETTE.len()],
            y + 5.0,
            esc(name)
        );
    }
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_service_and_step_is_drawn_and_names_are_escaped() {
        let wf = Workflow::from_yaml(
            "apiVersion: strait.dev/v1\nkind: Workflow\nmetadata: {name: m}\ntrustDomain: td\nactors:\n  - {name: a, services: [{name: x}, {name: y}]}\n  - {name: b, services: [{name: z}]}\nsteps:\n  - {from: x, to: y, methods: [POST], paths: [/api/y]}\n  - {from: y, to: z}\n  - {from: z, to: x, tcp: [5432]}\n",
        )
        .unwrap();
        let s = svg(&wf);
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
        assert_eq!(s.matches("<line ").count(), 3);
        assert_eq!(s.matches("rx=\"8\"").count(), 3);
        assert!(s.contains("POST /api/y") && s.contains("any method") && s.contains(">TCP 5432<"));
        assert!(!svg(&Workflow {
            metadata: crate::workflow::Metadata {
                name: "<x&y>".into()
            },
            ..wf
        })
        .contains("<x&y>"));
    }
}
