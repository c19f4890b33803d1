"""RAIDStorage: a ZODB storage that mirrors every write to N backends.

This module is the storage API surface. It stays thin: the commit path
lives in zeoraid.commit, one backend's threads and state in
zeoraid.backend, voting on answers in zeoraid.fanout.

Every method is written out (no __getattr__): ZODB and ZEO probe optional
methods with hasattr, so the RAID exposes exactly what it supports.
"""
import base64
import binascii
import bisect
import collections
import logging
import os
import shutil
import threading
import time

import ZODB.BaseStorage
import ZODB.blob
import ZODB.interfaces
import ZODB.POSException
import ZODB.serialize
import ZODB.utils
import zope.interface
from persistent.TimeStamp import TimeStamp
from ZODB.BaseStorage import DataRecord
from ZODB.BaseStorage import TransactionRecord
from ZODB.POSException import ReadOnlyError
from ZODB.POSException import StorageTransactionError
from ZODB.utils import p64
from ZODB.utils import u64
from ZODB.utils import z64

from zeoraid import fanout
from zeoraid import replicas
from zeoraid.backend import DEGRADED
from zeoraid.backend import OPTIMAL
from zeoraid.backend import RECOVERING
from zeoraid.backend import Backend
from zeoraid.backend import BackendUpcalls
from zeoraid.backend import FairLock
from zeoraid.backend import authoritative_last_tid
from zeoraid.backend import close_iterator
from zeoraid.backend import has_transaction
from zeoraid.backend import is_client_storage
from zeoraid.commit import BlobPlacement
from zeoraid.commit import Commit
from zeoraid.errors import RAIDError
from zeoraid.errors import RAIDFailedError
from zeoraid.statefile import StateFile
from zeoraid.stats import RAIDStats

logger = logging.getLogger('zeoraid')

CLUSTER_MODES = ('single', 'coop')
#: coop mode: oids are allocated in 64 residue classes, one per server.
COOP_SERVER_SLOTS = 64
#: How many recent commit tids the RAID remembers (recovery's backlog).
RECENT_TIDS = 100000
FAIL_MODES = ('close', 'read-only')

#: <raidstorage> keys (config attribute names) a running RAID takes from a
#: reload: apply_settings. The others need a restart (config.py).
ONLINE_SETTINGS = ('timeout', 'pack_timeout', 'fail_mode',
                   'recovery_txn_rate', 'recovery_byte_rate',
                   'recovery_back_pressure', 'recovery_back_pressure_hold',
                   'auto_recover', 'auto_recover_hold_down',
                   'auto_recover_max_flaps')


def key_name(attribute):
    """The configuration key of a setting's attribute (pack_timeout)."""
    return attribute.replace('_', '-')


def _seconds_or_none(value):
    return float(value or 0) or None


#: How the RAID holds an online setting it is given (others as they are).
_SETTING_TYPES = {'timeout': float, 'pack_timeout': _seconds_or_none,
                  'recovery_back_pressure': bool,
                  'recovery_back_pressure_hold': float,
                  'auto_recover_hold_down': float}


def _invalid_setting(settings):
    """What is wrong with {attribute: value} settings, or None."""
    if 'fail_mode' in settings and settings['fail_mode'] not in FAIL_MODES:
        return ('fail-mode must be one of %s, not %r'
                % ('|'.join(FAIL_MODES), settings['fail_mode']))
    for key in ('timeout', 'recovery_back_pressure_hold'):
        if key in settings and settings[key] <= 0:
            return '%s must be positive' % key_name(key)
    return None

#: Interfaces the RAID declares when every open backend provides them.
OPTIONAL_INTERFACES = (
    ZODB.interfaces.IStorageUndoable,
    ZODB.interfaces.IStorageCurrentRecordIteration,
    ZODB.interfaces.IExternalGC,
)


def _settings_changed(old_opener, new_opener):
    """Do two backend openers have different settings (reload)?

    Only openers from a configuration (config.SectionOpener) carry
    settings; others (in-process openers) are taken as unchanged.
    """
    old = getattr(old_opener, 'settings', None)
    new = getattr(new_opener, 'settings', None)
    return old is not None and new is not None and old != new


def _identity(data):
    return data


