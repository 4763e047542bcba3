"""The viewer in a real headless Chromium against a real `icr serve` (embedded, API keys on).

The service runs the shipped demo ensemble on a generated phantom, so a click on the
tumour moves the mask the way a user sees it. Screenshots and the page's click timings
are written under the test's tmp dir (``viewer-artifacts``).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from service.bench.processes import (
    Process,
    free_port,
    icr_command,
    start_process,
    wait_ready,
)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
    "--use-angle=swiftshader", "--enable-unsafe-swiftshader",  # WebGL2 in software
]
API_KEY = "viewer-key"
DEMO_WEIGHTS = Path(__file__).resolve().parents[2] / "service" / "weights" / "demo"
ENGINE_WAIT_MS = 600_000  # a 2-core CI machine runs the demo ensemble on one thread

pytestmark = pytest.mark.slow  # starts `icr serve` and a browser


def _playwright():  # type: ignore[no-untyped-def]
    if not CHROMIUM.exists():
        pytest.skip("Chromium is not installed (.ci/setup.d/30-chromium.sh installs Debian's chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright for Python is not installed (pip install -e '.[test]')")
    return sync_playwright


@dataclass
class Browser:
    """One page, with every request URL, console error and page error it produced."""

    page: object
    origin: str
    requests: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from service.science.phantoms import write_cases

    directory = tmp_path_factory.mktemp("phantom")
    (case,) = write_cases(directory, 1, seed=3)
    return {role: directory / f"{case}_{role}.nii.gz" for role in ("ct", "pt", "gtvt")}


@pytest.fixture(scope="module")
def viewer_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    import os

    logs = tmp_path_factory.mktemp("viewer-service")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ICR_") and k != "REDIS_URL"}
    env.update({"ICR_WEIGHTS": str(DEMO_WEIGHTS), "ICR_DEVICE": "cpu", "ICR_TORCH_THREADS": "1",
                "ICR_API_KEYS": API_KEY, "ICR_JOB_TIMEOUT_S": "600", "PYTHONUNBUFFERED": "1"})
    port = free_port()
    process: Process = start_process("serve", icr_command("serve", "--port", str(port)), env, logs)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process)
        yield url
    finally:
        process.stop()


@pytest.fixture
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("viewer-artifacts")


@pytest.fixture
def browser(viewer_service: str) -> Iterator[Browser]:
    sync_playwright = _playwright()
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        context = chromium.new_context(viewport={"width": 1280, "height": 800}, accept_downloads=True)
        seen = Browser(context.new_page(), viewer_service)

        def only_local(route) -> None:  # type: ignore[no-untyped-def]
            seen.requests.append(route.request.url)
            if route.request.url.startswith(f"{viewer_service}/"):
                route.continue_()
            else:
                route.abort()

        context.route("**/*", only_local)
        page = seen.page
        page.set_default_timeout(ENGINE_WAIT_MS)
        page.on("console", lambda message: message.type == "error" and seen.errors.append(message.text))
        page.on("pageerror", lambda error: seen.errors.append(f"page error: {error}"))
        try:
            yield seen
        finally:
            chromium.close()


# -- helpers --------------------------------------------------------------------------------
def _text(page, testid: str) -> str:  # type: ignore[no-untyped-def]
    return page.text_content(f"[data-testid={testid}]") or ""


def _settled(page, version: str | None = None) -> None:  # type: ignore[no-untyped-def]
    """Until the page is not busy (and shows ``version``)."""
    condition = "document.querySelector('[data-testid=status]').textContent !== 'busy'"
    if version is not None:
        condition += f" && document.querySelector('[data-testid=version]').textContent === '{version}'"
    condition += " || document.querySelector('[data-testid=status]').classList.contains('error')"
    page.wait_for_function(condition, polling=250, timeout=ENGINE_WAIT_MS)
    status = _text(page, "status")
    assert status == "idle", f"the page reports: {status}"
    if version is not None:
        assert _text(page, "version") == version


def _tumour_centre_mm(gtvt: Path) -> list[float]:
    import nibabel as nib

    image = nib.load(gtvt)
    centre = np.argwhere(np.asarray(image.dataobj) > 0).mean(axis=0)
    return [float(v) for v in image.affine[:3, :3] @ centre + image.affine[:3, 3]]


def _region(page, centre: dict, half: int = 60) -> np.ndarray:  # type: ignore[no-untyped-def]
    from PIL import Image

    clip = {"x": centre["x"] - half, "y": centre["y"] - half, "width": 2 * half, "height": 2 * half}
    return np.asarray(Image.open(io.BytesIO(page.screenshot(clip=clip))).convert("RGB"), dtype=np.int16)


def _changed(a: np.ndarray, b: np.ndarray) -> float:
    """Share of pixels whose colour moved by more than a rendering wobble."""
    return float((np.abs(a - b).max(axis=-1) > 24).mean())


def _start(seen: Browser, ct: Path, pet: Path) -> None:
    page = seen.page
    page.goto(f"{seen.origin}/viewer")
    page.fill("[data-testid=api-key]", API_KEY)
    page.dispatch_event("[data-testid=api-key]", "change")
    page.set_input_files("[data-testid=ct-file]", str(ct))
    page.set_input_files("[data-testid=pet-file]", str(pet))
    page.wait_for_selector("[data-testid=create]:not([disabled])")


def _create_session(seen: Browser, phantom: dict[str, Path]) -> None:
    """The phantom's session created in the page (version 0), shown in one axial view."""
    _start(seen, phantom["ct"], phantom["pt"])
    _settled(seen.page)
    seen.page.click("[data-testid=create]")
    _settled(seen.page, "0")
    seen.page.click("#layouts button[data-layout='0']")  # one axial view


