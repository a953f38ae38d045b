// Shared IPluginV3 machinery for the ClusterViG plugins (TensorRT 10.3+ and 11.x).
//
// Each plugin derives from PluginBase and supplies only what differs: its
// name, attributes, I/O types and shapes, and an enqueue that calls a kernel
// launcher of cvig_kernels.h. The wrapper knows nothing of the math.
#ifndef CVIG_PLUGIN_BASE_H
#define CVIG_PLUGIN_BASE_H

#include <NvInferRuntime.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "cvig_kernels.h"

namespace cvig {

constexpr char const* kPluginVersion = "1";
constexpr char const* kPluginNamespace = "";

// Named int32 attributes, read from and written to PluginFieldCollections.
class IntFields {
public:
    explicit IntFields(std::vector<std::pair<std::string, int32_t>> defaults) : mValues(std::move(defaults)) {
        rebuild();
    }
    IntFields(IntFields const& other) : mValues(other.mValues) { rebuild(); }
    IntFields& operator=(IntFields const& other) {
        mValues = other.mValues;
        rebuild();
        return *this;
    }

    // Returns false if a known field has the wrong type or length.
    bool read(nvinfer1::PluginFieldCollection const* fc) {
        if (fc == nullptr) return true;
        for (int32_t i = 0; i < fc->nbFields; ++i) {
            nvinfer1::PluginField const& f = fc->fields[i];
            for (auto& kv : mValues) {
                if (f.name != nullptr && kv.first == f.name) {
                    if (f.type != nvinfer1::PluginFieldType::kINT32 || f.length != 1 || f.data == nullptr) return false;
                    kv.second = *static_cast<int32_t const*>(f.data);
                }
            }
        }
        rebuild();
        return true;
    }
    int32_t get(char const* name) const {
        for (auto const& kv : mValues) {
            if (kv.first == name) return kv.second;
        }
        return 0;
    }
    nvinfer1::PluginFieldCollection const* collection() noexcept { return &mCollection; }

private:
    void rebuild() {
        mFields.clear();
        for (auto const& kv : mValues) {
            mFields.emplace_back(kv.first.c_str(), &kv.second, nvinfer1::PluginFieldType::kINT32, 1);
        }
        mCollection.nbFields = static_cast<int32_t>(mFields.size());
        mCollection.fields = mFields.data();
    }
    std::vector<std::pair<std::string, int32_t>> mValues;
    std::vector<nvinfer1::PluginField> mFields;
    nvinfer1::PluginFieldCollection mCollection{};
};

inline int dtypeOf(nvinfer1::DataType t) { return t == nvinfer1::DataType::kHALF ? CVIG_FP16 : CVIG_FP32; }

inline bool isFloat(nvinfer1::DataType t) { return t == nvinfer1::DataType::kFLOAT || t == nvinfer1::DataType::kHALF; }

// CRTP base: Derived provides kName, defaults(), nbInputs/nbOutputs, outputTypes, outputShapes,
// supports(pos, inOut) and run(...).
template <typename Derived>
class PluginBase : public nvinfer1::IPluginV3,
                   public nvinfer1::IPluginV3OneCore,
                   public nvinfer1::IPluginV3OneBuild,
                   public nvinfer1::IPluginV3OneRuntime {
public:
    explicit PluginBase(IntFields fields) : mFields(std::move(fields)) {}
    ~PluginBase() override = default;

    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override {
        switch (type) {
        case nvinfer1::PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
        case nvinfer1::PluginCapabilityType::kBUILD: return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
        case nvinfer1::PluginCapabilityType::kRUNTIME: return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
        }
        return nullptr;
    }
    nvinfer1::IPluginV3* clone() noexcept override {
        try {
            return new Derived(static_cast<Derived const&>(*this));
        } catch (...) {
            return nullptr;
        }
    }

    char const* getPluginName() const noexcept override { return Derived::kName; }
    char const* getPluginVersion() const noexcept override { return kPluginVersion; }
    char const* getPluginNamespace() const noexcept override { return kPluginNamespace; }

    int32_t getNbOutputs() const noexcept override { return Derived::kNbOutputs; }
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const*, int32_t nbInputs,
                            nvinfer1::DynamicPluginTensorDesc const*, int32_t nbOutputs) noexcept override {
        return nbInputs == Derived::kNbInputs && nbOutputs == Derived::kNbOutputs ? 0 : -1;
    }
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const*, int32_t nbInputs, nvinfer1::PluginTensorDesc const*,
                          int32_t nbOutputs) noexcept override {
        return nbInputs == Derived::kNbInputs && nbOutputs == Derived::kNbOutputs ? 0 : -1;
    }
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext*) noexcept override { return clone(); }
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override { return mFields.collection(); }

protected:
    int32_t attr(char const* name) const { return mFields.get(name); }
    IntFields mFields;
};

// Plugins that take float tokens at input 0 and int32 everywhere else (labels in, indices/flags out):
// k-means and partitioned k-NN share these type and format rules.
template <typename Derived>
class IndexPlugin : public PluginBase<Derived> {
public:
    using PluginBase<Derived>::PluginBase;

    // The same rules as supportsFormatCombination: a type it would refuse (BF16, INT8...) fails here,
    // at network construction, instead of when TensorRT looks for a format.
    int32_t getOutputDataTypes(nvinfer1::DataType* out, int32_t nbOutputs, nvinfer1::DataType const* in,
                               int32_t nbInputs) const noexcept override {
        if (nbOutputs != Derived::kNbOutputs || nbInputs != Derived::kNbInputs || !isFloat(in[0])) return -1;
        for (int32_t i = 1; i < nbInputs; ++i) {
            if (in[i] != nvinfer1::DataType::kINT32) return -1;
        }
        for (int32_t i = 0; i < nbOutputs; ++i) out[i] = nvinfer1::DataType::kINT32;
        return 0;
    }
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* io, int32_t,
                                   int32_t) noexcept override {
        if (io[pos].desc.format != nvinfer1::TensorFormat::kLINEAR) return false;
        return pos == 0 ? isFloat(io[0].desc.type) : io[pos].desc.type == nvinfer1::DataType::kINT32;
    }
};

// One creator template for all plugins.
template <typename Plugin>
class Creator : public nvinfer1::IPluginCreatorV3One {
public:
    Creator() : mFields(Plugin::defaults()) {}
    char const* getPluginName() const noexcept override { return Plugin::kName; }
    char const* getPluginVersion() const noexcept override { return kPluginVersion; }
    char const* getPluginNamespace() const noexcept override { return kPluginNamespace; }
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override { return mFields.collection(); }
    nvinfer1::IPluginV3* createPlugin(char const*, nvinfer1::PluginFieldCollection const* fc,
                                      nvinfer1::TensorRTPhase) noexcept override {
        try {
            IntFields f(Plugin::defaults());
            if (!f.read(fc) || !Plugin::valid(f)) return nullptr;
            return new Plugin(f);
        } catch (...) {
            return nullptr;
        }
    }

private:
    IntFields mFields;
};

}  // namespace cvig

#endif  // CVIG_PLUGIN_BASE_H
