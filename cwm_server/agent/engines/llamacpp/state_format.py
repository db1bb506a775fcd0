"""llama.cpp's sequence state blob, read into cwm's canonical KV layout and written back.

`llama_state_seq_get_data` (and llama-server's `/slots/{id}?action=save`, which wraps the same
bytes in a small file) writes one sequence's KV as `llama_kv_cache::state_write` lays it out
(src/llama-kv-cache.cpp at the pinned commit):

    u32 n_stream
    per stream: u32 cell_count, and when it is not 0:
        per cell: i32 pos, u32 n_seq_id, i32 seq_id * n_seq_id
        u32 v_trans, u32 n_layer
        per layer: i32 k_type, u64 k_row_bytes, cell_count rows of K
        v_trans 0: per layer: i32 v_type, u64 v_row_bytes, cell_count rows of V
        v_trans 1: per layer: i32 v_type, u32 v_element_bytes, u32 n_embd_v,
                   then n_embd_v runs of cell_count elements (V transposed)

K is stored after RoPE, token by token, one row of `n_kv_heads * head_dim` elements per cell,
which is exactly a canonical chunk's row; V is the same when flash attention is on and
transposed when it is off. So a blob parses into the canonical `[2, L, T, H*D]` array (K then
V, tokens in position order) and that array serialises back into a blob the target context
accepts, for either V layout: the bytes of each element never change, only their order.

The format is internal to llama.cpp and changes between its releases: anything this reader
does not recognise is refused (`StateFormatError`), never guessed at, and the fingerprint pins
the llama.cpp build so a window never meets a reader of another version. Quantized KV types,
several caches per context (sliding-window models write a second cache after the first),
cells shared by several sequences and positions other than 0..n-1 (a context shift) are
refused with a message that says which.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

GGML_TYPE_F32 = 0
GGML_TYPE_F16 = 1
GGML_TYPE_BF16 = 30
GGML_TYPE_NAMES = {GGML_TYPE_F32: "f32", GGML_TYPE_F16: "f16", GGML_TYPE_BF16: "bf16"}
"""The KV element types a blob may hold: the ones whose rows are plain arrays of elements."""
_ELEMENT_DTYPES = {
    GGML_TYPE_F32: np.dtype("<u4"),
    GGML_TYPE_F16: np.dtype("<u2"),
    GGML_TYPE_BF16: np.dtype("<u2"),
}
"""Elements are moved as unsigned integers of their width: bytes are copied, never converted."""

SLOT_FILE_MAGIC = 0x67677371  # LLAMA_FILE_MAGIC_GGSQ, "ggsq"
SLOT_FILE_VERSION = 3  # LLAMA_STATE_SEQ_VERSION
_TOKENS_STATE_MARKER = -1  # LLAMA_TOKEN_NULL: llama-server's packed token list follows
_TOKENS_STATE_VERSION = 1


class StateFormatError(ValueError):
    """The bytes are not a sequence state this reader understands; the message says why."""


@dataclass(frozen=True)
class StateLayout:
    """What a target context needs to accept a blob, beyond the KV itself."""

    n_stream: int
    """KV streams of the context (1 with a unified cache, else one per sequence)."""
    v_trans: bool
    """V stored transposed (llama.cpp does this when flash attention is off)."""
    kv_type: int
    """The ggml type of K and V (one of GGML_TYPE_NAMES)."""


@dataclass(frozen=True)
class SeqState:
    """One sequence's KV, parsed."""

    layout: StateLayout
    kv: np.ndarray
    """[2, n_layer, tokens, row_elements] of unsigned integers as wide as one element, tokens
    in position order (token i at position i)."""

    @property
    def token_count(self) -> int:
        return int(self.kv.shape[2])


class _Reader:
    def __init__(self, data: bytes | memoryview | mmap.mmap) -> None:
        self._view = memoryview(data).cast("B")
        self.offset = 0

    def remaining(self) -> int:
        return len(self._view) - self.offset

    def take(self, size: int, what: str) -> memoryview:
        if size < 0 or size > self.remaining():
            raise StateFormatError(
                f"the state ends inside {what} (needs {size} bytes at offset {self.offset}, "
                f"{self.remaining()} left)"
            )
        piece = self._view[self.offset : self.offset + size]
        self.offset += size
        return piece

    def unpack(self, fmt: str, what: str) -> tuple[int, ...]:
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt), what))

    def u32(self, what: str) -> int:
        return int(self.unpack("I", what)[0])


