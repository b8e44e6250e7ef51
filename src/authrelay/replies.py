"""Every reply the SMTP server sends, with its RFC 3463 enhanced status code.

One catalogue so texts stay consistent and every reply carries an enhanced code
(RFC 2034 ENHANCEDSTATUSCODES). The greeting and EHLO reply carry no enhanced code
(RFC 2034 3: not for 220 greeting / EHLO), everything else does.
"""

from __future__ import annotations

from authrelay.types import Reply

R = Reply

# 2yz / 3yz
OK = R(250, "2.0.0", "Ok")
SENDER_OK = R(250, "2.1.0", "Sender ok")
RCPT_OK = R(250, "2.1.5", "Recipient ok")
RESET = R(250, "2.0.0", "Reset state")
NOOP = R(250, "2.0.0", "Ok")
VRFY = R(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")
HELP = R(214, "2.0.0", "See RFC 5321; commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY "
         "HELP STARTTLS AUTH")
START_TLS = R(220, "2.0.0", "Ready to start TLS")
AUTH_OK = R(235, "2.7.0", "Authentication successful")
START_DATA = R(354, "", "End data with <CR><LF>.<CR><LF>")


def bye(hostname: str) -> Reply:
    return R(221, "2.0.0", f"{hostname} closing connection")


def queued(qid: str) -> Reply:
    return R(250, "2.0.0", f"Ok: queued as {qid}")


# 4yz: transient
SHUTTING_DOWN = R(421, "4.3.2", "Service shutting down, try again later")
TIMEOUT = R(421, "4.4.2", "Timeout exceeded, closing connection")
TOO_MANY_CONNECTIONS = R(421, "4.7.0", "Too many connections, try again later")
TOO_MANY_FROM_IP = R(421, "4.7.0", "Too many connections from your address, try again later")
EVICTED = R(421, "4.7.0", "Too many connections, closing an idle unauthenticated one")
TOO_MANY_PENDING = R(421, "4.7.0", "Too many connections from your address in handshake")
RATE_LIMITED = R(421, "4.7.0", "Connection rate limit exceeded, try again later")
TOO_MANY_ERRORS = R(421, "4.7.0", "Too many errors, closing connection")
TOO_MANY_COMMANDS = R(421, "4.7.0", "Too many commands, closing connection")
TOO_MANY_BAD_RCPTS = R(421, "4.7.0", "Too many invalid recipients, closing connection")
TOO_MANY_AUTH_FAILURES = R(421, "4.7.0", "Too many authentication failures, closing connection")
NON_SMTP = R(421, "4.7.0", "Non-SMTP command, closing connection")  # an HTTP request
# A TLS ClientHello where plain text and STARTTLS are spoken (a client set for port 465)
TLS_WITHOUT_STARTTLS = R(421, "4.7.0", "TLS handshake without STARTTLS, closing connection")
AUTH_TEMPFAIL = R(454, "4.7.0", "Temporary authentication failure")
AUTH_LOCKED = R(454, "4.7.0", "Too many authentication failures, try again later")
# The credentials an authenticated session logged in with were revoked (user deleted,
# password changed, app password revoked): RFC 5321 3.8, closed; its next AUTH decides.
AUTH_REVOKED = R(421, "4.7.0", "Authentication no longer valid, closing connection")
TLS_UNAVAILABLE = R(454, "4.7.0", "TLS not available")
LOCAL_ERROR = R(451, "4.3.0", "Local error in processing, try again later")
SPOOL_ERROR = R(451, "4.3.0", "Could not queue message, try again later")
# The queue file not durable within data_block_timeout (a hung disk): the commit given up.
COMMIT_TIMEOUT = R(451, "4.3.0", "Queue file write timed out, try again later")
# The user store could not say whether a local recipient is a user's address.
RECIPIENT_LOOKUP_TEMPFAIL = R(451, "4.3.0", "Recipient lookup failed, try again later")
TOO_MANY_RCPTS = R(452, "4.5.3", "Too many recipients")
USER_RATE = R(450, "4.7.1", "Sending rate limit exceeded, try again later")
DNS_TEMP = R(450, "4.7.25", "Client host name lookup failed temporarily, try again later")
NO_STORAGE = R(452, "4.3.1", "Insufficient system storage")  # queue_min_free, ENOSPC

# 5yz: permanent
UNRECOGNIZED = R(500, "5.5.2", "Command not recognized")
LINE_TOO_LONG = R(500, "5.5.6", "Line too long")
AUTH_LINE_TOO_LONG = R(500, "5.5.6", "Authentication exchange line too long")
SYNTAX = R(501, "5.5.4", "Syntax error in parameters or arguments")
EHLO_SYNTAX = R(501, "5.5.4", "Syntax: EHLO hostname")
HELO_SYNTAX = R(501, "5.5.4", "Syntax: HELO hostname")
NO_PARAMS = R(501, "5.5.4", "Syntax: no parameters allowed")
NOT_IMPLEMENTED = R(502, "5.5.1", "Command not implemented")
NEED_HELO = R(503, "5.5.1", "Send EHLO/HELO first")
NESTED_MAIL = R(503, "5.5.1", "Sender already specified")
NEED_MAIL = R(503, "5.5.1", "Need MAIL command first")
NEED_RCPT = R(503, "5.5.1", "Need RCPT command first")
ALREADY_AUTH = R(503, "5.5.1", "Already authenticated")
AUTH_IN_TRANSACTION = R(503, "5.5.1", "AUTH not allowed during a mail transaction")
ALREADY_TLS = R(503, "5.5.1", "TLS already active")
UNKNOWN_PARAM = R(555, "5.5.4", "Unsupported MAIL/RCPT parameter")
AUTH_REQUIRED = R(530, "5.7.0", "Authentication required")
# MAIL in a session whose login names a user deleted since (RFC 4954 6: authentication is
# no longer in force)
ACCOUNT_GONE = R(530, "5.7.0", "Authentication required: the account no longer exists")
# The end of data of a user deleted while its message arrived (530 is no reply to the
# final dot, RFC 5321 4.3.2; 550 is its policy refusal): refused, nothing queued.
ACCOUNT_GONE_MESSAGE = R(550, "5.7.1", "Message refused: the account no longer exists")
TLS_REQUIRED_FOR_AUTH = R(538, "5.7.11", "Encryption required for requested authentication "
                          "mechanism")
AUTH_FAILED = R(535, "5.7.8", "Authentication credentials invalid")
RELAY_DENIED = R(550, "5.7.1", "Relaying denied")


def unknown_local_recipient(address: str) -> Reply:
    """A local domain's recipient the local recipients list does not know (Postfix's
    reply to an address missing from relay_recipient_maps)."""
    return R(550, "5.1.1", f"<{address}>: Recipient address rejected: user unknown in "
             "local recipient table")
SENDER_NOT_OWNED = R(553, "5.7.1", "Sender address not owned by user")
# [auth] from_header_policy = "own": the RFC 5322 From:/Sender: is not the user's (end of DATA)
FROM_NOT_OWNED = R(550, "5.7.1", "From: header address not owned by user")
NEED_SMTPUTF8 = R(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")
BAD_BODY_PARAM = R(501, "5.5.4", "BODY must be 7BIT or 8BITMIME")
MSG_TOO_BIG = R(552, "5.3.4", "Message size exceeds fixed maximum message size")
TEXT_LINE_TOO_LONG = R(550, "5.6.0", "Message has a line longer than 998 characters "
                       "(RFC 5322 2.1.1)")
MSG_NUL = R(554, "5.6.0", "Message contains NUL characters")  # RFC 5322 2.3, RFC 6152 3
TOO_MANY_HOPS = R(554, "5.4.6", "Too many hops")  # RFC 5321 6.3 loop detection (max_hops)
BARE_LF = R(521, "5.5.2", "Bare CR or LF not allowed (RFC 5321 2.3.8); closing connection")
NO_RDNS = R(550, "5.7.25", "Client host has no reverse DNS; authenticate to relay")


def dnsbl_listed(zone: str) -> Reply:
    return R(554, "5.7.1", f"Client host blocked by {zone}; authenticate to relay")
