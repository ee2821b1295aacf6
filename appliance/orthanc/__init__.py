"""
Orthanc: its configuration, its process, and the service that supervises it.
"""
