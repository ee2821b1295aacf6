"""
Nothing reaches Orthanc but through the forwarder: from another host (a second
network namespace joined to this one by a veth pair), Orthanc's plain DICOM port
refuses every association, even with the AE title of a modality configured at
exactly that address, while the forwarder serves that modality.
"""

import os

from tests.dicompeers import PEER_TIMEOUT, ForwarderTestCase
from tests.support import OtherHost, freePort


class OtherHostTests(ForwarderTestCase):
    """
    The modality CT1 is on another host (L{OtherHost}).  Orthanc's own
    refusal is the second line of defence: the firewall that closes its ports
    to other hosts (tests/test_orthanc_firewall.py) is not in this service
    tree, so that what Orthanc itself does is seen.
    """

    def setUp(self):
        if os.geteuid() != 0:
            self.skipTest("network namespaces need root")
        self.otherHost = OtherHost(self)
        self.applianceAddress = self.otherHost.applianceAddress
        self.modalityAddress = self.otherHost.address
        self.modalities = {
            "modality:ct1": {"aet": "CT1", "host": self.modalityAddress},
            "modality:local": {"aet": "CT1LOCAL", "host": "127.0.0.1"},
        }
        # Every interface, as on a real appliance.
        self.dicom = {"listen": str(freePort())}
        return super().setUp()

    def fromOtherHost(self, program: str, *arguments: str):
        return self.otherHost.run(
            f"/usr/bin/{program}", "-to", str(PEER_TIMEOUT), "-ta", str(PEER_TIMEOUT), *arguments
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
