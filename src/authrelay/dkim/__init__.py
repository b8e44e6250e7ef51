"""Deliverability: DKIM keys and signing, the DNS records to publish, `authrelay doctor`.

- `keys`    the key store under `state_dir/dkim/DOMAIN/SELECTOR.key` (RFC 6376 3.6.1 key
            records, RFC 8463 Ed25519), key generation.
- `signer`  `Signer`: whole message in -> DKIM-Signature header lines out (RFC 6376 5),
            the hook the spool's accept path calls once before commit.
- `records` every record an admin publishes for this relay (DKIM, SPF, DMARC, PTR, SRV).
- `doctor`  checks those records live and reports what to fix.
- `cli`     `authrelay dkim keygen|list|dns`, `authrelay dns`, `authrelay doctor`.
"""
