"""
The appliance's tables, as migrations: each entry of L{MIGRATIONS} takes the
schema from the version before it to the next, and is never changed once
released (a change is a new entry).  The version reached is kept in the
table C{schema_version}; a database from a newer release is refused, not
guessed at.

Statements name their types in braces ({blob}, {real}, {serial}), which
each dialect spells its own way (L{appliance.state.database.Dialect}).
"""

from typing import Sequence, Tuple

MIGRATIONS: Sequence[Tuple[str, ...]] = (
    # 1: browser sessions and the log of logins that the throttle counts.
    (
        # Under a hash of the token: the table holds nothing a client could
        # present.  Times are seconds since the epoch, from the node's clock.
        """CREATE TABLE sessions (
            token_hash {blob} PRIMARY KEY,
            account TEXT NOT NULL,
            created {real} NOT NULL,
            last_used {real} NOT NULL
        )""",
        "CREATE INDEX sessions_by_account ON sessions (account)",
        # One row a failed or successful password check: every node replays
        # the others' into its throttle (appliance.web.loginevents).
        # `recorded` is the database's clock, which the nodes poll by (their
        # own clocks may disagree); `at` is the node's, which the throttle's
        # windows are measured in.
        """CREATE TABLE login_events (
            id {serial},
            recorded {real} NOT NULL,
            at {real} NOT NULL,
            node TEXT NOT NULL,
            succeeded BOOLEAN NOT NULL,
            name TEXT NOT NULL,
            address TEXT NOT NULL,
            network TEXT
        )""",
        "CREATE INDEX login_events_by_recorded ON login_events (recorded)",
    ),
    # 2: the accounts of a cluster (pacs-appliance passwd --config), in the
    # users file's terms: a name, its scrypt hash, its roles.
    (
        """CREATE TABLE accounts (
            name TEXT PRIMARY KEY,
            password_hash TEXT NOT NULL,
            roles TEXT NOT NULL,
            changed {real} NOT NULL
        )""",
    ),
    # 3: the metadata cache (appliance.web.metadatacache): Orthanc's DICOMweb
    # answers to studies/S/metadata and studies/S/series/s/metadata, under
    # "S" and "S/s", gzip-compressed, with the digest of the index facts they
    # were built from; the body last, so that summing the sizes reads no
    # blob.  And where each node is in Orthanc's /changes.
    (
        """CREATE TABLE metadata_cache (
            resource TEXT PRIMARY KEY,
            fingerprint TEXT NOT NULL,
            size BIGINT NOT NULL,
            built {real} NOT NULL,
            body {blob} NOT NULL
        )""",
        "CREATE INDEX metadata_cache_by_built ON metadata_cache (built)",
        """CREATE TABLE metadata_changes_read (
            node TEXT PRIMARY KEY,
            seq BIGINT NOT NULL
        )""",
    ),
    # 4: sessions of the directory's and the single sign-on's users
    # (appliance.web.directory, appliance.web.openid): the source of the
    # account, the roles it gave at login (NULL for the appliance's own
    # accounts, whose roles the users file or the accounts table give), and,
    # for single sign-on, the ID token the provider's logout asks for.  And
    # the single sign-on logins under way, under a hash of their state.
    (
        "ALTER TABLE sessions ADD COLUMN source TEXT NOT NULL DEFAULT 'local'",
        "ALTER TABLE sessions ADD COLUMN roles TEXT",
        "ALTER TABLE sessions ADD COLUMN logout_hint TEXT",
        """CREATE TABLE oidc_logins (
            state_hash {blob} PRIMARY KEY,
            verifier TEXT NOT NULL,
            nonce TEXT NOT NULL,
            target TEXT NOT NULL,
            redirect_uri TEXT NOT NULL,
            created {real} NOT NULL
        )""",
    ),
)

#: The schema version this release reads and writes.
SCHEMA_VERSION = len(MIGRATIONS)
