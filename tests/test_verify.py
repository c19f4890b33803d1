"""Replica verification (zeoraid.verify) over real storages.

Replicas are made by a real RAIDStorage over FileStorages (or over real
runzeo backends); divergences are planted by rewriting one replica with
the same tids but one thing changed (a record, a transaction, metadata, a
blob), or by committing into one backend directly.  Every divergence must
be reported with the right backend, tid, oid and kind.
"""
import contextlib
import functools
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import unittest

import transaction
import ZODB
import ZODB.blob
from persistent.mapping import PersistentMapping
from ZODB.Connection import TransactionMetaData
from ZODB.FileStorage import FileStorage
from ZODB.utils import p64
from ZODB.utils import u64
from ZODB.utils import z64

from tests.zeo_backends import start_backends
from tests.zeo_backends import stop_all
from zeoraid.storage import RAIDStorage
from zeoraid.verify import CannotVerify
from zeoraid.verify import main as verify_main
from zeoraid.verify import verify_raid
from zeoraid.verify import verify_storages

TIMEOUT = 30.0
ROOT = z64


def _commit(tm, user='', note='', extension=None):
    txn = tm.get()
    if user:
        txn.user = user
    if note:
        txn.note(note)
    for key, value in (extension or {}).items():
        txn.setExtendedInfo(key, value)
    tm.commit()


class SlowFinishFileStorage(FileStorage):
    """A real FileStorage on a slower disk: finishing takes a while.

    Behind a RAID it finishes each commit after the other backends, so
    while clients commit its last tid is often behind theirs.
    """

    delay = 0.02

    def tpc_finish(self, transaction, f=None):
        time.sleep(self.delay)
        return FileStorage.tpc_finish(self, transaction, f)


class History:
    """What populate() committed: tids and oids to aim tampering at."""

    def __init__(self):
        self.tids = []


def populate(db, blobs=False, count=4):
    """Commit a small but varied history through db; return a History.

    Transactions with metadata, several records per transaction, an undo
    of an object's creation (a record with data None) and, with blobs,
    two blob revisions.
    """
    h = History()
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    root = conn.root()
    root['a'] = PersistentMapping()
    root['b'] = PersistentMapping()
    _commit(tm, 'alice', 'first', {'k': 1})
    h.a_oid = root['a']._p_oid
    h.b_oid = root['b']._p_oid
    h.first = db.lastTransaction()      # root, a and b: three records
    for i in range(count):
        root['a'][i] = i
        _commit(tm, 'bob', 'step %d' % i)
    h.step = db.lastTransaction()       # the last step: one record (a)
    root['tmp'] = PersistentMapping()
    _commit(tm, note='to be undone')
    h.tmp_oid = root['tmp']._p_oid
    created = db.lastTransaction()
    db.undo(db.undoLog(0, 1)[0]['id'], tm.get())
    _commit(tm, note='undo')
    h.undone = db.lastTransaction()    # has tmp with data None
    assert created < h.undone
    if blobs:
        root['blob'] = ZODB.blob.Blob(b'first blob content')
        _commit(tm, note='blob 1')
        h.blob_oid = root['blob']._p_oid
        h.blob1 = db.lastTransaction()
        with root['blob'].open('w') as f:
            f.write(b'second blob content, longer')
        _commit(tm, note='blob 2')
        h.blob2 = db.lastTransaction()
    root['z'] = 1
    _commit(tm, note='last')
    h.last = db.lastTransaction()
    conn.close()
    return h


