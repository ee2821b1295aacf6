"""
Property-based tests (hypothesis) of the three parsers hostile or careless
input reaches first:

  - the configuration (L{appliance.config.loadConfig}): any file text, and any
    value of any known key, gives a L{Config} or a L{ConfigError} whose
    problems are one line each, C{FILE: ...}, naming the file that set the key;
  - the A-ASSOCIATE-RQ check of the DICOM TLS forwarder (L{appliance.dicom.pdu}
    and L{appliance.dicom.admission}, and the connection that runs them):
    arbitrary bytes and mutated valid requests are decoded or refused with
    L{NotAnAssociationRequest}; nothing reaches Orthanc but an admitted request;
  - the path mapping of the proxy routes (L{appliance.web.routes}): a path
    under /pacs/ or /pacs-admin/ is refused with L{BadPath} or mapped to an
    Orthanc path that means the same thing to Orthanc, stays under the mount's
    prefix, has no dot segment and no NUL, and, on /pacs-admin, is none of
    the blocked routes of the admin route table unless they are allowed.

CI runs the C{ci} profile (200 examples a test, about ten seconds in all).
Longer runs, with the C{long} profile (20,000 examples a test)::

    HYPOTHESIS_PROFILE=long .venv/bin/python -m pytest -q tests/test_fuzz.py

or one part of it with C{-k Config}, C{-k Association} or C{-k Path}.
Hypothesis keeps failing examples in C{.hypothesis/} and replays them first.
"""

import dataclasses
import logging
import math
import re
import warnings
from contextlib import contextmanager
from ipaddress import ip_address
from pathlib import Path
from typing import List, Optional, Tuple
from urllib.parse import unquote_to_bytes

from hypothesis import assume, event, example, given
from hypothesis import strategies as st
from pynetdicom.pdu import A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, Verification
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from twisted.web.server import Request
from twisted.web.test.requesthelper import DummyChannel

import appliance.web
from appliance.config import MODALITY_SCHEMA, SCHEMA, Config, ConfigError, loadConfig
from appliance.dicom.admission import admit
from appliance.dicom.forwarder import ForwarderFactory
from appliance.dicom.pdu import (
    PDU_HEADER,
    AssociationRequest,
    NotAnAssociationRequest,
    Rejection,
    decodeAssociationRequest,
)
from appliance.orthanc.space import StorageSpace
from appliance.web.adminroutes import RouteTable
from appliance.web.cors import CorsPolicy
from appliance.web.routes import (
    ADMIN_METHODS,
    DICOMWEB_RESOURCES,
    STOW_METHODS,
    BadPath,
    PacsAdminResource,
    PacsResource,
    resolveTarget,
)
from appliance.web.sitemap import ADMIN, DICOMWEB
from tests.fuzzing import FUZZ
from tests.support import temporaryFolder, testConfig, writeTestConfig

# --- the configuration

SECTION_NAMES = sorted(SCHEMA) + ["modality:ct1", "modality:", "modality:bad name", "DEFAULT", " web", "WEB"]
KEY_NAMES = sorted({key for keys in SCHEMA.values() for key in keys} | set(MODALITY_SCHEMA))

#: Values that reach the corners of the value parsers: signs, units, huge and
#: non-ASCII digits, home folders that do not exist, IPv6, RFC 4514 escapes.
AWKWARD_VALUES = [
    "", " ", "0", "-1", "65535", "65536", "1e3", "0x10", "10K", "10 KiB", "5G", "1.5h", "500ms",
    "0.0s", "nan", "inf", "²", "١٢", "9" * 400, "1" + "0" * 400 + "s",
    "~", "~/x", "~root", "~nosuchuser/x", "/", ".", "..", "relative/path", "\0",
    "[::1]:443", "[127.0.0.1]:1", "::1:443", "0.0.0.0:0", "host.example:443", "[fe80::1%eth0]:1",
    "yes", "No", "ON", "2", "10.1.2.0/24", "10.1.2.3/33", "::/0",
    "CN=a,O=b", "CN=\\", "2.5.4.3=#0400", "CN=a+CN=b", "https://a.example", "https://a:99999",
    "%(x)s", "$x", "'quoted'", "\\", ";", "#", "a ; comment",
]


def values() -> st.SearchStrategy:
    return st.one_of(st.sampled_from(AWKWARD_VALUES), st.text(max_size=40))


