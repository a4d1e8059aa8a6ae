//! Saving and restoring the cache (llama_state_* and llama_state_seq_*).
//!
//! Layout, little-endian: `"HCKV"`, version u32, the key codec as a length-prefixed string,
//! n_layers u32, per layer (il, n_head_kv, dk, dv) u32 and its codebooks (count u32, then per
//! codebook its centroid count u32, dims u32 and centroids f32); whole u8 (1 = every sequence, with sequence sets;
//! 0 = one sequence); n_cells u32; per cell pos i32 (+ sequence set as 4 u64 when whole); then
//! per layer, per saved cell, its keys as the key store writes them and its value row (f16).
//! The writer emits the same bytes for the same cache (llama.cpp counts before it writes).

use half::f16;

use crate::backend::Backend;
use crate::cells::{SeqSet, Seqs, MAX_SEQ};
use crate::codebook::Codebook;
use crate::error::{Error, Result};

const MAGIC: &[u8; 4] = b"HCKV";
const VERSION: u32 = 2;

pub fn write(be: &mut Backend, seq: i32, w: &mut dyn FnMut(&[u8])) -> Result<()> {
    let codec = format!("{:?}", be.config().options.keys);
    let (cfg, cells, layers) = be.parts_mut();
    let seqs = cells.seq(seq)?;
    let saved: Vec<usize> = (0..cells.len())
        .filter(|&c| match seqs {
            Seqs::All => cells.is_used(c),
            Seqs::One(s) => cells.seqs(c).contains(s),
        })
        .collect();
    if !saved.is_empty() && cfg.no_alloc {
        return Err(Error::State("nothing is stored in a size-only (no_alloc) backend".into()));
    }
    w(MAGIC);
    w(&VERSION.to_le_bytes());
    w(&(codec.len() as u32).to_le_bytes());
    w(codec.as_bytes());
    w(&(layers.len() as u32).to_le_bytes());
    for (d, keys, _) in &layers {
        for x in [d.il, d.n_head_kv, d.dk, d.dv] {
            w(&(x as u32).to_le_bytes());
        }
        w(&(keys.codebooks().len() as u32).to_le_bytes());
        for b in keys.codebooks() {
            w(&(b.len() as u32).to_le_bytes());
            w(&(b.dim() as u32).to_le_bytes());
            let bytes: Vec<u8> = b.centroids().iter().flat_map(|x| x.to_le_bytes()).collect();
            w(&bytes);
        }
    }
    w(&[matches!(seqs, Seqs::All) as u8]);
    w(&(saved.len() as u32).to_le_bytes());
    for &c in &saved {
        w(&cells.pos(c).to_le_bytes());
        if seqs == Seqs::All {
            let set = cells.seqs(c);
            for k in 0..4 {
                let mut word = 0u64;
                for b in 0..64 {
                    if set.contains(k * 64 + b) {
                        word |= 1 << b;
                    }
                }
                w(&word.to_le_bytes());
            }
        }
    }
    let mut bytes = Vec::new();
    for (_, keys, vals) in layers {
        for &c in &saved {
            keys.save_cell(c, w);
            bytes.clear();
            bytes.extend(vals.row_ref(c).iter().flat_map(|x| x.to_bits().to_le_bytes()));
            w(&bytes);
        }
    }
    Ok(())
}

/// Restore what `write` wrote. With `seq >= 0` the cells go to that sequence, whatever sequence
/// they were saved from. On failure the target (the whole cache, or the sequence) is left empty.
pub fn read(be: &mut Backend, seq: i32, r: &mut dyn FnMut(&mut [u8]) -> bool) -> Result<()> {
    let target = be.cells().seq(seq)?;
    let res = read_inner(be, target, r);
    if res.is_err() {
        let (_, cells, _) = be.parts_mut();
        match target {
            Seqs::All => cells.clear(),
            s => cells.seq_rm(s, -1, -1),
        }
        // let the stores drop what the failed read had placed
        let (_, _, mut layers) = be.parts_mut();
        if target == Seqs::All {
            for (_, keys, _) in layers.iter_mut() {
                keys.forget_all();
            }
        }
    }
    res
}

fn short() -> Error {
    Error::State("the saved state ends early".into())
}

fn read_u32(r: &mut dyn FnMut(&mut [u8]) -> bool) -> Result<u32> {
    let mut b = [0u8; 4];
    if !r(&mut b) {
        return Err(short());
    }
    Ok(u32::from_le_bytes(b))
}

