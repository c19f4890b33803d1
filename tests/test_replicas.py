"""The start-up judgement and the reconnect verdict as tables (no I/O)."""
import os
import shutil
import tempfile
import unittest

from ZODB.utils import p64

from zeoraid import replicas
from zeoraid.replicas import Observation as Obs
from zeoraid.replicas import Record

T = {n: p64(n) for n in range(1, 10)}
DOWN = Obs(False)


def up(n, has_last=True):
    return Obs(True, T[n], has_last)


class JudgeTests(unittest.TestCase):

    def judge(self, record, **observed):
        return replicas.judge(record, observed)

    def test_nothing_recorded_newest_wins(self):
        verdict = self.judge(Record(), b1=up(3), b2=up(2), b3=DOWN)
        self.assertTrue(verdict.serves)
        self.assertEqual(verdict.current, ['b1'])
        self.assertIn('missing transactions', verdict.stale['b2'])
        self.assertEqual(verdict.last_tid, T[3])

    def test_only_the_current_backend_down_waits(self):
        # Scenario 1: b2 disabled, b1 current and unreachable.
        record = Record(current=['b1'], floor=T[1], acked=T[3],
                        committing=T[3],
                        states={'b2': {'state': 'degraded',
                                       'reason': 'disabled by operator'}})
        verdict = self.judge(record, b1=DOWN, b2=up(1))
        self.assertFalse(verdict.serves)
        self.assertEqual(sorted(verdict.wait_for), ['b1'])
        self.assertIn('waiting for backend b1', verdict.refusal)
        self.assertIn('force', verdict.refusal)
        self.assertEqual(verdict.stale['b2'], 'disabled by operator '
                                              '(degraded before the restart)')

    def test_marker_allows_acked_or_committing(self):
        record = Record(current=['b1', 'b2'], acked=T[3], committing=T[4])
        verdict = self.judge(record, b1=up(4), b2=up(3))
        self.assertEqual(verdict.current, ['b1'])
        self.assertIn('missing transactions', verdict.stale['b2'])
        # C on nobody reachable: it was never acknowledged, P is current.
        verdict = self.judge(record, b1=DOWN, b2=up(3))
        self.assertEqual(verdict.current, ['b2'])
        self.assertEqual(verdict.last_tid, T[3])

    def test_rolled_back_and_forked(self):
        record = Record(current=['b1', 'b2', 'b3'], floor=T[2], acked=T[5],
                        committing=T[6])
        verdict = self.judge(record, b1=up(5), b2=up(4), b3=up(7))
        self.assertEqual(verdict.current, ['b1'])
        self.assertIn('rolled back', verdict.stale['b2'])
        self.assertIn('diverged', verdict.stale['b3'])
        # Below the file's floor: rolled back even without a marker.
        record = Record(current=['b1', 'b2'], floor=T[5])
        verdict = self.judge(record, b1=up(5), b2=up(3))
        self.assertEqual(verdict.current, ['b1'])
        self.assertIn('rolled back', verdict.stale['b2'])

    def test_every_current_backend_stale_is_refused(self):
        record = Record(current=['b1', 'b2'], acked=T[5], committing=T[5])
        verdict = self.judge(record, b1=up(3), b2=up(8))
        self.assertFalse(verdict.serves)
        self.assertEqual(verdict.wait_for, {})
        self.assertIn('no reachable backend holds', verdict.refusal)
        self.assertIn('b1: missing transactions', verdict.refusal)
        self.assertIn('b2: diverged', verdict.refusal)

    def test_unfinished_last_transaction(self):
        verdict = self.judge(Record(), b1=up(4, has_last=False), b2=up(4))
        self.assertEqual(verdict.current, ['b2'])
        self.assertIn('unfinished transaction', verdict.stale['b1'])

    def test_backend_not_in_the_file_needs_recovery(self):
        record = Record(current=['b1'], acked=T[2], committing=T[2])
        verdict = self.judge(record, b1=up(2), b9=up(2))
        self.assertEqual(verdict.current, ['b1'])
        self.assertIn('not in the state file', verdict.stale['b9'])


class ReconnectVerdictTests(unittest.TestCase):

    def test_table(self):
        v = replicas.reconnect_verdict
        self.assertIsNone(v(T[3], T[3], T[3], True))
        self.assertIn('older copy', v(T[3], T[3], T[2], True))
        self.assertIn('older copy', v(T[3], T[3], T[3], False))
        self.assertIn('diverged', v(T[3], T[3], T[4], True))
        self.assertIn('while it reconnected', v(T[3], T[5], T[3], True))


