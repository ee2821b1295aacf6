"""
What the rest of the appliance sees of Orthanc: its state, and how to reach
it while it runs.  The web site, /healthz and the systemd notifications
depend on this interface, not on the supervisor that provides it.
"""

from enum import Enum

from zope.interface import Attribute, Interface


class OrthancState(Enum):
    STARTING = "starting"
    READY = "ready"
    RESTARTING = "restarting"
    STOPPED = "stopped"
    FAILED = "failed"


class IOrthanc(Interface):
    """
    A supervised Orthanc.
    """

    state = Attribute("The current L{OrthancState}.")
    reason = Attribute("A sentence explaining the state, for the log and /healthz.")
    credentials = Attribute(
        "The L{appliance.orthanc.settings.OrthancCredentials} of its REST API: new at every start, L{None}"
        " before the first."
    )
    dicomStatus = Attribute("A sentence on the last C-ECHO to its DICOM port, for /healthz.")

    def subscribe(observer):
        """
        Call C{observer(state, reason)} at every change of state.
        """

    def whenState(*states):
        """
        A Deferred that fires with the state as soon as it is one of
        C{states} (at once if it already is).
        """
