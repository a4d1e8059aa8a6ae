//! How one layer's key codes lie in GPU memory: the host-side twin of `kernels/hc.cu`'s
//! `code_at` and `hc_pack`, used to size the buffers and as the reference the tests hold the
//! kernels to.
//!
//! For each KV head, `rows` rows of `n_cells` entries; row r holds sub-vector position r of
//! every cell, so that a warp scoring 32 consecutive cells reads consecutive bytes. 4-bit codes
//! put positions 2r and 2r+1 into the low and high nibble of row r; 8-bit codes take a byte,
//! 16-bit codes two (little-endian, as the GPU reads them).

use crate::options::code_bits;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// 4, 8 or 16
    pub bits: u32,
    pub n_cells: usize,
    pub n_kvh: usize,
    /// sub-vector positions per KV head (dk / pq_dim)
    pub per_head: usize,
}

impl Layout {
    pub fn new(centroids: usize, n_cells: usize, n_kvh: usize, per_head: usize) -> Layout {
        Layout { bits: code_bits(centroids), n_cells, n_kvh, per_head }
    }

    /// Rows of one KV head's block.
    pub fn rows(&self) -> usize {
        if self.bits == 4 {
            self.per_head.div_ceil(2)
        } else {
            self.per_head
        }
    }

    fn unit(&self) -> usize {
        if self.bits == 16 {
            2
        } else {
            1
        }
    }

    /// Bytes of one KV head's block.
    pub fn head_bytes(&self) -> usize {
        self.rows() * self.n_cells * self.unit()
    }

    /// Bytes of the layer's codes (what the memory report counts for the GPU).
    pub fn bytes(&self) -> usize {
        self.n_kvh * self.head_bytes()
    }

    /// Code of position `i` of KV head `kvh` of `cell`, read from a layer's bytes.
    pub fn code_at(&self, data: &[u8], kvh: usize, i: usize, cell: usize) -> u32 {
        let block = &data[kvh * self.head_bytes()..];
        match self.bits {
            4 => {
                let b = block[(i / 2) * self.n_cells + cell];
                if i % 2 == 1 {
                    (b >> 4) as u32
                } else {
                    (b & 15) as u32
                }
            }
            8 => block[i * self.n_cells + cell] as u32,
            _ => {
                let at = 2 * (i * self.n_cells + cell);
                u16::from_le_bytes([block[at], block[at + 1]]) as u32
            }
        }
    }

    /// What `hc_pack` does: writes `staged` (per cell, n_kvh * per_head codes, row-major as the
    /// CPU tier encodes them) into `data` at `cells`. Cells outside the layout are skipped, as
    /// the kernel skips them.
    pub fn pack(&self, data: &mut [u8], staged: &[u16], cells: &[u32]) {
        let per = self.n_kvh * self.per_head;
        let (hb, n) = (self.head_bytes(), self.n_cells);
        for (j, &cell) in cells.iter().enumerate() {
            let cell = cell as usize;
            if cell >= n {
                continue;
            }
            for kvh in 0..self.n_kvh {
                let src = &staged[j * per + kvh * self.per_head..j * per + (kvh + 1) * self.per_head];
                let block = &mut data[kvh * hb..(kvh + 1) * hb];
                for r in 0..self.rows() {
                    match self.bits {
                        4 => {
                            let lo = src[2 * r] & 15;
                            let hi = src.get(2 * r + 1).map_or(0, |c| c & 15);
                            block[r * n + cell] = (lo | (hi << 4)) as u8;
                        }
                        8 => block[r * n + cell] = src[r] as u8,
                        _ => block[2 * (r * n + cell)..2 * (r * n + cell) + 2].copy_from_slice(&src[r].to_le_bytes()),
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_codes_read_back_for_every_width() {
        for (centroids, per_head) in [(16, 64), (16, 7), (256, 32), (8192, 16), (65536, 3)] {
            let l = Layout::new(centroids, 37, 3, per_head);
            let mut data = vec![0u8; l.bytes()];
            let cells: Vec<u32> = (0..37).rev().step_by(2).collect();
            let per = l.n_kvh * per_head;
            let staged: Vec<u16> = (0..cells.len() * per).map(|x| ((x * 7919 + 13) % centroids) as u16).collect();
            l.pack(&mut data, &staged, &cells);
            for (j, &cell) in cells.iter().enumerate() {
                for kvh in 0..3 {
                    for i in 0..per_head {
                        assert_eq!(l.code_at(&data, kvh, i, cell as usize), staged[j * per + kvh * per_head + i] as u32, "{centroids} centroids, cell {cell}, head {kvh}, position {i}");
                    }
                }
            }
            // cells not packed stay zero; a cell outside the layout is skipped
            for i in 0..per_head {
                assert_eq!(l.code_at(&data, 2, i, 1), 0);
            }
            let before = data.clone();
            l.pack(&mut data, &staged[..per], &[37]);
            assert_eq!(before, data);
        }
    }

    #[test]
    fn bytes_are_the_code_bits_of_every_cell() {
        // SmolLM2 with cpu12.5: 3 KV heads x 64 channels, 4-bit codes: 96 bytes a cell
        assert_eq!(Layout::new(16, 1000, 3, 64).bytes(), 96 * 1000);
        // the paper's 12.5%: 4-dim sub-vectors, 16-bit codes: 4 bits a channel too
        assert_eq!(Layout::new(8192, 1000, 3, 16).bytes(), 96 * 1000);
        assert_eq!(Layout::new(256, 10, 2, 64).bytes(), 2 * 64 * 10);
        assert_eq!(Layout::new(16, 10, 1, 5).rows(), 3);
    }
}
