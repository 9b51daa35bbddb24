"""The control folder (service/control.py): generations, concurrent writers in several processes, the workers'
records and stale ones; then two "workers" in this process (two registries and repositories sharing one folder)
on the shipped GAN: a change through one reaches the other, a failure on one is reported, a refused load goes no
further, and a worker that starts later catches up."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from service.control import DESIRED, WORKERS, ControlFolder, Fanout, alive, process_start_time
from service.metrics import Metrics
from service.repository import LoadRefused, Repository
from service.runtime import Registry
from service.settings import Settings
from service.store import refuse
from tests.conftest import REPO, copy_version


@pytest.fixture
def live_pids():
    """Pids of live processes other than this one, to stand for other workers (ended after the test)."""
    procs: list[subprocess.Popen] = []

    def make(n: int) -> list[int]:
        procs.extend(subprocess.Popen(["sleep", "120"]) for _ in range(n))
        return [p.pid for p in procs[-n:]]
    yield make
    for p in procs:
        p.kill()
        p.wait()


def test_generations_grow_and_each_model_keeps_the_one_that_changed_it(tmp_path):
    folder = ControlFolder(tmp_path)
    assert folder.read().generation == 0 and not folder.read().models and folder.stamp() is None
    assert folder.publish("gan", {"versions": [1, 2], "traffic": {}}, "load") == 1
    stamp = folder.stamp()
    assert stamp is not None and folder.stamp() == stamp
    assert folder.publish("vae", {"versions": None, "traffic": {}}, "unload") == 2
    assert folder.publish("gan", {"versions": [1, 2], "traffic": {"2": 100.0}}, "traffic") == 3
    desired = folder.read()
    assert desired.generation == 3
    assert desired.models["gan"] == {"versions": [1, 2], "traffic": {"2": 100.0}, "generation": 3,
                                     "by": os.getpid(), "action": "traffic"}
    assert desired.models["vae"]["generation"] == 2 and desired.models["vae"]["versions"] is None
    assert folder.stamp() != stamp                                   # replaced: a watcher reads it again
    assert sorted(p.name for p in tmp_path.iterdir()) == ["desired.json", "desired.lock", "workers"]  # no temp left


# Each writer waits for the go file, so that all of them publish at once (not one after the other as they start).
_PUBLISHER = """
import os, sys, time
from service.control import ControlFolder
path, writer, changes = sys.argv[1], sys.argv[2], int(sys.argv[3])
folder = ControlFolder(path)
while not os.path.exists(os.path.join(path, "go")):
    time.sleep(0.001)
for i in range(changes):
    folder.publish(f"m{writer}-{i}", {"versions": [1], "traffic": {}}, "load")
