"""Replica safety over real processes: sequences of ordinary events.

Each test is one of the operator sequences that used to lose
acknowledged commits or fork replicas silently (doc/DESIGN.md, "Safety
model"): real runzeo backends behind TCP proxies, a real zeoraid server
(tests.chaos.Cluster) and real ZODB clients.
"""
import os
import shutil
import subprocess
import sys
import time
import unittest

import transaction
import ZEO.ClientStorage
import ZODB
import ZODB.POSException
import ZODB.utils
from persistent.mapping import PersistentMapping

from tests.chaos import Cluster
from tests.chaos import assert_identical
from tests.polling import wait_until
from zeoraid.manager.client import AdminRefused

RECOVERY_WAIT = 60


def manager(cluster, *args):
    """zeoraid-manager against the cluster's server: (exit code, output)."""
    result = subprocess.run(
        [sys.executable, '-m', 'zeoraid.manager', '--admin',
         cluster.raid.admin_socket] + list(args),
        capture_output=True, text=True, timeout=60)
    return result.returncode, (result.stdout + result.stderr).strip()


class SafetyTestBase(unittest.TestCase):

    backends = 2

    def setUp(self):
        self.cluster = Cluster(count=self.backends, timeout=1.0, blobs=False)
        self.addCleanup(self.cluster.close)
        self.cluster.start()
        self.dbs = []
        self.addCleanup(self.close_dbs)

    def db(self):
        storage = self.cluster.client_storage()
        db = ZODB.DB(storage)
        self.dbs.append(db)
        return db

    def set_value(self, db, value, key='v'):
        """Commit root[key] = value; return the tid."""
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        try:
            conn.root()[key] = value
            tm.commit()
            return conn.root()._p_serial
        finally:
            conn.close()

    def value(self, db, key='v'):
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        try:
            conn.sync()
            return conn.root().get(key)
        finally:
            tm.abort()
            conn.close()

    def close_dbs(self):
        for db in self.dbs:
            db.close()
        self.dbs = []

    def details(self, name):
        return self.cluster.raid.details()['backends'][name]

    def wait_state(self, name, state, timeout=20):
        wait_until(lambda: self.details(name)['state'] == state, timeout,
                   'backend %s to be %s: %s' % (name, state,
                                                self.details(name)))

    def recover(self, name):
        self.cluster.raid.admin('recover', name)
        wait_until(lambda: self.details(name)['state'] != 'recovering',
                   RECOVERY_WAIT, 'recovery of %s to end' % name)
        return self.details(name)

    def assert_replicas_identical(self, names):
        assert_identical([self.cluster.snapshot(n) for n in names])


