"""Spool format version 2: lengths, checksum, strict envelope, prepend; version 1 still read.

Damage of every kind (truncation, a removed field, an unknown field, a wrong type, a flipped
bit anywhere in the file) must raise CorruptError -- and recovery / quarantine must move
such a file to corrupt/, never delete it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest
from support.maillog import ListLog
from support.spools import temp_spool

from authrelay.config import from_dict
from authrelay.spool import envelope as envelope_mod
from authrelay.spool import format as fmt
from authrelay.spool import writer as writer_mod
from authrelay.spool.envelope import Envelope, Recipient, new_queue_id
from authrelay.spool.store import CorruptError, Spool, UnsupportedVersion
from authrelay.spool.submit import Refused, Submitter

MSG = b"From: a@example.org\r\nTo: b@example.net\r\nSubject: hi\r\n\r\nbody line\r\n"
BIG = MSG + b"".join(b"line %07d of a big message\r\n" % i
                     for i in range(writer_mod.SPILL // 20))
HUGE = BIG * 2  # past store.INLINE_MAX: delivered from the file, verified separately


@pytest.fixture
def spool() -> Iterator[Spool]:
    with temp_spool(fsync=False) as s:
        yield s


def _env(*rcpts: str) -> Envelope:
    return Envelope(queue_id=new_queue_id(), sender="a@example.org",
                    recipients=[Recipient(address=r) for r in rcpts or ("b@example.net",)])


class Whole:
    """A MessageSigner (spool/writer.py) over a function of the whole message."""

    def __init__(self, fn: Callable[[bytes], bytes | None]) -> None:
        self.fn = fn

    def sign_stream(self, chunks: Iterable[bytes]) -> bytes | None:
        return self.fn(b"".join(chunks))

    def skip(self, reason: str) -> None:
        pass


class WholeSigner:
    """The accept path's Signer (spool/submit.py) over the same function."""

    def __init__(self, fn: Callable[[bytes], bytes | None]) -> None:
        self.fn = fn

    def bind(self, queue_id: str, owner: object = None, *, crlf_only: bool = False,
             from_domain: str = "") -> Whole:
        return Whole(self.fn)

    def reload(self, cfg: object) -> None:
        pass


async def _put(spool: Spool, data: bytes, prepend: bytes = b"", signer=None) -> str:
    inc = spool.begin(_env())
    for i in range(0, len(data), 65536):
        inc.write(data[i:i + 65536])
    inc.prepend = prepend
    inc.signer = Whole(signer) if signer is not None else None
    await inc.commit()
    return inc.queue_id


@pytest.mark.parametrize("data", [MSG, BIG, HUGE], ids=["memory", "streamed", "huge"])
async def test_v2_roundtrip(spool: Spool, data: bytes) -> None:
    qid = await _put(spool, data)
    raw = (spool.queue_dir / qid).read_bytes()
    assert raw[:fmt.HEADER_LEN].startswith(b"AUTHRELAY-SPOOL 2 env=")
    assert raw[fmt.HEADER_LEN - 1:fmt.HEADER_LEN] == b"\n"
    env, msg, off = spool.load_for_delivery(qid)
    if isinstance(msg, Path):  # streamed: the caller verifies off the event loop
        spool.verify(qid)
        msg = msg.read_bytes()[off:]
    assert msg == data and env.size == len(data)
    assert spool.load(qid).recipients[0].address == "b@example.net"
    path, off = spool.body_path(qid)
    assert path.read_bytes()[off:] == data
    assert spool.recover()["corrupt"] == 0


@pytest.mark.parametrize("data", [MSG, BIG], ids=["memory", "streamed"])
async def test_signer_lines_are_prepended(spool: Spool, data: bytes) -> None:
    seen: list[bytes] = []

    def signer(message: bytes) -> bytes:
        seen.append(message)
        return b"DKIM-Signature: v=1; a=rsa-sha256; d=example.org; s=sel;\r\n\tb=abc"

    qid = await _put(spool, data, signer=signer)
    assert seen == [data]  # the whole message, once, read back from disk when streamed
    sig = b"DKIM-Signature: v=1; a=rsa-sha256; d=example.org; s=sel;\r\n\tb=abc\r\n"
    spool.verify(qid)
    path, off = spool.body_path(qid)
    assert path.read_bytes()[off:] == sig + data  # what the courier streams
    assert spool.read_headers(qid).startswith(sig)  # what `queue show` prints
    env = spool.load(qid)
    assert env.size == len(sig) + len(data)