class MarkerTests(unittest.TestCase):

    def setUp(self):
        self.tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.tmp)

    def test_round_trip_and_bad_files(self):
        path = os.path.join(self.tmp, 'm')
        marker = replicas.CommitMarker(path)
        self.assertIsNone(marker.load())
        marker.write(T[1], T[2])
        marker.write(T[2], T[3])
        marker.close()
        self.assertEqual(replicas.CommitMarker(path).load(), (T[2], T[3]))
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        with open(path, 'wb') as f:
            f.write(b'short')
        self.assertIsNone(replicas.CommitMarker(path).load())

    def test_a_symlink_is_not_written_through(self):
        target = os.path.join(self.tmp, 'victim')
        with open(target, 'wb') as f:
            f.write(b'keep')
        path = os.path.join(self.tmp, 'm')
        os.symlink(target, path)
        with self.assertRaises(OSError):
            replicas.CommitMarker(path).write(T[1], T[2])
        with open(target, 'rb') as f:
            self.assertEqual(f.read(), b'keep')


class DurableRecordTests(unittest.TestCase):
    """An acknowledged commit never rests on a record that says otherwise."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.tmp)

    def open_raid(self):
        from ZODB.FileStorage import FileStorage
        from zeoraid.storage import RAIDStorage
        openers = [(n, lambda n=n: FileStorage(
            os.path.join(self.tmp, n + '.fs'))) for n in ('b1', 'b2')]
        return RAIDStorage('r', openers, timeout=10,
                           state_file=os.path.join(self.tmp, 'r.state'))

    def test_unwritable_marker_refuses_the_commit(self):
        import transaction
        import ZODB
        from zeoraid.errors import RAIDError
        ZODB.DB(self.open_raid()).close()      # creates the root
        marker = os.path.join(self.tmp, 'r.state.commit')
        os.remove(marker)
        os.mkdir(marker)
        raid = self.open_raid()
        db = ZODB.DB(raid)
        self.addCleanup(db.close)
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        conn.root()['x'] = 1
        with self.assertRaises(RAIDError) as caught:
            tm.commit()
        self.assertIn('commit marker', str(caught.exception))
        tm.abort()
        self.assertEqual(raid.raid_status(), 'optimal')
        last = raid.lastTransaction()
        for name in ('b1', 'b2'):
            storage = raid.raid_backend_storage(name)
            self.assertEqual(storage.lastTransaction(), last)
        # Writable again: commits go on.
        os.rmdir(os.path.join(self.tmp, 'r.state.commit'))
        conn.root()['x'] = 2
        tm.commit()
        conn.close()

    def test_unwritable_state_file_refuses_commits(self):
        import transaction
        import ZODB
        from zeoraid.errors import RAIDError
        raid = self.open_raid()
        db = ZODB.DB(raid)
        self.addCleanup(db.close)
        os.chmod(self.tmp, 0o500)
        self.addCleanup(os.chmod, self.tmp, 0o700)
        if os.access(self.tmp, os.W_OK):
            # root ignores permissions: make the rename fail instead.
            os.chmod(self.tmp, 0o700)
            os.remove(os.path.join(self.tmp, 'r.state'))
            os.mkdir(os.path.join(self.tmp, 'r.state'))
            os.mkdir(os.path.join(self.tmp, 'r.state', 'x'))
        raid.raid_disable('b2')          # a state change: not recorded
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        conn.root()['x'] = 1
        with self.assertRaises(RAIDError) as caught:
            tm.commit()
        self.assertIn('state file', str(caught.exception))
        tm.abort()
        shutil.rmtree(os.path.join(self.tmp, 'r.state'), True)
        os.chmod(self.tmp, 0o700)
        conn.root()['x'] = 2
        tm.commit()
        conn.close()

    def test_lag_of_an_empty_backend_is_the_history_it_lacks(self):
        import ZODB
        from ZODB.FileStorage import FileStorage
        from zeoraid.storage import RAIDStorage
        db = ZODB.DB(FileStorage(os.path.join(self.tmp, 'b1.fs')))
        for i in range(3):
            with db.transaction() as conn:
                conn.root()['x'] = i
        db.close()
        raid = self.open_raid()
        self.addCleanup(raid.close)
        details = raid.raid_details()
        self.assertEqual(details['b2']['state'], 'degraded')
        self.assertEqual(details['b2']['last_tid'], '00' * 8)
        self.assertGreaterEqual(details['b2']['lag_seconds'], 0.0)
        self.assertLess(details['b2']['lag_seconds'], 600)
        self.assertEqual(details['b1']['lag_seconds'], 0.0)
