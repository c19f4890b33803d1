"""The commit path of a ZEO ClientStorage backend, without thread hops.

ClientStorage hands every call to its IO thread: tpc_begin and each store
are one message each, queued with a thread switch, and tpc_vote and
tpc_finish wait for the answer. Through the backend's commit worker that
is two more thread switches per call and backend.

For a ZEO backend the RAID instead keeps the transaction's messages
(tpc_begin, storea, restorea, ...) in a list, from the ZEO server's own
thread, and hands them to the IO thread in one go together with the vote
(or earlier, when they grow large). Vote and finish are split into *send*
(returns the IO thread's future) and *complete* (what ClientStorage does
with the answer), so the RAID sends to every backend first and then waits
for all the answers against its own deadline. A backend that never
answers blocks nothing but its own future.

The transaction is still ClientStorage's own: the same transaction
buffer slot, commit lock and connection generation, so tpc_abort, undo
and the other calls that still go through the worker see a normal
ClientStorage transaction. The buffer keeps the records in memory (the
client cache is updated from it at finish) instead of a temporary file.

This leans on ClientStorage internals that are the same in ZEO 5 and 6;
`DirectClient.for_storage` checks they are there. Any other storage (and
a ZEO without them) keeps using the commit worker.
"""
import itertools
import logging
import struct
import threading

import ZEO.ClientStorage
import ZEO.TransactionBuffer
import ZODB.POSException
from ZEO.Exceptions import ClientDisconnected

from zeoraid.errors import BackendTimeout

try:
    from ZEO.asyncio.futures import AsyncTask
except ImportError:  # pragma: no cover - ZEO < 5.4: the worker is used
    AsyncTask = None

logger = logging.getLogger('zeoraid')

#: Messages are handed to the IO thread early once they hold this much
#: data, so a large transaction streams to the backend while it is built.
FLUSH_BYTES = 1 << 20

#: Blob data goes to a ZEO server in messages of this size (as ZEO's).
BLOB_CHUNK = 59000

#: A BatchIterator batch stops once it holds this much record data.
BATCH_BYTES = 4 << 20

#: Records are kept for the backend's client cache up to this much data
#: per transaction; beyond it the cache is only invalidated.
CACHE_BYTES = 16 << 20

_RUNNER_API = ('client', 'loop')
_CLIENT_API = ('tpc_finish_co', 'call_async', 'operational')
_STORAGE_API = ('_check_trans', 'tpc_end', '_commit_lock',
                '_update_blob_cache', '_iterator_gc', '_cache',
                '_connection_generation', '_is_read_only')


def _ignore(tid):
    pass


class MemoryBuffer(ZEO.TransactionBuffer.TransactionBuffer):
    """ClientStorage's transaction buffer, in memory.

    The records are the bytes objects the RAID got from its client (no
    copy). Without `keep_data`, or past CACHE_BYTES, only the oids are
    kept: the backend's cache then invalidates them instead of storing
    the new data.
    """

    def __init__(self, connection_generation, keep_data=True):
        self.connection_generation = connection_generation
        self.cache_bytes = CACHE_BYTES if keep_data else -1
        self.records = []
        self.count = 0
        self.size = 0
        self.blobs = []
        self.server_resolved = set()
        self.client_resolved = {}
        self.exception = None

    def close(self):
        self.records = []

    def store(self, oid, data):
        if data is not None and self.size + len(data) > self.cache_bytes:
            data = None
        self.records.append((oid, data))
        self.count += 1
        self.size += (len(data) if data else 0) + 31

    def __iter__(self):
        server_resolved = self.server_resolved
        client_resolved = self.client_resolved
        seen = set()
        for i, (oid, data) in enumerate(self.records):
            if client_resolved.get(oid, i) == i:
                seen.add(oid)
                yield oid, data, oid in server_resolved
        for oid in server_resolved:     # undone records (as ZEO does)
            if oid not in seen:
                yield oid, None, True


