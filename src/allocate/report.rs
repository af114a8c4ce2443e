//! The human-readable summary of an allocation: a tag × layer-band table of K/V bits, the
//! budget asked and achieved, the objective and how the solver got there.

use super::Outcome;
use crate::profile::Kv;
use crate::tags::Tag;
use std::collections::BTreeMap;
use std::fmt::Write;

/// Layer bands: three bands of equal width (the last may be shorter), e.g. 0-9, 10-19, 20-29.
pub fn bands(layers: usize) -> Vec<(usize, usize)> {
    let width = layers.div_ceil(3).max(1);
    (0..layers)
        .step_by(width)
        .map(|lo| (lo, (lo + width).min(layers) - 1))
        .collect()
}

/// Mean bits as "4" or "2.6".
fn mean_bits(xs: &[u8]) -> String {
    if xs.is_empty() {
        return "-".into();
    }
    let m = xs.iter().map(|&b| b as f64).sum::<f64>() / xs.len() as f64;
    if (m - m.round()).abs() < 1e-9 {
        format!("{}", m.round())
    } else {
        format!("{m:.1}")
    }
}

pub fn render(o: &Outcome) -> String {
    let p = &o.profile;
    let mut s = String::new();
    let _ = write!(s, "policy {} ({})", p.policy, p.name);
    match o.budget_bits {
        Some(b) => {
            let _ = write!(s, ": budget {b:.4} bits per K/V element");
            if let (Some(bytes), Some(ctx), Some(batch)) =
                (p.budget.asked_bytes, p.budget.context, p.budget.batch)
            {
                let _ = write!(
                    s,
                    " (= {} for {batch} × {ctx} tokens)",
                    super::budget::human_bytes(bytes)
                );
            }
            let _ = writeln!(
                s,
                ", achieved {:.4}, floor {:.4}",
                p.budget.achieved_bits, o.floor_bits
            );
        }
        None => {
            let _ = writeln!(
                s,
                ": achieved {:.4} bits per K/V element",
                p.budget.achieved_bits
            );
        }
    }
    let _ = writeln!(
        s,
        "cache: {:?} keys g{}{}, values g{}, block {} tokens; {} sinks + {} window at {} \
         ({:.0} of {:.0} tokens per query)",
        p.cache.key_mode,
        p.cache.key_group,
        if p.cache.key_outliers > 0.0 {
            format!(" with {:.2}% kept exactly", 100.0 * p.cache.key_outliers)
        } else {
            String::new()
        },
        p.cache.value_group,
        p.cache.block_tokens,
        p.cache.sinks,
        p.cache.window,
        if p.cache.hold_fp8 {
            "8 bits (FP8, with the tokens waiting for a key group)"
        } else {
            "16 bits"
        },
        o.protected,
        o.context
    );
    let obj = p.provenance.objective.unwrap_or(f64::NAN);
    let _ = write!(s, "objective {obj:.6e} (weighted distortion)");
    if let Some(lb) = o.stats.lower_bound {
        let gap = if obj > 0.0 { (obj - lb) / obj } else { 0.0 };
        let _ = write!(s, ", lower bound {lb:.6e} (gap {gap:.1e})");
    }
    let _ = writeln!(s);
    if let Some(t) = p.provenance.solve_s {
        let _ = write!(s, "solver {} in {:.3} s", p.provenance.solver, t);
        match p.provenance.solver.as_str() {
            "microlp" => {
                let _ = write!(
                    s,
                    " (presolve {:.3} s); {} items left open by reduced-cost fixing, {} binaries",
                    o.stats.presolve_s, o.stats.open_items, o.stats.binaries
                );
                if o.stats.core_items > 0 {
                    let _ = write!(s, " (after a {}-item core program)", o.stats.core_items);
                }
            }
            "microlp-full" => {
                let _ = write!(
                    s,
                    "; {} items, {} binaries (no fixing)",
                    o.stats.open_items, o.stats.binaries
                );
            }
            _ => {}
        }
        if o.stats.dp_states > 0 {
            let _ = write!(s, "; {} frontier states", o.stats.dp_states);
        }
        let _ = writeln!(s);
    }

    // Tag rows × layer bands, "K/V" mean bits.
    let layers = o
        .items
        .iter()
        .map(|i| i.key.layer)
        .max()
        .map_or(0, |l| l + 1);
    let bands = bands(layers);
    // Per tag (ordered role, modality, recency): the K and V bits of each band's layers.
    type BandBits = Vec<Vec<u8>>;
    let mut by_tag: BTreeMap<(u8, u8, u8), (Tag, BandBits, BandBits)> = BTreeMap::new();
    for it in &o.items {
        let t = it.key.tag;
        let e = by_tag
            .entry((t.role as u8, t.modality as u8, t.recency as u8))
            .or_insert_with(|| {
                (
                    t,
                    vec![Vec::new(); bands.len()],
                    vec![Vec::new(); bands.len()],
                )
            });
        let band = bands
            .iter()
            .position(|&(lo, hi)| it.key.layer >= lo && it.key.layer <= hi)
            .unwrap_or(0);
        match it.key.kv {
            Kv::K => e.1[band].push(it.bits),
            Kv::V => e.2[band].push(it.bits),
        }
    }
    let _ = writeln!(s, "\nK/V bits per tag (mean over the band's layers):");
    let _ = write!(s, "{:<28}", "tag");
    for (lo, hi) in &bands {
        let _ = write!(s, " {:>11}", format!("L{lo}-{hi}"));
    }
    let _ = writeln!(s);
    for (tag, k, v) in by_tag.values() {
        let _ = write!(s, "{:<28}", tag.to_string());
        for b in 0..bands.len() {
            let _ = write!(
                s,
                " {:>11}",
                format!("{}/{}", mean_bits(&k[b]), mean_bits(&v[b]))
            );
        }
        let _ = writeln!(s);
    }
    // Token shares per width.
    for kv in [Kv::K, Kv::V] {
        let mut share: BTreeMap<u8, f64> = BTreeMap::new();
        let mut total = 0.0;
        for it in o.items.iter().filter(|i| i.key.kv == kv) {
            *share.entry(it.bits).or_insert(0.0) += it.tokens;
            total += it.tokens;
        }
        let parts: Vec<String> = share
            .iter()
            .map(|(b, t)| format!("{b}-bit {:.1}%", 100.0 * t / total.max(f64::MIN_POSITIVE)))
            .collect();
        let _ = writeln!(
            s,
            "{} tokens: {}",
            if kv == Kv::K { "K" } else { "V" },
            parts.join(", ")
        );
    }
    for n in &o.notes {
        let _ = writeln!(s, "note: {n}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bands_cover_every_layer_once() {
        assert_eq!(bands(30), vec![(0, 9), (10, 19), (20, 29)]);
        assert_eq!(bands(2), vec![(0, 0), (1, 1)]);
        assert_eq!(bands(7), vec![(0, 2), (3, 5), (6, 6)]);
        assert_eq!(mean_bits(&[2, 4]), "3");
        assert_eq!(mean_bits(&[2, 2, 4]), "2.7");
    }
}
