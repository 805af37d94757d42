"""What `hovle-edge profile` does, as one library call: profile (or sweep), then the roofline of the
measured decode against this host's bandwidth and the edge devices', then JSON and PNG."""

from __future__ import annotations

from hovle_edge.errors import InputError
from hovle_edge.files import write_json
from hovle_edge.profiling import roofline
from hovle_edge.profiling.latency import check_before_loading, plot, profile, sweep_table
from hovle_edge.profiling.settings import ProfileSettings, parse_sweep


def model_numbers(model_dir: str | None, preset: str | None) -> tuple[dict, str, str]:
    """(manifest "model" section, precision, name) from an exported folder or a config preset."""
    if model_dir:
        from hovle_edge.spec import load_manifest

        manifest = load_manifest(model_dir, verify=False)
        # a quantized folder's roofline counts its quantized weight bytes (run_profile passes them on)
        return {**manifest.model, "quantization": manifest.data.get("quantization")}, manifest.precision, model_dir
    if preset:
        from hovle_edge.config import preset as config_preset
        from hovle_edge.spec import model_section

        return model_section(config_preset(preset)), "fp16", f"preset {preset} (fp16)"
    raise InputError("no model numbers: name an exported model folder or a config preset", setting="model_dir")


def roofline_text(cost: roofline.DecodeCost, rows: list[dict]) -> str:
    lines = [f"decode reads {cost.weight_bytes / 2**20:.1f} MiB of weights per token and "
             f"{cost.kv_bytes_per_token / 1024:.1f} KiB of KV cache per token of context",
             f"{'device':<24}{'GB/s':>9}{'context':>9}{'bound tok/s':>13}{'measured':>10}{'fraction':>10}"]
    for row in rows:
        measured, fraction = "", ""
        if "measured_tokens_per_s" in row:
            measured = f"{row['measured_tokens_per_s']:.1f}"
            fraction = f"{100 * row['fraction_of_bound']:.1f}%"
        lines.append(f"{row['name']:<24}{row['bandwidth_gbs']:>9.1f}{row['context']:>9}{row['bound_tokens_per_s']:>13.1f}"
                     f"{measured:>10}{fraction:>10}")
    return "\n".join(lines)


def devices_for(device_model: str | None) -> dict:
    if device_model in (None, "all"):
        return dict(roofline.DEVICES)
    if device_model not in roofline.DEVICES:
        raise InputError(f"device {device_model!r}: choose one of {', '.join(roofline.DEVICES)} or all",
                         setting="device_model")
    return {device_model: roofline.DEVICES[device_model]}


def run_profile(settings: ProfileSettings) -> str:
    """Returns the text to print."""
    numbers, precision, name = model_numbers(settings.model_dir, settings.preset)
    cost = roofline.decode_cost(numbers, precision, numbers.get("quantization"))
    devices = devices_for(settings.device_model)
    if settings.roofline_only:
        rows = roofline.roofline_table(cost, list(settings.contexts), devices)
        if settings.json_path:
            write_json(settings.json_path, {"model": name, "precision": precision, "weight_bytes": cost.weight_bytes,
                                            "kv_bytes_per_token": cost.kv_bytes_per_token, "roofline": rows})
        return roofline_text(cost, rows)
    from hovle_edge.runtime import Pipeline

    check_before_loading(settings)
    with Pipeline.from_dir(settings.model_dir, backend=settings.backend, device=settings.device,
                           threads=settings.threads) as pipe:
        reports = [profile(pipe, one) for one in settings.swept()]
    key, values = parse_sweep(settings.sweep) if settings.sweep else (None, [None])
    measured, host = {}, {}
    if settings.device == "cpu":
        host = {"host": ("this host (measured copy)", roofline.host_bandwidth_gbs())}
    for report in reports:
        s = report.settings
        context = s["prompt_tokens"] + s["image_tokens"] + s["new_tokens"] // 2  # the mean context while decoding
        measured[context] = report.summary()["decode_tokens_per_s"]["p50"]
        report.settings["mean_decode_context"] = context
    rows = roofline.roofline_table(cost, sorted(measured), {**host, **devices}, measured, "host" if host else None)
    text = sweep_table(key, values, reports) if settings.sweep else reports[0].table()
    text += "\n\n" + roofline_text(cost, rows)
    if settings.json_path:
        write_json(settings.json_path, {"profiles": [r.to_json() for r in reports], "sweep": key, "values": values,
                                        "roofline": rows, "weight_bytes": cost.weight_bytes,
                                        "kv_bytes_per_token": cost.kv_bytes_per_token})
    if settings.plot_path:
        plot(settings.plot_path, reports[0], (key, values, reports) if settings.sweep else None)
    return text