class DirectClient:
    """A backend ClientStorage whose commit path the RAID drives itself."""

    def __init__(self, storage):
        self.storage = storage
        self.runner = storage._server

    @classmethod
    def for_storage(cls, storage):
        """A DirectClient if `storage` is a ClientStorage we understand."""
        if (AsyncTask is None
                or not isinstance(storage, ZEO.ClientStorage.ClientStorage)):
            return None
        runner = getattr(storage, '_server', None)
        client = getattr(runner, 'client', None)
        if (not all(hasattr(runner, name) for name in _RUNNER_API)
                or not all(hasattr(client, name) for name in _CLIENT_API)
                or not all(hasattr(storage, name) for name in _STORAGE_API)):
            return None
        return cls(storage)

    def can_begin(self):
        """False while an earlier transaction still holds the client.

        ClientStorage's commit lock is held only if an earlier finish or
        abort never came back (a hung backend). Waiting for it must
        happen in the worker, never in the ZEO server's thread.
        """
        return not self.storage._commit_lock.locked()

    def begin(self, txn, tid, status, cache_data=True):
        """ClientStorage.tpc_begin, with the message kept back.

        cache_data: put the committed records into this backend's client
        cache (else they are only invalidated there). Storing them costs
        the IO thread time at finish; the RAID does it for one backend.
        """
        return DirectTransaction(self, txn, tid, status, cache_data)

    def iterate(self, start, stop=None):
        """A BatchIterator over the server's transactions from start."""
        return BatchIterator(self, start, stop)

    def restore_stream(self):
        """A RestoreStream (recovery's copy of transactions)."""
        return RestoreStream(self)

    def cached(self, oid, tid):
        """loadBefore answered by the client cache alone, or None."""
        cache = self.storage._cache
        if cache is None:
            return None
        return cache.loadBefore(oid, tid)

    def send_load(self, oid, tid, answer):
        """loadBefore in the IO thread; answer(result, error) is called
        there (the client cache is filled as ClientStorage does)."""
        client = self.runner.client

        async def load():
            return await client.load_before_co(oid, tid, 0)

        def done(task):
            try:
                result = task.result()
            except BaseException as exc:
                answer(None, exc)
            else:
                answer(result, None)

        def start():
            try:
                task = AsyncTask(load(), loop)
            except BaseException as exc:
                answer(None, exc)
            else:
                task.add_done_callback(done)
        loop = self.runner.loop
        loop.call_soon_threadsafe(start)

    def length(self):
        return len(self.storage)

    def size(self):
        return self.storage.getSize()


