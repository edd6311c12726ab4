// Decorrelation of the core fibers' covariance blocks (docs/science.md §5.4–5.5, B&S eq.
// 17–19), the GPU counterpart of cpu::decorrelate's block_inverse_sqrt and of the readout in
// cpu::solve: per block C = C_ff (the n × n diagonal block of (AᵀWA)⁻¹ of one core fiber of
// one patch, n = nwavetot = 74 at the real size),
//   C = V Λ Vᵀ (symmetric Jacobi), W = V Λ^{-1/4}, Q = W Wᵀ = C^{-1/2} (rows row_lo..row_hi),
//   s_r = Σ_j Q[r, j], R = Q / s, flux_j = R[wavepad + j, :] · x_f, fluxivar_j = s²,
//   Rdiag[k, j] = R[wavepad + j + k - ndiag, wavepad + j].
// cuSOLVER's syevjBatched stops at n = 32, hence this kernel; where cuSOLVER has
// XsyevBatched (CUDA 12.6 and later), the backend takes its eigenpairs instead and only the
// readout runs here (decorrelate_eigen, at the end of this file), which is faster on an H200.
//
// The host side (src/extract/gpu/decorrelate.rs) flattens the batch (`DecorrLayout`) and holds
// `twin`, a plain-Rust copy of this kernel's algorithm: the same rotation order, the same
// formulas with the same explicit roundings, the same per-thread sums. Change one, change the
// other.
//
// Inputs, per block b (one per (patch, core fiber)):
//   params[8b .. 8b+8] = {n, cov_ld, row_lo, row_hi, wavepad, nstep, nkeep, ndiag}
//   offs[3b .. 3b+3] = offsets of C[0, 0] in cov, of the fiber's x[0] in x, and of the
//   block's starting basis U (n × n, column-major, orthonormal) in basis.
//   C[i, j] = cov[offs[3b] + j·cov_ld + i] (column-major); only the lower triangle (i ≥ j) is
//   read, as LAPACK's uplo = 'L', so a block that is symmetric only up to rounding is taken
//   as exactly symmetric.
// Outputs, ncol = the batch's largest nstep, nd2 = the batch's largest 2·ndiag + 1:
//   flux[b·ncol + j], fluxivar[b·ncol + j] for j < nstep (every core bin: the model image needs
//   them all), resolution[(b·nd2 + k)·ncol + j] for k ≤ 2·ndiag, j < nkeep; the rest of each
//   block's rows is written 0. status[b] (below), sweeps[b] = Jacobi sweeps performed.
// The host checks: row_lo ≤ wavepad - ndiag, wavepad + max(nstep, nkeep + ndiag) ≤ row_hi ≤ n,
// nkeep ≤ nstep, n ≤ cov_ld, every read inside cov and x, and ld ≥ every block's m (below).
//
// Starting basis: the Jacobi runs on UᵀCU with V starting at U, U the orthonormal DCT-II
// basis (computed on the host, see DecorrLayout). A covariance block of neighbouring bins is
// close to Toeplitz, which the DCT nearly diagonalises: on 25 of the real PSF's blocks (twin)
// the sweeps drop from 11–13 (starting from the identity) to 7–8, and a whole bundle's 1175
// blocks take 6–9, for 2n³ multiply-adds (about half a sweep). The result does not depend on U
// beyond rounding; U's orthonormality error (~1e-15) enters Q at that level.
//
// Jacobi: two-sided cyclic Jacobi in the parallel ("round-robin tournament") ordering. n is
// padded to an even m with a decoupled identity row/column (never rotated: its off-diagonal
// entries are exact zeros), h = m/2. A sweep is m - 1 rounds; in round r the h disjoint pairs
// are (m-1, r) and ((r+k) mod (m-1), (r-k) mod (m-1)) for k = 1..h-1, each as (p, q), p < q, so
// that every pair is visited once per sweep in a fixed order. Disjoint rotations commute, so a
// round is exactly h consecutive rotations of the sequential cyclic method. Rotation (p, q) is
// Golub & Van Loan's symmetric Schur rotation J = [[c, s], [-s, c]] on (p, q), A ← JᵀAJ,
// V ← VJ, applied only when |a_pq| > TOL·sqrt|a_pp|·sqrt|a_qq| (Demmel & Veselić's scaled
// test: it gives the small eigenvalues, which Λ^{-1/4} magnifies, to high relative accuracy).
// Each sweep starts with that test on every pair; a block has converged when no pair fails
// it. The off-diagonal entries are only ever combined with off-diagonal entries (the 2×2
// diagonal blocks are set, not combined), so rounding does not stall the convergence.
//
// Thread mapping: one thread block of DECORR_THREADS threads per C_ff (grid = nblock).
//   load:   threads stride over the m² entries (i fastest: coalesced reads of a column).
//   basis:  threads stride over the m² entries of T = C U (into V's storage; each a k-ordered
//           fma sum of n terms), then over the lower triangle of UᵀT (into A, mirrored, so
//           that A is exactly symmetric), then over V = U.
//   test:   threads stride over the m² entries, __syncthreads_or of "some pair is large".
//   round:  phase 1, threads k < h compute pair k's rotation into shared memory (and
//           __syncthreads_or of "some pair rotates", so a round with none is skipped);
//           phase 2, threads stride over (a) the h² pairs of pairs (P, P'), P ≤ P', each
//           updating the 2×2 block A[{p,q},{p',q'}] and writing its transpose too (disjoint
//           tasks, in place, and A stays bitwise symmetric), and (b) the m·h (row i, pair P)
//           updates of V's columns p, q (i fastest); one barrier.
//   then:   threads k < n check λ_k and form λ_k^{-1/4}; threads stride over V's entries to
//           scale its columns; over the nrow·n entries of Q (each a k-ordered fma sum of n
//           terms); threads ri < nrow sum Q's row ri in j order (s); over the entries of R;
//           threads j < ncol form flux_j (w-ordered fma sum) and fluxivar_j; threads stride
//           over the nd2·ncol resolution entries.
// Shared memory (dynamic, sized by the host from ld = the batch's largest m): A and V, ld²
// doubles each with leading dimension m, then c, s, t of the h rotations, an ld-double work
// vector (λ^{-1/4}, then s), and the rotations' p and q (ints): 89,392 bytes at m = 74, over
// the default 48 KB, so the launcher opts in (cuFuncSetAttribute MAX_DYNAMIC_SHARED_SIZE_BYTES;
// up to 227 KB on sm_90). V stays in shared memory because every round updates all of it.
// After the Jacobi, A's storage holds Q's rows (row-major, nrow·n ≤ m²), then R's.
//
// Arithmetic: f64 throughout, every product-and-sum written as fma() or with explicit rounding
// intrinsics so that --fmad=true cannot contract it differently from the twin; division and
// sqrt are IEEE (correctly rounded) on both sides.