def names(known: List[str]) -> st.SearchStrategy:
    return st.one_of(st.sampled_from(known), st.text(max_size=20))


#: INI-shaped text: section headers, assignments, continuation lines and
#: comments, with the known names mixed in so that the value parsers run.
iniLines = st.one_of(
    names(SECTION_NAMES).map(lambda name: f"[{name}]"),
    st.tuples(names(KEY_NAMES), st.sampled_from([" = ", "=", ":", " : ", " "]), values()).map("".join),
    st.text(max_size=30).map(lambda text: "  " + text),
    st.sampled_from(["", "; comment", "# comment", "[", "]", "=", "[]", "[web", "key"]),
    st.text(max_size=40),
)
iniText = st.one_of(st.lists(iniLines, max_size=30).map("\n".join), st.text())

#: Every known key, by section; modality keys under one [modality:NAME].
KNOWN_KEYS = [(section, key) for section, keys in SCHEMA.items() for key in keys] + [
    ("modality:fuzz", key) for key in MODALITY_SCHEMA
]


def couldBlock(text: str) -> bool:
    """
    Whether C{text} may name a device or kernel file: the configuration
    reads certificates whole, and /dev/zero never ends.
    """
    return re.search(r"/(dev|proc|sys|run)/", text) is not None


def typedValues(config: Config):
    """
    Every value of the loaded configuration's sections, with its name.
    """
    for section in (config.appliance, config.orthanc, config.tls, config.web, config.auth, config.dicom):
        for field in dataclasses.fields(section):
            yield f"{type(section).__name__}.{field.name}", getattr(section, field.name)


class ConfigFuzzTests(SynchronousTestCase):
    """
    L{loadConfig} on arbitrary files.
    """

    def setUp(self) -> None:
        self.folder = temporaryFolder(self)

    def assertProblemsAreLines(self, error: ConfigError, files: List[Path]) -> None:
        """
        Each problem is one line that starts with one of C{files} and ": ",
        and so is each line of the error's message.
        """
        self.assertTrue(error.problems, "a ConfigError without problems")
        prefixes = tuple(f"{each}: " for each in files)
        for problem in error.problems:
            self.assertIsInstance(problem, str)
            # Lines as terminals, journald and "grep" see them.
            self.assertNotRegex(problem, "[\n\r]", f"a problem of more than one line: {problem!r}")
            self.assertTrue(problem.startswith(prefixes), f"a problem that names no file: {problem!r}")
        for line in str(error).split("\n"):
            self.assertTrue(line.startswith(prefixes), f"a message line that names no file: {line!r}")

    def assertUsable(self, config: Config) -> None:
        """
        Every duration the configuration accepted is a number of seconds
        the reactor and the headers can use.
        """
        for name, value in typedValues(config):
            if isinstance(value, float):
                self.assertTrue(math.isfinite(value), f"{name} is {value}")

    @FUZZ
    @given(st.one_of(iniText, st.binary(max_size=200)))
    def test_arbitraryFile(self, content) -> None:
        """
        Any main file, text or not, gives a configuration or problems, each
        one line naming the file.
        """
        main = self.folder / "appliance.ini"
        if isinstance(content, bytes):
            assume(not couldBlock(content.decode("latin-1")))
            main.write_bytes(content)
        else:
            assume(not couldBlock(content))
            main.write_text(content, encoding="utf-8")
        try:
            config = loadConfig(main)
        except ConfigError as error:
            self.assertProblemsAreLines(error, [main])
        else:
            self.assertUsable(config)

    @FUZZ
    @given(st.lists(st.tuples(st.sampled_from(KNOWN_KEYS), values()), min_size=1, max_size=4))
    # Found by this test: a home folder that does not exist, a file name
    # longer than the file system allows, a duration too long for a float.
    @example([(("appliance", "state_dir"), "~nosuchuser/x")])
    @example([(("dicom", "client_ca"), "a" * 300)])
    @example([(("web", "hsts_max_age"), "1" + "0" * 400 + "s")])
    def test_arbitraryValues(self, assignments: List[Tuple[Tuple[str, str], str]]) -> None:
        """
        Any value of any known key, set in a conf.d file over a good main
        file, gives a configuration or problems; a problem about a key the
        conf.d file sets names that file.
        """
        assume(not any(couldBlock(value) for _, value in assignments))
        main = self.folder / "appliance.ini"
        extra = self.folder / "conf.d" / "50-fuzz.ini"
        if not main.exists():
            writeTestConfig(self.folder)
            loadConfig(main)  # the main file alone is good
            extra.parent.mkdir()
        sections: dict = {}
        for (section, key), value in assignments:
            # One line per key: a line break would make another key.
            sections.setdefault(section, {})[key] = " ".join(value.splitlines())
        extra.write_text(
            "".join(
                f"[{section}]\n" + "".join(f"{key} = {value}\n" for key, value in keys.items())
                for section, keys in sections.items()
            ),
            encoding="utf-8",
        )
        try:
            config = loadConfig(main)
        except ConfigError as error:
            self.assertProblemsAreLines(error, [main, extra])
            for problem in error.problems:
                for section, keys in sections.items():
                    for key in keys:
                        if problem.partition(": ")[2].startswith(f"[{section}] {key}: "):
                            self.assertTrue(
                                problem.startswith(f"{extra}: "),
                                f"a problem with a key set in {extra.name} names another file: {problem!r}",
                            )
        else:
            self.assertUsable(config)


