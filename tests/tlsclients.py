"""
TLS clients of the appliance's listeners, and what they see of its certificate.
"""

import http.client
import os
import socket
import ssl
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence
from urllib.parse import urlencode


class NotifySocket:
    """
    What systemd listens on: a bound AF_UNIX datagram socket, at C{path} or,
    without one, an abstract address (which any user may send to).
    """

    def __init__(self, path: Optional[Path] = None) -> None:
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        if path is None:
            name = f"pacs-appliance-test-{os.getpid()}-{id(self)}"
            self.socket.bind("\0" + name)
            self.address = "@" + name
        else:
            self.socket.bind(str(path))
            self.address = str(path)
        self.received: List[Dict[str, str]] = []

    def close(self) -> None:
        self.socket.close()

    def messages(self) -> List[Dict[str, str]]:
        """
        Every datagram received since the last call, each as a dict of its
        assignments.  An in-process sender sends synchronously, so nothing is
        still on its way.
        """
        self.socket.setblocking(False)
        while True:
            try:
                self._keep(self.socket.recv(65536))
            except BlockingIOError:
                break
        received, self.received = self.received, []
        return received

    def waitFor(self, key: str, timeout: float = 120.0) -> Dict[str, str]:
        """
        The first message (from now on or not yet read) that has C{key},
        waiting at most C{timeout} seconds; the messages before it are dropped.
        """
        deadline = time.monotonic() + timeout
        while True:
            for index, message in enumerate(self.received):
                if key in message:
                    del self.received[: index + 1]
                    return message
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {key}= notification within {timeout}s")
            self.socket.settimeout(remaining)
            try:
                self._keep(self.socket.recv(65536))
            except socket.timeout:
                pass

    def _keep(self, datagram: bytes) -> None:
        self.received.append(
            dict(line.split("=", 1) for line in datagram.decode("utf-8").split("\n") if line)
        )


def commonName(tls: ssl.SSLSocket) -> str:
    """
    The common name of the certificate the peer of C{tls} presented.
    """
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    certificate = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))
    return certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


def unverifiedContext() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def peerCertificateSubject(port: int) -> str:
    """
    The common name of the certificate a new TLS connection to C{port} sees.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with unverifiedContext().wrap_socket(raw) as tls:
            return commonName(tls)


def clientContext(
    minimum: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2,
    maximum: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3,
    ciphers: Optional[str] = None,
    curve: Optional[str] = None,
    alpn: Sequence[str] = (),
    cafile: Optional[Path] = None,
) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if cafile is None:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context.load_verify_locations(cafile=str(cafile))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.0/1.1 are, on purpose
        context.minimum_version = minimum
        context.maximum_version = maximum
    if ciphers is not None:
        context.set_ciphers(ciphers)
    if curve is not None:
        context.set_ecdh_curve(curve)
    if alpn:
        context.set_alpn_protocols(list(alpn))
    return context


def get(port: int, path: str, headers: Optional[dict] = None, context: Optional[ssl.SSLContext] = None):
    """
    One HTTPS request (blocking); returns (status, headers, body).
    """
    connection = http.client.HTTPSConnection(
        "127.0.0.1", port, context=context or clientContext(), timeout=30
    )
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.headers, response.read()
    finally:
        connection.close()


def logIn(port: int, name: str, password: str, context: Optional[ssl.SSLContext] = None) -> str:
    """
    Log in through the login form, as a browser does; returns the session
    cookie to send (C{NAME=VALUE}).
    """
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context or clientContext(), timeout=30)
    try:
        form = urlencode({"user": name, "password": password, "next": "/"})
        connection.request(
            "POST",
            "/login",
            body=form,
            headers={"Content-Type": "application/x-www-form-urlencoded", "Sec-Fetch-Site": "same-origin"},
        )
        response = connection.getresponse()
        response.read()
        if response.status != 303:
            raise AssertionError(f"the login was answered {response.status}")
        return response.headers["Set-Cookie"].split(";", 1)[0]
    finally:
        connection.close()
