//! Cell bookkeeping: which cell holds which position for which sequences. A cell's K/V rows live
//! in the stores at the cell's index; this module never touches them.
//!
//! Semantics follow llama.cpp's KV cells: a cell carries a set of sequences (seq_cp shares a
//! cell, it does not copy it), and a cell is free once its set is empty.

use crate::error::{Error, Result};

/// llama.cpp's LLAMA_MAX_SEQ.
pub const MAX_SEQ: usize = 256;

/// A set of sequence ids in [0, 256).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SeqSet([u64; 4]);

impl SeqSet {
    pub fn one(s: usize) -> SeqSet {
        let mut x = SeqSet::default();
        x.insert(s);
        x
    }
    pub fn insert(&mut self, s: usize) {
        self.0[s / 64] |= 1 << (s % 64);
    }
    pub fn remove(&mut self, s: usize) {
        self.0[s / 64] &= !(1 << (s % 64));
    }
    pub fn contains(&self, s: usize) -> bool {
        self.0[s / 64] & (1 << (s % 64)) != 0
    }
    pub fn is_empty(&self) -> bool {
        self.0 == [0; 4]
    }
    /// The members, in increasing order; visits set bits only.
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.0.iter().enumerate().flat_map(|(k, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let b = w.trailing_zeros() as usize;
                w &= w - 1;
                Some(k * 64 + b)
            })
        })
    }
}

/// Which sequences an operation applies to: one, or all of them (seq < 0 in llama.cpp).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seqs {
    All,
    One(usize),
}

/// A position range [p0, p1) with llama.cpp's conventions: p0 < 0 means 0, p1 < 0 means infinity.
pub fn pos_range(p0: i32, p1: i32) -> (i32, i32) {
    (p0.max(0), if p1 < 0 { i32::MAX } else { p1 })
}

#[derive(Debug, Clone)]
pub struct Cells {
    /// Position of each cell, meaningful only when its set is not empty.
    pos: Vec<i32>,
    seqs: Vec<SeqSet>,
    n_used: usize,
    /// Where the search for a free cell starts.
    hint: usize,
    n_seq_max: usize,
    /// Cells freed since the last `take_freed`, so the stores can drop their rows.
    freed: Vec<u32>,
}

impl Cells {
    pub fn new(n_cells: usize, n_seq_max: usize) -> crate::error::Result<Cells> {
        use crate::error::filled;
        Ok(Cells {
            pos: filled(n_cells, 0, "the cells' positions")?,
            seqs: filled(n_cells, SeqSet::default(), "the cells' sequences")?,
            n_used: 0,
            hint: 0,
            n_seq_max,
            freed: Vec::new(),
        })
    }

    pub fn len(&self) -> usize {
        self.pos.len()
    }
    pub fn is_empty(&self) -> bool {
        self.pos.is_empty()
    }
    /// Sequence ids are in [0, seq_limit).
    pub fn seq_limit(&self) -> usize {
        self.n_seq_max
    }
    pub fn n_used(&self) -> usize {
        self.n_used
    }
    pub fn n_free(&self) -> usize {
        self.len() - self.n_used
    }
    pub fn pos(&self, c: usize) -> i32 {
        self.pos[c]
    }
    pub fn seqs(&self, c: usize) -> &SeqSet {
        &self.seqs[c]
    }
    pub fn is_used(&self, c: usize) -> bool {
        !self.seqs[c].is_empty()
    }

    /// Check a sequence id coming from outside.
    pub fn seq(&self, s: i32) -> Result<Seqs> {
        if s < 0 {
            Ok(Seqs::All)
        } else if (s as usize) < self.n_seq_max {
            Ok(Seqs::One(s as usize))
        } else {
            Err(Error::Request(format!("sequence id {s} is out of range [0, {})", self.n_seq_max)))
        }
    }

    /// Cells that a sequence holds.
    pub fn count_seq(&self, s: usize) -> usize {
        self.seqs.iter().filter(|x| x.contains(s)).count()
    }

    /// Take a free cell for `pos` in the sequences `set`. None when the cache is full.
    pub fn alloc(&mut self, pos: i32, set: SeqSet) -> Option<usize> {
        let n = self.len();
        for k in 0..n {
            let c = (self.hint + k) % n;
            if self.seqs[c].is_empty() {
                self.pos[c] = pos;
                self.seqs[c] = set;
                self.n_used += 1;
                self.hint = (c + 1) % n;
                return Some(c);
            }
        }
        None
    }

    /// Put `set` into cell `c` (used by state restore, which places cells itself).
    pub fn set(&mut self, c: usize, pos: i32, set: SeqSet) {
        if self.seqs[c].is_empty() && !set.is_empty() {
            self.n_used += 1;
        } else if !self.seqs[c].is_empty() && set.is_empty() {
            self.n_used -= 1;
            self.freed.push(c as u32);
        }
        self.pos[c] = pos;
        self.seqs[c] = set;
    }

