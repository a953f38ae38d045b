// TensorRT engine runner (10.3+ and 11.x): load a plan (and the plugin library), bind I/O by name,
// enqueueV3 on a stream, optional CUDA graph for a fixed shape. RAII owners for every TensorRT/CUDA object.
#pragma once

#include <cuda_runtime_api.h>

#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "cvig/tensor_io.h"

namespace nvinfer1 {
class IRuntime;
class ICudaEngine;
class IExecutionContext;
}  // namespace nvinfer1

namespace cvig {

struct EngineError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// Turns a CUDA error into an exception naming the call and its site.
#define CVIG_CUDA_CHECK(call)                                                                               \
    do {                                                                                                    \
        cudaError_t const e_ = (call);                                                                      \
        if (e_ != cudaSuccess)                                                                              \
            throw ::cvig::EngineError(std::string(#call) + " failed at " + __FILE__ + ":" +                \
                                      std::to_string(__LINE__) + ": " + cudaGetErrorString(e_));            \
    } while (0)

struct DeviceBuffer {
    void* ptr = nullptr;
    size_t bytes = 0;
    DeviceBuffer() = default;
    DeviceBuffer(DeviceBuffer const&) = delete;
    DeviceBuffer& operator=(DeviceBuffer const&) = delete;
    ~DeviceBuffer();
    void resize(size_t n);
};

class Engine {
public:
    // pluginLibrary may be empty; throws EngineError with the file name and the fix.
    Engine(std::string const& planPath, std::string const& pluginLibrary = "");
    ~Engine();
    Engine(Engine const&) = delete;
    Engine& operator=(Engine const&) = delete;

    // images: host float32 [batch, 3, size, size]; returns host logits [batch, classes]. An engine with
    // float16 I/O (cvig-export --fp16-io) gets the images rounded to half and its logits widened.
    std::vector<float> infer(float const* images, int batch, int size, bool useCudaGraph = false);
    int numClasses() const { return mClasses; }
    IoType inputType() const { return mInType; }
    IoType outputType() const { return mOutType; }

private:
    struct Deleter {
        template <typename T>
        void operator()(T* p) const { delete p; }
    };
    std::unique_ptr<nvinfer1::IRuntime, Deleter> mRuntime;
    std::unique_ptr<nvinfer1::ICudaEngine, Deleter> mEngine;
    std::unique_ptr<nvinfer1::IExecutionContext, Deleter> mContext;
    std::string mInput, mOutput;
    int mClasses = 0;
    cudaStream_t mStream = nullptr;
    cudaGraphExec_t mGraph = nullptr;
    int mGraphBatch = 0;
    DeviceBuffer mIn, mOut;
    IoType mInType = IoType::kFloat32, mOutType = IoType::kFloat32;
    std::vector<uint8_t> mHostIn, mHostOut;  // staging in the engine's I/O types
};

}  // namespace cvig
