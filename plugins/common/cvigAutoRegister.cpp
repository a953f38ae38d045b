// libcvig_plugins_autoreg.so: registers the ClusterViG plugin creators when it is loaded, for tools
// that only dlopen a plugin library (polygraphy --plugins, ctypes.CDLL, LD_PRELOAD).
//
// libcvig_plugins.so registers nothing on load: TensorRT's IPluginRegistry::loadLibrary and
// trtexec --dynamicPlugins call its getCreators. This small library depends on it and hands the
// same creators to the process's plugin registry from a static initializer. Loading both ways is
// harmless: the registry refuses a second creator of the same name, version and namespace.
#include <dlfcn.h>

#include <cstdio>
#include <string>

#include <NvInferVersion.h>

#include "cvigPluginBase.h"

extern "C" nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators);

namespace {

using GetRegistry = nvinfer1::IPluginRegistry* (*)();

// getPluginRegistry of the libnvinfer this library was built for. dlopen returns the copy already
// in the process (same soname) or loads it, so the registry is the one TensorRT will use.
GetRegistry findRegistry() {
    std::string const names[] = {"libnvinfer.so." + std::to_string(NV_TENSORRT_MAJOR), "libnvinfer.so"};
    for (auto const& name : names) {
        if (void* lib = dlopen(name.c_str(), RTLD_LAZY | RTLD_GLOBAL)) {
            if (void* sym = dlsym(lib, "getPluginRegistry")) return reinterpret_cast<GetRegistry>(sym);
        }
    }
    return nullptr;
}

struct AutoRegister {
    AutoRegister() {
        GetRegistry get = findRegistry();
        nvinfer1::IPluginRegistry* registry = get != nullptr ? get() : nullptr;
        if (registry == nullptr) {
            std::fprintf(stderr,
                         "libcvig_plugins_autoreg.so: no libnvinfer.so.%d in this process or on the library path; "
                         "the ClusterViG plugins are not registered\n",
                         static_cast<int>(NV_TENSORRT_MAJOR));
            return;
        }
        int32_t n = 0;
        nvinfer1::IPluginCreatorInterface* const* creators = getCreators(n);
        for (int32_t i = 0; i < n; ++i) {
            registry->registerCreator(*creators[i], "");  // false: already registered (e.g. by loadLibrary)
        }
    }
};

AutoRegister const gAutoRegister;

}  // namespace
