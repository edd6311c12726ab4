// A small CUDA emulation layer: runs the CUDA C kernels of kernels/*.cu on the CPU, for the
// tests in src/extract/gpu/emu.rs (which compile a runner program around a kernel file with
// g++ -std=c++20 -ffp-contract=off and compare its outputs with the host twins).
//
// Not embedded as a kernel: build.rs takes only kernels/*.cu and *.cuh, not this folder.
//
// Execution model of one launch: the blocks run one after the other; a block's threads are
// OS threads created once per launch, running the kernel concurrently.
//   __syncthreads()        a std::barrier over the block's threads;
//   __syncthreads_or(v)    the same barrier, with an OR reduction (see emu_sync_or);
//   __syncwarp()           a std::barrier over the 32 threads of the warp (fewer in a partial
//                          last warp); __shfl_*_sync exchange through the warp's slots;
//   a thread returning from the kernel drops out of its block's and warp's barriers, as
//   exited threads take no part in later barriers on a GPU.
// Shared memory: `__shared__` arrays become function statics (blocks run one at a time);
// `extern __shared__ T name[];` is rewritten by the Rust side to a pointer into the launch's
// dynamic shared memory (emu_dynamic_smem()), 16-byte aligned and filled with 0xff bytes (a NaN
// as double, -1 as int) at the start of every block, so that reading unwritten shared memory
// shows in the results.
// Arithmetic: __d*_rn are the plain IEEE operations and fma is std::fma; the runner is compiled
// with -ffp-contract=off so that nothing else is fused. Math functions are glibc's.

#pragma once

#include <math.h>

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

// ---- CUDA keywords ------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

struct alignas(16) int4 {
    int x, y, z, w;
};
inline int4 make_int4(int x, int y, int z, int w) { return int4{x, y, z, w}; }

struct alignas(8) int2 {
    int x, y;
};
inline int2 make_int2(int x, int y) { return int2{x, y}; }

// ---- Launch state -------------------------------------------------------------------------
struct EmuBlockState {
    std::optional<std::barrier<>> block;
    std::vector<std::unique_ptr<std::barrier<>>> warps;
    // __syncthreads_or's accumulators, three in rotation (emu_sync_or).
    std::atomic<int> acc[3];
    // One slot per thread for the warp shuffles.
    std::vector<uint64_t> shfl;
    // Dynamic shared memory, in 16-byte units.
    std::vector<int4> smem;
    size_t smem_bytes = 0;
};

inline EmuBlockState emu_state;
inline dim3 gridDim;
inline dim3 blockDim;
inline dim3 blockIdx;
inline thread_local dim3 threadIdx;
inline thread_local unsigned emu_tid;        // linear thread index in the block
inline thread_local unsigned emu_sync_calls;  // __syncthreads_or calls by this thread in the block

inline void* emu_dynamic_smem() { return emu_state.smem.data(); }

inline unsigned emu_nthreads() { return blockDim.x * blockDim.y * blockDim.z; }

inline void __syncthreads() { emu_state.block->arrive_and_wait(); }

// Call k (counted per thread within the block) uses acc[k % 3]: each thread ORs its value in,
// waits at the block barrier, reads the total, then clears acc[(k + 2) % 3], the slot of call
// k - 1. Every thread read that slot before arriving at call k's barrier, and the next writes to
// it are call k + 2's, which no thread makes before all have arrived at call k + 1's barrier,
// hence after every clear. Slots 0 and 1 start at 0 with each block.
inline int __syncthreads_or(int v)
{
    const unsigned k = emu_sync_calls++;
    std::atomic<int>& mine = emu_state.acc[k % 3];
    if (v) {
        mine.fetch_or(1, std::memory_order_relaxed);
    }
    emu_state.block->arrive_and_wait();
    const int r = mine.load(std::memory_order_relaxed);
    emu_state.acc[(k + 2) % 3].store(0, std::memory_order_relaxed);
    return r;
}

inline int __syncthreads_and(int v) { return !__syncthreads_or(!v); }

inline void __syncwarp(unsigned = 0xffffffffu) { emu_state.warps[emu_tid / 32]->arrive_and_wait(); }

