"""RFC 5321 path parsing: the domain decides; tricks never route."""

from __future__ import annotations

import pytest

from authrelay.address import AddressError, orcpt_for_7bit, orcpt_of, parse_path_arg
from authrelay.scheduler.bounce import original_recipient
from authrelay.smtpd.protocol import orcpt_ok


def parse(arg: str, null: bool = False):  # noqa: ANN201
    return parse_path_arg(arg, allow_null=null)


def test_plain() -> None:
    p = parse("<Alice@Example.ORG.>")
    assert p.address is not None
    assert p.address.local == "Alice" and p.address.domain_key == "example.org"


def test_null_sender() -> None:
    assert parse("<>", null=True).address is None
    with pytest.raises(AddressError) as e:
        parse("<>")
    assert e.value.reply.code == 501


def test_source_route_stripped() -> None:
    p = parse("<@hop1.example,@hop2.example:user@final.example>")
    assert p.address is not None and p.address.domain_key == "final.example"


@pytest.mark.parametrize("arg,domain", [
    ("<user%evil.example@good.example>", "good.example"),
    ("<evil.example!user@good.example>", "good.example"),
    ('<"user@evil.example"@good.example>', "good.example"),
    ("<user@[127.0.0.1]>", "[127.0.0.1]"),
    ("<user@[IPv6:::1]>", "[ipv6:::1]"),
])
def test_only_the_final_domain_counts(arg: str, domain: str) -> None:
    p = parse(arg)
    assert p.address is not None and p.address.domain_key == domain


@pytest.mark.parametrize("arg", [
    "<user@a@b>", "user@b", "<user>", "<user@>", "<@a:>", "<a@b", "<a@-b.example>",
    "<a@[300.1.1.1]>", "<a..b@example.org>", "<a@b> junk=", '<"unterminated@b>',
])
def test_syntax_errors(arg: str) -> None:
    with pytest.raises(AddressError) as e:
        parse(arg)
    assert e.value.reply.code == 501


def test_params() -> None:
    p = parse("<a@b.example> SIZE=100 BODY=8BITMIME smtputf8", null=True)
    assert p.params == {"SIZE": "100", "BODY": "8BITMIME", "SMTPUTF8": None}


def test_utf8_address() -> None:
    p = parse("<üser@exämple.org>")
    assert p.address is not None and not p.address.ascii


@pytest.mark.parametrize("param,shown", [
    ("\x1b]0;pwn\x07=", "Bad parameter syntax: ?]0;pwn?="),  # a terminal title escape
    ("a\x00b", "Bad parameter syntax: a?b"),
    ("\u00e9=1", "Bad parameter syntax: ?=1"),
])
def test_bad_parameter_is_echoed_as_printable_ascii(param: str, shown: str) -> None:
    """The refused parameter is quoted in the reply text, which is printable ASCII
    (RFC 5321 4.2); the client's control or 8-bit octets are never sent back."""
    with pytest.raises(AddressError) as e:
        parse(f"<a@b.example> {param}")
    assert (e.value.reply.code, e.value.reply.text) == (501, shown)


def test_path_and_domain_limits_are_octets() -> None:
    """RFC 5321 4.5.3.1.2 / 4.5.3.1.3: a domain of 253 octets (without the root dot), a
    path of 256 with its "<>" -- octets, so UTF-8 (RFC 6531 3.3) counts two for an é."""
    ok = "u@" + "é" * 31 + "." + "d" * 63 + "." + "d" * 63 + "." + "d" * 61  # 254 octets
    assert len(ok.encode()) == 254
    assert parse(f"<{ok}>").address is not None
    with pytest.raises(AddressError) as e:
        parse("<u@" + "é" * 32 + "." + "d" * 63 + "." + "d" * 63 + "." + "d" * 61 + ">")
    assert (e.value.reply.code, e.value.reply.enhanced) == (501, "5.1.3")
    # 200 characters, 400 octets: too long though it has fewer than 254 characters
    with pytest.raises(AddressError):
        parse("<" + "é" * 32 + "@" + ".".join(["é" * 30] * 4) + "x.example>")
    # a source route's hop domain: 253 octets at most
    with pytest.raises(AddressError):
        parse("<@" + ".".join(["é" * 40] * 4) + ":u@final.example>")
    assert parse("<@" + ".".join(["d" * 60] * 4) + "x:u@final.example>").address is not None


@pytest.mark.parametrize("literal", ["[IPv6:fe80::1%eth0]", "[IPv6:fe80::1%25eth0]",
                                     "[IPv6:fe80::1%1]"])
def test_an_ipv6_literal_has_no_zone(literal: str) -> None:
    """RFC 5321 4.1.3: IPv6-addr has no zone index; Python's ipaddress accepts one, and
    its scope would route a delivery to a link-local neighbour on a named interface."""
    with pytest.raises(AddressError) as e:
        parse(f"<u@{literal}>")
    assert (e.value.reply.code, e.value.reply.enhanced) == (501, "5.1.3")
    assert parse("<u@[IPv6:fe80::1]>").address is not None


def test_a_raw_utf8_orcpt_goes_to_a_7bit_hop_in_its_escaped_form() -> None:
    """RFC 6533 3: utf-8-addr-unitext is converted to utf-8-addr-xtext for a next hop
    without SMTPUTF8; left out when that form passes RFC 3461's 500 characters."""
    assert orcpt_for_7bit("rfc822;bob+2Bx@example.test") == "rfc822;bob+2Bx@example.test"
    assert orcpt_for_7bit("utf-8;bjørn@öld.example") == \
        "utf-8;bj\\x{F8}rn@\\x{F6}ld.example"
    assert orcpt_for_7bit("utf-8;\U0001F600@x.example") == "utf-8;\\x{1F600}@x.example"
    assert orcpt_for_7bit("utf-8;" + "ø" * 240 + "@x") == ""


@pytest.mark.parametrize("address", [
    "root@relay.test", '"john doe"@x.test', "a+b=c@x.test", '"a\\\\b"@x.test',
    "zoë+1=2@x.test", '"zo ë\\\\"@x.test', "Postmaster"])
def test_orcpt_of_an_address_is_a_valid_orcpt_the_dsn_reads_back(address: str) -> None:
    """What an alias's targets carry (spool/submit.py): an ORCPT the server itself would
    accept, in an SMTPUTF8 transaction for a UTF-8 address (rfc822 xtext, or utf-8 with
    \\x{HEX} for +, =, \\ and space), which the DSN decodes back to the address."""
    value = orcpt_of(address)
    assert orcpt_ok(value, smtputf8=True)
    assert original_recipient(value) == \
        ("rfc822;" if address.isascii() else "utf-8;") + address
    assert orcpt_ok(orcpt_for_7bit(value), smtputf8=False)


def test_orcpt_of_an_address_too_long_for_the_parameter_is_none() -> None:
    assert orcpt_of("a" * 495 + "@x.test") == ""  # 502 characters: past RFC 3461's 500
    assert orcpt_of('"' + " " * 150 + '"@x') != ""  # 3 x 150 + 4: within