class RestartWithTheCurrentBackendDown(SafetyTestBase):
    """Scenario 1: b2 disabled, commits on b1 only, zeoraid restarted
    while b1 is unreachable: the RAID must not serve b2's stale data."""

    def prepare(self):
        db = self.db()
        self.set_value(db, 1)
        self.cluster.raid.admin('disable', 'b2')
        self.set_value(db, 2)
        self.set_value(db, 3)
        self.close_dbs()
        self.cluster.raid.stop()
        self.cluster.backend('b1').kill()
        self.cluster.raid.start()

    def test_waits_for_the_current_backend(self):
        self.prepare()
        status = self.cluster.raid.admin('status')
        self.assertEqual(status['status'], 'waiting', status)
        self.assertIn('waiting for backend b1', status['waiting']['reason'])
        self.assertEqual(sorted(status['waiting']['needs']), ['b1'])
        code, out = manager(self.cluster, 'status')
        self.assertEqual(code, 2, out)
        self.assertIn('WAITING', out)
        self.assertIn('waiting for backend b1', out)
        self.assertEqual(len(out.splitlines()), 1, out)
        # A new client is registered and gets the RAID's refusal, never
        # the stale value.
        storage = self.cluster.client_storage(wait_timeout=10)
        self.addCleanup(storage.close)
        with self.assertRaises(ZODB.POSException.StorageError) as caught:
            storage.load(ZODB.utils.z64)
        self.assertIn('waiting for backend b1', str(caught.exception))
        storage.close()
        # b1 comes back: the RAID serves again, from b1, with v=3.
        self.cluster.backend('b1').restart()
        wait_until(lambda: self.cluster.raid.admin('status')['status']
                   != 'waiting', 30, 'the RAID to serve again')
        self.assertEqual(self.details('b1')['state'], 'optimal')
        self.assertEqual(self.details('b2')['state'], 'degraded')
        db = self.db()
        self.assertEqual(self.value(db), 3)
        self.set_value(db, 4)
        self.assertEqual(self.recover('b2')['state'], 'optimal')
        self.assertEqual(self.value(db), 4)
        self.assert_replicas_identical(['b1', 'b2'])

    def test_force_serves_the_stale_backend_and_b1_is_never_readmitted(self):
        self.prepare()
        code, out = manager(self.cluster, 'force', 'b2')
        self.assertEqual(code, 0, out)
        self.assertIn('forced', out)
        self.assertIn('operator forced backend b2',
                      self.cluster.raid.log())
        status = self.cluster.raid.admin('status')
        self.assertNotEqual(status['status'], 'waiting', status)
        db = self.db()
        self.assertEqual(self.value(db), 1)     # the operator's choice
        self.set_value(db, 10)
        # The lost backend turns up again: it has v=2, v=3 that the forced
        # history does not: it is never made optimal by a recovery.
        self.cluster.backend('b1').restart()
        time.sleep(2)
        self.assertNotEqual(self.details('b1')['state'], 'optimal')
        details = self.recover('b1')
        self.assertEqual(details['state'], 'degraded', details)
        self.assertIn('full rebuild', details['reason'])
        self.assertEqual(self.value(db), 10)


class BackendRolledBackUnderARunningRAID(SafetyTestBase):
    """Scenario 2: a backend's server is restarted on an older copy of
    its file while zeoraid runs."""

    def test_rolled_back_backend_is_degraded_not_served(self):
        db = self.db()
        self.set_value(db, 1)
        b2 = self.cluster.backend('b2')
        path = b2.server.path
        b2.server.stop()
        backup = path + '.backup'
        shutil.copyfile(path, backup)
        b2.restart()
        # The same file again: the reconnect check finds it current.
        wait_until(lambda: 'backend=b2 history checked after the reconnect'
                   in self.cluster.raid.log(), 20, 'the reconnect check')
        self.wait_state('b2', 'optimal')
        self.set_value(db, 2)
        self.set_value(db, 3)
        b2.server.stop()
        for suffix in ('.index', '.tmp', '.lock'):
            if os.path.exists(path + suffix):
                os.remove(path + suffix)
        shutil.copyfile(backup, path)          # restored from the backup
        b2.restart()
        self.wait_state('b2', 'degraded')
        reason = self.details('b2')['reason']
        self.assertTrue('missing transactions' in reason
                        or 'reconnected' in reason, reason)
        self.set_value(db, 4)
        self.assertEqual(self.value(db), 4)
        # Failover away from b1: the RAID must not serve b2's v=1.
        self.cluster.backend('b1').kill()
        fresh = self.db()
        try:
            value = self.value(fresh)
        except ZODB.POSException.StorageError:
            value = 'refused'
        self.assertIn(value, ('refused', 4))
        self.cluster.backend('b1').restart()


class RecoveryRefusesAForeignCommit(SafetyTestBase):
    """Scenario 3: a transaction committed behind the RAID's back on a
    degraded backend, all of whose objects have newer revisions on the
    source, is not history a pack removed: refused."""

    def test_foreign_commit_is_refused(self):
        db = self.db()
        self.set_value(db, 1)
        self.cluster.raid.admin('disable', 'b2')
        # Behind the RAID's back, straight to b2's server.
        b2 = self.cluster.backend('b2')
        direct = ZODB.DB(b2.server.client())
        try:
            with direct.transaction() as conn:
                conn.root()['v'] = 'foreign'
        finally:
            direct.close()
        self.set_value(db, 2)        # every object of it is newer on b1
        details = self.recover('b2')
        self.assertEqual(details['state'], 'degraded', details)
        self.assertIn('DivergedError', details['reason'])
        self.assertIn('full rebuild', details['reason'])
        self.assertEqual(self.value(db), 2)
