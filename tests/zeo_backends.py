"""Real ``runzeo`` backend servers on loopback, for tests.

Each backend is a separate process running ZEO's own ``runzeo.ZEOServer``
(a FileStorage in a directory of the caller's choice, optionally with a
blob directory); its log is ``<directory>/server.log``.  The processes
are forked by a *zygote*: one helper process per test run with ZEO
already imported, single-threaded, so forking it is safe (unlike forking
the test runner, which is full of RAID and ClientStorage threads that a
fork copies half-way) and a start costs milliseconds instead of a fresh
interpreter's ~0.3 s of imports, which matters at servers per test.  A
real process can be SIGKILLed to simulate a crash, or SIGSTOPped
(``server.process.pid``) to simulate a hang.

The server binds port 0 and writes the port it got to
``<directory>/address``, so concurrently running test suites never fight
over ports.  Servers exit on their own when the test process is gone.

Typical use::

    server = BackendServer(os.path.join(tmp, 'b1'))
    server.start()                     # returns the address
    storage = server.client()          # a connected ClientStorage
    ...
    server.stop()                      # SIGTERM, clean shutdown
    server.kill()                      # or SIGKILL (crash)
    server.restart()                   # same port, same files
"""
import atexit
import functools
import logging
import os
import select
import signal
import sys
import threading
import time

import ZEO.ClientStorage


logger = logging.getLogger(__name__)

START_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0


class BackendServer:
    """One runzeo process serving storage '1' from ``directory``."""

    def __init__(self, directory, blob_dir=False, storage_conf=None,
                 zeo_options='', name='1', filestorage_options=''):
        """Prepare (not start) a server.

        blob_dir: False for no blobs, True for ``<directory>/blobs``, or a
        path.  storage_conf replaces the default FileStorage section (it
        must name its storage ``name``).  zeo_options: extra lines for the
        ``<zeo>`` section (e.g. ``'invalidation-queue-size 100'``);
        filestorage_options: extra lines for the default FileStorage
        section (e.g. ``'pack-gc false'``).
        """
        self.directory = os.path.abspath(directory)
        os.makedirs(self.directory, exist_ok=True)
        if blob_dir is True:
            blob_dir = os.path.join(self.directory, 'blobs')
        self.blob_dir = blob_dir or None
        self.name = name
        self.path = os.path.join(self.directory, 'Data.fs')
        if storage_conf is None:
            blob_line = 'blob-dir %s' % self.blob_dir if self.blob_dir else ''
            storage_conf = (
                '<filestorage %s>\n  path %s\n  %s\n  %s\n</filestorage>\n'
                % (name, self.path, blob_line, filestorage_options))
        self.storage_conf = storage_conf
        self.zeo_options = zeo_options
        self.addr = None
        self.process = None

    @property
    def log_path(self):
        return os.path.join(self.directory, 'server.log')

    def _write_config(self, port):
        conf = os.path.join(self.directory, 'zeo.conf')
        with open(conf, 'w') as f:
            f.write('<zeo>\n  address 127.0.0.1:%d\n  %s\n</zeo>\n%s'
                    % (port, self.zeo_options, self.storage_conf))
        return conf

    def launch(self, port=0):
        """Start the process; call wait_started() to get the address."""
        assert self.process is None, 'already running'
        conf = self._write_config(port)
        address_file = os.path.join(self.directory, 'address')
        if os.path.exists(address_file):
            os.remove(address_file)
        self.process = _zygote().fork(conf, self.directory, self.log_path)
        _live.add(self)
        return self

    def wait_started(self, timeout=START_TIMEOUT):
        """Wait until the server reports its address; return it."""
        address_file = os.path.join(self.directory, 'address')
        deadline = time.monotonic() + timeout
        while not os.path.exists(address_file):
            if not self.process.is_alive():
                self._cleanup()
                raise RuntimeError('backend server in %s exited on start: %s'
                                   % (self.directory, self._log_tail()))
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(
                    'backend server in %s did not start within %ss: %s'
                    % (self.directory, timeout, self._log_tail()))
            time.sleep(0.005)
        with open(address_file) as f:
            host, port = f.read().split()
        self.addr = (host, int(port))
        return self.addr

    def start(self, port=0, timeout=START_TIMEOUT):
        """Start the server and wait for it; return the address."""
        self.launch(port)
        return self.wait_started(timeout)

    def restart(self, timeout=START_TIMEOUT):
        """Start again on the same port with the same files."""
        assert self.addr is not None, 'never started'
        return self.start(self.addr[1], timeout)

    @property
    def running(self):
        return self.process is not None and self.process.is_alive()

    def stop(self, timeout=STOP_TIMEOUT):
        """Clean shutdown (SIGTERM); SIGKILL if it does not exit in time."""
        if self.process is None:
            return
        if self.process.is_alive():
            self.process.terminate()      # SIGTERM: runzeo closes cleanly
            self.process.join(timeout)
            if self.process.is_alive():
                logger.warning('backend %s ignored SIGTERM, killing',
                               self.directory)
                self.process.kill()
                self.process.join()
        self._cleanup()

    def kill(self):
        """Crash the server: SIGKILL, no cleanup on the server side."""
        if self.process is None:
            return
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        self._cleanup()

    def _cleanup(self):
        self.process.close()
        self.process = None
        _live.discard(self)

    def _log_tail(self, size=3000):
        try:
            with open(self.log_path, 'rb') as f:
                return f.read()[-size:].decode('utf-8', 'replace')
        except OSError as e:
            return '(no log: %s)' % e

    def client_options(self, **kw):
        """Keyword arguments for a ClientStorage to this server."""
        options = dict(storage=self.name, wait=True, wait_timeout=30,
                       min_disconnect_poll=0.2, max_disconnect_poll=1)
        if self.blob_dir:
            # Each client gets its own (non-shared) blob cache.
            options['blob_dir'] = os.path.join(
                self.directory, 'client-blobs-%d' % next(_client_counter))
        options.update(kw)
        return options

    def client(self, **kw):
        """A connected ClientStorage to this server."""
        return ZEO.ClientStorage.ClientStorage(
            self.addr, **self.client_options(**kw))

    def opener(self, **kw):
        """A no-argument callable returning a new connected ClientStorage.

        Every call gets its own blob cache directory.
        """
        return functools.partial(_open_client, self, kw)

    def zconfig_section(self, section_name, blob_cache=None, extra='',
                        section_type='zeoclient'):
        """A ``<zeoclient NAME>`` (ZODB) section for this server.

        section_type 'clientstorage' gives ZEO's section instead (needs
        ``%import ZEO``, which a runzeo configuration cannot import: its
        schema already defines ZEO's ``ssl`` type).
        """
        lines = ['<%s %s>' % (section_type, section_name),
                 '  server %s:%d' % self.addr,
                 '  storage %s' % self.name]
        if section_type == 'clientstorage':
            lines.append('  wait-timeout 30')
        else:
            lines += ['  min-disconnect-poll 1', '  max-disconnect-poll 2']
        if blob_cache:
            lines.append('  blob-dir %s' % blob_cache)
        if extra:
            lines.append('  ' + extra)
        lines.append('</%s>' % section_type)
        return '\n'.join(lines) + '\n'