"""


def test_concurrent_writers_in_several_processes_lose_no_change(tmp_path):
    """Four processes publish 100 changes each at once: every change is there, under its own generation, and a
    reader never sees a half-written record nor a generation going back."""
    writers, changes = 4, 100
    seen, stop = [], threading.Event()

    def reader() -> None:
        folder = ControlFolder(tmp_path)
        while not stop.is_set():
            raw = (tmp_path / DESIRED).read_bytes() if (tmp_path / DESIRED).exists() else b'{"generation": 0}'
            seen.append(json.loads(raw)["generation"])   # json.loads raises on a half-written file
            folder.read()

    procs = [subprocess.Popen([sys.executable, "-c", _PUBLISHER, str(tmp_path), str(w), str(changes)], cwd=REPO)
             for w in range(writers)]
    watcher = threading.Thread(target=reader)
    watcher.start()
    try:
        (tmp_path / "go").touch()
        for p in procs:
            assert p.wait(timeout=120) == 0
    finally:
        stop.set()
        watcher.join()
    desired = ControlFolder(tmp_path).read()
    assert desired.generation == writers * changes
    assert len(desired.models) == writers * changes
    assert sorted(e["generation"] for e in desired.models.values()) == list(range(1, writers * changes + 1))
    assert seen == sorted(seen) and len(set(seen)) > 2
    assert not list(tmp_path.glob(".*.tmp"))


def test_records_of_workers_that_are_gone_are_ignored_and_removed(tmp_path, live_pids):
    me = ControlFolder(tmp_path)
    other_pid, = live_pids(1)
    other = ControlFolder(tmp_path, pid=other_pid)
    dead = subprocess.Popen(["true"])
    dead.wait()
    for folder, generation in ((me, 3), (other, 2), (ControlFolder(tmp_path, pid=dead.pid), 3)):
        folder.record(generation, {}, {})
    # a pid reused by another process: the record names a start time that pid does not have
    reused = tmp_path / WORKERS / f"{os.getppid()}.json"
    reused.write_text(json.dumps({"pid": os.getppid(), "generation": 3, "started": "1", "errors": {}}))
    assert [r.pid for r in me.records()] == sorted([os.getpid(), other_pid])
    assert not (tmp_path / WORKERS / f"{dead.pid}.json").exists() and not reused.exists()
    assert alive(os.getpid(), process_start_time(os.getpid())) and not alive(dead.pid)
    other.forget()
    assert [r.pid for r in me.records()] == [os.getpid()]


def test_the_report_counts_who_applied_failed_or_has_not_yet(tmp_path, live_pids):
    me = ControlFolder(tmp_path)
    me.record(5, {}, {})
    late, failed, ahead, other_model = (ControlFolder(tmp_path, pid=p) for p in live_pids(4))
    late.record(4, {}, {})                                   # has not reached generation 5
    failed.record(5, {"gan": "version 2: failed to warm up"}, {})
    ahead.record(7, {}, {})                                  # applied 5 and later ones
    other_model.record(5, {"vae": "no model folder"}, {})    # a failure of another model does not count here
    report = me.report(5, "gan")
    assert report == Fanout(applied=3, total=5, failed=[{"pid": failed.pid, "message": "version 2: failed to "
                                                                                          "warm up"}])
    assert report.pending == 1
    assert report.as_json() == {"applied": 3, "total": 5, "failed": report.failed}


def test_wipe_removes_an_earlier_run_only(tmp_path):
    folder = ControlFolder(tmp_path)
    folder.publish("gan", {"versions": [1], "traffic": {}}, "load")
    folder.record(1, {}, {})
    (tmp_path / "yours.txt").write_text("kept")
    ControlFolder.wipe(tmp_path)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["workers", "yours.txt"]
    assert ControlFolder(tmp_path).read().generation == 0


# --- two workers in one process --------------------------------------------------------------------------------

async def worker(store: Path, folder: Path, pid: int, **overrides) -> Repository:
    """A registry on `store` and its repository, started as app.py's lifespan does with several workers."""
    settings = Settings(store_path=store, workers=2, intra_op_threads=1, worker_threads=1, drain_grace_s=0,
                        control_dir=folder, control_wait_s=overrides.pop("control_wait_s", 5), **overrides)
    repo = Repository(Registry(settings, Metrics()), settings, ControlFolder(folder, pid=pid))
    await repo.register()
    await asyncio.to_thread(repo.registry.load)
    await repo.registry.start(ready=False)
    await repo.follow()
    repo.registry.ready = True
    return repo


async def stop(*repos: Repository, tasks: tuple[asyncio.Task, ...] = ()) -> None:
    """Stop the repositories' background `tasks` (watchers, polls), then the workers, as the lifespan does."""
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for r in repos:
        r.leave()
        await r.registry.stop()


def serving(repo: Repository, name: str = "gan") -> list[int]:
    return sorted(repo.registry.models.get(name, {}))


@pytest.fixture
def store(tmp_path) -> Path:
    shutil.copytree(REPO / "models_store" / "gan", tmp_path / "store" / "gan")
    return tmp_path / "store"


def test_a_change_through_one_worker_reaches_the_other(store, tmp_path, live_pids):
    other_pid, late_pid = live_pids(2)

    async def scenario() -> None:
        a = await worker(store, tmp_path / "control", os.getpid())
        b = await worker(store, tmp_path / "control", other_pid)
        watching = tuple(asyncio.create_task(r.watch_forever()) for r in (a, b))
        try:
            copy_version(store, "gan", 1, 2)
            loaded = await a.load("gan")
            assert (loaded.serving, loaded.added, loaded.workers) == ([1, 2], [2], Fanout(2, 2, []))
            assert serving(b) == [1, 2]                          # applied before a's answer

            split = await b.set_traffic("gan", {"1": 25, "2": 75})   # through the other worker
            assert split.workers == Fanout(2, 2, [])
            assert a.registry.snapshot.traffic["gan"] == ((1, 25.0), (2, 75.0))

            generation = a.control.read().generation
            copy_version(store, "gan", 1, 3, truncate="generator.onnx")
            with pytest.raises(LoadRefused, match="generator.onnx"):
                await a.load("gan")                              # refused where it was asked: not published
            assert a.control.read().generation == generation and serving(b) == [1, 2]

            unloaded = await b.unload("gan")
            assert unloaded.unloaded == [1, 2] and unloaded.workers.applied == 2 and serving(a) == []
            shutil.rmtree(store / "gan" / "3")
            reloaded = await a.load("gan")
            assert reloaded.serving == [1, 2] and reloaded.workers.applied == 2 and serving(b) == [1, 2]
            assert (await a.set_traffic("gan", {"2": 100})).workers.applied == 2

            # a worker that starts later (one replacing a worker that died) serves what the others serve
            copy_version(store, "gan", 1, 4)                     # on disk, but never loaded through the API
            late = await worker(store, tmp_path / "control", late_pid)
            assert serving(late) == [1, 2] and late.registry.snapshot.traffic["gan"] == ((2, 100.0),)
            record = next(r for r in a.control.records() if r.pid == late_pid)
            assert record.generation == a.control.read().generation and not record.errors
            assert record.serving["gan"] == {"versions": [1, 2], "traffic": {"2": 100.0}}
            await stop(late)
            assert [r.pid for r in a.control.records()] == sorted([os.getpid(), other_pid])
        finally:
            await stop(a, b, tasks=watching)

    asyncio.run(scenario())


