"""Replica verification: are the backends (or backup files) identical?

Compares storages transaction by transaction, in tid order, all at once:
tid, status, user, description, extension, and per record the oid and a
hash of the pickle (and, for blob records, a hash of the blob file).  Only
hashes are kept, so memory stays flat however big the transactions are.

Online-safe: the comparison stops at the *common* tid, the smallest
lastTransaction of the storages when the check starts (asked of the
server for ClientStorage backends).  Everything at or below it is
committed everywhere and cannot change, so concurrent commits neither
disturb the check nor show up as differences.  What lies beyond the
common tid is checked separately (the "tail" check): every storage must
have reached a target tid, the RAID's lastTransaction for a RAID, else the
highest last tid for storages nobody writes to.

Read-only: it only iterates, asks for last tids and loads blobs.

The same module is the offline command ``zeoraid-verify`` (``main``) for
operators checking FileStorage copies, e.g. backups.
"""
import argparse
import binascii
import collections
import hashlib
import json
import logging
import os
import sys
import time

import ZODB.blob
import ZODB.interfaces
import ZODB.POSException
from ZODB.utils import p64
from ZODB.utils import u64
from ZODB.utils import z64

from zeoraid.backend import SerialWorker
from zeoraid.backend import authoritative_last_tid
from zeoraid.backend import close_iterator
from zeoraid.backend import wait_for
from zeoraid.errors import BackendTimeout
from zeoraid.errors import RAIDError
from zeoraid.recovery import RateLimiter
from zeoraid.recovery import describe

logger = logging.getLogger('zeoraid.verify')

IDENTICAL, DIVERGENT, CANNOT_CHECK = 0, 2, 3

#: Kinds of difference a Divergence can report.
KINDS = (
    'missing transaction',   # the backend lacks a tid the reference has
    'extra transaction',     # the backend has a tid the reference lacks
    'metadata status', 'metadata user', 'metadata description',
    'metadata extension',
    'missing record',        # the transaction lacks a record of this oid
    'extra record',          # the transaction has a record of this oid more
    'data',                  # the record's pickle differs
    'missing blob',          # the blob file of a blob record is not there
    'blob',                  # the blob file's content differs
)

BLOB_CHUNK = 1 << 20

#: Online, reading and hashing one blob may take this long (seconds) at
#: least, whatever the RAID's own timeout.
BLOB_TIMEOUT = 60


class CannotVerify(RAIDError):
    """The check could not be done (the message says which storage, why)."""


class NoBlobDir(CannotVerify):
    """A storage holds blob records but cannot load blobs."""

    def __init__(self, name):
        CannotVerify.__init__(
            self, 'cannot check blobs: storage %s holds blob records but '
            'has no blob directory (give it one, or skip blobs)' % name)
        self.name = name


def tid_hex(tid):
    return tid.hex() if tid else None


def parse_tid(value):
    """bytes (8) or 16 hex digits (optionally 0x...) -> 8-byte tid."""
    if value is None or isinstance(value, bytes) and len(value) == 8:
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text.startswith('0x'):
            text = text[2:]
        if len(text) == 16:
            try:
                return binascii.unhexlify(text)
            except binascii.Error:
                pass
    raise ValueError('a tid is 16 hex digits, not %r' % (value,))


class Divergence:
    """The first difference found: where exactly, and what differs."""

    def __init__(self, backend, reference, tid, kind, oid=None, detail=''):
        assert kind in KINDS, kind
        self.backend = backend
        self.reference = reference
        self.tid = tid
        self.oid = oid
        self.kind = kind
        self.detail = detail

    def as_dict(self):
        return {'backend': self.backend, 'reference': self.reference,
                'tid': tid_hex(self.tid), 'oid': tid_hex(self.oid),
                'kind': self.kind, 'detail': self.detail}

    def __str__(self):
        where = 'tid %s' % (tid_hex(self.tid) or '?')
        if self.oid is not None:
            where += ' oid %s' % self.oid.hex()
        text = '%s differs from %s at %s: %s' % (
            self.backend, self.reference, where, self.kind)
        if self.detail:
            text += ' (%s)' % self.detail
        return text


