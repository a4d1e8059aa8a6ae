//! A small GGUF (version 3) reader and writer for hc's sidecar files: metadata and F32 tensors
//! only, which is what a codebook file holds. Written as GGUF so that the usual tools
//! (`gguf-dump`, llama.cpp's gguf reader) can inspect a calibration file.
//!
//! The reader trusts nothing: every length is checked against the bytes that are left, so a
//! truncated or corrupted file is an error that says what was wrong, never a panic or a huge
//! allocation.

use std::collections::BTreeMap;

const MAGIC: &[u8; 4] = b"GGUF";
const VERSION: u32 = 3;
const ALIGN: usize = 32;

// value types of the GGUF spec
const T_U8: u32 = 0;
const T_I8: u32 = 1;
const T_U16: u32 = 2;
const T_I16: u32 = 3;
const T_U32: u32 = 4;
const T_I32: u32 = 5;
const T_F32: u32 = 6;
const T_BOOL: u32 = 7;
const T_STRING: u32 = 8;
const T_ARRAY: u32 = 9;
const T_U64: u32 = 10;
const T_I64: u32 = 11;
const T_F64: u32 = 12;
/// ggml type of an F32 tensor
const GGML_F32: u32 = 0;

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U32(u32),
    U64(u64),
    F32(f32),
    Str(String),
    U32s(Vec<u32>),
    /// any other type, kept only so that a reader can skip it
    Other(u32),
}

/// One F32 tensor: its dims (innermost first, as ggml writes them) and data.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub dims: Vec<u64>,
    pub data: Vec<f32>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct File {
    pub kv: BTreeMap<String, Value>,
    /// in file order
    pub tensors: Vec<(String, Tensor)>,
}

impl File {
    pub fn str(&self, key: &str) -> Result<&str, String> {
        match self.kv.get(key) {
            Some(Value::Str(s)) => Ok(s),
            Some(_) => Err(format!("metadata '{key}' is not a string")),
            None => Err(format!("metadata '{key}' is missing")),
        }
    }

    pub fn u32(&self, key: &str) -> Result<u32, String> {
        match self.kv.get(key) {
            Some(Value::U32(v)) => Ok(*v),
            Some(_) => Err(format!("metadata '{key}' is not a u32")),
            None => Err(format!("metadata '{key}' is missing")),
        }
    }

    pub fn u64(&self, key: &str) -> Result<u64, String> {
        match self.kv.get(key) {
            Some(Value::U64(v)) => Ok(*v),
            Some(_) => Err(format!("metadata '{key}' is not a u64")),
            None => Err(format!("metadata '{key}' is missing")),
        }
    }

    pub fn u32s(&self, key: &str) -> Result<&[u32], String> {
        match self.kv.get(key) {
            Some(Value::U32s(v)) => Ok(v),
            Some(_) => Err(format!("metadata '{key}' is not an array of u32")),
            None => Err(format!("metadata '{key}' is missing")),
        }
    }

    pub fn tensor(&self, name: &str) -> Option<&Tensor> {
        self.tensors.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }

