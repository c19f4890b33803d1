"""RAID failure tests: faults injected into real FileStorage backends.

Every storage method the RAID forwards to its backends is exercised with
one backend failing and, separately, hanging.  The call must succeed with
the right value, exactly the faulty backend must be degraded (with the
error in its reason), a hang must be cut off by the RAID's timeout, every
backend that saw tpc_begin must see tpc_finish or tpc_abort, and the
remaining backends must hold identical transactions.

The table ``SCENARIOS`` drives ``test_fail_*`` and ``test_hang_*``.  For
each row, a clean dry run first shows which backends the RAID calls (all
of them for writes, one for reads); the fault goes to one of those.
"""
import os
import shutil
import tempfile
import threading
import time
import unittest

import transaction
import ZODB
import ZODB.interfaces
import ZODB.POSException
from persistent.mapping import PersistentMapping
from ZODB.blob import Blob
from ZODB.Connection import TransactionMetaData
from ZODB.interfaces import IStorageWrapper
from ZODB.FileStorage import FileStorage
from ZODB.serialize import referencesf
from ZODB.tests.MinPO import MinPO
from ZODB.tests.StorageTestBase import zodb_pickle
from ZODB.utils import maxtid
from ZODB.utils import newTid
from ZODB.utils import u64
from ZODB.utils import z64
from zope.interface import implementer

from tests.faulty import FaultyStorage
from tests.faulty import InjectedFault
from tests.faulty import OneShot
from tests.invariants import assert_replicas_identical
from tests.invariants import committed_tids
from tests.polling import poll

from zeoraid.errors import RAIDError
from zeoraid.errors import RAIDFailedError
from zeoraid.storage import RAIDStorage

TIMEOUT = 0.5
# A hung backend must cost at most about one timeout, plus normal work
# on a loaded 2-core machine.
HANG_LIMIT = TIMEOUT * 4
# How long hung calls may take to get their tpc_abort after release.
SETTLE = 2.0


def wait_until(condition, timeout=SETTLE):
    return poll(condition, timeout)


def ref(oid):
    """A stand-in persistent object that pickles as a reference to oid."""
    obj = MinPO(None)
    obj._p_oid = oid
    return obj


@implementer(IStorageWrapper)
class RecordingWrapper:
    """What a ZODB.DB or a ZEO server registers: records every upcall."""

    def __init__(self):
        self.calls = []

    def invalidate(self, transaction_id, oids, version=''):
        self.calls.append(('invalidate', transaction_id, oids))

    def invalidateCache(self):
        self.calls.append(('invalidateCache',))

    def references(self, record, oids=None):
        return referencesf(record, oids)

    def transform_record_data(self, data):
        return data

    def untransform_record_data(self, data):
        return data


class RAIDTestBase(unittest.TestCase):
    """Builds RAIDs over FaultyStorage(FileStorage) backends; cleans up."""

    timeout = TIMEOUT
    backend_count = 3
    blobs = False

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix='zeoraid-faults-')
        self.faulty = {}          # name -> current FaultyStorage
        self.all_faulty = []      # every FaultyStorage ever opened
        self.raids = []
        self.open_gates = []      # events that hanging openers wait on
        self.names = ['b%d' % (i + 1) for i in range(self.backend_count)]

    def tearDown(self):
        for fs in self.all_faulty:
            fs.release()
        for gate in self.open_gates:
            gate.set()
        for raid in self.raids:
            try:
                raid.close()
            except Exception:
                pass
        for fs in self.all_faulty:
            try:
                fs.base.close()
            except Exception:
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- building ----------------------------------------------------------

    def path(self, name):
        return os.path.join(self.tmp, name + '.fs')

    def blob_dir(self, name):
        return os.path.join(self.tmp, name + '-blobs')

    def opener(self, name):
        def open_backend():
            kw = {}
            if self.blobs:
                kw['blob_dir'] = self.blob_dir(name)
            fs = FaultyStorage(FileStorage(self.path(name), **kw), name=name)
            self.faulty[name] = fs
            self.all_faulty.append(fs)
            return fs
        return open_backend

    def failing_opener(self, message):
        def open_backend():
            raise InjectedFault(message)
        return open_backend

    def hanging_opener(self):
        gate = threading.Event()
        self.open_gates.append(gate)

        def open_backend():
            # Bounded, so a RAID that waits forever fails its test
            # instead of blocking the run.
            gate.wait(FaultyStorage.max_hang)
            raise InjectedFault('hanging opener released')
        return open_backend

    def open_raid(self, backends=None, **kw):
        if backends is None:
            backends = [(name, self.opener(name)) for name in self.names]
        kw.setdefault('timeout', self.timeout)
        if self.blobs:
            kw.setdefault('blob_dir', self.blob_dir('raid'))
        raid = RAIDStorage('raid', backends, **kw)
        self.raids.append(raid)
        return raid

    # -- committing --------------------------------------------------------

    def txn(self, description='test'):
        return TransactionMetaData(user='tester', description=description,
                                   extension={'test': self.id()})

    def commit(self, raid, stores=(), description='test', tid=None,
               func=None, extra=None):
        """Commit (oid, serial, data) stores; return tpc_finish's tid."""
        txn = self.txn(description)
        if tid is None:
            raid.tpc_begin(txn)
        else:
            raid.tpc_begin(txn, tid)
        try:
            for oid, serial, data in stores:
                self.assertIsNone(raid.store(oid, serial, data, '', txn))
            if extra is not None:
                extra(txn)
            raid.tpc_vote(txn)
        except BaseException:
            raid.tpc_abort(txn)
            raise
        return raid.tpc_finish(txn, func or (lambda tid: None))

    def new_object(self, raid, value):
        oid = raid.new_oid()
        data = zodb_pickle(MinPO(value))
        tid = self.commit(raid, [(oid, z64, data)], 'new %r' % (value,))
        return oid, tid, data

    def state(self, raid, name):
        return raid.raid_details()[name]['state']

    def reason(self, raid, name):
        return raid.raid_details()[name]['reason'] or ''

    def assert_states(self, raid, **expected):
        details = raid.raid_details()
        actual = {name: details[name]['state'] for name in expected}
        self.assertEqual(actual, expected, details)

    def assert_tpc_closed(self, faulties=None):
        """Every txn a backend began got tpc_finish or tpc_abort there."""
        faulties = self.all_faulty if faulties is None else faulties

        def unclosed():
            missing = []
            for fs in faulties:
                calls = list(fs.calls)
                for i, call in enumerate(calls):
                    if call.name != 'tpc_begin':
                        continue
                    txn = call.args[0]
                    if not any(c.name in ('tpc_finish', 'tpc_abort')
                               and c.args and c.args[0] is txn
                               for c in calls[i + 1:]):
                        missing.append((fs.name, call))
            return missing
        wait_until(lambda: not unclosed())
        self.assertEqual(unclosed(), [],
                         'backends that got tpc_begin but neither '
                         'tpc_finish nor tpc_abort')


