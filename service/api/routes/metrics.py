"""/metrics: the Prometheus text exposition of this API process, with the store's state read now."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from service import metrics

router = APIRouter(tags=["operations"])


@router.get("/metrics", response_class=Response, summary="Prometheus metrics (text exposition format)")
def prometheus_metrics(request: Request) -> Response:
    queue = request.app.state.sessions.queue
    return Response(metrics.exposition(metrics.StoreCollector(queue.stats, queue.live_workers)),
                    media_type=CONTENT_TYPE_LATEST)
