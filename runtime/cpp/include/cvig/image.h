// Image decoding (PNG via libpng, JPEG via libjpeg) and the ClusterViG preprocessing
// (resize shorter side to img_size / crop_pct, center crop, (x/255 - mean) / std, CHW float),
// matching clustervig.preprocess (PIL) to within one 8-bit level. No TensorRT needed.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace cvig {

struct ImageError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

struct Image {
    int width = 0, height = 0;  // RGB, 8 bits per channel, row-major HWC
    std::vector<uint8_t> rgb;
};

// Reads a PNG or JPEG file as RGB (grayscale expanded, alpha dropped); throws ImageError naming the file.
Image loadImage(std::string const& path);

struct PreprocessSpec {
    int imgSize = 224;
    double cropPct = 0.9;
    std::string interpolation = "bicubic";  // "bilinear" or "bicubic"
    float mean[3] = {0.485f, 0.456f, 0.406f};
    float std[3] = {0.229f, 0.224f, 0.225f};
    bool normalizeInGraph = false;  // then the output is RGB in [0, 1]
};

// Parses the JSON object cvig-export records as "clustervig.preprocess" (flat: numbers, strings, arrays, bools).
PreprocessSpec parseSpec(std::string const& json);

// Resize (separable filter, PIL's support scaling for downsampling), center crop, normalise -> CHW floats.
std::vector<float> preprocess(Image const& img, PreprocessSpec const& spec);

// Resample an RGB image to (outW, outH) with PIL-style antialiasing filters; results rounded to 8 bits per pass.
Image resize(Image const& img, int outW, int outH, std::string const& filter);

// Class names, one per line (blank lines skipped); throws std::runtime_error naming the file when it cannot be
// read or when expected > 0 and the count differs.
std::vector<std::string> loadLabels(std::string const& path, int expected = 0);

// Directory part of a path ("" when none), for finding preprocess.json / labels.txt beside an engine.
std::string dirName(std::string const& path);

// Indices of the k largest values, ties to the lower index.
std::vector<int> topK(float const* values, int n, int k);

}  // namespace cvig
