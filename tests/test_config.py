"""ZConfig: ``%import zeoraid`` and ``<raidstorage>``.

A configuration is the operator's interface: valid ones must open a
working RAID (as a storage and inside a client's ``<zodb>``), invalid
ones must fail with a message that names the problem.
"""
import io
import os
import re
import shutil
import tempfile
import unittest

import transaction
import ZConfig
import ZODB.blob
import ZODB.config
import ZODB.interfaces
import ZODB.POSException
from ZODB.Connection import TransactionMetaData

from tests.invariants import assert_replicas_identical
from tests.invariants import committed_tids

from zeoraid.errors import RAIDError
from zeoraid.storage import RAIDStorage

CONFIG_ERRORS = (ZConfig.ConfigurationError, RAIDError, ValueError)


class ConfigTestBase(unittest.TestCase):

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix='zeoraid-config-')
        self.opened = []

    def tearDown(self):
        transaction.abort()
        for thing in self.opened:
            try:
                thing.close()
            except Exception:
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)

    def path(self, name):
        return os.path.join(self.tmp, name)

    def filestorage(self, name, blobs=False):
        lines = ['<filestorage %s>' % name,
                 '  path %s' % self.path(name + '.fs')]
        if blobs:
            lines.append('  blob-dir %s' % self.path(name + '-blobs'))
        lines.append('</filestorage>')
        return '\n'.join(lines)

    def raid_config(self, body, name='r', keys='timeout 2s'):
        return ('%%import zeoraid\n<raidstorage %s>\n  %s\n%s\n'
                '</raidstorage>\n' % (name, keys, body))

    def open_storage(self, text):
        storage = ZODB.config.storageFromString(text)
        self.opened.append(storage)
        return storage

    def assert_config_error(self, text, *patterns):
        """Opening `text` fails with a message matching every pattern."""
        with self.assertRaises(CONFIG_ERRORS) as cm:
            self.open_storage(text)
        message = str(cm.exception)
        for pattern in patterns:
            self.assertTrue(re.search(pattern, message, re.I),
                            'error message %r does not match %r'
                            % (message, pattern))
        return message


