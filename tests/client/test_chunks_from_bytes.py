"""Wrapping canonical chunk bytes: spans from the chunk size, digests computed or given."""

from __future__ import annotations

import pytest

from cwm_client import chunks_from_bytes
from cwm_client.chunks import digest
from cwm_client.errors import InvalidArgument


def test_digests_are_computed_when_not_given() -> None:
    pieces = [b"a" * 8, b"b" * 4]
    chunks = chunks_from_bytes(pieces, 2, 3)
    assert [(c.token_start, c.token_count) for c in chunks] == [(0, 2), (2, 1)]
    assert [c.digest for c in chunks] == [digest(p) for p in pieces]


def test_given_digests_are_used_as_they_are() -> None:
    pieces = [b"a" * 8, b"b" * 4]
    given = [b"\x01" * 32, b"\x02" * 32]
    assert [c.digest for c in chunks_from_bytes(pieces, 2, 3, given)] == given


def test_a_digest_count_that_does_not_match_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="2 chunks but 1 digests"):
        chunks_from_bytes([b"a" * 8, b"b" * 4], 2, 3, [b"\x01" * 32])
