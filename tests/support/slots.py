"""`ApartCounters`: the workers' shared counters with every key in a slot of its own.

The real table (policy/counters.py) hashes addresses and user names with a per-start
secret, so two keys share a counter once in about `slots` draws: a limit only gets
stricter, as its contract says. A test that counts a few keys and asserts each one's
limits apart must not depend on that draw (test_throttle's `[shared]` tests failed about
once in 300 runs: 192.0.2.1 and 192.0.2.2 in one slot, the second address refused
`max_connections_per_ip`). Here each new key takes the next slot, in the order first
asked; keys past `slots` wrap and share, as on the real table. One process only: a forked
child would number its keys on its own (test_anvil's fork tests use the real table).
"""

from __future__ import annotations

from authrelay.policy.counters import SharedCounters


class ApartCounters(SharedCounters):
    def _slot(self, key: str) -> int:
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = len(self._slots) % self.slots
        return slot
