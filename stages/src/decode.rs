//! Safe decoding of untrusted images.
//!
//! The format comes from the magic bytes, never from a file name or a
//! Content-Type; dimensions are read from the header and checked before any
//! pixel is decoded; the decoder's allocations are capped. A bad image is a
//! permanent error with a reason a vendor can act on.
//!
//! Decoding is also bounded per process: before an image is decoded,
//! [`DecodeLimits::admit`] weighs it from its header (width × height × its
//! decoded bytes per pixel, plus two 8-bit RGBA working copies) and waits
//! until the process's `memory_budget` has room for it. The admission is
//! held for as long as the stage works on the pixels, so however many images
//! a worker is sent at once, the pixels it holds stay within the budget.
//! 16-bit PNGs are decoded straight to 8 bits per channel, row by row, so
//! their 16-bit pixels are never held whole.

use std::io::Cursor;
use std::sync::{Arc, OnceLock};

use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits};
use image_queue_pipeline::StageError;
use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DecodeLimits {
    /// Largest image accepted, in pixels (width × height).
    pub max_pixels: u64,
    /// Largest side accepted, in pixels.
    pub max_side: u32,
    /// Most memory the decoder may allocate, in bytes.
    pub max_alloc: u64,
    /// Most memory, in bytes, that the images being worked on in one
    /// process may take at once, as [`DecodeLimits::admit`] weighs them;
    /// images wait their turn for it. An image weighing more than the whole
    /// budget is refused (permanently). 0: no budget.
    pub memory_budget: u64,
    /// The process's budget itself: shared by every clone of these limits
    /// (a process builds all its stages from one configuration).
    #[serde(skip)]
    budget: SharedBudget,
}

/// A lazily made semaphore of `memory_budget` in KiB, one per configuration.
#[derive(Debug, Clone, Default)]
struct SharedBudget(Arc<OnceLock<Arc<Semaphore>>>);

/// Bytes per permit: budgets are counted in KiB, so a u32 of permits
/// covers up to 4 TiB.
const PERMIT_BYTES: u64 = 1024;

/// What a stage holds besides the decoded image, in bytes per pixel: two
/// 8-bit RGBA working copies (resize converts the image to RGBA, and the
/// scaler premultiplies alpha into a copy of its own; measured: a 7000 ×
/// 7000 RGBA image peaks at about three times its 8-bit size).
const WORKING_BYTES_PER_PIXEL: u64 = 8;

/// An image's place in the process's decode budget: keep it for as long as
/// its pixels (and what is made from them) are held; dropping it gives the
/// memory back to the images waiting.
#[derive(Debug)]
pub struct Admission {
    /// What the image was weighed at, in bytes.
    pub weight: u64,
    _permit: Option<OwnedSemaphorePermit>,
}

impl DecodeLimits {
    /// Weighs the image in `bytes` from its header alone and waits until
    /// this process's budget has room for it. Refuses (permanently) what
    /// [`decode`] would refuse from the header, and an image heavier than
    /// the whole budget.
    pub async fn admit(&self, bytes: &[u8]) -> Result<Admission, StageError> {
        let weight = weigh(bytes, self)?;
        if self.memory_budget == 0 {
            return Ok(Admission { weight, _permit: None });
        }
        let permits = weight.div_ceil(PERMIT_BYTES);
        let total = (self.memory_budget / PERMIT_BYTES).clamp(1, u32::MAX as u64);
        if permits > total {
            return Err(StageError::permanent(format!(
                "the image needs about {} MiB to process, more than this worker's whole decode budget ({} MiB, decode.memory_budget)",
                weight.div_ceil(1 << 20),
                self.memory_budget >> 20
            )));
        }
        let semaphore = self
            .budget
            .0
            .get_or_init(|| Arc::new(Semaphore::new(total as usize)))
            .clone();
        // Fair: a heavy image waiting is not overtaken for ever by light ones.
        let permit = semaphore
            .acquire_many_owned(permits as u32)
            .await
            .map_err(|_| StageError::retryable("the decode budget is closed"))?;
        Ok(Admission {
            weight,
            _permit: Some(permit),
        })
    }
}

