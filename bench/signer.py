"""The DKIM signer and the From: ownership verdict alone: CPU per message, in-process.

    PYTHONPATH=src python bench/signer.py [LABEL]

Generates one RSA-2048 and one Ed25519 key for example.org in a temporary directory and
signs a message with the bench's header fields (a Received: of ours, From: Alice
<alice@example.org>, To, Subject, Date, Message-ID) and a body of 28 or 2,900 short lines
(1 KiB, 100 KiB; `100k_b64`: a short text part and a 100 KiB base64 attachment, as the
server signs it; `100k_html`: a text part with two spaces after each sentence and an
indented HTML part, the blanks relaxed canonicalization changes; `100k_flowed`: format=flowed
text, a space ending most lines) with the RSA key, the Ed25519 key and both, and times
`Owner.verdict` on that header section (what the accept path asks before every
authenticated commit). `_smtp` figures: the same signature as the server makes it for mail
the SMTP body reader vouched for (no bare CR/LF: `crlf_only`); `_smtp_cold` (1 KiB): the
same with the caches evicted before each call (thread CPU), as the server pays it
(docs/PERFORMANCE.md (28)). Prints one JSON line of process CPU µs per call
(`process_time`, after a warm-up). Compare two trees by pointing
PYTHONPATH at each (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import functools
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from authrelay.dkim.keys import KeyStore
from authrelay.dkim.signer import Signer
from authrelay.policy.ownership import Owner

HEAD = (b"Received: from client.example (client.example [127.0.0.1])\r\n"
        b"\tby authrelay.bench.example.test with ESMTPSA id 4Q1\r\n"
        b"\tfor <sink@remote.example.net>; Fri, 27 Nov 2026 12:00:00 +0000\r\n"
        b"From: Alice <alice@example.org>\r\nTo: bob@dest.test\r\nSubject: hello\r\n"
        b"Date: Fri, 27 Nov 2026 12:00:00 +0000\r\nMessage-ID: <1@example.org>\r\n\r\n")
LINE = b"Hello Bob, this is a line of text.\r\n"
# A 100 KiB attachment: a short text part, then base64 lines (no blanks)
MIME = (b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b1\r\n\r\n"
        b"--b1\r\nContent-Type: text/plain\r\n\r\n" + LINE * 3 +
        b"--b1\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n"
        b"\r\n" + b"JVBERi0xLjcKJcfsj6IKNSAwIG9iago8PC9MZW5ndGggNiAwIFIvRmlsdGVyIC9GbGF0ZU\r\n"
        * 1350 + b"--b1--\r\n")
# Text that relaxed canonicalization changes (RFC 6376 3.4.4): runs of blanks, blanks
# ending lines (RFC 3676 format=flowed), 100 KiB
HTML = (b"MIME-Version: 1.0\r\nContent-Type: multipart/alternative; boundary=b1\r\n\r\n"
        b"--b1\r\nContent-Type: text/plain\r\n\r\n"
        + b"Hello Bob.  This is a line of text.  And some more of it.\r\n" * 600
        + b"--b1\r\nContent-Type: text/html\r\n\r\n"
        + b"    <div class=\"x\">\r\n      <p>Hello Bob, this is a line of text.</p>\r\n"
        b"    </div>\r\n" * 800 + b"--b1--\r\n")
FLOWED = (b"MIME-Version: 1.0\r\nContent-Type: text/plain; format=flowed\r\n\r\n"
          + (b"Hello Bob, this is a line of text that goes on and on, \r\n" * 3
             + b"and ends here.\r\n\r\n") * 540)
SELECTORS = {"rsa": ("s-rsa",), "ed25519": ("s-ed",), "both": ("s-rsa", "s-ed")}


class _Quiet:
    def dkim(self, queue_id: str | None, result: str, **extra: Any) -> None:
        pass


_JUNK = bytearray(8 << 20)


def _evict() -> None:
    """Run what the server runs between two signatures, roughly: touch every cache line
    of 8 MiB and some unrelated interpreter code."""
    _JUNK[::64] = bytes(len(_JUNK) // 64)
    d = {str(i): i for i in range(2000)}
    sorted(d.items(), key=lambda kv: -kv[1])


def cold_us(fn: Callable[[], object], n: int) -> float:
    """Thread CPU µs of `fn` with the caches evicted before each call (the minimum of 5
    runs): what a signature costs in the server, where the rest of it runs between two
    (docs/PERFORMANCE.md (28))."""
    best = float("inf")
    for _ in range(5):
        spent = 0
        for _ in range(n):
            _evict()
            t = time.thread_time_ns()
            fn()
            spent += time.thread_time_ns() - t
        best = min(best, spent / n / 1000)
    return best


def cpu_us(fn: Callable[[], object], n: int) -> float:
    for _ in range(max(5, n // 20)):
        fn()
    t = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - t) / n * 1e6


def main() -> None:
    label = sys.argv[1] if len(sys.argv) > 1 else ""
    tmp = Path(tempfile.mkdtemp())
    try:
        keys = KeyStore(tmp / "all")
        keys.generate("example.org", "s-rsa", "rsa")
        keys.generate("example.org", "s-ed", "ed25519")
        out: dict[str, Any] = {"label": label}
        owner = Owner.of("alice", ["alice@example.org"])
        out["verdict_us"] = round(cpu_us(lambda: owner.verdict(HEAD), 5000), 1)
        for name, sels in SELECTORS.items():
            root = tmp / name
            (root / "example.org").mkdir(parents=True, mode=0o700)
            for sel in sels:
                shutil.copy2(tmp / "all" / "example.org" / f"{sel}.key",
                             root / "example.org" / f"{sel}.key")
            signer = Signer(KeyStore(root).load(),
                            headers=("From", "To", "Subject", "Date", "Message-ID",
                                     "MIME-Version", "Content-Type"),
                            oversign=("From", "To", "Subject", "Date", "Message-ID"),
                            maillog=_Quiet())
            for size, lines, n in (("1k", 28, 1000), ("100k", 2900, 300)):
                msg = HEAD + LINE * lines
                assert signer(msg, "Q") is not None
                us = cpu_us(functools.partial(signer, msg, "Q"), n)
                out[f"sign_{name}_{size}_us"] = round(us, 1)
                # as the server signs SMTP mail: the body reader refused bare CR/LF
                smtp = functools.partial(signer.sign_stream, (msg,), "Q", crlf_only=True)
                out[f"sign_{name}_{size}_smtp_us"] = round(cpu_us(smtp, n), 1)
                if size == "1k":
                    out[f"sign_{name}_1k_smtp_cold_us"] = round(cold_us(smtp, 200), 1)
            msg = HEAD.replace(b"\r\n\r\n", b"\r\n", 1) + MIME
            b64 = functools.partial(signer.sign_stream, (msg,), "Q", crlf_only=True)
            assert b64() is not None
            out[f"sign_{name}_100k_b64_us"] = round(cpu_us(b64, 300), 1)
            for kind, body in (("html", HTML), ("flowed", FLOWED)):
                msg = HEAD.replace(b"\r\n\r\n", b"\r\n", 1) + body
                text = functools.partial(signer.sign_stream, (msg,), "Q", crlf_only=True)
                assert text() is not None
                out[f"sign_{name}_100k_{kind}_us"] = round(cpu_us(text, 300), 1)
        print(json.dumps(out))
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
