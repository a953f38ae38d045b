// k-means of DEGC (docs/design.md section 2.2) as explicit phases over one image.
//
// One source for both builds: the CUDA kernel runs each phase with the
// threads (or warps) of one block and a __syncthreads() between phases; the
// host build runs the same phases one after another. Each work item of a
// phase is independent and deterministic, so the result does not depend on
// how items are spread over threads.
//
// Per iteration: centroid norms, assignment (argmin_j ||c_j||^2 - 2 x.c_j,
// strict < keeps the lower j on ties), member counts, member order (tokens of
// each cluster in increasing index, a stable counting sort), and the centroid
// update: each channel's sum over the members in token order, in FP64, so the
// mean of identical tokens is exactly that token and no atomics are needed.
// An empty cluster keeps its centroid, or, with empty_zero (numerics="authors":
// the mean over no member that torch_kmeans takes), becomes the zero vector,
// which then competes in the next assignment. T updates, T + 1 assignments;
// `cent` ends as the centroids of the last update.
#ifndef CVIG_KMEANS_IMPL_H
#define CVIG_KMEANS_IMPL_H

#include "../common/cvig_args.h"
#include "../common/cvig_hd.h"

namespace cvig {

template <typename T>
struct KMeansImage {
    const T* x;  // [N, C] tokens of one image (normalised, or centred for numerics="authors")
    int N, C, k;
    int empty_zero;  // 1: an empty cluster's centroid becomes 0; 0: it keeps its centroid
    float* cent;   // [k, C]
    float* cnorm;  // [k]
    int* cnt;      // [k] members per cluster
    int* start;    // [k] first position of each cluster in `order`
    int* lab;      // [N]
    int* order;    // [N] tokens sorted by (label, index)
};

// Carve the working set (kmeans_smem_bytes(N, C, k) bytes at `ws`) into the image's arrays.
template <typename T>
CVIG_HD KMeansImage<T> kmeans_image(const T* x, int N, int C, int k, void* ws, int empty_zero = 0) {
    KMeansImage<T> s;
    s.x = x;
    s.N = N;
    s.C = C;
    s.k = k;
    s.empty_zero = empty_zero;
    s.cent = static_cast<float*>(ws);
    s.cnorm = s.cent + static_cast<size_t>(k) * C;
    s.cnt = reinterpret_cast<int*>(s.cnorm + k);
    s.start = s.cnt + k;
    s.lab = s.start + k;
    s.order = s.lab + N;
    return s;
}

// item i of [0, k*C): centroid element i, rounded to T, into out [k, C]
template <typename T>
CVIG_HD void km_store_centroid(const KMeansImage<T>& s, T* out, int i) {
    store(out, static_cast<size_t>(i), s.cent[i]);
}

// item i of [0, k*C): initial centroid j = token (2j+1)N // (2k)
template <typename T>
CVIG_HD void km_init(const KMeansImage<T>& s, int i) {
    const int j = i / s.C, c = i % s.C;
    const int v = static_cast<int>((static_cast<long long>(2 * j + 1) * s.N) / (2 * s.k));
    s.cent[i] = load(s.x, static_cast<size_t>(v) * s.C + c);
}

// warp item j of [0, k): squared norm of centroid j
template <typename T>
CVIG_HD void km_norm(const KMeansImage<T>& s, int j, int lane) {
    const float* c = s.cent + static_cast<size_t>(j) * s.C;
    const float v = warp_dot(c, c, s.C, lane);
    if (lane == 0) s.cnorm[j] = v;
}

// warp item v of [0, N): label of token v
template <typename T>
CVIG_HD void km_assign(const KMeansImage<T>& s, int v, int lane) {
    const T* xv = s.x + static_cast<size_t>(v) * s.C;
    float best = 0.f;
    int best_j = 0;
    for (int j = 0; j < s.k; ++j) {
        const float d = fsub(s.cnorm[j], fmul(2.f, warp_dot(xv, s.cent + static_cast<size_t>(j) * s.C, s.C, lane)));
        if (j == 0 || d < best) {  // strict: equal distances keep the lower cluster
            best = d;
            best_j = j;
        }
    }
    if (lane == 0) s.lab[v] = best_j;
}

// warp item j of [0, k): number of tokens labelled j
template <typename T>
CVIG_HD void km_count(const KMeansImage<T>& s, int j, int lane) {
    int n = 0;
    for (int v0 = 0; v0 < s.N; v0 += kWarp) {
        n += popcount(warp_ballot([&](int l) { return v0 + l < s.N && s.lab[v0 + l] == j; }, lane));
    }
    if (lane == 0) s.cnt[j] = n;
}

// single item: exclusive prefix sum of the counts
template <typename T>
CVIG_HD void km_offsets(const KMeansImage<T>& s) {
    int a = 0;
    for (int j = 0; j < s.k; ++j) {
        s.start[j] = a;
        a += s.cnt[j];
    }
}

// warp item j of [0, k): members of cluster j, in increasing token index, at order[start[j]...]
template <typename T>
CVIG_HD void km_members(const KMeansImage<T>& s, int j, int lane) {
    int pos = s.start[j];
    for (int v0 = 0; v0 < s.N; v0 += kWarp) {
        uint32_t m = warp_ballot([&](int l) { return v0 + l < s.N && s.lab[v0 + l] == j; }, lane);
        if (lane == 0) {
            for (; m != 0u; m &= m - 1u) s.order[pos++] = v0 + lowest_bit(m);
        }
    }
}

// item i of [0, ceil(C / W)): channels [W*i, W*i + W) of every non-empty centroid = FP64 mean of its
// members, each channel summed in token order (of an empty one: kept, or 0 with empty_zero). The GPU takes W = 1 (a thread per channel, coalesced
// across threads); the host W = 32 (32 independent sums per pass over a member's row, which the
// compiler vectorises). Either way each channel's sum is the same sequence of additions.
template <int W, typename T>
CVIG_HD void km_update(const KMeansImage<T>& s, int i) {
    const int c0 = i * W;
    const int m = s.C - c0 < W ? s.C - c0 : W;
    for (int j = 0; j < s.k; ++j) {
        const int n = s.cnt[j];
        if (n == 0) {  // an empty cluster keeps its centroid, or becomes 0
            if (s.empty_zero) {
                for (int l = 0; l < m; ++l) s.cent[static_cast<size_t>(j) * s.C + c0 + l] = 0.f;
            }
            continue;
        }
        const int* members = s.order + s.start[j];
        float* cent = s.cent + static_cast<size_t>(j) * s.C + c0;
        if constexpr (W == 1) {  // a scalar, so that it stays in a register
            double acc = 0.0;
            for (int p = 0; p < n; ++p) acc += static_cast<double>(load(s.x, static_cast<size_t>(members[p]) * s.C + c0));
            cent[0] = static_cast<float>(acc / n);
        } else {
            double acc[W];
            for (int l = 0; l < m; ++l) acc[l] = 0.0;
            for (int p = 0; p < n; ++p) {
                const T* row = s.x + static_cast<size_t>(members[p]) * s.C + c0;
                for (int l = 0; l < m; ++l) acc[l] += static_cast<double>(load(row, l));
            }
            for (int l = 0; l < m; ++l) cent[l] = static_cast<float>(acc[l] / n);
        }
    }
}

// The whole algorithm for one image. Exec provides items(n, f) (f(i) for i in
// [0, n)), warp_items(n, f) (f(i, lane)), single(f), each ending with a barrier,
// and kChannels, the channels one update item covers. On return s.lab and
// s.cnt hold the final labels and counts.
#ifdef __CUDACC__
#pragma nv_exec_check_disable
#endif
template <typename T, typename Exec>
CVIG_HD void kmeans_run(const KMeansImage<T>& s, int iters, Exec& ex) {
    ex.items(s.k * s.C, [&](int i) { km_init(s, i); });
    for (int t = 0;; ++t) {
        ex.warp_items(s.k, [&](int j, int lane) { km_norm(s, j, lane); });
        ex.warp_items(s.N, [&](int v, int lane) { km_assign(s, v, lane); });
        ex.warp_items(s.k, [&](int j, int lane) { km_count(s, j, lane); });
        if (t == iters) break;  // T updates, T + 1 assignments
        ex.single([&]() { km_offsets(s); });
        ex.warp_items(s.k, [&](int j, int lane) { km_members(s, j, lane); });
        constexpr int W = Exec::kChannels;
        ex.items((s.C + W - 1) / W, [&](int i) { km_update<W>(s, i); });
    }
}

}  // namespace cvig

#endif  // CVIG_KMEANS_IMPL_H