template <class T>
inline T emu_shfl(T v, int src_lane)
{
    static_assert(sizeof(T) <= sizeof(uint64_t));
    const unsigned warp0 = emu_tid & ~31u;
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    emu_state.shfl[emu_tid] = bits;
    __syncwarp();
    const unsigned src = warp0 + (unsigned)src_lane;
    const uint64_t got = (src < emu_nthreads()) ? emu_state.shfl[src] : bits;
    __syncwarp();
    T out;
    std::memcpy(&out, &got, sizeof(T));
    return out;
}

template <class T>
inline T __shfl_sync(unsigned, T v, int src_lane, int width = 32)
{
    const int lane = (int)(emu_tid & 31u);
    const int base = lane - lane % width;
    return emu_shfl(v, base + src_lane % width);
}

template <class T>
inline T __shfl_down_sync(unsigned, T v, unsigned delta, int width = 32)
{
    const int lane = (int)(emu_tid & 31u);
    const int seg = lane % width;
    const int src = (seg + (int)delta < width) ? lane + (int)delta : lane;
    return emu_shfl(v, src);
}

template <class T>
inline T __shfl_up_sync(unsigned, T v, unsigned delta, int width = 32)
{
    const int lane = (int)(emu_tid & 31u);
    const int seg = lane % width;
    const int src = (seg >= (int)delta) ? lane - (int)delta : lane;
    return emu_shfl(v, src);
}

template <class T>
inline T __shfl_xor_sync(unsigned, T v, int mask, int width = 32)
{
    const int lane = (int)(emu_tid & 31u);
    const int src = lane ^ mask;
    return emu_shfl(v, (src / width == lane / width) ? src : lane);
}

[[noreturn]] inline void __trap()
{
    std::fprintf(stderr, "cuda_emu: __trap() in block (%u, %u, %u), thread (%u, %u, %u)\n",
                 blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x, threadIdx.y, threadIdx.z);
    std::fflush(stderr);
    std::_Exit(3);
}

// ---- Atomics (integer, on shared or global memory) -------------------------------------------
template <class T>
inline T emu_atomic_update(T* p, T v, bool (*better)(T, T))
{
    std::atomic_ref<T> a(*p);
    T old = a.load();
    while (better(v, old) && !a.compare_exchange_weak(old, v)) {
    }
    return old;
}
inline int atomicMin(int* p, int v)
{
    return emu_atomic_update<int>(p, v, [](int a, int b) { return a < b; });
}
inline int atomicMax(int* p, int v)
{
    return emu_atomic_update<int>(p, v, [](int a, int b) { return a > b; });
}
inline unsigned atomicMin(unsigned* p, unsigned v)
{
    return emu_atomic_update<unsigned>(p, v, [](unsigned a, unsigned b) { return a < b; });
}
inline unsigned atomicMax(unsigned* p, unsigned v)
{
    return emu_atomic_update<unsigned>(p, v, [](unsigned a, unsigned b) { return a > b; });
}
inline int atomicAdd(int* p, int v) { return std::atomic_ref<int>(*p).fetch_add(v); }
inline int atomicOr(int* p, int v) { return std::atomic_ref<int>(*p).fetch_or(v); }

// ---- Arithmetic -----------------------------------------------------------------------------
// IEEE round-to-nearest operations; with -ffp-contract=off nothing is fused into them.
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline double __dsqrt_rn(double a) { return std::sqrt(a); }
inline double __drcp_rn(double a) { return 1.0 / a; }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
inline double rsqrt(double a) { return 1.0 / std::sqrt(a); }
inline double __longlong_as_double(long long v)
{
    double d;
    std::memcpy(&d, &v, sizeof d);
    return d;
}
inline long long __double_as_longlong(double d)
{
    long long v;
    std::memcpy(&v, &d, sizeof v);
    return v;
}

