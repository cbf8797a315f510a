"""A throwaway Orthanc (Debian's ``orthanc`` and ``orthanc-dicomweb``) for the PACS tests: its
own loopback ports, configuration, storage and index in a temporary folder, REST and DICOMweb
behind a user and password, and the medsight node registered as the modality ``medsight``.

Import the fixture in a test module (``from tests.orthanc import orthanc  # noqa: F401``). It
skips, with the reason, where Orthanc is not installed, and fails where ``CI=true`` (CI installs
it: see ``.ci/run``). A system Orthanc started by the Debian package is never used or touched.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

#: Where Debian's orthanc-dicomweb puts the plugin.
PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc")
USER, PASSWORD = "medsight", "orthanc-test-password"
ORTHANC_AET = "ORTHANC"
NODE_AET = "MEDSIGHT"


def free_port() -> int:
    """A TCP port nothing listens on right now (loopback)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Orthanc:
    """A running Orthanc: ``url`` (REST), ``dicomweb`` (its DICOMweb root), ``dicom_port`` (its
    C-STORE SCP, AE ``aet``), ``node_port`` (where it expects the medsight node, AE
    ``node_aet``), and the credentials."""

    url: str
    dicomweb: str
    dicom_port: int
    aet: str
    node_port: int
    node_aet: str
    user: str
    password: str
    log: Path

    @property
    def auth(self) -> tuple[str, str]:
        return (self.user, self.password)

    def client(self):
        import httpx

        return httpx.Client(base_url=self.url, auth=self.auth, timeout=30)


def _plugin() -> str | None:
    for folder in PLUGIN_DIRS:
        for path in sorted(Path(folder).glob("libOrthancDicomWeb.so*")):
            return str(path)
    return None


def _unavailable(reason: str):
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI installs it: see .ci/run)")
    pytest.skip(reason)


def _wait_until_up(url: str, process: subprocess.Popen, log: Path, seconds: float = 60) -> None:
    import httpx

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            if httpx.get(f"{url}/system", auth=(USER, PASSWORD), timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
    raise RuntimeError(f"Orthanc did not answer on {url}/system; its log ends:\n{tail}")


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory):
    """A throwaway Orthanc for this test session (see the module's docstring)."""
    binary = shutil.which("Orthanc")
    if binary is None:
        _unavailable("Orthanc is not installed (Debian: apt-get install orthanc orthanc-dicomweb)")
    plugin = _plugin()
    if plugin is None:
        _unavailable("the Orthanc DICOMweb plugin is missing (apt-get install orthanc-dicomweb)")
    root = tmp_path_factory.mktemp("orthanc")
    http_port, dicom_port, node_port = free_port(), free_port(), free_port()
    config = {
        "Name": "medsight-test",
        "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "index"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": ORTHANC_AET,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {USER: PASSWORD},
        "DicomModalities": {"medsight": [NODE_AET, "127.0.0.1", node_port]},
        "DicomAlwaysAllowStore": True,
        "DicomCheckCalledAet": False,
        "DicomScuTimeout": 10,
        "Plugins": [plugin],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    (root / "orthanc.json").write_text(json.dumps(config, indent=2))
    log = root / "orthanc.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [binary, str(root / "orthanc.json")], stdout=out, stderr=subprocess.STDOUT, cwd=root
        )
    url = f"http://127.0.0.1:{http_port}"
    try:
        _wait_until_up(url, process, log)
        yield Orthanc(
            url=url,
            dicomweb=f"{url}/dicom-web",
            dicom_port=dicom_port,
            aet=ORTHANC_AET,
            node_port=node_port,
            node_aet=NODE_AET,
            user=USER,
            password=PASSWORD,
            log=log,
        )
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)
