// Partitioned k-NN of DEGC (docs/design.md section 2.3), one source for both builds.
//
// A warp serves one token v: it scans the tokens of v's partition in
// increasing index order, computes each similarity xn_v . xn_u as a
// lane-parallel dot product, and lane 0 keeps a sorted list of the best K - 1
// in slots 1..K-1 (slot 0 is always v itself, whatever its similarity). A
// later token only displaces an earlier one when strictly more similar, which
// is the "ties to the lower index" rule. Missing slots (partition smaller than
// K) hold v with valid = 0. O(N * K) output memory, no N x N matrix.
#ifndef CVIG_KNN_IMPL_H
#define CVIG_KNN_IMPL_H

#include "../common/cvig_args.h"
#include "../common/cvig_hd.h"

namespace cvig {

template <typename T>
struct KnnImage {
    const T* x;            // [N, C] normalised tokens of one image
    const int32_t* lab;    // [N]
    int N, C, K;
    int32_t* idx;          // [N, K]
    int32_t* valid;        // [N, K]
};

// Insert (sim, u) into slots 1..K-1 of a list sorted by decreasing similarity
// that holds `filled` entries (slot 0 included); a full list drops its last.
CVIG_HD void knn_insert(float* best, int* who, int filled, int K, float sim, int u) {
    int p = filled < K ? filled : K - 1;
    while (p > 1 && sim > best[p - 1]) {  // strict: an equal similarity stays behind the lower index
        best[p] = best[p - 1];
        who[p] = who[p - 1];
        --p;
    }
    best[p] = sim;
    who[p] = u;
}

// warp item v of [0, N). best/who: K entries of scratch owned by this warp.
template <typename T>
CVIG_HD void knn_token(const KnnImage<T>& s, int v, int lane, float* best, int* who) {
    const int mine = s.lab[v];
    const T* xv = s.x + static_cast<size_t>(v) * s.C;
    int filled = 1;  // slot 0: self
    if (lane == 0) who[0] = v;
    for (int u = 0; u < s.N && s.K > 1; ++u) {  // K = 1: self is the only neighbour
        if (u == v || s.lab[u] != mine) continue;
        const float sim = warp_dot(xv, s.x + static_cast<size_t>(u) * s.C, s.C, lane);
        const bool skip = filled == s.K && !(sim > best[s.K - 1]);
        // Every lane has read best[K-1] before lane 0 may change it (warp_dot's shuffles order no memory):
        // without this, a lane that reads lane 0's new list can decide differently and leave the warp's
        // collectives out of step (found by the SIMT executor, tests/test_kernels_simt.py).
        warp_sync();
        if (skip) continue;  // the same decision on every lane: all read the same best[K-1]
        if (lane == 0) knn_insert(best, who, filled, s.K, sim, u);
        if (filled < s.K) ++filled;
        warp_sync();  // lane 0's list is visible to the warp before the next comparison
    }
    int32_t* oi = s.idx + static_cast<size_t>(v) * s.K;
    int32_t* ov = s.valid + static_cast<size_t>(v) * s.K;
    for (int j = lane; j < s.K; j += lane_stride()) {
        oi[j] = j < filled ? who[j] : v;
        ov[j] = j < filled ? 1 : 0;
    }
    warp_sync();  // the scratch is reused by this warp's next token
}

}  // namespace cvig

#endif  // CVIG_KNN_IMPL_H
