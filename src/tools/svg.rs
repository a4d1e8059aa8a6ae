//! Small self-contained SVG charts for the tool's reports: a scatter of quality against memory,
//! and a heat map of retrieval accuracy. Plain strings, no dependencies, readable in a browser.

use std::fmt::Write;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// One labelled point.
pub struct Point {
    pub label: String,
    pub x: f64,
    pub y: f64,
}

/// Scatter plot with a linear x axis and a log10 y axis (KL divergences span decades); points
/// with y <= 0 sit on the bottom edge.
pub fn scatter_log_y(title: &str, x_label: &str, y_label: &str, points: &[Point]) -> String {
    let (w, h, left, right, top, bottom) = (760.0, 480.0, 80.0, 220.0, 50.0, 60.0);
    let (pw, ph) = (w - left - right, h - top - bottom);
    let x_max = points.iter().map(|p| p.x).fold(0.0f64, f64::max).max(1e-9) * 1.1;
    let pos: Vec<f64> = points.iter().map(|p| p.y).filter(|&y| y > 0.0).collect();
    let lo = pos.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = pos.iter().copied().fold(0.0f64, f64::max);
    let (y0, y1) = if pos.is_empty() { (-4.0, 0.0) } else { (lo.log10().floor(), hi.log10().ceil().max(lo.log10().floor() + 1.0)) };
    let sx = |x: f64| left + x / x_max * pw;
    let sy = |y: f64| if y <= 0.0 { top + ph } else { top + ph - (y.log10() - y0) / (y1 - y0) * ph };
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="24" text-anchor="middle" font-size="15">{}</text>
<line x1="{left}" y1="{}" x2="{}" y2="{}" stroke="black"/>
<line x1="{left}" y1="{top}" x2="{left}" y2="{}" stroke="black"/>
<text x="{}" y="{}" text-anchor="middle">{}</text>
<text x="18" y="{}" text-anchor="middle" transform="rotate(-90 18 {})">{}</text>
"#,
        w / 2.0,
        esc(title),
        top + ph,
        left + pw,
        top + ph,
        top + ph,
        left + pw / 2.0,
        h - 15.0,
        esc(x_label),
        top + ph / 2.0,
        top + ph / 2.0,
        esc(y_label)
    );
    for e in y0 as i32..=y1 as i32 {
        let y = sy(10f64.powi(e));
        let _ = writeln!(
            s,
            r##"<line x1="{left}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">1e{e}</text>"##,
            left + pw,
            left - 6.0,
            y + 4.0
        );
    }
    for i in 0..=5 {
        let xv = x_max * i as f64 / 5.0;
        let _ = writeln!(s, r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{:.0}%</text>"#, sx(xv), top + ph + 18.0, xv);
    }
    for p in points {
        let (x, y) = (sx(p.x), sy(p.y));
        let _ = writeln!(
            s,
            r##"<circle cx="{x:.1}" cy="{y:.1}" r="5" fill="#3465a4"/><text x="{:.1}" y="{:.1}">{}</text>"##,
            x + 8.0,
            y + 4.0,
            esc(&p.label)
        );
    }
    s.push_str("</svg>\n");
    s
}

/// Heat maps side by side, one per configuration: rows and columns labelled, cells shaded
/// from red (0) to green (1) with the value written in.
pub fn heat_maps(title: &str, row_label: &str, col_label: &str, rows: &[String], cols: &[String], maps: &[(String, Vec<Vec<f64>>)]) -> String {
    let cell = 44.0;
    let (left, top, gap) = (90.0, 70.0, 40.0);
    let map_w = cols.len() as f64 * cell;
    let w = left + maps.len() as f64 * (map_w + gap) + 20.0;
    let h = top + rows.len() as f64 * cell + 50.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w:.0}" height="{h:.0}" font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/><text x="{:.1}" y="22" text-anchor="middle" font-size="15">{}</text><text x="12" y="{:.1}" transform="rotate(-90 12 {:.1})" text-anchor="middle">{}</text>"#,
        w / 2.0,
        esc(title),
        top + rows.len() as f64 * cell / 2.0,
        top + rows.len() as f64 * cell / 2.0,
        esc(row_label)
    );
    for (m, (name, grid)) in maps.iter().enumerate() {
        let x0 = left + m as f64 * (map_w + gap);
        let _ = writeln!(s, r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#, x0 + map_w / 2.0, top - 28.0, esc(name));
        for (j, c) in cols.iter().enumerate() {
            let _ = writeln!(s, r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#, x0 + (j as f64 + 0.5) * cell, top - 8.0, esc(c));
        }
        for (i, r) in rows.iter().enumerate() {
            if m == 0 {
                let _ = writeln!(s, r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#, x0 - 6.0, top + (i as f64 + 0.6) * cell, esc(r));
            }
            for j in 0..cols.len() {
                let v = grid.get(i).and_then(|r| r.get(j)).copied().unwrap_or(f64::NAN);
                let (red, green) = if v.is_finite() { ((255.0 * (1.0 - v)) as u8, (200.0 * v) as u8) } else { (200, 200) };
                let _ = writeln!(
                    s,
                    r#"<rect x="{:.1}" y="{:.1}" width="{cell}" height="{cell}" fill="rgb({red},{green},60)" stroke="white"/><text x="{:.1}" y="{:.1}" text-anchor="middle" fill="white">{}</text>"#,
                    x0 + j as f64 * cell,
                    top + i as f64 * cell,
                    x0 + (j as f64 + 0.5) * cell,
                    top + (i as f64 + 0.6) * cell,
                    if v.is_finite() { format!("{v:.2}") } else { "-".into() }
                );
            }
        }
        let _ = writeln!(s, r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#, x0 + map_w / 2.0, top + rows.len() as f64 * cell + 22.0, esc(col_label));
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_well_formed_and_escape_labels() {
        let pts = vec![
            Point { label: "stock <f16>".into(), x: 100.0, y: 0.0 },
            Point { label: "hc 12.5".into(), x: 12.5, y: 0.03 },
            Point { label: "q8".into(), x: 53.0, y: 0.0015 },
        ];
        let s = scatter_log_y("t", "x", "y", &pts);
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
        assert!(s.contains("stock &lt;f16&gt;") && !s.contains("<f16>"));
        assert_eq!(s.matches("<circle").count(), 3);
        assert!(!s.contains("NaN") && !s.contains("inf"));
        let h = heat_maps("n", "len", "depth", &["1k".into()], &["0.1".into(), "0.9".into()], &[("a".into(), vec![vec![1.0, 0.0]])]);
        assert_eq!(h.matches("<rect").count(), 3, "background and two cells");
        assert!(h.contains("1.00") && h.contains("0.00"));
    }
}
