"""The chaos harness: a real RAID cluster, real faults, checked invariants.

Topology (everything on 127.0.0.1, every process real)::

    client threads --ZEO--> zeoraid server --ZEO--> FaultProxy --> runzeo b1
    (ZODB.DB each)          (python -m            (tests.tcpproxy)   runzeo b2
                             zeoraid.server)                         runzeo b3

``Cluster`` starts and owns all of it; ``ClientLoad`` commits counters,
BTree inserts and blobs from several threads and records every commit it
saw succeed; ``Cluster.check(load)`` asserts the invariants:

1. no client got a non-retryable error (one backend at a time is faulty,
   so at least one is always healthy);
2. no client-visible commit took longer than the deadline
   (``CLIENT_DEADLINE_FACTOR`` * RAID timeout + ``CLIENT_DEADLINE_SLACK``);
3. every transaction a client saw committed is on every optimal backend,
   and the data it wrote is there (tree keys, counters, blob bytes);
4. the optimal backends are identical: tids, metadata, records, blob bytes;
5. after recovery of every degraded backend (through the admin endpoint),
   all backends are identical and hold every committed transaction.

Replicas are compared over ZEO, straight to the backend servers (not
through the proxies), while the RAID is idle.
"""
import collections
import hashlib
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import BTrees.Length
import resource
import transaction
import transaction.interfaces
import ZEO.ClientStorage
import ZODB
import ZODB.blob
import ZODB.POSException
from BTrees.OOBTree import OOBTree
from persistent.mapping import PersistentMapping
from ZODB.utils import tid_repr

from tests.polling import wait_until
from tests.tcpproxy import FaultProxy
from tests.zeo_backends import BackendServer
from zeoraid.manager.client import AdminClient
from zeoraid.manager.client import AdminRefused
from zeoraid.manager.client import AdminUnreachable

logger = logging.getLogger(__name__)

#: A client-visible commit must end within factor * timeout + slack.
CLIENT_DEADLINE_FACTOR = 4
CLIENT_DEADLINE_SLACK = 2.0
START_TIMEOUT = 60.0
RECOVERY_TIMEOUT = 30.0
_ADDRESS_RE = re.compile(r'serving storages .* on ([\d.]+):(\d+);')




# -- backends -----------------------------------------------------------------


class Backend:
    """One backend: a runzeo process behind its FaultProxy."""

    kind = 'runzeo'

    def __init__(self, name, directory, blobs=True):
        self.name = name
        self.server = BackendServer(directory, blob_dir=blobs)
        self.proxy = None
        self.stopped = False       # SIGSTOPped

    def launch(self):
        self.server.launch()

    def finish_start(self):
        self.server.wait_started()
        self.proxy = FaultProxy(self.server.addr, name=self.name)

    @property
    def addr(self):
        return self.server.addr

    @property
    def running(self):
        return self.server.running

    def client(self):
        """A read-only ClientStorage straight to the server (no proxy)."""
        return self.server.client(read_only=True, wait_timeout=15)

    def kill(self):
        """kill -9."""
        self.cont()
        self.server.kill()

    def restart(self):
        if not self.server.running:
            self.server.restart()

    def sigstop(self):
        os.kill(self.server.process.pid, signal.SIGSTOP)
        self.stopped = True

    def cont(self):
        if self.stopped and self.server.running:
            os.kill(self.server.process.pid, signal.SIGCONT)
        self.stopped = False

    def limit_file_size(self, extra=0):
        """"Disk full": the server cannot grow any file past its Data.fs
        size plus `extra` bytes (RLIMIT_FSIZE; Python ignores SIGXFSZ, so
        writes fail with EFBIG)."""
        size = os.path.getsize(self.server.path) + extra
        _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.prlimit(self.server.process.pid, resource.RLIMIT_FSIZE,
                         (size, hard))

    def unlimit_file_size(self):
        if self.server.running:
            _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
            resource.prlimit(self.server.process.pid,
                             resource.RLIMIT_FSIZE, (hard, hard))

    def wipe(self):
        """Stop the server and start it again on an empty storage (the
        operator's "full rebuild" first step)."""
        self.cont()
        self.server.stop()
        for name in os.listdir(self.server.directory):
            path = os.path.join(self.server.directory, name)
            if name.startswith('Data.fs'):
                os.remove(path)
            elif name == 'blobs':
                shutil.rmtree(path)
        self.server.restart()

    def heal(self):
        """Undo every fault: proxy passes, process runs, no file limit."""
        if self.proxy is not None:
            self.proxy.disarm()
            self.proxy.heal()
        self.cont()
        self.restart()
        self.unlimit_file_size()

    def close(self):
        if self.proxy is not None:
            self.proxy.close()
        self.cont()
        self.server.stop()