class VerifyTestBase(unittest.TestCase):

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix='zeoraid-verify-')
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def fs(self, name):
        return os.path.join(self.tmp, name + '.fs')

    def blobs(self, name):
        return os.path.join(self.tmp, name + '-blobs')

    def make_raid(self, names=('b1', 'b2'), blobs=False, slow=()):
        backends = []
        for name in names:
            kw = {'blob_dir': self.blobs(name)} if blobs else {}
            factory = SlowFinishFileStorage if name in slow else FileStorage
            backends.append(
                (name, functools.partial(factory, self.fs(name), **kw)))
        return RAIDStorage(
            'raid', backends, timeout=TIMEOUT,
            blob_dir=os.path.join(self.tmp, 'raid-blobs') if blobs else None)

    def make_replicas(self, names=('b1', 'b2'), blobs=False):
        """Identical FileStorages written through a RAID; a History."""
        raid = self.make_raid(names, blobs)
        db = ZODB.DB(raid)
        try:
            history = populate(db, blobs)
            self.assertEqual(raid.raid_status(), 'optimal')
        finally:
            db.close()
        return history

    def open_fs(self, name, blobs=None):
        if blobs is None:
            blobs = os.path.isdir(self.blobs(name))
        kw = {'blob_dir': self.blobs(name)} if blobs else {}
        return FileStorage(self.fs(name), read_only=True, **kw)

    def verify_files(self, names=('b1', 'b2'), **kw):
        storages = {name: self.open_fs(name) for name in names}
        try:
            return verify_storages(storages, **kw)
        finally:
            for storage in storages.values():
                storage.close()

    def rewrite(self, name, source='b1', alter=None, skip=()):
        """Replace replica `name` by a copy of `source`, same tids.

        alter(tid, meta, records) may change meta (user, description,
        extension) and records ([oid, data, blob content or None]) in
        place; transactions whose tid is in skip are left out.
        """
        blobs = os.path.isdir(self.blobs(source))
        src = self.open_fs(source, blobs)
        for suffix in ('', '.index', '.lock', '.tmp'):
            if os.path.exists(self.fs(name) + suffix):
                os.remove(self.fs(name) + suffix)
        shutil.rmtree(self.blobs(name), True)
        kw = {'blob_dir': self.blobs(name)} if blobs else {}
        dst = FileStorage(self.fs(name), **kw)
        try:
            for info in src.iterator():
                if info.tid in skip:
                    continue
                meta = {'user': info.user, 'description': info.description,
                        'extension': dict(info.extension)}
                records = []
                for r in info:
                    content = None
                    if blobs and r.data and ZODB.blob.is_blob_record(r.data):
                        with open(src.loadBlob(r.oid, r.tid), 'rb') as f:
                            content = f.read()
                    records.append([r.oid, r.data, content])
                if alter is not None:
                    alter(info.tid, meta, records)
                txn = TransactionMetaData(meta['user'], meta['description'],
                                          meta['extension'])
                dst.tpc_begin(txn, info.tid, info.status)
                for oid, data, content in records:
                    if content is None:
                        dst.restore(oid, info.tid, data, '', None, txn)
                        continue
                    path = os.path.join(self.tmp, 'blob.tmp')
                    with open(path, 'wb') as f:
                        f.write(content)
                    dst.restoreBlob(oid, info.tid, data, path, None, txn)
                dst.tpc_vote(txn)
                self.assertEqual(dst.tpc_finish(txn), info.tid)
        finally:
            dst.close()
            src.close()

    def commit_directly(self, name, oid=None):
        """Commit one transaction straight into a replica; its tid."""
        storage = FileStorage(self.fs(name))
        try:
            txn = TransactionMetaData('mallory', 'behind the RAID\'s back')
            storage.tpc_begin(txn)
            oid = oid or storage.new_oid()
            storage.store(oid, z64, b'planted', '', txn)
            storage.tpc_vote(txn)
            return storage.tpc_finish(txn)
        finally:
            storage.close()

    def assertDivergence(self, report, backend, tid, kind, oid=None):
        self.assertFalse(report.identical, report.summary())
        d = report.divergence
        self.assertEqual(
            (d.backend, d.tid, d.kind, d.oid), (backend, tid, kind, oid),
            report.summary())
        result = report.as_dict()
        self.assertIs(result['consistent'], False)
        self.assertEqual(result['divergence']['tid'],
                         tid.hex() if tid else None)
        self.assertEqual(result['divergence']['kind'], kind)
        self.assertTrue(result['summary'].startswith('DIVERGENT: '))
        return d


