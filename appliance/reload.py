"""
Reload on SIGHUP (C{systemctl reload}): re-read the configuration and the
certificate, and apply what can change while the daemon runs; files the
daemon also watches by itself (the users file) are read again at once.

A configuration with problems is refused with every problem in the log, and
the running one stays in force.  A new certificate is used by the TLS
handshakes that follow; connections already open keep theirs and are not
interrupted.  Changes that need the listeners or Orthanc restarted are named
in the log, with what to do.
"""

import signal
from pathlib import Path
from typing import Iterable, List, Optional, Protocol, Tuple

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.internet.ssl import PrivateCertificate
from twisted.logger import Logger
from twisted.python.failure import Failure

from appliance.config import Config, ConfigError
from appliance.preflight import loadChecked
from appliance.tls import CertificateError, loadServerCertificate

#: The parts of the configuration that only a restart applies: listeners,
#: Orthanc's configuration, the viewer's files and settings, the accounts'
#: settings (the users file itself is read again whenever it changes).
RESTART_SECTIONS = ("appliance", "orthanc", "web", "auth", "dicom", "modalities")


class CertificateUser(Protocol):
    def useCertificate(self, certificate: PrivateCertificate) -> None:
        """
        Present C{certificate} in the TLS handshakes that follow.
        """


class ReloadObserver(Protocol):
    """
    Told when a reload starts and ends (systemd, through the notify socket).
    """

    def reloading(self) -> None:
        """
        A reload has started.
        """

    def reloaded(self, outcome: str) -> None:
        """
        The reload has ended with C{outcome}, a short sentence.
        """


class Reloadable(Protocol):
    def reload(self) -> None:
        """
        Read again, now, the files this object keeps a copy of; called in the
        reactor thread at each SIGHUP, whatever the configuration holds.
        """


def readConfiguration(mainPath: Path) -> Tuple[Config, PrivateCertificate]:
    """
    The configuration rooted at C{mainPath} and the certificate it names.
    Blocking (files, maybe generating a key): run it in a thread.

    @raise ConfigError: if the configuration has problems.
    @raise CertificateError: if the certificate cannot be used.
    """
    config = loadChecked(mainPath)
    return config, loadServerCertificate(config.tls, config.appliance.state_dir)


def sectionsNeedingRestart(running: Config, new: Config) -> List[str]:
    return [name for name in RESTART_SECTIONS if getattr(running, name) != getattr(new, name)]


class ReloadOnSighup(Service):
    """
    Reloads on SIGHUP for as long as the service runs.

    A SIGHUP arriving while a reload runs is not lost: one more reload follows
    (however many arrived), so that the last edit is always read.  C{notify}
    and then C{observers} (the audit trail) are told of each reload.
    """

    log = Logger()

    def __init__(
        self,
        config: Config,
        certificateUsers: Iterable[CertificateUser],
        notify: ReloadObserver,
        reactor=None,
        reloadables: Iterable[Reloadable] = (),
        observers: Iterable[ReloadObserver] = (),
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor  # type: ignore[no-redef]
        self.config = config
        self._mainPath = config.sources[0]
        self._certificateUsers = tuple(certificateUsers)
        self._reloadables = tuple(reloadables)
        self._notify = notify
        self._observers = tuple(observers)
        self._reactor = reactor
        #: Who waits for the reload that runs, and for the one that follows.
        self._running: Optional[List[Deferred]] = None
        self._waiting: List[Deferred] = []
        self._previousHandler = None

    def startService(self) -> None:
        Service.startService(self)
        self._previousHandler = signal.signal(signal.SIGHUP, self._sighup)

    def stopService(self) -> None:
        Service.stopService(self)
        signal.signal(signal.SIGHUP, self._previousHandler)

    def _sighup(self, signum: int, frame: object) -> None:
        # A signal handler interrupts the reactor thread anywhere: it only
        # hands the work to the reactor, as Twisted's own SIGTERM handler does.
        self._reactor.callFromThread(self.reload)

    def reload(self) -> Deferred:
        """
        Reload; the Deferred fires with the outcome once a reload that read
        the files after this call has ended, applied or refused.
        """
        finished: Deferred = Deferred()
        self._waiting.append(finished)
        if self._running is None:
            self._start()
        return finished

    def _start(self) -> None:
        self._running, self._waiting = self._waiting, []
        self._notify.reloading()
        self.log.info("Reloading the configuration from {path}", path=str(self._mainPath))
        for reloadable in self._reloadables:
            try:
                reloadable.reload()
            except Exception:
                self.log.failure("Could not reload {reloadable}", reloadable=reloadable)
        reading = deferToThreadPool(
            self._reactor, self._reactor.getThreadPool(), readConfiguration, self._mainPath
        )
        reading.addCallbacks(self._apply, self._refuse)
        reading.addErrback(self._failed)
        reading.addCallback(self._ended)
        reading.addErrback(lambda failure: self.log.failure("Error while ending a reload", failure))

    def _apply(self, loaded: Tuple[Config, PrivateCertificate]) -> str:
        config, certificate = loaded
        for user in self._certificateUsers:
            user.useCertificate(certificate)
        restart = sectionsNeedingRestart(self.config, config)
        if restart:
            self.log.warn(
                "These sections changed and take effect only after a restart"
                " (systemctl restart pacs-appliance): {sections}",
                sections=", ".join(f"[{name}]" for name in restart),
            )
        self.config = config
        self.log.info(
            "Reloaded: new TLS connections use the certificate {subject}",
            subject=certificate.original.to_cryptography().subject.rfc4514_string(),
        )
        return "Reloaded"

    def _refuse(self, failure: Failure) -> str:
        failure.trap(ConfigError, CertificateError)
        error = failure.value
        problems = error.problems if isinstance(error, ConfigError) else [str(error)]
        self.log.error(
            "Reload refused, the running configuration stays in force. Fix these"
            " problems, then reload again:\n{problems}",
            problems="\n".join(problems),
        )
        return "Reload refused (see the log)"

    def _failed(self, failure: Failure) -> str:
        self.log.failure("Reload failed; the running configuration stays in force", failure)
        return "Reload failed (see the log)"

    def _ended(self, outcome: str) -> None:
        finished, self._running = self._running or [], None
        self._notify.reloaded(outcome)
        for observer in self._observers:
            observer.reloaded(outcome)
        for waiter in finished:
            waiter.callback(outcome)
        if self._waiting:
            self._start()