async def test_signer_failure_leaves_message_unsigned(spool: Spool) -> None:
    inc = spool.begin(_env())
    inc.write(MSG)
    inc.signer = Whole(lambda m: 1 / 0)  # type: ignore[arg-type,return-value]
    await inc.commit()
    assert "ZeroDivisionError" in inc.sign_error
    path, off = spool.body_path(inc.queue_id)
    assert path.read_bytes()[off:] == MSG
    inc2 = spool.begin(_env())  # too big for a streamed file's slot: unsigned, kept
    inc2.write(BIG)
    inc2.signer = Whole(lambda m: b"X-Big: " + b"x" * fmt.PREPEND_SLOT)
    await inc2.commit()
    assert "does not fit" in inc2.sign_error
    spool.verify(inc2.queue_id)


def _damage(spool: Spool, qid: str, fn) -> None:
    p = spool.queue_dir / qid
    p.write_bytes(fn(p.read_bytes()))
    p.chmod(0o700)


def _env_span(raw: bytes) -> tuple[int, int]:
    nl = raw.find(b"\n")
    v, f = fmt.parse_header_line(raw[:nl + 1])
    lay = fmt.layout_of(v, f, nl + 1)
    return lay.env_off, lay.env_off + lay.env_len


def _edit_env(raw: bytes, edit) -> bytes:
    """Change the envelope JSON but keep lengths true (and the checksum recomputed), so
    only the strict decoder can catch it."""
    a, b = _env_span(raw)
    d = json.loads(raw[a:b])
    edit(d)
    ej = json.dumps(d, separators=(",", ":")).encode()
    nl = raw.find(b"\n")
    v, f = fmt.parse_header_line(raw[:nl + 1])
    lay = fmt.layout_of(v, f, nl + 1)
    msg = raw[lay.msg_off:]
    pre = raw[lay.prepend_off:lay.msg_off]
    crc = fmt.checksum(ej, fmt.checksum(pre, fmt.checksum(msg)))
    head = fmt.encode_header(env_len=len(ej), pad=0, pre=len(pre), msg=len(msg), crc=crc)
    return head + ej + b"\n" + pre + msg


def _header(raw: bytes, line: bytes) -> bytes:
    return line.ljust(fmt.HEADER_LEN - 1) + b"\n" + raw[fmt.HEADER_LEN:]


def _flip_header(raw: bytes, key: bytes, skip: int) -> bytes:
    i = raw.find(key) + skip
    c = b"1" if raw[i:i + 1] == b"0" else b"0"
    return raw[:i] + c + raw[i + 1:]


