"""zeoraid.served.MemoryCommitLog against ZEO's own CommitLog.

The zeoraid server keeps a client's stores until its vote in memory
(RAIDZEOStorage.tpc_begin); ZEO's served test suites (test_served) run
through it. Here: the same calls give the same entries, in order, as
ZEO's file-backed log, below and past the memory limit.
"""
import unittest

import ZEO.StorageServer
from ZODB.utils import p64

from zeoraid import served


def _fill(log, count, size):
    for i in range(count):
        log.store(p64(i), p64(1), b'x' * size)
        log.checkread(p64(i + 1000), p64(2))
    log.delete(p64(7), p64(3))
    log.restore(p64(8), p64(4), b'restored', None)
    log.undo(b'some-transaction-id')


class MemoryCommitLogTests(unittest.TestCase):

    def entries(self, log):
        return [(op, tuple(args)) for op, args in log]

    def test_same_entries_as_zeo_in_memory(self):
        ours = served.MemoryCommitLog()
        zeo = ZEO.StorageServer.CommitLog()
        self.addCleanup(zeo.close)
        for log in (ours, zeo):
            _fill(log, 10, 100)
        self.assertIsNone(ours.spilled)
        self.assertEqual(ours.stores, zeo.stores)
        self.assertEqual(self.entries(ours), self.entries(zeo))
        # The vote iterates once; a second pass sees the same.
        self.assertEqual(self.entries(ours), self.entries(zeo))
        self.assertGreater(ours.size(), 1000)

    def test_past_the_limit_it_goes_on_in_a_file(self):
        ours = served.MemoryCommitLog(limit=5000)
        zeo = ZEO.StorageServer.CommitLog()
        self.addCleanup(zeo.close)
        for log in (ours, zeo):
            _fill(log, 20, 1000)
        self.assertIsInstance(ours.spilled, ZEO.StorageServer.CommitLog)
        self.assertEqual(ours.entries, [])
        self.assertEqual(ours.stores, zeo.stores)
        self.assertEqual(self.entries(ours), self.entries(zeo))
        self.assertEqual(ours.size(), ours.spilled.size())
        spilled = ours.spilled
        ours.close()
        self.assertIsNone(ours.spilled)
        self.assertIsNone(spilled.file)

    def test_the_server_handler_uses_it(self):
        handler = served.RAIDZEOStorage.__new__(served.RAIDZEOStorage)
        handler.read_only = False
        handler.transaction = None
        handler.stats = ZEO.StorageServer.StorageStats()
        handler.tpc_begin(1, 'user', 'description', {})
        self.assertIsInstance(handler.txnlog, served.MemoryCommitLog)
        self.assertEqual(handler.transaction.id, 1)
        self.assertEqual(handler.stats.active_txns, 1)
        # A second tpc_begin of another transaction is refused, as ZEO
        # does.
        with self.assertRaises(
                ZEO.StorageServer.StorageTransactionError):
            handler.tpc_begin(2, 'user', 'description', {})


def test_suite():
    return unittest.defaultTestLoader.loadTestsFromName(__name__)