/// What an image weighs in the decode budget, from its header: its pixels
/// at 8 bits per channel (16-bit images are reduced as they are decoded)
/// plus two working copies.
fn weigh(bytes: &[u8], limits: &DecodeLimits) -> Result<u64, StageError> {
    if bytes.is_empty() {
        return Err(StageError::permanent("the image is empty (0 bytes)"));
    }
    let format = sniff(bytes)
        .ok_or_else(|| StageError::permanent("not an image we accept: JPEG, PNG, WebP or GIF, told by its content"))?;
    let decoder = ImageReader::with_format(Cursor::new(bytes), format)
        .into_decoder()
        .map_err(|e| StageError::permanent(format!("unreadable {format:?} header: {}", plain(&e))))?;
    let (w, h) = decoder.dimensions();
    check_dimensions(w, h, limits)?;
    let channels = decoder.color_type().channel_count() as u64;
    Ok(w as u64 * h as u64 * (channels + WORKING_BYTES_PER_PIXEL))
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits {
            max_pixels: 50_000_000,
            max_side: 30_000,
            max_alloc: 512 * 1024 * 1024,
            memory_budget: 1 << 30,
            budget: SharedBudget::default(),
        }
    }
}

/// The formats we accept, told by their first bytes.
pub fn sniff(bytes: &[u8]) -> Option<ImageFormat> {
    match bytes {
        [0xFF, 0xD8, 0xFF, ..] => Some(ImageFormat::Jpeg),
        [0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A, ..] => Some(ImageFormat::Png),
        [b'R', b'I', b'F', b'F', _, _, _, _, b'W', b'E', b'B', b'P', ..] => Some(ImageFormat::WebP),
        [b'G', b'I', b'F', b'8', b'7' | b'9', b'a', ..] => Some(ImageFormat::Gif),
        _ => None,
    }
}

/// Decodes an untrusted image within `limits`.
pub fn decode(bytes: &[u8], limits: &DecodeLimits) -> Result<DynamicImage, StageError> {
    if bytes.is_empty() {
        return Err(StageError::permanent("the image is empty (0 bytes)"));
    }
    let format = sniff(bytes)
        .ok_or_else(|| StageError::permanent("not an image we accept: JPEG, PNG, WebP or GIF, told by its content"))?;
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    let (w, h) = reader
        .into_dimensions()
        .map_err(|e| StageError::permanent(format!("unreadable {format:?} header: {}", plain(&e))))?;
    check_dimensions(w, h, limits)?;
    if format == ImageFormat::Jpeg && !jpeg_is_complete(bytes) {
        // The JPEG decoder fills missing data with grey rather than fail:
        // a half-uploaded photo would go on as a half-grey product image.
        return Err(StageError::permanent(
            "corrupt or truncated Jpeg image: it ends before its end-of-image marker",
        ));
    }
    if format == ImageFormat::Png && png_is_16_bit(bytes) {
        return decode_png_to_8_bit(bytes, limits);
    }
    reader = ImageReader::with_format(Cursor::new(bytes), format);
    let mut l = Limits::default();
    l.max_image_width = Some(limits.max_side);
    l.max_image_height = Some(limits.max_side);
    l.max_alloc = Some(limits.max_alloc);
    reader.limits(l.clone());
    let corrupt =
        |e: image::ImageError| StageError::permanent(format!("corrupt or truncated {format:?} image: {}", plain(&e)));
    let mut decoder = reader.into_decoder().map_err(corrupt)?;
    // The pixel buffer itself counts against the allocation limit, as
    // `ImageReader::decode` would count it.
    l.reserve(decoder.total_bytes())
        .map_err(|e| StageError::permanent(format!("the image needs too much memory to decode: {}", plain(&e))))?;
    // Phones store portraits sideways with an EXIF orientation tag. Every
    // stage works on upright pixels, and the encoders we use write no EXIF,
    // so the tag is applied here once and the metadata dropped downstream.
    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
    let mut img = DynamicImage::from_decoder(decoder).map_err(corrupt)?;
    img.apply_orientation(orientation);
    Ok(img)
}

/// A decoder's reason, in words a vendor can read. Decoders put their own
/// structures into some messages (a PNG chunk type as Rust debug output,
/// with the file's raw bytes in it): those reach the vendor's status and
/// webhook, so only plain printable text up to a sentence's length is
/// passed on, and anything else becomes a plain statement of the fault.
fn plain(e: &dyn std::fmt::Display) -> String {
    const LONGEST: usize = 160;
    let text = e.to_string();
    let readable = |c: char| c.is_ascii_graphic() || c == ' ';
    if text.len() <= LONGEST && text.chars().all(readable) && !text.contains(['{', '}']) {
        return text;
    }
    tracing::debug!(reason = %text.escape_debug(), "a decoder's reason, not shown to the vendor");
    "its data does not follow the format".into()
}

