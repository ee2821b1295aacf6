"""
Hostile HTTP against the whole daemon (C{pacs-appliance run}, the real
Orthanc it supervises, real TLS): one table row a raw request (or several
pipelined), sent over a new TLS connection to the HTTPS port, mostly by an
authenticated administrator, since only an authenticated user's request can
reach Orthanc.  Each row states the statuses the daemon answers with, in
order (the request layer and the routes document them: 400 with a sentence
for malformed and smuggling requests, 401/403 from the access gate, 405, 413,
414, 431), and what Orthanc receives.  Every row ends with the daemon closing
the connection (a refusal, C{Connection: close} on the last request, or, for
a head that never ends, C{header_timeout} without any answer), so that
"nothing more was answered" is certain, not a guess after a delay.  No answer
may name a software version in its C{Server} header, and the daemon may log
no error of its own.

How Orthanc's side is observed: the daemon runs with C{[orthanc] verbose =
yes}, under which Orthanc 1.10.1 logs a line for every HTTP request it gets
(C{HttpServer.cpp] (http) GET /pacs/studies}) and the supervisor forwards
Orthanc's output to the daemon's log (namespace C{orthanc}), which this test
reads.  The supervisor's own health probe is set an hour apart, so every such
line is one of ours.  After each row a normal authenticated request on a new
connection (the "barrier", to a path of its own) must be answered 200; once
Orthanc's line for the barrier is read, every request Orthanc logged since the
row started is known, and must be exactly those the row lists.  The control
rows (a DICOMweb search, bodies of each kind, honest pipelining) prove that a
request that does reach Orthanc is seen.
"""

import http.client
import io
import itertools
import re
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import pytest

from appliance.config import loadConfig
from appliance.tls import selfSignedPaths
from tests.daemon import EXECUTABLE
from tests.support import basicAuthorization, writeTestConfig, writeUser
from tests.tlsclients import clientContext
from tests.webclients import blockedRows

#: Who sends the rows: (name, password, roles).
ADMIN = ("hospital-it", "admin test password", ("admin",))
VIEWER = ("reader", "viewer test password", ("viewer",))
ANONYMOUS = None

#: The largest upload of the daemon under test: small, so that a body over it
#: is cheap to send.
MAX_UPLOAD = 64 * 1024
#: [web] max_request_head, as configured by default.
MAX_HEAD = 64 * 1024
#: [web] header_timeout: short, for the row whose head never ends.
HEADER_TIMEOUT = 3

#: Seconds a client waits for the daemon: every row ends long before.
SOCKET_TIMEOUT = 15

#: A line Orthanc logs for each HTTP request it receives (verbose level),
#: as the daemon writes it: the method and the path, without the query.
#: The metadata cache's reading of Orthanc's changes, every few seconds:
#: not a client's request.
FOLLOWED_CHANGES = "/changes"
ORTHANC_REQUEST = re.compile(r"\[orthanc\] HttpServer\.cpp:\d+\] \(http\) ([A-Z]+) (/\S*)$")

#: A problem of the daemon itself in its log: an unhandled error, a traceback,
#: a line at error level from anything but Orthanc (which logs its own 404s
#: as errors).
DAEMON_PROBLEM = re.compile(r"Traceback|Unhandled|^\S+ \S+ (?:ERROR|CRITICAL)\s+\[(?!orthanc\])")


def request(
    method: bytes,
    target: bytes,
    *headers: bytes,
    body: bytes = b"",
    user=ADMIN,
    host: Optional[bytes] = b"localhost",
    version: bytes = b"HTTP/1.1",
    close: bool = True,
) -> bytes:
    """
    The raw bytes of a request: C{Host} (unless L{None}), HTTP Basic for
    C{user} (unless anonymous), C{headers}, C{Connection: close} if
    C{close}, then C{body} as it is.
    """
    lines = [b"%s %s %s" % (method, target, version)]
    if host is not None:
        lines.append(b"Host: " + host)
    if user is not None:
        lines.append(b"Authorization: " + basicAuthorization(user[0], user[1]).encode("ascii"))
    lines.extend(headers)
    if close:
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


#: An Orthanc endpoint that takes any body and answers 200 (a search of
#: identifiers), under the administrators' route: the target of the rows
#: with a body.
LOOKUP = b"/pacs-admin/tools/lookup"
LOOKUP_SEEN = "POST /tools/lookup"

