"""Numbers a request field cannot hold are refused by the SDK with INVALID_ARGUMENT naming
the field and its range, before anything is sent (protobuf alone says only "Value out of
range")."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cwm_client import WindowClient
from cwm_client.errors import InvalidArgument
from cwm_client.sessions.requests import freeze_session_request
from cwm_client.windows.freeze_stream import build_header
from cwm_server.manager.config import ManagerConfig
from tests.helpers import FINGERPRINT, ThreadedManager, synthetic_chunks, token_ids

CHUNKS = synthetic_chunks(512, seed=2)


@pytest.fixture(scope="module")
def manager(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedManager]:
    root: Path = tmp_path_factory.mktemp("ranges")
    running = ThreadedManager(
        ManagerConfig(data_dir=root / "data", listen="127.0.0.1:0", fsync=False)
    )
    yield running
    running.stop()


@pytest.mark.parametrize(
    ("arguments", "field", "says"),
    [
        ({"ttl_seconds": -1}, "ttl_seconds", "from 0 to 18446744073709551615"),
        ({"chunk_tokens": 2**32}, "chunk_tokens", "from 0 to 4294967295"),
        ({"token_ids": [-1] * 512}, "token_ids", "must each be a whole number"),
        ({"token_ids": ["7"] * 512}, "token_ids", "token_ids"),
    ],
)
def test_a_freeze_header_refuses_a_value_its_field_cannot_hold(
    arguments: dict[str, object], field: str, says: str
) -> None:
    given: dict[str, object] = {"fingerprint": FINGERPRINT, "token_ids": token_ids(512)}
    given.update(arguments)
    with pytest.raises(InvalidArgument) as caught:
        build_header("w", CHUNKS, **given)  # type: ignore[arg-type]
    assert caught.value.field == field and says in caught.value.message


def test_freeze_thaw_and_list_refuse_out_of_range_numbers_and_store_nothing(
    manager: ThreadedManager,
) -> None:
    with WindowClient(manager.target) as client:
        with pytest.raises(InvalidArgument) as caught:
            client.freeze(
                "w", CHUNKS, fingerprint=FINGERPRINT, token_ids=token_ids(512), ttl_seconds=-1
            )
        assert caught.value.field == "ttl_seconds"
        with pytest.raises(InvalidArgument) as caught:
            client.thaw("w", first_chunk=-1, streams=1)
        assert caught.value.field == "first_chunk"
        with pytest.raises(InvalidArgument) as caught:
            client.thaw("w", chunk_count=2**40, streams=2)
        assert caught.value.field == "chunk_count"
        with pytest.raises(InvalidArgument) as caught:
            client.list_page(page_size=-1)
        assert caught.value.field == "page_size"
        assert list(client.list()) == []


def test_a_session_freeze_order_refuses_a_ttl_beyond_its_field() -> None:
    with pytest.raises(InvalidArgument) as caught:
        freeze_session_request("s", "w", description="", tags=None, ttl_seconds=2**70, agent_id="")
    assert caught.value.field == "ttl_seconds"
