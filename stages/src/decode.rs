//! Safe decoding of untrusted images.
//!
//! The format comes from the magic bytes, never from a file name or a
//! Content-Type; dimensions are read from the header and checked before any
//! pixel is decoded; the decoder's allocations are capped. A bad image is a
//! permanent error with a reason a vendor can act on.

use std::io::Cursor;

use image::{DynamicImage, ImageFormat, ImageReader, Limits};
use image_queue_pipeline::StageError;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DecodeLimits {
    /// Largest image accepted, in pixels (width × height).
    pub max_pixels: u64,
    /// Largest side accepted, in pixels.
    pub max_side: u32,
    /// Most memory the decoder may allocate, in bytes.
    pub max_alloc: u64,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits {
            max_pixels: 50_000_000,
            max_side: 30_000,
            max_alloc: 512 * 1024 * 1024,
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
        .map_err(|e| StageError::permanent(format!("unreadable {format:?} header: {e}")))?;
    check_dimensions(w, h, limits)?;
    reader = ImageReader::with_format(Cursor::new(bytes), format);
    let mut l = Limits::default();
    l.max_image_width = Some(limits.max_side);
    l.max_image_height = Some(limits.max_side);
    l.max_alloc = Some(limits.max_alloc);
    reader.limits(l);
    reader
        .decode()
        .map_err(|e| StageError::permanent(format!("corrupt or truncated {format:?} image: {e}")))
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
}
