"""The ZEO server's per-connection handler for a RAID: loads off the loop
(and a commit log in memory, MemoryCommitLog).

ZEO 6 calls a served storage's loadBefore in its single event-loop thread.
A load that misses the zeoraid server's backend caches waits there for a
backend round trip, and every other client waits with it, so concurrent
cold loads cannot use more than one backend at a time. For a RAIDStorage
this handler answers a load from the backend client caches at once when
it can, and otherwise sends it to a backend's IO thread and answers it
when the backend does (ZEO's Delay), so the event loop goes on serving
and the loads run on the backends in parallel.

Ordering: a ZEO client caches a load's answer as current (end tid None)
and relies on the server sending that answer before any invalidation
that follows it. An answer computed in another thread can be overtaken
by a commit. So the reply is completed in the event-loop thread (where
invalidations are sent): if a commit whose invalidations already went
out changed the object after the answer was asked for, the answer gets
that commit's tid as its end (the data was current until then). If the
server's invalidation queue no longer reaches back that far, the load is
made again.
"""
import concurrent.futures
import logging
import sys
import time

import ZEO.StorageServer
from ZEO.asyncio.server import Delay
from ZODB.Connection import TransactionMetaData
from ZODB.POSException import ReadOnlyError
from ZODB.POSException import StorageTransactionError

logger = logging.getLogger('zeoraid')

#: Threads for loads the RAID's read path answers (failover).
LOAD_THREADS = 4

#: Times a load is made again when commits outran the invalidation queue.
LOAD_ATTEMPTS = 3

#: end_tid() cannot tell: the invalidation queue lost the commits needed.
UNKNOWN = object()

#: A client's stores are kept in memory up to this much data; beyond it
#: they go to a temporary file as ZEO's own commit log does.
COMMIT_LOG_MEMORY = 16 << 20


def end_tid(invq, seen, oid):
    """The tid of the first commit after `seen` that changed `oid`.

    invq: ZEO's invalidation queue, newest first, [(tid, oids)]; every
    entry's invalidations have been sent. seen: the newest tid in it when
    the load was asked for. None if no such commit, UNKNOWN if the queue
    does not reach back to `seen` any more.
    """
    first = None
    for tid, oids in invq:
        if tid <= seen:
            return first
        if oids and oid in oids:
            first = tid
    return UNKNOWN if invq else first


class Loads:
    """Loads of one StorageServer that miss the backend caches.

    A load goes straight to a ZEO backend's IO thread (one hand-off each
    way, no thread of ours waits); its answer is sent from the event
    loop. A backend that fails or misses the deadline is left to the
    RAID's own read path (failover and degrading), run in a thread.
    """

    def __init__(self, threads=LOAD_THREADS):
        self.executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=threads, thread_name_prefix='zeoraid-load')

    def close(self):
        self.executor.shutdown(wait=False)

    def submit(self, zeo_storage, oid, tid, delay=None, attempt=1):
        """In the event loop: start a load; returns the Delay to answer."""
        delay = delay or Delay()
        invq = zeo_storage.server.invq[zeo_storage.storage_id]
        seen = invq[0][0] if invq else None
        raid = zeo_storage.storage
        backend = raid.load_backend()
        if backend is None:
            self._via_raid(zeo_storage, delay, oid, tid, seen, attempt)
            return delay
        loop = zeo_storage.connection.loop
        done = []
        started = time.monotonic()

        def answered(result, error):        # event loop
            if done:
                return
            done.append(True)
            timer.cancel()
            backend.load_done(time.monotonic() - started)
            if error is None:
                self._reply(zeo_storage, delay, oid, tid, seen, attempt,
                            result)
            else:
                self._via_raid(zeo_storage, delay, oid, tid, seen, attempt)

        def too_late():                     # event loop
            if done:
                return
            done.append(True)
            backend.load_done(time.monotonic() - started)
            raid._degrade(backend, 'load: no answer within %gs'
                          % raid.timeout)
            self._via_raid(zeo_storage, delay, oid, tid, seen, attempt)

        timer = loop.call_later(raid.timeout, too_late)
        backend.load_started()
        try:
            backend.direct.send_load(
                oid, tid, lambda result, error: loop.call_soon_threadsafe(
                    answered, result, error))
        except Exception:
            answered(None, sys.exc_info()[1])
        return delay

    def _via_raid(self, zeo_storage, delay, oid, tid, seen, attempt):
        """RAIDStorage.loadBefore (failover, deadlines) in a thread."""
        loop = zeo_storage.connection.loop

        def load():
            try:
                result = zeo_storage.storage.loadBefore(oid, tid)
            except Exception:
                loop.call_soon_threadsafe(Delay.error, delay, sys.exc_info())
            else:
                loop.call_soon_threadsafe(self._reply, zeo_storage, delay,
                                          oid, tid, seen, attempt, result)
        self.executor.submit(load)

    def _reply(self, zeo_storage, delay, oid, tid, seen, attempt, result):
        """In the event-loop thread: fix the end tid, then send."""
        if result is not None and result[2] is None and seen is not None:
            invq = zeo_storage.server.invq[zeo_storage.storage_id]
            end = end_tid(invq, seen, oid)
            if end is UNKNOWN:
                if attempt < LOAD_ATTEMPTS:
                    self.submit(zeo_storage, oid, tid, delay, attempt + 1)
                    return
                # Still overtaken: answer the load here, in order.
                try:
                    result = zeo_storage.storage.loadBefore(oid, tid)
                except Exception:
                    Delay.error(delay, sys.exc_info())
                    return
            elif end is not None:
                result = (result[0], result[1], end)
        Delay.reply(delay, result)


