"""
DICOM networking: the TLS forwarder in front of Orthanc's DICOM port, the check
of every association before it reaches Orthanc, and the loopback relays through
which Orthanc reaches the modalities.
"""
