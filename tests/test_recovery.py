"""Online recovery over in-process FileStorage backends.

A degraded backend is brought back while the RAID keeps serving: the
junction is verified, the missing transactions are copied with their own
tids (records, undo backpointers, data=None records of undone creations,
blobs), the last few are copied with the commit lock held, and then the
backend is optimal again.  Every scenario ends with the RAID invariant
(``assert_replicas_identical``) plus a comparison of the blob files.

Failures are injected with tests/faulty.py; timing only ever bounds a wait.
The rate limiter's arithmetic is tested with an injected clock, never with
the wall clock.  The same scenarios against real ZEO backend processes are
in test_recovery_zeo.py.
"""
import collections
import os
import shutil
import tempfile
import threading
import time
import unittest

import transaction
import ZConfig
import ZODB
import ZODB.blob
import ZODB.config
import ZODB.POSException
import ZODB.utils
from persistent.mapping import PersistentMapping
from persistent.TimeStamp import TimeStamp
from zope.testing.loggingsupport import InstalledHandler
from ZODB.blob import Blob
from ZODB.Connection import TransactionMetaData
from ZODB.FileStorage import FileStorage
from ZODB.tests.MinPO import MinPO
from ZODB.tests.StorageTestBase import zodb_pickle
from ZODB.utils import p64
from ZODB.utils import u64
from ZODB.utils import z64

from tests.faulty import FaultyStorage
from tests.invariants import assert_replicas_identical
from tests.invariants import committed_tids
from tests.polling import poll

from zeoraid import recovery as recovery_module
from zeoraid.errors import RAIDError
from zeoraid.recovery import CopiedTransaction
from zeoraid.recovery import RateLimiter
from zeoraid.recovery import compare_transactions
from zeoraid.recovery import naive_copy
from zeoraid.storage import RAIDStorage

TIMEOUT = 10.0
#: Upper bound for any recovery in this module to end (it normally takes
#: well under a second).
RECOVERY_LIMIT = 60.0


# -- helpers shared with test_recovery_zeo ----------------------------------

def wait_until(condition, timeout=RECOVERY_LIMIT):
    """Poll condition() until true or timeout; return its last value."""
    return poll(condition, timeout, 0.01)


def wait_recovery(test, raid, timeout=RECOVERY_LIMIT):
    """Wait for the running recovery to end; return its Recovery."""
    # A recovery that was refused at once may have ended already.
    recovery = raid.raid_recovery() or raid.raid_last_recovery()
    test.assertIsNotNone(recovery, 'no recovery was started')
    test.assertTrue(recovery.done.wait(timeout),
                    'recovery did not end within %ss: %r'
                    % (timeout, raid.raid_details()))
    return recovery


def wait_copied(test, recovery, count, timeout=RECOVERY_LIMIT):
    """Wait until the recovery copied at least count transactions."""
    ok = wait_until(lambda: recovery.progress.txns_copied >= count
                    or recovery.done.is_set(), timeout)
    test.assertTrue(ok, 'recovery copied %d transactions, not %d'
                    % (recovery.progress.txns_copied, count))
    test.assertFalse(recovery.done.is_set(),
                     'recovery ended before it copied %d transactions: %r'
                     % (count, recovery.progress.as_dict()))


def pickled(data):
    """A record's data: a MinPO holding data, as ZODB pickles it."""
    return zodb_pickle(MinPO(data))


def commit(conn, user='', note=''):
    txn = transaction.get()
    if user:
        txn.setUser(user)
    if note:
        txn.note(note)
    txn.commit()
    return conn.db().storage.lastTransaction()


class Backlog:
    """Transactions of every kind recovery must copy, committed through a DB.

    Plain changes with user and description, new blobs and new blob
    revisions, an undone change (undo records are backpointers), an
    undone creation (its object's record has data None) and an undone
    blob change.  ``tids`` holds every tid it committed.
    """

    def __init__(self, db):
        self.db = db
        self.conn = db.open()
        root = self.conn.root()
        if 'data' not in root:
            root['data'] = PersistentMapping()
            root['made'] = PersistentMapping()
            root['blobs'] = PersistentMapping()
            root['undone'] = PersistentMapping()
            commit(self.conn, note='backlog setup')
        self.root = root
        self.tids = []
        self.step = 0

    def _commit(self, note):
        self.tids.append(commit(self.conn, user='user%d' % (self.step % 3),
                                note=note))

    def _undo_last(self, note):
        last = self.db.undoLog(0, 1)[0]
        self.db.undo(last['id'])
        self._commit(note)

    def add(self, count, blob_every=10, undo_every=100):
        """Commit at least count transactions; returns how many."""
        start = len(self.tids)
        while len(self.tids) - start < count:
            self.step += 1
            i = self.step
            if undo_every and i % undo_every == 0:
                # An undone creation: the new object's undo record has
                # data None, the container's is a backpointer.
                self.root['made'][i] = PersistentMapping({'i': i})
                self._commit('create %d' % i)
                self._undo_last('undo create %d' % i)
            elif undo_every and i % undo_every == undo_every // 2:
                self.root['undone'][i % 7] = i
                self._commit('change %d' % i)
                self._undo_last('undo change %d' % i)
            elif blob_every and i % blob_every == 0:
                blobs = self.root['blobs']
                key = i % (blob_every * 4)
                if key in blobs and i % 3 == 0:
                    # A new revision of an existing blob, then undone.
                    with blobs[key].open('w') as f:
                        f.write(b'revised %d ' % i * 50)
                    self._commit('blob revision %d' % i)
                    self._undo_last('undo blob revision %d' % i)
                else:
                    blob = blobs.get(key)
                    if blob is None:
                        blob = blobs[key] = Blob()
                    with blob.open('w') as f:
                        f.write(b'blob %d ' % i * (100 + i % 50))
                    self._commit('blob %d' % i)
            else:
                self.root['data'][i % 20] = 'value %d' % i
                self._commit('change %d' % i)
        return len(self.tids) - start

    def close(self):
        transaction.abort()
        self.conn.close()


def blob_records(storage):
    """[(oid, tid)] of every blob record of storage, once per (oid, tid)."""
    found = []
    seen = set()
    it = storage.iterator()
    try:
        for txn in it:
            for record in txn:
                if record.data and ZODB.blob.is_blob_record(record.data):
                    if (record.oid, txn.tid) not in seen:
                        seen.add((record.oid, txn.tid))
                        found.append((record.oid, txn.tid))
    finally:
        close = getattr(it, 'close', None)
        if close is not None:
            close()
    return found


def assert_blobs_identical(test, raid, backends=None):
    """Every blob revision has the same bytes on every backend.

    assert_replicas_identical compares records, not blob files; a copy
    that left out the files would pass it.  Returns how many blob
    revisions were compared.
    """
    if backends is None:
        backends = sorted(n for n, info in raid.raid_details().items()
                          if info['state'] == 'optimal')
    storages = [(n, raid.raid_backend_storage(n)) for n in backends]
    ref_name, ref = storages[0]
    records = blob_records(ref)
    for oid, tid in records:
        with open(ref.loadBlob(oid, tid), 'rb') as f:
            expected = f.read()
        for name, storage in storages[1:]:
            try:
                path = storage.loadBlob(oid, tid)
            except ZODB.POSException.POSKeyError:
                test.fail('backend %s lacks the blob file of oid %s at %s '
                          '(%s has it)' % (name, oid.hex(), tid.hex(),
                                           ref_name))
            with open(path, 'rb') as f:
                test.assertEqual(
                    f.read(), expected, 'blob %s@%s differs on %s and %s'
                    % (oid.hex(), tid.hex(), name, ref_name))
    return len(records)


