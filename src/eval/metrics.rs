//! Fidelity metrics of next-token distributions against the reference: KL(ref‖quant),
//! top-1 agreement, perplexity of the recorded tokens, and the rank statistics of the proxy check.

use serde::Serialize;

/// `log_softmax(logits)` in f32, accumulated in f64 so tiny KLs stay exact.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let z: f64 = logits.iter().map(|&x| ((x - m) as f64).exp()).sum();
    let lz = m as f64 + z.ln();
    logits.iter().map(|&x| (x as f64 - lz) as f32).collect()
}

/// `KL(p‖q) = Σ p (log p − log q)` from log-probabilities; never negative.
pub fn kl(ref_logp: &[f32], q_logp: &[f32]) -> f64 {
    let s: f64 = ref_logp
        .iter()
        .zip(q_logp)
        .map(|(&a, &b)| {
            let p = (a as f64).exp();
            if p == 0.0 {
                0.0
            } else {
                p * (a as f64 - b as f64)
            }
        })
        .sum();
    s.max(0.0)
}

/// Index of the largest value (the first one on ties).
pub fn argmax(x: &[f32]) -> u32 {
    crate::model::sampling::argmax(x)
}

/// The reference's scored rows of one trajectory: log-probabilities, argmax and the negative
/// log-likelihood of the recorded next token, per scored position.
#[derive(Debug, Clone, Default)]
pub struct ReferenceRows {
    pub vocab: usize,
    /// `[rows, vocab]`.
    pub logp: Vec<f32>,
    pub argmax: Vec<u32>,
    pub nll: Vec<f64>,
}

impl ReferenceRows {
    pub fn new(vocab: usize) -> Self {
        ReferenceRows {
            vocab,
            ..Default::default()
        }
    }

    pub fn len(&self) -> usize {
        self.argmax.len()
    }

    pub fn is_empty(&self) -> bool {
        self.argmax.is_empty()
    }

    /// Add one row of raw logits whose recorded next token is `target`.
    pub fn push(&mut self, logits: &[f32], target: u32) {
        let lp = log_softmax(logits);
        self.argmax.push(argmax(&lp));
        self.nll.push(-(lp[target as usize] as f64));
        self.logp.extend_from_slice(&lp);
    }

    pub fn row(&self, i: usize) -> &[f32] {
        &self.logp[i * self.vocab..(i + 1) * self.vocab]
    }
}

/// Per-position comparisons of a quantized replay with the reference.
#[derive(Debug, Clone, Default)]
pub struct Accumulator {
    pub kls: Vec<f64>,
    pub top1_agree: usize,
    pub nll: f64,
    pub ref_nll: f64,
}

impl Accumulator {
    /// Compare one row of raw logits with reference row `i` of `reference`; `target` is the
    /// recorded next token.
    pub fn add(&mut self, reference: &ReferenceRows, i: usize, logits: &[f32], target: u32) {
        let lp = log_softmax(logits);
        self.kls.push(kl(reference.row(i), &lp));
        if argmax(&lp) == reference.argmax[i] {
            self.top1_agree += 1;
        }
        self.nll += -(lp[target as usize] as f64);
        self.ref_nll += reference.nll[i];
    }

    pub fn merge(&mut self, other: &Accumulator) {
        self.kls.extend_from_slice(&other.kls);
        self.top1_agree += other.top1_agree;
        self.nll += other.nll;
        self.ref_nll += other.ref_nll;
    }

    pub fn summary(&self) -> Fidelity {
        let n = self.kls.len();
        let mut sorted = self.kls.clone();
        sorted.sort_by(f64::total_cmp);
        let mean = |x: f64| if n > 0 { x / n as f64 } else { f64::NAN };
        Fidelity {
            positions: n,
            mean_kl: mean(self.kls.iter().sum()),
            p95_kl: percentile(&sorted, 0.95),
            max_kl: sorted.last().copied().unwrap_or(f64::NAN),
            top1: mean(self.top1_agree as f64),
            ppl: mean(self.nll).exp(),
            ref_ppl: mean(self.ref_nll).exp(),
        }
    }
}