#define DECORR_THREADS 256
// The scaled off-diagonal tolerance, ~4.5 ulp of 1.
#define JACOBI_TOL 1e-15
// Above this |τ| the rotation's τ² would overflow; t = 1/(2τ) is then exact to rounding.
#define JACOBI_TAU_BIG 1e150

// status[b]
#define DECORR_OK 0
#define DECORR_NONFINITE_INPUT 1   // a non-finite entry in C's lower triangle
#define DECORR_BAD_EIGENVALUE 2    // an eigenvalue not positive or not finite (CPU: BadCovariance)
#define DECORR_NOT_CONVERGED 3     // max_sweeps sweeps left a pair above the tolerance
#define DECORR_NONFINITE_OUTPUT 4  // a kept flux or fluxivar not finite (CPU: solve() fails)

__device__ __forceinline__ double nan_value() {
    return __longlong_as_double(0x7ff8000000000000ULL);
}

// The scaled test: whether a_pq must still be rotated away. Written so that a NaN a_pq counts
// as large (the input check rules NaN out; this keeps the test safe anyway).
__device__ __forceinline__ bool off_is_large(double apq, double app, double aqq) {
    const double scale = __dmul_rn(JACOBI_TOL, __dmul_rn(sqrt(fabs(app)), sqrt(fabs(aqq))));
    return !(fabs(apq) <= scale);
}