class FaultyBackend(Backend):
    """A backend whose storage raises on command: FaultyStorage over a
    FileStorage, served by a ZEO StorageServer in a thread of the test
    process (the only in-process part of the topology)."""

    kind = 'faulty'

    def __init__(self, name, directory, blobs=True):
        self.name = name
        self.directory = directory
        self.blob_dir = os.path.join(directory, 'blobs') if blobs else None
        self.path = os.path.join(directory, 'Data.fs')
        self.proxy = None
        self.stopped = False
        self.faulty = None
        self._zeo = None
        self._addr = None
        self._clients = 0

    def launch(self):
        from ZEO.StorageServer import StorageServer
        from ZODB.FileStorage import FileStorage

        from tests.faulty import FaultyStorage
        os.makedirs(self.directory, exist_ok=True)
        self.faulty = FaultyStorage(
            FileStorage(self.path, blob_dir=self.blob_dir), name=self.name)
        self._zeo = StorageServer(('127.0.0.1', 0), {'1': self.faulty})
        self._zeo.start_thread()
        self._addr = self._zeo.acceptor.addr[:2]

    def finish_start(self):
        self.proxy = FaultProxy(self._addr, name=self.name)

    @property
    def addr(self):
        return self._addr

    @property
    def running(self):
        return self._zeo is not None

    def client(self):
        self._clients += 1
        options = dict(storage='1', wait=True, wait_timeout=15,
                       read_only=True)
        if self.blob_dir:
            options['blob_dir'] = os.path.join(
                self.directory, 'check-blobs-%d' % self._clients)
        return ZEO.ClientStorage.ClientStorage(self._addr, **options)

    def kill(self):
        raise NotImplementedError('an in-process backend cannot be killed')

    sigstop = kill

    def restart(self):
        pass

    def cont(self):
        pass

    def unlimit_file_size(self):
        pass

    def heal(self):
        if self.proxy is not None:
            self.proxy.disarm()
            self.proxy.heal()
        if self.faulty is not None:
            self.faulty.reset()

    def close(self):
        if self.proxy is not None:
            self.proxy.close()
        if self.faulty is not None:
            self.faulty.reset()
        if self._zeo is not None:
            self._zeo.close()
            self._zeo = None


# -- the zeoraid server process -----------------------------------------------


