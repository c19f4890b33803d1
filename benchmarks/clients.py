"""Benchmark clients: long-lived worker processes that run one job at a time.

Workers are started once (``spawn``, so they share nothing with the
parent's threads) and reused for every topology and round. A job runs in
two steps so that concurrent clients start together and setup is never
timed:

    parent -> job dict       worker prepares (connects, warms up, ...)
    worker -> ('ready',)
    parent -> 'go'           worker runs until its deadline or max_ops
    worker -> ('result', {'ops', 'elapsed', 'latencies', ...})

Every loop is bounded by a count and by time.
"""
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
import traceback

MB = 1024 * 1024
#: How long the parent waits for a worker's answer before giving up.
ANSWER_TIMEOUT = 300.0


# -- the jobs (run inside a worker process) -----------------------------------

def _client_storage(job, blob_dir=None, **kw):
    import ZEO.ClientStorage
    options = dict(storage='1', wait=True, wait_timeout=30,
                   min_disconnect_poll=0.5, max_disconnect_poll=2)
    if blob_dir is not None:
        options.update(blob_dir=blob_dir, blob_cache_size=100 * MB,
                       blob_cache_size_check=10)
    options.update(kw)
    return ZEO.ClientStorage.ClientStorage(tuple(job['addr']), **options)


class Job:
    """Base: prepare() is untimed, run() is timed and bounded."""

    def __init__(self, job, index, tmp):
        self.job = job
        self.index = index
        self.tmp = tmp
        self.duration = float(job.get('duration', 1.0))
        self.max_ops = int(job.get('max_ops', 100000))
        self.closers = []

    def prepare(self):
        pass

    def run(self):
        raise NotImplementedError

    def close(self):
        for close in reversed(self.closers):
            try:
                close()
            except Exception:
                logging.getLogger('zeoraid.bench').exception('close')

    def _open_db(self, blobs=False):
        import transaction
        import ZODB
        blob_dir = tempfile.mkdtemp(dir=self.tmp) if blobs else None
        db = ZODB.DB(_client_storage(self.job, blob_dir))
        self.closers.append(db.close)
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        self.closers.append(conn.close)
        return conn, tm

    def timed_loop(self, op):
        """Call op() until the duration or max_ops is reached."""
        latencies = []
        clock = time.perf_counter
        start = clock()
        deadline = start + self.duration
        while len(latencies) < self.max_ops:
            t0 = clock()
            op()
            t1 = clock()
            latencies.append(t1 - t0)
            if t1 >= deadline:
                break
        return {'ops': len(latencies), 'elapsed': clock() - start,
                'latencies': latencies}


class SetupJob(Job):
    """Create the objects every other job uses; return their oids."""

    def run(self):
        import persistent.list
        import persistent.mapping
        import transaction  # noqa: F401
        import ZODB.blob
        import ZODB.utils
        PM = persistent.mapping.PersistentMapping
        conn, tm = self._open_db(blobs=self.job['blobs'])
        root = conn.root()
        payload = b'x' * int(self.job['commit_payload'])
        for i in range(int(self.job['writers'])):
            root['c%d' % i] = PM(n=0, payload=payload)
        root['m0'] = PM(items=[PM(n=0, payload=payload) for _ in range(100)])
        tm.commit()
        data = persistent.list.PersistentList()
        root['data'] = data
        size = int(self.job['load_payload'])
        count = int(self.job['load_objects'])
        made = []
        while len(made) < count:
            batch = [PM(payload=os.urandom(size))
                     for _ in range(min(100, count - len(made)))]
            data.extend(batch)
            tm.commit()
            made.extend(batch)
        blobs = []
        if self.job['blobs']:
            root['bw'] = ZODB.blob.Blob()
            chunk = os.urandom(MB)
            readers = []
            for _ in range(int(self.job['read_blobs'])):
                blob = ZODB.blob.Blob()
                with blob.open('w') as f:
                    f.write(chunk)
                readers.append(blob)
            root['br'] = persistent.list.PersistentList(readers)
            tm.commit()
            # Committed blobs are ghosts (their _p_serial reads 0): ask
            # the storage for each one's serial.
            storage = conn.db().storage
            blobs = [(b._p_oid, ZODB.utils.load_current(storage, b._p_oid)[1])
                     for b in readers]
        return {'ops': 0, 'elapsed': 0.0, 'latencies': [],
                'data_oids': [o._p_oid for o in made], 'blobs': blobs}


class CommitJob(Job):
    """Serial commits of one (c<index>) or 100 (m0) objects."""

    def prepare(self):
        conn, self.tm = self._open_db()
        root = conn.root()
        if self.job['objects'] == 1:
            self.objects = [root['c%d' % self.index]]
        else:
            self.objects = list(root['m0']['items'])
        for obj in self.objects:   # unghostify outside the timed part
            obj['n']
        self.tm.begin()

    def run(self):
        objects = self.objects
        tm = self.tm

        def commit():
            for obj in objects:
                obj['n'] += 1
            tm.commit()
        return self.timed_loop(commit)


