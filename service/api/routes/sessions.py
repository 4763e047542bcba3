"""/v1/sessions: create a session, click, undo, read masks and probabilities."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Header, Query, Response, UploadFile

from service.api.deps import OwnerDep, SessionsDep
from service.api.schemas import ClicksIn, CreatedOut, ResultOut, SessionOut
from service.api.sessions import SessionView, created_iso, expires_iso
from service.imaging.nifti import write_nifti

router = APIRouter(prefix="/v1/sessions", tags=["sessions"])

NIFTI_MEDIA_TYPE = "application/gzip"
IfMatch = Annotated[str | None, Header(description="The version the client last saw; 412 when stale.")]
IdempotencyKey = Annotated[
    str | None,
    Header(
        min_length=1,
        max_length=200,
        description="Retries with the same key are applied once and answered with the first outcome; "
        "the same key with a different body is refused (422).",
    ),
]


def _result(view: SessionView) -> ResultOut:
    return ResultOut(**view.result())


def _etag(response: Response, view: SessionView) -> None:
    response.headers["ETag"] = f'"{view.version.version}"'


@router.post("", status_code=201, response_model=CreatedOut, summary="Upload a CT+PET pair; get the initial mask")
def create_session(
    sessions: SessionsDep,
    owner: OwnerDep,
    response: Response,
    ct: Annotated[UploadFile, File(description="CT in HU, NIfTI (.nii or .nii.gz)")],
    pet: Annotated[UploadFile, File(description="PET in SUV, NIfTI (.nii or .nii.gz)")],
    centre: Annotated[str | None, Form(description="Region centre 'x,y,z' in world mm; default: CT/PET overlap centre")] = None,
) -> CreatedOut:
    view = sessions.create(ct.file.read(), pet.file.read(), centre, owner)
    response.headers["Location"] = f"/v1/sessions/{view.record.id}"
    _etag(response, view)
    return CreatedOut(
        **view.result(), grid=view.grid_out(), original=view.original_out(), expires_at=expires_iso(view.record)
    )


@router.get("/{session_id}", response_model=SessionOut, summary="Session state")
def get_session(session_id: str, sessions: SessionsDep, owner: OwnerDep, response: Response) -> SessionOut:
    view = sessions.view(sessions.ready_record(session_id, owner), with_probability=False)
    _etag(response, view)
    return SessionOut(
        id=view.record.id,
        version=view.version.version,
        clicks=view.clicks_out(),
        grid=view.grid_out(),
        original=view.original_out(),
        created_at=created_iso(view.record),
        expires_at=expires_iso(view.record),
    )


@router.post("/{session_id}/clicks", response_model=ResultOut, summary="Add clicks; get the refined mask")
def add_clicks(
    session_id: str,
    body: ClicksIn,
    sessions: SessionsDep,
    owner: OwnerDep,
    response: Response,
    if_match: IfMatch = None,
    idempotency_key: IdempotencyKey = None,
) -> ResultOut:
    view = sessions.add_clicks(session_id, owner, body.clicks, if_match, idempotency_key)
    _etag(response, view)
    return _result(view)


@router.post("/{session_id}/undo", response_model=ResultOut, summary="Restore the previous version")
def undo(
    session_id: str,
    sessions: SessionsDep,
    owner: OwnerDep,
    response: Response,
    if_match: IfMatch = None,
    idempotency_key: IdempotencyKey = None,
) -> ResultOut:
    view = sessions.undo(session_id, owner, if_match, idempotency_key)
    _etag(response, view)
    return _result(view)


@router.get(
    "/{session_id}/mask",
    response_class=Response,
    responses={200: {"content": {NIFTI_MEDIA_TYPE: {}}, "description": "uint8 0/1 NIfTI (.nii.gz)"}},
    summary="The current mask as NIfTI",
)
def get_mask(
    session_id: str,
    sessions: SessionsDep,
    owner: OwnerDep,
    space: Annotated[Literal["working", "original"], Query(description="working grid or the uploaded CT's grid")] = "working",
) -> Response:
    record = sessions.ready_record(session_id, owner)
    view = sessions.answer(record, record.version) if space == "working" else sessions.view(record)
    mask, affine = sessions.mask_volume(view, space)
    return _nifti(write_nifti(mask, affine, dtype="uint8"), view, f"mask-{space}")


@router.get(
    "/{session_id}/probability",
    response_class=Response,
    responses={200: {"content": {NIFTI_MEDIA_TYPE: {}}, "description": "float32 NIfTI on the working grid"}},
    summary="The current probability as NIfTI",
)
def get_probability(session_id: str, sessions: SessionsDep, owner: OwnerDep) -> Response:
    view = sessions.view(sessions.ready_record(session_id, owner))
    assert view.probability is not None
    return _nifti(write_nifti(view.probability, view.grid.affine, dtype="float32"), view, "probability")


def _nifti(payload: bytes, view: SessionView, name: str) -> Response:
    return Response(
        payload,
        media_type=NIFTI_MEDIA_TYPE,
        headers={
            "Content-Disposition": f'attachment; filename="{name}-v{view.version.version}.nii.gz"',
            "ETag": f'"{view.version.version}"',
        },
    )


@router.delete("/{session_id}", status_code=204, response_class=Response, summary="Delete a session")
def delete_session(session_id: str, sessions: SessionsDep, owner: OwnerDep) -> Response:
    sessions.delete(session_id, owner)
    return Response(status_code=204)