class DirectTransaction:
    """One backend's share of a RAID transaction, sent in batches."""

    def __init__(self, client, txn, tid, status, cache_data=True):
        storage = client.storage
        if storage._is_read_only:
            raise ZODB.POSException.ReadOnlyError()
        try:
            existing = txn.data(storage)
        except KeyError:
            existing = None
        if existing is not None:
            raise ZODB.POSException.StorageTransactionError(
                'Duplicate tpc_begin calls for same transaction')
        if not storage._commit_lock.acquire(blocking=False):
            raise ZODB.POSException.StorageTransactionError(
                'backend client is still in an earlier transaction')
        self.client = client
        self.storage = storage
        self.txn = txn
        self.tbuf = MemoryBuffer(storage._connection_generation, cache_data)
        txn.set_data(storage, self.tbuf)
        storage._tbuf = self.tbuf
        self.messages = [('tpc_begin', (
            id(txn), txn.user, txn.description, txn.extension, tid,
            status))]
        self.nbytes = 0
        # restoreBlob: oid -> its last record's (serial, data, file, prev)
        # and that record's place in messages (a _BLOB_PLACE entry).
        self.blob_records = {}

    def _check(self, what):
        return self.storage._check_trans(self.txn, what)

    # -- queued calls (what ClientStorage would send at once) -------------

    def store(self, oid, serial, data, version, txn):
        tbuf = self._check('store')
        self._queue('storea', (oid, serial, data, id(txn)), data)
        tbuf.store(oid, data)

    def restore(self, oid, serial, data, version, prev_txn, txn):
        self._check('restore')
        self._queue('restorea', (oid, serial, data, prev_txn, id(txn)), data)

    def deleteObject(self, oid, serial, txn):
        tbuf = self._check('deleteObject')
        self._queue('deleteObject', (oid, serial, id(txn)), None)
        tbuf.store(oid, None)

    def checkCurrentSerialInTransaction(self, oid, serial, txn):
        self._check('checkCurrentSerialInTransaction')
        self._queue('checkCurrentSerialInTransaction',
                    (oid, serial, id(txn)), None)

    def storeBlob(self, oid, serial, data, blobfilename, version, txn):
        # The blob goes as a stream of messages: everything before it
        # first, in order.
        self.flush()
        return self.storage.storeBlob(oid, serial, data, blobfilename,
                                      version, txn)

    def restore_blob(self, oid, serial, data, blobfilename, prev_txn,
                     current):
        """restoreBlob, which ZEO lacks: the record with its blob.

        current: the backend's current serial of the object (z64 for a
        new one), which the ZEO server checks the blob's store against;
        in a transaction begun with the record's tid that writes the
        record restoreBlob would. The blob goes with the object's last
        record in the transaction, as _send_blob_record at the vote
        (after all other records, the last one first: the ZEO server
        stores blob records last, in reverse). An earlier record of the
        same object (ZEO's storeBlob writes two) is restored as it is, in
        its place. Until the vote nothing of the transaction is sent.
        """
        self._check('restoreBlob')
        earlier = self.blob_records.pop(oid, None)
        if earlier is not None:
            place, _, record = earlier
            rserial, rdata, _, rprev = record
            self.messages[place] = ('restorea', (oid, rserial, rdata, rprev,
                                                 id(self.txn)))
        self.messages.append(_BLOB_PLACE)
        self.blob_records[oid] = (len(self.messages) - 1, current,
                                  (serial, data, blobfilename, prev_txn))

    def _send_blob_records(self):
        """At the vote: the restoreBlob records, after everything else."""
        records = sorted(self.blob_records.items(), key=lambda i: i[1][0])
        self.blob_records = {}
        self.messages = [m for m in self.messages if m is not _BLOB_PLACE]
        self.flush()
        for oid, (_, current, (_, data, blobfilename, _)) in \
                reversed(records):
            self._send_blob_record(oid, current, data, blobfilename,
                                   self.txn)

    def _send_blob_record(self, oid, serial, data, blobfilename, txn):
        """One record with a blob, as restoreBlob would write it.

        ClientStorage.storeBlob sends a store before the blob, which
        writes two records (a history packed since, or written by a RAID,
        may have one). Here only ZEO's blob messages go (storeBlobStart,
        the chunks read as they are written, storeBlobEnd), after
        everything queued before. The ZEO server stores blob records
        after all other records of the transaction, the last one sent
        first.
        """
        tbuf = self._check('storeBlob')
        self.flush()
        client = self.client.runner.client
        txn_id = id(txn)
        # The client cache drops the object at finish (as for a store).
        tbuf.store(oid, None)

        def messages():
            yield ('storeBlobStart', ())
            with open(blobfilename, 'rb') as f:
                while True:
                    chunk = f.read(BLOB_CHUNK)
                    if not chunk:
                        break
                    yield ('storeBlobChunk', (chunk,))
            yield ('storeBlobEnd', (oid, serial, data, txn_id))

        def start():
            if client.operational:
                client.call_async_iter(messages())
            # else: the vote fails with the connection error
        self.client.runner.loop.call_soon_threadsafe(start)

    def call(self, method, args):
        """One of the queued calls above, by name."""
        if method not in QUEUED_CALLS:
            raise ZODB.POSException.Unsupported(
                'backend %s has no %s' % (self.storage.getName(), method))
        return getattr(self, method)(*args)

    def _queue(self, method, args, data):
        self.messages.append((method, args))
        if data:
            self.nbytes += len(data)
            if self.nbytes >= FLUSH_BYTES:
                self.flush()

    def _take_messages(self):
        if self.blob_records:
            # restoreBlob places are open until the vote.
            return []
        messages, self.messages, self.nbytes = self.messages, [], 0
        return messages

    def flush(self):
        """Hand the queued messages to the IO thread (before any other
        call into this client, so the server sees them in order)."""
        if not self.messages:
            return
        client = self.client.runner.client
        if not client.operational:
            raise ClientDisconnected('backend connection lost')
        self.client.runner.loop.call_soon_threadsafe(
            _send, client, self._take_messages())

    # -- vote --------------------------------------------------------------

    def send_vote(self, reply, handoff=None):
        """Send what is queued and the vote; the answer goes to `reply`.

        With a `handoff`, the IO thread gets it when handoff.go() is
        called (together with the other backends' votes).
        """
        self._check('tpc_vote')
        if self.blob_records:
            self._send_blob_records()
        messages = self._take_messages()
        client = self.client.runner.client
        txn_id = id(self.txn)

        def vote():
            try:
                if not client.operational:
                    raise ClientDisconnected('backend connection lost')
                answer = _send(client, messages, ('vote', (txn_id,)))
            except BaseException as exc:
                reply.set(error=exc)
            else:
                answer.add_done_callback(reply.set_from)
        _hand_off(handoff, self.client.runner.loop, vote, reply)

    @staticmethod
    def needs_resolution(answer):
        """Did the server hand conflicts back for client-side resolution?"""
        return any(isinstance(item, dict) for item in answer or ())

    def complete_vote(self, answer=None, error=None):
        """What ClientStorage.tpc_vote makes of the server's answer.

        Returns the oids resolved by the server (or None); raises the
        transaction's error.
        """
        if error is not None:
            oid = getattr(error, 'oid', None)
            if (isinstance(error, ZODB.POSException.ConflictError)
                    and oid is not None):
                # As ClientStorage does: the cached revision is suspect.
                self.storage._cache.invalidate(oid, None)
            raise error
        tbuf = self._check('tpc_vote')
        for oid in answer or ():
            tbuf.server_resolve(oid)
        return resolved_oids(tbuf)

    # -- finish ------------------------------------------------------------

    def send_finish(self, reply, handoff=None):
        """Send tpc_finish; the committed tid goes to `reply`.

        The client's transaction ends (its commit lock is released) in the
        IO thread when the answer or a connection error comes, whether or
        not anybody still waits for it.
        """
        storage = self.storage
        txn = self.txn
        tbuf = self._check('tpc_finish')
        client = self.client.runner.client
        loop = self.client.runner.loop

        async def finish():
            try:
                return await client.tpc_finish_co(id(txn), tbuf, _ignore)
            finally:
                storage.tpc_end(txn)

        def start():
            _start_task(loop, finish(), reply)
        _hand_off(handoff, loop, start, reply)

    def complete_finish(self, tid):
        """Move the transaction's blobs into the client's blob cache."""
        storage = self.storage
        storage._iterator_gc()
        try:
            storage._update_blob_cache(self.tbuf, tid)
        except Exception as exc:
            # The transaction is committed; only the backend's blob cache
            # missed the files (they are downloaded again when needed).
            logger.warning('could not move committed blobs into the blob '
                           'cache of %s: %r', storage.getName(), exc)