def record_kinds(storage, start=z64):
    """Counts of the record kinds in transactions >= start."""
    kinds = collections.Counter()
    it = storage.iterator(start)
    try:
        for txn in it:
            kinds['transactions'] += 1
            for record in txn:
                if record.data is None:
                    kinds['data None'] += 1
                elif ZODB.blob.is_blob_record(record.data):
                    kinds['blob'] += 1
                if record.data_txn is not None:
                    kinds['backpointer'] += 1
    finally:
        close = getattr(it, 'close', None)
        if close is not None:
            close()
    return kinds


def read_txn(storage, tid):
    """The transaction tid of storage, read completely."""
    it = storage.iterator(tid, tid)
    try:
        return CopiedTransaction(next(iter(it)))
    finally:
        close = getattr(it, 'close', None)
        if close is not None:
            close()


def current(storage, oid):
    """(data, serial) of oid, or None if it does not exist."""
    try:
        return ZODB.utils.load_current(storage, oid)
    except ZODB.POSException.POSKeyError:
        return None


def max_oid(storage):
    top = z64
    it = storage.iterator()
    try:
        for txn in it:
            for record in txn:
                top = max(top, record.oid)
    finally:
        it.close()
    return top


class FakeClock:
    """An injected clock: sleep() advances it, and may run a callback.

    Like a real sleep it advances at least a microsecond, so a limiter
    that asks for a rounding-error wait still sees time pass; and it
    refuses to be called forever (a limiter that never lets go).
    """

    GRANULARITY = 1e-6
    MAX_SLEEPS = 100000

    def __init__(self):
        self.now = 0.0
        self.sleeps = []
        self.on_sleep = None

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        assert seconds > 0, seconds
        assert len(self.sleeps) < self.MAX_SLEEPS, 'limiter never lets go'
        self.sleeps.append(seconds)
        before = self.now
        self.now += max(seconds, self.GRANULARITY)
        if self.on_sleep is not None:
            self.on_sleep(before, self.now)


# -- the rate limiter: pure arithmetic ----------------------------------------

class RateLimiterTests(unittest.TestCase):
    """RateLimiter with an injected clock: budget = cap * elapsed + credit."""

    def limiter(self, txn_rate=0, byte_rate=0):
        self.clock = FakeClock()
        return RateLimiter(txn_rate, byte_rate, clock=self.clock,
                           sleep=self.clock.sleep)

    def test_zero_means_unlimited(self):
        limiter = self.limiter(0, 0)
        for _ in range(1000):
            self.assertEqual(limiter.delay(10 ** 9), 0)
            self.assertTrue(limiter.acquire(10 ** 9))
        self.assertEqual(self.clock.sleeps, [])
        self.assertEqual(limiter.used_txns, 1000)
        self.assertEqual(limiter.used_bytes, 1000 * 10 ** 9)

    def test_txn_cap_is_respected_and_reached(self):
        limiter = self.limiter(txn_rate=10)
        start = self.clock.now
        for k in range(1, 51):
            self.assertTrue(limiter.acquire(100))
            elapsed = self.clock.now - start
            # Never more than the cap allows, never slower than needed.
            self.assertGreaterEqual(elapsed + 1e-9, k / 10.0)
            self.assertLess(elapsed, k / 10.0 + 1e-4)
        self.assertAlmostEqual(self.clock.now - start, 5.0, places=4)
        # No single sleep is long: a stop request is noticed quickly.
        self.assertLessEqual(max(self.clock.sleeps), 0.5)

    def test_idle_time_is_not_lost(self):
        # The budget grows with time: after 2 idle seconds at 10/s,
        # 20 transactions may go at once.
        limiter = self.limiter(txn_rate=10)
        self.clock.now += 2.0
        for _ in range(20):
            limiter.acquire(1)
        self.assertEqual(self.clock.sleeps, [])
        self.assertGreater(limiter.delay(1), 0)

    def test_byte_cap(self):
        limiter = self.limiter(byte_rate=1000)
        start = self.clock.now
        for k in range(1, 11):
            limiter.acquire(500)
            self.assertAlmostEqual(self.clock.now - start, k * 0.5,
                                   places=4)
        self.assertEqual(limiter.used_bytes, 5000)

    def test_transaction_larger_than_a_second_of_budget_still_goes(self):
        limiter = self.limiter(byte_rate=1000)
        start = self.clock.now
        self.assertTrue(limiter.acquire(3000))
        self.assertAlmostEqual(self.clock.now - start, 3.0, places=4)

    def test_stricter_cap_wins(self):
        # 100 txn/s but 1000 bytes/s with 100-byte transactions: 10/s.
        limiter = self.limiter(txn_rate=100, byte_rate=1000)
        start = self.clock.now
        for _ in range(10):
            limiter.acquire(100)
        self.assertAlmostEqual(self.clock.now - start, 1.0, places=4)
        # And the other way round: 1-byte transactions, txn cap 100/s.
        limiter = self.limiter(txn_rate=100, byte_rate=1000)
        start = self.clock.now
        for _ in range(100):
            limiter.acquire(1)
        self.assertAlmostEqual(self.clock.now - start, 1.0, places=4)

    def test_credits_are_added_on_top_of_the_cap(self):
        limiter = self.limiter(txn_rate=10, byte_rate=10000)
        limiter.credit(30, 30000)
        for _ in range(30):
            limiter.acquire(1000)
        self.assertEqual(self.clock.sleeps, [])
        # The 31st needs cap time: 0.1s for the transaction, 0.1s for
        # its 1000 bytes.
        self.assertAlmostEqual(limiter.delay(1000), 0.1, places=6)
        self.assertEqual((limiter.credit_txns, limiter.credit_bytes),
                         (30, 30000))

    def test_byte_credit_alone(self):
        limiter = self.limiter(byte_rate=100)
        limiter.credit(0, 2000)
        for _ in range(4):
            limiter.acquire(500)
        self.assertEqual(self.clock.sleeps, [])
        self.assertAlmostEqual(limiter.delay(500), 5.0, places=6)

    def test_backlog_shrinks_although_live_load_exceeds_the_cap(self):
        """The catch-up guarantee, simulated.

        Live commits arrive at 40/s, four times the cap of 10/s; each
        live commit credits the copier.  The backlog (initial 200 plus
        live commits minus copied) must shrink at the cap's rate: gone
        after 200 / 10 = 20 s.  Without the credit it would grow by 30
        transactions a second.
        """
        limiter = self.limiter(txn_rate=10)
        live_rate = 40.0
        live = [0]

        def live_commits(before, after):
            # Commits whose time falls into (before, after].
            start = self.clock_start
            due = int((after - start) * live_rate + 1e-9)
            while live[0] < due:
                live[0] += 1
                limiter.credit(1, 100)

        self.clock_start = self.clock.now
        self.clock.on_sleep = live_commits
        backlog0 = 200
        copied = 0
        samples = []
        while backlog0 + live[0] - copied > 0:
            self.assertTrue(limiter.acquire(100))
            copied += 1
            elapsed = self.clock.now - self.clock_start
            backlog = backlog0 + live[0] - copied
            samples.append((elapsed, backlog))
            # Shrinks at least at the cap's rate.  Slack: the live
            # commits of one sleep (at most 0.5 s), which the copier
            # takes right after it, plus the one being copied.
            self.assertLessEqual(backlog, backlog0 - 10 * elapsed + 21)
            self.assertLess(elapsed, 30, 'copier never caught up')
        elapsed = self.clock.now - self.clock_start
        self.assertAlmostEqual(elapsed, 20.0, delta=0.2)
        self.assertGreater(live[0], 700)          # live load was real
        self.assertEqual(copied, backlog0 + live[0])

    def test_acquire_gives_up_when_stopped(self):
        limiter = self.limiter(txn_rate=1)
        limiter.acquire(1)                 # uses the first second
        stop = threading.Event()
        stop.set()
        self.assertFalse(limiter.acquire(1, stop))
        self.assertEqual(limiter.used_txns, 1)
        # Free to go: a stop request does not refuse a transaction that
        # needs no wait.
        self.clock.now += 10
        self.assertTrue(limiter.acquire(1, stop))

    def test_delay_does_not_count(self):
        limiter = self.limiter(txn_rate=10)
        for _ in range(5):
            self.assertAlmostEqual(limiter.delay(1), 0.1, places=6)
        self.assertEqual((limiter.used_txns, limiter.used_bytes), (0, 0))


