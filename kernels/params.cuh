// Every kernel's parameters, as one struct per entry point passed by value (the kernel's only
// argument). Mirrored field for field by the `kernel_params!` structs of the launchers
// (src/extract/gpu/{unit,chi2,decorrelate,normal,spots}.rs), device buffers there being u64
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

#endif  // SPEXTRACT_PARAMS_CUH