class BatchIterator:
    """Reads a ZEO server's transactions several at a time.

    ClientStorage's iterator asks the server for every transaction and
    every record separately, each from the calling thread through the IO
    thread and back (6 hand-offs for a 3-record transaction). Here one
    coroutine in the IO thread makes the same calls (iterator_next,
    iterator_record_start, iterator_record_next: ZEO's own protocol, no
    server extension) for a whole batch, and the caller is woken once.
    """

    def __init__(self, client, start, stop=None):
        self.client = client
        self.start = start
        self.stop = stop
        self.iid = None
        self.exhausted = False

    def next_batch(self, count, timeout, max_bytes=BATCH_BYTES):
        """Up to `count` transactions (ReadTransaction); [] at the end.

        A batch ends early once it holds max_bytes of record data. Raises
        BackendTimeout if the server does not answer within `timeout`.
        """
        if self.exhausted:
            return []
        runner = self.client.runner
        client = runner.client

        async def read():
            if not client.operational:
                raise ClientDisconnected('backend connection lost')
            call = client.protocol.call_sync
            if self.iid is None:
                self.iid = await call('iterator_start',
                                      (self.start, self.stop))
            batch = []
            nbytes = 0
            while len(batch) < count and nbytes < max_bytes:
                item = await call('iterator_next', (self.iid,))
                if item is None:
                    self.exhausted = True
                    break
                record_iid = await call('iterator_record_start',
                                        (self.iid, item[0]))
                records = []
                while True:
                    record = await call('iterator_record_next',
                                        (record_iid,))
                    if record is None:
                        break
                    records.append(ReadRecord(*record))
                    nbytes += len(record[2] or b'')
                batch.append(ReadTransaction(item, records))
            return batch
        reply = Replies(1).slot()
        _run_in(runner.loop, read(), reply)
        try:
            return reply.result(timeout)
        except TimeoutError:
            raise BackendTimeout('%s: no answer within %gs while reading '
                                 'transactions' % (self.client.storage
                                                   .getName(), timeout))

    def close(self):
        """Free the server's iterator (if it is not at its end)."""
        if self.iid is None or self.exhausted:
            return
        self.exhausted = True
        try:
            self.client.runner.loop.call_soon_threadsafe(
                _send, self.client.runner.client,
                [('iterator_gc', ([self.iid],))])
        except Exception:
            pass    # closed connection: the server forgot it already