class Context:
    """Objects committed before a scenario, with their revisions."""


class ScenarioDriver(RAIDTestBase):
    """Operations and the driver for the table-driven fault scenarios."""

    def prepare(self, raid):
        """Root referencing object a (two revisions) and b."""
        ctx = Context()
        ctx.oid_a = raid.new_oid()
        ctx.oid_b = raid.new_oid()
        ctx.data_a1 = zodb_pickle(MinPO('a1'))
        ctx.data_a2 = zodb_pickle(MinPO('a2'))
        ctx.data_b = zodb_pickle(MinPO('b'))
        root = PersistentMapping({'a': ref(ctx.oid_a), 'b': ref(ctx.oid_b)})
        ctx.data_root = zodb_pickle(root)
        ctx.tid_1 = self.commit(raid, [(z64, z64, ctx.data_root),
                                       (ctx.oid_a, z64, ctx.data_a1),
                                       (ctx.oid_b, z64, ctx.data_b)],
                                'first')
        ctx.tid_2 = self.commit(raid, [(ctx.oid_a, ctx.tid_1, ctx.data_a2)],
                                'second')
        ctx.max_oid = ctx.oid_b
        return ctx

    # -- operations: each runs RAID calls and checks their results ---------

    def op_commit(self, raid, ctx):
        before = raid.lastTransaction()
        oid = raid.new_oid()
        tid = self.commit(raid, [(oid, z64, zodb_pickle(MinPO('c')))])
        self.assertIsInstance(tid, bytes)
        self.assertGreater(tid, before)
        self.assertEqual(raid.lastTransaction(), tid)

    def op_abort(self, raid, ctx):
        before = raid.lastTransaction()
        txn = self.txn('aborted')
        raid.tpc_begin(txn)
        raid.store(raid.new_oid(), z64, zodb_pickle(MinPO('x')), '', txn)
        raid.tpc_abort(txn)
        self.assertEqual(raid.lastTransaction(), before)

    def op_check_current(self, raid, ctx):
        oid = raid.new_oid()

        def extra(txn):
            raid.checkCurrentSerialInTransaction(ctx.oid_b, ctx.tid_1, txn)
        self.commit(raid, [(oid, z64, zodb_pickle(MinPO('cc')))],
                    extra=extra)

    def op_delete(self, raid, ctx):
        oid, tid, _ = self.new_object(raid, 'doomed')

        def extra(txn):
            raid.deleteObject(oid, tid, txn)
        self.commit(raid, extra=extra, description='delete')
        with self.assertRaises(ZODB.POSException.POSKeyError):
            raid.load(oid)

    def op_restore(self, raid, ctx):
        oid = raid.new_oid()
        tid = newTid(raid.lastTransaction())
        data = zodb_pickle(MinPO('restored'))

        def extra(txn):
            raid.restore(oid, tid, data, '', None, txn)
        self.assertEqual(self.commit(raid, tid=tid, extra=extra,
                                     description='restore'), tid)
        self.assertEqual(raid.loadSerial(oid, tid), data)

    def op_undo(self, raid, ctx):
        oid, tid1, data1 = self.new_object(raid, 'u1')
        self.commit(raid, [(oid, tid1, zodb_pickle(MinPO('u2')))], 'u2')
        undo_id = raid.undoLog(0, 1)[0]['id']
        txn = self.txn('undo')
        raid.tpc_begin(txn)
        try:
            result = raid.undo(undo_id, txn)
            raid.tpc_vote(txn)
        except BaseException:
            raid.tpc_abort(txn)
            raise
        tid = raid.tpc_finish(txn, lambda tid: None)
        self.assertEqual(list(result[1]), [oid])
        self.assertEqual(raid.load(oid)[0], data1)
        self.assertEqual(raid.lastTransaction(), tid)

    def op_store_blob(self, raid, ctx):
        oid = raid.new_oid()
        self.commit_blob(raid, oid, z64, b'blob data')

    def commit_blob(self, raid, oid, serial, content):
        fd, filename = tempfile.mkstemp(dir=raid.temporaryDirectory(),
                                        prefix='upload-')
        with os.fdopen(fd, 'wb') as f:
            f.write(content)
        txn = self.txn('blob')
        raid.tpc_begin(txn)
        try:
            raid.storeBlob(oid, serial, zodb_pickle(MinPO('blob')),
                           filename, '', txn)
            raid.tpc_vote(txn)
        except BaseException:
            raid.tpc_abort(txn)
            raise
        return raid.tpc_finish(txn, lambda tid: None)

    def op_load_blob(self, raid, ctx):
        # A fresh blob each time: the RAID may keep blobs it has served.
        oid = raid.new_oid()
        content = b'content %f' % time.time()
        tid = self.commit_blob(raid, oid, z64, content)
        with open(raid.loadBlob(oid, tid), 'rb') as f:
            self.assertEqual(f.read(), content)

    def op_open_blob(self, raid, ctx):
        oid = raid.new_oid()
        content = b'content %f' % time.time()
        tid = self.commit_blob(raid, oid, z64, content)
        with raid.openCommittedBlobFile(oid, tid) as f:
            self.assertEqual(f.read(), content)

    def op_load(self, raid, ctx):
        self.assertEqual(raid.load(ctx.oid_a), (ctx.data_a2, ctx.tid_2))

    def op_load_before(self, raid, ctx):
        self.assertEqual(raid.loadBefore(ctx.oid_a, ctx.tid_2),
                         (ctx.data_a1, ctx.tid_1, ctx.tid_2))
        self.assertEqual(raid.loadBefore(ctx.oid_a, maxtid),
                         (ctx.data_a2, ctx.tid_2, None))

    def op_load_serial(self, raid, ctx):
        self.assertEqual(raid.loadSerial(ctx.oid_a, ctx.tid_1), ctx.data_a1)

    def op_get_tid(self, raid, ctx):
        self.assertEqual(raid.getTid(ctx.oid_a), ctx.tid_2)

    def op_history(self, raid, ctx):
        self.assertEqual([h['tid'] for h in raid.history(ctx.oid_a, 10)],
                         [ctx.tid_2, ctx.tid_1])

    def op_iterator(self, raid, ctx):
        tids = committed_tids(raid)
        self.assertEqual(tids[:2], [ctx.tid_1, ctx.tid_2])
        self.assertEqual(tids[-1], raid.lastTransaction())

    def op_undo_log(self, raid, ctx):
        log = raid.undoLog(0, 20)
        self.assertEqual([e['description'] for e in log][-2:],
                         [b'second', b'first'])

    def op_undo_info(self, raid, ctx):
        log = raid.undoInfo(0, 20)
        self.assertEqual([e['description'] for e in log][-2:],
                         [b'second', b'first'])

    def op_get_size(self, raid, ctx):
        sizes = {fs.base.getSize() for fs in self.faulty.values()}
        self.assertIn(raid.getSize(), sizes)

    def op_len(self, raid, ctx):
        self.assertEqual(len(raid), 3)

    def op_record_iternext(self, raid, ctx):
        oid, tid, data, next_oid = raid.record_iternext()
        self.assertEqual((oid, tid, data), (z64, ctx.tid_1, ctx.data_root))
        oid, tid, data, next_oid = raid.record_iternext(next_oid)
        self.assertEqual((oid, tid, data), (ctx.oid_a, ctx.tid_2,
                                            ctx.data_a2))

    def op_pack(self, raid, ctx):
        # Fresh revisions, so there is always something old to pack away:
        # the RAID packs at most up to its last transaction, so the
        # revision to disappear must be two revisions old.
        data, old = raid.load(ctx.oid_b)
        mid = self.commit(raid, [(ctx.oid_b, old, ctx.data_b)], 'b again')
        new = self.commit(raid, [(ctx.oid_b, mid, ctx.data_b)], 'b again')
        time.sleep(0.01)
        self.assertIsNone(raid.pack(time.time(), referencesf))
        with self.assertRaises(ZODB.POSException.POSKeyError):
            raid.loadSerial(ctx.oid_b, old)
        self.assertEqual(raid.loadSerial(ctx.oid_b, new), ctx.data_b)

    # -- the scenario driver -------------------------------------------------

    def run_scenario(self, candidates, op, mode, **raid_options):
        raid = self.open_raid(**raid_options)
        ctx = self.prepare(raid)
        # Dry run: which backends does the RAID call for this operation?
        for fs in self.faulty.values():
            del fs.calls[:]
        op(raid, ctx)
        method = targets = None
        for candidate in candidates:
            targets = [name for name in self.names
                       if self.faulty[name].called(candidate)]
            if targets:
                method = candidate
                break
        self.assertTrue(method, 'the RAID called none of %s on any backend'
                        % (candidates,))
        # A fan-out (all backends got it): fault the last backend.  A read
        # (one backend got it): the RAID picks its reader by its own
        # policy, so install a one-shot fault on every backend; the first
        # backend asked is the victim.
        if len(targets) == len(self.names):
            faulted = [self.faulty[targets[-1]]]
            shot = None
        else:
            faulted = [self.faulty[name] for name in self.names]
            shot = OneShot()
        for fs in faulted:
            if mode == 'fail':
                fs.fail(method, when=shot)
            else:
                fs.hang(method, when=shot)
        for attempt in range(3):
            start = time.monotonic()
            op(raid, ctx)
            elapsed = time.monotonic() - start
            if mode == 'hang':
                self.assertLess(elapsed, HANG_LIMIT,
                                '%s hung: %.2fs' % (method, elapsed))
            hit = [fs for fs in faulted
                   if any(c.injected for c in fs.called(method))]
            if hit:
                break
        else:
            self.fail('the RAID did not call %s again' % method)
        self.assertEqual(len(hit), 1, hit)
        fs = hit[0]
        victim = fs.name
        for other in faulted:
            other.clear()
        self.assertEqual(self.state(raid, victim), 'degraded',
                         raid.raid_details())
        reason = self.reason(raid, victim)
        if mode == 'fail':
            self.assertIn('injected failure in %s.%s' % (victim, method),
                          reason)
        else:
            self.assertTrue(
                any(word in reason.lower() for word in (
                    'time', 'deadline', 'no answer', 'hang')),
                'reason does not mention the timeout: %r' % reason)
        others = [name for name in self.names if name != victim]
        self.assert_states(raid, **{name: 'optimal' for name in others})
        self.assertEqual(raid.raid_status(), 'degraded')
        fs.release()
        self.assert_tpc_closed()
        assert_replicas_identical(raid)
        # The RAID goes on with the others, leaving the victim alone.
        calls_before = len(fs.calls)
        self.op_commit(raid, ctx)
        # (A late tpc_abort of the faulted transaction may still arrive.)
        self.assertEqual([c.name for c in fs.calls[calls_before:]
                          if c.name in ('tpc_begin', 'store', 'tpc_vote',
                                        'tpc_finish')], [])
        self.assert_tpc_closed()
        self.assertEqual(assert_replicas_identical(raid),
                         len(committed_tids(self.faulty[others[0]])))


