"""A real Orthanc PACS with its DICOMweb plugin, started for a test run on free ports with its
own storage folder and configuration, and stopped after it."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from service.bench.processes import free_port

PLUGIN_DIRECTORIES = (Path("/usr/share/orthanc/plugins"), Path("/usr/lib/orthanc/plugins"))
USER, PASSWORD = "icr-test", "pacs-secret"


@dataclass(frozen=True)
class Orthanc:
    url: str  # HTTP root
    dicomweb_url: str
    log: Path

    def auth(self) -> tuple[str, str]:
        return USER, PASSWORD


def missing() -> str | None:
    """Why Orthanc cannot be started here, or None."""
    if shutil.which("Orthanc") is None:
        return "Orthanc is not installed (Debian 'orthanc'); .ci/setup.d/20-dicom.sh installs it"
    if _plugin() is None:
        return "the Orthanc DICOMweb plugin is not installed (Debian 'orthanc-dicomweb')"
    return None


def _plugin() -> Path | None:
    for directory in PLUGIN_DIRECTORIES:
        for candidate in sorted(directory.glob("libOrthancDicomWeb.so*")):
            return candidate
    return None


@contextmanager
def running(folder: Path) -> Iterator[Orthanc]:
    http_port = free_port()
    storage = folder / "storage"
    storage.mkdir(parents=True)
    config = {
        "Name": "icr-test-pacs",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "HttpPort": http_port,
        "DicomServerEnabled": False,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {USER: PASSWORD},
        "HttpServerEnabled": True,
        "OrthancExplorerEnabled": False,
        "Plugins": [str(_plugin())],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
    }
    config_path = folder / "orthanc.json"
    config_path.write_text(json.dumps(config))
    log = folder / "orthanc.log"
    with log.open("ab") as stream:
        process = subprocess.Popen(["Orthanc", str(config_path)], stdout=stream, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    url = f"http://127.0.0.1:{http_port}"
    try:
        _wait(url, process, log)
        yield Orthanc(url=url, dicomweb_url=f"{url}/dicom-web", log=log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait(url: str, process: subprocess.Popen[bytes], log: Path, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"Orthanc exited with {process.returncode}: {log.read_text(errors='replace')[-2000:]}")
        try:
            if httpx.get(f"{url}/system", auth=(USER, PASSWORD), timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"Orthanc did not answer within {timeout_s:g} s")
