"""Settings that the runtime derives: ONNX Runtime threads fitted to the cores, and the session options."""

from __future__ import annotations

import os

import pytest

from service.runtime import session_options
from service.settings import Settings


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@pytest.mark.parametrize("workers", [1, 2, 3, 64])
def test_ort_threads_split_the_cores_between_workers(workers: int) -> None:
    assert Settings(workers=workers).ort_threads() == max(1, cores() // workers)


def test_explicit_ort_threads_win() -> None:
    assert Settings(workers=8, intra_op_threads=3).ort_threads() == 3


@pytest.mark.parametrize("spinning", [False, True])
def test_session_options_carry_the_settings(spinning: bool) -> None:
    so = session_options(Settings(workers=2, ort_spinning=spinning, inter_op_threads=1))
    assert so.intra_op_num_threads == max(1, cores() // 2)
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == ("1" if spinning else "0")


def test_spinning_defaults_off_and_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().ort_spinning is False
    monkeypatch.setenv("GENSERVE_ORT_SPINNING", "true")
    assert Settings().ort_spinning is True
