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
        self.special_ids = {i for i, token in backend.get_added_tokens_decoder().items() if token.special}
        self._plain_backend = None

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
        """Ids of `text`. Special-token strings become control ids only where the chat template put
        them (the control spans of a `Prompt`); anywhere else, as in a user's question, they are text."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # bytes that were not UTF-8, kept as surrogates by the OS layer
            raise InputError(f"the text is not valid UTF-8 (character {e.start}: {text[e.start:e.end]!r}); "
                             "give the prompt as UTF-8 text") from e
        ids = self._encode_prompt(text if isinstance(text, Prompt) else Prompt(text))
        return [self.bos_id] + ids if bos and self.add_bos else ids

    def _encode_prompt(self, prompt: "Prompt") -> list[int]:
        text = str(prompt)
        encoding = self.backend.encode(text, add_special_tokens=False)
        tokens = list(zip(encoding.ids, encoding.offsets))
        controls = set(prompt.controls)
        forged = [start for token_id, (start, end) in tokens
                  if token_id in self.special_ids and (start, end) not in controls]
        if not forged:  # the usual case: exactly the ids of one pass over the whole text
            return encoding.ids
        ids, at = [], 0
        for start, end, is_control in prompt.segments():
            inside = []  # tokens never cross a control: a segment's tokens are those that start in it
            while at < len(tokens) and tokens[at][1][0] < end:
                inside.append(tokens[at][0])
                at += 1
            if not is_control and self.special_ids.intersection(inside):
                ids += self._plain_ids(text[start:end])
            else:
                ids += inside
        return ids

    def _plain_ids(self, text: str) -> list[int]:
        """`text` with special-token strings split like any other text (by a second backend whose
        special tokens do not match, so that nothing has to be switched back and forth)."""
        if self._plain_backend is None:
            from tokenizers import Tokenizer as Backend

            self._plain_backend = Backend.from_str(self.backend.to_str())
            self._plain_backend.encode_special_tokens = True
        ids = self._plain_backend.encode(text, add_special_tokens=False).ids
        if self.special_ids.intersection(ids):  # a vocabulary whose merges spell a control token
            raise InputError(f"the text {text[:40]!r} cannot be encoded without control tokens by this tokenizer")
        return ids

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


class Prompt(str):
    """Text built by the chat template: a str that also knows the spans of the control tokens the
    template itself inserted. Only those spans encode to control ids; the same strings in a user's
    question, a system text or an answer are plain text. Adding a plain str adds plain text."""

    controls: tuple

    def __new__(cls, text: str = "", controls=()):
        prompt = super().__new__(cls, text)
        prompt.controls = tuple(controls)
        return prompt

    @classmethod
    def control(cls, token: str) -> "Prompt":
        return cls(token, ((0, len(token)),))

    @classmethod
    def trusted(cls, text: str) -> "Prompt":
        """Every special-token string in `text` as a control: for text the program wrote, never a user."""
        pattern = "|".join(re.escape(t) for t in sorted(SPECIAL_TOKENS, key=len, reverse=True))
        return cls(text, tuple(m.span() for m in re.finditer(pattern, text)))

    def __add__(self, other):
        if not isinstance(other, str):
            return NotImplemented
        shift = len(self)
        moved = tuple((s + shift, e + shift) for s, e in getattr(other, "controls", ()))
        return Prompt(str.__add__(self, other), self.controls + moved)

    def __radd__(self, other):
        if not isinstance(other, str):
            return NotImplemented
        return Prompt(other) + self

    def segments(self) -> list[tuple[int, int, bool]]:
        """(start, end, is_control) runs covering the whole text, in order."""
        runs, at = [], 0
        for start, end in sorted(self.controls):
            if start > at:
                runs.append((at, start, False))
            runs.append((start, end, True))
            at = end
        if at < len(self):
            runs.append((at, len(self), False))
        return runs


def join(parts) -> Prompt:
    """The Prompt of `parts` one after another (str.join would drop the control spans)."""
    texts, controls, at = [], [], 0
    for part in parts:
        controls += [(s + at, e + at) for s, e in getattr(part, "controls", ())]
        texts.append(part)
        at += len(part)
    return Prompt("".join(texts), controls)


C = Prompt.control


@dataclass
class ChatTemplate:
    """internlm2-chat: `<|im_start|>role\\n...<|im_end|>` turns, HoVLE's image block in the user turn.
    Every method returns a Prompt: user and system text in it stay plain text when encoded."""

    tokens_per_tile: int = 256
    system: str | None = INTERNVL_SYSTEM

    def image_block(self, tiles: int) -> Prompt:
        return join([C(IMG_START)] + [C(IMG_CONTEXT)] * (tiles * self.tokens_per_tile) + [C(IMG_END)])

    def with_image(self, question: str, tiles: int) -> Prompt:
        """The first `<image>` placeholder becomes the image block; without one the block goes first."""
        if tiles == 0:
            return Prompt(question)
        if IMAGE_PLACEHOLDER not in question:
            question = IMAGE_PLACEHOLDER + "\n" + question
        before, after = question.split(IMAGE_PLACEHOLDER, 1)
        return before + self.image_block(tiles) + after

    def system_block(self) -> Prompt:
        return Prompt() if self.system is None else C(IM_START) + "system\n" + self.system + C(IM_END)

    def user_turn(self, question: str, tiles: int = 0) -> Prompt:
        """A user turn and the opening of the assistant's answer."""
        return (C(IM_START) + "user\n" + self.with_image(question, tiles) + C(IM_END) + C(IM_START)
                + "assistant\n")

    def prompt(self, question: str, tiles: int = 0, history: list[tuple[str, str]] = ()) -> Prompt:
        """The whole conversation: system, earlier (question, answer) turns, the new question."""
        past = join(self.user_turn(q) + a + C(IM_END) for q, a in history)
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
