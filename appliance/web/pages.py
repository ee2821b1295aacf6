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
from typing import Optional

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
    escaped text by L{answer}.
    """

    def __init__(self, name: str, title: str, web: WebSection) -> None:
        # Filled in now, so "$" in the name is escaped for the placeholders
        # that L{answer} fills later.
        siteName = html.escape(web.site_name).replace("$", "$$")
        layout = Template(asset("page.html").decode("utf-8"))
        main = Template(asset(name).decode("utf-8").rstrip("\n")).safe_substitute(siteName=siteName)
        self._template = Template(layout.safe_substitute(title=html.escape(title), siteName=siteName, main=main))
        self._contentSecurityPolicy = web.content_security_policy.encode("ascii")

    def answer(self, request: Request, code: int, **values: str) -> bytes:
        """
        Prepare C{request} to answer C{code} with this page (HTML, never
        cached) and return its body, with C{values} in its placeholders.
        """
        request.setResponseCode(code)
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"Content-Security-Policy", self._contentSecurityPolicy)
        escaped = {name: html.escape(value, quote=True) for name, value in values.items()}
        return self._template.substitute(escaped).encode("utf-8")


def jsonError(request: Request, code: int, message: str, retryAfter: Optional[int] = None) -> bytes:
    """
    Prepare C{request} to answer C{code} with C{{"error": message}} in JSON
    (C{message}: one sentence for a person), and return that body.
    """
    body = json.dumps({"error": message}).encode("utf-8") + b"\n"
    request.setResponseCode(code)
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
