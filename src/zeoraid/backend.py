"""One backend of a RAID: its opener, its storage, its state and its threads.

Every call into a backend runs in a thread that belongs to that backend, so
that the caller can stop waiting after the RAID's deadline: a hung backend
then blocks only its own threads, never the ZEO server's event loop.

Two kinds of threads, both long-lived (no thread is created per call):

- one *commit worker* that runs the commit path (tpc_begin, store, vote,
  finish, abort, ...) strictly in submission order, so stores can be
  pipelined without waiting for each one;
- a small pool of *readers* for loads, which need no ordering.
"""
import collections
import concurrent.futures
import inspect
import logging
import queue
import threading
import time

# Imported here, in the importing thread: backends are opened in threads
# of their own, and BTrees' lazily created modules (fsBTree) are not safe
# to import from several threads at once.
import BTrees.fsBTree  # noqa: F401
import ZEO.ClientStorage
import ZODB.FileStorage  # noqa: F401
import ZODB.interfaces
import ZODB.MappingStorage  # noqa: F401
import ZODB.POSException
import ZODB.utils
import zope.interface

from zeoraid.direct import DirectClient
from zeoraid.errors import BackendTimeout
from zeoraid.errors import BackendUnavailable

logger = logging.getLogger('zeoraid')

OPTIMAL = 'optimal'
DEGRADED = 'degraded'
RECOVERING = 'recovering'

READER_THREADS = 4


class SerialWorker:
    """A single thread that runs submitted calls one after the other."""

    _stop = object()

    def __init__(self, name):
        self.name = name
        self._queue = queue.SimpleQueue()
        self._thread = None
        self._lock = threading.Lock()

    def submit(self, fn, *args, **kw):
        future = concurrent.futures.Future()
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name=self.name, daemon=True)
                self._thread.start()
        self._queue.put((future, fn, args, kw))
        return future

    def _run(self):
        while True:
            item = self._queue.get()
            if item is self._stop:
                return
            future, fn, args, kw = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args, **kw)
            except BaseException as exc:
                future.set_exception(exc)
            else:
                future.set_result(result)

    def shutdown(self):
        """Let the thread end once it has run what is already queued."""
        with self._lock:
            if self._thread is not None:
                self._queue.put(self._stop)


class FairLock:
    """A lock granted in request order.

    The RAID's commit lock is released and taken again back to back by
    the ZEO server's thread under load; a plain Lock would let that
    thread win every time and starve a recovery or pack that waits for
    it. Here waiters are served first come, first served.
    """

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._next_ticket = 0
        self._serving = 0
        self._held = False
        self._cancelled = set()   # tickets whose waiters gave up

    def acquire(self, blocking=True, timeout=-1):
        with self._cond:
            ticket = self._next_ticket
            self._next_ticket += 1
            deadline = None if timeout is None or timeout < 0 \
                else time.monotonic() + timeout
            while self._held or self._serving != ticket:
                if not blocking:
                    remaining = 0
                elif deadline is None:
                    remaining = None
                else:
                    remaining = deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    # Give up our turn without blocking those behind us.
                    self._skip(ticket)
                    return False
                self._cond.wait(remaining)
            self._held = True
            self._serving += 1
            self._skip_cancelled()
            return True

    def _skip(self, ticket):
        self._cancelled.add(ticket)
        self._skip_cancelled()
        self._cond.notify_all()

    def _skip_cancelled(self):
        while self._serving in self._cancelled:
            self._cancelled.discard(self._serving)
            self._serving += 1

    def release(self):
        with self._cond:
            if not self._held:
                raise RuntimeError('release of an unheld FairLock')
            self._held = False
            self._cond.notify_all()

    def locked(self):
        return self._held

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


def wait_for(future, timeout, what):
    """The future's result, or BackendTimeout after `timeout` seconds."""
    try:
        return future.result(timeout)
    except concurrent.futures.TimeoutError:
        raise BackendTimeout(
            '%s: no answer within %gs' % (what, timeout)) from None