class Report:
    """What a verification found; as_dict() is what the admin op returns."""

    def __init__(self, names):
        self.storages = list(names)
        self.start = None        # first tid asked for (None: from the start)
        self.upto = None         # the common tid compared up to
        self.target = None       # tid every storage must have reached
        self.last_tid = None     # last tid found identical everywhere
        self.transactions = 0
        self.records = 0
        self.blobs = 0
        self.divergence = None
        self.lagging = []
        self.lasts = {}          # name -> last tid of each at the start
        self.seconds = 0.0

    @property
    def identical(self):
        return self.divergence is None

    def summary(self):
        """One line: the verdict and the essentials."""
        if self.identical:
            return ('IDENTICAL: %d storages (%s), %s compared up to %s' % (
                len(self.storages), ', '.join(self.storages), self._counts(),
                tid_hex(self.last_tid) or 'the start'))
        return 'DIVERGENT: %s' % self.divergence

    def details(self):
        """Further lines for humans (the one-line summary comes first)."""
        lines = ['storages: %s (reference %s)' % (
            ', '.join(self.storages), self.storages[0])]
        if self.start is not None:
            lines.append('started at tid %s' % self.start.hex())
        lines.append('compared %s in %.2fs' % (self._counts(), self.seconds))
        lines.append('common tid %s, every storage must reach %s' % (
            tid_hex(self.upto), tid_hex(self.target)))
        if self.lagging:
            lines.append('allowed to lag (recovering): %s'
                         % ', '.join(self.lagging))
        if self.last_tid is not None and self.identical:
            lines.append('next incremental check: --since %s'
                         % self.last_tid.hex())
        elif self.last_tid is not None:
            lines.append('identical up to tid %s' % self.last_tid.hex())
        return lines

    def _counts(self):
        return ', '.join('%d %s%s' % (n, what, '' if n == 1 else 's')
                         for n, what in ((self.transactions, 'transaction'),
                                         (self.records, 'record'),
                                         (self.blobs, 'blob')))

    def as_dict(self):
        return {
            'identical': self.identical,
            'consistent': self.identical,   # the manager's exit-2 key
            'summary': self.summary(),
            'storages': self.storages,
            'start': tid_hex(self.start),
            'upto': tid_hex(self.upto),
            'target': tid_hex(self.target),
            'last_tid': tid_hex(self.last_tid),
            'transactions': self.transactions,
            'records': self.records,
            'blobs': self.blobs,
            'lagging': self.lagging,
            'last_tids': {name: tid_hex(tid)
                          for name, tid in self.lasts.items()},
            'seconds': round(self.seconds, 3),
            'divergence': (self.divergence.as_dict()
                           if self.divergence is not None else None),
        }


class _Txn:
    """One storage's transaction, reduced to what is compared."""

    __slots__ = ('tid', 'status', 'user', 'description', 'extension',
                 'records', 'nbytes')

    def __init__(self, info, algorithm):
        self.tid = info.tid
        self.status = info.status
        self.user = info.user
        self.description = info.description
        self.extension = dict(info.extension or {})
        records = []
        nbytes = 0
        for r in info:
            data = r.data
            if data is None:
                records.append((r.oid, None, False))
                continue
            nbytes += len(data)
            records.append((r.oid, hashlib.new(algorithm, data).hexdigest(),
                            ZODB.blob.is_blob_record(data)))
        # Record order inside a transaction carries no meaning; a stable
        # sort keeps a blob commit's two records of one oid in order.
        records.sort(key=lambda record: record[0])
        self.records = records
        self.nbytes = nbytes


def _other(name, reference, candidates):
    """Whom to report `name` against: the reference unless it is `name`."""
    if name != reference:
        return reference
    return candidates[0] if candidates else reference


def _short(digest):
    return digest[:16] if digest else 'no data'