class BackPressureTests(unittest.TestCase):
    """recovery.BackPressure with an injected clock."""

    def setUp(self):
        self.now = [100.0]
        self.pressure = recovery_module.BackPressure(
            clock=lambda: self.now[0])

    def advance(self, seconds):
        self.now[0] += seconds

    def test_not_due_while_the_backlog_shrinks(self):
        p = self.pressure
        self.assertFalse(p.due(1000))          # starts the window
        self.advance(recovery_module.PRESSURE_WINDOW - 0.1)
        self.assertFalse(p.due(990))           # window not over
        self.advance(0.2)
        self.assertFalse(p.due(800))           # shrank by 20%
        self.advance(recovery_module.PRESSURE_WINDOW)
        self.assertFalse(p.due(700))           # shrank by 12.5%
        self.assertFalse(p.engaged)

    def test_engages_when_the_backlog_does_not_shrink(self):
        p = self.pressure
        window = recovery_module.PRESSURE_WINDOW
        hold = recovery_module.PRESSURE_HOLD
        self.assertFalse(p.due(1000))
        self.advance(window)
        self.assertTrue(p.due(950))            # shrank by 5% only
        self.assertTrue(p.engaged)
        self.assertEqual(p.free_ratio, 1.0)
        # A spell ends after PRESSURE_CHUNK transactions or PRESSURE_HOLD s.
        started = self.now[0]
        self.assertFalse(p.spell_over(started, 10))
        self.assertTrue(p.spell_over(started,
                                     recovery_module.PRESSURE_CHUNK))
        self.advance(hold * 1.01)
        self.assertTrue(p.spell_over(started, 10))
        # Then the lock stays free as long as it was held.
        p.released(started)
        self.assertEqual(p.spells, 1)
        self.assertFalse(p.due(940))
        self.advance(hold * 0.9)
        self.assertFalse(p.due(940))
        self.advance(hold * 0.2)
        self.assertTrue(p.due(940))            # engaged: no new window

    def test_disabled_never_due_and_hold_is_configurable(self):
        p = recovery_module.BackPressure(enabled=False, hold=0.02,
                                         clock=lambda: self.now[0])
        window = recovery_module.PRESSURE_WINDOW
        self.assertFalse(p.due(1000))
        self.advance(window)
        self.assertFalse(p.due(1000))          # not shrinking, but off
        self.assertFalse(p.engaged)
        p.enabled = True                       # a reload turns it on
        self.advance(window)
        self.assertTrue(p.due(1000))
        started = self.now[0]
        self.advance(0.021)
        self.assertTrue(p.spell_over(started, 1))

    def test_free_time_halves_while_the_backlog_does_not_shrink(self):
        p = self.pressure
        window = recovery_module.PRESSURE_WINDOW
        p.due(1000)
        self.advance(window)
        p.due(1000)
        ratios = []
        for _ in range(5):
            self.advance(window)
            p.due(1000)
            ratios.append(p.free_ratio)
        self.assertEqual(ratios, [0.5, 0.25, 0.125, 0.0625, 0.03125])
        # Shrinking again leaves the ratio where it is.
        self.advance(window)
        p.due(500)
        self.assertEqual(p.free_ratio, 0.03125)
        self.advance(window)
        p.due(500)
        self.assertEqual(p.free_ratio, recovery_module.PRESSURE_MIN_FREE)
        started = self.now[0]
        self.advance(0.1)
        p.released(started)
        self.assertFalse(p.due(500))
        self.advance(0.1 * recovery_module.PRESSURE_MIN_FREE + 0.001)
        self.assertTrue(p.due(500))

    def test_never_for_a_small_backlog(self):
        p = self.pressure
        small = recovery_module.FINAL_CATCHUP
        self.assertFalse(p.due(small))
        self.advance(recovery_module.PRESSURE_WINDOW * 2)
        self.assertFalse(p.due(small))
        self.assertFalse(p.engaged)


class SlowVoteFileStorage(FileStorage):
    """A FileStorage whose votes take `delay` seconds (a slow target)."""

    delay = 0.0

    def tpc_vote(self, transaction):
        if self.delay:
            time.sleep(self.delay)
        return FileStorage.tpc_vote(self, transaction)


class CompareTests(unittest.TestCase):
    """compare_transactions: what verify calls a difference."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix='zeoraid-compare-')
        self.storages = []

    def tearDown(self):
        for fs in self.storages:
            fs.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def txn(self, name, data, user=b'u', tid=None):
        fs = FileStorage(os.path.join(self.tmp, name + '.fs'))
        self.storages.append(fs)
        t = TransactionMetaData(user, b'd')
        tid = tid or p64(0x03000000 << 32)
        fs.tpc_begin(t, tid)
        fs.store(p64(1), z64, data, '', t)
        fs.tpc_vote(t)
        fs.tpc_finish(t)
        it = fs.iterator()
        try:
            return CopiedTransaction(next(iter(it)))
        finally:
            it.close()

    def test_differences(self):
        a = self.txn('a', b'x')
        self.assertIsNone(compare_transactions(a, self.txn('b', b'x')))
        self.assertIn('data', compare_transactions(a, self.txn('c', b'y')))
        self.assertIn('user', compare_transactions(
            a, self.txn('d', b'x', user=b'v')))
        self.assertIn('tid', compare_transactions(
            a, self.txn('e', b'x', tid=p64((0x03000000 << 32) + 1))))


# -- recovery of real FileStorage backends ------------------------------------

class RecoveryTestBase(unittest.TestCase):
    """RAIDs over FileStorage backends (optionally FaultyStorage-wrapped)."""

    backend_count = 2
    faulty = False
    blobs = True

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix='zeoraid-recovery-')
        self.log = InstalledHandler('zeoraid', level=10)
        self.raids = []
        self.dbs = []
        self.wrapped = {}

    def tearDown(self):
        transaction.abort()
        for fs in self.wrapped.values():
            fs.reset()
        for raid in self.raids:
            recovery = raid.raid_recovery()
            if recovery is not None:
                recovery.stop()
                recovery.done.wait(RECOVERY_LIMIT)
        for db in self.dbs:
            db.close()
        for raid in self.raids:
            raid.close()
        self.log.uninstall()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def path(self, *parts):
        return os.path.join(self.tmp, *parts)

    def opener(self, name, path=None):
        path = path or self.path(name + '.fs')

        def open_backend():
            kw = {}
            if self.blobs:
                kw['blob_dir'] = path[:-3] + '.blobs'
            storage = FileStorage(path, **kw)
            if self.faulty:
                storage = FaultyStorage(storage, name=name)
                self.wrapped[name] = storage
            return storage
        return open_backend

    def open_raid(self, names=None, **kw):
        names = names or ['b%d' % (i + 1) for i in range(self.backend_count)]
        kw.setdefault('timeout', TIMEOUT)
        if self.blobs:
            kw.setdefault('blob_dir', self.path('raid-blobs-%d'
                                                % len(self.raids)))
        raid = RAIDStorage('r', [(n, self.opener(n)) for n in names], **kw)
        self.raids.append(raid)
        return raid

    def open_db(self, raid):
        db = ZODB.DB(raid)
        self.dbs.append(db)
        return db

    def logged(self, *parts):
        """Log messages of zeoraid that contain every one of parts."""
        return [r.getMessage() for r in self.log.records
                if all(part in r.getMessage() for part in parts)]

    def assert_recovered(self, raid, name='b2'):
        """Optimal, identical, same blob files, at the RAID's last tid."""
        details = raid.raid_details()
        self.assertEqual(details[name]['state'], 'optimal', details)
        self.assertEqual(raid.raid_status(), 'optimal', details)
        self.assertIsNone(raid.raid_recovery())
        info = details[name]['recovery']
        self.assertEqual(info['phase'], 'done', info)
        self.assertIsNone(info['error'])
        count = assert_replicas_identical(raid)
        self.assertEqual(raid.raid_backend_storage(name).lastTransaction(),
                         raid.lastTransaction())
        if self.blobs:
            assert_blobs_identical(self, raid)
        return count


