"""The zeoraid server process, end to end.

Real processes on 127.0.0.1: runzeo backends (tests.zeo_backends), a
``python -m zeoraid.server`` process in front of them, ZODB clients over
ZEO, and zeoraid-manager run as a subprocess.
"""
import glob
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import unittest

import transaction
import ZEO.ClientStorage
import ZEO.Exceptions
import ZODB
import ZODB.POSException
import ZODB.utils
from persistent.mapping import PersistentMapping

from tests.polling import wait_until
from tests.zeo_backends import start_backends
from tests.zeo_backends import stop_all
from zeoraid.manager.client import AdminClient


START_TIMEOUT = 60.0
_ADDRESS_RE = re.compile(r'serving storages .* on ([\d.]+):(\d+);')


def backend_section(name, addr, extra=''):
    return ('  <zeoclient %s>\n    server %s:%d\n    storage 1\n'
            '    min-disconnect-poll 1\n    max-disconnect-poll 2\n%s'
            '  </zeoclient>\n' % (name, addr[0], addr[1], extra))




class RaidServer:
    """A zeoraid server process for tests, with its config in ``directory``.

    backends: [(name, (host, port))].  The ZEO port is 0 (the OS picks
    it); the server's log line tells which one it got.
    """

    def __init__(self, directory, backends, raid_options='timeout 5s',
                 zeoraid_section='', eventlog=None):
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        self.conf = os.path.join(directory, 'zeoraid.conf')
        self.pidfile = os.path.join(directory, 'zeoraid.pid')
        self.admin_socket = os.path.join(directory, 'zeoraid.admin.sock')
        self.log_path = os.path.join(directory, 'zeoraid.out')
        self.raid_options = raid_options
        self.zeoraid_section = zeoraid_section
        self.eventlog = eventlog
        self.process = None
        self.addr = None
        self.write_config(backends)

    def config_text(self, backends):
        text = ('%%import zeoraid\n<zeo>\n  address 127.0.0.1:0\n'
                '  pid-filename %s\n</zeo>\n%s<raidstorage 1>\n  %s\n'
                % (self.pidfile, self.zeoraid_section, self.raid_options))
        for name, addr in backends:
            text += backend_section(name, addr)
        text += '</raidstorage>\n'
        if self.eventlog:
            text += ('<eventlog>\n  <logfile>\n    path %s\n  </logfile>\n'
                     '</eventlog>\n' % self.eventlog)
        return text

    def write_config(self, backends=None, text=None):
        if backends is not None:
            self.backends = backends
        if text is None:
            text = self.config_text(backends)
        tmp = self.conf + '.tmp'
        with open(tmp, 'w') as f:
            f.write(text)
        os.rename(tmp, self.conf)

    def launch(self):
        self._log = open(self.log_path, 'ab')
        self.process = subprocess.Popen(
            [sys.executable, '-m', 'zeoraid.server', '-C', self.conf],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log,
            cwd=self.directory)
        return self.process

    def start(self, timeout=START_TIMEOUT):
        """Start and wait until the admin endpoint answers."""
        seen = len(self.log())      # earlier runs' lines do not count
        self.launch()
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise AssertionError('zeoraid exited with %s: %s'
                                     % (self.process.returncode, self.log()))
            match = _ADDRESS_RE.search(self.log()[seen:])
            if match and os.path.exists(self.admin_socket):
                try:
                    self.admin('status')
                except OSError:
                    pass
                else:
                    self.addr = (match.group(1), int(match.group(2)))
                    return self.addr
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError('zeoraid did not start: %s'
                                     % self.log())
            time.sleep(0.1)

    def log(self):
        """Output and event log of the server (all of them, concatenated)."""
        text = ''
        for path in (self.log_path, self.eventlog):
            try:
                with open(path, 'rb') as f:
                    text += f.read().decode('utf-8', 'replace')
            except (OSError, TypeError):
                pass
        for path in sorted(glob.glob((self.eventlog or '//') + '.*')):
            with open(path, 'rb') as f:
                text += f.read().decode('utf-8', 'replace')
        return text

    def admin(self, op, args=(), storage=None, timeout=10):
        """One raw admin request; the response dict."""
        return AdminClient(self.admin_socket, timeout=timeout).request(
            op, storage, args)

    def manager(self, *args, timeout=60):
        """Run zeoraid-manager -C <conf> ARGS; the CompletedProcess."""
        return subprocess.run(
            [sys.executable, '-m', 'zeoraid.manager', '-C', self.conf]
            + list(args), stdin=subprocess.DEVNULL, capture_output=True,
            text=True, timeout=timeout)

    def client_storage(self, **kw):
        options = dict(wait_timeout=30, min_disconnect_poll=0.2,
                       max_disconnect_poll=1)
        options.update(kw)
        return ZEO.ClientStorage.ClientStorage(self.addr, **options)

    def signal(self, sig):
        self.process.send_signal(sig)

    def stop(self, timeout=30):
        """SIGTERM; return the exit status (SIGKILL if it hangs)."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                self._close()
                raise AssertionError('zeoraid ignored SIGTERM: %s'
                                     % self.log())
        status = self.process.returncode
        self._close()
        return status

    def kill(self):
        if self.process is not None:
            if self.process.poll() is None:
                self.process.kill()
            self.process.wait()
            self._close()

    def _close(self):
        self._log.close()
        self.process = None


def details(server):
    response = server.admin('details')
    assert response['ok'], response
    return response['result']


class ServerTestBase(unittest.TestCase):
    """Fresh runzeo backends (started on first use) and a fresh zeoraid
    server over the first two, per test: tests that degrade a backend and
    commit make the backends diverge, so they are never shared."""

    backend_count = 2
    start_server = True

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix='zeoraid-server-')
        self.closers = []
        self._backends = None
        self.server = None
        if self.start_server:
            self.server = self.make_server()

    def tearDown(self):
        for close in reversed(self.closers):
            try:
                close()
            except Exception:
                pass
        if self.server is not None:
            self.server.kill()
        if self._backends is not None:
            stop_all(self._backends)
        if os.environ.get('ZEORAID_KEEP_TMP'):     # debugging aid
            sys.stderr.write('kept %s\n' % self.tmp)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    @property
    def backends(self):
        if self._backends is None:
            self._backends = start_backends(self.tmp, self.backend_count)
        return self._backends

    @property
    def dir(self):
        path = os.path.join(self.tmp, 'raid')
        os.makedirs(path, exist_ok=True)
        return path

    def backend_list(self, *indexes):
        return [('b%d' % (i + 1), self.backends[i].addr) for i in indexes]

    def make_server(self, **kw):
        server = RaidServer(self.dir, self.backend_list(0, 1), **kw)
        server.start()
        return server

    def db(self):
        db = ZODB.DB(self.server.client_storage())
        self.closers.append(db.close)
        return db

    def commit(self, db, key, value):
        conn = db.open()
        try:
            conn.root()[key] = value
            transaction.commit()
        finally:
            conn.close()


class ServerTests(ServerTestBase):

    backend_count = 3

    def test_commit_and_read_through_zeoraid(self):
        db = self.db()
        self.commit(db, 'a', PersistentMapping(x=1))
        self.commit(db, 'b', 2)
        other = self.db()
        conn = other.open()
        self.assertEqual(conn.root()['a']['x'], 1)
        self.assertEqual(conn.root()['b'], 2)
        conn.close()
        info = details(self.server)
        self.assertEqual(info['status'], 'optimal')
        self.assertNotEqual(info['last_tid'], '0' * 16)
        # Every backend got the same transactions: same last tid.
        for name in ('b1', 'b2'):
            self.assertEqual(info['backends'][name]['last_tid'],
                             info['last_tid'], name)

    def test_admin_socket_is_owner_only(self):
        st = os.stat(self.server.admin_socket)
        self.assertTrue(stat.S_ISSOCK(st.st_mode))
        self.assertEqual(stat.S_IMODE(st.st_mode), 0o600)
        self.assertEqual(st.st_uid, os.geteuid())

    def test_management_is_not_on_the_zeo_port(self):
        db = self.db()
        self.commit(db, 'a', 1)
        cs = self.server.client_storage()
        self.closers.append(cs.close)
        for method, args in [('raid_status', ()), ('raid_details', ()),
                             ('raid_disable', ('b2',))]:
            with self.assertRaises(Exception) as caught:
                cs._call(method, *args)
            self.assertIsInstance(caught.exception,
                                  ZEO.Exceptions.ClientDisconnected)
        # nothing was disabled, and the database still works
        self.assertEqual(self.server.admin('status')['result']['status'],
                         'optimal')
        self.commit(db, 'b', 2)

    def test_manager_status_details_disable(self):
        r = self.server.manager('status')
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertTrue(r.stdout.startswith(
            'RAID 1 OPTIMAL - 2/2 backends optimal | optimal=2;'), r.stdout)
        self.assertEqual(len(r.stdout.splitlines()), 1)

        r = self.server.manager('-S', '2', 'status')
        self.assertEqual(r.returncode, 3)
        self.assertIn("unknown storage '2' (RAID storages: 1)", r.stdout)

        r = self.server.manager('-S', '1', 'disable', 'b2')
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn('b2', r.stdout)

        r = self.server.manager('status')
        self.assertEqual(r.returncode, 2, r.stdout + r.stderr)
        self.assertIn('RAID 1 DEGRADED - 1/2 backends optimal', r.stdout)
        self.assertIn('degraded: b2', r.stdout)

        r = self.server.manager('details')
        self.assertEqual(r.returncode, 2)
        line = [row for row in r.stdout.splitlines() if row.startswith('b2 ')]
        self.assertEqual(len(line), 1, r.stdout)
        self.assertIn('degraded', line[0])
        self.assertIn('disabled by operator', line[0])

        r = self.server.manager('--json', 'details')
        self.assertEqual(r.returncode, 2)
        result = json.loads(r.stdout)['result']
        self.assertEqual(result['backends']['b2']['state'], 'degraded')
        self.assertEqual(result['backends']['b1']['state'], 'optimal')

        # the last optimal backend cannot be disabled
        r = self.server.manager('disable', 'b1')
        self.assertEqual(r.returncode, 3)
        self.assertIn('last optimal backend', r.stderr)
        self.assertEqual(len(r.stderr.splitlines()), 1)
        self.assertEqual(details(self.server)['backends']['b1']['state'],
                         'optimal')
        # the database keeps working on the remaining backend
        self.commit(self.db(), 'c', 3)

    def test_request_errors_change_nothing(self):
        cases = [
            (dict(op='frobnicate'), 'unknown operation'),
            (dict(op='status', storage='2'), 'unknown storage'),
            (dict(op='disable', args=['nope']), 'unknown backend'),
            (dict(op='disable', args=[]), 'disable takes 1 argument, got 0'),
            (dict(op='disable', args=['b1', 'b2']), 'got 2'),
            (dict(op='status', args=['x']), 'status takes 0 arguments'),
            (dict(op='reload', args=['--force']), '--dry-run'),
            (dict(op='disable', args='b2'), 'list of strings'),
            (dict(op='recover', args=['nope']), ''),
        ]
        for request, message in cases:
            response = self.raw(request)
            self.assertFalse(response['ok'], request)
            self.assertIn(message, response['error'], request)
            self.assertNotIn('\n', response['error'])
        self.assertIn('not valid JSON', self.raw_line(b'{nonsense\n')['error'])
        self.assertIn('JSON object', self.raw_line(b'[1, 2]\n')['error'])
        info = details(self.server)
        self.assertEqual(info['status'], 'optimal')
        self.assertEqual(sorted(info['backends']), ['b1', 'b2'])

    def raw(self, request):
        return self.raw_line(json.dumps(request).encode() + b'\n')

    def raw_line(self, line):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(self.server.admin_socket)
        try:
            sock.sendall(line)
            data = b''
            while not data.endswith(b'\n'):
                chunk = sock.recv(4096)
                self.assertTrue(chunk, 'connection closed')
                data += chunk
        finally:
            sock.close()
        return json.loads(data)

    def test_several_requests_on_one_connection(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(self.server.admin_socket)
        self.addCleanup(sock.close)
        sock.sendall(b'{"op": "status"}\n\n{"op": "details"}\n')
        reader = sock.makefile('rb')
        first = json.loads(reader.readline())
        second = json.loads(reader.readline())
        self.assertEqual(first['result']['status'], 'optimal')
        self.assertIn('last_tid', second['result'])

    def test_recover_wait_and_verify(self):
        r = self.server.manager('recover', 'b2')
        self.assertEqual(r.returncode, 3)
        self.assertIn('nothing to recover', r.stderr)
        self.assertEqual(len(r.stderr.splitlines()), 1, r.stderr)
        self.assertEqual(self.server.manager('disable', 'b2').returncode, 0)
        db = self.db()
        for i in range(5):
            self.commit(db, 'k%d' % i, i)
        self.assertEqual(self.server.manager('status').returncode, 2)
        r = self.server.manager('recover', 'b2', '--wait', '--interval',
                                '0.1')
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn('backend b2 recovered', r.stdout)
        r = self.server.manager('status')
        self.assertEqual(r.returncode, 0, r.stdout)
        info = details(self.server)
        self.assertEqual(info['backends']['b2']['last_tid'],
                         info['last_tid'])
        r = self.server.manager('verify')
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn('IDENTICAL', r.stdout)
        r = self.server.manager('verify', '--since', 'not-a-tid')
        self.assertEqual(r.returncode, 3, r.stdout + r.stderr)
        self.assertEqual(len(r.stderr.splitlines()), 1, r.stderr)

    def test_reload_adds_and_removes_a_backend(self):
        self.commit(self.db(), 'a', 1)
        self.server.write_config(self.backend_list(0, 2))   # b1, b3
        r = self.server.manager('reload', '--dry-run')
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn('would add: b3', r.stdout)
        self.assertIn('would remove: b2', r.stdout)
        self.assertIn('would keep: b1', r.stdout)
        self.assertEqual(sorted(details(self.server)['backends']),
                         ['b1', 'b2'])

        r = self.server.manager('--json', 'reload')
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        diff = json.loads(r.stdout)['result']
        self.assertEqual((diff['added'], diff['removed'], diff['kept']),
                         (['b3'], ['b2'], ['b1']))
        info = details(self.server)
        self.assertEqual(sorted(info['backends']), ['b1', 'b3'])
        self.assertEqual(info['backends']['b1']['state'], 'optimal')
        self.assertEqual(info['backends']['b3']['state'], 'degraded')
        self.assertIn('reload', info['backends']['b3']['reason'])
        self.assertEqual(self.server.manager('status').returncode, 2)
        # still serving
        self.commit(self.db(), 'b', 2)

    def test_reload_replaces_a_backend_whose_address_changed(self):
        db = self.db()
        self.commit(db, 'a', 1)
        # b2 moves to the third (empty) backend server.
        moved = [('b1', self.backends[0].addr), ('b2', self.backends[2].addr)]
        self.server.write_config(moved)
        r = self.server.manager('reload', '--dry-run')
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn('would replace (settings changed): b2', r.stdout)
        self.assertIn('would keep: b1', r.stdout)
        self.assertEqual(details(self.server)['backends']['b2']['state'],
                         'optimal')
        r = self.server.manager('--json', 'reload')
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        diff = json.loads(r.stdout)['result']
        self.assertEqual((diff['changed'], diff['kept'], diff['added']),
                         (['b2'], ['b1'], []))
        info = details(self.server)['backends']['b2']
        self.assertEqual(info['state'], 'degraded')
        self.assertIn('settings changed by reload', info['reason'])
        self.commit(db, 'b', 2)
        r = self.server.manager('recover', 'b2', '--wait', '--interval',
                                '0.1')
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertEqual(self.server.manager('status').returncode, 0)
        # The new server (now b2) holds the whole history, as b1 does.
        r = self.server.manager('verify')
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn('IDENTICAL', r.stdout)

    def test_slow_reload_does_not_block_zeo_clients(self):
        # b3 accepts TCP connections but never speaks ZEO: opening it
        # hangs until the RAID's timeout (5s), in the admin thread.
        hole = socket.socket()
        hole.bind(('127.0.0.1', 0))
        hole.listen(5)
        self.addCleanup(hole.close)
        self.server.write_config(self.backend_list(0, 1)
                                 + [('b3', hole.getsockname())])
        db = self.db()
        self.commit(db, 'a', 0)
        reload = subprocess.Popen(
            [sys.executable, '-m', 'zeoraid.manager', '-C',
             self.server.conf, '--timeout', '30', 'reload'],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)
        try:
            wait_until(lambda: 'admin request: reload' in self.server.log(),
                       20, 'the reload to start')
            started = time.monotonic()
            for i in range(5):
                self.commit(db, 'a', i + 1)
            self.assertLess(time.monotonic() - started, 2.5)
            self.assertIsNone(reload.poll(), 'reload was not slow')
            output, _ = reload.communicate(timeout=60)
        finally:
            if reload.poll() is None:
                reload.kill()
                reload.wait()
        self.assertEqual(reload.returncode, 0, output)
        self.assertIn('added: b3', output)
        b3 = details(self.server)['backends']['b3']
        self.assertEqual(b3['state'], 'degraded')
        self.assertIn('timed out', b3['reason'])

    def test_reload_applies_raidstorage_settings(self):
        db = self.db()
        self.commit(db, 'a', 1)
        # timeout can change online; shared-backend-io needs a restart.
        self.server.raid_options = 'timeout 1s\n  shared-backend-io off'
        self.server.write_config(self.backend_list(0, 1))
        r = self.server.manager('reload', '--dry-run')
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn('would change settings: timeout 5 -> 1', r.stdout)
        self.assertIn('needs a restart (left as they are): '
                      'shared-backend-io', r.stdout)
        r = self.server.manager('--json', 'reload')
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        diff = json.loads(r.stdout)['result']
        self.assertEqual(diff['settings'], {'timeout': [5.0, 1.0]})
        self.assertEqual(diff['restart_needed'], ['shared-backend-io'])
        self.assertIn('setting timeout changed by reload: 5.0 -> 1.0',
                      self.server.log())
        # Applied: the next reload has no timeout change left, and the
        # restart-only key is still reported.
        r = self.server.manager('reload', '--dry-run')
        self.assertIn('would change settings: -', r.stdout)
        self.assertIn('shared-backend-io', r.stdout)
        # The RAID uses the new deadline: a hung b2 is degraded after 1s,
        # not 5s.
        frozen = self.backends[1].process.pid
        os.kill(frozen, signal.SIGSTOP)
        try:
            started = time.monotonic()
            self.commit(db, 'b', 2)
            self.assertLess(time.monotonic() - started, 3.5)
        finally:
            os.kill(frozen, signal.SIGCONT)
        info = details(self.server)['backends']['b2']
        self.assertEqual(info['state'], 'degraded')
        self.assertIn('1s', info['reason'])

    def test_backend_states_survive_a_restart_without_a_state_file_key(self):
        # The configuration has no state-file: the server keeps one next
        # to its pid file all the same.
        self.assertNotIn('state-file', open(self.server.conf).read())
        self.commit(self.db(), 'a', 1)
        self.assertEqual(self.server.manager('disable', 'b2').returncode, 0)
        path = os.path.join(self.server.directory, 'zeoraid.1.state.json')
        self.assertTrue(os.path.exists(path))
        self.assertIn('keeping backend states in %s' % path,
                      self.server.log())
        r = self.server.manager('--json', 'reload', '--dry-run')
        self.assertEqual(json.loads(r.stdout)['result']['restart_needed'],
                         [])
        self.assertEqual(self.server.stop(timeout=30), 0)
        self.server.start()
        b2 = details(self.server)['backends']['b2']
        self.assertEqual(b2['state'], 'degraded')
        self.assertIn('degraded before the restart', b2['reason'])

    def test_reload_refuses_to_leave_no_optimal_backend(self):
        self.assertEqual(self.server.manager('disable', 'b1').returncode, 0)
        self.server.write_config(self.backend_list(0, 2))   # b1, b3
        for args in (['reload', '--dry-run'], ['reload']):
            r = self.server.manager(*args)
            self.assertEqual(r.returncode, 3, r.stdout)
            self.assertIn('no optimal backend would remain', r.stderr)
        info = details(self.server)
        self.assertEqual(sorted(info['backends']), ['b1', 'b2'])
        self.assertEqual(info['backends']['b2']['state'], 'optimal')

    def test_reload_of_an_unparsable_config_changes_nothing(self):
        self.server.write_config(text='%import zeoraid\n<zeo>\n  addr\n')
        r = self.server.manager('--admin', self.server.admin_socket,
                                'reload')
        self.assertEqual(r.returncode, 3)
        self.assertIn('does not parse, nothing changed', r.stderr)
        self.assertEqual(len(r.stderr.splitlines()), 1)
        # a config that parses but lacks the served storage
        self.server.write_config(
            text='%%import zeoraid\n<zeo>\n  address 127.0.0.1:0\n</zeo>\n'
            '<raidstorage 2>\n%s</raidstorage>\n'
            % backend_section('b1', self.backends[0].addr))
        r = self.server.manager('--admin', self.server.admin_socket,
                                'reload')
        self.assertEqual(r.returncode, 3)
        self.assertIn("storage '1' is missing", r.stderr)
        self.assertEqual(sorted(details(self.server)['backends']),
                         ['b1', 'b2'])

    def test_sighup_reloads(self):
        self.server.write_config(self.backend_list(0))
        self.server.signal(signal.SIGHUP)
        wait_until(lambda: list(details(self.server)['backends']) == ['b1'],
                   20, 'b2 removed by SIGHUP')
        self.assertEqual(self.server.process.poll(), None)
        self.assertEqual(details(self.server)['status'], 'optimal')
        # a broken config on SIGHUP is logged and changes nothing
        self.server.write_config(text='broken <\n')
        self.server.signal(signal.SIGHUP)
        wait_until(lambda: 'reload refused' in self.server.log(), 20,
                   'the refused reload in the log')
        self.assertEqual(list(details(self.server)['backends']), ['b1'])
        self.commit(self.db(), 'a', 1)

    def test_sigterm_aborts_in_flight_and_exits_cleanly(self):
        db = self.db()
        self.commit(db, 'a', 1)
        before = details(self.server)['last_tid']
        # A transaction voted but not finished holds the RAID's commit.
        cs = self.server.client_storage()
        self.closers.append(cs.close)
        txn = transaction.Transaction()
        cs.tpc_begin(txn)
        cs.store(cs.new_oid(), ZODB.utils.z64, b'x' * 10, '', txn)
        cs.tpc_vote(txn)
        status = self.server.stop(timeout=30)
        self.assertEqual(status, 0)
        self.assertFalse(os.path.exists(self.server.pidfile))
        self.assertFalse(os.path.exists(self.server.admin_socket))
        log = self.server.log()
        self.assertIn('terminated by SIGTERM', log)
        self.assertIn("closing storage '1'", log)
        self.assertNotIn('Traceback', log)
        # Nothing of the unfinished transaction reached the backends, and
        # they are not stuck: a new server commits on both.
        self.server.start()
        info = details(self.server)
        self.assertEqual(info['status'], 'optimal')
        self.assertEqual(info['last_tid'], before)
        db2 = ZODB.DB(self.server.client_storage())
        self.closers.append(db2.close)
        self.commit(db2, 'b', 2)
        info = details(self.server)
        self.assertGreater(info['last_tid'], before)
        self.assertEqual(info['backends']['b2']['last_tid'],
                         info['last_tid'])

    def test_sigint_exits_cleanly(self):
        self.server.signal(signal.SIGINT)
        self.assertEqual(self.server.process.wait(30), 0)
        self.assertFalse(os.path.exists(self.server.pidfile))
        self.assertIn('terminated by SIGINT', self.server.log())

    def test_pidfile(self):
        with open(self.server.pidfile) as f:
            self.assertEqual(int(f.read()), self.server.process.pid)


class ServerConfigTests(ServerTestBase):

    start_server = False

    def setUp(self):
        super().setUp()
        self.server = RaidServer(self.dir, [('b1', ('127.0.0.1', 1)),
                                            ('b2', ('127.0.0.1', 2))])

    def use_backends(self):
        self.server.write_config(self.backend_list(0, 1))

    def test_sigusr2_reopens_the_log(self):
        log = os.path.join(self.dir, 'event.log')
        self.server.eventlog = log
        self.use_backends()
        self.server.start()
        wait_until(lambda: os.path.exists(log), 10, 'the event log')
        os.rename(log, log + '.1')
        self.server.signal(signal.SIGUSR2)
        wait_until(lambda: os.path.exists(log), 10, 'a reopened log')
        self.assertEqual(self.server.manager('disable', 'b2').returncode, 0)

        def logged():
            with open(log) as f:
                return 'disable' in f.read()
        wait_until(logged, 10, 'the admin request in the new log')
        self.assertEqual(self.server.process.poll(), None)

    def test_bad_config_fails_at_start(self):
        self.server.write_config(text='%import zeoraid\n<zeo>\n</zeo>\n')
        process = self.server.launch()
        self.assertEqual(process.wait(60), 2)
        self.assertIn('address', self.server.log())

    def test_tcp_admin_needs_a_token_file(self):
        self.server.zeoraid_section = (
            '<zeoraid>\n  admin-address 127.0.0.1:0\n</zeoraid>\n')
        self.server.write_config(self.server.backends)
        process = self.server.launch()
        self.assertEqual(process.wait(60), 2)
        self.assertIn('needs a token file', self.server.log())
        self.assertFalse(os.path.exists(self.server.admin_socket))

    def test_tcp_admin_with_token(self):
        token_file = os.path.join(self.dir, 'token')
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, b'0123456789abcdef-secret\n')
        os.close(fd)
        with socket.socket() as s:
            s.bind(('127.0.0.1', 0))
            port = s.getsockname()[1]
        self.server.zeoraid_section = (
            '<zeoraid>\n  admin-address 127.0.0.1:%d\n'
            '  admin-token-file %s\n</zeoraid>\n' % (port, token_file))
        self.use_backends()
        self.server.start()
        address = '127.0.0.1:%d' % port
        r = self.server.manager('--admin', address, '--token-file',
                                token_file, 'status')
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn('OPTIMAL', r.stdout)
        wrong = os.path.join(self.dir, 'wrong')
        with open(wrong, 'w') as f:
            f.write('0123456789abcdef-wrong\n')
        r = self.server.manager('--admin', address, '--token-file', wrong,
                                'disable', 'b2')
        self.assertEqual(r.returncode, 3)
        self.assertIn('permission denied', r.stderr)
        client = AdminClient(('127.0.0.1', port), timeout=10)
        self.assertEqual(client.request('disable', None, ['b2']),
                         {'ok': False, 'error': 'permission denied'})
        self.assertEqual(details(self.server)['status'], 'optimal')
        # with -C, the configured token file is used for the TCP endpoint
        r = self.server.manager('--admin', address, 'details')
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)

    def test_admin_socket_in_use(self):
        self.use_backends()
        self.server.start()
        second = RaidServer(os.path.join(self.dir, 'second'),
                            self.backend_list(0, 1),
                            zeoraid_section='<zeoraid>\n  admin-socket %s\n'
                            '</zeoraid>\n' % self.server.admin_socket)
        process = second.launch()
        self.assertEqual(process.wait(60), 2)
        second._close()
        self.assertIn('in use', second.log())
        self.assertEqual(self.server.admin('status')['result']['status'],
                         'optimal')

    def test_stale_admin_socket_is_replaced(self):
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(self.server.admin_socket)
        stale.close()           # the file stays, nobody listens
        self.use_backends()
        self.server.start()
        self.assertEqual(stat.S_IMODE(os.stat(
            self.server.admin_socket).st_mode), 0o600)


class BackendCrashTests(ServerTestBase):
    """kill -9 one backend while clients commit through zeoraid."""

    def make_server(self):
        server = RaidServer(self.dir, self.backend_list(0, 1),
                            raid_options='timeout 3s')
        server.start()
        return server

    def test_kill_backend_while_committing(self):
        errors = []
        commits = []
        stop = threading.Event()

        def committer(n):
            db = ZODB.DB(self.server.client_storage())
            try:
                conn = db.open()
                deadline = time.monotonic() + 60
                i = 0
                while not stop.is_set() and time.monotonic() < deadline \
                        and i < 2000:
                    i += 1
                    try:
                        conn.root()['c%d' % n]['i'] = i
                        transaction.commit()
                        commits.append((n, i))
                    except ZODB.POSException.ConflictError:
                        transaction.abort()
                    except Exception as e:
                        transaction.abort()
                        if not isinstance(e, transaction.interfaces
                                          .TransientError):
                            errors.append(e)
                    time.sleep(0.005)
                conn.close()
            except Exception as e:
                errors.append(e)
            finally:
                db.close()

        # one object per committer: they do not conflict with each other
        db = self.db()
        self.commit(db, 'c0', PersistentMapping())
        self.commit(db, 'c1', PersistentMapping())
        threads = [threading.Thread(target=committer, args=(n,))
                   for n in range(2)]
        for t in threads:
            t.start()
        try:
            wait_until(lambda: len(commits) >= 20, 30, 'first commits')
            self.backends[1].kill()
            killed_at = len(commits)
            wait_until(lambda: len(commits) >= killed_at + 40, 40,
                       'commits after the kill')
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        self.assertEqual(errors, [])
        self.assertEqual({n for n, i in commits}, {0, 1})
        r = self.server.manager('status')
        self.assertEqual(r.returncode, 2, r.stdout)
        self.assertIn('degraded: b2', r.stdout)
        r = self.server.manager('details')
        self.assertEqual(r.returncode, 2)
        line = [row for row in r.stdout.splitlines()
                if row.startswith('b2 ')][0]
        reason = line.split(None, 6)[-1]     # name state since(2) tid lag
        self.assertIn('degraded', line)
        self.assertNotEqual(reason.strip(), '-')
        info = details(self.server)
        self.assertEqual(info['backends']['b1']['last_tid'],
                         info['last_tid'])