class _Verifier:
    def __init__(self, storages, algorithm, blobs, limiter, progress,
                 timeout=None):
        self.storages = storages
        self.names = list(storages)
        self.reference = self.names[0]
        self.algorithm = algorithm
        self.blobs = blobs
        self.limiter = limiter
        self.progress = progress
        self.timeout = timeout
        self.workers = {}        # name -> SerialWorker (with a timeout)
        self.hung = set()        # storages that missed the deadline

    def call(self, name, fn, *args, timeout=None):
        """Run a storage call; a failure means 'cannot check', not 'differ'.

        With a timeout (online, on a RAID's backends) the call runs in the
        storage's own thread and a storage that does not answer in time
        fails the check instead of holding it forever.
        """
        try:
            if self.timeout is None:
                return fn(*args)
            return self._in_thread(name, fn, args, timeout or self.timeout)
        except CannotVerify:
            raise
        except Exception as exc:
            raise CannotVerify('cannot check: storage %s failed: %s'
                               % (name, describe(exc))) from exc

    def _in_thread(self, name, fn, args, timeout):
        if name in self.hung:
            raise CannotVerify('cannot check: storage %s did not answer in '
                               'time' % name)
        worker = self.workers.get(name)
        if worker is None:
            worker = self.workers[name] = SerialWorker(
                'zeoraid-verify-%s' % name)
        try:
            return wait_for(worker.submit(fn, *args), timeout,
                            'storage %s' % name)
        except BackendTimeout:
            self.hung.add(name)
            raise

    def close(self):
        """End the storages' threads (a hung one ends when its call does)."""
        for worker in self.workers.values():
            worker.shutdown()

    def next_txn(self, name, iterator):
        def read():
            try:
                info = next(iterator)
            except StopIteration:
                return None
            return _Txn(info, self.algorithm)
        return self.call(name, read)

    # -- the comparison --------------------------------------------------

    def compare_range(self, report, start, stop):
        iterators = {}
        try:
            for name in self.names:
                iterators[name] = self.call(
                    name, lambda s: iter(s.iterator(start, stop)),
                    self.storages[name])
            heads = {name: self.next_txn(name, it)
                     for name, it in iterators.items()}
            while True:
                present = [t.tid for t in heads.values() if t is not None]
                if not present:
                    return None
                tid = min(present)
                divergence = self._presence(heads, tid)
                if divergence is not None:
                    return divergence
                self.limiter.acquire(
                    max(t.nbytes for t in heads.values()))
                divergence = self.compare_txn(heads)
                if divergence is not None:
                    return divergence
                report.transactions += 1
                report.records += len(heads[self.reference].records)
                report.last_tid = tid
                if self.progress is not None:
                    self.progress(report.transactions, tid)
                heads = {name: self.next_txn(name, it)
                         for name, it in iterators.items()}
        finally:
            for name, iterator in iterators.items():
                if name not in self.hung:
                    try:
                        self.call(name, close_iterator, iterator)
                    except CannotVerify:
                        pass        # it missed the deadline closing

    def _presence(self, heads, tid):
        holders = [n for n in self.names
                   if heads[n] is not None and heads[n].tid == tid]
        if len(holders) == len(self.names):
            return None
        if self.reference in holders:
            lacking = [n for n in self.names if n not in holders][0]
            return Divergence(lacking, self.reference, tid,
                              'missing transaction',
                              detail='%s has it, %s does not'
                              % (self.reference, lacking))
        return Divergence(holders[0], self.reference, tid,
                          'extra transaction',
                          detail='%s has it, %s does not'
                          % (holders[0], self.reference))

    def compare_txn(self, heads):
        ref = heads[self.reference]
        for name in self.names[1:]:
            txn = heads[name]
            for field in ('status', 'user', 'description', 'extension'):
                mine, theirs = getattr(ref, field), getattr(txn, field)
                if mine != theirs:
                    return Divergence(
                        name, self.reference, ref.tid, 'metadata ' + field,
                        detail='%r != %r' % (theirs, mine))
            divergence = self._compare_records(name, ref, txn)
            if divergence is not None:
                return divergence
        if self.blobs:
            return self._compare_blobs(ref)
        return None

    def _compare_records(self, name, ref, txn):
        ref_oids = collections.Counter(r[0] for r in ref.records)
        oids = collections.Counter(r[0] for r in txn.records)
        if ref_oids != oids:
            missing = ref_oids - oids
            extra = oids - ref_oids
            first_missing = min(missing) if missing else None
            first_extra = min(extra) if extra else None
            if first_extra is None or (first_missing is not None
                                       and first_missing < first_extra):
                return Divergence(name, self.reference, ref.tid,
                                  'missing record', first_missing,
                                  '%s has a record of this object, %s '
                                  'does not' % (self.reference, name))
            return Divergence(name, self.reference, ref.tid, 'extra record',
                              first_extra, '%s has a record of this '
                              'object, %s does not' % (name, self.reference))
        for (oid, mine, _), (_, theirs, _) in zip(ref.records, txn.records):
            if mine != theirs:
                return Divergence(
                    name, self.reference, ref.tid, 'data', oid,
                    '%s %s in %s, %s in %s' % (
                        self.algorithm, _short(theirs), name, _short(mine),
                        self.reference))
        return None

    def _compare_blobs(self, ref):
        seen = set()
        for oid, _, is_blob in ref.records:
            if not is_blob or oid in seen:
                continue
            seen.add(oid)
            hashes = {name: self._blob_hash(name, oid, ref.tid)
                      for name in self.names}
            for name in self.names:
                if hashes[name] is None:
                    other = [n for n in self.names if hashes[n] is not None]
                    return Divergence(
                        name, _other(name, self.reference, other), ref.tid,
                        'missing blob', oid, 'no blob file in %s%s' % (
                            name, ', %s has one' % other[0] if other
                            else ', nor in any other storage'))
            mine = hashes[self.reference]
            for name in self.names[1:]:
                if hashes[name] != mine:
                    return Divergence(
                        name, self.reference, ref.tid, 'blob', oid,
                        '%s %s in %s, %s in %s' % (
                            self.algorithm, _short(hashes[name]), name,
                            _short(mine), self.reference))
        self.blob_count += len(seen)
        return None

    blob_count = 0

    def _blob_hash(self, name, oid, tid):
        storage = self.storages[name]
        if not ZODB.interfaces.IBlobStorage.providedBy(storage):
            raise NoBlobDir(name)

        def digest():
            try:
                path = storage.loadBlob(oid, tid)
            except ZODB.POSException.POSKeyError:
                return None
            if not os.path.exists(path):
                return None
            h = hashlib.new(self.algorithm)
            with open(path, 'rb') as f:
                while True:
                    chunk = f.read(BLOB_CHUNK)
                    if not chunk:
                        break
                    h.update(chunk)
            return h.hexdigest()
        return self.call(name, digest, timeout=self.blob_timeout)

    @property
    def blob_timeout(self):
        """Blobs are downloaded and hashed: at least a minute."""
        return max(self.timeout, BLOB_TIMEOUT) if self.timeout else None

    # -- beyond the common tid -------------------------------------------

    def check_tail(self, lasts, target, expect_given, lagging):
        """Every storage (but lagging ones) must have reached target."""
        short = [n for n in self.names
                 if n not in lagging and lasts[n] < target]
        if not short:
            return None
        holders = [n for n in self.names if lasts[n] >= target]
        if not expect_given and self.reference in short:
            # Nobody writes: the reference ends early, the others go on.
            name = holders[0]
            tid = self._first_after(holders[0], lasts[self.reference],
                                    target)
            return Divergence(
                name, self.reference, tid, 'extra transaction',
                detail='%s ends at %s, %s goes on to %s' % (
                    self.reference, tid_hex(lasts[self.reference]) or
                    'empty', name, tid_hex(lasts[name])))
        name = short[0]
        source = self.reference if self.reference in holders else (
            holders[0] if holders else None)
        tid = (self._first_after(source, lasts[name], target)
               if source is not None else None)
        return Divergence(
            name, _other(name, self.reference, holders), tid,
            'missing transaction',
            detail='%s ends at %s, %s' % (
                name, tid_hex(lasts[name]) or 'empty',
                'the RAID committed up to %s' % target.hex() if expect_given
                else '%s goes on to %s' % (source, target.hex())))

    def _first_after(self, name, last, target):
        def first():
            it = self.storages[name].iterator(p64(u64(last) + 1), target)
            try:
                for txn in it:
                    return txn.tid
                return None
            finally:
                close_iterator(it)
        return self.call(name, first)


