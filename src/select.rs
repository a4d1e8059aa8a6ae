//! Top-p token selection: the smallest set of tokens whose attention probabilities reach `tau`.
//!
//! The order is by probability, highest first, and among equal probabilities by index, lowest
//! first; the set is the shortest prefix of that order whose mass reaches tau. [`top_p_sorted`]
//! is the reference (a full sort); [`TopP::select`] finds the same set with a partition-based
//! threshold search in expected linear time, which is what runs per head per decode step.
//! Masses are summed in f64 by both, so they agree wherever the sums are exact.

/// Reference: sort everything, take the shortest prefix reaching `tau`. Returns the selected
/// indices in selection order. `tau >= 1` selects everything.
pub fn top_p_sorted(p: &[f32], tau: f32) -> Vec<u32> {
    let mut order: Vec<u32> = (0..p.len() as u32).collect();
    order.sort_by(|&a, &b| p[b as usize].total_cmp(&p[a as usize]).then(a.cmp(&b)));
    if tau >= 1.0 {
        return order;
    }
    let mut mass = 0.0f64;
    for (k, &i) in order.iter().enumerate() {
        mass += p[i as usize] as f64;
        if mass >= tau as f64 {
            order.truncate(k + 1);
            return order;
        }
    }
    order
}

/// Reusable buffers for [`TopP::select`], so the decode loop does not allocate once warm.
#[derive(Default)]
pub struct TopP {
    cand: Vec<u32>,
    next: Vec<u32>,
    ties: Vec<u32>,
}

impl TopP {
    /// The same set as [`top_p_sorted`] (in index order, not selection order), written into
    /// `out`. Returns the selected mass.
    pub fn select(&mut self, p: &[f32], tau: f32, out: &mut Vec<u32>) -> f64 {
        out.clear();
        if tau >= 1.0 {
            out.extend(0..p.len() as u32);
            return p.iter().map(|&x| x as f64).sum();
        }
        let mut need = tau as f64;
        let mut taken = 0.0f64;
        self.cand.clear();
        self.cand.extend(0..p.len() as u32);
        while !self.cand.is_empty() {
            // pivot: median of three, by value
            let n = self.cand.len();
            let (a, b, c) = (p[self.cand[0] as usize], p[self.cand[n / 2] as usize], p[self.cand[n - 1] as usize]);
            let x = a.max(b).min(a.min(b).max(c));
            let (mut s_hi, mut s_eq) = (0.0f64, 0.0f64);
            for &i in &self.cand {
                let v = p[i as usize];
                if v > x {
                    s_hi += v as f64;
                } else if v == x {
                    s_eq += v as f64;
                }
            }
            if s_hi >= need {
                // the boundary lies among the values above x
                self.next.clear();
                self.next.extend(self.cand.iter().copied().filter(|&i| p[i as usize] > x));
                std::mem::swap(&mut self.cand, &mut self.next);
                continue;
            }
            if s_hi + s_eq >= need {
                // everything above x, then ties at x by index until the mass is reached
                out.extend(self.cand.iter().copied().filter(|&i| p[i as usize] > x));
                taken += s_hi;
                self.ties.clear();
                self.ties.extend(self.cand.iter().copied().filter(|&i| p[i as usize] == x));
                self.ties.sort_unstable();
                let mut rest = need - s_hi;
                for &i in &self.ties {
                    out.push(i);
                    taken += x as f64;
                    rest -= x as f64;
                    if rest <= 0.0 {
                        break;
                    }
                }
                out.sort_unstable();
                return taken;
            }
            // everything at or above x is selected; the boundary is below x
            out.extend(self.cand.iter().copied().filter(|&i| p[i as usize] >= x));
            taken += s_hi + s_eq;
            need -= s_hi + s_eq;
            self.next.clear();
            self.next.extend(self.cand.iter().copied().filter(|&i| p[i as usize] < x));
            std::mem::swap(&mut self.cand, &mut self.next);
        }
        // the total mass is below tau (rounding): everything is selected
        out.sort_unstable();
        taken
    }
}

/// The paper's layer-wide k: every head keeps its own top-k tokens, with k the smallest value
/// on the grid 1, 1+s, 1+2s, ... (s = max(1, n/100)) at which every head of the layer reaches
/// tau. `k_heads` are the per-head minimal k's.
pub fn layer_k(k_heads: &[usize], n: usize) -> usize {
    let kmax = k_heads.iter().copied().max().unwrap_or(0);
    if kmax == 0 || n == 0 {
        return kmax.min(n);
    }
    let s = (n / 100).max(1);
    (1 + (kmax - 1).div_ceil(s) * s).min(n)
}

