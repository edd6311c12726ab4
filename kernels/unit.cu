// A work unit's results gathered on the device, so that they can travel to the writer straight
// from device memory (the cuda-aware-mpi build): the kept bins of every decorrelation block of
// a chunk, scattered into the unit's fiber × bin arrays (row-major, `nwave` bins a row; the
// resolution `[row·nd2 + diagonal]·nwave + bin`, as the frame stores it).
//
// One CUDA block per decorrelation block k, whose placement is
//   place[5k..5k+5] = { patch b, core fiber c, unit row, first kept bin, kept bins }.
// A block is written only when its patch factored (info[b] == 0) and it decorrelated
// (status[k] == 0, DECORR_OK): the host hands the others to the CPU and uploads its results
// over the whole patch afterwards, in stream order.

#include "params.cuh"

extern "C" __global__ void unit_scatter(const UnitScatterParams args)
{
    const int k = blockIdx.x;
    if (k >= args.nblock) {
        return;
    }
    const int* p = args.place + 5 * k;
    const int b = p[0], c = p[1], row = p[2], w0 = p[3], nk = p[4];
    if (args.info[b] != 0 || args.status[k] != 0) {
        return;
    }
    for (int j = threadIdx.x; j < nk; j += blockDim.x) {
        const long long u = (long long)row * args.nwave + w0 + j;
        const long long s = ((long long)b * args.ncmax + c) * args.nkmax + j;
        const long long d = (long long)k * args.ncol + j;
        args.u_flux[u] = args.flux[d];
        args.u_ivar[u] = args.fluxivar[d];
        args.u_chi2pix[u] = args.chi2pix[s];
        args.u_pixmask[u] = args.pixmask[s];
        for (int e = 0; e < args.nd2; ++e) {
            args.u_resolution[((long long)row * args.nd2 + e) * args.nwave + w0 + j] =
                args.resolution[((long long)k * args.nd2 + e) * args.ncol + j];
        }
    }
}