# -- tests ----------------------------------------------------------------------------------
def test_segment_a_phantom_with_clicks_undo_and_resume(
    browser: Browser, phantom: dict[str, Path], artifacts: Path
) -> None:
    page = browser.page
    _create_session(browser, phantom)
    target = page.evaluate("(mm) => window.icrViewer.focus(mm)", _tumour_centre_mm(phantom["gtvt"]))
    assert target is not None, "the tumour centre is not on the axial view"
    page.screenshot(path=str(artifacts / "v0.png"))
    before = _region(page, target)

    page.click("[data-testid=mode-foreground]")
    page.mouse.click(target["x"], target["y"])
    _settled(page, "1")
    page.screenshot(path=str(artifacts / "v1-click.png"))
    after_click = _region(page, target)
    assert _changed(before, after_click) > 0.01, "the overlay did not change where the click landed"
    assert "foreground" in _text(page, "clicks")

    suggestion = page.evaluate("() => window.icrViewer.state.suggestion")
    if suggestion is not None:  # the members disagree somewhere: accept their suggestion with A
        page.check("[data-testid=show-uncertainty]")
        _settled(page)
        page.screenshot(path=str(artifacts / "v1-uncertainty.png"))
        page.uncheck("[data-testid=show-uncertainty]")
        _settled(page)
        page.keyboard.press("a")  # with the focus on the checkbox: shortcuts work there too
        _settled(page, "2")
        assert len(page.evaluate("() => window.icrViewer.state.session.clicks")) == 2
        page.click("[data-testid=undo]")
        _settled(page, "3")
    assert len(page.evaluate("() => window.icrViewer.state.session.clicks")) == 1

    page.click("[data-testid=undo]")
    undone = "4" if suggestion is not None else "2"
    _settled(page, undone)
    assert page.evaluate("() => window.icrViewer.state.session.clicks.length") == 0
    after_undo = _region(page, target)
    assert _changed(before, after_undo) < _changed(before, after_click) / 2, "undo did not restore the overlay"

    with page.expect_download() as download:
        page.click("[data-testid=download]")
        _settled(page)
    saved = artifacts / "mask.nii.gz"
    download.value.save_as(saved)
    import nibabel as nib

    assert nib.load(saved).shape == nib.load(phantom["ct"]).shape  # on the uploaded CT's grid

    session_id = page.evaluate("() => window.icrViewer.state.session.id")
    assert page.url.endswith(f"#session={session_id}")
    timings = page.evaluate("() => window.icrViewer.state.timings")
    page.reload()
    _settled(page, undone)
    assert page.evaluate("() => window.icrViewer.state.session.id") == session_id
    assert page.evaluate("() => window.icrViewer.state.ct !== null"), "the images were not restored"
    page.click("#layouts button[data-layout='0']")
    target = page.evaluate("(mm) => window.icrViewer.focus(mm)", _tumour_centre_mm(phantom["gtvt"]))
    page.mouse.click(target["x"], target["y"], button="right")  # the other label: background
    _settled(page, str(int(undone) + 1))
    assert "background" in _text(page, "clicks")
    page.screenshot(path=str(artifacts / "resumed-background-click.png"))

    timings += page.evaluate("() => window.icrViewer.state.timings")
    (artifacts / "click-timings.json").write_text(json.dumps(timings, indent=1))
    assert browser.errors == [], f"console errors: {browser.errors}"
    outside = [url for url in browser.requests if not url.startswith(f"{browser.origin}/")]
    assert outside == [], f"requests left 127.0.0.1: {outside}"
    assert any(url.endswith("/vendor/niivue/niivue.js") for url in browser.requests)


