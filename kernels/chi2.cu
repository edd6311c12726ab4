// Model, per-pixel chi², chi2pix and pixmask fraction of a batch of patches (docs/science.md
// §5.6–5.7), from each patch's solution x; and each patch's part of the model image with the
// pixels' leverage on it (§5.8, model_image).
//
// The host side (src/extract/gpu/chi2.rs and model.rs) flattens the per-patch sizes; the
// plain-Rust twins of the kernels (src/extract/gpu/twins/chi2.rs, model.rs) follow them line
// for line, so that the indexing and the arithmetic below are tested against the CPU backend
// on machines without a GPU. Change one, change the other.
//
// Inputs: the batch as normal::BatchLayout flattens it (patch, win_off, scr_off, pix, ivar,
// spots, spot_off, geom; see kernels/normal.cu: window b's pixel (r, c) is
// pix[win_off[b] + r·ld + c], ld = patch[b].w), plus per patch b two int4 of sizes:
//   dims[2b]   = {nspecpad, nwavetot, core0 (first core fiber among the solved), ncore}
//   dims[2b+1] = {wavepad, nkeep, nstep, 0}
// and x[b·nmax + u] (fiber-major u = f·nwavetot + w, the solver's layout).
// Outputs:
//   model, chi2, valid: one value per window pixel, windows concatenated and contiguous:
//                       pixel (r, c) of window b at scr_off[b] + r·wnx + c. (The windows may
//                       overlap in pix, being cut from one work unit; these are per patch.)
//   chi2pix, pixmask:   [(b·ncmax + c)·nkmax + j] for core fiber c and kept bin j; the slots
//                       past a patch's ncore or nkeep are written 0.
//
// Determinism: the model is a *gather*, not a scatter. Each pixel is owned by one thread,
// which sums the products x_u · spot_u(pixel) over the unknowns u whose spot covers it, in
// increasing u (the order of cpu::chi2::add_spots). A scatter with atomicAdd would add the
// same products in whatever order the scheduler ran the spots, so the model (and everything
// after it) would change in the last bits from run to run. Likewise each projection is one
// thread's sequential sum over the spot's pixels in the CPU's order (row sums in column
// order, then the rows). The only atomics are integer min/max over the bin ranges below,
// whose results do not depend on order. Every product and sum is an explicit rounding
// intrinsic, so that --fmad=true cannot contract them: the results are the CPU's bit for bit.

#include "normal_common.cuh"
#include "params.cuh"

// Empty-range markers of a fiber's bin and column spans (min starts high, max starts low).
#define SPAN_HIGH 0x7fffffff
#define SPAN_LOW (-0x7fffffff - 1)

// One row tile of one patch, staged by the block: every unknown's geometry, coefficient and
// spot offset (so the per-pixel search reads shared memory), and per fiber f in [flo, fhi)
// the range [span[4f], span[4f+1]) of its bins in [blo, bhi) whose spots reach rows
// [r0, r1), with the column range [span[4f+2], span[4f+3]) those spots cover. The spans are
// only a pruning: a pixel still tests each candidate's rows and columns, so the sums do not
// depend on the tile size or on whether the traces are monotonic in wavelength.
// Dynamic shared memory: int4 sg[nmax], double sc[nmax], long long so[nmax], int span[4·nsp].
struct Tile {
    const int4* sg;
    const double* sc;
    const long long* so;
    const int* span;
};

