"""Model control on a running service, Triton's way: load (rescan a model's folder, build what is new off the event
loop, publish in one step, drain what left) and unload, by request or by polling the store, and the traffic split
of requests that name no version. Knows nothing of HTTP: routes/v2.py and routes/models.py call it, and
service/errors.py answers its exceptions.

Changes are applied one at a time (a lock), so two loads of one model cannot race. A version that fails
validation or warm-up is refused with its reasons; what served keeps serving. A version leaving service is no
longer published, then drained (Registry.retire): requests that chose it finish on it.

Several worker processes: each has its own registry, so a change reaches the others through the control folder
(service/control.py). The worker that receives a change validates and applies it first (a refused change is
answered 4xx there and goes no further, unless part of it did change what the worker serves), then publishes the
model's resulting state (its versions, or unloaded, and its traffic split) as the next generation of the desired
state, and waits a bounded time (GENSERVE_CONTROL_WAIT_S) for the others, reporting how many have applied it.
Every worker watches the desired state (a stat() every WATCH_INTERVAL_S), applies each model entry newer than
what it applied with the same methods, restricted to the versions the publisher serves, and records the
generation it reached and any failure (a version that fails on this worker only) in its own record, which the
publisher reads. A worker that starts later (uvicorn replacing one that died) applies the desired state after
loading the store, before it turns ready. Poll mode publishes what its rescans change, so a worker that starts
later serves the same set as the others."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from service.control import ControlFolder, Fanout
from service.runtime import ModelNotFound, ModelVersion, Registry, admitted, checked_split
from service.settings import Settings
from service.store import printable, scan_model, version_name_problem

log = logging.getLogger(__name__)
T = TypeVar("T")
WATCH_INTERVAL_S = 0.2      # how often a worker looks for a new desired state (one stat() of a file)
_REPORT_EVERY_S = 0.05      # how often the receiving worker reads the others' records while it waits for them
ONE_WORKER = Fanout(applied=1, total=1)


class ModelControlRefused(Exception):
    """This service takes no model changes through the API (model_control none, or several workers and no
    control folder)."""


class LoadRefused(Exception):
    """A load refused some versions: `refused` maps each path to its problems; `serving` is what serves now."""

    def __init__(self, model: str, refused: dict[str, list[str]], serving: list[int]):
        reasons = "; ".join(f"{path}: {', '.join(problems)}" for path, problems in sorted(refused.items()))
        super().__init__(f"loading {model} refused {reasons}; serving versions {serving}")
        self.model, self.refused, self.serving = model, refused, serving


class InvalidTraffic(ValueError):
    """A traffic split the model cannot take (an unloaded version, a negative weight); `field` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


@dataclass
class LoadResult:
    model: str
    serving: list[int]
    added: list[int] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)
    workers: Fanout = ONE_WORKER


@dataclass
class UnloadResult:
    model: str
    unloaded: list[int]
    workers: Fanout = ONE_WORKER


@dataclass
class TrafficResult:
    model: str
    traffic: dict[str, float]
    default_version: int
    workers: Fanout = ONE_WORKER


