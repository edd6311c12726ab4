// Pixel-integrated Gauss–Hermite spots for a block of fibers × wavelengths: the GPU twin of
// `psf::spots::SpotEvaluator::spot` (and of `hermite::pixel_integrals`), in f64.
//
// Thread mapping: ONE WARP PER SPOT, several warps (spots) per block.
//   A DESI spot is 11 × 17 = 187 pixels built from ~50 short Legendre series, 30 pixel edges
//   and two small matrix products (7 × 7 coefficients against 17 and 11 pixel integrals). A
//   warp's 32 lanes share each phase's work (series, edges, integrals, pixels) in strided
//   loops, and a phase hands its results to the next through the warp's own slice of shared
//   memory with __syncwarp() in between: no block-wide barrier, so a warp whose spot index is
//   past the end simply returns. A block per spot would leave most of its threads idle in every
//   phase but the last two and pay __syncthreads for each; a thread per spot would keep ~600
//   doubles of scratch per thread in local memory and write its spot with 187-double strides.
//   Consecutive warps take consecutive wavelengths of one fiber, so the fiber's coefficient
//   rows are read from L1/L2 by all of them. The pixel writes of a warp are contiguous.
//
// Arithmetic: the same formulas in the same order as the CPU. The Legendre series (traces,
// GHSIGX/Y, GH-i-j) and the corners use the __d*_rn intrinsics, which NVRTC never fuses into
// FMAs, so x, y, xc, yc and every spot parameter are bit-identical to the CPU's: the corners
// choose the pixel rectangles, and a reader computing them on the CPU (`spots::corners`) must
// find the same ones. The pixel integrals, the two products and the tail may fuse
// (--fmad=true), and erf/exp/pow are CUDA's (within 1–2 ulp of libm's), so spot values differ
// from the CPU's by a few ulps of the spot's peak. The normalising sum is a per-lane sum followed by a warp tree, not
// the CPU's one running sum (src/extract/gpu/spots.rs `twin` mirrors this exactly).
//
// Layout of each warp's shared memory (doubles), computed identically by `spot_layout` here and
// by `Layout::new` in src/extract/gpu/spots.rs (the host sizes the launch from the latter and
// passes the per-warp stride; the kernel traps if its own layout would not fit in it):
//   par [4 + dx·dy + ntail]         x, y, GHSIGX, GHSIGY, GH-i-j at 4 + i·dy + j, then (tail
//                                   PSFs, ntail = 5) TAILAMP … TAILINDE at 4 + dx·dy
//   gx  [nx + 1], gy [ny + 1]       exp(-u²/2) at the pixel edges (without 1/√(2π))
//   sx  [(nx + 1)·dx], sy [...]     per edge: G_m(u) for m < deg, erf(u/√2) at m = deg
//   px  [dx·nx]                     pixel integrals along x, [m·nx + k]
//   out [ny·nx]                     ALIASES gx..px (dead by then): the clipped spot
//   py  [dy·ny]                     pixel integrals along y
//   tmp [dy·nx]                     tmp[j·nx + ix] = Σ_i GH-i-j · px[i·nx + ix]

#define SPOTS_PI 3.14159265358979323846
#define SPOTS_FRAC_1_SQRT_2 0.70710678118654752440
// hermite.rs keeps the Gaussian recurrence in a 64-edge array and evaluates exp at every edge
// of wider spots; the same threshold keeps the two bit-for-bit on the same path.
#define SPOTS_MAX_RECURRENCE_EDGES 64
#define SPOTS_FULL_MASK 0xffffffffu
// TAILAMP, TAILCORE, TAILXSCA, TAILYSCA, TAILINDE (psf::tail::TAIL_PARAMS).
#define SPOTS_NTAIL 5

struct SpotLayout {
    int nx, ny, dx, dy;
    int par, gx, gy, sx, sy, px, out, py, tmp, size;
};

