"""--log-format json: one object per line, with the call's request id and serving versions."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from recsys.serving.logs import JsonFormatter, configure_logging
from tests.serving.test_servicer import ScriptedPipeline, failure, standalone


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    """What the servicer's logger writes through a JsonFormatter while the test runs."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("recsys.serving.servicer")
    logger.addHandler(handler)
    try:
        yield out
    finally:
        logger.removeHandler(handler)


async def test_a_failing_call_logs_one_object_with_its_request_id_and_versions(
    tmp_path: Path, json_lines: io.StringIO
) -> None:
    async with standalone(tmp_path, ScriptedPipeline(RuntimeError("boom"))) as served:
        await failure(lambda: served.recommend(user_id="dana", request_id="req-9"))
    (line,) = json_lines.getvalue().splitlines()
    entry = json.loads(line)
    assert entry["level"] == "ERROR"
    assert entry["request_id"] == "req-9"
    assert entry["versions"]["models"] == {"ranker": "model-7"}
    assert "boom" in entry["exception"]
    assert entry["logger"] == "recsys.serving.servicer"


def test_lines_outside_a_call_have_no_request_id(json_lines: io.StringIO) -> None:
    logging.getLogger("recsys.serving.servicer").warning("a %s line", "plain")
    entry = json.loads(json_lines.getvalue())
    assert entry["message"] == "a plain line"
    assert entry["level"] == "WARNING"
    assert "request_id" not in entry


def test_an_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="expected one of text, json"):
        configure_logging("xml")
