"""One image decoding in Python and C++: PIL's conversion to 8-bit RGB, for every PNG/JPEG mode, and one accepted set.

Each case writes a small image (PIL where it can, a hand-made PNG writer where PIL cannot: 2/4-bit gray, 16-bit
RGB/RGBA/gray+alpha, Adam7 interlacing, tRNS, gAMA) and checks
- Python ``load_image`` against the 8-bit rule computed here with numpy from the written array,
- the C++ decoder (``test_image --decode``, the cvig::loadImage bytes) against Python byte for byte,
- ``cvig_preprocess`` against ``preprocess_pil(load_image(...))`` within two 8-bit levels.
"""
from __future__ import annotations

import json
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import clustervig
from clustervig.preprocess import ImageError, load_batch, load_image, preprocess_pil, transform_spec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_runtime_cpp import build_runtime  # noqa: E402  (one C++ build per session, shared with that file)

H, W = 19, 27


# ---- a tiny PNG writer (zlib + struct) for what PIL cannot write ----

def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _scanline(row: np.ndarray, depth: int) -> bytes:
    if depth == 16:
        return row.astype(">u2").tobytes()
    if depth == 8:
        return row.astype(np.uint8).tobytes()
    per = 8 // depth
    v = np.concatenate([row, np.zeros((-len(row)) % per, row.dtype)]).astype(np.uint8).reshape(-1, per)
    packed = np.zeros(len(v), np.uint8)
    for i in range(per):
        packed |= (v[:, i] << (8 - depth * (i + 1))).astype(np.uint8)
    return packed.tobytes()


ADAM7 = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]


def write_png(path: Path, arr: np.ndarray, depth: int, color_type: int, palette=None, trns: bytes = None,
              interlace: bool = False, extra: bytes = b"") -> Path:
    """arr: [H, W] or [H, W, C] samples (palette indices for colour type 3)."""
    h, w = arr.shape[:2]
    passes = ADAM7 if interlace else [(0, 0, 1, 1)]
    raw = b""
    for x0, y0, dx, dy in passes:
        sub = arr[y0::dy, x0::dx]
        if sub.size:
            raw += b"".join(b"\0" + _scanline(r.reshape(-1), depth) for r in sub)
    data = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, color_type, 0, 0, int(interlace)))
    data += extra
    if palette is not None:
        data += _chunk(b"PLTE", np.asarray(palette, np.uint8).tobytes())
    if trns is not None:
        data += _chunk(b"tRNS", trns)
    path.write_bytes(data + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b""))
    return path


def rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray.astype(np.uint8)[..., None], 3, axis=2)


def pil_cmyk_to_rgb(cmyk: np.ndarray) -> np.ndarray:
    """PIL's CMYK -> RGB (Convert.c cmyk2rgb): nk = 255 - K, out = clip(nk - MULDIV255(C, nk))."""
    a = cmyk.astype(np.int64)
    nk = 255 - a[..., 3:4]
    t = a[..., :3] * nk + 128
    return np.clip(nk - (((t >> 8) + t) >> 8), 0, 255).astype(np.uint8)


# ---- the cases: name -> writer(folder, rng) returning (path, expected 8-bit RGB) ----

def _png_rgb8(d, g):
    a = g.integers(0, 256, (H, W, 3), dtype=np.uint8)
    Image.fromarray(a).save(d / "x.png")
    return d / "x.png", a


def _png_gray8(d, g):
    a = g.integers(0, 256, (H, W), dtype=np.uint8)
    Image.fromarray(a).save(d / "x.png")
    return d / "x.png", rgb(a)


def _png_gray_low(depth):
    def make(d, g):
        a = g.integers(0, 2 ** depth, (H, W))
        return write_png(d / "x.png", a, depth, 0), rgb(a * {1: 255, 2: 85, 4: 17}[depth])
    return make


def _png_gray16(d, g):
    # a 16-bit scan whose high bytes are an 8-bit image decodes to exactly that image (PIL alone: all white)
    a8 = g.integers(0, 256, (H, W), dtype=np.uint16)
    a16 = (a8 << 8) | g.integers(0, 256, (H, W), dtype=np.uint16)
    Image.fromarray(a16).save(d / "x.png")  # PIL writes I;16 as a 16-bit grayscale PNG
    assert Image.open(d / "x.png").mode.startswith("I")
    return d / "x.png", rgb(a8)


