"""Receive buffers of whole chunks: a real `bytes` on CPython, filled through a view
without being zero-filled first, equal and hashing like any other bytes afterwards."""

from __future__ import annotations

import os
import platform

import pytest

from cwm_client.buffers import POOLED, SMALL, BufferPool, receive_buffer


@pytest.mark.skipif(platform.python_implementation() != "CPython", reason="CPython only")
def test_a_large_buffer_is_a_bytes_object_filled_through_its_view() -> None:
    payload = os.urandom(3 * SMALL + 5)
    data, view = receive_buffer(len(payload))
    assert isinstance(data, bytes) and len(data) == len(payload) and not view.readonly
    view[:] = payload
    view.release()
    assert data == payload
    assert hash(data) == hash(bytes(payload))
    assert {data: 1}[payload] == 1


def test_a_small_buffer_is_a_zeroed_bytearray() -> None:
    data, view = receive_buffer(10)
    assert isinstance(data, bytearray) and data == bytearray(10)
    view[:3] = b"abc"
    assert data[:3] == b"abc"


def test_many_buffers_stay_independent() -> None:
    buffers = []
    for i in range(8):
        data, view = receive_buffer(SMALL * 2)
        view[:] = bytes([i]) * (SMALL * 2)
        view.release()
        buffers.append(data)
    assert [b[0] for b in buffers] == list(range(8))
    assert all(len(set(b)) == 1 for b in buffers)


@pytest.mark.skipif(platform.python_implementation() != "CPython", reason="CPython only")
def test_a_pooled_buffer_is_reused_only_once_nobody_holds_it() -> None:
    pool = BufferPool(keep=2)
    first, view = pool.take(POOLED)
    view[:] = b"a" * POOLED
    view.release()
    held = first  # the caller keeps the chunk
    second, view = pool.take(POOLED)
    view[:] = b"b" * POOLED
    view.release()
    assert second is not held and held == b"a" * POOLED  # a held buffer is never rewritten
    hashed = hash(second)
    address = id(second)
    del second
    third, view = pool.take(POOLED)
    assert id(third) == address  # dropped: reused, no fresh pages
    view[:] = b"c" * POOLED
    view.release()
    assert third == b"c" * POOLED and hash(third) == hash(b"c" * POOLED) != hashed
    assert held == b"a" * POOLED


def test_small_buffers_bypass_the_pool() -> None:
    pool = BufferPool(keep=2)
    data, _ = pool.take(100)
    assert isinstance(data, bytearray)