def _kv_type(value: int, which: str, layer: int) -> int:
    if value not in GGML_TYPE_NAMES:
        raise StateFormatError(
            f"layer {layer}'s {which} cache has ggml type {value}; only "
            f"{', '.join(GGML_TYPE_NAMES.values())} KV caches can be frozen (quantized KV "
            "types are not supported)"
        )
    return value


def _positions_order(positions: np.ndarray) -> np.ndarray:
    """The cell order that puts tokens at positions 0..n-1, or a refusal."""
    order = np.argsort(positions, kind="stable")
    if not np.array_equal(positions[order], np.arange(len(positions), dtype=positions.dtype)):
        low, high = int(positions.min()), int(positions.max())
        raise StateFormatError(
            f"the sequence's {len(positions)} cells hold positions {low}..{high}, not "
            "0..n-1 with each once (a shifted or partly removed context cannot be frozen)"
        )
    return order


def _read_cells(reader: _Reader, cell_count: int) -> np.ndarray:
    positions = np.empty(cell_count, dtype=np.int64)
    for cell in range(cell_count):
        pos, n_seq_id = reader.unpack("iI", "a cell's position")
        if n_seq_id != 1:
            raise StateFormatError(
                f"cell {cell} belongs to {n_seq_id} sequences; a sequence's own state has "
                "exactly one per cell"
            )
        reader.take(4, "a cell's sequence id")
        positions[cell] = pos
    return positions


def _read_rows(
    reader: _Reader, layers: int, cell_count: int, which: str, expected_type: int | None
) -> tuple[int, list[np.ndarray]]:
    kv_type = expected_type
    rows: list[np.ndarray] = []
    width = None
    for layer in range(layers):
        (type_value, row_bytes) = reader.unpack("iQ", f"layer {layer}'s {which} header")
        layer_type = _kv_type(type_value, which, layer)
        if kv_type is not None and layer_type != kv_type:
            raise StateFormatError(
                f"layer {layer}'s {which} cache is {GGML_TYPE_NAMES[layer_type]}, the others "
                f"{GGML_TYPE_NAMES[kv_type]}; K and V must share one type"
            )
        kv_type = layer_type
        element = _ELEMENT_DTYPES[layer_type]
        if row_bytes % element.itemsize or (width is not None and row_bytes != width):
            raise StateFormatError(
                f"layer {layer}'s {which} rows are {row_bytes} bytes; every layer must hold "
                "rows of the same width"
            )
        width = row_bytes
        data = reader.take(row_bytes * cell_count, f"layer {layer}'s {which} rows")
        rows.append(np.frombuffer(data, dtype=element).reshape(cell_count, -1))
    assert kv_type is not None
    return kv_type, rows


def _read_transposed_v(
    reader: _Reader, layers: int, cell_count: int, kv_type: int, width: int
) -> list[np.ndarray]:
    rows: list[np.ndarray] = []
    element = _ELEMENT_DTYPES[kv_type]
    for layer in range(layers):
        type_value, element_bytes, n_embd = reader.unpack("iII", f"layer {layer}'s V header")
        if _kv_type(type_value, "V", layer) != kv_type:
            raise StateFormatError(f"layer {layer}'s V cache type differs from its K cache's")
        if element_bytes != element.itemsize or n_embd != width:
            raise StateFormatError(
                f"layer {layer}'s transposed V has {n_embd} elements of {element_bytes} bytes "
                f"per cell; K has {width} of {element.itemsize}"
            )
        data = reader.take(n_embd * cell_count * element_bytes, f"layer {layer}'s V columns")
        rows.append(np.frombuffer(data, dtype=element).reshape(n_embd, cell_count).T)
    return rows