def _png16(channels, color_type, interlace=False):
    def make(d, g):
        a8 = g.integers(0, 256, (H, W, channels), dtype=np.uint16)
        a16 = (a8 << 8) | g.integers(0, 256, (H, W, channels), dtype=np.uint16)
        write_png(d / "x.png", a16, 16, color_type, interlace=interlace)
        color = a8[..., :3] if channels >= 3 else np.repeat(a8[..., :1], 3, axis=2)
        return d / "x.png", color.astype(np.uint8)
    return make


def _png_la8(d, g):
    a = g.integers(0, 256, (H, W, 2), dtype=np.uint8)
    Image.fromarray(a).save(d / "x.png")
    assert Image.open(d / "x.png").mode == "LA"
    return d / "x.png", rgb(a[..., 0])


def _png_rgba8(d, g):
    a = g.integers(0, 256, (H, W, 4), dtype=np.uint8)
    a[..., 3] = g.integers(0, 2, (H, W)) * 255  # half the pixels fully transparent: dropped, not composited
    Image.fromarray(a).save(d / "x.png")
    return d / "x.png", a[..., :3]


def _png_palette(transparency: bool):
    def make(d, g):
        pal = g.integers(0, 256, (256, 3), dtype=np.uint8)
        idx = g.integers(0, 256, (H, W), dtype=np.uint8)
        im = Image.frombytes("P", (W, H), idx.tobytes())
        im.putpalette(pal.ravel().tolist())
        kw = {"transparency": bytes(g.integers(0, 256, 256, dtype=np.uint8))} if transparency else {}
        im.save(d / "x.png", **kw)
        return d / "x.png", pal[idx]
    return make


def _png_p4_trns(d, g):
    pal = g.integers(0, 256, (16, 3), dtype=np.uint8)
    idx = g.integers(0, 16, (H, W))
    return write_png(d / "x.png", idx, 4, 3, palette=pal, trns=bytes(range(0, 160, 20))), pal[idx]


def _png_interlaced(kind):
    def make(d, g):
        if kind == "rgb8":
            a = g.integers(0, 256, (H, W, 3))
            return write_png(d / "x.png", a, 8, 2, interlace=True), a.astype(np.uint8)
        if kind == "gray2":
            a = g.integers(0, 4, (H, W))
            return write_png(d / "x.png", a, 2, 0, interlace=True), rgb(a * 85)
        pal = g.integers(0, 256, (4, 3), dtype=np.uint8)
        idx = g.integers(0, 4, (H, W))
        return write_png(d / "x.png", idx, 2, 3, palette=pal, interlace=True), pal[idx]
    return make


def _png_gamma_trns(d, g):
    # gAMA 1.0 (libpng's simplified API would re-encode to sRGB) and an RGB tRNS colour: both ignored
    a = g.integers(0, 256, (H, W, 3))
    extra = _chunk(b"gAMA", struct.pack(">I", 100000)) + _chunk(b"sBIT", b"\x05\x05\x05")
    return write_png(d / "x.png", a, 8, 2, trns=struct.pack(">HHH", *map(int, a[0, 0])), extra=extra), a.astype(np.uint8)


def _photo(d):
    from skimage import data

    return data.astronaut()[100:100 + 3 * H, 150:150 + 3 * W]


def _jpeg_rgb(d, g):
    Image.fromarray(_photo(d)).save(d / "x.jpg", quality=90)
    return d / "x.jpg", np.asarray(Image.open(d / "x.jpg").convert("RGB"))


def _jpeg_progressive(d, g):
    Image.fromarray(_photo(d)).save(d / "x.jpg", quality=80, progressive=True, subsampling=0)
    return d / "x.jpg", np.asarray(Image.open(d / "x.jpg").convert("RGB"))


def _jpeg_gray(d, g):
    Image.fromarray(_photo(d)[..., 1]).save(d / "x.jpg")
    gray = Image.open(d / "x.jpg")
    assert gray.mode == "L"
    return d / "x.jpg", rgb(np.asarray(gray))


def _jpeg_cmyk(d, g):
    p = _photo(d)
    cmyk = np.concatenate([255 - p, g.integers(0, 256, p.shape[:2] + (1,), dtype=np.uint8)], axis=2)
    Image.frombytes("CMYK", (p.shape[1], p.shape[0]), np.ascontiguousarray(cmyk).tobytes()).save(d / "x.jpg")
    im = Image.open(d / "x.jpg")
    assert im.mode == "CMYK"
    return d / "x.jpg", pil_cmyk_to_rgb(np.asarray(im))  # the formula applied to PIL's (inverted) CMYK samples


