//! Qwen2-VL image preprocessing, as the family's image processor does it: decode (PNG, JPEG,
//! WebP), `smart_resize` to multiples of patch × merge within a pixel budget, a bicubic
//! resize bit-exact with torchvision's (transformers 5) or Pillow's (transformers 4) 8-bit
//! arithmetic (fixed-point, two separable passes rounded to 8 bits each), rescale and CLIP normalisation in f32, the image repeated to the temporal patch, and
//! patches flattened in the processor's order. Checked against the reference processor's
//! `pixel_values` in tests/vision.rs.

use image::RgbImage;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot decode the image: {0}")]
    Decode(String),
    #[error("unsupported image format{0} (PNG, JPEG and WebP are read)")]
    Format(String),
    #[error("image of {width}×{height} pixels is too large (at most {max} per side)")]
    TooLarge {
        width: usize,
        height: usize,
        max: usize,
    },
    #[error("image of {width}×{height}: {reason}")]
    Shape {
        width: usize,
        height: usize,
        reason: String,
    },
}

/// Largest side accepted before decoding (the decoder's allocation is bounded by it).
pub const MAX_SIDE: usize = 16384;

/// OpenAI CLIP mean and standard deviation (the Qwen2-VL processor's normalisation).
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PreprocessConfig {
    pub patch_size: usize,
    pub merge_size: usize,
    pub temporal_patch_size: usize,
    pub min_pixels: usize,
    pub max_pixels: usize,
    /// Whose 8-bit bicubic arithmetic: transformers 5's processor resizes with torchvision,
    /// transformers 4's with Pillow (they differ by one step at a few pixels).
    pub resize: ResizeArithmetic,
}

impl Default for PreprocessConfig {
    /// Qwen2-VL's `preprocessor_config.json`: patches of 14, 2×2 merge, 2 frames, 56×56 to
    /// 12,845,056 pixels; torchvision's resize arithmetic (transformers 5).
    fn default() -> Self {
        PreprocessConfig {
            patch_size: 14,
            merge_size: 2,
            temporal_patch_size: 2,
            min_pixels: 56 * 56,
            max_pixels: 12_845_056,
            resize: ResizeArithmetic::Torch,
        }
    }
}

/// An image as the vision tower takes it: `grid` = (t, h, w) patches and `pixels` of
/// `t·h·w` rows of `3 · temporal · patch²` values (channel, frame, row, column).
#[derive(Debug, Clone, PartialEq)]
pub struct Patches {
    pub grid: [usize; 3],
    pub row_len: usize,
    pub pixels: Vec<f32>,
}

impl Patches {
    pub fn rows(&self) -> usize {
        self.grid.iter().product()
    }

    /// Tokens the image takes in the language model (patches / merge²).
    pub fn tokens(&self, merge_size: usize) -> usize {
        self.rows() / (merge_size * merge_size)
    }
}

/// Decode PNG/JPEG/WebP bytes to RGB, refusing images over `MAX_SIDE` per side before the
/// pixels are allocated.
pub fn decode(bytes: &[u8]) -> Result<RgbImage, ImageError> {
    let reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ImageError::Decode(e.to_string()))?;
    match reader.format() {
        Some(image::ImageFormat::Png | image::ImageFormat::Jpeg | image::ImageFormat::WebP) => {}
        Some(f) => return Err(ImageError::Format(format!(" {f:?}"))),
        None => return Err(ImageError::Format(String::new())),
    }
    let (w, h) = reader
        .into_dimensions()
        .map_err(|e| ImageError::Decode(e.to_string()))?;
    let (w, h) = (w as usize, h as usize);
    if w > MAX_SIDE || h > MAX_SIDE {
        return Err(ImageError::TooLarge {
            width: w,
            height: h,
            max: MAX_SIDE,
        });
    }
    let img = image::load_from_memory(bytes).map_err(|e| ImageError::Decode(e.to_string()))?;
    Ok(img.to_rgb8())
}

/// Python's `round` (half to even) of a non-negative ratio.
fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc() - 0.5).abs() < 1e-12 && r % 2.0 != 0.0 {
        r - 1.0
    } else {
        r
    }
}

/// The processor's `smart_resize`: (height, width) multiples of `factor`, with the pixel count
/// within `[min_pixels, max_pixels]` and the aspect ratio kept as well as that allows.
pub fn smart_resize(
    height: usize,
    width: usize,
    factor: usize,
    min_pixels: usize,
    max_pixels: usize,
) -> Result<(usize, usize), ImageError> {
    let shape = |reason: String| ImageError::Shape {
        width,
        height,
        reason,
    };
    if height < factor || width < factor {
        return Err(shape(format!("each side must be at least {factor} pixels")));
    }
    let ratio = height.max(width) as f64 / height.min(width) as f64;
    if ratio > 200.0 {
        return Err(shape(format!("aspect ratio {ratio:.0} is over 200")));
    }
    let (h, w, f) = (height as f64, width as f64, factor as f64);
    let mut h_bar = round_half_even(h / f) * f;
    let mut w_bar = round_half_even(w / f) * f;
    if h_bar * w_bar > max_pixels as f64 {
        let beta = (h * w / max_pixels as f64).sqrt();
        h_bar = f.max((h / beta / f).floor() * f);
        w_bar = f.max((w / beta / f).floor() * f);
    } else if h_bar * w_bar < min_pixels as f64 {
        let beta = (min_pixels as f64 / (h * w)).sqrt();
        h_bar = (h * beta / f).ceil() * f;
        w_bar = (w * beta / f).ceil() * f;
    }
    Ok((h_bar as usize, w_bar as usize))
}

