//! Labelled scatter plots (the Pareto plot of `eval`, the proxy check's scatter) and line
//! series (`bench serve`'s timeline): an SVG with axes, ticks, point labels and a legend of the
//! lines, and a PNG of the same plot (text in an 8×8 bitmap font: no
//! font library, DESIGN §8b), encoded by the heatmaps' PNG writer.

use crate::calibrate::plot::encode_png;
use crate::raster::{Anchor, Canvas, BLACK};
use crate::util::write_atomic;
use std::fmt::Write as _;
use std::path::Path;

#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub x: f64,
    pub y: f64,
    pub label: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Scatter {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub log_x: bool,
    pub log_y: bool,
    pub points: Vec<Point>,
    /// Polylines, each in its own colour with its label in the legend.
    pub lines: Vec<Line>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// Line colours (SVG and PNG), in series order.
const PALETTE: [[u8; 3]; 6] = [
    [59, 82, 139],
    [214, 96, 77],
    [33, 145, 140],
    [153, 112, 171],
    [230, 171, 2],
    [102, 102, 102],
];

fn hex(c: [u8; 3]) -> String {
    format!("#{:02x}{:02x}{:02x}", c[0], c[1], c[2])
}

const W: usize = 720;
const H: usize = 460;
const LEFT: usize = 80;
const RIGHT: usize = 30;
const TOP: usize = 40;
const BOTTOM: usize = 60;

/// Axis in plotted units (log10 on a log axis).
#[derive(Debug, Clone, Copy)]
struct Axis {
    lo: f64,
    hi: f64,
    log: bool,
}

impl Axis {
    fn of(values: impl Iterator<Item = f64>, log: bool) -> Axis {
        let v: Vec<f64> = values
            .filter_map(|x| tr(x, log))
            .filter(|x| x.is_finite())
            .collect();
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        if !lo.is_finite() {
            return Axis {
                lo: 0.0,
                hi: 1.0,
                log,
            };
        }
        let pad = if hi > lo { 0.08 * (hi - lo) } else { 0.5 };
        Axis {
            lo: lo - pad,
            hi: hi + pad,
            log,
        }
    }

    /// Tick positions (plotted units) and their labels: decades on a log axis, then 1-2-5
    /// steps when fewer than two decades are in view, then plain value ticks.
    fn ticks(&self) -> Vec<(f64, String)> {
        if !self.log {
            return linear_ticks(self.lo, self.hi);
        }
        let (a, b) = (self.lo.floor() as i64, self.hi.ceil() as i64);
        let inside = |t: &(f64, String)| t.0 >= self.lo - 1e-12 && t.0 <= self.hi + 1e-12;
        let every = ((b - a) / 8 + 1).max(1);
        let decades: Vec<(f64, String)> = (a..=b)
            .filter(|e| (e - a) % every == 0)
            .map(|e| (e as f64, format!("1e{e}")))
            .filter(inside)
            .collect();
        if decades.len() >= 2 {
            return decades;
        }
        let steps: Vec<(f64, String)> = (a..=b)
            .flat_map(|e| {
                [1u32, 2, 5].map(|m| (f64::from(m).log10() + e as f64, format!("{m}e{e}")))
            })
            .filter(inside)
            .collect();
        if steps.len() >= 2 {
            return steps;
        }
        linear_ticks(10f64.powf(self.lo), 10f64.powf(self.hi))
            .into_iter()
            .filter(|(v, _)| *v > 0.0)
            .map(|(v, l)| (v.log10(), l))
            .collect()
    }
}

/// About six ticks at 1-2-5 steps over [lo, hi], labelled with the step's decimals.
fn linear_ticks(lo: f64, hi: f64) -> Vec<(f64, String)> {
    let raw = (hi - lo) / 6.0;
    if !(raw > 0.0 && raw.is_finite()) {
        return Vec::new();
    }
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let decimals = (-step.log10().floor()).max(0.0) as usize;
    let first = (lo / step).ceil() as i64;
    (first..)
        .map(|i| i as f64 * step)
        .take_while(|t| *t <= hi + 1e-9 * step)
        .map(|t| (t, format!("{t:.decimals$}")))
        .collect()
}

fn tr(x: f64, log: bool) -> Option<f64> {
    if log {
        (x > 0.0).then(|| x.log10())
    } else {
        Some(x)
    }
}

fn px(axis: &Axis, v: f64, from: f64, len: f64) -> f64 {
    from + (v - axis.lo) / (axis.hi - axis.lo) * len
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Plot positions of the points and line vertices that can be drawn (positive values on log
/// axes).
type Placed<'a> = (
    Axis,
    Axis,
    Vec<(f64, f64, &'a str)>,
    Vec<(&'a str, Vec<(f64, f64)>)>,
);

fn placed(s: &Scatter) -> Placed<'_> {
    let ok = |x: f64, y: f64| {
        let (x, y) = (tr(x, s.log_x)?, tr(y, s.log_y)?);
        (x.is_finite() && y.is_finite()).then_some((x, y))
    };
    let drawable: Vec<(f64, f64, &str)> = s
        .points
        .iter()
        .filter_map(|p| ok(p.x, p.y).map(|_| (p.x, p.y, p.label.as_str())))
        .collect();
    let vertices: Vec<(&str, Vec<(f64, f64)>)> = s
        .lines
        .iter()
        .map(|l| {
            let v = l.points.iter().filter(|p| ok(p.0, p.1).is_some());
            (l.label.as_str(), v.copied().collect())
        })
        .collect();
    let all_x = drawable
        .iter()
        .map(|p| p.0)
        .chain(vertices.iter().flat_map(|l| l.1.iter().map(|p| p.0)));
    let all_y = drawable
        .iter()
        .map(|p| p.1)
        .chain(vertices.iter().flat_map(|l| l.1.iter().map(|p| p.1)));
    let ax = Axis::of(all_x, s.log_x);
    let ay = Axis::of(all_y, s.log_y);
    let (pw, ph) = ((W - LEFT - RIGHT) as f64, (H - TOP - BOTTOM) as f64);
    let at = |x: f64, y: f64| {
        let (x, y) = (tr(x, s.log_x)?, tr(y, s.log_y)?);
        Some((
            px(&ax, x, LEFT as f64, pw),
            px(&ay, y, (H - BOTTOM) as f64, -ph),
        ))
    };
    let pts = drawable
        .into_iter()
        .filter_map(|(x, y, label)| at(x, y).map(|(x, y)| (x, y, label)))
        .collect();
    let lines = vertices
        .into_iter()
        .map(|(label, v)| (label, v.into_iter().filter_map(|(x, y)| at(x, y)).collect()))
        .collect();
    (ax, ay, pts, lines)
}

pub fn svg(s: &Scatter) -> String {
    let (ax, ay, pts, lines) = placed(s);
    let (pw, ph) = ((W - LEFT - RIGHT) as f64, (H - TOP - BOTTOM) as f64);
    let mut o = String::new();
    let _ = writeln!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(o, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        o,
        r#"<text x="{}" y="20" font-size="13" text-anchor="middle">{}</text>"#,
        W / 2,
        escape(&s.title)
    );
    let _ = writeln!(
        o,
        r##"<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>"##
    );
    for (t, label) in ax.ticks() {
        let x = px(&ax, t, LEFT as f64, pw);
        let _ = writeln!(
            o,
            r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{}" stroke="#ddd"/><text x="{x:.1}" y="{}" text-anchor="middle">{label}</text>"##,
            H - BOTTOM,
            H - BOTTOM + 16
        );
    }
    for (t, label) in ay.ticks() {
        let y = px(&ay, t, (H - BOTTOM) as f64, -ph);
        let _ = writeln!(
            o,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{label}</text>"##,
            W - RIGHT,
            LEFT - 6,
            y + 4.0
        );
    }
    let _ = writeln!(
        o,
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
        LEFT as f64 + pw / 2.0,
        H - 18,
        escape(&s.x_label)
    );
    let _ = writeln!(
        o,
        r#"<text transform="translate(18,{}) rotate(-90)" text-anchor="middle">{}</text>"#,
        TOP as f64 + ph / 2.0,
        escape(&s.y_label)
    );
    for (x, y, label) in pts {
        // Labels of points in the right third go to their left, inside the frame.
        let (lx, anchor) = if x > LEFT as f64 + 2.0 * pw / 3.0 {
            (x - 6.0, "end")
        } else {
            (x + 6.0, "start")
        };
        let _ = writeln!(
            o,
            r##"<circle cx="{x:.1}" cy="{y:.1}" r="4" fill="#3b528b"><title>{l}</title></circle><text x="{lx:.1}" y="{:.1}" font-size="10" text-anchor="{anchor}">{l}</text>"##,
            y - 5.0,
            l = escape(label)
        );
    }
    for (i, (label, v)) in lines.iter().enumerate() {
        let c = hex(PALETTE[i % PALETTE.len()]);
        let path: Vec<String> = v.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
        let _ = writeln!(
            o,
            r#"<polyline points="{}" fill="none" stroke="{c}" stroke-width="2"><title>{l}</title></polyline>"#,
            path.join(" "),
            l = escape(label)
        );
        // Legend: top left, one row per line.
        let ly = TOP as f64 + 14.0 + 14.0 * i as f64;
        let lx = LEFT as f64 + 10.0;
        let _ = writeln!(
            o,
            r#"<line x1="{lx:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="{c}" stroke-width="3"/><text x="{:.1}" y="{ly:.1}">{}</text>"#,
            ly - 4.0,
            lx + 18.0,
            ly - 4.0,
            lx + 24.0,
            escape(label)
        );
    }
    o.push_str("</svg>\n");
    o
}

/// RGB pixels of the SVG's plot: frame, grid lines, points, title, ticks and labels.
pub fn raster(s: &Scatter) -> Vec<u8> {
    let (ax, ay, pts, lines) = placed(s);
    let (pw, ph) = ((W - LEFT - RIGHT) as f64, (H - TOP - BOTTOM) as f64);
    let mut cv = Canvas::new(W, H);
    let grid = [221, 221, 221];
    for (t, label) in ax.ticks() {
        let x = px(&ax, t, LEFT as f64, pw).round() as i64;
        cv.fill_rect(x, TOP as i64, 1, H - BOTTOM - TOP + 1, grid);
        cv.text(x, (H - BOTTOM + 8) as i64, &label, 1, Anchor::Middle, BLACK);
    }
    for (t, label) in ay.ticks() {
        let y = px(&ay, t, (H - BOTTOM) as f64, -ph).round() as i64;
        cv.fill_rect(LEFT as i64, y, W - RIGHT - LEFT + 1, 1, grid);
        cv.text(LEFT as i64 - 6, y - 4, &label, 1, Anchor::End, BLACK);
    }
    let frame = [68, 68, 68];
    let (fw, fh) = (W - RIGHT - LEFT + 1, H - BOTTOM - TOP + 1);
    cv.fill_rect(LEFT as i64, TOP as i64, fw, 1, frame);
    cv.fill_rect(LEFT as i64, (H - BOTTOM) as i64, fw, 1, frame);
    cv.fill_rect(LEFT as i64, TOP as i64, 1, fh, frame);
    cv.fill_rect((W - RIGHT) as i64, TOP as i64, 1, fh, frame);
    cv.text((W / 2) as i64, 10, &s.title, 1, Anchor::Middle, BLACK);
    cv.text(
        (LEFT as f64 + pw / 2.0) as i64,
        (H - 26) as i64,
        &s.x_label,
        1,
        Anchor::Middle,
        BLACK,
    );
    cv.text_up(8, (TOP as f64 + ph / 2.0) as i64, &s.y_label, 1, BLACK);
    let dot = [59, 82, 139];
    for (x, y, label) in pts {
        let (cx, cy) = (x.round() as i64, y.round() as i64);
        for dy in -4i64..=4 {
            for dx in -4i64..=4 {
                if dx * dx + dy * dy <= 16 {
                    cv.put(cx + dx, cy + dy, dot);
                }
            }
        }
        // As in the SVG: labels of points in the right third go to their left.
        let (lx, anchor) = if x > LEFT as f64 + 2.0 * pw / 3.0 {
            (cx - 6, Anchor::End)
        } else {
            (cx + 6, Anchor::Start)
        };
        cv.text(lx, cy - 13, label, 1, anchor, BLACK);
    }
    for (i, (label, v)) in lines.iter().enumerate() {
        let c = PALETTE[i % PALETTE.len()];
        for w in v.windows(2) {
            segment(&mut cv, w[0], w[1], c);
        }
        let ly = TOP as i64 + 10 + 14 * i as i64;
        let lx = LEFT as i64 + 10;
        cv.fill_rect(lx, ly - 1, 18, 3, c);
        cv.text(lx + 24, ly - 4, label, 1, Anchor::Start, BLACK);
    }
    cv.px
}

/// A 2-pixel-wide straight segment from `a` to `b`.
fn segment(cv: &mut Canvas, a: (f64, f64), b: (f64, f64), c: [u8; 3]) {
    let steps = (b.0 - a.0).abs().max((b.1 - a.1).abs()).ceil().max(1.0) as i64;
    for k in 0..=steps {
        let t = k as f64 / steps as f64;
        let x = (a.0 + t * (b.0 - a.0)).round() as i64;
        let y = (a.1 + t * (b.1 - a.1)).round() as i64;
        cv.fill_rect(x, y, 2, 2, c);
    }
}

/// Write the SVG and the PNG atomically.
pub fn write(s: &Scatter, svg_path: &Path, png_path: &Path) -> std::io::Result<()> {
    let text = svg(s);
    write_atomic(svg_path, |w| w.write_all(text.as_bytes()))?;
    let png = encode_png(W, H, &raster(s))?;
    write_atomic(png_path, |w| w.write_all(&png))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Scatter {
        Scatter {
            title: "t".into(),
            x_label: "bits".into(),
            y_label: "KL".into(),
            log_x: false,
            log_y: true,
            points: vec![
                Point {
                    x: 2.5,
                    y: 1e-2,
                    label: "int2 <a>".into(),
                },
                Point {
                    x: 4.5,
                    y: 1e-4,
                    label: "int4".into(),
                },
                Point {
                    x: 16.0,
                    y: 0.0,
                    label: "zero".into(),
                },
            ],
            lines: Vec::new(),
        }
    }

    /// Lines: one polyline and one legend entry each, in its own colour; vertices that cannot
    /// sit on a log axis are left out; the axes cover every line.
    #[test]
    fn lines_are_drawn_with_a_legend() {
        let s = Scatter {
            title: "timeline".into(),
            x_label: "s".into(),
            y_label: "tok/s".into(),
            log_x: false,
            log_y: true,
            points: Vec::new(),
            lines: vec![
                Line {
                    label: "bf16".into(),
                    points: vec![(10.0, 100.0), (20.0, 0.0), (30.0, 500.0)],
                },
                Line {
                    label: "profile".into(),
                    points: vec![(10.0, 50.0), (20.0, 2000.0)],
                },
            ],
        };
        let svg = svg(&s);
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains(">bf16<") && svg.contains(">profile<"));
        assert!(svg.contains(&hex(PALETTE[0])) && svg.contains(&hex(PALETTE[1])));
        let (_, ay, _, lines) = placed(&s);
        assert_eq!(lines[0].1.len(), 2, "the zero is dropped");
        assert!(ay.lo <= 50f64.log10() && ay.hi >= 2000f64.log10());
        // The higher rate is drawn higher (y grows downwards).
        assert!(lines[1].1[1].1 < lines[1].1[0].1);
        let px = raster(&s);
        assert_eq!(px.len(), W * H * 3);
        assert!(
            px.chunks(3).any(|c| c == PALETTE[1]),
            "the second line is drawn"
        );
    }

    #[test]
    fn svg_labels_points_and_log_ticks() {
        let s = svg(&sample());
        assert!(s.contains("int2 &lt;a&gt;") && s.contains(">int4<"));
        // Zero cannot sit on a log axis: it is left out, not drawn at a made-up place.
        assert!(!s.contains(">zero<"));
        assert!(s.contains(">1e-3<"), "{s}");
        assert_eq!(s.matches("<circle").count(), 2);
    }

    #[test]
    fn higher_kl_is_drawn_higher() {
        let s = sample();
        let (_, _, pts, _) = placed(&s);
        assert!(pts[0].1 < pts[1].1, "y grows downwards: {pts:?}");
        assert!(pts[0].0 < pts[1].0);
        assert_eq!(raster(&sample()).len(), W * H * 3);
    }

    #[test]
    fn tick_labels_are_round_and_narrow_log_axes_still_get_ticks() {
        let lin = Axis {
            lo: 4.08,
            hi: 4.38,
            log: false,
        };
        let labels: Vec<String> = lin.ticks().into_iter().map(|t| t.1).collect();
        assert_eq!(labels, ["4.10", "4.15", "4.20", "4.25", "4.30", "4.35"]);
        // 0.21 .. 0.45: no decade and one 1-2-5 step in view, so value ticks.
        let log = Axis {
            lo: 0.21f64.log10(),
            hi: 0.45f64.log10(),
            log: true,
        };
        let t = log.ticks();
        assert!(t.len() >= 2, "{t:?}");
        assert!(t.iter().all(|(p, _)| *p >= log.lo && *p <= log.hi));
        let wide = Axis {
            lo: -4.2,
            hi: -0.1,
            log: true,
        };
        let w: Vec<String> = wide.ticks().into_iter().map(|t| t.1).collect();
        assert_eq!(w, ["1e-4", "1e-3", "1e-2", "1e-1"]);
    }

    #[test]
    fn png_carries_the_labels() {
        let mut s = sample();
        let blank = raster(&s);
        s.title = "a title".into();
        assert_ne!(raster(&s), blank, "the title is drawn");
    }
}
