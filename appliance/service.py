"""
The service tree of the daemon, and the options of its twistd plugin.
"""

from pathlib import Path
from typing import List, Union

from twisted.application.service import IService, MultiService
from twisted.python import usage

from appliance.audit.events import AuditEvents, OrthancStudies
from appliance.audit.messages import AuditSource
from appliance.audit.syslog import SyslogForwarder
from appliance.audit.trail import AuditTrail, auditFolder
from appliance.config import DEFAULT_CONFIG_PATH, Config, ConfigError
from appliance.dicom.destinations import DestinationRelays
from appliance.dicom.forwarder import DicomForwarderService
from appliance.garbage import CollectAfterClosing
from appliance.metrics import ApplianceParts, Metrics, MetricsResource
from appliance.orthanc.firewall import OrthancPortGuard
from appliance.orthanc.probe import orthancProbes
from appliance.orthanc.space import StorageSpace
from appliance.orthanc.supervisor import OrthancSupervisor
from appliance.preflight import loadChecked
from appliance.reload import CertificateUser, ReloadOnSighup
from appliance.state.database import openStateDatabase
from appliance.systemd import Notifier, SystemdNotifyService, watchdogInterval
from appliance.tls import HTTPS_POLICY, ServerTLS, loadServerCertificate, readAuthorities
from appliance.web.authenticator import Authenticator
from appliance.web.checkers import PasswordChecks
from appliance.web.directory import DirectoryService
from appliance.web.openid import OpenIDProvider, TokenChecker
from appliance.web.orthancrest import OrthancRest
from appliance.web.proxy import OrthancProxy
from appliance.web.routes import metadataCache, proxyResources
from appliance.web.sharedaccounts import DatabaseAccounts
from appliance.web.site import buildSiteResource, buildWebService, compressedCopies
from appliance.web.spool import SpoolQuota
from appliance.web.users import UsersFile


class Options(usage.Options):
    optParameters = [
        ["config", "c", str(DEFAULT_CONFIG_PATH), "The appliance's main configuration file."],
    ]

    def postOptions(self) -> None:
        try:
            self["appliance-config"] = loadChecked(Path(self["config"]))
        except ConfigError as error:
            raise usage.UsageError(
                "the configuration has problems:\n" + "\n".join(error.problems)
            )


