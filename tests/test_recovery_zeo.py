"""Online recovery with real ZEO backend processes.

The backends are real ``runzeo`` processes (tests/zeo_backends.py) that
are killed with SIGKILL mid-way.  In the main scenario the RAID itself is
served by a ZEO StorageServer running in a thread of the test process
(so the test can call ``raid_recover`` on the very RAIDStorage it serves),
and real ZODB clients commit through it while the recovery runs.

Every wait is bounded; the rate limits only make the copy last long
enough to kill something half-way, no timing is asserted.
"""
import logging
import os
import shutil
import tempfile
import threading
import time
import unittest

import transaction
import ZEO.ClientStorage
import ZEO.StorageServer
import ZODB
import ZODB.blob
import ZODB.interfaces
import ZODB.POSException
import ZODB.utils
from persistent.mapping import PersistentMapping
from zope.testing.loggingsupport import InstalledHandler
from ZODB.blob import Blob
from ZODB.Connection import TransactionMetaData

from tests import zeo_backends
from tests.invariants import assert_replicas_identical
from tests.invariants import committed_tids
from tests.test_recovery import RECOVERY_LIMIT
from tests.test_recovery import Backlog
from tests.test_recovery import pickled
from tests.test_recovery import assert_blobs_identical
from tests.test_recovery import record_kinds
from tests.test_recovery import wait_copied
from tests.test_recovery import wait_recovery
from tests.test_recovery import wait_until

from zeoraid import recovery as recovery_module
from zeoraid.errors import RAIDError
from zeoraid.storage import RAIDStorage

TIMEOUT = 10.0


def transactions_of(storage):
    """[(tid, [(oid, tid, data)])] of a storage's whole history, records
    in the order they were written."""
    it = storage.iterator()
    try:
        return [(txn.tid, [(r.oid, r.tid, r.data) for r in txn])
                for txn in it]
    finally:
        close = getattr(it, 'close', None)
        if close is not None:
            close()


