"""
The HTTPS site's routes, in one table: the first segment of a path, the
resource that serves it, the role a request needs there by its method and
the rest of its path, and whether it may carry a body.  The root resource
(which route serves a request) and the access gate (who may reach it) are
both built from the table: a new route is one row.

    segment        resource                   role                               body
    healthz        /healthz                   public                             none
    login          the login page             public                             POST (the form)
    logout         the logout page            public                             POST (the form)
    favicon.ico    the viewer's file          public (GET, HEAD), else viewer    none
    manifest.json  the viewer's file          public (GET, HEAD), else viewer    none
    pacs           DICOMweb (the proxy)       OPTIONS public (CORS preflight),   STOW-RS: POST studies[/UID]
                                              GET, HEAD viewer, POST uploader,
                                              others admin
    pacs-admin     Orthanc Explorer and REST  admin                              POST, PUT
    metrics        Prometheus' scrape         scrape (admin, or [metrics]         none
                                              scrape_users)
    (any other)    the viewer                 viewer                             none
"""

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence

from twisted.web.resource import Resource
from twisted.web.server import Request

from appliance.paths import ADMIN_MOUNT, DICOMWEB_MOUNT

#: The role a request needs, given its method and the segments of its path
#: after the route's: a name of L{appliance.web.accounts.ROLES}, or L{None}
#: for a public one.
RolePolicy = Callable[[bytes, Sequence[bytes]], Optional[str]]

#: Whether a request, given its method and the rest of its path, may carry
#: a body: no other body is ever read.
BodyPolicy = Callable[[bytes, Sequence[bytes]], bool]

DICOMWEB = DICOMWEB_MOUNT.encode("ascii")
ADMIN = ADMIN_MOUNT.encode("ascii")
HEALTHZ = b"healthz"
LOGIN = b"login"
LOGIN_PATH = b"/" + LOGIN
LOGOUT = b"logout"
METRICS = b"metrics"

#: The pseudo-role of /metrics: an administrator, or an account named in
#: [metrics] scrape_users (the gate decides which).
SCRAPE = "scrape"

#: Files of the viewer's build that browsers fetch without credentials (a
#: web app manifest is fetched without cookies unless its link says
#: otherwise), or for the login page too; none holds patient data.
PUBLIC_VIEWER_FILES = (b"favicon.ico", b"manifest.json")

#: The methods that change nothing (RFC 9110 9.2.1).
SAFE_METHODS = (b"GET", b"HEAD", b"OPTIONS")


def public(method: bytes, rest: Sequence[bytes]) -> Optional[str]:
    return None


def needs(role: str) -> RolePolicy:
    """
    The policy of a route that needs C{role} whatever the request.
    """
    return lambda method, rest: role


def publicFile(method: bytes, rest: Sequence[bytes]) -> Optional[str]:
    # A public file's name opens nothing that follows it.
    return None if method in (b"GET", b"HEAD") and not rest else "viewer"


def dicomwebRole(method: bytes, rest: Sequence[bytes]) -> Optional[str]:
    if method == b"OPTIONS":
        # CORS preflights carry no credentials; the proxy answers them.
        return None
    if method in (b"GET", b"HEAD"):
        return "viewer"
    if method == b"POST":
        return "uploader"
    return "admin"


def noBody(method: bytes, rest: Sequence[bytes]) -> bool:
    return False


def forms(method: bytes, rest: Sequence[bytes]) -> bool:
    return method == b"POST"


def writes(method: bytes, rest: Sequence[bytes]) -> bool:
    return method in (b"POST", b"PUT")


def stow(method: bytes, rest: Sequence[bytes]) -> bool:
    segments = list(rest)
    while segments and segments[-1] == b"":
        segments.pop()
    return method == b"POST" and segments[:1] == [b"studies"] and len(segments) <= 2


@dataclass(frozen=True)
class Route:
    """
    One row of the table.

    @ivar segment: the first segment of the paths it serves; L{None} for
        the route of every path no other route takes.
    @ivar wholePath: whether its resource reads the whole path, the
        segment included (the viewer's files), or what follows it.
    @ivar loginPage: whether a browser loading a page here without an
        account is sent to the login page (else it gets 401, as an API
        client does).
    """

    segment: Optional[bytes]
    resource: Resource
    role: RolePolicy
    takesBody: BodyPolicy = noBody
    wholePath: bool = False
    loginPage: bool = True


class SiteMap:
    """
    The table: the route of each first segment.
    """

    def __init__(self, routes: Sequence[Route]) -> None:
        self._routes: Dict[Optional[bytes], Route] = {}
        for route in routes:
            assert route.segment not in self._routes, f"two routes for {route.segment!r}"
            self._routes[route.segment] = route
        assert None in self._routes, "no route for the paths no other route takes"

    def route(self, segment: bytes) -> Route:
        return self._routes.get(segment, self._routes[None])

    def root(self) -> Resource:
        """
        The resource at the site's root, handing each request to its route.
        """
        return SiteRoot(self)


class SiteRoot(Resource):
    """
    The root of a site: the resource of each request's route.
    """

    def __init__(self, siteMap: SiteMap) -> None:
        super().__init__()
        self._map = siteMap

    def getChild(self, name: bytes, request: Request) -> Resource:
        route = self._map.route(name)
        if route.wholePath:
            request.postpath.insert(0, request.prepath.pop())
        return route.resource


def viewerRoutes(health: Resource, viewer: Resource) -> list:
    """
    The routes of every site of the appliance: /healthz, and the viewer
    (its public files included) for every path no other route takes.
    """
    return [
        Route(HEALTHZ, health, public),
        *(Route(name, viewer, publicFile, wholePath=True) for name in PUBLIC_VIEWER_FILES),
        Route(None, viewer, needs("viewer"), wholePath=True),
    ]


def archiveRoutes(login: Resource, logout: Resource, dicomweb: Resource, admin: Resource, metrics: Resource) -> list:
    """
    The routes of the daemon's site besides L{viewerRoutes}: logging in and
    out, DICOMweb, Orthanc's own interface, and the metrics.
    """
    return [
        Route(LOGIN, login, public, forms),
        Route(LOGOUT, logout, public, forms),
        Route(DICOMWEB, dicomweb, dicomwebRole, stow, loginPage=False),
        Route(ADMIN, admin, needs("admin"), writes),
        Route(METRICS, metrics, needs(SCRAPE), loginPage=False),
    ]
