"""DynProcess: grid choice by hand-computed cases, pixel values against a plain pillow + numpy
computation, and the images found in the wild, good and bad."""

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from hovle_edge.errors import InputError
from hovle_edge.preprocess import choose_grid, dynamic_tiles, load_image, preprocess_image

# (width, height, min, max) -> (columns, rows), each worked out from the rule by hand.
GRID_CASES = [
    ((448, 448, 1, 12), (1, 1)),     # ratio 1: (2,2), (3,3) tie, but the image is too small for them
    ((896, 896, 1, 12), (2, 2)),     # area 802816 > 0.5*448^2*4: the tie goes to (2,2), not (3,3)
    ((1344, 1344, 1, 12), (3, 3)),   # area 1806336 > 0.5*448^2*9
    ((800, 600, 1, 12), (4, 3)),     # exact 4:3
    ((600, 300, 1, 12), (2, 1)),     # 2:1; (4,2) ties but the image is small
    ((1792, 896, 1, 12), (4, 2)),    # 2:1 and large: (4,2)
    ((500, 200, 1, 6), (2, 1)),      # 2.5 lies halfway between (2,1) and (3,1): small image keeps (2,1)
    ((2500, 1000, 1, 6), (3, 1)),    # same ratio, large image takes the later grid
    ((10000, 40, 1, 12), (12, 1)),   # extreme aspect ratios
    ((40, 10000, 1, 12), (1, 12)),
    ((10000, 40, 1, 1), (1, 1)),     # max_num 1
    ((448, 448, 2, 12), (2, 2)),     # min_num 2 excludes (1,1)
    ((1, 1, 1, 12), (1, 1)),
]


@pytest.mark.parametrize("args,expected", GRID_CASES)
def test_choose_grid(args, expected):
    assert choose_grid(*args) == expected


def test_bad_tile_limits():
    with pytest.raises(InputError, match="1 <= min <= max"):
        choose_grid(10, 10, 3, 2)


def gradient_image(width, height):
    x = np.linspace(0, 255, width)[None, :, None]
    y = np.linspace(0, 255, height)[:, None, None]
    rgb = np.concatenate([x + 0 * y, y + 0 * x, (x + y) / 2], axis=2)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def test_pixels_equal_a_plain_computation():
    image = gradient_image(150, 70)  # 150/70 = 2.14: grid (2, 1) among max 6
    pixels = preprocess_image(image, max_num=6, image_size=56)
    assert pixels.shape == (3, 3, 56, 56) and pixels.dtype == np.float32  # 2 tiles + thumbnail
    resized = np.asarray(image.resize((112, 56), Image.BICUBIC), dtype=np.float64) / 255
    thumb = np.asarray(image.resize((56, 56), Image.BICUBIC), dtype=np.float64) / 255
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    for tile, plain in ((0, resized[:, :56]), (1, resized[:, 56:]), (2, thumb)):
        for c in range(3):
            expected = (plain[:, :, c] - mean[c]) / std[c]
            assert np.abs(pixels[tile, c] - expected).max() < 1e-5


def test_single_tile_has_no_thumbnail():
    assert len(dynamic_tiles(gradient_image(50, 50), image_size=56)) == 1


def save(image, path, **kwargs):
    image.save(path, **kwargs)
    return str(path)


def test_modes_in_the_wild(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red -> white
    out = load_and_pixel(save(rgba, tmp_path / "a.png"))
    assert np.allclose(out, 255)
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([10, 20, 30] * 256)
    assert np.allclose(load_and_pixel(save(palette, tmp_path / "p.png")), [10, 20, 30])
    gray = Image.new("L", (8, 8), 77)
    assert np.allclose(load_and_pixel(save(gray, tmp_path / "g.png")), 77)
    sixteen = Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16))
    assert np.allclose(load_and_pixel(save(sixteen, tmp_path / "s.png")), 255)
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # red in CMYK
    assert np.allclose(load_and_pixel(save(cmyk, tmp_path / "c.jpg", quality=100)), [255, 0, 0], atol=3)


def test_exif_orientation_applied(tmp_path):
    image = Image.new("RGB", (20, 10), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = save(image, tmp_path / "r.jpg", exif=exif)
    assert load_image(path).size == (10, 20)


def test_tiny_and_extreme_images(tmp_path):
    assert preprocess_image(save(Image.new("RGB", (1, 1)), tmp_path / "1.png"), image_size=56).shape == (1, 3, 56, 56)
    long = preprocess_image(save(Image.new("RGB", (10000, 40)), tmp_path / "l.png"), image_size=56)
    assert long.shape == (13, 3, 56, 56)  # 12 x 1 tiles and a thumbnail


def load_and_pixel(path):
    from hovle_edge.preprocess import to_rgb

    return np.asarray(to_rgb(load_image(path)))[0, 0].astype(np.float64)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="no such image file"):
        preprocess_image(str(tmp_path / "nope.png"))


def test_not_an_image(tmp_path):
    (tmp_path / "notes.txt").write_text("hello, I am text")
    with pytest.raises(InputError, match="notes.txt: not an image file pillow can read"):
        preprocess_image(str(tmp_path / "notes.txt"))


def test_truncated_file(tmp_path):
    path = save(gradient_image(200, 200), tmp_path / "t.jpg", quality=95)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(InputError, match="t.jpg: corrupt or truncated image"):
        preprocess_image(path)


def test_corrupt_file(tmp_path):
    path = save(gradient_image(64, 64), tmp_path / "x.png")
    data = bytearray(open(path, "rb").read())
    data[60:120] = b"\x00" * 60  # damage the compressed pixel data
    open(path, "wb").write(bytes(data))
    with pytest.raises(InputError, match="x.png: corrupt or truncated image"):
        preprocess_image(path)


def test_decompression_bomb(tmp_path):
    # A valid PNG header that claims 100000 x 100000 pixels: refused before any decoding.
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b"")
    (tmp_path / "bomb.png").write_bytes(png)
    with pytest.raises(InputError, match="bomb.png: .*(decompression bomb)"):
        preprocess_image(str(tmp_path / "bomb.png"))