class RAIDStorage:
    """A RAID-1 storage over named backend storages."""

    def __init__(self, name, backends, *, read_only=False,
                 cluster_mode='single', fail_mode='close', blob_dir=None,
                 shared_blob_dir=False, timeout=10.0, pack_timeout=86400.0,
                 recovery_txn_rate=0, recovery_byte_rate=0,
                 recovery_back_pressure=True,
                 recovery_back_pressure_hold=0.1, server_id=None,
                 auto_recover=False, auto_recover_hold_down=60.0,
                 auto_recover_max_flaps=3, state_file=None):
        if cluster_mode not in CLUSTER_MODES:
            raise ValueError('cluster-mode must be one of %s, not %r'
                             % ('|'.join(CLUSTER_MODES), cluster_mode))
        problem = _invalid_setting(dict(
            fail_mode=fail_mode, timeout=timeout,
            recovery_back_pressure_hold=recovery_back_pressure_hold))
        if problem is not None:
            raise ValueError(problem)
        names = [n for n, _ in backends]
        if not names:
            raise ValueError('RAID %s needs at least one backend' % name)
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError('RAID %s: duplicate backend names: %s'
                             % (name, ', '.join(duplicates)))
        if shared_blob_dir and not blob_dir:
            raise ValueError('RAID %s: shared-blob-dir needs blob-dir' % name)
        if cluster_mode == 'coop' and server_id is None:
            raise ValueError(
                'RAID %s: cluster-mode coop needs a server-id (0-%d), '
                'different on every RAID server of the same backends'
                % (name, COOP_SERVER_SLOTS - 1))
        if server_id is not None and not 0 <= server_id < COOP_SERVER_SLOTS:
            raise ValueError('server-id must be between 0 and %d'
                             % (COOP_SERVER_SLOTS - 1))
        self.server_id = server_id

        self.__name__ = self._name = name
        self.timeout = float(timeout)
        self.pack_timeout = _seconds_or_none(pack_timeout)
        self.cluster_mode = cluster_mode
        self.fail_mode = fail_mode
        self._read_only = bool(read_only)
        self._failed = False
        self._closed = False
        self._wrapper = None
        self._lock = threading.Lock()           # RAID state, oid counter
        self._commit_lock = FairLock()          # held from begin to end
        self._finish_lock = threading.RLock()   # readers wait on finish
        self._commit = None
        self._ltid = z64
        self._oid = z64
        self._tid_floor = z64  # no new tid at or below it (see pack)
        self._ltid_changed = time.monotonic()
        self._foreign_tids = set()
        self.recovery_txn_rate = recovery_txn_rate
        self.recovery_byte_rate = recovery_byte_rate
        self.recovery_back_pressure = bool(recovery_back_pressure)
        self.recovery_back_pressure_hold = float(recovery_back_pressure_hold)
        self._recovery = None        # the running Recovery, if any
        self._last_recovery = None
        self._packing = False
        self._recent_tids = collections.deque(maxlen=RECENT_TIDS)
        self._recent_floor = z64
        self.stats = RAIDStats()
        self._blobs = BlobPlacement(blob_dir, shared_blob_dir)
        self._blob_dir = blob_dir
        self._generations = (
            replicas.Generations(StateFile(state_file, name),
                                 replicas.CommitMarker(state_file + '.commit'))
            if state_file else None)
        self._record = (self._generations.load() if self._generations
                        else replicas.Record())
        if cluster_mode == 'coop':
            # Other servers commit too: a backend above this server's
            # marker is normal; only the lower bound is kept.
            self._record.acked = self._record.committing = None
        self._tid_floor = self._record.pack_floor
        self._waiting = None          # the Judgement while refusing
        self._first = None            # tid of the first transaction
        self._waiter = None
        self._started = False
        self._checks = threading.Condition(self._lock)
        self._backends = [Backend(n, opener, name) for n, opener in backends]
        self._open_backends(self._backends)
        for backend in self._backends:
            if backend.storage is not None:
                backend.set_state(OPTIMAL, None)
        self._check_blob_settings()
        self._declare_interfaces()
        self._judge_start()
        self._watch_states(self._backends)
        # _recent_tids holds the commits after this tid, no older ones.
        self._recent_floor = self._ltid
        self._auto_recover = None
        self.auto_recover_hold_down = float(auto_recover_hold_down)
        self.auto_recover_max_flaps = auto_recover_max_flaps
        self._switch_auto_recover(auto_recover)
        if self._waiting is not None:
            self._start_waiter()

    def _switch_auto_recover(self, on):
        """Start or stop the auto-recover thread."""
        if on and self._auto_recover is None:
            from zeoraid.recovery import AutoRecover
            self._auto_recover = AutoRecover(
                self, hold_down=self.auto_recover_hold_down,
                max_flaps=self.auto_recover_max_flaps)
            self._auto_recover.start()
        elif not on and self._auto_recover is not None:
            self._auto_recover.stop()
            self._auto_recover = None

    # -- startup -----------------------------------------------------------

    def _open_backends(self, backends):
        """Open concurrently; a slow or failing backend starts degraded."""
        for backend in backends:
            backend.start_open(self.timeout)
        deadline = time.monotonic() + self.timeout
        for backend in backends:
            if not backend.wait_opened(max(0, deadline - time.monotonic())):
                backend.set_state(DEGRADED, 'open timed out after %gs'
                                  % self.timeout)
            elif backend.storage is None:
                backend.set_state(DEGRADED, 'open failed: %s'
                                  % fanout.describe(backend.open_error))
            else:
                self._attach(backend)

    def _attach(self, backend):
        """Register our upcalls and learn the backend's blob temp dir."""
        storage = backend.storage
        storage.registerDB(BackendUpcalls(self, backend))
        if backend.supports_blobs:
            backend.blob_temp_dir = storage.temporaryDirectory()

    def _check_blob_settings(self):
        opened = [b for b in self._backends if b.storage is not None]
        with_blobs = [b.name for b in opened if b.supports_blobs]
        without = [b.name for b in opened if not b.supports_blobs]
        if with_blobs and without:
            self._close_backends()
            raise RAIDError(
                'RAID %s: inconsistent blob settings: backends %s support '
                'blobs, backends %s do not' % (
                    self._name, ', '.join(with_blobs), ', '.join(without)))
        if self._blob_dir and without:
            self._close_backends()
            raise RAIDError(
                'RAID %s: blob-dir is set but backends %s do not support '
                'blobs (give each backend a blob-dir)'
                % (self._name, ', '.join(without)))
        if with_blobs and not self._blob_dir:
            self._close_backends()
            raise RAIDError(
                'RAID %s: backends support blobs; set blob-dir on the '
                '<raidstorage> too' % self._name)

    def _declare_interfaces(self):
        opened = [b.storage for b in self._backends if b.storage is not None]
        if not opened:
            self._close_backends()
            raise RAIDFailedError(
                'RAID %s: no working backend: %s' % (self._name, '; '.join(
                    '%s: %s' % (b.name, b.reason) for b in self._backends)))
        provided = [ZODB.interfaces.IStorage,
                    ZODB.interfaces.IMultiCommitStorage,
                    ZODB.interfaces.IStorageIteration,
                    ZODB.interfaces.IStorageRestoreable]
        for interface in OPTIONAL_INTERFACES:
            if all(interface.providedBy(s) for s in opened):
                provided.append(interface)
        self._supports_undo = all(
            getattr(s, 'supportsUndo', lambda: False)() for s in opened)
        if not self._supports_undo and \
                ZODB.interfaces.IStorageUndoable in provided:
            provided.remove(ZODB.interfaces.IStorageUndoable)
        self._record_iteration = (
            ZODB.interfaces.IStorageCurrentRecordIteration in provided)
        if self._blob_dir:
            provided.append(ZODB.interfaces.IBlobStorage)
            # A ZEO backend restores blobs through the direct path
            # (DirectTransaction.restoreBlob): ZEO itself has no
            # restoreBlob.
            if all(ZODB.interfaces.IBlobStorageRestoreable.providedBy(
                    b.storage) or b.direct is not None
                   for b in self._backends if b.storage is not None):
                provided.append(ZODB.interfaces.IBlobStorageRestoreable)
        self._provided = provided
        zope.interface.directlyProvides(self, *provided)

    def _observe(self, backend):
        """What `backend` reports for the start-up judgement."""
        if backend.storage is None:
            return replicas.Observation(False)
        try:
            last = backend.call(self.timeout, authoritative_last_tid)
            has = last == z64 or backend.call(self.timeout, has_transaction,
                                              last)
        except Exception as exc:
            self._degrade(backend, 'last tid unavailable: %s'
                          % fanout.describe(exc), check=False)
            return replicas.Observation(False)
        backend.last_tid = last
        return replicas.Observation(True, last, has)

    def _judge_start(self):
        """Decide who is current (replicas.judge); serve or wait.

        With a record (state file), a backend is current only if it was
        in the current set and its last tid is what the commit marker
        allows; if no reachable backend is, the RAID refuses writes and
        reads, and waits for the one it needs (or the operator's force).
        """
        observed = {b.name: self._observe(b) for b in self._backends}
        verdict = replicas.judge(self._record, observed)
        for backend in self._backends:
            if backend.name in verdict.stale:
                self._degrade(backend, verdict.stale[backend.name],
                              check=False)
        if not verdict.serves:
            for backend in self._backends:
                if backend.name not in verdict.current:
                    self._degrade(backend, verdict.stale.get(
                        backend.name, backend.reason
                        if backend.state != OPTIMAL else
                        'not current'), check=False)
            if not any(b.storage is not None for b in self._backends):
                self._close_backends()
                raise RAIDFailedError('RAID %s: %s' % (self._name,
                                                       verdict.refusal))
            self._waiting = verdict
            logger.critical('raid=%s state=waiting: %s', self._name,
                            verdict.refusal)
            return
        self._start_serving(verdict)

    def _start_serving(self, verdict):
        """Seed the RAID's tid and oid from the current backends."""
        self._ltid = verdict.last_tid
        self._recent_floor = self._ltid
        for backend in ([] if self._read_only else self._optimal()):
            try:
                oid = backend.call_ordered(self.timeout,
                                           lambda s: s.new_oid())
            except Exception as exc:
                self._degrade(backend, 'new_oid: %s' % fanout.describe(exc),
                              check=False)
            else:
                # new_oid hands out oid; our counter holds the last one
                # handed out, so the next RAID oid is `oid` itself.
                self._oid = max(self._oid, p64(max(u64(oid) - 1, 0)))
        if not self._optimal():
            self._close_backends()
            raise RAIDFailedError(
                'RAID %s: no working backend: %s' % (self._name, '; '.join(
                    '%s: %s' % (b.name, b.reason) for b in self._backends)))
        self._waiting = None
        self._started = True
        logger.info('raid=%s opened: status=%s last_tid=%s', self._name,
                    self.raid_status(), ZODB.utils.tid_repr(self._ltid))

    def _start_waiter(self):
        self._waiter = threading.Thread(
            target=self._wait_for_needed, name='zeoraid-%s-wait' % self._name,
            daemon=True)
        self._waiter.start()

    def _wait_for_needed(self):
        """While waiting: reopen the needed backends until one is back."""
        pause = max(0.5, min(self.timeout, 5.0))
        while not self._closed:
            verdict = self._waiting
            if verdict is None:
                return
            for name in sorted(verdict.wait_for):
                backend = self._backend(name)
                if backend.storage is None and not self._closed:
                    self._reopen(backend)
            with self._lock:
                if self._closed or self._waiting is not verdict:
                    return
            if any(self._backend(n).storage is not None
                   for n in verdict.wait_for):
                try:
                    if self._rejudge():
                        return
                except Exception:
                    logger.exception('raid=%s judging the backends again',
                                     self._name)
            time.sleep(pause)

    def _rejudge(self):
        """Judge again (a needed backend is back, or forced); True if the
        RAID serves now."""
        observed = {}
        for backend in self._backends:
            if backend.storage is None:
                observed[backend.name] = replicas.Observation(False)
            else:
                observed[backend.name] = self._observe(backend)
        verdict = replicas.judge(self._record, observed)
        if not verdict.serves:
            self._waiting = verdict
            return False
        for backend in self._backends:
            if backend.name in verdict.current:
                backend.set_state(OPTIMAL, None)
            elif backend.state == OPTIMAL:
                self._degrade(backend, verdict.stale.get(
                    backend.name, 'not current'), check=False)
        self._start_serving(verdict)
        logger.warning('raid=%s serves again: current %s, last tid %s',
                       self._name, ', '.join(verdict.current),
                       ZODB.utils.tid_repr(self._ltid))
        return True

    def raid_force(self, name):
        """The operator's override while waiting (md's --force): take
        backend `name` as current, as it is, and serve from it.

        Transactions acknowledged after its last tid are lost; backends
        that have them are diverged from now on (full rebuild).
        """
        backend = self._backend(name)
        if self._waiting is None:
            raise RAIDError('RAID %s is not waiting for a backend: nothing '
                            'to force' % self._name)
        if backend.storage is None:
            self._reopen(backend)
            if backend.storage is None:
                raise RAIDError('force refused: backend %s cannot be opened '
                                '(%s)' % (name, backend.reason))
        observed = self._observe(backend)
        if not observed.reachable:
            raise RAIDError('force refused: backend %s does not answer (%s)'
                            % (name, backend.reason))
        logger.critical(
            'raid=%s operator forced backend %s as current at last tid %s; '
            'was waiting: %s', self._name, name,
            ZODB.utils.tid_repr(observed.last_tid), self._waiting.refusal)
        self._record = replicas.Record(current=[name],
                                       floor=observed.last_tid,
                                       pack_floor=self._record.pack_floor,
                                       states=self._record.states)
        if self._generations is not None:
            self._generations.force(name)
        if not self._rejudge():
            raise RAIDError('force did not make RAID %s serve: %s'
                            % (self._name, self._waiting.refusal))
        self._save_states()
        return 'RAID %s serves from backend %s (forced), last tid %s' % (
            self._name, name, ZODB.utils.tid_repr(self._ltid))

    def _watch_states(self, backends):
        """Write the state file now and at every state change."""
        if self._generations is None:
            return
        for backend in backends:
            backend.on_change = self._state_changed
        self._save_states()

    def _state_changed(self, backend):
        if not self._closed:    # closing connections is no judgement
            self._save_states()

    def _save_states(self):
        if self._generations is not None:
            self._generations.save(self._backends, self._ltid)

    # -- backend selection and failure handling ----------------------------

    def _optimal(self):
        return [b for b in self._backends if b.optimal]

    # -- reconnects ----------------------------------------------------------

    def backend_reconnected(self, backend):
        """A backend's ZEO client (re)connected (its invalidateCache).

        Called in the backend's IO thread: no backend call from here.
        The server behind it may have been restarted on an older copy of
        its file or on another file: the backend stops serving at once
        and its history is checked in a thread of its own
        (replicas.reconnect_verdict); it is optimal again only if it has
        exactly what the RAID committed on it. Not in coop mode, where
        other servers' commits make a newer last tid normal.
        """
        if not self._started or self._closed or \
                self.cluster_mode == 'coop':
            return
        with self._lock:
            if backend.state != OPTIMAL or backend.checking or \
                    backend.last_tid is None:
                return
            backend.checking = True
        logger.warning('raid=%s backend=%s reconnected: checking its history '
                       'before it serves again', self._name, backend.name)
        threading.Thread(target=self._check_reconnected, args=(backend,),
                         name='zeoraid-%s-check' % backend.name,
                         daemon=True).start()

    def _check_reconnected(self, backend):
        reason = None
        try:
            reason = self._reconnected_history(backend)
        except Exception as exc:
            reason = ('reconnected, history could not be checked: %s'
                      % fanout.describe(exc))
        finally:
            with self._checks:
                backend.checking = False
                if reason is not None:
                    # Degraded before anyone can use it again.
                    self._degrade(backend, reason, check=False)
                self._checks.notify_all()
        if reason is None:
            logger.warning('raid=%s backend=%s history checked after the '
                           'reconnect: current at %s', self._name,
                           backend.name, ZODB.utils.tid_repr(backend.last_tid))
        self._check_failed()

    def _reconnected_history(self, backend):
        """None if the reconnected backend is current, else the reason."""
        storage = backend.storage
        deadline = time.monotonic() + self.timeout
        connected = getattr(storage, 'is_connected', lambda: True)
        while storage is not None and not connected():
            if time.monotonic() > deadline or self._closed:
                return ('reconnected, but not connected within %gs to '
                        'check its history' % self.timeout)
            time.sleep(0.01)
        if not self._commit_lock.acquire(timeout=self.timeout):
            return ('reconnected, history not checked: a transaction did '
                    'not end within %gs' % self.timeout)
        try:
            expected = backend.last_tid
            last = backend.call(self.timeout, authoritative_last_tid)
            has = expected == z64 or backend.call(
                self.timeout, has_transaction, expected)
            return replicas.reconnect_verdict(expected, self._ltid, last,
                                              has)
        finally:
            self._commit_lock.release()

    def _await_checks(self):
        """No optimal backend, but some being checked: wait for them
        (bounded by the timeout) rather than fail the RAID."""
        deadline = time.monotonic() + self.timeout
        with self._checks:
            while any(b.checking for b in self._backends):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self._checks.wait(remaining)

    def _readable(self):
        """Backends to read from, most trusted first."""
        optimal = self._optimal()
        if not optimal and any(b.checking for b in self._backends):
            self._await_checks()
            optimal = self._optimal()
        if optimal or self.fail_mode != 'read-only':
            return optimal
        return self._fallback_readable()

    def _spread(self):
        """Backends for a load: the one expected to answer first leads.

        Loads carry no cursor, so any optimal backend can answer; the
        others follow for failover.
        """
        optimal = self._current_backends()
        if len(optimal) < 2:
            return optimal or self._readable()
        return sorted(optimal, key=lambda b: b.read_cost())

    def _current_backends(self):
        """Optimal backends that have every commit the RAID knows of.

        In coop mode another server's commit reaches the backends one by
        one; a backend that has not reported it yet would serve stale
        data, and one that stays behind longer than the deadline missed it
        and is degraded.
        """
        optimal = self._optimal()
        if self.cluster_mode != 'coop':
            return optimal
        ltid = self._ltid
        current = [b for b in optimal
                   if b.last_tid is not None and b.last_tid >= ltid]
        if len(current) < len(optimal) and \
                time.monotonic() - self._ltid_changed > self.timeout:
            for backend in optimal:
                if backend not in current:
                    self._degrade(backend, (
                        'missing transactions: has not reported %s of '
                        'another RAID server' % ltid.hex()))
        return current or optimal

    def _fallback_readable(self):
        # Read-only fail mode: the last backends to go are the freshest.
        rest = [b for b in self._backends if b.storage is not None]
        return sorted(rest, key=lambda b: -b.since)

    def _quorum(self):
        if self.cluster_mode == 'coop':
            return len(self._backends) // 2 + 1
        return 1

    def _degrade(self, backend, reason, check=True):
        if backend.degrade(reason):
            self.stats.degraded(backend.name)
            if check:
                self._check_failed()

    def _check_failed(self):
        """Enter the fail mode when too few optimal backends remain.

        Backends whose history is being checked after a reconnect count:
        the check ends by calling this again.
        """
        if self._failed or len([b for b in self._backends
                                if b.state == OPTIMAL]) >= self._quorum():
            return
        self._failed = True
        logger.critical(
            'raid=%s state=failed fail_mode=%s reason=%s', self._name,
            self.fail_mode, '; '.join('%s: %s' % (b.name, b.reason)
                                      for b in self._backends))

    def _check_usable(self):
        if self._closed:
            raise RAIDFailedError('RAID %s is closed' % self._name)
        waiting = self._waiting
        if waiting is not None:
            raise RAIDFailedError('RAID %s is %s' % (self._name,
                                                     waiting.refusal))
        if self._failed and self.fail_mode == 'close':
            raise RAIDFailedError(
                'RAID %s failed: no optimal backend left' % self._name)

    def _check_writable(self):
        self._check_usable()
        if self._read_only or (self._failed and
                               self.fail_mode == 'read-only'):
            raise ReadOnlyError()
        refusal = (self._generations.refusal()
                   if self._generations is not None else None)
        if refusal is not None:
            self._save_states()     # written again now?
            refusal = self._generations.refusal()
        if refusal is not None:
            # A commit acknowledged now could not be told from a fork
            # after a restart: refuse until the record is written again.
            raise RAIDError('RAID %s refuses commits: %s' % (self._name,
                                                             refusal))

    def _read(self, fn, *args, spread=False):
        """Answer a read from one backend, failing over on errors."""
        self._check_usable()
        for backend in (self._spread() if spread else self._readable()):
            try:
                return backend.call(self.timeout, fn, *args)
            except fanout.READ_ANSWERS:
                raise
            except Exception as exc:
                if backend.optimal:
                    self._degrade(backend, 'read failed: %s'
                                  % fanout.describe(exc))
        self._check_failed()
        raise RAIDFailedError(
            'RAID %s: no backend could answer the read' % self._name)

    def _backend_invalidated(self, backend, tid, oids):
        """A backend reports a commit that this RAID did not make.

        Called in the backend's IO thread: no backend calls from here.
        In single mode nobody else may write to the backends: the backend
        is no longer a faithful replica and is degraded. In coop mode
        other RAID servers do: pass the invalidation on once, and track
        which backends have reported it (reads go to those).
        """
        if self.cluster_mode != 'coop':
            self._degrade(backend, 'foreign commit %s: another client writes '
                          'to this backend' % tid.hex())
            return
        if backend.last_tid is None or tid > backend.last_tid:
            backend.last_tid = tid
        with self._lock:
            if tid <= self._ltid or tid in self._foreign_tids:
                return
            self._foreign_tids.add(tid)
            if len(self._foreign_tids) > 1000:
                self._foreign_tids = {t for t in self._foreign_tids
                                      if t > self._ltid}
        if self._wrapper is not None:
            self._wrapper.invalidate(tid, oids)
        with self._lock:
            if tid > self._ltid:
                self._ltid = tid
                self._ltid_changed = time.monotonic()
                # A coop peer's commit is as much backlog as our own.
                self._recent_tids.append(tid)

    # -- IStorageWrapper plumbing for the backends ---------------------------

    def _wrapper_references(self, record, oids=None):
        if self._wrapper is not None:
            return self._wrapper.references(record, oids)
        return ZODB.serialize.referencesf(record, oids)

    def _wrapper_transform(self, data):
        fn = getattr(self._wrapper, 'transform_record_data', _identity)
        return fn(data)

    def _wrapper_untransform(self, data):
        fn = getattr(self._wrapper, 'untransform_record_data', _identity)
        return fn(data)

    # -- IStorage: metadata -------------------------------------------------

    def getName(self):
        return self._name

    def sortKey(self):
        return 'zeoraid:%s' % self._name

    def isReadOnly(self):
        return self._read_only or (self._failed and
                                   self.fail_mode == 'read-only')

    def supportsUndo(self):
        return self._supports_undo

    def getSize(self):
        if not self._serving():
            return 0    # ZEO's register asks: new clients get the error
        client = self._info_client()
        if client is not None:
            return client.size()
        return self._read(lambda s: s.getSize())

    def __len__(self):
        if not self._serving():
            return 0
        client = self._info_client()
        if client is not None:
            return client.length()
        return self._read(len)

    def _serving(self):
        """False while the RAID refuses every call (waiting)."""
        return self._waiting is None

    def _info_client(self):
        """A ZEO backend that knows len() and getSize() without asking.

        ZEO servers ask both after every commit; a ClientStorage answers
        them from the info its server last sent, so no thread is needed.
        """
        for backend in self._optimal():
            client = backend.direct
            if client is not None:
                return client
        return None

    def registerDB(self, wrapper):
        self._wrapper = wrapper

    def lastTransaction(self):
        with self._finish_lock:
            return self._ltid

    def tpc_transaction(self):
        commit = self._commit
        return commit.client_txn if commit is not None else None

    def new_oid(self):
        """A fresh oid from the RAID's own counter.

        The counter starts above every backend's and never depends on one
        backend, so oids stay unique across failover. In coop mode each
        RAID server takes only oids whose remainder modulo 64 is its
        server-id: two servers can never hand out the same oid, and a
        server skips what others stored (backends raise their counters on
        store, which the counter follows at startup).
        """
        self._check_writable()
        with self._lock:
            n = u64(self._oid) + 1
            if self.server_id is not None:
                slots = COOP_SERVER_SLOTS
                n += (self.server_id - n) % slots
            self._oid = oid = p64(n)
            return oid

    # -- IStorage: reads ------------------------------------------------------

    def _wait_for_finish(self):
        """Readers must not see a finish half done (IStorage ordering)."""
        with self._finish_lock:
            pass

    def load(self, oid, version=''):
        self._wait_for_finish()
        return self._read(lambda s: ZODB.utils.load_current(s, oid), spread=True)

    def loadBefore(self, oid, tid):
        self._wait_for_finish()
        cached = self.load_before_cached(oid, tid)
        if cached is not None:
            return cached
        return self._read(lambda s: s.loadBefore(oid, tid), spread=True)

    def load_before_cached(self, oid, tid):
        """loadBefore from a ZEO backend's client cache, or None.

        No thread and no wait: for the ZEO server's event loop, which
        sends loads that miss elsewhere (served.py). None also while a
        finish is in progress (readers must not see it half done).
        """
        if not self._finish_lock.acquire(blocking=False):
            return None
        try:
            if self._failed or self._closed:
                return None
            for backend in self._current_backends():
                client = backend.direct
                if client is not None:
                    result = client.cached(oid, tid)
                    if result is not None:
                        return result
            return None
        finally:
            self._finish_lock.release()

    def load_backend(self):
        """The ZEO backend a load should go to now, or None."""
        if self._failed or self._closed:
            return None
        for backend in self._spread():
            if backend.direct is not None:
                return backend
        return None

    def loadSerial(self, oid, serial):
        return self._read(lambda s: s.loadSerial(oid, serial), spread=True)

    def getTid(self, oid):
        self._wait_for_finish()
        return self._read(lambda s: s.getTid(oid), spread=True)

    def history(self, oid, size=1):
        return self._read(lambda s: s.history(oid, size=size), spread=True)

    def prefetch(self, oids, tid):
        """Let a backend fetch ahead (ZEO clients' conn.prefetch())."""
        self._check_usable()
        for backend in self._readable():
            prefetch = getattr(backend.storage, 'prefetch', None)
            if prefetch is None:
                return
            try:
                backend.call(self.timeout, lambda s: s.prefetch(oids, tid))
                return
            except Exception as exc:
                self._degrade(backend, 'prefetch: %s'
                              % fanout.describe(exc))

    # -- IStorage: the commit path ------------------------------------------

    def tpc_begin(self, transaction, tid=None, status=' '):
        self._check_writable()
        commit = self._commit
        if commit is not None and commit.client_txn is transaction:
            raise StorageTransactionError(
                'Duplicate tpc_begin calls for same transaction')
        if not self._optimal() and any(b.checking for b in self._backends):
            self._await_checks()    # before the lock: the check needs it
        self._commit_lock.acquire()
        try:
            self._check_writable()
            optimal = self._optimal()
            if not optimal:
                raise RAIDFailedError('RAID %s: no optimal backend'
                                      % self._name)
            if tid is None:
                tid = ZODB.utils.newTid(max(self._newest_tid(optimal),
                                            self._tid_floor))
            elif tid <= self._ltid:
                # Backends would take a tid from the past and corrupt
                # their order; only restores into the RAID pass a tid.
                raise StorageTransactionError(
                    'tid %s is not later than the last transaction %s'
                    % (ZODB.utils.tid_repr(tid),
                       ZODB.utils.tid_repr(self._ltid)))
            commit = Commit(self, transaction, tid, status, optimal)
            if self._generations is not None and \
                    self.cluster_mode != 'coop':
                commit.mark = self._mark_committing
            if 'tryToResolveConflict' in self.__dict__:
                # The ZEO server asked for client-side conflict
                # resolution: conflicts must carry the data we stored.
                commit.stored_data = {}
            commit.begin()
            self._commit = commit
        except BaseException:
            self._commit_lock.release()
            raise

    def _mark_committing(self, tid):
        """The commit marker, before any backend may finish `tid`."""
        self._generations.mark(self._ltid, tid)

    def _newest_tid(self, optimal):
        """The tid to exceed: our own, and in coop mode the backends'."""
        newest = self._ltid
        if self.cluster_mode == 'coop':
            futures = {b: b.submit(authoritative_last_tid) for b in optimal}
            for outcome in fanout.gather(futures, self.timeout):
                if outcome.ok:
                    newest = max(newest, outcome.value)
                else:
                    self._degrade(outcome.backend, 'last tid: %s'
                                  % fanout.describe(outcome.error))
        return newest

    def _current(self, transaction, what):
        commit = self._commit
        if commit is None or commit.client_txn is not transaction:
            raise StorageTransactionError(
                '%s called with wrong transaction' % what)
        return commit

    def store(self, oid, serial, data, version, transaction):
        assert not version, 'versions are not supported'
        self._check_writable()
        self._current(transaction, 'store').store(oid, serial, data)

    def restore(self, oid, serial, data, version, prev_txn, transaction):
        assert not version, 'versions are not supported'
        self._check_writable()
        self._current(transaction, 'restore').pipeline(
            'restore', oid, serial, data, '', prev_txn)
        self._restored_oid(oid)

    def _restored_oid(self, oid):
        """A restore brought `oid` in: new_oid must never hand it out.

        As FileStorage's restore does (set_max_oid): after a copy into
        the RAID (zodbconvert), new objects get oids above the copied
        ones, not oids that are in use.
        """
        with self._lock:
            if oid > self._oid:
                self._oid = oid

    def checkCurrentSerialInTransaction(self, oid, serial, transaction):
        self._check_writable()
        self._current(transaction, 'checkCurrentSerialInTransaction') \
            .pipeline('checkCurrentSerialInTransaction', oid, serial)

    def deleteObject(self, oid, serial, transaction):
        self._check_writable()
        self._current(transaction, 'deleteObject').pipeline(
            'deleteObject', oid, serial)

    def storeBlob(self, oid, oldserial, data, blobfilename, version,
                  transaction):
        assert not version, 'versions are not supported'
        self._check_writable()
        self._current(transaction, 'storeBlob').store_blob(
            'storeBlob', oid, oldserial, data, blobfilename, None)

    def restoreBlob(self, oid, serial, data, blobfilename, prev_txn,
                    transaction):
        self._check_writable()
        self._current(transaction, 'restoreBlob').store_blob(
            'restoreBlob', oid, serial, data, blobfilename, prev_txn)
        self._restored_oid(oid)

    def undo(self, transaction_id, transaction):
        self._check_writable()
        return self._current(transaction, 'undo').undo(transaction_id)

    def tpc_vote(self, transaction):
        commit = self._current(transaction, 'tpc_vote')
        started = time.monotonic()
        try:
            return commit.vote()
        except ZODB.POSException.ConflictError:
            self.stats.add('conflicts')
            raise
        finally:
            self.stats.observe(self.stats.vote_latency,
                               time.monotonic() - started)

    def tpc_finish(self, transaction, func=lambda tid: None):
        commit = self._current(transaction, 'tpc_finish')
        if not commit.voted:
            raise StorageTransactionError('tpc_finish called before tpc_vote')
        committed = False
        try:
            with self._finish_lock:
                started = time.monotonic()
                commit.finish()
                self.stats.observe(self.stats.finish_latency,
                                   time.monotonic() - started)
                committed = True
                func(commit.tid)
                with self._lock:
                    self._ltid = commit.tid
                    self._recent_tids.append(commit.tid)
            recovery = self._recovery
            if recovery is not None:
                recovery.limiter.credit(1, commit.nbytes)
            return commit.tid
        finally:
            self._end(commit, committed)

    def tpc_abort(self, transaction):
        commit = self._commit
        if commit is None or commit.client_txn is not transaction:
            return
        try:
            commit.abort()
        finally:
            self._end(commit, False)

    def _end(self, commit, committed):
        stats = self.stats
        if committed:
            stats.add('commits')
            stats.observe(stats.commit_latency,
                          time.monotonic() - commit.started)
        else:
            stats.add('aborts')
        try:
            commit.cleanup(committed)
        finally:
            self._commit = None
            self._commit_lock.release()

    # -- undo, iteration, pack ------------------------------------------------

    def undoLog(self, first=0, last=-20, filter=None):
        return self._read(lambda s: s.undoLog(first, last, filter))

    def undoInfo(self, first=0, last=-20, specification=None):
        return self._read(lambda s: s.undoInfo(first, last, specification))

    def _undo_tid(self, transaction_id):
        """The tid of an undo id (FileStorage-style: base64 of the tid)."""
        if isinstance(transaction_id, str):
            transaction_id = transaction_id.encode('ascii')
        try:
            tid = base64.decodebytes(transaction_id + b'\n')
        except binascii.Error:
            tid = b''
        if len(tid) != 8:
            raise ZODB.POSException.UndoError(
                'undo id %r is not a transaction id this RAID understands'
                % (transaction_id,))
        return tid

    def _oids_of_transaction(self, tid):
        for txn in self.iterator(tid, tid):
            return [record.oid for record in txn]
        return []

    def iterator(self, start=None, stop=None):
        self._check_usable()
        return RAIDIterator(self, start, stop)

    def record_iternext(self, next=None):
        if not self._record_iteration:
            raise ZODB.POSException.Unsupported('record_iternext')
        return self._read(lambda s: s.record_iternext(next))

    def pack(self, t, referencesf, gc=None):
        """Pack every optimal backend in parallel, with the pack deadline."""
        self._check_writable()
        with self._lock:
            if self._recovery is not None:
                raise RAIDError(
                    'pack refused: backend %s of RAID %s is recovering; '
                    'pack again when recovery has finished'
                    % (self._recovery.target.name, self._name))
            if self._packing:
                raise RAIDError('pack refused: RAID %s is packing already'
                                % self._name)
            self._packing = True
        try:
            self._pack(t, referencesf, gc)
        finally:
            self._packing = False

    def _pack(self, t, referencesf, gc):
        optimal = self._optimal()
        if gc is not None and not all(b.pack_takes_gc for b in optimal):
            raise ZODB.POSException.Unsupported(
                'pack(gc=...) needs backends that accept it '
                '(ClientStorage does not)')

        t = self._pack_time(t)

        def pack(storage):
            if gc is None:
                return storage.pack(t, referencesf)
            return storage.pack(t, referencesf, gc=gc)
        futures = {b: b.submit_read(pack) for b in optimal}
        outcomes = fanout.gather(futures, self.pack_timeout or 1e9)
        verdict = fanout.vote(outcomes, self._backends)
        for outcome, reason in verdict.losers:
            self._degrade(outcome.backend, 'pack: %s' % reason)
        if verdict.error is not None:
            raise verdict.error
        if not verdict.winners:
            raise RAIDFailedError('RAID %s: pack failed on every backend'
                                  % self._name)
        if self._blobs.shared:
            self._prune_shared_blobs()

    def _prune_shared_blobs(self):
        """Remove blob revisions the backends no longer have after a pack.

        With a shared blob dir the RAID keeps its own copy of every
        committed blob for its clients; without pruning it would grow
        forever.
        """
        fshelper = self._blobs.fshelper
        for oid, oid_path in fshelper.listOIDs():
            for name in sorted(os.listdir(oid_path)):
                if not name.endswith(ZODB.blob.BLOB_SUFFIX):
                    continue
                tid = ZODB.utils.repr_to_oid(name[:-len(ZODB.blob.BLOB_SUFFIX)])
                try:
                    self._read(lambda s: s.loadSerial(oid, tid))
                except (ZODB.POSException.POSKeyError, KeyError):
                    ZODB.blob.remove_committed(os.path.join(oid_path, name))
            if not os.listdir(oid_path):
                shutil.rmtree(oid_path)

    def _pack_time(self, t):
        """Make the pack time cover the same history on every backend.

        Backends start packing at slightly different moments. A commit
        whose tid is below the pack time and that lands between those
        moments would be packed on some backends and not on others. So
        the pack time is clamped to the last tid (rounded up to what
        FileStorage derives from it), and later commits are given tids
        above it: every transaction the pack covers is already on every
        backend when the packs start.
        """
        if t is None:
            t = time.time()
        if not self._commit_lock.acquire(timeout=self.timeout):
            raise RAIDError('pack refused: a transaction did not end '
                            'within %gs' % self.timeout)
        try:
            last = self._ltid
            if last != z64:
                limit = TimeStamp(last).timeTime()
                if t > limit:
                    t = limit
                    while _pack_stop(t) < last:
                        t += 1e-6
            with self._lock:
                self._tid_floor = max(self._tid_floor, _pack_stop(t))
            if self._generations is not None:
                # Before any backend packs: recovery accepts a target
                # that missed a pack only below a recorded one.
                self._generations.record_pack(self._tid_floor,
                                              self._backends, self._ltid)
        finally:
            self._commit_lock.release()
        return t

    # -- blobs -----------------------------------------------------------------

    @property
    def fshelper(self):
        """The RAID's blob dir helper (ZEO's storeBlobShared needs it)."""
        return self._blobs.fshelper

    def temporaryDirectory(self):
        if self._blobs.fshelper is None:
            raise ZODB.POSException.Unsupported('no blob-dir configured')
        return self._blobs.temp_dir

    def loadBlob(self, oid, serial):
        if self._blobs.fshelper is None:
            raise ZODB.POSException.Unsupported('no blob-dir configured')
        if self._closed:
            return self._committed_blob_file(oid, serial)
        if self._blobs.shared:
            path = self._blobs.cached_path(oid, serial)
            if path is not None:
                return path
        path = self._read(lambda s: s.loadBlob(oid, serial))
        if self._blobs.shared:
            path = self._blobs.cache(oid, serial, path)
        return path

    def _committed_blob_file(self, oid, serial):
        """A closed RAID still finds committed blob files on disk, as
        FileStorage and ClientStorage do (ZODB's loadblob_tmpstore)."""
        helpers = [self._blobs.fshelper] + [
            getattr(b.storage, 'fshelper', None) for b in self._backends]
        for fshelper in helpers:
            if fshelper is None:
                continue
            path = fshelper.getBlobFilename(oid, serial)
            if os.path.exists(path):
                return path
        raise ZODB.POSException.POSKeyError(
            'no blob file for %s@%s' % (oid.hex(), serial.hex()))

    def openCommittedBlobFile(self, oid, serial, blob=None):
        path = self.loadBlob(oid, serial)
        if blob is None:
            return open(path, 'rb')
        return ZODB.blob.BlobFile(path, 'r', blob)

    def copyTransactionsFrom(self, other):
        """Copy another storage's transactions into the RAID (restore)."""
        if ZODB.interfaces.IBlobStorageRestoreable.providedBy(self):
            ZODB.blob.copyTransactionsFromTo(other, self)
        else:
            ZODB.BaseStorage.copy(other, self)

    # -- management ------------------------------------------------------------

    def raid_status(self):
        if self._waiting is not None:
            return 'waiting'
        if self._failed or not any(b.state == OPTIMAL
                                   for b in self._backends):
            return 'failed'
        if any(b.state == RECOVERING for b in self._backends):
            return 'recovering'
        if all(b.state == OPTIMAL for b in self._backends):
            return 'optimal'
        return 'degraded'

    def _lag_seconds(self, backend):
        """How far behind the RAID the backend is, in tid time.

        An empty backend lacks the whole history: its lag is measured
        from the RAID's first transaction, not from the year 1900.
        """
        last = backend.last_tid
        if last is None or self._ltid == z64 or self._waiting is not None:
            return None
        if last == z64:
            last = self._first_tid()
            if last is None:
                return None
        return max(0.0, TimeStamp(self._ltid).timeTime()
                   - TimeStamp(last).timeTime())

    def _first_tid(self):
        """The tid of the RAID's first transaction (kept once known)."""
        if self._first is None:
            def first(storage):
                iterator = storage.iterator()
                try:
                    for txn in iterator:
                        return txn.tid
                    return None
                finally:
                    close_iterator(iterator)
            try:
                self._first = self._read(first)
            except Exception as exc:
                logger.debug('raid=%s first tid: %r', self._name, exc)
        return self._first

    def raid_details(self):
        details = {}
        for backend in self._backends:
            info = backend.details()
            info['lag_seconds'] = self._lag_seconds(backend)
            if backend.last_recovery is not None:
                info['recovery'] = backend.last_recovery.as_dict()
            details[backend.name] = info
        return details

    def raid_waiting(self):
        """Why the RAID refuses to serve and which backends it needs, or
        None when it serves."""
        waiting = self._waiting
        if waiting is None:
            return None
        return {'reason': waiting.refusal, 'needs': dict(waiting.wait_for),
                'stale': dict(waiting.stale)}

    def raid_recover(self, name, verify_all=False):
        """Start recovering a degraded backend in the background."""
        from zeoraid.recovery import RateLimiter
        from zeoraid.recovery import Recovery
        target = self._backend(name)
        with self._lock:
            if self._recovery is not None:
                raise RAIDError(
                    'recovery refused: backend %s of RAID %s is recovering '
                    'already; only one recovery runs at a time'
                    % (self._recovery.target.name, self._name))
            if self._packing:
                raise RAIDError('recovery refused: RAID %s is packing; '
                                'recover when the pack has finished'
                                % self._name)
            if target.state == OPTIMAL:
                raise RAIDError('backend %s of RAID %s is optimal: nothing '
                                'to recover' % (name, self._name))
            sources = [b for b in self._optimal() if b is not target]
            if not sources:
                raise RAIDError('recovery refused: RAID %s has no optimal '
                                'backend to copy from' % self._name)
            target.set_state(RECOVERING, 'recovering from %s'
                             % sources[0].name)
            recovery = Recovery(
                self, target, sources[0],
                RateLimiter(self.recovery_txn_rate, self.recovery_byte_rate),
                verify_all=verify_all)
            target.last_recovery = recovery.progress
            self._recovery = self._last_recovery = recovery
        if target.storage is None or is_client_storage(target.storage):
            self._reopen(target)
            if target.storage is None:
                with self._lock:
                    self._recovery = None
                target.set_state(DEGRADED, target.reason)
                raise RAIDError('recovery refused: backend %s cannot be '
                                'opened (%s)' % (name, target.reason))
            target.set_state(RECOVERING, 'recovering from %s'
                             % sources[0].name)
        recovery.start()
        return 'recovery of backend %s of RAID %s started from %s' % (
            name, self._name, sources[0].name)

    def _reopen(self, backend):
        """A fresh connection for a backend about to be recovered."""
        if backend.reopen(self.timeout) and backend.storage is not None:
            self._attach(backend)
        elif backend.storage is None:
            backend.reason = 'open failed: %s' % (
                fanout.describe(backend.open_error) if backend.open_error
                else 'timed out after %gs' % self.timeout)

    def _commits_since(self, start):
        """How many RAID commits have a tid >= start (bounded memory).

        None if unknown: start is at or before the newest tid when the
        RAID opened (what was committed before is not counted; an empty
        database has nothing before). A lower bound if more than
        RECENT_TIDS commits came since.
        """
        tids = self._recent_tids
        with self._lock:
            if z64 < self._recent_floor and start <= self._recent_floor:
                return None
            if tids and tids[0] > start and len(tids) == tids.maxlen:
                return len(tids)
            return len(tids) - bisect.bisect_left(tids, start)

    def _recovery_finished(self, recovery):
        """Called by the recovery with the commit lock held."""
        target = recovery.target
        target.set_state(OPTIMAL, None)
        recovery.progress.phase = 'done'
        logger.warning('raid=%s backend=%s recovered: %d transactions, %d '
                       'bytes copied from %s; last tid %s', self._name,
                       target.name, recovery.progress.txns_copied,
                       recovery.progress.bytes_copied, recovery.source.name,
                       target.last_tid.hex())
        with self._lock:
            self._recovery = None

    def _recovery_failed(self, recovery, exc):
        target = recovery.target
        recovery.progress.phase = 'failed'
        target.set_state(DEGRADED, 'recovery failed: %s'
                         % fanout.describe(exc))
        with self._lock:
            if self._recovery is recovery:
                self._recovery = None

    def raid_verify(self, since=None, rate=0):
        """Compare the optimal and recovering backends (read-only, online)."""
        from zeoraid import verify
        return verify.verify_raid(self, since=since, rate=rate).as_dict()

    @property
    def pack_floor(self):
        """The tid below which a pack of this RAID removed history (z64:
        none recorded; kept across restarts with a state file)."""
        return self._tid_floor

    def raid_recovery(self):
        """The running recovery (tests and the manager wait on it)."""
        return self._recovery

    def raid_last_recovery(self):
        """The recovery started last, running or ended (one that ends at
        once, refused, is already gone from raid_recovery())."""
        return self._last_recovery

    def raid_backend_names(self):
        return [b.name for b in self._backends]

    def raid_backend_storage(self, name):
        return self._backend(name).storage

    def _backend(self, name):
        for backend in self._backends:
            if backend.name == name:
                return backend
        raise RAIDError('RAID %s has no backend %r (backends: %s)' % (
            self._name, name, ', '.join(b.name for b in self._backends)))

    def raid_disable(self, name):
        backend = self._backend(name)
        with self._lock:
            if backend.state == DEGRADED:
                raise RAIDError('backend %s of RAID %s is already degraded'
                                % (name, self._name))
            if backend.optimal and len(self._optimal()) <= 1:
                raise RAIDError(
                    'refusing to disable %s: it is the last optimal backend '
                    'of RAID %s' % (name, self._name))
            backend.degrade('disabled by operator')
        return 'backend %s of RAID %s disabled' % (name, self._name)

    def apply_settings(self, settings):
        """Take changed settings while running (reload).

        settings: {attribute: new value} for keys of ONLINE_SETTINGS. A
        new timeout applies to the next call (a transaction or recovery
        under way keeps its own); new recovery rates and back-pressure
        settings apply to a running recovery at once.
        """
        unknown = sorted(set(settings) - set(ONLINE_SETTINGS))
        if unknown:
            raise RAIDError('these settings need a restart: %s'
                            % ', '.join(unknown))
        problem = _invalid_setting(settings)
        if problem is not None:
            raise RAIDError(problem)
        for key, value in sorted(settings.items()):
            old = self._setting(key)
            if key == 'auto_recover':
                self._switch_auto_recover(value)
            else:
                setattr(self, key, _SETTING_TYPES.get(key, _identity)(value))
            logger.warning('raid=%s setting %s changed by reload: %r -> %r',
                           self._name, key_name(key), old,
                           self._setting(key))
        auto = self._auto_recover
        if auto is not None:
            auto.hold_down = self.auto_recover_hold_down
            auto.max_flaps = self.auto_recover_max_flaps
        recovery = self._recovery
        if recovery is not None:
            if 'recovery_txn_rate' in settings or \
                    'recovery_byte_rate' in settings:
                recovery.limiter.set_rates(self.recovery_txn_rate,
                                           self.recovery_byte_rate)
            recovery.pressure.enabled = self.recovery_back_pressure
            recovery.pressure.hold = self.recovery_back_pressure_hold

    def _setting(self, key):
        """The running value of an online setting (config attribute)."""
        if key == 'auto_recover':
            return self._auto_recover is not None
        return getattr(self, key)

    def raid_reload(self, backends, dry_run=False):
        """Change the set of backends: new ones join degraded.

        A backend kept by name whose settings changed (both openers carry
        `settings`, config.SectionOpener) is replaced: closed, opened with
        the new settings, and degraded until it is recovered (its new
        address may be another server: recovery checks its history).
        """
        wanted = [n for n, _ in backends]
        if len(set(wanted)) != len(wanted):
            raise RAIDError('reload: duplicate backend names')
        if not wanted:
            raise RAIDError('reload: a RAID needs at least one backend')
        openers = dict(backends)
        current = {b.name: b for b in self._backends}
        added = [n for n in wanted if n not in current]
        removed = [n for n in current if n not in wanted]
        changed = [n for n in wanted if n in current
                   and _settings_changed(current[n].opener, openers[n])]
        kept = [n for n in wanted if n in current and n not in changed]
        if not any(current[n].optimal for n in kept):
            raise RAIDError(
                'reload refused: no optimal backend would remain '
                '(kept: %s%s)' % (', '.join(kept) or 'none', (
                    '; settings changed: %s' % ', '.join(changed))
                    if changed else ''))
        diff = {'added': added, 'removed': removed, 'kept': kept,
                'changed': changed}
        if dry_run or not (added or removed or changed):
            return diff
        new = [Backend(n, openers[n], self._name) for n in added + changed]
        self._open_backends(new)
        if not self._commit_lock.acquire(timeout=self.timeout):
            for backend in new:
                backend.close(self.timeout)
            raise RAIDError('reload refused: a transaction did not end '
                            'within %gs' % self.timeout)
        replacing = {b.name: b for b in new if b.name in changed}
        try:
            for backend in new:
                if backend.storage is not None:
                    backend.set_state(DEGRADED, (
                        'settings changed by reload, needs recovery'
                        if backend.name in replacing else
                        'added by reload, needs recovery'))
            self._backends = [
                replacing.get(b.name, b) for b in self._backends
                if b.name not in removed] + [
                b for b in new if b.name not in replacing]
        finally:
            self._commit_lock.release()
        self._watch_states(new)
        for name in removed + changed:
            logger.warning('raid=%s backend=%s %s by reload', self._name,
                           name, 'replaced (settings changed)'
                           if name in replacing else 'removed')
            current[name].close(self.timeout)
        return diff

    # -- closing -----------------------------------------------------------------

    def close(self):
        if self._closed:
            return
        commit = self._commit
        if commit is not None:
            try:
                self.tpc_abort(commit.client_txn)
            except Exception:
                logger.exception('raid=%s aborting on close', self._name)
        self._closed = True
        if self._generations is not None:
            if self._started:
                # A clean close: the file's last tid is the RAID's.
                self._generations.save(self._backends, self._ltid)
            self._generations.close()
        if self._auto_recover is not None:
            self._auto_recover.stop()
        recovery = self._recovery
        if recovery is not None:
            recovery.stop()
            recovery.done.wait(self.timeout)
        self._close_backends()

    def _close_backends(self):
        for backend in self._backends:
            backend.close(self.timeout)


