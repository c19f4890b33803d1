"""cluster-mode coop: two RAID servers writing to the same backends.

Real runzeo backend processes; two RAIDStorage instances (each with its
own ClientStorages, as two zeoraid servers would have) commit
concurrently through ZODB. The backends must never diverge and tids must
never go backwards, whatever the interleaving.
"""
import tempfile
import threading
import time
import unittest

import transaction
import ZODB
import ZODB.POSException
from BTrees.OOBTree import OOBTree
from ZODB.utils import z64

from tests.invariants import assert_replicas_identical
from tests.invariants import committed_tids
from tests.polling import poll
from tests.zeo_backends import start_backends
from tests.zeo_backends import stop_all
from zeoraid.errors import RAIDError
from zeoraid.storage import RAIDStorage

TIMEOUT = 5
ROUNDS = 40          # commits per client thread
DEADLINE = 60        # seconds: every load loop stops by itself


class CoopTests(unittest.TestCase):

    backend_count = 3

    def setUp(self):
        self.directory = tempfile.mkdtemp(prefix='zeoraid-coop-')
        self.servers = start_backends(self.directory, self.backend_count)
        self.raids = []
        self.dbs = []

    def tearDown(self):
        for db in self.dbs:
            db.close()
        stop_all(self.servers)

    def open_raid(self, server_id):
        raid = RAIDStorage(
            'raid', [('b%d' % (i + 1), s.opener())
                     for i, s in enumerate(self.servers)],
            cluster_mode='coop', server_id=server_id, timeout=TIMEOUT)
        self.raids.append(raid)
        db = ZODB.DB(raid)
        self.dbs.append(db)
        return raid, db

    def commit_loop(self, db, key, errors, committed):
        """Counter increments and BTree inserts, retrying conflicts."""
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        stop = time.monotonic() + DEADLINE
        done = 0
        while done < ROUNDS and time.monotonic() < stop:
            try:
                with tm:
                    root = conn.root()
                    root['counter'] = root.get('counter', 0) + 1
                    root['tree'][(key, done)] = done
            except ZODB.POSException.ConflictError:
                continue
            except Exception as exc:
                errors.append(exc)
                break
            committed.append((key, done))
            done += 1
        conn.close()

    def test_two_servers_commit_concurrently_without_divergence(self):
        raid_a, db_a = self.open_raid(0)
        raid_b, db_b = self.open_raid(1)
        with db_a.transaction() as conn:
            conn.root()['tree'] = OOBTree()
            conn.root()['counter'] = 0
        errors, committed = [], []
        threads = [threading.Thread(target=self.commit_loop,
                                    args=(db, key, errors, committed))
                   for db, key in ((db_a, 'a1'), (db_a, 'a2'),
                                   (db_b, 'b1'), (db_b, 'b2'))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(DEADLINE + 10)
        self.assertEqual(errors, [])
        self.assertEqual(len(committed), 4 * ROUNDS)
        for raid in (raid_a, raid_b):
            self.assertEqual(raid.raid_status(), 'optimal',
                             raid.raid_details())
        # Same history everywhere, tids strictly increasing.
        assert_replicas_identical(raid_a)
        tids = committed_tids(raid_a.raid_backend_storage('b1'))
        self.assertEqual(tids, sorted(set(tids)))
        # Every commit of both servers is there, seen from either one.
        for db in (db_a, db_b):
            with db.transaction() as conn:
                root = conn.root()
                self.assertEqual(root['counter'], 4 * ROUNDS)
                self.assertEqual(
                    sorted(root['tree'].keys()), sorted(committed))
        # oids from the two servers never collide: residue classes.
        oids_a = {raid_a.new_oid() for _ in range(50)}
        oids_b = {raid_b.new_oid() for _ in range(50)}
        self.assertFalse(oids_a & oids_b)

    def test_server_that_lost_a_backend_does_not_make_it_diverge(self):
        # A partition between server A and backend b2: A sees b2 fail and
        # goes on with b1 and b3 (a majority); B still reaches all three.
        # b2 now misses A's commits: B must notice and stop using it,
        # instead of committing on a backend that diverged.
        raid_a, db_a = self.open_raid(0)
        raid_b, db_b = self.open_raid(1)
        with db_a.transaction() as conn:
            conn.root()['x'] = 0
        raid_a.raid_disable('b2')
        with db_a.transaction() as conn:
            conn.root()['x'] = 1
        # A's commit reaches B as an invalidation from b1/b3, a moment
        # later (MVCC: a transaction B began before that may still see
        # x == 0). Once B knows of it, B must never read stale b2.
        committed = raid_a.lastTransaction()
        self.assertTrue(poll(lambda: raid_b.lastTransaction() >= committed,
                             TIMEOUT))
        # B reads from a backend that has A's commit, never stale b2.
        deadline = time.monotonic() + TIMEOUT * 3
        while time.monotonic() < deadline:
            with db_b.transaction() as conn:
                conn.root()['y'] = conn.root().get('y', 0) + 1
                self.assertEqual(conn.root()['x'], 1)
            if raid_b.raid_details()['b2']['state'] != 'optimal':
                break
        details = raid_b.raid_details()['b2']
        self.assertEqual(details['state'], 'degraded', details)
        # B notices either from the last tids (missing transactions) or
        # because b2 alone votes differently on the objects A changed.
        self.assertRegex(details['reason'],
                         'missing transactions|divergent')
        assert_replicas_identical(raid_b)   # b1 and b3
        # b2 is a strict prefix of the others: recoverable, not diverged.
        b1 = committed_tids(raid_b.raid_backend_storage('b1'))
        b2 = committed_tids(raid_b.raid_backend_storage('b2'))
        self.assertEqual(b1[:len(b2)], b2)
        self.assertLess(len(b2), len(b1))

    def test_network_partition_between_a_server_and_a_backend(self):
        # The real thing: server A talks to b2 through a TCP proxy that
        # then drops every connection, while both servers commit.
        from tests.tcpproxy import FaultProxy
        proxy = FaultProxy(self.servers[1].addr)
        self.addCleanup(proxy.close)
        import ZEO.ClientStorage

        def via_proxy():
            return ZEO.ClientStorage.ClientStorage(
                proxy.address, wait=True, wait_timeout=TIMEOUT)
        openers = [('b1', self.servers[0].opener()), ('b2', via_proxy),
                   ('b3', self.servers[2].opener())]
        raid_a = RAIDStorage('raid', openers, cluster_mode='coop',
                             server_id=0, timeout=TIMEOUT)
        db_a = ZODB.DB(raid_a)
        self.dbs.append(db_a)
        raid_b, db_b = self.open_raid(1)
        with db_a.transaction() as conn:
            conn.root()['tree'] = OOBTree()
            conn.root()['counter'] = 0
        errors, committed = [], []
        threads = [threading.Thread(target=self.commit_loop,
                                    args=(db, key, errors, committed))
                   for db, key in ((db_a, 'a1'), (db_b, 'b1'))]
        for t in threads:
            t.start()
        time.sleep(0.5)
        proxy.drop()                     # the partition
        for t in threads:
            t.join(DEADLINE + 10)
        self.assertEqual(errors, [])
        self.assertEqual(len(committed), 2 * ROUNDS)
        # (On a fast machine the loops may end before the drop: A's next
        # commit meets the partition then.)
        with db_a.transaction() as conn:
            conn.root()['after_partition'] = 1
        self.assertEqual(raid_a.raid_details()['b2']['state'], 'degraded')
        # B hears of A's commit a moment later; a transaction it began
        # before would conflict on the root (legitimately).
        newest = raid_a.lastTransaction()
        self.assertTrue(poll(lambda: raid_b.lastTransaction() >= newest,
                             TIMEOUT))
        # B learns that b2 missed A's commits at its next commit at the
        # latest (its reads never went to b2 meanwhile: it had not
        # reported them).
        with db_b.transaction() as conn:
            conn.root()['after'] = 1
        self.assertEqual(raid_b.raid_details()['b2']['state'], 'degraded',
                         raid_b.raid_details())
        # Whatever each server thinks of b2, the backends both still
        # count as optimal are identical, and every commit is on them.
        for raid in (raid_a, raid_b):
            assert_replicas_identical(raid)
        b1 = committed_tids(raid_b.raid_backend_storage('b1'))
        b3 = committed_tids(raid_b.raid_backend_storage('b3'))
        self.assertEqual(b1, b3)
        self.assertEqual(b1, sorted(set(b1)))
        with db_b.transaction() as conn:
            self.assertEqual(sorted(conn.root()['tree'].keys()),
                             sorted(committed))
        # b2 missed A's commits after the partition: a prefix, never a
        # fork, so recovery can bring it back.
        b2 = committed_tids(raid_b.raid_backend_storage('b2'))
        self.assertEqual(b1[:len(b2)], b2)
        proxy.heal()

    def test_quorum_lost_fails_the_raid(self):
        # coop needs a majority of the backends (2 of 3): with one left a
        # server could commit where the other servers cannot see it.
        raid_a, db_a = self.open_raid(0)
        raid_a.raid_disable('b1')
        with db_a.transaction() as conn:
            conn.root()['x'] = 1
        self.assertEqual(raid_a.raid_status(), 'degraded')
        self.servers[1].kill()
        with self.assertRaises(ZODB.POSException.POSError):
            with db_a.transaction() as conn:
                conn.root()['x'] = 2
        self.assertEqual(raid_a.raid_status(), 'failed',
                         raid_a.raid_details())
        with self.assertRaises(RAIDError):
            with db_a.transaction() as conn:
                conn.root()['x'] = 3

    def test_coop_needs_a_server_id(self):
        with self.assertRaises(ValueError) as cm:
            RAIDStorage('raid', [('b1', self.servers[0].opener())],
                        cluster_mode='coop')
        self.assertIn('server-id', str(cm.exception))

    def test_stale_tid_is_refused_and_retried(self):
        # Server B chooses its tid before server A commits a later one:
        # B must not commit a tid below the backends' last one.
        raid_a, db_a = self.open_raid(0)
        raid_b, db_b = self.open_raid(1)
        txn_b = transaction.TransactionManager().begin()
        raid_b.tpc_begin(txn_b)
        oid = raid_b.new_oid()
        from ZODB.tests.MinPO import MinPO
        from ZODB.tests.StorageTestBase import zodb_pickle
        raid_b.store(oid, z64, zodb_pickle(MinPO(1)), '', txn_b)
        # A commits meanwhile, with a later tid.
        time.sleep(0.01)
        with db_a.transaction() as conn:
            conn.root()['z'] = 1
        with self.assertRaises(ZODB.POSException.ConflictError):
            raid_b.tpc_vote(txn_b)
        raid_b.tpc_abort(txn_b)
        self.assertEqual(raid_b.raid_status(), 'optimal')
        assert_replicas_identical(raid_a)


def test_suite():
    return unittest.defaultTestLoader.loadTestsFromName(__name__)
