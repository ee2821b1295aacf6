"""
The checks of what a configuration names on disk: Orthanc and its plugins,
the certificate and its key, the authority of client certificates, the
database's password and authority files.  Start-up
(twistd's options), C{pacs-appliance check-config} and reload all load the
configuration through L{loadChecked}, so that each refuses what the others
would; the parsing itself (L{appliance.config}) touches nothing but the
configuration files.
"""

import os
from pathlib import Path
from typing import List

from appliance.config import DEFAULT_CONFIG_PATH, Config, loadConfig
from appliance.orthanc.settings import postgresqlPlugins
from appliance.tls import CertificateError, readAuthorities, readCertificate


def fileProblems(config: Config) -> List[str]:
    """
    The problems with the files C{config} names, one sentence each.
    """
    problems = []
    where = config.where
    executable = config.orthanc.executable
    if not executable.is_file() or not os.access(executable, os.X_OK):
        problems.append(
            f"{where('orthanc', 'executable')}: {executable} is not an executable file"
            " (install the orthanc package, or point this key at Orthanc)"
        )
    for plugin in config.orthanc.plugins:
        if not plugin.is_file():
            problems.append(
                f"{where('orthanc', 'plugins')}: {plugin} does not exist (install the orthanc-dicomweb package)"
            )

    # Either both halves of the certificate are installed or neither is (then a
    # self-signed one is generated); one alone is a mistake made while installing.
    certificate, privateKey = config.tls.certificate, config.tls.private_key
    if certificate.exists() != privateKey.exists():
        present, missing = ("certificate", "private_key") if certificate.exists() else ("private_key", "certificate")
        problems.append(
            f"{where('tls', missing)}: {getattr(config.tls, missing)} does not exist but"
            f" [tls] {present} does (install both files, or remove both to use a"
            " generated self-signed certificate)"
        )
    elif certificate.exists():
        try:
            readCertificate(certificate, privateKey)
        except CertificateError as error:
            problems.append(f"{where('tls', 'certificate')}: {error}")

    authority = config.dicom.client_ca
    if authority is not None and not authority.is_file():
        problems.append(f"{where('dicom', 'client_ca')}: {authority} does not exist")

    database = config.database
    if database.host:
        for plugin in postgresqlPlugins(config):
            if not plugin.is_file():
                problems.append(
                    f"{where('database', 'host')}: Orthanc's PostgreSQL plugin {plugin} does not exist"
                    " (install the orthanc-postgresql package)"
                )
        if database.password_file is not None and not os.access(database.password_file, os.R_OK):
            problems.append(
                f"{where('database', 'password_file')}: {database.password_file} cannot be read"
                " (it must exist, readable by the daemon's group)"
            )
        if database.ca_file is not None and not database.ca_file.is_file():
            problems.append(f"{where('database', 'ca_file')}: {database.ca_file} does not exist")
    problems.extend(_identityFileProblems(config))
    return problems


def _identityFileProblems(config: Config) -> List[str]:
    # Only files: an unreachable directory or provider is no configuration
    # problem (it may be down while the box boots), and start-up warns of it.
    where = config.where
    problems = []
    secrets = []
    authorities = []
    if config.ldap.url:
        secrets.append(("ldap", "bind_password_file", config.ldap.bind_password_file))
        authorities.append(("ldap", "ca_file", config.ldap.ca_file))
    if config.oidc.issuer:
        secrets.append(("oidc", "client_secret_file", config.oidc.client_secret_file))
        authorities.append(("oidc", "ca_file", config.oidc.ca_file))
    if config.audit.syslog is not None:
        authorities.append(("audit", "ca_file", config.audit.ca_file))
    for section, key, path in secrets:
        if path is not None and not os.access(path, os.R_OK):
            problems.append(f"{where(section, key)}: {path} cannot be read (it must exist, readable by the daemon's group)")
    for section, key, path in authorities:
        if path is not None:
            try:
                readAuthorities(path)
            except CertificateError as error:
                problems.append(f"{where(section, key)}: {error}")
    return problems


def loadChecked(mainPath: Path = DEFAULT_CONFIG_PATH) -> Config:
    """
    The configuration rooted at C{mainPath}, once it parses and the files it
    names are usable.  Blocking (it reads files): in the reactor's thread
    only before the reactor runs.

    @raise appliance.config.ConfigError: with every problem found.
    """
    return loadConfig(mainPath, checks=[fileProblems])
