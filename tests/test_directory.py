"""
Logins with the hospital's directory ([ldap]), against a real OpenLDAP
(tests/slapd.py): the directory's own checks (L{Directory}, called as its
threads call it), then the daemon's login form and HTTP Basic for directory
users, with the directory stopped and started under it.
"""

import base64
import re
from pathlib import Path
from typing import Dict, Optional

import pytest

from twisted.internet.defer import inlineCallbacks, maybeDeferred
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from appliance.web.checkers import AccountDisabled, NoRole, UnknownUser, WrongPassword
from appliance.web.accounts import LDAP, Account
from appliance.secretfiles import readSecret
from appliance.web.directory import Directory, DirectoryService, DirectoryUnavailable
from tests.daemon import DaemonClient, addUser, startDaemon
from tests.slapd import ADMINS, RADIOLOGY, VIEWERS, requireSlapd
from tests.support import TestAuthority, captureLogs, freePort, logText, temporaryFolder, testConfig


def basic(name: str, password: str) -> Dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{name}:{password}".encode()).decode()}


class DirectoryTests(SynchronousTestCase):
    """
    L{Directory} against the test directory: roles from groups, nested ones
    included, and every refusal with its reason.
    """

    def setUp(self) -> None:
        self.server = requireSlapd(self.skipTest)
        self.folder = temporaryFolder(self)

    def directory(self, **overrides: object) -> Directory:
        config = testConfig(self.folder, ldap=self.server.section(**overrides))
        return Directory(config.ldap, readSecret(config.ldap.bind_password_file))

    def authenticate(self, name: str, directory: Optional[Directory] = None):
        return (directory or self.directory()).authenticate(name, self.server.passwords[name])

    def test_rolesFromGroups(self) -> None:
        """
        Each user gets the role of the groups they are in; nested1 is a
        viewer only through Radiology, a member of PACS-Viewers.
        """
        directory = self.directory()
        self.assertEqual(
            {name: self.authenticate(name, directory) for name in ("viewer1", "uploader1", "admin1", "nested1")},
            {
                "viewer1": {"viewer"},
                "uploader1": {"uploader"},
                "admin1": {"admin"},
                "nested1": {"viewer"},
            },
        )

    def test_startTLS(self) -> None:
        """
        An ldap:// URL is StartTLS: the same users, over the plain port
        encrypted before the bind.
        """
        self.assertEqual(self.authenticate("viewer1", self.directory(url=self.server.startTLSURL)), {"viewer"})

    def test_refusals(self) -> None:
        """
        A wrong password, an unknown user, an empty password (an anonymous
        bind would succeed), a disabled account and a user in no mapped
        group are each refused with their own reason.
        """
        directory = self.directory()
        with self.assertRaises(WrongPassword):
            directory.authenticate("viewer1", "not the password")
        with self.assertRaises(WrongPassword):
            directory.authenticate("viewer1", "")
        # Control characters (a mangled Basic header) are the client's
        # mistake, not the directory's failure.
        with self.assertRaises(WrongPassword):
            directory.authenticate("viewer1", "pass\x00word")
        with self.assertRaises(UnknownUser):
            directory.authenticate("nobody-here", "whatever")
        with self.assertRaises(AccountDisabled):
            self.authenticate("disabled1", directory)
        with self.assertRaises(NoRole):
            self.authenticate("nogroup1", directory)

    def test_theBindAccountIsNoLogin(self) -> None:
        """
        The account the appliance searches with cannot log in, even where
        the filter finds it, and a guess at its password is a failed login
        (counted by the throttle), not a directory that cannot be reached.
        """
        from tests.slapd import SUFFIX

        directory = self.directory(user_base=SUFFIX, user_filter="(cn={user})")
        password = self.server.bindPasswordFile.read_text().strip()
        for guess in (password, "a guess"):
            with self.assertRaises(UnknownUser):
                directory.authenticate("pacs-reader", guess)

    def test_filterInjection(self) -> None:
        """
        A name is a value in the filter, never filter syntax: a wildcard or
        a closing parenthesis matches nobody.
        """
        directory = self.directory()
        for name in ("*", "viewer*", "viewer1)(uid=*", "*)(|(uid=*"):
            with self.assertRaises(UnknownUser):
                directory.authenticate(name, self.server.passwords["viewer1"])

    def test_serversTriedInOrder(self) -> None:
        """
        A server that does not answer is skipped for the next one; the
        probe names it.
        """
        dead = f"ldaps://localhost:{freePort()}"
        directory = self.directory(url=f"{dead} {self.server.ldapsURL}")
        self.assertEqual(self.authenticate("viewer1", directory), {"viewer"})
        problems = directory.probe()
        self.assertEqual(len(problems), 1)
        self.assertTrue(problems[0].startswith(dead + ": "), problems)

    def test_untrustedCertificate(self) -> None:
        """
        A server whose certificate another authority signed is not used: no
        password goes to it.
        """
        other = TestAuthority(self.folder / "other")
        with self.assertRaises(DirectoryUnavailable) as raised:
            self.authenticate("viewer1", self.directory(ca_file=other.path))
        self.assertIn("certificate verify failed", str(raised.exception))

    def test_wrongBindPassword(self) -> None:
        """
        A bind account the directory refuses makes the directory unusable,
        and the problem names the keys to check.
        """
        wrong = self.folder / "wrong-password"
        wrong.write_text("not it\n")
        with self.assertRaises(DirectoryUnavailable) as raised:
            self.authenticate("viewer1", self.directory(bind_password_file=wrong))
        self.assertIn("check bind_dn and bind_password_file", str(raised.exception))

    def test_currentRoles(self) -> None:
        """
        A user's roles as they are now, without their password: changed by
        the groups they are in, and none for a disabled or unknown user.
        """
        directory = self.directory()
        self.assertEqual(directory.currentRoles("mover1"), {"viewer"})
        self.server.addMember(ADMINS, self.server.userDN("mover1"))
        self.addCleanup(self.server.removeMember, ADMINS, self.server.userDN("mover1"))
        self.assertEqual(directory.currentRoles("mover1"), {"viewer", "admin"})
        self.server.removeMember(VIEWERS, RADIOLOGY)
        self.addCleanup(self.server.addMember, VIEWERS, RADIOLOGY)
        self.assertEqual(directory.currentRoles("nested1"), frozenset())
        self.assertIsNone(directory.currentRoles("disabled1"))
        self.assertIsNone(directory.currentRoles("nobody-here"))

    def test_directoryStopped(self) -> None:
        """
        With every server stopped, a check fails as unavailable (not as a
        wrong password), and works again once one is back.
        """
        directory = self.directory()
        self.server.stop()
        self.addCleanup(self.server.start)
        with self.assertRaises(DirectoryUnavailable):
            self.authenticate("viewer1", directory)
        self.server.start()
        self.assertEqual(self.authenticate("viewer1", directory), {"viewer"})