class FaultScenarios(ScenarioDriver):
    """Each forwarded method failing / hanging on one backend.

    Test methods are generated below from SCENARIOS.
    """


class BlobFaultScenarios(ScenarioDriver):
    """The blob rows of SCENARIOS: RAID and backends with blob dirs."""
    blobs = True


# (label, backend methods the RAID may call for it, operation, options)
# options: 'blobs': run with blob dirs; 'raid': extra RAIDStorage keywords.
# The RAID hands out oids itself (a high-water mark seeded at startup; in
# coop mode in the server-id's residue class), so new_oid never reaches
# the backends after startup.  Pack has a deadline of
# its own (pack_timeout), shortened here to the call timeout.
SCENARIOS = [
    ('tpc_begin', ['tpc_begin'], 'op_commit', {}),
    ('store', ['store'], 'op_commit', {}),
    ('tpc_vote', ['tpc_vote'], 'op_commit', {}),
    ('tpc_finish', ['tpc_finish'], 'op_commit', {}),
    ('tpc_abort', ['tpc_abort'], 'op_abort', {}),
    ('checkCurrentSerialInTransaction', ['checkCurrentSerialInTransaction'],
     'op_check_current', {}),
    ('deleteObject', ['deleteObject'], 'op_delete', {}),
    ('restore', ['restore'], 'op_restore', {}),
    ('undo', ['undo'], 'op_undo', {}),
    ('load', ['load', 'loadBefore'], 'op_load', {}),
    ('loadBefore', ['loadBefore'], 'op_load_before', {}),
    ('loadSerial', ['loadSerial'], 'op_load_serial', {}),
    ('getTid', ['getTid', 'loadBefore', 'load'], 'op_get_tid', {}),
    ('history', ['history'], 'op_history', {}),
    ('iterator', ['iterator'], 'op_iterator', {}),
    ('undoLog', ['undoLog'], 'op_undo_log', {}),
    ('undoInfo', ['undoInfo'], 'op_undo_info', {}),
    ('getSize', ['getSize'], 'op_get_size', {}),
    ('len', ['__len__'], 'op_len', {}),
    ('record_iternext', ['record_iternext'], 'op_record_iternext', {}),
    ('commit_coop', ['tpc_vote'], 'op_commit',
     {'raid': {'cluster_mode': 'coop', 'server_id': 1}}),
    ('pack', ['pack'], 'op_pack', {'raid': {'pack_timeout': TIMEOUT}}),
    ('storeBlob', ['storeBlob'], 'op_store_blob', {'blobs': True}),
    ('loadBlob', ['loadBlob', 'openCommittedBlobFile'], 'op_load_blob',
     {'blobs': True}),
    ('openCommittedBlobFile', ['openCommittedBlobFile', 'loadBlob'],
     'op_open_blob', {'blobs': True}),
]