#: Transaction ids used by RestoreStream (above any id() of an object).
RESTORE_IDS = 1 << 62


class RestoreStream:
    """Restores transactions on a ZEO server, several in flight.

    For recovery: each transaction is the server's tpc_begin (with the
    source's tid and status), restorea per record, vote and tpc_finish,
    sent by a coroutine in the IO thread. A transaction's messages are
    written only after the previous transaction's vote succeeded and its
    tpc_finish was written, so the server sees them strictly in order and
    a failed transaction stops every later one: either its vote failed
    (later ones are never sent) or its finish failed (the server still
    holds it, refuses the next tpc_begin and drops the connection). No
    transaction can be committed after one that was not. Each send's
    answer goes to its own Reply; the caller waits only for the oldest,
    so the round trips overlap: about one per transaction instead of two
    plus four thread hand-offs.

    The stream holds ClientStorage's commit lock while it is open, so no
    ordinary transaction of this client interleaves (blob transactions,
    which go through a DirectTransaction, come after close()).
    """

    def __init__(self, client):
        storage = client.storage
        if storage._is_read_only:
            raise ZODB.POSException.ReadOnlyError()
        if not storage._commit_lock.acquire(blocking=False):
            raise ZODB.POSException.StorageTransactionError(
                'backend client is still in an earlier transaction')
        self.client = client
        self.storage = storage
        self._voted = None      # IO thread: the last transaction's vote
        self._ids = itertools.count(1)
        self._closed = False

    def send(self, txn, reply):
        """Queue the restore of txn (its records: oid, tid, data,
        data_txn); the committed tid goes to `reply`."""
        self.send_many([(txn, reply)])

    def send_many(self, items):
        """send() for several (txn, reply), in order, in one hand-off."""
        if self._closed:
            raise ZODB.POSException.StorageTransactionError(
                'restore stream is closed')
        self.client.runner.loop.call_soon_threadsafe(
            _start_all, [(self._prepare(txn, reply), reply)
                         for txn, reply in items])

    def _prepare(self, txn, reply):
        """The IO thread's part of one send, as a callable."""
        # Ids of our own: the server only compares them with the one
        # transaction this connection has open.
        txn_id = RESTORE_IDS + next(self._ids)
        messages = [('tpc_begin', (txn_id, txn.user, txn.description,
                                   txn.extension, txn.tid, txn.status))]
        oids = []
        for record in txn:
            messages.append(('restorea', (record.oid, record.tid,
                                          record.data, record.data_txn,
                                          txn_id)))
            oids.append(record.oid)
        client = self.client.runner.client
        loop = self.client.runner.loop

        async def commit(previous, voted):
            try:
                if previous is not None and not await previous:
                    raise ZODB.POSException.StorageTransactionError(
                        'an earlier restored transaction failed')
                if not client.operational:
                    raise ClientDisconnected('backend connection lost')
                protocol = client.protocol
                answer = await _send(client, messages,
                                     ('vote', (txn_id,)))
                if DirectTransaction.needs_resolution(answer):
                    _send(client, [('tpc_abort', (txn_id,))])
                    raise ZODB.POSException.ConflictError(
                        'the server reported a conflict while restoring '
                        '%s' % txn.tid.hex())
                finish = protocol.call_sync('tpc_finish', (txn_id,))
                voted.set_result(True)
                tid = await finish
            finally:
                if not voted.done():
                    voted.set_result(False)
            cache = self.storage._cache
            if cache is not None and tid is not None:
                # As tpc_finish_co does (restore puts nothing into the
                # transaction buffer, so this is done here).
                with cache._lock:
                    for oid in oids:
                        cache.invalidate(oid, tid)
                    cache.setLastTid(tid)
            return tid

        def start():
            previous = self._voted
            voted = self._voted = loop.create_future()
            try:
                task = AsyncTask(commit(previous, voted), loop)
            except BaseException as exc:
                voted.set_result(False)
                reply.set(error=exc)
            else:
                task.add_done_callback(reply.set_from)
        return start

    def close(self):
        """Let ordinary transactions use the client again.

        Call once every reply is in (or the connection is given up on).
        """
        if not self._closed:
            self._closed = True
            self.storage._commit_lock.release()


