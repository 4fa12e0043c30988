//! Image tensors (`[B, H, W, 3]` float32 in 0..1, like ComfyUI's `IMAGE`), real PNG encoding and
//! decoding, and torch's `str(tensor)` for `execution_error.current_inputs`.

use std::io::Cursor;
use std::sync::Arc;

/// An `IMAGE` batch.
#[derive(Clone, Debug)]
pub(crate) struct Image {
    pub(crate) batch: usize,
    pub(crate) h: usize,
    pub(crate) w: usize,
    pub(crate) data: ImgData,
}

/// Pixel storage: a solid colour costs nothing at any size (EmptyImage → ImageScale 8192²).
#[derive(Clone, Debug)]
pub(crate) enum ImgData {
    Solid([f32; 3]),
    /// Interleaved `[b][y][x][c]`, `batch * h * w * 3` values.
    Pixels(Arc<Vec<f32>>),
}

/// Largest pixel buffer the simulator materialises (solid colours have no limit).
const MAX_PIXELS: usize = 4096 * 4096;

/// A `MASK` (`[B, H, W]`); only carried around, no built-in node consumes it.
#[derive(Clone, Debug)]
pub(crate) struct Mask {
    pub(crate) h: usize,
    pub(crate) w: usize,
}

impl Image {
    /// `EmptyImage`: `color` is `0xRRGGBB`; channels are `c / 255` rounded to float32.
    pub(crate) fn empty(batch: usize, w: usize, h: usize, color: i64) -> Image {
        let ch = |shift: i64| (((color >> shift) & 0xFF) as f64 / 255.0) as f32;
        Image {
            batch,
            h,
            w,
            data: ImgData::Solid([ch(16), ch(8), ch(0)]),
        }
    }

    fn px(&self, b: usize, y: usize, x: usize) -> [f32; 3] {
        match &self.data {
            ImgData::Solid(c) => *c,
            ImgData::Pixels(p) => {
                let i = ((b * self.h + y) * self.w + x) * 3;
                [p[i], p[i + 1], p[i + 2]]
            }
        }
    }

    /// `ImageInvert`: `1.0 - image` in float32.
    pub(crate) fn invert(&self) -> Image {
        let data = match &self.data {
            ImgData::Solid(c) => ImgData::Solid([1.0 - c[0], 1.0 - c[1], 1.0 - c[2]]),
            ImgData::Pixels(p) => ImgData::Pixels(Arc::new(p.iter().map(|v| 1.0 - v).collect())),
        };
        Image {
            data,
            ..self.clone()
        }
    }

    /// `ImageScale` (nearest neighbour for every method; `crop = "center"` keeps the aspect).
    pub(crate) fn scale(
        &self,
        width: usize,
        height: usize,
        crop_center: bool,
    ) -> Result<Image, String> {
        if width == 0 && height == 0 {
            return Ok(self.clone());
        }
        let (mut w, mut h) = (width, height);
        if w == 0 {
            w = ((self.w as f64 * h as f64 / self.h.max(1) as f64).round() as usize).max(1);
        } else if h == 0 {
            h = ((self.h as f64 * w as f64 / self.w.max(1) as f64).round() as usize).max(1);
        }
        match &self.data {
            ImgData::Solid(c) => Ok(Image {
                batch: self.batch,
                h,
                w,
                data: ImgData::Solid(*c),
            }),
            ImgData::Pixels(_) => {
                if self.batch * w * h > MAX_PIXELS {
                    return Err(format!(
                        "comfyui_sim: refusing to materialise a {}x{}x{} image",
                        self.batch, h, w
                    ));
                }
                // Source window (center crop keeps the target aspect ratio).
                let (mut x0, mut y0, mut sw, mut sh) = (0.0, 0.0, self.w as f64, self.h as f64);
                if crop_center {
                    let old_aspect = self.w as f64 / self.h.max(1) as f64;
                    let new_aspect = w as f64 / h as f64;
                    if old_aspect > new_aspect {
                        sw = self.h as f64 * new_aspect;
                        x0 = (self.w as f64 - sw) / 2.0;
                    } else if old_aspect < new_aspect {
                        sh = self.w as f64 / new_aspect;
                        y0 = (self.h as f64 - sh) / 2.0;
                    }
                }
                let mut out = Vec::with_capacity(self.batch * h * w * 3);
                for b in 0..self.batch {
                    for y in 0..h {
                        let sy = ((y0 + (y as f64 + 0.5) * sh / h as f64) as usize).min(self.h - 1);
                        for x in 0..w {
                            let sx =
                                ((x0 + (x as f64 + 0.5) * sw / w as f64) as usize).min(self.w - 1);
                            out.extend_from_slice(&self.px(b, sy, sx));
                        }
                    }
                }
                Ok(Image {
                    batch: self.batch,
                    h,
                    w,
                    data: ImgData::Pixels(Arc::new(out)),
                })
            }
        }
    }