__device__ __forceinline__ SpotLayout spot_layout(
    int hsizex, int hsizey, int ghdegx, int ghdegy, int tail)
{
    SpotLayout l;
    l.nx = 2 * hsizex + 1;
    l.ny = 2 * hsizey + 1;
    l.dx = ghdegx + 1;
    l.dy = ghdegy + 1;
    l.par = 0;
    l.gx = l.par + 4 + l.dx * l.dy + (tail ? SPOTS_NTAIL : 0);
    l.gy = l.gx + l.nx + 1;
    l.sx = l.gy + l.ny + 1;
    l.sy = l.sx + (l.nx + 1) * l.dx;
    l.px = l.sy + (l.ny + 1) * l.dy;
    int dead_end = l.px + l.dx * l.nx;
    l.out = l.gx;
    int out_end = l.out + l.ny * l.nx;
    l.py = dead_end > out_end ? dead_end : out_end;
    l.tmp = l.py + l.dy * l.ny;
    l.size = l.tmp + l.dy * l.nx;
    return l;
}

// Σ_k c[k]·P_k(u), P_k by Bonnet's recurrence exactly as `legendre::vander` writes it, summed
// in increasing k like `trace_series`. Unfused (__d*_rn): see the header.
__device__ double legendre_series(const double* __restrict__ c, int n, double u)
{
    double sum = 0.0, pm2 = 0.0, pm1 = 0.0;
    for (int k = 0; k < n; ++k) {
        double p;
        if (k == 0) {
            p = 1.0;
        } else if (k == 1) {
            p = u;
        } else {
            double kf = (double)k;
            // ((2k - 1)·u·P_{k-1} - (k - 1)·P_{k-2}) / k
            double a = __dmul_rn(__dmul_rn(__dsub_rn(__dmul_rn(2.0, kf), 1.0), u), pm1);
            double b = __dmul_rn(__dsub_rn(kf, 1.0), pm2);
            p = __ddiv_rn(__dsub_rn(a, b), kf);
        }
        sum = __dadd_rn(sum, __dmul_rn(c[k], p));
        pm2 = pm1;
        pm1 = p;
    }
    return sum;
}

// `LegendreSet::reduced`: 2·(λ - wavemin)/(wavemax - wavemin) - 1.
__device__ __forceinline__ double reduced(double wave, double lo, double hi)
{
    return __dsub_rn(__ddiv_rn(__dmul_rn(2.0, __dsub_rn(wave, lo)), __dsub_rn(hi, lo)), 1.0);
}

// exp(-u²/2) at the nedge pixel edges of one axis, by the recurrence of `pixel_integrals`
// (three exponentials, re-anchored at the edge nearest the centre); wider spots take exp at
// every edge as the CPU does. Sequential by nature: one lane per axis runs it.
__device__ void edge_gaussians(double* g, int nedge, double half, double offset, double sigma)
{
    if (nedge <= SPOTS_MAX_RECURRENCE_EDGES) {
        double h = 1.0 / sigma;
        double u0 = (-half - 0.5 - offset) / sigma;
        double step = exp(-h * h);
        // Rust: ((half + 0.5 + offset).round().max(0.0) as usize).min(nedge - 1); f64::max
        // and fmax both drop a NaN, and the value is tiny, so the conversion is exact.
        double a = fmax(round(half + 0.5 + offset), 0.0);
        int anchor = a < (double)(nedge - 1) ? (int)a : nedge - 1;
        double ua = u0 + (double)anchor * h;
        g[anchor] = exp(-0.5 * ua * ua);
        // Upwards: g(u+h) = g(u)·exp(-u·h - h²/2).
        double ratio = exp(-ua * h - 0.5 * h * h);
        for (int e = anchor + 1; e < nedge; ++e) {
            g[e] = g[e - 1] * ratio;
            ratio *= step;
        }
        // Downwards: g(u-h) = g(u)·exp(u·h - h²/2).
        ratio = exp(ua * h - 0.5 * h * h);
        for (int e = anchor - 1; e >= 0; --e) {
            g[e] = g[e + 1] * ratio;
            ratio *= step;
        }
    } else {
        for (int e = 0; e < nedge; ++e) {
            double u = ((double)e - half - 0.5 - offset) / sigma;
            g[e] = exp(-0.5 * u * u);
        }
    }
}

// One edge's row of `pixel_integrals`' scratch: G_m(u) = He_m(u)·g·/√(2π) for m < deg, and
// erf(u/√2) at m = deg.
__device__ __forceinline__ void edge_row(
    double* row, int e, int deg, double half, double offset, double sigma, double gauss)
{
    double u = ((double)e - half - 0.5 - offset) / sigma;
    double g = gauss * (1.0 / sqrt(2.0 * SPOTS_PI));
    // He_0 = 1, He_1 = u, He_k = u·He_{k-1} - (k-1)·He_{k-2} (`he_vander`).
    double hm2 = 0.0, hm1 = 0.0;
    for (int m = 0; m < deg; ++m) {
        double he = m == 0 ? 1.0 : m == 1 ? u : u * hm1 - (double)(m - 1) * hm2;
        row[m] = he * g;
        hm2 = hm1;
        hm1 = he;
    }
    row[deg] = erf(u * SPOTS_FRAC_1_SQRT_2);
}