/// Pillow's bicubic kernel (a = -0.5).
fn bicubic(x: f64) -> f64 {
    let a = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * a
    } else {
        0.0
    }
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// One pass's taps: per output pixel the first input pixel, the tap count and fixed-point
/// weights (`precompute_coeffs` + `normalize_coeffs_8bpc` of Pillow's Resample.c).
struct Taps {
    ksize: usize,
    bounds: Vec<(usize, usize)>,
    k: Vec<i64>,
    /// Fixed-point fraction bits of `k`.
    bits: u32,
}

/// Fixed-point weights of a pass: Pillow's `PRECISION_BITS`, or PyTorch's uint8
/// antialiased kernel's, which keeps each weight within an i16 (the most bits with
/// `round(max weight · 2^(bits+1)) < 2^15`, at most 22).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizeArithmetic {
    Pillow,
    Torch,
}

fn taps(in_size: usize, out_size: usize, arith: ResizeArithmetic) -> Taps {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut k = vec![0i64; out_size * ksize];
    let mut wf = vec![0f64; out_size * ksize];
    let mut w = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C casts truncate toward zero.
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) - xmin;
        let xmax = xmax.clamp(0, ksize as i64) as usize;
        w.iter_mut().for_each(|v| *v = 0.0);
        let mut ww = 0.0;
        for (x, wx) in w.iter_mut().enumerate().take(xmax) {
            *wx = bicubic((x as f64 + xmin as f64 - center + 0.5) * ss);
            ww += *wx;
        }
        if ww != 0.0 {
            w.iter_mut().take(xmax).for_each(|v| *v /= ww);
        }
        wf[xx * ksize..(xx + 1) * ksize].copy_from_slice(&w);
        bounds.push((xmin as usize, xmax));
    }
    let bits = match arith {
        ResizeArithmetic::Pillow => PRECISION_BITS,
        ResizeArithmetic::Torch => {
            let wmax = wf.iter().cloned().fold(0.0, f64::max);
            let mut b = 0;
            while b < 22 && ((0.5 + wmax * (1u64 << (b + 1)) as f64) as i64) < (1 << 15) {
                b += 1;
            }
            b
        }
    };
    for (kv, &wx) in k.iter_mut().zip(&wf) {
        let f = wx * (1u64 << bits) as f64;
        *kv = if wx < 0.0 {
            (f - 0.5) as i64
        } else {
            (f + 0.5) as i64
        };
    }
    Taps {
        ksize,
        bounds,
        k,
        bits,
    }
}

fn clip8(ss: i64, bits: u32) -> u8 {
    (ss >> bits).clamp(0, 255) as u8
}

/// Bicubic resize of an RGB image to `out_w × out_h`, bit-exact with Pillow's
/// `Image.resize(..., BICUBIC)`: horizontal pass, then vertical, each rounded to 8 bits; a
/// dimension that does not change skips its pass.
pub fn resize_bicubic(img: &RgbImage, out_w: usize, out_h: usize) -> RgbImage {
    resize_bicubic_with(img, out_w, out_h, ResizeArithmetic::Pillow)
}

