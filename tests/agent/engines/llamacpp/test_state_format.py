"""llama.cpp sequence-state blobs <-> canonical KV, on blobs written here the way
`llama_kv_cache::state_write` writes them (cells in any order, V transposed or not)."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from cwm_server.agent.engines.llamacpp.state_format import (
    GGML_TYPE_BF16,
    GGML_TYPE_F16,
    GGML_TYPE_F32,
    SLOT_FILE_MAGIC,
    StateFormatError,
    StateLayout,
    StateWriter,
    parse_seq_state,
    parse_slot_file,
    slot_file_prefix,
    split_chunks,
    state_size,
    stream_count,
)

LAYERS, WIDTH = 3, 8


def _kv(tokens: int, dtype: str = "<u2", seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    info = np.iinfo(np.dtype(dtype))
    return rng.integers(0, info.max, size=(2, LAYERS, tokens, WIDTH), dtype=dtype)


def llama_blob(
    kv: np.ndarray,
    *,
    v_trans: bool,
    kv_type: int = GGML_TYPE_F16,
    cell_order: list[int] | None = None,
    n_stream: int = 1,
    stream: int = 0,
    trailing: bytes = b"",
    seq_id: int = 3,
) -> bytes:
    """What llama.cpp writes for a sequence whose token i sits in cell `cell_order[i]`
    (cells are written in cell order, each with its position)."""
    tokens = kv.shape[2]
    order = cell_order if cell_order is not None else list(range(tokens))
    by_cell = sorted(range(tokens), key=lambda t: order[t])  # token held by each cell
    out = [struct.pack("<I", n_stream)]
    for s in range(n_stream):
        if s != stream:
            out.append(struct.pack("<I", 0))
            continue
        out.append(struct.pack("<I", tokens))
        for t in by_cell:
            out.append(struct.pack("<iIi", t, 1, seq_id))
        out.append(struct.pack("<II", int(v_trans), LAYERS))
        size = kv.dtype.itemsize
        for layer in range(LAYERS):
            out.append(struct.pack("<iQ", kv_type, WIDTH * size))
            out.append(kv[0, layer][by_cell].tobytes())
        for layer in range(LAYERS):
            rows = kv[1, layer][by_cell]
            if v_trans:
                out.append(struct.pack("<iII", kv_type, size, WIDTH))
                out.append(np.ascontiguousarray(rows.T).tobytes())
            else:
                out.append(struct.pack("<iQ", kv_type, WIDTH * size))
                out.append(rows.tobytes())
    return b"".join(out) + trailing


def build_seq_state(kv: np.ndarray, layout: StateLayout) -> bytes:
    """The state `StateWriter` writes for a whole window given as one chunk."""
    _, layers, tokens, width = kv.shape
    out = bytearray(state_size(layout, layers, width, tokens))
    StateWriter(memoryview(out), layout, layers, width, tokens).add(kv.tobytes())
    return bytes(out)


@pytest.mark.parametrize("v_trans", [False, True])
def test_parse_puts_tokens_in_position_order_for_either_v_layout(v_trans: bool) -> None:
    kv = _kv(5)
    blob = llama_blob(kv, v_trans=v_trans, cell_order=[3, 0, 4, 1, 2])
    state = parse_seq_state(blob)
    assert state.layout == StateLayout(1, v_trans, GGML_TYPE_F16)
    assert state.token_count == 5
    assert np.array_equal(state.kv, kv)


@pytest.mark.parametrize("v_trans", [False, True])
@pytest.mark.parametrize(
    ("kv_type", "dtype"), [(GGML_TYPE_F16, "<u2"), (GGML_TYPE_BF16, "<u2"), (GGML_TYPE_F32, "<u4")]
)
def test_build_writes_what_llama_cpp_writes_for_cells_in_order(
    v_trans: bool, kv_type: int, dtype: str
) -> None:
    kv = _kv(7, dtype)
    layout = StateLayout(1, v_trans, kv_type)
    expected = llama_blob(kv, v_trans=v_trans, kv_type=kv_type, seq_id=0)
    assert build_seq_state(kv, layout) == expected
    reparsed = parse_seq_state(build_seq_state(kv, layout))
    assert reparsed.layout == layout
    assert reparsed.kv.tobytes() == kv.tobytes()


def test_a_window_from_one_v_layout_restores_into_the_other() -> None:
    kv = _kv(9)
    frozen = parse_seq_state(llama_blob(kv, v_trans=False))
    blob = build_seq_state(frozen.kv, StateLayout(1, True, GGML_TYPE_F16))
    assert blob == llama_blob(kv, v_trans=True, seq_id=0)
    assert np.array_equal(parse_seq_state(blob).kv, kv)
    assert parse_seq_state(blob).layout.v_trans


def test_several_streams_are_kept_and_the_sequence_found_in_any() -> None:
    kv = _kv(4)
    state = parse_seq_state(llama_blob(kv, v_trans=False, n_stream=4, stream=2))
    assert state.layout.n_stream == 4
    assert np.array_equal(state.kv, kv)
    rebuilt = build_seq_state(state.kv, state.layout)
    assert stream_count(rebuilt) == 4
    assert np.array_equal(parse_seq_state(rebuilt).kv, kv)


def test_quantized_kv_is_refused_naming_the_type() -> None:
    blob = llama_blob(_kv(2), v_trans=False, kv_type=8)  # Q8_0
    with pytest.raises(StateFormatError, match=r"ggml type 8.*quantized"):
        parse_seq_state(blob)


def test_a_second_cache_after_the_first_is_refused() -> None:
    blob = llama_blob(_kv(2), v_trans=False, trailing=struct.pack("<II", 1, 0))
    with pytest.raises(StateFormatError, match="second KV cache"):
        parse_seq_state(blob)


def test_positions_with_a_gap_are_refused() -> None:
    blob = bytearray(llama_blob(_kv(3), v_trans=False))
    struct.pack_into("<i", blob, 8 + 2 * 12, 7)  # the third cell claims position 7
    with pytest.raises(StateFormatError, match=r"not 0\.\.n-1"):
        parse_seq_state(bytes(blob))


def test_a_cell_shared_by_two_sequences_is_refused() -> None:
    blob = bytearray(llama_blob(_kv(3), v_trans=False))
    struct.pack_into("<I", blob, 8 + 4, 2)
    with pytest.raises(StateFormatError, match="belongs to 2 sequences"):
        parse_seq_state(bytes(blob))


@pytest.mark.parametrize("cut", [3, 20, 100, -1])
def test_a_truncated_blob_is_refused(cut: int) -> None:
    blob = llama_blob(_kv(3), v_trans=True)
    with pytest.raises(StateFormatError, match="ends inside"):
        parse_seq_state(blob[:cut])


def test_an_empty_sequence_is_refused_but_says_its_stream_count() -> None:
    empty = struct.pack("<III", 2, 0, 0)
    assert stream_count(empty) == 2
    with pytest.raises(StateFormatError, match="holds no KV"):
        parse_seq_state(empty)


def test_slot_files_round_trip_plain_and_packed_token_lists() -> None:
    kv = _kv(3)
    blob = llama_blob(kv, v_trans=False)
    tokens, state = parse_slot_file(slot_file_prefix([5, 6, 7]) + blob)
    assert tokens == [5, 6, 7]
    assert bytes(state) == blob
    # llama-server's newer packed list: marker, version, count, ids, media count 0
    packed = np.array([-1, 1, 3, 5, 6, 7, 0], dtype="<i4")
    raw = struct.pack("<III", SLOT_FILE_MAGIC, 3, len(packed)) + packed.tobytes() + blob
    tokens, state = parse_slot_file(raw)
    assert tokens == [5, 6, 7]
    assert bytes(state) == blob


def test_slot_files_with_media_or_another_version_are_refused() -> None:
    blob = llama_blob(_kv(1), v_trans=False)
    packed = np.array([-1, 1, 1, 5, 1, 0], dtype="<i4")
    raw = struct.pack("<III", SLOT_FILE_MAGIC, 3, len(packed)) + packed.tobytes() + blob
    with pytest.raises(StateFormatError, match="media"):
        parse_slot_file(raw)
    with pytest.raises(StateFormatError, match="version 3"):
        parse_slot_file(struct.pack("<III", SLOT_FILE_MAGIC, 2, 0) + blob)


@pytest.mark.parametrize("v_trans", [False, True])
@pytest.mark.parametrize("span", [1, 2, 4, 5, 64])
def test_the_writer_fed_chunk_by_chunk_writes_what_llama_cpp_writes(
    span: int, v_trans: bool
) -> None:
    kv = _kv(10)
    chunks = split_chunks(kv, span)
    assert len(chunks) == -(-10 // span)
    assert chunks[0] == np.ascontiguousarray(kv[:, :, :span]).tobytes()
    layout = StateLayout(2, v_trans, GGML_TYPE_F16)
    out = bytearray(state_size(layout, LAYERS, WIDTH, 10))
    writer = StateWriter(memoryview(out), layout, LAYERS, WIDTH, 10)
    for chunk in chunks:
        writer.add(chunk)
    writer.check_complete()
    assert bytes(out) == llama_blob(kv, v_trans=v_trans, n_stream=2, seq_id=0)
    assert np.array_equal(parse_seq_state(bytes(out)).kv, kv)


def test_the_writer_refuses_chunks_of_the_wrong_size_or_count() -> None:
    layout = StateLayout(1, False, GGML_TYPE_F16)
    chunks = split_chunks(_kv(4), 2)

    def writer(tokens: int) -> StateWriter:
        out = bytearray(state_size(layout, LAYERS, WIDTH, tokens))
        return StateWriter(memoryview(out), layout, LAYERS, WIDTH, tokens)

    with pytest.raises(ValueError, match="whole number of tokens"):
        writer(2).add(chunks[0][:-2])
    too_few = writer(5)
    for chunk in chunks:
        too_few.add(chunk)
    with pytest.raises(ValueError, match="hold 4 tokens, the window 5"):
        too_few.check_complete()
    too_many = writer(3)
    too_many.add(chunks[0])
    with pytest.raises(ValueError, match="more than the window's 3 tokens"):
        too_many.add(chunks[1])
    with pytest.raises(ValueError, match="needs"):
        StateWriter(memoryview(bytearray(10)), layout, LAYERS, WIDTH, 2)
