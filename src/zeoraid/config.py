"""ZConfig datatypes for `%import zeoraid` and `<raidstorage>`."""
import re

import ZConfig.matcher
import ZODB.config

from zeoraid import ioloop
from zeoraid.storage import CLUSTER_MODES
from zeoraid.storage import FAIL_MODES
from zeoraid.storage import ONLINE_SETTINGS


def _choice(name, allowed):
    def convert(value):
        value = value.strip().lower()
        if value not in allowed:
            raise ValueError('%s must be one of %s, not %r'
                             % (name, ', '.join(allowed), value))
        return value
    convert.__name__ = name.replace('-', '_')
    return convert


_DURATION = re.compile(r'^(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h|d)?$')
_DURATION_UNITS = {'ms': 0.001, 's': 1, None: 1, 'm': 60, 'h': 3600,
                   'd': 86400}


def duration(value):
    """Seconds (float) from '500ms', '1.5s', '10', '2m', '24h' or '1d'.

    ZConfig's time-interval takes whole units only; deadlines below a
    second are normal here.
    """
    match = _DURATION.match(value.strip().lower())
    if match is None:
        raise ValueError('%r is not a duration: use a number with ms, s, m,'
                         ' h or d (a plain number means seconds)' % value)
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


cluster_mode = _choice('cluster-mode', CLUSTER_MODES)
fail_mode = _choice('fail-mode', FAIL_MODES)


def backend_openers(section):
    """[(name, opener)] for the backend sections of a <raidstorage>."""
    storages = section.storages or []
    names = [s.name for s in storages]
    if not storages:
        raise ValueError('<raidstorage %s> needs at least one backend '
                         'storage section' % section.getSectionName())
    if None in names or '' in names:
        raise ValueError('<raidstorage %s>: every backend section needs a '
                         'name, e.g. <zeoclient b1>'
                         % section.getSectionName())
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError('<raidstorage %s>: duplicate backend names: %s'
                         % (section.getSectionName(), ', '.join(duplicates)))
    return [(s.name, SectionOpener(s, section.shared_backend_io))
            for s in storages]


#: <raidstorage> keys that only a restart applies: they decide what the
#: RAID is (its tids, oids, blob layout, IO threads) rather than how it
#: behaves.
RESTART_SETTINGS = ('read_only', 'cluster_mode', 'server_id', 'blob_dir',
                    'shared_blob_dir', 'state_file', 'shared_backend_io')


def raid_settings(section):
    """{key: value} of a <raidstorage> section's own keys (not backends)."""
    config = section.config
    return {key: getattr(config, key)
            for key in ONLINE_SETTINGS + RESTART_SETTINGS}


def settings_diff(running, wanted):
    """What a reload changes: ({key: (old, new)} online, [restart keys]).

    `running` is what the RAID runs with, `wanted` what the file says now
    (both from raid_settings).
    """
    online = {key: (running[key], wanted[key]) for key in ONLINE_SETTINGS
              if running[key] != wanted[key]}
    restart = [key for key in RESTART_SETTINGS
               if running[key] != wanted[key]]
    return online, restart


class SectionOpener:
    """Opens one backend section; `settings` says how it is configured.

    reload compares the settings of a backend it keeps (same name) with
    the new configuration's: a backend whose settings changed is
    replaced (opened again with the new ones).
    """

    def __init__(self, section, shared_backend_io):
        self._open = ioloop.opener(section, shared_backend_io)
        self.settings = section_settings(section)

    def __call__(self):
        return self._open()


def section_settings(section):
    """A comparable form of a storage section and everything in it."""
    return (type(section).__name__, _comparable(section.config))


def _comparable(value):
    if isinstance(value, ZConfig.matcher.SectionValue):
        return (value.getSectionType(), tuple(sorted(
            (key, _comparable(item)) for key, item in vars(value).items()
            if not key.startswith('_'))))
    if isinstance(value, ZODB.config.BaseConfig):    # a nested section
        return section_settings(value)
    if isinstance(value, (list, tuple)):
        return tuple(_comparable(item) for item in value)
    if isinstance(value, dict):
        return tuple(sorted((repr(k), _comparable(v))
                            for k, v in value.items()))
    if value is None or isinstance(value, (str, bytes, int, float)):
        return value
    if hasattr(value, '__dict__'):      # e.g. a socket address datatype
        return (type(value).__name__, _comparable(vars(value)))
    return repr(value)


class RAIDStorageConfig(ZODB.config.BaseConfig):
    """The <raidstorage> section: checked when parsed, opened on demand."""

    def __init__(self, config):
        ZODB.config.BaseConfig.__init__(self, config)
        if config.timeout <= 0:
            raise ValueError('<raidstorage %s>: timeout must be positive'
                             % self.name)
        if config.shared_blob_dir and not config.blob_dir:
            raise ValueError('<raidstorage %s>: shared-blob-dir needs '
                             'blob-dir' % self.name)
        if config.recovery_txn_rate < 0 or config.recovery_byte_rate < 0:
            raise ValueError('<raidstorage %s>: recovery rates must not be '
                             'negative' % self.name)
        if config.recovery_back_pressure_hold <= 0:
            raise ValueError('<raidstorage %s>: recovery-back-pressure-hold'
                             ' must be positive' % self.name)
        if config.cluster_mode == 'coop' and config.server_id is None:
            raise ValueError('<raidstorage %s>: cluster-mode coop needs a '
                             'server-id (0-63), different on every RAID '
                             'server of the same backends' % self.name)
        self.backends = backend_openers(config)

    def open(self, database_name='unnamed', databases=None):
        c = self.config
        from zeoraid.storage import RAIDStorage
        return RAIDStorage(
            self.name, self.backends, read_only=c.read_only,
            cluster_mode=c.cluster_mode, fail_mode=c.fail_mode,
            blob_dir=c.blob_dir, shared_blob_dir=c.shared_blob_dir,
            timeout=c.timeout, pack_timeout=c.pack_timeout,
            recovery_txn_rate=c.recovery_txn_rate,
            recovery_byte_rate=c.recovery_byte_rate,
            recovery_back_pressure=c.recovery_back_pressure,
            recovery_back_pressure_hold=c.recovery_back_pressure_hold,
            server_id=c.server_id, auto_recover=c.auto_recover,
            auto_recover_hold_down=c.auto_recover_hold_down,
            auto_recover_max_flaps=c.auto_recover_max_flaps,
            state_file=c.state_file)
