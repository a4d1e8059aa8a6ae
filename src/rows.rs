//! Half-precision row storage shared by the graph threads of one op.
//!
//! The store op writes the rows of this ubatch's cells from several threads at once (each thread
//! its own cells), and the attention op reads rows from several threads after ggml's barrier
//! between the two ops. `&self` access with `unsafe` row accessors models exactly that; every
//! other change goes through `&mut self`.

use std::cell::UnsafeCell;

use half::f16;

pub struct Rows {
    data: UnsafeCell<Vec<f16>>,
    row_len: usize,
    n_rows: usize,
}

// SAFETY: shared access is limited to the unsafe `row`/`write_row`, whose callers guarantee that
// no row is written while another thread reads or writes it (see the module comment).
unsafe impl Sync for Rows {}

impl Rows {
    /// `n_rows` zeroed rows of `row_len` values; with `alloc = false` nothing is allocated and
    /// only the projected size is known (llama.cpp's -fit probe).
    pub fn new(n_rows: usize, row_len: usize, alloc: bool) -> Rows {
        let data = if alloc { vec![f16::ZERO; n_rows * row_len] } else { Vec::new() };
        Rows { data: UnsafeCell::new(data), row_len, n_rows }
    }

    pub fn row_len(&self) -> usize {
        self.row_len
    }

    /// Bytes these rows take (or would take, when not allocated).
    pub fn bytes(&self) -> usize {
        self.n_rows * self.row_len * std::mem::size_of::<f16>()
    }

    pub fn is_allocated(&self) -> bool {
        // SAFETY: reading the length only; the Vec itself is never resized through &self.
        unsafe { (*self.data.get()).len() == self.n_rows * self.row_len && self.n_rows * self.row_len > 0 }
    }

    /// Read one row.
    ///
    /// # Safety
    /// No thread may write row `r` for as long as the returned slice is alive.
    pub unsafe fn row(&self, r: usize) -> &[f16] {
        let v = &*self.data.get();
        &v[r * self.row_len..(r + 1) * self.row_len]
    }

    /// Write one row from f32 values (rounded to nearest half).
    ///
    /// # Safety
    /// No other thread may read or write row `r` during the call.
    pub unsafe fn write_row(&self, r: usize, src: &[f32]) {
        assert_eq!(src.len(), self.row_len);
        let v = &mut *self.data.get();
        let dst = &mut v[r * self.row_len..(r + 1) * self.row_len];
        for (d, s) in dst.iter_mut().zip(src) {
            *d = f16::from_f32(*s);
        }
    }

    pub fn row_mut(&mut self, r: usize) -> &mut [f16] {
        let len = self.row_len;
        &mut self.data.get_mut()[r * len..(r + 1) * len]
    }

    pub fn row_ref(&mut self, r: usize) -> &[f16] {
        self.row_mut(r)
    }

    pub fn zero(&mut self) {
        self.data.get_mut().iter_mut().for_each(|x| *x = f16::ZERO);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_then_read_rounds_to_half() {
        let mut r = Rows::new(3, 2, true);
        unsafe { r.write_row(1, &[1.0, 0.1]) };
        assert_eq!(r.row_mut(1)[0].to_f32(), 1.0);
        assert!((r.row_mut(1)[1].to_f32() - 0.1).abs() < 1e-4);
        assert_eq!(r.row_mut(0)[0].to_f32(), 0.0);
        assert_eq!(r.bytes(), 12);
    }

    #[test]
    fn unallocated_reports_size_only() {
        let r = Rows::new(1000, 64, false);
        assert!(!r.is_allocated());
        assert_eq!(r.bytes(), 128_000);
    }
}
