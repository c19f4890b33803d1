"""zeoraid-demo: a local zeoraid cluster to play with (``make demo``).

Starts two backend ZEO servers (stock runzeo, FileStorage under var/) and
one zeoraid server in front of them, from the sample configurations in
etc/ (zeo1.conf, zeo2.conf, zeoraid.conf), commits through a real ZODB
client, prints the address to connect to and the zeoraid-manager commands
to try, and waits; Ctrl-C (or SIGTERM) stops everything cleanly.

``zeoraid-demo --smoke`` runs the whole story without waiting: start,
commit, kill -9 one backend, show the degraded status, commit again, stop.
It exits 0 only if every step behaved; CI runs it.

The etc/ files are templates whose ``%define`` lines (VAR, PORT, ZEO1,
ZEO2) the demo replaces, writing the configurations it runs to
var/demo/, so the printed commands work from any directory.
"""
import argparse
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import transaction
import ZEO.ClientStorage
import ZODB
from persistent.mapping import PersistentMapping

from zeoraid.manager.client import AdminClient
from zeoraid.manager.client import AdminUnreachable


logger = logging.getLogger('zeoraid.demo')

DEFAULT_PORT_BASE = 8100
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
_DEFINE = re.compile(r'^%define\s+(\w+)\b.*$', re.MULTILINE)


class DemoError(Exception):
    """A step of the demo failed; the message says which."""


def find_root(start=None):
    """The directory holding etc/zeoraid.conf: the current directory or
    the source checkout this module lives in."""
    candidates = [start] if start else [
        os.getcwd(),
        os.path.dirname(os.path.dirname(os.path.dirname(
            os.path.abspath(__file__))))]
    for root in candidates:
        if os.path.exists(os.path.join(root, 'etc', 'zeoraid.conf')):
            return os.path.abspath(root)
    raise DemoError('cannot find etc/zeoraid.conf in %s; use --root'
                    % ' or '.join(candidates))


def port_free(port):
    with socket.socket() as s:
        try:
            s.bind(('127.0.0.1', port))
        except OSError:
            return False
    return True


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def choose_ports(port_base):
    """(raid, zeo1, zeo2) ports: port_base, +1, +2; 0 means any free
    ports; None means the defaults, or free ones if they are taken."""
    if port_base:
        return port_base, port_base + 1, port_base + 2
    if port_base is None:
        ports = (DEFAULT_PORT_BASE, DEFAULT_PORT_BASE + 1,
                 DEFAULT_PORT_BASE + 2)
        if all(port_free(p) for p in ports):
            return ports
        print('ports %d-%d are taken; using free ports instead'
              % (ports[0], ports[-1]))
    ports = set()
    while len(ports) < 3:
        ports.add(free_port())
    return tuple(sorted(ports))


def render(template, values):
    """The template with its ``%define NAME ...`` lines set to values."""
    def replace(match):
        name = match.group(1)
        if name in values:
            return '%%define %s %s' % (name, values[name])
        return match.group(0)
    return _DEFINE.sub(replace, template)


def python_command(module):
    return [sys.executable, '-m', module]


def manager_command():
    """How to call zeoraid-manager here (script if installed)."""
    script = os.path.join(os.path.dirname(sys.executable), 'zeoraid-manager')
    if os.path.exists(script):
        return [script]
    return python_command('zeoraid.manager')


