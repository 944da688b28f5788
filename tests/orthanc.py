"""A real Orthanc PACS for the DICOM door tests (issue 28): a plain process on loopback with its own
JSON configuration, storage folder and free ports, the DICOMweb plugin enabled. Nothing is mocked:
the tests make Orthanc itself send studies to medlego (STOW-RS, C-STORE) and read back what
medlego stored in it. Installed by CI (.ci/run: apt packages orthanc, orthanc-dicomweb, dcmtk)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
AE_TITLE = "ORTHANC"


def available() -> str | None:
    """None when Orthanc and its DICOMweb plugin are installed, else what is missing."""
    if not Path(ORTHANC).exists():
        return "Orthanc is not installed (apt-get install orthanc orthanc-dicomweb)"
    if not DICOMWEB_PLUGIN.exists():
        return f"the Orthanc DICOMweb plugin is not installed ({DICOMWEB_PLUGIN})"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Orthanc:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.http_port, self.dicom_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.dicomweb = self.url + "/dicom-web"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> "Orthanc":
        storage = self.folder / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "medlego-test", "StorageDirectory": str(storage), "IndexDirectory": str(storage),
            "HttpPort": self.http_port, "DicomPort": self.dicom_port, "DicomAet": AE_TITLE,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "HttpServerEnabled": True,
            "DicomServerEnabled": True, "DicomCheckCalledAet": False, "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True, "StableAge": 1, "ConcurrentJobs": 2, "SaveJobs": False,
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False, "Servers": {}},
        }
        path = self.folder / "orthanc.json"
        path.write_text(json.dumps(config, indent=1))
        log = open(self.folder / "orthanc.log", "wb")
        self.proc = subprocess.Popen([ORTHANC, str(path)], stdout=log, stderr=subprocess.STDOUT,
                                     cwd=self.folder, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}: {self.log()[-2000:]}")
            try:
                if httpx.get(self.url + "/system", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer in {timeout:.0f} s: {self.log()[-2000:]}")

    def log(self) -> str:
        p = self.folder / "orthanc.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    # -- the REST API ------------------------------------------------------------------------------
    def post(self, path: str, **kw) -> httpx.Response:
        return httpx.post(self.url + path, timeout=120, **kw)

    def get(self, path: str, **kw) -> httpx.Response:
        return httpx.get(self.url + path, timeout=60, **kw)

    def upload(self, data: bytes) -> dict:
        """Store a DICOM file in Orthanc (its REST API); returns Orthanc's answer (ID, ParentStudy…)."""
        r = self.post("/instances", content=data)
        r.raise_for_status()
        return r.json()

    def add_dicomweb_server(self, name: str, url: str) -> None:
        r = httpx.put(self.url + f"/dicom-web/servers/{name}", json={"Url": url}, timeout=30)
        r.raise_for_status()

    def add_modality(self, name: str, ae_title: str, port: int, host: str = "127.0.0.1") -> None:
        r = httpx.put(self.url + f"/modalities/{name}", json={"AET": ae_title, "Host": host, "Port": port},
                      timeout=30)
        r.raise_for_status()

    def clear(self) -> None:
        """Delete every study (a test starts from an empty PACS)."""
        for study in self.get("/studies").json():
            httpx.delete(self.url + f"/studies/{study}", timeout=30)
