// Helpers of normal.cu: one pair of spots' contribution to AᵀWA. Mirrored by `pair_sum` in
// src/extract/gpu/normal.rs (the host twin); change both together.
// A guard rather than #pragma once: ptx.rs pastes this file into normal.cu's text, where a
// pragma once would sit in the main file.
#ifndef SPEXTRACT_NORMAL_COMMON_CUH
#define SPEXTRACT_NORMAL_COMMON_CUH

// Where one unknown's spot lies in its patch window (cpu::normal::SpotGeom).
struct SpotGeom {
    int row0;  // window row of the spot's first row (negative when trimmed at the top)
    int col0;  // window column of the spot's first column
    int iy0;   // first spot row inside the window
    int iy1;   // one past the last spot row inside the window (<= iy0 when none is)
};

__device__ __forceinline__ SpotGeom unpack_geom(int4 g)
{
    SpotGeom s;
    s.row0 = g.x;
    s.col0 = g.y;
    s.iy0 = g.z;
    s.iy1 = g.w;
    return s;
}

// Σ su·sv·w over the pixels where both spots lie in the window (W: the window's ivar, row
// stride ld). Spots more than a spot apart share no pixel and give exactly 0 without a visit.
// The two spot values are multiplied first and the overlap is walked in window row-major
// order, so swapping u and v gives the bit-identical sum.
__device__ __forceinline__ double pair_sum(
    const double* su, const double* __restrict__ sv, SpotGeom gu, SpotGeom gv,
    int ny, int nx, const double* __restrict__ W, int ld)
{
    const int dy = gv.row0 - gu.row0;
    const int dx = gv.col0 - gu.col0;
    if (dy >= ny || -dy >= ny || dx >= nx || -dx >= nx) {
        return 0.0;
    }
    // Window rows where both spots are in the window; the columns of every spot are.
    const int rlo = max(gu.row0 + gu.iy0, gv.row0 + gv.iy0);
    const int rhi = min(gu.row0 + gu.iy1, gv.row0 + gv.iy1);
    const int clo = max(gu.col0, gv.col0);
    const int chi = min(gu.col0, gv.col0) + nx;
    double acc = 0.0;
    for (int r = rlo; r < rhi; ++r) {
        const int ru = (r - gu.row0) * nx - gu.col0;
        const int rv = (r - gv.row0) * nx - gv.col0;
        const long long rw = (long long)r * ld;
        for (int c = clo; c < chi; ++c) {
            acc = fma(__dmul_rn(su[ru + c], sv[rv + c]), W[rw + c], acc);
        }
    }
    return acc;
}

#endif  // SPEXTRACT_NORMAL_COMMON_CUH