class ReadTransaction:
    """A transaction as BatchIterator read it: tid, status, user,
    description, extension (as ZEO sends it) and its records."""

    def __init__(self, item, records):
        (self.tid, self.status, self.user, self.description,
         self.extension) = item
        self.records = records

    def __iter__(self):
        return iter(self.records)


class ReadRecord:
    __slots__ = ('oid', 'tid', 'data', 'data_txn')

    def __init__(self, oid, tid, data, data_txn):
        self.oid = oid
        self.tid = tid
        self.data = data
        self.data_txn = data_txn


class Replies:
    """The answers of several backends to one request, awaited together.

    Each backend's IO thread fills in its Reply; the waiting thread is
    woken once, when the last answer is in (a future per backend would
    wake it once per backend). `count` is the number of replies to come.
    A held lock is the cheapest thing to wait on: the last answer
    releases it.
    """

    def __init__(self, count):
        self._all_in = threading.Lock()
        self._arrivals = itertools.count(1)
        self._count = count
        if count > 0:
            self._all_in.acquire()

    def slot(self):
        return Reply(self)

    def _arrived(self):
        # next() on itertools.count is atomic: exactly one arrival is last.
        if next(self._arrivals) == self._count:
            self._all_in.release()

    def wait(self, timeout):
        """True once every reply is in (False at the timeout)."""
        if self._all_in.acquire(
                timeout=-1 if timeout is None else max(timeout, 0)):
            self._all_in.release()
            return True
        return False


class Reply:
    """One backend's answer; looks like a future to fanout.gather."""

    __slots__ = ('_replies', '_done', '_value', '_error')

    def __init__(self, replies):
        self._replies = replies
        self._done = False
        self._value = self._error = None

    def set(self, value=None, error=None):
        if self._done:
            return
        self._value, self._error = value, error
        self._done = True
        self._replies._arrived()

    def set_from(self, task):
        """Done-callback of a ZEO task (runs in the IO thread)."""
        try:
            value = task.result()
        except BaseException as exc:
            self.set(error=exc)
        else:
            self.set(value)

    def done(self):
        return self._done

    def result(self, timeout=None):
        if not self._done:
            self._replies.wait(timeout)
        if not self._done:
            raise TimeoutError('no answer yet')
        if self._error is not None:
            raise self._error
        return self._value


QUEUED_CALLS = frozenset(['store', 'restore', 'deleteObject', 'storeBlob',
                          'checkCurrentSerialInTransaction'])

#: A restoreBlob record's place among a DirectTransaction's messages.
_BLOB_PLACE = ('restoreBlob', None)


