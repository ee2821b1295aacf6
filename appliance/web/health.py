"""
C{/healthz}: is the appliance up, and is Orthanc ready behind it?

For load balancers and monitoring: no authentication, no data, never cached.
"""

import json

from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import Request

import appliance
from appliance.orthanc.state import IOrthanc, OrthancState
from appliance.web.methods import answerOtherMethod, isRead


class HealthResource(Resource):
    """
    200 while the supervisor says Orthanc is ready, 503 otherwise; the body says
    C{{"status", "orthanc", "dicom", "version"}} in JSON either way: the
    state of Orthanc, and whether its DICOM port answered the last C-ECHO.
    """

    isLeaf = True

    def __init__(self, orthanc: IOrthanc) -> None:
        super().__init__()
        self._orthanc = orthanc

    def render(self, request: Request) -> bytes:
        if not isRead(request):
            return answerOtherMethod(request)
        state = self._orthanc.state
        ready = state is OrthancState.READY
        request.setResponseCode(http.OK if ready else http.SERVICE_UNAVAILABLE)
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Cache-Control", b"no-store")
        body = {
            "status": "ok" if ready else "unavailable",
            "orthanc": state.value,
            "dicom": self._orthanc.dicomStatus,
            "version": appliance.__version__,
        }
        return json.dumps(body).encode("ascii") + b"\n"