class ConfigTests(ConfigTestBase):

    # -- valid configurations ------------------------------------------------

    def test_filestorage_backends(self):
        raid = self.open_storage(self.raid_config(
            self.filestorage('b1') + '\n' + self.filestorage('b2'),
            keys='timeout 3s\n  cluster-mode single\n  fail-mode read-only'))
        self.assertIsInstance(raid, RAIDStorage)
        self.assertEqual(raid.getName(), 'r')
        self.assertEqual(sorted(raid.raid_details()), ['b1', 'b2'])
        self.assertEqual(raid.raid_status(), 'optimal')
        self.assertEqual(raid.timeout, 3.0)
        self.assertEqual(raid.fail_mode, 'read-only')
        self.assertEqual(raid.cluster_mode, 'single')
        self.assertFalse(raid.isReadOnly())
        self.assertFalse(ZODB.interfaces.IBlobStorage.providedBy(raid))
        db = ZODB.DB(raid)
        conn = db.open()
        conn.root()['x'] = 1
        transaction.commit()
        conn.close()
        assert_replicas_identical(raid)
        self.assertEqual(len(committed_tids(raid.raid_backend_storage('b2'))),
                         2)
        db.close()

    def test_mappingstorage_backends(self):
        raid = self.open_storage(self.raid_config(
            '<mappingstorage m1>\n</mappingstorage>\n'
            '<mappingstorage m2>\n</mappingstorage>'))
        self.assertEqual(sorted(raid.raid_details()), ['m1', 'm2'])
        db = ZODB.DB(raid)
        conn = db.open()
        conn.root()['x'] = 1
        transaction.commit()
        conn.close()
        self.assertEqual(raid.raid_status(), 'optimal', raid.raid_details())
        assert_replicas_identical(raid)
        db.close()

    def test_defaults(self):
        raid = self.open_storage(
            '%%import zeoraid\n<raidstorage r>\n%s\n</raidstorage>\n'
            % self.filestorage('b1'))
        self.assertEqual(raid.timeout, 10.0)
        self.assertEqual(raid.fail_mode, 'close')
        self.assertEqual(raid.cluster_mode, 'single')
        self.assertFalse(raid.isReadOnly())

    def test_read_only(self):
        # Create the files first: a read-only FileStorage needs them.
        raid = self.open_storage(self.raid_config(
            self.filestorage('b1') + '\n' + self.filestorage('b2')))
        raid.close()
        raid = self.open_storage(self.raid_config(
            self.filestorage('b1') + '\n' + self.filestorage('b2'),
            keys='read-only on'))
        self.assertTrue(raid.isReadOnly())
        with self.assertRaises(ZODB.POSException.ReadOnlyError):
            raid.tpc_begin(TransactionMetaData())

    def test_blobs(self):
        raid = self.open_storage(self.raid_config(
            self.filestorage('b1', blobs=True) + '\n'
            + self.filestorage('b2', blobs=True),
            keys='blob-dir %s' % self.path('raid-blobs')))
        self.assertTrue(ZODB.interfaces.IBlobStorage.providedBy(raid))
        db = ZODB.DB(raid)
        conn = db.open()
        conn.root()['blob'] = ZODB.blob.Blob(b'configured')
        transaction.commit()
        conn.close()
        conn = db.open()
        with conn.root()['blob'].open() as f:
            self.assertEqual(f.read(), b'configured')
        conn.close()
        db.close()

    def test_zodb_section(self):
        text = ('%%import zeoraid\n<zodb main>\n  cache-size 100\n'
                '  <raidstorage r>\n  timeout 2s\n%s\n%s\n'
                '  </raidstorage>\n</zodb>\n'
                % (self.filestorage('b1'), self.filestorage('b2')))
        db = ZODB.config.databaseFromString(text)
        self.opened.append(db)
        self.assertIsInstance(db.storage, RAIDStorage)
        conn = db.open()
        conn.root()['answer'] = 42
        transaction.commit()
        conn.close()
        db.close()
        # Reopen: the data is on both backends.
        db = ZODB.config.databaseFromString(text)
        self.opened.append(db)
        conn = db.open()
        self.assertEqual(conn.root()['answer'], 42)
        assert_replicas_identical(db.storage)
        conn.close()
        db.close()

    # -- invalid configurations ----------------------------------------------

    def test_unknown_key(self):
        self.assert_config_error(
            self.raid_config(self.filestorage('b1'),
                             keys='bogus-setting 1'),
            'bogus-setting')

    def test_duplicate_backend_names(self):
        self.assert_config_error(
            self.raid_config(self.filestorage('b1') + '\n'
                             + self.filestorage('b1').replace(
                                 'b1.fs', 'other.fs')),
            'duplicate|re-used', 'b1')

    def test_missing_backend_name(self):
        self.assert_config_error(
            self.raid_config(
                self.filestorage('b1') + '\n<filestorage>\n  path %s\n'
                '</filestorage>' % self.path('anon.fs')),
            'name')

    def test_zero_backends(self):
        self.assert_config_error(self.raid_config(''),
                                 'backend|storage')

    def test_bad_cluster_mode(self):
        self.assert_config_error(
            self.raid_config(self.filestorage('b1'),
                             keys='cluster-mode triple'),
            'cluster-mode', 'triple')

    def test_bad_fail_mode(self):
        self.assert_config_error(
            self.raid_config(self.filestorage('b1'),
                             keys='fail-mode explode'),
            'fail-mode', 'explode')

    def test_bad_timeout(self):
        for value in ('soon', '0s', '-5s'):
            with self.subTest(timeout=value):
                self.assert_config_error(
                    self.raid_config(self.filestorage('b1'),
                                     keys='timeout %s' % value),
                    'timeout|time interval|%s' % re.escape(value))

    def test_durations_below_a_second(self):
        raid = self.open_storage(self.raid_config(
            self.filestorage('b1'),
            keys='timeout 500ms\n  pack-timeout 1.5m\n'
                 '  recovery-back-pressure-hold 20ms'))
        self.assertEqual((raid.timeout, raid.pack_timeout,
                          raid.recovery_back_pressure_hold),
                         (0.5, 90.0, 0.02))
        self.assert_config_error(
            self.raid_config(self.filestorage('b1'), keys='timeout 5 secs'),
            "'5 secs' is not a duration")

    def test_shared_blob_dir_without_blob_dir(self):
        self.assert_config_error(
            self.raid_config(self.filestorage('b1'),
                             keys='shared-blob-dir on'),
            'blob-dir')

    def test_some_backends_without_blobs(self):
        self.assert_config_error(
            self.raid_config(self.filestorage('b1', blobs=True) + '\n'
                             + self.filestorage('b2'),
                             keys='blob-dir %s' % self.path('raid-blobs')),
            'blob', 'b2')

    def test_blob_dir_but_no_backend_blobs(self):
        self.assert_config_error(
            self.raid_config(self.filestorage('b1') + '\n'
                             + self.filestorage('b2'),
                             keys='blob-dir %s' % self.path('raid-blobs')),
            'blob', 'b1')

    def test_backend_blobs_but_no_raid_blob_dir(self):
        self.assert_config_error(
            self.raid_config(self.filestorage('b1', blobs=True) + '\n'
                             + self.filestorage('b2', blobs=True)),
            'blob-dir')

    def test_failed_config_leaves_backends_closed(self):
        # A refused configuration must not keep backend files locked:
        # a corrected configuration opens the same files right away.
        self.assert_config_error(
            self.raid_config(self.filestorage('b1', blobs=True) + '\n'
                             + self.filestorage('b2'),
                             keys='blob-dir %s' % self.path('raid-blobs')),
            'blob')
        raid = self.open_storage(self.raid_config(
            self.filestorage('b1', blobs=True) + '\n'
            + self.filestorage('b2', blobs=True),
            keys='blob-dir %s' % self.path('raid-blobs')))
        self.assertEqual(raid.raid_status(), 'optimal')


