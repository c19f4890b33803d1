"""The commit path: one transaction fanned out to every healthy backend.

    tpc_begin  -> queued on each backend with the RAID's tid
    store...   -> queued (pipelined), errors remembered per backend
    tpc_vote   -> run on all backends in parallel, wait with the deadline,
                  vote on the answers (fanout.vote)
    tpc_finish -> run on all backends in parallel, each must return the tid
    tpc_abort  -> queued on every backend that got tpc_begin, always

"Queued" means: on the backend's commit worker, or for a ZEO backend
kept as messages that go to its IO thread in one batch with the vote
(direct.DirectTransaction); votes and finishes are sent to all backends
first and their answers awaited together.

A backend that fails on the way is degraded and left out of the rest of
the transaction, but still gets its tpc_abort.
"""
import logging
import os
import shutil
import tempfile
import time

import ZODB.Connection
import ZODB.POSException
import ZODB.utils

from zeoraid import direct as direct_client
from zeoraid import fanout
from zeoraid.backend import authoritative_last_tid
from zeoraid.backend import current_serial
from zeoraid.errors import BackendsFailedError
from zeoraid.errors import RAIDError
from zeoraid.errors import RAIDFailedError

logger = logging.getLogger('zeoraid')


class BackendTransaction:
    """One backend's share of a RAID transaction."""

    __slots__ = ('backend', 'error', 'blob_links', 'finished', 'direct')

    def __init__(self, backend):
        self.backend = backend
        self.error = None        # first exception of a pipelined call
        self.blob_links = []     # per-backend links of uploaded blobs
        self.finished = False    # tpc_finish was sent (no abort needed)
        self.direct = None       # DirectTransaction (ZEO backends)


def _guarded(storage, share, method, args):
    """Run one pipelined call unless an earlier one failed already."""
    if share.error is not None:
        return None
    try:
        return getattr(storage, method)(*args)
    except Exception as exc:
        share.error = exc
        raise


def _vote_call(storage, share, txn):
    if share.error is not None:
        raise share.error
    return storage.tpc_vote(txn)


def for_backends(txn):
    """The transaction as backends get it: with per-storage data slots.

    A transaction record from an iterator (copyTransactionsFrom, a
    restore) has none, and MappingStorage's even has a `data` dict;
    ClientStorage keeps its transaction buffer in those slots.
    """
    if callable(getattr(txn, 'data', None)) and callable(
            getattr(txn, 'set_data', None)):
        return txn
    meta = ZODB.Connection.TransactionMetaData(
        txn.user, txn.description, txn.extension)
    return meta


