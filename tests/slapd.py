"""
A private OpenLDAP server for the tests of the LDAP logins: Debian's (package
slapd), in a temporary folder, on two free ports of 127.0.0.1 (LDAPS, and
plain LDAP for StartTLS), with TLS from a test authority.  It holds what the
appliance meets in a hospital's Active Directory: staff, the groups that
grant the appliance's roles (one of them through a nested group), a service
account to search with, and an account an administrator disabled.  One
server serves the whole test run (started at its first use, removed when the
run ends); a test that changes the directory (L{DirectoryServer.addMember},
L{DirectoryServer.lock}...) puts it back with C{addCleanup}.

The package's own instance (/etc/ldap/slapd.d, started by its init script)
is neither used nor needed: the server reads a configuration file of its own
(slapd -f) and runs as whoever runs the tests, root in CI.

OpenLDAP's client library (ldap-utils, python-ldap) checks a server's
certificate for "localhost" against this machine's host name instead, and so
refuses the URLs here; a test that runs its tools reaches the server at
127.0.0.1, which the certificate names too.  Python's ssl (ldap3, Twisted)
checks "localhost" as written.
"""

import base64
import hashlib
import secrets
import shutil
import subprocess
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Dict, Optional

from tests.support import SharedServer, TestAuthority, freePort

#: How long the server may take to accept connections after it starts.
START_TIMEOUT = 30.0

SLAPD = Path("/usr/sbin/slapd")
SLAPADD = Path("/usr/sbin/slapadd")
#: Where Debian puts slapd's modules: the mdb backend and ppolicy are not
#: built in.
MODULES = Path("/usr/lib/ldap")
SCHEMAS = Path("/etc/ldap/schema")

SUFFIX = "DC=hospital,DC=example"
STAFF = f"OU=Staff,{SUFFIX}"
GROUPS = f"OU=Groups,{SUFFIX}"
SERVICE = f"OU=Service,{SUFFIX}"
POLICIES = f"OU=Policies,{SUFFIX}"

VIEWERS = f"CN=PACS-Viewers,{GROUPS}"
UPLOADERS = f"CN=PACS-Uploaders,{GROUPS}"
ADMINS = f"CN=PACS-Admins,{GROUPS}"
#: A member of VIEWERS: its members are viewers only through the nesting.
RADIOLOGY = f"CN=Radiology,{GROUPS}"
OTHER = f"CN=Other,{GROUPS}"

BIND_DN = f"CN=pacs-reader,{SERVICE}"
#: The administrator, who bypasses the access rules; only the fixture binds
#: as it.
ROOT_DN = f"CN=admin,{SUFFIX}"
DEFAULT_POLICY = f"CN=Default,{POLICIES}"

#: The accounts under OU=Staff.
USERS = ("viewer1", "uploader1", "admin1", "nested1", "nogroup1", "disabled1", "mover1")

#: What pwdAccountLockedTime holds for an account an administrator locked,
#: as opposed to one locked for a while after failed binds.
LOCKED_FOR_GOOD = "000001010000Z"

USER_FILTER = "(&(objectClass=inetOrgPerson)(uid={user}))"


def userDN(name: str) -> str:
    """
    The DN of the account C{name} under OU=Staff.
    """
    return f"UID={name},{STAFF}"


#: Each group's members; a groupOfNames needs at least one, so OTHER, which
#: none of the users is in, holds the service account.
MEMBERS = {
    VIEWERS: (userDN("viewer1"), userDN("disabled1"), userDN("mover1"), RADIOLOGY),
    UPLOADERS: (userDN("uploader1"),),
    ADMINS: (userDN("admin1"),),
    RADIOLOGY: (userDN("nested1"),),
    OTHER: (BIND_DN,),
}


def installed() -> bool:
    return SLAPD.exists() and SLAPADD.exists() and all(shutil.which(tool) for tool in ("ldapmodify", "ldapwhoami"))


def requireSlapd(skip) -> "DirectoryServer":
    """
    The shared server, started if need be; calls C{skip} (a test case's
    C{skipTest}, or C{pytest.skip}) with the reason where OpenLDAP's server
    or its clients are not installed (CI installs them:
    packaging/apt-packages-test.txt).
    """
    if not installed():
        skip("Debian's slapd and ldap-utils packages are not installed")
    return DirectoryServer.shared()


def hashed(password: str) -> str:
    """
    C{password} as a userPassword value, salted and hashed as slappasswd
    does: a directory keeps no password in clear, and slapd checks this form
    without help.
    """
    salt = secrets.token_bytes(8)
    digest = hashlib.sha1(password.encode("utf-8") + salt).digest()
    return "{SSHA}" + base64.b64encode(digest + salt).decode("ascii")


