"""
The web site: the OHIF viewer over HTTPS, the DICOMweb and admin proxies to
Orthanc behind the access gate, /healthz, and the redirect from HTTP.
"""
