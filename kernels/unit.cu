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

extern "C" __global__ void unit_scatter(
    int nblock, int ncol, int nd2, int nwave, int ncmax, int nkmax,
    const int* __restrict__ place,
    const int* __restrict__ info,
    const int* __restrict__ status,
    const double* __restrict__ flux,
    const double* __restrict__ fluxivar,
    const double* __restrict__ resolution,
    const double* __restrict__ chi2pix,
    const double* __restrict__ pixmask,
    double* __restrict__ u_flux,
    double* __restrict__ u_ivar,
    double* __restrict__ u_resolution,
    double* __restrict__ u_chi2pix,
    double* __restrict__ u_pixmask)
{
    const int k = blockIdx.x;
    if (k >= nblock) {
        return;
    }
    const int* p = place + 5 * k;
    const int b = p[0], c = p[1], row = p[2], w0 = p[3], nk = p[4];
    if (info[b] != 0 || status[k] != 0) {
        return;
    }
    for (int j = threadIdx.x; j < nk; j += blockDim.x) {
        const long long u = (long long)row * nwave + w0 + j;
        const long long s = ((long long)b * ncmax + c) * nkmax + j;
        const long long d = (long long)k * ncol + j;
        u_flux[u] = flux[d];
        u_ivar[u] = fluxivar[d];
        u_chi2pix[u] = chi2pix[s];
        u_pixmask[u] = pixmask[s];
        for (int e = 0; e < nd2; ++e) {
            u_resolution[((long long)row * nd2 + e) * nwave + w0 + j] =
                resolution[((long long)k * nd2 + e) * ncol + j];
        }
    }
}