def verify_storages(storages, start=None, stop=None, since=None, rate=0,
                    blobs=True, progress=None, expect_tid=None, lagging=(),
                    check_tail=True, algorithm='sha256',
                    clock=time.monotonic, sleep=time.sleep, timeout=None):
    """Compare storages transaction by transaction; return a Report.

    storages: {name: opened storage}; the first one is the reference that
    differences are reported against.  start (inclusive) or since
    (exclusive: the last_tid of an earlier report) and stop (inclusive)
    bound the tids compared, as bytes or 16 hex digits.  rate: transactions
    per second, 0 for unlimited.  blobs: also compare blob files.
    progress(count, tid) is called after each transaction compared.

    expect_tid: the tid every storage not in `lagging` must have reached
    (a RAID's lastTransaction, read before this call); default: the
    highest last tid of the storages, right for storages nobody writes to.
    check_tail=False skips that check (storages being written by others).

    timeout: seconds each storage call may take (blobs: at least
    BLOB_TIMEOUT); a storage that misses it makes the check fail with
    CannotVerify. None (offline files): no deadline.

    Raises CannotVerify (with a one-line message) when the check cannot be
    done: fewer than two storages, a storage failing or lacking blobs.
    """
    started = clock()
    if len(storages) < 2:
        raise CannotVerify('cannot check: need at least two storages to '
                           'compare, got %d (%s)' % (
                               len(storages), ', '.join(storages) or '-'))
    if since is not None and start is not None:
        raise ValueError('give start or since, not both')
    start = parse_tid(start)
    since = parse_tid(since)
    stop = parse_tid(stop)
    expect_tid = parse_tid(expect_tid)
    if since is not None:
        start = p64(u64(since) + 1)
    report = Report(storages)
    report.start = start
    report.lagging = [n for n in storages if n in lagging]
    verifier = _Verifier(storages, algorithm, blobs,
                         RateLimiter(rate, clock=clock, sleep=sleep),
                         progress, timeout)
    try:
        lasts = {name: verifier.call(name, authoritative_last_tid, storage)
                 for name, storage in storages.items()}
        report.lasts = lasts
        upto = min(lasts.values())
        if stop is not None:
            upto = min(upto, stop)
        report.upto = upto
        target = (expect_tid if expect_tid is not None
                  else max(lasts.values()))
        if stop is not None:
            target = min(target, stop)
        report.target = target
        logger.info('verify %s: from %s up to common tid %s', ', '.join(
            storages), tid_hex(start) or 'the start', tid_hex(upto))
        first = start or z64
        divergence = None
        if upto != z64 and upto >= first:
            divergence = verifier.compare_range(report, first, upto)
        if divergence is None and check_tail:
            divergence = verifier.check_tail(
                lasts, target, expect_tid is not None, lagging)
        report.blobs = verifier.blob_count
        report.divergence = divergence
        if divergence is None:
            # Everything up to `upto` was compared: the next incremental
            # check continues after it (or after `since` if nothing was
            # new).
            if upto != z64 and upto >= first:
                report.last_tid = upto
            elif since is not None:
                report.last_tid = since
        report.seconds = clock() - started
        if divergence is None:
            logger.info('verify: %s', report.summary())
        else:
            logger.warning('verify: %s', report.summary())
        return report
    finally:
        verifier.close()


