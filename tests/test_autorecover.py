"""auto-recover: a degraded backend that is back is recovered by itself."""
import os
import tempfile
import time
import unittest

import transaction
import ZODB
from ZODB.FileStorage import FileStorage

from tests.faulty import FaultyStorage
from tests.invariants import assert_replicas_identical
from tests.polling import poll
from zeoraid.recovery import AutoRecover
from zeoraid.storage import RAIDStorage

DEADLINE = 30


def wait_until(condition, seconds=DEADLINE):
    return poll(condition, seconds, 0.05)


class AutoRecoverTests(unittest.TestCase):

    def setUp(self):
        self.directory = tempfile.mkdtemp(prefix='zeoraid-auto-')
        self.faulty = {}

    def opener(self, name):
        def open_():
            fs = FaultyStorage(FileStorage(
                os.path.join(self.directory, name + '.fs')), name)
            self.faulty[name] = fs
            return fs
        return open_

    def open_raid(self, **kw):
        raid = RAIDStorage('raid', [(n, self.opener(n)) for n in ('b1', 'b2')],
                           timeout=2, **kw)
        self.addCleanup(raid.close)
        return raid

    def commit(self, db, key, value):
        with db.transaction() as conn:
            conn.root()[key] = value

    def test_backend_back_is_recovered_after_hold_down(self):
        raid = self.open_raid(auto_recover=True, auto_recover_hold_down=0.5)
        db = ZODB.DB(raid)
        self.commit(db, 'a', 1)
        # b2 fails for a while: degraded, commits go on without it.
        self.faulty['b2'].fail('tpc_vote')
        self.commit(db, 'a', 2)
        self.assertEqual(raid.raid_details()['b2']['state'], 'degraded')
        self.faulty['b2'].fail('lastTransaction')   # still unreachable
        self.commit(db, 'a', 3)
        time.sleep(1.0)
        self.assertEqual(raid.raid_details()['b2']['state'], 'degraded')
        # It comes back: after the hold-down it is recovered.
        self.faulty['b2'].clear()
        self.assertTrue(wait_until(lambda: raid.raid_status() == 'optimal'),
                        raid.raid_details())
        self.commit(db, 'a', 4)
        assert_replicas_identical(raid)
        transaction.abort()

    def test_operator_disabled_backend_is_left_alone(self):
        raid = self.open_raid(auto_recover=True, auto_recover_hold_down=0.2)
        db = ZODB.DB(raid)
        self.commit(db, 'a', 1)
        raid.raid_disable('b2')
        time.sleep(1.0)
        self.assertEqual(raid.raid_details()['b2']['state'], 'degraded')
        self.assertIsNone(raid.raid_recovery())

    def test_flapping_backend_is_left_degraded_and_says_so(self):
        raid = self.open_raid()
        now = [1000.0]
        auto = AutoRecover(raid, hold_down=10, max_flaps=3,
                           flap_window=3600, clock=lambda: now[0])
        backend = raid._backend('b2')
        backend.failures.extend([now[0] - 30, now[0] - 20, now[0] - 10])
        backend.set_state('degraded', 'tpc_vote: boom')
        auto.check()
        self.assertIn('flapping', raid.raid_details()['b2']['reason'])
        # ... and stays so: no recovery, however long it is reachable.
        now[0] += 100
        auto.check()
        self.assertIsNone(raid.raid_recovery())
        # Old failures age out of the window: a fresh degrade is recovered
        # after the hold-down, measured with the injected clock.
        backend.failures.clear()
        backend.set_state('degraded', 'tpc_vote: boom')
        auto.check()                   # reachable now: hold-down starts
        self.assertIsNone(raid.raid_recovery())
        now[0] += 11
        auto.check()
        recovery = raid.raid_recovery()
        self.assertIsNotNone(recovery)
        self.assertTrue(recovery.done.wait(DEADLINE))
        self.assertEqual(raid.raid_status(), 'optimal')


def test_suite():
    return unittest.defaultTestLoader.loadTestsFromName(__name__)
