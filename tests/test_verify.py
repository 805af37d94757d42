"""`hovle-edge verify` (export/verify.py) still fails on a wrong model: a graph whose weights are not the
checkpoint's, and a runtime whose decode steps go wrong after a right prefill (the teacher-forced steps
are compared one by one, not only the prompt)."""

import numpy as np
import pytest
import torch

from hovle_edge.export import export_model
from hovle_edge.export.verify import verify_model
from hovle_edge.runtime import Pipeline

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def ort_export(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("verify") / "tiny-ort"
    export_model(str(tiny_checkpoint), str(out), progress=False, target="onnxruntime")
    return out


def test_teacher_forced_steps_each_compared(tiny_checkpoint, ort_export):
    report = verify_model(str(tiny_checkpoint), str(ort_export), new_tokens=6, progress=False)
    steps = [r.output for r in report.rows if r.graph == "end2end"]
    assert steps == ["logits"] + [f"logits step {k}" for k in range(1, 6)]
    assert report.ok and report.tokens_match and len(report.reference_tokens) == 6


def test_decode_steps_that_go_wrong_fail(tiny_checkpoint, ort_export, monkeypatch):
    real_step = Pipeline.decode_step

    def drifting_step(self, cache, token, timings=None):
        logits = real_step(self, cache, token, timings)
        return logits + np.linspace(0, 1, logits.size, dtype=logits.dtype)  # a wrong cache would do worse

    monkeypatch.setattr(Pipeline, "decode_step", drifting_step)
    report = verify_model(str(tiny_checkpoint), str(ort_export), new_tokens=4, progress=False)
    failed = [r.output for r in report.rows if r.exceeds(report.precision)]
    assert not report.ok and failed == ["logits step 1", "logits step 2", "logits step 3"]


def test_weights_not_the_checkpoints_fail(tiny_checkpoint, ort_export, tmp_path):
    """The folder checked against a checkpoint with one LLM weight changed by 1%: the graph it came from
    is, for that checkpoint, a wrong graph."""
    from hovle_edge.model.weights import load_model

    model = load_model(str(tiny_checkpoint))
    with torch.no_grad():
        model.language_model.model.layers[-1].feed_forward.w2.weight.mul_(1.01)
    other = tmp_path / "other"
    model.save_pretrained(str(other))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (tiny_checkpoint / name).exists():
            (other / name).write_bytes((tiny_checkpoint / name).read_bytes())
    report = verify_model(str(other), str(ort_export), new_tokens=4, progress=False)
    failed = {(r.graph, r.output) for r in report.rows if r.exceeds(report.precision)}
    assert not report.ok and ("end2end", "logits") in failed and ("decoder", "logits") in failed
    assert not any(graph == "embedding" for graph, _ in failed)  # the embedding's weights are unchanged
