// cvig_preprocess IMAGE SPEC.json OUT.bin: writes the preprocessed CHW float32 tensor (for checks against Python).
#include <fstream>
#include <iostream>
#include <sstream>

#include "cvig/image.h"

int main(int argc, char** argv) {
    if (argc != 4) {
        std::cerr << "usage: cvig_preprocess IMAGE SPEC.json OUT.bin\n";
        return 2;
    }
    try {
        std::ifstream specFile(argv[2]);
        if (!specFile) throw std::runtime_error(std::string("spec ") + argv[2] + " cannot be opened");
        std::stringstream ss;
        ss << specFile.rdbuf();
        auto const chw = cvig::preprocess(cvig::loadImage(argv[1]), cvig::parseSpec(ss.str()));
        std::ofstream out(argv[3], std::ios::binary);
        out.write(reinterpret_cast<char const*>(chw.data()), static_cast<std::streamsize>(chw.size() * sizeof(float)));
        return out ? 0 : 1;
    } catch (std::exception const& e) {
        std::cerr << "error: " << e.what() << "\n";
        return 1;
    }
}
