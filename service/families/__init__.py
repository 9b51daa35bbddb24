"""What the service knows about each model family, one module each: its host-side randomness (seeded draws),
its pixel conversions, its label space, its image geometry (read from the manifest) and the value rules /v2
checks its graphs' inputs against. Routes parse a request, call the family and the runtime, and reply; /v1 and
/v2 apply the same rules because both take them from here."""

from __future__ import annotations

from types import ModuleType

from service.families import gan, pixelcnn, vae
from service.families.shared import TensorRules
from service.runtime import ModelVersion

FAMILIES: dict[str, ModuleType] = {"gan": gan, "vae": vae, "pixelcnn": pixelcnn}


def tensor_rules(mv: ModelVersion) -> TensorRules:
    """The value rules of the model version's family, for every one of its graphs."""
    return FAMILIES[mv.family].tensor_rules(mv)
