"""Read a SentencePiece `tokenizer.model` (a protobuf) without sentencepiece or protobuf, and turn a
BPE model with byte fallback into a `tokenizers` Tokenizer that encodes as SentencePiece does.
Only the fields the conversion needs are read. Torch-free."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from hovle_edge.errors import InputError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
MODEL_TYPES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}


@dataclass
class SentencePieceModel:
    pieces: list[tuple[str, float, int]] = field(default_factory=list)  # (piece, score, type)
    model_type: int = 1
    byte_fallback: bool = False
    unk_id: int = 0
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    normalizer_name: str = ""
    precompiled_charsmap: bytes = b""


def _fields(data: bytes):
    """Yield (field number, wire type, value) of one protobuf message."""
    pos = 0

    def varint():
        nonlocal pos
        result = shift = 0
        while True:
            byte = data[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            if byte < 0x80:
                return result
            shift += 7

    while pos < len(data):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            yield number, wire, varint()
        elif wire == 1:
            yield number, wire, data[pos:pos + 8]
            pos += 8
        elif wire == 2:
            length = varint()
            yield number, wire, data[pos:pos + length]
            pos += length
        elif wire == 5:
            yield number, wire, data[pos:pos + 4]
            pos += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > len(data):
            raise ValueError("message ends inside a field")


def read_model(path: str) -> SentencePieceModel:
    try:
        with open(path, "rb") as f:
            data = f.read()
        return _parse(data)
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e})") from e
    except (ValueError, IndexError, UnicodeDecodeError, struct.error) as e:
        raise InputError(f"{path}: not a SentencePiece model ({e})") from e


def _parse(data: bytes) -> SentencePieceModel:
    model = SentencePieceModel()
    for number, _, value in _fields(data):
        if number == 1:  # ModelProto.pieces
            piece, score, kind = "", 0.0, NORMAL
            for n, _, v in _fields(value):
                if n == 1:
                    piece = v.decode("utf-8")
                elif n == 2:
                    score = struct.unpack("<f", v)[0]
                elif n == 3:
                    kind = v
            model.pieces.append((piece, score, kind))
        elif number == 2:  # TrainerSpec
            for n, _, v in _fields(value):
                if n == 3:
                    model.model_type = v
                elif n == 35:
                    model.byte_fallback = bool(v)
                elif n == 40:
                    model.unk_id = v
        elif number == 3:  # NormalizerSpec
            for n, _, v in _fields(value):
                if n == 1:
                    model.normalizer_name = v.decode("utf-8")
                elif n == 2:
                    model.precompiled_charsmap = bytes(v)
                elif n == 3:
                    model.add_dummy_prefix = bool(v)
                elif n == 4:
                    model.remove_extra_whitespaces = bool(v)
    if not model.pieces:
        raise ValueError("no pieces")
    return model


def bpe_merges(model: SentencePieceModel) -> list[tuple[str, str]]:
    """Merges for an HF BPE equivalent to SentencePiece's: every split of a piece into two pieces of
    the vocabulary, ranked by the merged piece's score (SentencePiece merges the best-scored pair)."""
    ids = {piece: i for i, (piece, _, _) in enumerate(model.pieces)}
    merges = []
    for piece, score, kind in model.pieces:
        if kind != NORMAL:
            continue
        local = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in ids and piece[k:] in ids]
        local.sort(key=lambda pair: (ids[pair[0]], ids[pair[1]]))
        merges.extend((left, right, score) for left, right in local)
    merges.sort(key=lambda m: m[2], reverse=True)  # stable: ties keep vocabulary order
    return [(left, right) for left, right, _ in merges]


def to_tokenizer(model: SentencePieceModel, where: str):
    """A `tokenizers.Tokenizer` that encodes and decodes as this SentencePiece BPE model."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers

    if MODEL_TYPES.get(model.model_type) != "bpe":
        raise InputError(f"{where}: a {MODEL_TYPES.get(model.model_type, model.model_type)} SentencePiece "
                         "model; HoVLE/InternLM2 tokenizers are BPE")
    vocab = {piece: i for i, (piece, _, _) in enumerate(model.pieces)}
    unk = model.pieces[model.unk_id][0]
    tokenizer = Tokenizer(models.BPE(vocab, bpe_merges(model), unk_token=unk, fuse_unk=True,
                                     byte_fallback=model.byte_fallback))
    steps = []
    if model.precompiled_charsmap and model.normalizer_name not in ("", "identity"):
        steps.append(normalizers.Precompiled(model.precompiled_charsmap))
    if model.remove_extra_whitespaces:
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if model.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    steps.append(normalizers.Replace(" ", "▁"))
    tokenizer.normalizer = normalizers.Sequence(steps)
    decode_steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if model.add_dummy_prefix:
        decode_steps.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(decode_steps)
    tokenizer.add_special_tokens([AddedToken(p, special=True, normalized=False)
                                  for p, _, kind in model.pieces if kind in (CONTROL, UNKNOWN)])
    tokenizer.add_tokens([AddedToken(p, special=False, normalized=False)
                          for p, _, kind in model.pieces if kind == USER_DEFINED])
    return tokenizer
