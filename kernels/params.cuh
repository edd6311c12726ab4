// Every kernel's parameters, as one struct per entry point passed by value (the kernel's only
// argument). Mirrored field for field by the `kernel_params!` structs of the launchers
// (src/extract/gpu/{unit,chi2,model,decorrelate,normal,spots}.rs), device buffers there being u64
// device addresses: the static_asserts below state each struct's size and field offsets, a
// test in src/extract/gpu/launch.rs reads them back and compares them with the Rust layout,
// and the PTX ABI test checks each entry point's parameter size, so that a change on one side
// only fails a test. Fields are ordered so that no struct has implicit padding.
// A guard rather than #pragma once: ptx.rs pastes this file into each kernel's text.
#ifndef SPEXTRACT_PARAMS_CUH
#define SPEXTRACT_PARAMS_CUH

// A field's offset. NVRTC knows no offsetof (nor __builtin_offsetof): there only the sizes
// are asserted (and the PTX ABI test checks them again); the emulator's g++ and nvcc check
// the offsets too, which are the same on host and device for these types.
#ifdef __CUDACC_RTC__
#define SPX_FIELD(T, field, offset) static_assert(true, "")
#else
#define SPX_FIELD(T, field, offset) \
    static_assert(__builtin_offsetof(T, field) == (offset), #T "." #field)
#endif
static_assert(sizeof(void*) == 8, "device addresses are 64-bit");

// unit.cu, unit_scatter.
struct UnitScatterParams {
    int nblock;
    int ncol;
    int nd2;
    int nwave;
    int ncmax;
    int nkmax;
    const int* __restrict__ place;
    const int* __restrict__ info;
    const int* __restrict__ status;
    const double* __restrict__ flux;
    const double* __restrict__ fluxivar;
    const double* __restrict__ resolution;
    const double* __restrict__ chi2pix;
    const double* __restrict__ pixmask;
    double* __restrict__ u_flux;
    double* __restrict__ u_ivar;
    double* __restrict__ u_resolution;
    double* __restrict__ u_chi2pix;
    double* __restrict__ u_pixmask;
};
static_assert(sizeof(UnitScatterParams) == 128, "UnitScatterParams");
SPX_FIELD(UnitScatterParams, nblock, 0);
SPX_FIELD(UnitScatterParams, ncol, 4);
SPX_FIELD(UnitScatterParams, nd2, 8);
SPX_FIELD(UnitScatterParams, nwave, 12);
SPX_FIELD(UnitScatterParams, ncmax, 16);
SPX_FIELD(UnitScatterParams, nkmax, 20);
SPX_FIELD(UnitScatterParams, place, 24);
SPX_FIELD(UnitScatterParams, info, 32);
SPX_FIELD(UnitScatterParams, status, 40);
SPX_FIELD(UnitScatterParams, flux, 48);
SPX_FIELD(UnitScatterParams, fluxivar, 56);
SPX_FIELD(UnitScatterParams, resolution, 64);
SPX_FIELD(UnitScatterParams, chi2pix, 72);
SPX_FIELD(UnitScatterParams, pixmask, 80);
SPX_FIELD(UnitScatterParams, u_flux, 88);
SPX_FIELD(UnitScatterParams, u_ivar, 96);
SPX_FIELD(UnitScatterParams, u_resolution, 104);
SPX_FIELD(UnitScatterParams, u_chi2pix, 112);
SPX_FIELD(UnitScatterParams, u_pixmask, 120);

// chi2.cu, chi2_pixels.
struct Chi2PixelsParams {
    int tile_rows;
    int nmax;
    int nx;
    int pad0;  // explicit padding (kept zero): no struct has implicit padding
    double psferr;
    const int4* __restrict__ patch;  // [npatch] {n, window ny, window nx, ld}
    const int4* __restrict__ dims;  // [2·npatch] see the header
    const long long* __restrict__ win_off;  // [npatch]
    const long long* __restrict__ scr_off;  // [npatch]
    const double* __restrict__ pix;
    const double* __restrict__ ivar;
    const double* __restrict__ spots;
    const long long* __restrict__ spot_off;  // [npatch·nmax]
    const int4* __restrict__ geom;  // [npatch·nmax]
    const double* __restrict__ x;  // [npatch·nmax]
    double* __restrict__ model;  // [window pixels]
    double* __restrict__ chi2;
    double* __restrict__ valid;
};
static_assert(sizeof(Chi2PixelsParams) == 128, "Chi2PixelsParams");
SPX_FIELD(Chi2PixelsParams, tile_rows, 0);
SPX_FIELD(Chi2PixelsParams, nmax, 4);
SPX_FIELD(Chi2PixelsParams, nx, 8);
SPX_FIELD(Chi2PixelsParams, pad0, 12);
SPX_FIELD(Chi2PixelsParams, psferr, 16);
SPX_FIELD(Chi2PixelsParams, patch, 24);
SPX_FIELD(Chi2PixelsParams, dims, 32);
SPX_FIELD(Chi2PixelsParams, win_off, 40);
SPX_FIELD(Chi2PixelsParams, scr_off, 48);
SPX_FIELD(Chi2PixelsParams, pix, 56);
SPX_FIELD(Chi2PixelsParams, ivar, 64);
SPX_FIELD(Chi2PixelsParams, spots, 72);
SPX_FIELD(Chi2PixelsParams, spot_off, 80);
SPX_FIELD(Chi2PixelsParams, geom, 88);
SPX_FIELD(Chi2PixelsParams, x, 96);
SPX_FIELD(Chi2PixelsParams, model, 104);
SPX_FIELD(Chi2PixelsParams, chi2, 112);
SPX_FIELD(Chi2PixelsParams, valid, 120);

// chi2.cu, chi2_project.
struct Chi2ProjectParams {
    int nmax;
    int nx;
    int ncmax;
    int nkmax;
    const int4* __restrict__ patch;
    const int4* __restrict__ dims;
    const long long* __restrict__ win_off;
    const long long* __restrict__ scr_off;
    const double* __restrict__ ivar;
    const double* __restrict__ spots;
    const long long* __restrict__ spot_off;
    const int4* __restrict__ geom;
    const double* __restrict__ chi2;  // chi2_pixels' outputs
    const double* __restrict__ valid;
    double* __restrict__ chi2pix;  // [npatch·ncmax·nkmax]
    double* __restrict__ pixmask;
};
static_assert(sizeof(Chi2ProjectParams) == 112, "Chi2ProjectParams");
SPX_FIELD(Chi2ProjectParams, nmax, 0);
SPX_FIELD(Chi2ProjectParams, nx, 4);
SPX_FIELD(Chi2ProjectParams, ncmax, 8);
SPX_FIELD(Chi2ProjectParams, nkmax, 12);
SPX_FIELD(Chi2ProjectParams, patch, 16);
SPX_FIELD(Chi2ProjectParams, dims, 24);
SPX_FIELD(Chi2ProjectParams, win_off, 32);
SPX_FIELD(Chi2ProjectParams, scr_off, 40);
SPX_FIELD(Chi2ProjectParams, ivar, 48);
SPX_FIELD(Chi2ProjectParams, spots, 56);
SPX_FIELD(Chi2ProjectParams, spot_off, 64);
SPX_FIELD(Chi2ProjectParams, geom, 72);
SPX_FIELD(Chi2ProjectParams, chi2, 80);
SPX_FIELD(Chi2ProjectParams, valid, 88);
SPX_FIELD(Chi2ProjectParams, chi2pix, 96);
SPX_FIELD(Chi2ProjectParams, pixmask, 104);

// chi2.cu, model_image.
struct ModelImageParams {
    int tile_rows;
    int nmax;
    int nx;
    int cov_ld;  // leading dimension of the covariance columns (0 without them)
    const int4* __restrict__ patch;  // [npatch] {n, window ny, window nx, ld}
    const int4* __restrict__ dims;  // [2·npatch] as chi2_pixels
    const long long* __restrict__ win_off;  // [npatch]
    const long long* __restrict__ scr_off;  // [npatch]
    const double* __restrict__ ivar;
    const double* __restrict__ spots;
    const long long* __restrict__ spot_off;  // [npatch·nmax]
    const int4* __restrict__ geom;  // [npatch·nmax]
    const double* __restrict__ x;  // [npatch·nmax]
    const double* __restrict__ cov;  // C[:, core] columns, or null: no leverage
    const long long* __restrict__ cov_off;  // [npatch] patch b's first column in cov
    double* __restrict__ image;  // [window pixels]
    double* __restrict__ leverage;  // [window pixels], written when cov is not null
};
static_assert(sizeof(ModelImageParams) == 120, "ModelImageParams");
SPX_FIELD(ModelImageParams, tile_rows, 0);
SPX_FIELD(ModelImageParams, nmax, 4);
SPX_FIELD(ModelImageParams, nx, 8);
SPX_FIELD(ModelImageParams, cov_ld, 12);
SPX_FIELD(ModelImageParams, patch, 16);
SPX_FIELD(ModelImageParams, dims, 24);
SPX_FIELD(ModelImageParams, win_off, 32);
SPX_FIELD(ModelImageParams, scr_off, 40);
SPX_FIELD(ModelImageParams, ivar, 48);
SPX_FIELD(ModelImageParams, spots, 56);
SPX_FIELD(ModelImageParams, spot_off, 64);
SPX_FIELD(ModelImageParams, geom, 72);
SPX_FIELD(ModelImageParams, x, 80);
SPX_FIELD(ModelImageParams, cov, 88);
SPX_FIELD(ModelImageParams, cov_off, 96);
SPX_FIELD(ModelImageParams, image, 104);
SPX_FIELD(ModelImageParams, leverage, 112);

// decorrelate.cu, decorrelate.
struct DecorrelateParams {
    int ld;  // shared-memory size parameter (even, ≥ every m)
    int ncol;  // output columns per block (largest nstep)
    int nd2;  // resolution rows per block (largest 2·ndiag+1)
    int max_sweeps;
    const int* __restrict__ params;  // [nblock·8], see above
    const long long* __restrict__ offs;  // [nblock·3] {cov, x, basis offsets}
    const double* __restrict__ cov;
    const double* __restrict__ x;
    const double* __restrict__ basis;  // the blocks' starting bases U
    double* __restrict__ flux;  // [nblock·ncol]
    double* __restrict__ fluxivar;  // [nblock·ncol]
    double* __restrict__ resolution;  // [nblock·nd2·ncol]
    int* __restrict__ status;  // [nblock]
    int* __restrict__ sweeps;
};
static_assert(sizeof(DecorrelateParams) == 96, "DecorrelateParams");
SPX_FIELD(DecorrelateParams, ld, 0);
SPX_FIELD(DecorrelateParams, ncol, 4);
SPX_FIELD(DecorrelateParams, nd2, 8);
SPX_FIELD(DecorrelateParams, max_sweeps, 12);
SPX_FIELD(DecorrelateParams, params, 16);
SPX_FIELD(DecorrelateParams, offs, 24);
SPX_FIELD(DecorrelateParams, cov, 32);
SPX_FIELD(DecorrelateParams, x, 40);
SPX_FIELD(DecorrelateParams, basis, 48);
SPX_FIELD(DecorrelateParams, flux, 56);
SPX_FIELD(DecorrelateParams, fluxivar, 64);
SPX_FIELD(DecorrelateParams, resolution, 72);
SPX_FIELD(DecorrelateParams, status, 80);
SPX_FIELD(DecorrelateParams, sweeps, 88);

// decorrelate.cu, decorrelate_eigen.
struct DecorrelateEigenParams {
    int ld;  // shared-memory size parameter (even, ≥ every m)
    int ncol;  // output columns per block (largest nstep)
    int nd2;  // resolution rows per block (largest 2·ndiag+1)
    int pad0;  // explicit padding (kept zero): no struct has implicit padding
    const int* __restrict__ params;  // [nblock·8], as decorrelate
    const long long* __restrict__ offs;  // [nblock·3] {slot, x, (unused) offsets}
    const double* __restrict__ evec;  // syev's eigenvectors, in the slots
    const double* __restrict__ eval;  // [nslot·cov_ld] ascending eigenvalues
    const int* __restrict__ einfo;  // [nslot] syev's info
    const double* __restrict__ x;
    double* __restrict__ flux;  // [nblock·ncol]
    double* __restrict__ fluxivar;  // [nblock·ncol]
    double* __restrict__ resolution;  // [nblock·nd2·ncol]
    int* __restrict__ status;  // [nblock]
    int* __restrict__ sweeps;
};
static_assert(sizeof(DecorrelateEigenParams) == 104, "DecorrelateEigenParams");
SPX_FIELD(DecorrelateEigenParams, ld, 0);
SPX_FIELD(DecorrelateEigenParams, ncol, 4);
SPX_FIELD(DecorrelateEigenParams, nd2, 8);
SPX_FIELD(DecorrelateEigenParams, pad0, 12);
SPX_FIELD(DecorrelateEigenParams, params, 16);
SPX_FIELD(DecorrelateEigenParams, offs, 24);
SPX_FIELD(DecorrelateEigenParams, evec, 32);
SPX_FIELD(DecorrelateEigenParams, eval, 40);
SPX_FIELD(DecorrelateEigenParams, einfo, 48);
SPX_FIELD(DecorrelateEigenParams, x, 56);
SPX_FIELD(DecorrelateEigenParams, flux, 64);
SPX_FIELD(DecorrelateEigenParams, fluxivar, 72);
SPX_FIELD(DecorrelateEigenParams, resolution, 80);
SPX_FIELD(DecorrelateEigenParams, status, 88);
SPX_FIELD(DecorrelateEigenParams, sweeps, 96);

// normal.cu, normal_dense.
struct NormalDenseParams {
    int nmax;
    int ny;
    int nx;
    int pad0;  // explicit padding (kept zero): no struct has implicit padding
    const int4* __restrict__ patch;  // [npatch] {n, window ny, window nx, ld}
    const long long* __restrict__ win_off;  // [npatch] offset of the window in pix/ivar
    const double* __restrict__ pix;  // windows, row-major, rows ld apart
    const double* __restrict__ ivar;
    const double* __restrict__ spots;  // the batch's spots, ny·nx each, row-major
    const long long* __restrict__ spot_off;  // [npatch·nmax] offset of unknown u's spot
    const int4* __restrict__ geom;  // [npatch·nmax] {row0, col0, iy0, iy1}
    double* __restrict__ ata;  // [npatch·nmax·nmax]
    double* __restrict__ atp;  // [npatch·nmax]
    double* __restrict__ atw1;
};
static_assert(sizeof(NormalDenseParams) == 96, "NormalDenseParams");
SPX_FIELD(NormalDenseParams, nmax, 0);
SPX_FIELD(NormalDenseParams, ny, 4);
SPX_FIELD(NormalDenseParams, nx, 8);
SPX_FIELD(NormalDenseParams, pad0, 12);
SPX_FIELD(NormalDenseParams, patch, 16);
SPX_FIELD(NormalDenseParams, win_off, 24);
SPX_FIELD(NormalDenseParams, pix, 32);
SPX_FIELD(NormalDenseParams, ivar, 40);
SPX_FIELD(NormalDenseParams, spots, 48);
SPX_FIELD(NormalDenseParams, spot_off, 56);
SPX_FIELD(NormalDenseParams, geom, 64);
SPX_FIELD(NormalDenseParams, ata, 72);
SPX_FIELD(NormalDenseParams, atp, 80);
SPX_FIELD(NormalDenseParams, atw1, 88);

// normal.cu, normal_regularize.
struct NormalRegularizeParams {
    int nmax;
    int pad0;  // explicit padding (kept zero): no struct has implicit padding
    const int4* __restrict__ patch;
    const double* __restrict__ atw1;
    double regularize;
    double epsilon;
    double* __restrict__ ata;
};
static_assert(sizeof(NormalRegularizeParams) == 48, "NormalRegularizeParams");
SPX_FIELD(NormalRegularizeParams, nmax, 0);
SPX_FIELD(NormalRegularizeParams, pad0, 4);
SPX_FIELD(NormalRegularizeParams, patch, 8);
SPX_FIELD(NormalRegularizeParams, atw1, 16);
SPX_FIELD(NormalRegularizeParams, regularize, 24);
SPX_FIELD(NormalRegularizeParams, epsilon, 32);
SPX_FIELD(NormalRegularizeParams, ata, 40);

// spots.cu, spots.
struct SpotsParams {
    const double* __restrict__ xtrace;
    const double* __restrict__ ytrace;
    const double* __restrict__ params;
    const double* __restrict__ ranges;
    const double* __restrict__ waves;
    double* __restrict__ values;
    long long* __restrict__ xc;
    long long* __restrict__ yc;
    double* __restrict__ xs;
    double* __restrict__ ys;
    int ncx;
    int ncy;
    int ncp;
    int nfiber;
    int nwave;
    int hsizex;
    int hsizey;
    int ghdegx;
    int ghdegy;
    int warp_stride;
    int tail;  // 1: the PSF has tails, five more parameter rows (psf::tail)
    int pad0;  // explicit padding (kept zero)
};
static_assert(sizeof(SpotsParams) == 128, "SpotsParams");
SPX_FIELD(SpotsParams, xtrace, 0);
SPX_FIELD(SpotsParams, ytrace, 8);
SPX_FIELD(SpotsParams, params, 16);
SPX_FIELD(SpotsParams, ranges, 24);
SPX_FIELD(SpotsParams, waves, 32);
SPX_FIELD(SpotsParams, values, 40);
SPX_FIELD(SpotsParams, xc, 48);
SPX_FIELD(SpotsParams, yc, 56);
SPX_FIELD(SpotsParams, xs, 64);
SPX_FIELD(SpotsParams, ys, 72);
SPX_FIELD(SpotsParams, ncx, 80);
SPX_FIELD(SpotsParams, ncy, 84);
SPX_FIELD(SpotsParams, ncp, 88);
SPX_FIELD(SpotsParams, nfiber, 92);
SPX_FIELD(SpotsParams, nwave, 96);
SPX_FIELD(SpotsParams, hsizex, 100);
SPX_FIELD(SpotsParams, hsizey, 104);
SPX_FIELD(SpotsParams, ghdegx, 108);
SPX_FIELD(SpotsParams, ghdegy, 112);
SPX_FIELD(SpotsParams, warp_stride, 116);
SPX_FIELD(SpotsParams, tail, 120);
SPX_FIELD(SpotsParams, pad0, 124);

#endif  // SPEXTRACT_PARAMS_CUH
