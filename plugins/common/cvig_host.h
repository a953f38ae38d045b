// Host side of the kernels (libcvig_kernels_host.so): how the phases of the
// shared *_impl.h sources run without a GPU. Built with the host compiler alone.
#ifndef CVIG_HOST_H
#define CVIG_HOST_H

#include <algorithm>
#include <cstdlib>
#include <thread>
#include <vector>

// Per-image host entry points (everything they call inlined: flatten) are compiled twice on x86-64, for AVX2 and for the
// baseline, and the loader picks one (GCC/Clang function multiversioning). The
// wider vectors change no result: each lane's sum keeps its order, and no
// multiply-add is contracted (-ffp-contract=off).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(CVIG_NO_CLONES)
#define CVIG_HOST_SIMD __attribute__((target_clones("avx2", "default"), flatten))
#else
#define CVIG_HOST_SIMD
#endif

namespace cvig {

// Runs a phase serially: every item in order (warp items once, as lane 0; the
// warp collectives of cvig_hd.h evaluate all 32 lanes themselves).
struct SerialExec {
    static constexpr int kChannels = 32;  // 32 channels per item: independent sums the compiler vectorises
    template <typename F>
    void items(int n, F f) {
        for (int i = 0; i < n; ++i) f(i);
    }
    template <typename F>
    void warp_items(int n, F f) {
        for (int i = 0; i < n; ++i) f(i, 0);
    }
    template <typename F>
    void single(F f) {
        f();
    }
};

// Threads for independent images: CVIG_HOST_THREADS, else the hardware's count.
inline int host_threads() {
    if (const char* env = std::getenv("CVIG_HOST_THREADS")) {
        const int n = std::atoi(env);
        if (n > 0) return n;
    }
    const unsigned hw = std::thread::hardware_concurrency();
    return hw > 0 ? static_cast<int>(hw) : 1;
}

// f(i) for i in [0, n), spread over threads in contiguous chunks. Items are
// independent, so the result does not depend on the number of threads.
template <typename F>
void parallel_for(long long n, F f) {
    const long long t = std::min<long long>(host_threads(), n);
    if (t <= 1) {
        for (long long i = 0; i < n; ++i) f(i);
        return;
    }
    std::vector<std::thread> pool;
    const long long chunk = (n + t - 1) / t;
    for (long long w = 0; w < t; ++w) {
        const long long lo = w * chunk, hi = std::min(n, lo + chunk);
        if (lo >= hi) break;
        pool.emplace_back([lo, hi, &f]() {
            for (long long i = lo; i < hi; ++i) f(i);
        });
    }
    for (auto& th : pool) th.join();
}

}  // namespace cvig

#endif  // CVIG_HOST_H
