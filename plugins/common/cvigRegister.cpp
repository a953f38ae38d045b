// Library entry points: TensorRT finds the creators through getCreators
// (trtexec --dynamicPlugins, IPluginRegistry::loadLibrary). No static registration.
#include "cvigPluginBase.h"

namespace cvig {
nvinfer1::IPluginCreatorV3One* kmeansCreator();
nvinfer1::IPluginCreatorV3One* kmeansCentroidsCreator();
nvinfer1::IPluginCreatorV3One* partitionedKnnCreator();
nvinfer1::IPluginCreatorV3One* segmentMeanCreator();
nvinfer1::IPluginCreatorV3One* gatherMaxRelCreator();
nvinfer1::ILoggerFinder* gLoggerFinder = nullptr;
}  // namespace cvig

extern "C" {

__attribute__((visibility("default"))) void setLoggerFinder(nvinfer1::ILoggerFinder* finder) {
    cvig::gLoggerFinder = finder;
}

__attribute__((visibility("default"))) nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
    static nvinfer1::IPluginCreatorInterface* const creators[] = {
        cvig::kmeansCreator(), cvig::kmeansCentroidsCreator(), cvig::partitionedKnnCreator(), cvig::segmentMeanCreator(),
        cvig::gatherMaxRelCreator()};
    nbCreators = static_cast<int32_t>(sizeof(creators) / sizeof(creators[0]));
    return creators;
}

}  // extern "C"