    /// The whole file as bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        b.extend_from_slice(&(self.kv.len() as u64).to_le_bytes());
        let put_str = |b: &mut Vec<u8>, s: &str| {
            b.extend_from_slice(&(s.len() as u64).to_le_bytes());
            b.extend_from_slice(s.as_bytes());
        };
        for (k, v) in &self.kv {
            put_str(&mut b, k);
            match v {
                Value::U32(x) => {
                    b.extend_from_slice(&T_U32.to_le_bytes());
                    b.extend_from_slice(&x.to_le_bytes());
                }
                Value::U64(x) => {
                    b.extend_from_slice(&T_U64.to_le_bytes());
                    b.extend_from_slice(&x.to_le_bytes());
                }
                Value::F32(x) => {
                    b.extend_from_slice(&T_F32.to_le_bytes());
                    b.extend_from_slice(&x.to_le_bytes());
                }
                Value::Str(s) => {
                    b.extend_from_slice(&T_STRING.to_le_bytes());
                    put_str(&mut b, s);
                }
                Value::U32s(xs) => {
                    b.extend_from_slice(&T_ARRAY.to_le_bytes());
                    b.extend_from_slice(&T_U32.to_le_bytes());
                    b.extend_from_slice(&(xs.len() as u64).to_le_bytes());
                    xs.iter().for_each(|x| b.extend_from_slice(&x.to_le_bytes()));
                }
                // never built by hc; written as a u8 zero so the file stays well-formed
                Value::Other(_) => {
                    b.extend_from_slice(&T_U8.to_le_bytes());
                    b.push(0);
                }
            }
        }
        let mut offset = 0usize;
        for (name, t) in &self.tensors {
            put_str(&mut b, name);
            b.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            t.dims.iter().for_each(|d| b.extend_from_slice(&d.to_le_bytes()));
            b.extend_from_slice(&GGML_F32.to_le_bytes());
            b.extend_from_slice(&(offset as u64).to_le_bytes());
            offset += (t.data.len() * 4).div_ceil(ALIGN) * ALIGN;
        }
        b.resize(b.len().div_ceil(ALIGN) * ALIGN, 0);
        for (_, t) in &self.tensors {
            t.data.iter().for_each(|x| b.extend_from_slice(&x.to_le_bytes()));
            b.resize(b.len().div_ceil(ALIGN) * ALIGN, 0);
        }
        b
    }

    /// Parse a GGUF file holding F32 tensors. Errors name what is wrong and where.
    pub fn parse(bytes: &[u8]) -> Result<File, String> {
        let mut r = Reader { b: bytes, at: 0 };
        if r.take(4)? != MAGIC {
            return Err("not a GGUF file (bad magic)".into());
        }
        let version = r.u32()?;
        if version != VERSION {
            return Err(format!("GGUF version {version}; this reader knows version {VERSION}"));
        }
        let n_tensors = r.u64()?;
        let n_kv = r.u64()?;
        // every entry takes at least 8 bytes, so larger counts cannot be right
        if n_tensors > bytes.len() as u64 / 8 || n_kv > bytes.len() as u64 / 8 {
            return Err(format!("header claims {n_tensors} tensors and {n_kv} metadata entries in a {}-byte file", bytes.len()));
        }
        let mut f = File::default();
        for _ in 0..n_kv {
            let key = r.string()?;
            let ty = r.u32()?;
            let v = r.value(ty, &key)?;
            f.kv.insert(key, v);
        }
        let mut infos = Vec::new();
        for _ in 0..n_tensors {
            let name = r.string()?;
            let n_dims = r.u32()?;
            if n_dims == 0 || n_dims > 4 {
                return Err(format!("tensor '{name}' has {n_dims} dimensions"));
            }
            let dims = (0..n_dims).map(|_| r.u64()).collect::<Result<Vec<_>, _>>()?;
            let ty = r.u32()?;
            if ty != GGML_F32 {
                return Err(format!("tensor '{name}' has ggml type {ty}; only F32 is accepted"));
            }
            let offset = r.u64()?;
            infos.push((name, dims, offset));
        }
        let data_start = r.at.div_ceil(ALIGN) * ALIGN;
        for (name, dims, offset) in infos {
            let n = dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d)).ok_or_else(|| format!("tensor '{name}': size overflows"))?;
            let start = (data_start as u64).checked_add(offset);
            let end = n.checked_mul(4).and_then(|len| start.and_then(|s| s.checked_add(len)));
            let (start, end) = match (start, end) {
                (Some(s), Some(e)) if e <= bytes.len() as u64 => (s as usize, e as usize),
                _ => return Err(format!("tensor '{name}' ({n} floats at offset {offset}) runs past the end of the file")),
            };
            let data = bytes[start..end].chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            f.tensors.push((name, Tensor { dims, data }));
        }
        Ok(f)
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: u64) -> Result<&'a [u8], String> {
        if n > (self.b.len() - self.at) as u64 {
            return Err(format!("file truncated: {n} bytes wanted at offset {}, {} left", self.at, self.b.len() - self.at));
        }
        let s = &self.b[self.at..self.at + n as usize];
        self.at += n as usize;
        Ok(s)
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap_or_default()))
    }

    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap_or_default()))
    }

    fn string(&mut self) -> Result<String, String> {
        let n = self.u64()?;
        let s = self.take(n)?;
        String::from_utf8(s.to_vec()).map_err(|_| format!("a string at offset {} is not UTF-8", self.at - s.len()))
    }

    fn scalar_size(ty: u32) -> Option<u64> {
        match ty {
            T_U8 | T_I8 | T_BOOL => Some(1),
            T_U16 | T_I16 => Some(2),
            T_U32 | T_I32 | T_F32 => Some(4),
            T_U64 | T_I64 | T_F64 => Some(8),
            _ => None,
        }
    }

    fn value(&mut self, ty: u32, key: &str) -> Result<Value, String> {
        Ok(match ty {
            T_U32 => Value::U32(self.u32()?),
            T_U64 => Value::U64(self.u64()?),
            T_F32 => Value::F32(f32::from_bits(self.u32()?)),
            T_STRING => Value::Str(self.string()?),
            T_ARRAY => {
                let elem = self.u32()?;
                let n = self.u64()?;
                if elem == T_U32 {
                    let raw = self.take(n.checked_mul(4).ok_or_else(|| format!("metadata '{key}': array too long"))?)?;
                    Value::U32s(raw.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
                } else if let Some(size) = Self::scalar_size(elem) {
                    self.take(n.checked_mul(size).ok_or_else(|| format!("metadata '{key}': array too long"))?)?;
                    Value::Other(T_ARRAY)
                } else if elem == T_STRING {
                    for _ in 0..n {
                        self.string()?;
                    }
                    Value::Other(T_ARRAY)
                } else {
                    return Err(format!("metadata '{key}': arrays of type {elem} are not readable here"));
                }
            }
            t => match Self::scalar_size(t) {
                Some(size) => {
                    self.take(size)?;
                    Value::Other(t)
                }
                None => return Err(format!("metadata '{key}' has unknown type {t}")),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> File {
        let mut f = File::default();
        f.kv.insert("a.u32".into(), Value::U32(7));
        f.kv.insert("a.u64".into(), Value::U64(1 << 40));
        f.kv.insert("a.f32".into(), Value::F32(0.5));
        f.kv.insert("a.str".into(), Value::Str("héllo".into()));
        f.kv.insert("a.arr".into(), Value::U32s(vec![1, 2, 3]));
        f.tensors.push(("t0".into(), Tensor { dims: vec![3, 5], data: (0..15).map(|i| i as f32 * 0.25).collect() }));
        f.tensors.push(("t1".into(), Tensor { dims: vec![1], data: vec![-1.0] }));
        f
    }

    #[test]
    fn round_trip() {
        let f = sample();
        let b = f.to_bytes();
        assert_eq!(&b[..4], b"GGUF");
        assert_eq!(File::parse(&b).unwrap(), f);
        assert_eq!(f.u32("a.u32"), Ok(7));
        assert!(f.u32("a.str").unwrap_err().contains("not a u32"));
        assert!(f.str("nope").unwrap_err().contains("missing"));
    }

    #[test]
    fn every_truncation_and_many_corruptions_are_errors_not_panics() {
        let b = sample().to_bytes();
        for n in 0..b.len() - 1 {
            // cutting into the padding after the last tensor's data still parses; anything
            // shorter than its end must fail
            let r = File::parse(&b[..n]);
            if n < b.len() - 28 {
                assert!(r.is_err(), "truncated to {n} of {} bytes parsed", b.len());
            }
        }
        let mut s = 0x1234_5678u64;
        for i in 0..4000 {
            let mut c = b.clone();
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            c[(s as usize) % b.len()] ^= 1 << (i % 8);
            let _ = File::parse(&c); // must return, whatever it returns
        }
        let mut bad = b.clone();
        bad[0] = b'X';
        assert!(File::parse(&bad).unwrap_err().contains("magic"));
    }
}