# --- the A-ASSOCIATE-RQ check

ARCHIVE_AET = "PACS"
MODALITY_AET = "CT1"

#: AE titles pynetdicom encodes (the mutations make the others).
aeTitles = st.one_of(
    st.sampled_from([MODALITY_AET, ARCHIVE_AET, "ct1", "CT1 ", " CT1", "pacs", "FARAWAY", "X" * 16]),
    st.text(
        alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E, blacklist_characters="\\"),
        min_size=1,
        max_size=16,
    ).filter(str.strip),
)


@st.composite
def associateRequests(draw, calling: st.SearchStrategy = aeTitles, called: st.SearchStrategy = aeTitles) -> bytes:
    """
    A well-formed A-ASSOCIATE-RQ, encoded by pynetdicom.
    """
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = draw(calling)
    primitive.called_ae_title = draw(called)
    contexts = []
    for number, syntax in enumerate(
        draw(st.lists(st.sampled_from([Verification, CTImageStorage, MRImageStorage]), min_size=1, max_size=3))
    ):
        context = build_context(syntax)
        context.context_id = 2 * number + 1
        contexts.append(context)
    primitive.presentation_context_definition_list = contexts
    maximumLength = MaximumLengthNotification()
    maximumLength.maximum_length_received = draw(st.integers(0, 2**32 - 1))
    information = [maximumLength]
    if draw(st.booleans()):
        implementation = ImplementationClassUIDNotification()
        implementation.implementation_class_uid = "1.2.826.0.1.3680043.9.3811.3.0"
        information.append(implementation)
        version = ImplementationVersionNameNotification()
        version.implementation_version_name = draw(aeTitles)
        information.append(version)
    primitive.user_information = information
    request = A_ASSOCIATE_RQ()
    request.from_primitive(primitive)
    return request.encode()


#: Values that length fields (2 and 4 bytes, big endian) and other fields
#: break at.
BOUNDARIES = [0, 1, 2, 5, 6, 0x7F, 0x80, 0xFF, 0x100, 0x3FF, 0x400, 0xFFFF, 0x10000, 2**31 - 1, 2**31, 2**32 - 1]


@st.composite
def mutated(draw, base: st.SearchStrategy) -> bytes:
    """
    C{base}'s bytes with a few random edits: bytes replaced, inserted or
    deleted, a length-sized field overwritten with a boundary value, or the
    end cut off.
    """
    data = bytearray(draw(base))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["replace", "insert", "delete", "field", "truncate"]))
        where = draw(st.integers(0, len(data)))
        if kind == "replace" and data:
            where = min(where, len(data) - 1)
            data[where] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[where:where] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "delete":
            del data[where : where + draw(st.integers(1, 16))]
        elif kind == "field":
            size = draw(st.sampled_from([1, 2, 4]))
            value = draw(st.sampled_from(BOUNDARIES)) % (256**size)
            data[where : where + size] = value.to_bytes(size, "big")
        elif kind == "truncate":
            del data[where:]
    return bytes(data)


