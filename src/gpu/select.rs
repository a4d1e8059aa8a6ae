//! The GPU tier's selection, as its kernels compute it (`hc_cut`, `hc_layer_k`, `hc_compact` in
//! `kernels/hc.cu`), and what the host does with their output: the value sums.
//!
//! A head's cut is a threshold on the probabilities' bit patterns (probabilities are >= 0, so
//! the bits order like the values) plus a number of ties taken in index order; it is found by
//! four radix passes of 8 bits, narrowing the bucket that holds the boundary, with no sort.
//! [`cut`] runs the same passes on the host: the tests hold it to the sort-based references of
//! `crate::select`, and the GPU check holds the kernels to it.

use half::f16;

use crate::approx::weighted_sum;

/// One head's cut: every probability whose bits exceed `bits`, and the first `ties` (in index
/// order) whose bits equal it; `k` tokens of mass `mass` in all.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cut {
    pub bits: u32,
    pub above: u32,
    pub ties: u32,
    pub k: u32,
    pub mass: f64,
}

/// What a cut keeps.
#[derive(Debug, Clone, Copy)]
pub enum Rule {
    /// the smallest top set whose mass reaches tau (every token when tau >= 1 or when the
    /// whole mass falls short)
    TopP(f32),
    /// the k most probable
    TopK(usize),
}

/// The cut of one head's probabilities `p` (the host twin of `hc_cut`).
pub fn cut(p: &[f32], rule: Rule) -> Cut {
    let n = p.len();
    let (top_k, k, tau) = match rule {
        Rule::TopP(t) => (false, 0, t),
        Rule::TopK(k) => (true, k.min(n), 0.0),
    };
    if top_k && k == 0 {
        return Cut { bits: u32::MAX, above: 0, ties: 0, k: 0, mass: 0.0 };
    }
    let everything = if top_k { k >= n } else { tau >= 1.0 };
    let all = || Cut { bits: 0, above: 0, ties: u32::MAX, k: n as u32, mass: p.iter().map(|&x| x as f64).sum() };
    if everything {
        return all();
    }
    let (mut prefix, mut mask, mut tied) = (0u32, 0u32, 0u32);
    let (mut above, mut above_mass) = (0u32, 0.0f64);
    for pass in 0..4 {
        let shift = 24 - 8 * pass;
        let mut cnt = [0u32; 256];
        let mut ms = [0f64; 256];
        for &x in p {
            let b = x.to_bits();
            if b & mask == prefix {
                let d = ((b >> shift) & 255) as usize;
                cnt[d] += 1;
                if !top_k {
                    ms[d] += x as f64;
                }
            }
        }
        let (mut chosen, mut lowest) = (None, None);
        for d in (0..256).rev() {
            if cnt[d] == 0 {
                continue;
            }
            let reach = if top_k { above as usize + cnt[d] as usize >= k } else { above_mass + ms[d] >= tau as f64 };
            if reach {
                chosen = Some(d);
                break;
            }
            above += cnt[d];
            above_mass += ms[d];
            lowest = Some(d);
        }
        if chosen.is_none() && pass > 0 {
            // the parent bucket reached tau; summed in another order its parts may not
            if let Some(d) = lowest {
                above -= cnt[d];
                above_mass -= ms[d];
                chosen = Some(d);
            }
        }
        let Some(d) = chosen else { return all() };
        prefix |= (d as u32) << shift;
        mask |= 255 << shift;
        tied = cnt[d];
    }
    let t = f32::from_bits(prefix) as f64;
    let (ties, mass) = if top_k {
        let ties = k as u32 - above;
        let s: f64 = p.iter().filter(|x| x.to_bits() > prefix).map(|&x| x as f64).sum();
        (ties, s + ties as f64 * t)
    } else {
        let (mut ties, mut m) = (0, above_mass);
        while ties < tied {
            m += t;
            ties += 1;
            if m >= tau as f64 {
                break;
            }
        }
        (ties, m)
    };
    Cut { bits: prefix, above, ties, k: above + ties, mass }
}

/// The layer's k from its heads' cuts (`hc_layer_k`; the same grid as `crate::select::layer_k`).
pub fn layer_k(cuts: &[Cut], n: usize) -> usize {
    let ks: Vec<usize> = cuts.iter().map(|c| c.k as usize).collect();
    crate::select::layer_k(&ks, n)
}

