"""Receive buffers of the bulk channel: a real `bytes` on CPython, filled through a view
without being zero-filled first, equal and hashing like any other bytes afterwards."""

from __future__ import annotations

import os
import platform

import pytest

from cwm_client.bulk.buffers import SMALL, receive_buffer


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