fn read_inner(be: &mut Backend, target: Seqs, r: &mut dyn FnMut(&mut [u8]) -> bool) -> Result<()> {
    let mut magic = [0u8; 4];
    if !r(&mut magic) {
        return Err(short());
    }
    if &magic != MAGIC {
        return Err(Error::State("not a state saved by the hc backend".into()));
    }
    let version = read_u32(r)?;
    if version != VERSION {
        return Err(Error::State(format!("format version {version}, this build reads version {VERSION}")));
    }
    let codec = format!("{:?}", be.config().options.keys);
    let n = read_u32(r)? as usize;
    if n > 256 {
        return Err(Error::State("malformed key codec name".into()));
    }
    let mut saved_codec = vec![0u8; n];
    if !r(&mut saved_codec) {
        return Err(short());
    }
    if saved_codec != codec.as_bytes() {
        return Err(Error::State(format!(
            "saved with keys {}, this cache stores keys {codec}",
            String::from_utf8_lossy(&saved_codec)
        )));
    }
    let (cfg, cells, mut layers) = be.parts_mut();
    if cfg.no_alloc {
        return Err(Error::State("cannot restore into a size-only (no_alloc) backend".into()));
    }
    let limit = cells.seq_limit();
    let n_layers = read_u32(r)? as usize;
    if n_layers != layers.len() {
        return Err(Error::State(format!("saved with {n_layers} layers, this cache has {}", layers.len())));
    }
    let mut books = Vec::with_capacity(n_layers);
    for (d, _, _) in &layers {
        let got: Vec<u32> = (0..4).map(|_| read_u32(r)).collect::<Result<_>>()?;
        let want = [d.il as u32, d.n_head_kv as u32, d.dk as u32, d.dv as u32];
        if got != want {
            return Err(Error::State(format!(
                "saved layer shape (il, kv heads, dk, dv) = {got:?} does not match this cache's {want:?}"
            )));
        }
        let n_books = read_u32(r)? as usize;
        if n_books > d.dk {
            return Err(Error::State(format!("malformed state: {n_books} codebooks for head dimension {}", d.dk)));
        }
        let mut layer_books = Vec::with_capacity(n_books);
        for _ in 0..n_books {
            let (count, dim) = (read_u32(r)? as usize, read_u32(r)? as usize);
            if !(1..=65536).contains(&count) || !(1..=8).contains(&dim) {
                return Err(Error::State(format!("malformed codebook ({count} centroids of {dim} dims)")));
            }
            let mut b = vec![0u8; count * dim * 4];
            if !r(&mut b) {
                return Err(short());
            }
            let c: Vec<f32> = b.chunks_exact(4).map(|x| f32::from_le_bytes([x[0], x[1], x[2], x[3]])).collect();
            layer_books.push(std::sync::Arc::new(Codebook::new(dim, c).map_err(|e| Error::State(format!("codebook: {e}")))?));
        }
        books.push(layer_books);
    }
    let mut whole = [0u8; 1];
    if !r(&mut whole) {
        return Err(short());
    }
    let whole = match whole[0] {
        0 => false,
        1 => true,
        x => return Err(Error::State(format!("bad sequence-scope byte {x}"))),
    };
    if whole != (target == Seqs::All) {
        return Err(Error::State(if whole {
            "this is a whole-cache state; restore it with the whole-cache call".into()
        } else {
            "this is a one-sequence state; restore it into a sequence".into()
        }));
    }
    let n = read_u32(r)? as usize;
    if target == Seqs::All {
        for (_, keys, _) in layers.iter_mut() {
            keys.forget_all();
        }
    }
    for ((_, keys, _), b) in layers.iter_mut().zip(books) {
        // a one-sequence restore into a cache that fitted its own codebooks works only if they
        // agree: codes are meaningless under other codebooks
        let mine = keys.codebooks();
        let same = mine.len() == b.len() && mine.iter().zip(&b).all(|(x, y)| x.centroids() == y.centroids());
        if target != Seqs::All && !mine.is_empty() && !b.is_empty() && !same {
            return Err(Error::State("the saved sequence was coded with other codebooks than this cache's".into()));
        }
        if target == Seqs::All || mine.is_empty() {
            keys.set_codebooks(b)?;
        }
    }

    // pick the destination cells first
    let mut placed: Vec<usize> = Vec::with_capacity(n.min(cells.len()));
    match target {
        Seqs::All => {
            if n > cells.len() {
                return Err(Error::State(format!("{n} saved cells do not fit in {} cells", cells.len())));
            }
            cells.clear();
            for c in 0..n {
                let mut p = [0u8; 4];
                if !r(&mut p) {
                    return Err(short());
                }
                let pos = i32::from_le_bytes(p);
                let mut set = SeqSet::default();
                for k in 0..4 {
                    let mut b = [0u8; 8];
                    if !r(&mut b) {
                        return Err(short());
                    }
                    let word = u64::from_le_bytes(b);
                    for bit in 0..64 {
                        if word & (1 << bit) != 0 {
                            let s = k * 64 + bit;
                            if s >= limit.min(MAX_SEQ) {
                                return Err(Error::State(format!("saved cell names sequence {s}, this cache takes ids below {limit}")));
                            }
                            set.insert(s);
                        }
                    }
                }
                if pos < 0 || set.is_empty() {
                    return Err(Error::State(format!("saved cell {c} is malformed (pos {pos})")));
                }
                cells.set(c, pos, set);
                placed.push(c);
            }
        }
        Seqs::One(s) => {
            cells.seq_rm(Seqs::One(s), -1, -1);
            for c in cells.take_freed() {
                for (_, keys, _) in layers.iter_mut() {
                    keys.forget(c as usize);
                }
            }
            if n > cells.n_free() || (!cfg.kv_unified && n > cfg.n_ctx_seq) {
                return Err(Error::State(format!("{n} saved cells do not fit ({} free)", cells.n_free())));
            }
            for _ in 0..n {
                let mut p = [0u8; 4];
                if !r(&mut p) {
                    return Err(short());
                }
                let pos = i32::from_le_bytes(p);
                if pos < 0 {
                    return Err(Error::State(format!("saved cell has negative position {pos}")));
                }
                placed.push(cells.alloc(pos, SeqSet::one(s)).ok_or_else(short)?);
            }
        }
    }

    let mut bytes = Vec::new();
    for (_, keys, vals) in layers {
        bytes.resize(vals.row_len() * 2, 0);
        for &c in &placed {
            keys.load_cell(c, r)?;
            if !r(&mut bytes) {
                return Err(short());
            }
            for (dst, src) in vals.row_mut(c).iter_mut().zip(bytes.chunks_exact(2)) {
                *dst = f16::from_bits(u16::from_le_bytes([src[0], src[1]]));
            }
        }
    }
    Ok(())
}
