"""Which tokens keep a byte-level output valid UTF-8, by where the output stands in its last
character. xgrammar's byte-level JSON strings accept UTF-16 surrogates encoded in UTF-8
(ED A0-BF ..), which no JSON parser takes: a constrained sequence takes only tokens that keep
its bytes UTF-8 (RFC 3629), checked per token against a small automaton.

States: what the next byte must be. 0: at a character boundary; otherwise (continuation
bytes still needed, the range of the next one)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

State = tuple[int, int, int]  # (continuation bytes still needed, next byte's low, high)
BOUNDARY: State = (0, 0, 0)
_LEADS: dict[range, State] = {
    range(0xC2, 0xE0): (1, 0x80, 0xBF),
    range(0xE0, 0xE1): (2, 0xA0, 0xBF),
    range(0xE1, 0xED): (2, 0x80, 0xBF),
    range(0xED, 0xEE): (2, 0x80, 0x9F),  # not A0-BF: those would be surrogates
    range(0xEE, 0xF0): (2, 0x80, 0xBF),
    range(0xF0, 0xF1): (3, 0x90, 0xBF),
    range(0xF1, 0xF4): (3, 0x80, 0xBF),
    range(0xF4, 0xF5): (3, 0x80, 0x8F),
}
STATES: list[State] = [BOUNDARY, *dict.fromkeys(_LEADS.values()), (1, 0x80, 0xBF),
                       (2, 0x80, 0xBF)]
STATES = list(dict.fromkeys(STATES))


def step(state: State, byte: int) -> State | None:
    need, lo, hi = state
    if need:
        if not lo <= byte <= hi:
            return None
        return (need - 1, 0x80, 0xBF) if need > 1 else BOUNDARY
    if byte < 0x80:
        return BOUNDARY
    return next((s for r, s in _LEADS.items() if byte in r), None)


class Utf8Table:
    """valid[s]: bool [vocab], the tokens that may follow state s; after[s]: the state each
    leaves (0 where invalid). Tokens in `always` (the end of sequence) are valid anywhere."""

    def __init__(self, pieces: Sequence[bytes], vocab: int, always: Sequence[int]) -> None:
        index = {s: i for i, s in enumerate(STATES)}
        self.valid = np.zeros((len(STATES), vocab), dtype=np.bool_)
        self.after = np.zeros((len(STATES), vocab), dtype=np.int8)
        for si, start in enumerate(STATES):
            for t, piece in enumerate(pieces[:vocab]):
                state: State | None = start
                for byte in piece:
                    state = step(state, byte) if state is not None else None
                if state is not None and piece:
                    self.valid[si, t] = True
                    self.after[si, t] = index[state]
        self.valid[:, list(always)] = True
