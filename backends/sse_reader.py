"""Server-sent events as an upstream sends them, read by the WHATWG rules: lines end with CRLF,
LF or CR (a CR that ends a block ends its line, and an LF that opens the next block is then
the rest of that CRLF, not a blank line); a leading
UTF-8 byte-order mark is dropped; an event's `data:` lines are joined with LF and the event is
complete at the blank line after them; comments and the other fields (`event:`, `id:`,
`retry:`) carry nothing the gateway reads. At the stream's end an event still missing its
blank line is taken as complete (the spec drops it; upstreams that end with `data: [DONE]`
and no blank line exist)."""

from __future__ import annotations

BOM = b"\xef\xbb\xbf"


class EventReader:
    """Feed the body's blocks as they arrive; get the data of every event they complete."""

    __slots__ = ("_after_cr", "_data", "_rest", "_started")

    def __init__(self) -> None:
        self._rest = b""  # the last, unfinished line
        self._data: list[bytes] = []  # `data:` values of the event being read
        self._started = False  # past the possible byte-order mark
        self._after_cr = False  # the last block ended with CR

    def feed(self, block: bytes) -> list[bytes]:
        if self._after_cr and block:
            self._after_cr = False
            if block.startswith(b"\n"):
                block = block[1:]
        buf = self._rest + block if self._rest else block
        if not self._started:
            if len(buf) < len(BOM) and BOM.startswith(buf):
                self._rest = buf
                return []
            self._started = True
            if buf.startswith(BOM):
                buf = buf[len(BOM):]
        if b"\r" in buf:
            self._after_cr = buf.endswith(b"\r")
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = buf.split(b"\n")
        self._rest = lines.pop()
        return self._events(lines)

    def close(self) -> list[bytes]:
        """The end of the stream: the last line and event, even without their line ends."""
        rest, self._rest = self._rest, b""
        return self._events([rest, b""] if rest else [b""])

    def _events(self, lines: list[bytes]) -> list[bytes]:
        out: list[bytes] = []
        data = self._data
        for line in lines:
            if not line:
                if data:
                    out.append(data[0] if len(data) == 1 else b"\n".join(data))
                    data.clear()
            elif line.startswith(b"data:"):
                value = line[5:]
                data.append(value[1:] if value.startswith(b" ") else value)
        return out