class Repository:
    """`control`: the control folder shared with the other worker processes (None with one worker)."""

    def __init__(self, registry: Registry, settings: Settings, control: ControlFolder | None = None):
        self.registry, self.settings, self.control = registry, settings, control
        self._lock = asyncio.Lock()
        self._seen: dict[str, tuple] = {}  # poll mode: each model folder's fingerprint at the last rescan
        # several workers: the generation of each model's desired entry that this worker applied or published,
        # the desired generation it has gone through (-1: none yet), and the models it failed to bring there
        self._applied: dict[str, int] = {}
        self._generation = -1
        self._stamp: tuple | None = None  # the desired-state file's stamp when last followed
        self._errors: dict[str, str] = {}
        self._wake = asyncio.Event()  # set by a publish: the watcher records the new generation at once

    def check_control(self) -> None:
        if self.settings.model_control == "none":
            raise ModelControlRefused("model control is off (GENSERVE_MODEL_CONTROL=none): the store is read once "
                                      "at start-up; set it to explicit or poll to load and unload models")
        if self.settings.workers > 1 and self.control is None:
            raise ModelControlRefused(f"with {self.settings.workers} worker processes and no GENSERVE_CONTROL_DIR a "
                                      "change would reach only the worker that received it; start the server with "
                                      "`python -m service`, which sets one up, or set GENSERVE_CONTROL_DIR")

    def state(self, name: str) -> dict:
        """What this worker serves as `name`, as the desired state records it: versions (None: not loaded) and
        the traffic split."""
        versions = self.registry.models.get(name)
        return {"versions": sorted(versions) if versions else None,
                "traffic": {str(v): w for v, w in self.registry.snapshot.traffic.get(name, ())}}

    async def load(self, name: str) -> LoadResult:
        """Rescan `name`'s folder and apply its version policy: new versions built and warmed up off the event
        loop, then published with those that stay; versions gone from disk or from the policy drained. With
        several workers, the others then serve the same versions (`workers` says how many have)."""
        result, result.workers = await self._change(name, "load", lambda: self._load(name))
        return result

    async def _load(self, name: str, only: set[int] | None = None) -> LoadResult:
        """`only`: the versions the desired state names; others the folder holds are not loaded (and leave)."""
        reg, root = self.registry, self.settings.store_path
        scan = await asyncio.to_thread(scan_model, root, name)
        if scan is None:
            raise ModelNotFound(f"no model folder {printable(str(root / name))}")
        current: Mapping[int, ModelVersion] = reg.models.get(name, {})
        wanted = {int(d.name): d for d in admitted(scan.versions, self.settings.version_policy)
                  if only is None or int(d.name) in only}
        new_dirs = [d for v, d in sorted(wanted.items()) if v not in current]
        built = await asyncio.to_thread(reg.build, new_dirs, scan.refused) if new_dirs else []
        started = []
        for mv in built:
            try:
                await mv.start()
                started.append(mv)
            except Exception as e:  # as at start-up: this version is refused, the others serve
                scan.refuse(mv.loaded.path, [f"failed to start: {type(e).__name__}: {e}"])
                await reg.stop_quietly(mv)
        serving = {v: mv for v, mv in current.items() if v in wanted}
        serving.update({mv.version: mv for mv in started})
        leaving = [mv for v, mv in current.items() if v not in serving]
        await reg.publish_model(name, serving, scan.refused)
        reg.retire(leaving)
        result = LoadResult(name, sorted(serving), sorted(mv.version for mv in started),
                            sorted(mv.version for mv in leaving))
        self._seen[name] = _fingerprint(root / name)
        log.info("loaded %s: serving %s, added %s, removed %s", name, result.serving, result.added, result.removed)
        tried = {printable(str(d)) for d in new_dirs}
        if failed := {p: why for p, why in scan.refused.items() if p in tried}:
            raise LoadRefused(name, failed, result.serving)
        return result

    async def unload(self, name: str) -> UnloadResult:
        """Stop serving every version of `name` (drained, then released) until it is loaded again."""
        unloaded, workers = await self._change(name, "unload", lambda: self._unload(name))
        return UnloadResult(name, unloaded, workers)

    async def _unload(self, name: str) -> list[int]:
        versions = self.registry.models.get(name)
        if not versions:
            raise ModelNotFound(f"model '{name}' is not loaded (loaded: {sorted(self.registry.models)})")
        await self.registry.publish_model(name, None)
        self.registry.retire(list(versions.values()))
        self._seen.pop(name, None)
        log.info("unloaded %s: versions %s", name, sorted(versions))
        return sorted(versions)

    async def set_traffic(self, name: str, weights: Mapping[str, float]) -> TrafficResult:
        """Split the requests to `name` that name no version by these weights over its loaded versions
        ({} removes the split: the highest version serves them)."""

        async def apply() -> TrafficResult:
            return TrafficResult(name, self._set_traffic(name, weights), max(self.registry.models[name]))
        result, result.workers = await self._change(name, "traffic", apply)
        return result

    def _set_traffic(self, name: str, weights: Mapping[str, float]) -> dict[str, float]:
        versions = self.registry.models.get(name)
        if not versions:
            raise ModelNotFound(f"model '{name}' is not loaded (loaded: {sorted(self.registry.models)})")
        parsed = {}
        for key, w in weights.items():
            if version_name_problem(key) is not None:
                raise InvalidTraffic(key, "a version number is expected, as the store names them: 1, 2, ...")
            parsed[int(key)] = w
        try:
            split = checked_split(name, parsed, versions)
        except ValueError as e:
            raise InvalidTraffic(next(iter(weights), "body"), str(e)) from None
        self.registry.set_traffic(name, split)
        log.info("traffic of %s: %s", name, dict(split) or f"the highest version, {max(versions)}")
        return {str(v): w for v, w in split}

    async def _change(self, name: str, action: str, apply: Callable[[], Awaitable[T]]) -> tuple[T, Fanout]:
        """A change through the API: applied here, then (several workers) published for the others, who are
        waited for a bounded time. A refused change is published only if part of it changed what this worker
        serves (a load that added one version and refused another): the others must serve the same."""
        async with self._lock:
            before = self.state(name)
            try:
                result = await apply()
            except BaseException:
                if self.state(name) != before:
                    await self._publish(name, action)
                raise
            generation = await self._publish(name, action)
        return result, await self._fanout(name, generation)

    async def _publish(self, name: str, action: str) -> int:
        """Publish `name`'s state here as the desired state (several workers; call it holding the lock)."""
        if self.control is None:
            return 0
        generation = await asyncio.to_thread(self.control.publish, name, self.state(name), action)
        self._applied[name] = generation
        self._errors.pop(name, None)
        self._wake.set()
        log.info("control folder: published %s of %s as generation %d", action, name, generation)
        return generation

    async def _fanout(self, name: str, generation: int) -> Fanout:
        """How many workers have applied `generation`, once all have or GENSERVE_CONTROL_WAIT_S has passed."""
        if self.control is None:
            return ONE_WORKER
        deadline = time.monotonic() + self.settings.control_wait_s
        while True:
            report = await asyncio.to_thread(self.control.report, generation, name)
            if report.pending <= 0 or time.monotonic() >= deadline:
                if report.failed or report.pending > 0:
                    log.warning("control folder: generation %d (%s) applied by %d of %d workers; failed: %s",
                                generation, name, report.applied, report.total, report.failed)
                return report
            await asyncio.sleep(_REPORT_EVERY_S)

    async def follow(self) -> None:
        """Apply each model entry of the desired state newer than what this worker applied, then record the
        generation reached. A model that cannot be brought to its desired state here is logged and recorded
        with the reason; the others are still applied."""
        control = self.control
        if control is None:
            return
        stamp = control.stamp()
        if self._generation >= 0 and stamp == self._stamp:
            return
        desired = await asyncio.to_thread(control.read)
        if desired.generation <= self._generation:
            self._stamp = stamp
            return
        for name, entry in sorted(desired.models.items()):
            async with self._lock:
                if entry["generation"] <= self._applied.get(name, 0):  # applied, or published here
                    continue
                error = await self._apply(name, entry)
                self._applied[name] = entry["generation"]
            if error is None:
                self._errors.pop(name, None)
                log.info("control folder: applied %s of %s (generation %d from worker %s)", entry.get("action"),
                         name, entry["generation"], entry.get("by"))
            else:
                self._errors[name] = error
                log.error("control folder: this worker could not apply %s of %s (generation %d): %s",
                          entry.get("action"), name, entry["generation"], error)
        await asyncio.to_thread(control.record, desired.generation, dict(self._errors),
                                {n: self.state(n) for n in self.registry.models})
        self._generation, self._stamp = desired.generation, stamp  # only now: a failure above is tried again

    async def _apply(self, name: str, entry: dict) -> str | None:
        """Bring `name` to a desired entry here: None, or why it could not be done."""
        versions = entry.get("versions")
        try:
            if versions is None:
                if self.registry.models.get(name):
                    await self._unload(name)
                return None
            result = await self._load(name, only=set(versions))
            if result.serving != sorted(versions):
                return f"serves versions {result.serving}, the desired state {sorted(versions)}"
            self._set_traffic(name, entry.get("traffic") or {})
        except (LoadRefused, ModelNotFound, InvalidTraffic) as e:
            return str(e)
        except Exception as e:
            log.exception("control folder: applying %s failed", name)
            return f"{type(e).__name__}: {e}"
        return None

    async def register(self) -> None:
        """Several workers: record this worker as live and not yet caught up (while it loads the store)."""
        if self.control is not None:
            await asyncio.to_thread(self.control.record, -1, {}, {})

    async def watch_forever(self) -> None:
        """Several workers: every WATCH_INTERVAL_S (or at once after a publish here), follow the desired state."""
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), WATCH_INTERVAL_S)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.follow()
            except Exception:
                log.exception("control folder: following the desired state failed")

    def leave(self) -> None:
        """At shutdown: this worker's record goes, so it no longer counts."""
        if self.control is not None:
            self.control.forget()

    async def poll_forever(self) -> None:
        """Poll mode: every poll_interval_s, load each model folder whose versions changed on disk and unload each
        model whose folder is gone. One model's failure is logged; the others are still applied. With several
        workers, what a rescan changes is published too (the other workers may not have rescanned yet; one that
        starts later must serve the same)."""
        root = self.settings.store_path
        for name in self.registry.models:
            self._seen[name] = _fingerprint(root / name)
        while True:
            await asyncio.sleep(self.settings.poll_interval_s)
            folders = set(await asyncio.to_thread(_model_folders, root))
            for name in sorted(folders | set(self.registry.models)):
                try:
                    async with self._lock:
                        before = self.state(name)
                        try:
                            if name not in folders:
                                if self.registry.models.get(name):
                                    await self._unload(name)
                            elif await asyncio.to_thread(_fingerprint, root / name) != self._seen.get(name):
                                await self._load(name)
                        finally:
                            if self.state(name) != before:
                                await self._publish(name, "poll")
                except (LoadRefused, ModelNotFound) as e:
                    log.error("poll: %s", e)
                except Exception:
                    log.exception("poll: applying %s failed", name)


def _model_folders(root: Path) -> list[str]:
    try:
        return [p.name for p in root.iterdir() if not p.name.startswith(".") and p.is_dir()]
    except OSError:
        return []


def _fingerprint(folder: Path) -> tuple:
    """What poll mode compares: each version folder's name and its manifest's size and modification time."""
    out = []
    try:
        for d in sorted(folder.iterdir()):
            if d.name.startswith("."):
                continue
            try:
                st = (d / "manifest.json").stat()
                out.append((d.name, st.st_size, st.st_mtime_ns))
            except OSError:
                out.append((d.name, None, None))
    except OSError:
        return ()
    return tuple(out)