def parse_seq_state(data: bytes | memoryview) -> SeqState:
    """Parse a sequence's state blob (raises StateFormatError)."""
    reader = _Reader(data)
    n_stream = reader.u32("the stream count")
    if not 1 <= n_stream <= 4096:
        raise StateFormatError(f"the state says {n_stream} KV streams; not a sequence state")
    found: tuple[bool, int, np.ndarray] | None = None
    for stream in range(n_stream):
        cell_count = reader.u32(f"stream {stream}'s cell count")
        if cell_count == 0:
            continue
        if found is not None:
            raise StateFormatError("the sequence's cells span several KV streams")
        positions = _read_cells(reader, cell_count)
        v_trans, layers = reader.unpack("II", "the layer header")
        if v_trans not in (0, 1) or not 1 <= layers <= 4096:
            raise StateFormatError(
                f"the layer header says v_trans={v_trans}, {layers} layers; the cells carry "
                "data this reader does not know (a model with extended cells?)"
            )
        kv_type, k_rows = _read_rows(reader, layers, cell_count, "K", None)
        if v_trans:
            v_rows = _read_transposed_v(reader, layers, cell_count, kv_type, k_rows[0].shape[1])
        else:
            _, v_rows = _read_rows(reader, layers, cell_count, "V", kv_type)
            if v_rows[0].shape != k_rows[0].shape:
                raise StateFormatError("V rows are not as wide as K rows")
        order = _positions_order(positions)
        in_order = bool(np.array_equal(order, np.arange(cell_count)))
        kv = np.empty((2, layers, cell_count, k_rows[0].shape[1]), dtype=k_rows[0].dtype)
        for which, rows in enumerate((k_rows, v_rows)):
            for layer, layer_rows in enumerate(rows):  # one copy, into position order
                kv[which, layer] = layer_rows if in_order else layer_rows[order]
        found = (bool(v_trans), kv_type, kv)
    if reader.remaining():
        raise StateFormatError(
            f"{reader.remaining()} bytes follow the sequence's KV: the context holds a second "
            "KV cache (a sliding-window or hybrid model), which cannot be frozen yet"
        )
    if found is None:
        raise StateFormatError("the sequence holds no KV (an empty slot)")
    v_trans, kv_type, kv = found
    return SeqState(StateLayout(n_stream, v_trans, kv_type), kv)


def stream_count(data: bytes | memoryview) -> int:
    """The KV stream count a (possibly empty) sequence state starts with."""
    return _Reader(data).u32("the stream count")


def state_size(layout: StateLayout, layers: int, width: int, tokens: int) -> int:
    """Bytes of the state `StateWriter` writes for `tokens` tokens."""
    element = _ELEMENT_DTYPES[layout.kv_type].itemsize
    per_layer = 12 + tokens * width * element  # a 12-byte header (either V layout), the rows
    return 8 + 12 * tokens + 8 + 2 * layers * per_layer + 4 * (layout.n_stream - 1)


class StateWriter:
    """Writes the state that restores a window into a context of `layout`, straight into
    `out` (a writable buffer of `state_size` bytes: a mapped slot file, a bytearray), chunk
    by chunk as they arrive: each chunk's bytes are copied once, into their places in every
    layer's K and V (transposed for V when the target wants it). Tokens sit at positions
    0..T-1; llama.cpp assigns the cells to the target sequence itself."""

    def __init__(
        self, out: memoryview, layout: StateLayout, layers: int, width: int, tokens: int
    ) -> None:
        if tokens < 1:
            raise ValueError("a state needs at least one token")
        size = state_size(layout, layers, width, tokens)
        view = memoryview(out).cast("B")
        if len(view) != size:
            raise ValueError(f"the state needs {size} bytes, the buffer holds {len(view)}")
        self.layers, self.width, self.tokens = layers, width, tokens
        self.element = _ELEMENT_DTYPES[layout.kv_type]
        self.filled = 0
        buffer = np.frombuffer(view, dtype=np.uint8)
        struct.pack_into("<II", view, 0, layout.n_stream, tokens)
        cells = buffer[8 : 8 + 12 * tokens].view("<i4").reshape(tokens, 3)
        cells[:, 0] = np.arange(tokens)
        cells[:, 1] = 1  # n_seq_id; the seq id itself (0) is ignored by the reader
        cells[:, 2] = 0
        offset = 8 + 12 * tokens
        struct.pack_into("<II", view, offset, int(layout.v_trans), layers)
        offset += 8
        row_bytes = width * self.element.itemsize
        self._k: list[np.ndarray] = []
        self._v: list[np.ndarray] = []
        for which in ("K", "V"):
            for _ in range(layers):
                if which == "V" and layout.v_trans:
                    header = ("<iII", layout.kv_type, self.element.itemsize, width)
                else:
                    header = ("<iQ", layout.kv_type, row_bytes)
                struct.pack_into(header[0], view, offset, *header[1:])
                offset += 12
                rows = buffer[offset : offset + tokens * row_bytes].view(self.element)
                if which == "K":
                    self._k.append(rows.reshape(tokens, width))
                elif layout.v_trans:
                    self._v.append(rows.reshape(width, tokens).T)  # written as columns
                else:
                    self._v.append(rows.reshape(tokens, width))
                offset += tokens * row_bytes
        buffer[offset:] = 0  # the other streams: empty

    def add(self, chunk: bytes | memoryview) -> int:
        """Place the next canonical chunk ([2, L, t, E]); returns its token count."""
        per_token = 2 * self.layers * self.width * self.element.itemsize
        size = memoryview(chunk).nbytes
        if size == 0 or size % per_token:
            raise ValueError(
                f"a chunk of {size} bytes is not a whole number of tokens of {per_token} bytes"
            )
        count = size // per_token
        if self.filled + count > self.tokens:
            raise ValueError(f"the chunks hold more than the window's {self.tokens} tokens")
        data = np.frombuffer(chunk, dtype=self.element).reshape(2, self.layers, count, self.width)
        span = slice(self.filled, self.filled + count)
        for layer in range(self.layers):
            self._k[layer][span] = data[0, layer]
            self._v[layer][span] = data[1, layer]
        self.filled += count
        return count

    def check_complete(self) -> None:
        if self.filled != self.tokens:
            raise ValueError(f"the chunks hold {self.filled} tokens, the window {self.tokens}")