def test_a_click_outside_the_working_window_moves_the_overlay_there(
    browser: Browser, phantom: dict[str, Path], artifacts: Path
) -> None:
    import nibabel as nib

    page = browser.page
    _create_session(browser, phantom)
    assert page.evaluate("() => window.icrViewer.state.session.window.offset") == [0, 0, 0]
    ct = nib.load(phantom["ct"])
    low_z = float(min(ct.affine[2, 3], ct.affine[2, 3] + ct.affine[2, 2] * (ct.shape[2] - 1)))
    far = [*_tumour_centre_mm(phantom["gtvt"])[:2], low_z + 12.0]  # the CT's inferior end, far below the window
    target = page.evaluate("(mm) => window.icrViewer.focus(mm)", far)
    assert target is not None, "the inferior end is not on the axial view"
    page.mouse.click(target["x"], target["y"], button="right")  # not tumour
    _settled(page, "1")
    window = page.evaluate("() => window.icrViewer.state.session.window")
    assert window["offset"] != [0, 0, 0] and window["windows"] >= 2
    # the overlay is the new window's: its affine places it where the click was
    origin = page.evaluate("() => Array.from(window.icrViewer.state.overlays.annotation.hdr.affine.map((row) => row[3]))")
    np.testing.assert_allclose(origin[:3], window["origin_mm"], atol=1e-3)
    page.screenshot(path=str(artifacts / "moved-window.png"))
    assert browser.errors == [], f"console errors: {browser.errors}"


def test_bad_upload_shows_the_problem(browser: Browser, phantom: dict[str, Path], tmp_path: Path) -> None:
    page = browser.page
    not_nifti = tmp_path / "notes_ct.nii.gz"
    not_nifti.write_bytes(b"this is not an image")
    _start(browser, not_nifti, phantom["pt"])
    page.wait_for_function("document.querySelector('[data-testid=status]').textContent !== 'busy'", polling=250)
    page.click("[data-testid=create]")
    page.wait_for_function("document.querySelector('[data-testid=status]').classList.contains('error')"
                           " && !document.querySelector('[data-testid=status]').textContent.includes('cannot be shown')",
                           polling=250)
    message = _text(page, "status")
    assert message.startswith("Unprocessable") and "ct" in message, message
    assert _text(page, "version") == "-"
    # expected: the browser logs the 422 answer, and NiiVue its own failure to preview the file
    expected = ("status of 422", "niivue-error Error processing NIfTI file", "niivue-error Error: Failed to parse NIfTI")
    others = [e for e in browser.errors if not e.startswith(expected) and "status of 422" not in e]
    assert others == [], f"console errors: {others}"
    assert [url for url in browser.requests if not url.startswith(f"{browser.origin}/")] == []