DAMAGE = {
    "truncated_last_byte": lambda r: r[:-1],
    "truncated_half": lambda r: r[: len(r) // 2],
    "truncated_in_header": lambda r: r[:40],
    "appended_garbage": lambda r: r + b"xx",
    "bit_flip_message": lambda r: r[:-3] + bytes([r[-3] ^ 0x01]) + r[-2:],
    "bit_flip_envelope": lambda r: (lambda a: r[:a + 5] + bytes([r[a + 5] ^ 0x20])
                                    + r[a + 6:])(_env_span(r)[0]),
    "bit_flip_checksum": lambda r: _flip_header(r, b"sum=crc32:", 10),
    "header_field_removed": lambda r: r.replace(b" pre=0", b"      ", 1),
    "header_field_unknown": lambda r: _header(r, r[:fmt.HEADER_LEN].rstrip() + b" zz=1"),
    "unknown_checksum_type": lambda r: r.replace(b"sum=crc32:", b"sum=crc99:", 1),
    "recipients_removed": lambda r: _edit_env(r, lambda d: d.pop("recipients")),
    "recipients_empty": lambda r: _edit_env(r, lambda d: d.update(recipients=[])),
    "sender_removed": lambda r: _edit_env(r, lambda d: d.pop("sender")),
    "unknown_envelope_field": lambda r: _edit_env(r, lambda d: d.update(hops_override=1)),
    "wrong_type": lambda r: _edit_env(r, lambda d: d.update(client_port="25")),
    "recipient_state_unknown": lambda r: _edit_env(
        r, lambda d: d["recipients"][0].update(state="delivered-maybe")),
    "recipient_address_removed": lambda r: _edit_env(
        r, lambda d: d["recipients"][0].pop("address")),
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
async def test_damage_is_detected_and_quarantined(spool: Spool, kind: str) -> None:
    qid = await _put(spool, MSG)
    good = (spool.queue_dir / qid).read_bytes()
    _damage(spool, qid, DAMAGE[kind])
    damaged = (spool.queue_dir / qid).read_bytes()
    assert damaged != good
    with pytest.raises(CorruptError):
        env, msg, off = spool.load_for_delivery(qid)
    # recover() at start catches everything but pure message bit flips (the checksum is
    # read before each delivery); the scheduler quarantines those (test_scheduler_*).
    counts = spool.recover()
    if kind in ("bit_flip_message", "bit_flip_checksum"):
        assert counts["corrupt"] == 0
        assert spool.quarantine(qid, "checksum mismatch")
    else:
        assert counts["corrupt"] == 1, counts
    assert (spool.corrupt_dir / qid).read_bytes() == damaged  # kept, byte for byte
    assert not (spool.queue_dir / qid).exists()


async def test_big_message_bit_flip_found_by_verify(spool: Spool) -> None:
    qid = await _put(spool, HUGE)
    _damage(spool, qid, DAMAGE["bit_flip_message"])
    env, path, off = spool.load_for_delivery(qid)  # lengths fine: the header is read
    assert isinstance(path, Path)
    with pytest.raises(CorruptError, match="checksum"):
        spool.verify(qid)


async def test_version_1_files_are_still_read(spool: Spool) -> None:
    env = _env("x@a.example", "y@b.example")
    (spool.queue_dir / env.queue_id).write_bytes(fmt.encode_v1(env, MSG))
    (spool.queue_dir / env.queue_id).chmod(0o700)
    assert spool.recover()["ok"] == 1
    loaded, msg, off = spool.load_for_delivery(env.queue_id)
    assert msg == MSG and off == 0
    assert [r.address for r in loaded.recipients] == ["x@a.example", "y@b.example"]
    assert spool.read_headers(env.queue_id).startswith(b"From: a@example.org")
    # The damage that used to be deleted as "removed": a version 1 file without recipients.
    bad = _env()
    d = json.loads(bad.to_json(version=1))
    d.pop("recipients")
    ej = json.dumps(d).encode()
    (spool.queue_dir / bad.queue_id).write_bytes(b"AUTHRELAY-SPOOL 1 %d\n%s\n" % (len(ej), ej)
                                                 + MSG)
    (spool.queue_dir / bad.queue_id).chmod(0o700)
    with pytest.raises(CorruptError, match="no recipients"):
        spool.load(bad.queue_id)
    assert spool.recover()["corrupt"] == 1
    assert (spool.corrupt_dir / bad.queue_id).exists()


async def test_newer_version_left_in_place(spool: Spool) -> None:
    qid = await _put(spool, MSG)
    _damage(spool, qid, lambda r: r.replace(b"AUTHRELAY-SPOOL 2 ", b"AUTHRELAY-SPOOL 7 ", 1))
    with pytest.raises(UnsupportedVersion):
        spool.load_for_delivery(qid)
    assert spool.recover()["unsupported"] == 1
    assert (spool.queue_dir / qid).exists()


def test_codec_covers_every_field() -> None:
    env = Envelope(queue_id="Q1", sender="", recipients=[Recipient("a@b.example")])
    assert fmt.decode_envelope(env.to_json(version=2), 2) == env
    with pytest.raises(CorruptError, match="wrong type"):
        fmt.decode_envelope(env.to_json(version=2).replace(b'"is_bounce":false',
                                                           b'"is_bounce":0'), 2)


# ---------------------------------------------------------------------- submit path

def _cfg(tmp: Path, **limits):
    return from_dict({"hostname": "relay.test", "state_dir": str(tmp),
                      "limits": limits})


async def test_submit_refuses_nul_and_hops(spool: Spool, tmp_path: Path) -> None:
    sub = Submitter(spool, _cfg(tmp_path, max_hops=3), maillog=ListLog())
    d = sub.begin(_env())
    d.write(b"Subject: x\r\n\r\nbo\x00dy\r\n")
    with pytest.raises(Refused) as e:
        await d.commit()
    assert (e.value.reply.code, e.value.reply.enhanced) == (554, "5.6.0")
    hops = b"".join(b"Received: from h%d by h%d; date\r\n" % (i, i) for i in range(4))
    d = sub.begin(_env())
    d.write(hops + b"Subject: x\r\n\r\nbody\r\n")
    with pytest.raises(Refused) as e:
        await d.commit()
    assert (e.value.reply.code, e.value.reply.enhanced, e.value.reply.text) == (
        554, "5.4.6", "Too many hops")
    d = sub.begin(_env())  # exactly max_hops: accepted
    d.write(hops.split(b"\r\n", 1)[1] + b"Subject: x\r\n\r\nbody\r\n")
    await d.commit()
    assert d.hops == 3
    assert list(p.name for p in spool.queue_dir.iterdir()) == [d.queue_id]
    _, msg, _ = spool.load_for_delivery(d.queue_id)
    assert msg.startswith(b"Received: from ") and b"by relay.test (authrelay)" in msg


async def test_submit_enospc_leaves_nothing(spool: Spool, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import os

    sub = Submitter(spool, _cfg(tmp_path), maillog=ListLog())
    real = os.write
    calls = {"n": 0}

    def full(fd: int, data) -> int:  # the disk fills while the message streams
        calls["n"] += 1
        if calls["n"] > 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)

    monkeypatch.setattr(writer_mod.os, "write", full)
    d = sub.begin(_env())
    for i in range(0, len(BIG), 8192):
        d.write(BIG[i:i + 8192])  # never raises
    with pytest.raises(Refused) as e:
        await d.commit()
    assert (e.value.reply.code, e.value.reply.enhanced) == (452, "4.3.1")
    assert e.value.reason == "No space left on device"
    assert list(spool.queue_dir.iterdir()) == []


async def test_submit_calls_signer_for_originated_mail_only(spool: Spool,
                                                            tmp_path: Path) -> None:
    seen: list[bytes] = []

    def signer(message: bytes) -> bytes:
        seen.append(message)
        return b"DKIM-Signature: v=1; d=example.org; b=x"

    sub = Submitter(spool, _cfg(tmp_path), signer=WholeSigner(signer), maillog=ListLog())
    cases = {"auth": dict(auth_user="alice"), "inbound": {}, "sendmail": dict(
        listener="sendmail", protocol="local"), "bounce": dict(is_bounce=True, sender="")}
    signed = {}
    for name, kw in cases.items():
        env = _env()
        for k, v in kw.items():
            setattr(env, k, v)
        d = sub.begin(env)
        d.write(MSG)
        n = len(seen)
        await d.commit()
        signed[name] = len(seen) > n
        _, msg, _ = spool.load_for_delivery(d.queue_id)
        assert msg.startswith(b"DKIM-Signature: ") == signed[name]
    assert signed == {"auth": True, "inbound": False, "sendmail": True, "bounce": True}
    # The signer sees the message as stored: our Received: first, the body unchanged.
    assert seen[0].startswith(b"Received: ") and seen[0].endswith(MSG[MSG.index(b"\r\n\r\n"):])
    d = sub.begin(_env(), sign=True)  # a trusted-network client (the session says so)
    d.write(MSG)
    await d.commit()
    assert len(seen) == 4


@pytest.mark.parametrize("state", [
    b'{"v":1,"recipients":[{"address":"b@example.net","state":"bogus"}]}',
    b'{"v":1,"recipients":[{"address":"b@example.net","state":"sent","attempts":"2"}]}',
    b'{"v":1,"recipients":{"b@example.net":"sent"}}',
    b'{"v":0,"recipients":[{"address":"b@example.net","state":"sent"}]}',
    b'[1, 2]',
    b'{"v":1,"recip',
], ids=["unknown_state", "wrong_type", "not_a_list", "bad_version", "not_object", "cut"])
async def test_damaged_state_file_never_marks_done(spool: Spool, state: bytes) -> None:
    """A damaged ID.state is ignored as a whole: the recipient stays pending (re-delivery
    is safe), the message is not removed as if delivered."""
    qid = await _put(spool, MSG)
    (spool.queue_dir / (qid + ".state")).write_bytes(state)
    env = spool.load(qid)
    assert [r.state for r in env.recipients] == ["pending"] and not env.done
    env, _, _ = spool.load_for_delivery(qid)
    assert not env.done


async def test_newer_state_version_refused(spool: Spool) -> None:
    qid = await _put(spool, MSG)
    (spool.queue_dir / (qid + ".state")).write_bytes(b'{"v":9,"recipients":[]}')
    with pytest.raises(UnsupportedVersion):
        spool.load(qid)


@pytest.mark.slow
async def test_every_single_bit_flip_is_caught(spool: Spool) -> None:
    """Exhaustive: each bit of a whole queue file flipped in turn. Every flip is refused
    (CorruptError, or UnsupportedVersion when the version digit itself changes); none
    yields a message or envelope different from what was written."""
    qid = await _put(spool, MSG, signer=lambda m: b"DKIM-Signature: v=1; b=abc")
    path = spool.queue_dir / qid
    good = path.read_bytes()
    want_env, want_msg, _ = spool.load_for_delivery(qid)
    refused = 0
    for i in range(len(good)):
        for bit in range(8):
            path.write_bytes(good[:i] + bytes([good[i] ^ (1 << bit)]) + good[i + 1:])
            try:
                env, msg, _ = spool.load_for_delivery(qid)
            except (CorruptError, UnsupportedVersion):
                refused += 1
                continue
            assert (env, msg) == (want_env, want_msg), (i, bit)  # pragma: no cover
    assert refused == len(good) * 8


async def test_nul_drops_a_streamed_file_at_once(spool: Spool, tmp_path: Path) -> None:
    sub = Submitter(spool, _cfg(tmp_path), maillog=ListLog())
    d = sub.begin(_env())
    d.write(BIG)  # past SPILL: the file exists and grows
    assert list(spool.queue_dir.iterdir())
    d.write(b"tail\x00\r\n")  # dropped before the end of data, by a commit thread
    await d._incoming.gone()
    assert list(spool.queue_dir.iterdir()) == []
    d.write(b"more\r\n")
    with pytest.raises(Refused) as e:
        await d.commit()
    assert e.value.reply.enhanced == "5.6.0"
    assert list(spool.queue_dir.iterdir()) == []


def _base31_one_digit_at_a_time(n: int) -> str:
    """The encoding queue ids had before base31's two-digit table: the reference."""
    out = []
    while n:
        n, r = divmod(n, 31)
        out.append(envelope_mod._B32[r])
    return "".join(reversed(out))


def test_queue_id_digits_equal_the_one_digit_encoding_at_every_edge() -> None:
    # every power of 31 and its neighbours (where the digit count changes and where a
    # leading pair starts with a zero digit), small numbers, and today's id sizes
    edges = [1, 2, 30, 31, 32, 960, 961, 962]
    for k in range(1, 25):
        edges += [31 ** k - 1, 31 ** k, 31 ** k + 1, 2 * 31 ** k, 30 * 31 ** k]
    edges += [(1_800_000_000_000_000 + i) << 30 | (i * 7919) % (1 << 30)
              for i in range(0, 10**6, 997)]
    for n in edges:
        assert envelope_mod.base31(n) == _base31_one_digit_at_a_time(n), n
    qid = new_queue_id()
    assert qid[0] != "0" and set(qid) <= set(envelope_mod._B32) and len(qid) == 17


@pytest.mark.parametrize("version", [1, 2])
def test_the_envelope_json_is_the_bytes_json_dumps_makes(version: int) -> None:
    """Envelope.to_json encodes with one JSONEncoder kept for the process: byte for byte
    what json.dumps with the same options makes, over values that differ between
    encoder options (non-ASCII, escapes, floats, large integers, empty strings)."""
    texts = ["", "alice@example.test", "ünïcødé@bücher.example", 'q"uote\\back',
             "ctl\x00\x01\x1f\x7f", "tab\tnew\nline\r", "\u2028\u2029", "emoji \U0001f600",
             "</script>&<>'"]
    floats = [0.0, 1.5, 1e-7, 1733500000.123456, 1e22, 2.0 ** 60]
    for i, t in enumerate(texts):
        env = Envelope(queue_id=new_queue_id(), sender=t, helo=t, auth_user=t,
                       client_ip="2001:db8::1", client_port=2 ** 31 + i, envid=t,
                       received_at=floats[i % len(floats)], body_8bit=bool(i % 2),
                       recipients=[Recipient(address=t, attempts=i,
                                             next_attempt=floats[-1 - i % len(floats)],
                                             last_reply=t, orcpt=f"rfc822;{t}"),
                                   Recipient(address="b@x.example")])
        d = {f: getattr(env, f) for f in envelope_mod.STORED_FIELDS}
        d["recipients"] = [{f: getattr(r, f) for f in envelope_mod._RCPT_FIELDS}
                           for r in env.recipients]
        d["v"] = version
        want = json.dumps(d, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        assert env.to_json(version=version) == want


def _general(line: bytes) -> fmt.Layout | str:
    try:
        return fmt.layout_of(*fmt.parse_header_line(line), len(line))
    except fmt.SpoolError as e:
        return f"{type(e).__name__}: {e}"


def _fast(line: bytes) -> fmt.Layout | str:
    try:
        return fmt.header_layout(line)
    except fmt.SpoolError as e:
        return f"{type(e).__name__}: {e}"


def _header_edges() -> list[bytes]:
    written = fmt.encode_header(env_len=321, pad=7, pre=55, msg=1024, crc=0xDEADBEEF)
    lines = [written, fmt.encode_header(env_len=1, pad=0, pre=0, msg=0, crc=0),
             fmt.encode_header(env_len=fmt.MAX_ENVELOPE, pad=1 << 30, pre=1 << 30,
                               msg=1 << 50, crc=0xFFFFFFFF),
             fmt.RECEIVING_HEADER, b"", b"\n", written[:-1], written[:-2] + b"\n",
             written[:-1] + b" \n", written.replace(b" pad", b"  pad")[:-2] + b"\n",
             written.replace(b" pad", b"\tpad"), written.upper(),
             written.replace(b"sum=crc32:deadbeef", b"sum=crc32:DEADBEEF"),
             written.replace(b"sum=crc32:deadbeef", b"sum=crc32:0xdeadbe"),
             written.replace(b"sum=crc32:deadbeef", b"sum=crc32:dead_bee"),
             written.replace(b"sum=crc32:deadbeef", b"sum=crc32:deadbee "),
             written.replace(b"sum=crc32:deadbeef", b"sum=adler:deadbeef"),
             written.replace(b" 2 env", b" 3 env"), written.replace(b" 2 env", b" 02 env"),
             written.replace(b"env=321", b"env=000"), written.replace(b"env=321", b"env=0321"),
             written.replace(b"env=321", b"env=-21"), written.replace(b"env=321", b"env=3_1"),
             written.replace(b"env=321", b"env=\xd9\xa3\xd9\xa2"),
             written.replace(b"env=321 pad=7", b"pad=7 env=321"),
             written.replace(b"pad=7", b"pad=7 pad=7")[:fmt.HEADER_LEN - 1] + b"\n",
             written.replace(b"pad=7", b"xyz=7"), written.replace(b" pad=7", b"      "),
             fmt.MAGIC + b" 1 321\n", fmt.MAGIC + b" 1 0\n", b"NOT-A-SPOOL 2 env=1\n"]
    for key, limit in ((b"env", fmt.MAX_ENVELOPE), (b"pad", 1 << 30), (b"pre", 1 << 30),
                       (b"msg", 1 << 50)):
        for v in (limit, limit + 1):
            kw = {"env_len": 321, "pad": 7, "pre": 55, "msg": 1024, "crc": 1}
            kw[{b"env": "env_len"}.get(key, key.decode())] = v
            lines.append(fmt.encode_header(**kw))
    # each also padded (or cut) to the header's length, as a written one is
    return lines + [ln.rstrip(b"\n").rstrip(b" ")[:fmt.HEADER_LEN - 1]
                    .ljust(fmt.HEADER_LEN - 1) + b"\n" for ln in lines]


@pytest.mark.parametrize("line", _header_edges())
def test_header_layout_equals_the_general_parse(line: bytes) -> None:
    """header_layout() takes the header line as encode_header() writes it in one match
    (every delivery attempt reads one, issue 22): the same Layout, or the same error, as
    parse_header_line() and layout_of() over edge cases of every field."""
    assert _fast(line) == _general(line)
