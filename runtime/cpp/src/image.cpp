#include "cvig/image.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <csetjmp>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <numeric>

#include <jpeglib.h>
#include <jerror.h>
#include <png.h>
#include <zlib.h>

namespace cvig {
namespace {

struct FileCloser {
    void operator()(FILE* f) const {
        if (f) std::fclose(f);
    }
};

// The one accepted set of image files, identical to clustervig.preprocess.load_image: PNG and JPEG, told
// apart by content. Other formats are named (from their magic bytes) so the error can say what to do.
std::string sniffFormat(std::vector<uint8_t> const& b) {
    auto starts = [&](char const* m, size_t at = 0) {
        size_t const n = std::strlen(m);
        return b.size() >= at + n && std::memcmp(b.data() + at, m, n) == 0;
    };
    if (b.empty()) return "empty";
    if (starts("\x89PNG\r\n\x1a\n")) return "PNG";
    if (starts("\xff\xd8\xff")) return "JPEG";
    if (starts("GIF87a") || starts("GIF89a")) return "GIF";
    if (starts("BM")) return "BMP";
    if (starts("RIFF") && starts("WEBP", 8)) return "WebP";
    if (starts("II*") && b.size() >= 4 && b[3] == 0) return "TIFF";
    if (starts("MM") && b.size() >= 4 && b[2] == 0 && b[3] == '*') return "TIFF";
    if (starts("ftyp", 4) && (starts("avif", 8) || starts("avis", 8))) return "AVIF";
    if (starts("ftyp", 4) && (starts("heic", 8) || starts("heix", 8) || starts("mif1", 8) || starts("msf1", 8)))
        return "HEIF";
    if (b.size() >= 12 && std::memcmp(b.data(), "\0\0\0\x0cjP  ", 8) == 0) return "JPEG 2000";
    if (b.size() >= 4 && b[0] == 0xff && b[1] == 0x4f && b[2] == 0xff && b[3] == 0x51) return "JPEG 2000";
    if ((b.size() >= 2 && b[0] == 0xff && b[1] == 0x0a) ||
        (b.size() >= 12 && std::memcmp(b.data(), "\0\0\0\x0cJXL ", 8) == 0))
        return "JPEG XL";
    if (b.size() >= 4 && b[0] == 0 && b[1] == 0 && b[2] == 1 && b[3] == 0) return "ICO";
    if (starts("8BPS")) return "PSD";
    if (starts("qoif")) return "QOI";
    if (starts("%PDF")) return "PDF";
    if (b.size() >= 3 && b[0] == 'P' && b[1] >= '1' && b[1] <= '7' && std::isspace(b[2])) return "PNM";
    return "";
}

std::string hexHead(std::vector<uint8_t> const& b) {
    static char const* digits = "0123456789abcdef";
    std::string out;
    for (size_t i = 0; i < std::min<size_t>(b.size(), 8); ++i) {
        if (i) out += ' ';
        out += digits[b[i] >> 4];
        out += digits[b[i] & 15];
    }
    return out;
}

std::vector<uint8_t> readFile(std::string const& path) {
    std::unique_ptr<FILE, FileCloser> f(std::fopen(path.c_str(), "rb"));
    if (!f) throw ImageError("image " + path + " does not exist or cannot be opened");
    std::vector<uint8_t> data;
    uint8_t buf[1 << 16];
    size_t n;
    while ((n = std::fread(buf, 1, sizeof(buf), f.get())) > 0) data.insert(data.end(), buf, buf + n);
    if (std::ferror(f.get())) throw ImageError("image " + path + " cannot be read (I/O error)");
    return data;
}

// PIL's decompression-bomb check: the error for an image above kMaxImagePixels, "" when it is within.
std::string pixelLimitError(std::string const& path, unsigned long w, unsigned long h) {
    unsigned long long const pixels = static_cast<unsigned long long>(std::max(1ul, w)) * std::max(1ul, h);
    if (pixels <= kMaxImagePixels) return "";
    return "image " + path + " has " + std::to_string(pixels) + " pixels (" + std::to_string(w) + " x " +
           std::to_string(h) + "), more than the limit of " + std::to_string(kMaxImagePixels) +
           " pixels; downscale it first";
}

// ---- PNG (libpng low-level API: exactly PIL's bytes for every colour type and bit depth) ----

struct PngSource {
    std::vector<uint8_t> const* data;
    size_t pos;
    std::string path;
    std::string message;
    unsigned long rowsDecoded = 0;   // rows whose image data libpng has fully inflated (user transform calls)
    unsigned long expectedRows = 0;  // rows with data (all passes of an interlaced image); 0 until known
    std::string tooLarge;            // the pixel-limit message, raised after libpng's frames are left
};

void pngError(png_structp png, png_const_charp msg) {
    static_cast<PngSource*>(png_get_error_ptr(png))->message = msg;
    png_longjmp(png, 1);
}

void pngWarning(png_structp, png_const_charp) {}  // PIL is silent where libpng only warns

void pngRead(png_structp png, png_bytep out, size_t n) {
    auto* src = static_cast<PngSource*>(png_get_io_ptr(png));
    if (src->data->size() - src->pos < n) png_error(png, "image file is truncated");
    std::memcpy(out, src->data->data() + src->pos, n);
    src->pos += n;
    // Feed zlib as PIL does: blocks of up to 64 KiB of image data (never more than the IDAT chunk holds, the
    // file holds), each inflated row by row. A broken stream is then refused exactly when PIL refuses it, and a file
    // cut after its last row (zlib checksum, IDAT CRC, IEND missing) is read as far as PIL reads it.
    png_set_compression_buffer_size(png, std::clamp<size_t>(src->data->size() - src->pos, 1, 65536));
}

void pngCountRow(png_structp png, png_row_infop, png_bytep) {
    ++static_cast<PngSource*>(png_get_error_ptr(png))->rowsDecoded;
}

uint32_t be32(uint8_t const* p) {
    return (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) | (uint32_t{p[2]} << 8) | uint32_t{p[3]};
}

// PIL checks every chunk before the first IDAT (name made of letters/digits/_, complete, CRC) and ignores the
// IDAT CRCs; libpng is told to ignore CRCs below, so the chunks before IDAT are checked here the same way.
void checkPngHeaderChunks(std::string const& path, std::vector<uint8_t> const& d) {
    size_t pos = 8;
    auto broken = [&](std::string const& why) {
        throw ImageError("image " + path + " could not be read (broken PNG file: " + why +
                         "); is it a complete, uncorrupted PNG file?");
    };
    for (;;) {
        if (d.size() - pos < 8) broken("file ends early");
        uint32_t const len = be32(d.data() + pos);
        char name[5] = {0};
        std::memcpy(name, d.data() + pos + 4, 4);
        for (int i = 0; i < 4; ++i)
            if (!std::isalnum(static_cast<unsigned char>(name[i])) && name[i] != '_')
                broken("bad chunk name");
        if (std::strcmp(name, "IDAT") == 0) return;
        if (d.size() - pos - 8 < static_cast<size_t>(len) + 4) broken(std::string("file ends early in ") + name);
        uint32_t const crc = static_cast<uint32_t>(crc32(crc32(0L, Z_NULL, 0), d.data() + pos + 4, len + 4));
        if (crc != be32(d.data() + pos + 8 + len)) broken(std::string("bad checksum in ") + name);
        pos += 12 + static_cast<size_t>(len);
    }
}

Image loadPng(std::string const& path, std::vector<uint8_t> const& data) {
    checkPngHeaderChunks(path, data);
    PngSource src{&data, 0, path, "", 0, 0, ""};
    png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, &src, pngError, pngWarning);
    if (!png) throw std::bad_alloc();
    png_infop info = png_create_info_struct(png);
    Image out;
    std::vector<png_bytep> rows;
    if (setjmp(png_jmpbuf(png))) {
        png_destroy_read_struct(&png, &info, nullptr);
        if (!src.tooLarge.empty()) throw ImageError(src.tooLarge);
        // PIL stops reading once every row is decoded: what follows them is not checked
        if (src.expectedRows > 0 && src.rowsDecoded >= src.expectedRows) return out;
        throw ImageError("image " + path + " could not be read (" + src.message +
                         "); is it a complete, uncorrupted PNG file?");
    }
    if (!info) png_error(png, "out of memory");
    png_set_read_fn(png, &src, pngRead);
    png_set_crc_action(png, PNG_CRC_QUIET_USE, PNG_CRC_QUIET_USE);
    png_set_user_limits(png, 0x7fffffff, 0x7fffffff);  // PIL limits the pixel count only (pixelLimitError)
    png_set_chunk_malloc_max(png, 0);
    // ancillary chunks change nothing in PIL's RGB bytes (gamma, ICC, sBIT, tRNS, background are ignored)
    static png_byte const ignored[] = "bKGD\0cHRM\0eXIf\0gAMA\0hIST\0iCCP\0iTXt\0oFFs\0pCAL\0pHYs\0sBIT\0sCAL\0"
                                      "sPLT\0sRGB\0tEXt\0tIME\0tRNS\0zTXt";
    png_set_keep_unknown_chunks(png, PNG_HANDLE_CHUNK_NEVER, nullptr, 0);
    png_set_keep_unknown_chunks(png, PNG_HANDLE_CHUNK_NEVER, ignored, 18);
    png_read_info(png, info);
    png_uint_32 const w = png_get_image_width(png, info), h = png_get_image_height(png, info);
    int const depth = png_get_bit_depth(png, info), type = png_get_color_type(png, info);
    src.tooLarge = pixelLimitError(path, w, h);
    if (!src.tooLarge.empty()) png_error(png, "too large");
    if (depth == 16) png_set_strip_16(png);  // the high byte, as PIL's RGB;16B/LA;16B/... rawmodes
    if (type == PNG_COLOR_TYPE_PALETTE) png_set_palette_to_rgb(png);
    if (type == PNG_COLOR_TYPE_GRAY && depth < 8) png_set_expand_gray_1_2_4_to_8(png);  // x255, x85, x17
    if (type == PNG_COLOR_TYPE_GRAY || type == PNG_COLOR_TYPE_GRAY_ALPHA) png_set_gray_to_rgb(png);
    if (type & PNG_COLOR_MASK_ALPHA) png_set_strip_alpha(png);  // dropped, not composited
    png_set_read_user_transform_fn(png, pngCountRow);
    int const passes = png_set_interlace_handling(png);
    png_read_update_info(png, info);
    if (png_get_channels(png, info) != 3 || png_get_bit_depth(png, info) != 8 ||
        png_get_rowbytes(png, info) != static_cast<size_t>(w) * 3)
        png_error(png, "unexpected libpng output layout");
    unsigned long expected = 0;
    if (passes > 1) {
        for (int p = 0; p < 7; ++p)
            if (PNG_PASS_COLS(w, p) > 0) expected += PNG_PASS_ROWS(h, p);
    } else {
        expected = h;
    }
    out.width = static_cast<int>(w);
    out.height = static_cast<int>(h);
    out.rgb.resize(static_cast<size_t>(w) * h * 3);
    rows.resize(h);
    for (png_uint_32 y = 0; y < h; ++y) rows[y] = out.rgb.data() + static_cast<size_t>(y) * w * 3;
    src.expectedRows = expected;
    png_read_image(png, rows.data());  // no png_read_end: PIL ignores what follows the image data
    png_destroy_read_struct(&png, &info, nullptr);
    return out;
}

// ---- JPEG (libjpeg; CMYK/YCCK converted with PIL's formula) ----

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

// Warnings about corrupt data are tolerated (as PIL does), but a file that ends early is an error, as in PIL
// ("image file is truncated"), instead of libjpeg's gray fill.
void jpegEmitMessage(j_common_ptr cinfo, int level) {
    if (level < 0 && cinfo->err->msg_code == JWRN_JPEG_EOF) {
        auto* err = reinterpret_cast<JpegError*>(cinfo->err);
        std::strcpy(err->message, "image file is truncated");
        std::longjmp(err->jump, 1);
    }
}

// PIL's CMYK -> RGB (Convert.c cmyk2rgb) on Adobe-inverted samples ("CMYK;I"): with c = 255 - stored,
// nk = 255 - k, out = clip(nk - round(c * nk / 255)) where round(a*b/255) is ((t >> 8) + t) >> 8, t = a*b + 128.
inline uint8_t pilCmykChannel(int storedC, int storedK) {
    int const c = 255 - storedC, nk = storedK;  // nk = 255 - (255 - storedK)
    int const t = c * nk + 128;
    return static_cast<uint8_t>(std::clamp(nk - (((t >> 8) + t) >> 8), 0, 255));
}

Image loadJpeg(std::string const& path, std::vector<uint8_t> const& data) {
    jpeg_decompress_struct cinfo;
    JpegError err;
    cinfo.err = jpeg_std_error(&err.mgr);
    err.mgr.error_exit = jpegErrorExit;
    err.mgr.emit_message = jpegEmitMessage;
    Image out;
    std::vector<uint8_t> line;
    if (setjmp(err.jump)) {
        jpeg_destroy_decompress(&cinfo);
        throw ImageError("image " + path + " could not be read (" + err.message +
                         "); is it a complete, uncorrupted JPEG file?");
    }
    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, data.data(), static_cast<unsigned long>(data.size()));
    jpeg_read_header(&cinfo, TRUE);
    int const comps = cinfo.num_components;
    if (comps != 1 && comps != 3 && comps != 4) {
        jpeg_destroy_decompress(&cinfo);
        throw ImageError("image " + path + " is a JPEG file with " + std::to_string(comps) +
                         " components; only grayscale, RGB/YCbCr and CMYK/YCCK JPEGs are read: convert it to PNG or "
                         "an RGB JPEG first");
    }
    cinfo.out_color_space = comps == 1 ? JCS_GRAYSCALE : comps == 3 ? JCS_RGB : JCS_CMYK;
    std::string const tooLarge = pixelLimitError(path, cinfo.image_width, cinfo.image_height);
    if (!tooLarge.empty()) {
        jpeg_destroy_decompress(&cinfo);
        throw ImageError(tooLarge);
    }
    jpeg_start_decompress(&cinfo);
    out.width = static_cast<int>(cinfo.output_width);
    out.height = static_cast<int>(cinfo.output_height);
    out.rgb.resize(static_cast<size_t>(out.width) * out.height * 3);
    line.resize(static_cast<size_t>(out.width) * cinfo.output_components);
    while (cinfo.output_scanline < cinfo.output_height) {
        uint8_t* dst = out.rgb.data() + static_cast<size_t>(cinfo.output_scanline) * out.width * 3;
        JSAMPROW row = comps == 3 ? dst : line.data();
        jpeg_read_scanlines(&cinfo, &row, 1);
        if (comps == 1) {
            for (int x = 0; x < out.width; ++x) dst[3 * x] = dst[3 * x + 1] = dst[3 * x + 2] = line[x];
        } else if (comps == 4) {
            for (int x = 0; x < out.width; ++x)
                for (int c = 0; c < 3; ++c) dst[3 * x + c] = pilCmykChannel(line[4 * x + c], line[4 * x + 3]);
        }
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
    std::vector<uint8_t> const data = readFile(path);
    std::string const format = sniffFormat(data);
    if (format == "PNG") return loadPng(path, data);
    if (format == "JPEG") return loadJpeg(path, data);
    if (format == "empty") throw ImageError("image " + path + " is empty (0 bytes)");
    std::string const what = format.empty() ? "not a PNG or JPEG file (unrecognised content: " + hexHead(data) + ")"
                                            : "a " + format + " file";
    throw ImageError("image " + path + " is " + what + "; only PNG and JPEG images are accepted (told by content, " +
                     "not by name): convert it to PNG or JPEG first");
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
    if (nums.count("img_size")) {
        auto const& size = nums["img_size"];
        if (size.size() == 2 && size[0] != size[1])
            throw std::invalid_argument("preprocess JSON: img_size [H, W] is a non-square input (a backbone export); "
                                        "the C++ runtime takes square images only: run it with cvig run (Python)");
        if (size.empty() || size.size() > 2) throw std::invalid_argument("preprocess JSON: img_size needs 1 or 2 values");
        spec.imgSize = static_cast<int>(size[0]);
    }
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
