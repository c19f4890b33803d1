"""Online recovery: bring a degraded backend back by copying what it lacks.

    verify    the target's history must be a prefix of the source's
              (tids, metadata and records of a window at the junction)
    copy      source.iterator(start) -> target tpc_begin(txn, tid, status),
              restore / restoreBlob (ZEO: blob messages) per record, vote,
              finish (tid checked);
              a reader thread reads ahead while the target commits
    finalize  with the RAID's commit lock held, copy the last few
              transactions and make the target optimal atomically

The copy is rate-limited (transactions/s and bytes/s), but every live
commit adds its own transaction and bytes on top of the cap, so the copy
always outpaces live traffic and the backlog shrinks. When the target
cannot commit faster than the live load (the cap is not what limits),
back-pressure makes live commits wait for short spells (BackPressure).
"""
import collections
import itertools
import logging
import os
import queue
import shutil
import tempfile
import threading
import time

import ZODB.blob
import ZODB.interfaces
import ZODB.POSException
import ZODB.utils
from persistent.TimeStamp import TimeStamp
from ZODB.Connection import TransactionMetaData
from ZODB.utils import maxtid
from ZODB.utils import p64
from ZODB.utils import u64
from ZODB.utils import z64

from zeoraid import direct as direct_client
from zeoraid.backend import authoritative_last_tid
from zeoraid.backend import close_iterator
from zeoraid.backend import current_serial
from zeoraid.backend import has_transaction
from zeoraid.errors import BackendTimeout
from zeoraid.errors import RAIDError

logger = logging.getLogger('zeoraid')

#: Transactions left at which the final catch-up takes the commit lock.
FINAL_CATCHUP = 20
#: Seconds of history before the junction compared by verify.
VERIFY_WINDOW_SECONDS = 300
#: Transactions read ahead of the copier.
READ_AHEAD = 64

#: Transactions sent to a ZEO target before the copier waits for the
#: oldest to be committed (direct.RestoreStream).
RESTORE_WINDOW = 16
#: ... handed to the target's IO thread this many at a time (fewer when
#: the reader has nothing more yet).
RESTORE_SEND_BATCH = 8

#: Transactions read from a ZEO source per hand-off (direct.BatchIterator).
READ_BATCH = 32

#: Back-pressure: seconds over which the backlog must shrink by
#: PRESSURE_MIN_SHRINK (a fraction), else live commits are made to wait.
PRESSURE_WINDOW = 5.0
PRESSURE_MIN_SHRINK = 0.1
#: Back-pressure spell: at most this many transactions / seconds copied
#: with the RAID's commit lock held, then as long with it free.
PRESSURE_CHUNK = 100
PRESSURE_HOLD = 0.1
#: Back-pressure: the least free time after a spell, as part of a spell
#: (live commits keep at least 1/33 of the time).
PRESSURE_MIN_FREE = 1 / 32


class RecoveryError(RAIDError):
    """Recovery cannot go on (the message says why and what to do)."""


class DivergedError(RecoveryError):
    """The target holds history the source does not: full rebuild needed."""


class RateLimiter:
    """Caps transactions/s and bytes/s; live commits add credit on top.

    The budget at time t is  cap * elapsed + credit  where credit is what
    live commits added since the start. The copier may copy a transaction
    when what it has copied (plus this one) fits into the budget. So the
    copier runs at the cap plus the live rate: the backlog shrinks at the
    cap's rate at least, whatever the live load. A cap of 0 is unlimited.
    """

    def __init__(self, txn_rate=0, byte_rate=0, clock=time.monotonic,
                 sleep=time.sleep):
        self.txn_rate = float(txn_rate or 0)
        self.byte_rate = float(byte_rate or 0)
        self.clock = clock
        self.sleep = sleep
        self.start = clock()
        self.used_txns = 0
        self.used_bytes = 0
        self.credit_txns = 0
        self.credit_bytes = 0
        self._lock = threading.Lock()

    def set_rates(self, txn_rate, byte_rate):
        """New caps (reload), counted from now: what was copied and
        credited so far neither speeds up nor holds back the new rate."""
        with self._lock:
            self.txn_rate = float(txn_rate or 0)
            self.byte_rate = float(byte_rate or 0)
            self.start = self.clock()
            self.used_txns = self.used_bytes = 0
            self.credit_txns = self.credit_bytes = 0

    def credit(self, txns, nbytes):
        """A live commit happened: let the copier do as much more."""
        with self._lock:
            self.credit_txns += txns
            self.credit_bytes += nbytes

    def delay(self, nbytes):
        """Seconds to wait before copying a transaction of nbytes."""
        with self._lock:
            elapsed = self.clock() - self.start
            waits = [0.0]
            if self.txn_rate:
                need = self.used_txns + 1 - self.credit_txns
                waits.append(need / self.txn_rate - elapsed)
            if self.byte_rate:
                need = self.used_bytes + nbytes - self.credit_bytes
                waits.append(need / self.byte_rate - elapsed)
            return max(waits)

    def acquire(self, nbytes, stop=None):
        """Wait until a transaction of nbytes may be copied; count it."""
        while True:
            wait = self.delay(nbytes)
            if wait <= 0:
                break
            if stop is not None and stop.is_set():
                return False
            self.sleep(min(wait, 0.5))
        with self._lock:
            self.used_txns += 1
            self.used_bytes += nbytes
        return True


