//! Heatmaps of the sensitivity table (layer × tag, log10 distortion, keys and values side
//! by side at the lowest bit width): a labelled SVG and a PNG of the same grid and labels.

use super::table::SensitivityTable;
use super::CalibrateError;
use crate::raster::{Anchor, Canvas, BLACK, GLYPH};
use crate::tags::Tag;
use crate::util::write_atomic;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write;
use std::path::Path;

/// One panel: rows = layers, columns = tags, cells = log10 distortion (None = no data).
struct Grid {
    title: String,
    tags: Vec<Tag>,
    layers: usize,
    cells: Vec<Option<f64>>,
}

fn grids(t: &SensitivityTable) -> Vec<Grid> {
    let Some(bits) = t.rows.iter().map(|r| r.bits).min() else {
        return Vec::new();
    };
    let layers = t.rows.iter().map(|r| r.layer).max().map_or(0, |m| m + 1);
    let mut tags: Vec<Tag> = t.rows.iter().map(|r| r.tag).collect();
    tags.sort();
    tags.dedup();
    ["k", "v"]
        .into_iter()
        .map(|kv| {
            let mut cells = vec![None; layers * tags.len()];
            let col: BTreeMap<Tag, usize> = tags.iter().enumerate().map(|(i, t)| (*t, i)).collect();
            for r in t.rows.iter().filter(|r| r.kv == kv && r.bits == bits) {
                if let Some(&c) = col.get(&r.tag) {
                    if r.distortion > 0.0 {
                        cells[r.layer * tags.len() + c] = Some(r.distortion.log10());
                    }
                }
            }
            Grid {
                title: format!(
                    "{} INT{bits}: log10 distortion",
                    if kv == "k" { "keys" } else { "values" }
                ),
                tags: tags.clone(),
                layers,
                cells,
            }
        })
        .collect()
}

/// Viridis-like colour for `x` in [0, 1].
fn color(x: f64) -> [u8; 3] {
    const STOPS: [[f64; 3]; 5] = [
        [68.0, 1.0, 84.0],
        [59.0, 82.0, 139.0],
        [33.0, 145.0, 140.0],
        [94.0, 201.0, 98.0],
        [253.0, 231.0, 37.0],
    ];
    let x = x.clamp(0.0, 1.0) * 4.0;
    let i = (x.floor() as usize).min(3);
    let f = x - i as f64;
    let mut c = [0u8; 3];
    for (j, out) in c.iter_mut().enumerate() {
        *out = (STOPS[i][j] + (STOPS[i + 1][j] - STOPS[i][j]) * f).round() as u8;
    }
    c
}

fn range(cells: &[Option<f64>]) -> (f64, f64) {
    let v: Vec<f64> = cells.iter().flatten().copied().collect();
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if lo.is_finite() && hi > lo {
        (lo, hi)
    } else {
        (lo.min(0.0), lo.min(0.0) + 1.0)
    }
}

const CELL_W: usize = 14;
const CELL_H: usize = 10;

fn svg(gs: &[Grid]) -> String {
    let (left, top, label_h, gap) = (40usize, 30usize, 170usize, 60usize);
    let panel_w = |g: &Grid| g.tags.len() * CELL_W;
    let width = left + gs.iter().map(|g| panel_w(g) + gap).sum::<usize>() + 40;
    let height = top + gs.iter().map(|g| g.layers).max().unwrap_or(0) * CELL_H + label_h;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="9">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let mut x0 = left;
    for g in gs {
        let (lo, hi) = range(&g.cells);
        let _ = writeln!(
            s,
            r#"<text x="{x0}" y="16" font-size="11">{} (range {lo:.1} .. {hi:.1})</text>"#,
            g.title
        );
        for l in 0..g.layers {
            let y = top + l * CELL_H;
            if l % 5 == 0 {
                let _ = writeln!(
                    s,
                    r#"<text x="{}" y="{}" text-anchor="end">L{l}</text>"#,
                    x0 - 3,
                    y + CELL_H - 1
                );
            }
            for (c, tag) in g.tags.iter().enumerate() {
                let x = x0 + c * CELL_W;
                let fill = match g.cells[l * g.tags.len() + c] {
                    Some(v) => {
                        let [r, gg, b] = color((v - lo) / (hi - lo));
                        format!("rgb({r},{gg},{b})")
                    }
                    None => "#ddd".into(),
                };
                let _ = writeln!(
                    s,
                    r#"<rect x="{x}" y="{y}" width="{CELL_W}" height="{CELL_H}" fill="{fill}"><title>layer {l} {tag}</title></rect>"#
                );
            }
        }
        let yb = top + g.layers * CELL_H + 4;
        for (c, tag) in g.tags.iter().enumerate() {
            let x = x0 + c * CELL_W + CELL_W / 2;
            let _ = writeln!(
                s,
                r#"<text transform="translate({x},{yb}) rotate(90)">{tag}</text>"#
            );
        }
        x0 += panel_w(g) + gap;
    }
    s.push_str("</svg>\n");
    s
}