def test_a_version_that_fails_on_one_worker_only_is_reported(store, tmp_path, live_pids):
    other_pid, = live_pids(1)

    async def scenario() -> None:
        a = await worker(store, tmp_path / "control", os.getpid())
        b = await worker(store, tmp_path / "control", other_pid)

        def fails_to_warm_up(version_dirs, refused):           # as a version too big for b's memory would
            for d in version_dirs:
                refuse(refused, d, ["failed to warm up: RuntimeError: out of memory (simulated)"])
            return []
        b.registry.build = fails_to_warm_up
        watching = asyncio.create_task(b.watch_forever())
        try:
            copy_version(store, "gan", 1, 2)
            loaded = await a.load("gan")
            assert loaded.serving == [1, 2]
            assert loaded.workers.applied == 1 and loaded.workers.total == 2
            assert [f["pid"] for f in loaded.workers.failed] == [other_pid]
            assert "out of memory (simulated)" in loaded.workers.failed[0]["message"]
            assert serving(b) == [1]                             # what served keeps serving
            record = next(r for r in a.control.records() if r.pid == other_pid)
            assert "out of memory" in record.errors["gan"] and record.serving["gan"]["versions"] == [1]

            del b.registry.build                                 # mended: the next change clears the failure
            assert (await a.load("gan")).workers == Fanout(2, 2, [])
            assert serving(b) == [1, 2]
        finally:
            await stop(a, b, tasks=(watching,))

    asyncio.run(scenario())


def test_the_answer_waits_a_bounded_time_for_a_worker_that_does_not_follow(store, tmp_path, live_pids):
    """A worker registered but stuck (still loading, say) is reported as not yet applied after the wait."""
    stuck = ControlFolder(tmp_path / "control", pid=live_pids(1)[0])
    stuck.record(-1, {}, {})

    async def scenario() -> None:
        a = await worker(store, tmp_path / "control", os.getpid(), control_wait_s=0.3)
        try:
            copy_version(store, "gan", 1, 2)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            loaded = await a.load("gan")
            assert loaded.workers == Fanout(1, 2, []) and loaded.workers.pending == 1
            assert 0.3 <= loop.time() - t0 < 5
        finally:
            await stop(a)

    asyncio.run(scenario())


def test_what_a_poll_changes_is_published_for_the_other_workers(store, tmp_path, live_pids):
    """A worker's rescan that finds a new version publishes it: a worker that has not rescanned (here one that
    never does) serves it too, and so would one starting later."""
    other_pid, = live_pids(1)

    async def scenario() -> None:
        a = await worker(store, tmp_path / "control", os.getpid(), model_control="poll", poll_interval_s=0.1)
        b = await worker(store, tmp_path / "control", other_pid)
        tasks = (asyncio.create_task(a.poll_forever()), asyncio.create_task(b.watch_forever()))
        try:
            await asyncio.sleep(0.05)                            # the poll has taken the store's fingerprints
            copy_version(store, "gan", 1, 2)
            for _ in range(100):
                if serving(b) == [1, 2]:
                    break
                await asyncio.sleep(0.05)
            assert serving(a) == serving(b) == [1, 2]
            assert a.control.read().models["gan"]["action"] == "poll"
        finally:
            await stop(a, b, tasks=tasks)

    asyncio.run(scenario())
