// Unit tests of the TensorRT-free runtime parts (run by ctest in CI).
// `test_image --decode IMAGE OUT.ppm` instead writes the decoded 8-bit RGB of IMAGE as a binary PPM (P6), so
// tests/test_image_modes.py can compare the decoded bytes with Python's load_image exactly.
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <string>

#include "cvig/image.h"

#include "check.h"

template <typename F>
static bool throwsWith(F f, std::string const& needle) {
    try {
        f();
    } catch (std::exception const& e) {
        return std::string(e.what()).find(needle) != std::string::npos;
    }
    return false;
}

static int decodeToPpm(char const* image, char const* out) {
    try {
        cvig::Image img = cvig::loadImage(image);
        std::ofstream f(out, std::ios::binary);
        f << "P6\n" << img.width << " " << img.height << "\n255\n";
        f.write(reinterpret_cast<char const*>(img.rgb.data()), static_cast<std::streamsize>(img.rgb.size()));
        return f ? 0 : 1;
    } catch (std::exception const& e) {
        std::cerr << "error: " << e.what() << "\n";
        return 1;
    }
}

int main(int argc, char** argv) {
    if (argc == 4 && std::string(argv[1]) == "--decode") return decodeToPpm(argv[2], argv[3]);
    if (argc != 1) {
        std::cerr << "usage: test_image [--decode IMAGE OUT.ppm]\n";
        return 2;
    }
    // topK: descending, ties to the lower index
    float v[] = {0.5f, 2.0f, 2.0f, -1.0f, 3.0f};
    auto t = cvig::topK(v, 5, 3);
    CHECK(t.size() == 3 && t[0] == 4 && t[1] == 1 && t[2] == 2);

    // spec parsing, as cvig-export records it
    auto spec = cvig::parseSpec(R"({"img_size": 32, "crop_pct": 1.0, "interpolation": "bilinear",
        "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.25, 0.5], "normalize_in_graph": false})");
    CHECK(spec.imgSize == 32 && spec.cropPct == 1.0 && spec.interpolation == "bilinear");
    CHECK(spec.std[1] == 0.25f && !spec.normalizeInGraph);
    CHECK(throwsWith([] { cvig::parseSpec(R"({"interpolation": "lanczos"})"); }, "interpolation"));
    // a square [S, S] is S; a backbone's non-square [H, W] is refused (this runtime classifies square images)
    CHECK(cvig::parseSpec(R"({"img_size": [48, 48]})").imgSize == 48);
    CHECK(throwsWith([] { cvig::parseSpec(R"({"img_size": [800, 1344]})"); }, "non-square input"));

    // labels files as cvig-export writes them (CRLF and blank lines tolerated), count checked
    {
        std::ofstream("cvig_labels.txt") << "tench\r\n\n  goldfish \ngreat white shark\n";
        auto names = cvig::loadLabels("cvig_labels.txt", 3);
        CHECK(names.size() == 3 && names[0] == "tench" && names[1] == "goldfish" && names[2] == "great white shark");
        CHECK(throwsWith([] { cvig::loadLabels("cvig_labels.txt", 1000); }, "has 3 names but the model has 1000"));
        CHECK(throwsWith([] { cvig::loadLabels("/nonexistent/labels.txt"); }, "/nonexistent/labels.txt"));
        CHECK(cvig::dirName("out/model_fp16.plan") == "out/" && cvig::dirName("model.plan").empty());
        std::remove("cvig_labels.txt");
    }

    // a constant image stays constant through resize + crop + normalise
    cvig::Image img;
    img.width = 40;
    img.height = 30;
    img.rgb.assign(40 * 30 * 3, 128);
    auto chw = cvig::preprocess(img, spec);
    CHECK(chw.size() == 3u * 32 * 32);
    CHECK(std::fabs(chw[0] - (128 / 255.0f - 0.5f) / 0.5f) < 1e-6f);
    CHECK(std::fabs(chw[32 * 32 + 5] - (128 / 255.0f - 0.5f) / 0.25f) < 1e-6f);

    // downsampling a 2-pixel-period stripe pattern by 2 averages it (antialiasing support scaling)
    cvig::Image stripes;
    stripes.width = 8;
    stripes.height = 2;
    for (int y = 0; y < 2; ++y)
        for (int x = 0; x < 8; ++x)
            for (int c = 0; c < 3; ++c) stripes.rgb.push_back(x % 2 ? 200 : 0);
    auto small = cvig::resize(stripes, 4, 2, "bilinear");
    CHECK(small.rgb[3 * 1] == 100 && small.rgb[3 * 2] == 100);

    // errors name the file
    CHECK(throwsWith([] { cvig::loadImage("/nonexistent/x.png"); }, "/nonexistent/x.png"));
    {
        std::ofstream("cvig_trunc.png", std::ios::binary) << "\x89PNG\r\n\x1a\n\0\0";
    }
    CHECK(throwsWith([] { cvig::loadImage("cvig_trunc.png"); }, "cvig_trunc.png"));
    {
        std::ofstream("cvig_text.jpg") << "hello";
        std::ofstream("cvig_anim.png") << "GIF89a\x01\0\x01\0";
        std::ofstream("cvig_empty.jpg");
        std::ofstream("cvig_photo.webp", std::ios::binary) << std::string("RIFF\0\0\0\0WEBPVP8 ", 16);
    }
    // one accepted set, told by content: other formats are named with the fix
    CHECK(throwsWith([] { cvig::loadImage("cvig_text.jpg"); }, "not a PNG or JPEG file (unrecognised content: 68 65"));
    CHECK(throwsWith([] { cvig::loadImage("cvig_text.jpg"); }, "convert it to PNG or JPEG"));
    CHECK(throwsWith([] { cvig::loadImage("cvig_anim.png"); }, "cvig_anim.png is a GIF file; only PNG and JPEG"));
    CHECK(throwsWith([] { cvig::loadImage("cvig_photo.webp"); }, "is a WebP file"));
    CHECK(throwsWith([] { cvig::loadImage("cvig_empty.jpg"); }, "cvig_empty.jpg is empty"));
    // a JPEG that ends early is an error (libjpeg alone would fill gray and warn)
    {
        std::ofstream("cvig_trunc.jpg", std::ios::binary) << std::string("\xff\xd8\xff\xe0\0\x10JFIF\0", 11);
    }
    CHECK(throwsWith([] { cvig::loadImage("cvig_trunc.jpg"); }, "cvig_trunc.jpg could not be read (image file is truncated)"));
    for (char const* f : {"cvig_trunc.png", "cvig_text.jpg", "cvig_anim.png", "cvig_empty.jpg", "cvig_photo.webp",
                          "cvig_trunc.jpg"})
        std::remove(f);

    if (failures) {
        std::cerr << failures << " check(s) failed\n";
        return 1;
    }
    std::cout << "all runtime image checks passed\n";
    return 0;
}