// tan θ of the rotation that zeroes a_pq (Golub & Van Loan, Algorithm 8.4.1): the root of
// t² + 2τt - 1 = 0 of smaller magnitude, τ = (a_qq - a_pp) / (2 a_pq), sign(0) = +1.
__device__ __forceinline__ double jacobi_tan(double app, double aqq, double apq) {
    const double tau = __ddiv_rn(__dsub_rn(aqq, app), __dmul_rn(2.0, apq));
    const double at = fabs(tau);
    double t;
    if (at > JACOBI_TAU_BIG) {
        t = __ddiv_rn(0.5, at);
    } else {
        t = __ddiv_rn(1.0, __dadd_rn(at, sqrt(fma(tau, tau, 1.0))));
    }
    return (tau < 0.0) ? -t : t;
}

// Pair k of round r of the round-robin ordering of m (even) indices, as (p, q) with p < q.
__device__ __forceinline__ void round_pair(int r, int k, int m, int* p, int* q) {
    int a, b;
    if (k == 0) {
        a = m - 1;
        b = r;
    } else {
        a = (r + k) % (m - 1);
        b = (r - k + (m - 1)) % (m - 1);
    }
    *p = min(a, b);
    *q = max(a, b);
}

// The failed block's outputs: NaN, so that a caller ignoring status cannot take them as data.
__device__ void fill_failed(int b, int ncol, int nd2, double* flux, double* fluxivar,
                            double* resolution) {
    const double nan = nan_value();
    for (int j = threadIdx.x; j < ncol; j += blockDim.x) {
        flux[(long long)b * ncol + j] = nan;
        fluxivar[(long long)b * ncol + j] = nan;
    }
    for (int e = threadIdx.x; e < nd2 * ncol; e += blockDim.x) {
        resolution[(long long)b * nd2 * ncol + e] = nan;
    }
}