/// Whether a PNG's header (checked already) says 16 bits per channel.
fn png_is_16_bit(bytes: &[u8]) -> bool {
    // IHDR is the first chunk: its bit depth follows the width and height.
    bytes.get(24) == Some(&16)
}

/// Decodes a 16-bit PNG straight to 8 bits per channel, row by row, so
/// that its 16-bit pixels (twice the memory) are never held whole.
fn decode_png_to_8_bit(bytes: &[u8], limits: &DecodeLimits) -> Result<DynamicImage, StageError> {
    let corrupt =
        |e: png::DecodingError| StageError::permanent(format!("corrupt or truncated Png image: {}", plain(&e)));
    let mut decoder = png::Decoder::new_with_limits(
        Cursor::new(bytes),
        png::Limits {
            bytes: usize::try_from(limits.max_alloc).unwrap_or(usize::MAX),
        },
    );
    decoder.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = decoder.read_info().map_err(corrupt)?;
    let orientation = reader
        .info()
        .exif_metadata
        .as_deref()
        .and_then(Orientation::from_exif_chunk)
        .unwrap_or(Orientation::NoTransforms);
    let size = reader
        .output_buffer_size()
        .filter(|&n| n as u64 <= limits.max_alloc)
        .ok_or_else(|| StageError::permanent("the image needs too much memory to decode"))?;
    let mut buf = vec![0; size];
    let frame = reader.next_frame(&mut buf).map_err(corrupt)?;
    buf.truncate(frame.buffer_size());
    let (w, h) = (frame.width, frame.height);
    let shape = || StageError::permanent("corrupt Png image: its pixels do not match its header");
    let mut img = match frame.color_type {
        png::ColorType::Rgba => DynamicImage::ImageRgba8(image::RgbaImage::from_raw(w, h, buf).ok_or_else(shape)?),
        png::ColorType::Rgb => DynamicImage::ImageRgb8(image::RgbImage::from_raw(w, h, buf).ok_or_else(shape)?),
        png::ColorType::GrayscaleAlpha => {
            DynamicImage::ImageLumaA8(image::GrayAlphaImage::from_raw(w, h, buf).ok_or_else(shape)?)
        }
        png::ColorType::Grayscale => DynamicImage::ImageLuma8(image::GrayImage::from_raw(w, h, buf).ok_or_else(shape)?),
        png::ColorType::Indexed => return Err(shape()),
    };
    img.apply_orientation(orientation);
    Ok(img)
}

/// Why an upload was refused before any pixel was decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScreenError {
    /// Not a format we accept, told by its first bytes.
    #[error("{0}")]
    Unsupported(String),
    /// A format we accept, but a header or an end that cannot be right.
    #[error("{0}")]
    Invalid(String),
}

/// Screens an uploaded image from its first bytes (`head`, as many as the
/// caller kept, up to the whole file), its last bytes (`tail`) and its
/// length, so that an API can refuse what can never decode at the door,
/// without holding or decoding the file: an empty or unrecognised file, a
/// header that does not parse, dimensions over the limits, a PNG, GIF or
/// WebP cut short. What only decoding can tell (a corrupt scan, a JPEG cut
/// inside its data) is left to [`decode`], in the pipeline.
pub fn screen(head: &[u8], tail: &[u8], len: u64, limits: &DecodeLimits) -> Result<ImageFormat, ScreenError> {
    if len == 0 {
        return Err(ScreenError::Unsupported("the image is empty (0 bytes)".into()));
    }
    let format = sniff(head).ok_or_else(|| {
        ScreenError::Unsupported("not an image we accept: JPEG, PNG, WebP or GIF, told by its content".into())
    })?;
    match ImageReader::with_format(Cursor::new(head), format).into_dimensions() {
        Ok((w, h)) => check_dimensions(w, h, limits).map_err(|e| ScreenError::Invalid(e.message))?,
        // A JPEG's frame header may come after more metadata than the head
        // holds: only a whole file's header is judged.
        Err(_) if format == ImageFormat::Jpeg && (head.len() as u64) < len => {}
        Err(e) => {
            return Err(ScreenError::Invalid(format!(
                "unreadable {format:?} header: {}",
                plain(&e)
            )))
        }
    }
    const IEND: [u8; 12] = [0, 0, 0, 0, b'I', b'E', b'N', b'D', 0xAE, 0x42, 0x60, 0x82];
    let cut_short = match format {
        ImageFormat::Png => !tail.ends_with(&IEND),
        ImageFormat::Gif => tail.last() != Some(&0x3B),
        ImageFormat::WebP => {
            // RIFF's own length field counts what follows its first 8 bytes.
            let riff = u32::from_le_bytes([head[4], head[5], head[6], head[7]]) as u64;
            riff + 8 > len
        }
        _ => false,
    };
    if cut_short {
        return Err(ScreenError::Invalid(format!(
            "truncated {format:?} image: it ends before its format's end ({len} bytes)"
        )));
    }
    Ok(format)
}

