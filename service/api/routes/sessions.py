"""/v1/sessions: create a session, click, undo, read masks and probabilities."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool

from service.api import uploads
from service.api.deps import OwnerDep, SessionsDep
from service.api.dicom_io import (
    DICOM_MEDIA_TYPE,
    dicom_bytes,
    export,
    mask_object,
    pull_study,
)
from service.api.schemas import (
    ClicksIn,
    CreatedOut,
    ExportIn,
    ExportOut,
    ResultOut,
    SessionOut,
)
from service.api.sessions import Sessions, SessionView, created_iso, expires_iso
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


_UPLOAD_FORM = {
    "type": "object",
    "required": ["ct", "pet"],
    "properties": {
        "ct": {"type": "array", "items": {"type": "string", "format": "binary"},
               "description": "CT: one NIfTI file (HU), one zip of a DICOM series, or the series' DICOM files as repeated parts"},
        "pet": {"type": "array", "items": {"type": "string", "format": "binary"},
                "description": "PET: one NIfTI file (SUV), one zip of a DICOM series (Bq/ml taken to SUVbw), or its files"},
        "centre": {"type": "string", "description": "Region centre 'x,y,z' in world mm (RAS); default: found"},
        "centre_patient_mm": {"type": "string", "description": "Region centre 'x,y,z' in DICOM patient mm (LPS)"},
    },
}
_CREATE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": _UPLOAD_FORM},
            "application/json": {"schema": {
                "type": "object", "required": ["dicomweb"],
                "description": '{"dicomweb": {"study": uid, "ct_series"?: uid, "pet_series"?: uid}, '
                               '"centre"?: [x, y, z] (RAS mm), "centre_patient_mm"?: [x, y, z] (LPS mm)}',
            }},
        },
    }
}


@router.post("", status_code=201, response_model=CreatedOut, openapi_extra=_CREATE_BODY,
             summary="Upload a CT+PET pair (NIfTI or DICOM), or name a study on the PACS; get the initial mask")
async def create_session(request: Request, sessions: SessionsDep, owner: OwnerDep, response: Response) -> CreatedOut:
    if request.headers.get("content-type", "").split(";")[0].strip() == "application/json":
        view = await _create_from_pacs(request, sessions, owner)
    else:
        view = await _create_from_upload(request, sessions, owner)
    response.headers["Location"] = f"/v1/sessions/{view.record.id}"
    _etag(response, view)
    return CreatedOut(**view.result(), **_frame(view))


async def _create_from_upload(request: Request, sessions: Sessions, owner: str | None) -> SessionView:
    form = await uploads.read_form(request, sessions.settings)
    ct, pet, source = await run_in_threadpool(uploads.read_images, form.parts["ct"], form.parts["pet"], sessions.settings)
    return await run_in_threadpool(sessions.create, ct, pet, form.centre, owner, source)


async def _create_from_pacs(request: Request, sessions: Sessions, owner: str | None) -> SessionView:
    study, centre = uploads.read_pacs_body(await request.body())
    ct, pet, source = await run_in_threadpool(pull_study, study.dicomweb, sessions.settings)
    return await run_in_threadpool(sessions.create, ct, pet, centre, owner, source)


@router.get("/{session_id}", response_model=SessionOut, summary="Session state")
def get_session(session_id: str, sessions: SessionsDep, owner: OwnerDep, response: Response) -> SessionOut:
    view = sessions.view(sessions.ready_record(session_id, owner), with_probability=False)
    _etag(response, view)
    return SessionOut(
        id=view.record.id,
        version=view.version.version,
        window=view.window_out(),
        clicks=view.clicks_out(),
        created_at=created_iso(view.record),
        **_frame(view),
    )


def _frame(view: SessionView) -> dict[str, Any]:
    """The fields of :class:`SessionFrame`: where the session lives."""
    return {
        "grid": view.grid_out(),
        "extent": view.extent_out(),
        "original": view.original_out(),
        "expires_at": expires_iso(view.record),
        "source": view.source_out(),
        "placement": view.record.placement,
    }


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
    responses={200: {"content": {NIFTI_MEDIA_TYPE: {}, DICOM_MEDIA_TYPE: {}},
                      "description": "uint8 0/1 NIfTI (.nii.gz), or an RTSTRUCT / DICOM-SEG on the source CT"}},
    summary="The current mask as NIfTI, DICOM-SEG or RTSTRUCT",
)
def get_mask(
    session_id: str,
    sessions: SessionsDep,
    owner: OwnerDep,
    space: Annotated[
        Literal["working", "original"],
        Query(description="working: the current window; original: the uploaded CT's grid, every window"),
    ] = "working",
    format: Annotated[
        Literal["nifti", "dicom-seg", "rtstruct"],
        Query(description="nifti; or dicom-seg / rtstruct on the source CT series (sessions made from DICOM)"),
    ] = "nifti",
) -> Response:
    record = sessions.ready_record(session_id, owner)
    if format != "nifti":
        view = sessions.view(record)
        name = f"{format}-v{view.version.version}.dcm"
        return Response(dicom_bytes(mask_object(sessions, view, format)), media_type=DICOM_MEDIA_TYPE, headers={
            "Content-Disposition": f'attachment; filename="{name}"', "ETag": f'"{view.version.version}"'})
    view = sessions.answer(record, record.version) if space == "working" else sessions.view(record)
    mask, affine = sessions.mask_volume(view, space)
    return _nifti(write_nifti(mask, affine, dtype="uint8"), view, f"mask-{space}")


@router.get(
    "/{session_id}/probability",
    response_class=Response,
    responses={200: {"content": {NIFTI_MEDIA_TYPE: {}}, "description": "float32 NIfTI on the current window"}},
    summary="The current probability as NIfTI",
)
def get_probability(session_id: str, sessions: SessionsDep, owner: OwnerDep) -> Response:
    view = sessions.view(sessions.ready_record(session_id, owner))
    assert view.probability is not None
    return _nifti(write_nifti(view.probability, view.window.affine, dtype="float32"), view, "probability")


def _nifti(payload: bytes, view: SessionView, name: str) -> Response:
    return Response(
        payload,
        media_type=NIFTI_MEDIA_TYPE,
        headers={
            "Content-Disposition": f'attachment; filename="{name}-v{view.version.version}.nii.gz"',
            "ETag": f'"{view.version.version}"',
        },
    )


@router.post("/{session_id}/export", response_model=ExportOut, summary="Store the mask on the PACS (STOW-RS)")
def export_mask(session_id: str, body: ExportIn, sessions: SessionsDep, owner: OwnerDep) -> ExportOut:
    return export(sessions, sessions.view(sessions.ready_record(session_id, owner)), body.format)


@router.delete("/{session_id}", status_code=204, response_class=Response, summary="Delete a session")
def delete_session(session_id: str, sessions: SessionsDep, owner: OwnerDep) -> Response:
    sessions.delete(session_id, owner)
    return Response(status_code=204)