__device__ __forceinline__ Tile stage_tile(
    int nmax, int nx, int n, int nwt, int nsp, int flo, int fhi, int blo, int bhi,
    int r0, int r1,
    const int4* __restrict__ geom_b,        // geom + b·nmax
    const double* __restrict__ coef_b,      // x + b·nmax
    const long long* __restrict__ soff_b)   // spot_off + b·nmax
{
    extern __shared__ int4 smem[];
    int4* sg = smem;
    double* sc = reinterpret_cast<double*>(sg + nmax);
    long long* so = reinterpret_cast<long long*>(sc + nmax);
    int* span = reinterpret_cast<int*>(so + nmax);
    for (int u = threadIdx.x; u < n; u += blockDim.x) {
        sg[u] = geom_b[u];
        sc[u] = coef_b[u];
        so[u] = soff_b[u];
    }
    for (int f = threadIdx.x; f < nsp; f += blockDim.x) {
        span[4 * f + 0] = SPAN_HIGH;
        span[4 * f + 1] = SPAN_LOW;
        span[4 * f + 2] = SPAN_HIGH;
        span[4 * f + 3] = SPAN_LOW;
    }
    __syncthreads();
    for (int u = threadIdx.x; u < n; u += blockDim.x) {
        const int f = u / nwt;
        const int w = u - f * nwt;
        if (f < flo || f >= fhi || w < blo || w >= bhi) {
            continue;
        }
        const SpotGeom g = unpack_geom(sg[u]);
        const int lo = max(g.row0 + g.iy0, r0);
        const int hi = min(g.row0 + g.iy1, r1);
        if (lo < hi) {
            // Integer min/max: the result is the same whatever order the threads arrive in.
            atomicMin(&span[4 * f + 0], w);
            atomicMax(&span[4 * f + 1], w + 1);
            atomicMin(&span[4 * f + 2], g.col0);
            atomicMax(&span[4 * f + 3], g.col0 + nx);
        }
    }
    __syncthreads();
    Tile t;
    t.sg = sg;
    t.sc = sc;
    t.so = so;
    t.span = span;
    return t;
}

// Σ coef_u · spot_u[r - row0_u, c - col0_u] over the staged unknowns of fibers [flo, fhi)
// whose spot covers window pixel (r, c), in increasing u (fiber-major): cpu::chi2::add_spots'
// order, whose `*d += a * v` is the __dmul_rn then __dadd_rn here. Unknowns that do not cover
// the pixel add nothing on the CPU either, so skipping them leaves the sum bit-identical.
__device__ __forceinline__ double gather_pixel(
    const Tile& t, int r, int c, int nwt, int flo, int fhi, int nx,
    const double* __restrict__ spots)
{
    double acc = 0.0;
    for (int f = flo; f < fhi; ++f) {
        if (c < t.span[4 * f + 2] || c >= t.span[4 * f + 3]) {
            continue;  // no spot of this fiber reaches the column (or none reaches the tile)
        }
        const int whi = t.span[4 * f + 1];
        for (int w = t.span[4 * f + 0]; w < whi; ++w) {
            const int u = f * nwt + w;
            const SpotGeom g = unpack_geom(t.sg[u]);
            const int iy = r - g.row0;
            if (iy < g.iy0 || iy >= g.iy1) {
                continue;
            }
            const int ix = c - g.col0;
            if (ix < 0 || ix >= nx) {
                continue;
            }
            acc = __dadd_rn(acc, __dmul_rn(t.sc[u], spots[t.so[u] + iy * nx + ix]));
        }
    }
    return acc;
}

// The block's row tile of its patch, for the per-pixel kernels (blockIdx = (tile, patch)):
// the window's width and row stride, rows [r0, r1), the patch's dims, its window's offsets in
// the pixels and in the scratch, and every fiber's unknowns staged with coefficients `coef`.
struct PixelTile {
    int wnx;
    int ld;
    int r0;
    int r1;
    int4 d0;
    int4 d1;
    long long off;
    long long soff;
    Tile t;
};

// Fills *pt and returns true; false, for the whole block and before any barrier, when the tile
// lies past the patch's window.
__device__ __forceinline__ bool pixel_tile(
    int tile_rows, int nmax, int nx, const int4* __restrict__ patch,
    const int4* __restrict__ dims, const long long* __restrict__ win_off,
    const long long* __restrict__ scr_off, const int4* __restrict__ geom,
    const double* __restrict__ coef, const long long* __restrict__ spot_off, PixelTile* pt)
{
    const int b = blockIdx.y;
    const int4 pb = patch[b];
    const int r0 = blockIdx.x * tile_rows;
    if (r0 >= pb.y) {
        return false;
    }
    pt->wnx = pb.z;
    pt->ld = pb.w;
    pt->r0 = r0;
    pt->r1 = min(r0 + tile_rows, pb.y);
    pt->d0 = dims[2 * b];
    pt->d1 = dims[2 * b + 1];
    const int nsp = pt->d0.x;
    const int nwt = pt->d0.y;
    const long long base = (long long)b * nmax;
    pt->t = stage_tile(nmax, nx, pb.x, nwt, nsp, 0, nsp, 0, nwt, r0, pt->r1, geom + base,
                       coef + base, spot_off + base);
    pt->off = win_off[b];
    pt->soff = scr_off[b];
    return true;
}

