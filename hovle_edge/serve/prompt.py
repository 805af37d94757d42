"""A request's turns -> token ids, through the model's chat template only: the template inserts every
control token, so user, system and assistant text stay plain text whatever they contain."""

from __future__ import annotations

from dataclasses import dataclass, replace

from hovle_edge.serve.protocol import Turn
from hovle_edge.tokenizer import IM_END, IMG_START, ChatTemplate, Prompt, Tokenizer, join


@dataclass
class PromptIds:
    ids: list[int]
    image_starts: list[int]  # the position of each image block's first token, in image order


def conversation(template: ChatTemplate, turns: list[Turn], tiles: list[int]) -> Prompt:
    """System block, earlier (user, assistant) turns, then the last user turn opening the answer;
    `tiles` gives each image's tile count in order. No system message: the model's own."""
    if turns[0].role == "system":
        template, turns = replace(template, system=turns[0].text), turns[1:]
    images = iter(tiles)
    parts = [template.system_block()]
    for turn in turns:
        if turn.role == "user":
            parts.append(template.user_turn(turn.text, next(images) if turn.image is not None else 0))
        else:  # an earlier answer, closed as the template closes answers in its history
            parts.append(turn.text + Prompt.control(IM_END))
    return join(parts)


def prompt_ids(tokenizer: Tokenizer, template: ChatTemplate, turns: list[Turn], tiles: list[int]) -> PromptIds:
    ids = tokenizer.encode(conversation(template, turns, tiles), bos=True)
    image_start = tokenizer.token_id(IMG_START)
    return PromptIds(ids, [i for i, token in enumerate(ids) if token == image_start])
