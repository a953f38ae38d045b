#include "cvig/image.h"

#include <algorithm>
#include <cmath>
#include <csetjmp>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <numeric>

#include <jpeglib.h>
#include <png.h>

namespace cvig {
namespace {

struct FileCloser {
    void operator()(FILE* f) const {
        if (f) std::fclose(f);
    }
};

bool hasSuffix(std::string const& s, std::string const& suffix) {
    if (s.size() < suffix.size()) return false;
    std::string tail = s.substr(s.size() - suffix.size());
    std::transform(tail.begin(), tail.end(), tail.begin(), [](unsigned char c) { return std::tolower(c); });
    return tail == suffix;
}

Image loadPng(std::string const& path) {
    png_image im;
    std::memset(&im, 0, sizeof(im));
    im.version = PNG_IMAGE_VERSION;
    if (!png_image_begin_read_from_file(&im, path.c_str())) {
        throw ImageError("image " + path + " could not be read (" + im.message + "); is it a complete PNG file?");
    }
    im.format = PNG_FORMAT_RGB;  // grayscale expanded, alpha composited away by libpng
    Image out;
    out.width = static_cast<int>(im.width);
    out.height = static_cast<int>(im.height);
    out.rgb.resize(PNG_IMAGE_SIZE(im));
    if (!png_image_finish_read(&im, nullptr, out.rgb.data(), 0, nullptr)) {
        std::string msg = im.message;
        png_image_free(&im);
        throw ImageError("image " + path + " could not be decoded (" + msg + ")");
    }
    return out;
}

struct JpegError {
    jpeg_error_mgr mgr;
    std::jmp_buf jump;
    char message[JMSG_LENGTH_MAX];
};

void jpegErrorExit(j_common_ptr cinfo) {
    auto* err = reinterpret_cast<JpegError*>(cinfo->err);
    (*cinfo->err->format_message)(cinfo, err->message);
    std::longjmp(err->jump, 1);
}

Image loadJpeg(std::string const& path) {
    std::unique_ptr<FILE, FileCloser> f(std::fopen(path.c_str(), "rb"));
    if (!f) throw ImageError("image " + path + " does not exist or cannot be opened");
    jpeg_decompress_struct cinfo;
    JpegError err;
    cinfo.err = jpeg_std_error(&err.mgr);
    err.mgr.error_exit = jpegErrorExit;
    Image out;
    if (setjmp(err.jump)) {
        jpeg_destroy_decompress(&cinfo);
        throw ImageError("image " + path + " could not be read (" + err.message + "); is it a complete JPEG file?");
    }
    jpeg_create_decompress(&cinfo);
    jpeg_stdio_src(&cinfo, f.get());
    jpeg_read_header(&cinfo, TRUE);
    if (cinfo.num_components != 1 && cinfo.num_components != 3) {
        int n = cinfo.num_components;
        jpeg_destroy_decompress(&cinfo);
        throw ImageError("image " + path + " has " + std::to_string(n) +
                         " channels (e.g. CMYK); convert it to RGB or grayscale first");
    }
    cinfo.out_color_space = JCS_RGB;
    jpeg_start_decompress(&cinfo);
    out.width = static_cast<int>(cinfo.output_width);
    out.height = static_cast<int>(cinfo.output_height);
    out.rgb.resize(static_cast<size_t>(out.width) * out.height * 3);
    while (cinfo.output_scanline < cinfo.output_height) {
        JSAMPROW row = out.rgb.data() + static_cast<size_t>(cinfo.output_scanline) * out.width * 3;
        jpeg_read_scanlines(&cinfo, &row, 1);
    }
    jpeg_finish_decompress(&cinfo);
    jpeg_destroy_decompress(&cinfo);
    return out;
}

double filterValue(std::string const& filter, double x) {
    x = std::fabs(x);
    if (filter == "bilinear") return x < 1.0 ? 1.0 - x : 0.0;
    // bicubic, a = -0.5 (as PIL)
    constexpr double a = -0.5;
    if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0;
    if (x < 2.0) return (((x - 5.0) * x + 8.0) * x - 4.0) * a;
    return 0.0;
}

double filterSupport(std::string const& filter) { return filter == "bilinear" ? 1.0 : 2.0; }

// One separable pass along one axis: weights computed PIL's way (support scaled when downsampling).
void resamplePass(uint8_t const* src, int inLen, int outLen, int lines, int pixStride, int lineStride, uint8_t* dst,
                  int dstPixStride, int dstLineStride, std::string const& filter) {
    double const scale = static_cast<double>(inLen) / outLen;
    double const fscale = std::max(scale, 1.0);
    double const support = filterSupport(filter) * fscale;
    for (int o = 0; o < outLen; ++o) {
        double const center = (o + 0.5) * scale;
        int lo = std::max(0, static_cast<int>(center - support + 0.5));
        int hi = std::min(inLen, static_cast<int>(center + support + 0.5));
        std::vector<double> w(static_cast<size_t>(std::max(0, hi - lo)));
        double total = 0.0;
        for (int i = lo; i < hi; ++i) {
            w[i - lo] = filterValue(filter, (i - center + 0.5) / fscale);
            total += w[i - lo];
        }
        if (total != 0.0)
            for (double& v : w) v /= total;
        for (int l = 0; l < lines; ++l) {
            for (int c = 0; c < 3; ++c) {
                double acc = 0.0;
                for (int i = lo; i < hi; ++i) acc += w[i - lo] * src[l * lineStride + i * pixStride + c];
                long v = std::lround(acc);
                dst[l * dstLineStride + o * dstPixStride + c] = static_cast<uint8_t>(std::clamp(v, 0L, 255L));
            }
        }
    }
}

}  // namespace

Image loadImage(std::string const& path) {
    std::unique_ptr<FILE, FileCloser> probe(std::fopen(path.c_str(), "rb"));
    if (!probe) throw ImageError("image " + path + " does not exist or cannot be opened");
    unsigned char magic[8] = {0};
    size_t const n = std::fread(magic, 1, sizeof(magic), probe.get());
    probe.reset();
    if (n >= 8 && png_sig_cmp(magic, 0, 8) == 0) return loadPng(path);
    if (n >= 3 && magic[0] == 0xFF && magic[1] == 0xD8 && magic[2] == 0xFF) return loadJpeg(path);
    if (hasSuffix(path, ".png")) return loadPng(path);
    throw ImageError("image " + path + " is neither PNG nor JPEG (or is truncated)");
}

Image resize(Image const& img, int outW, int outH, std::string const& filter) {
    // horizontal then vertical, each rounded to 8 bits, as PIL does for 8-bit images
    Image tmp;
    tmp.width = outW;
    tmp.height = img.height;
    tmp.rgb.resize(static_cast<size_t>(outW) * img.height * 3);
    resamplePass(img.rgb.data(), img.width, outW, img.height, 3, img.width * 3, tmp.rgb.data(), 3, outW * 3, filter);
    Image out;
    out.width = outW;
    out.height = outH;
    out.rgb.resize(static_cast<size_t>(outW) * outH * 3);
    resamplePass(tmp.rgb.data(), img.height, outH, outW, outW * 3, 3, out.rgb.data(), outW * 3, 3, filter);
    return out;
}

std::vector<float> preprocess(Image const& img, PreprocessSpec const& spec) {
    int const size = spec.imgSize;
    int const scale = static_cast<int>(std::floor(size / spec.cropPct));
    int nw, nh;
    if (img.width <= img.height) {
        nw = scale;
        nh = std::max(1, static_cast<int>(std::lround(static_cast<double>(img.height) * scale / img.width)));
    } else {
        nh = scale;
        nw = std::max(1, static_cast<int>(std::lround(static_cast<double>(img.width) * scale / img.height)));
    }
    Image r = resize(img, nw, nh, spec.interpolation);
    int const left = (nw - size) / 2, top = (nh - size) / 2;
    std::vector<float> chw(static_cast<size_t>(3) * size * size);
    for (int c = 0; c < 3; ++c) {
        for (int y = 0; y < size; ++y) {
            for (int x = 0; x < size; ++x) {
                float v = r.rgb[(static_cast<size_t>(top + y) * nw + left + x) * 3 + c] / 255.0f;
                if (!spec.normalizeInGraph) v = (v - spec.mean[c]) / spec.std[c];
                chw[(static_cast<size_t>(c) * size + y) * size + x] = v;
            }
        }
    }
    return chw;
}

namespace {

// Minimal JSON reader for the flat preprocessing object (no nesting beyond number arrays).
struct Json {
    std::string const& s;
    size_t i = 0;
    void ws() {
        while (i < s.size() && std::isspace(static_cast<unsigned char>(s[i]))) ++i;
    }
    void expect(char c) {
        ws();
        if (i >= s.size() || s[i] != c) throw std::invalid_argument(std::string("preprocess JSON: expected '") + c + "'");
        ++i;
    }
    std::string str() {
        expect('"');
        std::string out;
        while (i < s.size() && s[i] != '"') out += s[i++];
        expect('"');
        return out;
    }
    double num() {
        ws();
        size_t used = 0;
        double v = std::stod(s.substr(i), &used);
        i += used;
        return v;
    }
};

}  // namespace

PreprocessSpec parseSpec(std::string const& json) {
    PreprocessSpec spec;
    Json p{json};
    std::map<std::string, std::vector<double>> nums;
    p.expect('{');
    p.ws();
    while (p.i < json.size() && json[p.i] != '}') {
        std::string key = p.str();
        p.expect(':');
        p.ws();
        char c = json[p.i];
        if (c == '"') {
            std::string v = p.str();
            if (key == "interpolation") spec.interpolation = v;
        } else if (c == '[') {
            ++p.i;
            std::vector<double> arr;
            p.ws();
            while (json[p.i] != ']') {
                arr.push_back(p.num());
                p.ws();
                if (json[p.i] == ',') ++p.i;
                p.ws();
            }
            ++p.i;
            nums[key] = arr;
        } else if (json.compare(p.i, 4, "true") == 0 || json.compare(p.i, 5, "false") == 0) {
            bool v = json.compare(p.i, 4, "true") == 0;
            p.i += v ? 4 : 5;
            if (key == "normalize_in_graph") spec.normalizeInGraph = v;
        } else {
            nums[key] = {p.num()};
        }
        p.ws();
        if (json[p.i] == ',') ++p.i;
        p.ws();
    }
    if (nums.count("img_size")) spec.imgSize = static_cast<int>(nums["img_size"][0]);
    if (nums.count("crop_pct")) spec.cropPct = nums["crop_pct"][0];
    for (auto const* key : {"mean", "std"}) {
        if (!nums.count(key)) continue;
        if (nums[key].size() != 3) throw std::invalid_argument(std::string("preprocess JSON: ") + key + " needs 3 values");
        for (int c = 0; c < 3; ++c) (std::string(key) == "mean" ? spec.mean : spec.std)[c] = static_cast<float>(nums[key][c]);
    }
    if (spec.interpolation != "bilinear" && spec.interpolation != "bicubic")
        throw std::invalid_argument("preprocess JSON: interpolation must be bilinear or bicubic");
    return spec;
}

std::vector<std::string> loadLabels(std::string const& path, int expected) {
    std::ifstream f(path);
    if (!f) throw std::runtime_error("labels file " + path + " cannot be opened");
    std::vector<std::string> names;
    std::string line;
    while (std::getline(f, line)) {
        while (!line.empty() && (line.back() == '\r' || line.back() == ' ' || line.back() == '\t')) line.pop_back();
        size_t b = line.find_first_not_of(" \t");
        if (b != std::string::npos) names.push_back(line.substr(b));
    }
    if (expected > 0 && static_cast<int>(names.size()) != expected)
        throw std::runtime_error("labels file " + path + " has " + std::to_string(names.size()) + " names but the model has " +
                                 std::to_string(expected) + " classes; pass the labels.txt cvig-export wrote for this model");
    return names;
}

std::string dirName(std::string const& path) {
    size_t slash = path.find_last_of('/');
    return slash == std::string::npos ? std::string() : path.substr(0, slash + 1);
}

std::vector<int> topK(float const* values, int n, int k) {
    std::vector<int> idx(static_cast<size_t>(n));
    std::iota(idx.begin(), idx.end(), 0);
    k = std::min(k, n);
    std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), [&](int a, int b) {
        return values[a] > values[b] || (values[a] == values[b] && a < b);
    });
    idx.resize(static_cast<size_t>(k));
    return idx;
}

}  // namespace cvig