class DirectoryServiceTests(SynchronousTestCase):
    """
    L{DirectoryService}'s checks of sessions against the test directory, on
    a clock of the test's, its calls made at once (they block).
    """

    def setUp(self) -> None:
        self.server = requireSlapd(self.skipTest)
        self.clock = Clock()
        self.events = captureLogs(self)
        config = testConfig(temporaryFolder(self), ldap=self.server.section(recheck_interval="1m"))
        directory = Directory(config.ldap, readSecret(config.ldap.bind_password_file))
        self.service = DirectoryService(directory, config.ldap.recheck_interval, self.clock, runInThread=maybeDeferred)

    def sessionAccount(self, name: str, lastRoles=frozenset({"viewer"})):
        return self.successResultOf(self.service.sessionAccount(name, lastRoles))

    def test_sessionsCheckedAgainAfterTheInterval(self) -> None:
        """
        A session's account is looked up once, remembered for
        recheck_interval, then looked up again: gone from its group, it
        has no account.
        """
        self.assertEqual(self.sessionAccount("mover1"), Account("mover1", frozenset({"viewer"}), LDAP))
        self.server.removeMember(VIEWERS, self.server.userDN("mover1"))
        self.addCleanup(self.server.addMember, VIEWERS, self.server.userDN("mover1"))
        self.assertIsNotNone(self.sessionAccount("mover1"), "remembered")
        self.clock.advance(60)
        self.assertIsNone(self.sessionAccount("mover1"))
        self.assertIsNone(self.sessionAccount("disabled1"))

    def test_sessionsLiveThroughAnOutage(self) -> None:
        """
        While the directory cannot be reached, a session keeps the roles it
        had (its owner is not logged out by the directory's outage), the
        journal says so once, and once again when it answers.
        """
        self.server.stop()
        self.addCleanup(self.server.start)
        for attempt in range(3):
            self.assertEqual(
                self.sessionAccount("viewer1", frozenset({"uploader"})), Account("viewer1", frozenset({"uploader"}), LDAP)
            )
            self.clock.advance(60)
        self.assertEqual(len(self.logged("The directory cannot be reached")), 1, logText(self.events))
        self.server.start()
        self.assertEqual(self.sessionAccount("viewer1", frozenset({"uploader"})).roles, {"viewer"})
        self.assertEqual(len(self.logged("The directory answers again")), 1)

    def logged(self, text: str) -> list:
        return [event for event in self.events if text in event.get("log_format", "")]


