"""The backends' states and the RAID's generation, kept across restarts.

Without it a restarted RAID judges its backends by their last tids only:
a backend that was degraded (disabled by an operator, divergent, an
unknown commit outcome) but is not behind would come back optimal and
serve reads unchecked. With it, a backend that was degraded or recovering
when the RAID last wrote the file starts degraded, and only a recovery
(which checks its history) makes it optimal again.

The file is JSON, rewritten atomically (temporary file, fsync, rename)
whenever a backend's state changes, at a pack and at close:

    {"raid": "main", "written": 1764662400.0, "format": 2,
     "current": ["zeo1", "zeo2"], "last_tid": "03e5...", "pack_floor": null,
     "backends": {"zeo1": {"state": "optimal", "reason": null,
                           "since": 1764662000.0, "last_tid": "03e5..."},
                  ...}}

"current" names the backends that hold every acknowledged commit (the
optimal ones; when none is left, the last ones that were); "last_tid" is
the RAID's last tid when the file was written (a lower bound: the commit
marker beside it, replicas.CommitMarker, has the newest). Files of
format 1 (no "current") are read as "the optimal ones are current, the
generation is unknown". See replicas.py and doc/DESIGN.md.
"""
import json
import logging
import os
import tempfile
import threading
import time

from ZODB.utils import z64

logger = logging.getLogger('zeoraid')

#: States that a restarted RAID keeps (as degraded).
NOT_TRUSTED = ('degraded', 'recovering')


class StateFile:
    """Reads and writes one RAID's state file."""

    def __init__(self, path, raid_name):
        self.path = path
        self.raid_name = raid_name
        self._lock = threading.Lock()

    def load(self):
        """The file's contents, {} when there is no file yet.

        Returns {'backends': {name: {'state', 'reason', 'since',
        'last_tid'}}, 'current': [names] or None, 'last_tid': bytes,
        'pack_floor': bytes}. A file that cannot be read or parsed is
        reported (CRITICAL) and ignored: the RAID then judges its
        backends by their last tids, as without a state file.
        """
        try:
            with open(self.path, encoding='utf-8') as f:
                data = json.load(f)
            backends = data['backends']
            if not isinstance(backends, dict) or not all(
                    isinstance(v, dict) and isinstance(v.get('state'), str)
                    for v in backends.values()):
                raise ValueError('"backends" is not a mapping of states')
            current = data.get('current')
            if current is not None and not (
                    isinstance(current, list)
                    and all(isinstance(n, str) for n in current)):
                raise ValueError('"current" is not a list of names')
            return {'backends': backends, 'current': current,
                    'last_tid': _tid(data.get('last_tid')),
                    'pack_floor': _tid(data.get('pack_floor'))}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.critical(
                'raid=%s state file %s cannot be used (%s: %s); backends '
                'are judged by their last tids only', self.raid_name,
                self.path, type(exc).__name__, exc)
            return {}

    def save(self, backends, current, last_tid, pack_floor):
        """Write the states of `backends` (Backend objects) atomically.

        current: names holding every acknowledged commit; last_tid: the
        RAID's; pack_floor: the last pack's tid floor. Returns None, or
        the OSError when the file could not be written (also logged,
        CRITICAL): the caller decides what it may still do.
        """
        with self._lock:
            # Read under the lock: the last writer writes the newest.
            data = {'raid': self.raid_name, 'written': time.time(),
                    'format': 2, 'current': sorted(current),
                    'last_tid': last_tid.hex(),
                    'pack_floor': (pack_floor.hex() if pack_floor != z64
                                   else None),
                    'backends': {b.name: {
                        'state': b.state, 'reason': b.reason,
                        'since': b.since,
                        'last_tid': (b.last_tid.hex() if b.last_tid
                                     else None)}
                        for b in backends}}
            directory = os.path.dirname(self.path) or '.'
            temporary = None
            try:
                # An unpredictable name, created exclusively: a symlink
                # planted in the directory is never written through.
                fd, temporary = tempfile.mkstemp(
                    prefix=os.path.basename(self.path) + '.',
                    suffix='.tmp', dir=directory)
                with open(fd, 'w', encoding='utf-8') as f:
                    json.dump(data, f, indent=1, sort_keys=True)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(temporary, self.path)
                _fsync_directory(directory)
                return None
            except OSError as exc:
                logger.critical('raid=%s cannot write state file %s: %s',
                                self.raid_name, self.path, exc)
                if temporary is not None:
                    try:
                        os.unlink(temporary)
                    except OSError:
                        pass
                return exc


def _tid(value):
    """A tid from its hex form in the file (z64 for none)."""
    if value is None:
        return z64
    tid = bytes.fromhex(value)
    if len(tid) != 8:
        raise ValueError('%r is not a tid' % value)
    return tid


def _fsync_directory(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
