"""The backends' states, kept across restarts (`<raidstorage>` state-file).

Without it a restarted RAID judges its backends by their last tids only:
a backend that was degraded (disabled by an operator, divergent, an
unknown commit outcome) but is not behind would come back optimal and
serve reads unchecked. With it, a backend that was degraded or recovering
when the RAID last wrote the file starts degraded, and only a recovery
(which checks its history) makes it optimal again.

The file is JSON, rewritten atomically (temporary file, fsync, rename)
whenever a backend's state changes:

    {"raid": "main", "written": 1764662400.0,
     "backends": {"zeo1": {"state": "optimal", "reason": null,
                           "since": 1764662000.0}, ...}}
"""
import json
import logging
import os
import threading
import time

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
        """{backend name: {'state', 'reason', 'since'}} from the file.

        {} when there is no file yet. A file that cannot be read or
        parsed is reported (CRITICAL) and ignored: the RAID then judges
        its backends by their last tids, as without a state file.
        """
        try:
            with open(self.path, encoding='utf-8') as f:
                data = json.load(f)
            backends = data['backends']
            if not isinstance(backends, dict) or not all(
                    isinstance(v, dict) and isinstance(v.get('state'), str)
                    for v in backends.values()):
                raise ValueError('"backends" is not a mapping of states')
            return backends
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.critical(
                'raid=%s state file %s cannot be used (%s: %s); backends '
                'are judged by their last tids only', self.raid_name,
                self.path, type(exc).__name__, exc)
            return {}

    def save(self, backends):
        """Write the states of `backends` (Backend objects) atomically.

        A failure to write is logged (CRITICAL), never raised: the RAID
        goes on serving; the file is written again at the next change.
        """
        with self._lock:
            # Read under the lock: the last writer writes the newest.
            data = {'raid': self.raid_name, 'written': time.time(),
                    'backends': {b.name: {'state': b.state,
                                          'reason': b.reason,
                                          'since': b.since}
                                 for b in backends}}
            temporary = '%s.%d.tmp' % (self.path, os.getpid())
            try:
                with open(temporary, 'w', encoding='utf-8') as f:
                    json.dump(data, f, indent=1, sort_keys=True)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(temporary, self.path)
                _fsync_directory(os.path.dirname(self.path) or '.')
            except OSError as exc:
                logger.critical('raid=%s cannot write state file %s: %s',
                                self.raid_name, self.path, exc)
                try:
                    os.unlink(temporary)
                except OSError:
                    pass


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