class RaidProcess:
    """``python -m zeoraid.server -C conf`` over the backends' proxies."""

    def __init__(self, directory, backends, timeout=1.0, blobs=True,
                 extra_options=''):
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        self.backends = backends
        self.timeout = timeout
        self.blobs = blobs
        self.extra_options = extra_options
        self.conf = os.path.join(directory, 'zeoraid.conf')
        self.pidfile = os.path.join(directory, 'zeoraid.pid')
        self.admin_socket = os.path.join(directory, 'admin.sock')
        self.eventlog = os.path.join(directory, 'zeoraid.log')
        self.out_path = os.path.join(directory, 'zeoraid.out')
        self.process = None
        self.addr = None
        self.port = 0
        self.starts = 0

    def config_text(self):
        lines = [
            '%import zeoraid',
            '<zeo>',
            '  address 127.0.0.1:%d' % self.port,
            '  pid-filename %s' % self.pidfile,
            '</zeo>',
            '<zeoraid>',
            '  admin-socket %s' % self.admin_socket,
            '</zeoraid>',
            '<raidstorage 1>',
            '  timeout %gs' % self.timeout,
        ]
        if self.blobs:
            lines.append('  blob-dir %s'
                         % os.path.join(self.directory, 'raid-blobs'))
        if self.extra_options:
            lines.append('  ' + self.extra_options)
        for backend in self.backends:
            lines += [
                '  <zeoclient %s>' % backend.name,
                '    server %s:%d' % backend.proxy.address,
                '    storage 1',
                '    min-disconnect-poll 1',
                '    max-disconnect-poll 1',
            ]
            if self.blobs:
                lines += ['    blob-dir %s' % os.path.join(
                    self.directory, 'cache-%s' % backend.name),
                    '    blob-cache-size 10MB']
            lines.append('  </zeoclient>')
        lines += [
            '</raidstorage>',
            '<eventlog>',
            '  level INFO',
            '  <logfile>',
            '    path %s' % self.eventlog,
            '    format %(asctime)s %(levelname)s %(name)s %(message)s',
            '  </logfile>',
            '</eventlog>',
        ]
        return '\n'.join(lines) + '\n'

    def log(self):
        text = ''
        for path in (self.eventlog, self.out_path):
            try:
                with open(path, 'rb') as f:
                    text += f.read().decode('utf-8', 'replace')
            except OSError:
                pass
        return text

    def start(self, timeout=START_TIMEOUT):
        """Start (on the port of the last run, if any); wait until served."""
        with open(self.conf, 'w') as f:
            f.write(self.config_text())
        seen = len(self.log())
        out = open(self.out_path, 'ab')
        try:
            self.process = subprocess.Popen(
                [sys.executable, '-m', 'zeoraid.server', '-C', self.conf],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                cwd=self.directory)
        finally:
            out.close()
        self.starts += 1
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise AssertionError('zeoraid exited with %s: %s' % (
                    self.process.returncode, self.log()[-3000:]))
            match = _ADDRESS_RE.search(self.log()[seen:])
            if match:
                try:
                    self.admin('status')
                except (AdminUnreachable, AdminRefused):
                    pass
                else:
                    self.addr = (match.group(1), int(match.group(2)))
                    self.port = self.addr[1]
                    return self.addr
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError('zeoraid did not start: %s'
                                     % self.log()[-3000:])
            time.sleep(0.05)

    def admin(self, op, *args, timeout=10.0):
        return AdminClient(self.admin_socket, timeout=timeout).call(
            op, None, args)

    def details(self):
        return self.admin('details')

    def states(self):
        """{backend name: state}."""
        return self.admin('status')['backends']

    def stop(self, timeout=30.0):
        """SIGTERM; SIGKILL if it does not exit in time."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise AssertionError('zeoraid ignored SIGTERM: %s'
                                     % self.log()[-3000:])
        self.process = None

    def kill(self):
        if self.process is not None:
            if self.process.poll() is None:
                self.process.kill()
            self.process.wait()
            self.process = None

    def degradations(self):
        """Backends degraded (from optimal) so far, from the log."""
        return len(re.findall(r'backend=\S+ state=degraded previous=optimal',
                              self.log()))


# -- the cluster --------------------------------------------------------------


class Cluster:
    """Backends, their proxies and a zeoraid server, in a temp dir."""

    def __init__(self, count=3, timeout=1.0, blobs=True, faulty=(),
                 directory=None, raid_options=''):
        self.tmp = directory or tempfile.mkdtemp(prefix='zeoraid-chaos-')
        self.timeout = timeout
        self.blobs = blobs
        self.backends = []
        for i in range(count):
            name = 'b%d' % (i + 1)
            cls = FaultyBackend if name in faulty else Backend
            self.backends.append(cls(name, os.path.join(self.tmp, name),
                                     blobs=blobs))
        self.raid = RaidProcess(os.path.join(self.tmp, 'raid'),
                                self.backends, timeout=timeout, blobs=blobs,
                                extra_options=raid_options)
        self.recoveries = 0
        self._clients = 0

    @property
    def client_deadline(self):
        return CLIENT_DEADLINE_FACTOR * self.timeout + CLIENT_DEADLINE_SLACK

    def start(self):
        try:
            for backend in self.backends:
                backend.launch()
            for backend in self.backends:
                backend.finish_start()
            self.raid.start()
            wait_until(lambda: set(self.raid.states().values())
                       == {'optimal'}, 30, 'an optimal RAID')
        except BaseException:
            self.close()
            raise
        return self

    def backend(self, name):
        for backend in self.backends:
            if backend.name == name:
                return backend
        raise KeyError(name)

    def close(self, remove=True):
        try:
            self.raid.kill()
        finally:
            for backend in self.backends:
                try:
                    backend.close()
                except Exception:
                    logger.exception('closing backend %s', backend.name)
        if remove and not os.environ.get('ZEORAID_KEEP_TMP'):
            shutil.rmtree(self.tmp, ignore_errors=True)

    def client_storage(self, wait_timeout=20):
        """A ClientStorage to the zeoraid server, own blob cache."""
        self._clients += 1
        options = dict(wait=True, wait_timeout=wait_timeout,
                       min_disconnect_poll=0.2, max_disconnect_poll=1)
        if self.blobs:
            options['blob_dir'] = os.path.join(
                self.tmp, 'client-blobs-%d' % self._clients)
        return ZEO.ClientStorage.ClientStorage(self.raid.addr, **options)

    def load(self, threads=3, **kw):
        return ClientLoad(self, threads=threads, **kw)

    def heal_all(self):
        for backend in self.backends:
            backend.heal()

    def states(self):
        return self.raid.states()

    def optimal(self):
        return sorted(n for n, s in self.states().items() if s == 'optimal')

    def wait_degraded(self, name, timeout=None):
        timeout = timeout or 10 * self.timeout + 10
        wait_until(lambda: self.states()[name] != 'optimal', timeout,
                   'backend %s to be degraded' % name)

    def recover_all(self, timeout=RECOVERY_TIMEOUT, attempts=8):
        """Recover every non-optimal backend through the admin endpoint.

        A failed recovery (a backend still reconnecting) is retried, up
        to `attempts` times per backend; a refusal that retrying cannot
        cure (DivergedError) fails at once. `timeout` bounds the time
        without progress, not the whole wait: a recovery that keeps
        copying (its copied tid or count moves) is waited for as long as
        its backlog needs, so large backlogs under load do not abort.
        Returns {name: (seconds, txns copied, rate txn/s)} of the
        recoveries that ended here.
        """
        deadline = time.monotonic() + timeout
        tries = collections.Counter()
        seen = {}
        started = {}
        ended = {}
        while True:
            details = self.raid.details()['backends']
            for name, info in details.items():
                recovery = info.get('recovery') or {}
                mark = (info['state'], recovery.get('txns_copied'),
                        recovery.get('copied_tid'), recovery.get('phase'))
                if seen.get(name) != mark:
                    seen[name] = mark
                    deadline = time.monotonic() + timeout   # progress
                if name in started and info['state'] == 'optimal' \
                        and name not in ended:
                    ended[name] = (time.monotonic() - started[name],
                                   recovery.get('txns_copied'),
                                   recovery.get('rate_txn_s'))
            pending = [n for n, d in sorted(details.items())
                       if d['state'] != 'optimal']
            if not pending:
                return ended
            if time.monotonic() > deadline:
                raise AssertionError(
                    'recovery made no progress for %gs: %s'
                    % (timeout, details))
            for name in pending:
                if details[name]['state'] == 'recovering':
                    continue
                reason = details[name].get('reason') or ''
                if 'DivergedError' in reason or tries[name] >= attempts:
                    raise AssertionError('recovery of %s failed %d times: %s'
                                         % (name, tries[name], reason))
                try:
                    self.raid.admin('recover', name)
                    self.recoveries += 1
                    tries[name] += 1
                    started.setdefault(name, time.monotonic())
                except AdminRefused as exc:
                    # one recovery at a time, or not reachable yet
                    logger.info('recover %s refused: %s', name, exc)
                break
            time.sleep(0.2)

    def rebuild(self):
        """Bring a cluster whose recovery failed back to optimal, the
        hard way: every non-optimal backend restarts empty, the zeoraid
        server restarts (its ClientStorages would refuse a backend that
        went back in time), and the emptied backends are recovered in
        full.  Used after a failed check, so the next scenario starts
        clean; returns the names rebuilt.
        """
        self.heal_all()
        names = [n for n, s in sorted(self.states().items())
                 if s != 'optimal']
        for name in names:
            self.backend(name).wipe()
        self.raid.stop()
        self.raid.start()
        self.recover_all()
        return names

    # -- invariants --------------------------------------------------------

    def snapshot(self, name):
        """Every transaction of backend `name`, read straight from it."""
        backend = self.backend(name)
        storage = backend.client()
        try:
            return snapshot(storage, name)
        finally:
            storage.close()

    def check(self, load, recover=True, expect_degraded=(),
              latency_limit=None):
        """Assert every invariant; return a dict of figures.

        load: a stopped ClientLoad (or None).  expect_degraded: backends
        that must have been degraded by the fault.  With recover, the
        degraded backends are recovered and everything checked again.
        """
        report = {}
        if load is not None:
            load.assert_clean(latency_limit or self.client_deadline)
            report['committed'] = load.count
            report['max_latency'] = load.max_latency
        states = self.states()
        for name in expect_degraded:
            if states[name] == 'optimal':
                raise AssertionError(
                    'backend %s should have been degraded by the fault: %s'
                    % (name, self.raid.details()['backends']))
        optimal = sorted(n for n, s in states.items() if s == 'optimal')
        if not optimal:
            raise AssertionError('no optimal backend left: %s'
                                 % self.raid.details())
        self._check_replicas(optimal, load)
        report['optimal_before_recovery'] = optimal
        if recover:
            self.recover_all()
            self._check_replicas([b.name for b in self.backends], load)
        return report

    def _check_replicas(self, names, load):
        snapshots = [self.snapshot(name) for name in names]
        assert_identical(snapshots)
        if load is not None:
            for snap in snapshots:
                load.assert_present(snap)
            storage = self.backend(names[0]).client()
            try:
                load.assert_data(storage)
            finally:
                storage.close()


# -- replica comparison -------------------------------------------------------


class Snapshot:
    """A backend's transactions: [(tid, meta, [(oid, data, blob_hash)])]."""

    def __init__(self, name, transactions, last):
        self.name = name
        self.transactions = transactions
        self.last = last
        self.tids = {t[0] for t in transactions}


