"""
Nothing reaches Orthanc but through the forwarder: from another host (a second
network namespace joined to this one by a veth pair), Orthanc's plain DICOM port
refuses every association, even with the AE title of a modality configured at
exactly that address, while the forwarder serves that modality.
"""

import os
import random
import subprocess

from twisted.internet.utils import getProcessOutputAndValue

from tests.support import freePort
from tests.test_dicom_forwarder import PEER_TIMEOUT, ForwarderTestCase


def ip(*arguments: str) -> None:
    subprocess.run(["ip", *arguments], check=True, capture_output=True, text=True)


class OtherHostTests(ForwarderTestCase):
    """
    The modality CT1 is at 10.213.N.2 in its own namespace; the appliance is at
    10.213.N.1.
    """

    def setUp(self):
        if os.geteuid() != 0:
            self.skipTest("network namespaces need root")
        tag = random.randrange(10_000, 100_000)
        subnet = random.randrange(1, 255)
        self.namespace = f"pacs-bypass-{tag}"
        hostSide, otherSide = f"pbh{tag}", f"pbo{tag}"
        self.applianceAddress = f"10.213.{subnet}.1"
        self.modalityAddress = f"10.213.{subnet}.2"
        ip("netns", "add", self.namespace)
        # Deleting the namespace deletes the veth end in it, and so the pair.
        self.addCleanup(ip, "netns", "del", self.namespace)
        ip("link", "add", hostSide, "type", "veth", "peer", "name", otherSide)
        ip("link", "set", otherSide, "netns", self.namespace)
        ip("addr", "add", f"{self.applianceAddress}/30", "dev", hostSide)
        ip("link", "set", hostSide, "up")
        inside = ("netns", "exec", self.namespace, "ip")
        ip(*inside, "addr", "add", f"{self.modalityAddress}/30", "dev", otherSide)
        ip(*inside, "link", "set", otherSide, "up")
        ip(*inside, "link", "set", "lo", "up")
        self.modalities = {
            "modality:ct1": {"aet": "CT1", "host": self.modalityAddress},
            "modality:local": {"aet": "CT1LOCAL", "host": "127.0.0.1"},
        }
        # Every interface, as on a real appliance.
        self.dicom = {"listen": str(freePort())}
        return super().setUp()

    def fromOtherHost(self, program: str, *arguments: str):
        return getProcessOutputAndValue(
            "/usr/sbin/ip",
            [
                "netns", "exec", self.namespace, f"/usr/bin/{program}",
                "-to", str(PEER_TIMEOUT), "-ta", str(PEER_TIMEOUT), *arguments,
            ],
            env={"PATH": "/usr/bin:/bin"},
        )

    async def test_orthancRefusesAssociationsFromAnotherHost(self):
        orthanc = str(self.appliance.config.orthanc.dicom_port)
        for callingAET in ("CT1", "CT1LOCAL", "APPLIANCE-PROBE", "ANYONE"):
            out, err, code = await self.fromOtherHost(
                "echoscu", "-aet", callingAET, "-aec", "PACS", self.applianceAddress, orthanc
            )
            self.assertNotEqual(code, 0, f"{callingAET} reached Orthanc directly")
            self.assertIn(b"Association Rejected", err, err.decode())
        [instance] = self.writeStudy(1)
        out, err, code = await self.fromOtherHost(
            "storescu", "-aet", "CT1", "-aec", "PACS", self.applianceAddress, orthanc, instance
        )
        self.assertIn(b"Association Rejected", err, err.decode())
        status, _, body = await self.appliance.rest("/instances")
        self.assertEqual(body.strip(), b"[]")

    async def test_forwarderServesTheModalityFromThere(self):
        """
        The same path reaches the forwarder, which admits CT1 from its address:
        the refusals above are Orthanc's, not the network's.
        """
        forwarder = str(self.appliance.port)
        out, err, code = await self.fromOtherHost(
            "echoscu", "+tla", "+py", "+cf", str(self.authority.path),
            "-aet", "CT1", "-aec", "PACS", self.applianceAddress, forwarder,
        )
        self.assertEqual(code, 0, err.decode())
        [event] = await self.logged(1)
        self.assertEqual(event["peer"], self.modalityAddress)
        self.assertEqual(event["outcome"], "accepted as [modality:ct1]")
        # CT1LOCAL is configured at 127.0.0.1 only.
        out, err, code = await self.fromOtherHost(
            "echoscu", "+tla", "+py", "+cf", str(self.authority.path),
            "-aet", "CT1LOCAL", "-aec", "PACS", self.applianceAddress, forwarder,
        )
        self.assertNotEqual(code, 0)
        self.assertIn(b"Calling AE Title Not Recognized", err, err.decode())

    def writeStudy(self, count: int):
        from tests.support import ctSeries

        paths = []
        for number, instance in enumerate(ctSeries(count)):
            path = self.folder / f"bypass{number}.dcm"
            instance.save_as(path, enforce_file_format=True)
            paths.append(str(path))
        return paths