// The readout shared by both kernels, from C's eigenpairs: λ_k in A[k·m + k] and eigenvector
// k in V's column k (rows i < n, leading dimension m), k < n. Checks λ, forms W = V Λ^{-1/4},
// Q's rows row_lo.., s, R = Q/s, then flux, fluxivar and the resolution diagonals, and writes
// status[b] and sweeps[b] (= sweep). Called by every thread of the block.
__device__ void readout(int b, int n, int m, int row_lo, int nrow, int wavepad, int nstep,
                        int nkeep, int ndiag, int ncol, int nd2, int sweep, double* A,
                        double* V, double* aux, const double* __restrict__ xf,
                        double* __restrict__ flux, double* __restrict__ fluxivar,
                        double* __restrict__ resolution, int* __restrict__ status,
                        int* __restrict__ sweeps)
{
    const int tid = threadIdx.x;
    const int nt = blockDim.x;
    int bad = 0;
    // Eigenvalues λ_k = A[k, k] (k < n: the Jacobi's padding 1 is not one of C's).
    for (int k = tid; k < n; k += nt) {
        const double lam = A[k * m + k];
        bad |= !(lam > 0.0) || !isfinite(lam);
        aux[k] = __ddiv_rn(1.0, sqrt(sqrt(lam)));
    }
    if (__syncthreads_or(bad)) {
        fill_failed(b, ncol, nd2, flux, fluxivar, resolution);
        if (tid == 0) {
            status[b] = DECORR_BAD_EIGENVALUE;
            sweeps[b] = sweep;
        }
        return;
    }
    // W = V Λ^{-1/4} in place (rows i < n).
    for (int e = tid; e < n * n; e += nt) {
        const int i = e % n;
        const int k = e / n;
        V[k * m + i] = __dmul_rn(V[k * m + i], aux[k]);
    }
    __syncthreads();
    // Q[row_lo + ri, j] = Σ_k W[row_lo + ri, k] W[j, k] into A[ri·n + j] (A is no longer
    // needed: λ went into aux).
    for (int e = tid; e < nrow * n; e += nt) {
        const int ri = e / n;
        const int j = e % n;
        const int r = row_lo + ri;
        double acc = 0.0;
        for (int k = 0; k < n; ++k) {
            acc = fma(V[k * m + r], V[k * m + j], acc);
        }
        A[e] = acc;
    }
    __syncthreads();
    for (int ri = tid; ri < nrow; ri += nt) {
        double s = 0.0;
        for (int j = 0; j < n; ++j) {
            s = __dadd_rn(s, A[ri * n + j]);
        }
        aux[ri] = s;
    }
    __syncthreads();
    for (int e = tid; e < nrow * n; e += nt) {
        A[e] = __ddiv_rn(A[e], aux[e / n]);
    }
    __syncthreads();

    // Readout (cpu::solve): flux and fluxivar of every core bin, the kept bins' diagonals.
    bad = 0;
    for (int j = tid; j < ncol; j += nt) {
        double f = 0.0;
        double fi = 0.0;
        if (j < nstep) {
            const int ri = wavepad + j - row_lo;
            const double* row = A + ri * n;
            for (int w = 0; w < n; ++w) {
                f = fma(row[w], xf[w], f);
            }
            fi = __dmul_rn(aux[ri], aux[ri]);
            if (j < nkeep) {
                bad |= !isfinite(f) || !isfinite(fi);
            }
        }
        flux[(long long)b * ncol + j] = f;
        fluxivar[(long long)b * ncol + j] = fi;
    }
    for (int e = tid; e < nd2 * ncol; e += nt) {
        const int k = e / ncol;
        const int j = e % ncol;
        double v = 0.0;
        if (k <= 2 * ndiag && j < nkeep) {
            const int rr = wavepad + j + k - ndiag - row_lo;
            v = A[rr * n + wavepad + j];
        }
        resolution[(long long)b * nd2 * ncol + e] = v;
    }
    bad = __syncthreads_or(bad);
    if (tid == 0) {
        status[b] = bad ? DECORR_NONFINITE_OUTPUT : DECORR_OK;
        sweeps[b] = sweep;
    }
}

#include "params.cuh"

// Block b's sizes, as `DecorrLayout::new` lays out params[8b .. 8b+8].
struct BlockSizes {
    int n, cov_ld, row_lo, row_hi, wavepad, nstep, nkeep, ndiag;
};

__device__ __forceinline__ BlockSizes block_sizes(const int* params, int b) {
    const int* P = params + 8 * (long long)b;
    return BlockSizes{P[0], P[1], P[2], P[3], P[4], P[5], P[6], P[7]};
}

