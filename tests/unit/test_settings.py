"""Settings that the runtime derives: ONNX Runtime threads fitted to the cores, and the session options; the
README's table of them."""

from __future__ import annotations

import os

import pytest

from service import settings as settings_module
from service.runtime import session_options
from service.settings import Settings, available_cores


@pytest.mark.parametrize(("cores", "workers", "threads"), [(2, 1, 2), (2, 2, 1), (8, 3, 2), (2, 64, 1)])
def test_ort_threads_split_the_cores_between_workers(monkeypatch, cores, workers, threads) -> None:
    monkeypatch.setattr(settings_module, "available_cores", lambda: cores)
    assert Settings(workers=workers).ort_threads() == threads


@pytest.mark.parametrize(("cpu_max", "cap"), [("max 100000\n", None), ("200000 100000\n", 2), ("150000 100000", 2),
                                              ("50000 100000", 1), ("garbage", None), (None, None)])
def test_available_cores_reads_the_cgroup_quota(tmp_path, cpu_max, cap) -> None:
    path = tmp_path / "cpu.max"
    if cpu_max is not None:
        path.write_text(cpu_max)
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    assert available_cores(path) == (affinity if cap is None else min(affinity, cap))


def test_explicit_ort_threads_win() -> None:
    assert Settings(workers=8, intra_op_threads=3).ort_threads() == 3


@pytest.mark.parametrize("spinning", [False, True])
def test_session_options_carry_the_settings(spinning: bool) -> None:
    so = session_options(Settings(workers=2, intra_op_threads=3, ort_spinning=spinning))
    assert so.intra_op_num_threads == 3
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == ("1" if spinning else "0")


def test_spinning_defaults_off_and_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().ort_spinning is False
    monkeypatch.setenv("GENSERVE_ORT_SPINNING", "true")
    assert Settings().ort_spinning is True


@pytest.mark.parametrize(("level", "expected"), [("disable", "ORT_DISABLE_ALL"), ("basic", "ORT_ENABLE_BASIC"),
                                                 ("extended", "ORT_ENABLE_EXTENDED"), ("all", "ORT_ENABLE_ALL")])
def test_graph_optimization_level(level: str, expected: str) -> None:
    import onnxruntime as ort

    so = session_options(Settings(ort_graph_optimization=level))
    assert so.graph_optimization_level == getattr(ort.GraphOptimizationLevel, expected)


def test_server_knobs_are_checked() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="loop"):
        Settings(loop="trio")
    with pytest.raises(ValidationError, match="http"):
        Settings(http="h2")


def test_the_readme_settings_table_lists_every_setting() -> None:
    """README's "## Settings" table has one row per field of Settings, and no row for a setting that is gone."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    table = readme.split("\n## Settings\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(GENSERVE_\w+)` \|", table, re.M)
    assert len(rows) == len(set(rows)), "a variable with two rows"
    assert sorted(rows) == sorted(f"GENSERVE_{name.upper()}" for name in Settings.model_fields)


def test_memory_settings_default_to_the_measured_choices_and_are_checked() -> None:
    from pydantic import ValidationError

    s = Settings()
    assert s.ort_arena == "off" and s.warmup_batch_sizes == [1] and s.memory_release_idle_s == 5.0
    assert s.max_call_images == {"logprob": 8, "vstack": 8, "hrow": 8} and s.malloc_arenas == 2
    assert s.memory_target_mib == 256.0
    for bad in ({"ort_arena": "none"}, {"max_call_images": {"logprob": 0}}, {"warmup_batch_sizes": []},
                {"warmup_batch_sizes": [0]}, {"memory_release_idle_s": -1}, {"malloc_arenas": 65},
                {"memory_target_mib": -1}):
        with pytest.raises(ValidationError, match=next(iter(bad))):
            Settings(**bad)


def test_memory_settings_read_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GENSERVE_MAX_CALL_IMAGES", '{"logprob": 4}')
    monkeypatch.setenv("GENSERVE_WARMUP_BATCH_SIZES", "[1, 64]")
    monkeypatch.setenv("GENSERVE_ORT_ARENA", "shared")
    s = Settings()
    assert s.max_call_images == {"logprob": 4} and s.warmup_batch_sizes == [1, 64] and s.ort_arena == "shared"


@pytest.mark.parametrize(("arena", "enabled"), [("off", False), ("shared", True), ("session", True)])
def test_session_options_carry_the_arena_choice(arena: str, enabled: bool) -> None:
    assert session_options(Settings(ort_arena=arena)).enable_cpu_mem_arena is enabled