class IdenticalTests(VerifyTestBase):

    def test_identical_replicas(self):
        h = self.make_replicas(('b1', 'b2', 'b3'), blobs=True)
        report = self.verify_files(('b1', 'b2', 'b3'))
        self.assertTrue(report.identical, report.summary())
        b1 = self.open_fs('b1')
        tids = [t.tid for t in b1.iterator()]
        records = sum(len(list(t)) for t in b1.iterator())
        b1.close()
        self.assertEqual(report.transactions, len(tids))
        self.assertEqual(report.records, records)
        self.assertEqual(report.blobs, 2)
        self.assertEqual(report.last_tid, h.last)
        self.assertEqual(report.upto, h.last)
        result = report.as_dict()
        self.assertIs(result['identical'], True)
        self.assertIs(result['consistent'], True)
        self.assertIsNone(result['divergence'])
        self.assertEqual(result['last_tid'], h.last.hex())
        self.assertEqual(result['storages'], ['b1', 'b2', 'b3'])
        json.dumps(result)   # the admin endpoint sends it as JSON
        self.assertTrue(report.summary().startswith('IDENTICAL: 3 storages'))

    def test_a_faithful_copy_is_identical(self):
        # The tampering helper itself changes nothing unless told to:
        # same tids, metadata, records (data None included), blobs.
        self.make_replicas(blobs=True)
        self.rewrite('b2')
        report = self.verify_files()
        self.assertTrue(report.identical, report.summary())
        self.assertEqual(report.blobs, 2)

    def test_progress_callback(self):
        self.make_replicas()
        calls = []
        report = self.verify_files(progress=lambda n, tid: calls.append(
            (n, tid)))
        self.assertEqual([n for n, _ in calls],
                         list(range(1, report.transactions + 1)))
        tids = [tid for _, tid in calls]
        self.assertEqual(tids, sorted(tids))
        self.assertEqual(tids[-1], report.last_tid)

    def test_fewer_than_two_storages_cannot_be_checked(self):
        self.make_replicas()
        b1 = self.open_fs('b1')
        self.addCleanup(b1.close)
        with self.assertRaises(CannotVerify) as e:
            verify_storages({'b1': b1})
        self.assertIn('at least two', str(e.exception))

    def test_blob_records_without_blob_dir_cannot_be_checked(self):
        h = self.make_replicas(blobs=True)
        storages = {'b1': self.open_fs('b1'),
                    'b2': self.open_fs('b2', blobs=False)}
        for storage in storages.values():
            self.addCleanup(storage.close)
        with self.assertRaises(CannotVerify) as e:
            verify_storages(storages)
        self.assertIn('b2', str(e.exception))
        self.assertIn('no blob directory', str(e.exception))
        # ... but records are compared without blobs when asked to.
        report = verify_storages(storages, blobs=False)
        self.assertTrue(report.identical, report.summary())
        self.assertEqual(report.blobs, 0)
        self.assertEqual(report.last_tid, h.last)

    def test_empty_storages_are_identical(self):
        for name in ('e1', 'e2'):
            FileStorage(self.fs(name)).close()
        report = self.verify_files(('e1', 'e2'))
        self.assertTrue(report.identical)
        self.assertEqual(report.transactions, 0)
        self.assertIsNone(report.last_tid)


