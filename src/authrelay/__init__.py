"""authrelay: an SMTP AUTH submission relay (RFC 6409) with a durable queue."""

__version__ = "0.1.0"