class RecoveryTests(RecoveryTestBase):

    def test_recover_1000_transactions_with_blobs_undo_and_none_data(self):
        raid = self.open_raid()
        db = self.open_db(raid)
        backlog = Backlog(db)
        backlog.add(20)
        raid.raid_disable('b2')
        lagging_at = raid.raid_backend_storage('b2').lastTransaction()
        count = backlog.add(1000)
        self.assertGreaterEqual(count, 1000)
        first_missing = backlog.tids[-count]
        kinds = record_kinds(raid.raid_backend_storage('b1'), first_missing)
        self.assertEqual(kinds['transactions'], count)
        self.assertGreater(kinds['data None'], 5, kinds)
        self.assertGreater(kinds['backpointer'], 10, kinds)
        self.assertGreater(kinds['blob'], 20, kinds)

        message = raid.raid_recover('b2')
        self.assertIn('b2', message)
        self.assertIn('b1', message)
        recovery = wait_recovery(self, raid)

        self.assertEqual(recovery.progress.txns_copied, count)
        total = self.assert_recovered(raid)
        self.assertEqual(total, len(committed_tids(
            raid.raid_backend_storage('b1'))))
        # What the copy wrote is what the source has, kind by kind.
        b2 = raid.raid_backend_storage('b2')
        self.assertEqual(record_kinds(b2, first_missing), kinds)
        self.assertLess(lagging_at, first_missing)
        # The copy started at the junction, not at the beginning.
        self.assertEqual(b2.lastTransaction(), backlog.tids[-1])
        # The oid high-water mark moved with the copied records.
        top = max_oid(raid.raid_backend_storage('b1'))
        self.assertGreater(b2.new_oid(), top)
        self.assertTrue(self.logged('backend=b2 recovered: %d transactions'
                                    % count))
        # The recovered backend takes part in the next commit.
        backlog.add(3)
        assert_replicas_identical(raid)
        self.assertEqual(b2.lastTransaction(), raid.lastTransaction())
        backlog.close()

    def test_backlog_from_before_the_raid_opened(self):
        # The RAID counts only its own commits since it opened: a backlog
        # from before (a restart while a backend was degraded) must not
        # look small, or the final catch-up, which holds the commit lock,
        # would copy all of it while live commits wait.
        raid = self.open_raid()
        db = self.open_db(raid)
        backlog = Backlog(db)
        backlog.add(10)
        raid.raid_disable('b2')
        count = backlog.add(300, blob_every=0, undo_every=0)
        backlog.close()
        db.close()
        self.dbs.remove(db)
        self.raids.remove(raid)
        raid = self.open_raid()
        self.assertEqual(raid.raid_details()['b2']['state'], 'degraded')
        b2_last = raid.raid_backend_storage('b2').lastTransaction()
        self.assertIsNone(raid._commits_since(p64(u64(b2_last) + 1)))
        raid.raid_recover('b2')
        recovery = wait_recovery(self, raid)
        self.assert_recovered(raid)
        self.assertEqual(recovery.progress.txns_copied, count)
        self.assertLessEqual(recovery.progress.final_catchup_txns,
                             recovery_module.FINAL_CATCHUP * 5)
        self.assertEqual(
            raid.raid_details()['b2']['recovery']['final_catchup_txns'],
            recovery.progress.final_catchup_txns)
        # Commits of this RAID are counted.
        db = self.open_db(raid)
        backlog = Backlog(db)
        backlog.add(3, blob_every=0, undo_every=0)
        self.assertEqual(raid._commits_since(p64(u64(b2_last) + 1)), None)
        self.assertEqual(raid._commits_since(backlog.tids[0]), 3)
        backlog.close()

    def slow_target_raid(self, **options):
        """b2 commits at < 200 txn/s (a slow target), disabled."""
        self.patch(recovery_module, 'PRESSURE_WINDOW', 0.5)
        self.blobs = False
        slow = []

        def open_slow():
            storage = SlowVoteFileStorage(self.path('b2.fs'))
            slow.append(storage)
            return storage
        raid = RAIDStorage('r', [('b1', self.opener('b1')),
                                 ('b2', open_slow)], timeout=TIMEOUT,
                           **options)
        self.raids.append(raid)
        db = self.open_db(raid)
        raid.raid_disable('b2')
        for storage in slow:
            storage.delay = 0.005     # the copy: < 200 txn/s
        return raid, db

    def saturate(self, raid, db, live_rate=300.0):
        """Commit at live_rate (more than the slow target takes) in a
        thread until stop is set; returns (stop, thread, live, errors)."""
        stop = threading.Event()
        live = []
        errors = []

        def writer():
            conn = db.open()
            try:
                root = conn.root()
                begin = time.monotonic()
                deadline = begin + RECOVERY_LIMIT
                while not stop.is_set() and time.monotonic() < deadline:
                    root['n'] = len(live)
                    transaction.commit()
                    live.append(raid.lastTransaction())
                    time.sleep(max(0.0, begin + len(live) / live_rate
                                   - time.monotonic()))
            except Exception as exc:  # pragma: no cover - reported
                errors.append(exc)
            finally:
                transaction.abort()
                conn.close()
        thread = threading.Thread(target=writer)
        thread.start()
        self.addCleanup(thread.join, RECOVERY_LIMIT)
        self.addCleanup(stop.set)
        return stop, thread, live, errors

    def test_back_pressure_when_the_target_is_slower_than_live_commits(self):
        """Live commits as fast as they go, a target slower than them:
        without back-pressure the copy never catches up."""
        raid, db = self.slow_target_raid()
        stop, thread, live, errors = self.saturate(raid, db)
        try:
            self.assertTrue(wait_until(lambda: len(live) >= 300, 20))
            before = len(live)
            raid.raid_recover('b2')
            recovery = wait_recovery(self, raid, 45)
            during = len(live) - before
        finally:
            stop.set()
            thread.join(RECOVERY_LIMIT)
        self.assertEqual(errors, [])
        self.assertIsNone(recovery.progress.error)
        self.assertGreater(recovery.progress.backpressure_spells, 0)
        self.assertTrue(self.logged('back-pressure'))
        # Live commits went on during the recovery.
        self.assertGreater(during, 0)
        self.assertGreater(len(live), 300)
        details = raid.raid_details()
        self.assertEqual(details['b2']['state'], 'optimal')
        assert_replicas_identical(raid)

    def test_back_pressure_off_until_a_reload_turns_it_on(self):
        """recovery-back-pressure off: live commits never wait and the
        backlog does not shrink; turned on (with a shorter spell) while
        the recovery runs, it ends."""
        raid, db = self.slow_target_raid(recovery_back_pressure=False)
        stop, thread, live, errors = self.saturate(raid, db)
        self.assertTrue(wait_until(lambda: len(live) >= 300, 20))
        raid.raid_recover('b2')
        recovery = raid.raid_recovery()
        self.assertTrue(wait_until(
            lambda: self.logged('back-pressure is off'), 10),
            'the not-shrinking backlog is not reported')
        self.assertFalse(recovery.done.is_set())
        self.assertEqual(recovery.progress.backpressure_spells, 0)
        raid.apply_settings({'recovery_back_pressure': True,
                             'recovery_back_pressure_hold': 0.05})
        self.assertEqual(recovery.pressure.hold, 0.05)
        recovery = wait_recovery(self, raid, 45)
        stop.set()
        thread.join(RECOVERY_LIMIT)
        self.assertEqual(errors, [])
        self.assertIsNone(recovery.progress.error)
        self.assertGreater(recovery.progress.backpressure_spells, 0)
        self.assertEqual(raid.raid_details()['b2']['state'], 'optimal')
        assert_replicas_identical(raid)

    def patch(self, obj, name, value):
        old = getattr(obj, name)
        setattr(obj, name, value)
        self.addCleanup(setattr, obj, name, old)

    def test_recover_while_committing(self):
        """Live commits run on; the copy catches up and they reach b2."""
        raid = self.open_raid(recovery_txn_rate=400)
        db = self.open_db(raid)
        backlog = Backlog(db)
        raid.raid_disable('b2')
        backlog.add(300, blob_every=10)
        backlog.close()

        stop = threading.Event()
        errors = []
        live = []

        def writer():
            conn = db.open()
            try:
                root = conn.root()
                for i in range(5000):
                    if stop.is_set():
                        break
                    root['data']['live'] = i
                    if i % 10 == 0:
                        root['blobs']['live'] = blob = Blob()
                        with blob.open('w') as f:
                            f.write(b'live %d' % i)
                    transaction.commit()
                    live.append(raid.lastTransaction())
                    time.sleep(0.002)
            except Exception as exc:
                errors.append(exc)
                transaction.abort()
            finally:
                conn.close()

        thread = threading.Thread(target=writer, daemon=True)
        thread.start()
        try:
            self.assertTrue(wait_until(lambda: len(live) > 5))
            raid.raid_recover('b2')
            recovery = wait_recovery(self, raid)
            during = len(live)
            # Commits after the recovery reach the recovered backend.
            self.assertTrue(wait_until(lambda: len(live) > during + 5))
        finally:
            stop.set()
            thread.join(RECOVERY_LIMIT)
        self.assertFalse(thread.is_alive())
        self.assertEqual(errors, [])
        # Live commits happened during the copy and were credited.
        self.assertGreater(recovery.limiter.credit_txns, 0)
        self.assertGreater(recovery.limiter.credit_bytes, 0)
        self.assertGreater(recovery.progress.txns_copied, 300)
        self.assert_recovered(raid)

    def test_blob_stored_twice_in_one_transaction(self):
        """A ZEO server stores a blob as store() then storeBlob().

        ZEO's ClientStorage.storeBlob sends ``storea`` and then the blob,
        so a RAID served by ZEO gets store(oid) and storeBlob(oid) in one
        transaction, and FileStorage keeps both records.  Recovery must
        reproduce both, with the blob file.
        """
        raid = self.open_raid()
        db = self.open_db(raid)
        backlog = Backlog(db)
        backlog.add(30, blob_every=10)
        backlog.close()
        oid, tid = blob_records(raid.raid_backend_storage('b1'))[-1]
        data, serial = ZODB.utils.load_current(raid, oid)
        raid.raid_disable('b2')
        for i in range(3):
            blob_file = self.path('upload%d' % i)
            with open(blob_file, 'wb') as f:
                f.write(b'twice %d' % i * 100)
            txn = TransactionMetaData(b'zeo', b'store and storeBlob')
            raid.tpc_begin(txn)
            raid.store(oid, serial, data, '', txn)
            raid.storeBlob(oid, serial, data, blob_file, '', txn)
            raid.tpc_vote(txn)
            serial = raid.tpc_finish(txn)
        records = [r.oid for r in read_txn(
            raid.raid_backend_storage('b1'), serial)]
        self.assertEqual(records, [oid, oid])

        raid.raid_recover('b2')
        wait_recovery(self, raid)
        self.assert_recovered(raid)

    def test_progress_during_copy(self):
        raid = self.open_raid(recovery_txn_rate=100)
        db = self.open_db(raid)
        backlog = Backlog(db)
        raid.raid_disable('b2')
        backlog.add(300)
        backlog.close()
        raid.raid_recover('b2')
        recovery = raid.raid_recovery()
        self.assertEqual(raid.raid_status(), 'recovering')
        self.assertEqual(raid.raid_details()['b2']['state'], 'recovering')
        wait_copied(self, recovery, 20)
        first = raid.raid_details()['b2']['recovery']
        wait_copied(self, recovery, first['txns_copied'] + 20)
        second = raid.raid_details()['b2']['recovery']
        for info in (first, second):
            self.assertEqual(info['phase'], 'copy', info)
            self.assertEqual(info['source'], 'b1')
            self.assertIsNone(info['error'])
            self.assertIsNone(info['finished'])
            self.assertGreater(info['txns_copied'], 0)
            self.assertGreater(info['bytes_copied'], 0)
            self.assertGreater(info['rate_txn_s'], 0)
            self.assertGreater(info['rate_bytes_s'], 0)
            self.assertGreater(info['backlog_seconds'], 0)
            self.assertIsNotNone(info['eta_seconds'], info)
            self.assertGreater(info['eta_seconds'], 0)
            self.assertIsInstance(info['copied_tid'], str)
            self.assertEqual(len(info['copied_tid']), 16)
        self.assertGreater(second['txns_copied'], first['txns_copied'])
        self.assertGreater(second['bytes_copied'], first['bytes_copied'])
        self.assertGreater(second['copied_tid'], first['copied_tid'])
        self.assertLess(second['backlog_seconds'], first['backlog_seconds'])
        self.assertEqual(raid.raid_status(), 'recovering')
        # Let it finish without the cap.
        recovery.limiter.txn_rate = 0
        wait_recovery(self, raid)
        done = raid.raid_details()['b2']['recovery']
        self.assertEqual(done['phase'], 'done')
        self.assertEqual(done['txns_copied'], 300)
        self.assertEqual(done['backlog_seconds'], 0)
        self.assertIsNotNone(done['finished'])
        self.assert_recovered(raid)

    def test_recovery_rates_reach_the_limiter(self):
        raid = self.open_raid(recovery_txn_rate=1, recovery_byte_rate=1000)
        db = self.open_db(raid)
        backlog = Backlog(db)
        raid.raid_disable('b2')
        backlog.add(10, blob_every=0)
        raid.raid_recover('b2')
        recovery = raid.raid_recovery()
        self.assertEqual(recovery.limiter.txn_rate, 1)
        self.assertEqual(recovery.limiter.byte_rate, 1000)
        # A live commit during the recovery is credited with its
        # transaction and the bytes it stored.
        before = (recovery.limiter.credit_txns,
                  recovery.limiter.credit_bytes)
        self.assertEqual(before, (0, 0))
        backlog.add(1, blob_every=0)
        last = raid.lastTransaction()
        stored = sum(len(r.data) for r in read_txn(
            raid.raid_backend_storage('b1'), last))
        self.assertFalse(recovery.done.is_set())
        self.assertEqual((recovery.limiter.credit_txns,
                          recovery.limiter.credit_bytes), (1, stored))
        recovery.limiter.txn_rate = recovery.limiter.byte_rate = 0
        wait_recovery(self, raid)
        backlog.close()
        self.assert_recovered(raid)

    def test_stop_and_resume(self):
        raid = self.open_raid(recovery_txn_rate=100)
        db = self.open_db(raid)
        backlog = Backlog(db)
        raid.raid_disable('b2')
        count = backlog.add(300)
        backlog.close()
        raid.raid_recover('b2')
        recovery = raid.raid_recovery()
        wait_copied(self, recovery, 20)
        recovery.stop()
        self.assertTrue(recovery.done.wait(RECOVERY_LIMIT))
        first = recovery.progress.txns_copied
        self.assertGreater(first, 0)
        self.assertLess(first, count)
        details = raid.raid_details()['b2']
        self.assertEqual(details['state'], 'degraded')
        self.assertIn('stopped', details['reason'])
        self.assertEqual(details['recovery']['phase'], 'failed')
        self.assertIn('stopped', details['recovery']['error'])
        self.assertIsNone(raid.raid_recovery())
        self.assertEqual(raid.raid_status(), 'degraded')
        self.assertTrue(self.logged('backend=b2 state=degraded',
                                    'previous=recovering',
                                    'reason=recovery failed'))
        b2 = raid.raid_backend_storage('b2')
        self.assertEqual(b2.lastTransaction(), recovery.progress.copied_tid)
        # Resume: only the rest is copied.
        raid.recovery_txn_rate = 0
        raid.raid_recover('b2')
        second = wait_recovery(self, raid)
        self.assertEqual(second.progress.txns_copied, count - first)
        self.assert_recovered(raid)


