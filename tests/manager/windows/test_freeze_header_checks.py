"""A freeze header is checked against the chunks it names whether they are sent on the
stream or already stored (deduplicated): a window is never committed with token ids that
do not fit its chunks."""

from __future__ import annotations

from pathlib import Path

import pytest

from cwm_client import WindowClient
from cwm_client.errors import InvalidArgument
from cwm_server.fsck import run_fsck
from cwm_server.manager.config import ManagerConfig
from tests.helpers import FINGERPRINT, ThreadedManager, synthetic_chunks, token_ids


@pytest.mark.parametrize("transport", ["grpc", "unix"])
def test_a_header_that_does_not_fit_its_already_stored_chunks_is_refused(
    tmp_path: Path, transport: str
) -> None:
    config = ManagerConfig(data_dir=tmp_path / "data", listen="127.0.0.1:0", fsync=False)
    running = ThreadedManager(config)
    try:
        chunks = synthetic_chunks(8, seed=31)  # one chunk of 8 tokens
        with WindowClient(running.target) as client:
            client.freeze("ok", chunks, fingerprint=FINGERPRINT, token_ids=token_ids(8))
            for name, ids in (("long", token_ids(100)), ("short", token_ids(4))):
                with pytest.raises(InvalidArgument) as caught:
                    client.freeze(
                        name, chunks, fingerprint=FINGERPRINT, token_ids=ids, transport=transport
                    )
                assert caught.value.field == "token_ids", caught.value
                assert "holds" in caught.value.message
            assert [w.name for w in client.list()] == ["ok"]
    finally:
        running.stop()
    report = run_fsck(config.data_dir)
    assert report.clean, [p.message for p in report.problems]