def verify_raid(raid, **kw):
    """Verify a RAID's optimal and recovering backends against each other.

    Optimal backends come first, so the reference is an optimal one.  The
    RAID's lastTransaction is read before the backends' last tids: every
    backend still optimal afterwards had finished that commit, so it must
    have reached it; recovering backends are allowed to lag (only their
    common prefix is compared).

    Every backend call has the RAID's timeout: a hung backend fails the
    check (CannotVerify) instead of holding it.
    """
    expect = raid.lastTransaction()
    details = raid.raid_details()
    optimal = sorted(n for n, d in details.items() if d['state'] == 'optimal')
    recovering = sorted(n for n, d in details.items()
                        if d['state'] == 'recovering')
    storages = {}
    for name in optimal + recovering:
        storage = raid.raid_backend_storage(name)
        if storage is None:
            raise CannotVerify('cannot check: backend %s of RAID %s is not '
                               'open' % (name, raid.getName()))
        storages[name] = storage
    if len(storages) < 2:
        raise CannotVerify(
            'cannot check: RAID %s has %d optimal or recovering backend%s '
            '(%s); need two to compare' % (
                raid.getName(), len(storages),
                '' if len(storages) == 1 else 's',
                ', '.join('%s %s' % (n, d['state'])
                          for n, d in sorted(details.items()))))
    kw.setdefault('expect_tid', expect)
    kw.setdefault('lagging', recovering)
    kw.setdefault('timeout', raid.timeout)
    return verify_storages(storages, **kw)


# -- the offline command ---------------------------------------------------


class _ArgumentParser(argparse.ArgumentParser):
    """Bad arguments exit 3 ('cannot check') with one line."""

    def error(self, message):
        raise _Usage(message)


class _Usage(Exception):
    pass


def _parser():
    parser = _ArgumentParser(
        prog='zeoraid-verify',
        description='Compare FileStorage files (e.g. the backends of a RAID '
        'or their backups) transaction by transaction, read-only. Exit 0: '
        'identical, 2: divergent, 3: cannot check.')
    parser.add_argument('paths', nargs='+', metavar='FILE.fs',
                        help='FileStorage files; the first is the reference')
    parser.add_argument('--since', metavar='TID',
                        help='only transactions after TID (16 hex digits, '
                        'the last tid of an earlier check)')
    parser.add_argument('--rate', type=float, default=0, metavar='N',
                        help='at most N transactions per second (default '
                        '0: unlimited)')
    parser.add_argument('--no-blobs', dest='blobs', action='store_false',
                        help='do not compare blob files')
    parser.add_argument('--blob-dir', action='append', default=[],
                        metavar='FILE.fs=DIR',
                        help='the blob directory of FILE.fs (repeatable)')
    parser.add_argument('--json', action='store_true',
                        help='print the report as JSON')
    return parser


