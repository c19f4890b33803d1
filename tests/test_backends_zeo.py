"""RAID over real runzeo backend processes, crashed and frozen under load.

A ZODB client (``ZODB.DB`` over an in-process RAIDStorage) commits from
several threads while one backend server is killed with SIGKILL, or frozen
with SIGSTOP.  No commit may fail with a non-retryable error, the failed
backend must be degraded (a frozen one within the RAID's timeout), and
every commit must be durable on the surviving backends.
"""
import os
import shutil
import signal
import tempfile
import threading
import time
import unittest

import transaction
import ZODB
import ZODB.config
import ZODB.POSException
from BTrees.OOBTree import OOBTree
from ZODB.FileStorage import FileStorage

from tests.invariants import assert_replicas_identical
from tests.invariants import committed_tids
from tests.zeo_backends import start_backends
from tests.zeo_backends import stop_all

from zeoraid.storage import RAIDStorage

THREADS = 3
COMMITS = 50
LOOP_CAP = 60.0          # seconds for the whole commit loop
RETRIES = 20             # per commit, for ConflictErrors only


class CommitLoad:
    """THREADS client threads, each committing COMMITS times to its tree."""

    def __init__(self, db):
        self.db = db
        self.errors = []
        self.committed = [[] for _ in range(THREADS)]
        self.durations = []
        self.conflicts = 0
        self._lock = threading.Lock()
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        root = conn.root()
        for t in range(THREADS):
            root['t%d' % t] = OOBTree()
        tm.commit()
        conn.close()
        self.threads = [threading.Thread(target=self._work, args=(t,),
                                         name='client-%d' % t, daemon=True)
                        for t in range(THREADS)]
        self.deadline = None

    @property
    def count(self):
        return sum(len(c) for c in self.committed)

    def start(self):
        self.deadline = time.monotonic() + LOOP_CAP
        for thread in self.threads:
            thread.start()

    def join(self):
        for thread in self.threads:
            thread.join(max(0.1, self.deadline - time.monotonic() + 10))
        return not any(thread.is_alive() for thread in self.threads)

    def wait_for(self, count):
        while self.count < count and time.monotonic() < self.deadline:
            if not any(thread.is_alive() for thread in self.threads):
                break
            time.sleep(0.01)

    def _work(self, t):
        tm = transaction.TransactionManager()
        conn = self.db.open(tm)
        try:
            for i in range(COMMITS):
                if time.monotonic() > self.deadline:
                    self.errors.append((t, i, 'loop cap of %ss reached'
                                        % LOOP_CAP))
                    return
                for attempt in range(RETRIES):
                    start = time.monotonic()
                    try:
                        tm.begin()
                        conn.root()['t%d' % t][i] = 'value %d' % i
                        tm.commit()
                    except ZODB.POSException.ConflictError:
                        tm.abort()
                        with self._lock:
                            self.conflicts += 1
                        continue
                    except Exception as exc:
                        tm.abort()
                        self.errors.append((t, i, repr(exc)))
                        return
                    with self._lock:
                        self.durations.append(time.monotonic() - start)
                    self.committed[t].append(i)
                    break
                else:
                    self.errors.append((t, i, 'too many conflicts'))
                    return
        finally:
            tm.abort()
            conn.close()


