"""Build the ZODB/ZEO compatibility matrix of zeoraid.

    python tools/compat_matrix.py [--work DIR] [--markdown FILE] [--json FILE]
                                  [--only-clients A,B] [--only-backends A,B]

The zeoraid server always runs with the interpreter that runs this script
(the current pair, ZODB 6 / ZEO 6: zeoraid requires them).  Around it, the
script builds throwaway virtualenvs (under --work, default
/tmp/zeoraid-compat; kept between runs, rebuilt with --rebuild) with other
ZODB/ZEO versions and checks, per cell:

* client side: a ZODB application of that version connects to zeoraid
  over ZEO, commits, and a second connection of that application sees the
  commit (invalidation), then reads it back in a fresh connection;
* backend side: the two backend ZEO servers behind zeoraid run that ZEO
  version (runzeo with a FileStorage); ``A+B`` runs the first backend
  with A and the second with B (a rolling upgrade).

Every cell is (client environment, backend environment).  A cell that
cannot be built (no matching release installs on this Python) is recorded
with the reason.  The matrix is printed as a Markdown table and written
to --markdown/--json.  Everything listens on 127.0.0.1 only; every wait is
bounded.
"""
import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

#: name -> pip requirements of a throwaway environment
ENVIRONMENTS = {
    'ZODB5.6-ZEO5.2': ['ZODB==5.6.0', 'ZEO==5.2.3'],
    'ZODB5-ZEO5': ['ZODB>=5.6,<6', 'ZEO>=5.2,<6'],
    'ZODB5-ZEO6': ['ZODB>=5.6,<6', 'ZEO>=6,<7'],
    'ZODB6-ZEO6': ['ZODB>=6,<7', 'ZEO>=6,<7'],
}
CLIENTS = ['ZODB5.6-ZEO5.2', 'ZODB5-ZEO5', 'ZODB5-ZEO6', 'ZODB6-ZEO6']
BACKENDS = ['ZODB5.6-ZEO5.2', 'ZODB5-ZEO5', 'ZODB6-ZEO6',
            'ZODB5-ZEO5+ZODB6-ZEO6']

START_TIMEOUT = 60.0
CHECK_TIMEOUT = 120.0

CLIENT_CHECK = textwrap.dedent('''\
    import sys, time
    import transaction, ZODB, ZEO, ZEO.ClientStorage
    from persistent.mapping import PersistentMapping
    host, port, key = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    def db():
        return ZODB.DB(ZEO.ClientStorage.ClientStorage(
            (host, port), wait_timeout=30))
    db1, db2 = db(), db()
    tm1, tm2 = transaction.TransactionManager(), transaction.TransactionManager()
    c1, c2 = db1.open(tm1), db2.open(tm2)
    for i in range(3):
        root = c1.root()
        box = root.get(key)
        if box is None:
            box = root[key] = PersistentMapping()
        box['n'] = i
        box['data'] = b'x' * (1000 * (i + 1))
        tm1.commit()
    deadline = time.monotonic() + 20
    while True:                       # invalidation reaches the 2nd client
        tm2.begin()
        box = c2.root().get(key)
        if box is not None and box['n'] == 2:
            break
        if time.monotonic() > deadline:
            sys.exit('second client never saw the commit')
        time.sleep(0.1)
    c3 = db2.open(transaction.TransactionManager())
    assert c3.root()[key]['data'] == b'x' * 3000
    c3.close(); c1.close(); c2.close(); db1.close(); db2.close()
    import importlib.metadata as md
    print('OK ZODB %s ZEO %s' % (md.version('ZODB'), md.version('ZEO')))
''')


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def wait_port(port, process, timeout, what, log):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError('%s exited with %s: %s'
                               % (what, process.returncode, tail(log)))
        try:
            socket.create_connection(('127.0.0.1', port), 1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError('%s did not listen within %ss: %s'
                       % (what, timeout, tail(log)))


def tail(path, size=1500):
    try:
        with open(path, 'rb') as f:
            return f.read()[-size:].decode('utf-8', 'replace').strip()
    except OSError as e:
        return '(no log: %s)' % e


def one_line(text, limit=300):
    text = ' '.join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + '...'


class Environment:
    """A throwaway virtualenv with one ZODB/ZEO combination."""

    def __init__(self, work, name, requirements):
        self.name = name
        self.requirements = requirements
        self.path = os.path.join(work, 'venv-' + name)
        self.python = os.path.join(self.path, 'bin', 'python')
        self.error = None
        self.versions = None

    def build(self, rebuild=False):
        if not self.requirements:           # --current-only
            self.python = sys.executable
            import importlib.metadata as md
            self.versions = (md.version('ZODB'), md.version('ZEO'))
            return True
        stamp = os.path.join(self.path, '.compat-ok')
        if rebuild and os.path.exists(self.path):
            shutil.rmtree(self.path)
        try:
            if not os.path.exists(stamp):
                if os.path.exists(self.path):
                    shutil.rmtree(self.path)
                run([sys.executable, '-m', 'venv', self.path], 120)
                run([self.python, '-m', 'pip', 'install', '-q',
                     '--disable-pip-version-check'] + self.requirements,
                    600)
                open(stamp, 'w').close()
            out = run([self.python, '-c',
                       'import importlib.metadata as m;'
                       'print(m.version("ZODB"), m.version("ZEO"))'], 60)
            self.versions = tuple(out.split())
        except RuntimeError as e:
            self.error = str(e)
        return self.error is None


def run(cmd, timeout, **kw):
    try:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True,
                              timeout=timeout, **kw)
    except subprocess.TimeoutExpired:
        raise RuntimeError('%s timed out after %ss' % (cmd[0], timeout))
    if proc.returncode:
        raise RuntimeError('%s failed (exit %d): %s' % (
            ' '.join(cmd[:4]), proc.returncode,
            one_line((proc.stderr or proc.stdout)[-1200:])))
    return proc.stdout.strip()


