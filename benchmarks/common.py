"""Shared parts of the benchmarks: servers, /proc readings, statistics.

Every backend is a stock ``python -m ZEO.runzeo -C file.conf`` process on
127.0.0.1, started by the benchmark and stopped by it (also on Ctrl-C and
on exceptions: every started process is registered and killed at exit).
A zeoraid front is ``python -m zeoraid.server -C file.conf`` (the
``zeoraid`` command) with ``%import zeoraid`` and a ``<raidstorage>`` over
``<zeoclient>`` backends.
"""
import atexit
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

logger = logging.getLogger('zeoraid.bench')

START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
CLOCK_TICKS = os.sysconf('SC_CLK_TCK')

_live = set()


@atexit.register
def kill_leftovers():
    """Kill every server still running (normal exit, error or Ctrl-C)."""
    for server in list(_live):
        try:
            server.kill()
        except Exception:  # pragma: no cover - best effort at exit
            pass


def free_port():
    """A port that was free a moment ago (bind 0, read it, close)."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class Server:
    """One runzeo process; `make_config(port)` returns its config text."""

    def __init__(self, name, directory, make_config, module='ZEO.runzeo'):
        """module: what runs the server: ZEO.runzeo, or zeoraid.server
        (the `zeoraid` command: runzeo plus the admin socket and loads
        answered off the event loop)."""
        self.name = name
        self.directory = os.path.abspath(directory)
        os.makedirs(self.directory, exist_ok=True)
        self.make_config = make_config
        self.module = module
        self.port = None
        self.process = None
        self._log = None

    def __repr__(self):
        return '<Server %s %s>' % (self.name, self.addr)

    @property
    def addr(self):
        return ('127.0.0.1', self.port) if self.port else None

    @property
    def pid(self):
        return self.process.pid if self.process is not None else None

    @property
    def log_path(self):
        return os.path.join(self.directory, 'server.log')

    @property
    def conf_path(self):
        return os.path.join(self.directory, 'server.conf')

    def start(self, timeout=START_TIMEOUT, keep_port=False):
        """Start the process and wait until it accepts connections.

        A port picked with free_port() can be taken by somebody else
        before runzeo binds it: then the start is retried on another port
        (unless keep_port, used by restarts that must keep the address).
        """
        attempts = 1 if keep_port else 4
        for attempt in range(attempts):
            if not (keep_port and self.port):
                self.port = free_port()
            with open(self.conf_path, 'w') as f:
                f.write(self.make_config(self.port))
            self._log = open(self.log_path, 'ab')
            self.process = subprocess.Popen(
                [sys.executable, '-m', self.module, '-C', self.conf_path],
                stdin=subprocess.DEVNULL, stdout=self._log,
                stderr=subprocess.STDOUT, cwd=self.directory)
            _live.add(self)
            try:
                self._wait_ready(timeout)
                return self.addr
            except _AddressInUse:
                self._reap()
                if attempt == attempts - 1:
                    raise RuntimeError('%s: no free port after %d attempts'
                                       % (self.name, attempts))
            except BaseException:
                self.kill()
                raise

    def _wait_ready(self, timeout):
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                tail = self.log_tail()
                if 'Address already in use' in tail:
                    raise _AddressInUse()
                raise RuntimeError('server %s exited on start (code %s): %s'
                                   % (self.name, self.process.returncode,
                                      tail))
            try:
                with socket.create_connection(self.addr, timeout=0.5):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError('server %s did not accept connections '
                                   'within %gs: %s' % (
                                       self.name, timeout, self.log_tail()))
            time.sleep(0.05)

    def restart(self, timeout=START_TIMEOUT):
        """Stop and start again on the same port (empties its caches)."""
        self.stop()
        return self.start(timeout, keep_port=True)

    @property
    def running(self):
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout=STOP_TIMEOUT):
        """SIGTERM (runzeo closes its storages); SIGKILL if it hangs."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning('%s ignored SIGTERM, killing', self.name)
                self.process.kill()
                self.process.wait()
        self._reap()

    def kill(self):
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self._reap()

    def _reap(self):
        if self._log is not None:
            self._log.close()
            self._log = None
        self.process = None
        _live.discard(self)

    def log_tail(self, size=2000):
        try:
            with open(self.log_path, 'rb') as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - size))
                return f.read().decode('utf-8', 'replace')
        except OSError as exc:
            return '(no log: %s)' % exc

    def cpu_seconds(self):
        return process_cpu_seconds(self.pid)

    def rss_bytes(self):
        return process_rss_bytes(self.pid)


class _AddressInUse(Exception):
    pass


class StopAll:
    """Context manager: stop the given servers on the way out, whatever
    happened; SIGTERM goes to all of them first so they stop in parallel."""

    def __init__(self, servers):
        self.servers = servers

    def __enter__(self):
        return self.servers

    def __exit__(self, *exc):
        stop_all(self.servers)
        return False


