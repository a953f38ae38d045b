// Runs the parts of libcvig_plugins.so that need no GPU and no TensorRT runtime, on the host:
// creators and attribute checks, output types against supportsFormatCombination, and the
// registration of libcvig_plugins_autoreg.so (against fake_nvinfer.cpp's registry).
//
//   plugin_harness <libcvig_plugins.so> <libcvig_plugins_autoreg.so> <fake libnvinfer.so.N>
//
// Prints one line per check; exits 1 on the first failure.
#include <dlfcn.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include <NvInferRuntime.h>

using namespace nvinfer1;

namespace {

int gChecks = 0;

void check(bool ok, std::string const& what) {
    ++gChecks;
    if (!ok) {
        std::printf("FAIL %s\n", what.c_str());
        std::exit(1);
    }
    std::printf("ok   %s\n", what.c_str());
}

void* open(char const* path, int mode) {
    void* h = dlopen(path, mode);
    if (h == nullptr) {
        std::printf("FAIL dlopen %s: %s\n", path, dlerror());
        std::exit(1);
    }
    return h;
}

using GetCreators = IPluginCreatorInterface* const* (*)(int32_t&);

struct Field {
    char const* name;
    int32_t value;
};

IPluginV3* create(IPluginCreatorV3One* c, std::vector<Field> const& fields) {
    std::vector<PluginField> f;
    for (auto const& x : fields) f.emplace_back(x.name, &x.value, PluginFieldType::kINT32, 1);
    PluginFieldCollection fc{static_cast<int32_t>(f.size()), f.data()};
    return c->createPlugin(c->getPluginName(), &fc, TensorRTPhase::kBUILD);
}

// Output types of a plugin for the given input types: the return code and the first output type
// (and the last one, where asked).
int32_t outputTypes(IPluginV3OneBuild* b, std::vector<DataType> const& in, DataType* first, DataType* last = nullptr) {
    DataType out[4];
    int32_t const rc = b->getOutputDataTypes(out, b->getNbOutputs(), in.data(), static_cast<int32_t>(in.size()));
    if (rc == 0) *first = out[0];
    if (rc == 0 && last != nullptr) *last = out[b->getNbOutputs() - 1];
    return rc;
}

// supportsFormatCombination at an output position, all other tensors int32 except input 0 = `x`
bool acceptsAtOutput(IPluginV3OneBuild* b, int32_t nbInputs, int32_t pos, DataType x, DataType t) {
    std::vector<DynamicPluginTensorDesc> io(static_cast<size_t>(nbInputs + b->getNbOutputs()));
    for (auto& d : io) {
        d.desc.format = TensorFormat::kLINEAR;
        d.desc.type = DataType::kINT32;
    }
    io[0].desc.type = x;
    io[static_cast<size_t>(pos)].desc.type = t;
    return b->supportsFormatCombination(pos, io.data(), nbInputs, b->getNbOutputs());
}

bool acceptsAtInput0(IPluginV3OneBuild* b, int32_t nbInputs, DataType t) {
    std::vector<DynamicPluginTensorDesc> io(static_cast<size_t>(nbInputs + b->getNbOutputs()));
    for (auto& d : io) {
        d.desc.format = TensorFormat::kLINEAR;
        d.desc.type = DataType::kINT32;
    }
    io[0].desc.type = t;
    return b->supportsFormatCombination(0, io.data(), nbInputs, b->getNbOutputs());
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 4) {
        std::printf("usage: %s libcvig_plugins.so libcvig_plugins_autoreg.so libnvinfer-fake.so\n", argv[0]);
        return 2;
    }
    void* lib = open(argv[1], RTLD_NOW | RTLD_LOCAL);
    auto getCreators = reinterpret_cast<GetCreators>(dlsym(lib, "getCreators"));
    check(getCreators != nullptr && dlsym(lib, "setLoggerFinder") != nullptr, "getCreators and setLoggerFinder exported");
    int32_t n = 0;
    IPluginCreatorInterface* const* creators = getCreators(n);
    check(n == 5, "five creators");

