"""Tokenizer loading (tokenizer.json, or an InternLM2 tokenizer.model plus added_tokens.json), the
internlm2-chat template with HoVLE's image block, incremental detokenization for streaming, and a
small trainer for tokenizers of our own worlds. Uses `tokenizers` only; torch-free."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

from hovle_edge.errors import InputError
from hovle_edge.files import atomic_file, read_json

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
IMAGE_PLACEHOLDER = "<image>"
# InternVL's fixed layout of special tokens, in the order our own tokenizers give them ids.
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", IM_START, IM_END, IMG_START, IMG_END, IMG_CONTEXT,
                  "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]
BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")
INTERNVL_SYSTEM = ("你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, "
                   "是一个有用无害的人工智能助手。")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "added_tokens.json", "generation_config.json")


class Tokenizer:
    """Text <-> ids. Special tokens written in the text are single ids and are never split."""

    def __init__(self, backend, add_bos: bool = True, stop_tokens: list[int] | None = None):
        self.backend = backend
        self.bos_id = backend.token_to_id("<s>")
        self.eos_id = backend.token_to_id("</s>")
        self.add_bos = add_bos and self.bos_id is not None
        self.byte_ids = {i for token, i in backend.get_vocab().items() if BYTE_TOKEN.fullmatch(token)}
        chat_stops = [self.eos_id, backend.token_to_id(IM_START), backend.token_to_id(IM_END)]
        self.stop_ids = stop_tokens or [i for i in chat_stops if i is not None]

    @classmethod
    def from_dir(cls, directory: str) -> "Tokenizer":
        """Load from tokenizer.json, or else convert tokenizer.model (+ added_tokens.json) in memory."""
        from tokenizers import Tokenizer as Backend

        json_path = os.path.join(directory, "tokenizer.json")
        if os.path.isfile(json_path):
            try:
                backend = Backend.from_file(json_path)
            except Exception as e:  # tokenizers raises a bare Exception on a malformed file
                raise InputError(f"{json_path}: not a valid tokenizer.json ({e})") from e
        elif os.path.isfile(os.path.join(directory, "tokenizer.model")):
            backend = from_sentencepiece(directory)
        else:
            raise InputError(f"{directory}: no tokenizer.json or tokenizer.model")
        config = _read_json(os.path.join(directory, "tokenizer_config.json"))
        generation = _read_json(os.path.join(directory, "generation_config.json"))
        stops = generation.get("eos_token_id")
        stops = [stops] if isinstance(stops, int) else stops
        return cls(backend, add_bos=config.get("add_bos_token", True), stop_tokens=stops)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int:
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise InputError(f"the tokenizer has no token {token!r}")
        return token_id

    def encode(self, text: str, bos: bool = False) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return [self.bos_id] + ids if bos and self.add_bos else ids

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def save(self, directory: str) -> None:
        self.backend.save(os.path.join(directory, "tokenizer.json"))
        with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump({"add_bos_token": self.add_bos}, f)
        with open(os.path.join(directory, "generation_config.json"), "w", encoding="utf-8") as f:
            json.dump({"eos_token_id": self.stop_ids}, f)


def _read_json(path: str) -> dict:
    """An optional tokenizer side file: {} when it is absent."""
    return read_json(path, InputError) if os.path.isfile(path) else {}


def from_sentencepiece(directory: str):
    """tokenizer.model (SentencePiece BPE) + added_tokens.json -> a `tokenizers` Tokenizer whose
    added tokens keep the ids the file gives them."""
    from tokenizers import AddedToken

    from hovle_edge.sentencepiece_model import read_model, to_tokenizer

    model_path = os.path.join(directory, "tokenizer.model")
    backend = to_tokenizer(read_model(model_path), model_path)
    added_path = os.path.join(directory, "added_tokens.json")
    added = _read_json(added_path)
    for token, token_id in sorted(added.items(), key=lambda item: item[1]):
        backend.add_special_tokens([AddedToken(token, special=True, normalized=False)])
        if backend.token_to_id(token) != token_id:
            raise InputError(f"{added_path}: {token!r} should have id {token_id} but the vocabulary gives it "
                             f"{backend.token_to_id(token)} (ids must follow the base vocabulary without gaps)")
    return backend


def convert_tokenizer(directory: str) -> str:
    """Write tokenizer.json beside tokenizer.model so that the runtime needs no sentencepiece."""
    backend = from_sentencepiece(directory)
    target = os.path.join(directory, "tokenizer.json")
    with atomic_file(target) as tmp:
        backend.save(tmp)
    return target


@dataclass
class ChatTemplate:
    """internlm2-chat: `<|im_start|>role\\n...<|im_end|>` turns, HoVLE's image block in the user turn."""

    tokens_per_tile: int = 256
    system: str | None = INTERNVL_SYSTEM

    def image_block(self, tiles: int) -> str:
        return IMG_START + IMG_CONTEXT * (tiles * self.tokens_per_tile) + IMG_END

    def with_image(self, question: str, tiles: int) -> str:
        """The `<image>` placeholder becomes the image block; without one the block goes first."""
        if tiles == 0:
            return question
        if IMAGE_PLACEHOLDER not in question:
            question = IMAGE_PLACEHOLDER + "\n" + question
        return question.replace(IMAGE_PLACEHOLDER, self.image_block(tiles), 1)

    def system_block(self) -> str:
        return "" if self.system is None else f"{IM_START}system\n{self.system}{IM_END}"

    def user_turn(self, question: str, tiles: int = 0) -> str:
        """A user turn and the opening of the assistant's answer."""
        return f"{IM_START}user\n{self.with_image(question, tiles)}{IM_END}{IM_START}assistant\n"

    def prompt(self, question: str, tiles: int = 0, history: list[tuple[str, str]] = ()) -> str:
        """The whole conversation as text: system, earlier (question, answer) turns, the new question."""
        past = "".join(self.user_turn(q) + a + IM_END for q, a in history)
        return self.system_block() + past + self.user_turn(question, tiles)


