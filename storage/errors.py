"""Storage exceptions.

Every failure the watcher or the dashboard may need to report to a person is a subclass of
`StorageError`, so callers can catch one type and print its message, which always names the
database URL or the record involved.
"""


class StorageError(Exception):
    """A database could not be opened, read or written; the message says which and why."""


class SchemaTooNewError(StorageError):
    """The database was written by a newer program; it is refused and left untouched."""


class SchemaTooOldError(StorageError):
    """A read-only repository found an older schema that only a writer may migrate."""


class WriterLockedError(StorageError):
    """Another process already holds the single-writer lock of this database."""


class ReadOnlyError(StorageError):
    """A write was attempted through a repository opened read-only."""


class StorageUnavailableError(StorageError):
    """A write (or read) failed for a reason that may pass (disk full, database locked or
    read-only, I/O error, a database server down): nothing of that transaction was stored and
    it can be retried as it was."""