extern "C" __global__ void __launch_bounds__(DECORR_THREADS)
decorrelate(const DecorrelateParams args)
{
    extern __shared__ double sh[];
    const int b = blockIdx.x;
    const int tid = threadIdx.x;
    const int nt = blockDim.x;
    const auto [n, cov_ld, row_lo, row_hi, wavepad, nstep, nkeep, ndiag] =
        block_sizes(args.params, b);
    const int m = n + (n & 1);
    const int h = m / 2;
    const int nrow = row_hi - row_lo;

    double* A = sh;                      // [ld²], column-major, leading dimension m
    double* V = A + args.ld * args.ld;   // [ld²], idem
    double* rc = V + args.ld * args.ld;  // [ld/2] cos of each pair's rotation
    double* rs = rc + args.ld / 2;       // [ld/2] sin
    double* rt = rs + args.ld / 2;       // [ld/2] tan (0: pair not rotated this round)
    double* aux = rt + args.ld / 2;      // [ld]   λ_k^{-1/4}, then s of each Q row
    int* rp = (int*)(aux + args.ld);     // [ld/2] p of each pair
    int* rq = rp + args.ld / 2;          // [ld/2] q

    // Load the lower triangle, mirrored; the padding row/column is the identity.
    const double* C = args.cov + args.offs[3 * (long long)b];
    int bad = 0;
    for (int e = tid; e < m * m; e += nt) {
        const int i = e % m;
        const int j = e / m;
        double v;
        if (i < n && j < n) {
            v = (i >= j) ? C[(long long)j * cov_ld + i] : C[(long long)i * cov_ld + j];
            bad |= !isfinite(v);
        } else {
            v = (i == j) ? 1.0 : 0.0;
        }
        A[e] = v;
    }
    if (__syncthreads_or(bad)) {
        fill_failed(b, args.ncol, args.nd2, args.flux, args.fluxivar, args.resolution);
        if (tid == 0) {
            args.status[b] = DECORR_NONFINITE_INPUT;
            args.sweeps[b] = 0;
        }
        return;
    }

    // A ← ŨᵀAŨ and V ← Ũ, Ũ = U ⊕ 1 for odd n (the padding stays decoupled). T = AŨ goes to
    // V's storage first; A's lower triangle is then overwritten (it is not read any more).
    const double* U = args.basis + args.offs[3 * (long long)b + 2];
    for (int e = tid; e < m * m; e += nt) {
        const int i = e % m;
        const int j = e / m;
        double v = (i == j) ? 1.0 : 0.0;
        if (i < n && j < n) {
            v = 0.0;
            for (int k = 0; k < n; ++k) {
                v = fma(A[k * m + i], U[j * n + k], v);
            }
        }
        V[e] = v;
    }
    __syncthreads();
    for (int e = tid; e < m * m; e += nt) {
        const int i = e % m;
        const int j = e / m;
        if (i < j) {
            continue;
        }
        double v = (i == j) ? 1.0 : 0.0;
        if (i < n && j < n) {
            v = 0.0;
            for (int k = 0; k < n; ++k) {
                v = fma(U[i * n + k], V[j * m + k], v);
            }
        }
        A[j * m + i] = v;
        A[i * m + j] = v;
    }
    __syncthreads();
    for (int e = tid; e < m * m; e += nt) {
        const int i = e % m;
        const int j = e / m;
        V[e] = (i < n && j < n) ? U[j * n + i] : ((i == j) ? 1.0 : 0.0);
    }
    __syncthreads();

    int sweep = 0;
    bool converged = false;
    for (;;) {
        int large = 0;
        for (int e = tid; e < m * m; e += nt) {
            const int i = e % m;
            const int j = e / m;
            if (i < j) {
                large |= off_is_large(A[e], A[i * m + i], A[j * m + j]);
            }
        }
        if (!__syncthreads_or(large)) {
            converged = true;
            break;
        }
        if (sweep == args.max_sweeps) {
            break;
        }
        ++sweep;
        for (int r = 0; r < m - 1; ++r) {
            // Phase 1: the rotations of this round's pairs, from the current A.
            int rotates = 0;
            if (tid < h) {
                int p, q;
                round_pair(r, tid, m, &p, &q);
                const double app = A[p * m + p];
                const double aqq = A[q * m + q];
                const double apq = A[q * m + p];
                double t = 0.0;
                if (off_is_large(apq, app, aqq)) {
                    t = jacobi_tan(app, aqq, apq);
                }
                const double c = __ddiv_rn(1.0, sqrt(fma(t, t, 1.0)));
                rc[tid] = c;
                rs[tid] = __dmul_rn(t, c);
                rt[tid] = t;
                rp[tid] = p;
                rq[tid] = q;
                rotates = (t != 0.0);
            }
            if (!__syncthreads_or(rotates)) {
                continue;
            }
            // Phase 2a: A ← JᵀAJ, one 2×2 block per pair of pairs (P ≤ Q2).
            for (int e = tid; e < h * h; e += nt) {
                const int k1 = e % h;
                const int k2 = e / h;
                if (k1 > k2) {
                    continue;
                }
                const double t1 = rt[k1];
                const double t2 = rt[k2];
                if (t1 == 0.0 && t2 == 0.0) {
                    continue;  // both rotations are the identity: the block is unchanged
                }
                const int p = rp[k1];
                const int q = rq[k1];
                if (k1 == k2) {
                    // The rotated pair itself: a_pq → 0 and the diagonal in closed form.
                    const double apq = A[q * m + p];
                    A[p * m + p] = fma(-t1, apq, A[p * m + p]);
                    A[q * m + q] = fma(t1, apq, A[q * m + q]);
                    A[q * m + p] = 0.0;
                    A[p * m + q] = 0.0;
                    continue;
                }
                const int p2 = rp[k2];
                const int q2 = rq[k2];
                const double c1 = rc[k1], s1 = rs[k1];
                const double c2 = rc[k2], s2 = rs[k2];
                const double a = A[p2 * m + p];   // A[p, p2]
                const double bb = A[q2 * m + p];  // A[p, q2]
                const double d = A[p2 * m + q];   // A[q, p2]
                const double ee = A[q2 * m + q];  // A[q, q2]
                // M = A_blk J2 (columns p2, q2), then B = J1ᵀ M (rows p, q).
                const double mp0 = fma(c2, a, -__dmul_rn(s2, bb));
                const double mp1 = fma(s2, a, __dmul_rn(c2, bb));
                const double mq0 = fma(c2, d, -__dmul_rn(s2, ee));
                const double mq1 = fma(s2, d, __dmul_rn(c2, ee));
                const double bp0 = fma(c1, mp0, -__dmul_rn(s1, mq0));
                const double bp1 = fma(c1, mp1, -__dmul_rn(s1, mq1));
                const double bq0 = fma(s1, mp0, __dmul_rn(c1, mq0));
                const double bq1 = fma(s1, mp1, __dmul_rn(c1, mq1));
                A[p2 * m + p] = bp0;
                A[p * m + p2] = bp0;
                A[q2 * m + p] = bp1;
                A[p * m + q2] = bp1;
                A[p2 * m + q] = bq0;
                A[q * m + p2] = bq0;
                A[q2 * m + q] = bq1;
                A[q * m + q2] = bq1;
            }
            // Phase 2b: V ← VJ, columns p and q of each rotated pair, row by row.
            for (int e = tid; e < m * h; e += nt) {
                const int i = e % m;
                const int k = e / m;
                if (rt[k] == 0.0) {
                    continue;
                }
                const double c = rc[k], s = rs[k];
                double* vp = V + rp[k] * m + i;
                double* vq = V + rq[k] * m + i;
                const double x0 = *vp;
                const double x1 = *vq;
                *vp = fma(c, x0, -__dmul_rn(s, x1));
                *vq = fma(s, x0, __dmul_rn(c, x1));
            }
            __syncthreads();
        }
    }
    if (!converged) {
        fill_failed(b, args.ncol, args.nd2, args.flux, args.fluxivar, args.resolution);
        if (tid == 0) {
            args.status[b] = DECORR_NOT_CONVERGED;
            args.sweeps[b] = sweep;
        }
        return;
    }

    readout(b, n, m, row_lo, nrow, wavepad, nstep, nkeep, ndiag, args.ncol, args.nd2,
            sweep, A, V, aux,
            args.x + args.offs[3 * (long long)b + 1], args.flux, args.fluxivar, args.resolution,
            args.status, args.sweeps);
}

