"""The interactive loop behind `hovle-edge chat`: one Conversation, its caches kept between turns."""

from __future__ import annotations

import os

from hovle_edge.errors import InputError

# Fewer free slots than this cannot hold a user turn's template and a short question and answer.
NEXT_TURN_TOKENS = 16


def chat_loop(pipe, image, sampling: dict, read, write) -> None:
    """`read()` returns the user's next line (EOFError ends); `write(text, nl=...)` shows output."""
    conversation = pipe.conversation()
    write("type a question; /image PATH, /reset, /exit")
    while True:
        try:
            line = read().strip()
        except (EOFError, KeyboardInterrupt):
            return
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            conversation, image = pipe.conversation(), None
            write("(conversation reset)")
            continue
        if line.startswith("/image"):
            path = line[len("/image"):].strip()
            if not os.path.isfile(path):
                write(f"error: {path or '(no path)'}: no such image file")
                continue
            image = path
            write(f"(next question is about {path})")
            continue
        failed = False
        try:
            for piece in conversation.ask(line, image, **sampling):
                write(piece, nl=False)
            write("")
        except InputError as e:
            write(f"error: {e}")
            failed = True
        image = None  # an image belongs to the turn it was given for
        cache = conversation.cache
        if cache.room() < NEXT_TURN_TOKENS or failed and cache.length:  # later questions may all fail: the way on
            write(f"(the conversation holds {cache.length} of its {cache.capacity} tokens of context; "
                  "type /reset to start a new one)")
