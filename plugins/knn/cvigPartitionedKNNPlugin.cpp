// CvigPartitionedKNN: tokens [B, N, C] (FP32/FP16) + labels [B, N] int32 -> idx, valid [B, N, K] int32.
// Attribute: k. See knn/README.md.
#include "../common/cvigPluginBase.h"

namespace cvig {

class PartitionedKNNPlugin : public IndexPlugin<PartitionedKNNPlugin> {
public:
    static constexpr char const* kName = "CvigPartitionedKNN";
    static constexpr int32_t kNbInputs = 2;
    static constexpr int32_t kNbOutputs = 2;
    static IntFields defaults() { return IntFields({{"k", 9}}); }
    static bool valid(IntFields const& f) { return f.get("k") >= 1 && f.get("k") <= CVIG_MAX_K; }
    explicit PartitionedKNNPlugin(IntFields f) : IndexPlugin(std::move(f)) {}

    int32_t getOutputShapes(nvinfer1::DimsExprs const* in, int32_t nbInputs, nvinfer1::DimsExprs const*, int32_t,
                            nvinfer1::DimsExprs* out, int32_t nbOutputs, nvinfer1::IExprBuilder& eb) noexcept override {
        if (nbInputs != kNbInputs || nbOutputs != kNbOutputs || in[0].nbDims != 3) return -1;
        for (int32_t o = 0; o < 2; ++o) {
            out[o].nbDims = 3;
            out[o].d[0] = in[0].d[0];
            out[o].d[1] = in[0].d[1];
            out[o].d[2] = eb.constant(attr("k"));
        }
        return 0;
    }
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inDesc, nvinfer1::PluginTensorDesc const*,
                    void const* const* inputs, void* const* outputs, void*, cudaStream_t stream) noexcept override {
        auto const& d = inDesc[0].dims;
        return cvig_partitioned_knn_launch(inputs[0], static_cast<int32_t const*>(inputs[1]), dtypeOf(inDesc[0].type),
                                           static_cast<int>(d.d[0]), static_cast<int>(d.d[1]), static_cast<int>(d.d[2]),
                                           attr("k"), static_cast<int32_t*>(outputs[0]),
                                           static_cast<int32_t*>(outputs[1]), stream);
    }
};

nvinfer1::IPluginCreatorV3One* partitionedKnnCreator() {
    static Creator<PartitionedKNNPlugin> creator;
    return &creator;
}

}  // namespace cvig