// Mapping: one block per (row tile, patch): gridDim = (ceil(max window rows / tile_rows),
// npatch). The block stages the patch's unknowns (pixel_tile), then its threads stride over
// the tile's pixels in row-major order (consecutive threads → consecutive columns: coalesced
// reads of pix/ivar and writes of the three outputs), each thread gathering one pixel's model
// and forming its chi² exactly as cpu::chi2::pixel_chi2. Tiles past the patch's window return
// at once (uniformly, before any barrier). Every window pixel is in exactly one tile.
extern "C" __global__ void chi2_pixels(const Chi2PixelsParams args)
{
    PixelTile pt;
    if (!pixel_tile(args.tile_rows, args.nmax, args.nx, args.patch, args.dims, args.win_off,
                    args.scr_off, args.geom, args.x, args.spot_off, &pt)) {
        return;
    }
    const Tile& t = pt.t;
    const int wnx = pt.wnx;
    const int ld = pt.ld;
    const int r0 = pt.r0;
    const int nsp = pt.d0.x;
    const int nwt = pt.d0.y;
    const long long off = pt.off;
    const long long soff = pt.soff;
    const int npix = (pt.r1 - r0) * wnx;
    for (int k = threadIdx.x; k < npix; k += blockDim.x) {
        const int r = r0 + k / wnx;
        const int c = k - (k / wnx) * wnx;
        const double m = gather_pixel(t, r, c, nwt, 0, nsp, args.nx, args.spots);
        const long long p = off + (long long)r * ld + c;
        const long long q = soff + (long long)r * wnx + c;
        const double w = args.ivar[p];
        // gpu_specter's CPU path: modelivar = (psferr·model + 1e-32)⁻², totivar = 1/(1/modelivar
        // + 1/ivar) where both are positive, else 0.
        const double tm = __dadd_rn(__dmul_rn(args.psferr, m), 1e-32);
        const double modelivar = __ddiv_rn(1.0, __dmul_rn(tm, tm));
        double tot = 0.0;
        if (modelivar > 0.0 && w > 0.0) {
            tot = __ddiv_rn(1.0, __dadd_rn(__ddiv_rn(1.0, modelivar), __ddiv_rn(1.0, w)));
        }
        const double dd = __dsub_rn(args.pix[p], m);
        args.model[q] = m;
        args.chi2[q] = __dmul_rn(__dmul_rn(dd, dd), tot);
        args.valid[q] = (tot > 0.0) ? 1.0 : 0.0;
    }
}

// Mapping: one thread per output slot (core fiber c, kept bin j) of patch b: gridDim =
// (ceil(ncmax·nkmax / blockDim.x), npatch), slot t = c·nkmax + j (consecutive threads →
// consecutive bins of one fiber: coalesced stores). The thread projects the masked-pixel
// indicator, chi² and the valid indicator onto its unknown's spot, three sequential sums in
// cpu::chi2::project's order (each spot row summed in column order, then added to the total),
// so that chi2pix = Σ chi²·spot / Σ valid·spot and pixmask = Σ masked·spot are the CPU's bits.
// Slots past the patch's ncore or nkeep are written 0. Runs after chi2_pixels (same stream).
extern "C" __global__ void chi2_project(const Chi2ProjectParams args)
{
    const int b = blockIdx.y;
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= args.ncmax * args.nkmax) {
        return;
    }
    const int c = t / args.nkmax;
    const int j = t - c * args.nkmax;
    const long long o = (long long)b * args.ncmax * args.nkmax + t;
    const int4 d0 = args.dims[2 * b];
    const int4 d1 = args.dims[2 * b + 1];
    const int nwt = d0.y;
    const int core0 = d0.z;
    const int ncore = d0.w;
    const int wavepad = d1.x;
    const int nkeep = d1.y;
    if (c >= ncore || j >= nkeep) {
        args.chi2pix[o] = 0.0;
        args.pixmask[o] = 0.0;
        return;
    }
    const long long slot = (long long)b * args.nmax + (long long)(core0 + c) * nwt + wavepad + j;
    const SpotGeom g = unpack_geom(args.geom[slot]);
    const double* s = args.spots + args.spot_off[slot];
    const int wnx = args.patch[b].z;
    const int ld = args.patch[b].w;
    const long long off = args.win_off[b];
    const long long soff = args.scr_off[b];
    double pm = 0.0;
    double num = 0.0;
    double den = 0.0;
    for (int iy = g.iy0; iy < g.iy1; ++iy) {
        const long long row = off + (long long)(g.row0 + iy) * ld + g.col0;
        const long long srow = soff + (long long)(g.row0 + iy) * wnx + g.col0;
        double rp = 0.0;
        double rn = 0.0;
        double rd = 0.0;
        for (int ix = 0; ix < args.nx; ++ix) {
            const double sv = s[iy * args.nx + ix];
            const double masked = (args.ivar[row + ix] == 0.0) ? 1.0 : 0.0;
            rp = __dadd_rn(rp, __dmul_rn(sv, masked));
            rn = __dadd_rn(rn, __dmul_rn(sv, args.chi2[srow + ix]));
            rd = __dadd_rn(rd, __dmul_rn(sv, args.valid[srow + ix]));
        }
        pm = __dadd_rn(pm, rp);
        num = __dadd_rn(num, rn);
        den = __dadd_rn(den, rd);
    }
    args.pixmask[o] = pm;
    args.chi2pix[o] = (den > 0.0) ? __ddiv_rn(num, den) : 0.0;
}

