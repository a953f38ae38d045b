// cvig_infer ENGINE.plan IMAGE [--spec preprocess.json] [--labels labels.txt] [--plugins-lib libcvig_plugins.so]
//            [--topk 5] [--cuda-graph]
// Classifies one image with a ClusterViG TensorRT engine. Without --spec / --labels it reads the
// preprocess.json and labels.txt that cvig-export writes beside the engine, when they are there.
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>

#include "cvig/engine.h"
#include "cvig/image.h"

int main(int argc, char** argv) {
    if (argc < 3) {
        std::cerr << "usage: cvig_infer ENGINE.plan IMAGE [--spec preprocess.json] [--labels labels.txt] [--plugins-lib LIB]"
                     " [--topk K] [--cuda-graph]\n"
                     "  --spec and --labels default to preprocess.json and labels.txt beside ENGINE.plan (cvig-export writes them)\n";
        return 2;
    }
    std::string plan = argv[1], image = argv[2], specPath, labelsPath, plugins;
    int topk = 5;
    bool graph = false;
    for (int i = 3; i < argc; ++i) {
        std::string a = argv[i];
        if (a == "--spec" && i + 1 < argc) specPath = argv[++i];
        else if (a == "--labels" && i + 1 < argc) labelsPath = argv[++i];
        else if ((a == "--plugins-lib" || a == "--plugins") && i + 1 < argc) plugins = argv[++i];  // --plugins: older name
        else if (a == "--topk" && i + 1 < argc) topk = std::stoi(argv[++i]);
        else if (a == "--cuda-graph") graph = true;
        else {
            std::cerr << "unknown argument " << a << "\n";
            return 2;
        }
    }
    auto beside = [&](char const* name) {
        std::string p = cvig::dirName(plan) + name;
        return std::ifstream(p).good() ? p : std::string();
    };
    if (specPath.empty()) specPath = beside("preprocess.json");
    if (labelsPath.empty()) labelsPath = beside("labels.txt");
    try {
        cvig::PreprocessSpec spec;
        if (specPath.empty()) {
            std::cerr << "warning: no --spec and no preprocess.json beside " << plan
                      << ": using ImageNet defaults (224, crop 0.9, bicubic)\n";
        } else {
            std::ifstream f(specPath);
            if (!f) throw std::runtime_error("spec " + specPath + " cannot be opened");
            std::stringstream ss;
            ss << f.rdbuf();
            spec = cvig::parseSpec(ss.str());
        }
        auto const chw = cvig::preprocess(cvig::loadImage(image), spec);
        cvig::Engine engine(plan, plugins);
        auto const logits = engine.infer(chw.data(), 1, spec.imgSize, graph);
        std::vector<std::string> names;
        if (!labelsPath.empty()) names = cvig::loadLabels(labelsPath, engine.numClasses());
        for (int c : cvig::topK(logits.data(), engine.numClasses(), topk)) {
            std::cout << "class " << c;
            if (!names.empty()) std::cout << " (" << names[static_cast<size_t>(c)] << ")";
            std::cout << "  logit " << logits[static_cast<size_t>(c)] << "\n";
        }
        return 0;
    } catch (std::exception const& e) {
        std::cerr << "error: " << e.what() << "\n";
        return 1;
    }
}
