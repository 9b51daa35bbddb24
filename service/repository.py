"""Model control on a running service, Triton's way: load (rescan a model's folder, build what is new off the event
loop, publish in one step, drain what left) and unload, by request or by polling the store, and the traffic split
of requests that name no version. Knows nothing of HTTP: routes/v2.py and routes/models.py call it, and
service/errors.py answers its exceptions.

Changes are applied one at a time (a lock), so two loads of one model cannot race. A version that fails
validation or warm-up is refused with its reasons; what served keeps serving. A version leaving service is no
longer published, then drained (Registry.retire): requests that chose it finish on it.

With several worker processes each has its own registry: a change requested through the API would reach only
the worker that received it, so the API refuses changes there; poll mode reaches every worker, each rescanning
the store on its own."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from service.runtime import ModelNotFound, ModelVersion, Registry, admitted, checked_split
from service.settings import Settings
from service.store import printable, scan_model, version_name_problem

log = logging.getLogger(__name__)


class ModelControlRefused(Exception):
    """This service takes no model changes through the API (model_control none, or several workers)."""


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


class Repository:
    def __init__(self, registry: Registry, settings: Settings):
        self.registry, self.settings = registry, settings
        self._lock = asyncio.Lock()
        self._seen: dict[str, tuple] = {}  # poll mode: each model folder's fingerprint at the last rescan

    def check_control(self) -> None:
        if self.settings.model_control == "none":
            raise ModelControlRefused("model control is off (GENSERVE_MODEL_CONTROL=none): the store is read once "
                                      "at start-up; set it to explicit or poll to load and unload models")
        if self.settings.workers > 1:
            raise ModelControlRefused(f"with {self.settings.workers} worker processes a change would reach only the "
                                      "worker that received it; use GENSERVE_MODEL_CONTROL=poll, which every "
                                      "worker applies from the store, or one worker per replica")

    async def load(self, name: str) -> LoadResult:
        """Rescan `name`'s folder and apply its version policy: new versions built and warmed up off the event
        loop, then published with those that stay; versions gone from disk or from the policy drained."""
        async with self._lock:
            return await self._load(name)

    async def _load(self, name: str) -> LoadResult:
        reg, root = self.registry, self.settings.store_path
        scan = await asyncio.to_thread(scan_model, root, name)
        if scan is None:
            raise ModelNotFound(f"no model folder {printable(str(root / name))}")
        current: Mapping[int, ModelVersion] = reg.models.get(name, {})
        wanted = {int(d.name): d for d in admitted(scan.versions, self.settings.version_policy)}
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

    async def unload(self, name: str) -> list[int]:
        """Stop serving every version of `name` (drained, then released) until it is loaded again."""
        async with self._lock:
            return await self._unload(name)

    async def _unload(self, name: str) -> list[int]:
        versions = self.registry.models.get(name)
        if not versions:
            raise ModelNotFound(f"model '{name}' is not loaded (loaded: {sorted(self.registry.models)})")
        await self.registry.publish_model(name, None)
        self.registry.retire(list(versions.values()))
        self._seen.pop(name, None)
        log.info("unloaded %s: versions %s", name, sorted(versions))
        return sorted(versions)

    def set_traffic(self, name: str, weights: Mapping[str, float]) -> dict[str, float]:
        """Split the requests to `name` that name no version by these weights over its loaded versions
        ({} removes the split: the highest version serves them)."""
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

    async def poll_forever(self) -> None:
        """Poll mode: every poll_interval_s, load each model folder whose versions changed on disk and unload each
        model whose folder is gone. One model's failure is logged; the others are still applied."""
        root = self.settings.store_path
        for name in self.registry.models:
            self._seen[name] = _fingerprint(root / name)
        while True:
            await asyncio.sleep(self.settings.poll_interval_s)
            folders = set(await asyncio.to_thread(_model_folders, root))
            for name in sorted(folders | set(self.registry.models)):
                try:
                    async with self._lock:
                        if name not in folders:
                            if self.registry.models.get(name):
                                await self._unload(name)
                        elif await asyncio.to_thread(_fingerprint, root / name) != self._seen.get(name):
                            await self._load(name)
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