def snapshot(storage, name):
    transactions = []
    it = storage.iterator()
    try:
        for txn in it:
            meta = (txn.status, txn.user, txn.description,
                    dict(txn.extension or {}))
            records = []
            for r in txn:
                blob = None
                if r.data and ZODB.blob.is_blob_record(r.data):
                    try:
                        path = storage.loadBlob(r.oid, r.tid)
                    except ZODB.POSException.POSKeyError:
                        blob = 'missing'
                    else:
                        with open(path, 'rb') as f:
                            blob = hashlib.sha256(f.read()).hexdigest()
                records.append((r.oid, r.data, blob))
            transactions.append((txn.tid, meta, records))
    finally:
        close = getattr(it, 'close', None)
        if close is not None:
            close()
    last = storage._call('lastTransaction')
    return Snapshot(name, transactions, last)


def assert_identical(snapshots):
    """Raise AssertionError at the first difference, precisely."""
    if not snapshots:
        return
    ref = snapshots[0]
    for other in snapshots[1:]:
        for i, (a, b) in enumerate(zip(ref.transactions, other.transactions)):
            if a[0] != b[0]:
                raise AssertionError(
                    'backend %s has tid %s at position %d where %s has %s'
                    % (other.name, tid_repr(b[0]), i, ref.name,
                       tid_repr(a[0])))
            tid = tid_repr(a[0])
            if a[1] != b[1]:
                raise AssertionError(
                    'metadata of %s differs: %s %r, %s %r'
                    % (tid, ref.name, a[1], other.name, b[1]))
            oids_a = [r[0] for r in a[2]]
            oids_b = [r[0] for r in b[2]]
            if oids_a != oids_b:
                raise AssertionError(
                    'records of %s differ: %s has oids %s, %s has %s'
                    % (tid, ref.name, [tid_repr(o) for o in oids_a],
                       other.name, [tid_repr(o) for o in oids_b]))
            for ra, rb in zip(a[2], b[2]):
                if ra[1] != rb[1]:
                    raise AssertionError(
                        'record %s of %s differs between %s and %s'
                        % (tid_repr(ra[0]), tid, ref.name, other.name))
                if ra[2] != rb[2]:
                    raise AssertionError(
                        'blob %s of %s differs: %s %s, %s %s'
                        % (tid_repr(ra[0]), tid, ref.name, ra[2],
                           other.name, rb[2]))
        na, nb = len(ref.transactions), len(other.transactions)
        if na != nb:
            longer, shorter = (ref, other) if na > nb else (other, ref)
            extra = longer.transactions[min(na, nb)][0]
            raise AssertionError(
                'backend %s has %d transactions, %s has %d; first extra: %s'
                % (longer.name, len(longer.transactions), shorter.name,
                   len(shorter.transactions), tid_repr(extra)))
        if ref.last != other.last:
            raise AssertionError(
                'lastTransaction differs: %s %s, %s %s'
                % (ref.name, tid_repr(ref.last), other.name,
                   tid_repr(other.last)))


