// Image decoding (PNG via libpng, JPEG via libjpeg) and the ClusterViG preprocessing
// (resize shorter side to img_size / crop_pct, center crop, (x/255 - mean) / std, CHW float).
// Decoding gives exactly the bytes of clustervig.preprocess.load_image (PIL's conversion to 8-bit RGB);
// preprocessing matches PIL to within two 8-bit levels. No TensorRT needed.
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

// PIL's decompression-bomb limit (2 x PIL.Image.MAX_IMAGE_PIXELS at its default): larger images are refused.
constexpr unsigned long long kMaxImagePixels = 2ull * (1024ull * 1024 * 1024 / 4 / 3);

// Reads a PNG or JPEG file (told by content, not by name) as 8-bit RGB, exactly as PIL converts it:
// gray replicated (1/2/4-bit gray scaled x255/x85/x17), 16-bit samples -> high byte, palette -> its colours,
// alpha and tRNS dropped (not composited), gamma/ICC ignored, CMYK/YCCK JPEG -> PIL's Adobe CMYK formula.
// Throws ImageError naming the file: other formats (named), truncated or corrupt files, > kMaxImagePixels.
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
