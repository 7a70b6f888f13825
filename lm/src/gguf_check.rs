//! Guards around candle's GGUF reader: the header values candle trusts are checked before
//! and after it reads them, so that a hostile file is an error naming the problem, never a
//! panic (a zero `general.alignment` divides by zero inside candle) or a wrapped size (tensor
//! dims whose product overflows `usize` read as an empty tensor).

use candle_core::quantized::gguf_file::{Content, TensorInfo};
use std::io::{Read, Seek, SeekFrom};

/// The ggml types candle reads (float and quantized; ggml's integer types I8..I64, ids
/// 24-27, are not weights).
const KNOWN_TYPES: [u32; 15] = [0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 30];

/// Nesting limit of GGUF arrays (candle allows 4; llama.cpp files use 1).
const MAX_DEPTH: usize = 8;

/// Walks the metadata and tensor directory of a GGUF file without keeping them, and checks
/// the one value candle divides by: `general.alignment` must be a power of two (llama.cpp's
/// rule), 0 is refused; and every tensor's type and rank, naming the tensor.
/// Structural damage (truncation, lengths past the end) is left to candle's reader, which
/// reports it; this walk only stops early on it.
pub fn check_header<R: Read + Seek>(r: &mut R) -> Result<(), String> {
    let start = r.stream_position().map_err(|e| e.to_string())?;
    let size = r.seek(SeekFrom::End(0)).map_err(|e| e.to_string())?;
    r.seek(SeekFrom::Start(start)).map_err(|e| e.to_string())?;
    let mut w = Walker {
        r,
        size,
        pos: start,
    };
    let res = w.header();
    // candle reads from the start again
    w.r.seek(SeekFrom::Start(start))
        .map_err(|e| e.to_string())?;
    match res {
        Ok(()) => Ok(()),
        Err(Stop::Invalid(m)) => Err(m),
        // candle reports truncation and bad lengths with its own words
        Err(Stop::Structural) => Ok(()),
    }
}

enum Stop {
    Invalid(String),
    Structural,
}

impl From<std::io::Error> for Stop {
    fn from(_: std::io::Error) -> Self {
        Stop::Structural
    }
}

/// Reads the header in order, counting its position itself, so that a buffered reader is
/// never asked to seek (which would drop its buffer) except past a long value.
struct Walker<'a, R> {
    r: &'a mut R,
    size: u64,
    pos: u64,
}

