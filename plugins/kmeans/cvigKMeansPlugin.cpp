// CvigKMeans: normalised tokens [B, N, C] (FP32/FP16) -> labels [B, N] int32, counts [B, k] int32.
// Attributes: clusters (k), iters (T). See kmeans/README.md.
#include "../common/cvigPluginBase.h"

namespace cvig {

class KMeansPlugin : public IndexPlugin<KMeansPlugin> {
public:
    static constexpr char const* kName = "CvigKMeans";
    static constexpr int32_t kNbInputs = 1;
    static constexpr int32_t kNbOutputs = 2;
    static IntFields defaults() { return IntFields({{"clusters", 4}, {"iters", 20}}); }
    static bool valid(IntFields const& f) { return f.get("clusters") >= 1 && f.get("iters") >= 0; }
    explicit KMeansPlugin(IntFields f) : IndexPlugin(std::move(f)) {}

    int32_t getOutputShapes(nvinfer1::DimsExprs const* in, int32_t nbInputs, nvinfer1::DimsExprs const*, int32_t,
                            nvinfer1::DimsExprs* out, int32_t nbOutputs, nvinfer1::IExprBuilder& eb) noexcept override {
        if (nbInputs != kNbInputs || nbOutputs != kNbOutputs || in[0].nbDims != 3) return -1;
        out[0].nbDims = 2;
        out[0].d[0] = in[0].d[0];
        out[0].d[1] = in[0].d[1];
        out[1].nbDims = 2;
        out[1].d[0] = in[0].d[0];
        out[1].d[1] = eb.constant(attr("clusters"));
        return 0;
    }
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inDesc, nvinfer1::PluginTensorDesc const*,
                    void const* const* inputs, void* const* outputs, void*, cudaStream_t stream) noexcept override {
        auto const& d = inDesc[0].dims;
        return cvig_kmeans_launch(inputs[0], dtypeOf(inDesc[0].type), static_cast<int>(d.d[0]), static_cast<int>(d.d[1]),
                                  static_cast<int>(d.d[2]), attr("clusters"), attr("iters"),
                                  static_cast<int32_t*>(outputs[0]), static_cast<int32_t*>(outputs[1]), stream);
    }
};

nvinfer1::IPluginCreatorV3One* kmeansCreator() {
    static Creator<KMeansPlugin> creator;
    return &creator;
}

}  // namespace cvig