/// [`resize_bicubic`] with the fixed-point weights of `arith` (the same passes and taps).
pub fn resize_bicubic_with(
    img: &RgbImage,
    out_w: usize,
    out_h: usize,
    arith: ResizeArithmetic,
) -> RgbImage {
    let (in_w, in_h) = (img.width() as usize, img.height() as usize);
    let mut src: Vec<u8> = img.as_raw().clone();
    let (mut cur_w, cur_h) = (in_w, in_h);
    if out_w != in_w {
        let t = taps(in_w, out_w, arith);
        let mut dst = vec![0u8; out_w * cur_h * 3];
        for y in 0..cur_h {
            for (xx, &(xmin, n)) in t.bounds.iter().enumerate() {
                let k = &t.k[xx * t.ksize..xx * t.ksize + n];
                for c in 0..3 {
                    let mut ss: i64 = 1 << (t.bits - 1);
                    for (x, &kx) in k.iter().enumerate() {
                        ss += src[(y * cur_w + xmin + x) * 3 + c] as i64 * kx;
                    }
                    dst[(y * out_w + xx) * 3 + c] = clip8(ss, t.bits);
                }
            }
        }
        src = dst;
        cur_w = out_w;
    }
    if out_h != cur_h {
        let t = taps(cur_h, out_h, arith);
        let mut dst = vec![0u8; cur_w * out_h * 3];
        for (yy, &(ymin, n)) in t.bounds.iter().enumerate() {
            let k = &t.k[yy * t.ksize..yy * t.ksize + n];
            for x in 0..cur_w {
                for c in 0..3 {
                    let mut ss: i64 = 1 << (t.bits - 1);
                    for (y, &ky) in k.iter().enumerate() {
                        ss += src[((ymin + y) * cur_w + x) * 3 + c] as i64 * ky;
                    }
                    dst[(yy * cur_w + x) * 3 + c] = clip8(ss, t.bits);
                }
            }
        }
        src = dst;
    }
    // The buffer holds exactly out_w × out_h RGB pixels.
    RgbImage::from_raw(out_w as u32, out_h as u32, src)
        .unwrap_or_else(|| RgbImage::new(out_w as u32, out_h as u32))
}

/// The whole processor: resize, rescale + normalise, repeat to the temporal patch, patchify.
pub fn preprocess(img: &RgbImage, cfg: &PreprocessConfig) -> Result<Patches, ImageError> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let factor = cfg.patch_size * cfg.merge_size;
    let (rh, rw) = smart_resize(h, w, factor, cfg.min_pixels, cfg.max_pixels)?;
    let resized;
    let img = if (rh, rw) != (h, w) {
        resized = resize_bicubic_with(img, rw, rh, cfg.resize);
        &resized
    } else {
        img
    };
    // Channels-first f32, as `rescale` (f64 multiply, then f32) and `normalize` (f32) do.
    let plane = rh * rw;
    let mut chw = vec![0f32; 3 * plane];
    for (i, px) in img.as_raw().chunks_exact(3).enumerate() {
        for c in 0..3 {
            let x = (px[c] as f64 * (1.0 / 255.0)) as f32;
            chw[c * plane + i] = (x - CLIP_MEAN[c]) / CLIP_STD[c];
        }
    }
    let (p, m, tp) = (cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size);
    let (gh, gw) = (rh / p, rw / p);
    let row_len = 3 * tp * p * p;
    let mut pixels = Vec::with_capacity(gh * gw * row_len);
    // Patch order (h block, w block, h in block, w in block); inside a patch (channel, frame,
    // row, column); a single image is every frame.
    for hb in 0..gh / m {
        for wb in 0..gw / m {
            for hm in 0..m {
                for wm in 0..m {
                    let (py, px) = ((hb * m + hm) * p, (wb * m + wm) * p);
                    for c in 0..3 {
                        for _frame in 0..tp {
                            for r in 0..p {
                                let at = c * plane + (py + r) * rw + px;
                                pixels.extend_from_slice(&chw[at..at + p]);
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(Patches {
        grid: [1, gh, gw],
        row_len,
        pixels,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smart_resize_matches_the_processor_on_known_sizes() {
        let f = 28;
        assert_eq!(smart_resize(56, 56, f, 3136, 50176).unwrap(), (56, 56));
        assert_eq!(smart_resize(75, 100, f, 3136, 50176).unwrap(), (84, 112));
        assert_eq!(smart_resize(200, 300, f, 3136, 50176).unwrap(), (168, 252));
        // 42 / 28 = 1.5 rounds to 2 (half to even), 70 / 28 = 2.5 rounds to 2.
        assert_eq!(smart_resize(42, 70, f, 28, 1 << 30).unwrap(), (56, 56));
        assert!(
            smart_resize(20, 100, f, 3136, 50176).is_err(),
            "side under 28"
        );
        assert!(
            smart_resize(28, 28 * 201, f, 28, 1 << 40).is_err(),
            "ratio over 200"
        );
    }

    #[test]
    fn resize_keeps_a_constant_image_and_identity_is_exact() {
        let img = RgbImage::from_pixel(37, 23, image::Rgb([200, 10, 99]));
        let r = resize_bicubic(&img, 61, 17);
        assert!(r.pixels().all(|p| p.0 == [200, 10, 99]));
        let noisy = RgbImage::from_fn(9, 7, |x, y| image::Rgb([(x * 29) as u8, (y * 31) as u8, 5]));
        assert_eq!(resize_bicubic(&noisy, 9, 7), noisy);
    }

    #[test]
    fn decode_refuses_unknown_bytes() {
        assert!(matches!(
            decode(b"not an image"),
            Err(ImageError::Format(_))
        ));
        let mut png = Vec::new();
        RgbImage::new(2, 2)
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        assert!(matches!(
            decode(&png[..png.len() / 2]),
            Err(ImageError::Decode(_))
        ));
        assert_eq!(decode(&png).unwrap().dimensions(), (2, 2));
    }
}
