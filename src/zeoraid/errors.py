"""Exceptions raised by zeoraid.

They derive from ZODB's own exceptions so that ZODB applications and ZEO
servers treat them as storage errors they already know how to handle.
"""
import ZODB.POSException


class RAIDError(ZODB.POSException.StorageError):
    """A management or configuration request was refused (clear message)."""


class RAIDFailedError(RAIDError):
    """No usable backend is left: the RAID cannot serve the request."""


class BackendsFailedError(ZODB.POSException.StorageError):
    """Every backend raised the same non-ZODB error: nobody is degraded,
    the transaction is aborted everywhere, the cause is in the message."""


class BackendTimeout(Exception):
    """A backend did not answer within the RAID's deadline."""


class BackendUnavailable(Exception):
    """A backend is not open (it failed or hung while opening)."""