#: A request hidden in a body or after a refusal: were it ever executed,
#: Orthanc would log C{GET /tools/smuggled}.
SMUGGLED = request(b"GET", b"/pacs-admin/tools/smuggled")

#: The head of a chunked upload to L{LOOKUP}.
CHUNKED = request(b"POST", LOOKUP, b"Transfer-Encoding: chunked")

#: The request layer's sentences for what twisted.web finds malformed, and
#: for a folded header line.
MALFORMED = "The request is malformed."
FOLDED = "folded over several lines"


@dataclass(frozen=True)
class Row:
    """
    One hostile (or control) exchange.

    @ivar raw: what is sent, in one write.
    @ivar statuses: the statuses answered, in order; after the last, the
        daemon closes the connection.
    @ivar says: a part of the first answer's body (the sentence of a refusal).
    @ivar reaches: what Orthanc receives, in order, as C{METHOD /path}.
    """

    name: str
    raw: bytes
    statuses: Tuple[int, ...]
    says: Optional[str] = None
    reaches: Tuple[str, ...] = ()


ROWS: Sequence[Row] = [
    # --- controls: what does reach Orthanc is seen
    Row("a DICOMweb search (control)", request(b"GET", b"/pacs/studies"), (200,), reaches=("GET /pacs/studies",)),
    Row(
        "a body with Content-Length (control)",
        request(b"POST", LOOKUP, b"Content-Length: 5", body=b"hello"),
        (200,),
        reaches=(LOOKUP_SEEN,),
    ),
    Row("a chunked body (control)", CHUNKED + b"5\r\nhello\r\n0\r\n\r\n", (200,), reaches=(LOOKUP_SEEN,)),
    # RFC 9110 5.5: the whitespace around a field value is not part of it.
    Row(
        "Content-Length with spaces around",
        request(b"POST", LOOKUP, b"Content-Length:  5 ", body=b"hello"),
        (200,),
        reaches=(LOOKUP_SEEN,),
    ),
    # RFC 9112 7: transfer-coding names are case-insensitive.
    Row(
        "Transfer-Encoding in upper case",
        request(b"POST", LOOKUP, b"Transfer-Encoding: CHUNKED", body=b"5\r\nhello\r\n0\r\n\r\n"),
        (200,),
        reaches=(LOOKUP_SEEN,),
    ),
    Row(
        "a tab before chunked",
        request(b"POST", LOOKUP, b"Transfer-Encoding:\tchunked", body=b"5\r\nhello\r\n0\r\n\r\n"),
        (200,),
        reaches=(LOOKUP_SEEN,),
    ),
    Row("a chunk extension", CHUNKED + b"5;name=value\r\nhello\r\n0\r\n\r\n", (200,), reaches=(LOOKUP_SEEN,)),
    Row("a trailer field", CHUNKED + b"5\r\nhello\r\n0\r\nX-Trailer: a\r\n\r\n", (200,), reaches=(LOOKUP_SEEN,)),
    Row(
        "a request inside a body is a body",
        request(b"POST", LOOKUP, b"Content-Length: %d" % (len(SMUGGLED),), body=SMUGGLED),
        (200,),
        reaches=(LOOKUP_SEEN,),
    ),
    # Three requests in one write: a 404 from Orthanc (once the metadata
    # cache has looked the study up in Orthanc's index), the daemon's own
    # /healthz, a search; answered in that order, Orthanc asked in order.
    Row(
        "honest pipelining, answered in order",
        request(b"GET", b"/pacs/studies/1.2.3.4/metadata", close=False)
        + request(b"GET", b"/healthz", close=False)
        + request(b"GET", b"/pacs/studies"),
        (404, 200, 200),
        reaches=("POST /tools/find", "GET /pacs/studies/1.2.3.4/metadata", "GET /pacs/studies"),
    ),
    Row(
        "HTTP/1.0 with a Host",
        request(b"GET", b"/pacs/studies", version=b"HTTP/1.0", close=False),
        (200,),
        reaches=("GET /pacs/studies",),
    ),
    # Orthanc is asked for the path the policy checked, resolved.
    Row(
        "encoded dot segments resolved before Orthanc",
        request(b"GET", b"/pacs/studies/%2e%2e/series"),
        (200,),
        reaches=("GET /pacs/series",),
    ),
    Row("an empty segment", request(b"GET", b"/pacs//studies"), (200,), reaches=("GET /pacs/studies",)),
    Row("an encoded route name", request(b"GET", b"/%70acs-admin/system"), (200,), reaches=("GET /system",)),
    # The query goes on as sent, still encoded: no line break reaches Orthanc.
    Row(
        "CR LF percent-encoded in the query",
        request(b"GET", b"/pacs/studies?PatientID=%0d%0aX-Injected:%20yes"),
        (200,),
        reaches=("GET /pacs/studies",),
    ),
    # --- smuggling: the head is refused, the connection closed
    Row(
        "Content-Length then Transfer-Encoding",
        request(
            b"POST", LOOKUP, b"Content-Length: %d" % (5 + len(SMUGGLED),), b"Transfer-Encoding: chunked",
            body=b"0\r\n\r\n" + SMUGGLED,
        ),
        (400,),
        MALFORMED,
    ),
    Row(
        "Transfer-Encoding then Content-Length",
        request(b"POST", LOOKUP, b"Transfer-Encoding: chunked", b"Content-Length: 4", body=b"5c\r\n" + SMUGGLED),
        (400,),
        MALFORMED,
    ),
    Row(
        "two equal Content-Length",
        request(b"POST", LOOKUP, b"Content-Length: 5", b"Content-Length: 5", body=b"hello" + SMUGGLED),
        (400,),
        MALFORMED,
    ),
    Row(
        "two different Content-Length",
        request(
            b"POST", LOOKUP, b"Content-Length: 5", b"Content-Length: %d" % (5 + len(SMUGGLED),),
            body=b"hello" + SMUGGLED,
        ),
        (400,),
        MALFORMED,
    ),
    Row(
        "a list in Content-Length",
        request(b"POST", LOOKUP, b"Content-Length: 5, 5", body=b"hello" + SMUGGLED),
        (400,),
        MALFORMED,
    ),
    Row("a signed Content-Length", request(b"POST", LOOKUP, b"Content-Length: +5", body=b"hello"), (400,), MALFORMED),
    Row("a negative Content-Length", request(b"POST", LOOKUP, b"Content-Length: -5", body=b"hello"), (400,), MALFORMED),
    Row(
        "a hexadecimal Content-Length",
        request(b"POST", LOOKUP, b"Content-Length: 0x5", body=b"hello"),
        (400,),
        MALFORMED,
    ),
    Row(
        "a non-ASCII digit in Content-Length",
        request(b"POST", LOOKUP, "Content-Length: \u0665".encode("utf-8"), body=b"hello"),
        (400,),
        MALFORMED,
    ),
    Row(
        "a Content-Length of 10^30",
        request(b"POST", LOOKUP, b"Content-Length: 1" + b"0" * 30, body=b"hello"),
        (413,),
        "larger than the 64 KiB",
    ),
    Row(
        "Transfer-Encoding: chunked, identity",
        request(b"POST", LOOKUP, b"Transfer-Encoding: chunked, identity", body=b"0\r\n\r\n" + SMUGGLED),
        (400,),
        MALFORMED,
    ),
    Row(
        "Transfer-Encoding: identity, chunked",
        request(b"POST", LOOKUP, b"Transfer-Encoding: identity, chunked", body=b"0\r\n\r\n" + SMUGGLED),
        (400,),
        MALFORMED,
    ),
    Row(
        "Transfer-Encoding: xchunked",
        request(b"POST", LOOKUP, b"Transfer-Encoding: xchunked", body=b"0\r\n\r\n" + SMUGGLED),
        (400,),
        MALFORMED,
    ),
    Row(
        "a space before the colon of Transfer-Encoding",
        request(b"POST", LOOKUP, b"Transfer-Encoding : chunked", body=b"0\r\n\r\n" + SMUGGLED),
        (400,),
        MALFORMED,
    ),
    Row(
        "a tab before Transfer-Encoding",
        request(b"POST", LOOKUP, b"\tTransfer-Encoding: chunked", body=b"0\r\n\r\n" + SMUGGLED),
        (400,),
        FOLDED,
    ),
    Row(
        "a folded Transfer-Encoding",
        request(b"POST", LOOKUP, b"Transfer-Encoding:\r\n chunked", body=b"0\r\n\r\n" + SMUGGLED),
        (400,),
        FOLDED,
    ),
    Row(
        "Transfer-Encoding: identity",
        request(b"POST", LOOKUP, b"Transfer-Encoding: identity", body=SMUGGLED),
        (400,),
        "The only Transfer-Encoding accepted is chunked.",
    ),
    Row(
        "two Transfer-Encoding headers",
        request(
            b"POST", LOOKUP, b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked",
            body=b"0\r\n\r\n" + SMUGGLED,
        ),
        (400,),
        MALFORMED,
    ),
    Row(
        "a vertical tab after chunked",
        request(b"POST", LOOKUP, b"Transfer-Encoding: chunked\x0b", body=b"0\r\n\r\n" + SMUGGLED),
        (400,),
        MALFORMED,
    ),
    Row(
        "Transfer-Encoding and Content-Length in HTTP/1.0",
        request(
            b"POST", LOOKUP, b"Transfer-Encoding: chunked", b"Content-Length: 5",
            body=b"0\r\n\r\n" + SMUGGLED, version=b"HTTP/1.0",
        ),
        (400,),
        MALFORMED,
    ),
    Row(
        "a request after a refused one",
        request(b"GET", b"/pacs/studies", b"Host: other", close=False) + SMUGGLED,
        (400,),
        "one Host header",
    ),
    # --- chunks
    Row("a negative chunk size", CHUNKED + b"-5\r\nhello\r\n0\r\n\r\n", (400,), MALFORMED),
    Row("a signed chunk size", CHUNKED + b"+5\r\nhello\r\n0\r\n\r\n", (400,), MALFORMED),
    Row("a chunk size with 0x", CHUNKED + b"0x5\r\nhello\r\n0\r\n\r\n", (400,), MALFORMED),
    Row("a chunk size of just 0x", CHUNKED + b"0x\r\n\r\n" + SMUGGLED, (400,), MALFORMED),
    Row("an empty chunk size", CHUNKED + b"\r\nhello\r\n0\r\n\r\n", (400,), MALFORMED),
    Row("a space before a chunk size", CHUNKED + b" 5\r\nhello\r\n0\r\n\r\n", (400,), MALFORMED),
    Row("a chunk size that is no number", CHUNKED + b"zz\r\nhello\r\n0\r\n\r\n", (400,), MALFORMED),
    Row("a chunk longer than its size", CHUNKED + b"3\r\nhello\r\n0\r\n\r\n" + SMUGGLED, (400,), MALFORMED),
    Row("a chunk without its CRLF", CHUNKED + b"5\r\nhello0\r\n\r\n" + SMUGGLED, (400,), MALFORMED),
    Row(
        "a chunk size line of 2 KiB of extensions",
        CHUNKED + b"5;" + b"a" * 2048 + b"\r\nhello\r\n0\r\n\r\n",
        (400,),
        MALFORMED,
    ),
    Row("a control character in a chunk extension", CHUNKED + b"5;\x01\r\nhello\r\n0\r\n\r\n", (400,), MALFORMED),
    Row("a line feed in a chunk extension", CHUNKED + b"5;a\nb\r\nhello\r\n0\r\n\r\n", (400,), MALFORMED),
    # A C parser whose size wraps to 0 would end the body here and run
    # SMUGGLED; this is one chunk of 2^128 bytes, over the upload limit.
    Row(
        "a chunk size of 2^128",
        CHUNKED + b"1" + b"0" * 32 + b"\r\n" + SMUGGLED + b"x" * MAX_UPLOAD,
        (413,),
        "larger than the 64 KiB",
    ),
    # --- floods
    Row(
        "more than 500 headers",
        request(b"GET", b"/pacs/studies", *[b"X-A: b"] * 501),
        (400,),
        MALFORMED,
    ),
    Row(
        "headers over max_request_head",
        request(b"GET", b"/pacs/studies", *[b"X-%d: %s" % (n, b"v" * 1024) for n in range(70)]),
        (431,),
        "headers are larger than the 64 KiB",
    ),
    Row(
        "one header over max_request_head",
        request(b"GET", b"/pacs/studies", b"X-Long: " + b"v" * MAX_HEAD),
        (431,),
        "headers are larger than the 64 KiB",
    ),
    Row(
        "a URL over max_request_head",
        request(b"GET", b"/pacs/studies?PatientID=" + b"A" * MAX_HEAD),
        (414,),
        "URL is longer than the 64 KiB",
    ),
    Row(
        "a request line of spaces",
        b"GET" + b" " * (MAX_HEAD + 10) + b"/ HTTP/1.1\r\n\r\n",
        (414,),
        "URL is longer than the 64 KiB",
    ),
    # Orthanc's web server reads 16 KiB of head and about 64 header lines: the
    # routes refuse what it could not read, under max_request_head too.
    Row(
        "a 12 KiB search (control)",
        request(b"GET", b"/pacs/studies?PatientID=" + b"A" * (12 * 1024)),
        (200,),
        reaches=("GET /pacs/studies",),
    ),
    Row(
        "a 20 KiB search",
        request(b"GET", b"/pacs/studies?PatientID=" + b"A" * (20 * 1024)),
        (414,),
        "URL is too long for the archive",
    ),
    Row(
        "a 20 KiB path",
        request(b"GET", b"/pacs-admin/instances/" + b"1" * (20 * 1024)),
        (414,),
        "URL is too long for the archive",
    ),
    Row(
        "a 20 KiB header",
        request(b"GET", b"/pacs/studies", b"X-Long: " + b"v" * (20 * 1024)),
        (431,),
        "headers are too large for the archive",
    ),
    Row(
        "48 headers (control)",
        request(b"GET", b"/pacs-admin/system", *[b"X-%d: v" % (n,) for n in range(45)]),
        (200,),
        reaches=("GET /system",),
    ),
    Row(
        "60 headers",
        request(b"GET", b"/pacs-admin/system", *[b"X-%d: v" % (n,) for n in range(57)]),
        (431,),
        "more than the 56 headers",
    ),
    Row(
        "400 headers",
        request(b"GET", b"/pacs/studies", *[b"X-%d: v" % (n,) for n in range(397)]),
        (431,),
        "more than the 56 headers",
    ),
    # --- header injection
    Row("a bare CR in a header value", request(b"GET", b"/pacs/studies", b"X-A: a\rX-Injected: b"), (400,), MALFORMED),
    Row("a bare LF in a header value", request(b"GET", b"/pacs/studies", b"X-A: a\nX-Injected: b"), (400,), MALFORMED),
    Row("a NUL in a header value", request(b"GET", b"/pacs/studies", b"X-Test: a\x00b"), (400,), MALFORMED),
    Row(
        "a continuation line (obs-fold)",
        request(b"GET", b"/pacs/studies", b"X-Test: a", b" X-Injected: b"),
        (400,),
        FOLDED,
    ),
    Row(
        "lines ending in LF, then a CRLF",
        request(b"GET", b"/pacs/studies").replace(b"\r\n", b"\n") + b"\r\n",
        (400,),
        MALFORMED,
    ),
    # No line ends for twisted.web: the head never completes, and
    # header_timeout closes the connection without an answer.
    Row("lines ending in LF only", request(b"GET", b"/pacs/studies").replace(b"\r\n", b"\n"), ()),
    Row(
        "CR LF percent-encoded in a path segment",
        request(b"GET", b"/pacs/studies/1.2%0d%0aX-Injected:%20yes/series"),
        (400,),
        "Orthanc would read differently",
    ),
    Row(
        "a Host that would extend Forwarded",
        request(b"GET", b"/pacs/studies", host=b"evil.example;proto=http"),
        (400,),
        "valid Host header",
    ),
    # --- NUL, overlong UTF-8, traversal
    Row("a NUL under /pacs/", request(b"GET", b"/pacs/studies/%00/series"), (400,), "NUL character"),
    Row("a NUL under /pacs-admin/", request(b"GET", b"/pacs-admin/system%00.json"), (400,), "NUL character"),
    Row("a NUL in the query", request(b"GET", b"/pacs/studies?PatientID=a%00b"), (400,), "NUL character"),
    Row("a raw NUL in the path", request(b"GET", b"/pacs/studies/\x00"), (400,), MALFORMED),
    Row(
        "overlong UTF-8 dots under /pacs/",
        request(b"GET", b"/pacs/studies/%C0%AE%C0%AE/%C0%AE%C0%AE/pacs-admin/system"),
        (400,),
        "Orthanc would read differently",
    ),
    Row(
        "an overlong UTF-8 slash under /pacs-admin/",
        request(b"GET", b"/pacs-admin/tools%C0%AFshutdown"),
        (400,),
        "Orthanc would read differently",
    ),
    Row("raw overlong UTF-8 in the path", request(b"GET", b"/pacs/\xc0\xae\xc0\xae/pacs-admin/"), (400,), MALFORMED),
    Row("a raw non-ASCII byte in the path", request(b"GET", b"/pacs/studies/\x80"), (400,), "must be ASCII"),
    Row("/pacs/../pacs-admin/", request(b"GET", b"/pacs/../pacs-admin/system"), (400,), "leaves /pacs/"),
    Row("/pacs/%2e%2e/pacs-admin/", request(b"GET", b"/pacs/%2e%2e/pacs-admin/system"), (400,), "leaves /pacs/"),
    Row(
        "encoded slashes climbing out of /pacs/",
        request(b"GET", b"/pacs/studies%2F..%2F..%2Fpacs-admin%2Fsystem"),
        (400,),
        "leaves /pacs/",
    ),
    Row(
        "encoded slashes climbing out of /pacs-admin/",
        request(b"GET", b"/pacs-admin/..%2F..%2Fetc%2Fpasswd"),
        (400,),
        "leaves /pacs-admin/",
    ),
    Row(
        "a backslash under /pacs-admin/",
        request(b"POST", b"/pacs-admin/tools\\shutdown", b"Content-Length: 0"),
        (400,),
        "Orthanc would read differently",
    ),
    Row(
        "a trailing dot under /pacs-admin/",
        request(b"POST", b"/pacs-admin/tools/shutdown.", b"Content-Length: 0"),
        (400,),
        "Orthanc would read differently",
    ),
    Row(
        "an encoded slash to a blocked endpoint",
        request(b"POST", b"/pacs-admin/tools%2Fexecute-script", b"Content-Length: 2", body=b"1;"),
        (403,),
        "This Orthanc endpoint runs code",
    ),
    Row(
        "an encoded route name as a viewer",
        request(b"GET", b"/%70acs-admin/system", user=VIEWER),
        (403,),
    ),
    Row("a DICOMweb search without a user", request(b"GET", b"/pacs/studies", user=ANONYMOUS), (401,), "Log in first"),
    Row(
        "Content-Length then Transfer-Encoding without a user",
        request(
            b"POST", b"/login", b"Content-Length: %d" % (5 + len(SMUGGLED),), b"Transfer-Encoding: chunked",
            body=b"0\r\n\r\n" + SMUGGLED, user=ANONYMOUS,
        ),
        (400,),
        MALFORMED,
    ),
    Row(
        "a request in the body of a login",
        request(
            b"POST", b"/login", b"Content-Type: application/x-www-form-urlencoded",
            b"Content-Length: %d" % (len(SMUGGLED),), body=SMUGGLED, user=ANONYMOUS,
        ),
        (403,),
        "it did not come from this site",
    ),
    Row(
        "a chunked upload without a user",
        request(
            b"POST", b"/pacs/studies", b"Transfer-Encoding: chunked", body=b"5\r\nhello\r\n0\r\n\r\n", user=ANONYMOUS
        ),
        (401,),
        "Log in first",
    ),
    Row(
        "a traversal without a user",
        request(b"GET", b"/pacs/../pacs-admin/system", user=ANONYMOUS),
        (401,),
        "Log in first",
    ),
    # --- protocols, methods, targets
    Row("HTTP/0.9", b"GET /pacs/studies\r\n", (400,), MALFORMED),
    Row("the HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", (400,), MALFORMED),
    Row("HTTP/1.2", request(b"GET", b"/pacs/studies", version=b"HTTP/1.2"), (400,), MALFORMED),
    Row(
        "an absolute URL",
        request(b"GET", b"https://localhost/pacs/studies"),
        (400,),
        "must be a path",
    ),
    Row(
        "an absolute URL to another host",
        request(b"GET", b"http://127.0.0.1:8042/system"),
        (400,),
        "must be a path",
    ),
    Row(
        "CONNECT to an authority",
        request(b"CONNECT", b"127.0.0.1:8042", host=b"127.0.0.1:8042"),
        (400,),
        "must be a path",
    ),
    # twisted.web answers it itself, without a resource.
    Row("OPTIONS *", request(b"OPTIONS", b"*"), (200,)),
    Row("TRACE on the viewer", request(b"TRACE", b"/"), (405,)),
    Row("TRACE under /pacs/", request(b"TRACE", b"/pacs/studies"), (405,), "TRACE is not allowed"),
    Row("TRACE under /pacs-admin/", request(b"TRACE", b"/pacs-admin/system"), (405,), "TRACE is not allowed"),
    Row("CONNECT under /pacs-admin/", request(b"CONNECT", b"/pacs-admin/system"), (405,), "CONNECT is not allowed"),
    Row("WebDAV's PROPFIND", request(b"PROPFIND", b"/pacs-admin/webdav/"), (405,), "PROPFIND is not allowed"),
    Row("an unknown method", request(b"FOO", b"/pacs/studies"), (405,), "FOO is not allowed"),
    Row("a method in lower case", request(b"get", b"/pacs/studies"), (405,), "get is not allowed"),
    Row("TRACE without a user", request(b"TRACE", b"/pacs-admin/system", user=ANONYMOUS), (401,), "Log in first"),
    Row("no Host in HTTP/1.1", request(b"GET", b"/pacs/studies", host=None), (400,), "one Host header"),
    Row(
        "two Host headers",
        request(b"GET", b"/pacs/studies", b"Host: evil.example"),
        (400,),
        "one Host header",
    ),
    Row(
        "no Host in HTTP/1.0",
        request(b"GET", b"/pacs/studies", host=None, version=b"HTTP/1.0"),
        (400,),
        "valid Host header",
    ),
    # --- Orthanc's routes an administrator may not use (the blocked rows of
    # appliance/web/assets/orthanc-routes.tsv), and one the table does not know
    *(
        Row(
            f"blocked for admins: {method} {path}",
            request(method.encode(), path.encode(), *([b"Content-Length: 2"] if method in ("POST", "PUT") else []),
                    body=b"{}" if method in ("POST", "PUT") else b""),
            (403,),
            reason,
        )
        for method, path, reason in blockedRows()
    ),
    Row("WebDAV, no route of the table", request(b"PROPFIND", b"/pacs-admin/webdav/"), (405,), "PROPFIND is not allowed"),
    Row("an unknown route", request(b"GET", b"/pacs-admin/webdav/"), (403,), "no route of Orthanc 1.10"),
]


