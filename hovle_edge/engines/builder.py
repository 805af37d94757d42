"""`hovle-edge build`: one TensorRT engine per graph of an exported folder, with the optimization
profiles of profiles.py, for the GPU architectures flavours.build_targets picks (TensorRT for RTX
builds ahead of time, with no GPU, for named compute capabilities; standard TensorRT for the GPU it
runs on). fp16 comes from builder flags where TensorRT has them (10.x) or from an fp16 export where
networks are strongly typed (11, TensorRT for RTX); standard TensorRT reuses a timing cache across
builds, and an engine cache keeps an unchanged model from being rebuilt. The engine folder carries the manifest and
the tokenizer, so `run`, `chat` and `profile` take it as --model."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

from hovle_edge.engines import cache as engine_cache
from hovle_edge.engines.flavours import (AHEAD_OF_TIME, build_targets, capability_enum, import_flavour, pick_flavour,
                                         strongly_typed)
from hovle_edge.engines.profiles import graph_profiles, limits_for
from hovle_edge.errors import EngineBuildError
from hovle_edge.files import atomic_directory, atomic_file, folder_with, sha256_file
from hovle_edge.spec import GRAPHS, MANIFEST, load_manifest
from hovle_edge.tokenizer import TOKENIZER_FILES


LOGGERS = {}  # TensorRT keeps the first logger a process gives it and ignores later ones: one per module


def make_logger(trt):
    """The process's TensorRT logger: prints warnings as the stock one does and keeps the errors, so
    that a failed build can say what TensorRT said."""
    if trt in LOGGERS:
        return LOGGERS[trt]

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, message):
            if severity <= trt.ILogger.Severity.ERROR:
                self.errors.append(message)
            if severity <= trt.ILogger.Severity.WARNING:
                print(f"[TensorRT] {message}", file=sys.stderr)

    LOGGERS[trt] = Logger()
    return LOGGERS[trt]


def parse(trt, network, path: str, logger) -> None:
    """Parse an ONNX file; the parser's errors are raised with the node that failed."""
    parser = trt.OnnxParser(network, logger)
    if parser.parse_from_file(path):
        return
    errors = []
    for i in range(parser.num_errors):
        error = parser.get_error(i)
        errors.append(f"node {error.node()} ({error.node_name()}, {error.node_operator()}): {error.desc()}")
    raise EngineBuildError(f"{path}: TensorRT could not parse it:\n  " + "\n  ".join(errors or logger.errors))


def build_engine(trt, onnx_path: str, profiles: list, inputs, precision: str, compute_capabilities: list[str],
                 ahead_of_time: bool, workspace_gib: float, timing_cache: bytes | None) -> tuple[bytes, bytes | None]:
    """(serialized engine, serialized timing cache, or None where the flavour keeps none)."""
    logger = make_logger(trt)
    logger.errors.clear()
    builder = trt.Builder(logger)
    typed = strongly_typed(trt)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if typed else 0
    network = builder.create_network(flags)
    parse(trt, network, onnx_path, logger)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    if precision == "fp16" and not typed:
        config.set_flag(trt.BuilderFlag.FP16)
    if ahead_of_time:  # named even when they are the GPU's own, so that engines.json says what was built
        config.num_compute_capabilities = len(compute_capabilities)
        for index, capability in enumerate(compute_capabilities):
            config.set_compute_capability(capability_enum(trt, capability), index)
    else:  # TensorRT for RTX times nothing at build (its timing cache calls are no-ops); TensorRT does
        config.set_timing_cache(config.create_timing_cache(timing_cache or b""), ignore_mismatch=False)
    for profile in profiles:
        optimization = builder.create_optimization_profile()
        for name, (low, opt, high) in profile.shapes(inputs).items():
            optimization.set_shape(name, low, opt, high)
        config.add_optimization_profile(optimization)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise EngineBuildError(f"{onnx_path}: TensorRT failed to build an engine for profiles "
                               f"{', '.join(p.name for p in profiles)}:\n  " +
                               "\n  ".join(logger.errors or ["(see TensorRT's log above)"]))
    return bytes(engine), None if ahead_of_time else bytes(config.get_timing_cache().serialize())


