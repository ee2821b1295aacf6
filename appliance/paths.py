"""
The URL paths that several parts of the appliance must agree on, spelled
once: where DICOMweb is served (the proxy mounts it there, Orthanc's
DicomWeb.Root is the same so that the URLs Orthanc writes are right, and the
viewer's data source asks there), and where Orthanc's own web interface is.
"""

#: The site's route to Orthanc's DICOMweb API, and Orthanc's root for it.
DICOMWEB_MOUNT = "pacs"
DICOMWEB_ROOT = f"/{DICOMWEB_MOUNT}/"

#: WADO-URI, under the same root (Orthanc's DicomWeb.WadoRoot).
WADO_URI_ROOT = f"{DICOMWEB_ROOT}wado"

#: The site's route to Orthanc Explorer and the REST API, for administrators.
ADMIN_MOUNT = "pacs-admin"