class MemoryCommitLog:
    """ZEO's commit log (a client's stores until its vote), in memory.

    ZEO writes every transaction's stores to a temporary file of its own
    and reads them back at the vote: a file created, written, sought,
    read and closed per transaction, about a tenth of the zeoraid
    server's CPU per small commit. The stores are only kept until the
    vote, and the RAID keeps the same bytes for its backends anyway, so
    here they stay in a list; a transaction with more than `limit` bytes
    of data goes on in a temporary file (ZEO's CommitLog) instead.
    """

    def __init__(self, limit=COMMIT_LOG_MEMORY):
        self.entries = []
        self.nbytes = 0
        self.limit = limit
        self.spilled = None      # ZEO's CommitLog, past the limit
        self.stores = 0

    def size(self):
        if self.spilled is not None:
            return self.spilled.size()
        return self.nbytes

    def _add(self, method, args, data=None):
        self.stores += 1
        if self.spilled is not None:
            getattr(self.spilled, method)(*args)
            return
        self.entries.append(('_' + method, args))
        self.nbytes += 40 + (len(data) if data else 0)
        if self.nbytes > self.limit:
            self.spilled = ZEO.StorageServer.CommitLog()
            for op, logged in self.entries:
                getattr(self.spilled, op[1:])(*logged)
            self.entries = []

    def delete(self, oid, serial):
        self._add('delete', (oid, serial))

    def checkread(self, oid, serial):
        self._add('checkread', (oid, serial))

    def store(self, oid, serial, data):
        self._add('store', (oid, serial, data), data)

    def restore(self, oid, serial, data, prev_txn):
        self._add('restore', (oid, serial, data, prev_txn), data)

    def undo(self, transaction_id):
        self._add('undo', (transaction_id,))

    def __iter__(self):
        if self.spilled is not None:
            return iter(self.spilled)
        return iter(self.entries)

    def close(self):
        self.entries = []
        if self.spilled is not None:
            self.spilled.close()
            self.spilled = None


class RAIDZEOStorage(ZEO.StorageServer.ZEOStorage):
    """ZEOStorage for a RAIDStorage: loads that do not block the loop, and
    a commit log in memory."""

    def tpc_begin(self, id, user, description, ext, tid=None, status=' '):
        """ZEOStorage.tpc_begin (ZEO 5 and 6), with a MemoryCommitLog.

        The same steps in the same order as ZEO's; only the commit log
        differs (ZEO creates its temporary file here).
        """
        if self.read_only:
            raise ReadOnlyError()
        if self.transaction is not None:
            if self.transaction.id == id:
                self.log('duplicate tpc_begin(%s)' % repr(id))
                return
            raise StorageTransactionError(
                'Multiple simultaneous tpc_begin requests from one client.')
        txn = TransactionMetaData(user, description, ext)
        txn.id = id
        self.serials = []
        self.conflicts = {}
        self.invalidated = []
        self.txnlog = MemoryCommitLog()
        self.blob_log = []
        self.tid = tid
        self.status = status
        self.stats.active_txns += 1
        # Last, as in ZEO: from here on the server thinks it is in 2PC.
        self.transaction = txn

    def loadBefore(self, oid, tid):
        storage = self.storage
        loads = getattr(self.server, 'raid_loads', None)
        cached = getattr(storage, 'load_before_cached', None)
        if loads is None or cached is None:
            return super().loadBefore(oid, tid)
        self.stats.loads += 1
        result = cached(oid, tid)
        if result is not None:
            return result
        return loads.submit(self, oid, tid)


def install(server):
    """Make a ZEO StorageServer use RAIDZEOStorage for new connections."""
    server.raid_loads = Loads()
    read_only = server.read_only
    server.create_client_handler = lambda: RAIDZEOStorage(server, read_only)
    return server.raid_loads