def _make_test(label, candidates, op_name, mode, raid_options):
    def test(self):
        self.run_scenario(candidates, getattr(self, op_name), mode,
                          **raid_options)
    test.__name__ = 'test_%s_%s' % (mode, label)
    test.__doc__ = '%s on one backend during %s' % (mode, label)
    return test


for _label, _candidates, _op, _options in SCENARIOS:
    for _mode in ('fail', 'hang'):
        _test = _make_test(_label, _candidates, _op, _mode,
                           _options.get('raid', {}))
        setattr(BlobFaultScenarios if _options.get('blobs')
                else FaultScenarios, _test.__name__, _test)
del _label, _candidates, _op, _options, _mode, _test


class CommitProtocolTests(RAIDTestBase):
    """Conflicts, votes, finish: what the RAID does with the answers."""

    def setUp(self):
        super().setUp()
        self.raid = self.open_raid()
        self.oid = self.raid.new_oid()
        self.tid1 = self.commit(self.raid, [(self.oid, z64,
                                             zodb_pickle(MinPO(1)))])
        self.tid2 = self.commit(self.raid, [(self.oid, self.tid1,
                                             zodb_pickle(MinPO(2)))])

    def test_identical_conflict_is_reraised_and_degrades_nobody(self):
        raid = self.raid
        txn = self.txn('stale')
        raid.tpc_begin(txn)
        with self.assertRaises(ZODB.POSException.ConflictError) as cm:
            raid.store(self.oid, self.tid1, zodb_pickle(MinPO(3)), '', txn)
            raid.tpc_vote(txn)
        raid.tpc_abort(txn)
        self.assertIsInstance(cm.exception,
                              transaction.interfaces.TransientError)
        self.assertEqual(cm.exception.oid, self.oid)
        self.assertEqual(raid.raid_status(), 'optimal', raid.raid_details())
        self.assert_tpc_closed()
        # ZODB retries: with the current serial it goes through.
        self.commit(raid, [(self.oid, self.tid2, zodb_pickle(MinPO(3)))])
        self.assertEqual(raid.raid_status(), 'optimal')
        assert_replicas_identical(raid)

    def test_conflict_from_minority_degrades_it(self):
        raid = self.raid
        self.faulty['b3'].fail_once(
            'tpc_vote', ZODB.POSException.ConflictError(
                oid=self.oid, serials=(self.tid2, self.tid1)))
        tid = self.commit(raid, [(self.oid, self.tid2,
                                  zodb_pickle(MinPO(3)))])
        self.assertEqual(raid.lastTransaction(), tid)
        self.assert_states(raid, b1='optimal', b2='optimal', b3='degraded')
        self.assertIn('ConflictError', self.reason(raid, 'b3'))
        self.assert_tpc_closed()
        assert_replicas_identical(raid)
        self.assertEqual(committed_tids(self.faulty['b1'])[-1], tid)

    def test_ok_vote_from_minority_degrades_it(self):
        raid = self.raid
        for name in ('b2', 'b3'):
            self.faulty[name].fail_once(
                'tpc_vote', ZODB.POSException.ConflictError(
                    oid=self.oid, serials=(self.tid2, self.tid1)))
        txn = self.txn('split')
        raid.tpc_begin(txn)
        raid.store(self.oid, self.tid2, zodb_pickle(MinPO(3)), '', txn)
        with self.assertRaises(ZODB.POSException.ConflictError):
            raid.tpc_vote(txn)
        raid.tpc_abort(txn)
        self.assert_states(raid, b1='degraded', b2='optimal', b3='optimal')
        self.assert_tpc_closed()
        self.assertEqual(raid.lastTransaction(), self.tid2)
        assert_replicas_identical(raid)
        self.commit(raid, [(self.oid, self.tid2, zodb_pickle(MinPO(3)))])
        assert_replicas_identical(raid)

    def test_finish_failure_is_unknown_outcome(self):
        raid = self.raid
        self.faulty['b2'].fail('tpc_finish')
        called = []
        tid = self.commit(raid, [(self.oid, self.tid2,
                                  zodb_pickle(MinPO(3)))],
                          func=called.append)
        self.assertEqual(called, [tid])
        self.assert_states(raid, b1='optimal', b2='degraded', b3='optimal')
        self.assertIn('unknown outcome', self.reason(raid, 'b2'))
        self.assertIn('injected failure in b2.tpc_finish',
                      self.reason(raid, 'b2'))
        self.assert_tpc_closed()
        assert_replicas_identical(raid)

    def test_finish_hang_is_unknown_outcome(self):
        raid = self.raid
        self.faulty['b1'].hang('tpc_finish', proceed=True)
        start = time.monotonic()
        tid = self.commit(raid, [(self.oid, self.tid2,
                                  zodb_pickle(MinPO(3)))])
        self.assertLess(time.monotonic() - start, HANG_LIMIT)
        self.assert_states(raid, b1='degraded', b2='optimal', b3='optimal')
        self.assertIn('unknown outcome', self.reason(raid, 'b1'))
        self.assertEqual(raid.lastTransaction(), tid)
        self.faulty['b1'].release()
        self.assert_tpc_closed()
        assert_replicas_identical(raid)

    def test_func_called_once_before_last_transaction_reports_tid(self):
        raid = self.raid
        seen = []

        def func(tid):
            seen.append((tid, raid.lastTransaction(),
                         threading.current_thread()))
        before = raid.lastTransaction()
        tid = self.commit(raid, [(self.oid, self.tid2,
                                  zodb_pickle(MinPO(3)))], func=func)
        self.assertIs(type(tid), bytes)
        self.assertEqual(len(seen), 1)
        self.assertEqual(seen[0][0], tid)
        self.assertEqual(seen[0][1], before)
        self.assertIs(seen[0][2], threading.current_thread())
        self.assertEqual(raid.lastTransaction(), tid)
        for name in self.names:
            fs = self.faulty[name]
            self.assertEqual(fs.base.lastTransaction(), tid, name)
            self.assertEqual(committed_tids(fs.base)[-1], tid, name)
            begins = fs.called('tpc_begin')
            self.assertEqual(begins[-1].args[1], tid, name)
        assert_replicas_identical(raid)

    def test_every_begun_backend_is_finished_or_aborted(self):
        # A backend that fails at store still gets its tpc_abort; one that
        # hangs at vote gets it once released.
        raid = self.raid
        for fs in self.faulty.values():
            del fs.calls[:]
        self.faulty['b2'].fail('store')
        self.faulty['b3'].hang('tpc_vote')
        self.commit(raid, [(self.oid, self.tid2, zodb_pickle(MinPO(3)))])
        self.assert_states(raid, b1='optimal', b2='degraded', b3='degraded')
        self.assertEqual(self.faulty['b2'].called('tpc_finish'), [])
        self.assertTrue(wait_until(
            lambda: self.faulty['b2'].called('tpc_abort')),
            'b2 got tpc_begin and failed at store, but never tpc_abort')
        self.faulty['b3'].release()
        self.assert_tpc_closed()

    def test_degraded_backend_not_used_by_later_commits(self):
        raid = self.raid
        raid.raid_disable('b2')
        before = len(self.faulty['b2'].calls)
        self.commit(raid, [(self.oid, self.tid2, zodb_pickle(MinPO(3)))])
        self.assertEqual(self.faulty['b2'].calls[before:], [])
        assert_replicas_identical(raid)
        self.assertEqual(
            len(committed_tids(self.faulty['b2'])) + 1,
            len(committed_tids(self.faulty['b1'])))

    def test_db_commits_survive_a_failing_backend(self):
        db = ZODB.DB(self.raid)
        try:
            tm = transaction.TransactionManager()
            conn = db.open(tm)
            root = conn.root()
            for i in range(20):
                if i == 7:
                    self.faulty['b2'].fail('tpc_vote')
                root['n'] = i
                tm.commit()
            conn.close()
        finally:
            db.close()
        self.raids.remove(self.raid)
        self.assert_states(self.raid, b1='optimal', b2='degraded',
                           b3='optimal')
        self.assert_tpc_closed()
        storage = FileStorage(self.path('b1'), read_only=True)
        try:
            db = ZODB.DB(storage)
            self.assertEqual(db.open().root()['n'], 19)
            db.close()
        finally:
            storage.close()