    /// `ImageBlur`: separable gaussian, reflect padding. A solid colour stays itself.
    pub(crate) fn blur(&self, radius: usize, sigma: f64) -> Image {
        let ImgData::Pixels(p) = &self.data else {
            return self.clone();
        };
        if radius == 0 || self.w < 2 || self.h < 2 {
            return self.clone();
        }
        let size = radius * 2 + 1;
        let mut kernel: Vec<f64> = (0..size)
            .map(|i| {
                let d = i as f64 - radius as f64;
                (-(d * d) / (2.0 * sigma * sigma)).exp()
            })
            .collect();
        let sum: f64 = kernel.iter().sum();
        kernel.iter_mut().for_each(|k| *k /= sum);
        let reflect = |i: isize, n: usize| -> usize {
            let n = n as isize;
            let mut i = i;
            while i < 0 || i >= n {
                if i < 0 {
                    i = -i;
                }
                if i >= n {
                    i = 2 * (n - 1) - i;
                }
            }
            i as usize
        };
        let (w, h) = (self.w, self.h);
        let mut tmp = vec![0f32; p.len()];
        let mut out = vec![0f32; p.len()];
        for b in 0..self.batch {
            for y in 0..h {
                for x in 0..w {
                    for c in 0..3 {
                        let mut acc = 0.0;
                        for (k, kv) in kernel.iter().enumerate() {
                            let sx = reflect(x as isize + k as isize - radius as isize, w);
                            acc += kv * f64::from(p[((b * h + y) * w + sx) * 3 + c]);
                        }
                        tmp[((b * h + y) * w + x) * 3 + c] = acc as f32;
                    }
                }
            }
            for y in 0..h {
                for x in 0..w {
                    for c in 0..3 {
                        let mut acc = 0.0;
                        for (k, kv) in kernel.iter().enumerate() {
                            let sy = reflect(y as isize + k as isize - radius as isize, h);
                            acc += kv * f64::from(tmp[((b * h + sy) * w + x) * 3 + c]);
                        }
                        out[((b * h + y) * w + x) * 3 + c] = acc as f32;
                    }
                }
            }
        }
        Image {
            data: ImgData::Pixels(Arc::new(out)),
            ..self.clone()
        }
    }

    /// One batch element as 8-bit RGB, like `np.clip(255. * i, 0, 255).astype(np.uint8)`.
    fn rgb8(&self, b: usize) -> Vec<u8> {
        let conv = |v: f32| (255.0f32 * v).clamp(0.0, 255.0) as u8;
        let mut out = Vec::with_capacity(self.w * self.h * 3);
        match &self.data {
            ImgData::Solid(c) => {
                let px = [conv(c[0]), conv(c[1]), conv(c[2])];
                for _ in 0..self.w * self.h {
                    out.extend_from_slice(&px);
                }
            }
            ImgData::Pixels(_) => {
                for y in 0..self.h {
                    for x in 0..self.w {
                        let p = self.px(b, y, x);
                        out.extend_from_slice(&[conv(p[0]), conv(p[1]), conv(p[2])]);
                    }
                }
            }
        }
        out
    }