class DivergenceTests(VerifyTestBase):

    def test_changed_record(self):
        h = self.make_replicas()

        def alter(tid, meta, records):
            if tid == h.step:
                for record in records:
                    if record[0] == h.a_oid:
                        record[1] = record[1] + b'.'
        self.rewrite('b2', alter=alter)
        d = self.assertDivergence(self.verify_files(), 'b2', h.step, 'data',
                                  h.a_oid)
        self.assertEqual(d.reference, 'b1')
        self.assertIn('sha256', d.detail)

    def test_data_none_against_data(self):
        h = self.make_replicas()

        def alter(tid, meta, records):
            for record in records:
                if tid == h.undone and record[0] == h.tmp_oid:
                    self.assertIsNone(record[1])   # George Bailey
                    record[1] = b'resurrected'
        self.rewrite('b2', alter=alter)
        d = self.assertDivergence(self.verify_files(), 'b2', h.undone,
                                  'data', h.tmp_oid)
        self.assertIn('no data', d.detail)

    def test_missing_transaction(self):
        h = self.make_replicas()
        self.rewrite('b2', skip={h.step})
        self.assertDivergence(self.verify_files(), 'b2', h.step,
                              'missing transaction')

    def test_extra_transaction(self):
        # The reference lacks it: the other one has it extra.
        h = self.make_replicas()
        self.rewrite('b1', source='b2', skip={h.step})
        self.assertDivergence(self.verify_files(), 'b2', h.step,
                              'extra transaction')

    def test_missing_last_transaction(self):
        # Beyond the common tid: found by the tail check.
        h = self.make_replicas()
        self.rewrite('b2', skip={h.last})
        report = self.verify_files()
        self.assertDivergence(report, 'b2', h.last, 'missing transaction')
        self.assertLess(report.upto, h.last)

    def test_extra_transaction_at_the_end(self):
        h = self.make_replicas()
        tid = self.commit_directly('b2')
        self.assertGreater(tid, h.last)
        self.assertDivergence(self.verify_files(), 'b2', tid,
                              'extra transaction')
        # Without the tail check, only the common part is compared.
        report = self.verify_files(check_tail=False)
        self.assertTrue(report.identical, report.summary())
        self.assertEqual(report.last_tid, h.last)

    def test_metadata(self):
        h = self.make_replicas()
        changes = {'user': b'eve', 'description': b'forged',
                   'extension': {'k': 2}}
        for field, value in changes.items():
            def alter(tid, meta, records, field=field, value=value):
                if tid == h.first:
                    meta[field] = value
            self.rewrite('b2', alter=alter)
            d = self.assertDivergence(self.verify_files(), 'b2', h.first,
                                      'metadata ' + field)
            self.assertIn(repr(value), d.detail)

    def test_missing_and_extra_record(self):
        h = self.make_replicas()

        def drop(tid, meta, records):
            if tid == h.first:
                records[:] = [r for r in records if r[0] != h.b_oid]
        self.rewrite('b2', alter=drop)
        self.assertDivergence(self.verify_files(), 'b2', h.first,
                              'missing record', h.b_oid)

        def add(tid, meta, records):
            if tid == h.step:
                records.append([h.b_oid, b'extra', None])
        self.rewrite('b2', alter=add)
        self.assertDivergence(self.verify_files(), 'b2', h.step,
                              'extra record', h.b_oid)

    def test_changed_blob(self):
        h = self.make_replicas(blobs=True)

        def alter(tid, meta, records):
            for record in records:
                if tid == h.blob2 and record[0] == h.blob_oid:
                    record[2] = record[2].replace(b'second', b'SECOND')
        self.rewrite('b2', alter=alter)
        # Pickles are equal, only the blob file differs.
        report = self.verify_files(blobs=False)
        self.assertTrue(report.identical, report.summary())
        d = self.assertDivergence(self.verify_files(), 'b2', h.blob2,
                                  'blob', h.blob_oid)
        self.assertIn('sha256', d.detail)

    def test_missing_blob_file(self):
        h = self.make_replicas(blobs=True)
        b2 = self.open_fs('b2')
        path = b2.loadBlob(h.blob_oid, h.blob1)
        b2.close()
        os.remove(path)
        d = self.assertDivergence(self.verify_files(), 'b2', h.blob1,
                                  'missing blob', h.blob_oid)
        self.assertIn('b1 has one', d.detail)
        # Missing in the reference: reported against one that has it.
        d = self.assertDivergence(self.verify_files(('b2', 'b1')), 'b2',
                                  h.blob1, 'missing blob', h.blob_oid)
        self.assertEqual(d.reference, 'b1')
        self.assertEqual(str(d), 'b2 differs from b1 at tid %s oid %s: '
                         'missing blob (no blob file in b2, b1 has one)'
                         % (h.blob1.hex(), h.blob_oid.hex()))

    def test_third_backend_differs(self):
        h = self.make_replicas(('b1', 'b2', 'b3'))
        self.rewrite('b3', skip={h.step})
        self.assertDivergence(self.verify_files(('b1', 'b2', 'b3')), 'b3',
                              h.step, 'missing transaction')

    def test_first_divergence_is_reported(self):
        h = self.make_replicas()

        def alter(tid, meta, records):
            if tid == h.last:
                meta['user'] = b'late'
        self.rewrite('b2', alter=alter, skip={h.step})
        self.assertDivergence(self.verify_files(), 'b2', h.step,
                              'missing transaction')


class IncrementalAndRateTests(VerifyTestBase):

    def test_since(self):
        h = self.make_replicas()
        first = self.verify_files()
        self.assertEqual(first.last_tid, h.last)
        # Nothing new: still identical, and the next check starts at the
        # same place.
        again = self.verify_files(since=first.last_tid)
        self.assertTrue(again.identical)
        self.assertEqual(again.transactions, 0)
        self.assertEqual(again.last_tid, h.last)
        # New transactions through the RAID: only they are compared.
        raid = self.make_raid()
        db = ZODB.DB(raid)
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        for i in range(3):
            conn.root()['new'] = i
            tm.commit()
        newest = raid.lastTransaction()
        db.close()
        report = self.verify_files(since=first.last_tid.hex())
        self.assertTrue(report.identical, report.summary())
        self.assertEqual(report.transactions, 3)
        self.assertEqual(report.start, p64(u64(h.last) + 1))
        self.assertEqual(report.last_tid, newest)

    def test_since_skips_old_divergence(self):
        h = self.make_replicas()

        def alter(tid, meta, records):
            if tid == h.first:
                meta['user'] = b'eve'
        self.rewrite('b2', alter=alter)
        self.assertDivergence(self.verify_files(), 'b2', h.first,
                              'metadata user')
        report = self.verify_files(since=h.first)
        self.assertTrue(report.identical, report.summary())
        self.assertDivergence(self.verify_files(start=h.first), 'b2',
                              h.first, 'metadata user')
        with self.assertRaises(ValueError):
            self.verify_files(start=h.first, since=h.first)
        with self.assertRaises(ValueError):
            self.verify_files(since='not a tid')

    def test_stop(self):
        h = self.make_replicas()
        self.rewrite('b2', skip={h.last})
        report = self.verify_files(stop=h.undone)
        self.assertTrue(report.identical, report.summary())
        self.assertEqual(report.last_tid, h.undone)

    def test_rate_limit(self):
        self.make_replicas()
        now = [1000.0]
        sleeps = []

        def sleep(seconds):
            sleeps.append(seconds)
            now[0] += seconds
        report = self.verify_files(rate=4, clock=lambda: now[0], sleep=sleep)
        n = report.transactions
        self.assertGreaterEqual(n, 8)
        # n transactions at 4/s take n/4 seconds (of the injected clock):
        # the k-th may start once k/4 seconds have passed.
        self.assertAlmostEqual(now[0] - 1000.0, n / 4.0, places=6)
        self.assertAlmostEqual(report.seconds, n / 4.0, places=6)
        self.assertLessEqual(max(sleeps), 0.5)

        now[0] = 0.0
        del sleeps[:]
        report = self.verify_files(rate=0, clock=lambda: now[0], sleep=sleep)
        self.assertEqual(sleeps, [])
        self.assertEqual(report.seconds, 0.0)

    def test_rate_limit_paces_each_transaction(self):
        self.make_replicas()
        now = [0.0]
        seen = []

        def sleep(seconds):
            now[0] += seconds
        self.verify_files(rate=2, clock=lambda: now[0], sleep=sleep,
                          progress=lambda n, tid: seen.append((n, now[0])))
        for n, at in seen:
            # The n-th transaction is compared no earlier than n/2 s.
            self.assertAlmostEqual(at, n / 2.0, places=6)