// The unknowns a pixel's leverage gathers from a list of those covering it, when they number
// at most this many (a pixel of the real r PSF's bundle 0 on the 0.8 Å grid is under at most
// 24 spots); beyond it, the kernel scans the fibers' spans again for every covered core
// unknown, with the same sums.
#ifndef COVER_MAX
#define COVER_MAX 64
#endif

// Spot value of staged unknown u at window pixel (r, c) into *a, or false where its spot does
// not reach the pixel.
__device__ __forceinline__ bool spot_at(
    const Tile& t, int u, int r, int c, int nx, const double* __restrict__ spots, double* a)
{
    const SpotGeom g = unpack_geom(t.sg[u]);
    const int iy = r - g.row0;
    const int ix = c - g.col0;
    if (iy < g.iy0 || iy >= g.iy1 || ix < 0 || ix >= nx) {
        return false;
    }
    *a = spots[t.so[u] + iy * nx + ix];
    return true;
}

// Σ_v col[v] · a_v over the staged unknowns v of fibers [0, nsp) whose spot covers pixel
// (r, c), in increasing v.
__device__ __forceinline__ double covariance_scan(
    const Tile& t, const double* __restrict__ col, int r, int c, int nwt, int nsp, int nx,
    const double* __restrict__ spots)
{
    double s = 0.0;
    for (int f = 0; f < nsp; ++f) {
        if (c < t.span[4 * f + 2] || c >= t.span[4 * f + 3]) {
            continue;
        }
        const int whi = t.span[4 * f + 1];
        for (int w = t.span[4 * f + 0]; w < whi; ++w) {
            const int v = f * nwt + w;
            double a;
            if (spot_at(t, v, r, c, nx, spots, &a)) {
                s = __dadd_rn(s, __dmul_rn(col[v], a));
            }
        }
    }
    return s;
}

