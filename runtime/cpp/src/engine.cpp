#include "cvig/engine.h"

#include <NvInferRuntime.h>

#include <fstream>
#include <iostream>
#include <iterator>

namespace cvig {
namespace {

class Logger : public nvinfer1::ILogger {
    void log(Severity severity, char const* msg) noexcept override {
        if (severity <= Severity::kWARNING) std::cerr << "[TensorRT] " << msg << "\n";
    }
};

Logger& logger() {
    static Logger l;
    return l;
}

// The engine's I/O type as staged on the host; anything else is refused with the fix.
IoType ioType(nvinfer1::DataType t, std::string const& what) {
    if (t == nvinfer1::DataType::kFLOAT) return IoType::kFloat32;
    if (t == nvinfer1::DataType::kHALF) return IoType::kFloat16;
    throw EngineError(what + " has TensorRT data type " + std::to_string(static_cast<int>(t)) +
                      "; cvig runs engines with float32 or float16 images and logits: re-export without "
                      "changing the I/O types, or with --fp16-io");
}

}  // namespace

DeviceBuffer::~DeviceBuffer() {
    if (ptr) cudaFree(ptr);
}

void DeviceBuffer::resize(size_t n) {
    if (n <= bytes) return;
    if (ptr) CVIG_CUDA_CHECK(cudaFree(ptr));
    ptr = nullptr;
    CVIG_CUDA_CHECK(cudaMalloc(&ptr, n));
    bytes = n;
}

Engine::Engine(std::string const& planPath, std::string const& pluginLibrary) {
    std::ifstream f(planPath, std::ios::binary);
    if (!f) throw EngineError("engine " + planPath + " does not exist or cannot be read");
    std::vector<char> plan((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    mRuntime.reset(nvinfer1::createInferRuntime(logger()));
    if (!mRuntime) throw EngineError("TensorRT runtime could not be created (is libnvinfer installed?)");
    if (!pluginLibrary.empty()) {
        auto& registry = mRuntime->getPluginRegistry();
        // loadLibrary also returns null when the creators are already registered (a second Engine
        // in this process, or libcvig_plugins_autoreg.so): only a missing creator is an error
        if (registry.loadLibrary(pluginLibrary.c_str()) == nullptr &&
            registry.getCreator("CvigKMeans", "1", "") == nullptr) {
            throw EngineError("plugin library " + pluginLibrary +
                              " could not be loaded: build it with cmake -S plugins -DCVIG_TRT_ROOT=... for this "
                              "TensorRT (" + std::to_string(NV_TENSORRT_MAJOR) + ".x) and check that libcudart is found");
        }
    }
    mEngine.reset(mRuntime->deserializeCudaEngine(plan.data(), plan.size()));
    if (!mEngine) {
        throw EngineError("engine " + planPath + " could not be deserialized by TensorRT " +
                          std::to_string(NV_TENSORRT_MAJOR) + "." + std::to_string(NV_TENSORRT_MINOR) +
                          ": corrupt, built by another TensorRT version, or missing the plugin library");
    }
    mContext.reset(mEngine->createExecutionContext());
    if (!mContext) throw EngineError("execution context for " + planPath + " could not be created");
    for (int32_t i = 0; i < mEngine->getNbIOTensors(); ++i) {
        char const* name = mEngine->getIOTensorName(i);
        (mEngine->getTensorIOMode(name) == nvinfer1::TensorIOMode::kINPUT ? mInput : mOutput) = name;
    }
    if (mInput.empty() || mOutput.empty()) throw EngineError("engine " + planPath + " has no input or no output tensor");
    mInType = ioType(mEngine->getTensorDataType(mInput.c_str()), "input '" + mInput + "'");
    mOutType = ioType(mEngine->getTensorDataType(mOutput.c_str()), "output '" + mOutput + "'");
    auto const dims = mEngine->getTensorShape(mOutput.c_str());
    mClasses = static_cast<int>(dims.d[dims.nbDims - 1]);
    CVIG_CUDA_CHECK(cudaStreamCreate(&mStream));
}

Engine::~Engine() {
    if (mGraph) cudaGraphExecDestroy(mGraph);
    if (mStream) cudaStreamDestroy(mStream);
}

std::vector<float> Engine::infer(float const* images, int batch, int size, bool useCudaGraph) {
    size_t const inCount = static_cast<size_t>(batch) * 3 * size * size;
    size_t const outCount = static_cast<size_t>(batch) * mClasses;
    size_t const inBytes = inCount * elementSize(mInType);
    size_t const outBytes = outCount * elementSize(mOutType);
    mIn.resize(inBytes);
    mOut.resize(outBytes);
    mHostIn.resize(inBytes);
    mHostOut.resize(outBytes);
    packFloats(images, inCount, mInType, mHostIn.data());  // FP16-I/O engines take half images
    nvinfer1::Dims4 shape{batch, 3, size, size};
    if (!mContext->setInputShape(mInput.c_str(), shape)) throw EngineError("batch " + std::to_string(batch) +
                                                                           " is outside the engine's profile");
    mContext->setTensorAddress(mInput.c_str(), mIn.ptr);
    mContext->setTensorAddress(mOutput.c_str(), mOut.ptr);
    CVIG_CUDA_CHECK(cudaMemcpyAsync(mIn.ptr, mHostIn.data(), inBytes, cudaMemcpyHostToDevice, mStream));
    if (useCudaGraph) {
        if (!mGraph || mGraphBatch != batch) {
            if (mGraph) CVIG_CUDA_CHECK(cudaGraphExecDestroy(mGraph));
            mContext->enqueueV3(mStream);  // first run outside capture: lets TensorRT allocate lazily
            cudaGraph_t graph;
            CVIG_CUDA_CHECK(cudaStreamBeginCapture(mStream, cudaStreamCaptureModeThreadLocal));
            bool const ok = mContext->enqueueV3(mStream);
            CVIG_CUDA_CHECK(cudaStreamEndCapture(mStream, &graph));
            if (!ok) throw EngineError("enqueueV3 failed during CUDA graph capture");
            CVIG_CUDA_CHECK(cudaGraphInstantiate(&mGraph, graph, 0));
            CVIG_CUDA_CHECK(cudaGraphDestroy(graph));
            mGraphBatch = batch;
        }
        CVIG_CUDA_CHECK(cudaGraphLaunch(mGraph, mStream));
    } else if (!mContext->enqueueV3(mStream)) {
        throw EngineError("enqueueV3 failed");
    }
    CVIG_CUDA_CHECK(cudaMemcpyAsync(mHostOut.data(), mOut.ptr, outBytes, cudaMemcpyDeviceToHost, mStream));
    CVIG_CUDA_CHECK(cudaStreamSynchronize(mStream));
    std::vector<float> out(outCount);
    unpackFloats(mHostOut.data(), outCount, mOutType, out.data());
    return out;
}

}  // namespace cvig