#: A PDU header of type 1 (A-ASSOCIATE-RQ) and anything after it.
rqShaped = st.tuples(st.sampled_from(BOUNDARIES), st.binary(max_size=300)).map(
    lambda parts: PDU_HEADER.pack(1, 0, parts[0] % 2**32) + parts[1]
)

#: Requests from the configured modality to the archive: the ones that pass.
admissibleRequests = associateRequests(st.just(MODALITY_AET), st.just(ARCHIVE_AET))

associationBytes = st.one_of(
    st.binary(max_size=300),
    rqShaped,
    associateRequests(),
    mutated(associateRequests()),
    admissibleRequests,
    mutated(admissibleRequests),
)


@contextmanager
def quietDicomLibraries():
    """
    Silence what pynetdicom logs (a traceback for every malformed PDU) and
    pydicom warns (every invalid UID): here both are the point.
    """
    loggers = [logging.getLogger(name) for name in ("pynetdicom", "pydicom")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def firstPDU(data: bytes) -> Optional[bytes]:
    """
    The first whole PDU of C{data}, header included, if it is all there.
    """
    if len(data) < PDU_HEADER.size:
        return None
    _, _, length = PDU_HEADER.unpack_from(data)
    end = PDU_HEADER.size + length
    return data[:end] if len(data) >= end else None


class AssociationFuzzTests(SynchronousTestCase):
    """
    The A-ASSOCIATE-RQ decoder, the admission rules, and the forwarder's
    connection that runs both on what a peer sends.
    """

    def setUp(self) -> None:
        self.config = testConfig(
            temporaryFolder(self),
            dicom={"max_first_pdu": "1K"},
            **{
                "modality:ct1": {"aet": MODALITY_AET, "host": "127.0.0.0/8"},
                "modality:faraway": {"aet": "FARAWAY", "host": "10.255.0.0/16"},
            },
        )

    def decodeOrRefuse(self, data: bytes) -> Optional[AssociationRequest]:
        """
        The request in C{data}, or None if the decoder refuses it with its own
        error: any other exception fails the test.
        """
        try:
            request = decodeAssociationRequest(data)
        except NotAnAssociationRequest as error:
            self.assertIsInstance(str(error), str)
            return None
        self.assertIsInstance(request.callingAET, str)
        self.assertIsInstance(request.calledAET, str)
        self.assertIsInstance(request.protocolVersion, int)
        return request

    def expectedModality(self, request: AssociationRequest, peer: str) -> Optional[str]:
        """
        The modality the admission rules of the configuration admit
        C{request} from C{peer} as, by their documented meaning.
        """
        address = ip_address(peer)
        if address.version == 6 and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if not request.protocolVersion & 1 or request.calledAET != ARCHIVE_AET:
            return None
        for modality in self.config.modalities:
            if modality.aet == request.callingAET:
                return modality.name if address.version == modality.host.version and address in modality.host else None
        return None

    @FUZZ
    @given(associationBytes, st.sampled_from(["127.0.0.1", "10.255.1.2", "192.0.2.1", "::1", "::ffff:127.0.0.1"]))
    def test_decodeAndAdmit(self, data: bytes, peer: str) -> None:
        """
        Decoding gives a request or L{NotAnAssociationRequest}; a decoded
        request is admitted as the modality the rules say, or refused with
        a rejection that encodes as an A-ASSOCIATE-RJ.
        """
        with quietDicomLibraries():
            request = self.decodeOrRefuse(data)
        event("decoded" if request is not None else "not an A-ASSOCIATE-RQ")
        if request is None:
            return
        address = ip_address(peer)
        if address.version == 6 and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        verdict = admit(self.config.modalities, ARCHIVE_AET, request, address, None)
        expected = self.expectedModality(request, peer)
        if isinstance(verdict, Rejection):
            self.assertIsNone(expected, f"{request} from {peer} refused: {verdict.why}")
            rejection = A_ASSOCIATE_RJ()
            rejection.decode(verdict.encode())
            self.assertEqual(
                (rejection.result, rejection.source, rejection.reason_diagnostic),
                (int(verdict.result), int(verdict.source), verdict.reason),
            )
        else:
            self.assertEqual(verdict.name, expected)

    @FUZZ
    @given(
        associationBytes,
        st.binary(max_size=64),
        st.lists(st.integers(1, 400), max_size=6),
        st.sampled_from(["127.0.0.1", "10.255.1.2", "::1", "::ffff:127.0.0.1"]),
        st.booleans(),
    )
    def test_forwarderConnection(self, data: bytes, after: bytes, cuts: List[int], peer: str, orthancAnswers: bool) -> None:
        """
        A peer's bytes, in any pieces, through the forwarder's connection
        (TLS already done): the connection raises nothing; it is refused
        (with nothing or one A-ASSOCIATE-RJ written), still waiting for the
        rest of the request, or relayed to Orthanc's DICOM port on the
        loopback interface, and only when the first PDU is a request the
        rules admit.  Orthanc then receives every byte the peer sent, in
        order.
        """
        reactor = MemoryReactorClock()
        factory = ForwarderFactory(self.config, reactor, StorageSpace.forOrthanc(self.config))
        Address = IPv6Address if ":" in peer else IPv4Address
        transport = StringTransport(
            hostAddress=Address("TCP", peer, self.config.dicom.listen.port),
            peerAddress=Address("TCP", peer, 50000),
        )
        connection = factory.buildProtocol(transport.getPeer())
        connection.makeConnection(transport)
        stream = data + after
        pieces, start = [], 0
        for cut in cuts:
            pieces.append(stream[start : start + cut])
            start += cut
        pieces.append(stream[start:])
        upstream = None
        with quietDicomLibraries():
            for piece in pieces:
                if piece:
                    connection.dataReceived(piece)
                if reactor.tcpClients and upstream is None and orthancAnswers:
                    host, port, connector, _, _ = reactor.tcpClients[0]
                    upstream = StringTransport()
                    connector.buildProtocol(IPv4Address("TCP", host, port)).makeConnection(upstream)
            pdu = firstPDU(stream)
            limit = self.config.dicom.max_first_pdu
            request = self.decodeOrRefuse(pdu) if pdu is not None and pdu[0] == 1 and len(pdu) <= limit else None
        admitted = request is not None and self.expectedModality(request, peer) is not None
        if reactor.tcpClients:
            event("relayed to Orthanc")
            self.assertTrue(admitted, f"relayed to Orthanc: {stream[:64]!r}")
            self.assertEqual(len(reactor.tcpClients), 1)
            host, port = reactor.tcpClients[0][:2]
            self.assertEqual((host, port), ("127.0.0.1", self.config.orthanc.dicom_port))
            self.assertEqual(transport.value(), b"", "answered the peer itself while relaying")
            if upstream is not None:
                self.assertEqual(upstream.value(), stream)
        elif transport.disconnecting:
            self.assertFalse(admitted, f"an admissible request was refused: {stream[:64]!r}")
            answer = transport.value()
            event("refused with an A-ASSOCIATE-RJ" if answer else "closed")
            if answer:
                self.assertEqual(answer[:1], b"\x03", f"not an A-ASSOCIATE-RJ: {answer!r}")
                rejection = A_ASSOCIATE_RJ()
                rejection.decode(answer)
                self.assertEqual(len(answer), 10)
        else:
            # Waiting for the rest: the first PDU is not all there, and may be.
            event("waiting for the rest")
            self.assertIsNone(pdu)
            if len(stream) >= PDU_HEADER.size:
                self.assertEqual(stream[0], 1)
                self.assertLessEqual(PDU_HEADER.size + PDU_HEADER.unpack_from(stream)[2], limit)
            self.assertEqual(transport.value(), b"")
        connection.connectionLost(Failure(ConnectionDone()))


# --- the path mapping of the proxy routes

#: Path pieces that spell separators, dots, escapes and Orthanc's dangerous
#: endpoints in the ways a parser may disagree on.
PATH_PIECES = [
    b"/", b"//", b".", b"..", b"%2e", b"%2E", b"%2e%2e", b".%2e", b"%2f", b"%2F", b"%5c", b"\\",
    b"%00", b"\x00", b"%", b"%%", b"%g0", b"%2", b";", b"#", b"?", b"&", b"=", b"+", b"%20",
    b"%252e", b"%25", b"%c0%ae", b"\xc0\xae", b"%ff", b"\xff",
    b"tools", b"shutdown", b"execute-script", b"reset", b"modalities", b"peers", b"servers",
    b"pacs", b"pacs-admin", b"TOOLS", b"ShutDown", b"%74ools", b"%73hutdown", b"studies", b"series",
    b"instances", b"wado", b"app", b"_method", b"%5fmethod", b"_METHOD", b"PUT", b"delete",
]

pathPieces = st.one_of(st.sampled_from(PATH_PIECES), st.binary(min_size=1, max_size=6))

#: What separates segments, or may look like it to some parser.
ODD_SEPARATORS = [b"//", b"/./", b"/%2e/", b"%2f", b"%2F", b"/x/../", b"/x/%2e%2e/", b"\\", b"%5c", b";/"]
separators = st.one_of(st.just(b"/"), st.sampled_from(ODD_SEPARATORS))

#: Segments: Orthanc's dangerous endpoints and their neighbours, DICOMweb.
SEGMENT_WORDS = [
    b"tools", b"shutdown", b"execute-script", b"reset", b"modalities", b"peers", b"pacs", b"servers",
    b"studies", b"series", b"instances", b"frames", b"wado", b"app", b"x", b"1.2.840.10008.1", b"..", b".",
]

UID = b"1.2.826.0.1.3680043.8.498.1"

def blockedRoutes() -> List[Tuple[bytes, List[Optional[bytes]], str]]:
    """
    The blocked rows of the admin route table, read here again on purpose
    (the oracle must not be the code it checks): (method, path segments with
    L{None} for a placeholder, reason).
    """
    rows = []
    for line in (Path(appliance.web.__file__).parent / "assets" / "orthanc-routes.tsv").read_text().splitlines():
        fields = line.split("\t")
        if line.startswith("#") or len(fields) < 4 or fields[2] != "block":
            continue
        path = fields[1].replace("{dicomweb}", "/pacs")
        segments = [None if word.startswith("{") else word.encode("ascii") for word in path.strip("/").split("/")]
        rows.append((fields[0].encode("ascii"), segments, fields[3]))
    return rows


BLOCKED_ROUTES = blockedRoutes()
ADMIN_ROUTES = RouteTable.load()

#: Where requests usually go: Orthanc's blocked endpoints on /pacs-admin,
#: DICOMweb resources on /pacs.
UNSAFE_PATHS = [[b"elsewhere" if word is None else word for word in segments] for _, segments, _ in BLOCKED_ROUTES]
DICOMWEB_PATHS = [
    [b"studies"],
    [b"studies", UID],
    [b"studies", UID, b"series", UID, b"instances", UID, b"frames", b"1"],
    [b"series"],
    [b"instances", UID],
    [b"wado"],
]


@st.composite
def spelled(draw, word: bytes) -> bytes:
    """
    C{word}, often with some letters upper-cased or characters percent-encoded.
    """
    if draw(st.booleans()):
        return word
    spelling = b""
    for byte in word:
        how = draw(st.sampled_from(["plain", "plain", "upper", "escaped"]))
        if how == "upper":
            spelling += bytes([byte]).upper()
        elif how == "escaped":
            spelling += b"%%%02X" % byte
        else:
            spelling += bytes([byte])
    return spelling


@st.composite
def endpointPaths(draw, endpoints: List[List[bytes]]) -> bytes:
    """
    A path after a mount made of known segments, often one of C{endpoints},
    spelled and separated in the ways that might slip by.
    """
    words = draw(st.one_of(st.sampled_from(endpoints), st.lists(st.sampled_from(SEGMENT_WORDS), max_size=5)))
    words = words + draw(st.lists(st.sampled_from(SEGMENT_WORDS), max_size=2))
    path = b""
    for word in words:
        path += draw(separators) + draw(spelled(word))
    return path + draw(st.sampled_from([b"", b"/"]))


pieceSoup = st.lists(pathPieces, max_size=12).map(b"".join)
paths = st.one_of(pieceSoup, endpointPaths(UNSAFE_PATHS + DICOMWEB_PATHS))

#: Query strings: none, well-formed, or anything.
QUERY_PIECES = [b"a=1", b"_method=DELETE", b"%5fmethod=PUT", b"_METHOD+=x", b"+_method", b"&", b"=", b"%00", b"%", b"x"]
queries = st.one_of(
    st.none(),
    st.none(),
    st.lists(st.sampled_from(QUERY_PIECES), max_size=4).map(b"&".join),
    st.lists(pathPieces, max_size=6).map(b"".join),
)

METHODS = list(ADMIN_METHODS) + [b"PATCH", b"TRACE"]


def orthancPath(path: bytes) -> List[bytes]:
    """
    The segments Orthanc's HTTP server (civetweb) makes of C{path}: decoded
    once, with empty and dot segments resolved (C{..} stops at the root).
    """
    segments: List[bytes] = []
    for part in unquote_to_bytes(path).split(b"/"):
        if part in (b"", b"."):
            continue
        if part == b"..":
            if segments:
                segments.pop()
            continue
        segments.append(part)
    return segments


def queryNames(query: bytes) -> List[bytes]:
    """
    The argument names of C{query}, decoded as Orthanc does and as form
    encoding would ('+' as space).
    """
    names = []
    for argument in query.split(b"&"):
        name = argument.partition(b"=")[0]
        names += [unquote_to_bytes(name), unquote_to_bytes(name.replace(b"+", b" "))]
    return names


def fakesMethod(query: bytes) -> bool:
    return any(name.strip().lower() == b"_method" for name in queryNames(query))


def unsafe(method: bytes, segments: List[bytes]) -> Optional[str]:
    """
    The reason of the blocked route Orthanc would run for C{method} on
    C{segments} (compared without case, and as a prefix: refusing more is
    safe); HEAD is GET to Orthanc.
    """
    method = b"GET" if method == b"HEAD" else method
    lowered = [segment.lower() for segment in segments]
    for blockedMethod, pattern, reason in BLOCKED_ROUTES:
        if method != blockedMethod:
            continue
        if len(lowered) >= len(pattern) and all(
            wanted is None or wanted == segment for wanted, segment in zip(pattern, lowered)
        ):
            return reason
    return None


def makeRequest(method: bytes, uri: bytes, override: bool = False) -> Request:
    """
    A request as twisted.web hands it to a resource: the path is what
    precedes the first '?'.
    """
    request = Request(DummyChannel())
    request.method = method
    request.uri = uri
    request.path = uri.split(b"?", 1)[0]
    request.requestHeaders = Headers()
    if override:
        request.requestHeaders.addRawHeader(b"X-HTTP-Method-Override", b"DELETE")
    return request


class RecordingProxy:
    """
    Stands in for L{appliance.web.proxy.OrthancProxy}: records what would be
    forwarded.
    """

    def __init__(self) -> None:
        self.forwarded: List[bytes] = []

    def forward(self, request, target: bytes, rewrite=None, stores=False, pagePolicy=None, stow=False) -> bytes:
        self.forwarded.append(target)
        return b""


class PathFuzzTests(SynchronousTestCase):
    """
    L{resolveTarget} and the two route resources on arbitrary paths.
    """

    def assertWellFormedUpstream(self, upstream: bytes) -> Tuple[List[bytes], bytes]:
        """
        C{upstream} is a request target Orthanc parses like we do: printable
        ASCII, valid escapes, an absolute path with no NUL and no dot
        segment.  Return what Orthanc makes of its path, and its query.
        """
        path, question, query = upstream.partition(b"?")
        self.assertRegex(path, rb"\A/([\x21-\x7e]*)\Z")
        self.assertFalse(path.startswith(b"//"), upstream)
        self.assertNotRegex(path, rb"%(?![0-9A-F]{2})")
        decoded = unquote_to_bytes(path)
        self.assertNotIn(b"\0", decoded)
        parts = decoded.split(b"/")[1:]
        self.assertFalse(set(parts[:-1]) & {b"", b".", b".."}, upstream)
        self.assertNotIn(parts[-1], (b".", b".."), upstream)
        return orthancPath(path), question + query

    @FUZZ
    @given(st.sampled_from([DICOMWEB, ADMIN]), paths, queries)
    def test_resolveTarget(self, mount: bytes, tail: bytes, query: Optional[bytes]) -> None:
        """
        A path under a mount is refused with L{BadPath} or mapped to an
        Orthanc path that means to Orthanc what the request's path means,
        under the mount's prefix, with the query passed on as sent; a path
        with nothing to object to is not refused.
        """
        uri = b"/" + mount + tail + (b"" if query is None else b"?" + query)
        request = makeRequest(b"GET", uri)
        meant = orthancPath(request.path)
        _, _, sentQuery = uri.partition(b"?")
        # Segments of letters, digits, "-_~" and inner dots (DICOM UIDs) mean
        # the same to every parser: they must pass.
        harmless = (
            re.search(rb"%(?![0-9A-Fa-f]{2})", request.path) is None
            and all(
                re.fullmatch(rb"[A-Za-z0-9_~-]+(\.[A-Za-z0-9_~-]+)*", part)
                for part in unquote_to_bytes(request.path).split(b"/")
                if part not in (b"", b".")
            )
            and meant[:1] == [mount]
            and re.fullmatch(rb"[\x21-\x7e]*", sentQuery) is not None
            and b"\0" not in unquote_to_bytes(sentQuery)
            and not fakesMethod(sentQuery)
        )
        try:
            target = resolveTarget(request, mount)
        except BadPath as error:
            event("refused")
            self.assertFalse(harmless, f"{uri!r} refused: {error}")
            return
        event("mapped")
        prefix = (DICOMWEB,) if mount == DICOMWEB else ()
        seen, passedQuery = self.assertWellFormedUpstream(target.upstream(*prefix))
        # Orthanc serves exactly what the policy checked...
        self.assertEqual(seen, list(prefix + target.segments))
        # ...which is what the path meant, under the mount.
        self.assertEqual([mount] + list(target.segments), meant)
        self.assertEqual(passedQuery, b"" if b"?" not in uri else b"?" + sentQuery)

    @FUZZ
    @given(st.sampled_from(METHODS), st.one_of(pieceSoup, endpointPaths(UNSAFE_PATHS), endpointPaths(UNSAFE_PATHS)), queries, st.booleans(), st.booleans())
    def test_adminRoute(self, method: bytes, tail: bytes, query: Optional[bytes], allowUnsafe: bool, override: bool) -> None:
        """
        /pacs-admin forwards no method override, and none of the blocked
        routes (as Orthanc will route the path) unless allowed.
        """
        uri = b"/" + ADMIN + tail + (b"" if query is None else b"?" + query)
        request = makeRequest(method, uri, override)
        proxy = RecordingProxy()
        PacsAdminResource(proxy, allowUnsafe, ADMIN_ROUTES).render(request)
        event(f"answered {request.code}" if not proxy.forwarded else "forwarded")
        if not proxy.forwarded:
            self.assertIn(request.code, (204, 301, 400, 403, 405), uri)
            return
        [upstream] = proxy.forwarded
        seen, passedQuery = self.assertWellFormedUpstream(upstream)
        self.assertIn(method, ADMIN_METHODS)
        self.assertFalse(override, "forwarded with X-HTTP-Method-Override")
        self.assertFalse(fakesMethod(passedQuery[1:]), f"forwarded with _method: {upstream!r}")
        if not allowUnsafe:
            what = unsafe(method, seen)
            self.assertIsNone(what, f"{method!r} {uri!r} forwarded as {upstream!r}, which {what}")

    @FUZZ
    @given(
        st.one_of(st.sampled_from(STOW_METHODS), st.sampled_from(METHODS)),
        st.one_of(pieceSoup, endpointPaths(DICOMWEB_PATHS + UNSAFE_PATHS[-1:]), endpointPaths(DICOMWEB_PATHS)),
        queries,
    )
    def test_pacsRoute(self, method: bytes, tail: bytes, query: Optional[bytes]) -> None:
        """
        /pacs forwards only to Orthanc's DICOMweb resources under /pacs/,
        reading them, or storing with POST to /studies[/UID].
        """
        uri = b"/" + DICOMWEB + tail + (b"" if query is None else b"?" + query)
        request = makeRequest(method, uri)
        proxy = RecordingProxy()
        PacsResource(proxy, CorsPolicy((), STOW_METHODS)).render(request)
        event(f"answered {request.code}" if not proxy.forwarded else "forwarded")
        if not proxy.forwarded:
            self.assertIn(request.code, (204, 400, 403, 404, 405), uri)
            return
        [upstream] = proxy.forwarded
        seen, passedQuery = self.assertWellFormedUpstream(upstream)
        self.assertEqual(seen[:1], [DICOMWEB])
        self.assertIn(seen[1:2], [[resource] for resource in DICOMWEB_RESOURCES])
        if method == b"POST":
            self.assertEqual(seen[1], b"studies")
            self.assertLessEqual(len(seen), 3)
        else:
            self.assertIn(method, (b"GET", b"HEAD"))