def build_engines(model_dir: str, out: str, precision: str = "fp16", max_context: int | None = None,
                  max_prompt: int | None = None, max_tiles: int | None = None, max_batch: int = 1,
                  compute_capabilities: list[str] = (), timing_cache: str | None = None, workspace_gib: float = 4.0,
                  flavour: str | None = None, cache_dir: str | None = None, overwrite: bool = False,
                  log=print) -> dict:
    """Build (or take from the engine cache) every graph's engine into `out`; returns engines.json."""
    manifest = load_manifest(model_dir)
    if manifest.data.get("target") == "onnxruntime":  # its graphs hold ORT contrib ops, which TensorRT never parses
        raise EngineBuildError(f"{model_dir} was exported for ONNX Runtime (--target onnxruntime), whose fused ops "
                               "TensorRT does not parse: export it again with --target tensorrt to build engines")
    if manifest.precision == "fp32" and precision == "fp16":
        log("note: an fp32 export; strongly typed TensorRT builds keep it fp32 (export with --dtype fp16 for fp16)")
    flavour = pick_flavour(flavour)
    trt = import_flavour(flavour)
    targets = build_targets(trt, flavour, list(compute_capabilities))
    limits = limits_for(manifest, max_context=max_context, max_prompt=max_prompt, max_tiles=max_tiles,
                        max_batch=max_batch)
    cache_dir = cache_dir or engine_cache.default_cache_dir()
    os.makedirs(cache_dir, exist_ok=True)
    if timing_cache and flavour in AHEAD_OF_TIME:
        log(f"note: {flavour} keeps no timing cache (it compiles kernels on the GPU that runs them and keeps "
            f"them in the engines' runtime cache); {timing_cache} is left as it is")
        timing_cache = None
    timing = open(timing_cache, "rb").read() if timing_cache and os.path.isfile(timing_cache) else None
    record = {"format": engine_cache.ENGINES_FORMAT, "version": engine_cache.ENGINES_VERSION, "flavour": flavour,
              "tensorrt_version": trt.__version__, "compute_capabilities": targets.compute_capabilities,
              "gpu": targets.gpu, "precision": precision, "limits": vars(limits), "engines": {}}
    with atomic_directory(out, overwrite=overwrite, owned_by=folder_with(engine_cache.ENGINES, format=engine_cache.ENGINES_FORMAT),
                          inputs=[model_dir], what="engine folder") as tmp:
        for graph in GRAPHS:
            inputs, _ = manifest.graph_io(graph)
            profiles = graph_profiles(graph, manifest, limits)
            graph_sha = manifest.data["files"][f"{graph}.onnx"]
            key = engine_cache.cache_key(flavour, trt.__version__, targets.compute_capabilities, graph_sha,
                                         [p.to_json() for p in profiles], precision)
            cached = os.path.join(cache_dir, f"{key}.engine")
            engine_path = os.path.join(tmp, f"{graph}.engine")
            started = time.perf_counter()
            hit = os.path.isfile(cached)
            if hit:
                log(f"{graph}: unchanged, taken from the engine cache")
                shutil.copyfile(cached, engine_path)
            else:
                log(f"{graph}: building ({', '.join(p.name for p in profiles)}) for compute capability "
                    f"{', '.join(targets.compute_capabilities)}")
                engine, timing = build_engine(trt, manifest.graph_path(graph), profiles, inputs, precision,
                                              targets.compute_capabilities, flavour in AHEAD_OF_TIME, workspace_gib,
                                              timing)
                with open(engine_path, "wb") as f:
                    f.write(engine)
                with atomic_file(cached) as part:
                    shutil.copyfile(engine_path, part)
            record["engines"][graph] = {
                "file": f"{graph}.engine", "sha256": sha256_file(engine_path), "bytes": os.path.getsize(engine_path),
                "graph_sha256": graph_sha, "cache_key": key, "profiles": [p.to_json() for p in profiles],
                "from_cache": hit, "build_seconds": round(time.perf_counter() - started, 2)}
        if timing_cache and timing:
            with atomic_file(timing_cache) as part, open(part, "wb") as f:
                f.write(timing)
        for name in (MANIFEST,) + TOKENIZER_FILES:
            if os.path.isfile(os.path.join(model_dir, name)):
                shutil.copyfile(os.path.join(model_dir, name), os.path.join(tmp, name))
        with open(os.path.join(tmp, engine_cache.ENGINES), "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)
    return record