class Commit:
    """State and logic of the RAID's current transaction."""

    def __init__(self, raid, txn, tid, status, backends):
        self.raid = raid
        self.client_txn = txn    # what the RAID's caller passes
        self.txn = for_backends(txn)
        self.tid = tid
        self.status = status
        self.timeout = raid.timeout
        self.shares = [BackendTransaction(b) for b in backends]
        self.blobs = []          # (oid, uploaded file the RAID owns)
        self.stored_data = None  # oid -> data, for client-side resolution
        self.voted = False
        self.mark = None         # records the tid before any finish
        self.mark_error = None
        self.nbytes = 0          # size of the data stored (recovery credit)
        self.started = time.monotonic()

    # -- helpers -----------------------------------------------------------

    def active(self):
        """Shares of backends still healthy in this transaction."""
        return [s for s in self.shares if s.backend.optimal]

    def _degrade(self, backend, reason):
        self.raid._degrade(backend, reason)

    def _require_active(self):
        active = self.active()
        if not active:
            self.raid._check_failed()
            raise RAIDFailedError(
                'RAID %s: no backend left for the transaction'
                % self.raid.getName())
        return active

    def pipeline(self, method, *args):
        """Queue storage.method(*args, txn) on every healthy backend."""
        for share in self._require_active():
            self._submit(share, method, args + (self.txn,))

    def _flush(self, share):
        """Before a worker call: send what a direct share still holds."""
        if share.direct is not None and share.error is None:
            try:
                share.direct.flush()
            except Exception as exc:
                share.error = exc

    def _submit(self, share, method, args):
        if share.direct is not None:
            # Errors are remembered and answered at the vote, as for
            # pipelined calls in the worker.
            if share.error is None:
                try:
                    share.direct.call(method, args)
                except Exception as exc:
                    share.error = exc
            return
        try:
            share.backend.submit(_guarded, share, method, args)
        except Exception as exc:
            self._degrade(share.backend, fanout.describe(exc))

    # -- the protocol ------------------------------------------------------

    def begin(self):
        cache_data = True
        for share in self.shares:
            if share.backend.begin_takes_status:
                args = (self.txn, self.tid, self.status)
            elif self.status == ' ':
                args = (self.txn, self.tid)
            else:
                share.error = ZODB.POSException.Unsupported(
                    'backend %s cannot take transaction status %r'
                    % (share.backend.name, self.status))
                continue
            client = share.backend.direct
            if client is not None and client.can_begin():
                try:
                    # Only the most trusted backend (the usual reader)
                    # keeps the new records in its client cache.
                    share.direct = client.begin(*args,
                                                cache_data=cache_data)
                    cache_data = False
                except Exception as exc:
                    share.error = exc
                continue
            self._submit(share, 'tpc_begin', args)

    def store(self, oid, serial, data):
        self.nbytes += len(data or b'')
        if self.stored_data is not None:
            self.stored_data[oid] = data
        self.pipeline('store', oid, serial, data, '')

    def store_blob(self, method, oid, serial, data, blobfilename, extra):
        """storeBlob/restoreBlob: each backend gets its own link of the file.

        Backends move the file they are given into their own blob
        directory or cache, so one file cannot serve two backends.
        """
        self.blobs.append((oid, blobfilename))
        if self.stored_data is not None:
            self.stored_data[oid] = data
        for share in self._require_active():
            try:
                link = self.raid._blobs.link_for(share.backend, blobfilename)
            except OSError as exc:
                self._degrade(share.backend,
                              'cannot place blob file: %s' % exc)
                continue
            share.blob_links.append(link)
            if method == 'storeBlob':
                args = (oid, serial, data, link, '', self.txn)
            elif share.direct is not None:
                self._restore_blob_direct(share, oid, serial, data, link,
                                          extra)
                continue
            else:
                args = (oid, serial, data, link, extra, self.txn)
            self._submit(share, method, args)

    def _restore_blob_direct(self, share, oid, serial, data, link, prev_txn):
        """restoreBlob on a ZEO backend (DirectTransaction.restore_blob),
        with the backend's current serial read under the deadline."""
        if share.error is not None:
            return
        try:
            current = share.backend.call(self.timeout, current_serial, oid)
            share.direct.restore_blob(oid, serial, data, link, prev_txn,
                                      current)
        except Exception as exc:
            share.error = exc

    def undo(self, transaction_id):
        """Undo on all backends now; returns (tid, oids).

        ZEO's ClientStorage.undo returns nothing (its oids only come back
        from the vote), so the oids are read from the undone transaction.
        """
        futures = {}
        for share in self._require_active():
            try:
                self._flush(share)
                futures[share.backend] = share.backend.submit(
                    _guarded, share, 'undo', (transaction_id, self.txn))
            except Exception as exc:
                self._degrade(share.backend, fanout.describe(exc))
        verdict = self._decide(fanout.gather(futures, self.timeout), 'undo')
        if verdict.error is not None:
            raise self._for_client(verdict.error)
        result = verdict.value
        if isinstance(result, tuple) and len(result) == 2:
            oids = list(result[1])
        else:
            oids = self.raid._oids_of_transaction(
                self.raid._undo_tid(transaction_id))
        return self.tid, oids

    def vote(self):
        if self.raid.cluster_mode == 'coop':
            self._mark()
            outcomes = self._vote_in_order()
        else:
            outcomes = self._vote_parallel()
        verdict = self._decide(outcomes, 'tpc_vote')
        if verdict.error is not None:
            raise self._for_client(verdict.error)
        if self.mark_error is not None:
            raise RAIDError(
                'RAID %s: the commit marker cannot be written (%s); the '
                'transaction is not committed' % (
                    self.raid.getName(), fanout.describe(self.mark_error)))
        if self.raid.cluster_mode == 'coop':
            self._check_coop_order()
        resolved = []
        seen = set()
        for outcome in verdict.winners:
            for oid in outcome.value or ():
                if oid not in seen:
                    seen.add(oid)
                    resolved.append(oid)
        self.voted = True
        return resolved or None

    def _vote_parallel(self):
        """Send the vote to every backend, then wait for all answers."""
        return self._vote_shares(self._require_active(), self.timeout,
                                 sent=self._mark)

    def _mark(self):
        """Record the tid durably before any backend can finish it
        (replicas.CommitMarker); done while the votes are on the way."""
        if self.mark is None:
            return
        try:
            self.mark(self.tid)
        except OSError as exc:
            self.mark_error = exc

    def _vote_in_order(self):
        """coop: vote one backend after the other, in backend-name order.

        A backend's ZEO server takes its commit lock at vote. Taking the
        locks one by one in the same order on every RAID server means two
        servers never hold each other's next lock (no deadlock), and once
        all votes are in, no other writer can commit on these backends
        until this transaction ends. Waiting for another server's lock is
        normal here, so each vote gets twice the deadline.
        """
        outcomes = []
        for share in sorted(self._require_active(),
                            key=lambda s: s.backend.name):
            outcomes.extend(self._vote_shares([share], self.timeout * 2))
        return outcomes

    def _vote_shares(self, shares, timeout, sent=None):
        """Vote on `shares` in parallel; one Outcome per backend voted.

        sent: called once every vote is on its way, before the waiting.
        """
        deadline = time.monotonic() + timeout
        futures = {}
        outcomes = []
        direct = {}
        replies = direct_client.Replies(
            sum(1 for share in shares
                if share.direct is not None and share.error is None))
        handoff = direct_client.Handoff()
        for share in shares:
            if share.direct is None:
                try:
                    futures[share.backend] = share.backend.submit(
                        _vote_call, share, self.txn)
                except Exception as exc:
                    self._degrade(share.backend, fanout.describe(exc))
                continue
            if share.error is not None:
                outcomes.append(fanout.Outcome(share.backend,
                                               error=share.error))
                continue
            reply = replies.slot()
            try:
                share.direct.send_vote(reply, handoff)
            except Exception as exc:
                reply.set(error=exc)
            futures[share.backend] = reply
            direct[share.backend] = share
        handoff.go()
        if sent is not None:
            sent()
        resolving = {}
        for outcome in fanout.gather(futures, timeout):
            share = direct.get(outcome.backend)
            if share is not None and not isinstance(
                    outcome.error, fanout.CONNECTIVITY_ERRORS):
                if outcome.ok and share.direct.needs_resolution(
                        outcome.value):
                    resolving[share.backend] = self._resolve(share,
                                                             outcome.value)
                    continue
                try:
                    outcome.value = share.direct.complete_vote(
                        outcome.value, outcome.error)
                    outcome.error = None
                except Exception as exc:
                    outcome.value, outcome.error = None, exc
            outcomes.append(outcome)
        if resolving:
            outcomes.extend(fanout.gather(
                resolving, max(0.0, deadline - time.monotonic())))
        return outcomes

    def _resolve(self, share, answer):
        """Client-side conflict resolution, in the backend's worker."""
        return share.backend.submit(
            lambda storage: direct_client.resolve_conflicts(
                storage, self.txn, answer))

    def _check_coop_order(self):
        """coop: with every backend's lock held, the order must hold.

        Our tid was chosen at tpc_begin; another RAID server may have
        committed since. If any backend already has our tid or a later
        one, committing would put tids out of order (FileStorage would
        accept it silently): abort with a ConflictError, which ZODB
        retries with a new tid. Backends whose last tid is behind the
        others missed a commit of another server: they are degraded.
        """
        futures = {s.backend: s.backend.submit_read(authoritative_last_tid)
                   for s in self.active()}
        lasts = {}
        for outcome in fanout.gather(futures, self.timeout):
            if outcome.ok:
                lasts[outcome.backend] = outcome.value
            else:
                self._degrade(outcome.backend, 'last tid: %s'
                              % fanout.describe(outcome.error))
        if not lasts:
            self._require_active()
            return
        newest = max(lasts.values())
        if newest >= self.tid:
            raise ZODB.POSException.ConflictError(
                'another RAID server committed %s on the backends after '
                'this transaction chose %s; retry'
                % (newest.hex(), self.tid.hex()))
        for backend, last in lasts.items():
            backend.last_tid = last
            if last < newest:
                self._degrade(backend, (
                    'missing transactions: last tid %s, another RAID server '
                    'committed %s' % (last.hex(), newest.hex())))
        self._require_active()
        self.raid._check_failed()
        if self.raid._failed:
            raise RAIDFailedError('RAID %s: fewer optimal backends than the '
                                  'coop quorum' % self.raid.getName())

    def _decide(self, outcomes, what):
        """Vote; degrade the losers; fail if nobody is left."""
        verdict = fanout.vote(outcomes, self.raid._backends)
        for outcome, reason in verdict.losers:
            self._degrade(outcome.backend, '%s: %s' % (what, reason))
        if not verdict.winners:
            self.raid._check_failed()
            raise RAIDFailedError(
                'RAID %s: every backend failed: %s' % (
                    self.raid.getName(), '; '.join(
                        '%s: %s' % (o.backend.name, r)
                        for o, r in verdict.losers)))
        return verdict

    def _for_client(self, error):
        """The agreed error, in a form a ZODB client understands.

        ZODB's own errors (conflicts, POSKeyError ...) pass unchanged; a
        ConflictError gets the data ZEO's client-side resolution needs.
        Anything else that every backend raised alike (a full disk on
        all of them) is not the application's fault, but the replicas are
        still identical: nobody is degraded, and the client gets a
        StorageError that names the cause.
        """
        if not isinstance(error, ZODB.POSException.POSError):
            return BackendsFailedError(
                'RAID %s: every backend refused the transaction: %s'
                % (self.raid.getName(), fanout.describe(error)))
        if (isinstance(error, ZODB.POSException.ConflictError)
                and self.stored_data is not None
                and getattr(error, 'oid', None)
                and getattr(error, 'data', None) is None):
            error.data = self.stored_data.get(error.oid)
        return error

    def finish(self):
        """Finish on all healthy backends in parallel; returns winners.

        A backend whose finish failed or timed out may or may not have
        committed: it is degraded as "unknown outcome".
        """
        futures = {}
        direct_finishes = {}
        active = self.active()
        replies = direct_client.Replies(
            sum(1 for share in active if share.direct is not None))
        handoff = direct_client.Handoff()
        for share in active:
            share.finished = True
            try:
                if share.direct is None:
                    futures[share.backend] = share.backend.submit(
                        lambda storage: storage.tpc_finish(self.txn,
                                                           lambda tid: None))
                else:
                    reply = replies.slot()
                    try:
                        share.direct.send_finish(reply, handoff)
                    except BaseException:
                        reply.set(error=None)   # nothing to wait for
                        raise
                    futures[share.backend] = reply
                    direct_finishes[share.backend] = share.direct
            except Exception as exc:
                share.finished = False
                self._degrade(share.backend, 'unknown outcome: %s'
                              % fanout.describe(exc))
        handoff.go()
        # Backends degraded earlier in this transaction still hold it
        # open: end it there too.
        for share in self.shares:
            if not share.finished:
                share.backend.abort(self.txn)
        committed = []
        for outcome in fanout.gather(futures, self.timeout):
            backend = outcome.backend
            if not outcome.ok:
                self._degrade(backend, 'unknown outcome: tpc_finish: %s'
                              % fanout.describe(outcome.error))
                # Make sure the backend's transaction ends: harmless if
                # the finish got far enough to end it already. (A direct
                # finish ends it itself when the answer or error comes.)
                if backend not in direct_finishes:
                    backend.abort(self.txn)
            elif outcome.value is not None and outcome.value != self.tid:
                self._degrade(backend, 'committed tid %s, expected %s' % (
                    ZODB.utils.tid_repr(outcome.value),
                    ZODB.utils.tid_repr(self.tid)))
            else:
                backend.last_tid = self.tid
                committed.append(backend)
                if backend in direct_finishes:
                    direct_finishes[backend].complete_finish(self.tid)
        if not committed:
            self.raid._check_failed()
            raise RAIDFailedError(
                'RAID %s: no backend confirmed the commit of %s; '
                'outcome unknown' % (self.raid.getName(),
                                     ZODB.utils.tid_repr(self.tid)))
        return committed

    def abort(self):
        """tpc_abort on every backend that got tpc_begin and no finish."""
        for share in self.shares:
            if share.finished:
                continue
            if share.backend.optimal:
                error = share.backend.abort(self.txn, self.timeout)
                if error is not None:
                    self._degrade(share.backend, 'tpc_abort: %s'
                                  % fanout.describe(error))
            else:
                share.backend.abort(self.txn)

    def cleanup(self, committed):
        """Remove temporary blob files; publish blobs for shared clients."""
        if committed:
            self.raid._blobs.publish(self.blobs, self.tid)
        for share in self.shares:
            for link in share.blob_links:
                _remove(link)
        for _, filename in self.blobs:
            _remove(filename)


