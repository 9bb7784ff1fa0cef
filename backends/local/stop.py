"""Stop strings over streamed text: emit only what cannot be the start of a stop string."""

from __future__ import annotations


class StopFilter:
    """Feed text deltas; get back (safe text to emit, whether a stop string was hit).

    Once a stop string appears anywhere in the generated text, generation stops and the text
    from the stop string on is dropped. A tail that could still grow into a stop string is
    held back until it cannot.
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self._longest = max((len(s) for s in self.stops), default=0)
        self.text = ""  # all generated text seen (up to the stop, once hit)
        self._emitted = 0
        self.stopped = False

    def feed(self, delta: str) -> str:
        if self.stopped:
            return ""
        start = max(0, len(self.text) - self._longest + 1)
        self.text += delta
        if not self.stops:
            return self._emit(len(self.text))
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            self.text = self.text[: min(hits)]
            return self._emit(len(self.text))
        return self._emit(len(self.text) - self._partial_tail())

    def flush(self) -> str:
        """At the end of generation: the held-back tail is real text after all."""
        return "" if self.stopped else self._emit(len(self.text))

    def _partial_tail(self) -> int:
        """Length of the longest suffix of text that is a proper prefix of a stop string."""
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best

    def _emit(self, upto: int) -> str:
        upto = max(upto, self._emitted)
        out = self.text[self._emitted : upto]
        self._emitted = upto
        return out
