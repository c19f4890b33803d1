"""ZODB's conformance suites against RAIDStorage over real ZEO backends.

The backends are ClientStorages connected to real ``runzeo`` processes on
loopback (tests/zeo_backends.py), each serving a FileStorage in the test's
temp dir.  Every test gets empty databases: its backend servers are
started in setUp and stopped in tearDown (measured: under 0.1 s to start
two servers, forked by tests/zeo_backends.py's zygote, and 0.01 s to
stop them; cheaper and simpler than sharing servers between tests and
emptying their databases).

What cannot apply over ClientStorage backends, and why, is listed in
doc/CONFORMANCE.md (notably ``pack(gc=False)``: ClientStorage.pack has no
``gc`` keyword, and blob recovery: ZEO has no ``restoreBlob``).
"""
import os
import unittest

import ZEO.ClientStorage
import ZODB.tests.testblob
from ZODB.tests import BasicStorage
from ZODB.tests import ConflictResolution
from ZODB.tests import HistoryStorage
from ZODB.tests import IteratorStorage
from ZODB.tests import MTStorage
from ZODB.tests import PackableStorage
from ZODB.tests import PersistentStorage
from ZODB.tests import ReadOnlyStorage
from ZODB.tests import RecoveryStorage
from ZODB.tests import RevisionStorage
from ZODB.tests import Synchronization
from ZODB.tests import TransactionalUndoStorage

from tests import zeo_backends
from tests.test_conformance import TIMEOUT
from tests.test_conformance import CheckedRAIDStorage
from tests.test_conformance import RAIDTestBase
from tests.test_conformance import _adapt_blob_transaction_for_root


class ZEOBackends:
    """RAID over ``backend_count`` runzeo servers, fresh for every test.

    ``make_raid(prefix)`` uses the server set named prefix, started on
    first use; reopening a prefix reconnects to the same servers.
    """

    backend_blobs = False

    def backend_openers(self, prefix, read_only=False):
        servers = self._server_sets.get(prefix)
        if servers is None:
            servers = zeo_backends.start_backends(
                os.path.abspath('servers-' + prefix), self.backend_count,
                blob_dir=self.backend_blobs)
            self._server_sets[prefix] = servers
            self.addCleanup(zeo_backends.stop_all, servers)
        return [('b%d' % i, server.opener(read_only=read_only))
                for i, server in enumerate(servers, 1)]

    def setUp(self):
        self._server_sets = {}
        RAIDTestBase.setUp(self)

    def unwind_failed_setup(self):
        for servers in self._server_sets.values():
            zeo_backends.stop_all(servers)
        RAIDTestBase.unwind_failed_setup(self)

    def tearDown(self):
        try:
            if self._front_server is not None:
                self._front_server.close()
            # Checks the invariant while the backend servers still run.
            self._storage.close()
        finally:
            for servers in self._server_sets.values():
                zeo_backends.stop_all(servers)
            RAIDTestBase.tearDown(self)


class RAIDOverZEOTests(
        ZEOBackends,
        RAIDTestBase,
        BasicStorage.BasicStorage,
        TransactionalUndoStorage.TransactionalUndoStorage,
        RevisionStorage.RevisionStorage,
        PackableStorage.PackableStorage,
        PackableStorage.PackableUndoStorage,
        Synchronization.SynchronizedStorage,
        ConflictResolution.ConflictResolvingStorage,
        ConflictResolution.ConflictResolvingTransUndoStorage,
        HistoryStorage.HistoryStorage,
        IteratorStorage.IteratorStorage,
        IteratorStorage.ExtendedIteratorStorage,
        PersistentStorage.PersistentStorage,
        MTStorage.MTStorage,
        ReadOnlyStorage.ReadOnlyStorage):
    """The FileStorage conformance set, RAID over 2 ZEO backends.

    PackableStorageWithOptionalGC is left out: ``pack(gc=False)`` cannot
    reach a ClientStorage backend (doc/CONFORMANCE.md).
    """

    # ZEO's remote iterator rebuilds the extension from the dict, as for a
    # plain ClientStorage (ZEO's own suite leaves this False too).
    use_extension_bytes = False


class RAID3OverZEOTests(RAIDOverZEOTests):
    """The same, RAID over 3 ZEO backends."""

    backend_count = 3