class RaidTests(VerifyTestBase):

    def test_verify_raid_online_while_committing(self):
        # b2 finishes every commit after b1, so while the writer commits,
        # the backends' last tids often differ when a check starts: the
        # check must compare up to the common tid and find them identical.
        # verify_raid reads the RAID's last tid first, which waits for a
        # running finish, so it mostly starts with equal backends; the
        # backends checked directly show the common tid at work.
        raid = self.make_raid(slow=('b2',))
        db = ZODB.DB(raid)
        self.addCleanup(db.close)
        populate(db)
        stop = threading.Event()
        commits = [0]
        errors = []

        def writer():
            tm = transaction.TransactionManager()
            conn = db.open(tm)
            deadline = time.monotonic() + 60
            try:
                while (not stop.is_set() and commits[0] < 3000
                       and time.monotonic() < deadline):
                    conn.root()['n'] = commits[0]
                    tm.commit()
                    commits[0] += 1
            except Exception as exc:
                errors.append(exc)
            finally:
                conn.close()
        thread = threading.Thread(target=writer, name='verify-writer',
                                  daemon=True)
        thread.start()
        checks = apart = overlapped = 0
        backends = {name: raid.raid_backend_storage(name)
                    for name in ('b1', 'b2')}
        try:
            deadline = time.monotonic() + 30
            while commits[0] < 10 and time.monotonic() < deadline:
                time.sleep(0.01)
            deadline = time.monotonic() + 30
            while ((apart < 3 or overlapped < 1) and checks < 200
                   and time.monotonic() < deadline):
                before, count = raid.lastTransaction(), commits[0]
                report = verify_raid(raid, rate=2000)
                # (Not raid.lastTransaction() first: it waits for a running
                # finish, after which both backends are equal.)
                direct = verify_storages(backends, check_tail=False)
                after = raid.lastTransaction()
                checks += 1
                self.assertTrue(report.identical, report.summary())
                # Everything committed before the check was compared; the
                # check stopped at a tid that was committed everywhere.
                self.assertLessEqual(before, report.upto)
                self.assertLessEqual(report.upto, after)
                self.assertEqual(report.upto, min(report.lasts.values()))
                self.assertEqual(report.last_tid, report.upto)
                self.assertEqual(report.storages, ['b1', 'b2'])
                if commits[0] > count:
                    overlapped += 1
                self.assertTrue(direct.identical, direct.summary())
                self.assertEqual(direct.upto, min(direct.lasts.values()))
                self.assertLessEqual(direct.upto, after)
                if direct.lasts['b1'] != direct.lasts['b2']:
                    apart += 1
        finally:
            stop.set()
            thread.join(60)
        self.assertFalse(thread.is_alive())
        self.assertEqual(errors, [])
        self.assertGreaterEqual(apart, 3, 'backends never apart (%d checks)'
                                % checks)
        self.assertGreaterEqual(overlapped, 1, 'no commit during a check')
        final = verify_raid(raid)
        self.assertTrue(final.identical, final.summary())
        self.assertEqual(final.last_tid, raid.lastTransaction())
        self.assertEqual(final.transactions,
                         len(list(raid.raid_backend_storage('b1').iterator())))
        self.assertEqual(verify_raid(raid, since=final.last_tid).transactions,
                         0)

    def test_verify_raid_skips_degraded_and_needs_two(self):
        raid = self.make_raid(('b1', 'b2', 'b3'))
        db = ZODB.DB(raid)
        self.addCleanup(db.close)
        populate(db)
        raid.raid_disable('b3')
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        conn.root()['after'] = 1
        tm.commit()
        conn.close()
        report = verify_raid(raid)
        self.assertTrue(report.identical, report.summary())
        self.assertEqual(report.storages, ['b1', 'b2'])
        raid.raid_disable('b2')
        with self.assertRaises(CannotVerify) as e:
            verify_raid(raid)
        self.assertIn('need two', str(e.exception))
        self.assertIn('b2 degraded', str(e.exception))

    def test_verify_raid_while_a_backend_recovers(self):
        # A recovering backend is compared up to what it has copied, and
        # is allowed to lag behind the RAID's last tid.
        backends = [(name, functools.partial(FileStorage, self.fs(name)))
                    for name in ('b1', 'b2')]
        raid = RAIDStorage('raid', backends, timeout=TIMEOUT,
                           recovery_txn_rate=40)
        db = ZODB.DB(raid)
        self.addCleanup(db.close)
        populate(db)
        raid.raid_disable('b2')
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        for i in range(60):
            conn.root()['n'] = i
            tm.commit()
        conn.close()
        raid.raid_recover('b2')
        recovery = raid.raid_recovery()
        self.addCleanup(recovery.stop)
        deadline = time.monotonic() + 30
        while (recovery.progress.txns_copied < 10
               and time.monotonic() < deadline):
            time.sleep(0.02)
        report = verify_raid(raid)
        self.assertEqual(raid.raid_details()['b2']['state'], 'recovering')
        self.assertTrue(report.identical, report.summary())
        self.assertEqual(report.lagging, ['b2'])
        self.assertLess(report.upto, raid.lastTransaction())
        self.assertEqual(report.upto, report.lasts['b2'])
        self.assertTrue(recovery.done.wait(60), 'recovery did not end')
        self.assertEqual(raid.raid_status(), 'optimal')
        report = verify_raid(raid)
        self.assertTrue(report.identical, report.summary())
        self.assertEqual(report.lagging, [])
        self.assertEqual(report.last_tid, raid.lastTransaction())

    def test_verify_raid_finds_commit_behind_its_back(self):
        raid = self.make_raid()
        db = ZODB.DB(raid)
        self.addCleanup(db.close)
        populate(db)
        b2 = raid.raid_backend_storage('b2')
        txn = TransactionMetaData('mallory', 'behind the RAID\'s back')
        b2.tpc_begin(txn)
        b2.store(b2.new_oid(), z64, b'planted', '', txn)
        b2.tpc_vote(txn)
        planted = b2.tpc_finish(txn)
        # Beyond the RAID's last tid it is not compared online ...
        self.assertTrue(verify_raid(raid).identical)
        # ... but once the RAID commits past it, it is an extra one.
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        conn.root()['later'] = 1
        tm.commit()
        conn.close()
        self.assertGreater(raid.lastTransaction(), planted)
        report = verify_raid(raid)
        self.assertDivergence(report, 'b2', planted, 'extra transaction')

    def test_verify_raid_expects_the_raids_last_tid(self):
        # A backend that did not reach the RAID's last commit is missing
        # it, even though it is compared only up to the common tid.
        h = self.make_replicas()
        self.rewrite('b2', skip={h.last})
        raid = self.make_raid()
        self.addCleanup(raid.close)
        # The RAID degrades the lagging backend at startup; verify the
        # backends as the RAID saw them before that.
        storages = {n: raid.raid_backend_storage(n) for n in ('b1', 'b2')}
        report = verify_storages(storages, expect_tid=raid.lastTransaction())
        self.assertDivergence(report, 'b2', h.last, 'missing transaction')
        self.assertIn('the RAID committed up to', report.divergence.detail)
        report = verify_storages(storages, expect_tid=raid.lastTransaction(),
                                 lagging=['b2'])
        self.assertTrue(report.identical, report.summary())
        self.assertEqual(report.lagging, ['b2'])
        # The reference itself short: reported against one that is not.
        swapped = {'b2': storages['b2'], 'b1': storages['b1']}
        report = verify_storages(swapped, expect_tid=raid.lastTransaction())
        d = self.assertDivergence(report, 'b2', h.last,
                                  'missing transaction')
        self.assertEqual(d.reference, 'b1')


