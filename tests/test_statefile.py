"""Backend states kept across restarts (`<raidstorage>` state-file).

A backend that was degraded (an operator disabled it, it diverged, its
commit outcome was unknown) must not come back optimal after a restart
just because its last tid is current; only a recovery makes it optimal.
In-process FileStorage backends, and real runzeo backends for the part
where closing ZEO connections must not count as a judgement.
"""
import json
import logging
import os
import shutil
import tempfile
import unittest

import transaction
import ZODB
import ZODB.config
import ZConfig
from ZODB.FileStorage import FileStorage

from tests.test_recovery import wait_recovery
from tests.zeo_backends import start_backends
from tests.zeo_backends import stop_all

from zeoraid.storage import RAIDStorage


class LogCapture(logging.Handler):

    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record)

    def messages(self, level):
        return [r.getMessage() for r in self.records if r.levelno == level]


class StateFileTests(unittest.TestCase):

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix='zeoraid-state-')
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.state = os.path.join(self.tmp, 'raid.state')
        self.log = LogCapture()
        logging.getLogger('zeoraid').addHandler(self.log)
        self.addCleanup(logging.getLogger('zeoraid').removeHandler,
                        self.log)

    def open_raid(self, state_file=True, names=('b1', 'b2')):
        openers = [(name, lambda name=name: FileStorage(
            os.path.join(self.tmp, name + '.fs'))) for name in names]
        raid = RAIDStorage('raid', openers, timeout=10,
                           state_file=self.state if state_file else None)
        self.addCleanup(raid.close)
        return raid

    def commit(self, raid, key, value):
        """A commit through a DB that is not closed (it would close the
        RAID)."""
        dbs = getattr(self, 'dbs', {})
        self.dbs = dbs
        if id(raid) not in dbs:
            dbs[id(raid)] = ZODB.DB(raid)
        with dbs[id(raid)].transaction() as conn:
            conn.root()[key] = value

    def recorded(self):
        with open(self.state) as f:
            return json.load(f)['backends']

    def states(self, raid):
        return {name: info['state']
                for name, info in raid.raid_details().items()}

    def test_disabled_backend_stays_degraded_across_a_restart(self):
        raid = self.open_raid()
        self.commit(raid, 'a', 1)
        self.assertEqual(self.recorded()['b2']['state'], 'optimal')
        raid.raid_disable('b2')
        self.assertEqual(self.recorded()['b2'],
                         dict(self.recorded()['b2'], state='degraded',
                              reason='disabled by operator'))
        raid.close()
        # Nothing was committed since: b2 is as current as b1.
        self.assertEqual(self.recorded()['b1']['state'], 'optimal')
        raid = self.open_raid()
        info = raid.raid_details()['b2']
        self.assertEqual(info['state'], 'degraded')
        self.assertEqual(info['reason'], 'disabled by operator '
                                         '(degraded before the restart)')
        self.assertEqual(raid.raid_status(), 'degraded')
        raid.close()
        # Without a state file only the last tids count (the old rule).
        self.assertEqual(self.states(self.open_raid(state_file=False)),
                         {'b1': 'optimal', 'b2': 'optimal'})

    def test_auto_recover_still_leaves_an_operators_disable_alone(self):
        raid = self.open_raid()
        raid.raid_disable('b2')
        raid.close()
        openers = [(name, lambda name=name: FileStorage(
            os.path.join(self.tmp, name + '.fs'))) for name in ('b1', 'b2')]
        raid = RAIDStorage('raid', openers, timeout=10,
                           state_file=self.state, auto_recover=True,
                           auto_recover_hold_down=0)
        self.addCleanup(raid.close)
        raid._auto_recover.stop()
        for _ in range(3):
            raid._auto_recover.check()
        self.assertIsNone(raid.raid_recovery())
        self.assertEqual(self.states(raid)['b2'], 'degraded')

    def test_a_recovery_makes_it_optimal_for_good(self):
        raid = self.open_raid()
        self.commit(raid, 'a', 1)
        raid.raid_disable('b2')
        self.commit(raid, 'b', 2)
        raid.close()
        raid = self.open_raid()
        self.assertEqual(self.states(raid)['b2'], 'degraded')
        raid.raid_recover('b2')
        wait_recovery(self, raid)
        self.assertEqual(self.states(raid), {'b1': 'optimal',
                                             'b2': 'optimal'})
        self.assertEqual(self.recorded()['b2']['state'], 'optimal')
        raid.close()
        self.assertEqual(self.states(self.open_raid()),
                         {'b1': 'optimal', 'b2': 'optimal'})

    def write_state(self, backends):
        with open(self.state, 'w') as f:
            json.dump({'raid': 'raid', 'backends': backends}, f)

    def test_recovering_at_the_restart_starts_degraded(self):
        self.open_raid(state_file=False).close()
        self.write_state({'b1': {'state': 'optimal'},
                          'b2': {'state': 'recovering',
                                 'reason': 'recovery from b1'}})
        info = self.open_raid().raid_details()['b2']
        self.assertEqual(info['state'], 'degraded')
        self.assertEqual(info['reason'], 'recovery from b1 '
                                         '(recovering before the restart)')

    def test_every_backend_recorded_degraded_is_not_followed(self):
        self.open_raid(state_file=False).close()
        self.write_state({'b1': {'state': 'degraded', 'reason': 'x'},
                          'b2': {'state': 'degraded', 'reason': 'y'}})
        raid = self.open_raid()
        self.assertEqual(self.states(raid), {'b1': 'optimal',
                                             'b2': 'optimal'})
        self.assertTrue(any('every working backend degraded' in m
                            for m in self.log.messages(logging.WARNING)))
        # The file now says what the RAID decided.
        self.assertEqual(self.recorded()['b1']['state'], 'optimal')

    def test_an_unusable_file_is_reported_and_ignored(self):
        self.open_raid(state_file=False).close()
        for content in ('not json', '{"backends": ["b1"]}', '{}'):
            with open(self.state, 'w') as f:
                f.write(content)
            raid = self.open_raid()
            self.assertEqual(raid.raid_status(), 'optimal')
            raid.close()
            critical = self.log.messages(logging.CRITICAL)
            self.assertTrue(critical and 'cannot be used' in critical[-1]
                            and self.state in critical[-1], critical)
            self.log.records = []

    def test_backends_that_are_gone_are_dropped_from_the_file(self):
        raid = self.open_raid(names=('b1', 'b2', 'b3'))
        raid.raid_disable('b3')
        raid.close()
        raid = self.open_raid(names=('b1', 'b2'))
        self.assertEqual(self.states(raid), {'b1': 'optimal',
                                             'b2': 'optimal'})
        self.assertEqual(sorted(self.recorded()), ['b1', 'b2'])
        self.assertEqual([n for n in os.listdir(self.tmp)
                          if n.startswith('raid.state.')
                          and n != 'raid.state.commit'], [])

    def test_config_key(self):
        for name in ('b1', 'b2'):
            FileStorage(os.path.join(self.tmp, name + '.fs')).close()

        def config(state_file):
            return ('%%import zeoraid\n<raidstorage r>\n'
                    '  state-file %s\n'
                    '  <filestorage b1>\n    path %s/b1.fs\n'
                    '  </filestorage>\n'
                    '  <filestorage b2>\n    path %s/b2.fs\n'
                    '  </filestorage>\n</raidstorage>\n'
                    % (state_file, self.tmp, self.tmp))
        raid = ZODB.config.storageFromString(config(self.state))
        raid.raid_disable('b2')
        raid.close()
        raid = ZODB.config.storageFromString(config(self.state))
        self.assertEqual(raid.raid_details()['b2']['state'], 'degraded')
        raid.close()
        missing = os.path.join(self.tmp, 'no-such-dir', 'raid.state')
        with self.assertRaises(ZConfig.ConfigurationError) as caught:
            ZODB.config.storageFromString(config(missing))
        self.assertIn('no-such-dir', str(caught.exception))


class ZEOStateFileTests(unittest.TestCase):
    """Closing the ZEO backend connections is not a judgement."""

    def test_closing_does_not_degrade_in_the_file(self):
        tmp = tempfile.mkdtemp(prefix='zeoraid-state-zeo-')
        self.addCleanup(shutil.rmtree, tmp, True)
        servers = start_backends(tmp, 2)
        self.addCleanup(stop_all, servers)
        state = os.path.join(tmp, 'raid.state')

        def open_raid():
            return RAIDStorage(
                'raid', [('b%d' % i, s.opener()) for i, s in
                         enumerate(servers, 1)], timeout=10,
                state_file=state)
        raid = open_raid()
        db = ZODB.DB(raid)
        with db.transaction() as conn:
            conn.root()['a'] = 1
        raid.raid_disable('b2')
        db.close()
        with open(state) as f:
            recorded = json.load(f)['backends']
        self.assertEqual(recorded['b1']['state'], 'optimal')
        self.assertEqual(recorded['b2']['state'], 'degraded')
        raid = open_raid()
        try:
            self.assertEqual(raid.raid_details()['b1']['state'], 'optimal')
            self.assertEqual(raid.raid_details()['b2']['state'], 'degraded')
        finally:
            raid.close()
        transaction.abort()