class ReloadSettingsTests(ConfigTestBase):
    """raid_reload with backend lists parsed from configuration text: a
    backend kept by name whose section changed is replaced."""

    def backends_of(self, text):
        config, _ = ZConfig.loadConfigFile(ZODB.config.getStorageSchema(),
                                           io.StringIO(text))
        return config.storage.backends

    def two(self, b2='b2'):
        return self.raid_config(
            self.filestorage('b1') + '\n'
            + self.filestorage(b2).replace('<filestorage %s>' % b2,
                                           '<filestorage b2>'))

    def commit(self, db, key, value):
        with db.transaction() as conn:
            conn.root()[key] = value

    def test_settings_compare_across_parses(self):
        first = dict(self.backends_of(self.two()))
        again = dict(self.backends_of(self.two()))
        moved = dict(self.backends_of(self.two(b2='b2-moved')))
        self.assertEqual(first['b1'].settings, again['b1'].settings)
        self.assertEqual(first['b2'].settings, again['b2'].settings)
        self.assertEqual(first['b1'].settings, moved['b1'].settings)
        self.assertNotEqual(first['b2'].settings, moved['b2'].settings)

    def test_changed_backend_is_replaced_and_recovered(self):
        from tests.test_recovery import wait_recovery
        raid = self.open_storage(self.two())
        db = ZODB.DB(raid)
        self.commit(db, 'a', 1)
        # The same configuration again: nothing to do.
        diff = raid.raid_reload(self.backends_of(self.two()))
        self.assertEqual((diff['kept'], diff['changed']), (['b1', 'b2'], []))
        # b2 now points to another (empty) file.
        moved = self.backends_of(self.two(b2='b2-moved'))
        diff = raid.raid_reload(moved, dry_run=True)
        self.assertEqual((diff['kept'], diff['changed']), (['b1'], ['b2']))
        self.assertEqual(raid.raid_status(), 'optimal')
        diff = raid.raid_reload(moved)
        self.assertEqual(diff['changed'], ['b2'])
        self.assertEqual(sorted(raid.raid_details()), ['b1', 'b2'])
        info = raid.raid_details()['b2']
        self.assertEqual(info['state'], 'degraded')
        self.assertIn('settings changed by reload', info['reason'])
        self.assertEqual(raid.raid_backend_storage('b2')._file_name,
                         self.path('b2-moved.fs'))
        self.commit(db, 'b', 2)         # served by b1 meanwhile
        raid.raid_recover('b2')
        wait_recovery(self, raid)
        self.assertEqual(raid.raid_status(), 'optimal', raid.raid_details())
        assert_replicas_identical(raid)
        db.close()

    def test_no_optimal_backend_left_unchanged_is_refused(self):
        raid = self.open_storage(self.two())
        raid.raid_disable('b2')
        text = self.raid_config(
            self.filestorage('b1-moved').replace('<filestorage b1-moved>',
                                                 '<filestorage b1>')
            + '\n' + self.filestorage('b2'))
        with self.assertRaises(RAIDError) as caught:
            raid.raid_reload(self.backends_of(text))
        self.assertIn('no optimal backend would remain', str(caught.exception))
        self.assertIn('settings changed: b1', str(caught.exception))
        self.assertEqual(raid.raid_details()['b1']['state'], 'optimal')


