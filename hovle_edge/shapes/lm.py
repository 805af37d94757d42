"""The stand-in for InternLM2: a tiny InternLM2-style LM trained on the shapes world's text (scenes told
in words with a question about each, and text-only questions, in the chat template), with the world's
tokenizer. Saved as an InternLM2 folder (config.json with the llm keys, `model.*` / `output.weight`
tensors, tokenizer files)."""

from __future__ import annotations

import json
import os
import random

import torch

from hovle_edge.config import LLMConfig, config_to_dict
from hovle_edge.model.llm import InternLM2ForCausalLM
from hovle_edge.model.weights import save_state_dict
from hovle_edge.tokenizer import ChatTemplate, Tokenizer
from hovle_edge.shapes import world
from hovle_edge.shapes.evaluate import generated_text
from hovle_edge.train.data import IGNORE, collate, encode_chat
from hovle_edge.train.losses import next_token_loss
from hovle_edge.train.loop import Task, TrainSettings, train

LM_TEMPLATE = ChatTemplate(tokens_per_tile=0, system=None)  # text only, no system prompt: as HoVLE's stages
LM_DEFAULTS = TrainSettings(steps=500, batch_size=32, lr=3e-3, warmup=30)
DESCRIBED_SHARE = 0.8  # of the records: a scene told in words and a question; the rest text-only questions
COLOUR_SHARE = 0.3  # of those questions asked about colour on purpose (about half in all, with the drawn ones)


def shapes_lm_config(vocab_size: int) -> LLMConfig:
    # Width 128 (four heads of 32): the world's few hundred words and one-to-three-thing scenes need
    # no more, and every stage's step costs about a third of what it cost at width 256 on a CPU.
    return LLMConfig(num_hidden_layers=4, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=512, vocab_size=vocab_size, max_position_embeddings=2048, rope_theta=10000.0)


class LMModule(torch.nn.Module):
    def __init__(self, model: InternLM2ForCausalLM):
        super().__init__()
        self.model = model

    def forward(self, batch):
        ids = batch["input_ids"]
        logits, _ = self.model(self.model.model.tok_embeddings(ids), batch["position_ids"], batch["attention_mask"])
        return next_token_loss(logits, batch["labels"])


class PretrainLM(Task):
    def __init__(self, tokenizer: Tokenizer, config: LLMConfig, seed: int):
        self.tokenizer, self.seed = tokenizer, seed
        self.template = LM_TEMPLATE
        self.model = InternLM2ForCausalLM(config)
        self.module = LMModule(self.model)

    def example(self, index: int):
        """A scene told in words with a question about it, learned whole: the caption too, so that the
        LM both writes captions (what stage 2 asks of the frozen LLM) and reads them, as a real LLM has
        learned all of its text. Or a question about numbers and shapes (loss on the answer). Colour is
        asked more often than drawn: reading a colour is what this LM learns last (docs/experiments.md)."""
        rng = random.Random(f"lm-{self.seed}-{index}")
        if rng.random() < DESCRIBED_SHARE:
            things = world.scene(rng)
            asked = world.questions(things, rng)
            colour = [(q, a) for q, a in asked if q.startswith("what colour")]  # every scene has one
            question, answer = rng.choice(colour) if rng.random() < COLOUR_SHARE else rng.choice(asked)
            ids, _ = encode_chat(self.tokenizer, self.template,
                                 world.turns([(f"{world.caption(things)}. {question}", answer)]), 0)
            return ids, [IGNORE] + ids[1:], None  # every token after <s>
        ids, labels = encode_chat(self.tokenizer, self.template, world.turns([world.text_questions(rng)]), 0)
        return ids, labels, None

    def batch(self, step, micro, rank, world, batch_size):
        first = ((step * 64 + micro) * world + rank) * batch_size
        return collate([self.example(first + i) for i in range(batch_size)], pad_id=self.tokenizer.eos_id)

    def save(self, directory: str, weights: dict) -> None:
        save_lm(self.model, self.tokenizer, directory, weights)


def save_lm(model: InternLM2ForCausalLM, tokenizer: Tokenizer, directory: str, weights: dict) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config_to_dict(model.cfg), f, indent=2)
    save_state_dict(weights, directory, max_shard_bytes=5 * 2**30)
    tokenizer.save(directory)


def pretrain_lm(out: str, settings: TrainSettings | None = None, progress: bool = True) -> dict:
    """Train the tokenizer and the LM on the world's text; writes an InternLM2 folder to `out`."""
    settings = settings or LM_DEFAULTS
    torch.manual_seed(settings.seed)
    tokenizer = world.world_tokenizer()
    task = PretrainLM(tokenizer, shapes_lm_config(tokenizer.vocab_size), settings.seed)
    return train(task, settings, out, desc="pretrain-lm", progress=progress)


def lm_answer(model: InternLM2ForCausalLM, tokenizer: Tokenizer, template: ChatTemplate, question: str,
              max_new_tokens: int = 8) -> str:
    """Greedy answer of the LM alone to a text question in the chat template."""
    return generated_text(model, tokenizer, template.prompt(question), None, max_new_tokens)