# Servers not stopped by their test (a test that crashed half-way) must
# not outlive the test run.
_live = set()


@atexit.register
def _kill_leftovers():
    for server in list(_live):
        server.kill()


def _counter():
    n = 0
    while True:
        n += 1
        yield n


_client_counter = _counter()


def _open_client(server, kw):
    return server.client(**kw)


def start_backends(directory, count, blob_dir=False, **kw):
    """Start ``count`` backend servers concurrently.

    They live in ``<directory>/b1`` ... ``<directory>/bN``.  Returns the
    list of started BackendServer objects.
    """
    servers = [BackendServer(os.path.join(directory, 'b%d' % (i + 1)),
                             blob_dir=blob_dir, **kw)
               for i in range(count)]
    try:
        for server in servers:
            server.launch()
        for server in servers:
            server.wait_started()
    except BaseException:
        stop_all(servers)
        raise
    return servers


def stop_all(servers):
    """Stop servers concurrently (SIGTERM to all first, then wait)."""
    for server in servers:
        if server.running:
            server.process.terminate()
    for server in servers:
        try:
            server.stop()
        except Exception:
            logger.exception('stopping backend %s', server.directory)


def start_zeo_backend(directory, blob_dir=False, **kw):
    """Start one backend; return ``(addr, stop, kill)``."""
    server = BackendServer(directory, blob_dir=blob_dir, **kw)
    addr = server.start()
    return addr, server.stop, server.kill


