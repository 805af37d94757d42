"""The `stop` strings of a request applied to streamed text: a piece that could be the start of a
stop string is held back until the next piece shows whether it is; the answer ends before the first
stop string and never shows it."""

from __future__ import annotations


class StopStrings:
    def __init__(self, stops: list[str]):
        self.stops = stops
        self.held = ""
        self.hit = False

    def push(self, piece: str) -> str:
        """The text that can be shown now."""
        if self.hit or not piece:
            return ""
        if not self.stops:
            return piece
        text = self.held + piece
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if found:
            self.hit, self.held = True, ""
            return text[:min(found)]
        keep = max((n for s in self.stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        self.held = text[len(text) - keep:]
        return text[:len(text) - keep]

    def flush(self) -> str:
        """What was held back when the answer ended for another reason."""
        held, self.held = self.held, ""
        return "" if self.hit else held
