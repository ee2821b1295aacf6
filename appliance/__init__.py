"""
pacs-appliance: one Twisted daemon that serves the OHIF viewer, proxies DICOMweb to
Orthanc, terminates DICOM TLS, and supervises Orthanc.
"""

__version__ = "0.1.0"