// CUDA's integer min/max (the device overloads the kernels call unqualified).
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline double min(double a, double b) { return std::fmin(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }

// ---- Launch ---------------------------------------------------------------------------------
// Runs `kernel` (a callable running the kernel for the current thread) over the grid.
inline void emu_launch(dim3 grid, dim3 block, size_t smem_bytes, const std::function<void()>& kernel)
{
    gridDim = grid;
    blockDim = block;
    const unsigned nt = emu_nthreads();
    const unsigned long long nblocks = (unsigned long long)grid.x * grid.y * grid.z;
    if (nt == 0 || nt > 1024 || nblocks == 0) {
        std::fprintf(stderr, "cuda_emu: invalid launch: %u threads, %llu blocks\n", nt, nblocks);
        std::_Exit(4);
    }
    EmuBlockState& st = emu_state;
    st.smem_bytes = smem_bytes;
    st.smem.assign((smem_bytes + 15) / 16, int4{0, 0, 0, 0});
    st.shfl.assign(nt, 0);
    st.warps.clear();
    for (unsigned w = 0; w * 32 < nt; ++w) {
        st.warps.push_back(nullptr);
    }
    unsigned long long next = 0;
    bool done = false;
    // The block boundary: runs once all threads finished the previous block (or at the start),
    // before any of them starts the next one.
    auto setup = [&]() noexcept {
        if (next == nblocks) {
            done = true;
            return;
        }
        const unsigned long long b = next++;
        blockIdx.x = (unsigned)(b % grid.x);
        blockIdx.y = (unsigned)((b / grid.x) % grid.y);
        blockIdx.z = (unsigned)(b / ((unsigned long long)grid.x * grid.y));
        st.block.emplace(nt);
        for (unsigned w = 0; w < st.warps.size(); ++w) {
            const unsigned n = (nt - 32 * w < 32) ? nt - 32 * w : 32;
            st.warps[w] = std::make_unique<std::barrier<>>(n);
        }
        for (auto& a : st.acc) {
            a.store(0);
        }
        if (!st.smem.empty()) {
            std::memset(st.smem.data(), 0xff, st.smem.size() * sizeof(int4));
        }
    };
    std::barrier boundary(nt, setup);
    auto body = [&](unsigned tid) {
        emu_tid = tid;
        threadIdx.x = tid % block.x;
        threadIdx.y = (tid / block.x) % block.y;
        threadIdx.z = tid / (block.x * block.y);
        for (;;) {
            boundary.arrive_and_wait();
            if (done) {
                return;
            }
            emu_sync_calls = 0;
            kernel();
            // Exited: no part in the block's or the warp's later barriers.
            st.block->arrive_and_drop();
            st.warps[tid / 32]->arrive_and_drop();
        }
    };
    std::vector<std::thread> threads;
    threads.reserve(nt);
    for (unsigned t = 0; t < nt; ++t) {
        threads.emplace_back(body, t);
    }
    for (auto& t : threads) {
        t.join();
    }
}

// ---- The runner's I/O -----------------------------------------------------------------------
// Input (binary, native endianness): u32 name length, name; u32 grid x, y, z; u32 block x, y,
// z; u64 dynamic shared-memory bytes; u32 argument count; per argument a kind byte: 'i' (i32),
// 'd' (f64), 'p' (u64 byte count, then the bytes), 's' (a parameter struct passed by value:
// u64 byte count, the bytes, u32 patch count, then per patch u32 byte offset and u32 argument
// index of a 'p' buffer whose address goes there). Output: every 'p' buffer's bytes in order,
// each preceded by its u64 length.
struct EmuArg {
    char kind;
    int32_t i = 0;
    double d = 0;
    std::vector<int4> buf;  // 16-byte aligned storage
    uint64_t bytes = 0;
    std::vector<std::pair<uint32_t, uint32_t>> patches;  // 's': (offset, buffer argument)
};

struct Ptr {
    void* p;
    template <class T>
    operator T*() const
    {
        return static_cast<T*>(p);
    }
};

struct EmuLaunch {
    std::string name;
    dim3 grid, block;
    uint64_t smem = 0;
    std::vector<EmuArg> args;

    int32_t i(size_t k) const { return check(k, 'i').i; }
    double d(size_t k) const { return check(k, 'd').d; }
    Ptr p(size_t k) { return Ptr{const_cast<EmuArg&>(check(k, 'p')).buf.data()}; }

    const EmuArg& check(size_t k, char kind) const
    {
        if (k >= args.size() || args[k].kind != kind) {
            std::fprintf(stderr, "cuda_emu: argument %zu of %s is not of kind %c\n", k,
                         name.c_str(), kind);
            std::_Exit(5);
        }
        return args[k];
    }
};

inline void emu_read(FILE* f, void* p, size_t n)
{
    if (n && std::fread(p, 1, n, f) != n) {
        std::fprintf(stderr, "cuda_emu: truncated input\n");
        std::_Exit(6);
    }
}

template <class T>
inline T emu_get(FILE* f)
{
    T v;
    emu_read(f, &v, sizeof v);
    return v;
}

inline EmuLaunch emu_read_launch(FILE* f)
{
    EmuLaunch l;
    const uint32_t nlen = emu_get<uint32_t>(f);
    l.name.resize(nlen);
    emu_read(f, l.name.data(), nlen);
    l.grid.x = emu_get<uint32_t>(f);
    l.grid.y = emu_get<uint32_t>(f);
    l.grid.z = emu_get<uint32_t>(f);
    l.block.x = emu_get<uint32_t>(f);
    l.block.y = emu_get<uint32_t>(f);
    l.block.z = emu_get<uint32_t>(f);
    l.smem = emu_get<uint64_t>(f);
    const uint32_t nargs = emu_get<uint32_t>(f);
    l.args.resize(nargs);
    for (auto& a : l.args) {
        a.kind = emu_get<char>(f);
        switch (a.kind) {
        case 'i':
            a.i = emu_get<int32_t>(f);
            break;
        case 'd':
            a.d = emu_get<double>(f);
            break;
        case 'p':
        case 's':
            a.bytes = emu_get<uint64_t>(f);
            // At least one element, so that an empty buffer still has an address.
            a.buf.resize(a.bytes / 16 + 1);
            emu_read(f, a.buf.data(), a.bytes);
            if (a.kind == 's') {
                a.patches.resize(emu_get<uint32_t>(f));
                for (auto& pt : a.patches) {
                    pt.first = emu_get<uint32_t>(f);
                    pt.second = emu_get<uint32_t>(f);
                }
            }
            break;
        default:
            std::fprintf(stderr, "cuda_emu: unknown argument kind %d\n", a.kind);
            std::_Exit(6);
        }
    }
    return l;
}

inline void emu_write_buffers(FILE* f, const EmuLaunch& l)
{
    for (const auto& a : l.args) {
        if (a.kind == 'p') {
            std::fwrite(&a.bytes, sizeof a.bytes, 1, f);
            std::fwrite(a.buf.data(), 1, a.bytes, f);
        }
    }
}

// Launches `kernel`, whose one parameter is a struct P passed by value (kernels/params.cuh),
// with argument 0's bytes as P and each patched offset holding its buffer's address.
template <class P>
inline void emu_call(void (*kernel)(P), EmuLaunch& l)
{
    static_assert(std::is_trivially_copyable_v<P>);
    const EmuArg& a = l.check(0, 's');
    if (a.bytes != sizeof(P)) {
        std::fprintf(stderr, "cuda_emu: %s takes %zu parameter bytes, got %llu\n",
                     l.name.c_str(), sizeof(P), (unsigned long long)a.bytes);
        std::_Exit(5);
    }
    unsigned char bytes[sizeof(P)];
    std::memcpy(bytes, a.buf.data(), sizeof(P));
    for (const auto& [off, k] : a.patches) {
        void* addr = l.p(k).p;
        if (off + sizeof addr > sizeof(P)) {
            std::fprintf(stderr, "cuda_emu: an address at byte %u of %s's parameters\n", off,
                         l.name.c_str());
            std::_Exit(5);
        }
        std::memcpy(bytes + off, &addr, sizeof addr);
    }
    P params;
    std::memcpy(&params, bytes, sizeof(P));
    emu_launch(l.grid, l.block, l.smem, [&] { kernel(params); });
}
