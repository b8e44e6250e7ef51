"""tls.read_hello's number lists (cipher_suites, supported_groups, signature_algorithms,
supported_versions) read with one struct call: the same numbers as a pair-by-pair read,
whatever the bytes, and a real client's ClientHello lists what its context offers."""

from __future__ import annotations

import ssl

from hypothesis import given
from hypothesis import strategies as st
from support import hellos

from authrelay import tls, tlsmatch


@given(st.binary(max_size=300))
def test_be16s_reads_every_whole_pair(b: bytes) -> None:
    assert tls._be16s(b) == tuple(int.from_bytes(b[j:j + 2], "big")
                                  for j in range(0, len(b) - 1, 2))


def test_a_real_client_hello_lists_its_suites_groups_and_versions() -> None:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    h = tls.read_hello(hellos.client_hello(ctx))
    offered = [c["id"] & 0xFFFF for c in ctx.get_ciphers()]
    assert [s for s in h.suites if s in offered] == offered  # in the client's order
    assert tls.X25519 in h.groups and tls.SECP256R1 in h.groups
    assert h.versions[:2] == (tlsmatch.TLS13, tlsmatch.TLS12)
    assert h.sigalgs and h.shares