def buildService(config: Config, reactor=None) -> MultiService:
    """
    The whole appliance as one service tree.
    """
    if reactor is None:
        from twisted.internet import reactor  # type: ignore[no-redef]
    root = MultiService()
    # The audit trail first: it records the start before anything happens,
    # and, stopped last, the stop after everything else.
    trail = auditTrail(config, reactor)
    trail.setServiceParent(root)
    # The relays start first: their loopback ports go into Orthanc's configuration.
    relays = DestinationRelays(config, reactor)
    relays.setServiceParent(root)
    # One measure of Orthanc's free space: uploads and Orthanc's restarts wait for it.
    space = StorageSpace.forOrthanc(config)
    restProbe, echoProbe = orthancProbes(config, reactor)
    orthanc = OrthancSupervisor(
        config, reactor, probe=restProbe, echoProbe=echoProbe, space=space, relayPorts=relays.ports
    )
    # Orthanc runs inside its guard: its ports close to other hosts first and
    # open again only once it is gone.
    guard = OrthancPortGuard(config, reactor)
    orthanc.setServiceParent(guard)
    # Loaded (or generated) once: HTTPS and DICOM TLS present the same certificate.
    certificate = loadServerCertificate(config.tls, config.appliance.state_dir)
    if config.audit.syslog is not None:
        # It presents the appliance's certificate, as loaded at the start.
        forwardTrail(config, trail, certificate, reactor).setServiceParent(root)
    certificateUsers: List[CertificateUser] = []
    # Told by every listener when a connection closes (see its module).
    garbage = CollectAfterClosing(reactor)
    forwarder = None
    if config.dicom.listen is not None:
        forwarder = DicomForwarderService(config, certificate, reactor, space, garbage.closed)
        forwarder.setServiceParent(root)
        certificateUsers.append(forwarder)
    passwordChecks = PasswordChecks(reactor)
    passwordChecks.setServiceParent(root)
    # Before the authenticator: its sessions and failed logins are kept there.
    database = openStateDatabase(config, reactor)
    database.setServiceParent(root)
    # A cluster's accounts are in its database; a single box's in the users file.
    users: Union[DatabaseAccounts, UsersFile]
    if config.database.host:
        users = DatabaseAccounts(database, reactor)
    else:
        users = UsersFile(config.auth.users_file, reactor)
    users.setServiceParent(root)
    # The hospital's directory, after the appliance's own accounts.
    directory = None
    if config.ldap.url:
        directory = DirectoryService.fromConfig(config.ldap, reactor)
        directory.setServiceParent(root)
    # The hospital's single sign-on: browsers' sign-ins and Bearer tokens.
    provider = tokens = None
    if config.oidc.issuer:
        provider = OpenIDProvider.fromConfig(config.oidc, reactor)
        provider.setServiceParent(root)
        tokens = TokenChecker(provider)
    authenticator = Authenticator.forAccountStore(
        users, passwordChecks, config.auth, database, config.appliance.node_name, reactor, directory, tokens
    )
    authenticator.setServiceParent(root)
    proxy = OrthancProxy(config, orthanc, space, reactor)
    proxy.setServiceParent(root)
    audit = AuditEvents(trail, OrthancStudies(OrthancRest(proxy)), reactor)
    authenticator.audit = audit
    if forwarder is not None:
        forwarder.factory.audit = audit
    metadata = metadataCache(config, proxy, database, reactor)
    if metadata is not None:
        metadata.setServiceParent(root)
    proxyRoutes = proxyResources(config, proxy, metadata, audit)
    webTLS = ServerTLS(certificate, HTTPS_POLICY)
    # One spool, whichever listener a body comes through; the metrics read it.
    spool = SpoolQuota(config.web.max_spool_per_account, config.web.max_spool)
    metrics = Metrics()
    metrics.watch(
        ApplianceParts(
            orthanc=orthanc,
            turns=proxy.turns,
            space=space,
            spool=spool,
            authenticator=authenticator,
            database=database,
            certificate=lambda: webTLS.certificate,
            forwarder=forwarder.factory if forwarder is not None else None,
            metadataCache=metadata,
        ),
        [authenticator.countSessions],
    )
    site = buildSiteResource(
        config,
        orthanc,
        database,
        authenticator,
        proxyRoutes,
        compressedCopies(config, reactor),
        provider,
        reactor,
        MetricsResource(metrics),
    )
    buildWebService(
        config, site, authenticator, webTLS, reactor, garbage.closed, spool, metrics.requests, audit
    ).setServiceParent(root)
    certificateUsers.append(webTLS)
    # After every listener: one that cannot be bound ends the start before
    # the guard has changed the firewall (nothing would remove the rules).
    guard.setServiceParent(root)
    # Once everything else has started: what the start built is frozen.
    garbage.setServiceParent(root)
    notify = SystemdNotifyService(Notifier.fromEnvironment(), orthanc, reactor, watchdogInterval(), database)
    ReloadOnSighup(config, certificateUsers, notify, reactor, reloadables=[users], observers=[trail]).setServiceParent(root)
    # Last: it starts once every listener is bound (see its docstring).
    notify.setServiceParent(root)
    return root


def auditTrail(config: Config, reactor) -> AuditTrail:
    """
    The audit trail's files, in [audit] folder (state_dir/audit by default).
    """
    source = AuditSource(config.appliance.node_name, config.orthanc.aet, config.audit.site)
    return AuditTrail(auditFolder(config), source, config.sources[0], reactor)


def forwardTrail(config: Config, trail: AuditTrail, certificate, reactor) -> SyslogForwarder:
    """
    The forwarder of C{trail}'s records to [audit] syslog.
    """
    server = config.audit.syslog
    assert server is not None
    authorities = readAuthorities(config.audit.ca_file) if config.audit.ca_file is not None else None
    forwarder = SyslogForwarder(trail.folder, server.host, server.port, authorities, certificate, config.appliance.node_name, reactor)
    trail.listen(forwarder.sendMore)
    return forwarder


def makeService(options: Options) -> IService:
    return buildService(options["appliance-config"])
