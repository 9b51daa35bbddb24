"""genserve's Python client, a package of its own: `pip install 'genserve[client]'` installs it with httpx,
pydantic, numpy and Pillow only. It imports service.schemas and service.imaging (the API's own bodies and image
codec, which import nothing heavier); the service never imports it.

    from genserve_client import GenserveClient
    with GenserveClient("http://127.0.0.1:8000") as gs:
        gs.gan_sample(2, seed=7).array        # (2, 28, 28) uint8

Every method returns a pydantic model; all of them are importable from here."""

from genserve_client.client import (
    AsyncGenserveClient,
    GenserveClient,
    GenserveError,
    ImagesResult,
    Progress,
    SampleResult,
)
from genserve_client.responses import (
    AttributeInfo,
    BatchingInfo,
    GraphInfo,
    Health,
    ModelDetail,
    ModelList,
    ModelSummary,
    ProcessInfo,
    RefusedVersion,
    TensorInfo,
    VersionDetail,
)
from service.schemas import (
    AnomalyResponse,
    AnomalyResult,
    Attribute,
    Latent,
    LogprobResponse,
    LogprobResult,
    Readiness,
    VaeAttributesResponse,
    VaeEncodeResponse,
)

__all__ = [
    "AsyncGenserveClient", "GenserveClient", "GenserveError",
    # answers: with images (decoded in `.array`), the service's own bodies, and the rest
    "ImagesResult", "SampleResult", "Progress",
    "AnomalyResponse", "AnomalyResult", "LogprobResponse", "LogprobResult", "Readiness",
    "VaeAttributesResponse", "VaeEncodeResponse", "Attribute", "Latent",
    "AttributeInfo", "BatchingInfo", "GraphInfo", "Health", "ModelDetail", "ModelList", "ModelSummary",
    "ProcessInfo", "RefusedVersion", "TensorInfo", "VersionDetail",
]
