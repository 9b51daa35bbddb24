"""Model control's rules without a server: version policies, traffic splits and how a version is drawn from one,
and when the API may change models at all."""

from __future__ import annotations

import asyncio
import collections
import random
from pathlib import Path
from types import SimpleNamespace

import pytest

from service.control import ControlFolder
from service.metrics import Metrics
from service.repository import ONE_WORKER, InvalidTraffic, ModelControlRefused, Repository
from service.runtime import Registry, admitted, checked_split
from service.settings import Settings

DIRS = [Path(f"store/{m}/{v}") for m in ("gan", "vae") for v in (1, 2, 3, 10)]


@pytest.mark.parametrize("policy, gan", [
    ({}, [1, 2, 3, 10]),
    ({"gan": "all"}, [1, 2, 3, 10]),
    ({"gan": {"latest": 2}}, [3, 10]),                  # by number, not by name: 10 is the latest
    ({"gan": {"latest": 9}}, [1, 2, 3, 10]),
    ({"gan": {"specific": [2, 10, 7]}}, [2, 10]),
])
def test_version_policies_admit_triton_s_shapes(policy, gan):
    settings = Settings(version_policy=policy)
    chosen = admitted(DIRS, settings.version_policy)
    assert [int(d.name) for d in chosen if d.parent.name == "gan"] == gan
    assert [int(d.name) for d in chosen if d.parent.name == "vae"] == [1, 2, 3, 10]   # no policy: all


@pytest.mark.parametrize("weights, match", [
    ({3: 10.0}, "version 3 of gan is not loaded"), ({1: -1.0}, ">= 0"), ({1: float("inf")}, "finite"),
    ({1: 0.0, 2: 0.0}, "all 0"),
])
def test_a_bad_split_is_refused(weights, match):
    with pytest.raises(ValueError, match=match):
        checked_split("gan", weights, {1: object(), 2: object()})


def registry(traffic: dict) -> Registry:
    reg = Registry(Settings(traffic=traffic, worker_threads=1), Metrics())
    reg.snapshot = reg.snapshot.__class__(traffic={k: checked_split(k, v, {1: 0, 2: 0, 3: 0})
                                                   for k, v in Settings(traffic=traffic).traffic.items()})
    return reg


def test_requests_naming_no_version_follow_the_split():
    random.seed(0)
    reg = registry({"gan": {"1": 90, "2": 10}})
    drawn = collections.Counter(reg.default_version("gan", {1: 0, 2: 0, 3: 0}) for _ in range(20000))
    assert set(drawn) == {1, 2} and abs(drawn[2] / 20000 - 0.10) < 0.01
    assert reg.default_version("vae", {1: 0, 4: 0}) == 4                # no split: the highest
    assert reg.default_version("gan", {3: 0}) == 3                      # none of the split loaded: the highest
    assert registry({"gan": {"2": 100}}).default_version("gan", {1: 0, 2: 0, 3: 0}) == 2   # promoted


def test_traffic_routes_refuse_what_is_not_a_loaded_version():
    reg = registry({})
    reg.snapshot = reg.snapshot.__class__(models={"gan": {1: SimpleNamespace(), 2: SimpleNamespace()}})
    repo = Repository(reg, Settings())
    split = asyncio.run(repo.set_traffic("gan", {"1": 90, "2": 10}))
    assert (split.traffic, split.default_version, split.workers) == ({"1": 90.0, "2": 10.0}, 2, ONE_WORKER)
    for weights, field in (({"x": 1.0}, "x"), ({"3": 1.0}, "3"), ({"01": 1.0, "1": 1.0}, "01")):
        with pytest.raises(InvalidTraffic) as e:
            asyncio.run(repo.set_traffic("gan", weights))
        assert e.value.field == field
    assert asyncio.run(repo.set_traffic("gan", {})).traffic == {}


@pytest.mark.parametrize("overrides, match", [({"model_control": "none"}, "GENSERVE_MODEL_CONTROL=none"),
                                              ({"workers": 2}, "no GENSERVE_CONTROL_DIR")])
def test_changes_through_the_api_are_refused_where_they_cannot_reach_every_worker(overrides, match, tmp_path):
    with pytest.raises(ModelControlRefused, match=match):
        Repository(registry({}), Settings(**overrides)).check_control()
    Repository(registry({}), Settings(model_control="poll")).check_control()
    for mode in ("explicit", "poll"):  # several workers with a control folder: both modes take changes
        Repository(registry({}), Settings(workers=2, model_control=mode), ControlFolder(tmp_path)).check_control()


def test_a_retired_version_still_finishes_what_it_accepted_at_shutdown():
    """Shutting down during a drain grace skips the grace, not the stop: the version's work is finished."""
    stopped = []

    class Version(SimpleNamespace):
        async def stop(self):
            stopped.append(self.version)

    async def scenario():
        reg = Registry(Settings(drain_grace_s=600, worker_threads=1), Metrics())
        reg.retire([Version(name="gan", version=1)])
        await asyncio.sleep(0)
        await reg.stop()

    asyncio.run(scenario())
    assert stopped == [1]
