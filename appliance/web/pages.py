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

STYLESHEET_NAME = "login.css"


def asset(name: str) -> bytes:
    """
    The bytes of the packaged file C{name} (read once, at start: small
    files that ship with the program).
    """
    return resources.files("appliance.web").joinpath("assets", name).read_bytes()


class Page:
    """
    An HTML page: the body in the asset C{name}, titled C{title}, inside the
    layout the pages share (C{page.html}: the head, the style sheet, the
    site's name as the heading).  Its C{$name} placeholders, the layout's
    C{$siteName} included, are filled with escaped text by L{render}.
    """

    def __init__(self, name: str, title: str) -> None:
        layout = Template(asset("page.html").decode("utf-8"))
        main = asset(name).decode("utf-8").rstrip("\n")
        self._template = Template(layout.safe_substitute(title=html.escape(title), main=main))

    def render(self, **values: str) -> bytes:
        escaped = {name: html.escape(value, quote=True) for name, value in values.items()}
        return self._template.substitute(escaped).encode("utf-8")


def preparePage(request: Request, code: int, contentSecurityPolicy: bytes) -> None:
    """
    Prepare C{request} to answer C{code} with one of these pages: HTML,
    never cached, under the site's C{contentSecurityPolicy}.
    """
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
    request.setHeader(b"Cache-Control", b"no-store")
    request.setHeader(b"Content-Security-Policy", contentSecurityPolicy)


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