class _SharedReader(io.BufferedReader):
    """
    A reader that the response which reaches the end of its connection
    cannot close for the responses after it.
    """

    def close(self) -> None:
        pass


class _Received:
    """
    What L{http.client.HTTPResponse} asks of a socket, over bytes already
    received: one reader, shared by the responses read in turn.
    """

    def __init__(self, data: bytes) -> None:
        self.file = _SharedReader(io.BytesIO(data))

    def makefile(self, mode: str):
        return self.file


Response = Tuple[int, http.client.HTTPMessage, bytes]


def parseResponses(data: bytes) -> List[Response]:
    """
    The status, headers and body of each response in C{data}
    (Content-Length or chunked), in order.
    """
    received = _Received(data)
    responses = []
    while received.file.peek(1):
        response = http.client.HTTPResponse(received)
        response.begin()
        responses.append((response.status, response.headers, response.read()))
    return responses


class DaemonLog:
    """
    The daemon's output, written to a file: a pipe read only now and then
    would fill up and stop the daemon in the middle of a row.
    """

    #: Seconds between two looks at the file while waiting for a line.
    POLL = 0.02

    def __init__(self, path: Path) -> None:
        self.path = path

    def lines(self) -> List[str]:
        """
        The complete lines written so far.
        """
        text = self.path.read_bytes().decode("utf-8", "replace")
        return text.split("\n")[:-1]

    def waitFor(self, pattern: str, process: subprocess.Popen, timeout: float) -> None:
        """
        Return once a line matches C{pattern}; fail after C{timeout} seconds,
        or if C{process} ends first.
        """
        expression = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while not any(expression.search(line) for line in self.lines()):
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no line matching {pattern!r} in:\n" + "\n".join(self.lines()[-50:]))
            time.sleep(self.POLL)


