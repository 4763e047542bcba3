"""GET /v1/sessions/{id}/uncertainty: the ensemble members' disagreement as NIfTI."""

from __future__ import annotations

from fastapi import APIRouter, Response

from service.api.deps import OwnerDep, SessionsDep
from service.api.errors import UncertaintyNotAvailable
from service.api.routes.sessions import NIFTI_MEDIA_TYPE
from service.engine.uncertainty import decode_votes
from service.imaging.grid import WorkingGrid
from service.imaging.nifti import write_nifti
from service.store.contract import BLOB_UNCERTAINTY, SessionNotFound

router = APIRouter(prefix="/v1/sessions", tags=["sessions"])


@router.get(
    "/{session_id}/uncertainty",
    response_class=Response,
    responses={200: {"content": {NIFTI_MEDIA_TYPE: {}}, "description": "uint8 NIfTI on the current window"}},
    summary="Per voxel, how many ensemble members vote foreground",
)
def get_uncertainty(session_id: str, sessions: SessionsDep, owner: OwnerDep) -> Response:
    """0 or the member count where all agree; in between where they disagree. The result's
    ``uncertainty`` summary has the member count, the uncertain volume and a suggested click."""
    record = sessions.ready_record(session_id, owner)
    try:
        stored = sessions.store.load_blob(record.id, record.version, BLOB_UNCERTAINTY)
    except SessionNotFound as error:
        raise UncertaintyNotAvailable(f"version {record.version} was computed without the members' votes") from error
    window = WorkingGrid.from_dict(record.grid).window(stored.record.window.offset)
    return Response(
        write_nifti(decode_votes(stored.blob), window.affine, dtype="uint8"),
        media_type=NIFTI_MEDIA_TYPE,
        headers={
            "Content-Disposition": f'attachment; filename="uncertainty-v{record.version}.nii.gz"',
            "ETag": f'"{record.version}"',
        },
    )
