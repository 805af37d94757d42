"""What a start of the runtime costs on CPU, and the two choices made from it:

1. ONNX Runtime sessions: optimized in memory from the graph at every start (what the runtime does)
   vs a first start that also saves the optimized graph (what it did: a full second copy of the
   weights) and later starts from that copy.
2. Hash checks: every file re-hashed at every start (before) vs hashes remembered per file
   (hovle_edge/verified_hashes.py), on the model folder and on one large file.

python benchmarks/start_cpu.py --size w1024 [--big-gib 3]"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from hovle_edge.runtime.ort_threads import session_options  # noqa: E402

GRAPHS = ("vision", "embedding", "decoder")


def options(ort, level):
    o = session_options(ort)  # as the runtime opens them
    o.graph_optimization_level = level
    o.log_severity_level = 3
    return o


def timed(call, reps: int) -> float:
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def session_table(model_dir: str, reps: int) -> str:
    import onnxruntime as ort

    cpu = ["CPUExecutionProvider"]
    rows = []
    for name in GRAPHS:
        path = os.path.join(model_dir, f"{name}.onnx")
        weights = sum(os.path.getsize(p) for p in (path, path + ".data") if os.path.exists(p))
        in_memory = timed(lambda: ort.InferenceSession(path, options(ort, ort.GraphOptimizationLevel.ORT_ENABLE_ALL),
                                                       providers=cpu), reps)
        with tempfile.TemporaryDirectory() as cache:
            saved = os.path.join(cache, f"{name}.onnx")
            o = options(ort, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
            o.optimized_model_filepath = saved
            o.add_session_config_entry("session.optimized_model_external_initializers_file_name", f"{name}.onnx.data")
            o.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
            first = timed(lambda: ort.InferenceSession(path, o, providers=cpu), 1)
            copy = sum(os.path.getsize(os.path.join(cache, f)) for f in os.listdir(cache))
            cached = timed(lambda: ort.InferenceSession(saved, options(ort, ort.GraphOptimizationLevel.ORT_DISABLE_ALL),
                                                        providers=cpu), reps)
        rows.append((name, weights, in_memory, first, cached, copy))
    total = ("total",) + tuple(sum(r[i] for r in rows) for i in range(1, 6))
    lines = [f"{'graph':<10}{'graph MiB':>10}{'in memory s':>13}{'saving s':>10}{'from copy s':>13}{'copy MiB':>10}"]
    for name, weights, in_memory, first, cached, copy in rows + [total]:
        lines.append(f"{name:<10}{weights / 2**20:>10.1f}{in_memory:>13.2f}{first:>10.2f}{cached:>13.2f}{copy / 2**20:>10.1f}")
    return "\n".join(lines)


def hash_lines(model_dir: str, big_gib: float, reps: int) -> list[str]:
    from hovle_edge.files import sha256_file
    from hovle_edge.runtime import Pipeline
    from hovle_edge.spec import Manifest, load_manifest
    from hovle_edge.verified_hashes import RECORD

    manifest = load_manifest(model_dir, verify=False)
    size = sum(os.path.getsize(os.path.join(model_dir, f)) for f in manifest.data["files"])
    rehash = timed(lambda: [sha256_file(os.path.join(model_dir, f)) for f in manifest.data["files"]], reps)
    manifest.verify_files()
    remembered = timed(manifest.verify_files, reps)

    def start():
        with Pipeline.from_dir(model_dir):
            pass

    second_start = timed(start, reps)
    lines = [f"model folder ({size / 2**20:.0f} MiB): hashing every file {rehash:.2f} s, remembered "
             f"{remembered * 1000:.1f} ms; Pipeline.from_dir (a second start, hashes remembered) {second_start:.2f} s"]
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "weights.onnx.data")
        big = int(big_gib * 2**30)
        with open(path, "wb") as f:  # random head and tail, a sparse middle: hashing reads every byte
            f.write(os.urandom(64 * 2**20))
            f.seek(big - 64 * 2**20)
            f.write(os.urandom(64 * 2**20))
        digest = sha256_file(path)
        big_manifest = Manifest(folder, {"files": {"weights.onnx.data": digest}})
        every = timed(lambda: sha256_file(path), 1)
        big_manifest.verify_files()
        again = timed(big_manifest.verify_files, reps)
        verify = timed(lambda: big_manifest.verify_files(remembered=False), 1)
        assert os.path.isfile(os.path.join(folder, RECORD))
    lines.append(f"one {big_gib:g} GiB file: hashed at every start {every:.2f} s; remembered {again * 1000:.2f} ms; "
                 f"`hovle-edge verify` re-hashes it: {verify:.2f} s")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="w1024")
    parser.add_argument("--work", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), ".work"))
    parser.add_argument("--model", default=None, help="An exported folder to measure instead of --size's.")
    parser.add_argument("--big-gib", type=float, default=3.0)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    if args.model:
        model_dir = args.model
    else:
        from models import prepared

        _, model_dir = prepared(args.size, args.work)
    import onnxruntime as ort

    print(f"onnxruntime {ort.__version__}, {model_dir}, median of {args.reps}")
    print(session_table(model_dir, args.reps))
    print("\n".join(hash_lines(model_dir, args.big_gib, args.reps)))


if __name__ == "__main__":
    main()