CASES = {
    "png_rgb8": _png_rgb8,
    "png_gray8": _png_gray8,
    "png_gray1": _png_gray_low(1),
    "png_gray2": _png_gray_low(2),
    "png_gray4": _png_gray_low(4),
    "png_gray16": _png_gray16,
    "png_rgb16": _png16(3, 2),
    "png_rgba16": _png16(4, 6),
    "png_gray_alpha16": _png16(2, 4),
    "png_la8": _png_la8,
    "png_rgba8": _png_rgba8,
    "png_palette": _png_palette(False),
    "png_palette_transparency": _png_palette(True),
    "png_palette4_trns": _png_p4_trns,
    "png_interlaced_rgb8": _png_interlaced("rgb8"),
    "png_interlaced_gray2": _png_interlaced("gray2"),
    "png_interlaced_palette2": _png_interlaced("p2"),
    "png_interlaced_rgb16": _png16(3, 2, interlace=True),
    "png_gamma_sbit_trns_ignored": _png_gamma_trns,
    "jpeg_rgb": _jpeg_rgb,
    "jpeg_progressive_444": _jpeg_progressive,
    "jpeg_gray": _jpeg_gray,
    "jpeg_cmyk": _jpeg_cmyk,
}


@pytest.fixture(scope="module")
def cpp(tmp_path_factory):
    return build_runtime(tmp_path_factory)


def cpp_decode(build: Path, image: Path, out: Path):
    """The C++ decoder's bytes (cvig::loadImage) as [H, W, 3] uint8, or its error text."""
    r = subprocess.run([str(build / "test_image"), "--decode", str(image), str(out)], capture_output=True, text=True)
    if r.returncode != 0:
        return r.stderr
    with Image.open(out) as im:
        return np.asarray(im.convert("RGB")).copy()


SPEC = {**transform_spec(clustervig.get_config("cvig_digits")), "normalize_in_graph": False}