class ServerProcess:
    """A backend process (a child of the zygote, not of the test process).

    ``pid``, ``is_alive()``, ``terminate()``, ``kill()``, ``join()``: the
    part of multiprocessing.Process the tests use.  Signals and liveness go
    through a pidfd, so a pid reused after the server died (pid_max may be
    as low as 32768) is never signalled.
    """

    def __init__(self, pid):
        self.pid = pid
        self._pidfd = os.pidfd_open(pid)

    def is_alive(self):
        return not self._exited(0)

    def _exited(self, timeout):
        poller = select.poll()
        poller.register(self._pidfd, select.POLLIN)
        return bool(poller.poll(timeout * 1000))

    def terminate(self):
        self._signal(signal.SIGTERM)

    def kill(self):
        self._signal(signal.SIGKILL)

    def _signal(self, sig):
        try:
            signal.pidfd_send_signal(self._pidfd, sig)
        except ProcessLookupError:
            pass

    def join(self, timeout=None):
        self._exited(-1 if timeout is None else timeout)

    def close(self):
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None


class _Zygote:
    """The parent side: forks backends on request, one at a time."""

    def __init__(self):
        import subprocess
        self._lock = threading.Lock()
        self._process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), '--zygote',
             str(os.getpid())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)

    def fork(self, conf, directory, log_path):
        request = '%s\t%s\t%s\n' % (conf, directory, log_path)
        with self._lock:
            self._process.stdin.write(request.encode('utf-8'))
            answer = self._process.stdout.readline()
        if not answer:
            raise RuntimeError('the backend zygote process died')
        return ServerProcess(int(answer))


_ZYGOTE = []
_ZYGOTE_LOCK = threading.Lock()


def _zygote():
    with _ZYGOTE_LOCK:
        if not _ZYGOTE or _ZYGOTE[0]._process.poll() is not None:
            _ZYGOTE[:] = [_Zygote()]
        return _ZYGOTE[0]


def _zygote_main(test_pid):
    """The zygote: import ZEO once, then fork a server per request line.

    It is single-threaded, so forking it is safe.  It exits when the test
    process closes its stdin (exits), and reaps its children at once.
    """
    import ZEO.runzeo  # noqa: F401  (preloaded for the children)
    import ZODB.FileStorage  # noqa: F401

    def reap(signum, frame):
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if not pid:
                return

    signal.signal(signal.SIGCHLD, reap)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    stdin = sys.stdin.buffer
    stdout = sys.stdout.buffer
    while True:
        line = stdin.readline()
        if not line:
            return
        conf, directory, log_path = line.decode('utf-8').rstrip(
            '\n').split('\t')
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                code = _run_server(conf, directory, log_path, test_pid)
            finally:
                os._exit(code)
        stdout.write(b'%d\n' % pid)
        stdout.flush()


def _run_server(conf, directory, log_path, test_pid):
    """A backend process: stock runzeo that writes its address to a file.

    Returns the exit status.
    """
    import ZEO.runzeo

    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    os.setsid()   # a signal to the zygote's group must not reach us
    os.chdir(directory)
    _exit_with_parent(test_pid)

    class AnnouncingZEOServer(ZEO.runzeo.ZEOServer):
        def create_server(self):
            super().create_server()
            host, port = self.server.acceptor.addr[:2]
            tmp = os.path.join(directory, 'address.tmp')
            with open(tmp, 'w') as f:
                f.write('%s %d\n' % (host, port))
            os.rename(tmp, os.path.join(directory, 'address'))

    try:
        options = ZEO.runzeo.ZEOOptions()
        options.realize(['-C', conf])
        AnnouncingZEOServer(options).main()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        import traceback
        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    return 0


def _exit_with_parent(test_pid):
    """Shut down (SIGTERM to ourselves) once the test process is gone.

    A test run that is killed cannot stop its servers; they must not
    linger.
    """
    def gone():
        try:
            os.kill(test_pid, 0)
        except ProcessLookupError:
            return True
        except OSError:
            pass
        return False

    def watch():
        while not gone():
            time.sleep(1)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name='parent-watch', daemon=True).start()


def _serve(argv):
    """Run one backend in the foreground (manual use): ``-C zeo.conf``."""
    import ZEO.runzeo
    options = ZEO.runzeo.ZEOOptions()
    options.realize(argv)
    ZEO.runzeo.ZEOServer(options).main()


if __name__ == '__main__':
    if sys.argv[1:2] == ['--zygote']:
        _zygote_main(int(sys.argv[2]))
    else:
        _serve(sys.argv[1:])