class LoadJob(Job):
    """Loads through a ClientStorage (no ZODB object cache in between).

    mode 'cold': the client cache is empty for every load (a fresh
    ClientStorage per pass over the objects; reopening is not timed).
    mode 'warm': every object was loaded once before, so the loads are
    answered by the ZEO client cache.
    """

    def prepare(self):
        self.oids = list(self.job['oids'])
        self.mode = self.job['mode']
        if self.mode == 'warm':
            self.storage = _client_storage(self.job)
            self.closers.append(self.storage.close)
            for oid in self.oids:
                self.storage.load(oid)

    def run(self):
        if self.mode == 'warm':
            load = self.storage.load
            oids = self.oids
            position = [0]

            def op():
                load(oids[position[0] % len(oids)])
                position[0] += 1
            return self.timed_loop(op)
        return self._run_cold()

    def _run_cold(self):
        clock = time.perf_counter
        latencies = []
        timed = 0.0
        deadline = clock() + self.duration
        passes = 0
        one_pass = bool(self.job.get('one_pass'))
        while len(latencies) < self.max_ops and clock() < deadline:
            storage = _client_storage(self.job)
            try:
                start = clock()
                for oid in self.oids:
                    t0 = clock()
                    storage.load(oid)
                    t1 = clock()
                    latencies.append(t1 - t0)
                    if t1 >= deadline or len(latencies) >= self.max_ops:
                        break
                timed += clock() - start
            finally:
                storage.close()
            passes += 1
            if one_pass:
                break
        return {'ops': len(latencies), 'elapsed': timed,
                'latencies': latencies, 'passes': passes}


class BlobWriteJob(Job):
    """Each commit writes a new 1 MB revision of one blob."""

    def prepare(self):
        conn, self.tm = self._open_db(blobs=True)
        self.blob = conn.root()['bw']
        self.data = os.urandom(MB)
        self.tm.begin()

    def run(self):
        blob = self.blob
        tm = self.tm
        data = self.data

        def write():
            with blob.open('w') as f:
                f.write(data)
            tm.commit()
        return self.timed_loop(write)


class BlobReadJob(Job):
    """Download 1 MB blobs with an empty blob cache; read them through."""

    def prepare(self):
        blob_dir = tempfile.mkdtemp(dir=self.tmp)
        self.storage = _client_storage(self.job, blob_dir)
        self.closers.append(self.storage.close)
        self.blobs = list(self.job['blobs'])

    def run(self):
        storage = self.storage
        blobs = self.blobs
        position = [0]

        def read():
            oid, serial = blobs[position[0] % len(blobs)]
            position[0] += 1
            path = storage.loadBlob(oid, serial)
            with open(path, 'rb') as f:
                while f.read(MB):
                    pass
            os.remove(path)   # the next read of it is cold again
        return self.timed_loop(read)


class StatusJob(Job):
    """server_status() of some ZEO servers (e.g. backends' load counts)."""

    def run(self):
        import ZEO.ClientStorage
        status = {}
        for name, addr in self.job['servers']:
            storage = ZEO.ClientStorage.ClientStorage(
                tuple(addr), wait=True, wait_timeout=30, read_only=True)
            try:
                status[name] = storage.server_status()
            finally:
                storage.close()
        return {'ops': 0, 'elapsed': 0.0, 'latencies': [], 'status': status}


JOBS = {
    'setup': SetupJob,
    'commit': CommitJob,
    'load': LoadJob,
    'blob_write': BlobWriteJob,
    'blob_read': BlobReadJob,
    'status': StatusJob,
}


def worker_main(conn, index, base_dir):
    """A worker process: run jobs until told to stop (None)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the parent decides
    logging.basicConfig(level=logging.WARNING)
    # Inside the parent's work directory: removed with it even when this
    # process is terminated.
    tmp = tempfile.mkdtemp(prefix='worker-%d-' % index, dir=base_dir)
    try:
        while True:
            message = conn.recv()
            if message is None:
                return
            job = None
            try:
                job = JOBS[message['kind']](message, index, tmp)
                job.prepare()
                conn.send(('ready', None))
                if conn.recv() != 'go':
                    continue
                conn.send(('result', job.run()))
            except Exception:
                conn.send(('error', traceback.format_exc()))
            finally:
                if job is not None:
                    job.close()
                for name in os.listdir(tmp):
                    shutil.rmtree(os.path.join(tmp, name),
                                  ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- the parent's side --------------------------------------------------------

class WorkerError(RuntimeError):
    pass


class WorkerPool:
    """N spawned worker processes; run(jobs) runs one job on each of the
    first len(jobs) workers, started together, and returns their results."""

    def __init__(self, size, base_dir=None):
        self.size = size
        self.base_dir = base_dir
        self.workers = []

    def start(self):
        context = multiprocessing.get_context('spawn')
        for index in range(self.size):
            parent, child = context.Pipe()
            process = context.Process(target=worker_main,
                                      args=(child, index, self.base_dir),
                                      name='bench-worker-%d' % index,
                                      daemon=True)
            process.start()
            child.close()
            self.workers.append((process, parent))
        return self

    def _receive(self, index, timeout):
        process, conn = self.workers[index]
        if not conn.poll(timeout):
            raise WorkerError('worker %d gave no answer within %gs'
                              % (index, timeout))
        kind, value = conn.recv()
        if kind == 'error':
            raise WorkerError('worker %d failed:\n%s' % (index, value))
        return value

    def run(self, jobs, timeout=ANSWER_TIMEOUT):
        if len(jobs) > self.size:
            raise ValueError('%d jobs for %d workers' % (len(jobs), self.size))
        for index, job in enumerate(jobs):
            self.workers[index][1].send(job)
        errors = []
        ready = []
        for index in range(len(jobs)):
            try:
                self._receive(index, timeout)
                ready.append(index)
            except WorkerError as exc:
                errors.append(exc)
        if errors:
            for index in ready:
                self.workers[index][1].send('stop')
            raise errors[0]
        for index in ready:
            self.workers[index][1].send('go')
        return [self._receive(index, timeout) for index in ready]

    def close(self):
        for process, conn in self.workers:
            try:
                conn.send(None)
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + 10
        for process, conn in self.workers:
            process.join(max(0.1, deadline - time.monotonic()))
            if process.is_alive():
                process.terminate()
                process.join(5)
            if process.is_alive():
                process.kill()
                process.join()
            conn.close()
        self.workers = []

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()
        return False