impl<R: Read + Seek> Walker<'_, R> {
    fn read(&mut self, b: &mut [u8]) -> Result<(), Stop> {
        self.r.read_exact(b)?;
        self.pos += b.len() as u64;
        Ok(())
    }

    fn u32(&mut self) -> Result<u32, Stop> {
        let mut b = [0u8; 4];
        self.read(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn u64(&mut self) -> Result<u64, Stop> {
        let mut b = [0u8; 8];
        self.read(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn len(&mut self, v1: bool) -> Result<u64, Stop> {
        if v1 {
            Ok(u64::from(self.u32()?))
        } else {
            self.u64()
        }
    }

    fn remaining(&mut self) -> Result<u64, Stop> {
        Ok(self.size.saturating_sub(self.pos))
    }

    fn skip(&mut self, n: u64) -> Result<(), Stop> {
        if n > self.remaining()? {
            return Err(Stop::Structural);
        }
        if n <= 1 << 16 {
            // within what a buffer holds: read past it rather than seek
            let got = std::io::copy(&mut self.r.by_ref().take(n), &mut std::io::sink())?;
            if got != n {
                return Err(Stop::Structural);
            }
        } else {
            let d = i64::try_from(n).map_err(|_| Stop::Structural)?;
            self.r.seek(SeekFrom::Current(d))?;
        }
        self.pos += n;
        Ok(())
    }

    /// A string: returned when it is short (keys), skipped otherwise.
    fn string(&mut self, v1: bool) -> Result<Option<Vec<u8>>, Stop> {
        let n = self.len(v1)?;
        if n > self.remaining()? {
            return Err(Stop::Structural);
        }
        if n > 256 {
            self.skip(n)?;
            return Ok(None);
        }
        let mut b = vec![0u8; n as usize];
        self.read(&mut b)?;
        Ok(Some(b))
    }

    fn header(&mut self) -> Result<(), Stop> {
        let mut magic = [0u8; 4];
        self.read(&mut magic)?;
        if &magic != b"GGUF" && &magic != b"FUGG" {
            return Err(Stop::Structural);
        }
        let v1 = match self.u32()? {
            1 => true,
            2 | 3 => false,
            _ => return Err(Stop::Structural),
        };
        let tensors = self.len(v1)?;
        let kvs = self.len(v1)?;
        for _ in 0..kvs {
            let key = self.string(v1)?;
            let ty = self.u32()?;
            if key.as_deref() == Some(b"general.alignment".as_slice()) {
                let a = match ty {
                    0 | 1 => {
                        let mut b = [0u8; 1];
                        self.read(&mut b)?;
                        if ty == 1 {
                            b[0] as i8 as i64
                        } else {
                            b[0] as i64
                        }
                    }
                    2 | 3 => {
                        let mut b = [0u8; 2];
                        self.read(&mut b)?;
                        if ty == 3 {
                            i16::from_le_bytes(b) as i64
                        } else {
                            u16::from_le_bytes(b) as i64
                        }
                    }
                    4 => self.u32()? as i64,
                    5 => self.u32()? as i32 as i64,
                    _ => {
                        // candle ignores other types and uses the default alignment
                        self.value(ty, v1, 0)?;
                        continue;
                    }
                };
                if a <= 0 || (a & (a - 1)) != 0 {
                    return Err(Stop::Invalid(format!(
                        "general.alignment = {a} is not a power of two"
                    )));
                }
                // the key is read once; a later duplicate overrides it in candle
                continue;
            }
            self.value(ty, v1, 0)?;
        }
        // the tensor directory: a type candle does not know is named with its tensor
        for _ in 0..tensors {
            let name = self.string(v1)?;
            let name = String::from_utf8_lossy(name.as_deref().unwrap_or(b"?")).into_owned();
            let n_dims = self.u32()?;
            if n_dims > 4 {
                return Err(Stop::Invalid(format!(
                    "tensor `{name}` has {n_dims} dimensions (at most 4)"
                )));
            }
            for _ in 0..n_dims {
                self.len(v1)?;
            }
            let ty = self.u32()?;
            if !KNOWN_TYPES.contains(&ty) {
                return Err(Stop::Invalid(format!(
                    "tensor `{name}` has ggml type {ty}, which is not supported (float or \
                     quantized types only: {KNOWN_TYPES:?})"
                )));
            }
            self.u64()?;
        }
        Ok(())
    }

    fn fixed_size(ty: u32) -> Option<u64> {
        match ty {
            0 | 1 | 7 => Some(1),
            2 | 3 => Some(2),
            4..=6 => Some(4),
            10..=12 => Some(8),
            _ => None,
        }
    }

    fn value(&mut self, ty: u32, v1: bool, depth: usize) -> Result<(), Stop> {
        if depth > MAX_DEPTH {
            return Err(Stop::Structural);
        }
        if let Some(n) = Self::fixed_size(ty) {
            return self.skip(n);
        }
        match ty {
            8 => self.string(v1).map(|_| ()),
            9 => {
                let ety = self.u32()?;
                let n = self.len(v1)?;
                if let Some(s) = Self::fixed_size(ety) {
                    return self.skip(n.checked_mul(s).ok_or(Stop::Structural)?);
                }
                // every element takes at least 4 bytes (a length or a type): bounded by the file
                if n > self.remaining()? / 4 {
                    return Err(Stop::Structural);
                }
                for _ in 0..n {
                    self.value(ety, v1, depth + 1)?;
                }
                Ok(())
            }
            _ => Err(Stop::Structural),
        }
    }
}

/// The bytes a tensor's data takes, with checked arithmetic: `None` when the dims' product
/// or the byte count overflows, or the count is not a whole number of blocks.
pub fn tensor_bytes(info: &TensorInfo) -> Option<u64> {
    let mut elems: u64 = 1;
    for &d in info.shape.dims() {
        elems = elems.checked_mul(d as u64)?;
    }
    let block = info.ggml_dtype.block_size() as u64;
    if block == 0 || !elems.is_multiple_of(block) {
        return None;
    }
    (elems / block).checked_mul(info.ggml_dtype.type_size() as u64)
}

/// Checks every tensor of a parsed header: element and byte counts fit (no wrapping) and the
/// data lies inside the file. Errors are `(tensor name, reason)`.
pub fn check_tensors(content: &Content, file_size: u64) -> Result<(), (String, String)> {
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    for name in names {
        let info = &content.tensor_infos[name];
        let dims = info.shape.dims();
        let Some(bytes) = tensor_bytes(info) else {
            return Err((
                name.clone(),
                format!(
                    "dims {dims:?} of {:?} overflow or are not a whole number of blocks",
                    info.ggml_dtype
                ),
            ));
        };
        let end = content
            .tensor_data_offset
            .checked_add(info.offset)
            .and_then(|s| s.checked_add(bytes));
        match end {
            Some(e) if e <= file_size => {}
            _ => {
                return Err((
                    name.clone(),
                    format!(
                        "{bytes} bytes at data offset {} run past the end of the file \
                         ({file_size} bytes): truncated or corrupt",
                        info.offset
                    ),
                ))
            }
        }
    }
    Ok(())
}
