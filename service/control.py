"""The control folder: how a model change made through one worker process reaches the others.

With several uvicorn workers each process has its own registry. A change made through the API (load, unload, a
traffic split) is applied by the worker that received it, which then publishes the model's resulting state in
the folder's desired-state record; every worker watches that record and applies what changed (service/repository.py
does the applying, this module only the files). Plain files, so that nothing but the filesystem is shared:

    desired.json       {"generation": 7, "models": {"gan": {"generation": 7, "versions": [1, 2],
                        "traffic": {"1": 90.0, "2": 10.0}, "by": 1234, "action": "load"}, ...}}
                       `versions` null: unloaded. Each model entry keeps the generation that last changed it.
    desired.lock       flock(2)ed around each read-modify-write of desired.json: writers from any process are
                       serialized and each gets the next generation, so no change is lost
    workers/<pid>.json each worker's own record: the generation it has applied (-1 while it loads the store), the
                       models it failed to bring to the desired state and why, what it serves, and its process
                       start time (a pid reused by another process is not taken for the worker)

Every write goes to a temporary file in the same folder, then os.replace(): a reader sees the old record or the
new one, never half of one. Nothing is fsync'ed: the folder is wiped at every start of the server
(python -m service), so a record never has to survive a crash of the machine, only of a process.

A worker's record is removed when it shuts down; the record of a worker that died without doing so is ignored and
removed by the next reader. Knows nothing of HTTP or of the registry."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

DESIRED, LOCK, WORKERS = "desired.json", "desired.lock", "workers"


@dataclass(frozen=True)
class Desired:
    """The desired-state record as read: generation 0 and no model until a change is published."""
    generation: int = 0
    models: Mapping[str, dict] = field(default_factory=dict)


@dataclass(frozen=True)
class WorkerRecord:
    pid: int
    generation: int                      # the last desired generation this worker has applied; -1: still loading
    errors: Mapping[str, str] = field(default_factory=dict)   # model -> why this worker differs from the desired
    serving: Mapping[str, dict] = field(default_factory=dict)  # model -> {"versions": [...], "traffic": {...}}
    started: str | None = None           # the process's start time, from /proc (None where there is none)


@dataclass(frozen=True)
class Fanout:
    """How far one published change got: `applied` of `total` live workers have it (the publishing one
    included), `failed` lists those whose apply failed ({"pid", "message"}); the rest have not yet applied it."""
    applied: int
    total: int
    failed: list[dict] = field(default_factory=list)

    @property
    def pending(self) -> int:
        return self.total - self.applied - len(self.failed)

    def as_json(self) -> dict:
        return {"applied": self.applied, "total": self.total, "failed": self.failed}


class ControlFolder:
    """One worker's view of the control folder (`pid` is whose record it writes: this process by default)."""

    def __init__(self, path: Path | str, pid: int | None = None):
        self.path = Path(path)
        self.pid = os.getpid() if pid is None else pid
        self._started = process_start_time(self.pid)
        (self.path / WORKERS).mkdir(parents=True, exist_ok=True)

    # --- the desired state ------------------------------------------------------------------------------------

    def read(self) -> Desired:
        """The desired state now; generation 0 when none was published. A record that cannot be read is logged
        and taken as empty (only something other than this module can have written it)."""
        data = _read_json(self.path / DESIRED)
        if data is None:
            return Desired()
        try:
            return Desired(int(data["generation"]), dict(data["models"]))
        except (KeyError, TypeError, ValueError):
            log.error("%s is not a desired-state record; ignored", self.path / DESIRED)
            return Desired()

    def stamp(self) -> tuple | None:
        """desired.json's identity now (None: there is none): one stat(), cheap enough to poll often. A different
        stamp means it was replaced; every write replaces it, so the inode changes even when size and mtime
        would not."""
        try:
            st = os.stat(self.path / DESIRED)
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def publish(self, model: str, state: Mapping, action: str) -> int:
        """Set `model`'s desired state ({"versions": [...] or None, "traffic": {...}}) under the next generation,
        which is returned. Serialized across processes by an exclusive flock on desired.lock, so concurrent
        publishers never lose each other's changes and generations only grow."""
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            current = self.read()
            generation = current.generation + 1
            models = {**current.models, model: {**state, "generation": generation, "by": self.pid, "action": action}}
            _write_json(self.path / DESIRED, {"generation": generation, "models": models})
            return generation
        finally:
            os.close(fd)  # closing releases the lock

    # --- the workers' records ---------------------------------------------------------------------------------

    def record(self, generation: int, errors: Mapping[str, str], serving: Mapping[str, dict]) -> None:
        """Write this worker's record."""
        _write_json(self.path / WORKERS / f"{self.pid}.json",
                    {"pid": self.pid, "started": self._started, "generation": generation, "errors": dict(errors),
                     "serving": dict(serving)})

    def forget(self) -> None:
        """Remove this worker's record (at shutdown: it no longer counts)."""
        (self.path / WORKERS / f"{self.pid}.json").unlink(missing_ok=True)

    def records(self) -> list[WorkerRecord]:
        """The records of the live workers, by pid; those of processes that are gone are removed."""
        out = []
        for path in sorted((self.path / WORKERS).glob("*.json")):
            data = _read_json(path)
            try:
                rec = WorkerRecord(int(data["pid"]), int(data["generation"]), dict(data.get("errors") or {}),
                                   dict(data.get("serving") or {}), data.get("started"))
            except (KeyError, TypeError, ValueError):
                continue  # being replaced, or not ours
            if rec.pid == self.pid or alive(rec.pid, rec.started):
                out.append(rec)
            else:
                log.info("control folder: worker %d is gone; its record is removed", rec.pid)
                path.unlink(missing_ok=True)
        return sorted(out, key=lambda r: r.pid)

    def report(self, generation: int, model: str) -> Fanout:
        """How many live workers have applied the change that published `model` at `generation`: this worker
        (which applied it before publishing) and each other whose record has reached it without an error for
        that model. A later generation counts: the worker has applied this one and moved on."""
        applied, failed, others = 1, [], [r for r in self.records() if r.pid != self.pid]
        for rec in others:
            if rec.generation < generation:
                continue
            if model in rec.errors:
                failed.append({"pid": rec.pid, "message": rec.errors[model]})
            else:
                applied += 1
        return Fanout(applied, 1 + len(others), failed)

    # --- between runs -----------------------------------------------------------------------------------------

    @staticmethod
    def wipe(path: Path | str) -> None:
        """Remove what an earlier run left (before the workers start): its desired state would otherwise be
        applied to a store read afresh. Only this module's own files are removed."""
        path = Path(path)
        for name in (DESIRED, LOCK):
            (path / name).unlink(missing_ok=True)
        for stale in [*path.glob(".*.tmp"), *(path / WORKERS).glob("*.json"), *(path / WORKERS).glob(".*.tmp")]:
            stale.unlink(missing_ok=True)


def _write_json(path: Path, data: dict) -> None:
    """Atomically: a temporary file beside `path`, then os.replace()."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, separators=(",", ":"))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        log.error("cannot read %s", path, exc_info=True)
        return None
    return data if isinstance(data, dict) else None


def process_start_time(pid: int) -> str | None:
    """When process `pid` started, in clock ticks since boot (/proc/<pid>/stat's 22nd field), or None where
    there is no /proc or no such process. With the pid it names one process: pids are reused, start times not."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after the command name, which may hold spaces
    return fields[19] if len(fields) > 19 else None


def alive(pid: int, started: str | None = None) -> bool:
    """Whether process `pid` runs, and (when `started` is known) is the one that started then."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, another user's
        pass
    return started is None or process_start_time(pid) in (None, started)
