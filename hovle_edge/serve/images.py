"""An `image_url` of a chat message -> its bytes (a `data:` URL always, a local file only inside the
folder the server was given) -> a hash and, unless the vision cache already holds that hash, pixel
values from the project's own preprocessing. Sizes are checked before anything is decoded."""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import tempfile
from dataclasses import dataclass

import numpy as np

from hovle_edge.errors import InputError
from hovle_edge.serve.settings import RequestError, ServeSettings

DATA_URL = re.compile(r"data:(?P<type>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*);base64,(?P<data>.*)", re.S)


@dataclass
class ImageInput:
    """One image of a request, in prompt order. `embeds` when the vision cache had it, else `pixel_values`."""

    digest: str  # sha256 of the encoded bytes: the key of both caches
    tiles: int
    embeds: np.ndarray | None = None  # [tiles * tokens_per_tile, hidden]
    pixel_values: np.ndarray | None = None  # [tiles, 3, size, size]


def image_bytes(url: str, settings: ServeSettings, where: str) -> tuple[bytes, str | None]:
    """The encoded image and, for a local file, its path. `where` names the message part in errors."""
    if not isinstance(url, str) or not url:
        raise RequestError(400, f"{where}: image_url.url must be a non-empty string", param=where)
    if url.startswith("data:"):
        return _data_url_bytes(url, settings, where), None
    if url.startswith(("http://", "https://")):
        raise RequestError(400, f"{where}: remote image URLs are not fetched; send the image as a data: URL",
                           param=where)
    if settings.allow_local_images is None:
        raise RequestError(400, f"{where}: only data: URLs are accepted (local files need the server's "
                                "--allow-local-images DIR)", param=where)
    path = _local_path(url, settings.allow_local_images, where)
    size = os.path.getsize(path)
    if size > settings.max_image_bytes:
        raise RequestError(413, f"{where}: {path} is {size} bytes, over the limit of {settings.max_image_bytes}",
                           param=where)
    with open(path, "rb") as f:
        return f.read(), path


def _data_url_bytes(url: str, settings: ServeSettings, where: str) -> bytes:
    match = DATA_URL.fullmatch(url)
    if match is None:
        raise RequestError(400, f"{where}: malformed data URL (expected data:image/...;base64,...)", param=where)
    encoded = match["data"]
    if len(encoded) * 3 // 4 > settings.max_image_bytes:  # refused before decoding anything
        raise RequestError(413, f"{where}: the image is about {len(encoded) * 3 // 4} bytes, over the limit of "
                                f"{settings.max_image_bytes}", param=where)
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(400, f"{where}: malformed data URL: the base64 data does not decode ({e})",
                           param=where) from e


def _local_path(url: str, root: str, where: str) -> str:
    path = url[len("file://"):] if url.startswith("file://") else url
    target = os.path.realpath(os.path.join(root, path))  # a relative name is taken inside the folder
    if os.path.commonpath([root, target]) != root:
        raise RequestError(400, f"{where}: {path} is outside the folder the server allows images from", param=where)
    if not os.path.isfile(target):
        raise RequestError(400, f"{where}: {path}: no such image file in the allowed folder", param=where)
    return target


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pixel_values(engine, data: bytes, path: str | None, where: str) -> np.ndarray:
    """Decode through preprocess.py (which refuses decompression bombs and corrupt files); bytes from
    a data URL go through a private temporary file, as preprocessing reads images from paths."""
    try:
        if path is not None:
            return engine.pixel_values(path)
        with tempfile.NamedTemporaryFile(prefix="hovle-serve-", suffix=".img") as f:
            f.write(data)
            f.flush()
            try:
                return engine.pixel_values(f.name)
            except InputError as e:
                raise InputError(str(e).replace(f.name, "the image")) from e
    except InputError as e:
        raise RequestError(400, f"{where}: {e}", param=where) from e