class ZEORecoveryTestBase(unittest.TestCase):
    """RAIDs over runzeo backends with blobs; optionally served by ZEO."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix='zeoraid-recovery-zeo-')
        self.log = InstalledHandler('zeoraid', level=logging.INFO)
        # ZEO and ZODB warn about killed servers and refused packs;
        # keep that out of the test output.
        self.quiet = InstalledHandler('ZEO', 'ZODB', 'txn',
                                      level=logging.ERROR)
        self.servers = []
        self.raids = []
        self.dbs = []
        self.front = None
        self.stop_writers = threading.Event()
        self.writers = []

    def tearDown(self):
        transaction.abort()
        self.stop_writers.set()
        for thread in self.writers:
            thread.join(RECOVERY_LIMIT)
        for raid in self.raids:
            recovery = raid.raid_recovery()
            if recovery is not None:
                recovery.stop()
                recovery.done.wait(RECOVERY_LIMIT)
        for db in self.dbs:
            try:
                db.close()
            except Exception:
                pass
        if self.front is not None:
            self.front.close()       # closes the RAID it serves
        for raid in self.raids:
            raid.close()
        zeo_backends.stop_all(self.servers)
        self.quiet.uninstall()
        self.log.uninstall()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def path(self, *parts):
        return os.path.join(self.tmp, *parts)

    def start_servers(self, count):
        servers = zeo_backends.start_backends(self.path('backends'), count,
                                              blob_dir=True)
        self.servers.extend(servers)
        return servers

    def openers(self, servers, names=None):
        names = names or ['b%d' % i for i in range(1, len(servers) + 1)]
        return [(name, server.opener(blob_cache_size=100 * 2 ** 20))
                for name, server in zip(names, servers)]

    def open_raid(self, servers, **kw):
        kw.setdefault('timeout', TIMEOUT)
        raid = RAIDStorage('1', self.openers(servers),
                           blob_dir=self.path('raid-blobs'), **kw)
        self.raids.append(raid)
        return raid

    def serve(self, raid):
        """Serve the RAID with a ZEO server in a thread; return its address."""
        self.front = ZEO.StorageServer.StorageServer(
            ('127.0.0.1', 0), {'1': raid})
        self.front.start_thread()
        return self.front.addr

    def client_db(self, addr):
        """A ZODB.DB over a ZEO client of the served RAID."""
        storage = ZEO.ClientStorage.ClientStorage(
            addr, blob_dir=self.path('client-%d' % len(self.dbs)),
            wait_timeout=30)
        db = ZODB.DB(storage)
        self.dbs.append(db)
        return db

    def open_db(self, raid):
        db = ZODB.DB(raid)
        self.dbs.append(db)
        return db

    def logged(self, *parts):
        """Log messages of zeoraid that contain every one of parts."""
        return [r.getMessage() for r in self.log.records
                if all(part in r.getMessage() for part in parts)]

    def start_writer(self, db, key, live, errors, limit=5000, pause=0.1):
        """A client committing to root[key] (and a blob every 10th).

        It pauses between commits: a moderate live load, which any
        copier must outpace (see doc/RECOVERY.md on saturation).
        """
        def write():
            conn = db.open()
            try:
                mapping = conn.root()[key]
                for i in range(limit):
                    if self.stop_writers.is_set():
                        break
                    mapping['n'] = i
                    if i % 10 == 0:
                        blob = mapping['blob'] = Blob()
                        with blob.open('w') as f:
                            f.write(b'%s %d ' % (key.encode(), i) * 20)
                    transaction.get().note('live %s %d' % (key, i))
                    transaction.commit()
                    live.append((key, i))
                    self.stop_writers.wait(pause)
            except Exception as exc:
                errors.append(exc)
                transaction.abort()
            finally:
                conn.close()
        thread = threading.Thread(target=write, name='writer-' + key,
                                  daemon=True)
        thread.start()
        self.writers.append(thread)
        return thread

    def assert_all_identical(self, raid, names):
        details = raid.raid_details()
        for name in names:
            self.assertEqual(details[name]['state'], 'optimal', details)
        count = assert_replicas_identical(raid, names)
        blobs = assert_blobs_identical(self, raid, names)
        last = {name: raid.raid_backend_storage(name)._call(
            'lastTransaction') for name in names}
        self.assertEqual(set(last.values()), {raid.lastTransaction()}, last)
        return count, blobs

    def assert_done(self, raid, name):
        """The last recovery of name finished and it is optimal."""
        details = raid.raid_details()
        self.assertEqual(details[name]['recovery']['phase'], 'done', details)
        self.assertEqual(details[name]['state'], 'optimal', details)
        self.assertIsNone(details[name]['recovery']['error'])

    def wait_connected(self, raid, name):
        storage = raid.raid_backend_storage(name)
        self.assertTrue(wait_until(storage.is_connected, 30),
                        'backend %s did not reconnect' % name)


class ServedRecoveryTests(ZEORecoveryTestBase):

    def test_recover_1000_transactions_while_clients_commit(self):
        servers = self.start_servers(2)
        raid = self.open_raid(servers, recovery_txn_rate=200)
        addr = self.serve(raid)
        db = self.client_db(addr)
        backlog = Backlog(db)
        conn = backlog.conn
        for key in ('w1', 'w2'):
            conn.root()[key] = PersistentMapping()
        transaction.commit()
        backlog.add(20)
        raid.raid_disable('b2')
        count = backlog.add(1000)
        first_missing = backlog.tids[-count]
        b1 = raid.raid_backend_storage('b1')
        kinds = record_kinds(b1, first_missing)
        self.assertGreaterEqual(kinds['transactions'], 1000)
        self.assertGreater(kinds['data None'], 5, kinds)
        self.assertGreater(kinds['backpointer'], 10, kinds)
        self.assertGreater(kinds['blob'], 20, kinds)

        live, errors = [], []
        for key in ('w1', 'w2'):
            self.start_writer(self.client_db(addr), key, live, errors)
        self.assertTrue(wait_until(lambda: len(live) > 10))
        raid.raid_recover('b2')
        recovery = raid.raid_recovery()
        wait_copied(self, recovery, 100)

        # While it runs: progress, and the refusals.
        self.assertEqual(raid.raid_status(), 'recovering')
        info = raid.raid_details()['b2']['recovery']
        self.assertIn(info['phase'], ('copy', 'finalize'))
        self.assertEqual(info['source'], 'b1')
        self.assertGreaterEqual(info['txns_copied'], 100)
        self.assertGreater(info['bytes_copied'], 0)
        self.assertGreater(info['rate_txn_s'], 0)
        self.assertIsNotNone(info['backlog_seconds'])
        self.assertIsNone(info['error'])
        with self.assertRaises(Exception) as cm:
            db.pack()                  # a client's pack, through ZEO
        self.assertIn('RAIDError', repr(cm.exception))
        self.assertIn('pack refused', str(cm.exception))
        self.assertIn('recovering', str(cm.exception))
        with self.assertRaises(RAIDError) as cm:
            raid.raid_recover('b2')
        self.assertIn('only one recovery', str(cm.exception))

        wait_recovery(self, raid, 120)
        self.assert_done(raid, 'b2')
        done_at = len(live)
        # The recovered backend takes the next commits.
        self.assertTrue(wait_until(lambda: len(live) > done_at + 10, 30))
        self.stop_writers.set()
        for thread in self.writers:
            thread.join(RECOVERY_LIMIT)
        self.assertEqual(errors, [])

        details = raid.raid_details()
        self.assertEqual(details['b2']['recovery']['phase'], 'done',
                         details)
        self.assertEqual(raid.raid_status(), 'optimal', details)
        self.assertGreaterEqual(recovery.progress.txns_copied, count)
        # Clients committed during the copy, and the copy still caught up.
        self.assertGreater(recovery.limiter.credit_txns, 0)
        total, blobs = self.assert_all_identical(raid, ['b1', 'b2'])
        self.assertGreater(total, 1000)
        self.assertGreater(blobs, 20)
        b2 = raid.raid_backend_storage('b2')
        self.assertEqual(record_kinds(b2, first_missing)['data None'],
                         record_kinds(b1, first_missing)['data None'])
        # A client sees what the writers committed last.
        transaction.abort()
        conn.sync()
        for key in ('w1', 'w2'):
            self.assertEqual(conn.root()[key]['n'],
                             max(i for k, i in live if k == key))
        backlog.close()


class SaturationTests(ZEORecoveryTestBase):
    """A client commits without pause for the whole recovery."""

    def test_recovery_ends_under_live_commits_without_pause(self):
        # Back-pressure (recovery.BackPressure) engages after a window in
        # which the backlog did not shrink; the source's iterator never
        # runs dry, so the copy finalizes with a spell's commit lock.
        self.patch(recovery_module, 'PRESSURE_WINDOW', 1.0)
        servers = self.start_servers(2)
        raid = self.open_raid(servers)
        db = self.open_db(raid)
        conn = db.open()
        conn.root()['live'] = PersistentMapping(n=0)
        transaction.commit()
        conn.close()
        raid.raid_disable('b2')
        live = []
        errors = []

        def writer():
            tm = transaction.TransactionManager()
            conn = db.open(tm)
            try:
                obj = conn.root()['live']
                deadline = time.monotonic() + RECOVERY_LIMIT
                while not self.stop_writers.is_set() and \
                        time.monotonic() < deadline:
                    obj['n'] += 1
                    tm.commit()
                    live.append(obj['n'])
            except Exception as exc:  # pragma: no cover - reported
                errors.append(exc)
            finally:
                conn.close()
        thread = threading.Thread(target=writer)
        self.writers.append(thread)
        thread.start()
        self.assertTrue(wait_until(lambda: len(live) >= 500, 30))
        raid.raid_recover('b2')
        recovery = wait_recovery(self, raid, RECOVERY_LIMIT)
        self.assertIsNone(recovery.progress.error)
        during = len(live)
        self.assertTrue(wait_until(lambda: len(live) >= during + 20, 10))
        self.stop_writers.set()
        thread.join(RECOVERY_LIMIT)
        self.assertEqual(errors, [])
        self.assertEqual(raid.raid_details()['b2']['state'], 'optimal')
        self.assertGreater(recovery.progress.backpressure_spells, 0)
        # The recovered backend took the commits made after it.
        assert_replicas_identical(raid)

    def patch(self, obj, name, value):
        old = getattr(obj, name)
        setattr(obj, name, value)
        self.addCleanup(setattr, obj, name, old)


class KillTests(ZEORecoveryTestBase):
    """A backend process is killed (SIGKILL) while the copy runs."""

    def prepare(self, count, name):
        """Backends b1..name; name degraded and missing count txns."""
        servers = self.start_servers(int(name[1]))
        raid = self.open_raid(servers, recovery_txn_rate=50)
        db = self.open_db(raid)
        backlog = Backlog(db)
        backlog.add(5, blob_every=0)
        raid.raid_disable(name)
        # No blobs here: the kills are the subject (blobs are copied in
        # the served scenario and in RebuildTests).
        count = backlog.add(count, blob_every=0)
        backlog.close()
        return servers, raid, count

    def test_source_killed_another_optimal_takes_over(self):
        servers, raid, count = self.prepare(200, 'b3')
        raid.raid_recover('b3')
        recovery = raid.raid_recovery()
        self.assertEqual(recovery.progress.source, 'b1')
        wait_copied(self, recovery, 20)
        servers[0].kill()
        self.assertTrue(wait_until(lambda: recovery.progress.source == 'b2'
                                   or recovery.done.is_set()))
        recovery.limiter.txn_rate = 0
        wait_recovery(self, raid)
        self.assert_done(raid, 'b3')
        details = raid.raid_details()
        self.assertEqual(details['b3']['recovery']['source'], 'b2')
        self.assertEqual(details['b1']['state'], 'degraded')
        self.assertIn('recovery source failed', details['b1']['reason'])
        self.assertEqual(raid.raid_status(), 'degraded')
        self.assertTrue(self.logged('continuing from b2'))
        self.assertEqual(recovery.progress.txns_copied, count)
        self.assert_all_identical(raid, ['b2', 'b3'])

    def test_source_killed_no_other_source_stops_cleanly(self):
        servers, raid, count = self.prepare(200, 'b2')
        raid.raid_recover('b2')
        recovery = raid.raid_recovery()
        wait_copied(self, recovery, 20)
        servers[0].kill()
        self.assertTrue(recovery.done.wait(RECOVERY_LIMIT))
        self.assertIsNone(raid.raid_recovery())
        self.assertLess(recovery.progress.txns_copied, count)
        details = raid.raid_details()
        self.assertEqual(details['b2']['state'], 'degraded')
        self.assertIn('recovery failed', details['b2']['reason'])
        self.assertIn('source b1 failed', details['b2']['reason'])
        self.assertIn('no other optimal backend', details['b2']['reason'])
        self.assertEqual(details['b2']['recovery']['phase'], 'failed')
        self.assertTrue(self.logged('backend=b2 state=degraded',
                                    'previous=recovering',
                                    'reason=recovery failed'))
        # What reached b2 is a clean prefix of b1's history.
        servers[0].restart()
        b1 = servers[0].client()
        try:
            b1_tids = committed_tids(b1)
        finally:
            b1.close()
        b2_tids = committed_tids(raid.raid_backend_storage('b2'))
        self.assertEqual(b2_tids, b1_tids[:len(b2_tids)])
        self.assertGreater(len(b2_tids), 20)

    def test_target_killed_then_recovery_resumes(self):
        servers, raid, count = self.prepare(300, 'b2')
        raid.raid_recover('b2')
        recovery = raid.raid_recovery()
        wait_copied(self, recovery, 20)
        # Full speed, so that the kill lands in a transaction the target
        # has begun (the copier spends its time there).
        recovery.limiter.txn_rate = 0
        wait_copied(self, recovery, recovery.progress.txns_copied + 10)
        servers[1].kill()
        killed = time.monotonic()
        self.assertTrue(recovery.done.wait(RECOVERY_LIMIT))
        # Stopping is bounded by the RAID's deadline, not by how long the
        # backend's ClientStorage would wait for a reconnect (30s here).
        self.assertLess(time.monotonic() - killed, 2 * TIMEOUT,
                        raid.raid_details())
        self.assertIsNone(raid.raid_recovery())
        first = recovery.progress.txns_copied
        self.assertLess(first, count)
        details = raid.raid_details()
        self.assertEqual(details['b2']['state'], 'degraded')
        self.assertIn('recovery failed', details['b2']['reason'])
        self.assertEqual(details['b2']['recovery']['phase'], 'failed')
        self.assertEqual(details['b1']['state'], 'optimal')
        self.assertEqual(raid.raid_status(), 'degraded')

        servers[1].restart()
        self.wait_connected(raid, 'b2')
        b2 = raid.raid_backend_storage('b2')
        # What b2 really has: killed between vote and finish, FileStorage
        # reports the dropped transaction's tid as its last one, and
        # recovery copies from the last transaction it really has.
        junction = committed_tids(b2)[-1]
        self.assertLessEqual(junction, b2._call('lastTransaction'))
        b1_tids = committed_tids(raid.raid_backend_storage('b1'))
        self.assertIn(junction, b1_tids)
        missing = [t for t in b1_tids if t > junction]
        self.assertLess(len(missing), count)     # resumes, not restarts
        raid.recovery_txn_rate = 0
        raid.raid_recover('b2')
        second = wait_recovery(self, raid)
        self.assert_done(raid, 'b2')
        self.assertEqual(second.progress.txns_copied, len(missing),
                         raid.raid_details())
        self.assertEqual(raid.raid_status(), 'optimal')
        self.assert_all_identical(raid, ['b1', 'b2'])


class RebuildTests(ZEORecoveryTestBase):

    def test_full_rebuild_of_an_empty_backend(self):
        """A new, empty backend server joins by reload and is rebuilt."""
        servers = self.start_servers(2)
        raid = self.open_raid(servers[:1])
        db = self.open_db(raid)
        backlog = Backlog(db)
        count = backlog.add(200, blob_every=5)
        backlog.close()
        diff = raid.raid_reload(self.openers(servers))
        self.assertEqual(diff['added'], ['b2'])
        self.assertEqual(raid.raid_details()['b2']['state'], 'degraded')
        raid.raid_recover('b2')
        recovery = wait_recovery(self, raid)
        self.assert_done(raid, 'b2')
        self.assertTrue(self.logged('target is empty, full rebuild'))
        self.assertGreater(recovery.progress.txns_copied, count)
        self.assertEqual(raid.raid_status(), 'optimal')
        total, blobs = self.assert_all_identical(raid, ['b1', 'b2'])
        self.assertEqual(total, recovery.progress.txns_copied)
        self.assertGreater(blobs, 30)

    def write_history(self, server, pack=True):
        """History written by ordinary ZEO clients, without any RAID:
        blobs (ZEO's storeBlob writes two records each), two blobs in one
        transaction, an undo and (with `pack`) a pack. Returns the last
        tid."""
        existing = ZODB.DB(server.client())
        with existing.transaction() as conn:
            root = conn.root()
            root['docs'] = PersistentMapping(
                {'doc%d' % i: 'v%d' % i for i in range(50)})
            root['file'] = Blob(b'a blob from before zeoraid')
        with existing.transaction() as conn:
            # Two blobs in one transaction: the order of their records.
            conn.root()['pair'] = PersistentMapping(
                {'a': Blob(b'first of two'), 'b': Blob(b'second of two')})
        for i in range(20):
            with existing.transaction() as conn:
                conn.root()['docs']['doc%d' % i] = 'changed %d' % i
        undone = existing.undoLog(0, 1)[0]['id']
        existing.undo(undone)
        transaction.commit()
        if pack:
            existing.pack(time.time() + 1)
        with existing.transaction() as conn:
            conn.root()['after-pack'] = 1
        last = existing.storage.lastTransaction()
        existing.close()
        return last

    def test_migrating_an_existing_zeo_server(self):
        """doc/OPERATION.md, "Moving an existing ZEO server behind
        zeoraid": the RAID is put in front of a ZEO server that has years
        of history written by ordinary clients (blobs, an undo, a pack),
        serves it at once, and a second, empty server joins online."""
        servers = self.start_servers(2)
        last_before = self.write_history(servers[0])

        # zeoraid in front of it, alone: optimal, serving what is there.
        raid = self.open_raid(servers[:1])
        self.assertEqual(raid.raid_status(), 'optimal')
        self.assertEqual(raid.lastTransaction(), last_before)
        db = self.open_db(raid)
        with db.transaction() as conn:
            root = conn.root()
            self.assertEqual(root['docs']['doc30'], 'v30')
            with root['file'].open() as f:
                self.assertEqual(f.read(), b'a blob from before zeoraid')
            root['docs']['new'] = 'through the RAID'
            root['file2'] = Blob(b'a blob through zeoraid')
            root['pair2'] = PersistentMapping(
                {'a': Blob(b'third'), 'b': Blob(b'fourth')})
        # The second server joins by reload and is rebuilt online.
        diff = raid.raid_reload(self.openers(servers))
        self.assertEqual(diff['added'], ['b2'])
        raid.raid_recover('b2')
        wait_recovery(self, raid)
        self.assert_done(raid, 'b2')
        self.assertTrue(self.logged('target is empty, full rebuild'))
        self.assert_all_identical(raid, ['b1', 'b2'])
        # New objects do not reuse old oids; the old ones are intact.
        with db.transaction() as conn:
            conn.root()['more'] = PersistentMapping({'x': 1})
        with db.transaction() as conn:
            root = conn.root()
            self.assertEqual(len(root['docs']), 51)
            self.assertEqual(root['more']['x'], 1)
            self.assertEqual(root['docs']['doc3'], 'changed 3')
        self.assert_all_identical(raid, ['b1', 'b2'])

    def test_copy_transactions_with_blobs_into_a_raid_of_zeo_servers(self):
        """zodbconvert's path (copyTransactionsFrom): a history with blobs
        restored into a RAID over ZEO backends, which have no restoreBlob
        of their own: every record, in order, and every blob file."""
        servers = self.start_servers(3)
        self.write_history(servers[0], pack=False)
        source = servers[0].client()
        self.addCleanup(source.close)
        raid = self.open_raid(servers[1:])
        self.assertTrue(
            ZODB.interfaces.IBlobStorageRestoreable.providedBy(raid))
        raid.copyTransactionsFrom(source)
        self.assertEqual(raid.lastTransaction(), source.lastTransaction())
        self.assert_all_identical(raid, ['b1', 'b2'])
        copied = raid.raid_backend_storage('b1')
        expected = transactions_of(source)
        self.assertEqual(transactions_of(copied), expected)
        blobs = {(oid, tid) for tid, records in expected
                 for oid, _, data in records
                 if ZODB.blob.is_blob_record(data)}
        self.assertEqual(len(blobs), 3)
        for oid, tid in blobs:
            with open(source.loadBlob(oid, tid), 'rb') as f, \
                    open(raid.loadBlob(oid, tid), 'rb') as g:
                self.assertEqual(f.read(), g.read())
        # The copy is a working database.
        db = self.open_db(raid)
        with db.transaction() as conn:
            root = conn.root()
            with root['pair']['b'].open() as f:
                self.assertEqual(f.read(), b'second of two')
            root['more'] = more = Blob(b'after the copy')
        # New objects get oids above the copied ones (as FileStorage's
        # restore makes sure), not oids in use.
        self.assertGreater(ZODB.utils.u64(more._p_oid), 5)
        with db.transaction() as conn:
            root = conn.root()
            with root['more'].open() as f:
                self.assertEqual(f.read(), b'after the copy')
            self.assertEqual(root['docs']['doc3'], 'changed 3')

    def test_diverged_backend_refused_then_rebuilt_as_the_error_says(self):
        servers = self.start_servers(2)
        raid = self.open_raid(servers)
        db = self.open_db(raid)
        backlog = Backlog(db)
        backlog.add(20, blob_every=5)
        raid.raid_disable('b2')
        backlog.add(20, blob_every=5)
        backlog.close()
        # Somebody commits to b2 behind the RAID's back (as an
        # unknown-outcome tpc_finish would).
        other = servers[1].client()
        txn = TransactionMetaData(b'intruder', b'only on b2')
        other.tpc_begin(txn)
        other.store(ZODB.utils.p64(10 ** 6), ZODB.utils.z64,
                    pickled(b'only on b2'), '', txn)
        other.tpc_vote(txn)
        extra = other.tpc_finish(txn)
        other.close()

        raid.raid_recover('b2')
        recovery = wait_recovery(self, raid)
        details = raid.raid_details()['b2']
        self.assertEqual(details['state'], 'degraded')
        self.assertIn('full rebuild', details['reason'])
        self.assertIn(extra.hex(), details['reason'])
        self.assertEqual(recovery.progress.txns_copied, 0)

        # What the message says: stop its server, move its storage away
        # so it starts empty, then recover again.
        servers[1].stop()
        os.rename(servers[1].path, servers[1].path + '.diverged')
        os.rename(servers[1].blob_dir, servers[1].blob_dir + '.diverged')
        servers[1].restart()
        raid.raid_recover('b2')
        wait_recovery(self, raid)
        self.assert_done(raid, 'b2')
        self.assertTrue(self.logged('target is empty, full rebuild'))
        self.assert_all_identical(raid, ['b1', 'b2'])


def test_suite():
    loader = unittest.TestLoader()
    suite = unittest.TestSuite()
    for case in (ServedRecoveryTests, SaturationTests, KillTests,
                 RebuildTests):
        suite.addTest(loader.loadTestsFromTestCase(case))
    return suite
