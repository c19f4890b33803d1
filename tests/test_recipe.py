"""The zeoraid:server buildout recipe, run for real.

A virtualenv with zc.buildout (cached under the temp directory, keyed by
a hash of setup.py and this file) runs ``bin/buildout`` on a buildout.cfg
with ``develop = <this working copy>``: two backend ZEO servers
(zc.zodbrecipes:server), a zeoraid server made by the recipe, one made
with zc.recipe.deployment (pid, log, run directories outside the buildout)
and one with ``shell-script = true``.  The generated control and manager
scripts then start, query and stop the servers.

Needs the package index (PyPI) for the first run; eggs are cached next to
the virtualenv, so later runs do not download.  Without network access
and without a cache, the test is skipped with the reason.
"""
import fcntl
import getpass
import hashlib
import importlib.metadata
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import unittest

import ZEO.ClientStorage
import ZODB


HERE = os.path.dirname(os.path.abspath(__file__))
WORKING_COPY = os.path.dirname(HERE)
BUILDOUT_TIMEOUT = 300


def _cache_dir():
    digest = hashlib.sha256()
    for path in (os.path.join(WORKING_COPY, 'setup.py'),
                 os.path.abspath(__file__)):
        with open(path, 'rb') as f:
            digest.update(f.read())
    digest.update(sys.version.encode())
    return os.path.join(tempfile.gettempdir(),
                        'zeoraid-recipe-%s' % digest.hexdigest()[:12])


def prune_caches(keep):
    """Remove caches of earlier setup.py/test versions (unless in use)."""
    parent, name = os.path.split(keep)
    for other in os.listdir(parent):
        path = os.path.join(parent, other)
        if (not other.startswith('zeoraid-recipe-') or other == name
                or not os.path.isdir(path)):
            continue
        try:
            with open(os.path.join(path, 'lock'), 'a') as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass            # in use by another run