/// Profile `b` against profile `a` over the same scored positions: the mean of the
/// position-by-position KL differences `b - a` and the half-width of its 95% interval (normal
/// approximation over positions; positions of one trajectory are not independent, so read
/// it as a lower bound on the uncertainty).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PairedDiff {
    pub profile: String,
    pub against: String,
    pub positions: usize,
    pub mean: f64,
    pub ci95: f64,
    /// Trajectories whose mean KL is lower under `profile`, and all compared.
    pub lower_in: usize,
    pub trajectories: usize,
}

/// `mean` and 95% half-width of `b[i] - a[i]` (NaN half-width below two pairs); `None` when
/// the lengths differ.
pub fn paired_mean_ci(a: &[f64], b: &[f64]) -> Option<(f64, f64)> {
    if a.len() != b.len() || a.is_empty() {
        return None;
    }
    let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| y - x).collect();
    let n = d.len() as f64;
    let mean = d.iter().sum::<f64>() / n;
    if d.len() < 2 {
        return Some((mean, f64::NAN));
    }
    let var = d.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    Some((mean, 1.96 * (var / n).sqrt()))
}

/// Fidelity of one profile over the scored positions.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Fidelity {
    pub positions: usize,
    pub mean_kl: f64,
    pub p95_kl: f64,
    pub max_kl: f64,
    /// Share of positions whose argmax equals the reference's.
    pub top1: f64,
    /// Perplexity of the recorded tokens under the quantized cache, and under the reference.
    pub ppl: f64,
    pub ref_ppl: f64,
}

/// The `q`-quantile of ascending `sorted` by linear interpolation (NaN when empty).
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    match sorted.len() {
        0 => f64::NAN,
        1 => sorted[0],
        n => {
            let x = q.clamp(0.0, 1.0) * (n - 1) as f64;
            let (i, f) = (x.floor() as usize, x - x.floor());
            let hi = sorted[(i + 1).min(n - 1)];
            sorted[i] + (hi - sorted[i]) * f
        }
    }
}

/// Ranks from 1, ties sharing their average rank.
pub fn ranks(x: &[f64]) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..x.len()).collect();
    idx.sort_by(|&a, &b| x[a].total_cmp(&x[b]));
    let mut r = vec![0.0; x.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && x[idx[j + 1]] == x[idx[i]] {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0 + 1.0;
        for &k in &idx[i..=j] {
            r[k] = avg;
        }
        i = j + 1;
    }
    r
}

/// Pearson correlation (NaN with fewer than two points or no spread).
pub fn pearson(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len().min(y.len());
    if n < 2 {
        return f64::NAN;
    }
    let mx = x[..n].iter().sum::<f64>() / n as f64;
    let my = y[..n].iter().sum::<f64>() / n as f64;
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for i in 0..n {
        let (a, b) = (x[i] - mx, y[i] - my);
        sxy += a * b;
        sxx += a * a;
        syy += b * b;
    }
    if sxx == 0.0 || syy == 0.0 {
        return f64::NAN;
    }
    sxy / (sxx * syy).sqrt()
}

/// Spearman rank correlation: Pearson of the (tie-averaged) ranks.
pub fn spearman(x: &[f64], y: &[f64]) -> f64 {
    pearson(&ranks(x), &ranks(y))
}

#[cfg(test)]
mod tests {

    #[test]
    fn paired_difference_is_the_mean_of_pairs_with_its_interval() {
        let a = [0.5, 1.0, 0.2, 0.3];
        let b = [0.4, 1.1, 0.1, 0.1];
        let (m, h) = paired_mean_ci(&a, &b).unwrap();
        assert!((m - (-0.075)).abs() < 1e-12, "{m}");
        // sd of (-0.1, 0.1, -0.1, -0.2) = 0.125831; 1.96 * sd / 2
        assert!((h - 1.96 * 0.125_830_573 / 2.0).abs() < 1e-6, "{h}");
        assert!(paired_mean_ci(&a, &b[..3]).is_none());
        assert!(paired_mean_ci(&[1.0], &[2.0]).unwrap().1.is_nan());
    }

    use super::*;

