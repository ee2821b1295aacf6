"""
C{/healthz}: is the appliance up, and are Orthanc and the state database
ready behind it?

For load balancers and monitoring: no authentication, no data, never cached.
"""

import json
from typing import Optional

from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import Request

import appliance
from appliance.orthanc.state import IOrthanc, OrthancState
from appliance.state.database import StateDatabase
from appliance.web.methods import answerOtherMethod, isRead


class HealthResource(Resource):
    """
    200 while the supervisor says Orthanc is ready and the state database
    answers, 503 otherwise (a load balancer takes the node out); the body
    says C{{"status", "node", "orthanc", "dicom", "database", "version"}} in
    JSON either way: which node this is, the state of Orthanc, whether its
    DICOM port answered the last C-ECHO, and whether the state database is
    ready.

    @param database: the state database; L{None} for a site that keeps no
        state (one without accounts).
    """

    isLeaf = True

    def __init__(self, orthanc: IOrthanc, node: str, database: Optional[StateDatabase] = None) -> None:
        super().__init__()
        self._orthanc = orthanc
        self._node = node
        self._database = database

    def render(self, request: Request) -> bytes:
        if not isRead(request):
            return answerOtherMethod(request)
        state = self._orthanc.state
        databaseReady = self._database is None or self._database.ready
        ready = state is OrthancState.READY and databaseReady
        request.setResponseCode(http.OK if ready else http.SERVICE_UNAVAILABLE)
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Cache-Control", b"no-store")
        body = {
            "status": "ok" if ready else "unavailable",
            "node": self._node,
            "orthanc": state.value,
            "dicom": self._orthanc.dicomStatus,
            "database": "ready" if databaseReady else "unavailable",
            "version": appliance.__version__,
        }
        return json.dumps(body).encode("ascii") + b"\n"