def _remove(filename):
    try:
        os.remove(filename)
    except FileNotFoundError:
        pass
    except OSError as exc:
        logger.warning('could not remove temporary blob file %s: %s',
                       filename, exc)


class BlobPlacement:
    """Where uploaded blobs go: per-backend links, and the RAID's own dir.

    A hard link costs no copy; a copy is made only when a backend's
    temporary directory is on another file system.
    """

    def __init__(self, blob_dir, shared):
        self.blob_dir = blob_dir
        self.shared = shared
        self.fshelper = None
        if blob_dir is not None:
            import ZODB.blob
            self.fshelper = ZODB.blob.FilesystemHelper(blob_dir)
            self.fshelper.create()

    @property
    def temp_dir(self):
        return self.fshelper.temp_dir if self.fshelper else None

    def link_for(self, backend, filename):
        target_dir = backend.blob_temp_dir or self.temp_dir
        fd, target = tempfile.mkstemp(suffix='.tmp', prefix='raid-',
                                      dir=target_dir)
        os.close(fd)
        os.remove(target)
        try:
            os.link(filename, target)
        except OSError:
            shutil.copyfile(filename, target)
        return target

    def publish(self, blobs, tid):
        """Shared blob dir: put committed blobs where clients read them."""
        if not (self.shared and self.fshelper):
            return
        for oid, filename in blobs:
            if not os.path.exists(filename):
                continue
            self.fshelper.getPathForOID(oid, create=True)
            target = self.fshelper.getBlobFilename(oid, tid)
            try:
                os.link(filename, target)
            except FileExistsError:
                pass
            except OSError:
                shutil.copyfile(filename, target)

    def cached_path(self, oid, serial):
        """The blob's path in the RAID's own dir, if it is there."""
        if not self.fshelper:
            return None
        path = self.fshelper.getBlobFilename(oid, serial)
        return path if os.path.exists(path) else None

    def cache(self, oid, serial, source):
        """Place a backend's blob file in the shared dir; return its path."""
        self.fshelper.getPathForOID(oid, create=True)
        target = self.fshelper.getBlobFilename(oid, serial)
        tmp = target + '.raid-tmp'
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
        os.replace(tmp, target)
        return target
