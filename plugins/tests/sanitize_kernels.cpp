// Calls every launcher of common/cvig_kernels.h on small cudaMalloc'd buffers, for compute-sanitizer:
//
//   compute-sanitizer --tool memcheck|racecheck|synccheck|initcheck --error-exitcode 1 ./cvig_sanitize_kernels
//
// (python -m bench.gpu_acceptance runs all four). FP32 and FP16 inputs; k-means on both sides of the
// block-width switch (B < SM count: 1024 threads, B >= SM count: 256) and with a working set above the
// 48 KiB default shared memory; k-means with centroids (empty_zero 0 and 1); k-NN with K = 1,
// K >= partition size, K = CVIG_MAX_K, one-token partitions, tied tokens and labels outside 0..k-1;
// segment mean with empty partitions; gather-max-rel on the k-NN's indices. Every input is written
// before use (initcheck), every output is copied back in full and checked for the ABI's structural
// promises (labels in range, counts summing to N, self first in the neighbour lists, ...): an output
// element a kernel never writes is then an initcheck error, a wrong one a failure here.
//
// Input values are multiples of 1/8 in [-1, 1]: exact in FP16, and dyadic inputs make exact ties common.
// Exit status: 0 all launches ok, 3 a status or check failed, 2 no usable CUDA device.
#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "cvig_kernels.h"

namespace {

int gLaunches = 0;
int gFailures = 0;

void fail(const std::string& what) {
    ++gFailures;
    std::printf("FAIL %s\n", what.c_str());
}

bool cuda_ok(cudaError_t err, const std::string& what) {
    if (err == cudaSuccess) return true;
    fail(what + ": " + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")");
    return false;
}

// A float that is exactly representable in FP16 (all inputs here are) as FP16 bits.
uint16_t half_bits(float f) {
    uint32_t b = 0;
    std::memcpy(&b, &f, sizeof b);
    const uint16_t sign = static_cast<uint16_t>((b >> 16) & 0x8000u);
    if ((b & 0x7fffffffu) == 0) return sign;
    const int exp = static_cast<int>((b >> 23) & 0xffu) - 127 + 15;
    const uint32_t mant = b & 0x7fffffu;
    if (exp <= 0 || exp >= 31 || (mant & 0x1fffu) != 0) {
        std::fprintf(stderr, "internal: %g is not exact in FP16\n", static_cast<double>(f));
        std::exit(2);
    }
    return static_cast<uint16_t>(sign | (exp << 10) | (mant >> 13));
}

// One device allocation of exactly the requested size (no slack for an overrun to hide in).
class DeviceBuffer {
  public:
    explicit DeviceBuffer(size_t bytes) : bytes_(bytes) {
        if (!cuda_ok(cudaMalloc(&ptr_, bytes), "cudaMalloc " + std::to_string(bytes) + " bytes")) std::exit(2);
    }
    DeviceBuffer(DeviceBuffer&& other) noexcept : ptr_(other.ptr_), bytes_(other.bytes_) { other.ptr_ = nullptr; }
    ~DeviceBuffer() {
        if (ptr_) cuda_ok(cudaFree(ptr_), "cudaFree");
    }
    DeviceBuffer(const DeviceBuffer&) = delete;
    DeviceBuffer& operator=(const DeviceBuffer&) = delete;
    DeviceBuffer& operator=(DeviceBuffer&&) = delete;

    void* get() const { return ptr_; }
    int32_t* ints() const { return static_cast<int32_t*>(ptr_); }
    void upload(const void* src) { cuda_ok(cudaMemcpy(ptr_, src, bytes_, cudaMemcpyHostToDevice), "upload"); }
    template <class T>
    std::vector<T> download() const {
        std::vector<T> out(bytes_ / sizeof(T));
        cuda_ok(cudaMemcpy(out.data(), ptr_, bytes_, cudaMemcpyDeviceToHost), "download");
        return out;
    }

