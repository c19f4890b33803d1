"""The direct commit path into ZEO backends (zeoraid.direct).

Real runzeo backend processes; the RAIDStorage runs in-process. What is
checked: ZEO backends commit without their commit worker (the point of
the direct path), a transaction's records reach the client cache of one
backend only, large transactions are streamed before the vote, client-
side conflict resolution on the backends still works, and a transaction
record from an iterator can be committed (restore/copy).
"""
import shutil
import tempfile
import threading
import unittest

import transaction
import ZODB
import ZODB.interfaces
import ZODB.MappingStorage
import ZODB.POSException
from persistent.mapping import PersistentMapping
from BTrees.Length import Length
from ZODB.Connection import TransactionMetaData
from ZODB.utils import p64
from ZODB.utils import z64

from tests.invariants import assert_replicas_identical
from tests.zeo_backends import start_backends
from tests.zeo_backends import stop_all

from zeoraid import direct
from zeoraid.recovery import CopiedTransaction
from zeoraid.recovery import compare_transactions
from zeoraid.storage import RAIDStorage


class DirectPathTests(unittest.TestCase):

    backend_count = 2
    zeo_options = ''

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix='zeoraid-direct-')
        self.servers = start_backends(self.tmp, self.backend_count,
                                      zeo_options=self.zeo_options)
        self.raid = RAIDStorage(
            'raid', [('b%d' % (i + 1), server.opener(wait_timeout=10))
                     for i, server in enumerate(self.servers)],
            timeout=10)

    def tearDown(self):
        try:
            self.raid.close()
        finally:
            stop_all(self.servers)
            shutil.rmtree(self.tmp, ignore_errors=True)

    def commit(self, records, txn=None):
        """Commit {oid: (serial, data)} through the RAID; return the tid."""
        txn = txn or TransactionMetaData()
        self.raid.tpc_begin(txn)
        for oid, (serial, data) in records.items():
            self.raid.store(oid, serial, data, '', txn)
        self.raid.tpc_vote(txn)
        return self.raid.tpc_finish(txn)

    def count_worker_calls(self):
        calls = []
        for backend in self.raid._backends:
            original = backend.submit

            def counting(fn, *args, _original=original, **kw):
                calls.append(fn)
                return _original(fn, *args, **kw)
            backend.submit = counting
        return calls

    def test_zeo_backends_commit_without_the_worker(self):
        for backend in self.raid._backends:
            self.assertIsInstance(backend.direct, direct.DirectClient)
        oid = self.raid.new_oid()
        tid = self.commit({oid: (z64, b'first')})
        calls = self.count_worker_calls()
        tid2 = self.commit({oid: (tid, b'second')})
        self.assertEqual(calls, [])
        self.assertGreater(tid2, tid)
        for backend in self.raid._backends:
            self.assertEqual(backend.storage.load(oid)[0], b'second')
            self.assertEqual(backend.last_tid, tid2)
        assert_replicas_identical(self.raid)

    def test_only_the_first_backend_caches_new_records(self):
        oid = self.raid.new_oid()
        tid = self.commit({oid: (z64, b'cached')})
        first, second = [b.storage for b in self.raid._backends]
        self.assertEqual(first._cache.load(oid), (b'cached', tid))
        self.assertIsNone(second._cache.load(oid))
        # The other backend still answers from its server.
        self.assertEqual(second.load(oid), (b'cached', tid))

    def test_large_transaction_is_sent_before_the_vote(self):
        txn = TransactionMetaData()
        self.raid.tpc_begin(txn)
        size = 64 * 1024
        count = direct.FLUSH_BYTES // size + 4
        oids = [self.raid.new_oid() for _ in range(count)]
        for i, oid in enumerate(oids):
            self.raid.store(oid, z64, bytes([i % 256]) * size, '', txn)
        for share in self.raid._commit.shares:
            # Everything up to the last flush went to the IO thread.
            self.assertLess(len(share.direct.messages), 6)
        self.raid.tpc_vote(txn)
        tid = self.raid.tpc_finish(txn)
        for backend in self.raid._backends:
            self.assertEqual(backend.storage.load(oids[-1]),
                             (bytes([(count - 1) % 256]) * size, tid))
        assert_replicas_identical(self.raid)

    def count_transport_writes(self):
        """Wrap each backend connection's transport.write; returns
        {backend name: [data written]}."""
        writes = {}
        for backend in self.raid._backends:
            protocol = backend.storage._server.client.protocol
            transport = protocol.sm_protocol.transport
            written = writes[backend.name] = []

            def write(data, _original=transport.write, _written=written):
                _written.append(bytes(data))
                return _original(data)
            transport.write = write
            self.addCleanup(vars(transport).pop, 'write', None)
        return writes

    def test_begin_stores_and_vote_go_out_in_one_write(self):
        oids = [self.raid.new_oid() for _ in range(10)]
        txn = TransactionMetaData()
        writes = self.count_transport_writes()
        self.raid.tpc_begin(txn)
        for oid in oids:
            self.raid.store(oid, z64, b'record ' + oid, '', txn)
        self.raid.tpc_vote(txn)
        for name, written in writes.items():
            # tpc_begin, 10 storea and vote: 12 ZEO messages, one write
            # (ZEO's own writer would make 12).
            self.assertEqual(len(written), 1, name)
            frames = _frames(written[0])
            self.assertEqual(len(frames), 12, name)
        tid = self.raid.tpc_finish(txn)
        for backend in self.raid._backends:
            self.assertEqual(backend.storage.load(oids[-1]),
                             (b'record ' + oids[-1], tid))
        assert_replicas_identical(self.raid)

    def test_abort_leaves_the_backends_ready(self):
        oid = self.raid.new_oid()
        txn = TransactionMetaData()
        self.raid.tpc_begin(txn)
        self.raid.store(oid, z64, b'aborted', '', txn)
        self.raid.tpc_vote(txn)
        self.raid.tpc_abort(txn)
        for backend in self.raid._backends:
            self.assertTrue(backend.direct.can_begin())
        tid = self.commit({oid: (z64, b'kept')})
        for backend in self.raid._backends:
            self.assertEqual(backend.storage.load(oid), (b'kept', tid))

    def test_copy_transactions_from_an_iterator(self):
        # Transaction records from an iterator have no data()/set_data().
        source = ZODB.MappingStorage.MappingStorage()
        db = ZODB.DB(source)
        conn = db.open()
        conn.root()['x'] = 1
        transaction.commit()
        conn.root()['x'] = 2
        transaction.commit()
        self.raid.copyTransactionsFrom(source)
        self.assertEqual(self.raid.lastTransaction(),
                         source.lastTransaction())
        for backend in self.raid._backends:
            self.assertEqual(backend.storage.load(z64),
                             source.load(z64))
        db.close()


    def test_batch_iterator_reads_what_the_iterator_reads(self):
        oids = [self.raid.new_oid() for _ in range(3)]
        serials = dict.fromkeys(oids, z64)
        for i in range(7):
            records = {oid: (serials[oid], b'%d-%d' % (i, n) * (i + 1))
                       for n, oid in enumerate(oids[:1 + i % 3])}
            tid = self.commit(records)
            for oid in records:
                serials[oid] = tid
        storage = self.raid._backends[0].storage
        expected = [(t.tid, t.status, t.user, t.description, t.extension,
                     [(r.oid, r.tid, r.data, r.data_txn) for r in t])
                    for t in storage.iterator()]
        start = expected[1][0]
        reader = self.raid._backends[0].direct.iterate(start)
        got = []
        batches = 0
        while True:
            batch = reader.next_batch(2, 10)
            if not batch:
                break
            batches += 1
            self.assertLessEqual(len(batch), 2)
            got.extend((t.tid, t.status, t.user, t.description, t.extension,
                        [(r.oid, r.tid, r.data, r.data_txn) for r in t])
                       for t in batch)
        self.assertEqual(got, expected[1:])
        self.assertEqual(batches, (len(expected) - 1 + 1) // 2)
        # A byte limit ends a batch early; closing mid-way is clean.
        reader = self.raid._backends[0].direct.iterate(start)
        self.assertEqual(len(reader.next_batch(10, 10, max_bytes=1)), 1)
        reader.close()
        self.assertEqual(reader.next_batch(10, 10), [])


class RepliesTests(unittest.TestCase):

    def test_waiter_wakes_when_the_last_reply_is_in(self):
        replies = direct.Replies(3)
        slots = [replies.slot() for _ in range(3)]
        slots[0].set('a')
        slots[2].set(error=KeyError('x'))
        self.assertFalse(replies.wait(0.01))
        self.assertRaises(TimeoutError, slots[1].result, 0.01)
        threading.Timer(0.05, slots[1].set, args=('b',)).start()
        self.assertEqual(slots[1].result(5), 'b')
        self.assertEqual(slots[0].result(0), 'a')
        self.assertRaises(KeyError, slots[2].result, 0)
        self.assertTrue(replies.wait(0))

    def test_a_reply_counts_once(self):
        replies = direct.Replies(2)
        first, second = replies.slot(), replies.slot()
        first.set(1)
        first.set(2)            # ignored: already answered
        self.assertFalse(replies.wait(0.01))
        second.set(3)
        self.assertTrue(replies.wait(0))
        self.assertEqual((first.result(0), second.result(0)), (1, 3))

    def test_nothing_to_wait_for(self):
        self.assertTrue(direct.Replies(0).wait(0))


class NoBlobDirTests(unittest.TestCase):
    """A ZEO backend client without a blob dir, on a server with blobs."""

    def test_opens_without_blobs_and_commits(self):
        tmp = tempfile.mkdtemp(prefix='zeoraid-direct-')
        servers = start_backends(tmp, 1, blob_dir=True)
        try:
            import ZEO.ClientStorage
            raid = RAIDStorage('raid', [(
                'b1', lambda: ZEO.ClientStorage.ClientStorage(
                    servers[0].addr, wait=True, wait_timeout=10))],
                timeout=10)
            try:
                self.assertFalse(
                    ZODB.interfaces.IBlobStorage.providedBy(raid))
                txn = TransactionMetaData()
                raid.tpc_begin(txn)
                oid = raid.new_oid()
                raid.store(oid, z64, b'no blobs here', '', txn)
                raid.tpc_vote(txn)
                tid = raid.tpc_finish(txn)
                self.assertEqual(raid.load(oid), (b'no blobs here', tid))
            finally:
                raid.close()
        finally:
            stop_all(servers)
            shutil.rmtree(tmp, ignore_errors=True)


class RestoreStreamTests(unittest.TestCase):
    """Recovery's pipelined restore into a real ZEO server."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix='zeoraid-direct-')
        self.servers = start_backends(self.tmp, 1)
        self.client = self.servers[0].client()
        self.direct = direct.DirectClient.for_storage(self.client)

    def tearDown(self):
        try:
            self.client.close()
        finally:
            stop_all(self.servers)
            shutil.rmtree(self.tmp, ignore_errors=True)

    def source_transactions(self, count):
        source = ZODB.MappingStorage.MappingStorage()
        db = ZODB.DB(source)
        with db.transaction() as conn:
            conn.root()['n'] = 0
        for i in range(count):
            with db.transaction('step %d' % i) as conn:
                conn.root()['n'] = i
                conn.root()['item%d' % (i % 4)] = PersistentMapping(i=i)
        return source, [CopiedTransaction(t) for t in source.iterator()]

    def restore(self, txns):
        stream = self.direct.restore_stream()
        replies = []
        for txn in txns:
            reply = direct.Replies(1).slot()
            stream.send(txn, reply)
            replies.append(reply)
        outcomes = []
        for reply in replies:
            try:
                outcomes.append(reply.result(10))
            except TimeoutError:
                raise
            except Exception as exc:
                outcomes.append(exc)
        stream.close()
        return outcomes

    def server_last_tid(self):
        fresh = self.servers[0].client()
        try:
            return fresh.lastTransaction()
        finally:
            fresh.close()

    def test_restores_every_transaction_with_the_source_tid(self):
        source, txns = self.source_transactions(40)
        self.assertEqual(self.restore(txns), [t.tid for t in txns])
        copied = [CopiedTransaction(t) for t in self.client.iterator()]
        self.assertEqual(len(copied), len(txns))
        for ours, theirs in zip(copied, txns):
            self.assertIsNone(compare_transactions(ours, theirs))
        self.assertEqual(self.client.lastTransaction(), txns[-1].tid)
        self.assertEqual(self.server_last_tid(), txns[-1].tid)
        # The client is free for ordinary transactions again.
        txn = TransactionMetaData()
        self.client.tpc_begin(txn)
        self.client.store(p64(1000), z64, b'after', '', txn)
        self.client.tpc_vote(txn)
        self.assertGreater(self.client.tpc_finish(txn), txns[-1].tid)

    def test_nothing_is_committed_after_a_failed_transaction(self):
        _, txns = self.source_transactions(3)
        first, second, third = txns[1:4]
        # A backpointer to a transaction the server does not have: the
        # server's vote fails.
        broken = direct.ReadTransaction(
            (second.tid, second.status, second.user, second.description,
             second.extension),
            [direct.ReadRecord(p64(999), second.tid, None, p64(5))])
        outcomes = self.restore([txns[0], first, broken, third])
        self.assertEqual(outcomes[:2], [txns[0].tid, first.tid])
        self.assertIsInstance(outcomes[2], Exception)
        self.assertIsInstance(outcomes[3], Exception)
        self.assertIn('earlier restored transaction failed',
                      str(outcomes[3]))
        # The third was never sent: the server stops at the first.
        self.assertEqual(self.server_last_tid(), first.tid)
        self.assertEqual(self.client.lastTransaction(), first.tid)

    def test_a_second_stream_waits_for_the_first(self):
        stream = self.direct.restore_stream()
        with self.assertRaises(ZODB.POSException.StorageTransactionError):
            self.direct.restore_stream()
        stream.close()
        self.direct.restore_stream().close()


class ClientConflictResolutionTests(DirectPathTests):
    """Backends that hand conflicts back to their client for resolution."""

    zeo_options = 'client-conflict-resolution true'

    def test_conflicts_resolved_by_every_backend_client(self):
        resolved = []
        original = direct.resolve_conflicts

        def counting(storage, txn, answer):
            resolved.append(storage)
            return original(storage, txn, answer)
        direct.resolve_conflicts = counting
        self.addCleanup(setattr, direct, 'resolve_conflicts', original)
        db = ZODB.DB(self.raid)
        try:
            tm = transaction.TransactionManager()
            conn = db.open(tm)
            conn.root()['n'] = Length()
            tm.commit()
            barrier = threading.Barrier(2, timeout=10)
            errors = []

            def change(by):
                tm = transaction.TransactionManager()
                conn = db.open(tm)
                try:
                    conn.root()['n'].change(by)
                    barrier.wait()   # both read the same revision
                    tm.commit()
                except Exception as exc:  # pragma: no cover - reported
                    errors.append(exc)
                finally:
                    conn.close()
            threads = [threading.Thread(target=change, args=(by,))
                       for by in (1, 10)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(30)
            self.assertEqual(errors, [])
            conn.sync()
            self.assertEqual(conn.root()['n'](), 11)
            # Each backend's server handed the conflict back once.
            self.assertEqual(len(resolved), 2)
            self.assertTrue(all(b.optimal for b in self.raid._backends))
            assert_replicas_identical(self.raid)
            conn.close()
        finally:
            db.close()


def _frames(data):
    """ZEO's sized frames in data (4-byte big-endian length, message)."""
    frames = []
    while data:
        size = int.from_bytes(data[:4], 'big')
        frames.append(data[4:4 + size])
        data = data[4 + size:]
    return frames


class _Transport:
    def __init__(self, buffered):
        self.buffered = buffered
        self.written = []

    def get_write_buffer_size(self):
        return self.buffered

    def write(self, data):
        self.written.append(data)


class _Protocol:
    """What _send uses of ZEO's client protocol (ZEO's own encoder)."""

    def __init__(self, buffered):
        from ZEO.asyncio.marshal import encoder
        self.encode = encoder(b'Z5')
        self.sm_protocol = type('SMP', (), {})()
        self.sm_protocol.transport = _Transport(buffered)
        self.messages = []       # what went through ZEO's own writer
        self.message_id = 0

    def write_message(self, message):
        self.messages.append(message)

    def call_async(self, method, args):
        self.write_message(self.encode(0, True, method, args))

    def call_sync(self, method, args):
        self.message_id += 1
        self.write_message(self.encode(self.message_id, False, method,
                                       args))
        return 'answer-future'


class SendTests(unittest.TestCase):
    """direct._send: one write, or ZEO's writer when the transport is
    behind."""

    messages = [('tpc_begin', (1, 'u', 'd', {}, None, ' ')),
                ('storea', (p64(1), z64, b'data', 1))]

    def decoded(self, frames):
        from ZEO.asyncio.marshal import pickle_decode
        return [pickle_decode(frame)[2] for frame in frames]

    def test_one_write_in_order(self):
        protocol = _Protocol(buffered=0)
        client = type('Client', (), {'protocol': protocol})()
        answer = direct._send(client, self.messages, ('vote', (1,)))
        self.assertEqual(answer, 'answer-future')
        self.assertEqual(protocol.messages, [])
        written = protocol.sm_protocol.transport.written
        self.assertEqual(len(written), 1)
        self.assertEqual(self.decoded(_frames(written[0])),
                         ['tpc_begin', 'storea', 'vote'])
        # ZEO's writer is back in place.
        self.assertEqual(protocol.write_message.__name__, 'write_message')

    def test_transport_behind_uses_zeos_writer(self):
        protocol = _Protocol(buffered=1)
        client = type('Client', (), {'protocol': protocol})()
        direct._send(client, self.messages, ('vote', (1,)))
        self.assertEqual(protocol.sm_protocol.transport.written, [])
        self.assertEqual(self.decoded(protocol.messages),
                         ['tpc_begin', 'storea', 'vote'])


class MemoryBufferTests(unittest.TestCase):

    def test_records_in_order_with_resolution(self):
        buf = direct.MemoryBuffer(0)
        buf.store(p64(1), b'a')
        buf.store(p64(2), b'b')
        buf.resolve(p64(1), b'a2')
        buf.server_resolve(p64(2))
        buf.server_resolve(p64(3))      # undone: not stored
        self.assertEqual(list(buf), [(p64(2), b'b', True),
                                     (p64(1), b'a2', False),
                                     (p64(3), None, True)])

    def test_without_keep_data_only_oids(self):
        buf = direct.MemoryBuffer(0, keep_data=False)
        buf.store(p64(1), b'a')
        self.assertEqual(list(buf), [(p64(1), None, False)])

    def test_data_beyond_the_cache_limit_is_dropped(self):
        buf = direct.MemoryBuffer(0)
        big = b'x' * (direct.CACHE_BYTES // 2 + 1)
        buf.store(p64(1), big)
        buf.store(p64(2), big)
        self.assertEqual([data is not None for _, data, _ in buf],
                         [True, False])


def test_suite():
    loader = unittest.defaultTestLoader
    return unittest.TestSuite([
        loader.loadTestsFromTestCase(DirectPathTests),
        loader.loadTestsFromTestCase(ClientConflictResolutionTests),
        loader.loadTestsFromTestCase(MemoryBufferTests),
        loader.loadTestsFromTestCase(SendTests),
        loader.loadTestsFromTestCase(NoBlobDirTests),
        loader.loadTestsFromTestCase(RepliesTests),
        loader.loadTestsFromTestCase(RestoreStreamTests),
    ])
