"""
What an administrator may ask of Orthanc under /pacs-admin/: the table of
every route of Orthanc 1.10.1 and its DICOMweb plugin 1.7
(C{assets/orthanc-routes.tsv}), each allowed or blocked with its reason.

A request is decided on the path as Orthanc will read it (the segments of
L{appliance.web.routes.resolveTarget}) and its method (HEAD as GET): blocked
if a blocked route matches, allowed if an allowed one does, and refused as
unknown otherwise, so that a route the table does not know (one of a newer
Orthanc, WebDAV) is not passed on unexamined.  Orthanc's routes are
case-sensitive, and so is the match.
"""

import csv
import io
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from appliance.paths import DICOMWEB_ROOT, WADO_URI_ROOT
from appliance.web.pages import asset

#: The table, in the package's assets.
TABLE_NAME = "orthanc-routes.tsv"

#: A segment of a route's path: a literal, or one of these.
ANY_SEGMENT = object()
REST_OF_PATH = object()


@dataclass(frozen=True)
class Route:
    """
    One row of the table.

    @ivar pattern: the path's segments: literal bytes, L{ANY_SEGMENT}, or
        L{REST_OF_PATH} last.
    @ivar reason: why a blocked route is refused ("runs code"...); empty for
        an allowed one.
    """

    method: bytes
    path: str
    pattern: Tuple[object, ...]
    allowed: bool
    reason: str

    def matches(self, segments: Sequence[bytes]) -> bool:
        pattern = self.pattern
        if pattern and pattern[-1] is REST_OF_PATH:
            pattern = pattern[:-1]
            if len(segments) < len(pattern):
                return False
        elif len(segments) != len(pattern):
            return False
        return all(wanted is ANY_SEGMENT or wanted == segment for wanted, segment in zip(pattern, segments))


def _pattern(path: str) -> Tuple[object, ...]:
    path = path.replace("{dicomweb}", DICOMWEB_ROOT.rstrip("/")).replace("{wado}", WADO_URI_ROOT)
    pattern: List[object] = []
    for segment in path.strip("/").split("/"):
        if not segment:
            continue
        if segment == "{...}":
            pattern.append(REST_OF_PATH)
        elif segment.startswith("{") and segment.endswith("}"):
            pattern.append(ANY_SEGMENT)
        else:
            pattern.append(segment.encode("ascii"))
    return tuple(pattern)


class RouteTable:
    """
    The routes, indexed by method and first segment.
    """

    def __init__(self, routes: Sequence[Route]) -> None:
        self.routes = tuple(routes)
        self._index: Dict[Tuple[bytes, Optional[bytes]], List[Route]] = {}
        for route in self.routes:
            first = route.pattern[0] if route.pattern else None
            assert first is None or isinstance(first, bytes), f"{route.path} starts with a placeholder"
            self._index.setdefault((route.method, first), []).append(route)

    @classmethod
    def parse(cls, text: str) -> "RouteTable":
        """
        The table in C{text} (tab-separated: method, path, allow or block,
        reason, source; C{#} comments), with the DICOMweb plugin's routes
        under the root Orthanc is given (L{appliance.paths}).
        """
        lines = [line for line in text.splitlines() if line and not line.startswith("#")]
        routes = []
        for row in csv.DictReader(io.StringIO("\n".join(lines)), delimiter="\t", quoting=csv.QUOTE_NONE):
            if row["decision"] not in ("allow", "block"):
                raise ValueError(f"{row['method']} {row['path']}: decision {row['decision']!r}")
            routes.append(
                Route(
                    method=row["method"].encode("ascii"),
                    path=row["path"],
                    pattern=_pattern(row["path"]),
                    allowed=row["decision"] == "allow",
                    reason=row["reason"],
                )
            )
        return cls(routes)

    @classmethod
    def load(cls) -> "RouteTable":
        return cls.parse(asset(TABLE_NAME).decode("utf-8"))

    def decide(self, method: bytes, segments: Sequence[bytes]) -> Optional[Route]:
        """
        The route that decides C{method} on C{segments}: a blocked one if
        any matches, else an allowed one; L{None} if none does.
        """
        if method == b"HEAD":
            method = b"GET"
        first = segments[0] if segments else None
        allowed = None
        for route in self._index.get((method, first), ()):
            if route.matches(segments):
                if not route.allowed:
                    return route
                allowed = allowed or route
        return allowed
