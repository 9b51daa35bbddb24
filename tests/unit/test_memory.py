"""service/memory.py: the process's memory and age from /proc, malloc_trim, load costs, and the activity count
that tells when ONNX Runtime has been idle."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from service import memory


def test_process_memory_reads_this_process() -> None:
    m = memory.process_memory()
    assert m["rss_bytes"] > 10 * 2**20
    assert m["rss_peak_bytes"] >= m["rss_bytes"]
    assert m["rss_anon_bytes"] + m["rss_file_bytes"] + m["rss_shmem_bytes"] == m["rss_bytes"]
    assert memory.rss_bytes() == pytest.approx(m["rss_bytes"], rel=0.2)


def test_touched_memory_shows_in_rss() -> None:
    before = memory.rss_bytes()
    block = np.ones(64 * 2**20, np.uint8)  # 64 MiB, every page written
    assert memory.rss_bytes() - before > 48 * 2**20
    del block


def test_a_process_that_is_not_there_has_no_figures() -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert memory.process_memory(gone.pid) == {}
    assert memory.rss_bytes(gone.pid) is None
    assert memory.process_age(gone.pid) is None


def test_process_age_of_a_new_process() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        time.sleep(0.5)
        age = memory.process_age(child.pid)
        assert age is not None and 0.3 < age < 10
        assert memory.process_age() > age  # this one started before its child
    finally:
        child.kill()
        child.wait()


def test_malloc_trim_gives_freed_heap_pages_back() -> None:
    """Blocks below the mmap threshold come from the heap and stay resident after free() until trimmed."""
    assert memory.malloc_trim()
    keep = [np.ones(100_000, np.uint8) for _ in range(800)]  # 80 MB in 100 kB blocks: heap, not mmap
    del keep[::2]                                             # every other block freed, between live ones
    before = memory.rss_bytes()
    assert memory.malloc_trim()
    assert before - memory.rss_bytes() > 16 * 2**20, "no pages came back"
    del keep


def test_set_malloc_arenas_refuses_nothing_it_should_not_do() -> None:
    assert memory.set_malloc_arenas(0) is False  # 0: leave glibc's default
    code = "from service.memory import set_malloc_arenas; print(set_malloc_arenas(2))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "True", done.stderr


def test_measured_returns_the_result_and_its_cost() -> None:
    # 64 MiB: past glibc's largest mmap threshold, so fresh pages whatever the heap holds free
    result, cost = memory.measured(lambda: (time.sleep(0.05), np.ones(64 * 2**20, np.uint8))[1])
    assert result.sum() == 64 * 2**20
    assert 0.04 < cost.seconds < 5
    assert cost.rss_bytes > 48 * 2**20
    assert cost.as_dict() == {"seconds": round(cost.seconds, 4), "rss_bytes": cost.rss_bytes}


def test_activity_counts_calls_and_idle_time() -> None:
    activity = memory.Activity()
    started, release = threading.Event(), threading.Event()

    def slow(x: int) -> int:
        started.set()
        release.wait(10)
        return x + 1

    def broken(x: int) -> int:
        raise RuntimeError("boom")

    track_slow, track_broken = activity.track(slow), activity.track(broken)
    t = threading.Thread(target=track_slow, args=(1,))
    t.start()
    started.wait(10)
    assert activity.in_flight == 1 and activity.idle_for() is None
    release.set()
    t.join(10)
    with pytest.raises(RuntimeError):
        track_broken(1)
    assert activity.in_flight == 0 and activity.calls == 2
    idle = activity.idle_for()
    assert idle is not None and 0 <= idle < 5
    assert activity.track(lambda x: x * 2)(21) == 42


@pytest.mark.parametrize(("idle_s", "called", "rss_mib", "due"), [
    (None, True, 900, False),   # a call is running: never, whatever RSS is
    (9.0, False, 900, False),   # nothing ran since the last release: nothing to give back
    (5.0, True, 100, True),     # idle long enough: always
    (0.1, True, 900, False),    # over the target, but a gap between two steps is not a pause
    (0.3, True, 300, True),     # over the target and paused: now
    (0.3, True, 200, False),    # paused under the target: wait for the idle release
    (0.3, True, None, False),   # RSS unknown: only the idle release
])
def test_release_is_due_when_idle_or_paused_over_the_target(idle_s, called, rss_mib, due) -> None:
    rss = None if rss_mib is None else rss_mib * 1024 * 1024
    assert memory.release_due(idle_s, called, rss, release_idle_s=5.0, target_bytes=256 * 1024 * 1024) is due


def test_without_a_target_only_the_idle_release_applies() -> None:
    assert not memory.release_due(1.0, True, 1 << 40, release_idle_s=5.0, target_bytes=0)
    assert memory.release_due(5.0, True, 1 << 40, release_idle_s=5.0, target_bytes=0)


def test_over_the_target_a_release_waits_for_rss_to_regrow_past_what_the_last_one_left() -> None:
    """Models that alone exceed the target must not release after every call: only once RSS has grown
    REGROWTH past what the last release left."""
    mib, left = 1024 * 1024, 400 * 1024 * 1024
    due = lambda rss: memory.release_due(0.3, True, rss, release_idle_s=5.0, target_bytes=256 * mib,  # noqa: E731
                                         released_rss=left)
    assert not due(left + 10 * mib)
    assert due(left + memory.REGROWTH + mib)
