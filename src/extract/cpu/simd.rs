//! The innermost loop of the selected inversion, compiled twice: for the build's baseline
//! (x86-64-v3) and for AVX-512, chosen at run time. Both use explicit fused multiply-adds
//! (`mul_add`, native on every x86-64-v3 CPU), so both give the same bits.

/// `out[c] = neg_inv · Σ_d ltail[d] · below[d·nc + first + c]` for `c < out.len()`: one row of
/// the recurrence `Lᵀ C = L⁻¹` for every active core column (see `decorrelate.rs`).
pub fn recurrence_row(
    ltail: &[f64],
    below: &[f64],
    nc: usize,
    first: usize,
    neg_inv: f64,
    out: &mut [f64],
) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F (checked just above), which is the only
            // requirement `recurrence_row_avx512` adds to the safe generic body.
            unsafe { recurrence_row_avx512(ltail, below, nc, first, neg_inv, out) };
            return;
        }
    }
    recurrence_row_generic(ltail, below, nc, first, neg_inv, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn recurrence_row_avx512(
    ltail: &[f64],
    below: &[f64],
    nc: usize,
    first: usize,
    neg_inv: f64,
    out: &mut [f64],
) {
    recurrence_row_generic(ltail, below, nc, first, neg_inv, out);
}

#[inline(always)]
fn recurrence_row_generic(
    ltail: &[f64],
    below: &[f64],
    nc: usize,
    first: usize,
    neg_inv: f64,
    out: &mut [f64],
) {
    let width = out.len();
    let mut c0 = 0;
    while c0 < width {
        let w = (width - c0).min(32);
        let mut a = [0.0f64; 32];
        // A narrower last block still takes the fixed-width loop when the 32 elements from its
        // start are inside `below` in every row: the extra lanes read initialised values that
        // land only in lanes of `a` that are never stored.
        let last_start = ltail.len().saturating_sub(1) * nc + first + c0;
        if w == 32 || last_start + 32 <= below.len() {
            // A fixed width lets the compiler keep `a` in vector registers across the rows.
            for (d, &l) in ltail.iter().enumerate() {
                let start = d * nc + first + c0;
                let row: &[f64; 32] = below[start..start + 32].try_into().expect("32 wide");
                for k in 0..32 {
                    a[k] = l.mul_add(row[k], a[k]);
                }
            }
        } else {
            for (d, &l) in ltail.iter().enumerate() {
                let start = d * nc + first + c0;
                for (v, zz) in a.iter_mut().zip(&below[start..start + w]) {
                    *v = l.mul_add(*zz, *v);
                }
            }
        }
        for (dst, v) in out[c0..c0 + w].iter_mut().zip(&a) {
            *dst = v * neg_inv;
        }
        c0 += w;
    }
}
