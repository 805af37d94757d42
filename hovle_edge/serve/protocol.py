"""The OpenAI chat-completions request as this server reads it (checked field by field, each refusal
a 400 that names the field) and the JSON it answers with."""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field

from hovle_edge.errors import InputError
from hovle_edge.runtime.sampling import SamplingParams
from hovle_edge.serve.settings import RequestError
from hovle_edge.tokenizer import IMAGE_PLACEHOLDER

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOPS = 4  # as the OpenAI API


@dataclass
class ImageRef:
    url: str
    where: str  # e.g. messages[1].content[0], for error messages


@dataclass
class Turn:
    role: str  # system | user | assistant
    text: str
    image: ImageRef | None = None  # at most one per user turn; the template places its block


@dataclass
class ChatRequest:
    model: str
    turns: list[Turn]
    sampling: SamplingParams
    max_tokens: int | None = None  # None: until a stop or the end of the context
    stop: list[str] = field(default_factory=list)
    stream: bool = False

    @property
    def images(self) -> list[ImageRef]:
        return [t.image for t in self.turns if t.image is not None]


def parse_chat_request(body) -> ChatRequest:
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError(400, "`model` is required (see GET /v1/models)", param="model")
    if body.get("n", 1) != 1:
        raise RequestError(400, "only n=1 is supported", param="n")
    turns = _turns(body.get("messages"))
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < 1):
        raise RequestError(400, f"max_tokens must be a whole number >= 1 (got {max_tokens!r})", param="max_tokens")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(400, "stream must be true or false", param="stream")
    return ChatRequest(model=model, turns=turns, sampling=_sampling(body, max_tokens), max_tokens=max_tokens,
                       stop=_stops(body.get("stop")), stream=stream)


def _turns(messages) -> list[Turn]:
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "`messages` is required: a non-empty list of chat messages", param="messages")
    turns = [_turn(m, f"messages[{i}]") for i, m in enumerate(messages)]
    chat = turns[1:] if turns[0].role == "system" else turns
    for i, turn in enumerate(chat):  # user and assistant take turns and the user speaks last
        expected = "user" if i % 2 == 0 else "assistant"
        if turn.role != expected:
            raise RequestError(400, f"messages: expected a {expected} message at position "
                                    f"{i + len(turns) - len(chat)} (an optional system message first, then user "
                                    f"and assistant in turn), got {turn.role}", param="messages")
    if not chat or chat[-1].role != "user":
        raise RequestError(400, "messages: the last message must be the user's", param="messages")
    return turns


def _turn(message, where: str) -> Turn:
    if not isinstance(message, dict):
        raise RequestError(400, f"{where} must be an object with role and content", param=where)
    role = ROLES.get(message.get("role"))
    if role is None:
        raise RequestError(400, f"{where}.role must be one of {', '.join(ROLES)} (got {message.get('role')!r})",
                           param=where)
    content = message.get("content")
    if isinstance(content, str):
        return Turn(role, content)
    if not isinstance(content, list):
        raise RequestError(400, f"{where}.content must be a string or a list of parts", param=where)
    texts, image = [], None
    for j, part in enumerate(content):
        part_where = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url" and role == "user":
            if image is not None:
                raise RequestError(400, f"{part_where}: one image per message (send further images in later "
                                        "messages)", param=part_where)
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            image = ImageRef(url, part_where)
            if texts:  # the image block goes where the part is (the template puts it first otherwise)
                texts.append(IMAGE_PLACEHOLDER)
        else:
            raise RequestError(400, f"{part_where}: expected a text part{' or an image_url part' if role == 'user' else ''}",
                               param=part_where)
    return Turn(role, "\n".join(texts), image)


def _sampling(body: dict, max_tokens: int | None) -> SamplingParams:
    values = {"temperature": body.get("temperature", 1.0), "top_p": body.get("top_p", 1.0)}
    for name, value in values.items():
        if value is None:
            values[name] = 1.0
        elif not _is_number(value):
            raise RequestError(400, f"{name} must be a number (got {value!r})", param=name)
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise RequestError(400, f"seed must be a whole number (got {seed!r})", param="seed")
    try:
        return SamplingParams(max_new_tokens=max_tokens or 1, seed=seed, **values)
    except InputError as e:
        raise RequestError(400, str(e)) from e


def _stops(stop) -> list[str]:
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOPS:
        raise RequestError(400, f"stop must be a non-empty string or a list of at most {MAX_STOPS}", param="stop")
    return stops


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# Answers.

def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


# `timings` (server milliseconds) rides along as llama.cpp's server sends it; clients ignore it.

def completion(request_id: str, model: str, text: str, finish_reason: str, usage_counts: dict,
               timings: dict) -> dict:
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish_reason, "logprobs": None}],
            "usage": usage_counts, "timings": timings}


def chunk(request_id: str, model: str, delta: dict, finish_reason: str | None = None,
          usage_counts: dict | None = None, timings: dict | None = None) -> dict:
    body = {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}
    if usage_counts is not None:
        body["usage"], body["timings"] = usage_counts, timings
    return body
