"""
What the site says in its own words: its small HTML pages (log in, log out,
not allowed) and their style sheet, kept as package data in
C{appliance/web/assets/}, and the JSON body of its refusals to API clients.

The pages carry no script and no inline style, so they work under the
site's Content-Security-Policy; their one style sheet is served at
C{/login/login.css} (a public path: the page is shown before any login).
"""

import html
import json
from importlib import resources
from string import Template
from typing import Mapping, Optional, Sequence

from twisted.web.server import Request

from appliance.config import WebSection

STYLESHEET_NAME = "login.css"


def asset(name: str) -> bytes:
    """
    The bytes of the packaged file C{name} (read once, at start: small
    files that ship with the program).
    """
    return resources.files("appliance.web").joinpath("assets", name).read_bytes()


class Page:
    """
    An HTML page of the site: the body in the asset C{name}, titled
    C{title}, inside the layout the pages share (C{page.html}: the head, the
    style sheet, the site's name as the heading), answered under the site's
    Content-Security-Policy.  Its C{$name} placeholders are filled with
    escaped text by L{answer}; C{fragments} fill others with HTML now (the
    caller escapes what they hold, and may leave placeholders in them for
    L{answer}).  C{formTargets} are origins the page's forms may lead to,
    besides the site's own.
    """

    def __init__(
        self,
        name: str,
        title: str,
        web: WebSection,
        fragments: Optional[Mapping[str, str]] = None,
        formTargets: Sequence[str] = (),
    ) -> None:
        # Filled in now, so "$" in the name is escaped for the placeholders
        # that L{answer} fills later.
        siteName = html.escape(web.site_name).replace("$", "$$")
        layout = Template(asset("page.html").decode("utf-8"))
        main = Template(asset(name).decode("utf-8").rstrip("\n")).safe_substitute(siteName=siteName, **(fragments or {}))
        self._template = Template(layout.safe_substitute(title=html.escape(title), siteName=siteName, main=main))
        self._contentSecurityPolicy = withFormTargets(web.content_security_policy, formTargets).encode("ascii")

    def answer(self, request: Request, code: int, **values: str) -> bytes:
        """
        Prepare C{request} to answer C{code} with this page (HTML, never
        cached) and return its body, with C{values} in its placeholders.
        """
        setStatus(request, code)
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"Content-Security-Policy", self._contentSecurityPolicy)
        escaped = {name: html.escape(value, quote=True) for name, value in values.items()}
        return self._template.substitute(escaped).encode("utf-8")


def withFormTargets(policy: str, origins: Sequence[str]) -> str:
    """
    C{policy} with C{origins} added to its C{form-action} directive, if it
    has one (without one, forms may lead anywhere already): browsers apply
    it to where a form's answer redirects too.
    """
    if not origins:
        return policy
    directives = [directive.strip() for directive in policy.split(";")]
    for index, directive in enumerate(directives):
        if directive.split(" ", 1)[0].lower() == "form-action":
            directives[index] = " ".join([directive, *origins])
    return "; ".join(directive for directive in directives if directive)


#: RFC 6585's status, which twisted.web.http has no name for.
TOO_MANY_REQUESTS = 429

#: Reason phrases as RFC 9110 and RFC 6585 name them: twisted.web.http knows
#: neither 429 nor 431 (its status line reads "Unknown Status") and names
#: some by older RFCs.
REASONS = {
    302: b"Found",
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    413: b"Content Too Large",
    414: b"URI Too Long",
    415: b"Unsupported Media Type",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    503: b"Service Unavailable",
    507: b"Insufficient Storage",
}


def seeOther(request: Request, location: bytes) -> bytes:
    """
    Prepare C{request} to send the client to C{location} (303, never
    cached), and return the body.
    """
    setStatus(request, 303)
    request.setHeader(b"Location", location)
    request.setHeader(b"Cache-Control", b"no-store")
    request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
    return b"See " + location + b"\n"


def setStatus(request: Request, code: int) -> None:
    """
    Set the answer's status, with its standard reason phrase.
    """
    request.setResponseCode(code, REASONS.get(code))


def jsonError(request: Request, code: int, message: str, retryAfter: Optional[int] = None) -> bytes:
    """
    Prepare C{request} to answer C{code} with C{{"error": message}} in JSON
    (C{message}: one sentence for a person), and return that body.
    """
    body = json.dumps({"error": message}).encode("utf-8") + b"\n"
    setStatus(request, code)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Cache-Control", b"no-store")
    request.setHeader(b"Content-Length", b"%d" % (len(body),))
    if retryAfter is not None:
        request.setHeader(b"Retry-After", b"%d" % (retryAfter,))
    return body


def describeSize(size: int, rounded: bool = False) -> str:
    """
    C{size} (bytes) as people write it in a sentence: C{4 GiB}, C{64 KiB};
    with C{rounded}, to a tenth of the largest unit it reaches (C{3.2 MiB}).
    """
    for unit, name in ((1024**3, "GiB"), (1024**2, "MiB"), (1024, "KiB")):
        if size >= unit and (rounded or size % unit == 0):
            return f"{size // unit} {name}" if size % unit == 0 else f"{size / unit:.1f} {name}"
    return f"{size} bytes"