class RefusalTests(RecoveryTestBase):
    """One recovery at a time; no pack during recovery, and vice versa."""

    backend_count = 3
    faulty = True

    def start_slow_recovery(self, raid, db):
        backlog = Backlog(db)
        raid.raid_disable('b2')
        raid.raid_disable('b3')
        backlog.add(50, blob_every=0)
        backlog.close()
        raid.raid_recover('b2')
        recovery = raid.raid_recovery()
        wait_copied(self, recovery, 1)
        return recovery

    def test_second_recovery_refused(self):
        raid = self.open_raid(recovery_txn_rate=5)
        db = self.open_db(raid)
        recovery = self.start_slow_recovery(raid, db)
        with self.assertRaises(RAIDError) as cm:
            raid.raid_recover('b3')
        self.assertIn('only one recovery runs at a time', str(cm.exception))
        self.assertIn('b2', str(cm.exception))
        with self.assertRaises(RAIDError):
            raid.raid_recover('b2')
        self.assertIs(raid.raid_recovery(), recovery)
        self.assertEqual(raid.raid_details()['b3']['state'], 'degraded')
        # Once the first has ended, the next may start.
        recovery.limiter.txn_rate = 0
        wait_recovery(self, raid)
        raid.recovery_txn_rate = 0
        raid.raid_recover('b3')
        wait_recovery(self, raid)
        self.assert_recovered(raid, 'b3')

    def test_recover_optimal_or_unknown_backend_refused(self):
        raid = self.open_raid()
        with self.assertRaises(RAIDError) as cm:
            raid.raid_recover('b1')
        self.assertIn('optimal', str(cm.exception))
        self.assertIn('nothing to recover', str(cm.exception))
        with self.assertRaises(RAIDError) as cm:
            raid.raid_recover('b9')
        self.assertIn("'b9'", str(cm.exception))
        self.assertIn('b1, b2, b3', str(cm.exception))
        self.assertIsNone(raid.raid_recovery())
        self.assertEqual(raid.raid_status(), 'optimal')

    def test_pack_refused_during_recovery(self):
        raid = self.open_raid(recovery_txn_rate=5)
        db = self.open_db(raid)
        recovery = self.start_slow_recovery(raid, db)
        with self.assertRaises(RAIDError) as cm:
            db.pack()
        self.assertIn('pack refused', str(cm.exception))
        self.assertIn('recovering', str(cm.exception))
        self.assertEqual(self.wrapped['b1'].called('pack'), [])
        recovery.limiter.txn_rate = 0
        wait_recovery(self, raid)
        db.pack()                    # allowed again
        self.assertEqual(len(self.wrapped['b1'].called('pack')), 1)

    def test_recovery_refused_during_pack(self):
        raid = self.open_raid()
        db = self.open_db(raid)
        backlog = Backlog(db)
        raid.raid_disable('b3')
        backlog.add(10, blob_every=0)
        backlog.close()
        self.wrapped['b1'].hang('pack', proceed=True)
        errors = []

        def pack():
            try:
                db.pack()
            except Exception as exc:
                errors.append(exc)
        thread = threading.Thread(target=pack, daemon=True)
        thread.start()
        self.assertTrue(wait_until(lambda: self.wrapped['b1'].hung_calls()))
        try:
            with self.assertRaises(RAIDError) as cm:
                raid.raid_recover('b3')
            self.assertIn('packing', str(cm.exception))
            self.assertIsNone(raid.raid_recovery())
            self.assertEqual(raid.raid_details()['b3']['state'], 'degraded')
        finally:
            self.wrapped['b1'].release()
            thread.join(RECOVERY_LIMIT)
        self.assertEqual(errors, [])
        # Accepted once the pack has ended (whether the copy can then go
        # on is test_recover_backend_that_missed_a_pack's question).
        raid.raid_recover('b3')
        wait_recovery(self, raid)

    def test_recover_backend_that_missed_a_pack(self):
        """A pack while a backend is degraded must not force a rebuild.

        Pack runs on the optimal backends only, so the degraded one keeps
        history they dropped.  That is harmless for the copy (the doc
        says so: packing changes backpointers and history), so recovery
        must accept the junction and copy; the next pack evens out the
        history.
        """
        raid = self.open_raid()
        db = self.open_db(raid)
        backlog = Backlog(db)
        backlog.add(30, blob_every=0)
        raid.raid_disable('b3')
        backlog.add(30, blob_every=0)
        db.pack()
        backlog.add(10, blob_every=0)
        backlog.close()
        raid.raid_recover('b3')
        wait_recovery(self, raid)
        details = raid.raid_details()['b3']
        self.assertEqual(details['state'], 'optimal', details)
        # Same current data everywhere ...
        b1 = raid.raid_backend_storage('b1')
        b3 = raid.raid_backend_storage('b3')
        for oid in range(u64(max_oid(b1)) + 1):
            self.assertEqual(current(b1, p64(oid)), current(b3, p64(oid)))
        # ... and after the next pack the same history too.
        db.pack()
        self.assert_recovered(raid, 'b3')


    def test_recover_backend_that_missed_a_pack_after_a_restart(self):
        """The same, with the RAID restarted between pack and recovery:
        its state file recorded the pack."""
        state = self.path('raid.state')
        raid = self.open_raid(state_file=state)
        db = self.open_db(raid)
        backlog = Backlog(db)
        backlog.add(30, blob_every=0)
        raid.raid_disable('b3')
        backlog.add(30, blob_every=0)
        db.pack()
        backlog.add(10, blob_every=0)
        backlog.close()
        db.close()
        self.dbs.remove(db)
        raid = self.open_raid(state_file=state)
        self.assertEqual(raid.raid_details()['b3']['state'], 'degraded')
        raid.raid_recover('b3')
        wait_recovery(self, raid)
        details = raid.raid_details()['b3']
        self.assertEqual(details['state'], 'optimal', details)
        db = self.open_db(raid)
        db.pack()
        self.assert_recovered(raid, 'b3')

    def test_a_missed_pack_without_a_record_is_refused(self):
        """Without a recorded pack, the target's superseded last
        transaction cannot be told from a foreign commit: refused."""
        raid = self.open_raid()
        db = self.open_db(raid)
        backlog = Backlog(db)
        backlog.add(30, blob_every=0)
        raid.raid_disable('b3')
        backlog.add(30, blob_every=0)
        db.pack()
        backlog.add(10, blob_every=0)
        backlog.close()
        db.close()
        self.dbs.remove(db)
        raid = self.open_raid()      # no state file: the pack is forgotten
        raid.raid_recover('b3')
        wait_recovery(self, raid)
        details = raid.raid_details()['b3']
        self.assertEqual(details['state'], 'degraded', details)
        self.assertIn('DivergedError', details['reason'])
        self.assertIn('full rebuild', details['reason'])