def divergent_backends(snapshots):
    """Names of snapshots that differ from the first (for reports)."""
    bad = []
    for other in snapshots[1:]:
        try:
            assert_identical([snapshots[0], other])
        except AssertionError as exc:
            bad.append((other.name, str(exc)))
    return bad


# -- client load --------------------------------------------------------------


def blob_bytes(t, n):
    return (b'blob %d-%d ' % (t, n)) * 50


class ClientLoad:
    """Client threads committing through the zeoraid server.

    Each thread has its own ClientStorage and ZODB.DB (so commits really
    interleave at the server) and on commit n: inserts key ``t-n`` into
    a shared OOBTree (a blob every ``blob_every`` commits, else n), sets
    its own counter to n and bumps a shared BTrees.Length (resolved on the
    backend servers).  Retries are idempotent: a retried commit writes
    the same values.  Every commit a thread saw succeed is recorded with
    its tid; every attempt's duration is measured.
    """

    def __init__(self, cluster, threads=3, blob_every=5, max_seconds=120,
                 retries=50, pause=0.0):
        self.cluster = cluster
        self.nthreads = threads
        self.blob_every = blob_every if cluster.blobs else 0
        self.max_seconds = max_seconds
        self.retries = retries
        self.pause = pause
        self.committed = []         # (t, n, tid)
        self.commit_times = []      # time.monotonic() of each commit
        self.errors = []            # (time, t, n, repr) non-retryable
        self.transient = 0          # retried errors
        self.latencies = []         # (seconds, t, n, outcome)
        self.attempted = [0] * threads
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = []
        self._storages = []
        self._dbs = []

    @property
    def count(self):
        return len(self.committed)

    @property
    def max_latency(self):
        return max((lat[0] for lat in self.latencies), default=0.0)

    def setup(self):
        """Create the shared objects once (idempotent)."""
        db = ZODB.DB(self.cluster.client_storage())
        try:
            tm = transaction.TransactionManager()
            conn = db.open(tm)
            root = conn.root()
            changed = False
            if 'tree' not in root:
                root['tree'] = OOBTree()
                root['length'] = BTrees.Length.Length()
                changed = True
            for t in range(self.nthreads):
                if 'c%d' % t not in root:
                    root['c%d' % t] = PersistentMapping(n=0)
                    changed = True
            if changed:
                tm.commit()
            self.start_n = [root['c%d' % t]['n'] for t in range(self.nthreads)]
            conn.close()
        finally:
            db.close()

    def start(self):
        self.setup()
        self.deadline = time.monotonic() + self.max_seconds
        for t in range(self.nthreads):
            storage = self.cluster.client_storage()
            db = ZODB.DB(storage, pool_size=1)
            self._storages.append(storage)
            self._dbs.append(db)
            thread = threading.Thread(target=self._run, args=(t, db),
                                      name='chaos-client-%d' % t,
                                      daemon=True)
            self._threads.append(thread)
        for thread in self._threads:
            thread.start()
        return self

    def wait_commits(self, count, timeout=30.0):
        """Wait until `count` commits in all; False on timeout."""
        deadline = time.monotonic() + timeout
        while self.count < count:
            if time.monotonic() > deadline or not self.alive():
                return False
            time.sleep(0.02)
        return True

    def alive(self):
        return any(t.is_alive() for t in self._threads)

    def stop(self, timeout=None):
        """Stop the threads (bounded) and close their databases."""
        self._stop.set()
        timeout = timeout or self.cluster.client_deadline + 30
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.1, deadline - time.monotonic()))
        hung = [t.name for t in self._threads if t.is_alive()]
        for db in self._dbs:
            try:
                db.close()
            except Exception:
                logger.exception('closing a client database')
        if hung:
            raise AssertionError('client threads hung: %s' % hung)

    def _run(self, t, db):
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        n = self.start_n[t]
        try:
            while not self._stop.is_set() and \
                    time.monotonic() < self.deadline:
                n += 1
                self._commit(t, n, conn, tm)
                if self.pause:
                    time.sleep(self.pause)
        finally:
            try:
                tm.abort()
                conn.close()
            except Exception:
                pass

    def _commit(self, t, n, conn, tm):
        for attempt in range(self.retries):
            if self._stop.is_set() and attempt:
                return
            with self._lock:
                self.attempted[t] = n
            started = time.monotonic()
            try:
                tm.begin()
                root = conn.root()
                key = '%d-%06d' % (t, n)
                if self.blob_every and n % self.blob_every == 0:
                    blob = ZODB.blob.Blob()
                    with blob.open('w') as f:
                        f.write(blob_bytes(t, n))
                    root['tree'][key] = blob
                else:
                    root['tree'][key] = n
                counter = root['c%d' % t]
                counter['n'] = n
                root['length'].change(1)
                tm.commit()
            except Exception as exc:
                elapsed = time.monotonic() - started
                try:
                    tm.abort()
                except Exception:
                    pass
                retryable = isinstance(exc, transaction.interfaces
                                       .TransientError)
                with self._lock:
                    self.latencies.append((elapsed, t, n, repr(exc)))
                    if retryable:
                        self.transient += 1
                    else:
                        self.errors.append((time.time(), t, n, repr(exc)))
                        logger.warning('client %d commit %d: %r', t, n, exc)
                time.sleep(0.05 if retryable else 0.2)
                continue
            elapsed = time.monotonic() - started
            with self._lock:
                self.latencies.append((elapsed, t, n, 'ok'))
                self.committed.append((t, n, counter._p_serial))
                self.commit_times.append(time.monotonic())
            return
        with self._lock:
            self.errors.append((time.time(), t, n,
                                'gave up after %d attempts' % self.retries))

    # -- invariants ----------------------------------------------------------

    def assert_clean(self, latency_limit):
        if self.errors:
            raise AssertionError('%d non-retryable client errors, first: %s'
                                 % (len(self.errors), self.errors[:3]))
        slow = [lat for lat in self.latencies if lat[0] > latency_limit]
        if slow:
            raise AssertionError(
                'client-visible commits took longer than %gs: %s'
                % (latency_limit, sorted(slow, reverse=True)[:3]))

    def assert_present(self, snap):
        missing = [(t, n, tid_repr(tid)) for t, n, tid in self.committed
                   if tid not in snap.tids]
        if missing:
            raise AssertionError(
                'backend %s lacks %d transactions clients saw committed: %s'
                % (snap.name, len(missing), missing[:5]))

    def assert_data(self, storage):
        """The committed values are readable from `storage`."""
        db = ZODB.DB(storage)
        try:
            tm = transaction.TransactionManager()
            conn = db.open(tm)
            root = conn.root()
            tree = root['tree']
            last = {}
            for t, n, tid in self.committed:
                key = '%d-%06d' % (t, n)
                if key not in tree:
                    raise AssertionError('key %s (tid %s) missing'
                                         % (key, tid_repr(tid)))
                value = tree[key]
                if isinstance(value, ZODB.blob.Blob):
                    with value.open('r') as f:
                        data = f.read()
                    if data != blob_bytes(t, n):
                        raise AssertionError('blob %s has wrong bytes' % key)
                elif value != n:
                    raise AssertionError('key %s holds %r, not %d'
                                         % (key, value, n))
                last[t] = max(last.get(t, 0), n)
            for t, n in last.items():
                value = root['c%d' % t]['n']
                if not n <= value <= self.attempted[t]:
                    raise AssertionError(
                        'counter %d is %d; committed %d, attempted %d'
                        % (t, value, n, self.attempted[t]))
            if root['length']() < len(self.committed):
                raise AssertionError('length %d < %d commits' % (
                    root['length'](), len(self.committed)))
            tm.abort()
            conn.close()
        finally:
            db.close()