    /// PNG bytes of batch element `b` with `tEXt` chunks (SaveImage's `prompt`/`extra_pnginfo`).
    pub(crate) fn to_png(
        &self,
        b: usize,
        texts: &[(String, String)],
        fast: bool,
    ) -> Result<Vec<u8>, String> {
        let mut buf = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut buf, self.w as u32, self.h as u32);
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            enc.set_compression(if fast {
                png::Compression::Fast
            } else {
                png::Compression::Balanced
            });
            for (k, v) in texts {
                enc.add_text_chunk(k.clone(), v.clone())
                    .map_err(|e| e.to_string())?;
            }
            let mut writer = enc.write_header().map_err(|e| e.to_string())?;
            writer
                .write_image_data(&self.rgb8(b))
                .map_err(|e| e.to_string())?;
            writer.finish().map_err(|e| e.to_string())?;
        }
        Ok(buf)
    }

    /// `LoadImage`: decode to RGB float32 plus the mask.
    pub(crate) fn from_png(bytes: &[u8]) -> Result<(Image, Mask), String> {
        let mut dec = png::Decoder::new(Cursor::new(bytes));
        dec.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
        let mut reader = dec
            .read_info()
            .map_err(|e| format!("cannot identify image file: {e}"))?;
        let size = reader.output_buffer_size().ok_or("image too large")?;
        let mut buf = vec![0u8; size];
        let info = reader.next_frame(&mut buf).map_err(|e| e.to_string())?;
        let (w, h) = (info.width as usize, info.height as usize);
        if w * h > MAX_PIXELS {
            return Err(format!("comfyui_sim: refusing to load a {w}x{h} image"));
        }
        let channels = match info.color_type {
            png::ColorType::Grayscale => 1,
            png::ColorType::GrayscaleAlpha => 2,
            png::ColorType::Rgb => 3,
            png::ColorType::Rgba => 4,
            png::ColorType::Indexed => return Err("unsupported indexed PNG".to_owned()),
        };
        let mut out = Vec::with_capacity(w * h * 3);
        for i in 0..w * h {
            let px = &buf[i * channels..(i + 1) * channels];
            let rgb = match channels {
                1 | 2 => [px[0]; 3],
                _ => [px[0], px[1], px[2]],
            };
            out.extend(rgb.iter().map(|&v| f32::from(v) / 255.0));
        }
        Ok((
            Image {
                batch: 1,
                h,
                w,
                data: ImgData::Pixels(Arc::new(out)),
            },
            Mask { h, w },
        ))
    }

    /// Every float of the tensor in row-major order (only used for small summaries).
    fn value(&self, b: usize, y: usize, x: usize, c: usize) -> f32 {
        self.px(b, y, x)[c]
    }

    /// `str(tensor)` as torch prints a `[B, H, W, 3]` float32 CPU tensor.
    pub(crate) fn tensor_repr(&self) -> String {
        const EDGE: usize = 3;
        let shape = [self.batch, self.h, self.w, 3];
        let numel: usize = shape.iter().product();
        let summarize = numel > 1000;
        let idx = |n: usize| -> Vec<Option<usize>> {
            if summarize && n > 2 * EDGE {
                (0..EDGE)
                    .map(Some)
                    .chain(std::iter::once(None))
                    .chain((n - EDGE..n).map(Some))
                    .collect()
            } else {
                (0..n).map(Some).collect()
            }
        };
        // The formatter sees only the values that are printed.
        let mut shown = Vec::new();
        for b in idx(shape[0]).into_iter().flatten() {
            for y in idx(shape[1]).into_iter().flatten() {
                for x in idx(shape[2]).into_iter().flatten() {
                    for c in 0..3 {
                        shown.push(self.value(b, y, x, c));
                    }
                }
            }
        }
        let fmt = Formatter::new(&shown);
        let indent = "tensor(".len();
        let mut s = String::from("tensor(");
        // dim 4 (batch)
        let join = |parts: Vec<String>, dim: usize, ind: usize| -> String {
            let sep = format!(",{}{}", "\n".repeat(dim - 1), " ".repeat(ind + 1));
            format!("[{}]", parts.join(&sep))
        };
        let mut bparts = Vec::new();
        for b in idx(shape[0]) {
            let Some(b) = b else {
                bparts.push("...".to_owned());
                continue;
            };
            let mut yparts = Vec::new();
            for y in idx(shape[1]) {
                let Some(y) = y else {
                    yparts.push("...".to_owned());
                    continue;
                };
                let mut xparts = Vec::new();
                for x in idx(shape[2]) {
                    let Some(x) = x else {
                        xparts.push("...".to_owned());
                        continue;
                    };
                    let vals: Vec<String> =
                        (0..3).map(|c| fmt.format(self.value(b, y, x, c))).collect();
                    let vind = indent + 3;
                    let per_line = ((80usize.saturating_sub(vind)) / (fmt.width + 2)).max(1);
                    let lines: Vec<String> = vals.chunks(per_line).map(|l| l.join(", ")).collect();
                    xparts.push(format!(
                        "[{}]",
                        lines.join(&format!(",\n{}", " ".repeat(vind + 1)))
                    ));
                }
                yparts.push(join(xparts, 2, indent + 2));
            }
            bparts.push(join(yparts, 3, indent + 1));
        }
        s.push_str(&join(bparts, 4, indent));
        s.push(')');
        s
    }
}

/// torch `_Formatter` for floating tensors (precision 4).
struct Formatter {
    int_mode: bool,
    sci_mode: bool,
    width: usize,
}

