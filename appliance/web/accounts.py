"""
Who a user is to the site, whatever the source of the account (L{SOURCES}:
the appliance's own accounts, in the users file or the shared database; the
hospital's directory; its single sign-on): a name, roles from L{ROLES}, and
that source; and what a store of accounts with passwords offers the checker
and the realm (L{IAccountStore}).
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
    source = Attribute("Where the account comes from, one of L{SOURCES}.")
    label = Attribute("The name and source as the access log and the journal write them: C{source:name}.")

    def has(role):
        """
        Do they hold C{role}, or a role that includes it?
        """


class IAccountStore(Interface):
    """
    Accounts with their password hashes, as the appliance keeps them: the
    users file (L{appliance.web.users.UsersFile}) on one box, the accounts
    table (L{appliance.web.sharedaccounts.DatabaseAccounts}) in a cluster.
    """

    dummyHash = Attribute(
        "What an unknown user's password is checked against: a hash with the parameters most users' have,"
        " so that an unknown name costs what a known one does."
    )

    def lookup(name):
        """
        The entry (L{appliance.web.users.UserEntry}) of user C{name}, or L{None}.
        """

    def subscribe(listener):
        """
        Call C{listener(names)} with the names whose account changed or went,
        after each change.
        """


#: The roles, from least to most: each includes those before it.
ROLES = ("viewer", "uploader", "admin")

#: The sources of accounts: the appliance's own (the users file, or the
#: cluster's database), the hospital's directory ([ldap]), its single
#: sign-on ([oidc]).
LOCAL, LDAP, OIDC = SOURCES = ("local", "ldap", "oidc")


@implementer(IAccount)
@dataclass(frozen=True)
class Account:
    """
    A user as the site sees them: a name, the roles their source gives,
    and that source.
    """

    name: str
    roles: FrozenSet[str]
    source: str = LOCAL

    @property
    def label(self) -> str:
        return f"{self.source}:{self.name}"

    def has(self, role: str) -> bool:
        """
        Does the account hold C{role}, or a role that includes it?
        """
        rank = ROLES.index(role)
        return any(ROLES.index(held) >= rank for held in self.roles)
