// Dense normal equations of a batch of patches (docs/science.md §5.1–5.2) for cuSOLVER's
// batched Cholesky: per patch, AᵀWA as a dense column-major nmax × nmax matrix in fiber-major
// order (u = f·nwavetot + w), AᵀWp and AᵀW1, then the regularisation on the diagonal.
//
// The host side (src/extract/gpu/normal.rs) flattens the batch and holds a plain-Rust twin of
// both kernels, line for line, so that the indexing and the arithmetic below are tested on
// machines without a GPU. Change one, change the other.
//
// Layout (b = patch, u, v = unknowns, nmax = the largest n of the batch):
//   window b's pixel (r, c) is pix[win_off[b] + r·ld + c], ld = patch[b].w: the windows
//   concatenated (ld = window width) or one work unit's pixels that every window is cut from.
//   ata[(b·nmax + u)·nmax + v]  = (AᵀWA)[v, u]; column-major, both triangles.
//   atp[b·nmax + u], atw1[b·nmax + u].
//   Unknowns u ≥ n_b of a smaller patch are padding: identity column, atp = atw1 = 0, so that
//   potrfBatched can factor every matrix at size nmax and the padding decouples exactly.
//
// Arithmetic: every product and sum is written with an explicit rounding intrinsic or fma,
// so that NVRTC's --fmad=true cannot contract them differently from the host twin. The pair
// sum multiplies the two spots first (IEEE multiplication commutes) and walks the overlap in
// window row-major order, so (u, v) and (v, u) are computed bit-identically and the matrix is
// exactly symmetric although each triangle is computed on its own.

#include "normal_common.cuh"
#include "params.cuh"

// Mapping: one block per (column u, patch b): gridDim = (nmax, npatch). The block stages
// spot u in shared memory (ny·nx doubles, dynamic), then its threads stride over the rows v of
// column u, each computing one entry and storing it (consecutive threads → consecutive v:
// coalesced stores of the whole column, zeros included). Thread 0 then forms AᵀWp and AᵀW1 of
// u. Both triangles are computed, doubling the pair work, to keep every store coalesced and
// the kernel free of cross-block dependencies; the pair work is small beside the nmax² stores.
extern "C" __global__ void normal_dense(const NormalDenseParams args)
{
    extern __shared__ double su[];
    const int u = blockIdx.x;
    const int b = blockIdx.y;
    const int4 pb = args.patch[b];
    const int n = pb.x;
    const int ld = pb.w;
    const long long base = (long long)b * args.nmax;
    double* col = args.ata + (base + u) * args.nmax;
    if (u >= n) {
        // Padding unknown: an identity column keeps the padded matrix positive definite.
        for (int v = threadIdx.x; v < args.nmax; v += blockDim.x) {
            col[v] = (v == u) ? 1.0 : 0.0;
        }
        if (threadIdx.x == 0) {
            args.atp[base + u] = 0.0;
            args.atw1[base + u] = 0.0;
        }
        return;
    }
    const int nps = args.ny * args.nx;
    const double* sug = args.spots + args.spot_off[base + u];
    for (int k = threadIdx.x; k < nps; k += blockDim.x) {
        su[k] = sug[k];
    }
    __syncthreads();
    const SpotGeom gu = unpack_geom(args.geom[base + u]);
    const double* P = args.pix + args.win_off[b];
    const double* W = args.ivar + args.win_off[b];
    for (int v = threadIdx.x; v < args.nmax; v += blockDim.x) {
        double a = 0.0;
        if (v < n) {
            const SpotGeom gv = unpack_geom(args.geom[base + v]);
            a = pair_sum(su, args.spots + args.spot_off[base + v], gu, gv, args.ny, args.nx, W, ld);
        }
        col[v] = a;
    }
    if (threadIdx.x == 0) {
        double rhs = 0.0;
        double fw = 0.0;
        for (int iy = gu.iy0; iy < gu.iy1; ++iy) {
            const long long r = (long long)(gu.row0 + iy) * ld + gu.col0;
            for (int ix = 0; ix < args.nx; ++ix) {
                const double ws = __dmul_rn(su[iy * args.nx + ix], W[r + ix]);
                rhs = fma(ws, P[r + ix], rhs);
                fw = __dadd_rn(fw, ws);
            }
        }
        args.atp[base + u] = rhs;
        args.atw1[base + u] = fw;
    }
}

// The regularisation (cpu::normal::regularization): needs the largest AᵀW1 of the patch, a
// reduction over all its columns, hence a second launch after normal_dense.
// Mapping: one block per patch, exactly REG_THREADS threads (a power of two, which the tree
// reduction relies on); a shared-memory max reduction (exact, so its order does not matter),
// then the threads stride over the unknowns adding λ² + ε to the
// diagonal. Padding unknowns are left alone (their diagonal is 1).
#define REG_THREADS 256

extern "C" __global__ void __launch_bounds__(REG_THREADS)
normal_regularize(const NormalRegularizeParams args)
{
    __shared__ double red[REG_THREADS];
    const int b = blockIdx.x;
    const int n = args.patch[b].x;
    const long long base = (long long)b * args.nmax;
    double m = __longlong_as_double(0xfff0000000000000ULL);  // -inf, the max's identity
    for (int u = threadIdx.x; u < n; u += blockDim.x) {
        m = fmax(m, args.atw1[base + u]);
    }
    red[threadIdx.x] = m;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s /= 2) {
        if (threadIdx.x < s) {
            red[threadIdx.x] = fmax(red[threadIdx.x], red[threadIdx.x + s]);
        }
        __syncthreads();
    }
    const double minweight = __dmul_rn(1e-4, red[0]);
    const double reg2 = __dmul_rn(args.regularize, args.regularize);
    for (int u = threadIdx.x; u < n; u += blockDim.x) {
        const double fw = args.atw1[base + u];
        double lambda2;
        if (fw < minweight) {
            const double d = __dsub_rn(minweight, fw);
            lambda2 = __dmul_rn(d, d);
        } else {
            lambda2 = reg2;
        }
        double* diag = args.ata + (base + u) * args.nmax + u;
        *diag = __dadd_rn(*diag, __dadd_rn(lambda2, args.epsilon));
    }
}
