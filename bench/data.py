"""
The studies the benchmark reads and writes, generated once and kept under the
work folder (C{var/bench/} by default) so that later runs start at once.

    regular studies   one CT series each: QIDO, metadata, frames
    large study       one CT series of >= 300 MB: whole-study WADO-RS, slow readers
    upload series     never kept in Orthanc: STOW-RS and C-STORE write it, and it
                      is deleted again after each measurement so that every
                      write stores new instances (Orthanc ignores duplicates)

Instances are CT images, 16-bit, little endian explicit, made by the test
suite's L{ctSeries}; their pixels are random, so that nothing on the way could
gain by compressing them.
"""

import http.client
import json
import os
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional

from pydicom.filewriter import dcmwrite

from tests.support import ctSeries


@dataclass(frozen=True)
class Sizes:
    """
    How much data a run uses.
    """

    studies: int
    instancesPerStudy: int
    side: int
    largeInstances: int
    largeSide: int
    uploadInstances: int

    @property
    def name(self) -> str:
        return "-".join(str(value) for value in asdict(self).values())


#: Several hundred 512x512 instances in four studies, a large study of 600
#: instances (315 MB), and a 100-instance series (52 MB) to upload.
FULL = Sizes(studies=4, instancesPerStudy=100, side=512, largeInstances=600, largeSide=512, uploadInstances=100)
SMOKE = Sizes(studies=2, instancesPerStudy=4, side=64, largeInstances=12, largeSide=128, uploadInstances=6)

#: The study the viewer scenarios open: this many series, each of the large
#: study's size (600 instances of 512x512 in a full run).
VIEWER_SERIES = 3
VIEWER_PATIENT = "VIEWER-0001"


@dataclass(frozen=True)
class Series:
    """
    One generated series: its UIDs and files.
    """

    studyUID: str
    seriesUID: str
    instanceUIDs: List[str]
    files: List[Path]

    @property
    def bytes(self) -> int:
        return sum(path.stat().st_size for path in self.files)

    def framePaths(self) -> List[str]:
        """
        The DICOMweb paths of the first frame of every instance.
        """
        return [
            f"/pacs/studies/{self.studyUID}/series/{self.seriesUID}/instances/{uid}/frames/1"
            for uid in self.instanceUIDs
        ]


@dataclass(frozen=True)
class Dataset:
    regular: List[Series]
    large: Series
    upload: Series
    #: A STOW-RS request body holding every instance of the upload series.
    stowBody: Path
    stowBoundary: str
    #: The study the viewer opens: L{VIEWER_SERIES} series of the large
    #: study's size, of another patient (not found by the QIDO scenario).
    viewer: List[Series]

    def kept(self) -> List[Series]:
        """
        The series that live in Orthanc for the whole run.
        """
        return self.regular + [self.large] + self.viewer


def _writeSeries(folder: Path, count: int, side: int, patientID: str, studyUID: Optional[str] = None) -> Series:
    folder.mkdir(parents=True, exist_ok=True)
    instances = ctSeries(count, rows=1, columns=1, studyUID=studyUID, patientID=patientID)
    files = []
    for number, instance in enumerate(instances, 1):
        instance.Rows = instance.Columns = side
        instance.PixelData = os.urandom(side * side * 2)
        instance.AccessionNumber = patientID
        path = folder / f"{number:04d}.dcm"
        dcmwrite(path, instance, enforce_file_format=True)
        files.append(path)
    return Series(
        instances[0].StudyInstanceUID,
        instances[0].SeriesInstanceUID,
        [instance.SOPInstanceUID for instance in instances],
        files,
    )


def _writeStowBody(series: Series, path: Path) -> str:
    boundary = uuid.uuid4().hex
    with path.open("wb") as stream:
        for file in series.files:
            stream.write(b"--%s\r\nContent-Type: application/dicom\r\n\r\n" % boundary.encode())
            stream.write(file.read_bytes())
            stream.write(b"\r\n")
        stream.write(b"--%s--\r\n" % boundary.encode())
    return boundary


def _seriesFromJSON(entry: Dict) -> Series:
    return Series(entry["studyUID"], entry["seriesUID"], entry["instanceUIDs"], [Path(p) for p in entry["files"]])


def _seriesToJSON(series: Series) -> Dict:
    return {
        "studyUID": series.studyUID,
        "seriesUID": series.seriesUID,
        "instanceUIDs": series.instanceUIDs,
        "files": [str(path) for path in series.files],
    }


def _writeViewerStudy(root: Path, sizes: Sizes) -> List[Series]:
    first = _writeSeries(root / "viewer-1", sizes.largeInstances, sizes.largeSide, VIEWER_PATIENT)
    return [first] + [
        _writeSeries(root / f"viewer-{number}", sizes.largeInstances, sizes.largeSide, VIEWER_PATIENT, first.studyUID)
        for number in range(2, VIEWER_SERIES + 1)
    ]