def free_ports(count):
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(('127.0.0.1', 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def wait_port(port, timeout=30):
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(('127.0.0.1', port), 1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise AssertionError('nothing listens on %d after %ss'
                                     % (port, timeout))
            time.sleep(0.2)


def pypi_unreachable():
    """The reason the package index cannot be reached, or None."""
    try:
        socket.create_connection(('pypi.org', 443), 10).close()
    except OSError as e:
        return 'PyPI (pypi.org:443) unreachable: %s' % e
    return None


SHIM_SETUP = '''\
from setuptools import setup
setup(name='zeoraid-recipe-shim', version='0', py_modules=[],
      install_requires=['zeoraid', 'zc.recipe.egg'],
      entry_points={'zc.buildout': ['server = zeoraid.recipe:Server']})
'''

BUILDOUT_CFG = '''\
[buildout]
develop = %(develop)s
parts = zeo zeo1 zeo2 zeoraid deployment raidprod raidsh
eggs-directory = %(eggs)s
newest = false
show-picked-versions = false

[versions]
ZODB = %(zodb)s
ZEO = %(zeo)s

[zeo]
recipe = zc.recipe.egg:scripts
eggs = ZEO
       zdaemon
       zeoraid
scripts = runzeo zeopack zdaemon

[zeo1]
recipe = zc.zodbrecipes:server
zeo.conf =
  <zeo>
    address 127.0.0.1:%(zeo1)d
  </zeo>
  <filestorage 1>
    path ${buildout:parts-directory}/zeo1/Data.fs
  </filestorage>

[zeo2]
recipe = zc.zodbrecipes:server
zeo.conf =
  <zeo>
    address 127.0.0.1:%(zeo2)d
  </zeo>
  <filestorage 1>
    path ${buildout:parts-directory}/zeo2/Data.fs
  </filestorage>

[zeoraid]
recipe = %(recipe)s
zeoraid.conf =
  %%import zeoraid
  <zeo>
    address 127.0.0.1:%(raid)d
  </zeo>
  <raidstorage 1>
    timeout 10s
    <zeoclient zeo1>
      server 127.0.0.1:%(zeo1)d
      storage 1
    </zeoclient>
    <zeoclient zeo2>
      server 127.0.0.1:%(zeo2)d
      storage 1
    </zeoclient>
  </raidstorage>

[deployment]
recipe = zc.recipe.deployment
prefix = ${buildout:directory}/deploy
name = raiddemo
user = %(user)s
etc-user = %(user)s

[raidprod]
recipe = %(recipe)s
deployment = deployment
zeoraid.conf =
  <zeo>
    address 127.0.0.1:%(prod)d
  </zeo>
  <raidstorage main>
    <filestorage a>
      path ${deployment:lib-directory}/a.fs
    </filestorage>
    <filestorage b>
      path ${deployment:lib-directory}/b.fs
    </filestorage>
  </raidstorage>
  <raidstorage other>
    <filestorage c>
      path ${deployment:lib-directory}/c.fs
    </filestorage>
  </raidstorage>

[raidsh]
recipe = %(recipe)s
shell-script = true
zeoraid.conf =
  <zeo>
    address 127.0.0.1:%(sh)d
  </zeo>
  <raidstorage 1>
    <filestorage a>
      path ${buildout:parts-directory}/raidsh/a.fs
    </filestorage>
  </raidstorage>
'''


class RecipeTests(unittest.TestCase):

    def setUp(self):
        self.cache = _cache_dir()
        os.makedirs(self.cache, exist_ok=True)
        prune_caches(self.cache)
        self._lock = open(os.path.join(self.cache, 'lock'), 'w')
        fcntl.flock(self._lock, fcntl.LOCK_EX)     # one run at a time
        self.tmp = tempfile.mkdtemp(prefix='zeoraid-buildout-')
        self.started = []

    def tearDown(self):
        for script in reversed(self.started):
            self.run_script(script, 'stop', check=False)
        if os.environ.get('ZEORAID_KEEP_TMP'):
            sys.stderr.write('kept %s\n' % self.tmp)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)
        fcntl.flock(self._lock, fcntl.LOCK_UN)
        self._lock.close()

    def venv(self):
        """The cached virtualenv with zc.buildout; built on first use."""
        venv = os.path.join(self.cache, 'venv')
        stamp = os.path.join(venv, '.zeoraid-ok')
        if not os.path.exists(stamp):
            reason = pypi_unreachable()
            if reason:
                self.skipTest(reason)
            shutil.rmtree(venv, ignore_errors=True)
            subprocess.run([sys.executable, '-m', 'venv', venv], check=True,
                           timeout=120, stdin=subprocess.DEVNULL)
            proc = subprocess.run(
                [os.path.join(venv, 'bin', 'pip'), 'install', '-q',
                 '--disable-pip-version-check', 'zc.buildout>=6'],
                capture_output=True, text=True, timeout=300,
                stdin=subprocess.DEVNULL)
            if proc.returncode:
                reason = pypi_unreachable()
                if reason:
                    self.skipTest(reason)
                self.fail('pip install zc.buildout failed: %s'
                          % proc.stderr[-2000:])
            open(stamp, 'w').close()
        return venv

    def recipe_spec(self, directory):
        """The recipe to use: zeoraid's own entry point once setup.py has
        it; until then a shim egg that declares it for zeoraid.recipe."""
        with open(os.path.join(WORKING_COPY, 'setup.py')) as f:
            if 'zeoraid.recipe:Server' in f.read():
                return 'zeoraid[recipe]:server', []
        shim = os.path.join(directory, 'shim')
        os.makedirs(shim)
        with open(os.path.join(shim, 'setup.py'), 'w') as f:
            f.write(SHIM_SETUP)
        return 'zeoraid-recipe-shim:server', [shim]

    def buildout(self, directory):
        venv = self.venv()
        env = dict(os.environ)
        # The develop eggs are built with the venv's setuptools, not in an
        # isolated build environment (which would download setuptools on
        # every run); pip reads "0" as "no build isolation".
        env['PIP_NO_BUILD_ISOLATION'] = '0'
        env.pop('PYTHONPATH', None)
        proc = subprocess.run(
            [os.path.join(venv, 'bin', 'buildout'), '-c',
             os.path.join(directory, 'buildout.cfg')],
            cwd=directory, capture_output=True, text=True, env=env,
            timeout=BUILDOUT_TIMEOUT, stdin=subprocess.DEVNULL)
        if proc.returncode:
            reason = (pypi_unreachable()
                      if 'Couldn\'t find' in proc.stdout + proc.stderr
                      or 'Network' in proc.stdout + proc.stderr else None)
            if reason:
                self.skipTest(reason)
        self.assertEqual(proc.returncode, 0,
                         'bin/buildout failed:\n%s\n%s'
                         % (proc.stdout[-3000:], proc.stderr[-5000:]))
        return proc

    def run_script(self, path, *args, check=True, timeout=90):
        env = dict(os.environ)
        env.pop('PYTHONPATH', None)
        proc = subprocess.run([path] + list(args), capture_output=True,
                              text=True, timeout=timeout, env=env,
                              stdin=subprocess.DEVNULL,
                              cwd=os.path.dirname(path))
        if check is True:
            self.assertEqual(proc.returncode, 0, '%s %s: exit %d\n%s\n%s' % (
                path, ' '.join(args), proc.returncode, proc.stdout,
                proc.stderr))
        elif check is not False:
            self.assertEqual(proc.returncode, check, '%s %s:\n%s\n%s' % (
                path, ' '.join(args), proc.stdout, proc.stderr))
        return proc

    def start(self, path):
        self.run_script(path, 'start')
        self.started.append(path)

    def test_buildout_cluster(self):
        started = time.monotonic()
        directory = os.path.join(self.tmp, 'bo')
        os.makedirs(directory)
        recipe, shims = self.recipe_spec(directory)
        ports = dict(zip(('zeo1', 'zeo2', 'raid', 'prod', 'sh'),
                         free_ports(5)))
        values = dict(
            ports, develop='\n    '.join([WORKING_COPY] + shims),
            eggs=os.path.join(self.cache, 'eggs'), recipe=recipe,
            user=getpass.getuser(),
            zodb=importlib.metadata.version('ZODB'),
            zeo=importlib.metadata.version('ZEO'))
        with open(os.path.join(directory, 'buildout.cfg'), 'w') as f:
            f.write(BUILDOUT_CFG % values)
        self.buildout(directory)
        built = time.monotonic()

        bin = os.path.join(directory, 'bin')
        parts = os.path.join(directory, 'parts')
        deploy = os.path.join(directory, 'deploy')
        for name in ('zeo1', 'zeo2', 'zeoraid', 'zeoraid-1-manage',
                     'raidprod-main-manage', 'raidprod-other-manage',
                     'raidsh', 'raidsh-1-manage'):
            self.assertTrue(os.access(os.path.join(bin, name), os.X_OK),
                            name)
        self.assertFalse(os.path.exists(os.path.join(bin, 'raidprod')))

        # the generated server configuration
        with open(os.path.join(parts, 'zeoraid', 'zeoraid.conf')) as f:
            conf = f.read()
        self.assertIn('%import zeoraid', conf)
        self.assertIn('pid-filename %s' % os.path.join(
            parts, 'zeoraid', 'zeoraid.pid'), conf)
        self.assertIn('program %s -C %s' % (
            os.path.join(parts, 'zeoraid', 'zeoraid'),
            os.path.join(parts, 'zeoraid', 'zeoraid.conf')), conf)
        self.assertIn('path STDOUT', conf)
        self.assertIn('state-file %s' % os.path.join(
            parts, 'zeoraid', 'zeoraid-1.state'), conf)

        # backends, then the RAID, with the generated scripts
        self.start(os.path.join(bin, 'zeo1'))
        self.start(os.path.join(bin, 'zeo2'))
        wait_port(ports['zeo1'])
        wait_port(ports['zeo2'])
        ctl = os.path.join(bin, 'zeoraid')
        manage = os.path.join(bin, 'zeoraid-1-manage')
        self.start(ctl)
        proc = self.run_script(ctl, 'status')
        self.assertIn('program running', proc.stdout)
        proc = self.run_script(manage, 'status')
        self.assertTrue(proc.stdout.startswith(
            'RAID 1 OPTIMAL - 2/2 backends optimal'), proc.stdout)
        proc = self.run_script(manage, 'pid')
        self.assertTrue(proc.stdout.strip().isdigit(), proc.stdout)

        db = ZODB.DB(ZEO.ClientStorage.ClientStorage(
            ('127.0.0.1', ports['raid']), wait_timeout=30))
        try:
            with db.transaction() as conn:
                conn.root()['buildout'] = 'works'
            with db.transaction() as conn:
                self.assertEqual(conn.root()['buildout'], 'works')
        finally:
            db.close()
        # packing through the RAID (doc/OPERATION.md): ZEO's zeopack
        self.run_script(os.path.join(bin, 'zeopack'), '-h', '127.0.0.1',
                        '-p', str(ports['raid']), '-S', '1', '-d', '0')
        proc = self.run_script(manage, 'details')
        self.assertIn('zeo1', proc.stdout)
        self.assertIn('zeo2', proc.stdout)

        # zc.recipe.deployment: everything outside the buildout's parts
        etc = os.path.join(deploy, 'etc', 'raiddemo')
        run = os.path.join(deploy, 'var', 'run', 'raiddemo')
        log = os.path.join(deploy, 'var', 'log', 'raiddemo')
        rc = os.path.join(deploy, 'etc', 'init.d', 'raiddemo-raidprod')
        self.assertTrue(os.path.exists(os.path.join(
            etc, 'raidprod-zeoraid.conf')))
        with open(os.path.join(deploy, 'etc', 'logrotate.d',
                               'raiddemo-raidprod')) as f:
            self.assertIn('%s reopen_transcript' % rc, f.read())
        self.start(rc)
        self.assertTrue(os.path.exists(os.path.join(
            run, 'raidprod-zeoraid.pid')))
        self.assertTrue(os.path.exists(os.path.join(
            run, 'raidprod-zeoraid.admin.sock')))
        self.assertTrue(os.path.exists(os.path.join(
            log, 'raidprod-zeoraid.log')))
        lib = os.path.join(deploy, 'var', 'lib', 'raiddemo')
        for storage in ('main', 'other'):
            self.assertTrue(os.path.exists(os.path.join(
                lib, 'raidprod-zeoraid-%s.state' % storage)), os.listdir(lib))
        for storage in ('main', 'other'):
            proc = self.run_script(
                os.path.join(bin, 'raidprod-%s-manage' % storage), 'status')
            self.assertTrue(proc.stdout.startswith(
                'RAID %s OPTIMAL' % storage), proc.stdout)
        self.run_script(rc, 'stop')
        self.run_script(rc, 'status', check=3)

        # shell-script = true: a /bin/sh control script
        sh = os.path.join(bin, 'raidsh')
        with open(sh) as f:
            self.assertTrue(f.read().startswith('#!/bin/sh\n'))
        proc = self.run_script(sh, 'status', check=3)
        self.run_script(os.path.join(bin, 'raidsh-1-manage'), 'status',
                        check=3)

        # stop everything with the generated scripts
        self.run_script(ctl, 'stop')
        self.run_script(ctl, 'status', check=3)
        self.run_script(manage, 'status', check=3)
        self.run_script(os.path.join(bin, 'zeo1'), 'stop')
        self.run_script(os.path.join(bin, 'zeo2'), 'stop')
        self.started = []
        sys.stderr.write(' [buildout %.0fs, servers %.0fs] '
                         % (built - started, time.monotonic() - built))


RAID_CONF = '''\
%%import zeoraid
<zeo>
  address 127.0.0.1:%(port)d
  pid-filename %(dir)s/zeoraid.pid
</zeo>
<raidstorage 1>
%(backends)s</raidstorage>
<eventlog>
  <logfile>
    path %(dir)s/zeoraid.log
  </logfile>
</eventlog>
'''


def filestorage_backends(directory, names):
    return ''.join('  <filestorage %s>\n    path %s/%s.fs\n  </filestorage>\n'
                   % (name, directory, name) for name in names)


def unit_commands(path):
    """{'ExecStart': argv, ...} of a systemd unit file."""
    commands = {}
    with open(path) as f:
        for line in f:
            key, sep, value = line.strip().partition('=')
            if sep and key.startswith('Exec'):
                commands[key] = value.split()
    return commands


class PipInstallTests(unittest.TestCase):
    """doc/DEPLOYMENT.md's pip path: a virtualenv with zeoraid installed
    (not editable) from the working copy, the console scripts, and the
    command lines of etc/zeoraid.service."""

    def setUp(self):
        self.cache = _cache_dir()
        os.makedirs(self.cache, exist_ok=True)
        self._lock = open(os.path.join(self.cache, 'lock'), 'w')
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        self.tmp = tempfile.mkdtemp(prefix='zeoraid-pip-')
        self.process = None

    def tearDown(self):
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)
        fcntl.flock(self._lock, fcntl.LOCK_UN)
        self._lock.close()

    def source_copy(self):
        """The working copy's files, copied: pip builds in the source tree
        (build/, *.egg-info), and a stale build/ of the working copy could
        put deleted modules into the wheel."""
        copy = os.path.join(self.tmp, 'src-copy')
        shutil.copytree(WORKING_COPY, copy, ignore=shutil.ignore_patterns(
            '.git', '.venv', 'build', 'dist', 'var', '*.egg-info',
            '__pycache__', 'bin', 'parts', 'eggs', 'develop-eggs',
            'benchmarks', '*.fs', '*.fs.*'))
        return copy

    def pip_venv(self):
        source = self.source_copy()
        venv = os.path.join(self.cache, 'venv-pip')
        pip = [os.path.join(venv, 'bin', 'pip'), 'install', '-q',
               '--disable-pip-version-check']
        stamp = os.path.join(venv, '.zeoraid-ok')
        if not os.path.exists(stamp):
            reason = pypi_unreachable()
            if reason:
                self.skipTest(reason)
            shutil.rmtree(venv, ignore_errors=True)
            subprocess.run([sys.executable, '-m', 'venv', venv], check=True,
                           timeout=120, stdin=subprocess.DEVNULL)
            self.run_ok(pip + ['setuptools', 'wheel'], 300)
            self.run_ok(pip + ['--no-build-isolation', source], 600)
            open(stamp, 'w').close()
        else:
            # the working copy as it is now, dependencies already there
            self.run_ok(pip + ['--no-deps', '--no-build-isolation',
                               '--force-reinstall', source], 300)
        return venv

    def run_ok(self, cmd, timeout=90):
        proc = subprocess.run(cmd, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
        self.assertEqual(proc.returncode, 0, '%s: exit %d\n%s\n%s' % (
            ' '.join(cmd), proc.returncode, proc.stdout, proc.stderr))
        return proc

    def test_pip_install_zdaemon_and_systemd_commands(self):
        venv = self.pip_venv()
        bin = os.path.join(venv, 'bin')
        # not the working copy: the installed package, with its XML files
        proc = self.run_ok([os.path.join(bin, 'python'), '-c',
                            'import zeoraid.server as s; print(s.__file__)'])
        self.assertTrue(proc.stdout.startswith(venv), proc.stdout)
        port = free_ports(1)[0]
        conf = os.path.join(self.tmp, 'zeoraid.conf')

        def write_config(names):
            with open(conf + '.tmp', 'w') as f:
                f.write(RAID_CONF % dict(
                    port=port, dir=self.tmp,
                    backends=filestorage_backends(self.tmp, names)))
            os.rename(conf + '.tmp', conf)
        write_config(['b1', 'b2'])
        manager = [os.path.join(bin, 'zeoraid-manager'), '-C', conf]

        # zdaemon process control, as after `pip install`
        self.run_ok(manager + ['start'])
        try:
            proc = self.run_ok(manager + ['status'])
            self.assertTrue(proc.stdout.startswith('RAID 1 OPTIMAL'))
        finally:
            self.run_ok(manager + ['stop'])

        # the systemd unit's command lines
        commands = unit_commands(os.path.join(WORKING_COPY, 'etc',
                                              'zeoraid.service'))

        def command(key, **values):
            replace = {'/srv/zeoraid/bin/zeoraid': os.path.join(
                bin, 'zeoraid'), '/etc/zeoraid/zeoraid.conf': conf}
            replace.update(values)
            return [replace.get(word, word) for word in commands[key]]
        self.assertEqual(command('ExecStart'),
                         [os.path.join(bin, 'zeoraid'), '-C', conf])
        log = open(os.path.join(self.tmp, 'stdout.log'), 'wb')
        self.addCleanup(log.close)
        self.process = subprocess.Popen(
            command('ExecStart'), stdin=subprocess.DEVNULL, stdout=log,
            stderr=log)
        deadline = time.monotonic() + 60
        while subprocess.run(manager + ['status'], capture_output=True,
                             stdin=subprocess.DEVNULL).returncode:
            self.assertIsNone(self.process.poll(), 'zeoraid exited')
            self.assertLess(time.monotonic(), deadline, 'never optimal')
            time.sleep(0.2)
        db = ZODB.DB(ZEO.ClientStorage.ClientStorage(
            ('127.0.0.1', port), wait_timeout=30))
        try:
            with db.transaction() as conn:
                conn.root()['pip'] = 'installed'
        finally:
            db.close()

        # ExecReload (SIGHUP): a third backend joins, degraded
        write_config(['b1', 'b2', 'b3'])
        pid = str(self.process.pid)
        self.run_ok(command('ExecReload', **{'$MAINPID': pid}))
        deadline = time.monotonic() + 30
        while True:
            proc = subprocess.run(manager + ['status'], capture_output=True,
                                  text=True, stdin=subprocess.DEVNULL)
            if 'b3' in proc.stdout:
                break
            self.assertLess(time.monotonic(), deadline, proc.stdout)
            time.sleep(0.2)
        self.assertEqual(proc.returncode, 2, proc.stdout)
        self.assertIn('2/3 backends optimal', proc.stdout)

        # ExecStop (SIGTERM): clean exit
        self.run_ok(command('ExecStop', **{'$MAINPID': pid}))
        self.assertEqual(self.process.wait(60), 0)


class CompatMatrixScriptTests(unittest.TestCase):
    """tools/compat_matrix.py's machinery, on the current pair only (the
    full matrix needs virtualenvs from PyPI; doc/COMPATIBILITY.md)."""

    def test_current_pair(self):
        out = os.path.join(tempfile.mkdtemp(prefix='zeoraid-compat-'),
                           'matrix.json')
        self.addCleanup(shutil.rmtree, os.path.dirname(out), True)
        proc = subprocess.run(
            [sys.executable, os.path.join(WORKING_COPY, 'tools',
                                          'compat_matrix.py'),
             '--current-only', '--work', os.path.dirname(out),
             '--json', out], capture_output=True, text=True, timeout=180,
            stdin=subprocess.DEVNULL)
        self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)
        self.assertIn('| current (ZODB ', proc.stdout)
        import json
        with open(out) as f:
            result = json.load(f)
        cell = result['results']['current']['current']
        self.assertTrue(cell['ok'], cell)
        self.assertTrue(cell['detail'].startswith('OK ZODB '), cell)