class StreamDecoder:
    """Turns token ids into text pieces as they arrive, so that the pieces concatenate to exactly
    the decoding of all ids. Byte-fallback tokens are held back until their run ends (a run decodes
    as one UTF-8 sequence), and each window keeps the previous token as left context (decoders strip
    a leading space from the first token of what they decode)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.start = 0  # the window decoded at each step begins here
        self.shown = 0  # characters of the window's text already emitted

    def push(self, token_id: int) -> str:
        if not 0 <= token_id < self.tokenizer.vocab_size:
            return ""  # an id the tokenizer lacks decodes to nothing, and a whole decode skips it
        self.ids.append(token_id)
        if token_id in self.tokenizer.byte_ids:
            return ""
        text = self.tokenizer.decode(self.ids[self.start:])
        piece = text[self.shown:]
        self.start = len(self.ids) - 1
        self.shown = len(self.tokenizer.decode(self.ids[self.start:]))
        return piece

    def flush(self) -> str:
        piece = self.tokenizer.decode(self.ids[self.start:])[self.shown:]
        self.start, self.shown = len(self.ids), 0
        return piece


def train_tokenizer(texts, vocab_size: int) -> Tokenizer:
    """A SentencePiece-style BPE with byte fallback trained on `texts`, with InternVL's special tokens
    at ids 0..13 and the 256 byte tokens after them, so multi-byte text never becomes <unk>."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as Backend

    # Newlines and punctuation are pieces of their own, so that "circle?" in a question is the "circle"
    # of a description and a turn's first word (after "user\n") is a word, not a merge across lines.
    meta = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", behavior="isolated"),
                                    pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True),
                                    pre_tokenizers.Punctuation()])
    learned_size = vocab_size - len(BYTE_TOKENS)
    trainer = trainers.BpeTrainer(vocab_size=learned_size, special_tokens=SPECIAL_TOKENS,
                                  min_frequency=2, show_progress=False)
    draft = Backend(models.BPE(unk_token="<unk>"))
    draft.pre_tokenizer = meta
    draft.train_from_iterator(texts, trainer)
    trained = json.loads(draft.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    pieces = [p for p, _ in sorted(trained["vocab"].items(), key=lambda item: item[1]) if p not in SPECIAL_TOKENS]
    vocab = {p: i for i, p in enumerate(SPECIAL_TOKENS + BYTE_TOKENS + pieces)}
    backend = Backend(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    backend.pre_tokenizer = meta
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(content=" ", left=1, right=0)])
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return Tokenizer(backend)
