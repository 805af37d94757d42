"""InternVL's dynamic high-resolution preprocessing (DynProcess) in numpy + pillow: choose a tile
grid by aspect ratio, resize, cut row-major tiles, add a thumbnail, normalize. Also the loading of
images as users have them (any mode, EXIF rotation) with clear errors for files that are not.
Torch-free: the trainers, the exporter and the runtime all use it."""

from __future__ import annotations

import os
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from hovle_edge.errors import InputError

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
MAX_PIXELS = 100_000_000  # a larger image is refused as a likely decompression bomb


def candidate_grids(min_num: int, max_num: int) -> list[tuple[int, int]]:
    """(columns, rows) with min_num <= columns * rows <= max_num, ordered by area as InternVL orders them."""
    grids = {(i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
             if min_num <= i * j <= max_num}
    return sorted(grids, key=lambda g: g[0] * g[1])


def choose_grid(width: int, height: int, min_num: int = 1, max_num: int = 12, image_size: int = 448) -> tuple[int, int]:
    """The (columns, rows) grid whose aspect ratio is closest to the image's. On a tie the later
    (larger) grid wins when the image has more than half the pixels that grid would hold."""
    if not 1 <= min_num <= max_num:
        raise InputError(f"tile limits must satisfy 1 <= min <= max (got min {min_num}, max {max_num})")
    aspect = width / height
    best, best_diff = (1, 1), float("inf")
    for columns, rows in candidate_grids(min_num, max_num):
        diff = abs(aspect - columns / rows)
        if diff < best_diff:
            best, best_diff = (columns, rows), diff
        elif diff == best_diff and width * height > 0.5 * image_size * image_size * columns * rows:
            best = (columns, rows)
    return best


def dynamic_tiles(image: Image.Image, min_num: int = 1, max_num: int = 12, image_size: int = 448,
                  use_thumbnail: bool = True) -> list[Image.Image]:
    """The tiles of an RGB image, row-major, plus a thumbnail of the whole image when there is more than one."""
    columns, rows = choose_grid(image.width, image.height, min_num, max_num, image_size)
    resized = image.resize((image_size * columns, image_size * rows), Image.Resampling.BICUBIC)
    tiles = [resized.crop((c * image_size, r * image_size, (c + 1) * image_size, (r + 1) * image_size))
             for r in range(rows) for c in range(columns)]
    if use_thumbnail and len(tiles) > 1:
        tiles.append(image.resize((image_size, image_size), Image.Resampling.BICUBIC))
    return tiles


def normalize(tile: Image.Image) -> np.ndarray:
    """RGB tile -> float32 [3, S, S], ImageNet mean/std."""
    pixels = np.asarray(tile, dtype=np.float32) / 255.0
    return ((pixels - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)


def preprocess_image(source, min_num: int = 1, max_num: int = 12, image_size: int = 448,
                     use_thumbnail: bool = True) -> np.ndarray:
    """A path or PIL image -> pixel_values float32 [tiles, 3, image_size, image_size]."""
    image = source if isinstance(source, Image.Image) else load_image(source)
    image = to_rgb(image)
    tiles = dynamic_tiles(image, min_num, max_num, image_size, use_thumbnail)
    return np.stack([normalize(t) for t in tiles]).astype(np.float32)


def load_image(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open, fully decode and upright (EXIF) an image file; every failure is an InputError naming the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
            if image.width * image.height > max_pixels:
                raise InputError(f"{path}: {image.width}x{image.height} pixels is over the limit of "
                                 f"{max_pixels} (a decompression bomb?)")
            image.load()
            return ImageOps.exif_transpose(image)
    except InputError:
        raise
    except Image.DecompressionBombError as e:
        raise InputError(f"{path}: refused as a decompression bomb ({e})") from e
    except UnidentifiedImageError as e:
        raise InputError(f"{path}: not an image file pillow can read") from e
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data surfaces as these
        raise InputError(f"{path}: corrupt or truncated image ({e})") from e


def to_rgb(image: Image.Image) -> Image.Image:
    """Any pillow mode -> RGB: transparency composited on white, 16-bit and float scaled to 8 bits."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        image = Image.fromarray(np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")