/// RGB raster of the panels side by side: the SVG's geometry and labels, in the 8×8 font.
fn raster(gs: &[Grid]) -> (usize, usize, Vec<u8>) {
    let (left, top, gap) = (40usize, 30usize, 60usize);
    let longest = gs
        .iter()
        .flat_map(|g| g.tags.iter().map(|t| t.to_string().chars().count()))
        .max()
        .unwrap_or(0);
    let label_h = longest * GLYPH + 12;
    // A panel is as wide as its cells or its title, whichever is wider.
    let panel_w = |g: &Grid| (g.tags.len() * CELL_W).max(Canvas::text_width(&title(g), 1));
    let width = left + gs.iter().map(|g| panel_w(g) + gap).sum::<usize>();
    let height = top + gs.iter().map(|g| g.layers).max().unwrap_or(0) * CELL_H + label_h;
    let mut cv = Canvas::new(width, height);
    let mut x0 = left;
    for g in gs {
        let (lo, hi) = range(&g.cells);
        cv.text(x0 as i64, 8, &title(g), 1, Anchor::Start, BLACK);
        // Colour bar from the range's low (left) to its high (right) end.
        for i in 0..120 {
            cv.fill_rect((x0 + i) as i64, 19, 1, 6, color(i as f64 / 119.0));
        }
        for l in 0..g.layers {
            let y = top + l * CELL_H;
            if l % 5 == 0 {
                cv.text(
                    x0 as i64 - 3,
                    y as i64 + 1,
                    &format!("L{l}"),
                    1,
                    Anchor::End,
                    BLACK,
                );
            }
            for c in 0..g.tags.len() {
                let rgb = match g.cells[l * g.tags.len() + c] {
                    Some(v) => color((v - lo) / (hi - lo)),
                    None => [221, 221, 221],
                };
                let x = x0 + c * CELL_W;
                cv.fill_rect(x as i64, y as i64, CELL_W - 1, CELL_H - 1, rgb);
            }
        }
        let yb = top + g.layers * CELL_H + 4;
        for (c, tag) in g.tags.iter().enumerate() {
            let x = x0 + c * CELL_W + CELL_W / 2 + GLYPH / 2;
            cv.text_down(x as i64, yb as i64, &tag.to_string(), 1, BLACK);
        }
        x0 += panel_w(g) + gap;
    }
    (width, height, cv.px)
}

fn title(g: &Grid) -> String {
    let (lo, hi) = range(&g.cells);
    format!("{} (range {lo:.1} .. {hi:.1})", g.title)
}

fn png_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let mut h = crc32fast::Hasher::new();
    h.update(kind);
    h.update(data);
    out.extend_from_slice(&h.finalize().to_be_bytes());
}

/// Encode 8-bit RGB pixels as a PNG.
pub fn encode_png(width: usize, height: usize, rgb: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut raw = Vec::with_capacity(height * (width * 3 + 1));
    for row in rgb.chunks(width * 3) {
        raw.push(0); // filter: none
        raw.extend_from_slice(row);
    }
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    z.write_all(&raw)?;
    let idat = z.finish()?;
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&(width as u32).to_be_bytes());
    ihdr.extend_from_slice(&(height as u32).to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    png_chunk(&mut out, b"IHDR", &ihdr);
    png_chunk(&mut out, b"IDAT", &idat);
    png_chunk(&mut out, b"IEND", &[]);
    Ok(out)
}

/// Write `DIR/heatmap.svg` and `DIR/heatmap.png`, atomically.
pub fn write_heatmaps(t: &SensitivityTable, dir: &Path) -> Result<(), CalibrateError> {
    let gs = grids(t);
    let svg_path = dir.join("heatmap.svg");
    let text = svg(&gs);
    write_atomic(&svg_path, |w| w.write_all(text.as_bytes())).map_err(|source| {
        CalibrateError::Io {
            path: svg_path.clone(),
            source,
        }
    })?;
    let png_path = dir.join("heatmap.png");
    let (w, h, px) = raster(&gs);
    let bytes = encode_png(w, h, &px).map_err(|source| CalibrateError::Io {
        path: png_path.clone(),
        source,
    })?;
    write_atomic(&png_path, |out| out.write_all(&bytes)).map_err(|source| CalibrateError::Io {
        path: png_path.clone(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_has_a_valid_header_and_chunks() {
        let png = encode_png(2, 1, &[255, 0, 0, 0, 255, 0]).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        assert_eq!(&png[12..16], b"IHDR");
        assert_eq!(u32::from_be_bytes([png[16], png[17], png[18], png[19]]), 2);
        assert_eq!(&png[png.len() - 8..png.len() - 4], b"IEND");
        // The IHDR CRC covers its type and data.
        let crc = crc32fast::hash(&png[12..29]);
        assert_eq!(
            u32::from_be_bytes([png[29], png[30], png[31], png[32]]),
            crc
        );
    }

    #[test]
    fn colour_map_ends() {
        assert_eq!(color(0.0), [68, 1, 84]);
        assert_eq!(color(1.0), [253, 231, 37]);
        assert_eq!(color(7.0), color(1.0));
    }
}
