// CvigKMeans: normalised tokens [B, N, C] (FP32/FP16) -> labels [B, N] int32, counts [B, k] int32.
// Attributes: clusters (k), iters (T).
// CvigKMeansCentroids (numerics="authors"): tokens [B, N, C] -> labels, counts and the centroids of
// the last update [B, k, C] in the tokens' type. Attributes: clusters, iters, empty_zero (1: an
// empty cluster's centroid becomes 0; 0: it keeps its centroid). See plugins/README.md.
#include "../common/cvigPluginBase.h"

namespace cvig {

namespace {

bool validKMeans(IntFields const& f) { return f.get("clusters") >= 1 && f.get("iters") >= 0; }

// labels [B, N] and counts [B, k] of tokens [B, N, C]
bool kmeansShapes(nvinfer1::DimsExprs const& x, int32_t clusters, nvinfer1::DimsExprs* out,
                  nvinfer1::IExprBuilder& eb) {
    if (x.nbDims != 3) return false;
    out[0].nbDims = 2;
    out[0].d[0] = x.d[0];
    out[0].d[1] = x.d[1];
    out[1].nbDims = 2;
    out[1].d[0] = x.d[0];
    out[1].d[1] = eb.constant(clusters);
    return true;
}

}  // namespace

class KMeansPlugin : public IndexPlugin<KMeansPlugin> {
public:
    static constexpr char const* kName = "CvigKMeans";
    static constexpr int32_t kNbInputs = 1;
    static constexpr int32_t kNbOutputs = 2;
    static IntFields defaults() { return IntFields({{"clusters", 4}, {"iters", 20}}); }
    static bool valid(IntFields const& f) { return validKMeans(f); }
    explicit KMeansPlugin(IntFields f) : IndexPlugin(std::move(f)) {}

    int32_t getOutputShapes(nvinfer1::DimsExprs const* in, int32_t nbInputs, nvinfer1::DimsExprs const*, int32_t,
                            nvinfer1::DimsExprs* out, int32_t nbOutputs, nvinfer1::IExprBuilder& eb) noexcept override {
        if (nbInputs != kNbInputs || nbOutputs != kNbOutputs) return -1;
        return kmeansShapes(in[0], attr("clusters"), out, eb) ? 0 : -1;
    }
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inDesc, nvinfer1::PluginTensorDesc const*,
                    void const* const* inputs, void* const* outputs, void*, cudaStream_t stream) noexcept override {
        auto const& d = inDesc[0].dims;
        return cvig_kmeans_launch(inputs[0], dtypeOf(inDesc[0].type), static_cast<int>(d.d[0]), static_cast<int>(d.d[1]),
                                  static_cast<int>(d.d[2]), attr("clusters"), attr("iters"),
                                  static_cast<int32_t*>(outputs[0]), static_cast<int32_t*>(outputs[1]), stream);
    }
};

class KMeansCentroidsPlugin : public PluginBase<KMeansCentroidsPlugin> {
public:
    static constexpr char const* kName = "CvigKMeansCentroids";
    static constexpr int32_t kNbInputs = 1;
    static constexpr int32_t kNbOutputs = 3;
    static IntFields defaults() { return IntFields({{"clusters", 4}, {"iters", 20}, {"empty_zero", 1}}); }
    static bool valid(IntFields const& f) {
        return validKMeans(f) && (f.get("empty_zero") == 0 || f.get("empty_zero") == 1);
    }
    explicit KMeansCentroidsPlugin(IntFields f) : PluginBase(std::move(f)) {}

    int32_t getOutputDataTypes(nvinfer1::DataType* out, int32_t nbOutputs, nvinfer1::DataType const* in,
                               int32_t nbInputs) const noexcept override {
        // the rules of supportsFormatCombination: float tokens, int32 labels and counts, centroids follow x
        if (nbOutputs != kNbOutputs || nbInputs != kNbInputs || !isFloat(in[0])) return -1;
        out[0] = nvinfer1::DataType::kINT32;
        out[1] = nvinfer1::DataType::kINT32;
        out[2] = in[0];
        return 0;
    }
    int32_t getOutputShapes(nvinfer1::DimsExprs const* in, int32_t nbInputs, nvinfer1::DimsExprs const*, int32_t,
                            nvinfer1::DimsExprs* out, int32_t nbOutputs, nvinfer1::IExprBuilder& eb) noexcept override {
        if (nbInputs != kNbInputs || nbOutputs != kNbOutputs || !kmeansShapes(in[0], attr("clusters"), out, eb)) return -1;
        out[2].nbDims = 3;
        out[2].d[0] = in[0].d[0];
        out[2].d[1] = eb.constant(attr("clusters"));
        out[2].d[2] = in[0].d[2];
        return 0;
    }
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* io, int32_t,
                                   int32_t) noexcept override {
        if (io[pos].desc.format != nvinfer1::TensorFormat::kLINEAR) return false;
        if (pos == 0) return isFloat(io[0].desc.type);
        if (pos == 3) return io[3].desc.type == io[0].desc.type;  // centroids follow x
        return io[pos].desc.type == nvinfer1::DataType::kINT32;
    }
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inDesc, nvinfer1::PluginTensorDesc const*,
                    void const* const* inputs, void* const* outputs, void*, cudaStream_t stream) noexcept override {
        auto const& d = inDesc[0].dims;
        return cvig_kmeans_centroids_launch(inputs[0], dtypeOf(inDesc[0].type), static_cast<int>(d.d[0]),
                                            static_cast<int>(d.d[1]), static_cast<int>(d.d[2]), attr("clusters"),
                                            attr("iters"), attr("empty_zero"), static_cast<int32_t*>(outputs[0]),
                                            static_cast<int32_t*>(outputs[1]), outputs[2], stream);
    }
};

nvinfer1::IPluginCreatorV3One* kmeansCreator() {
    static Creator<KMeansPlugin> creator;
    return &creator;
}

nvinfer1::IPluginCreatorV3One* kmeansCentroidsCreator() {
    static Creator<KMeansCentroidsPlugin> creator;
    return &creator;
}

}  // namespace cvig