class DirectoryLoginTests(DaemonClient, TestCase):
    """
    The daemon with [ldap]: directory users log in with the login form and
    HTTP Basic, each with the role their groups give, beside the
    appliance's own administrator.
    """

    def setUp(self) -> None:
        self.server = requireSlapd(self.skipTest)
        folder = temporaryFolder(self)
        users = folder / "users"
        addUser(users, "keeper", "break glass 1234", ["admin"])
        self.config = testConfig(
            folder, auth={"users_file": users}, ldap=self.server.section(recheck_interval="1s")
        )

    @inlineCallbacks
    def start(self):
        self.output, _ = yield startDaemon(self, self.config)
        self.trustDaemon()

    def status(self, path: str, headers: Dict[str, str]) -> int:
        return self.request("GET", path, headers)[0]

    def logIn(self, name: str, password: str):
        """
        The login form's answer: (status, session cookie or None, body).
        """
        import http.client
        from urllib.parse import urlencode

        connection = http.client.HTTPSConnection("127.0.0.1", self.config.web.listen_https.port, context=self.context, timeout=30)
        try:
            connection.request(
                "POST",
                "/login",
                body=urlencode({"user": name, "password": password, "next": "/"}),
                headers={"Content-Type": "application/x-www-form-urlencoded", "Sec-Fetch-Site": "same-origin"},
            )
            response = connection.getresponse()
            body = response.read()
            cookie = response.headers.get("Set-Cookie")
            return response.status, cookie.split(";", 1)[0] if cookie else None, body
        finally:
            connection.close()

    @inlineCallbacks
    def test_rolesFromTheDirectory(self):
        """
        Through HTTP Basic and the login form alike, each directory user
        gets the role of their groups (nested ones too); a user in no
        group, a wrong password and a disabled account are refused; the
        access log names the account with its source.
        """
        yield self.start()
        passwords = self.server.passwords
        expected = {
            # user: (DICOMweb read, Orthanc Explorer)
            "viewer1": (200, 403),
            "nested1": (200, 403),
            "uploader1": (200, 403),
            "admin1": (200, 200),
        }
        for name, (read, admin) in expected.items():
            got = yield deferToThread(
                lambda: (self.status("/pacs/studies", basic(name, passwords[name])), self.status("/pacs-admin/system", basic(name, passwords[name])))
            )
            self.assertEqual(got, (read, admin), name)
        # STOW-RS needs the uploader role: the gate refuses a viewer before
        # Orthanc sees anything.
        stow = {"Content-Type": 'multipart/related; type="application/dicom"; boundary=x'}
        status, _ = yield deferToThread(self.request, "POST", "/pacs/studies", {**stow, **basic("viewer1", passwords["viewer1"])}, b"--x--")
        self.assertEqual(status, 403)
        status, _ = yield deferToThread(self.request, "POST", "/pacs/studies", {**stow, **basic("uploader1", passwords["uploader1"])}, b"--x--")
        self.assertNotIn(status, (401, 403))

        for name, password in (("nogroup1", passwords["nogroup1"]), ("viewer1", "wrong"), ("disabled1", passwords["disabled1"])):
            status = yield deferToThread(self.status, "/pacs/studies", basic(name, password))
            self.assertEqual(status, 401, name)

        # The login form: a session with the same role as Basic gave.
        for name, (read, admin) in expected.items():
            status, cookie, _ = yield deferToThread(self.logIn, name, passwords[name])
            self.assertEqual(status, 303, name)
            got = yield deferToThread(
                lambda: (self.status("/pacs/studies", {"Cookie": cookie}), self.status("/pacs-admin/system", {"Cookie": cookie}))
            )
            self.assertEqual(got, (read, admin), name)
        yield self.output.waitFor("ldap:viewer1 logged in")
        yield self.output.waitFor('ldap:viewer1 [')

        # The password is right, so its owner is told why there is no way in.
        status, cookie, body = yield deferToThread(self.logIn, "nogroup1", passwords["nogroup1"])
        self.assertEqual((status, cookie), (403, None))
        self.assertIn(b"has no access to this appliance", body)
        status, _, body = yield deferToThread(self.logIn, "disabled1", passwords["disabled1"])
        self.assertEqual(status, 401)
        self.assertTrue(self.linesSince(0, "the account is disabled"))

    @inlineCallbacks
    def test_accessEndsWithTheGroup(self):
        """
        A user taken out of their group loses access within
        recheck_interval: their remembered Basic credentials and their
        session alike.
        """
        yield self.start()
        mover = basic("mover1", self.server.passwords["mover1"])
        status, cookie, _ = yield deferToThread(self.logIn, "mover1", self.server.passwords["mover1"])
        self.assertEqual(status, 303)
        for headers in (mover, {"Cookie": cookie}):
            status = yield deferToThread(self.status, "/pacs/studies", headers)
            self.assertEqual(status, 200)
        self.server.removeMember(VIEWERS, self.server.userDN("mover1"))
        self.addCleanup(self.server.addMember, VIEWERS, self.server.userDN("mover1"))
        yield self.poll(lambda: self.status("/pacs/studies", mover) == 401, "mover1's Basic credentials refused")
        yield self.poll(lambda: self.status("/pacs/studies", {"Cookie": cookie}) == 401, "mover1's session ended")
        yield self.output.waitFor("The directory user {user} is gone".replace("{user}", "mover1"))

    @inlineCallbacks
    def test_directoryDown(self):
        """
        While the directory is stopped, the appliance's own administrator
        still gets in; directory users get 503 with Retry-After (their
        password may well be right: a 401 would have them retype it until
        the throttle locks them out); the journal says so once, and again
        when the directory answers.
        """
        yield self.start()
        viewer = basic("viewer1", self.server.passwords["viewer1"])
        self.server.stop()
        self.addCleanup(self.server.start)
        for attempt in range(3):
            status, body = yield deferToThread(self.request, "GET", "/pacs/studies", viewer)
            self.assertEqual(status, 503)
            self.assertIn(b"hospital directory cannot be reached", body)
        status, _, body = yield deferToThread(self.logIn, "viewer1", self.server.passwords["viewer1"])
        self.assertEqual(status, 503)
        self.assertIn(b"directory cannot be reached", body)
        status = yield deferToThread(self.status, "/pacs/studies", basic("keeper", "break glass 1234"))
        self.assertEqual(status, 200)
        status, cookie, _ = yield deferToThread(self.logIn, "keeper", "break glass 1234")
        self.assertEqual(status, 303)
        self.assertEqual(len(self.linesSince(0, "The directory cannot be reached")), 1)

        self.server.start()
        status = yield deferToThread(self.status, "/pacs/studies", viewer)
        self.assertEqual(status, 200)
        yield self.output.waitFor("The directory answers again")


