"""The torch-free runtime on a tiny exported model, CPU: tokens equal to PyTorch, seeded sampling,
streaming, multi-turn cache reuse, and the errors a user meets."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from hovle_edge.errors import InputError, ModelFolderError
from hovle_edge.model import HoVLE, generate
from hovle_edge.runtime import Pipeline
from hovle_edge.runtime.backends import BackendError


@pytest.fixture(scope="module")
def pipe(tiny_export):
    with Pipeline.from_dir(str(tiny_export)) as pipeline:
        yield pipeline


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    return Image.fromarray((rng.random((70, 150, 3)) * 255).astype(np.uint8))


def test_greedy_with_image_equals_pytorch(pipe, image, tiny_checkpoint):
    pixels = pipe.pixel_values(image, None)
    assert len(pixels) == 3  # 2 tiles and the thumbnail
    ids = pipe.tokenizer.encode(pipe.template.prompt("what colour is the square?", tiles=3), bos=True)
    tokens = pipe.conversation().ask_ids(ids, pixels, max_new_tokens=24)
    reference = HoVLE.from_pretrained(str(tiny_checkpoint))
    expected = generate(reference, torch.tensor([ids]), torch.from_numpy(pixels), max_new_tokens=24,
                        stop_ids=set(pipe.manifest.stop_ids))
    assert tokens == expected
    assert pipe.generate("what colour is the square?", image=image, max_new_tokens=24) == \
        pipe.tokenizer.decode([t for t in tokens if t not in pipe.manifest.stop_ids])


def test_seeded_sampling(pipe):
    kwargs = dict(max_new_tokens=16, temperature=1.0, top_k=100, top_p=0.95)
    first = pipe.generate("how many stars?", seed=7, **kwargs)
    assert first == pipe.generate("how many stars?", seed=7, **kwargs)
    others = {pipe.generate("how many stars?", seed=s, **kwargs) for s in (8, 9, 10)}
    assert others - {first}


def test_stream_concatenates_to_generate(pipe, image):
    kwargs = dict(max_new_tokens=20, temperature=0.9, seed=3)
    pieces = list(pipe.stream("日本語 café?", image=image, **kwargs))
    assert "".join(pieces) == pipe.generate("日本語 café?", image=image, **kwargs)
    assert len(pieces) > 1


def test_follow_up_runs_only_its_own_tokens_and_matches_a_fresh_run(pipe, image):
    chat = pipe.conversation()
    first = "".join(chat.ask("what colour is the square?", image, max_new_tokens=8))
    assert chat.cache.length == len(chat.ids) > len(pipe.tokenizer.encode(first))
    before = len(chat.ids)
    pending = list(chat.pending)
    second = "".join(chat.ask("and the circle?", max_new_tokens=8))
    timings = chat.timings
    turn_ids = pending + pipe.tokenizer.encode(pipe.template.user_turn("and the circle?"))
    # The follow-up's prefill ran only its own tokens; decode steps ran one token each.
    assert timings.prompt_tokens == len(turn_ids)
    assert timings.tokens_through_graphs == len(turn_ids) + len(timings.steps)
    assert timings.graph_calls["vision"] == 0
    # From scratch: the whole conversation's ids in one prefill give the same answer.
    all_ids = chat.ids[:before] + turn_ids
    fresh = pipe.conversation()
    pixels = pipe.pixel_values(image, None)
    fresh_tokens = fresh.ask_ids(all_ids, pixels, max_new_tokens=8)
    answer = pipe.tokenizer.decode([t for t in fresh_tokens if t not in pipe.manifest.stop_ids])
    assert answer == second


def test_prompt_longer_than_context_fails_before_any_work(pipe):
    chat = pipe.conversation(max_context=16)
    with pytest.raises(InputError, match="needs .* tokens but only 16 of the context of 16 are left"):
        list(chat.ask("what colour is the square? " * 10))
    assert chat.cache.length == 0 and chat.timings.graph_calls["embedding"] == 0


def test_context_larger_than_exported_is_refused(pipe):
    with pytest.raises(InputError, match="exported for at most 2048"):
        pipe.conversation(max_context=4096)


def test_empty_prompt(pipe):
    with pytest.raises(InputError, match="the prompt is empty"):
        pipe.generate("   ")


def test_unreadable_image(pipe, tmp_path):
    (tmp_path / "photo.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(InputError, match="photo.jpg"):
        pipe.generate("what?", image=str(tmp_path / "photo.jpg"))


def test_more_tiles_than_exported(pipe, image):
    with pytest.raises(InputError, match="7 tiles asked for, but the model was exported for at most 6"):
        pipe.generate("what?", image=image, max_tiles=7)


def copy_model(tiny_export, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(tiny_export, target, ignore=shutil.ignore_patterns(".ort-optimized"))
    return target


def test_missing_model_folder(tmp_path):
    with pytest.raises(ModelFolderError, match="no such model folder"):
        Pipeline.from_dir(str(tmp_path / "nope"))
    with pytest.raises(ModelFolderError, match="no manifest.json"):
        Pipeline.from_dir(str(tmp_path))


def test_model_from_another_version(tiny_export, tmp_path):
    target = copy_model(tiny_export, tmp_path)
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["manifest_version"] = 99
    (target / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelFolderError, match="manifest version 99 .* re-export the model"):
        Pipeline.from_dir(str(target))


def test_graph_changed_after_export(tiny_export, tmp_path):
    target = copy_model(tiny_export, tmp_path)
    with open(target / "decoder.onnx.data", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(ModelFolderError, match="decoder.onnx.data: sha256 does not match"):
        Pipeline.from_dir(str(target))


def test_missing_graph(tiny_export, tmp_path):
    target = copy_model(tiny_export, tmp_path)
    os.remove(target / "vision.onnx")
    with pytest.raises(ModelFolderError, match="vision.onnx: listed in manifest.json but missing"):
        Pipeline.from_dir(str(target))


def test_provider_not_available_is_an_error(tiny_export):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(BackendError, match="CUDAExecutionProvider is not available"):
        Pipeline.from_dir(str(tiny_export), device="cuda")


def test_run_cli(tiny_export):
    from click.testing import CliRunner

    from hovle_edge.cli import main

    result = CliRunner().invoke(main, ["run", "--model", str(tiny_export), "--prompt", "what colour?",
                                       "--max-new-tokens", "5", "--no-stream"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, ["run", "--model", str(tiny_export) + "-missing", "--prompt", "x"])
    assert result.exit_code == 2 and "no such model folder" in result.output


def test_chat_loop(pipe, tmp_path, image):
    from hovle_edge.runtime.chat import chat_loop

    image.save(tmp_path / "scene.png")
    lines = iter(["what colour?", f"/image {tmp_path / 'scene.png'}", "and now?", "/image /no/such.png", "/reset",
                  "again", "/exit", "never read"])
    shown = []
    chat_loop(pipe, None, {"max_new_tokens": 4}, read=lambda: next(lines), write=lambda text, nl=True: shown.append(text))
    assert "(conversation reset)" in shown and any("no such image file" in s for s in shown)
    assert any("scene.png" in s for s in shown)