class StartupTests(RAIDTestBase):

    def test_opener_failure_starts_degraded(self):
        raid = self.open_raid([('b1', self.opener('b1')),
                               ('b2', self.failing_opener('disk on fire')),
                               ('b3', self.opener('b3'))])
        self.assert_states(raid, b1='optimal', b2='degraded', b3='optimal')
        self.assertIn('disk on fire', self.reason(raid, 'b2'))
        self.assertIsNone(raid.raid_backend_storage('b2'))
        self.assertEqual(raid.raid_status(), 'degraded')
        oid = raid.new_oid()
        self.commit(raid, [(oid, z64, zodb_pickle(MinPO(1)))])
        assert_replicas_identical(raid)

    def test_hanging_opener_does_not_block_startup(self):
        start = time.monotonic()
        raid = self.open_raid([('b1', self.opener('b1')),
                               ('b2', self.hanging_opener()),
                               ('b3', self.opener('b3'))])
        self.assertLess(time.monotonic() - start, HANG_LIMIT)
        self.assert_states(raid, b1='optimal', b2='degraded', b3='optimal')
        oid = raid.new_oid()
        self.commit(raid, [(oid, z64, zodb_pickle(MinPO(1)))])
        assert_replicas_identical(raid)

    def test_lagging_backend_starts_degraded(self):
        raid = self.open_raid()
        oid = raid.new_oid()
        tid1 = self.commit(raid, [(oid, z64, zodb_pickle(MinPO(1)))])
        raid.close()
        self.raids.remove(raid)
        # b1 and b2 get one more transaction behind the RAID's back.
        tid2 = newTid(tid1)
        for name in ('b1', 'b2'):
            fs = FileStorage(self.path(name))
            txn = self.txn('extra')
            fs.tpc_begin(txn, tid2)
            fs.store(oid, tid1, zodb_pickle(MinPO(2)), '', txn)
            fs.tpc_vote(txn)
            fs.tpc_finish(txn)
            fs.close()
        raid = self.open_raid()
        self.assert_states(raid, b1='optimal', b2='optimal', b3='degraded')
        self.assertIn('missing transactions', self.reason(raid, 'b3'))
        self.assertEqual(raid.lastTransaction(), tid2)
        self.assertEqual(raid.load(oid)[1], tid2)
        tid3 = self.commit(raid, [(oid, tid2, zodb_pickle(MinPO(3)))])
        self.assertGreater(tid3, tid2)
        assert_replicas_identical(raid)
        self.assertEqual(committed_tids(self.faulty['b3'].base), [tid1])

    def test_all_backends_failing_is_a_clear_error(self):
        start = time.monotonic()
        with self.assertRaises(RAIDError) as cm:
            self.open_raid([('b1', self.failing_opener('b1 is gone')),
                            ('b2', self.hanging_opener())])
        self.assertLess(time.monotonic() - start, HANG_LIMIT)
        message = str(cm.exception)
        self.assertIn('b1', message)
        self.assertIn('b2', message)

    def test_new_raid_starts_optimal_and_empty(self):
        raid = self.open_raid()
        self.assertEqual(raid.raid_status(), 'optimal')
        self.assertEqual(raid.lastTransaction(), z64)
        self.assertEqual(sorted(raid.raid_details()), self.names)
        for name, info in raid.raid_details().items():
            self.assertEqual(info['state'], 'optimal')
            self.assertIsNone(info['reason'])
            self.assertIsInstance(info['since'], float)