class BackPressure:
    """Makes live commits wait when the copy cannot outpace them.

    The rate limiter's credit rule lets the copier go as fast as live
    commits come, but not faster than the target can commit. If the
    backlog (RAID commits the target lacks) has not shrunk by
    PRESSURE_MIN_SHRINK over PRESSURE_WINDOW seconds, back-pressure
    engages until the recovery ends: the copier takes the RAID's commit
    lock for a spell (at most PRESSURE_CHUNK transactions or
    PRESSURE_HOLD seconds; live commits wait, the copier runs alone),
    then leaves it free for as long as it held it. While the backlog
    still does not shrink, each further window halves the free time,
    down to PRESSURE_MIN_FREE of a spell. A live commit waits at most one
    spell.

    enabled (recovery-back-pressure) and hold (the spell's length,
    recovery-back-pressure-hold) are the operator's; a reload may change
    them while the recovery runs. Disabled, a backlog that does not
    shrink is only logged.
    """

    def __init__(self, enabled=True, hold=PRESSURE_HOLD,
                 clock=time.monotonic):
        self.enabled = enabled
        self.hold = hold
        self.clock = clock
        self.engaged = False
        self.free_ratio = 1.0      # free time after a spell / its length
        self.spells = 0
        self._mark = None          # (time, backlog) the window started at
        self._free_until = 0.0

    def due(self, backlog):
        """Should the copier take the commit lock for a spell now?"""
        now = self.clock()
        if backlog <= FINAL_CATCHUP:
            return False
        if self._mark is None:
            self._mark = (now, backlog)
        elif now - self._mark[0] >= PRESSURE_WINDOW:
            since, before = self._mark
            self._mark = (now, backlog)
            if before - backlog < PRESSURE_MIN_SHRINK * before:
                self._tighten(before, backlog, now - since)
        return self.enabled and self.engaged and now >= self._free_until

    def _tighten(self, before, backlog, seconds):
        if not self.enabled:
            logger.warning('recovery: backlog %d -> %d transactions in '
                           '%.0fs, and back-pressure is off '
                           '(recovery-back-pressure): the recovery may not '
                           'end while live commits come this fast',
                           before, backlog, seconds)
            return
        if self.engaged:
            self.free_ratio = max(self.free_ratio / 2, PRESSURE_MIN_FREE)
        self.engaged = True
        logger.warning('recovery: backlog %d -> %d transactions in %.0fs: '
                       'live commits now wait for short spells '
                       '(back-pressure, free time %.0f%% of a spell)',
                       before, backlog, seconds, self.free_ratio * 100)

    def spell_over(self, started, copied):
        """Has the current spell copied or lasted enough?"""
        return (copied >= PRESSURE_CHUNK
                or self.clock() - started >= self.hold)

    def released(self, started):
        """A spell that began at `started` ended: leave the lock free."""
        now = self.clock()
        self.spells += 1
        self._free_until = now + (now - started) * self.free_ratio


def txn_size(txn):
    return sum(len(r.data or b'') for r in txn)


def describe(exc):
    text = str(exc)
    return '%s: %s' % (type(exc).__name__, text) if text else \
        type(exc).__name__


class Progress:
    """What a running (or the last) recovery reports to raid_details()."""

    def __init__(self, source):
        self.phase = 'verify'
        self.source = source
        self.started = time.time()
        self.txns_copied = 0
        self.bytes_copied = 0
        self.copied_tid = None
        self.newest_tid = None
        self.error = None
        self.finished = None
        self.backpressure_spells = 0
        #: copied in the final catch-up, with live commits waiting
        self.final_catchup_txns = 0

    def as_dict(self):
        elapsed = max(time.time() - self.started, 1e-9)
        rate = self.txns_copied / elapsed
        behind = None
        eta = None
        if self.copied_tid and self.newest_tid:
            behind = max(0.0, _tid_time(self.newest_tid)
                         - _tid_time(self.copied_tid))
            covered = _tid_time(self.copied_tid) - self._first_time
            if covered > 0 and self.phase == 'copy':
                eta = behind / (covered / elapsed)
        return {
            'phase': self.phase,
            'source': self.source,
            'started': self.started,
            'finished': self.finished,
            'txns_copied': self.txns_copied,
            'bytes_copied': self.bytes_copied,
            'rate_txn_s': round(rate, 1),
            'rate_bytes_s': round(self.bytes_copied / elapsed, 1),
            'copied_tid': self.copied_tid.hex() if self.copied_tid else None,
            'backlog_seconds': (round(behind, 3) if behind is not None
                                else None),
            'eta_seconds': round(eta, 1) if eta is not None else None,
            'backpressure_spells': self.backpressure_spells,
            'final_catchup_txns': self.final_catchup_txns,
            'error': self.error,
        }

    _first_time = 0.0

    def start_copy(self, first_tid):
        self.phase = 'copy'
        self._first_time = _tid_time(first_tid) if first_tid != z64 else 0.0