class ZEOTests(VerifyTestBase):
    """verify_storages over ClientStorages of real runzeo backends."""

    def test_zeo_backends(self):
        servers = start_backends(self.tmp, 2, blob_dir=True)
        self.addCleanup(stop_all, servers)
        raid = RAIDStorage(
            'raid', [('b%d' % i, s.opener()) for i, s in
                     enumerate(servers, 1)],
            blob_dir=os.path.join(self.tmp, 'raid-blobs'), timeout=TIMEOUT)
        db = ZODB.DB(raid)
        try:
            h = populate(db, blobs=True)
            self.assertEqual(raid.raid_status(), 'optimal')
            report = verify_raid(raid)
            self.assertTrue(report.identical, report.summary())
        finally:
            db.close()
        clients = {'b%d' % i: s.client() for i, s in enumerate(servers, 1)}
        for client in clients.values():
            self.addCleanup(client.close)
        report = verify_storages(clients)
        self.assertTrue(report.identical, report.summary())
        self.assertEqual(report.last_tid, h.last)
        self.assertEqual(report.blobs, 2)
        self.assertGreater(report.transactions, 6)

        # A blob file lost on the second server.
        with open(clients['b2'].loadBlob(h.blob_oid, h.blob1), 'rb') as f:
            self.assertEqual(f.read(), b'first blob content')
        os.remove(ZODB.blob.FilesystemHelper(servers[1].blob_dir)
                  .getBlobFilename(h.blob_oid, h.blob1))
        fresh = servers[1].client()    # an empty blob cache
        self.addCleanup(fresh.close)
        report = verify_storages({'b1': clients['b1'], 'b2': fresh})
        self.assertDivergence(report, 'b2', h.blob1, 'missing blob',
                              h.blob_oid)

        # A transaction committed on the second server only.
        c2 = clients['b2']
        txn = TransactionMetaData('mallory', 'planted')
        c2.tpc_begin(txn)
        c2.store(c2.new_oid(), z64, b'planted', '', txn)
        c2.tpc_vote(txn)
        planted = c2.tpc_finish(txn)
        report = verify_storages(clients, blobs=False)
        self.assertDivergence(report, 'b2', planted, 'extra transaction')


    def test_a_frozen_backend_fails_the_check_within_the_deadline(self):
        servers = start_backends(self.tmp, 2)
        self.addCleanup(stop_all, servers)
        raid = RAIDStorage(
            'raid', [('b%d' % i, s.opener()) for i, s in
                     enumerate(servers, 1)], timeout=1.5)
        db = ZODB.DB(raid)
        self.addCleanup(db.close)
        populate(db, blobs=False)
        frozen = servers[1].process.pid
        os.kill(frozen, signal.SIGSTOP)
        resumed = []

        def resume():
            if not resumed:
                resumed.append(True)
                os.kill(frozen, signal.SIGCONT)
        self.addCleanup(resume)
        started = time.monotonic()
        with self.assertRaises(CannotVerify) as caught:
            verify_raid(raid)
        elapsed = time.monotonic() - started
        message = str(caught.exception)
        self.assertIn('storage b2', message)
        self.assertIn('no answer within 1.5s', message)
        self.assertEqual(len(message.splitlines()), 1)
        self.assertLess(elapsed, 5)
        # Once the backend answers again, the check goes through.
        resume()
        report = verify_raid(raid)
        self.assertTrue(report.identical, report.summary())


