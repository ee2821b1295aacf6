"""
Is Orthanc answering?  Its REST C{/system} resource, asked with the appliance's
credentials, is the readiness signal: it answers once the database, the plugins
and the HTTP server are all up.
"""

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTCP
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers

from appliance.orthanc.settings import OrthancCredentials


class OrthancNotAnswering(Exception):
    """
    Orthanc answered the readiness probe with something other than success.
    """


class RestProbe:
    """
    Asks Orthanc's C{/system} on the loopback interface.
    """

    def __init__(self, reactor: IReactorTCP, port: int, timeout: float) -> None:
        self._reactor = reactor
        self._url = f"http://127.0.0.1:{port}/system".encode("ascii")
        self._timeout = timeout
        # A probe every few seconds does not need a persistent connection, and
        # a fresh one proves that Orthanc still accepts connections.
        self._agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))

    @inlineCallbacks
    def __call__(self, credentials: OrthancCredentials) -> Deferred:
        request = self._agent.request(
            b"GET",
            self._url,
            Headers({b"Authorization": [credentials.authorization()]}),
        )
        request.addTimeout(self._timeout, self._reactor)
        response = yield request
        body = yield readBody(response).addTimeout(self._timeout, self._reactor)
        if response.code != 200:
            raise OrthancNotAnswering(
                f"GET /system answered {response.code}: {body[:200]!r}"
            )
        return body