def _tid_time(tid):
    return TimeStamp(tid).timeTime()


class Recovery:
    """One recovery of one target backend, run in a thread of its own."""

    def __init__(self, raid, target, source, limiter, verify_all=False):
        self.raid = raid
        self.target = target
        self.source = source
        self.limiter = limiter
        self.verify_all = verify_all
        self.progress = Progress(source.name)
        self.pressure = BackPressure(raid.recovery_back_pressure,
                                     raid.recovery_back_pressure_hold)
        self._lock_kept = False     # _copy_range returned in a spell
        self.stop_requested = threading.Event()
        self.done = threading.Event()
        self.thread = threading.Thread(
            target=self.run, name='zeoraid-recover-%s' % target.name,
            daemon=True)

    @property
    def timeout(self):
        return self.raid.timeout

    def start(self):
        self.thread.start()

    def stop(self):
        self.stop_requested.set()

    # -- the three phases ----------------------------------------------------

    def run(self):
        try:
            start = self.verify()
            self.copy(start)
        except Exception as exc:
            self.progress.error = describe(exc)
            self.raid._recovery_failed(self, exc)
        finally:
            self.progress.finished = time.time()
            self.done.set()

    def verify(self):
        """Return the first tid to copy, or raise DivergedError."""
        self.progress.phase = 'verify'
        target_last = self.target.call(self.timeout, authoritative_last_tid)
        self.target.last_tid = target_last
        if target_last == z64:
            logger.warning('raid=%s backend=%s recovery: target is empty, '
                           'full rebuild from %s', self.raid.getName(),
                           self.target.name, self.source.name)
            return z64
        if self.verify_all:
            window_start = z64
        else:
            window_start = TimeStamp(*time.gmtime(
                _tid_time(target_last) - VERIFY_WINDOW_SECONDS)[:5] + (
                0.0,)).raw()
        target_txns = self._read_range(self.target, window_start, target_last)
        source_has_last = self.source.call(self.timeout, has_transaction,
                                           target_last)
        # History a pack removed is accepted only below a pack this RAID
        # recorded (durably, in its state file): without one, a missing
        # or superseded transaction is a foreign commit, not a pack.
        packed = target_last < self.raid.pack_floor
        if not target_txns or target_txns[-1].tid != target_last:
            if not source_has_last and packed:
                # Neither has it: a pack removed it on both.
                logger.warning(
                    'raid=%s backend=%s recovery: last tid %s was packed '
                    'away on target and source (pack up to %s); junction '
                    'not compared', self.raid.getName(), self.target.name,
                    target_last.hex(), self.raid.pack_floor.hex())
                return p64(u64(target_last) + 1)
            target_last, target_txns = self._phantom_last_tid(
                target_last, window_start, target_txns)
            if target_last == z64:
                return z64
            source_has_last = self.source.call(self.timeout,
                                               has_transaction, target_last)
            packed = target_last < self.raid.pack_floor
        elif not source_has_last and packed and self._superseded_on_source(
                target_txns[-1]):
            # The source was packed while the target was degraded: the
            # target's last transaction is history the pack removed (all
            # its objects have newer revisions on the source). A
            # transaction only the target committed would be newer than
            # the source's revisions.
            logger.warning(
                'raid=%s backend=%s recovery: target missed a pack (its '
                'last transaction %s is packed away on %s, pack up to %s); '
                'junction not compared', self.raid.getName(),
                self.target.name, target_last.hex(), self.source.name,
                self.raid.pack_floor.hex())
            return p64(u64(target_last) + 1)
        if source_has_last and packed:
            # The optimal backends were packed while the target was
            # degraded: their history up to the pack time is shorter, and
            # comparing it with the target's would always differ. The
            # target's last transaction is on the source; the current
            # data is what the copy continues from; the next pack evens
            # the history out.
            logger.warning(
                'raid=%s backend=%s recovery: target missed a pack (last '
                'tid %s, pack up to %s); junction not compared',
                self.raid.getName(), self.target.name, target_last.hex(),
                self.raid.pack_floor.hex())
            return p64(u64(target_last) + 1)
        source_txns = self._read_range(self.source, window_start, target_last)
        if not source_txns or source_txns[-1].tid != target_last:
            raise DivergedError(
                'backend %s has transaction %s which source %s does not '
                'have, and it is not history a pack of this RAID removed: '
                'it committed something the RAID did not (a foreign '
                'commit, or an unknown outcome). It needs a full rebuild: '
                'stop its server, move its storage away so it starts '
                'empty, then recover again.'
                % (self.target.name, target_last.hex(), self.source.name))
        for mine, theirs in zip(target_txns, source_txns):
            difference = compare_transactions(theirs, mine)
            if difference:
                raise DivergedError(
                    'backend %s diverges from %s at transaction %s (%s). It '
                    'needs a full rebuild: stop its server, move its '
                    'storage away so it starts empty, then recover again.'
                    % (self.target.name, self.source.name,
                       (mine.tid or theirs.tid).hex(), difference))
        if len(target_txns) != len(source_txns):
            raise DivergedError(
                'backend %s has %d transactions between %s and %s, source '
                '%s has %d: it needs a full rebuild' % (
                    self.target.name, len(target_txns), window_start.hex(),
                    target_last.hex(), self.source.name, len(source_txns)))
        return p64(u64(target_last) + 1)

    def _superseded_on_source(self, txn):
        """Has every object of txn a newer revision on the source?"""
        def check(storage):
            for record in txn:
                try:
                    serial = ZODB.utils.load_current(storage, record.oid)[1]
                except (ZODB.POSException.POSKeyError, KeyError):
                    # Gone by garbage collection, or never there: the
                    # two cannot be told apart, so do not assume a pack.
                    return False
                if serial <= txn.tid:
                    return False
            return True
        return self.source.call(self.timeout, check)

    def _phantom_last_tid(self, reported, window_start, target_txns):
        """The target's real last tid when it reports one it does not have.

        A FileStorage that crashed between vote and finish drops the
        unfinished transaction when it reopens, but still reports its tid
        as the last one. The copy then starts after the last transaction
        the target really has; the dropped tid itself may be copied (ZEO
        accepts a tid equal to its last one).
        """
        if not target_txns and window_start != z64:
            target_txns = self._read_range(self.target, z64, reported)
        real = target_txns[-1].tid if target_txns else z64
        logger.warning(
            'raid=%s backend=%s recovery: reported last tid %s is of an '
            'unfinished transaction (crash between vote and finish); it '
            'really has up to %s', self.raid.getName(), self.target.name,
            reported.hex(), real.hex())
        def first_after(storage):
            for txn in storage.iterator(p64(u64(real) + 1)):
                return txn.tid
            return None
        next_tid = self.source.call(self.timeout, first_after)
        if next_tid is not None and next_tid < reported:
            raise DivergedError(
                'backend %s reports last tid %s but has only up to %s, and '
                'source %s committed %s in between: it needs a full rebuild'
                % (self.target.name, reported.hex(), real.hex(),
                   self.source.name, next_tid.hex()))
        if real == z64 and next_tid is not None and next_tid != reported:
            raise DivergedError(
                'backend %s is empty but reports last tid %s: it needs a '
                'full rebuild (move its storage away, restart it, recover)'
                % (self.target.name, reported.hex()))
        self.target.last_tid = real
        return real, target_txns

    def _read_range(self, backend, start, stop):
        def read(storage):
            it = storage.iterator(start, stop)
            try:
                return [_materialize(t) for t in it]
            finally:
                close_iterator(it)
        return backend.call(max(self.timeout, 60), read)

    def copy(self, start):
        """Copy from start until caught up; finalize under the lock."""
        self.progress.start_copy(start)
        self.progress.newest_tid = self.raid.lastTransaction()
        while True:
            if self.stop_requested.is_set():
                raise RecoveryError('recovery stopped on request')
            newest = self.raid.lastTransaction()
            self.progress.newest_tid = newest
            if start > newest:
                if self._finalize(start):
                    return
                continue
            start = self._copy_range(start, final=False)
            if self._lock_kept:
                # Caught up during a back-pressure spell: finalize with
                # the commit lock it holds (live commits would otherwise
                # refill the backlog before the lock is taken again).
                self._lock_kept = False
                try:
                    if self._finalize_held(start):
                        return
                finally:
                    self.raid._commit_lock.release()
                continue
            # The source ran dry a moment ago: the live commits since are
            # few enough for the final catch-up (which takes up to 5x).
            if self._backlog_small(start, FINAL_CATCHUP * 5):
                if self._finalize(start):
                    return

    def _backlog_small(self, start, final_catchup=FINAL_CATCHUP):
        newest = self.raid.lastTransaction()
        if start > newest:
            return True
        backlog = self.raid._commits_since(start)
        return backlog is not None and backlog <= final_catchup

    def _finalize(self, start):
        """Copy the rest with the commit lock held; make target optimal."""
        raid = self.raid
        if not raid._commit_lock.acquire(timeout=self.timeout):
            return False   # busy: go on copying and try again
        try:
            return self._finalize_held(start)
        finally:
            raid._commit_lock.release()

    def _finalize_held(self, start):
        """_finalize's work; the caller holds the RAID's commit lock."""
        raid = self.raid
        self.progress.phase = 'finalize'
        newest = raid.lastTransaction()
        if newest >= start:
            backlog = raid._commits_since(start)
            if backlog is None or backlog > FINAL_CATCHUP * 5:
                self.progress.phase = 'copy'
                return False
            start = self._copy_range(start, final=True)
        target_last = self.target.call(self.timeout,
                                       authoritative_last_tid)
        if target_last != raid.lastTransaction():
            raise RecoveryError(
                'after the final catch-up backend %s is at %s, RAID at '
                '%s' % (self.target.name, target_last.hex(),
                        raid.lastTransaction().hex()))
        self.target.last_tid = target_last
        raid._recovery_finished(self)
        return True

    def _copy_range(self, start, final):
        """Copy transactions >= start with read-ahead; return next start.

        Transactions without blobs go to a ZEO target through a
        RestoreStream, up to RESTORE_WINDOW of them in flight; every
        return drains it, so what was returned is committed.
        """
        stop_reader = threading.Event()
        pipe = queue.Queue(maxsize=READ_AHEAD)
        reader = threading.Thread(
            target=self._read_ahead, args=(start, pipe, stop_reader),
            name='zeoraid-recover-read-%s' % self.target.name, daemon=True)
        reader.start()
        spell = None        # [started, copied] while holding the lock
        writer = _Writer(self)
        try:
            while True:
                item = pipe.get(timeout=max(self.timeout * 2, 30))
                if item is None:
                    writer.drain()
                    if spell is not None:
                        spell = self._keep_spell()
                    return start
                if isinstance(item, Exception):
                    writer.drain()
                    self._source_failed(item)
                    return start
                nbytes = txn_size(item)
                if not final and spell is None:
                    spell = self._start_spell(start)
                if not (final or spell) and not self.limiter.acquire(
                        nbytes, self.stop_requested):
                    raise RecoveryError('recovery stopped on request')
                writer.copy(item, nbytes)
                if pipe.empty():
                    writer.flush()     # nothing more to send with it
                if spell is not None:
                    spell[1] += 1
                    if self.pressure.spell_over(*spell):
                        writer.drain()
                        self._end_spell(spell)
                        spell = None
                start = p64(u64(item.tid) + 1)
                if self.stop_requested.is_set():
                    raise RecoveryError('recovery stopped on request')
                if not final and self._backlog_small(start):
                    # Caught up: finalize now. Under steady live commits
                    # the source's iterator may never run dry.
                    writer.drain()
                    if spell is not None:
                        spell = self._keep_spell()
                    return start
        except queue.Empty:
            writer.drain()
            self._source_failed(RecoveryError(
                'source %s gave no transaction for %gs'
                % (self.source.name, max(self.timeout * 2, 30))))
            return start
        finally:
            writer.close()
            if spell is not None:
                self._end_spell(spell)
            stop_reader.set()
            # Unblock a reader waiting on a full pipe; drop the blob
            # copies of what it had read ahead.
            try:
                while True:
                    item = pipe.get_nowait()
                    if isinstance(item, CopiedTransaction):
                        _remove_blob_copies(item)
            except queue.Empty:
                pass

    def _copied(self, txn, nbytes):
        """The target committed txn."""
        self.progress.txns_copied += 1
        self.progress.bytes_copied += nbytes
        self.progress.copied_tid = txn.tid
        if self.progress.phase == 'finalize':
            self.progress.final_catchup_txns += 1

    def _start_spell(self, start):
        """Back-pressure: take the commit lock if it is due (BackPressure).

        Returns [started, copied] if the lock is now held, else None.
        """
        backlog = self.raid._commits_since(start)
        if backlog is None:
            # Still copying what was committed before the RAID opened: a
            # fixed amount, which live commits do not make grow.
            return None
        if not self.pressure.due(backlog):
            return None
        if not self.raid._commit_lock.acquire(timeout=self.timeout):
            return None
        return [self.pressure.clock(), 0]

    def _keep_spell(self):
        """Caught up during a spell: copy() finalizes with its lock."""
        self._lock_kept = True
        self.pressure.spells += 1
        self.progress.backpressure_spells = self.pressure.spells
        return None

    def _end_spell(self, spell):
        self.raid._commit_lock.release()
        self.pressure.released(spell[0])
        self.progress.backpressure_spells = self.pressure.spells

    def _source_transactions(self, start, stop):
        """The source's transactions from start, read completely.

        From a ZEO source in batches (direct.BatchIterator: one hand-off
        per batch), else one transaction per call of its iterator.
        """
        direct = self.source.direct
        if direct is not None:
            reader = direct.iterate(start)
            try:
                while not stop.is_set():
                    batch = reader.next_batch(READ_BATCH, self.timeout)
                    if not batch:
                        return
                    for info in batch:
                        yield CopiedTransaction(info)
            finally:
                reader.close()
            return
        iterator = self.source.call(
            self.timeout, lambda s: iter(s.iterator(start)))
        try:
            while not stop.is_set():
                try:
                    yield self.source.call(self.timeout, _next_materialized,
                                           iterator)
                except StopIteration:
                    return
        finally:
            close_iterator(iterator)

    def _read_ahead(self, start, pipe, stop):
        """Read source transactions into the pipe (runs in its own thread)."""
        transactions = self._source_transactions(start, stop)
        try:
            for txn in transactions:
                if stop.is_set():
                    break
                txn.blobs = self._fetch_blobs(txn)
                while not stop.is_set():
                    try:
                        pipe.put(txn, timeout=0.2)
                        break
                    except queue.Full:
                        continue
                else:
                    _remove_blob_copies(txn)
            item = None
        except Exception as exc:
            item = exc
        finally:
            transactions.close()
        while not stop.is_set():
            try:
                pipe.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def _fetch_blobs(self, txn):
        """oid -> path of a private copy of each blob of the transaction."""
        if not ZODB.interfaces.IBlobStorage.providedBy(self.target.storage):
            return {}
        blobs = {}
        last_blob_record = {}
        for record in txn:
            if record.data and ZODB.blob.is_blob_record(record.data):
                last_blob_record[record.oid] = record
        for record in last_blob_record.values():
            try:
                path = self.source.call(
                    max(self.timeout, 60),
                    lambda s: s.loadBlob(record.oid, record.tid))
            except ZODB.POSException.POSKeyError:
                logger.warning('raid=%s recovery: blob %s@%s missing on '
                               'source %s', self.raid.getName(),
                               record.oid.hex(), record.tid.hex(),
                               self.source.name)
                continue
            fd, copy = tempfile.mkstemp(
                suffix='.tmp', dir=self.target.blob_temp_dir)
            os.close(fd)
            shutil.copyfile(path, copy)
            blobs[record.oid] = copy
        return blobs

    def _vote_and_finish(self, writer):
        """Vote and finish a direct transaction (in the target's worker)."""
        reply = direct_client.Replies(1).slot()
        writer.send_vote(reply)
        answer = reply.result(self.timeout)
        if writer.needs_resolution(answer):
            raise RecoveryError('target %s reported a conflict while '
                                'restoring' % self.target.name)
        writer.complete_vote(answer)
        reply = direct_client.Replies(1).slot()
        writer.send_finish(reply)
        tid = reply.result(self.timeout)
        writer.complete_finish(tid)
        return tid

    def _copy_one(self, txn):
        """Commit one source transaction on the target with its own tid.

        A blob object may appear several times in a transaction (ZEO's
        storeBlob writes a store, then the blob's record; a pack leaves
        only the last). The blob goes with the object's last record, the
        earlier ones are restored as they are: with restoreBlob, or for a
        ZEO target through the direct path with ZEO's blob messages alone
        (DirectTransaction.restore_blob, which sends them last and in
        reverse at the vote: the ZEO server stores blob records after the
        other records, the last one sent first). Only a ZEO target without the direct path
        uses ClientStorage.storeBlob, which writes two records: the blob
        then goes with the object's last but one record and replaces the
        last.
        """
        def copy(storage):
            restore_blob = getattr(storage, 'restoreBlob', None)
            direct = self.target.direct
            if direct is not None and direct.storage is storage:
                # Records go in one batch with the vote, and the target's
                # client cache is not filled with history.
                writer = direct.begin(txn, txn.tid, txn.status,
                                      cache_data=False)
            else:
                writer = storage
                storage.tpc_begin(txn, txn.tid, txn.status)
            # ZEO has no restoreBlob; a DirectTransaction writes the same
            # one record (restore_blob).
            restore_blob_direct = getattr(writer, 'restore_blob', None)
            one_record = (restore_blob is not None
                          or restore_blob_direct is not None)
            positions = {}
            for i, record in enumerate(txn):
                if record.oid in txn.blobs:
                    positions.setdefault(record.oid, []).append(i)
            blob_at = {}
            skip = set()
            for oid, where in positions.items():
                if one_record or len(where) < 2:
                    blob_at[where[-1]] = oid
                else:
                    blob_at[where[-2]] = oid
                    skip.add(where[-1])
            try:
                for i, record in enumerate(txn):
                    if i in skip:
                        continue
                    blob = txn.blobs.get(record.oid) if i in blob_at \
                        else None
                    if blob is None:
                        writer.restore(record.oid, record.tid, record.data,
                                       '', record.data_txn, txn)
                    elif restore_blob is not None:
                        restore_blob(record.oid, record.tid, record.data,
                                     blob, record.data_txn, txn)
                    elif restore_blob_direct is not None:
                        restore_blob_direct(
                            record.oid, record.tid, record.data, blob,
                            record.data_txn,
                            current_serial(storage, record.oid))
                    else:
                        writer.storeBlob(record.oid,
                                         current_serial(storage, record.oid),
                                         record.data, blob, '', txn)
                if writer is storage:
                    storage.tpc_vote(txn)
                    tid = storage.tpc_finish(txn)
                else:
                    tid = self._vote_and_finish(writer)
            except BaseException:
                storage.tpc_abort(txn)
                raise
            finally:
                for path in txn.blobs.values():
                    if os.path.exists(path):
                        os.remove(path)
            if tid is not None and tid != txn.tid:
                raise RecoveryError(
                    'target %s committed %s as %s' % (
                        self.target.name, txn.tid.hex(), tid.hex()))
            return tid
        size = txn_size(txn) + sum(os.path.getsize(p) for p in
                                   txn.blobs.values() if os.path.exists(p))
        self.target.call_ordered(self.deadline(size), copy)

    def deadline(self, nbytes):
        """Seconds the target may take to commit nbytes: it grows with
        the transaction's size (blobs), so a hung target is cut off as
        quickly as a live commit would be."""
        return self.timeout * (1 + nbytes / 10e6)

    def _source_failed(self, exc):
        """The source failed: continue from another optimal backend."""
        self.raid._degrade(self.source, 'recovery source failed: %s'
                           % describe(exc))
        candidates = [b for b in self.raid._optimal()
                      if b is not self.target]
        if not candidates:
            raise RecoveryError('source %s failed (%s) and no other optimal '
                                'backend can take over'
                                % (self.source.name, describe(exc)))
        logger.warning('raid=%s backend=%s recovery: source %s failed (%s), '
                       'continuing from %s', self.raid.getName(),
                       self.target.name, self.source.name, describe(exc),
                       candidates[0].name)
        self.source = candidates[0]
        self.progress.source = self.source.name