# -- in-memory states (llama_state_seq_get_data / set_data) ---------------------------------

MEMORY_STATE_MAGIC = 0xAF143CD8
"""`llama_state_seq_get_data` puts this and the source sequence id before the state."""


def unwrap_memory_state(data: bytes | memoryview) -> memoryview:
    """The state inside a `llama_state_seq_get_data` buffer."""
    reader = _Reader(data)
    magic, _seq = reader.unpack("Ii", "the in-memory state header")
    if magic != MEMORY_STATE_MAGIC:
        raise StateFormatError(f"not a llama.cpp in-memory sequence state (magic {magic:#010x})")
    return reader.take(reader.remaining(), "the state")


def wrap_memory_state(state: bytes | memoryview, seq_id: int = 0) -> bytes:
    """What `llama_state_seq_set_data` reads: the header, then the state."""
    return struct.pack("<Ii", MEMORY_STATE_MAGIC, seq_id) + bytes(state)


# -- llama-server's slot files -------------------------------------------------------------


def parse_slot_file(data: bytes | memoryview | mmap.mmap) -> tuple[list[int], memoryview]:
    """A `/slots/{id}?action=save` file: the slot's token ids and its sequence state blob."""
    reader = _Reader(data)
    magic, version, count = reader.unpack("III", "the slot file header")
    if magic != SLOT_FILE_MAGIC or version != SLOT_FILE_VERSION:
        raise StateFormatError(
            f"not a llama.cpp sequence state file of version {SLOT_FILE_VERSION} "
            f"(magic {magic:#010x}, version {version})"
        )
    packed = np.frombuffer(reader.take(4 * count, "the token list"), dtype="<i4")
    tokens = _unpack_tokens(packed)
    return tokens, reader.take(reader.remaining(), "the state")


def _unpack_tokens(packed: np.ndarray) -> list[int]:
    """llama-server writes either a plain token list or, newer, a marker, a version, the list
    and the positions of media chunks (which only a multimodal slot has)."""
    if len(packed) == 0 or int(packed[0]) != _TOKENS_STATE_MARKER:
        return [int(t) for t in packed]
    if len(packed) < 3 or int(packed[1]) != _TOKENS_STATE_VERSION:
        raise StateFormatError("the slot's token list has an unknown version")
    count = int(packed[2])
    if count < 0 or 3 + count + 1 > len(packed):
        raise StateFormatError("the slot's token list is truncated")
    tokens = [int(t) for t in packed[3 : 3 + count]]
    if int(packed[3 + count]) != 0:
        raise StateFormatError("the slot holds media (images or audio); only text can be frozen")
    return tokens


def slot_file_prefix(tokens: Sequence[int]) -> bytes:
    """What a slot file `/slots/{id}?action=restore` accepts holds before the state: the
    header and a plain token list, which every llama-server release reads."""
    header = struct.pack("<III", SLOT_FILE_MAGIC, SLOT_FILE_VERSION, len(tokens))
    return header + np.asarray(tokens, dtype="<i4").tobytes()


# -- canonical chunks ----------------------------------------------------------------------


def split_chunks(kv: np.ndarray, chunk_tokens: int) -> list[bytes]:
    """Canonical chunks ([2, L, t, E] each, little-endian) of `chunk_tokens` tokens, the last
    one shorter when the span does not divide the token count."""
    if chunk_tokens < 1:
        raise ValueError("chunk_tokens must be at least 1")
    tokens = kv.shape[2]
    return [  # tobytes gathers a strided view in C order: one copy per chunk
        kv[:, :, start : start + chunk_tokens, :].tobytes()
        for start in range(0, tokens, chunk_tokens)
    ]