/// Whether a JPEG's segments and scans run up to an end-of-image marker.
/// Walks the marker structure rather than looking for the bytes FF D9
/// anywhere, since an embedded EXIF thumbnail has an end marker of its own.
fn jpeg_is_complete(b: &[u8]) -> bool {
    let mut i = 2; // after SOI
    loop {
        // A marker: FF (fill bytes FF allowed), then its code.
        while i < b.len() && b[i] == 0xFF {
            i += 1;
        }
        let Some(&code) = b.get(i) else { return false };
        i += 1;
        match code {
            0xD9 => return true,
            0xD0..=0xD7 | 0x01 => continue,
            _ => {}
        }
        let Some(len) = b.get(i..i + 2).map(|l| u16::from_be_bytes([l[0], l[1]]) as usize) else {
            return false;
        };
        i += len;
        if code == 0xDA {
            // Entropy-coded data: an FF there is followed by 00 (a stuffed
            // byte) or a restart marker; anything else starts the next marker.
            loop {
                match b.get(i..i + 2) {
                    None => return false,
                    Some([0xFF, 0x00]) | Some([0xFF, 0xD0..=0xD7]) => i += 2,
                    Some([0xFF, _]) => break,
                    Some(_) => i += 1,
                }
            }
        }
    }
}

pub fn check_dimensions(w: u32, h: u32, limits: &DecodeLimits) -> Result<(), StageError> {
    if w == 0 || h == 0 {
        return Err(StageError::permanent(format!("the image has no pixels ({w}×{h})")));
    }
    if w > limits.max_side || h > limits.max_side || (w as u64) * (h as u64) > limits.max_pixels {
        return Err(StageError::permanent(format!(
            "the image is too large: {w}×{h} pixels; the limit is {} megapixels and {} pixels a side",
            limits.max_pixels / 1_000_000,
            limits.max_side
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png_of(w: u32, h: u32) -> Vec<u8> {
        let mut out = Vec::new();
        DynamicImage::new_rgba8(w, h)
            .write_to(&mut Cursor::new(&mut out), ImageFormat::Png)
            .unwrap();
        out
    }

    #[test]
    fn screening_refuses_what_can_never_decode() {
        let limits = DecodeLimits::default();
        let whole = |b: &[u8]| screen(b, &b[b.len().saturating_sub(16)..], b.len() as u64, &limits);
        let png = png_of(8, 6);
        assert_eq!(whole(&png), Ok(ImageFormat::Png));
        assert!(matches!(whole(b""), Err(ScreenError::Unsupported(_))));
        assert!(matches!(
            whole(b"GIF89 is not enough"),
            Err(ScreenError::Unsupported(_))
        ));
        let half = &png[..png.len() / 2];
        assert!(matches!(whole(half), Err(ScreenError::Invalid(m)) if m.contains("truncated")));
        let mut polyglot = png[..8].to_vec();
        polyglot.extend_from_slice(b"<html></html>PK\x03\x04");
        assert!(matches!(whole(&polyglot), Err(ScreenError::Invalid(m)) if m.contains("header")));
        // A header declaring 100,000 x 100,000: refused from the header alone.
        let mut huge = png.clone();
        huge[16..20].copy_from_slice(&100_000u32.to_be_bytes());
        huge[20..24].copy_from_slice(&100_000u32.to_be_bytes());
        let crc = crc32fast::hash(&huge[12..29]);
        huge[29..33].copy_from_slice(&crc.to_be_bytes());
        assert!(matches!(whole(&huge), Err(ScreenError::Invalid(m)) if m.contains("too large")));
    }

    fn png(w: u32, h: u32) -> Vec<u8> {
        let mut out = Vec::new();
        DynamicImage::new_rgb8(w, h)
            .write_to(&mut Cursor::new(&mut out), ImageFormat::Png)
            .unwrap();
        out
    }

    #[test]
    fn hostile_inputs_are_permanent_errors_with_reasons() {
        let l = DecodeLimits::default();
        let empty = decode(&[], &l).unwrap_err();
        assert!(!empty.is_retryable() && empty.message.contains("empty"));
        let text = decode(b"hello, I am a text file named a.jpg", &l).unwrap_err();
        assert!(text.message.contains("not an image"));
        let mut truncated = png(64, 64);
        truncated.truncate(truncated.len() / 2);
        let t = decode(&truncated, &l).unwrap_err();
        assert!(!t.is_retryable(), "{t}");
        // A PNG header declaring 30000×30000: refused before decoding.
        let mut huge = png(1, 1);
        huge[16..20].copy_from_slice(&30000u32.to_be_bytes());
        huge[20..24].copy_from_slice(&30000u32.to_be_bytes());
        let crc = crc32fast::hash(&huge[12..29]);
        huge[29..33].copy_from_slice(&crc.to_be_bytes());
        let h = decode(&huge, &l).unwrap_err();
        assert!(h.message.contains("too large"), "{h}");
        assert!(decode(&png(8, 8), &l).is_ok());
    }

    fn jpeg(w: u32, h: u32) -> Vec<u8> {
        let mut out = Vec::new();
        let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 7) as u8, (y * 5) as u8, 90]));
        DynamicImage::ImageRgb8(img)
            .write_to(&mut Cursor::new(&mut out), ImageFormat::Jpeg)
            .unwrap();
        out
    }

    fn assert_permanent(r: Result<DynamicImage, StageError>, needle: &str) {
        let e = match r {
            Ok(img) => panic!(
                "a hostile input was accepted as a {}×{} image",
                img.width(),
                img.height()
            ),
            Err(e) => e,
        };
        assert!(!e.is_retryable(), "{e}");
        assert!(e.message.contains(needle), "expected {needle:?} in {e}");
    }

    #[test]
    fn truncated_jpeg_is_refused() {
        let l = DecodeLimits::default();
        let mut j = jpeg(256, 256);
        assert!(decode(&j, &l).is_ok());
        j.truncate(j.len() / 2);
        assert_permanent(decode(&j, &l), "truncated");
        assert_permanent(decode(&j[..3], &l), "Jpeg");
    }

    #[test]
    fn a_text_file_named_jpg_and_a_polyglot_are_told_by_content() {
        let l = DecodeLimits::default();
        assert_permanent(decode(&[], &l), "empty");
        assert_permanent(decode(b"GIF87 is not enough: plain text", &l), "not an image");
        // An HTML page that a careless server would label image/jpeg.
        assert_permanent(decode(b"<html><script>alert(1)</script></html>", &l), "not an image");
        // A JPEG with a ZIP appended (a classic polyglot) decodes as the
        // JPEG it starts with: only its pixels go on, never its tail.
        let mut poly = jpeg(16, 16);
        poly.extend_from_slice(b"PK\x03\x04 a zip archive follows");
        let img = decode(&poly, &l).expect("the JPEG part decodes");
        assert_eq!((img.width(), img.height()), (16, 16));
    }

    #[test]
    fn a_decoders_internal_text_never_reaches_the_vendor() {
        // PNG's magic, then a "chunk" whose type is raw bytes: the decoder
        // describes it with Rust debug output holding those bytes.
        let mut garbage = b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dF\x86\xf7\xcc".to_vec();
        garbage.extend((0..200u32).map(|i| (i * 131 % 251) as u8));
        let limits = DecodeLimits::default();
        let decoded = decode(&garbage, &limits).expect_err("garbage after PNG's magic is no image");
        let screened = screen(&garbage, &garbage, garbage.len() as u64, &limits).expect_err("nor at the door");
        for message in [decoded.message, screened.to_string()] {
            assert!(
                message.starts_with("unreadable Png header: ") || message.starts_with("corrupt"),
                "{message}"
            );
            assert!(
                message.chars().all(|c| c.is_ascii_graphic() || c == ' ') && !message.contains('{'),
                "decoder internals in a vendor's error: {message:?}"
            );
        }
    }

    /// A GIF whose logical screen is huge and whose one frame is tiny: a
    /// decoder that allocates the screen would need gigabytes.
    fn gif_bomb(w: u16, h: u16) -> Vec<u8> {
        let mut g = b"GIF89a".to_vec();
        g.extend_from_slice(&w.to_le_bytes());
        g.extend_from_slice(&h.to_le_bytes());
        g.extend_from_slice(&[0x00, 0x00, 0x00]); // no global palette
                                                  // One 1×1 frame with a two-colour local palette.
        g.extend_from_slice(&[0x2C, 0, 0, 0, 0, 1, 0, 1, 0, 0x80, 0, 0, 0, 255, 255, 255]);
        g.extend_from_slice(&[0x02, 0x02, 0x44, 0x01, 0x00]); // LZW data
        g.push(0x3B);
        g
    }

    #[test]
    fn gif_bomb_is_refused_before_decoding() {
        let l = DecodeLimits::default();
        assert_permanent(decode(&gif_bomb(65_535, 65_535), &l), "too large");
        // Under the side limit but over the pixel limit.
        assert_permanent(decode(&gif_bomb(20_000, 20_000), &l), "too large");
        // Under both, but the canvas is over the memory limit.
        let small_alloc = DecodeLimits {
            max_alloc: 1024 * 1024,
            ..DecodeLimits::default()
        };
        assert_permanent(decode(&gif_bomb(4_000, 4_000), &small_alloc), "memory");
        assert!(decode(&gif_bomb(4, 4), &l).is_ok());
    }

    #[test]
    fn exif_orientation_is_applied() {
        // A 40×20 JPEG tagged "rotate 90° clockwise" (orientation 6), as a
        // phone writes a portrait: it must come out 20×40.
        let j = jpeg(40, 20);
        let exif: &[u8] = &[
            b'E', b'x', b'i', b'f', 0, 0, // APP1 identifier
            b'M', b'M', 0, 42, 0, 0, 0, 8, // big-endian TIFF header
            0, 1, // one IFD entry
            0x01, 0x12, 0, 3, 0, 0, 0, 1, 0, 6, 0, 0, // Orientation = 6
            0, 0, 0, 0, // no next IFD
        ];
        let mut tagged = j[..2].to_vec();
        tagged.extend_from_slice(&[0xFF, 0xE1]);
        tagged.extend_from_slice(&((exif.len() + 2) as u16).to_be_bytes());
        tagged.extend_from_slice(exif);
        tagged.extend_from_slice(&j[2..]);
        let img = decode(&tagged, &DecodeLimits::default()).unwrap();
        assert_eq!((img.width(), img.height()), (20, 40));
    }

    fn png_rgba16(w: u32, h: u32) -> Vec<u8> {
        let img = image::ImageBuffer::from_pixel(w, h, image::Rgba([40_000u16, 20_000, 10_000, 65_535]));
        let mut out = Vec::new();
        DynamicImage::ImageRgba16(img)
            .write_to(&mut Cursor::new(&mut out), ImageFormat::Png)
            .unwrap();
        out
    }

    #[test]
    fn sixteen_bit_pngs_come_out_at_8_bits() {
        let img = decode(&png_rgba16(8, 6), &DecodeLimits::default()).unwrap();
        assert_eq!((img.width(), img.height()), (8, 6));
        assert_eq!(img.color(), image::ColorType::Rgba8);
        assert_eq!(img.to_rgba8().get_pixel(3, 3).0, [156, 78, 39, 255]);
    }

    #[tokio::test]
    async fn images_wait_for_the_shared_budget_and_one_over_it_is_refused() {
        use futures::FutureExt;
        let png = png_rgba16(100, 100);
        // 100 × 100 × (4 + 8) bytes: about 117 KiB; room for one, not two.
        let limits = DecodeLimits {
            memory_budget: 200 * 1024,
            ..DecodeLimits::default()
        };
        let first = limits.admit(&png).await.unwrap();
        assert_eq!(first.weight, 100 * 100 * 12);
        // A clone (another stage of the same process) shares the budget.
        let other = limits.clone();
        assert!(other.admit(&png).now_or_never().is_none(), "admitted beyond the budget");
        drop(first);
        let second = other.admit(&png).now_or_never().expect("room once the first is done");
        assert!(second.is_ok());
        let small = DecodeLimits {
            memory_budget: 64 * 1024,
            ..DecodeLimits::default()
        };
        let refused = small.admit(&png).await.unwrap_err();
        assert!(!refused.is_retryable(), "{refused}");
        assert!(refused.message.contains("decode.memory_budget"), "{refused}");
    }
}