// Mapping: as chi2_pixels (one block per (row tile, patch), the patch's unknowns staged, the
// threads striding over the tile's pixels). Each pixel gets its part of the model image, the
// deconvolved flux of the core fibers' core bins through their spots,
//   image = Σ_{u core} x_u · a_u,
// summed in increasing u as cpu::chi2::add_spots does (that function adds the core fibers'
// other bins too, with coefficient 0, which leaves every sum's bits unchanged: the running sum
// starts at +0 and never becomes −0), so the image is the CPU's for the same x, bit for bit.
// With covariance columns (cov not null: cov[cov_off[b] + i·cov_ld + v] = C[v, k0 + i], k0 the
// first core unknown), also the pixel's leverage on that image,
//   leverage = ivar · Σ_{u core} a_u · (Σ_v C[v, u] · a_v),
// v over every unknown whose spot covers the pixel, in increasing v, then u: the hat matrix's
// diagonal restricted to the core unknowns, which cpu::chi2::leverage sums pair by pair from its
// own band of C (so the two agree to rounding, not bit for bit). The covering unknowns are
// listed once per pixel (COVER_MAX), in increasing u, so that the sums visit the same terms in
// the same order whichever way they are found: the outputs do not depend on the list's size.
extern "C" __global__ void model_image(const ModelImageParams args)
{
    // Every fiber's spans: the leverage's inner sum runs over all of them.
    PixelTile pt;
    if (!pixel_tile(args.tile_rows, args.nmax, args.nx, args.patch, args.dims, args.win_off,
                    args.scr_off, args.geom, args.x, args.spot_off, &pt)) {
        return;
    }
    const Tile& t = pt.t;
    const int wnx = pt.wnx;
    const int r0 = pt.r0;
    const int nsp = pt.d0.x;
    const int nwt = pt.d0.y;
    const int core0 = pt.d0.z;
    const int ncore = pt.d0.w;
    const int blo = pt.d1.x;
    const int bhi = pt.d1.x + pt.d1.z;
    const int nx = args.nx;
    const double* cov_b = (args.cov != nullptr) ? args.cov + args.cov_off[blockIdx.y] : nullptr;
    const int k0 = core0 * nwt;
    const int npix = (pt.r1 - r0) * wnx;
    for (int k = threadIdx.x; k < npix; k += blockDim.x) {
        const int r = r0 + k / wnx;
        const int c = k - (k / wnx) * wnx;
        double img = 0.0;
        double h = 0.0;
        int ncov = COVER_MAX + 1;
        int cu[COVER_MAX];
        double ca[COVER_MAX];
        if (cov_b != nullptr) {
            ncov = 0;
            for (int f = 0; f < nsp; ++f) {
                if (c < t.span[4 * f + 2] || c >= t.span[4 * f + 3]) {
                    continue;
                }
                const int whi = t.span[4 * f + 1];
                for (int w = t.span[4 * f + 0]; w < whi; ++w) {
                    const int v = f * nwt + w;
                    double a;
                    if (spot_at(t, v, r, c, nx, args.spots, &a)) {
                        if (ncov < COVER_MAX) {
                            cu[ncov] = v;
                            ca[ncov] = a;
                        }
                        ++ncov;
                    }
                }
            }
        }
        if (ncov <= COVER_MAX) {
            // From the list (with the leverage only).
            for (int i = 0; i < ncov; ++i) {
                const int u = cu[i];
                const int f = u / nwt;
                const int w = u - f * nwt;
                if (f < core0 || f >= core0 + ncore || w < blo || w >= bhi) {
                    continue;
                }
                const double a = ca[i];
                img = __dadd_rn(img, __dmul_rn(t.sc[u], a));
                const double* col = cov_b + (long long)(u - k0) * args.cov_ld;
                double s = 0.0;
                for (int j = 0; j < ncov; ++j) {
                    s = __dadd_rn(s, __dmul_rn(col[cu[j]], ca[j]));
                }
                h = __dadd_rn(h, __dmul_rn(a, s));
            }
        } else {
            // Without the leverage, or a pixel under more spots than the list holds.
            for (int f = core0; f < core0 + ncore; ++f) {
                if (c < t.span[4 * f + 2] || c >= t.span[4 * f + 3]) {
                    continue;
                }
                const int whi = min(t.span[4 * f + 1], bhi);
                for (int w = max(t.span[4 * f + 0], blo); w < whi; ++w) {
                    const int u = f * nwt + w;
                    double a;
                    if (!spot_at(t, u, r, c, nx, args.spots, &a)) {
                        continue;
                    }
                    img = __dadd_rn(img, __dmul_rn(t.sc[u], a));
                    if (cov_b != nullptr) {
                        const double* col = cov_b + (long long)(u - k0) * args.cov_ld;
                        const double s = covariance_scan(t, col, r, c, nwt, nsp, nx, args.spots);
                        h = __dadd_rn(h, __dmul_rn(a, s));
                    }
                }
            }
        }
        const long long q = pt.soff + (long long)r * wnx + c;
        args.image[q] = img;
        if (cov_b != nullptr) {
            args.leverage[q] = __dmul_rn(h, args.ivar[pt.off + (long long)r * pt.ld + c]);
        }
    }
}
