"""Random-weight models of chosen widths for the benchmarks: a checkpoint and its export, and for the
peers a Hugging Face Llama with the same work per token and onnxruntime-genai's build of it, cached in
a work folder so that repeated runs measure and do not rebuild. Speed does not depend on the weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from hovle_edge.config import EmbeddingConfig, HoVLEConfig, LLMConfig

SIZES = {
    # name: (width, layers per stack, heads, kv heads, mlp, vocab)
    "w512": (512, 8, 8, 4, 2048, 16384),
    "w1024": (1024, 8, 16, 8, 4096, 32768),
}


def benchmark_config(name: str) -> HoVLEConfig:
    width, layers, heads, kv_heads, mlp, vocab = SIZES[name]
    layer = dict(hidden_size=width, num_attention_heads=heads, num_key_value_heads=kv_heads,
                 intermediate_size=mlp, num_hidden_layers=layers, rope_theta=1e6)
    return HoVLEConfig(
        embedding_config=EmbeddingConfig(image_size=112, patch_size=14, llm_hidden_size=width, llm_vocab_size=vocab,
                                          img_context_token_id=7, **layer),
        llm_config=LLMConfig(vocab_size=vocab, max_position_embeddings=4096, **layer),
        force_image_size=112, max_dynamic_patch=12)


def prepared(name: str, work: str, precision: str = "fp32", target: str = "onnxruntime") -> tuple[str, str]:
    """(checkpoint folder, exported model folder) for size `name` and graph `target`, built once under `work`."""
    checkpoint = os.path.join(work, f"{name}-checkpoint")
    model_dir = os.path.join(work, f"{name}-{target}-{precision}")
    return random_export(benchmark_config(name), checkpoint, model_dir, std=0.02, precision=precision,
                         target=target, max_context=4096)


def random_export(config, checkpoint: str, model_dir: str, std: float, precision: str, target: str,
                  max_context: int) -> tuple[str, str]:
    """(checkpoint, model_dir): a checkpoint of `config` with random weights of deviation `std` and its
    export, each made only when its folder is not there yet."""
    import torch

    from hovle_edge.export import export_model
    from hovle_edge.model import HoVLE
    from hovle_edge.shapes.world import world_tokenizer

    if not os.path.isfile(os.path.join(checkpoint, "config.json")):
        torch.manual_seed(0)
        model = HoVLE(config)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, std)
        model.save_pretrained(checkpoint)
        world_tokenizer().save(checkpoint)
    if not os.path.isfile(os.path.join(model_dir, "manifest.json")):
        export_model(checkpoint, model_dir, precision=precision, max_context=max_context, target=target,
                     overwrite=True, progress=False)
    return checkpoint, model_dir


def llama_folder(name: str, work: str) -> str:
    """A random-weight Hugging Face Llama with size `name`'s widths, heads, MLP and vocab and both stacks'
    layers in one (equal work per token), with a tokenizer (the genai builder reads one; benchmarks feed ids)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from hovle_edge.shapes.world import world_tokenizer

    folder = os.path.join(work, f"llama-{name}")
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    width, layers, heads, kv_heads, mlp, vocab = SIZES[name]
    config = LlamaConfig(hidden_size=width, intermediate_size=mlp, num_hidden_layers=2 * layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                         max_position_embeddings=4096, rope_theta=1e6, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(folder)
    world = os.path.join(work, "world-tokenizer")
    os.makedirs(world, exist_ok=True)
    world_tokenizer().save(world)
    PreTrainedTokenizerFast(tokenizer_file=os.path.join(world, "tokenizer.json"), bos_token="<s>",
                            eos_token="</s>").save_pretrained(folder)
    return folder


def genai_folder(name: str, work: str, precision: str, threads: int) -> str:
    """onnxruntime-genai's own build of size `name`'s Llama for CPU (`-p fp32|int4 -e cpu`), set to `threads`."""
    folder = os.path.join(work, f"genai-{name}-{precision}")
    config = os.path.join(folder, "genai_config.json")
    if not os.path.isfile(config):
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", llama_folder(name, work),
                        "-o", folder, "-p", precision, "-e", "cpu", "-c", os.path.join(work, "genai-cache")],
                       check=True, stdout=subprocess.DEVNULL)
    with open(config) as f:
        data = json.load(f)
    data["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
    with open(config, "w") as f:
        json.dump(data, f, indent=2)
    return folder