impl Formatter {
    fn new(values: &[f32]) -> Formatter {
        let mut f = Formatter {
            int_mode: true,
            sci_mode: false,
            width: 1,
        };
        let nz: Vec<f64> = values
            .iter()
            .map(|v| f64::from(*v))
            .filter(|v| v.is_finite() && *v != 0.0)
            .collect();
        if nz.is_empty() {
            return f;
        }
        let min = nz.iter().map(|v| v.abs()).fold(f64::INFINITY, f64::min);
        let max = nz.iter().map(|v| v.abs()).fold(0.0, f64::max);
        f.int_mode = nz.iter().all(|v| *v == v.ceil());
        if f.int_mode {
            if max / min > 1000.0 || max > 1.0e8 {
                f.sci_mode = true;
                f.width = nz.iter().map(|v| py_exp(*v).len()).max().unwrap_or(1);
            } else {
                f.width = nz
                    .iter()
                    .map(|v| format!("{v:.0}").len() + 1)
                    .max()
                    .unwrap_or(1);
            }
        } else if max / min > 1000.0 || max > 1.0e8 || min < 1.0e-4 {
            f.sci_mode = true;
            f.width = nz.iter().map(|v| py_exp(*v).len()).max().unwrap_or(1);
        } else {
            f.width = nz
                .iter()
                .map(|v| format!("{v:.4}").len())
                .max()
                .unwrap_or(1);
        }
        f
    }

    fn format(&self, v: f32) -> String {
        let v = f64::from(v);
        let ret = if self.sci_mode {
            py_exp(v)
        } else if self.int_mode {
            if v.is_finite() {
                format!("{v:.0}.")
            } else {
                format!("{v}")
            }
        } else {
            format!("{v:.4}")
        };
        format!(
            "{}{}",
            " ".repeat(self.width.saturating_sub(ret.len())),
            ret
        )
    }
}

/// Python `"{:.4e}".format(v)`.
fn py_exp(v: f64) -> String {
    let s = format!("{v:.4e}");
    match s.split_once('e') {
        Some((m, e)) => {
            let n: i32 = e.parse().unwrap_or(0);
            format!("{m}e{}{:02}", if n < 0 { '-' } else { '+' }, n.abs())
        }
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeros_32x32_match_the_trace() {
        let img = Image::empty(1, 32, 32, 0);
        let want = "tensor([[[[0., 0., 0.],\n          [0., 0., 0.],\n          [0., 0., 0.],\n          ...,\n          [0., 0., 0.],\n          [0., 0., 0.],\n          [0., 0., 0.]],\n\n         [[0., 0., 0.],\n          [0., 0., 0.],\n          [0., 0., 0.],\n          ...,\n          [0., 0., 0.],\n          [0., 0., 0.],\n          [0., 0., 0.]],\n\n         [[0., 0., 0.],\n          [0., 0., 0.],\n          [0., 0., 0.],\n          ...,\n          [0., 0., 0.],\n          [0., 0., 0.],\n          [0., 0., 0.]],\n\n         ...,\n\n         [[0., 0., 0.],\n          [0., 0., 0.],\n          [0., 0., 0.],\n          ...,\n          [0., 0., 0.],\n          [0., 0., 0.],\n          [0., 0., 0.]],\n\n         [[0., 0., 0.],\n          [0., 0., 0.],\n          [0., 0., 0.],\n          ...,\n          [0., 0., 0.],\n          [0., 0., 0.],\n          [0., 0., 0.]],\n\n         [[0., 0., 0.],\n          [0., 0., 0.],\n          [0., 0., 0.],\n          ...,\n          [0., 0., 0.],\n          [0., 0., 0.],\n          [0., 0., 0.]]]])";
        assert_eq!(img.tensor_repr(), want);
    }

    #[test]
    fn small_tensor_is_not_summarised() {
        let img = Image::empty(1, 2, 1, 0x80FF00);
        assert_eq!(
            img.tensor_repr(),
            "tensor([[[[0.5020, 1.0000, 0.0000],\n          [0.5020, 1.0000, 0.0000]]]])"
        );
    }

    #[test]
    fn png_roundtrip() {
        let img = Image::empty(1, 4, 3, 0xFF0000).invert();
        let bytes = img
            .to_png(0, &[("prompt".into(), "{}".into())], false)
            .unwrap();
        let (back, _) = Image::from_png(&bytes).unwrap();
        assert_eq!((back.w, back.h), (4, 3));
        assert_eq!(back.rgb8(0)[..3], [0, 255, 255]);
    }
}