class Demo:
    """The three processes of the demo cluster."""

    def __init__(self, root, var, ports):
        self.root = root
        self.var = os.path.abspath(var)
        self.raid_port, self.zeo1_port, self.zeo2_port = ports
        self.confdir = os.path.join(self.var, 'demo')
        self.processes = {}
        self.logs = {}

    def write_configs(self):
        os.makedirs(self.confdir, exist_ok=True)
        values = {'VAR': self.var,
                  'ZEO1': '127.0.0.1:%d' % self.zeo1_port,
                  'ZEO2': '127.0.0.1:%d' % self.zeo2_port}
        ports = {'zeo1': self.zeo1_port, 'zeo2': self.zeo2_port,
                 'zeoraid': self.raid_port}
        self.configs = {}
        for name, port in ports.items():
            with open(os.path.join(self.root, 'etc', name + '.conf')) as f:
                text = render(f.read(), dict(values, PORT=port))
            path = os.path.join(self.confdir, name + '.conf')
            with open(path, 'w') as f:
                f.write(text)
            self.configs[name] = path

    @property
    def raid_conf(self):
        return self.configs['zeoraid']

    def launch(self, name, module):
        out = open(os.path.join(self.var, name + '.out'), 'ab')
        self.logs[name] = out
        self.processes[name] = subprocess.Popen(
            python_command(module) + ['-C', self.configs[name]],
            stdin=subprocess.DEVNULL, stdout=out, stderr=out,
            cwd=self.root, start_new_session=True)

    def wait_port(self, name, port):
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            self.check_alive(name)
            with socket.socket() as s:
                s.settimeout(1)
                try:
                    s.connect(('127.0.0.1', port))
                    return
                except OSError:
                    pass
            time.sleep(0.1)
        raise DemoError('%s did not start listening on port %d within %ds'
                        % (name, port, START_TIMEOUT))

    def check_alive(self, name):
        process = self.processes[name]
        if process.poll() is not None:
            raise DemoError('%s exited with status %s; see %s'
                            % (name, process.returncode,
                               os.path.join(self.var, name + '.out')))

    def admin(self):
        from zeoraid.server import ServerSettings
        from zeoraid.server import load_configuration
        settings = ServerSettings(load_configuration(self.raid_conf),
                                  self.raid_conf)
        return AdminClient(settings.admin_socket, timeout=5)

    def wait_raid(self):
        client = self.admin()
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            self.check_alive('zeoraid')
            try:
                return client.call('status')
            except AdminUnreachable:
                time.sleep(0.1)
        raise DemoError('zeoraid did not answer on %s within %ds'
                        % (client.address, START_TIMEOUT))

    def start(self):
        os.makedirs(self.var, exist_ok=True)
        self.write_configs()
        self.launch('zeo1', 'ZEO.runzeo')
        self.launch('zeo2', 'ZEO.runzeo')
        self.wait_port('zeo1', self.zeo1_port)
        self.wait_port('zeo2', self.zeo2_port)
        self.launch('zeoraid', 'zeoraid.server')
        self.wait_port('zeoraid', self.raid_port)
        return self.wait_raid()

    def stop(self):
        """SIGTERM the front server first, then the backends."""
        for name in ('zeoraid', 'zeo1', 'zeo2'):
            process = self.processes.get(name)
            if process is None:
                continue
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    print('%s ignored SIGTERM; killing it' % name)
                    process.kill()
                    process.wait()
            self.logs.pop(name).close()
            del self.processes[name]

    def kill(self, name):
        process = self.processes[name]
        process.kill()
        process.wait()

    def commit(self, label, attempts=5):
        """Commit one change through zeoraid with a real ZODB client;
        return the new counter value."""
        storage = ZEO.ClientStorage.ClientStorage(
            ('127.0.0.1', self.raid_port), wait_timeout=30)
        db = ZODB.DB(storage)
        try:
            for attempt in range(attempts):
                conn = db.open()
                try:
                    root = conn.root()
                    demo = root.get('demo')
                    if demo is None:
                        demo = root['demo'] = PersistentMapping(counter=0)
                    demo['counter'] += 1
                    demo['last'] = label
                    transaction.commit()
                    return demo['counter']
                except transaction.interfaces.TransientError as e:
                    transaction.abort()
                    print('  (retrying after %s: %s)'
                          % (e.__class__.__name__, e))
                    time.sleep(0.5)
                finally:
                    conn.close()
            raise DemoError('commit %r failed %d times' % (label, attempts))
        finally:
            db.close()

    def manager(self, *args):
        """Run zeoraid-manager; print and return (exit code, output)."""
        cmd = manager_command() + ['-C', self.raid_conf] + list(args)
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=60)
        output = (proc.stdout + proc.stderr).rstrip()
        print('$ zeoraid-manager -C %s %s   (exit %d)\n%s'
              % (self.raid_conf, ' '.join(args), proc.returncode, output))
        return proc.returncode, output