def test_noDirectoryNoLdapLogins(tmp_path: Path) -> None:
    """
    Without [ldap] url, the section's other keys are not required, and
    with it they are: check-config names each.
    """
    from appliance.config import ConfigError

    try:
        testConfig(tmp_path, ldap={"url": "ldaps://dc1.hospital.example"})
    except ConfigError as error:
        problems = "\n".join(error.problems)
    else:
        raise AssertionError("an [ldap] url alone was accepted")
    for key in ("bind_dn", "bind_password_file", "user_base", "viewer_groups"):
        assert re.search(rf"\[ldap\] {key}: ", problems), (key, problems)
    testConfig(tmp_path, ldap={"user_base": "OU=Staff,DC=hospital,DC=example"})


def test_checkConfigWarnsOfAnUnreachableServer(tmp_path: Path) -> None:
    """
    check-config accepts a directory it cannot reach (it may be down while
    the box boots) but says which server it could not use, and why.
    """
    import subprocess

    from tests.commandline import COMMAND
    from tests.support import writeTestConfig

    server = requireSlapd(pytest.skip)
    dead = f"ldaps://localhost:{freePort()}"
    path = writeTestConfig(tmp_path, ldap=server.section(url=f"{dead} {server.ldapsURL}"))
    result = subprocess.run([COMMAND, "check-config", "--config", str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    warnings = result.stderr.splitlines()
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"warning: {path}: [ldap] url: {dead}: "), warnings