class Cluster:
    """Two backend runzeo servers (one environment) and zeoraid."""

    def __init__(self, directory, backend_envs):
        self.directory = directory
        self.backend_envs = backend_envs      # one per backend
        self.processes = []

    def _spawn(self, name, cmd):
        log = os.path.join(self.directory, name + '.log')
        with open(log, 'ab') as out:
            process = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                cwd=self.directory)
        self.processes.append(process)
        return process, log

    def start(self):
        backends = []
        for name, env in zip(('zeo1', 'zeo2'), self.backend_envs):
            port = free_port()
            conf = os.path.join(self.directory, name + '.conf')
            with open(conf, 'w') as f:
                f.write('<zeo>\n  address 127.0.0.1:%d\n</zeo>\n'
                        '<filestorage 1>\n  path %s\n</filestorage>\n'
                        % (port, os.path.join(self.directory, name + '.fs')))
            runzeo = os.path.join(os.path.dirname(env.python), 'runzeo')
            process, log = self._spawn(name, [runzeo, '-C', conf])
            backends.append((name, port, process, log))
        for name, port, process, log in backends:
            wait_port(port, process, START_TIMEOUT, name, log)
        self.port = free_port()
        conf = os.path.join(self.directory, 'zeoraid.conf')
        sections = ''.join(
            '  <zeoclient %s>\n    server 127.0.0.1:%d\n    storage 1\n'
            '  </zeoclient>\n' % (name, port)
            for name, port, _, _ in backends)
        with open(conf, 'w') as f:
            f.write('%%import zeoraid\n<zeo>\n  address 127.0.0.1:%d\n'
                    '  pid-filename %s\n</zeo>\n<raidstorage 1>\n'
                    '  timeout 10s\n%s</raidstorage>\n'
                    % (self.port, os.path.join(self.directory, 'zeoraid.pid'),
                       sections))
        process, log = self._spawn(
            'zeoraid', [sys.executable, '-m', 'zeoraid.server', '-C', conf])
        wait_port(self.port, process, START_TIMEOUT, 'zeoraid', log)
        self.raid_log = log
        self.admin = os.path.join(self.directory, 'zeoraid.admin.sock')

    def raid_status(self):
        from zeoraid.manager.client import AdminClient
        deadline = time.monotonic() + 20
        while True:
            response = AdminClient(self.admin, timeout=10).request(
                'status', None, [])
            status = response.get('result', {}).get('status')
            if status == 'optimal' or time.monotonic() > deadline:
                return status, response
            time.sleep(0.2)

    def stop(self):
        for process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def check_cell(work, client_env, backend_envs):
    """Run one cell; return (ok, text)."""
    directory = tempfile.mkdtemp(prefix='cell-', dir=work)
    cluster = Cluster(directory, backend_envs)
    try:
        cluster.start()
        status, response = cluster.raid_status()
        if status != 'optimal':
            return False, 'RAID not optimal: %s' % one_line(response)
        script = os.path.join(directory, 'client_check.py')
        with open(script, 'w') as f:
            f.write(CLIENT_CHECK)
        out = run([client_env.python, script, '127.0.0.1', str(cluster.port),
                   'compat'], CHECK_TIMEOUT)
        status, response = cluster.raid_status()
        if status != 'optimal':
            return False, 'RAID %s after the commits: %s' % (
                status, one_line(response))
        return True, out.splitlines()[-1]
    except RuntimeError as e:
        return False, one_line(e)
    finally:
        cluster.stop()
        if not os.environ.get('ZEORAID_KEEP_TMP'):
            shutil.rmtree(directory, ignore_errors=True)