class OidTests(RAIDTestBase):

    def test_oids_unique_across_failover(self):
        raid = self.open_raid()
        for fs in self.faulty.values():
            del fs.calls[:]
        first = [raid.new_oid() for _ in range(5)]
        sources = [name for name in self.names
                   if self.faulty[name].called('new_oid')]
        source = sources[0] if sources else 'b1'
        raid.raid_disable(source)
        second = [raid.new_oid() for _ in range(5)]
        everything = first + second
        self.assertEqual(len(set(everything)), 10, everything)
        self.assertGreater(min(second), max(first))
        self.assertEqual(sorted(first), first)
        self.assertEqual(sorted(second), second)
        # The survivors accept the new oids as new objects.
        self.commit(raid, [(oid, z64, zodb_pickle(MinPO(u64(oid))))
                           for oid in second])
        assert_replicas_identical(raid)

    def test_oids_above_stored_objects_after_restart(self):
        raid = self.open_raid()
        oids = [raid.new_oid() for _ in range(3)]
        self.commit(raid, [(oid, z64, zodb_pickle(MinPO(1))) for oid in oids])
        raid.close()
        self.raids.remove(raid)
        raid = self.open_raid()
        self.assertGreater(raid.new_oid(), max(oids))


class StatusTests(RAIDTestBase):
    backend_count = 2

    def fail_last_backend(self, raid):
        """b1 disabled, b2 (the last optimal one) hangs at vote."""
        raid.raid_disable('b1')
        self.faulty['b2'].hang('tpc_vote')
        start = time.monotonic()
        with self.assertRaises(ZODB.POSException.POSError):
            self.commit(raid, [(raid.new_oid(), z64,
                                zodb_pickle(MinPO(1)))])
        self.assertLess(time.monotonic() - start, HANG_LIMIT)
        self.faulty['b2'].release()

    def test_status_transitions_and_close_fail_mode(self):
        raid = self.open_raid(fail_mode='close')
        self.assertEqual(raid.raid_status(), 'optimal')
        self.fail_last_backend(raid)
        self.assertEqual(raid.raid_status(), 'failed', raid.raid_details())
        self.assert_states(raid, b1='degraded', b2='degraded')
        with self.assertRaises(RAIDFailedError):
            raid.tpc_begin(self.txn())
        with self.assertRaises(RAIDFailedError):
            raid.load(z64)
        self.assert_tpc_closed()

    def test_degraded_status(self):
        raid = self.open_raid()
        result = raid.raid_disable('b1')
        self.assertIsInstance(result, str)
        self.assertEqual(raid.raid_status(), 'degraded')
        self.assert_states(raid, b1='degraded', b2='optimal')
        self.assertTrue(self.reason(raid, 'b1'))

    def test_read_only_fail_mode(self):
        raid = self.open_raid(fail_mode='read-only')
        self.assertFalse(raid.isReadOnly())
        self.fail_last_backend(raid)
        self.assertEqual(raid.raid_status(), 'failed')
        self.assertTrue(raid.isReadOnly())
        with self.assertRaises(ZODB.POSException.ReadOnlyError):
            raid.tpc_begin(self.txn())
        self.assert_tpc_closed()

    def test_disable_refuses_last_optimal_backend(self):
        raid = self.open_raid()
        raid.raid_disable('b2')
        with self.assertRaises(RAIDError) as cm:
            raid.raid_disable('b1')
        self.assertIn('b1', str(cm.exception))
        self.assert_states(raid, b1='optimal', b2='degraded')
        self.assertEqual(raid.raid_status(), 'degraded')

    def test_disable_refuses_unknown_name(self):
        raid = self.open_raid()
        with self.assertRaises(RAIDError) as cm:
            raid.raid_disable('nosuchbackend')
        self.assertIn('nosuchbackend', str(cm.exception))
        self.assertEqual(raid.raid_status(), 'optimal')

    def test_backend_exceptions_never_reach_the_caller_raw(self):
        raid = self.open_raid()
        for fs in self.faulty.values():
            fs.fail('*')
        with self.assertRaises(ZODB.POSException.POSError):
            raid.load(z64)
        self.assertEqual(raid.raid_status(), 'failed')

    def test_identical_unexplained_vote_errors_reach_client_as_zodb_error(
            self):
        # The same non-ZODB failure from every backend (a full disk
        # everywhere) is nobody's divergence: the client gets a ZODB
        # StorageError naming the cause, never the raw exception, and the
        # transaction ends on every backend.
        raid = self.open_raid()
        for fs in self.faulty.values():
            fs.fail_once('tpc_vote')
        before = raid.lastTransaction()
        with self.assertRaises(ZODB.POSException.StorageError) as cm:
            self.commit(raid, [(raid.new_oid(), z64,
                                zodb_pickle(MinPO(1)))])
        self.assertNotIsInstance(cm.exception, InjectedFault)
        self.assertIn('injected failure', str(cm.exception))
        self.assertEqual(raid.lastTransaction(), before)
        self.assert_tpc_closed()
        self.commit(raid, [(raid.new_oid(), z64, zodb_pickle(MinPO(2)))])
        assert_replicas_identical(raid)

    def test_close_with_failing_and_hanging_backends(self):
        raid = self.open_raid()
        self.faulty['b1'].hang('close')
        self.faulty['b2'].fail('close')
        start = time.monotonic()
        raid.close()
        self.assertLess(time.monotonic() - start, HANG_LIMIT)
        self.assertEqual(len(self.faulty['b2'].called('close')), 1)
        self.assertTrue(wait_until(lambda: self.faulty['b1'].called('close')))