class OnlineSettingsTests(ConfigTestBase):
    """<raidstorage> keys a reload applies to a running RAID, and the
    ones it leaves for a restart."""

    def section(self, keys):
        text = self.raid_config(self.filestorage('b1') + '\n'
                                + self.filestorage('b2'), keys=keys)
        config, _ = ZConfig.loadConfigFile(ZODB.config.getStorageSchema(),
                                           io.StringIO(text))
        return config.storage

    def test_back_pressure_hold_must_be_positive(self):
        self.assert_config_error(
            self.raid_config(self.filestorage('b1'),
                             keys='recovery-back-pressure-hold 0'),
            'recovery-back-pressure-hold must be positive')

    def test_settings_diff_sorts_online_and_restart_keys(self):
        from zeoraid.config import raid_settings
        from zeoraid.config import settings_diff
        running = raid_settings(self.section('timeout 2s'))
        self.assertEqual(settings_diff(
            running, raid_settings(self.section('timeout 2s'))), ({}, []))
        online, restart = settings_diff(running, raid_settings(self.section(
            'timeout 5s\n  recovery-txn-rate 100\n  auto-recover on\n'
            '  cluster-mode coop\n  server-id 3\n  shared-backend-io off')))
        self.assertEqual(online, {'timeout': (2, 5),
                                  'recovery_txn_rate': (0, 100),
                                  'auto_recover': (False, True)})
        self.assertEqual(restart, ['cluster_mode', 'server_id',
                                   'shared_backend_io'])

    def open_two(self, keys='timeout 2s'):
        return self.open_storage(self.raid_config(
            self.filestorage('b1') + '\n' + self.filestorage('b2'),
            keys=keys))

    def test_apply_settings(self):
        raid = self.open_two()
        raid.apply_settings({'timeout': 0.5, 'pack_timeout': 60,
                             'fail_mode': 'read-only'})
        self.assertEqual((raid.timeout, raid.pack_timeout, raid.fail_mode),
                         (0.5, 60.0, 'read-only'))
        # The next transaction runs with the new deadline.
        txn = TransactionMetaData()
        raid.tpc_begin(txn)
        self.assertEqual(raid._commit.timeout, 0.5)
        raid.tpc_abort(txn)
        # auto-recover starts and stops with the key.
        raid.apply_settings({'auto_recover': True,
                             'auto_recover_hold_down': 7})
        auto = raid._auto_recover
        self.assertTrue(auto.thread.is_alive())
        self.assertEqual(auto.hold_down, 7.0)
        raid.apply_settings({'auto_recover_max_flaps': 9})
        self.assertEqual(auto.max_flaps, 9)
        raid.apply_settings({'auto_recover': False})
        self.assertIsNone(raid._auto_recover)
        auto.thread.join(10)
        self.assertFalse(auto.thread.is_alive())
        # What cannot change online, and bad values, change nothing.
        for bad, message in (({'cluster_mode': 'coop'}, 'need a restart'),
                             ({'timeout': 0}, 'positive'),
                             ({'fail_mode': 'explode'}, 'fail-mode')):
            with self.assertRaises(RAIDError) as caught:
                raid.apply_settings(dict(bad, pack_timeout=1))
            self.assertIn(message, str(caught.exception))
        self.assertEqual((raid.timeout, raid.pack_timeout), (0.5, 60.0))

    def test_new_recovery_rate_applies_to_a_running_recovery(self):
        from tests.test_recovery import wait_copied
        from tests.test_recovery import wait_recovery
        raid = self.open_two()
        db = ZODB.DB(raid)
        self.addCleanup(db.close)
        raid.raid_disable('b2')
        for i in range(40):
            with db.transaction() as conn:
                conn.root()['k%d' % i] = i
        raid.apply_settings({'recovery_txn_rate': 2})
        raid.raid_recover('b2')
        recovery = raid.raid_recovery()
        wait_copied(self, recovery, 1)
        # At 2 transactions/s the backlog would take 20s more.
        self.assertFalse(recovery.done.wait(1))
        raid.apply_settings({'recovery_txn_rate': 0})
        wait_recovery(self, raid, timeout=10)
        self.assertEqual(raid.raid_status(), 'optimal', raid.raid_details())
        assert_replicas_identical(raid)


def test_suite():
    loader = unittest.defaultTestLoader
    return unittest.TestSuite([
        loader.loadTestsFromTestCase(ConfigTests),
        loader.loadTestsFromTestCase(ReloadSettingsTests),
        loader.loadTestsFromTestCase(OnlineSettingsTests),
    ])
