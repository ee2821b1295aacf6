"""
Secrets kept in files of their own (the directory's bind password, the
single sign-on's client secret, the database's password): named by the
configuration, read when needed, never logged.
"""

from pathlib import Path


def readSecret(path: Path) -> str:
    """
    A password alone in a file, without the line's end.

    @raise OSError: if the file cannot be read.
    """
    return path.read_text(encoding="utf-8").rstrip("\r\n")