def stop_all(servers):
    for server in servers:
        if server.running:
            server.process.send_signal(signal.SIGTERM)
    for server in servers:
        try:
            server.stop()
        except Exception:
            logger.exception('stopping %s', server.name)
            server.kill()


# -- configuration texts ----------------------------------------------------

EVENTLOG = """
<eventlog>
  level warning
  <logfile>
    path %s
  </logfile>
</eventlog>
"""


def filestorage_config(directory, blobs=True):
    """make_config for a plain ZEO server over a FileStorage."""
    directory = os.path.abspath(directory)
    blob_line = 'blob-dir %s' % os.path.join(directory, 'blobs') \
        if blobs else ''

    def make(port):
        return ('<zeo>\n  address 127.0.0.1:%d\n</zeo>\n'
                '<filestorage 1>\n  path %s\n  %s\n</filestorage>\n'
                % (port, os.path.join(directory, 'Data.fs'), blob_line)
                + EVENTLOG % os.path.join(directory, 'server.log'))
    return make


def proxy_config(directory, backend, blobs=True):
    """make_config for a plain runzeo serving a <zeoclient> to `backend`:
    ZEO proxying ZEO, the cost of one extra hop without any RAID."""
    directory = os.path.abspath(directory)

    def make(port):
        lines = ['<zeo>', '  address 127.0.0.1:%d' % port, '</zeo>',
                 '<zeoclient 1>',
                 '  server 127.0.0.1:%d' % backend.port,
                 '  storage 1',
                 '  wait on']
        if blobs:
            lines += ['  blob-dir %s' % os.path.join(directory, 'cache'),
                      '  blob-cache-size 200MB']
        lines.append('</zeoclient>')
        return '\n'.join(lines) + '\n' + EVENTLOG % os.path.join(
            directory, 'server.log')
    return make


def raid_config(directory, backends, blobs=True, extra=''):
    """make_config for a zeoraid server (stock runzeo + %import zeoraid).

    backends: list of (name, Server) already started. ZODB's <zeoclient>
    sections, because runzeo's schema already has ZEO's types and a
    second `%import ZEO` (for <clientstorage>) is refused.
    """
    directory = os.path.abspath(directory)

    def make(port):
        lines = ['%import zeoraid',
                 '<zeo>', '  address 127.0.0.1:%d' % port, '</zeo>',
                 '<raidstorage 1>']
        if blobs:
            lines.append('  blob-dir %s' % os.path.join(directory,
                                                        'raid-blobs'))
        if extra:
            lines.append('  ' + extra)
        for name, server in backends:
            lines += ['  <zeoclient %s>' % name,
                      '    server 127.0.0.1:%d' % server.port,
                      '    storage 1',
                      '    wait on']
            if blobs:
                lines += ['    blob-dir %s' % os.path.join(
                    directory, 'cache-%s' % name),
                    '    blob-cache-size 200MB']
            lines.append('  </zeoclient>')
        lines.append('</raidstorage>')
        return '\n'.join(lines) + '\n' + EVENTLOG % os.path.join(
            directory, 'server.log')
    return make


# -- /proc readings -----------------------------------------------------------

def process_cpu_seconds(pid):
    """utime + stime of a process, in seconds (None if unknown)."""
    if pid is None:
        return None
    try:
        with open('/proc/%d/stat' % pid) as f:
            text = f.read()
    except OSError:
        return None
    # The command name may contain spaces: fields start after ')'.
    fields = text.rsplit(')', 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / CLOCK_TICKS


def process_rss_bytes(pid):
    if pid is None:
        return None
    try:
        with open('/proc/%d/status' % pid) as f:
            for line in f:
                if line.startswith('VmRSS:'):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


# -- statistics ---------------------------------------------------------------

def percentile(values, q):
    """The q-th percentile (0..100) with linear interpolation."""
    if not values:
        return None
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q / 100.0
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def latency_summary(latencies):
    """median / p99 / mean in milliseconds of a list of seconds."""
    if not latencies:
        return {'median_ms': None, 'p99_ms': None, 'mean_ms': None}
    return {
        'median_ms': round(percentile(latencies, 50) * 1000, 4),
        'p99_ms': round(percentile(latencies, 99) * 1000, 4),
        'mean_ms': round(sum(latencies) / len(latencies) * 1000, 4),
    }


def copy_storage_files(source, target):
    """Copy Data.fs and its index (if any) from source to target path."""
    shutil.copyfile(source, target)
    for suffix in ('.index',):
        if os.path.exists(source + suffix):
            shutil.copyfile(source + suffix, target + suffix)
        elif os.path.exists(target + suffix):
            os.remove(target + suffix)
    for suffix in ('.lock', '.tmp'):
        if os.path.exists(target + suffix):
            os.remove(target + suffix)