class _Writer:
    """Commits copied transactions on the target, in order.

    Through a RestoreStream (several in flight) where the target is a ZEO
    client and the transaction has no blob; else one at a time with
    Recovery._copy_one, after the stream has drained.
    """

    def __init__(self, recovery):
        self.recovery = recovery
        self.target = recovery.target
        self.stream = None
        self.in_flight = collections.deque()   # (txn, nbytes, reply)
        self.unsent = 0     # the last in_flight entries, not sent yet

    def copy(self, txn, nbytes):
        """Commit txn on the target (or queue it: see flush)."""
        direct = self.target.direct
        if txn.blobs or direct is None:
            self.drain()
            self._close_stream()
            self.recovery._copy_one(txn)
            self.recovery._copied(txn, nbytes)
            return
        if self.stream is None:
            self.stream = direct.restore_stream()
        self.in_flight.append((txn, nbytes, direct_client.Replies(1).slot()))
        self.unsent += 1
        if self.unsent >= RESTORE_SEND_BATCH:
            self.flush()
        if len(self.in_flight) > RESTORE_WINDOW:
            self.flush()
            self._confirm_oldest()
            # Take whatever else is in already, so the copier is not
            # woken for each transaction.
            while self.in_flight and self.in_flight[0][2].done():
                self._confirm_oldest()

    def flush(self):
        """Send the queued transactions (one hand-off for all)."""
        if self.unsent:
            sent = len(self.in_flight) - self.unsent
            self.stream.send_many(
                [(txn, reply) for txn, _, reply in
                 itertools.islice(self.in_flight, sent, None)])
            self.unsent = 0

    def drain(self):
        """Wait until every transaction sent is committed."""
        self.flush()
        while self.in_flight:
            self._confirm_oldest()

    def _confirm_oldest(self):
        txn, nbytes, reply = self.in_flight[0]
        timeout = self.recovery.deadline(nbytes)
        try:
            tid = reply.result(timeout)
        except TimeoutError:
            raise BackendTimeout(
                'target %s did not commit %s within %gs'
                % (self.target.name, txn.tid.hex(), timeout)) from None
        self.in_flight.popleft()
        if tid != txn.tid:
            raise RecoveryError('target %s committed %s as %s' % (
                self.target.name, txn.tid.hex(),
                tid.hex() if tid else tid))
        self.recovery._copied(txn, nbytes)

    def _close_stream(self):
        if self.stream is not None:
            self.stream.close()
            self.stream = None

    def close(self):
        """Give the target's client back (after a failure: only once
        every answer is in, else a later recovery reopens the client)."""
        if self.stream is None:
            return
        sent = len(self.in_flight) - self.unsent
        self.unsent = 0
        if all(reply.done() for _, _, reply in
               itertools.islice(self.in_flight, sent)):
            self._close_stream()
        else:
            self.stream = None
        self.in_flight.clear()