class BlobTests(RAIDTestBase):
    blobs = True

    def temp_files(self, raid):
        dirs = {raid.temporaryDirectory()}
        for fs in self.faulty.values():
            dirs.add(fs.base.temporaryDirectory())
        return {d: sorted(os.listdir(d)) for d in dirs
                if os.listdir(d)}

    def upload(self, raid, content):
        fd, filename = tempfile.mkstemp(dir=raid.temporaryDirectory())
        with os.fdopen(fd, 'wb') as f:
            f.write(content)
        return filename

    def test_each_backend_gets_the_blob_and_temp_files_go(self):
        raid = self.open_raid()
        self.assertTrue(ZODB.interfaces.IBlobStorage.providedBy(raid))
        oid = raid.new_oid()
        filename = self.upload(raid, b'hello blob')
        txn = self.txn('blob')
        raid.tpc_begin(txn)
        raid.storeBlob(oid, z64, zodb_pickle(MinPO('blob')), filename, '',
                       txn)
        raid.tpc_vote(txn)
        tid = raid.tpc_finish(txn, lambda tid: None)
        for name in self.names:
            path = self.faulty[name].base.loadBlob(oid, tid)
            with open(path, 'rb') as f:
                self.assertEqual(f.read(), b'hello blob', name)
        # Each backend has its own file (a hard link or a copy) in its
        # own blob directory.
        for name in self.names:
            path = self.faulty[name].base.loadBlob(oid, tid)
            self.assertTrue(path.startswith(self.blob_dir(name) + os.sep),
                            path)
        with open(raid.loadBlob(oid, tid), 'rb') as f:
            self.assertEqual(f.read(), b'hello blob')
        self.assertEqual(self.temp_files(raid), {})
        assert_replicas_identical(raid)

    def test_temp_files_removed_after_abort(self):
        raid = self.open_raid()
        oid = raid.new_oid()
        txn = self.txn('blob')
        raid.tpc_begin(txn)
        raid.storeBlob(oid, z64, zodb_pickle(MinPO('blob')),
                       self.upload(raid, b'never'), '', txn)
        raid.tpc_vote(txn)
        raid.tpc_abort(txn)
        self.assertEqual(self.temp_files(raid), {})
        self.assertEqual(raid.lastTransaction(), z64)

    def test_temp_files_removed_after_conflict_abort(self):
        raid = self.open_raid()
        oid = raid.new_oid()
        tid = self.commit(raid, [(oid, z64, zodb_pickle(MinPO(1)))])
        self.commit(raid, [(oid, tid, zodb_pickle(MinPO(2)))])
        txn = self.txn('blob')
        raid.tpc_begin(txn)
        with self.assertRaises(ZODB.POSException.ConflictError):
            raid.storeBlob(oid, tid, zodb_pickle(MinPO('blob')),
                           self.upload(raid, b'stale'), '', txn)
            raid.tpc_vote(txn)
        raid.tpc_abort(txn)
        self.assertEqual(self.temp_files(raid), {})
        self.assertEqual(raid.raid_status(), 'optimal')

    def test_temp_files_removed_when_a_backend_fails(self):
        raid = self.open_raid()
        self.faulty['b2'].fail('storeBlob')
        oid = raid.new_oid()
        txn = self.txn('blob')
        raid.tpc_begin(txn)
        raid.storeBlob(oid, z64, zodb_pickle(MinPO('blob')),
                       self.upload(raid, b'data'), '', txn)
        raid.tpc_vote(txn)
        tid = raid.tpc_finish(txn, lambda tid: None)
        self.assertEqual(self.state(raid, 'b2'), 'degraded')
        self.assertEqual(self.temp_files(raid), {})
        with open(self.faulty['b1'].base.loadBlob(oid, tid), 'rb') as f:
            self.assertEqual(f.read(), b'data')
        assert_replicas_identical(raid)

    def test_blobs_through_a_db(self):
        db = ZODB.DB(self.open_raid())
        try:
            conn = db.open()
            conn.root()['blob'] = Blob(b'via the DB')
            transaction.commit()
            conn.close()
            conn = db.open()
            with conn.root()['blob'].open() as f:
                self.assertEqual(f.read(), b'via the DB')
            conn.close()
        finally:
            transaction.abort()
            db.close()
        raid = self.raids[-1]
        self.assertEqual(self.temp_files(raid), {})