class DirectoryServer(SharedServer):
    """
    The server, and what a test needs to reach it: C{ldapsURL} and
    C{startTLSURL} (whose port also takes binds in clear: insisting on TLS is
    the appliance's part), C{caFile}, the service account's C{bindDN} and
    C{bindPasswordFile}, C{userBase}, and each user's password in
    C{passwords}.
    """

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="pacs-appliance-slapd-"))
        self.data = self.folder / "data"
        self.data.mkdir()
        self.log = self.folder / "slapd.log"
        self.ldapsPort = freePort()
        self.startTLSPort = freePort()
        while self.startTLSPort == self.ldapsPort:
            self.startTLSPort = freePort()
        self.ldapsURL = f"ldaps://localhost:{self.ldapsPort}"
        self.startTLSURL = f"ldap://localhost:{self.startTLSPort}"
        # The administration's own way in, which no test's TLS settings
        # can get in the way of.
        socket = self.folder / "ldapi"
        self.ldapiURL = "ldapi://" + urllib.parse.quote(str(socket), safe="")
        self.authority = TestAuthority(self.folder / "tls")
        self.caFile = self.authority.path
        certificate, key = self.authority.issue("ldap", "localhost", server=True)
        key.chmod(0o600)

        self.bindDN = BIND_DN
        self.userBase = STAFF
        self.passwords: Dict[str, str] = {name: secrets.token_urlsafe(18) for name in USERS}
        self.bindPassword = secrets.token_urlsafe(18)
        self.bindPasswordFile = self.folder / "bind-password"
        # With a newline, as an operator's editor or echo leaves it.
        self._secret(self.bindPasswordFile, self.bindPassword + "\n")
        rootPassword = secrets.token_urlsafe(18)
        # ldapmodify -y takes the whole file as the password: no newline.
        self._rootPasswordFile = self.folder / "root-password"
        self._secret(self._rootPasswordFile, rootPassword)

        self.config = self.folder / "slapd.conf"
        self._secret(self.config, self._configuration(certificate, key, hashed(rootPassword)))
        entries = self.folder / "directory.ldif"
        entries.write_text(self._entries())
        self.process: Optional[subprocess.Popen] = None
        try:
            # Loaded offline, before the first start: quicker than ldapadd,
            # and the server never answers with half a directory.
            self._run(str(SLAPADD), "-q", "-f", str(self.config), "-b", SUFFIX, "-l", str(entries))
            self.start()
        except BaseException:
            # No atexit yet to remove it; the error carries slapd's log.
            self.remove()
            raise

    @staticmethod
    def _secret(path: Path, text: str) -> None:
        path.touch(mode=0o600)
        path.chmod(0o600)
        path.write_text(text)

    def _configuration(self, certificate: Path, key: Path, rootPassword: str) -> str:
        return f"""\
include {SCHEMAS}/core.schema
include {SCHEMAS}/cosine.schema
include {SCHEMAS}/inetorgperson.schema
modulepath {MODULES}
moduleload back_mdb
moduleload ppolicy
pidfile {self.folder}/slapd.pid
argsfile {self.folder}/slapd.args

TLSCACertificateFile {self.caFile}
TLSCertificateFile {certificate}
TLSCertificateKeyFile {key}
TLSVerifyClient never

database mdb
suffix "{SUFFIX}"
rootdn "{ROOT_DN}"
rootpw {rootPassword}
directory {self.data}
# The directory lives as long as the test run: no write needs to reach the
# disk before slapd answers.
dbnosync
index objectClass eq
index uid eq
index member eq

overlay ppolicy
ppolicy_default "{DEFAULT_POLICY}"

# Anyone may bind with an account's password, and nothing more; the service
# account reads everything but the passwords, pwdAccountLockedTime included
# (operational attributes are returned only when asked for by name, or "+").
# The root DSE and the schema, outside this database, stay readable by all,
# as clients (ldap3) read them when they connect.
access to attrs=userPassword
    by anonymous auth
    by * none
access to *
    by dn.exact="{BIND_DN}" read
    by anonymous auth
    by * none
"""

    def _entries(self) -> str:
        blocks = [
            f"dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\ndc: hospital\no: Example Hospital\n",
        ]
        for unit in (STAFF, GROUPS, SERVICE, POLICIES):
            name = unit.split(",")[0].split("=")[1]
            blocks.append(f"dn: {unit}\nobjectClass: organizationalUnit\nou: {name}\n")
        # pwdLockout is what makes slapd honour pwdAccountLockedTime at all;
        # with pwdMaxFailure 0, failed binds (the tests' wrong passwords)
        # never lock an account.
        blocks.append(
            f"dn: {DEFAULT_POLICY}\nobjectClass: device\nobjectClass: pwdPolicy\ncn: Default\n"
            "pwdAttribute: userPassword\npwdLockout: TRUE\npwdMaxFailure: 0\n"
        )
        blocks.append(
            f"dn: {BIND_DN}\nobjectClass: applicationProcess\nobjectClass: simpleSecurityObject\n"
            f"cn: pacs-reader\nuserPassword: {hashed(self.bindPassword)}\n"
        )
        for name in USERS:
            block = (
                f"dn: {userDN(name)}\nobjectClass: inetOrgPerson\nuid: {name}\n"
                f"cn: {name.capitalize()} Test\nsn: Test\nmail: {name}@hospital.example\n"
                f"userPassword: {hashed(self.passwords[name])}\n"
            )
            if name == "disabled1":
                block += f"pwdAccountLockedTime: {LOCKED_FOR_GOOD}\n"
            blocks.append(block)
        for group, members in MEMBERS.items():
            name = group.split(",")[0].split("=")[1]
            blocks.append(
                f"dn: {group}\nobjectClass: groupOfNames\ncn: {name}\n"
                + "".join(f"member: {member}\n" for member in members)
            )
        return "\n".join(blocks)

    def _run(self, *argv: str, input: Optional[str] = None) -> str:
        result = subprocess.run(argv, input=input, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed ({result.returncode}): {result.stderr or result.stdout}")
        return result.stdout

    def start(self) -> None:
        """
        Start the server (again, on the same ports); returns once it accepts
        connections.  Nothing to do if it runs: a test that stops it starts
        it again in its cleanup, and perhaps before.
        """
        if self.process is not None and self.process.poll() is None:
            return
        log = self.log.open("a")
        # -d keeps slapd in the foreground, a child to wait for, and writes
        # its startup errors and one line for each operation to the log.
        self.process = subprocess.Popen(
            [
                str(SLAPD), "-d", "stats",
                "-f", str(self.config),
                "-h", f"ldaps://127.0.0.1:{self.ldapsPort}/ ldap://127.0.0.1:{self.startTLSPort}/ {self.ldapiURL}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            # slapd listens only once its database is open; the listeners are
            # opened together, and a bad TLS setting stops it from starting.
            try:
                ready = subprocess.run(
                    ["ldapwhoami", "-x", "-H", self.ldapiURL, "-o", "nettimeout=1"],
                    capture_output=True,
                    timeout=5,
                )
            except subprocess.TimeoutExpired:
                pass
            else:
                if ready.returncode == 0:
                    return
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("slapd did not start:\n" + self.log.read_text(errors="replace"))
            time.sleep(0.02)

    def userDN(self, name: str) -> str:
        return userDN(name)

    def section(self, **overrides: object) -> Dict[str, object]:
        """
        What a test writes into [ldap] to log in against this server.
        """
        section: Dict[str, object] = {
            "url": self.ldapsURL,
            "ca_file": self.caFile,
            "bind_dn": self.bindDN,
            "bind_password_file": self.bindPasswordFile,
            "user_base": self.userBase,
            "user_filter": USER_FILTER,
            "viewer_groups": VIEWERS,
            "uploader_groups": UPLOADERS,
            "admin_groups": ADMINS,
        }
        section.update(overrides)
        return section

    def modify(self, ldif: str) -> None:
        """
        Apply the LDIF changes C{ldif} as the administrator.
        """
        self._run(
            "ldapmodify", "-x", "-H", self.ldapiURL, "-D", ROOT_DN, "-y", str(self._rootPasswordFile),
            input=ldif,
        )

    def addMember(self, groupDN: str, memberDN: str) -> None:
        self.modify(f"dn: {groupDN}\nchangetype: modify\nadd: member\nmember: {memberDN}\n")

    def removeMember(self, groupDN: str, memberDN: str) -> None:
        """
        Take C{memberDN} out of C{groupDN}.  A groupOfNames cannot be left
        empty: to take nested1 out of the viewers, take RADIOLOGY out of
        VIEWERS.
        """
        self.modify(f"dn: {groupDN}\nchangetype: modify\ndelete: member\nmember: {memberDN}\n")

    def lock(self, userDN: str) -> None:
        """
        Disable an account as an administrator does: for good, until
        L{unlock}.
        """
        self.modify(
            f"dn: {userDN}\nchangetype: modify\nreplace: pwdAccountLockedTime\n"
            f"pwdAccountLockedTime: {LOCKED_FOR_GOOD}\n"
        )

    def unlock(self, userDN: str) -> None:
        # A replace with no value removes the attribute, and is no error
        # where there is none: unlocking twice is harmless.
        self.modify(f"dn: {userDN}\nchangetype: modify\nreplace: pwdAccountLockedTime\n")
