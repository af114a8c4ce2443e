//! An RGB canvas for the PNG plots, with text drawn from the 8×8 bitmap font of `font8x8`
//! (public-domain glyphs compiled into the binary), so PNGs carry their titles, ticks and
//! labels without a font library or system fonts (DESIGN §8b).

use font8x8::legacy::BASIC_LEGACY;

pub type Rgb = [u8; 3];

pub const BLACK: Rgb = [34, 34, 34];

/// Glyph cell of the font: 8 pixels wide and high.
pub const GLYPH: usize = 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Anchor {
    Start,
    Middle,
    End,
}

pub struct Canvas {
    pub width: usize,
    pub height: usize,
    pub px: Vec<u8>,
}

impl Canvas {
    pub fn new(width: usize, height: usize) -> Canvas {
        Canvas {
            width,
            height,
            px: vec![255; width * height * 3],
        }
    }

    /// Set one pixel; outside the canvas is ignored (labels near an edge are clipped).
    pub fn put(&mut self, x: i64, y: i64, c: Rgb) {
        if x >= 0 && y >= 0 && (x as usize) < self.width && (y as usize) < self.height {
            let i = (y as usize * self.width + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }

    pub fn fill_rect(&mut self, x: i64, y: i64, w: usize, h: usize, c: Rgb) {
        for dy in 0..h as i64 {
            for dx in 0..w as i64 {
                self.put(x + dx, y + dy, c);
            }
        }
    }

    /// Width in pixels of `s` at `scale`.
    pub fn text_width(s: &str, scale: usize) -> usize {
        s.chars().count() * GLYPH * scale
    }

    /// Horizontal text whose baseline box starts at `y` (top of the glyphs); `x` is the start,
    /// middle or end of the line according to `anchor`. A few symbols draw as their ASCII look-alikes
    /// (‖ → |, × → x, dashes → -), other non-ASCII characters as '?'.
    pub fn text(&mut self, x: i64, y: i64, s: &str, scale: usize, anchor: Anchor, c: Rgb) {
        let w = Self::text_width(s, scale) as i64;
        let x0 = match anchor {
            Anchor::Start => x,
            Anchor::Middle => x - w / 2,
            Anchor::End => x - w,
        };
        for (i, ch) in s.chars().enumerate() {
            let gx = x0 + (i * GLYPH * scale) as i64;
            self.glyph(ch, scale, c, |dx, dy| (gx + dx, y + dy));
        }
    }

    /// Text turned a quarter turn clockwise (read top to bottom, like SVG's `rotate(90)`): the
    /// line grows downward from `y` and its glyphs occupy columns `x - 8 * scale .. x`.
    pub fn text_down(&mut self, x: i64, y: i64, s: &str, scale: usize, c: Rgb) {
        for (i, ch) in s.chars().enumerate() {
            let gy = y + (i * GLYPH * scale) as i64;
            // Glyph pixel (dx, dy) goes to (x - dy, gy + dx): a clockwise quarter turn.
            self.glyph(ch, scale, c, |dx, dy| (x - 1 - dy, gy + dx));
        }
    }

    /// Text turned a quarter turn counter-clockwise (read bottom to top), centred on `y`.
    pub fn text_up(&mut self, x: i64, y: i64, s: &str, scale: usize, c: Rgb) {
        let len = Self::text_width(s, scale) as i64;
        let y0 = y + len / 2;
        for (i, ch) in s.chars().enumerate() {
            let gy = y0 - (i * GLYPH * scale) as i64;
            self.glyph(ch, scale, c, |dx, dy| (x + dy, gy - 1 - dx));
        }
    }

    fn glyph(&mut self, ch: char, scale: usize, c: Rgb, at: impl Fn(i64, i64) -> (i64, i64)) {
        let ch = match ch {
            c if c.is_ascii() => c,
            '‖' => '|',
            '→' => '>',
            '×' => 'x',
            '–' | '—' | '−' => '-',
            '≤' => '<',
            '≥' => '>',
            _ => '?',
        };
        let code = ch as usize;
        let rows = BASIC_LEGACY[code];
        for (ry, row) in rows.iter().enumerate() {
            for rx in 0..GLYPH {
                // font8x8 rows are little-endian: bit 0 is the leftmost pixel.
                if row >> rx & 1 == 1 {
                    for sy in 0..scale {
                        for sx in 0..scale {
                            let (x, y) = at((rx * scale + sx) as i64, (ry * scale + sy) as i64);
                            self.put(x, y, c);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ink(c: &Canvas) -> Vec<(usize, usize)> {
        (0..c.height)
            .flat_map(|y| (0..c.width).map(move |x| (x, y)))
            .filter(|&(x, y)| c.px[(y * c.width + x) * 3] != 255)
            .collect()
    }

    #[test]
    fn text_draws_inside_its_box_and_anchors_move_it() {
        let mut c = Canvas::new(64, 16);
        c.text(0, 0, "Hi", 1, Anchor::Start, BLACK);
        let p = ink(&c);
        assert!(!p.is_empty());
        assert!(p.iter().all(|&(x, y)| x < 16 && y < 8), "{p:?}");
        let mut e = Canvas::new(64, 16);
        e.text(64, 0, "Hi", 1, Anchor::End, BLACK);
        let q = ink(&e);
        assert_eq!(q.len(), p.len());
        assert!(q.iter().all(|&(x, _)| x >= 48));
    }

    #[test]
    fn rotated_text_has_the_same_ink_as_horizontal() {
        let mut h = Canvas::new(40, 40);
        h.text(0, 0, "K7", 2, Anchor::Start, BLACK);
        let mut d = Canvas::new(40, 40);
        d.text_down(20, 0, "K7", 2, BLACK);
        let mut u = Canvas::new(40, 40);
        u.text_up(0, 20, "K7", 2, BLACK);
        let n = ink(&h).len();
        assert!(n > 0);
        assert_eq!(ink(&d).len(), n);
        assert_eq!(ink(&u).len(), n);
        assert!(ink(&d).iter().all(|&(x, y)| x < 20 && y < 32));
    }

    #[test]
    fn clipping_and_non_ascii_do_not_panic() {
        let mut c = Canvas::new(10, 10);
        c.text(-5, -5, "é→x", 3, Anchor::Middle, BLACK);
        c.text_down(100, 100, "far", 1, BLACK);
    }
}