class FailureTests(RecoveryTestBase):
    """The target or the source fails while the copy runs."""

    faulty = True

    def prepare(self, raid, name='b2', count=300):
        db = self.open_db(raid)
        backlog = Backlog(db)
        raid.raid_disable(name)
        count = backlog.add(count, blob_every=5)
        backlog.close()
        return count

    def test_target_fails_then_recovery_resumes(self):
        raid = self.open_raid(recovery_txn_rate=100)
        count = self.prepare(raid)
        raid.raid_recover('b2')
        recovery = raid.raid_recovery()
        wait_copied(self, recovery, 20)
        self.wrapped['b2'].fail('tpc_vote')
        self.assertTrue(recovery.done.wait(RECOVERY_LIMIT))
        first = recovery.progress.txns_copied
        self.assertLess(first, count)
        details = raid.raid_details()
        self.assertEqual(details['b2']['state'], 'degraded')
        self.assertIn('recovery failed', details['b2']['reason'])
        self.assertIn('injected failure in b2.tpc_vote',
                      details['b2']['reason'])
        self.assertEqual(details['b1']['state'], 'optimal')
        self.assertEqual(raid.raid_status(), 'degraded')
        self.assertIsNone(raid.raid_recovery())
        # The failed transaction was aborted on the target.
        b2 = self.wrapped['b2']
        self.assertEqual(b2.called('tpc_abort')[-1].exception, None)
        self.assertEqual(b2.lastTransaction(), recovery.progress.copied_tid)
        self.assertTrue(self.logged('backend=b2 state=degraded',
                                    'previous=recovering',
                                    'reason=recovery failed'))

        b2.clear()
        raid.recovery_txn_rate = 0
        raid.raid_recover('b2')
        second = wait_recovery(self, raid)
        self.assertEqual(second.progress.txns_copied, count - first)
        self.assert_recovered(raid)

    def test_source_fails_with_only_two_backends(self):
        raid = self.open_raid(recovery_txn_rate=100)
        count = self.prepare(raid)
        raid.raid_recover('b2')
        recovery = raid.raid_recovery()
        wait_copied(self, recovery, 20)
        self.wrapped['b1'].fail('loadBlob')
        self.assertTrue(recovery.done.wait(RECOVERY_LIMIT))
        self.assertLess(recovery.progress.txns_copied, count)
        details = raid.raid_details()
        self.assertEqual(details['b2']['state'], 'degraded')
        self.assertIn('no other optimal backend', details['b2']['reason'])
        self.assertIn('source b1 failed', details['b2']['reason'])
        self.assertIn('recovery source failed', details['b1']['reason'])
        self.assertIsNone(raid.raid_recovery())
        self.assertEqual(details['b2']['recovery']['phase'], 'failed')
        # What was copied is a clean prefix of the source.
        b2 = raid.raid_backend_storage('b2')
        tids = committed_tids(b2)
        self.assertEqual(tids, committed_tids(
            raid.raid_backend_storage('b1'))[:len(tids)])


