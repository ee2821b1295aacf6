"""
The appliance as a twistd plugin: a L{ServiceMaker} that names the module of
its options and service, which twistd imports only once the plugin is
chosen (a plugin scan loads this module, and nothing of the daemon).
"""

from twisted.application.service import ServiceMaker

serviceMaker = ServiceMaker(
    "pacs-appliance",
    "appliance.service",
    "OHIF viewer, DICOMweb proxy and DICOM TLS in front of a supervised Orthanc.",
    "pacs-appliance",
)