// specter's tail at a pixel centre (dx, dy) from the trace, `Tail::value` of src/psf/tail.rs:
// TAILAMP·r²/(TAILCORE² + r²)^(1 + TAILINDE/2), r² = (dx·TAILXSCA)² + (dy·TAILYSCA)², 0 at r = 0.
__device__ __forceinline__ double spot_tail(const double* t, double dx, double dy)
{
    double ax = dx * t[2];
    double ay = dy * t[3];
    double r2 = ax * ax + ay * ay;
    if (r2 == 0.0) {
        return 0.0;
    }
    return t[0] * r2 / pow(t[1] * t[1] + r2, 1.0 + t[4] / 2.0);
}

// values[(f·nwave + w)·ny·nx + iy·nx + ix], xc/yc/x/y[f·nwave + w] for fibers f < nfiber of the
// flattened tables and waves[w]: the layout of `SpotSet`.
//   xtrace [nfiber·ncx], ytrace [nfiber·ncy]: trace coefficients, one row per fiber;
//   params [(nfiber·nrow + r)·ncp + k], nrow = 2 + dx·dy (+ 5 with tails): GHSIGX, GHSIGY,
//          then GH-i-j at r = 2 + i·dy + j (`GhIndex` order), then the tail's rows;
//   ranges [6]: wavemin, wavemax of XTRACE, YTRACE and the PSF HDU;
//   warp_stride: doubles of dynamic shared memory per warp; blockDim.x is a multiple of 32.
#include "params.cuh"

