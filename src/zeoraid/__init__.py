"""zeoraid: a RAID-1 replicating proxy storage for ZODB 6 / ZEO 6."""
from zeoraid.storage import RAIDStorage  # noqa: F401