def markdown(results, envs):
    import ZEO
    import importlib.metadata as md
    lines = [
        'Generated by `tools/compat_matrix.py` on %s, Python %s; zeoraid'
        ' server: ZODB %s, ZEO %s.' % (
            time.strftime('%Y-%m-%d'), platform.python_version(),
            md.version('ZODB'), md.version('ZEO')),
        '',
        '| client \\ backends | %s |' % ' | '.join(
            '%s (%s)' % (b, ' + '.join(_versions(envs[n])
                                       for n in b.split('+')))
            for b in BACKENDS),
        '|---|%s' % ('---|' * len(BACKENDS)),
    ]
    for c in CLIENTS:
        cells = []
        for b in BACKENDS:
            ok, text = results[c][b]
            cells.append(('works' if ok else 'FAILS: ' + text)
                         .replace('|', '/'))
        lines.append('| %s (%s) | %s |' % (c, _versions(envs[c]),
                                            ' | '.join(cells)))
    for name in sorted(envs):
        if envs[name].error:
            lines.append('')
            lines.append('%s could not be built: %s'
                         % (name, envs[name].error))
    del ZEO
    return '\n'.join(lines) + '\n'


def _versions(env):
    if env.versions:
        return 'ZODB %s, ZEO %s' % env.versions
    return 'not built'


def backend_envs(envs, column):
    """The environments of the two backends of a column (A or A+B)."""
    names = column.split('+')
    return [envs[names[0]], envs[names[-1]]]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--work', default=os.path.join(
        tempfile.gettempdir(), 'zeoraid-compat'))
    parser.add_argument('--rebuild', action='store_true',
                        help='rebuild the virtualenvs')
    parser.add_argument('--markdown', help='also write the table here')
    parser.add_argument('--json', help='also write the results here')
    parser.add_argument('--only-clients', help='comma-separated subset')
    parser.add_argument('--only-backends', help='comma-separated subset')
    parser.add_argument('--current-only', action='store_true',
                        help='one cell: client and backends run with this'
                        ' interpreter (no virtualenv, no network); a smoke'
                        ' test of the script, run by the test suite')
    options = parser.parse_args(argv)
    global CLIENTS, BACKENDS
    if options.current_only:
        ENVIRONMENTS['current'] = []
        CLIENTS = BACKENDS = ['current']
    if options.only_clients:
        CLIENTS = options.only_clients.split(',')
    if options.only_backends:
        BACKENDS = options.only_backends.split(',')
    os.makedirs(options.work, exist_ok=True)
    envs = {}
    names = set(CLIENTS)
    for b in BACKENDS:
        names.update(b.split('+'))
    for name in sorted(names):
        env = envs[name] = Environment(options.work, name, ENVIRONMENTS[name])
        started = time.monotonic()
        env.build(options.rebuild)
        sys.stderr.write('environment %s: %s (%.0fs)\n' % (
            name, env.versions or env.error, time.monotonic() - started))
    results = {}
    for c in CLIENTS:
        results[c] = {}
        for b in BACKENDS:
            backends = backend_envs(envs, b)
            if envs[c].error or any(e.error for e in backends):
                results[c][b] = (False, 'environment not built')
                continue
            started = time.monotonic()
            results[c][b] = check_cell(options.work, envs[c], backends)
            sys.stderr.write('cell client=%s backends=%s: %s (%.0fs)\n' % (
                c, b, results[c][b], time.monotonic() - started))
    table = markdown(results, envs)
    print(table)
    if options.markdown:
        with open(options.markdown, 'w') as f:
            f.write(table)
    if options.json:
        with open(options.json, 'w') as f:
            json.dump({'environments': {n: {'requirements': e.requirements,
                                            'versions': e.versions,
                                            'error': e.error}
                                        for n, e in envs.items()},
                       'results': {c: {b: {'ok': ok, 'detail': text}
                                       for b, (ok, text) in row.items()}
                                   for c, row in results.items()}},
                      f, indent=2, sort_keys=True)
    return 0 if all(ok for row in results.values()
                    for ok, _ in row.values()) else 1


if __name__ == '__main__':
    sys.exit(main())