@dataclass
class Appliance:
    """
    The daemon under test: its HTTPS port, a TLS client context that trusts
    its certificate, its process and its output.
    """

    port: int
    context: ssl.SSLContext
    process: subprocess.Popen
    log: DaemonLog

    def exchange(self, raw: bytes) -> bytes:
        """
        Send C{raw} over a new TLS connection and return what the daemon
        answers until it closes the connection (blocking).
        """
        with socket.create_connection(("127.0.0.1", self.port), timeout=SOCKET_TIMEOUT) as plain:
            with self.context.wrap_socket(plain, server_hostname="localhost") as connection:
                try:
                    connection.sendall(raw)
                except (BrokenPipeError, ConnectionResetError, ssl.SSLEOFError):
                    # Refused while sending: the answer may be read still.
                    pass
                received = b""
                while True:
                    try:
                        data = connection.recv(65536)
                    except (ssl.SSLEOFError, ConnectionResetError):
                        break
                    if not data:
                        break
                    received += data
                return received


@pytest.fixture(scope="module")
def appliance(tmp_path_factory) -> Iterator[Appliance]:
    """
    One daemon for the whole table, with an administrator and a viewer,
    Orthanc logging every request, HTTPS only.
    """
    folder = tmp_path_factory.mktemp("hostile-http")
    users = folder / "users"
    for name, password, roles in (ADMIN, VIEWER):
        writeUser(users, name, password, roles)
    path = writeTestConfig(
        folder,
        auth={"users_file": users},
        # Every request Orthanc logs comes from a row or a barrier.
        orthanc={"verbose": "yes", "health_interval": "1h"},
        web={
            "listen_http": "",
            "max_upload_size": f"{MAX_UPLOAD // 1024}K",
            "header_timeout": f"{HEADER_TIMEOUT}s",
        },
        dicom={"listen": ""},
    )
    config = loadConfig(path)
    log = DaemonLog(folder / "daemon.log")
    with log.path.open("wb") as output:
        process = subprocess.Popen(
            [str(EXECUTABLE), "run", "--config", str(path)],
            stdout=output,
            stderr=subprocess.STDOUT,
            cwd=folder,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"},
        )
    try:
        log.waitFor(r"Orthanc is ready", process, timeout=120)
        yield Appliance(config.web.listen_https.port, clientContext(cafile=selfSignedPaths(config.appliance.state_dir)[0]), process, log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


_barriers = itertools.count(1)


def orthancRequestsUntilBarrier(appliance: Appliance, start: int) -> List[str]:
    """
    Send the barrier, a normal authenticated request on a new connection,
    check its answer, and return the requests Orthanc logged from log line
    C{start} up to it.
    """
    path = "/pacs/studies/1.2.826.0.1.3680043.10.1.%d/series" % (next(_barriers),)
    received = appliance.exchange(request(b"GET", path.encode("ascii")))
    answers = [(status, body) for status, _, body in parseResponses(received)]
    assert answers == [(200, b"[]")], f"the normal request after the row got {answers}"
    appliance.log.waitFor(re.escape(f"(http) GET {path}") + "$", appliance.process, SOCKET_TIMEOUT)
    seen = []
    for line in appliance.log.lines()[start:]:
        match = ORTHANC_REQUEST.search(line)
        if match is None or match.group(2) == FOLLOWED_CHANGES:
            continue
        if match.group(2) == path:
            return seen
        seen.append(f"{match.group(1)} {match.group(2)}")
    raise AssertionError("the barrier's line went missing")


@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
def test_hostileRequest(appliance: Appliance, row: Row) -> None:
    """
    The row's statuses, and its sentence, then the connection closed;
    Orthanc received exactly what the row says; the daemon serves a normal
    request afterwards, and logged no problem of its own.
    """
    start = len(appliance.log.lines())
    received = appliance.exchange(row.raw)
    responses = parseResponses(received)
    assert tuple(status for status, _, _ in responses) == row.statuses, received[:2000]
    # No answer names the software's version, not even twisted.web's own.
    assert [headers["Server"] for _, headers, _ in responses] == ["pacs-appliance"] * len(responses)
    if row.says is not None:
        assert row.says in responses[0][2].decode("utf-8", "replace"), responses[0][2]
    assert tuple(orthancRequestsUntilBarrier(appliance, start)) == row.reaches
    assert appliance.process.poll() is None, "the daemon ended"
    problems = [line for line in appliance.log.lines()[start:] if DAEMON_PROBLEM.search(line)]
    assert problems == []
