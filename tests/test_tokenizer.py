"""Tokenizers: SentencePiece parity on a real BPE model with byte fallback, added tokens as single
ids, the internlm2-chat template with HoVLE's image block, streaming of multi-byte text."""

import json
import os
import random
import shutil

import pytest

from hovle_edge.errors import InputError
from hovle_edge.tokenizer import IMG_CONTEXT, ChatTemplate, Prompt, StreamDecoder, Tokenizer, train_tokenizer

spm = pytest.importorskip("sentencepiece")
mistral_common = pytest.importorskip("mistral_common")
SP_MODEL = os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1")
ADDED = {"<|im_end|>": 32000, "<|im_start|>": 32001, "<img>": 32002, "</img>": 32003, "<IMG_CONTEXT>": 32004}


def varied_strings():
    fixed = ["Hello world", " leading space", "two  spaces", "tab\tand\nnewline\n\n", "日本語のテキスト",
             "emoji 😀🎉 ok", "1234567890123456789", "   ", "", "a", "\n", "  x  ", "Ünïcödé façade",
             "中文和English混合", "don't stop", "x" * 60, "price: $12.50 (net)", "안녕하세요 세계",
             "line one\r\nline two", "\u200bzero width", "ℕ ≠ ℝ ∑∫", "ﬁ ligature", "mixed\t \t whitespace"]
    rng = random.Random(0)
    alphabet = list("abcdefgh XYZ\t\n0123456789.,!?'\"-") + ["日", "本", "😀", "é", "ß", "\u200b", "€", "  "]
    return fixed + ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(300)]


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("internlm2-like")
    shutil.copyfile(SP_MODEL, directory / "tokenizer.model")
    (directory / "added_tokens.json").write_text(json.dumps(ADDED))
    return directory


def test_parity_with_sentencepiece(sp_dir):
    sp = spm.SentencePieceProcessor(model_file=SP_MODEL)
    tokenizer = Tokenizer.from_dir(str(sp_dir))
    strings = varied_strings()
    assert len(strings) >= 300
    mismatched = [s for s in strings if tokenizer.encode(s) != sp.encode(s)]
    assert mismatched == []
    assert all(tokenizer.decode(sp.encode(s)) == sp.decode(sp.encode(s)) for s in strings)


def test_convert_writes_an_equivalent_tokenizer_json(sp_dir, tmp_path):
    from click.testing import CliRunner

    from hovle_edge.cli import main

    work = tmp_path / "ckpt"
    shutil.copytree(sp_dir, work)
    result = CliRunner().invoke(main, ["convert-tokenizer", str(work)])
    assert result.exit_code == 0, result.output
    assert (work / "tokenizer.json").exists()
    os.remove(work / "tokenizer.model")  # the json alone must do
    converted, original = Tokenizer.from_dir(str(work)), Tokenizer.from_dir(str(sp_dir))
    for s in varied_strings()[:50]:
        assert converted.encode(s) == original.encode(s)


def test_special_tokens_are_single_ids_and_text_around_them_is_unchanged(sp_dir):
    sp = spm.SentencePieceProcessor(model_file=SP_MODEL)
    tokenizer = Tokenizer.from_dir(str(sp_dir))
    ids = tokenizer.encode(Prompt.trusted("<|im_start|>user\n<img><IMG_CONTEXT><IMG_CONTEXT></img>\nWhat is this?<|im_end|>"))
    assert ids[0] == 32001 and ids.count(32004) == 2 and 32002 in ids and 32003 in ids and ids[-1] == 32000
    assert ids[1:ids.index(32002)] == sp.encode("user\n")
    assert ids[ids.index(32003) + 1:-1] == sp.encode("\nWhat is this?")
    assert tokenizer.stop_ids == [2, 32001, 32000]
    assert tokenizer.encode("hi", bos=True)[0] == 1


def test_added_tokens_with_a_gap_are_refused(sp_dir, tmp_path):
    work = tmp_path / "gap"
    shutil.copytree(sp_dir, work)
    (work / "added_tokens.json").write_text(json.dumps({"<|im_end|>": 32005}))
    with pytest.raises(InputError, match="should have id 32005"):
        Tokenizer.from_dir(str(work))


