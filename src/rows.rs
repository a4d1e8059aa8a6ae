//! Half-precision row storage shared by the graph threads of one op.
//!
//! The store op writes the rows of this ubatch's cells from several threads at once (each thread
//! its own cells), and the attention op reads rows from several threads after ggml's barrier
//! between the two ops. `&self` access with `unsafe` row accessors models exactly that; every
//! other change goes through `&mut self`.
//!
//! Rows live in host memory, or (`values=file:DIR`, the file tier) in a memory-mapped file
//! that is created, fully allocated and unlinked at once: the kernel pages it to disk under
//! memory pressure, a full disk is an error at creation rather than a SIGBUS later, and no
//! crash can leave a file behind for a later run to mistake for state.

use std::cell::UnsafeCell;
use std::path::Path;

use half::f16;

use crate::error::{Error, Result};

enum Store {
    Heap(Vec<f16>),
    File(memmap2::MmapMut),
    None,
}

impl Store {
    fn slice(&self) -> &[f16] {
        match self {
            Store::Heap(v) => v,
            // SAFETY: the mapping is page-aligned, its length a multiple of 2 (sized below),
            // and every bit pattern is a valid f16.
            Store::File(m) => unsafe { std::slice::from_raw_parts(m.as_ptr() as *const f16, m.len() / 2) },
            Store::None => &[],
        }
    }

    fn slice_mut(&mut self) -> &mut [f16] {
        match self {
            Store::Heap(v) => v,
            // SAFETY: as in `slice`.
            Store::File(m) => unsafe { std::slice::from_raw_parts_mut(m.as_mut_ptr() as *mut f16, m.len() / 2) },
            Store::None => &mut [],
        }
    }
}

pub struct Rows {
    data: UnsafeCell<Store>,
    row_len: usize,
    n_rows: usize,
}

// SAFETY: shared access is limited to the unsafe `row`/`write_row`, whose callers guarantee that
// no row is written while another thread reads or writes it (see the module comment).
unsafe impl Sync for Rows {}

impl Rows {
    /// `n_rows` zeroed rows of `row_len` values; with `alloc = false` nothing is allocated and
    /// only the projected size is known (llama.cpp's -fit probe).
    pub fn new(n_rows: usize, row_len: usize, alloc: bool) -> Result<Rows> {
        let n = n_rows.checked_mul(row_len).ok_or_else(|| Error::Config(format!("{n_rows} rows of {row_len} values overflow")))?;
        let data = if alloc && n > 0 { Store::Heap(crate::error::filled(n, f16::ZERO, "the host tier's values")?) } else { Store::None };
        Ok(Rows { data: UnsafeCell::new(data), row_len, n_rows })
    }

    /// The same rows in a memory-mapped file in `dir` (see the module comment).
    pub fn in_file(n_rows: usize, row_len: usize, dir: &Path) -> Result<Rows> {
        let bytes = n_rows * row_len * std::mem::size_of::<f16>();
        let fail = |what: &str, e: std::io::Error| Error::Config(format!("values=file:{}: {what}: {e}", dir.display()));
        if !dir.is_dir() {
            return Err(Error::Config(format!("values=file:{}: no such folder", dir.display())));
        }
        static SERIAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let serial = SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = dir.join(format!(".hcattn-values-{}-{serial}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| fail("cannot create a file there", e))?;
        // unlinked at once: the mapping keeps the data, nothing outlives the process
        let _ = std::fs::remove_file(&path);
        if bytes == 0 {
            return Ok(Rows { data: UnsafeCell::new(Store::None), row_len, n_rows });
        }
        use std::os::fd::AsRawFd;
        // SAFETY: a valid open descriptor; posix_fallocate only allocates its blocks.
        let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, bytes as libc::off_t) };
        if rc != 0 {
            return Err(fail(&format!("cannot allocate {} MiB", bytes >> 20), std::io::Error::from_raw_os_error(rc)));
        }
        // SAFETY: the file is ours alone (created exclusively, then unlinked) and sized above.
        let map = unsafe { memmap2::MmapMut::map_mut(&file) }.map_err(|e| fail("cannot map the file", e))?;
        Ok(Rows { data: UnsafeCell::new(Store::File(map)), row_len, n_rows })
    }

    /// True when the rows are in the file tier.
    pub fn is_file(&self) -> bool {
        // SAFETY: reading the variant only; it never changes through &self.
        unsafe { matches!(&*self.data.get(), Store::File(_)) }
    }

    pub fn row_len(&self) -> usize {
        self.row_len
    }

    /// Bytes these rows take (or would take, when not allocated).
    pub fn bytes(&self) -> usize {
        self.n_rows * self.row_len * std::mem::size_of::<f16>()
    }

    pub fn is_allocated(&self) -> bool {
        // SAFETY: reading the length only; the store is never resized through &self.
        unsafe { (*self.data.get()).slice().len() == self.n_rows * self.row_len && self.n_rows * self.row_len > 0 }
    }

    /// Read one row.
    ///
    /// # Safety
    /// No thread may write row `r` for as long as the returned slice is alive.
    pub unsafe fn row(&self, r: usize) -> &[f16] {
        let v = (*self.data.get()).slice();
        &v[r * self.row_len..(r + 1) * self.row_len]
    }

    /// Write one row from f32 values (rounded to nearest half).
    ///
    /// # Safety
    /// No other thread may read or write row `r` during the call.
    pub unsafe fn write_row(&self, r: usize, src: &[f32]) {
        assert_eq!(src.len(), self.row_len);
        let v = (*self.data.get()).slice_mut();
        let dst = &mut v[r * self.row_len..(r + 1) * self.row_len];
        for (d, s) in dst.iter_mut().zip(src) {
            *d = f16::from_f32(*s);
        }
    }

    pub fn row_mut(&mut self, r: usize) -> &mut [f16] {
        let len = self.row_len;
        &mut self.data.get_mut().slice_mut()[r * len..(r + 1) * len]
    }

    pub fn row_ref(&mut self, r: usize) -> &[f16] {
        self.row_mut(r)
    }

    pub fn zero(&mut self) {
        self.data.get_mut().slice_mut().iter_mut().for_each(|x| *x = f16::ZERO);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_then_read_rounds_to_half() {
        let mut r = Rows::new(3, 2, true).unwrap();
        unsafe { r.write_row(1, &[1.0, 0.1]) };
        assert_eq!(r.row_mut(1)[0].to_f32(), 1.0);
        assert!((r.row_mut(1)[1].to_f32() - 0.1).abs() < 1e-4);
        assert_eq!(r.row_mut(0)[0].to_f32(), 0.0);
        assert_eq!(r.bytes(), 12);
    }

    #[test]
    fn file_tier_rows_work_and_leave_no_file() {
        let dir = std::env::temp_dir().join(format!("hcattn-rows-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut r = Rows::in_file(100, 8, &dir).unwrap();
        assert!(r.is_allocated() && r.is_file());
        unsafe { r.write_row(99, &[2.0; 8]) };
        assert_eq!(r.row_mut(99)[7].to_f32(), 2.0);
        assert_eq!(r.row_mut(0)[0].to_f32(), 0.0);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "the file is unlinked at once");
        drop(r);
        let e = Rows::in_file(10, 8, &dir.join("missing")).err().unwrap().to_string();
        assert!(e.contains("no such folder") && e.contains("missing"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unallocated_reports_size_only() {
        let r = Rows::new(1000, 64, false).unwrap();
        assert!(!r.is_allocated());
        assert_eq!(r.bytes(), 128_000);
    }
}
