// CvigSegmentMean: x [B, N, C] + labels [B, N] int32 -> z [B, k, C] (type of x), counts [B, k] int32.
// CvigGatherMaxRel: x [B, N, C] + idx [B, N, K] int32 -> max_u x_u - x_v [B, N, C] (type of x).
// See segment/README.md.
#include "../common/cvigPluginBase.h"

namespace cvig {

class SegmentMeanPlugin : public PluginBase<SegmentMeanPlugin> {
public:
    static constexpr char const* kName = "CvigSegmentMean";
    static constexpr int32_t kNbInputs = 2;
    static constexpr int32_t kNbOutputs = 2;
    static IntFields defaults() { return IntFields({{"clusters", 4}}); }
    static bool valid(IntFields const& f) { return f.get("clusters") >= 1; }
    explicit SegmentMeanPlugin(IntFields f) : PluginBase(std::move(f)) {}

    int32_t getOutputDataTypes(nvinfer1::DataType* out, int32_t nbOutputs, nvinfer1::DataType const* in,
                               int32_t nbInputs) const noexcept override {
        // the rules of supportsFormatCombination: float x, int32 labels
        if (nbOutputs != kNbOutputs || nbInputs != kNbInputs || !isFloat(in[0]) || in[1] != nvinfer1::DataType::kINT32) {
            return -1;
        }
        out[0] = in[0];
        out[1] = nvinfer1::DataType::kINT32;
        return 0;
    }
    int32_t getOutputShapes(nvinfer1::DimsExprs const* in, int32_t nbInputs, nvinfer1::DimsExprs const*, int32_t,
                            nvinfer1::DimsExprs* out, int32_t nbOutputs, nvinfer1::IExprBuilder& eb) noexcept override {
        if (nbInputs != kNbInputs || nbOutputs != kNbOutputs || in[0].nbDims != 3) return -1;
        out[0].nbDims = 3;
        out[0].d[0] = in[0].d[0];
        out[0].d[1] = eb.constant(attr("clusters"));
        out[0].d[2] = in[0].d[2];
        out[1].nbDims = 2;
        out[1].d[0] = in[0].d[0];
        out[1].d[1] = eb.constant(attr("clusters"));
        return 0;
    }
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* io, int32_t,
                                   int32_t) noexcept override {
        if (io[pos].desc.format != nvinfer1::TensorFormat::kLINEAR) return false;
        if (pos == 0) return isFloat(io[0].desc.type);
        if (pos == 2) return io[2].desc.type == io[0].desc.type;  // z follows x
        return io[pos].desc.type == nvinfer1::DataType::kINT32;
    }
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inDesc, nvinfer1::PluginTensorDesc const*,
                    void const* const* inputs, void* const* outputs, void*, cudaStream_t stream) noexcept override {
        auto const& d = inDesc[0].dims;
        return cvig_segment_mean_launch(inputs[0], static_cast<int32_t const*>(inputs[1]), dtypeOf(inDesc[0].type),
                                        static_cast<int>(d.d[0]), static_cast<int>(d.d[1]), static_cast<int>(d.d[2]),
                                        attr("clusters"), outputs[0], static_cast<int32_t*>(outputs[1]), stream);
    }
};

class GatherMaxRelPlugin : public PluginBase<GatherMaxRelPlugin> {
public:
    static constexpr char const* kName = "CvigGatherMaxRel";
    static constexpr int32_t kNbInputs = 2;
    static constexpr int32_t kNbOutputs = 1;
    static IntFields defaults() { return IntFields({}); }
    static bool valid(IntFields const&) { return true; }
    explicit GatherMaxRelPlugin(IntFields f) : PluginBase(std::move(f)) {}

    int32_t getOutputDataTypes(nvinfer1::DataType* out, int32_t nbOutputs, nvinfer1::DataType const* in,
                               int32_t nbInputs) const noexcept override {
        // the rules of supportsFormatCombination: float x, int32 indices
        if (nbOutputs != kNbOutputs || nbInputs != kNbInputs || !isFloat(in[0]) || in[1] != nvinfer1::DataType::kINT32) {
            return -1;
        }
        out[0] = in[0];
        return 0;
    }
    int32_t getOutputShapes(nvinfer1::DimsExprs const* in, int32_t nbInputs, nvinfer1::DimsExprs const*, int32_t,
                            nvinfer1::DimsExprs* out, int32_t nbOutputs, nvinfer1::IExprBuilder&) noexcept override {
        if (nbInputs != kNbInputs || nbOutputs != kNbOutputs || in[0].nbDims != 3) return -1;
        out[0] = in[0];
        return 0;
    }
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* io, int32_t,
                                   int32_t) noexcept override {
        if (io[pos].desc.format != nvinfer1::TensorFormat::kLINEAR) return false;
        if (pos == 0) return isFloat(io[0].desc.type);
        if (pos == 1) return io[1].desc.type == nvinfer1::DataType::kINT32;
        return io[pos].desc.type == io[0].desc.type;
    }
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inDesc, nvinfer1::PluginTensorDesc const*,
                    void const* const* inputs, void* const* outputs, void*, cudaStream_t stream) noexcept override {
        auto const& d = inDesc[0].dims;
        return cvig_gather_max_rel_launch(inputs[0], static_cast<int32_t const*>(inputs[1]), dtypeOf(inDesc[0].type),
                                          static_cast<int>(d.d[0]), static_cast<int>(d.d[1]), static_cast<int>(d.d[2]),
                                          static_cast<int>(inDesc[1].dims.d[2]), outputs[0], stream);
    }
};

nvinfer1::IPluginCreatorV3One* segmentMeanCreator() {
    static Creator<SegmentMeanPlugin> creator;
    return &creator;
}

nvinfer1::IPluginCreatorV3One* gatherMaxRelCreator() {
    static Creator<GatherMaxRelPlugin> creator;
    return &creator;
}

}  // namespace cvig
