// Segment ops of DEGC, one source for both builds: the per-partition mean
// (docs/design.md section 2.4) and the fused gather-max-relative of G-MRGCN,
// max_u x_u - x_v, without a [B, N, K, C] tensor. One work item per output
// element; sums in FP64 over the members in token order (deterministic).
#ifndef CVIG_SEGMENT_IMPL_H
#define CVIG_SEGMENT_IMPL_H

#include "../common/cvig_args.h"
#include "../common/cvig_hd.h"

namespace cvig {

// item of [0, B*k*C): z[b, j, c] and, for c = 0, counts[b, j]
template <typename T>
CVIG_HD void segment_mean_item(const T* x, const int32_t* labels, int N, int C, int k, T* z, int32_t* counts,
                               long long item) {
    const int c = static_cast<int>(item % C);
    const int j = static_cast<int>((item / C) % k);
    const long long b = item / (static_cast<long long>(C) * k);
    const int32_t* lab = labels + static_cast<size_t>(b) * N;
    double acc = 0.0;
    int n = 0;
    for (int v = 0; v < N; ++v) {
        if (lab[v] == j) {
            acc += static_cast<double>(load(x, (static_cast<size_t>(b) * N + v) * C + c));
            ++n;
        }
    }
    store(z, static_cast<size_t>(item), n > 0 ? static_cast<float>(acc / n) : 0.f);
    if (c == 0) counts[static_cast<size_t>(b) * k + j] = n;
}

// item of [0, B*N*C): out[b, v, c] = max_j x[b, idx[b, v, j], c] - x[b, v, c]
template <typename T>
CVIG_HD void gather_max_rel_item(const T* x, const int32_t* idx, int N, int C, int K, T* out, long long item) {
    const int c = static_cast<int>(item % C);
    const long long bv = item / C;  // b * N + v
    const size_t img = static_cast<size_t>(bv / N) * N;
    const int32_t* nb = idx + static_cast<size_t>(bv) * K;
    float m = load(x, (img + nb[0]) * C + c);
    for (int j = 1; j < K; ++j) {
        const float u = load(x, (img + nb[j]) * C + c);
        m = u > m ? u : m;
    }
    store(out, static_cast<size_t>(item), fsub(m, load(x, static_cast<size_t>(item))));
}

}  // namespace cvig

#endif  // CVIG_SEGMENT_IMPL_H
