"""Training data as the stages read it: image-caption JSONL, conversation JSONL (InternVL/LLaVA
format), image folders and random token sequences, packed into batches with labels. Every
batch is a pure function of (seed, step, rank), so a resumed run sees the data it would have seen."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import torch

from hovle_edge.errors import InputError
from hovle_edge.preprocess import load_image, preprocess_image
from hovle_edge.tokenizer import IM_END, ChatTemplate, Tokenizer

IGNORE = -100
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def read_jsonl(path: str) -> list[dict]:
    """Records of a JSONL file, each checked (check_record) so that a bad line is named up front,
    not met as a traceback at the training step that draws it."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such data file")
    records = []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        record = json.loads(line)
                    except ValueError as e:
                        raise InputError(f"{path}:{number}: not a JSON line ({e})") from e
                    check_record(record, f"{path}:{number}")
                    records.append(record)
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e})") from e
    if not records:
        raise InputError(f"{path}: no records")
    return records


def check_record(record, where: str) -> None:
    """An image-caption record {"image"?, "text"} or a conversation {"image"?, "conversations":
    [{"from", "value"}, ...]}, with strings where strings belong."""
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "image" in record and not isinstance(record["image"], str):
        raise InputError(f"{where}: 'image' must be a path string, got {record['image']!r:.60}")
    if "conversations" in record:
        turns = record["conversations"]
        if not isinstance(turns, list) or not turns or not all(
                isinstance(t, dict) and isinstance(t.get("from"), str) and isinstance(t.get("value"), str) for t in turns):
            raise InputError(f"{where}: 'conversations' must be a non-empty list of {{\"from\": str, \"value\": str}}")
    elif "text" in record:
        if not isinstance(record["text"], str):
            raise InputError(f"{where}: 'text' must be a string, got {record['text']!r:.60}")
    else:
        raise InputError(f"{where}: a record needs 'conversations' or 'text' (keys: {', '.join(record) or 'none'})")


def image_files(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        raise InputError(f"{folder}: no such image folder")
    files = sorted(os.path.join(root, f) for root, _, names in os.walk(folder) for f in names
                   if f.lower().endswith(IMAGE_SUFFIXES))
    if not files:
        raise InputError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def picks(seed: int, step: int, rank: int, world: int, batch_size: int, count: int, micro: int = 0) -> list[int]:
    """Record indices for one process's micro-batch: the global batch of a step is drawn from
    (seed, step, micro) and split by rank, so one process with world x batch sees the same records."""
    rng = random.Random(f"{seed}-{step}-{micro}")
    chosen = [rng.randrange(count) for _ in range(batch_size * world)]
    return chosen[rank * batch_size:(rank + 1) * batch_size]


class Examples:
    """Images + token ids + labels for the LM loss, built from records of either format."""

    def __init__(self, path: str, tokenizer: Tokenizer, template: ChatTemplate, image_size: int, max_tiles: int,
                 system: bool = True):
        self.records = read_jsonl(path)
        self.root = os.path.dirname(os.path.abspath(path))
        self.tokenizer, self.template = tokenizer, template
        self.image_size, self.max_tiles = image_size, max_tiles
        self.system = system

    def __len__(self):
        return len(self.records)

    def pixels(self, record: dict):
        if "image" not in record:
            return None
        path = record["image"] if os.path.isabs(record["image"]) else os.path.join(self.root, record["image"])
        return preprocess_image(load_image(path), max_num=self.max_tiles, image_size=self.image_size)

    def example(self, index: int) -> tuple[list[int], list[int], np.ndarray | None]:
        record = self.records[index]
        pixels = self.pixels(record)
        tiles = 0 if pixels is None else len(pixels)
        if "conversations" in record:
            ids, labels = encode_chat(self.tokenizer, self.template, record["conversations"], tiles, self.system)
        else:  # read_jsonl let through only records with one or the other
            ids, labels = encode_caption(self.tokenizer, self.template, record["text"], tiles)
        return ids, labels, pixels


def encode_caption(tokenizer: Tokenizer, template: ChatTemplate, text: str, tiles: int) -> tuple[list, list]:
    """[bos] image block, newline (no loss) + caption </s> (loss)."""
    prompt = tokenizer.encode(template.image_block(tiles) + "\n" if tiles else "", bos=True)
    target = tokenizer.encode(text) + [tokenizer.eos_id]
    return prompt + target, [IGNORE] * len(prompt) + target


def encode_chat(tokenizer: Tokenizer, template: ChatTemplate, turns: list[dict], tiles: int,
                system: bool = True) -> tuple[list, list]:
    """A conversation in the internlm2-chat template; loss on the assistant's tokens and <|im_end|>."""
    ids = tokenizer.encode(template.system_block() if system else "", bos=True)
    labels = [IGNORE] * len(ids)
    im_end = tokenizer.token_id(IM_END)
    for turn in turns:
        if turn["from"] in ("human", "user"):
            part = tokenizer.encode(template.user_turn(turn["value"], tiles))  # the image goes in the first turn
            tiles = 0
            ids += part
            labels += [IGNORE] * len(part)
        else:
            part = tokenizer.encode(turn["value"]) + [im_end]
            ids += part
            labels += part
    return ids, labels


def collate(examples: list[tuple[list, list, np.ndarray | None]], pad_id: int) -> dict:
    """Examples packed into rows as long as the longest of them, each into the first row it fits
    (a stage-3 step of the shapes demo computes about a tenth fewer positions than with one padded
    example a row). Each example keeps its own positions (from 0) and sees only itself:
    `attention_mask` is the boolean block-causal mask [rows, 1, L, L] the model takes as it is.
    Images follow in sequence order, as the model's merge reads them."""
    length = max(len(ids) for ids, _, _ in examples)
    rows, used = [], []
    for example in examples:
        size = len(example[0])
        row = next((r for r, taken in enumerate(used) if taken + size <= length), None)
        if row is None:
            rows.append([])
            used.append(0)
            row = len(rows) - 1
        rows[row].append(example)
        used[row] += size
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), length), dtype=torch.long)
    mask = torch.zeros((len(rows), 1, length, length), dtype=torch.bool)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    for r, packed in enumerate(rows):
        start = 0
        for ids, target, _ in packed:
            end = start + len(ids)
            input_ids[r, start:end] = torch.tensor(ids)
            labels[r, start + 1:end] = torch.tensor(target[1:])  # never the previous example's next token
            positions[r, start:end] = torch.arange(len(ids))
            mask[r, 0, start:end, start:end] = causal[:len(ids), :len(ids)]
            start = end
    images = [torch.from_numpy(p) for packed in rows for _, _, p in packed if p is not None]
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask, "position_ids": positions,
            "pixel_values": torch.cat(images) if images else None}