class ZEOBackendTests(unittest.TestCase):

    timeout = 2.0

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix='zeoraid-zeo-')
        self.servers = start_backends(self.tmp, 3)
        self.names = ['b1', 'b2', 'b3']
        self.stopped = []
        self.db = None
        self.raid = None

    def tearDown(self):
        for server in self.servers:
            if server.running:
                try:
                    os.kill(server.process.pid, signal.SIGCONT)
                except OSError:
                    pass
        try:
            if self.db is not None:
                self.db.close()
            elif self.raid is not None:
                self.raid.close()
        finally:
            stop_all(self.servers)
            for server in self.servers:
                server.kill()
            shutil.rmtree(self.tmp, ignore_errors=True)

    def open_raid(self, **kw):
        backends = [(name, server.opener(wait_timeout=self.timeout))
                    for name, server in zip(self.names, self.servers)]
        self.raid = RAIDStorage('raid', backends, timeout=self.timeout, **kw)
        self.db = ZODB.DB(self.raid)
        return self.raid

    def assert_durable(self, server, load):
        """The server's FileStorage file holds every committed value."""
        server.stop()
        storage = FileStorage(server.path, read_only=True)
        try:
            db = ZODB.DB(storage)
            conn = db.open()
            root = conn.root()
            for t, committed in enumerate(load.committed):
                tree = root['t%d' % t]
                self.assertEqual(sorted(tree.keys()), sorted(committed),
                                 'thread %d on %s' % (t, server.directory))
                for i in committed:
                    self.assertEqual(tree[i], 'value %d' % i)
            conn.close()
            db.close()
        finally:
            storage.close()

    def test_kill_backend_during_commits(self):
        raid = self.open_raid()
        victim = self.servers[0]           # b1: also the one reads go to
        load = CommitLoad(self.db)
        load.start()
        load.wait_for(20)
        killed_at = load.count
        victim.kill()
        self.assertTrue(load.join(), 'client threads did not finish')
        self.assertEqual(load.errors, [])
        self.assertEqual([len(c) for c in load.committed],
                         [COMMITS] * THREADS)
        self.assertGreater(load.count, killed_at)
        details = raid.raid_details()
        self.assertEqual(details['b1']['state'], 'degraded', details)
        self.assertEqual(details['b2']['state'], 'optimal', details)
        self.assertEqual(details['b3']['state'], 'optimal', details)
        self.assertEqual(raid.raid_status(), 'degraded')
        survivors = raid.raid_backend_storage('b2')
        self.assertEqual(committed_tids(survivors)[-1],
                         raid.lastTransaction())
        assert_replicas_identical(raid)
        self.db.close()
        self.db = None
        for server in self.servers[1:]:
            self.assert_durable(server, load)

    def test_frozen_backend_is_degraded_within_timeout(self):
        self.timeout = 1.5
        raid = self.open_raid()
        victim = self.servers[1]
        load = CommitLoad(self.db)
        load.start()
        load.wait_for(20)
        before = load.count
        os.kill(victim.process.pid, signal.SIGSTOP)
        frozen_at = time.monotonic()
        while (raid.raid_details()['b2']['state'] != 'degraded'
               and time.monotonic() - frozen_at < self.timeout * 3 + 5):
            time.sleep(0.02)
        noticed = time.monotonic() - frozen_at
        self.assertEqual(raid.raid_details()['b2']['state'], 'degraded',
                         raid.raid_details())
        # Commits keep coming, so the next one hits the frozen backend at
        # once; it must be cut off by the timeout.
        self.assertLess(noticed, self.timeout * 3)
        self.assertIn('no answer within', raid.raid_details()['b2']['reason'])
        self.assertTrue(load.join(), 'client threads did not finish')
        self.assertEqual(load.errors, [])
        self.assertEqual(load.count, COMMITS * THREADS)
        self.assertGreater(load.count, before)
        self.assertLess(max(load.durations), self.timeout * 3)
        self.assertEqual(raid.raid_details()['b1']['state'], 'optimal')
        self.assertEqual(raid.raid_details()['b3']['state'], 'optimal')
        assert_replicas_identical(raid)
        os.kill(victim.process.pid, signal.SIGCONT)
        self.db.close()
        self.db = None
        for server in (self.servers[0], self.servers[2]):
            self.assert_durable(server, load)


class ZEOBackendConfigTests(unittest.TestCase):
    """<raidstorage> over ZEO's <clientstorage> sections, from ZConfig."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix='zeoraid-zeo-config-')
        self.servers = start_backends(self.tmp, 2)

    def tearDown(self):
        stop_all(self.servers)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def section(self, name, server):
        # Written here rather than with zeo_backends' zconfig_section,
        # which uses keys ZEO's <clientstorage> does not know.
        return ('<clientstorage %s>\n  server %s:%d\n  storage 1\n'
                '  wait-timeout 5\n</clientstorage>\n'
                % ((name,) + tuple(server.addr)))

    def test_clientstorage_backends_from_config(self):
        text = ('%%import ZEO\n%%import zeoraid\n<zodb>\n'
                '<raidstorage r>\n  timeout 5s\n%s%s</raidstorage>\n'
                '</zodb>\n'
                % (self.section('b1', self.servers[0]),
                   self.section('b2', self.servers[1])))
        db = ZODB.config.databaseFromString(text)
        try:
            raid = db.storage
            self.assertEqual(raid.raid_status(), 'optimal',
                             raid.raid_details())
            tm = transaction.TransactionManager()
            conn = db.open(tm)
            conn.root()['x'] = OOBTree({1: 'one'})
            tm.commit()
            # The DB's own undo goes through the RAID to ClientStorages,
            # whose undo() returns nothing: the RAID must supply the oids.
            undo_id = db.undoLog(0, 1)[0]['id']
            db.undo(undo_id, tm.get())
            tm.commit()
            conn.close()
            assert_replicas_identical(raid)
            self.assertEqual(len(committed_tids(
                raid.raid_backend_storage('b1'))), 3)
        finally:
            db.close()


def test_suite():
    loader = unittest.defaultTestLoader
    suite = unittest.TestSuite()
    suite.addTest(loader.loadTestsFromTestCase(ZEOBackendTests))
    suite.addTest(loader.loadTestsFromTestCase(ZEOBackendConfigTests))
    return suite