@pytest.mark.parametrize("case", list(CASES))
def test_mode_decodes_like_pil_in_python_and_cpp(cpp, tmp_path, case):
    path, expected = CASES[case](tmp_path, np.random.default_rng(sorted(CASES).index(case)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing leaks to the user (e.g. PIL's palette-transparency hint)
        img = load_image(path)
    py = np.asarray(img)
    assert img.mode == "RGB" and py.dtype == np.uint8 and py.shape == expected.shape
    assert np.array_equal(py, expected), f"{case}: Python differs from the 8-bit rule by {np.abs(py.astype(int) - expected).max()}"
    dec = cpp_decode(cpp, path, tmp_path / "dec.ppm")
    assert not isinstance(dec, str), dec
    assert np.array_equal(dec, py), f"{case}: C++ decoding differs from Python by {np.abs(dec.astype(int) - py).max()}"
    # and the whole preprocessing: C++ within two 8-bit levels of Python (PIL resamples in fixed point)
    (tmp_path / "spec.json").write_text(json.dumps(SPEC))
    r = subprocess.run([str(cpp / "cvig_preprocess"), str(path), str(tmp_path / "spec.json"), str(tmp_path / "o.bin")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    s = SPEC["img_size"]
    out = np.fromfile(tmp_path / "o.bin", dtype=np.float32).reshape(3, s, s)
    ref = preprocess_pil(img, SPEC).numpy()
    assert np.abs(out - ref).max() <= 2.01 / 255 / min(SPEC["std"])


def test_sixteen_bit_digit_scan_classifies_like_the_eight_bit_scan(tmp_path):
    from clustervig.data import digits_uint8
    from clustervig.train import WEIGHTS_DIR

    raw, labels = digits_uint8()
    i = int(np.flatnonzero(labels == 3)[0])
    Image.fromarray(raw[i]).save(tmp_path / "three8.png")
    Image.fromarray(raw[i].astype(np.uint16) * 257).save(tmp_path / "three16.png")  # what a 16-bit scanner writes
    assert Image.open(tmp_path / "three16.png").mode.startswith("I")
    spec = transform_spec(clustervig.get_config("cvig_digits"))
    x = load_batch([tmp_path / "three8.png", tmp_path / "three16.png"], spec)
    assert torch.equal(x[0], x[1])
    model = clustervig.create_model("cvig_digits", pretrained=WEIGHTS_DIR / "cvig_digits.pth").eval()
    with torch.inference_mode():
        logits = model(x)
    assert torch.equal(logits[0], logits[1])
    assert int(logits[1].argmax()) == 3


def _both_refuse(cpp, path: Path, tmp_path: Path, *needles: str):
    with pytest.raises(ImageError) as exc:
        load_image(path)
    dec = cpp_decode(cpp, path, tmp_path / "dec.ppm")
    assert isinstance(dec, str), f"C++ accepted {path}"
    for msg in (str(exc.value), dec):
        assert str(path) in msg, msg
        for n in needles:
            assert n in msg, msg
    return str(exc.value), dec


@pytest.mark.parametrize("fmt,name,save", [
    ("WebP", "photo.webp", {"format": "WEBP"}),
    ("BMP", "photo.bmp", {"format": "BMP"}),
    ("GIF", "photo.gif", {"format": "GIF"}),
    ("TIFF", "photo.tif", {"format": "TIFF"}),
    ("GIF", "disguised.png", {"format": "GIF"}),  # by content, not by name
])
def test_other_formats_are_refused_alike(cpp, tmp_path, fmt, name, save):
    path = tmp_path / name
    Image.fromarray(np.full((8, 8, 3), 100, np.uint8)).save(path, **save)
    _both_refuse(cpp, path, tmp_path, f"is a {fmt} file", "only PNG and JPEG", "convert it to PNG or JPEG")


def test_unknown_and_empty_files_are_refused_alike(cpp, tmp_path):
    (tmp_path / "notes.jpg").write_text("hello world")
    _both_refuse(cpp, tmp_path / "notes.jpg", tmp_path, "not a PNG or JPEG file (unrecognised content: 68 65 6c",
                 "convert it to PNG or JPEG")
    (tmp_path / "empty.png").write_bytes(b"")
    _both_refuse(cpp, tmp_path / "empty.png", tmp_path, "is empty")


def test_formats_are_told_by_content(cpp, tmp_path):
    a = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / "really_a.png.jpg", format="PNG")
    assert np.array_equal(np.asarray(load_image(tmp_path / "really_a.png.jpg")), a)
    assert np.array_equal(cpp_decode(cpp, tmp_path / "really_a.png.jpg", tmp_path / "d.ppm"), a)


def test_truncated_files_are_refused_alike(cpp, tmp_path):
    a = _photo(tmp_path)
    Image.fromarray(a).save(tmp_path / "full.jpg")
    Image.fromarray(a).save(tmp_path / "full.png")
    jpg, png = (tmp_path / "full.jpg").read_bytes(), (tmp_path / "full.png").read_bytes()
    # libjpeg alone only warns ("Premature end of JPEG file") and fills gray; PIL refuses: so do both now
    for cut in (2, len(jpg) // 2):
        (tmp_path / "cut.jpg").write_bytes(jpg[:-cut])
        _both_refuse(cpp, tmp_path / "cut.jpg", tmp_path, "could not be read", "truncated")
    for cut in (40, len(png) // 2):
        (tmp_path / "cut.png").write_bytes(png[:-cut])
        _both_refuse(cpp, tmp_path / "cut.png", tmp_path, "could not be read", "truncated")
    # PIL stops once every row is decoded: a PNG missing only its IEND (or IDAT CRC) is read by both, identically
    (tmp_path / "noend.png").write_bytes(png[:-14])
    assert np.array_equal(np.asarray(load_image(tmp_path / "noend.png")), a)
    assert np.array_equal(cpp_decode(cpp, tmp_path / "noend.png", tmp_path / "d.ppm"), a)
    # a damaged zlib stream (checksum) is refused by both
    bad = bytearray(png)
    bad[-17] ^= 0xFF  # last byte of the zlib checksum, just before the IDAT CRC and IEND
    (tmp_path / "crc.png").write_bytes(bytes(bad))
    _both_refuse(cpp, tmp_path / "crc.png", tmp_path, "could not be read")


def test_decompression_bomb_limit_is_one_clear_message(cpp, tmp_path, monkeypatch, capsys):
    # a header claiming 20000 x 10000 pixels (above 2 x PIL.Image.MAX_IMAGE_PIXELS) is refused before decoding
    huge = tmp_path / "huge.png"
    huge.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 10000, 8, 0, 0, 0, 0))
                     + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _chunk(b"IEND", b""))
    _both_refuse(cpp, huge, tmp_path, "has 200000000 pixels", "more than the limit of 178956970 pixels",
                 "downscale it")
    # patched limits (cheap): between MAX_IMAGE_PIXELS and twice that, a one-line note instead of PIL's warning
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    Image.fromarray(np.zeros((10, 15), np.uint8)).save(tmp_path / "big.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        img = load_image(tmp_path / "big.png")
    assert img.size == (15, 10)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has 150 pixels (15 x 10)" in err and "decompression-bomb threshold of 100" in err
    Image.fromarray(np.zeros((10, 30), np.uint8)).save(tmp_path / "bigger.png")
    with pytest.raises(ImageError, match=r"bigger.png has 300 pixels, more than the limit of 200 pixels"):
        load_image(tmp_path / "bigger.png")