def print_banner(demo):
    manager = ' '.join(manager_command())
    conf = demo.raid_conf
    print('''
zeoraid demo cluster is running.

  ZODB clients connect to   127.0.0.1:%(raid)d   (storage '1')
  backends                  127.0.0.1:%(zeo1)d (zeo1)
                            127.0.0.1:%(zeo2)d (zeo2)
  files and logs            %(var)s

Connect from Python:

  import ZEO
  db = ZEO.DB(('127.0.0.1', %(raid)d))
  with db.transaction() as conn:
      print(conn.root()['demo'])

Try the manager (another terminal):

  %(manager)s -C %(conf)s status
  %(manager)s -C %(conf)s details
  %(manager)s -C %(conf)s disable zeo2
  %(manager)s -C %(conf)s reload --dry-run
  kill -9 $(cat %(var)s/zeo2.pid)      # crash a backend, then: status

Press Ctrl-C to stop everything.
''' % dict(raid=demo.raid_port, zeo1=demo.zeo1_port, zeo2=demo.zeo2_port,
           var=demo.var, manager=manager, conf=conf))
    sys.stdout.flush()


class _Stop(Exception):
    pass


def _raise_stop(signum, frame):
    raise _Stop()


def interactive(demo):
    status = demo.start()
    print('zeoraid is up: RAID %s is %s'
          % (status['storage'], status['status']))
    print('committed through zeoraid: counter = %d' % demo.commit('start'))
    print('committed through zeoraid: counter = %d' % demo.commit('again'))
    print_banner(demo)
    while True:
        time.sleep(1)
        for name in list(demo.processes):
            process = demo.processes[name]
            if process.poll() is not None and not getattr(
                    process, 'reported', False):
                process.reported = True
                print('note: %s exited (status %s)'
                      % (name, process.returncode))


def smoke(demo):
    """The non-interactive story; raises DemoError on the first failure."""
    status = demo.start()
    print('started: RAID %s %s' % (status['storage'], status['status']))
    if status['status'] != 'optimal':
        raise DemoError('expected an optimal RAID at start, got %s'
                        % status['status'])
    print('commit 1: counter = %d' % demo.commit('smoke 1'))
    code, _ = demo.manager('status')
    if code != 0:
        raise DemoError('status should exit 0 while optimal, got %d' % code)
    print('killing zeo2 (SIGKILL)')
    demo.kill('zeo2')
    print('commit 2: counter = %d' % demo.commit('smoke 2'))
    deadline = time.monotonic() + 30
    while True:
        code, output = demo.manager('status')
        if code == 2 and 'DEGRADED' in output:
            break
        if time.monotonic() > deadline:
            raise DemoError('status did not become degraded: %s' % output)
        time.sleep(0.5)
    demo.manager('details')
    print('commit 3: counter = %d' % demo.commit('smoke 3'))


def main(args=None):
    parser = argparse.ArgumentParser(
        prog='zeoraid-demo',
        description='Run a local zeoraid cluster (two backend ZEO servers'
        ' and a zeoraid server) from the sample configs in etc/.')
    parser.add_argument('--root', help='directory with etc/ (default: the'
                        ' current directory or the source checkout)')
    parser.add_argument('--var', help='directory for data, logs and the'
                        ' generated configs (default: ROOT/var)')
    parser.add_argument('--port-base', type=int, metavar='PORT',
                        help='use PORT (zeoraid), PORT+1, PORT+2 (backends);'
                        ' 0 picks free ports (default %d, or free ports if'
                        ' taken)' % DEFAULT_PORT_BASE)
    parser.add_argument('--smoke', action='store_true',
                        help='non-interactive check: start, commit, kill a'
                        ' backend, check the degraded status, commit, stop')
    parser.add_argument('--clean', action='store_true',
                        help='remove the data of earlier runs first')
    options = parser.parse_args(args)
    try:
        root = find_root(options.root)
    except DemoError as e:
        print('zeoraid-demo: %s' % e, file=sys.stderr)
        return 2
    var = options.var or os.path.join(root, 'var')
    if options.clean and os.path.isdir(var):
        shutil.rmtree(var)
    demo = Demo(root, var, choose_ports(options.port_base))
    previous = {sig: signal.signal(sig, _raise_stop)
                for sig in (signal.SIGINT, signal.SIGTERM)}
    code = 0
    try:
        if options.smoke:
            smoke(demo)
            print('smoke test passed')
        else:
            interactive(demo)
    except _Stop:
        print('\nstopping')
    except (DemoError, AdminUnreachable) as e:
        print('zeoraid-demo: FAILED: %s' % e, file=sys.stderr)
        code = 1
    finally:
        # Ignore further signals while stopping: stop must finish.
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        demo.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        print('all demo processes stopped')
    return code


if __name__ == '__main__':
    sys.exit(main())
