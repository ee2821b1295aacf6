"""
The appliance's own state (browser sessions, failed logins): tables in a
local SQLite file, or in PostgreSQL that several nodes share.
"""
