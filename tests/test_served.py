"""ZEO's own server test suites against a ZEO server serving <raidstorage>.

Topology: app ClientStorage -> ZEO server (forked by ZEO's test forker,
config ``%import zeoraid`` ``<raidstorage 1>``) -> backend ClientStorages
-> real runzeo backend servers (tests/zeo_backends.py) -> FileStorage.
The pattern is ZEO's ``FileStorageHexTests.getConfig``: ZEO's
``GenericTestBase.setUp`` starts the front server from ``getConfig()``,
which here first starts the backend servers in the test's temp dir.
Backend servers are started per test and stopped in tearDown.

After each test the RAID invariant is checked with a fresh read-only RAID
over the same backend servers: it must open with every backend optimal
(a backend missing a transaction starts degraded) and all backends must
hold identical transactions.

ZEO's test classes use both the ``check`` and ``test`` method prefixes;
both are loaded, as ZEO's own test_suite() does.  What cannot apply is
listed in doc/CONFORMANCE.md.
"""
import logging
import multiprocessing
import os
import sys
import unittest

import ZEO.StorageServer
import ZEO.tests.testZEO as testZEO
import ZODB.tests.util

from tests import zeo_backends
from tests.test_conformance import TIMEOUT
from tests.test_conformance import CheckedRAIDStorage

from zeoraid import served


# ZEO's forker logs why a front server failed to start ("In server
# thread") and then only reports "SERVER FAILED TO START": make the reason
# visible in the test output.
_forker_errors = logging.StreamHandler(sys.stderr)
_forker_errors.setLevel(logging.ERROR)
logging.getLogger('ZEO.tests.forker').addHandler(_forker_errors)


def _raid_client_handler(server):
    """StorageServer.create_client_handler as zeoraid.served installs it."""
    if getattr(server, 'raid_loads', None) is None:
        server.raid_loads = served.Loads()
    return served.RAIDZEOStorage(server, server.read_only)


class ServedRAID:
    """Serve ``<raidstorage 1>`` over ``backend_count`` ZEO backends."""

    backend_count = 2
    raid_blobs = False          # RAID and backends with blob dirs
    raid_shared_blob_dir = False

    _raid_backends = ()

    def raid_blob_dir(self):
        # ZEO's blob tests share 'blobs' with the client when
        # shared_blob_dir is set (BlobWritableCacheTests).
        return os.path.abspath('blobs' if self.raid_shared_blob_dir
                               else 'raid-blobs')

    def getConfig(self):
        # Called by GenericTestBase.setUp, in the test's temp dir.
        self._raid_backends = zeo_backends.start_backends(
            os.path.abspath('backends'), self.backend_count,
            blob_dir=self.raid_blobs)
        self.addCleanup(zeo_backends.stop_all, self._raid_backends)
        lines = ['%import zeoraid', '<raidstorage 1>',
                 '  timeout %ds' % TIMEOUT]
        if self.raid_blobs:
            lines.append('  blob-dir %s' % self.raid_blob_dir())
            if self.raid_shared_blob_dir:
                lines.append('  shared-blob-dir on')
        for i, server in enumerate(self._raid_backends, 1):
            cache = (os.path.abspath('raid-cache-b%d' % i)
                     if self.raid_blobs else None)
            lines.append(server.zconfig_section(
                'b%d' % i, blob_cache=cache, extra='blob-cache-size 100MB'
                if self.raid_blobs else ''))
        lines.append('</raidstorage>')
        return '\n'.join(lines) + '\n'

    def setUp(self):
        # Serve the RAID the way the zeoraid server does: loads that miss
        # the backend caches answered off the event loop (served.py). The
        # forker forks the server process, which inherits this.
        self.assertEqual(multiprocessing.get_start_method(), 'fork')
        original = ZEO.StorageServer.StorageServer.create_client_handler
        ZEO.StorageServer.StorageServer.create_client_handler = \
            _raid_client_handler
        self.addCleanup(setattr, ZEO.StorageServer.StorageServer,
                        'create_client_handler', original)
        try:
            testZEO.GenericTestBase.setUp(self)
        except BaseException:
            # tearDown does not run when setUp fails: leave the temp dir.
            zeo_backends.stop_all(self._raid_backends)
            ZODB.tests.util.tearDown(self)
            raise

    def verify_backends(self):
        """The RAID invariant, checked on the backends the server used."""
        openers = [('b%d' % i, server.opener(read_only=True))
                   for i, server in enumerate(self._raid_backends, 1)]
        kw = {}
        if self.raid_blobs:
            kw['blob_dir'] = os.path.abspath('check-blobs')
        raid = CheckedRAIDStorage('check', openers, read_only=True,
                                  timeout=TIMEOUT, **kw)
        raid.close()   # checks: all optimal, replicas identical

    def tearDown(self):
        try:
            try:
                self._storage.close()
                servers, self._servers = self._servers, []
                for stop in servers:
                    stop()
                if self._raid_backends:
                    self.verify_backends()
            finally:
                zeo_backends.stop_all(self._raid_backends)
        finally:
            testZEO.GenericTestBase.tearDown(self)


class RAIDServedBlobTests(ServedRAID, testZEO.FullGenericTests,
                          testZEO.CommonBlobTests):
    """FullGenericTests + CommonBlobTests, RAID and backends with blobs.

    The shape of ZEO's BlobAdaptedFileStorageTests, without its
    checkStoreAndLoadBlob, which inspects the served storage's own blob
    directory (the RAID's committed blobs live in its backends).  A RAID
    without blobs is not served separately: FullGenericTests does not use
    blobs, so it would run the same paths again (about 2 s per test);
    RAID-over-ZEO without blobs is covered by test_conformance_zeo.
    """

    raid_blobs = True


class RAIDServedSharedBlobTests(ServedRAID, testZEO.GenericTestBase,
                                testZEO.CommonBlobTests):
    """CommonBlobTests with a blob dir shared by the RAID and its clients.

    ZEO's BlobWritableCacheTests is FullGenericTests + CommonBlobTests with
    a shared blob dir; the FullGenericTests part does not depend on the
    blob dir mode and runs in RAIDServedBlobTests, so only the blob checks
    run here.  Needs RAIDStorage.fshelper (ZEO's storeBlobShared).
    """

    raid_blobs = True
    raid_shared_blob_dir = True
    blob_cache_dir = 'blobs'
    shared_blob_dir = True


def add_tests(suite, case):
    """Both method prefixes, as ZEO's own test_suite() does."""
    for prefix in ('check', 'test'):
        loader = unittest.TestLoader()
        loader.testMethodPrefix = prefix
        suite.addTest(loader.loadTestsFromTestCase(case))


def test_suite():
    suite = unittest.TestSuite()
    for klass in (RAIDServedBlobTests, RAIDServedSharedBlobTests):
        add_tests(suite, klass)
    return suite