extern "C" __global__ void spots(const SpotsParams args)
{
    extern __shared__ double smem[];
    const SpotLayout l =
        spot_layout(args.hsizex, args.hsizey, args.ghdegx, args.ghdegy, args.tail);
    if (l.size > args.warp_stride) {
        // The host sized the launch for another layout: writing on would overrun the
        // neighbouring warp's memory. Fail the launch loudly instead.
        __trap();
    }
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int spot = blockIdx.x * (blockDim.x >> 5) + warp;
    // Warp-uniform: every lane of a warp has the same spot, so the __syncwarp()s below always
    // see all 32 lanes.
    if (spot >= args.nfiber * args.nwave) {
        return;
    }
    const int fiber = spot / args.nwave;
    const double wave = args.waves[spot - fiber * args.nwave];
    double* s = smem + (size_t)warp * (size_t)args.warp_stride;
    double* par = s + l.par;
    const int nx = l.nx, ny = l.ny, dx = l.dx, dy = l.dy;
    const int nrow = 2 + dx * dy + (args.tail ? SPOTS_NTAIL : 0);

    // Phase 1: the series. Task 0: x, 1: y, 2 + r: parameter row r.
    const double up = reduced(wave, args.ranges[4], args.ranges[5]);
    for (int t = lane; t < 2 + nrow; t += 32) {
        double v;
        if (t == 0) {
            v = legendre_series(args.xtrace + (size_t)fiber * args.ncx, args.ncx,
                                reduced(wave, args.ranges[0], args.ranges[1]));
        } else if (t == 1) {
            v = legendre_series(args.ytrace + (size_t)fiber * args.ncy, args.ncy,
                                reduced(wave, args.ranges[2], args.ranges[3]));
        } else {
            v = legendre_series(args.params + ((size_t)fiber * nrow + (t - 2)) * args.ncp,
                                args.ncp, up);
        }
        par[t] = v;
    }
    __syncwarp();
    const double x = par[0], y = par[1], sigx = par[2], sigy = par[3];
    const double halfx = (double)(nx / 2), halfy = (double)(ny / 2);
    const double offx = __dsub_rn(x, floor(__dadd_rn(x, 0.5)));
    const double offy = __dsub_rn(y, floor(__dadd_rn(y, 0.5)));

    // Phase 2: the Gaussian at the edges, one lane per axis.
    if (lane == 0) {
        edge_gaussians(s + l.gx, nx + 1, halfx, offx, sigx);
    } else if (lane == 1) {
        edge_gaussians(s + l.gy, ny + 1, halfy, offy, sigy);
    }
    __syncwarp();

    // Phase 3: Hermite functions and erf at every edge of both axes.
    for (int t = lane; t < (nx + 1) + (ny + 1); t += 32) {
        if (t <= nx) {
            edge_row(s + l.sx + t * dx, t, dx - 1, halfx, offx, sigx, s[l.gx + t]);
        } else {
            int e = t - (nx + 1);
            edge_row(s + l.sy + e * dy, e, dy - 1, halfy, offy, sigy, s[l.gy + e]);
        }
    }
    __syncwarp();

    // Phase 4: pixel integrals, out[m·npix + k]: m = 0 the Gaussian's integral over pixel k,
    // m ≥ 1 the difference of G_{m-1} at its edges.
    for (int t = lane; t < dx * nx + dy * ny; t += 32) {
        int npix, deg, m, k;
        const double* sc;
        double* o;
        if (t < dx * nx) {
            npix = nx; deg = dx - 1; m = t / nx; k = t - m * nx; sc = s + l.sx; o = s + l.px;
        } else {
            int u = t - dx * nx;
            npix = ny; deg = dy - 1; m = u / ny; k = u - m * ny; sc = s + l.sy; o = s + l.py;
        }
        const double* lo = sc + k * (deg + 1);
        const double* hi = lo + (deg + 1);
        o[m * npix + k] = m == 0 ? 0.5 * (hi[deg] - lo[deg]) : lo[m - 1] - hi[m - 1];
    }
    __syncwarp();

    // Phase 5: tmp[j, ix] = Σ_i GH-i-j · px_i[ix], summed in increasing i like the CPU.
    for (int t = lane; t < dy * nx; t += 32) {
        int j = t / nx, ix = t - j * nx;
        double acc = 0.0;
        for (int i = 0; i < dx; ++i) {
            acc += par[4 + i * dy + j] * s[l.px + i * nx + ix];
        }
        s[l.tmp + t] = acc;
    }
    __syncwarp();

    // Phase 6: spot[iy, ix] = Σ_j py_j[iy] · tmp[j, ix] (increasing j), plus the tail where
    // the PSF has one and TAILAMP is not 0 here, clipped at 0; each lane sums the pixels it
    // wrote, in increasing pixel order. The tail's pixel centres are the corner's columns and
    // rows (xc, yc as written below; exact integers in a double) minus the trace position.
    const double* tail = par + 4 + dx * dy;
    const bool tailed = args.tail && tail[0] != 0.0;
    const double x0 = floor(__dadd_rn(__dsub_rn(x, (double)args.hsizex), 0.5));
    const double y0 = floor(__dadd_rn(__dsub_rn(y, (double)args.hsizey), 0.5));
    double partial = 0.0;
    for (int p = lane; p < ny * nx; p += 32) {
        int iy = p / nx, ix = p - iy * nx;
        double v = 0.0;
        for (int j = 0; j < dy; ++j) {
            v += s[l.py + j * ny + iy] * s[l.tmp + j * nx + ix];
        }
        if (tailed) {
            v += spot_tail(tail, __dsub_rn(x0 + (double)ix, x), __dsub_rn(y0 + (double)iy, y));
        }
        if (v < 0.0) {
            v = 0.0;
        }
        s[l.out + p] = v;
        partial += v;
    }
    // The warp's total: a shuffle-down tree into lane 0, then broadcast.
    for (int off = 16; off > 0; off >>= 1) {
        partial += __shfl_down_sync(SPOTS_FULL_MASK, partial, off);
    }
    const double sum = __shfl_sync(SPOTS_FULL_MASK, partial, 0);

    // Phase 7: normalise and write. Each lane reads only the pixels it wrote itself.
    double* dst = args.values + (size_t)spot * (size_t)(ny * nx);
    for (int p = lane; p < ny * nx; p += 32) {
        double v = s[l.out + p];
        dst[p] = sum > 0.0 ? v / sum : v;
    }
    if (lane == 0) {
        args.xs[spot] = x;
        args.ys[spot] = y;
        args.xc[spot] = (long long)x0;
        args.yc[spot] = (long long)y0;
    }
}
