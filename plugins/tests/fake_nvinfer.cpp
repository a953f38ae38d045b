// A stand-in for libnvinfer.so.<major> holding only a plugin registry, so that the registration
// of libcvig_plugins_autoreg.so can be tested where TensorRT is not installed (only its headers).
// It records what is registered and refuses a second creator of the same name, as TensorRT does.
#include <cstring>
#include <string>
#include <vector>

#include <NvInferRuntime.h>
#include <NvInferVersion.h>

using namespace nvinfer1;

namespace {

class FakeRegistry : public IPluginRegistry {
public:
    std::vector<std::string> names;

    bool registerCreator(IPluginCreatorInterface& creator, AsciiChar const* const ns) noexcept override {
        auto* v3 = static_cast<IPluginCreatorV3One*>(&creator);
        std::string key = std::string(ns) + "::" + v3->getPluginName() + "/" + v3->getPluginVersion();
        for (auto const& n : names) {
            if (n == key) return false;
        }
        names.push_back(key);
        return true;
    }
    IPluginCreatorInterface* const* getAllCreators(int32_t* const n) const noexcept override {
        *n = 0;
        return nullptr;
    }
    IPluginCreatorInterface* getCreator(AsciiChar const* const, AsciiChar const* const,
                                        AsciiChar const* const) noexcept override {
        return nullptr;
    }
    bool deregisterCreator(IPluginCreatorInterface const&) noexcept override { return false; }
    void setErrorRecorder(IErrorRecorder* const) noexcept override {}
    IErrorRecorder* getErrorRecorder() const noexcept override { return nullptr; }
    bool isParentSearchEnabled() const override { return false; }
    void setParentSearchEnabled(bool const) override {}
    PluginLibraryHandle loadLibrary(AsciiChar const*) noexcept override { return nullptr; }
    void deregisterLibrary(PluginLibraryHandle) noexcept override {}
    IPluginResource* acquirePluginResource(AsciiChar const*, IPluginResource*) noexcept override { return nullptr; }
    int32_t releasePluginResource(AsciiChar const*) noexcept override { return 0; }
#if NV_TENSORRT_MAJOR < 11
    bool registerCreator(IPluginCreator&, AsciiChar const* const) noexcept override { return false; }
    IPluginCreator* const* getPluginCreatorList(int32_t* const n) const noexcept override {
        *n = 0;
        return nullptr;
    }
    IPluginCreator* getPluginCreator(AsciiChar const* const, AsciiChar const* const,
                                     AsciiChar const* const) noexcept override {
        return nullptr;
    }
    bool deregisterCreator(IPluginCreator const&) noexcept override { return false; }
#else
    IPluginCreatorInterface* const* getAllCreatorsRecursive(int32_t* const n) noexcept override {
        *n = 0;
        return nullptr;
    }
#endif
};

FakeRegistry* registry() {
    static FakeRegistry* r = new FakeRegistry();  // never destroyed, as TensorRT's
    return r;
}

}  // namespace

extern "C" {
__attribute__((visibility("default"))) IPluginRegistry* getPluginRegistry() noexcept { return registry(); }
// The registered creators as "namespace::name/version", one per line.
__attribute__((visibility("default"))) int fakeRegisteredNames(char* buf, int size) {
    std::string all;
    for (auto const& n : registry()->names) all += n + "\n";
    std::strncpy(buf, all.c_str(), static_cast<size_t>(size) - 1);
    buf[size - 1] = '\0';
    return static_cast<int>(registry()->names.size());
}
}