def test_missing_and_broken_tokenizer_files(tmp_path):
    with pytest.raises(InputError, match="no tokenizer.json or tokenizer.model"):
        Tokenizer.from_dir(str(tmp_path))
    (tmp_path / "tokenizer.model").write_bytes(b"\xff\xff\xff garbage")
    with pytest.raises(InputError, match="tokenizer.model: not a SentencePiece model"):
        Tokenizer.from_dir(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(InputError, match="tokenizer.json: not a valid tokenizer.json"):
        Tokenizer.from_dir(str(tmp_path))


def test_chat_template():
    template = ChatTemplate(tokens_per_tile=3, system="Be brief.")
    prompt = template.prompt("What colour?", tiles=2, history=[("Hi", "Hello.")])
    assert prompt == ("<|im_start|>system\nBe brief.<|im_end|>"
                      "<|im_start|>user\nHi<|im_end|><|im_start|>assistant\nHello.<|im_end|>"
                      "<|im_start|>user\n<img>" + IMG_CONTEXT * 6 + "</img>\nWhat colour?<|im_end|>"
                      "<|im_start|>assistant\n")
    # The <image> placeholder puts the block where the user wrote it.
    assert template.with_image("Look: <image> now", 1) == "Look: <img>" + IMG_CONTEXT * 3 + "</img> now"
    assert ChatTemplate(system=None).prompt("q") == "<|im_start|>user\nq<|im_end|><|im_start|>assistant\n"
    assert ChatTemplate().image_block(1).count(IMG_CONTEXT) == 256


def test_image_block_size_comes_from_the_config():
    from hovle_edge.config import preset

    config = preset("tiny")
    assert ChatTemplate(tokens_per_tile=config.tokens_per_tile).image_block(2).count(IMG_CONTEXT) == 2 * 4


@pytest.fixture(scope="module")
def trained():
    texts = ["a red circle at the top left", "what colour is the square? blue", "日本語 😀 café"] * 40
    return train_tokenizer(texts, 400)


def test_trained_tokenizer_layout(trained):
    assert trained.token_id("<IMG_CONTEXT>") == 7 and trained.token_id("<|im_end|>") == 4
    assert trained.token_id("<0xE6>") == 14 + 0xE6
    assert trained.decode(trained.encode("a red circle")) == "a red circle"


@pytest.mark.parametrize("text", ["a red circle", "日本語 😀 café! ñ", "never seen: ζ𝛑 🦄 done"])
def test_streaming_concatenates_to_the_whole(trained, text):
    ids = trained.encode(text)
    stream = StreamDecoder(trained)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == trained.decode(ids)
    assert all("\ufffd" not in p for p in pieces)


def test_tokenizer_save_and_load(trained, tmp_path):
    trained.save(str(tmp_path))
    again = Tokenizer.from_dir(str(tmp_path))
    assert again.encode("a red circle") == trained.encode("a red circle")
    assert again.stop_ids == trained.stop_ids


def test_streaming_random_ids_including_invalid_byte_runs(trained):
    rng = random.Random(1)
    for _ in range(50):
        ids = [rng.randrange(trained.vocab_size) for _ in range(rng.randint(1, 30))]
        stream = StreamDecoder(trained)
        pieces = [stream.push(i) for i in ids] + [stream.flush()]
        assert "".join(pieces) == trained.decode(ids)


def test_world_tokenizer_has_one_piece_per_word():
    """Every word of the shapes world is one piece: alone (as an answer is encoded), after a space
    (with the same id, so an answer is the word of a description) and before punctuation; and so is
    every word that starts a line inside the template (answers, questions' first words, roles)."""
    from hovle_edge.shapes import world as shapes

    tokenizer = shapes.world_tokenizer()
    answers = [*shapes.SHAPES, *shapes.COLOURS, *shapes.NUMBERS, "nothing", "top", "bottom"]
    for word in answers + [*shapes.SIZES, "left", "right", "colour"]:
        alone = tokenizer.encode(word)
        assert len(alone) == 1 and tokenizer.encode(f"a {word}")[1:] == alone, word
        assert tokenizer.encode(f"the {word}?")[1:-1] == alone, word
    for word in answers + ["what", "where", "how", "user", "assistant"]:
        assert len(tokenizer.encode(f"the\n{word}")) == 3, word


def test_streaming_skips_ids_the_tokenizer_lacks(trained):
    """A model's vocabulary can be larger than its tokenizer's; such ids decode to nothing, and a
    byte run around one is still one run (as in a whole decode)."""
    newline, unknown = trained.token_id("<0x0A>"), trained.vocab_size + 5
    ids = [trained.token_id("<0xBB>"), newline, unknown, newline]
    stream = StreamDecoder(trained)
    assert "".join([stream.push(i) for i in ids] + [stream.flush()]) == trained.decode(ids)
