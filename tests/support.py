"""
Helpers shared by the test suites: configuration files, free ports, DICOM data.
"""

import socket
import sys
from array import array
from pathlib import Path
from typing import Dict, List, Optional

from pydicom.dataset import FileMetaDataset, Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from appliance.config import Config, loadConfig


def freePort() -> int:
    """
    A TCP port nothing listens on right now, on every interface.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


def writeConfig(folder: Path, sections: Dict[str, Dict[str, object]], name: str = "appliance.ini") -> Path:
    """
    Write an INI file from C{sections} into C{folder} and return its path.
    """
    folder.mkdir(parents=True, exist_ok=True)
    lines: List[str] = []
    for section, keys in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {value}" for key, value in keys.items())
        lines.append("")
    path = folder / name
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def testConfig(folder: Path, **sections: Dict[str, object]) -> Config:
    """
    A loaded configuration with its state under C{folder} and Orthanc on free
    ports; C{sections} override or add keys.
    """
    base: Dict[str, Dict[str, object]] = {
        "appliance": {"state_dir": folder / "state", "runtime_dir": folder / "run"},
        "orthanc": {"http_port": freePort(), "dicom_port": freePort()},
    }
    for section, keys in sections.items():
        base.setdefault(section, {}).update(keys)
    return loadConfig(writeConfig(folder, base))


def ctSeries(
    count: int,
    rows: int = 64,
    columns: int = 64,
    studyUID: Optional[str] = None,
    patientID: str = "TEST-0001",
) -> List[Dataset]:
    """
    C{count} instances of one synthetic CT series (16-bit, little endian), each
    with a different pixel pattern, ready to C{save_as} or send with C-STORE.
    """
    studyUID = studyUID or generate_uid()
    seriesUID = generate_uid()
    frameOfReferenceUID = generate_uid()
    instances = []
    for number in range(1, count + 1):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = studyUID
        ds.SeriesInstanceUID = seriesUID
        ds.PatientName = "Test^Patient"
        ds.PatientID = patientID
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.StudyDate = "20260101"
        ds.StudyTime = "120000"
        ds.StudyID = "1"
        ds.AccessionNumber = "ACC0001"
        ds.StudyDescription = "Synthetic CT"
        ds.SeriesDescription = "Synthetic axial"
        ds.Modality = "CT"
        ds.SeriesNumber = 1
        ds.InstanceNumber = number
        ds.ImagePositionPatient = [0.0, 0.0, float(number)]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [0.7, 0.7]
        ds.SliceThickness = 1.0
        ds.FrameOfReferenceUID = frameOfReferenceUID
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = columns
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.WindowCenter = 40
        ds.WindowWidth = 400
        pixels = array(
            "h",
            (((x + y + number * 7) % 256) * 8 + 900 for y in range(rows) for x in range(columns)),
        )
        if sys.byteorder == "big":
            pixels.byteswap()
        ds.PixelData = pixels.tobytes()
        instances.append(ds)
    return instances
