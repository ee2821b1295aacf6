"""
The benchmark of issue 7: the appliance beside nginx configured as the OHIF
"Nginx + Image Archive" recipe, both in front of the same real Orthanc, and the
limit (Orthanc directly, the file system, or a discarding DICOM SCP), measured
in one run with alternating order.  Run it with C{bench/run}; see
C{bench/__main__.py} for the options and C{bench/scenarios.py} for what each
scenario measures.
"""
