"""
The appliance's own requests to Orthanc's REST API (the metadata cache's),
as opposed to the clients' that the proxy forwards.  They go through the
proxy's connections to Orthanc and take their turns as the clients' do (see
L{appliance.web.turns}), so that Orthanc always keeps a thread for the
supervisor's health check; each answer is read whole, up to a limit.
"""

import json
from dataclasses import dataclass
from io import BytesIO
from typing import Iterable, Optional, Tuple

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.web.client import FileBodyProducer
from twisted.web.http_headers import Headers

from appliance.orthanc.state import OrthancState
from appliance.web.bodies import readLimited
from appliance.web.request import mediaType


class OrthancUnavailable(Exception):
    """
    Orthanc is not ready, or did not answer as asked.
    """


@dataclass(frozen=True)
class OrthancAnswer:
    code: int
    #: The media type, lower-case, without parameters.
    contentType: bytes
    body: bytes


class OrthancRest:
    """
    Asks Orthanc's REST API through C{proxy} (an L{OrthancProxy}): its
    agent, its credentials for Orthanc, its turns, and its response timeout
    for each whole exchange, the wait for a turn included.
    """

    def __init__(self, proxy) -> None:
        self._proxy = proxy

    def request(
        self,
        method: bytes,
        path: bytes,
        account: str,
        headers: Iterable[Tuple[bytes, bytes]] = (),
        body: Optional[bytes] = None,
        limit: int = 1024 * 1024,
    ) -> "Deferred[OrthancAnswer]":
        """
        C{method} C{path} (with its query) in one of C{account}'s turns.
        Fails with L{OrthancUnavailable} while Orthanc is not ready, with
        L{appliance.web.bodies.AnswerTooLarge} for an answer over C{limit} bytes, and with a
        timeout or a network error as the agent reports them.
        """
        proxy = self._proxy
        exchange = self._exchange(method, path, account, headers, body, limit)
        return exchange.addTimeout(proxy.responseTimeout, proxy.reactor)

    @inlineCallbacks
    def _exchange(self, method, path, account, headers, body, limit):
        proxy = self._proxy
        credentials = proxy.orthanc.credentials
        if proxy.orthanc.state is not OrthancState.READY or credentials is None:
            raise OrthancUnavailable("Orthanc is not ready")
        yield proxy.turns.acquire(account)
        try:
            sent = Headers({b"Authorization": [credentials.authorization()]})
            for name, value in headers:
                sent.addRawHeader(name, value)
            producer = None
            if body is not None:
                producer = FileBodyProducer(BytesIO(body), proxy.cooperator)
            response = yield proxy.agent.request(method, proxy.origin + path, sent, producer)
            received = yield readLimited(response, limit, "Orthanc")
        finally:
            proxy.turns.release(account)
        contentType = (response.headers.getRawHeaders(b"Content-Type") or [b""])[0]
        return OrthancAnswer(response.code, mediaType(contentType), received)

    @inlineCallbacks
    def json(self, path: bytes, account: str, query: Optional[object] = None):
        """
        The JSON document Orthanc answers to GET C{path}, or to a POST of
        C{query} there; fails with L{OrthancUnavailable} unless it answers
        200 with JSON.
        """
        if query is None:
            answer = yield self.request(b"GET", path, account)
        else:
            document = json.dumps(query).encode("utf-8")
            answer = yield self.request(
                b"POST", path, account, [(b"Content-Type", b"application/json")], document
            )
        if answer.code != 200 or answer.contentType != b"application/json":
            raise OrthancUnavailable(f"Orthanc answered {path.decode('ascii', 'replace')} with {answer.code}")
        return json.loads(answer.body)
