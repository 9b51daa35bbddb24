"""POST /v1/gan/sample: class-conditional samples from the GAN generator."""

from __future__ import annotations

from fastapi import APIRouter, Request

from service.families import gan
from service.families.shared import new_seed
from service.routes.common import ANY, V1_BODY, V1_MODEL, reply_images, resolve
from service.schemas import GanSampleRequest, SampleResponse

router = APIRouter(prefix="/v1/gan", tags=["gan"], responses={**ANY, **V1_MODEL, **V1_BODY})


@router.post("/sample", response_model=SampleResponse)
async def sample(body: GanSampleRequest, request: Request):
    """n images; `labels` picks digits (absent: each image's digit is drawn uniformly from the seed).
    Same seed, same request: same images, however the server batches it with others."""
    mv = resolve(request, "gan", body.model_version)
    seed = new_seed(body.seed)
    labels, inputs = gan.draw_for(mv, seed, body.n, body.truncation, body.labels)
    out = await mv.run(gan.GRAPH, inputs)
    return await reply_images(mv, gan.generated(out), body.format, seed=seed, labels=labels.tolist())