/// The top `k` indices of `p` in the reference order (probability, then index), returned in
/// index order.
pub fn top_k(p: &[f32], k: usize, out: &mut Vec<u32>) {
    out.clear();
    out.extend(0..p.len() as u32);
    if k < out.len() {
        out.select_nth_unstable_by(k, |&a, &b| p[b as usize].total_cmp(&p[a as usize]).then(a.cmp(&b)));
        out.truncate(k);
    }
    out.sort_unstable();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng(seed: &mut u64) -> f32 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        (*seed >> 40) as f32 / (1u64 << 24) as f32
    }

    fn softmax(z: &[f32]) -> Vec<f32> {
        let m = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = z.iter().map(|x| (x - m).exp()).collect();
        let s: f32 = e.iter().sum();
        e.iter().map(|x| x / s).collect()
    }

    fn sorted_set(mut v: Vec<u32>) -> Vec<u32> {
        v.sort_unstable();
        v
    }

    #[test]
    fn equals_sort_reference_on_random_distributions() {
        let mut seed = 0x9e3779b97f4a7c15u64;
        let mut sel = TopP::default();
        let mut out = Vec::new();
        for trial in 0..300 {
            let n = 1 + (trial * 37) % 700;
            let sharp = 1.0 + (trial % 7) as f32 * 2.0;
            let z: Vec<f32> = (0..n).map(|_| rng(&mut seed) * sharp).collect();
            let p = softmax(&z);
            for tau in [0.1f32, 0.5, 0.9, 0.99, 0.999999, 1.0] {
                sel.select(&p, tau, &mut out);
                assert_eq!(out, sorted_set(top_p_sorted(&p, tau)), "trial {trial} n {n} tau {tau}");
            }
        }
    }

    #[test]
    fn equals_sort_reference_with_ties() {
        let mut sel = TopP::default();
        let mut out = Vec::new();
        // many exact ties, including at the boundary: 8 tokens of 0.125
        let p = vec![0.125f32; 8];
        for tau in [0.1f32, 0.125, 0.3, 0.5, 0.9] {
            sel.select(&p, tau, &mut out);
            let want = sorted_set(top_p_sorted(&p, tau));
            assert_eq!(out, want, "tau {tau}");
            assert_eq!(out, (0..want.len() as u32).collect::<Vec<_>>(), "ties go to the lowest indices");
        }
        // ties mixed with distinct values, in shuffled positions
        let p = vec![0.05f32, 0.2, 0.05, 0.2, 0.1, 0.2, 0.05, 0.05, 0.1];
        for tau in [0.15f32, 0.4, 0.45, 0.61, 0.75, 0.85, 0.95] {
            sel.select(&p, tau, &mut out);
            assert_eq!(out, sorted_set(top_p_sorted(&p, tau)), "tau {tau}");
        }
    }

    #[test]
    fn selected_mass_reaches_tau_with_the_fewest_tokens() {
        let mut seed = 7u64;
        let z: Vec<f32> = (0..1000).map(|_| rng(&mut seed) * 8.0).collect();
        let p = softmax(&z);
        let mut out = Vec::new();
        let mass = TopP::default().select(&p, 0.9, &mut out);
        assert!(mass >= 0.9);
        let smallest: f32 = out.iter().map(|&i| p[i as usize]).fold(f32::INFINITY, f32::min);
        assert!(mass - (smallest as f64) < 0.9, "one token fewer would still reach tau");
    }

    #[test]
    fn layer_k_follows_the_one_percent_grid() {
        assert_eq!(layer_k(&[3, 7, 5], 50), 7); // grid step 1 below 200 tokens
        assert_eq!(layer_k(&[150, 10], 1000), 151); // step 10: 1, 11, ..., 141, 151
        assert_eq!(layer_k(&[151], 1000), 151);
        assert_eq!(layer_k(&[152], 1000), 161);
        assert_eq!(layer_k(&[999], 1000), 1000);
    }

    #[test]
    fn top_k_is_the_reference_prefix() {
        let p = vec![0.1f32, 0.3, 0.1, 0.3, 0.2];
        let mut out = Vec::new();
        top_k(&p, 3, &mut out);
        assert_eq!(out, vec![1, 3, 4]);
        top_k(&p, 4, &mut out);
        assert_eq!(out, vec![0, 1, 3, 4], "the tie at 0.1 goes to index 0");
        top_k(&p, 9, &mut out);
        assert_eq!(out.len(), 5);
    }
}