def is_client_storage(storage):
    """True for ZEO ClientStorage backends (remote, with their own IO thread)."""
    return isinstance(storage, ZEO.ClientStorage.ClientStorage)


def _close_quietly(storage):
    try:
        storage.close()
    except Exception as exc:
        logger.debug('closing a replaced backend storage: %r', exc)


def _wait_connected(storage, timeout):
    deadline = time.monotonic() + (timeout or 30)
    while not storage.is_connected():
        if time.monotonic() > deadline:
            return
        time.sleep(0.02)


def close_iterator(iterator):
    """Close a storage iterator if it can be closed (remote ones hold
    server resources); errors on the way out do not matter."""
    close = getattr(iterator, 'close', None)
    if close is not None:
        try:
            close()
        except Exception:
            pass


def has_transaction(storage, tid):
    """Does the storage really have the transaction `tid`?"""
    iterator = storage.iterator(tid, tid)
    try:
        for txn in iterator:
            return txn.tid == tid
        return False
    finally:
        close_iterator(iterator)


def authoritative_last_tid(storage):
    """The backend's last committed tid, asked of the server if remote.

    ClientStorage.lastTransaction() is a cached value updated
    asynchronously; the server's own answer is the one to trust when the
    RAID chooses tids or compares backends.
    """
    if is_client_storage(storage):
        return storage._call('lastTransaction')
    return storage.lastTransaction()


def current_serial(storage, oid):
    """The serial of oid's current record on storage, z64 if none.

    ZEO has no restoreBlob: a blob store against this serial, in a
    transaction begun with the record's tid, writes the record that
    restoreBlob would.
    """
    try:
        return ZODB.utils.load_current(storage, oid)[1]
    except ZODB.POSException.POSKeyError:
        return ZODB.utils.z64