    /// Cells that became free since the last call.
    pub fn take_freed(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.freed)
    }

    pub fn clear(&mut self) {
        self.freed.clear();
        self.seqs.iter_mut().for_each(|s| *s = SeqSet::default());
        self.n_used = 0;
        self.hint = 0;
    }

    /// Remove the sequences from the cells in [p0, p1). Always succeeds for this cache.
    pub fn seq_rm(&mut self, seqs: Seqs, p0: i32, p1: i32) {
        let (p0, p1) = pos_range(p0, p1);
        for c in 0..self.len() {
            if self.seqs[c].is_empty() || self.pos[c] < p0 || self.pos[c] >= p1 {
                continue;
            }
            let mut set = self.seqs[c];
            match seqs {
                Seqs::All => set = SeqSet::default(),
                Seqs::One(s) => set.remove(s),
            }
            self.set(c, self.pos[c], set);
        }
    }

    /// Let `dst` share the cells of `src` in [p0, p1).
    pub fn seq_cp(&mut self, src: usize, dst: usize, p0: i32, p1: i32) {
        if src == dst {
            return;
        }
        let (p0, p1) = pos_range(p0, p1);
        for c in 0..self.len() {
            if self.seqs[c].contains(src) && self.pos[c] >= p0 && self.pos[c] < p1 {
                self.seqs[c].insert(dst);
            }
        }
    }

    /// Drop every sequence but `s`.
    pub fn seq_keep(&mut self, s: usize) {
        for c in 0..self.len() {
            if self.seqs[c].is_empty() {
                continue;
            }
            let set = if self.seqs[c].contains(s) { SeqSet::one(s) } else { SeqSet::default() };
            self.set(c, self.pos[c], set);
        }
    }

    /// Smallest and largest position of a sequence (or of every sequence), -1 when empty.
    pub fn pos_min_max(&self, seqs: Seqs) -> (i32, i32) {
        let mut lo = i32::MAX;
        let mut hi = -1;
        for c in 0..self.len() {
            let hit = match seqs {
                Seqs::All => !self.seqs[c].is_empty(),
                Seqs::One(s) => self.seqs[c].contains(s),
            };
            if hit {
                lo = lo.min(self.pos[c]);
                hi = hi.max(self.pos[c]);
            }
        }
        if hi < 0 {
            (-1, -1)
        } else {
            (lo, hi)
        }
    }

    /// The cells of sequence `s` ordered by (position, cell index).
    pub fn sorted_seq(&self, s: usize) -> Vec<(i32, u32)> {
        let mut v: Vec<(i32, u32)> =
            (0..self.len()).filter(|&c| self.seqs[c].contains(s)).map(|c| (self.pos[c], c as u32)).collect();
        v.sort_unstable();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filled(n: usize, seq: usize, count: i32) -> Cells {
        let mut c = Cells::new(n, 4).unwrap();
        for p in 0..count {
            c.alloc(p, SeqSet::one(seq)).unwrap();
        }
        c
    }

    #[test]
    fn alloc_until_full() {
        let mut c = filled(4, 0, 4);
        assert_eq!(c.n_free(), 0);
        assert_eq!(c.alloc(9, SeqSet::one(0)), None);
        assert_eq!(c.pos_min_max(Seqs::One(0)), (0, 3));
    }

    #[test]
    fn seq_rm_suffix_and_reuse() {
        let mut c = filled(8, 0, 6);
        c.seq_rm(Seqs::One(0), 3, -1);
        assert_eq!(c.pos_min_max(Seqs::One(0)), (0, 2));
        assert_eq!(c.n_used(), 3);
        assert!(c.alloc(3, SeqSet::one(0)).is_some());
        assert_eq!(c.pos_min_max(Seqs::One(0)), (0, 3));
    }

    #[test]
    fn seq_cp_shares_and_rm_frees_only_when_unshared() {
        let mut c = filled(8, 0, 4);
        c.seq_cp(0, 1, -1, -1);
        assert_eq!(c.n_used(), 4, "seq_cp shares cells");
        assert_eq!(c.pos_min_max(Seqs::One(1)), (0, 3));
        c.seq_rm(Seqs::One(0), -1, -1);
        assert_eq!(c.n_used(), 4, "cells still held by seq 1");
        assert_eq!(c.pos_min_max(Seqs::One(0)), (-1, -1));
        c.seq_rm(Seqs::One(1), 2, -1);
        assert_eq!(c.n_used(), 2);
    }

    #[test]
    fn seq_keep_drops_others() {
        let mut c = Cells::new(8, 4).unwrap();
        for s in 0..3 {
            for p in 0..2 {
                c.alloc(p, SeqSet::one(s)).unwrap();
            }
        }
        c.seq_cp(2, 1, 0, 1);
        c.seq_keep(1);
        assert_eq!(c.n_used(), 3);
        assert_eq!(c.count_seq(1), 3);
        assert_eq!(c.pos_min_max(Seqs::One(0)), (-1, -1));
        assert_eq!(c.pos_min_max(Seqs::One(2)), (-1, -1));
    }

    #[test]
    fn sorted_seq_orders_by_position() {
        let mut c = Cells::new(8, 2).unwrap();
        for p in [5, 1, 3] {
            c.alloc(p, SeqSet::one(1)).unwrap();
        }
        let v: Vec<i32> = c.sorted_seq(1).iter().map(|x| x.0).collect();
        assert_eq!(v, vec![1, 3, 5]);
    }

    #[test]
    fn seq_set_iterates_its_members_in_order() {
        let mut s = SeqSet::default();
        for x in [255, 0, 64, 63, 130] {
            s.insert(x);
        }
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![0, 63, 64, 130, 255]);
        s.remove(64);
        assert_eq!(s.iter().count(), 4);
        assert!(SeqSet::default().iter().next().is_none());
    }

    #[test]
    fn seq_ids_are_checked() {
        let c = Cells::new(2, 4).unwrap();
        assert_eq!(c.seq(-1).unwrap(), Seqs::All);
        assert_eq!(c.seq(3).unwrap(), Seqs::One(3));
        assert!(c.seq(4).unwrap_err().to_string().contains("out of range"));
    }
}
