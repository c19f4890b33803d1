"""One IO loop for all <zeoclient> backends (zeoraid.ioloop).

Real runzeo backend processes; the RAID is opened from ZConfig text as an
operator writes it. What is checked: the backend clients share one loop
and start no networking thread of their own, the RAID commits and reads
through them (direct path included), `shared-backend-io off` gives each
its own thread, and a frozen backend on the shared loop is cut off by the
deadline while the others go on.
"""
import os
import shutil
import signal
import tempfile
import threading
import time
import unittest

import ZEO.asyncio.client
import ZODB.config
import ZODB.Connection
from BTrees.OOBTree import OOBTree

from tests.invariants import assert_replicas_identical
from tests.zeo_backends import start_backends
from tests.zeo_backends import stop_all
from zeoraid import ioloop

NAMES = ('b1', 'b2', 'b3')

# The loop lives as long as the process (a daemon thread); started here so
# the test runner does not count it as a thread a test left behind.
ioloop.shared_loop()


def networking_threads():
    return [t for t in threading.enumerate()
            if 'zeo client networking thread' in t.name]


class SharedBackendIOTests(unittest.TestCase):

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix='zeoraid-ioloop-')
        self.servers = start_backends(self.tmp, len(NAMES))
        self.frozen = None
        self.dbs = []

    def tearDown(self):
        for db in self.dbs:
            db.close()
        if self.frozen is not None:
            os.kill(self.frozen.process.pid, signal.SIGCONT)
        stop_all(self.servers)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def open_db(self, extra='', timeout='5s'):
        sections = ''.join(server.zconfig_section(name)
                           for name, server in zip(NAMES, self.servers))
        text = ('%%import zeoraid\n<zodb>\n<raidstorage r>\n'
                '  timeout %s\n  %s\n%s</raidstorage>\n</zodb>\n'
                % (timeout, extra, sections))
        db = ZODB.config.databaseFromString(text)
        self.dbs.append(db)
        return db

    def runners(self, raid):
        return [raid.raid_backend_storage(name)._server for name in NAMES]

    def commit(self, db, key, value):
        with db.transaction() as conn:
            conn.root()[key] = value

    def test_backends_share_one_loop_and_no_thread_of_their_own(self):
        before = len(networking_threads())
        db = self.open_db()
        raid = db.storage
        self.assertEqual(raid.raid_status(), 'optimal', raid.raid_details())
        runners = self.runners(raid)
        for runner in runners:
            self.assertIsInstance(runner, ioloop.SharedLoopRunner)
        self.assertEqual(len({id(r.loop) for r in runners}), 1)
        self.assertIs(runners[0].loop, ioloop.shared_loop())
        self.assertEqual(len(networking_threads()), before)
        # The commit path drives them directly (one loop for all).
        for name in NAMES:
            self.assertIsNotNone(raid._backend(name).direct)
        self.commit(db, 'tree', OOBTree({i: 'v%d' % i for i in range(50)}))
        for i in range(20):
            self.commit(db, 'n', i)
        with db.transaction() as conn:
            self.assertEqual(conn.root()['n'], 19)
            self.assertEqual(len(conn.root()['tree']), 50)
        assert_replicas_identical(raid)
        self.dbs.remove(db)
        db.close()
        for runner in runners:
            self.assertTrue(runner.is_closed())
        # The loop serves the next RAID of the process.
        self.assertTrue(ioloop.shared_loop().is_running())

    def test_votes_and_finishes_reach_the_loop_in_one_hand_off(self):
        db = self.open_db()
        raid = db.storage
        self.commit(db, 'n', 0)
        loop = ioloop.shared_loop()
        hand_offs = []
        original = loop.call_soon_threadsafe

        def counting(callback, *args, **kw):
            hand_offs.append(getattr(callback, '__name__', repr(callback)))
            return original(callback, *args, **kw)

        txn = ZODB.Connection.TransactionMetaData()
        raid.tpc_begin(txn)
        raid.store(raid.new_oid(), b'\0' * 8, b'data', '', txn)
        loop.call_soon_threadsafe = counting
        try:
            raid.tpc_vote(txn)
            raid.tpc_finish(txn)
        finally:
            del loop.call_soon_threadsafe
        # One for the three votes, one for the three finishes (one per
        # backend each before the Handoff).
        self.assertEqual(hand_offs, ['_start_all', '_start_all'])
        assert_replicas_identical(raid)

    def test_off_gives_each_backend_its_own_thread(self):
        db = self.open_db(extra='shared-backend-io off')
        runners = self.runners(db.storage)
        for runner in runners:
            self.assertIsInstance(runner, ZEO.asyncio.client.ClientThread)
        self.assertEqual(len({id(r.loop) for r in runners}), len(NAMES))
        self.commit(db, 'x', 1)
        assert_replicas_identical(db.storage)

    def test_a_frozen_backend_does_not_hold_up_the_others(self):
        db = self.open_db(timeout='2s')
        raid = db.storage
        self.commit(db, 'n', 0)
        self.frozen = self.servers[1]
        os.kill(self.frozen.process.pid, signal.SIGSTOP)
        durations = []
        for i in range(1, 6):
            started = time.monotonic()
            self.commit(db, 'n', i)
            durations.append(time.monotonic() - started)
        details = raid.raid_details()
        self.assertEqual(details['b2']['state'], 'degraded', details)
        self.assertIn('no answer within', details['b2']['reason'])
        self.assertEqual(details['b1']['state'], 'optimal')
        self.assertEqual(details['b3']['state'], 'optimal')
        # Only the first commit met the frozen backend, and only for the
        # deadline; the rest went on without it at once.
        self.assertLess(max(durations), 2 * 3)
        self.assertLess(sorted(durations)[-2], 1.0)
        with db.transaction() as conn:
            self.assertEqual(conn.root()['n'], 5)
        assert_replicas_identical(raid)

    def test_a_forked_process_gets_a_loop_of_its_own(self):
        # ZEO's test forker and daemonizing servers fork after the loop
        # may have started: the child has the loop object, not its thread.
        self.assertTrue(ioloop.shared_loop().is_running())
        pid = os.fork()
        if pid == 0:        # the child: report by exit code only
            code = 1
            try:
                db = self.open_db(timeout='3s')
                if db.storage.raid_status() == 'optimal':
                    self.commit(db, 'from child', 1)
                    code = 0
                db.close()
            finally:
                os._exit(code)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.05)
        else:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            self.fail('the forked child did not finish')
        self.assertEqual(os.waitstatus_to_exitcode(status), 0)
        db = self.open_db()
        with db.transaction() as conn:
            self.assertEqual(conn.root()['from child'], 1)


def test_suite():
    return unittest.defaultTestLoader.loadTestsFromTestCase(
        SharedBackendIOTests)