    #[test]
    fn log_softmax_and_kl_by_hand() {
        let lp = log_softmax(&[0.0, (3.0f32).ln()]);
        assert!((lp[0] as f64 - 0.25f64.ln()).abs() < 1e-6);
        assert!((lp[1] as f64 - 0.75f64.ln()).abs() < 1e-6);
        let q = log_softmax(&[0.0, 0.0]);
        // KL((1/4, 3/4) ‖ (1/2, 1/2)) = 1/4 ln(1/2) + 3/4 ln(3/2)
        let want = 0.25 * 0.5f64.ln() + 0.75 * 1.5f64.ln();
        assert!((kl(&lp, &q) - want).abs() < 1e-6, "{}", kl(&lp, &q));
        assert_eq!(kl(&lp, &lp), 0.0);
        // Shifting logits changes nothing.
        let shifted = log_softmax(&[100.0, 100.0 + (3.0f32).ln()]);
        assert!(kl(&lp, &shifted) < 1e-9);
    }

    #[test]
    fn top1_and_perplexity_by_hand() {
        // Reference rows: argmax 1 then 0; recorded tokens 1 and 1.
        let mut r = ReferenceRows::new(3);
        r.push(&[0.0, 2.0, 0.0], 1);
        r.push(&[2.0, 0.0, 0.0], 1);
        let mut acc = Accumulator::default();
        acc.add(&r, 0, &[0.0, 2.0, 0.0], 1); // agrees, KL 0
        acc.add(&r, 1, &[0.0, 0.0, 0.0], 1); // argmax 0 (first of ties) agrees too
        let s = acc.summary();
        assert_eq!(s.positions, 2);
        assert_eq!(s.top1, 1.0);
        let p_ref0 = (2.0f64).exp() / ((2.0f64).exp() + 2.0);
        let p_ref1 = 1.0 / ((2.0f64).exp() + 2.0);
        let want_ref = (-(p_ref0.ln() + p_ref1.ln()) / 2.0).exp();
        assert!(
            (s.ref_ppl - want_ref).abs() < 1e-5,
            "{} vs {want_ref}",
            s.ref_ppl
        );
        let want = (-(p_ref0.ln() + (1.0f64 / 3.0).ln()) / 2.0).exp();
        assert!((s.ppl - want).abs() < 1e-5, "{} vs {want}", s.ppl);
        assert_eq!(s.max_kl, acc.kls.iter().copied().fold(0.0, f64::max));
        assert!(s.mean_kl > 0.0 && s.mean_kl < s.max_kl);

        let mut acc2 = Accumulator::default();
        acc2.add(&r, 0, &[5.0, 0.0, 0.0], 1);
        assert_eq!(acc2.summary().top1, 0.0);
    }

    #[test]
    fn percentiles_and_ranks() {
        let v: Vec<f64> = (0..=100).map(|x| x as f64).collect();
        assert_eq!(percentile(&v, 0.95), 95.0);
        assert_eq!(percentile(&[1.0, 3.0], 0.5), 2.0);
        assert!(percentile(&[], 0.5).is_nan());
        assert_eq!(ranks(&[10.0, 20.0, 10.0, 5.0]), vec![2.5, 4.0, 2.5, 1.0]);
    }

    #[test]
    fn correlations() {
        let x = [1.0, 2.0, 3.0, 4.0, 5.0];
        let y = [1.0, 8.0, 27.0, 64.0, 125.0];
        assert!((spearman(&x, &y) - 1.0).abs() < 1e-12);
        assert!(pearson(&x, &y) < 0.99);
        let rev: Vec<f64> = y.iter().rev().copied().collect();
        assert!((spearman(&x, &rev) + 1.0).abs() < 1e-12);
        // Rank differences 0,1,1,1,1: 1 - 6·4/(5·24) = 0.8
        let a = [1.0, 2.0, 3.0, 4.0, 5.0];
        let b = [1.0, 3.0, 2.0, 5.0, 4.0];
        assert!((spearman(&a, &b) - 0.8).abs() < 1e-12);
        assert!(pearson(&[1.0], &[2.0]).is_nan());
    }
}
