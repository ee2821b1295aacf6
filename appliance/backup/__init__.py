"""
Backups of a whole appliance: C{pacs-appliance backup}, C{restore} and
C{verify} (see L{appliance.backup.manifest} for what a backup holds).
"""