def _pack_stop(t):
    """The tid FileStorage derives from a pack time (FileStorage.pack)."""
    return TimeStamp(*(time.gmtime(t)[:5] + (t % 60,))).raw()


class RAIDIterator:
    """Iterate transactions from one backend, failing over on errors.

    Each transaction's records are read completely (remote iterators
    require that) under the RAID's deadline, so a hung backend cannot
    hold a caller forever; on failure iteration resumes on another
    backend after the last transaction delivered.
    """

    def __init__(self, raid, start, stop):
        self._raid = raid
        self._start = start
        self._stop = stop
        self._backend = None
        self._iterator = None
        self._closed = False

    def __iter__(self):
        return self

    def _open(self):
        for backend in self._raid._readable():
            try:
                self._iterator = backend.call(
                    self._raid.timeout,
                    lambda s: iter(s.iterator(self._start, self._stop)))
                self._backend = backend
                return
            except Exception as exc:
                self._raid._degrade(backend, 'iterator: %s'
                                    % fanout.describe(exc))
        raise RAIDFailedError('RAID %s: no backend can iterate'
                              % self._raid.getName())

    def __next__(self):
        if self._closed:
            raise StopIteration
        while True:
            if self._iterator is None:
                self._open()
            try:
                txn = self._backend.call(self._raid.timeout, _read_txn,
                                         self._iterator)
            except StopIteration:
                self.close()
                raise
            except Exception as exc:
                self._raid._degrade(self._backend, 'iterator: %s'
                                    % fanout.describe(exc))
                self._iterator = None
                continue
            self._start = p64(u64(txn.tid) + 1)
            return txn

    def close(self):
        self._closed = True
        iterator = self._iterator
        self._iterator = None
        close_iterator(iterator)


class RAIDTransactionRecord(TransactionRecord):
    """A transaction read completely from a backend's iterator."""

    def __init__(self, info, records):
        # Keep what the backend has: raw bytes where it stored them
        # (FileStorage), the mapping where that is all it has (ZEO).
        extension = vars(info).get('extension_bytes')
        if extension is None:
            extension = info.extension
        TransactionRecord.__init__(self, info.tid, info.status, info.user,
                                   info.description, extension)
        self._records = records

    def __iter__(self):
        return iter(self._records)


def _read_txn(storage, iterator):
    """Read one transaction with all its records (called in a reader)."""
    info = next(iterator)
    records = [DataRecord(r.oid, r.tid, r.data, r.data_txn) for r in info]
    return RAIDTransactionRecord(info, records)
