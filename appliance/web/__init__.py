"""
The web site: the OHIF viewer over HTTPS, the redirect from HTTP, /healthz, and
(later) the DICOMweb and admin proxies to Orthanc.
"""
