// cvig_infer ENGINE.plan IMAGE [--spec preprocess.json] [--plugins libcvig_plugins.so] [--topk 5] [--cuda-graph]
// Classifies one image with a ClusterViG TensorRT engine.
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>

#include "cvig/engine.h"
#include "cvig/image.h"

int main(int argc, char** argv) {
    if (argc < 3) {
        std::cerr << "usage: cvig_infer ENGINE.plan IMAGE [--spec preprocess.json] [--plugins LIB] [--topk K] [--cuda-graph]\n";
        return 2;
    }
    std::string plan = argv[1], image = argv[2], specPath, plugins;
    int topk = 5;
    bool graph = false;
    for (int i = 3; i < argc; ++i) {
        std::string a = argv[i];
        if (a == "--spec" && i + 1 < argc) specPath = argv[++i];
        else if (a == "--plugins" && i + 1 < argc) plugins = argv[++i];
        else if (a == "--topk" && i + 1 < argc) topk = std::stoi(argv[++i]);
        else if (a == "--cuda-graph") graph = true;
        else {
            std::cerr << "unknown argument " << a << "\n";
            return 2;
        }
    }
    try {
        cvig::PreprocessSpec spec;
        if (!specPath.empty()) {
            std::ifstream f(specPath);
            if (!f) throw std::runtime_error("spec " + specPath + " cannot be opened");
            std::stringstream ss;
            ss << f.rdbuf();
            spec = cvig::parseSpec(ss.str());
        }
        auto const chw = cvig::preprocess(cvig::loadImage(image), spec);
        cvig::Engine engine(plan, plugins);
        auto const logits = engine.infer(chw.data(), 1, spec.imgSize, graph);
        for (int c : cvig::topK(logits.data(), engine.numClasses(), topk))
            std::cout << "class " << c << "  logit " << logits[static_cast<size_t>(c)] << "\n";
        return 0;
    } catch (std::exception const& e) {
        std::cerr << "error: " << e.what() << "\n";
        return 1;
    }
}