    struct Expect {
        char const* name;
        int32_t inputs;
        std::vector<Field> bad;  // attribute sets the creator must refuse
    };
    std::vector<Expect> const expect = {
        {"CvigKMeans", 1, {{"clusters", 0}, {"iters", -1}}},
        {"CvigKMeansCentroids", 1, {{"clusters", 0}, {"iters", -1}, {"empty_zero", 2}, {"empty_zero", -1}}},
        {"CvigPartitionedKNN", 2, {{"k", 0}, {"k", 65}}},
        {"CvigSegmentMean", 2, {{"clusters", 0}}},
        {"CvigGatherMaxRel", 2, {}},
    };
    for (auto const& e : expect) {
        IPluginCreatorV3One* c = nullptr;
        for (int32_t i = 0; i < n; ++i) {
            auto* v3 = static_cast<IPluginCreatorV3One*>(creators[i]);
            if (std::strcmp(v3->getPluginName(), e.name) == 0) c = v3;
        }
        check(c != nullptr && std::strcmp(c->getPluginVersion(), "1") == 0 && std::strcmp(c->getPluginNamespace(), "") == 0,
              std::string(e.name) + ": creator, version 1, namespace \"\"");
        IPluginV3* p = create(c, {});
        check(p != nullptr, std::string(e.name) + ": created with default attributes");
        for (auto const& f : e.bad) {
            check(create(c, {f}) == nullptr, std::string(e.name) + ": refuses " + f.name + "=" + std::to_string(f.value));
        }
        if (std::strcmp(e.name, "CvigPartitionedKNN") == 0) {
            check(create(c, {{"k", 1}}) != nullptr && create(c, {{"k", 64}}) != nullptr, "CvigPartitionedKNN: k = 1 and 64 accepted");
        }
        auto* b = static_cast<IPluginV3OneBuild*>(p->getCapabilityInterface(PluginCapabilityType::kBUILD));
        check(b != nullptr, std::string(e.name) + ": build capability");
        for (DataType t : {DataType::kFLOAT, DataType::kHALF}) {
            std::vector<DataType> in(static_cast<size_t>(e.inputs), DataType::kINT32);
            in[0] = t;
            DataType first{};
            bool const centroids = std::strcmp(e.name, "CvigKMeansCentroids") == 0;
            bool const index = centroids || std::strcmp(e.name, "CvigKMeans") == 0 || std::strcmp(e.name, "CvigPartitionedKNN") == 0;
            check(outputTypes(b, in, &first) == 0 && first == (index ? DataType::kINT32 : t) && acceptsAtInput0(b, e.inputs, t),
                  std::string(e.name) + ": " + (t == DataType::kFLOAT ? "FP32" : "FP16") + " input accepted, output types agree");
            if (centroids) {  // labels, counts int32; centroids in the tokens' type, at output 2 = position 3
                DataType last{};
                DataType const other = t == DataType::kFLOAT ? DataType::kHALF : DataType::kFLOAT;
                check(outputTypes(b, in, &first, &last) == 0 && last == t && acceptsAtOutput(b, 1, 3, t, t) &&
                          !acceptsAtOutput(b, 1, 3, t, other) && acceptsAtOutput(b, 1, 1, t, DataType::kINT32) &&
                          acceptsAtOutput(b, 1, 2, t, DataType::kINT32),
                      std::string(e.name) + ": centroids follow the tokens' type, labels and counts int32");
            }
        }
        for (DataType t : {DataType::kBF16, DataType::kINT8, DataType::kINT32}) {
            std::vector<DataType> in(static_cast<size_t>(e.inputs), DataType::kINT32);
            in[0] = t;
            DataType first{};
            check(outputTypes(b, in, &first) != 0 && !acceptsAtInput0(b, e.inputs, t),
                  std::string(e.name) + ": input type " + std::to_string(static_cast<int>(t)) +
                      " refused by getOutputDataTypes and supportsFormatCombination alike");
        }
        if (e.inputs == 2) {
            DataType first{};
            check(outputTypes(b, {DataType::kFLOAT, DataType::kINT64}, &first) != 0,
                  std::string(e.name) + ": INT64 second input refused (labels and indices are int32)");
        }
        delete p;
    }

    // libcvig_plugins_autoreg.so registers the same creators with the process's registry on load
    void* fake = open(argv[3], RTLD_NOW | RTLD_GLOBAL);
    auto names = reinterpret_cast<int (*)(char*, int)>(dlsym(fake, "fakeRegisteredNames"));
    auto registry = reinterpret_cast<IPluginRegistry* (*)()>(dlsym(fake, "getPluginRegistry"));
    char buf[4096];
    check(names != nullptr && names(buf, sizeof buf) == 0, "nothing registered before the autoreg library is loaded");
    open(argv[2], RTLD_NOW | RTLD_LOCAL);
    int const count = names(buf, sizeof buf);
    std::printf("     registered:\n%s", buf);
    check(count == 5 && std::strstr(buf, "::CvigKMeans/1") && std::strstr(buf, "::CvigKMeansCentroids/1") &&
              std::strstr(buf, "::CvigPartitionedKNN/1") && std::strstr(buf, "::CvigSegmentMean/1") &&
              std::strstr(buf, "::CvigGatherMaxRel/1"),
          "autoreg registered the five creators on dlopen");
    open(argv[2], RTLD_NOW | RTLD_LOCAL);  // a second dlopen runs no initializer again
    bool again = false;
    for (int32_t i = 0; i < n; ++i) again |= registry()->registerCreator(*creators[i], "");
    check(!again && names(buf, sizeof buf) == 5, "a second registration (as loadLibrary would do) is refused, no duplicates");
    std::printf("%d checks passed\n", gChecks);
    return 0;
}
