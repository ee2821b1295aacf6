"""
The service tree of the daemon, and the options of its twistd plugin.
"""

from pathlib import Path

from twisted.application.service import IService, MultiService, ServiceMaker
from twisted.python import usage

from appliance.config import DEFAULT_CONFIG_PATH, Config, ConfigError, loadConfig
from appliance.orthanc.supervisor import OrthancSupervisor


class Options(usage.Options):
    optParameters = [
        ["config", "c", str(DEFAULT_CONFIG_PATH), "The appliance's main configuration file."],
    ]

    def postOptions(self) -> None:
        try:
            self["appliance-config"] = loadConfig(Path(self["config"]))
        except ConfigError as error:
            raise usage.UsageError(
                "the configuration has problems:\n" + "\n".join(error.problems)
            )


def buildService(config: Config, reactor=None) -> MultiService:
    """
    The whole appliance as one service tree.
    """
    root = MultiService()
    OrthancSupervisor(config, reactor).setServiceParent(root)
    return root


def makeService(options: Options) -> IService:
    return buildService(options["appliance-config"])


serviceMaker = ServiceMaker(
    "pacs-appliance",
    "appliance.service",
    "OHIF viewer, DICOMweb proxy and DICOM TLS in front of a supervised Orthanc.",
    "pacs-appliance",
)
