"""
The audit trail of patient-data access and security events (IHE ATNA): each
event one DICOM audit message (PS3.15 A.5), kept in append-only files under
[audit] folder and sent to an Audit Record Repository over syslog with TLS.
"""