class ThreeBackendFailureTests(RecoveryTestBase):

    backend_count = 3
    faulty = True
    prepare = FailureTests.prepare

    def test_source_fails_and_another_takes_over(self):
        raid = self.open_raid(recovery_txn_rate=100)
        count = self.prepare(raid, 'b3')
        raid.raid_recover('b3')
        recovery = raid.raid_recovery()
        self.assertEqual(recovery.progress.source, 'b1')
        wait_copied(self, recovery, 20)
        self.wrapped['b1'].fail('loadBlob')
        self.assertTrue(wait_until(lambda: recovery.progress.source == 'b2'
                                   or recovery.done.is_set()))
        recovery.limiter.txn_rate = 0
        self.assertTrue(recovery.done.wait(RECOVERY_LIMIT))
        self.assertEqual(recovery.progress.txns_copied, count)
        details = raid.raid_details()
        self.assertEqual(details['b3']['state'], 'optimal', details)
        self.assertEqual(details['b3']['recovery']['source'], 'b2')
        self.assertEqual(details['b1']['state'], 'degraded')
        self.assertIn('recovery source failed', details['b1']['reason'])
        self.assertEqual(raid.raid_status(), 'degraded')
        self.assertTrue(self.logged('continuing from b2'))
        assert_replicas_identical(raid, ['b2', 'b3'])
        assert_blobs_identical(self, raid, ['b2', 'b3'])