def _remove_blob_copies(txn):
    for path in txn.blobs.values():
        if os.path.exists(path):
            os.remove(path)


def _next_materialized(storage, iterator):
    return _materialize(next(iterator))


class CopiedTransaction(TransactionMetaData):
    """A source transaction read completely: metadata and records.

    It is also the transaction object the target commits with, so user,
    description and extension (raw bytes where the source kept them)
    reach the target unchanged.
    """

    def __init__(self, info):
        extension = vars(info).get('extension_bytes')
        if extension is None:
            extension = info.extension
        TransactionMetaData.__init__(self, info.user, info.description,
                                     extension)
        self.tid = info.tid
        self.status = info.status
        self.records = [_Record(r) for r in info]
        self.blobs = {}

    def __iter__(self):
        return iter(self.records)


class _Record:
    __slots__ = ('oid', 'tid', 'data', 'data_txn')

    def __init__(self, r):
        self.oid = r.oid
        self.tid = r.tid
        self.data = r.data
        self.data_txn = r.data_txn


def _materialize(info):
    return CopiedTransaction(info)


def compare_transactions(a, b):
    """None if equal, else a short description of the first difference."""
    if a.tid != b.tid:
        return 'tid %s != %s' % (a.tid.hex(), b.tid.hex())
    for field in ('status', 'user', 'description', 'extension'):
        if getattr(a, field) != getattr(b, field):
            return '%s differs' % field
    ra = sorted((r.oid, r.data) for r in a)
    rb = sorted((r.oid, r.data) for r in b)
    if [oid for oid, _ in ra] != [oid for oid, _ in rb]:
        return 'records of different objects'
    for (oid, da), (_, db) in zip(ra, rb):
        if da != db:
            return 'data of object %s differs' % oid.hex()
    return None