  private:
    void* ptr_ = nullptr;
    size_t bytes_;
};

struct Shape {
    int B, N, C;
    size_t tokens() const { return static_cast<size_t>(B) * N; }
    size_t elems() const { return tokens() * C; }
};

const char* name_of(int dtype) { return dtype == CVIG_FP16 ? "FP16" : "FP32"; }

size_t elem_bytes(int dtype) { return dtype == CVIG_FP16 ? 2 : 4; }

// Tokens with entries m/8, m in -levels..levels, from a fixed LCG; levels = 0 gives identical tokens (all 1/2).
std::vector<float> tokens(const Shape& s, unsigned seed, int levels) {
    std::vector<float> v(s.elems(), 0.5f);
    uint32_t state = seed * 2654435761u + 1u;
    for (float& x : v) {
        if (levels == 0) break;
        state = state * 1664525u + 1013904223u;
        const int m = static_cast<int>((state >> 8) % static_cast<uint32_t>(2 * levels + 1)) - levels;
        x = static_cast<float>(m) / 8.0f;
    }
    return v;
}

// The tokens on the device in the launch's dtype.
DeviceBuffer device_tokens(const std::vector<float>& x, int dtype) {
    DeviceBuffer d(x.size() * elem_bytes(dtype));
    if (dtype == CVIG_FP32) {
        d.upload(x.data());
    } else {
        std::vector<uint16_t> h(x.size());
        for (size_t i = 0; i < x.size(); ++i) h[i] = half_bits(x[i]);
        d.upload(h.data());
    }
    return d;
}

DeviceBuffer device_ints(const std::vector<int32_t>& v) {
    DeviceBuffer d(v.size() * sizeof(int32_t));
    d.upload(v.data());
    return d;
}

// A launcher's status, then the launch's own error and the kernel's completion.
bool launched(int status, const std::string& what) {
    ++gLaunches;
    if (status != CVIG_OK) {
        fail(what + ": status " + std::to_string(status));
        return false;
    }
    return cuda_ok(cudaGetLastError(), what + ": launch") && cuda_ok(cudaDeviceSynchronize(), what + ": kernel");
}

void check(bool ok, const std::string& what) {
    if (!ok) fail(what);
}

// One line per case: ok, or FAILED after the failures it printed.
void done(const std::string& what, int failures_before) {
    std::printf("%s %s\n", gFailures == failures_before ? "ok    " : "FAILED", what.c_str());
}

// labels in 0..k-1 and counts [B, k] equal to their histogram.
void check_labels(const std::vector<int32_t>& labels, const std::vector<int32_t>& counts, const Shape& s, int k,
                  const std::string& what) {
    for (int b = 0; b < s.B; ++b) {
        std::vector<int32_t> hist(k, 0);
        for (int v = 0; v < s.N; ++v) {
            const int32_t l = labels[static_cast<size_t>(b) * s.N + v];
            if (l < 0 || l >= k) return fail(what + ": label " + std::to_string(l) + " outside 0.." + std::to_string(k - 1));
            ++hist[l];
        }
        for (int j = 0; j < k; ++j) {
            check(hist[j] == counts[static_cast<size_t>(b) * k + j], what + ": counts differ from the labels' histogram");
        }
    }
}

std::vector<int32_t> kmeans(const Shape& s, int k, int iters, int dtype, unsigned seed, int levels) {
    const int before = gFailures;
    const std::string what = std::string("kmeans ") + name_of(dtype) + " B=" + std::to_string(s.B) + " N=" +
                             std::to_string(s.N) + " C=" + std::to_string(s.C) + " k=" + std::to_string(k) +
                             " smem=" + std::to_string(cvig_kmeans_smem_bytes(s.N, s.C, k));
    DeviceBuffer x = device_tokens(tokens(s, seed, levels), dtype);
    DeviceBuffer labels(s.tokens() * sizeof(int32_t)), counts(static_cast<size_t>(s.B) * k * sizeof(int32_t));
    std::vector<int32_t> out;
    if (launched(cvig_kmeans_launch(x.get(), dtype, s.B, s.N, s.C, k, iters, labels.ints(), counts.ints(), nullptr),
                 what)) {
        out = labels.download<int32_t>();
        check_labels(out, counts.download<int32_t>(), s, k, what);
    }
    done(what, before);
    return out;
}

void kmeans_centroids(const Shape& s, int k, int iters, int empty_zero, int dtype, unsigned seed, int levels) {
    const int before = gFailures;
    const std::string what = std::string("kmeans_centroids ") + name_of(dtype) + " B=" + std::to_string(s.B) +
                             " N=" + std::to_string(s.N) + " k=" + std::to_string(k) +
                             " empty_zero=" + std::to_string(empty_zero);
    DeviceBuffer x = device_tokens(tokens(s, seed, levels), dtype);
    DeviceBuffer labels(s.tokens() * sizeof(int32_t)), counts(static_cast<size_t>(s.B) * k * sizeof(int32_t));
    DeviceBuffer cent(static_cast<size_t>(s.B) * k * s.C * elem_bytes(dtype));
    if (launched(cvig_kmeans_centroids_launch(x.get(), dtype, s.B, s.N, s.C, k, iters, empty_zero, labels.ints(),
                                              counts.ints(), cent.get(), nullptr),
                 what)) {
        check_labels(labels.download<int32_t>(), counts.download<int32_t>(), s, k, what);
        cent.download<uint8_t>();  // every centroid element must have been written (initcheck)
    }
    done(what, before);
}

// Self first and valid, then min(K, partition size) valid distinct neighbours of the token's own partition,
// missing slots self with valid = 0.
void check_knn(const std::vector<int32_t>& labels, const std::vector<int32_t>& idx, const std::vector<int32_t>& valid,
               const Shape& s, int K, const std::string& what) {
    for (int b = 0; b < s.B; ++b) {
        const int32_t* lab = labels.data() + static_cast<size_t>(b) * s.N;
        for (int v = 0; v < s.N; ++v) {
            int size = 0;
            for (int u = 0; u < s.N; ++u) size += lab[u] == lab[v];
            const size_t row = (static_cast<size_t>(b) * s.N + v) * K;
            const int want = size < K ? size : K;
            int nvalid = 0;
            for (int j = 0; j < K; ++j) {
                const int32_t u = idx[row + j];
                if (u < 0 || u >= s.N) return fail(what + ": neighbour index " + std::to_string(u) + " outside 0..N-1");
                if (valid[row + j]) {
                    ++nvalid;
                    check(lab[u] == lab[v], what + ": neighbour from another partition");
                } else {
                    check(u == v, what + ": a missing slot does not hold the token itself");
                }
            }
            check(idx[row] == v && valid[row] == 1, what + ": slot 0 is not the token itself");
            check(nvalid == want, what + ": " + std::to_string(nvalid) + " valid slots, expected " + std::to_string(want));
        }
    }
}

// Returns the neighbour indices (for gather-max-rel).
std::vector<int32_t> knn(const Shape& s, const std::vector<int32_t>& labels, int K, int dtype, unsigned seed,
                         int levels, const std::string& label) {
    const int before = gFailures;
    const std::string what = std::string("partitioned_knn ") + name_of(dtype) + " " + label + " K=" + std::to_string(K);
    DeviceBuffer x = device_tokens(tokens(s, seed, levels), dtype);
    DeviceBuffer lab = device_ints(labels);
    const size_t slots = s.tokens() * K;
    DeviceBuffer idx(slots * sizeof(int32_t)), valid(slots * sizeof(int32_t));
    std::vector<int32_t> out;
    if (launched(cvig_partitioned_knn_launch(x.get(), lab.ints(), dtype, s.B, s.N, s.C, K, idx.ints(), valid.ints(),
                                             nullptr),
                 what)) {
        out = idx.download<int32_t>();
        check_knn(labels, out, valid.download<int32_t>(), s, K, what);
    }
    done(what, before);
    return out;
}

void segment_mean(const Shape& s, const std::vector<int32_t>& labels, int k, int dtype, const std::string& label) {
    const int before = gFailures;
    const std::string what = std::string("segment_mean ") + name_of(dtype) + " " + label + " k=" + std::to_string(k);
    DeviceBuffer x = device_tokens(tokens(s, 7, 8), dtype);
    DeviceBuffer lab = device_ints(labels);
    DeviceBuffer z(static_cast<size_t>(s.B) * k * s.C * elem_bytes(dtype)), counts(static_cast<size_t>(s.B) * k * 4);
    if (launched(cvig_segment_mean_launch(x.get(), lab.ints(), dtype, s.B, s.N, s.C, k, z.get(), counts.ints(), nullptr),
                 what)) {
        const std::vector<int32_t> c = counts.download<int32_t>();
        for (int b = 0; b < s.B; ++b) {
            for (int j = 0; j < k; ++j) {
                int want = 0;
                for (int v = 0; v < s.N; ++v) want += labels[static_cast<size_t>(b) * s.N + v] == j;
                check(c[static_cast<size_t>(b) * k + j] == want, what + ": counts");
            }
        }
        z.download<uint8_t>();
    }
    done(what, before);
}

void gather_max_rel(const Shape& s, const std::vector<int32_t>& idx, int K, int dtype, const std::string& label) {
    const int before = gFailures;
    const std::string what = std::string("gather_max_rel ") + name_of(dtype) + " " + label + " K=" + std::to_string(K);
    DeviceBuffer x = device_tokens(tokens(s, 11, 8), dtype);
    DeviceBuffer ix = device_ints(idx);
    DeviceBuffer out(s.elems() * elem_bytes(dtype));
    if (launched(cvig_gather_max_rel_launch(x.get(), ix.ints(), dtype, s.B, s.N, s.C, K, out.get(), nullptr), what)) {
        out.download<uint8_t>();
    }
    done(what, before);
}

// [B, N] labels: partition j holds sizes[j] tokens, interleaved; `offset` renames every partition.
std::vector<int32_t> grouped(int B, const std::vector<int>& sizes, int32_t offset) {
    std::vector<int32_t> one;
    std::vector<int> left = sizes;
    for (bool any = true; any;) {
        any = false;
        for (size_t j = 0; j < left.size(); ++j) {
            if (left[j]-- > 0) {
                one.push_back(static_cast<int32_t>(j) + offset);
                any = true;
            }
        }
    }
    std::vector<int32_t> out;
    for (int b = 0; b < B; ++b) out.insert(out.end(), one.begin(), one.end());
    return out;
}

void run(int dtype, int sms) {
    // k-means: 1024-thread blocks (B < SM count), 256-thread blocks (B = SM count), > 48 KiB of shared
    // memory, T = 0, identical tokens (every distance ties, clusters empty out), k = N
    const Shape small{2, 37, 24};
    const std::vector<int32_t> labels = kmeans(small, 3, 5, dtype, 1, 8);
    kmeans(Shape{sms, 16, 8}, 3, 2, dtype, 2, 8);
    kmeans(Shape{1, 128, 192}, 64, 2, dtype, 3, 8);
    kmeans(Shape{2, 37, 24}, 4, 0, dtype, 4, 1);
    kmeans(Shape{2, 40, 16}, 6, 3, dtype, 5, 0);
    kmeans(Shape{1, 9, 4}, 9, 2, dtype, 6, 8);
    for (int empty_zero = 0; empty_zero <= 1; ++empty_zero) {
        kmeans_centroids(Shape{2, 40, 16}, 5, 3, empty_zero, dtype, 5, 0);
        kmeans_centroids(Shape{2, 37, 24}, 3, 4, empty_zero, dtype, 8, 8);
        kmeans_centroids(Shape{sms, 16, 8}, 3, 2, empty_zero, dtype, 9, 1);
    }
    // k-NN: labels from the k-means above; K = 1; K >= every partition's size (one-token partitions
    // included); K = CVIG_MAX_K; tied tokens in one partition; labels that are not 0..k-1
    if (!labels.empty()) {
        const std::vector<int32_t> idx = knn(small, labels, 9, dtype, 1, 8, "k-means labels");
        if (!idx.empty()) gather_max_rel(small, idx, 9, dtype, "k-NN indices");
        knn(small, labels, 1, dtype, 1, 8, "k-means labels");
        segment_mean(small, labels, 3, dtype, "k-means labels");
    }
    const Shape mid{2, 97, 40};
    const std::vector<int32_t> tiny = grouped(2, {1, 1, 2, 3, 5, 8, 1, 76}, 0);
    knn(mid, tiny, 9, dtype, 2, 8, "partitions of 1..76 tokens");
    const std::vector<int32_t> all = knn(mid, tiny, CVIG_MAX_K, dtype, 2, 8, "partitions of 1..76 tokens");
    if (!all.empty()) gather_max_rel(mid, all, CVIG_MAX_K, dtype, "k-NN indices");
    knn(mid, grouped(2, {97}, 0), 18, dtype, 3, 0, "identical tokens, one partition");
    knn(mid, grouped(2, {50, 47}, -5), 9, dtype, 4, 1, "labels -5 and -4, ties");
    // segment mean: empty partitions (k beyond the labels) and labels outside 0..k-1
    segment_mean(mid, tiny, 10, dtype, "two empty partitions");
    segment_mean(mid, grouped(2, {30, 30, 37}, -1), 2, dtype, "labels -1..1");
}

}  // namespace

int main() {
    int devices = 0;
    const cudaError_t err = cudaGetDeviceCount(&devices);
    if (err != cudaSuccess || devices == 0) {
        std::printf("no usable CUDA device: %s\n", err != cudaSuccess ? cudaGetErrorString(err) : "none found");
        return 2;
    }
    int sms = 0;
    if (!cuda_ok(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0), "SM count")) return 2;
    std::printf("sanitize_kernels: %s kernels, %d SMs\n", cvig_kernels_backend(), sms);
    run(CVIG_FP32, sms);
    run(CVIG_FP16, sms);
    std::printf("sanitize_kernels: %d launches, %d failures\n", gLaunches, gFailures);
    return gFailures ? 3 : 0;
}
