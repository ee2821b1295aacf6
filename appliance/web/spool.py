"""
How much of the request bodies being received the appliance holds, per
account and in all: each body is counted as it arrives, until its request
ends, in memory or in the spool folder alike (a body declared larger than
there is room for is refused before it is read, but nothing is held for it
until it comes: a slow client holds only what it has sent).

An account past its share is refused (429: its own uploads in progress must
end first), so that one account cannot take the whole spool and a second one
can still upload; past the total, everyone is (507).
"""

from dataclasses import dataclass
from typing import Dict, Optional

from twisted.web import http

from appliance.web.pages import TOO_MANY_REQUESTS, describeSize

#: Seconds a refused uploader is told to wait: uploads in progress end in
#: minutes, not seconds.
SPOOL_RETRY_AFTER = 30


@dataclass(frozen=True)
class SpoolRefusal:
    """
    Why a body may not be received now: the status and the sentence.
    """

    status: int
    sentence: str


class SpoolQuota:
    """
    The bytes of request bodies held, by account name, against
    C{perAccount} each and C{total} in all.
    """

    def __init__(self, perAccount: int, total: int) -> None:
        self.perAccount = perAccount
        self.total = total
        self.held = 0
        self._byAccount: Dict[str, int] = {}

    def check(self, name: str, size: int) -> Optional[SpoolRefusal]:
        """
        Why C{size} more bytes for the account C{name} would pass its share
        or the total, if they would; counts nothing.
        """
        mine = self._byAccount.get(name, 0)
        if mine + size > self.perAccount:
            return SpoolRefusal(
                TOO_MANY_REQUESTS,
                f"The account {name} has {describeSize(mine, rounded=True)} of uploads in progress and may have"
                f" {describeSize(self.perAccount)} at once: send this when they have ended.",
            )
        if self.held + size > self.total:
            return SpoolRefusal(
                http.INSUFFICIENT_STORAGE_SPACE,
                f"The appliance is receiving as many uploads as it takes at once ({describeSize(self.total)}):"
                " send this again in a few minutes.",
            )
        return None

    def reserve(self, name: str, size: int) -> Optional[SpoolRefusal]:
        """
        Count C{size} more bytes for the account C{name}, unless that would
        pass its share or the total: then count nothing and say why.
        """
        refusal = self.check(name, size)
        if refusal is None:
            self._byAccount[name] = self._byAccount.get(name, 0) + size
            self.held += size
        return refusal

    def release(self, name: str, size: int) -> None:
        """
        The account C{name} no longer holds C{size} of the bytes it reserved.
        """
        left = self._byAccount.get(name, 0) - size
        if left > 0:
            self._byAccount[name] = left
        else:
            self._byAccount.pop(name, None)
        self.held -= size