def naive_copy(source, target, start=z64, stop=maxtid):
    """One transaction at a time, no read-ahead: the benchmark's baseline."""
    count = 0
    for info in source.iterator(start, stop):
        txn = CopiedTransaction(info)
        target.tpc_begin(txn, txn.tid, txn.status)
        for record in txn:
            target.restore(record.oid, record.tid, record.data, '',
                           record.data_txn, txn)
        target.tpc_vote(txn)
        target.tpc_finish(txn)
        count += 1
    return count


class AutoRecover:
    """Recover degraded backends by themselves once they are back.

    Every few seconds each degraded backend is probed (its last tid, with
    the RAID's deadline). One that has answered for the whole hold-down
    period is recovered. Flap damping: a backend that degraded
    `max_flaps` times within `flap_window` seconds is left degraded and
    its reason says so; an operator's `recover` still works. Backends
    disabled by the operator, and diverged ones, are left alone.
    """

    def __init__(self, raid, hold_down=60.0, max_flaps=3, flap_window=3600.0,
                 clock=time.monotonic):
        self.raid = raid
        self.hold_down = float(hold_down)
        self.max_flaps = max_flaps
        self.flap_window = float(flap_window)
        self.clock = clock
        self.reachable_since = {}
        self.stopped = threading.Event()
        self.thread = threading.Thread(
            target=self._run, name='zeoraid-auto-recover-%s' % raid.getName(),
            daemon=True)

    def start(self):
        self.thread.start()

    def stop(self):
        self.stopped.set()

    def _run(self):
        interval = max(0.2, min(self.hold_down / 4, 5.0))
        while not self.stopped.wait(interval):
            try:
                self.check()
            except Exception:
                logger.exception('raid=%s auto-recover check failed',
                                 self.raid.getName())

    def flapping(self, backend):
        now = self.clock()
        recent = [t for t in backend.failures if now - t <= self.flap_window]
        return len(recent) >= self.max_flaps

    def check(self):
        """One round: probe degraded backends, start at most one recovery."""
        raid = self.raid
        for backend in list(raid._backends):
            if backend.state != 'degraded':
                self.reachable_since.pop(backend.name, None)
                continue
            reason = backend.reason or ''
            if reason.startswith('disabled by operator') or \
                    'full rebuild' in reason or 'flapping' in reason:
                continue
            if self.flapping(backend):
                backend.set_state('degraded', (
                    'flapping: degraded %d times within %gs, auto-recover '
                    'suspended (last: %s)' % (self.max_flaps,
                                              self.flap_window, reason)))
                continue
            if backend.storage is None:
                continue
            try:
                backend.call(raid.timeout, authoritative_last_tid)
            except Exception:
                self.reachable_since.pop(backend.name, None)
                continue
            since = self.reachable_since.setdefault(backend.name, self.clock())
            if self.clock() - since < self.hold_down:
                continue
            if raid.raid_recovery() is not None or raid._packing:
                return
            self.reachable_since.pop(backend.name, None)
            try:
                logger.warning('raid=%s backend=%s auto-recover: reachable '
                               'for %gs, recovering', raid.getName(),
                               backend.name, self.hold_down)
                raid.raid_recover(backend.name)
            except RAIDError as exc:
                logger.warning('raid=%s backend=%s auto-recover refused: %s',
                               raid.getName(), backend.name, exc)
            return