def prepareDataset(folder: Path, sizes: Sizes, say) -> Dataset:
    """
    The dataset of C{sizes} under C{folder}, generated unless it is there
    (the viewer's study alone, for a dataset made before it was added).
    """
    root = folder / sizes.name
    manifest = root / "manifest.json"
    saved = json.loads(manifest.read_text(encoding="utf-8")) if manifest.is_file() else None
    if saved is not None:
        regular = [_seriesFromJSON(entry) for entry in saved["regular"]]
        large, upload = _seriesFromJSON(saved["large"]), _seriesFromJSON(saved["upload"])
        if not all(path.is_file() for series in regular + [large, upload] for path in series.files):
            saved = None
    if saved is None:
        say(f"Generating the benchmark's studies into {root}")
        regular = [
            _writeSeries(root / f"study-{index}", sizes.instancesPerStudy, sizes.side, f"BENCH-{index:04d}")
            for index in range(sizes.studies)
        ]
        large = _writeSeries(root / "large", sizes.largeInstances, sizes.largeSide, "BENCH-LARGE")
        upload = _writeSeries(root / "upload", sizes.uploadInstances, sizes.side, "BENCH-UPLOAD")
        stowBody = root / "upload.multipart"
        boundary = _writeStowBody(upload, stowBody)
    else:
        stowBody, boundary = Path(saved["stowBody"]), saved["stowBoundary"]
    viewer = [_seriesFromJSON(entry) for entry in (saved or {}).get("viewer", [])]
    if not viewer or not all(path.is_file() for series in viewer for path in series.files):
        say(f"Generating the viewer's study ({VIEWER_SERIES} series of {sizes.largeInstances}) into {root}")
        viewer = _writeViewerStudy(root, sizes)
    dataset = Dataset(regular, large, upload, stowBody, boundary, viewer)
    manifest.write_text(
        json.dumps(
            {
                "regular": [_seriesToJSON(series) for series in regular],
                "large": _seriesToJSON(large),
                "upload": _seriesToJSON(upload),
                "stowBody": str(stowBody),
                "stowBoundary": boundary,
                "viewer": [_seriesToJSON(series) for series in viewer],
            }
        ),
        encoding="utf-8",
    )
    return dataset


class OrthancRest:
    """
    Orthanc's REST API on loopback, with the credentials the appliance
    generated, over one keep-alive connection.
    """

    def __init__(self, port: int, authorization: str) -> None:
        self._port = port
        self._authorization = authorization
        self._connection: Optional[http.client.HTTPConnection] = None

    def request(self, method: str, path: str, body: Optional[bytes] = None, contentType: str = "application/json"):
        for attempt in (1, 2):
            if self._connection is None:
                self._connection = http.client.HTTPConnection("127.0.0.1", self._port, timeout=300)
            try:
                self._connection.request(
                    method,
                    path,
                    body=body,
                    headers={"Authorization": self._authorization, "Content-Type": contentType},
                )
                response = self._connection.getresponse()
                answer = response.read()
                break
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                # Orthanc closed the idle keep-alive connection: open a new one.
                self._connection.close()
                self._connection = None
                if attempt == 2:
                    raise
        if response.status >= 300:
            raise RuntimeError(f"Orthanc answered {method} {path} with {response.status}: {answer[:300]!r}")
        return json.loads(answer) if answer else None

    def lookUp(self, uid: str, kind: str) -> Optional[str]:
        """
        Orthanc's identifier of the study or series (C{kind}) of C{uid}.
        """
        found = self.request("POST", "/tools/lookup", uid.encode("ascii"), "text/plain")
        return next((entry["ID"] for entry in found if entry["Type"] == kind), None)

    def studyID(self, studyUID: str) -> Optional[str]:
        return self.lookUp(studyUID, "Study")

    def instanceCount(self, series: Series) -> int:
        identifier = self.lookUp(series.seriesUID, "Series")
        if identifier is None:
            return 0
        return len(self.request("GET", f"/series/{identifier}")["Instances"])

    def deleteStudy(self, studyUID: str) -> None:
        identifier = self.studyID(studyUID)
        if identifier is not None:
            self.request("DELETE", f"/studies/{identifier}")

    def store(self, path: Path) -> None:
        self.request("POST", "/instances", path.read_bytes(), "application/dicom")

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


def loadDataset(orthanc: OrthancRest, dataset: Dataset, say) -> None:
    """
    Store every kept series in Orthanc unless it holds it already; make sure
    the upload series is not there.
    """
    for series in dataset.kept():
        if orthanc.instanceCount(series) == len(series.files):
            continue
        say(f"Loading study {series.studyUID} ({len(series.files)} instances) into Orthanc")
        for path in series.files:
            orthanc.store(path)
    orthanc.deleteStudy(dataset.upload.studyUID)