class InvalidationTests(RAIDTestBase):

    def test_backend_invalidate_cache_is_not_forwarded(self):
        raid = self.open_raid()
        upcalls = RecordingWrapper()
        raid.registerDB(upcalls)
        registered = {name: fs.registered_db
                      for name, fs in self.faulty.items()}
        self.assertTrue(all(registered.values()),
                        'the RAID registers an upcall wrapper with each '
                        'backend: %s' % registered)
        for name, wrapper in registered.items():
            self.assertIsNot(wrapper, upcalls)
            wrapper.invalidateCache()
        self.assertEqual([c for c in upcalls.calls
                          if c[0] == 'invalidateCache'], [])
        self.assertEqual(raid.raid_status(), 'optimal')

    def test_own_commits_reach_the_wrapper_through_func_only(self):
        raid = self.open_raid()
        upcalls = RecordingWrapper()
        raid.registerDB(upcalls)
        oid = raid.new_oid()
        called = []
        self.commit(raid, [(oid, z64, zodb_pickle(MinPO(1)))],
                    func=called.append)
        self.assertEqual(len(called), 1)
        self.assertEqual(upcalls.calls, [])


class InvariantHelperTests(RAIDTestBase):
    """assert_replicas_identical must notice every kind of divergence."""

    def setUp(self):
        super().setUp()
        self.raid = self.open_raid()
        self.oid = self.raid.new_oid()
        self.tid = self.commit(self.raid, [(self.oid, z64,
                                            zodb_pickle(MinPO(1)))])
        self.assertEqual(assert_replicas_identical(self.raid), 1)

    def write_behind_raid(self, name, data, description='test', tid=None):
        base = self.faulty[name].base
        txn = self.txn(description)
        base.tpc_begin(txn, tid or newTid(self.tid))
        base.store(self.oid, self.tid, data, '', txn)
        base.tpc_vote(txn)
        return base.tpc_finish(txn)

    def assert_divergence(self, *words):
        with self.assertRaises(AssertionError) as cm:
            assert_replicas_identical(self.raid)
        for word in words:
            self.assertIn(word, str(cm.exception))

    def test_extra_transaction(self):
        self.write_behind_raid('b2', zodb_pickle(MinPO(2)))
        self.assert_divergence("'b2'", 'extra transaction')

    def test_different_data(self):
        tid = newTid(self.tid)
        for name in self.names:
            self.write_behind_raid(name, zodb_pickle(MinPO(name)), tid=tid)
        self.assert_divergence("'b2'", 'record data', 'oid 0x01')

    def test_different_metadata(self):
        tid = newTid(self.tid)
        for name in self.names:
            self.write_behind_raid(name, zodb_pickle(MinPO(2)), tid=tid,
                                   description=name)
        self.assert_divergence("'b2'", 'description')

    def test_different_tids(self):
        self.write_behind_raid('b1', zodb_pickle(MinPO(2)))
        later = newTid(newTid(self.tid))
        for name in ('b2', 'b3'):
            self.write_behind_raid(name, zodb_pickle(MinPO(2)), tid=later)
        self.assert_divergence('has tid')

    def test_only_optimal_backends_by_default(self):
        self.raid.raid_disable('b3')
        self.write_behind_raid('b3', zodb_pickle(MinPO(2)))
        assert_replicas_identical(self.raid)
        with self.assertRaises(AssertionError):
            assert_replicas_identical(self.raid, ['b1', 'b3'])


def test_suite():
    loader = unittest.defaultTestLoader
    suite = unittest.TestSuite()
    for cls in (FaultScenarios, BlobFaultScenarios, CommitProtocolTests,
                StartupTests, OidTests, StatusTests, BlobTests,
                InvalidationTests, InvariantHelperTests):
        suite.addTest(loader.loadTestsFromTestCase(cls))
    return suite