/// Appends the indices and probabilities a cut keeps, in index order (`hc_compact`).
pub fn compact(p: &[f32], c: &Cut, sel: &mut Vec<u32>, sel_p: &mut Vec<f32>) {
    let mut tied = 0;
    for (j, &x) in p.iter().enumerate() {
        let b = x.to_bits();
        let take = b > c.bits || (b == c.bits && {
            tied += 1;
            tied <= c.ties
        });
        if take {
            sel.push(j as u32);
            sel_p.push(x);
        }
    }
}

/// What one decode step of one layer brings back from the GPU: per head its cut, and all
/// heads' selected indices (into the visible list) and probabilities, packed head after head.
#[derive(Debug, Default, Clone)]
pub struct Selection {
    pub cuts: Vec<Cut>,
    pub sel: Vec<u32>,
    pub p: Vec<f32>,
}

/// Per-thread scratch of [`Selection::sum_head`].
#[derive(Debug, Default)]
pub struct SumScratch {
    cells: Vec<(i32, u32)>,
    ident: Vec<u32>,
}

impl Selection {
    /// The selection the kernels make for `n_head` heads of probabilities (`probs`, n a head),
    /// computed on the host: top-p per head, or with `layer_k` one k for all heads.
    pub fn compute(&mut self, probs: &[f32], n: usize, tau: f32, layer: bool) {
        let heads = probs.len().checked_div(n).unwrap_or(0);
        self.cuts.clear();
        self.sel.clear();
        self.p.clear();
        for h in 0..heads {
            self.cuts.push(cut(&probs[h * n..(h + 1) * n], Rule::TopP(tau)));
        }
        if layer {
            let k = layer_k(&self.cuts, n);
            for h in 0..heads {
                self.cuts[h] = cut(&probs[h * n..(h + 1) * n], Rule::TopK(k));
            }
        }
        for h in 0..heads {
            compact(&probs[h * n..(h + 1) * n], &self.cuts[h], &mut self.sel, &mut self.p);
        }
    }

    /// Where head h's entries start in `sel` and `p`.
    pub fn offset(&self, h: usize) -> usize {
        self.cuts[..h].iter().map(|c| c.k as usize).sum()
    }

    /// Checks what came back from the device before the host trusts its indices: the counts
    /// add up and every index is inside the visible list.
    pub fn check(&self, n: usize) -> Result<(), String> {
        let total: usize = self.cuts.iter().map(|c| c.k as usize).sum();
        if total != self.sel.len() || total != self.p.len() {
            return Err(format!("the GPU selected {total} tokens but returned {} indices", self.sel.len()));
        }
        if let Some(&j) = self.sel.iter().find(|&&j| j as usize >= n) {
            return Err(format!("the GPU returned index {j} for {n} visible tokens"));
        }
        Ok(())
    }

