"""
The site's own small HTML pages (log in, not allowed) and their style sheet,
kept as package data in C{appliance/web/assets/}.

The pages carry no script and no inline style, so they work under the
site's Content-Security-Policy; their one style sheet is served at
C{/login/login.css} (a public path: the page is shown before any login).
"""

import html
from importlib import resources
from string import Template

STYLESHEET_NAME = "login.css"


def asset(name: str) -> bytes:
    """
    The bytes of the packaged file C{name} (read once, at start: small
    files that ship with the program).
    """
    return resources.files("appliance.web").joinpath("assets", name).read_bytes()


class Page:
    """
    An HTML template whose C{$name} placeholders are filled with escaped text.
    """

    def __init__(self, name: str) -> None:
        self._template = Template(asset(name).decode("utf-8"))

    def render(self, **values: str) -> bytes:
        escaped = {name: html.escape(value, quote=True) for name, value in values.items()}
        return self._template.substitute(escaped).encode("utf-8")