def _blob_dirs(paths, specs):
    """Map each --blob-dir FILE.fs=DIR to one of the given paths."""
    real = {os.path.realpath(p): p for p in paths}
    result = {}
    for spec in specs:
        match = None
        for i, char in enumerate(spec):
            if char != '=':
                continue
            left = spec[:i]
            if left in paths:
                match = (left, spec[i + 1:])
                break
            if os.path.realpath(left) in real:
                match = (real[os.path.realpath(left)], spec[i + 1:])
                break
        if match is None or not match[1]:
            raise _Usage('--blob-dir %s does not name one of the given files '
                         'as FILE.fs=DIR' % spec)
        path, directory = match
        if not os.path.isdir(directory):
            raise CannotVerify('cannot check: blob directory %s of %s does '
                               'not exist' % (directory, path))
        result[path] = directory
    return result


def _open_filestorages(paths, blob_dirs):
    from ZODB.FileStorage import FileStorage
    storages = {}
    try:
        for path in paths:
            if path in storages:
                raise _Usage('%s is given twice' % path)
            if not os.path.isfile(path):
                raise CannotVerify('cannot check: %s: no such file' % path)
            kw = {'read_only': True}
            if path in blob_dirs:
                kw['blob_dir'] = blob_dirs[path]
            try:
                storages[path] = FileStorage(path, **kw)
            except Exception as exc:
                raise CannotVerify('cannot check: %s cannot be opened as a '
                                   'FileStorage: %s' % (path, describe(exc)))
    except BaseException:
        _close_all(storages)
        raise
    return storages


def _close_all(storages):
    for storage in storages.values():
        try:
            storage.close()
        except Exception:
            logger.exception('closing %s', storage)


def main(argv=None):
    """zeoraid-verify: exit 0 identical, 2 divergent, 3 cannot check."""
    parser = _parser()
    as_json = False
    try:
        options = parser.parse_args(argv)
        as_json = options.json
        if options.rate < 0:
            raise _Usage('--rate must be 0 (unlimited) or more, not %g'
                         % options.rate)
        try:
            since = parse_tid(options.since)
        except ValueError:
            raise _Usage('--since takes a tid of 16 hex digits, not %r'
                         % options.since) from None
        if len(options.paths) < 2:
            raise _Usage('give at least two FileStorage files to compare')
        blob_dirs = _blob_dirs(options.paths, options.blob_dir)
        # ZODB warns about things like a stale index on stderr; only
        # errors matter here, the verdict is on stdout.
        logging.basicConfig(level=logging.ERROR, stream=sys.stderr,
                            format='%(levelname)s %(name)s: %(message)s')
        storages = _open_filestorages(options.paths, blob_dirs)
        try:
            report = verify_storages(storages, since=since,
                                     rate=options.rate, blobs=options.blobs)
        finally:
            _close_all(storages)
    except _Usage as exc:
        return _fail('%s (see zeoraid-verify -h)' % exc, as_json)
    except NoBlobDir as exc:
        return _fail('cannot check blobs: %s holds blob records; give its '
                     'blob directory (--blob-dir %s=DIR) or skip blobs '
                     '(--no-blobs)' % (exc.name, exc.name), as_json)
    except CannotVerify as exc:
        return _fail(str(exc), as_json)
    except KeyboardInterrupt:
        return _fail('interrupted', as_json)
    try:
        if as_json:
            print(json.dumps(report.as_dict(), indent=2, sort_keys=True))
        else:
            print(report.summary())
            for line in report.details():
                print('  ' + line)
        sys.stdout.flush()
    except BrokenPipeError:
        # Output piped into `head`: the verdict is in the exit code.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return IDENTICAL if report.identical else DIVERGENT


def _fail(message, as_json):
    message = ' '.join(str(message).split())
    if as_json:
        print(json.dumps({'ok': False, 'error': message}, sort_keys=True))
    sys.stderr.write('zeoraid-verify: %s\n' % message)
    return CANNOT_CHECK


if __name__ == '__main__':
    sys.exit(main())