    /// Head h's value sum: out = w * sum of p_j * value(cells[sel_j]), w = 1 / mass with
    /// `renorm`, as the CPU tier's `approx::select_and_sum`.
    pub fn sum_head<'a>(&self, h: usize, cells: &[(i32, u32)], renorm: bool, val: impl Fn(u32) -> &'a [f16], s: &mut SumScratch, out: &mut [f32]) {
        let (at, c) = (self.offset(h), self.cuts[h]);
        let k = c.k as usize;
        s.cells.clear();
        s.cells.extend(self.sel[at..at + k].iter().map(|&j| cells[j as usize]));
        if s.ident.len() < k {
            let from = s.ident.len() as u32;
            s.ident.extend(from..k as u32);
        }
        let w = if renorm && c.mass > 0.0 { (1.0 / c.mass) as f32 } else { 1.0 };
        weighted_sum(&self.p[at..at + k], &s.ident[..k], w, &s.cells, val, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::select::tests::{rng, softmax};
    use crate::select::{top_k_sorted, top_p_sorted};

    fn selected(p: &[f32], rule: Rule) -> Vec<u32> {
        let c = cut(p, rule);
        let (mut s, mut sp) = (Vec::new(), Vec::new());
        compact(p, &c, &mut s, &mut sp);
        assert_eq!(s.len(), c.k as usize);
        assert!(sp.iter().zip(&s).all(|(x, &j)| *x == p[j as usize]));
        s
    }

    fn sorted(mut v: Vec<u32>) -> Vec<u32> {
        v.sort_unstable();
        v
    }

    #[test]
    fn radix_cut_equals_the_sort_based_references() {
        let mut seed = 77u64;
        for case in 0..300 {
            let n = 1 + (case * 37) % 3000;
            // sharp and flat distributions, and coarse logits that make many exact ties
            let sharp = 1.0 + (case % 7) as f32 * 3.0;
            let z: Vec<f32> = (0..n)
                .map(|_| {
                    let x = rng(&mut seed) * sharp;
                    if case % 3 == 0 {
                        (x * 4.0).round() / 4.0
                    } else {
                        x
                    }
                })
                .collect();
            let p = softmax(&z);
            for tau in [0.1f32, 0.5, 0.9, 0.99, 1.0] {
                assert_eq!(selected(&p, Rule::TopP(tau)), sorted(top_p_sorted(&p, tau)), "case {case}, n {n}, tau {tau}");
            }
            for k in [0, 1, n / 3, n - 1, n, n + 5] {
                assert_eq!(selected(&p, Rule::TopK(k)), top_k_sorted(&p, k), "case {case}, n {n}, k {k}");
            }
        }
    }

    #[test]
    fn mass_short_of_tau_selects_everything() {
        // a sink took most of the mass: 0.3 visible, tau 0.9
        let p = vec![0.1f32, 0.05, 0.15, 0.0];
        let c = cut(&p, Rule::TopP(0.9));
        assert_eq!(c.k, 4);
        assert!((c.mass - 0.3).abs() < 1e-6);
        assert_eq!(selected(&p, Rule::TopP(0.9)), sorted(top_p_sorted(&p, 0.9)));
        // all equal: ties in index order
        let p = vec![0.25f32; 4];
        assert_eq!(selected(&p, Rule::TopP(0.5)), vec![0, 1]);
        assert_eq!(selected(&p, Rule::TopK(3)), vec![0, 1, 2]);
    }

    #[test]
    fn selection_and_value_sums_equal_the_cpu_tier() {
        use crate::approx::{select_and_sum, Approx};
        use crate::select::{Histogram, TopP};
        let mut seed = 3u64;
        let (n, heads, dv) = (700, 6, 16);
        let vals: Vec<Vec<f16>> = (0..n).map(|_| (0..dv).map(|_| f16::from_f32(rng(&mut seed) - 0.5)).collect()).collect();
        // visible cells in a scattered order, as after sequence edits
        let cells: Vec<(i32, u32)> = (0..n as u32).map(|j| (j as i32, (j * 7 + 3) % n as u32)).collect();
        let probs: Vec<f32> = (0..heads).flat_map(|h| softmax(&(0..n).map(|_| rng(&mut seed) * (2.0 + h as f32)).collect::<Vec<_>>())).collect();
        for (layer, renorm) in [(false, false), (false, true), (true, true), (true, false)] {
            let a = Approx { tau: 0.9, renorm, layer_k: layer };
            let mut s = Selection::default();
            s.compute(&probs, n, a.tau, layer);
            s.check(n).unwrap();
            let k_layer = layer.then(|| {
                let ks: Vec<usize> = (0..heads).map(|h| top_p_sorted(&probs[h * n..(h + 1) * n], a.tau).len()).collect();
                crate::select::layer_k(&ks, n)
            });
            for h in 0..heads {
                let p = &probs[h * n..(h + 1) * n];
                let mut hist = Histogram::default();
                hist.build(p);
                let (mut top, mut sel) = (TopP::default(), Vec::new());
                let mut want = vec![0f32; dv];
                select_and_sum(p, &hist, &cells, a, k_layer, &mut top, &mut sel, |c| &vals[c as usize], &mut want);
                let mut got = vec![0f32; dv];
                s.sum_head(h, &cells, renorm, |c| &vals[c as usize], &mut SumScratch::default(), &mut got);
                assert_eq!(s.cuts[h].k as usize, sel.len(), "head {h}, layer {layer}");
                for (x, y) in got.iter().zip(&want) {
                    assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "head {h}, layer {layer}, renorm {renorm}: {x} vs {y}");
                }
            }
        }
    }

    #[test]
    fn a_bad_device_answer_is_refused() {
        let mut s = Selection::default();
        s.compute(&[0.5, 0.25, 0.25], 3, 0.6, false);
        assert!(s.check(3).is_ok());
        s.sel[0] = 9;
        assert!(s.check(3).unwrap_err().contains("index 9"));
        s.sel.pop();
        assert!(s.check(3).unwrap_err().contains("selected"));
    }
}
