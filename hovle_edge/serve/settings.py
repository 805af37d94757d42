"""What `hovle-edge serve` is told on its command line, and the error a request can meet."""

from __future__ import annotations

import os
from dataclasses import dataclass

from hovle_edge.errors import InputError


@dataclass
class ServeSettings:
    model_dir: str
    host: str = "127.0.0.1"  # loopback unless the user asks for more
    port: int = 8000
    api_key: str | None = None  # when set, /v1/* needs `Authorization: Bearer <api_key>`
    model_name: str | None = None  # the id clients send as `model` (default: the model folder's name)
    backend: str = "onnxruntime"
    device: str = "cpu"
    threads: int | None = None
    allow_local_images: str | None = None  # a folder whose files may be named as image URLs
    slots: int = 4  # conversations the model thread advances in turn; more requests wait in the queue
    max_queue: int = 64  # requests waiting beyond this are answered 503
    cache_mb: float = 256.0  # KV snapshots of earlier prompts (the prefix cache)
    image_cache_mb: float = 64.0  # vision outputs by image hash
    max_body_mb: float = 20.0
    max_image_mb: float = 10.0  # one image's encoded bytes

    def __post_init__(self):
        if self.model_name is None:
            self.model_name = os.path.basename(os.path.normpath(self.model_dir))
        if self.allow_local_images is not None:
            if not os.path.isdir(self.allow_local_images):
                raise InputError(f"--allow-local-images {self.allow_local_images}: no such folder")
            self.allow_local_images = os.path.realpath(self.allow_local_images)
        numbers = {"slots": self.slots, "max_queue": self.max_queue, "max_body_mb": self.max_body_mb,
                   "max_image_mb": self.max_image_mb}
        for name, value in numbers.items():
            if not value > 0:
                raise InputError(f"serve setting {name} must be positive (got {value})")
        if self.cache_mb < 0 or self.image_cache_mb < 0:
            raise InputError(f"cache budgets must be >= 0 MB (got {self.cache_mb} and {self.image_cache_mb})")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)

    @property
    def max_image_bytes(self) -> int:
        return int(self.max_image_mb * 2**20)


class RequestError(InputError):
    """A request the server refuses, with the HTTP status and OpenAI error fields to answer it with."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.param = param
        self.code = code

    def body(self) -> dict:
        kind = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
                503: "server_busy"}.get(self.status, "invalid_request_error")
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}}