def _start_task(loop, coroutine, reply):
    """In the IO thread: run the coroutine; its result goes to reply."""
    try:
        task = AsyncTask(coroutine, loop)
    except BaseException as exc:
        reply.set(error=exc)
    else:
        task.add_done_callback(reply.set_from)


def _run_in(loop, coroutine, reply):
    """Run the coroutine in the IO thread; its result goes to reply."""
    loop.call_soon_threadsafe(_start_task, loop, coroutine, reply)


class Handoff:
    """Work for backend IO threads, handed over in one wake-up per loop.

    With the shared backend IO loop (zeoraid.ioloop) every backend's vote
    (or finish) of a transaction is one call_soon_threadsafe, not one per
    backend. Each item is (callable, reply): the callable runs in the IO
    thread and answers the reply itself; if the loop cannot take it, the
    reply gets the error at once.
    """

    def __init__(self):
        self._by_loop = {}

    def add(self, loop, start, reply):
        self._by_loop.setdefault(loop, []).append((start, reply))

    def go(self):
        by_loop, self._by_loop = self._by_loop, {}
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_start_all, items)
            except BaseException as exc:    # closed loop
                for start, reply in items:
                    reply.set(error=exc)


def _start_all(items):
    for start, reply in items:
        try:
            start()
        except BaseException as exc:
            reply.set(error=exc)


def _hand_off(handoff, loop, start, reply):
    if handoff is None:
        loop.call_soon_threadsafe(start)
    else:
        handoff.add(loop, start, reply)


_pack_size = struct.Struct('>I').pack


def _send(client, messages, call=None):
    """In the IO thread: write the messages to the server, in order, then
    `call` (method, args), whose answer the returned future gets.

    ZEO's protocol writes every message with a system call of its own,
    and the server wakes up for each. Here ZEO's own call_async and
    call_sync encode them (message ids, futures) and the frames go out
    in one write when the connection has nothing buffered. Otherwise
    (the transport is behind, or ZEO's writer is paused and queueing)
    they go through ZEO's writer one by one, which keeps them in order.
    """
    protocol = client.protocol
    frames = []
    write_message = protocol.write_message
    protocol.write_message = frames.append
    try:
        for method, args in messages:
            protocol.call_async(method, args)
        answer = protocol.call_sync(*call) if call is not None else None
    finally:
        protocol.write_message = write_message
    transport = getattr(getattr(protocol, 'sm_protocol', None),
                        'transport', None)
    if (len(frames) > 1 and transport is not None
            and not transport.get_write_buffer_size()):
        # An empty buffer means ZEO's writer is not paused (asyncio
        # resumes the protocol before the buffer runs empty), so nothing
        # of ZEO's is queued ahead of these frames.
        data = []
        for frame in frames:
            data.append(_pack_size(len(frame)))
            data.append(frame)
        transport.write(b''.join(data))
    else:
        for frame in frames:
            write_message(frame)
    return answer


def resolved_oids(tbuf):
    """ClientStorage.tpc_vote's result from a transaction buffer."""
    if tbuf.exception:
        raise tbuf.exception
    if tbuf.server_resolved or tbuf.client_resolved:
        return list(tbuf.server_resolved) + list(tbuf.client_resolved)
    return None


def resolve_conflicts(storage, txn, answer):
    """ClientStorage.tpc_vote's resolution loop, from a vote answer on.

    Only backends whose ZEO server has `client-conflict-resolution` on
    hand conflicts back. Runs in the backend's commit worker: resolving
    loads from the backend, and every round votes again.
    """
    tbuf = storage._check_trans(txn, 'tpc_vote')
    attempts = 1
    while True:
        conflicts = False
        for item in answer or ():
            if isinstance(item, dict):
                conflicts = True
                oid = item['oid']
                committed, read = item['serials']
                data = storage.tryToResolveConflict(
                    oid, committed, read, item['data'])
                storage._async('storea', oid, committed, data, id(txn))
                tbuf.resolve(oid, data)
            else:
                tbuf.server_resolve(item)
        if not conflicts or attempts >= 9:
            break
        attempts += 1
        answer = storage._call('vote', id(txn))
    return resolved_oids(tbuf)
