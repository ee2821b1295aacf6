"""
Who a user is to the site, whatever the source of the account (the users
file today; a directory or a single sign-on later): a name, and roles from
L{ROLES}.
"""

from dataclasses import dataclass
from typing import FrozenSet

from zope.interface import Attribute, Interface, implementer


class IAccount(Interface):
    """
    A user the site knows: what the access gate, the access log and the
    sessions need of them.
    """

    name = Attribute("The user's name, as they log in.")
    roles = Attribute("The roles they hold, names from L{ROLES}.")

    def has(role):
        """
        Do they hold C{role}, or a role that includes it?
        """


#: The roles, from least to most: each includes those before it.
ROLES = ("viewer", "uploader", "admin")


@implementer(IAccount)
@dataclass(frozen=True)
class Account:
    """
    A user as the site sees them: a name and the roles their source gives.
    """

    name: str
    roles: FrozenSet[str]

    def has(self, role: str) -> bool:
        """
        Does the account hold C{role}, or a role that includes it?
        """
        rank = ROLES.index(role)
        return any(ROLES.index(held) >= rank for held in self.roles)
