"""The server's own threads carry their names into the operating system
(recsys/thread_names.py): a real batch thread and a real exposure writer, read back
from /proc."""

from __future__ import annotations

import asyncio
import sys
import threading
from pathlib import Path

import pytest

from recsys.linelog.files import JsonlFileWriter
from recsys.serving.batching import MicroBatcher
from recsys.serving.exposure import ExposureSink
from recsys.thread_names import os_thread_name

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="thread names in the OS are set on Linux only"
)


def os_name(native_id: int) -> str:
    return Path(f"/proc/self/task/{native_id}/comm").read_text().strip()


def test_a_name_keeps_its_first_15_bytes() -> None:
    assert os_thread_name("batch-recommend_0") == b"batch-recommend"
    assert os_thread_name("exposure-writer") == b"exposure-writer"


async def test_a_batch_thread_is_named_in_the_os_and_still_runs_its_initializer() -> None:
    seen: list[str] = []
    initialised: list[str] = []

    def batch(items: list[int]) -> list[int | Exception]:
        seen.append(os_name(threading.get_native_id()))
        return list(items)

    def initializer() -> None:
        initialised.append(os_name(threading.get_native_id()))

    async with MicroBatcher(batch, name="recommend", thread_initializer=initializer) as batcher:
        assert await batcher.submit(7) == 7
    assert seen == ["batch-recommend"]
    assert initialised == ["batch-recommend"]  # the name first, then the caller's settings
    assert os_name(threading.get_native_id()) != "batch-recommend"  # not the loop's thread


async def test_the_exposure_writer_is_named_in_the_os(tmp_path: Path) -> None:
    sink = ExposureSink(JsonlFileWriter(tmp_path / "exposures.jsonl"))
    sink.start()
    try:
        (writer,) = [t for t in threading.enumerate() if t.name == "exposure-writer"]
        assert writer.native_id is not None
        for _ in range(500):  # the thread names itself as it starts
            if os_name(writer.native_id) == "exposure-writer":
                break
            await asyncio.sleep(0.01)
        assert os_name(writer.native_id) == "exposure-writer"
    finally:
        await sink.close()
