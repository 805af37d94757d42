"""The profiler's report: structure, arithmetic (percentiles, roofline from known numbers), every run
in the JSON, and a PNG that opens. Not absolute times."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from hovle_edge.cli import main
from hovle_edge.errors import InputError
from hovle_edge.profiling import ProfileSettings
from hovle_edge.profiling.latency import percentiles, profile, prompt_ids
from hovle_edge.profiling.roofline import decode_cost, layer_parameters
from hovle_edge.profiling.settings import parse_sweep
from hovle_edge.runtime import Pipeline


def test_percentiles():
    values = list(range(1, 101))  # 1..100
    p = percentiles(values)
    assert p["p50"] == pytest.approx(50.5) and p["p90"] == pytest.approx(90.1) and p["p99"] == pytest.approx(99.01)
    assert p["mean"] == pytest.approx(50.5)
    assert percentiles([])["p50"] is None


def test_roofline_from_known_numbers():
    stack = {"layers": 2, "heads": 4, "kv_heads": 2, "head_dim": 16, "intermediate": 128}
    model = {"hidden": 64, "vocab": 512, "stacks": {"embedding": stack, "llm": stack}}
    # One layer: wqkv 64*(4+4)*16 = 8192, wo 4*16*64 = 4096, SwiGLU 3*64*128 = 24576, norms 128.
    assert layer_parameters(stack, 64) == 36992
    cost = decode_cost(model, "fp32")
    weights = 4 * 36992 + 64 + 512 * 64 + 64  # four layers, a word row, the head, the final norm
    assert cost.weight_bytes == 4 * weights
    assert cost.kv_bytes_per_token == 4 * 2 * 4 * 2 * 16  # fp32, key+value, 4 layers, 2 kv heads, dim 16
    assert cost.bound_tokens_per_s(100.0, 1000) == pytest.approx(100e9 / (4 * weights + 1000 * 1024))
    half = decode_cost(model, "fp16")
    assert half.weight_bytes * 2 == cost.weight_bytes


def test_official_model_roofline():
    from hovle_edge.config import preset
    from hovle_edge.spec import model_section

    cost = decode_cost(model_section(preset("hovle-2.6b")), "fp16")
    # 32 layers of 62,918,656 weights, the 92553 x 2048 head, one embedding row and the final norm.
    assert cost.weight_bytes == 2 * (32 * 62_918_656 + 92553 * 2048 + 2048 + 2048)
    assert cost.kv_bytes_per_token == 2 * 2 * 32 * 8 * 128


@pytest.fixture(scope="module")
def pipe(tiny_export):
    with Pipeline.from_dir(str(tiny_export)) as pipeline:
        yield pipeline


def test_prompt_has_the_asked_number_of_text_tokens(pipe):
    ids = prompt_ids(pipe, 240, tiles=2)  # the tiny model keeps InternVL's long default system message
    assert len(ids) == 240 + 2 * 4 and ids.count(7) == 8
    # The template's control tokens, as a chat turn has them: system, user and assistant opened.
    assert ids.count(pipe.tokenizer.token_id("<|im_start|>")) == 3
    with pytest.raises(InputError, match="shorter than the template"):
        prompt_ids(pipe, 3, tiles=0)


def test_profile_report_holds_every_run(pipe, tiny_export, tmp_path):
    image = tmp_path / "scene.png"
    Image.new("RGB", (150, 70), "blue").save(image)
    settings = ProfileSettings(str(tiny_export), image=str(image), prompt_tokens=200, new_tokens=6, runs=3, warmup=1)
    report = profile(pipe, settings)
    assert len(report.runs) == 3
    for run in report.runs:
        assert run["new_tokens"] == 6 and len(run["step_ms"]) == 5  # the last token is chosen, not run
        assert run["tiles"] == 3 and run["preprocess_ms"] > 0 and run["vision_ms"] > 0
        assert run["ttft_ms"] >= run["preprocess_ms"] + run["vision_ms"] + run["llm_prefill_ms"]
        assert run["decode_tokens_per_s"] == pytest.approx(5 / (sum(run["step_ms"]) / 1000))
    summary = report.summary()
    assert summary["itl_ms"]["p50"] == pytest.approx(float(np.median([v for r in report.runs for v in r["step_ms"]])))
    text = report.table()
    for label in ("time to first token", "inter-token latency", "decode tokens/s", "peak host RSS"):
        assert label in text
    assert report.peak_rss_mb > 10


@pytest.mark.slow
def test_profile_cli_json_and_png(tiny_export, tmp_path):
    result = CliRunner().invoke(main, ["profile", "--model", str(tiny_export), "--tiles", "2", "--prompt-tokens", "200",
                                       "--new-tokens", "5", "--runs", "2", "--warmup", "0", "--json",
                                       str(tmp_path / "p.json"), "--plot", str(tmp_path / "p.png")])
    assert result.exit_code == 0, result.output
    assert "this host (measured copy)" in result.output and "%" in result.output
    data = json.loads((tmp_path / "p.json").read_text())
    assert len(data["profiles"][0]["runs"]) == 2 and data["profiles"][0]["settings"]["tiles"] == 2
    assert any("fraction_of_bound" in row for row in data["roofline"])
    with Image.open(tmp_path / "p.png") as png:
        assert png.format == "PNG" and png.size[0] > 500


def test_sweep(tiny_export, tmp_path):
    result = CliRunner().invoke(main, ["profile", "--model", str(tiny_export), "--sweep", "prompt-tokens=200,260",
                                       "--new-tokens", "4", "--runs", "1", "--warmup", "0", "--plot",
                                       str(tmp_path / "s.png"), "--json", str(tmp_path / "s.json")])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[0] == "prompt-tokens" and lines[1].split()[0] == "200" and lines[2].split()[0] == "260"
    assert [p["settings"]["prompt_tokens"] for p in json.loads((tmp_path / "s.json").read_text())["profiles"]] == [200, 260]
    with Image.open(tmp_path / "s.png") as png:
        assert png.format == "PNG"
    assert parse_sweep("tiles=1,4,12") == ("tiles", [1, 4, 12])
    with pytest.raises(InputError, match="NAME one of"):
        parse_sweep("threads=1,2")


def test_roofline_only_needs_no_runtime(tiny_export):
    result = CliRunner().invoke(main, ["profile", "--roofline-only", "--preset", "hovle-2.6b", "--device-model", "orin-agx"])
    assert result.exit_code == 0, result.output
    assert "Jetson AGX Orin 64GB" in result.output and "4201.8 MiB" in result.output
    result = CliRunner().invoke(main, ["profile", "--roofline-only", "--model", str(tiny_export), "--device-model", "thor"])
    assert result.exit_code == 0 and "Jetson Thor" in result.output
    result = CliRunner().invoke(main, ["profile", "--roofline-only", "--preset", "hovle-2.6b", "--device-model", "pi"])
    assert result.exit_code == 2 and "choose one of" in result.output


def test_settings_refuse_what_they_can_alone_naming_the_field():
    """Each refusal names the field at fault (the CLI turns it into its option), before a model loads."""
    cases = [({"model_dir": "m", "runs": 0}, "runs"), ({"model_dir": "m", "warmup": -1}, "warmup"),
             ({"model_dir": "m", "tiles": 0}, "tiles"), ({"roofline_only": True, "preset": "tiny", "contexts": (5, 0)},
                                                         "contexts"),
             ({"preset": "tiny"}, "model_dir"),  # a preset has no graphs to run: only its roofline
             ({"model_dir": "m", "sweep": "tiles=1,x"}, "sweep"), ({"model_dir": "m", "sweep": "tiles=2,0"}, "sweep")]
    for fields, setting in cases:
        with pytest.raises(InputError) as caught:
            ProfileSettings(**fields)
        assert caught.value.setting == setting and "--" not in str(caught.value), (fields, str(caught.value))
    swept = ProfileSettings("m", tiles=1, sweep="prompt-tokens=200,260").swept()
    assert [(s.prompt_tokens, s.tiles, s.sweep) for s in swept] == [(200, 1, None), (260, 1, None)]


def test_cli_names_the_option_of_a_refused_setting(tiny_export):
    result = CliRunner().invoke(main, ["profile", "--model", str(tiny_export), "--prompt-tokens", "3"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.startswith("error: Invalid value for '--prompt-tokens': a prompt of 3 tokens is shorter"), \
        result.output
    result = CliRunner().invoke(main, ["profile", "--model", str(tiny_export), "--sweep", "prompt-tokens=200,3"])
    assert result.exit_code == 2 and "Invalid value for '--sweep'" in result.output, result.output