class CommandLineTests(VerifyTestBase):
    """python -m zeoraid.verify, as an operator runs it on backups."""

    def run_cli(self, *args):
        process = subprocess.run(
            [sys.executable, '-m', 'zeoraid.verify'] + list(args),
            capture_output=True, text=True, timeout=120, cwd=self.tmp)
        return process.returncode, process.stdout, process.stderr

    def assertOneLineError(self, code, out, err, *words):
        self.assertEqual(code, 3, (out, err))
        lines = err.strip().splitlines()
        self.assertEqual(len(lines), 1, err)
        self.assertTrue(lines[0].startswith('zeoraid-verify: '), err)
        for word in words:
            self.assertIn(word, lines[0])

    def test_identical_then_incremental(self):
        h = self.make_replicas(blobs=True)
        blob_args = ['--blob-dir', '%s=%s' % (self.fs('b1'),
                                               self.blobs('b1')),
                     '--blob-dir', 'b2.fs=%s' % self.blobs('b2')]
        code, out, err = self.run_cli(self.fs('b1'), 'b2.fs', *blob_args)
        self.assertEqual(code, 0, (out, err))
        self.assertTrue(out.startswith('IDENTICAL: 2 storages'), out)
        self.assertIn('2 blobs', out.splitlines()[0])
        self.assertIn('next incremental check: --since %s' % h.last.hex(),
                      out)
        code, out, err = self.run_cli(
            'b1.fs', 'b2.fs', '--json', '--since', h.undone.hex(),
            '--rate', '1000', *blob_args)
        self.assertEqual(code, 0, (out, err))
        result = json.loads(out)
        self.assertIs(result['identical'], True)
        self.assertEqual(result['start'], p64(u64(h.undone) + 1).hex())
        self.assertEqual(result['transactions'], 3)   # blob 1, 2, last
        self.assertEqual(result['last_tid'], h.last.hex())
        # Blob records but no blob directory: cannot check, unless asked
        # to skip blobs.
        code, out, err = self.run_cli('b1.fs', 'b2.fs')
        self.assertOneLineError(code, out, err, 'b1.fs holds blob records',
                                '--blob-dir b1.fs=DIR', '--no-blobs')
        code, out, err = self.run_cli('b1.fs', 'b2.fs', '--no-blobs')
        self.assertEqual(code, 0, (out, err))

    def test_divergent(self):
        h = self.make_replicas()

        def alter(tid, meta, records):
            if tid == h.step:
                records[0][1] = b'changed'
        self.rewrite('b2', alter=alter)
        code, out, err = self.run_cli('b1.fs', 'b2.fs')
        self.assertEqual(code, 2, (out, err))
        first = out.splitlines()[0]
        self.assertTrue(first.startswith(
            'DIVERGENT: b2.fs differs from b1.fs at tid %s oid %s: data ('
            % (h.step.hex(), h.a_oid.hex())), first)
        code, out, err = self.run_cli('b1.fs', 'b2.fs', '--json')
        self.assertEqual(code, 2)
        divergence = json.loads(out)['divergence']
        self.assertEqual(divergence['backend'], 'b2.fs')
        self.assertEqual(divergence['oid'], h.a_oid.hex())
        self.assertEqual(divergence['kind'], 'data')

    def test_cannot_check(self):
        self.make_replicas()
        with open(os.path.join(self.tmp, 'junk.fs'), 'wb') as f:
            f.write(b'not a FileStorage')
        cases = [
            (('b1.fs', 'nosuch.fs'), ('nosuch.fs', 'no such file')),
            (('b1.fs', 'junk.fs'), ('junk.fs', 'FileStorage')),
            (('b1.fs', 'b2.fs', '--blob-dir', 'b2.fs=nodir'),
             ('nodir', 'does not exist')),
        ]
        for args, words in cases:
            code, out, err = self.run_cli(*args)
            self.assertOneLineError(code, out, err, *words)
        self.assertFalse(os.path.exists(os.path.join(self.tmp, 'nodir')))
        self.assertFalse(os.path.exists(os.path.join(self.tmp, 'nosuch.fs')))
        code, out, err = self.run_cli('b1.fs', 'nosuch.fs', '--json')
        self.assertEqual(code, 3)
        self.assertIs(json.loads(out)['ok'], False)

    def test_bad_arguments(self):
        # Refused before any file is opened: run in-process (faster).
        cases = [
            ((), ('required',)),
            (('b1.fs',), ('at least two',)),
            (('b1.fs', 'b2.fs', '--since', 'xyz'), ('--since', 'xyz')),
            (('b1.fs', 'b2.fs', '--since', '0' * 15), ('16 hex digits',)),
            (('b1.fs', 'b2.fs', '--rate', '-1'), ('--rate',)),
            (('b1.fs', 'b2.fs', '--rate', 'fast'), ('--rate', 'fast')),
            (('b1.fs', 'b2.fs', '--blob-dir', 'b3.fs=/tmp'), ('b3.fs',)),
            (('b1.fs', 'b2.fs', '--blob-dir', 'nodir'), ('nodir',)),
            (('b1.fs', 'b2.fs', '--bogus'), ('--bogus',)),
        ]
        for args, words in cases:
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), \
                    contextlib.redirect_stderr(err):
                code = verify_main(list(args))
            self.assertOneLineError(code, out.getvalue(), err.getvalue(),
                                    'see zeoraid-verify -h', *words)
            self.assertEqual(out.getvalue(), '')


def test_suite():
    loader = unittest.defaultTestLoader
    return unittest.TestSuite(
        loader.loadTestsFromTestCase(case) for case in (
            IdenticalTests, DivergenceTests, IncrementalAndRateTests,
            RaidTests, ZEOTests, CommandLineTests))
