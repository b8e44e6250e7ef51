"""DATA reader: finds the end of data, un-stuffs dots, refuses bare CR/LF, caps size.

Sans-I/O and chunk-scanning: each `feed(chunk)` does a handful of C-speed scans
(`bytes.find`, `rfind`, `translate`) over the whole chunk, never a Python loop per line, so a
20 MB message costs a few hundred calls, not a few hundred thousand.

Rules (RFC 5321):
- Only CRLF "." CRLF ends DATA (4.1.1.4). The start of DATA counts as a line start, so a
  lone "." CRLF right after 354 is an empty message.
- A line starting with "." has that dot removed (4.5.2, transparency).
- A bare CR or bare LF anywhere before the end marker is a protocol violation (2.3.8):
  `BARE` is reported at once and the caller closes the connection. This is what closes
  SMTP smuggling (CVE-2023-51764 and family): no alternative end-of-data is ever honoured.
- Size: bytes past `max_size` are not emitted (memory stays bounded); the caller answers 552
  after the end of data.
- A NUL anywhere in the message (RFC 5322 2.3 / RFC 6152 3: no NUL outside BINARYMIME,
  which we do not offer; some next hops end DATA at `\r\n\x00.\r\n`) is remembered and
  refused after the end of data (554 5.6.0): one `bytes.find` per chunk.
- A text line longer than `max_line` octets (RFC 5322 2.1.1: 998, plus CRLF), measured
  after un-stuffing, is remembered and refused after the end of data.
The output is the message exactly as the client meant it: CRLF line ends, no stuffing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from authrelay.dotlines import MARK as _MARK
from authrelay.dotlines import find_mark

OK = ""
BARE = "bare"  # bare CR or LF: refuse and close
TOO_BIG = "size"
LONG_LINE = "line"
NUL = "nul"

# _MARK (CRLF "."): a line starting with a dot, stuffed (RFC 5321 4.5.2), unless the line
_END = b"\r\n.\r\n"  # is that dot alone: the end of data
# bytes.translate tables: 1 where a CR (an LF) is, 0 elsewhere (_bare)
_CR_MARKS = bytes(int(i == 0x0D) for i in range(256))
_LF_MARKS = bytes(int(i == 0x0A) for i in range(256))


@dataclass(slots=True)
class Feed:
    # Message bytes to store: at most one segment per feed, however many stuffed dots the
    # chunk held (each consumer step costs per segment: a spool write() is a syscall).
    segments: list[bytes] = field(default_factory=list)
    done: bool = False  # the end-of-data marker was seen
    leftover: bytes = b""  # bytes after the marker (pipelined commands)
    error: str = OK  # BARE stops at once; TOO_BIG > NUL > LONG_LINE are reported when done


class BodyReader:
    def __init__(self, max_size: int, max_line: int = 998) -> None:
        self.max_size = max_size
        self._limit_run = max_line + 2  # a run of non-LF bytes this long: text + CR + 1
        self._hold = b"\r\n"  # virtual CRLF: DATA begins at a line start
        self._virtual = 2  # leading bytes of _hold that are not message bytes
        self._run = 0  # length of the current (unterminated) wire line
        self.size = 0  # message bytes accepted (after un-stuffing)
        self.wire_bytes = 0
        self.error = OK
        self.done = False

    # ------------------------------------------------------------------ helpers
    def _emit(self, out: Feed, piece: bytes) -> None:
        if not piece:
            return
        if self._virtual:
            cut = min(self._virtual, len(piece))
            piece = piece[cut:]
            self._virtual -= cut
            if not piece:
                return
        if self.error == TOO_BIG:
            return
        if self.size + len(piece) > self.max_size:
            self.error = TOO_BIG
            return
        self.size += len(piece)
        out.segments.append(piece)

    def _joined(self, out: Feed) -> None:
        """One segment for what this feed emitted, its lines checked (the same verdict as
        checking each piece in turn: they are contiguous). A chunk of dot-stuffed short
        lines was thousands of pieces, each stored by its own write(2): ~50 times the CPU
        per byte of a plain message (5 MB: 9.5 s of the event loop instead of 0.2 s)."""
        if len(out.segments) > 1:
            out.segments = [b"".join(out.segments)]
        if out.segments:
            self._check_lines(out.segments[0])

    @staticmethod
    def _bare(region: bytes) -> bool:
        """A CR not followed by LF or an LF not after a CR in `region`: the CR marks
        (one translate) shifted by a byte must equal the LF marks. Two table passes and a
        memcmp, whatever the lines' length; the three counts it replaces (CRLF, CR, LF)
        stopped at every line end (µs per 16 KiB: 80-column lines 38 -> 24, 4-byte lines
        53 -> 24, prose 74 -> 25; PERFORMANCE.md (20)). Memory: two copies of `region`
        (at most a DATA step, protocol.CHUNK, and what was held back)."""
        cr = region.translate(_CR_MARKS)
        lf = region.translate(_LF_MARKS)
        return cr[:-1] != lf[1:] or lf[:1] == b"\x01" or cr[-1:] == b"\x01"

    def _check_lines(self, chunk: bytes) -> None:
        if self.error:
            return
        nl = chunk.find(b"\n")
        if nl < 0:
            self._run += len(chunk)
            if self._run >= self._limit_run:
                self.error = LONG_LINE
            return
        limit = self._limit_run
        if self._run + nl >= limit:
            self.error = LONG_LINE
            return
        # A run of `limit` bytes without LF exists iff some window of `limit` bytes that
        # starts right after an LF holds none: jump from the last LF of each window
        # (memrchr in C), ~len/limit steps, no list of lines (split + max cost ~90 us
        # per 100 KB, this ~15; a regex like [^\n]{1000} rescanned every byte: ~7 ms).
        n, pos, rfind = len(chunk), nl + 1, chunk.rfind
        while n - pos >= limit:
            j = rfind(b"\n", pos, pos + limit)
            if j < 0:
                self.error = LONG_LINE
                return
            pos = j + 1
        self._run = n - rfind(b"\n") - 1

    # ------------------------------------------------------------------ API
    def feed(self, chunk: bytes) -> Feed:
        out = Feed()
        if self.done:
            out.done, out.leftover = True, chunk
            return out
        self.wire_bytes += len(chunk)
        data = self._hold + chunk
        # NUL: one C-speed scan per chunk. A NUL after the end marker belongs to the next
        # command (the session refuses it there), so its position is checked once the
        # marker is found (`_nul_at`, in `data` coordinates).
        nul_at = -1
        if self.error in (OK, LONG_LINE):
            i = chunk.find(b"\x00")
            if i >= 0:
                nul_at = len(self._hold) + i
        # The end of data is the first CRLF "." CRLF (every CRLF before it ends a line: a
        # bare CR or LF refuses the message), and every other CRLF "." before it is a
        # stuffed dot: both found by C-speed scans, never a Python step per line (a chunk
        # of dot-stuffed short lines was thousands of steps). The first CRLF "." is looked
        # for first: most chunks have none (one scan, nothing to un-stuff), and in most
        # last chunks it is the end marker itself.
        first = find_mark(data)
        e = -1 if first < 0 else data.find(_END, first)
        if e >= 0:
            end = e + 5
            if self._bare(data[:end]):
                self.error = out.error = BARE
                return out
            if 0 <= nul_at < end:
                self._nul()
            self._emit(out, _unstuffed(data, first, e + 2))
            self._joined(out)
            self.done = out.done = True
            out.leftover = data[end:]
            out.error = self.error
            self._hold = b""
            return out
        # No end marker: keep back what the next chunk decides. A CRLF "." within the last
        # 4 bytes cannot be told from the marker's start yet; else a possible marker
        # prefix ("\r" or "\r\n").
        keep = -1 if first < 0 else data.find(_MARK, max(first, len(data) - 4))
        if keep < 0:
            if data.endswith(b"\r\n"):
                keep = len(data) - 2
            elif data.endswith(b"\r"):
                keep = len(data) - 1
            else:
                keep = len(data)
        return self._finish_round(out, data, keep, first, nul_at)

    def _nul(self) -> None:
        if self.error in (OK, LONG_LINE):
            self.error = NUL

    def _finish_round(self, out: Feed, data: bytes, keep: int, first: int,
                      nul_at: int = -1) -> Feed:
        region = data[:-1] if data.endswith(b"\r") else data
        if self._bare(region):
            self.error = out.error = BARE
            return out
        if nul_at >= 0:
            self._nul()  # no end marker in this chunk: the NUL is message data
        self._emit(out, _unstuffed(data, first, keep))
        self._joined(out)
        self._hold = data[keep:]
        out.error = self.error
        return out


def _unstuffed(data: bytes, first: int, stop: int) -> bytes:
    """data[:stop] with the stuffed dot after each CRLF removed; `first`: the first CRLF "."
    in `data` (-1: none), so the bytes before it are neither searched nor copied twice (a
    CRLF "." at stop - 2 or later is the end marker's or held back: nothing to remove)."""
    if first < 0 or first + 2 >= stop:
        return data[:stop]
    return data[:first] + data[first:stop].replace(_MARK, b"\r\n")