// The eigenpairs of C from cuSOLVER's XsyevBatched instead of the Jacobi above, then the same
// readout. The solve lays the blocks out as slots of cov_ld × cov_ld (column-major, C in the
// top-left n × n, zeros elsewhere), and syev overwrote them in place with their eigenvectors
// (evec, same offsets as cov) and wrote the eigenvalues in ascending order (eval, cov_ld per
// slot). A slot holds C ⊕ 0: C's n eigenvalues, all positive for a covariance, and cov_ld - n
// zeros, which come first; so C's eigenpairs are the last n, and their vectors' rows i ≥ n
// (zero up to rounding) are not C's. A non-positive eigenvalue of C moves into that range and
// is caught: either the readout's check sees it, or (when it pushed a padding eigenpair into
// the range) the padding vector's weight outside C's rows does. The host checks
// cov_off % cov_ld² = 0 and n ≤ cov_ld.
// Mapping and shared memory as `decorrelate` (A holds λ on its diagonal, V the vectors).
extern "C" __global__ void __launch_bounds__(DECORR_THREADS)
decorrelate_eigen(const DecorrelateEigenParams args)
{
    extern __shared__ double sh[];
    const int b = blockIdx.x;
    const int tid = threadIdx.x;
    const int nt = blockDim.x;
    const auto [n, cov_ld, row_lo, row_hi, wavepad, nstep, nkeep, ndiag] =
        block_sizes(args.params, b);
    const int m = n + (n & 1);
    const int nrow = row_hi - row_lo;

    double* A = sh;                     // [ld²]: λ on the diagonal, then Q and R rows
    double* V = A + args.ld * args.ld;  // [ld²]: the eigenvectors, leading dimension m
    // Where `decorrelate` keeps it.
    double* aux = V + args.ld * args.ld + 3 * (args.ld / 2);

    const long long off = args.offs[3 * (long long)b];
    const long long slot = off / ((long long)cov_ld * cov_ld);
    if (args.einfo[slot] != 0) {
        fill_failed(b, args.ncol, args.nd2, args.flux, args.fluxivar, args.resolution);
        if (tid == 0) {
            args.status[b] = DECORR_NOT_CONVERGED;
            args.sweeps[b] = 0;
        }
        return;
    }
    // A non-positive eigenvalue of C would move a padding eigenpair into the range: its vector
    // lies in the padding rows (those of C's lie in the first n), which this catches.
    const int k0 = cov_ld - n;
    int bad = 0;
    for (int t = tid; t < n && k0 > 0; t += nt) {
        const double* vk = args.evec + off + (long long)(k0 + t) * cov_ld;
        double pad = 0.0;
        for (int i = n; i < cov_ld; ++i) {
            pad = fma(vk[i], vk[i], pad);
        }
        bad |= !(pad < 0.5);
    }
    if (__syncthreads_or(bad)) {
        fill_failed(b, args.ncol, args.nd2, args.flux, args.fluxivar, args.resolution);
        if (tid == 0) {
            args.status[b] = DECORR_BAD_EIGENVALUE;
            args.sweeps[b] = 0;
        }
        return;
    }
    for (int e = tid; e < n * n; e += nt) {
        const int i = e % n;
        const int t = e / n;
        V[t * m + i] = args.evec[off + (long long)(k0 + t) * cov_ld + i];
    }
    for (int t = tid; t < n; t += nt) {
        A[t * m + t] = args.eval[slot * cov_ld + k0 + t];
    }
    __syncthreads();
    readout(b, n, m, row_lo, nrow, wavepad, nstep, nkeep, ndiag, args.ncol, args.nd2,
            0, A, V, aux,
            args.x + args.offs[3 * (long long)b + 1], args.flux, args.fluxivar, args.resolution,
            args.status, args.sweeps);
}