class DivergenceTests(RecoveryTestBase):
    """A target that is not a prefix of the source is never copied onto."""

    blobs = False

    def diverge_and_recover(self, raid, **kw):
        self.assertIsNone(raid.raid_recovery())
        before = committed_tids(raid.raid_backend_storage('b2'))
        raid.raid_recover('b2', **kw)
        recovery = wait_recovery(self, raid)
        details = raid.raid_details()['b2']
        self.assertEqual(details['state'], 'degraded')
        self.assertIn('full rebuild', details['reason'])
        self.assertIn('full rebuild', details['recovery']['error'])
        self.assertEqual(recovery.progress.txns_copied, 0)
        # Nothing was written to the diverged target.
        self.assertEqual(committed_tids(raid.raid_backend_storage('b2')),
                         before)
        return details['reason']

    def commit_on(self, storage, tid=None, data=b'', user=b'direct'):
        txn = TransactionMetaData(user, b'committed behind the RAID')
        storage.tpc_begin(txn, tid)
        oid = p64(10 ** 6)
        try:
            serial = ZODB.utils.load_current(storage, oid)[1]
        except ZODB.POSException.POSKeyError:
            serial = z64
        storage.store(oid, serial, pickled(data), '', txn)
        storage.tpc_vote(txn)
        return storage.tpc_finish(txn)

    def test_target_with_a_transaction_the_source_lacks(self):
        """As after an unknown-outcome tpc_finish on the target."""
        raid = self.open_raid()
        db = self.open_db(raid)
        backlog = Backlog(db)
        backlog.add(5, blob_every=0)
        raid.raid_disable('b2')
        backlog.add(5, blob_every=0)
        backlog.close()
        extra = self.commit_on(raid.raid_backend_storage('b2'),
                               data=b'only on b2')
        reason = self.diverge_and_recover(raid)
        self.assertIn(extra.hex(), reason)

    def test_target_with_other_data_under_the_same_tid(self):
        raid = self.open_raid()
        db = self.open_db(raid)
        backlog = Backlog(db)
        backlog.add(5, blob_every=0)
        backlog.close()
        raid.raid_disable('b2')
        b1 = raid.raid_backend_storage('b1')
        b2 = raid.raid_backend_storage('b2')
        # b1 gets a transaction through the RAID, b2 one with the same tid
        # but other data (b2 is degraded, so the RAID leaves it alone).
        raid_tid = self.commit_on(raid, data=b'the RAID')
        self.commit_on(b2, tid=raid_tid, data=b'somebody else')
        self.assertEqual(b2.lastTransaction(), b1.lastTransaction())
        reason = self.diverge_and_recover(raid)
        self.assertIn('diverges', reason)
        self.assertIn('data of object', reason)

    def test_divergence_before_the_window_needs_verify_all(self):
        # Both backends written directly: an old transaction (an hour
        # ago, before verify's window) differs, the recent one is equal.
        old = TimeStamp(*time.gmtime(time.time() - 3600)[:6]).raw()
        recent = TimeStamp(*time.gmtime(time.time() - 10)[:6]).raw()
        for name, data in (('b1', b'old'), ('b2', b'OLD')):
            fs = FileStorage(self.path(name + '.fs'))
            self.commit_on(fs, tid=old, data=data)
            self.commit_on(fs, tid=recent, data=b'recent')
            fs.close()
        raid = self.open_raid()
        self.assertEqual(raid.raid_status(), 'optimal')
        raid.raid_disable('b2')
        self.commit_on(raid, data=b'new')
        reason = self.diverge_and_recover(raid, verify_all=True)
        self.assertIn(old.hex(), reason)
        # The default window does not look that far back: it copies.
        raid.raid_recover('b2')
        wait_recovery(self, raid)
        self.assertEqual(raid.raid_details()['b2']['state'], 'optimal')

    def test_full_rebuild_after_divergence(self):
        """What the error says: move the storage away, recover again.

        In-process the backend is swapped with reload (remove it, then
        add it back with an empty storage).
        """
        raid = self.open_raid()
        db = self.open_db(raid)
        backlog = Backlog(db)
        backlog.add(5, blob_every=0)
        raid.raid_disable('b2')
        backlog.add(5, blob_every=0)
        backlog.close()
        self.commit_on(raid.raid_backend_storage('b2'), data=b'only on b2')
        self.diverge_and_recover(raid)

        keep = [('b1', self.opener('b1'))]
        self.assertEqual(raid.raid_reload(keep)['removed'], ['b2'])
        os.rename(self.path('b2.fs'), self.path('b2.fs.diverged'))
        diff = raid.raid_reload(keep + [('b2', self.opener('b2'))])
        self.assertEqual(diff['added'], ['b2'])
        self.assertEqual(raid.raid_details()['b2']['reason'],
                         'added by reload, needs recovery')
        raid.raid_recover('b2')
        recovery = wait_recovery(self, raid)
        self.assertEqual(recovery.progress.txns_copied,
                         len(committed_tids(raid.raid_backend_storage('b1'))))
        self.assertTrue(self.logged('target is empty, full rebuild'))
        self.assert_recovered(raid)


class FullRebuildTests(RecoveryTestBase):

    def test_full_rebuild_of_an_empty_backend(self):
        raid = self.open_raid(['b1'])
        db = self.open_db(raid)
        backlog = Backlog(db)
        count = backlog.add(300, blob_every=10)
        backlog.close()
        db.close()
        self.dbs.remove(db)
        # b2 is new and empty: it opens degraded.
        raid = self.open_raid(['b1', 'b2'])
        details = raid.raid_details()
        self.assertEqual(details['b2']['state'], 'degraded')
        self.assertIn('missing transactions', details['b2']['reason'])
        raid.raid_recover('b2')
        recovery = wait_recovery(self, raid)
        total = len(committed_tids(raid.raid_backend_storage('b1')))
        self.assertGreater(total, count)
        self.assertEqual(recovery.progress.txns_copied, total)
        self.assertTrue(self.logged('target is empty, full rebuild'))
        self.assert_recovered(raid)
        self.assertGreater(assert_blobs_identical(self, raid), 20)

    def test_recover_backend_that_could_not_be_opened(self):
        missing = self.path('later', 'b2.fs')
        raid = RAIDStorage('r', [('b1', self.opener('b1')),
                                 ('b2', self.opener('b2', missing))],
                           timeout=TIMEOUT,
                           blob_dir=self.path('raid-blobs'))
        self.raids.append(raid)
        self.assertEqual(raid.raid_details()['b2']['state'], 'degraded')
        self.assertIsNone(raid.raid_backend_storage('b2'))
        db = self.open_db(raid)
        backlog = Backlog(db)
        backlog.add(30, blob_every=5)
        backlog.close()
        # Still cannot be opened: refused with the reason.
        with self.assertRaises(RAIDError) as cm:
            raid.raid_recover('b2')
        self.assertIn('cannot be opened', str(cm.exception))
        self.assertIsNone(raid.raid_recovery())
        self.assertEqual(raid.raid_details()['b2']['state'], 'degraded')
        os.makedirs(os.path.dirname(missing))
        raid.raid_recover('b2')
        wait_recovery(self, raid)
        self.assert_recovered(raid)


class ConfigTests(unittest.TestCase):

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix='zeoraid-recovery-config-')

    def tearDown(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    def test_rate_keys(self):
        text = '''
        %%import zeoraid
        <raidstorage r>
          recovery-txn-rate 250
          recovery-byte-rate 2MB
          <filestorage b1>
            path %s/b1.fs
          </filestorage>
        </raidstorage>
        ''' % self.tmp
        raid = ZODB.config.storageFromString(text)
        try:
            self.assertEqual(raid.recovery_txn_rate, 250)
            self.assertEqual(raid.recovery_byte_rate, 2 * 1024 * 1024)
        finally:
            raid.close()
        raid = ZODB.config.storageFromString(
            text.replace('recovery-txn-rate 250', '')
                .replace('recovery-byte-rate 2MB', ''))
        try:
            self.assertEqual((raid.recovery_txn_rate,
                              raid.recovery_byte_rate), (0, 0))
        finally:
            raid.close()
        with self.assertRaises((ZConfig.ConfigurationError, ValueError)):
            ZODB.config.storageFromString(
                text.replace('recovery-txn-rate 250',
                             'recovery-txn-rate -1'))


class NaiveCopyTests(RecoveryTestBase):
    """The benchmark's baseline copies correctly (no blobs)."""

    blobs = False

    def test_naive_copy(self):
        raid = self.open_raid(['b1'])
        db = self.open_db(raid)
        backlog = Backlog(db)
        backlog.add(100, blob_every=0)
        backlog.close()
        target = FileStorage(self.path('copy.fs'))
        try:
            source = raid.raid_backend_storage('b1')
            self.assertEqual(naive_copy(source, target),
                             len(committed_tids(source)))
            self.assertEqual(committed_tids(target), committed_tids(source))
            a_it, b_it = source.iterator(), target.iterator()
            for a, b in zip(a_it, b_it):
                self.assertIsNone(compare_transactions(a, b))
            a_it.close()
            b_it.close()
        finally:
            target.close()


def test_suite():
    loader = unittest.TestLoader()
    suite = unittest.TestSuite()
    for case in (RateLimiterTests, BackPressureTests, CompareTests, RecoveryTests,
                 RefusalTests, FailureTests, ThreeBackendFailureTests,
                 DivergenceTests, FullRebuildTests, ConfigTests,
                 NaiveCopyTests):
        suite.addTest(loader.loadTestsFromTestCase(case))
    return suite