class RAIDOverZEORecoveryTests(
        ZEOBackends,
        RAIDTestBase,
        RecoveryStorage.RecoveryStorage):
    """copyTransactionsFrom/restore between two RAIDs over ZEO backends."""

    def setUp(self):
        ZEOBackends.setUp(self)
        try:
            self._dst = self.make_raid('dest')
        except BaseException:
            self._storage.close()
            self.unwind_failed_setup()
            raise

    def tearDown(self):
        try:
            self._dst.close()
        finally:
            ZEOBackends.tearDown(self)

    def new_dest(self):
        return self.make_raid('dest')


class RAID3OverZEORecoveryTests(RAIDOverZEORecoveryTests):

    backend_count = 3


class ServerManagingRAIDStorage(CheckedRAIDStorage):
    """A RAID over its own backend servers, which stop when it closes.

    For ZODB's blob doctests, which create and close storages themselves.
    """

    def __init__(self, name, blob_dir, count, shared_blob_dir=False,
                 filestorage_options=''):
        self.servers = zeo_backends.start_backends(
            os.path.abspath(name + '-servers'), count, blob_dir=True,
            filestorage_options=filestorage_options)
        try:
            CheckedRAIDStorage.__init__(
                self, name,
                [('b%d' % i, server.opener())
                 for i, server in enumerate(self.servers, 1)],
                blob_dir=os.path.abspath(blob_dir),
                shared_blob_dir=shared_blob_dir, timeout=TIMEOUT)
        except BaseException:
            zeo_backends.stop_all(self.servers)
            raise

    def close(self):
        try:
            CheckedRAIDStorage.close(self)
        finally:
            zeo_backends.stop_all(self.servers)


class ExternalGCRAIDStorage(ServerManagingRAIDStorage):
    """For IExternalGC.test: empty the backends' ZEO caches after a pack.

    A ZEO client cache keeps revisions that a pack removed on the server,
    so the doctest's "gone after pack" checks fail for any ClientStorage.
    ZEO's own IExternalGC run applies exactly this adaptation to its
    client (ServerManagingClientStorageForIExternalGCTest.pack); here it
    is applied to each backend ClientStorage of the RAID.
    """

    def pack(self, t, referencesf, gc=None):
        ServerManagingRAIDStorage.pack(self, t, referencesf)
        for name in self.raid_backend_names():
            storage = self.raid_backend_storage(name)
            storage._cache.clear()
            ZEO.ClientStorage._check_blob_cache_size(storage.blob_dir, 0)


def blob_suites():
    suite = unittest.TestSuite()
    for count in (2, 3):
        # RecoveryBlobStorage: the RAID over ClientStorages restores
        # blobs through the direct path (ZEO has no restoreBlob).  No
        # blob_packing.txt: it inspects the storage's own blob files via
        # fshelper; ZEO's suite does not run it for ClientStorage either.
        suite.addTest(_adapt_blob_transaction_for_root(
            ZODB.tests.testblob.storage_reusable_suite(
                'RAID%dOverZEOBlob' % count,
                lambda name, blob_dir, count=count:
                ServerManagingRAIDStorage(name, blob_dir, count),
                test_blob_storage_recovery=True)))
    # The RAID publishing committed blobs in a blob dir it shares with its
    # own clients (as ZEO runs ClientStorageSharedBlobs).  blob_packing.txt
    # runs on the shared variant in test_conformance (in-process).
    suite.addTest(_adapt_blob_transaction_for_root(
        ZODB.tests.testblob.storage_reusable_suite(
            'RAID2OverZEOSharedBlob',
            lambda name, blob_dir: ServerManagingRAIDStorage(
                name, blob_dir, 2, shared_blob_dir=True))))
    # The backend servers must not gc on pack (as ZEO's own IExternalGC
    # run: ServerManagingClientStorageForIExternalGCTest).
    suite.addTest(PackableStorage.IExternalGC_suite(
        lambda: ExternalGCRAIDStorage(
            'data', 'blobs', 2, filestorage_options='pack-gc false')))
    return suite


def test_suite():
    suite = unittest.TestSuite()
    for klass in (RAIDOverZEOTests, RAID3OverZEOTests,
                  RAIDOverZEORecoveryTests, RAID3OverZEORecoveryTests):
        suite.addTest(unittest.defaultTestLoader.loadTestsFromTestCase(klass))
    suite.addTest(blob_suites())
    return suite
