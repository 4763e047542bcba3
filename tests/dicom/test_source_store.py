"""The DICOM source a session keeps travels through both store backends unchanged."""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Iterator

import numpy as np
import pytest
from pydicom.dataset import Dataset

from service.dicom.series import read_series
from service.dicom.source import ct_source, session_source
from service.store.contract import SessionRecord
from service.store.memory_backend import MemoryStore
from service.store.redis_backend import RedisStore


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest) -> Iterator[MemoryStore | RedisStore]:
    if request.param == "memory":
        yield MemoryStore(session_ttl_s=60)
        return
    redis_store = RedisStore(request.getfixturevalue("redis_url"), session_ttl_s=60, claim_idle_s=0.3,
                             prefix=request.getfixturevalue("redis_prefix"))
    yield redis_store
    redis_store.close()


def test_source_round_trips(store: MemoryStore | RedisStore, pair: dict[str, list[Dataset]]) -> None:
    _, ct = read_series(pair["ct"], role="ct", max_voxels=10**7)
    _, pet = read_series(pair["pet"], role="pet", max_voxels=10**7)
    source = session_source(ct, pet)
    record = SessionRecord(
        id=uuid.uuid4().hex, owner=None, grid={"shape": [4, 4, 4], "spacing_mm": 1.0, "origin_mm": [0.0] * 3},
        original_shape=(48, 44, 20), original_affine=tuple(tuple(float(v) for v in row) for row in np.eye(4)),
        created_at=time.time(), source=source,
    )
    loaded = store.get_session(store.create_session(record, b"images").id)
    assert loaded.source == source
    assert ct_source(loaded.source) == ct
    assert ct_source(dataclasses.replace(loaded, source=None).source) is None
    assert loaded.source is not None and loaded.source["pet"]["sop_instance_uids"] == []  # only the CT is referenced
