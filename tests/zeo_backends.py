"""Real ``runzeo`` backend servers on loopback, for tests.

Each backend is a separate ``python`` process running ZEO's own
``runzeo.ZEOServer`` (a FileStorage in a directory of the caller's choice,
optionally with a blob directory).  A separate process, rather than a fork
of the test runner, because the test process is full of threads (RAID
workers, ClientStorage IO threads) that a fork would copy half-way, and
because a real process can be killed with SIGKILL to simulate a crash.

The server binds port 0 and reports the port it got on its stdout, so
concurrently running test suites never fight over ports.

Typical use::

    server = start_backend(os.path.join(tmp, 'b1'))
    storage = server.client()          # a connected ClientStorage
    ...
    server.stop()                      # SIGTERM, clean shutdown
    server.kill()                      # or SIGKILL (crash)
    server.restart()                   # same port, same files
"""
import functools
import logging
import os
import selectors
import signal
import subprocess
import sys
import time

import ZEO.ClientStorage


logger = logging.getLogger(__name__)

START_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0

_ADDRESS_PREFIX = 'ZEORAID-TEST-BACKEND-ADDRESS'


class BackendServer:
    """One runzeo process serving storage '1' from ``directory``."""

    def __init__(self, directory, blob_dir=False, storage_conf=None,
                 zeo_options='', name='1'):
        """Prepare (not start) a server.

        blob_dir: False for no blobs, True for ``<directory>/blobs``, or a
        path.  storage_conf replaces the default FileStorage section (it
        must name its storage ``name``).  zeo_options: extra lines for the
        ``<zeo>`` section (e.g. ``'invalidation-queue-size 100'``).
        """
        self.directory = os.path.abspath(directory)
        os.makedirs(self.directory, exist_ok=True)
        if blob_dir is True:
            blob_dir = os.path.join(self.directory, 'blobs')
        self.blob_dir = blob_dir or None
        self.name = name
        self.path = os.path.join(self.directory, 'Data.fs')
        if storage_conf is None:
            blob_line = ('blob-dir %s' % self.blob_dir) if self.blob_dir else ''
            storage_conf = (
                '<filestorage %s>\n  path %s\n  %s\n</filestorage>\n'
                % (name, self.path, blob_line))
        self.storage_conf = storage_conf
        self.zeo_options = zeo_options
        self.addr = None
        self.process = None
        self._log = None

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
        self._log = open(self.log_path, 'ab')
        self.process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), '-C', conf],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=self._log, cwd=self.directory)
        return self

    def wait_started(self, timeout=START_TIMEOUT):
        """Wait until the server reports its address; return it."""
        deadline = time.monotonic() + timeout
        buf = b''
        with selectors.DefaultSelector() as sel:
            sel.register(self.process.stdout, selectors.EVENT_READ)
            while b'\n' not in buf:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self.kill()
                    raise RuntimeError(
                        'backend server in %s did not start within %ss: %s'
                        % (self.directory, timeout, self._log_tail()))
                if sel.select(remaining):
                    chunk = os.read(self.process.stdout.fileno(), 4096)
                    if not chunk:
                        self.process.wait()
                        self._cleanup()
                        raise RuntimeError(
                            'backend server in %s exited on start: %s'
                            % (self.directory, self._log_tail()))
                    buf += chunk
        line = buf.split(b'\n', 1)[0].decode('ascii')
        prefix, host, port = line.split()
        assert prefix == _ADDRESS_PREFIX, line
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
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout=STOP_TIMEOUT):
        """Clean shutdown (SIGTERM); SIGKILL if it does not exit in time."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning('backend %s ignored SIGTERM, killing',
                               self.directory)
                self.process.kill()
                self.process.wait()
        self._cleanup()

    def kill(self):
        """Crash the server: SIGKILL, no cleanup on the server side."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self._cleanup()

    def _cleanup(self):
        self.process.stdout.close()
        self._log.close()
        self.process = None

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

    def zconfig_section(self, section_name, blob_cache=None, extra=''):
        """A ZEO ``<clientstorage NAME>`` section for this server.

        Needs ``%import ZEO`` in the surrounding configuration.
        """
        lines = ['<clientstorage %s>' % section_name,
                 '  server %s:%d' % self.addr,
                 '  storage %s' % self.name,
                 '  wait-timeout 30',
                 '  min-disconnect-poll 0.2',
                 '  max-disconnect-poll 1']
        if blob_cache:
            lines.append('  blob-dir %s' % blob_cache)
        if extra:
            lines.append('  ' + extra)
        lines.append('</clientstorage>')
        return '\n'.join(lines) + '\n'


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
            server.process.send_signal(signal.SIGTERM)
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


def _serve(argv):
    """The backend process: stock runzeo that announces its address."""
    import ZEO.runzeo

    class AnnouncingZEOServer(ZEO.runzeo.ZEOServer):
        def create_server(self):
            super().create_server()
            host, port = self.server.acceptor.addr[:2]
            sys.stdout.write('%s %s %d\n' % (_ADDRESS_PREFIX, host, port))
            sys.stdout.flush()

    options = ZEO.runzeo.ZEOOptions()
    options.realize(argv)
    AnnouncingZEOServer(options).main()


if __name__ == '__main__':
    _serve(sys.argv[1:])