class Backend:
    """A named backend storage with its health state."""

    def __init__(self, name, opener, raid_name='raid'):
        self.name = name
        self.opener = opener
        self.raid_name = raid_name
        self.storage = None
        self.direct = None           # DirectClient of a ZEO backend
        self.state = DEGRADED
        self.reason = 'not opened yet'
        self.since = time.time()
        self.last_tid = None
        self.open_error = None
        self._worker = SerialWorker('zeoraid-%s-commit' % name)
        self._readers = concurrent.futures.ThreadPoolExecutor(
            max_workers=READER_THREADS,
            thread_name_prefix='zeoraid-%s-read' % name)
        self._opened = threading.Event()
        self.abort_takes_timeout = False
        self.pack_takes_gc = False
        self.begin_takes_status = True
        self.blob_temp_dir = None
        self.last_recovery = None    # recovery.Progress of the last one
        self.read_latency = 0.0      # moving average of read calls (s)
        self.reads_in_flight = 0
        self.failures = collections.deque(maxlen=32)  # when it degraded
        self.on_change = None        # called with self after set_state
        self.checking = False        # reconnected: history being checked

    def __repr__(self):
        return '<Backend %s %s>' % (self.name, self.state)

    # -- opening ---------------------------------------------------------

    def start_open(self, connect_timeout=None):
        """Run the opener in a thread of its own; returns at once."""
        thread = threading.Thread(
            target=self._open, args=(connect_timeout,),
            name='zeoraid-%s-open' % self.name, daemon=True)
        thread.start()

    def _open(self, connect_timeout):
        try:
            storage = self.opener()
            if is_client_storage(storage):
                # `wait false` returns before the first connection; the
                # server's interfaces and last tid come with it.
                _wait_connected(storage, connect_timeout)
        except Exception as exc:
            self.open_error = exc
            logger.warning('backend %s of RAID %s could not be opened: %r',
                           self.name, self.raid_name, exc)
        else:
            self.direct = DirectClient.for_storage(storage)
            self.storage = storage
            self._inspect(storage)
        finally:
            self._opened.set()

    def reopen(self, timeout):
        """Replace the storage with a fresh one from the opener.

        A ZEO client whose server was restarted empty refuses to
        reconnect ("client cache is out of sync"); recovery of such a
        backend (a full rebuild) needs a new connection. Fresh threads
        too: the old ones may still be stuck in a hung call.
        """
        old = self.storage
        self.storage = None
        self.direct = None
        self._worker.shutdown()
        self._readers.shutdown(wait=False)
        self._worker = SerialWorker('zeoraid-%s-commit' % self.name)
        self._readers = concurrent.futures.ThreadPoolExecutor(
            max_workers=READER_THREADS,
            thread_name_prefix='zeoraid-%s-read' % self.name)
        if old is not None:
            threading.Thread(target=_close_quietly, args=(old,),
                             name='zeoraid-%s-close' % self.name,
                             daemon=True).start()
        self.reset_opener()
        self.start_open(timeout)
        return self.wait_opened(timeout)

    def reset_opener(self):
        """Allow another open attempt (recovery of a never-opened one)."""
        self._opened.clear()
        self.open_error = None

    def wait_opened(self, timeout):
        """True if opening finished (successfully or not) within timeout."""
        return self._opened.wait(timeout)

    def _inspect(self, storage):
        try:
            params = inspect.signature(storage.tpc_begin).parameters
            # MappingStorage.tpc_begin(transaction, tid=None): no status.
            self.begin_takes_status = len(params) >= 3 or any(
                p.kind == p.VAR_POSITIONAL for p in params.values())
        except (TypeError, ValueError):
            self.begin_takes_status = True
        try:
            params = inspect.signature(storage.tpc_abort).parameters
            self.abort_takes_timeout = 'timeout' in params
        except (TypeError, ValueError):
            self.abort_takes_timeout = False
        try:
            self.pack_takes_gc = (
                'gc' in inspect.signature(storage.pack).parameters)
        except (TypeError, ValueError):
            self.pack_takes_gc = False

    def provides(self, interface):
        return self.storage is not None and interface.providedBy(self.storage)

    @property
    def supports_blobs(self):
        """IBlobStorage, and for a ZEO client also a blob dir of its own:
        a ClientStorage without one claims its server's blob support but
        has nowhere to put a blob."""
        if not self.provides(ZODB.interfaces.IBlobStorage):
            return False
        if is_client_storage(self.storage):
            return getattr(self.storage, 'fshelper', None) is not None
        return True

    # -- state -------------------------------------------------------------

    @property
    def optimal(self):
        """Optimal and usable: not while its history is being checked
        after a reconnect (RAIDStorage.backend_reconnected)."""
        return self.state == OPTIMAL and not self.checking

    def set_state(self, state, reason=None):
        """Change state; log it once. Returns True if it changed."""
        if self.state == state and self.reason == reason:
            return False
        old = self.state
        self.state = state
        self.reason = reason
        self.since = time.time()
        if state == DEGRADED and old != DEGRADED:
            self.failures.append(time.monotonic())
        level = logging.INFO if state == OPTIMAL and old == OPTIMAL \
            else logging.WARNING
        logger.log(level,
                   'raid=%s backend=%s state=%s previous=%s last_tid=%s '
                   'reason=%s', self.raid_name, self.name, state, old,
                   self.last_tid.hex() if self.last_tid else '-',
                   reason or '-')
        if self.on_change is not None:
            try:
                self.on_change(self)
            except Exception:
                logger.exception('raid=%s backend=%s: after a state change',
                                 self.raid_name, self.name)
        return True

    def degrade(self, reason):
        """Mark degraded with a reason; True if it was not degraded yet."""
        if self.state == DEGRADED:
            return False
        return self.set_state(DEGRADED, reason)

    def details(self):
        info = {
            'state': self.state,
            'reason': self.reason,
            'since': self.since,
            'last_tid': self.last_tid.hex() if self.last_tid else None,
        }
        if self.checking:
            info['checking'] = True
        return info

    # -- calls -------------------------------------------------------------

    def _require_storage(self):
        if self.storage is None:
            raise BackendUnavailable(
                'backend %s is not open (%s)' % (self.name, self.reason))
        return self.storage

    def submit(self, fn, *args, **kw):
        """Queue fn(storage, *args) on the ordered commit worker."""
        storage = self._require_storage()
        return self._worker.submit(fn, storage, *args, **kw)

    def submit_read(self, fn, *args, **kw):
        """Queue fn(storage, *args) on a reader thread; returns a future."""
        return self._readers.submit(fn, self._require_storage(), *args, **kw)

    def call(self, timeout, fn, *args, **kw):
        """Run fn(storage, *args) in a reader thread; wait up to timeout."""
        storage = self._require_storage()
        started = time.monotonic()
        self.reads_in_flight += 1
        try:
            future = self._readers.submit(fn, storage, *args, **kw)
            return wait_for(future, timeout, 'backend %s' % self.name)
        finally:
            self.reads_in_flight -= 1
            elapsed = time.monotonic() - started
            self.read_latency += (elapsed - self.read_latency) * 0.1

    def load_started(self):
        """A load sent without Backend.call (served.Loads)."""
        self.reads_in_flight += 1

    def load_done(self, elapsed):
        self.reads_in_flight -= 1
        self.read_latency += (elapsed - self.read_latency) * 0.1

    def read_cost(self):
        """Expected wait for a read here: latency times queue length."""
        return (self.read_latency + 1e-6) * (1 + self.reads_in_flight)

    def call_ordered(self, timeout, fn, *args, **kw):
        """Run fn(storage, *args) on the commit worker; wait up to timeout."""
        return wait_for(self.submit(fn, *args, **kw), timeout,
                        'backend %s' % self.name)

    def abort(self, txn, wait_timeout=None):
        """Queue tpc_abort; never waits longer than wait_timeout.

        A backend that got tpc_begin must get tpc_finish or tpc_abort, or
        its private commit lock stays held (ClientStorage) and its next
        tpc_begin would block forever.
        """
        if self.storage is None:
            return None
        quick = self.state != OPTIMAL and self.abort_takes_timeout

        def abort(storage):
            if quick:
                storage.tpc_abort(txn, timeout=0)
            else:
                storage.tpc_abort(txn)
        future = self.submit(abort)
        if wait_timeout:
            try:
                future.result(wait_timeout)
            except Exception as exc:
                return exc
        return None

    def close(self, timeout):
        """Close the storage (bounded by timeout) and end the threads."""
        storage = self.storage
        try:
            if storage is not None:
                self.call_ordered(timeout, lambda s: s.close())
        except Exception as exc:
            logger.warning('closing backend %s of RAID %s failed: %r',
                           self.name, self.raid_name, exc)
        finally:
            self._worker.shutdown()
            self._readers.shutdown(wait=False)
            self._join_threads(timeout)

    def _join_threads(self, timeout):
        """Wait (briefly) for idle threads to end; hung ones stay behind."""
        deadline = time.monotonic() + min(timeout, 1.0)
        threads = list(getattr(self._readers, '_threads', ()))
        if self._worker._thread is not None:
            threads.append(self._worker._thread)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))


@zope.interface.implementer(ZODB.interfaces.IStorageWrapper)
class BackendUpcalls:
    """What a backend sees as its database: the RAID, filtered.

    A backend ClientStorage calls invalidateCache() on every (re)connect;
    forwarding it would make the ZEO server drop every client. It means
    the backend's server may be another one now (restarted on an older
    copy, or on another file): the RAID checks its history
    (RAIDStorage.backend_reconnected). invalidate() means somebody else
    wrote to the backend.
    """

    def __init__(self, raid, backend):
        self._raid = raid
        self._backend = backend

    def invalidate(self, transaction_id, oids, version=''):
        self._raid._backend_invalidated(self._backend, transaction_id, oids)

    def invalidateCache(self):
        self._raid.backend_reconnected(self._backend)

    def references(self, record, oids=None):
        return self._raid._wrapper_references(record, oids)

    def transform_record_data(self, data):
        return self._raid._wrapper_transform(data)

    def untransform_record_data(self, data):
        return self._raid._wrapper_untransform(data)
