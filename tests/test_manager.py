"""zeoraid-manager: arguments, exit codes, timeouts, process control, and
the demo's non-interactive run.

RAID commands against a live server are in tests.test_server; here the
server, when one is needed, serves a RAID over two FileStorages (no
backend processes), started and stopped through zdaemon like an operator
would.
"""
import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest

from zeoraid.manager import cli
from zeoraid.manager.client import parse_address
from zeoraid.server import ServerSettings
from zeoraid.server import load_configuration


def run_manager(*args, timeout=60, cwd=None):
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, '-m', 'zeoraid.manager'] + list(args),
        stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=timeout, cwd=cwd)
    proc.elapsed = time.monotonic() - started
    return proc


def in_process(*args):
    """Run cli.main in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(list(args))
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


RAID_CONF = '''\
%%import zeoraid
<zeo>
  address 127.0.0.1:0
  %(pid)s
</zeo>
%(zeoraid)s
<raidstorage 1>
  <filestorage b1>
    path %(dir)s/b1.fs
  </filestorage>
  <filestorage b2>
    path %(dir)s/b2.fs
  </filestorage>
</raidstorage>
%(extra)s
'''


class TempDir(unittest.TestCase):

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix='zeoraid-manager-')

    def tearDown(self):
        shutil.rmtree(self.dir, ignore_errors=True)

    def write_conf(self, name='zeoraid.conf', pid=True, zeoraid='',
                   extra=''):
        path = os.path.join(self.dir, name)
        pidline = ('pid-filename %s/zeoraid.pid' % self.dir) if pid else ''
        with open(path, 'w') as f:
            f.write(RAID_CONF % dict(pid=pidline, zeoraid=zeoraid,
                                     dir=self.dir, extra=extra))
        return path


class ArgumentTests(TempDir):

    COMMANDS = ['status', 'details', 'disable', 'recover', 'reload',
                'verify', 'start', 'stop', 'restart', 'fg', 'logtail',
                'pid', 'kill']

    def test_help_for_every_command(self):
        code, out, err = in_process('-h')
        self.assertEqual(code, 0)
        for command in self.COMMANDS:
            self.assertIn(command, out)
            code, out_c, err_c = in_process(command, '--help')
            self.assertEqual(code, 0, command)
            self.assertIn('usage: zeoraid-manager %s' % command, out_c)
            self.assertIn('--admin', out_c)    # common options everywhere

    def test_bad_arguments_exit_3_with_one_line(self):
        cases = [
            ([], 'required: COMMAND'),
            (['frobnicate'], "invalid choice: 'frobnicate'"),
            (['disable'], 'required: NAME'),
            (['status', 'extra'], 'unrecognized arguments: extra'),
            (['--timeout', 'soon', 'status'], "invalid float value"),
            (['--admin', 'no-such-thing', 'status'], 'neither a socket'),
            (['status'], 'no configuration file; use -C'),
            (['-C', os.path.join(self.dir, 'missing.conf'), 'status'],
             'cannot read configuration'),
        ]
        for args, message in cases:
            code, out, err = in_process(*args)
            self.assertEqual(code, 3, args)
            text = (out + err).strip()
            self.assertIn(message, text, args)
            self.assertEqual(len(text.splitlines()), 1, text)

    def test_real_process_exit_code_for_bad_arguments(self):
        proc = run_manager('disable')
        self.assertEqual(proc.returncode, 3)
        self.assertEqual(len(proc.stderr.splitlines()), 1, proc.stderr)

    def test_options_after_the_command(self):
        conf = self.write_conf()
        code, out, err = in_process('status', '-C', conf, '--timeout', '1')
        self.assertEqual(code, 3)
        self.assertIn('cannot reach admin socket %s/zeoraid.admin.sock'
                      % self.dir, out)

    def test_unreachable_server_exits_3_quickly(self):
        conf = self.write_conf()
        proc = run_manager('-C', conf, 'status')
        self.assertEqual(proc.returncode, 3)
        self.assertTrue(proc.stdout.startswith('RAID UNKNOWN - cannot reach'
                                               ' admin socket'), proc.stdout)
        self.assertLess(proc.elapsed, 10)
        proc = run_manager('-C', conf, '--json', 'details')
        self.assertEqual(proc.returncode, 3)
        self.assertFalse(json.loads(proc.stdout)['ok'])
        proc = run_manager('--admin', '127.0.0.1:1', 'disable', 'b1')
        self.assertEqual(proc.returncode, 3)
        self.assertIn('cannot reach admin address 127.0.0.1:1', proc.stderr)

    def test_a_server_that_never_answers_times_out(self):
        path = os.path.join(self.dir, 'hung.sock')
        hung = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        hung.bind(path)
        hung.listen(5)          # accepts connections, never answers
        self.addCleanup(hung.close)
        started = time.monotonic()
        code, out, err = in_process('--admin', path, '--timeout', '0.5',
                                    'status')
        self.assertEqual(code, 3)
        self.assertIn('no answer from admin socket %s within 0.5s' % path,
                      out)
        self.assertLess(time.monotonic() - started, 5)


class RenderingTests(unittest.TestCase):

    def test_status_line(self):
        line = cli.status_line({
            'storage': '1', 'status': 'degraded',
            'backends': {'b1': 'optimal', 'b2': 'degraded',
                         'b3': 'recovering'}})
        self.assertEqual(
            line, 'RAID 1 DEGRADED - 1/3 backends optimal;'
            ' degraded: b2; recovering: b3 | optimal=1;;;0;3'
            ' recovering=1;;;0;3 degraded=1;;;0;3 disabled=0;;;0;3')
        self.assertEqual(cli._status_code('optimal'), 0)
        self.assertEqual(cli._status_code('recovering'), 1)
        self.assertEqual(cli._status_code('degraded'), 2)
        self.assertEqual(cli._status_code('failed'), 2)
        self.assertEqual(cli._status_code('weird'), 3)

    def test_parse_address(self):
        self.assertEqual(parse_address('/run/z.sock'), '/run/z.sock')
        self.assertEqual(parse_address('var/z.sock'), 'var/z.sock')
        self.assertEqual(parse_address('127.0.0.1:8199'),
                         ('127.0.0.1', 8199))
        self.assertEqual(parse_address('[::1]:8199'), ('::1', 8199))
        self.assertEqual(parse_address(':8199'), ('127.0.0.1', 8199))
        self.assertRaises(ValueError, parse_address, 'localhost')

    def test_progress_bar(self):
        self.assertEqual(cli._bar(0.25, width=8), '[##......]  25.0%')
        self.assertEqual(
            cli._progress({'state': 'recovering',
                           'recovery': {'done': 3, 'total': 12,
                                        'eta': 9}}),
            (0.25, 9, '3/12'))
        self.assertEqual(
            cli._progress({'state': 'recovering',
                           'recovery': {'phase': 'copy',
                                        'backlog_seconds': 30.0,
                                        'eta_seconds': 12.5}},
                          first_backlog=120.0),
            (0.75, 12.5, 'copy, 30s behind'))
        self.assertEqual(
            cli._progress({'state': 'recovering',
                           'recovery': {'phase': 'copy',
                                        'backlog_seconds': 2.0,
                                        'backpressure_spells': 7}})[2],
            'copy, 2s behind, back-pressure on live commits (7 spells)')
        self.assertIsNone(cli._progress({'state': 'recovering'}))
        self.assertIsNone(cli._progress({'state': 'degraded',
                                         'recovery': {'phase': 'copy'}}))


class SettingsTests(TempDir):
    """Server and manager find the admin endpoint the same way."""

    def settings(self, path):
        return ServerSettings(load_configuration(path), path)

    def test_admin_socket_next_to_the_pidfile(self):
        s = self.settings(self.write_conf())
        self.assertEqual(s.admin_socket,
                         os.path.join(self.dir, 'zeoraid.admin.sock'))
        self.assertEqual(s.raid_storage_names, ['1'])

    def test_import_line_is_optional(self):
        path = self.write_conf()
        with open(path) as f:
            text = f.read().replace('%import zeoraid\n', '')
        with open(path, 'w') as f:
            f.write(text)
        self.assertEqual(self.settings(path).raid_storage_names, ['1'])

    def test_admin_socket_next_to_the_config_without_pidfile(self):
        s = self.settings(self.write_conf('raid.conf', pid=False))
        self.assertEqual(s.admin_socket,
                         os.path.join(self.dir, 'raid.admin.sock'))

    def test_configured_admin_endpoint(self):
        token = os.path.join(self.dir, 'token')
        open(token, 'w').close()
        s = self.settings(self.write_conf(zeoraid=(
            '<zeoraid>\n  admin-socket %s/a.sock\n'
            '  admin-address 127.0.0.1:8199\n  admin-token-file %s\n'
            '</zeoraid>' % (self.dir, token))))
        self.assertEqual(s.admin_socket, os.path.join(self.dir, 'a.sock'))
        self.assertEqual(tuple(s.admin_address), ('127.0.0.1', 8199))
        self.assertEqual(s.token_file, token)

    def test_zdaemon_command_defaults(self):
        conf = self.write_conf()
        cmd = cli.zdaemon_command(self.settings(conf))
        self.assertEqual(cmd[:3], [sys.executable, '-m', 'zdaemon'])
        self.assertEqual(cmd[cmd.index('-C') + 1], conf)
        self.assertEqual(cmd[cmd.index('-p') + 1],
                         '%s -m zeoraid.server -C %s'
                         % (sys.executable, conf))
        self.assertEqual(cmd[cmd.index('-s') + 1],
                         os.path.join(self.dir, 'zeoraid.zdsock'))
        self.assertIn('-d', cmd)

    def test_zdaemon_command_honours_runner(self):
        conf = self.write_conf(extra=(
            '<runner>\n  program /bin/true\n  socket-name %s/zd.sock\n'
            '  transcript %s/t.log\n</runner>\n' % (self.dir, self.dir)))
        cmd = cli.zdaemon_command(self.settings(conf))
        self.assertNotIn('-p', cmd)
        self.assertNotIn('-s', cmd)
        self.assertNotIn('-t', cmd)


class ProcessControlTests(TempDir):
    """start / status / pid / kill / restart / stop through zdaemon."""

    def setUp(self):
        super().setUp()
        self.conf = self.write_conf()
        self.pidfile = os.path.join(self.dir, 'zeoraid.pid')

    def tearDown(self):
        run_manager('-C', self.conf, 'stop', timeout=60)
        if os.path.exists(self.pidfile):     # last resort, our own server
            try:
                with open(self.pidfile) as f:
                    os.kill(int(f.read()), signal.SIGKILL)
            except (OSError, ValueError):
                pass
        super().tearDown()

    def manager(self, *args):
        return run_manager('-C', self.conf, *args)

    def test_start_status_stop(self):
        proc = self.manager('start')
        self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)
        self.assertIn('daemon process started', proc.stdout)
        self.assertIn('zeoraid server ready', proc.stdout)

        proc = self.manager('status')
        self.assertEqual(proc.returncode, 0, proc.stdout)
        self.assertIn('RAID 1 OPTIMAL - 2/2 backends optimal', proc.stdout)

        proc = self.manager('pid')
        self.assertEqual(proc.returncode, 0)
        pid = int(proc.stdout)
        with open(self.pidfile) as f:
            self.assertEqual(int(f.read()), pid)

        proc = self.manager('start')        # already running: no-op
        self.assertIn('already running', proc.stdout)

        proc = self.manager('kill', 'USR2')
        self.assertEqual(proc.returncode, 0)
        self.assertIn('signal SIGUSR2 sent to process %d' % pid,
                      proc.stdout)

        proc = self.manager('restart')
        self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)
        self.assertIn('daemon process restarted', proc.stdout)
        deadline = time.monotonic() + 30
        while self.manager('status').returncode != 0:
            self.assertLess(time.monotonic(), deadline, 'not back')
            time.sleep(0.2)
        new_pid = int(self.manager('pid').stdout)
        self.assertNotEqual(new_pid, pid)

        proc = self.manager('stop')
        self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)
        self.assertIn('daemon process stopped', proc.stdout)
        self.assertFalse(os.path.exists(self.pidfile))
        self.assertFalse(os.path.exists(
            os.path.join(self.dir, 'zeoraid.admin.sock')))
        proc = self.manager('pid')
        self.assertEqual(proc.returncode, 3)
        self.assertEqual(self.manager('status').returncode, 3)
        with open(os.path.join(self.dir, 'zeoraid.transcript.log')) as f:
            transcript = f.read()
        self.assertIn('terminated by SIGTERM', transcript)
        # no <eventlog> here: runzeo logs to stderr (the transcript) and
        # says so on SIGUSR2; the server survived it (reopening a real log
        # file is tested in tests.test_server)
        self.assertIn('received SIGUSR2', transcript)
        self.assertNotIn('Traceback', transcript)

    def test_start_failure_is_reported(self):
        with open(self.conf, 'a') as f:
            f.write('<zeoraid>\n  admin-address 127.0.0.1:0\n</zeoraid>\n')
        proc = self.manager('start')
        self.assertEqual(proc.returncode, 3, proc.stdout + proc.stderr)
        self.assertIn('start failed', proc.stderr)
        self.assertIn('needs a token file', proc.stderr)

    def test_fg(self):
        fg = subprocess.Popen(
            [sys.executable, '-m', 'zeoraid.manager', '-C', self.conf, 'fg'],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + 60
            while self.manager('status').returncode != 0:
                self.assertLess(time.monotonic(), deadline, 'fg not up')
                self.assertIsNone(fg.poll())
                time.sleep(0.2)
            with open(self.pidfile) as f:
                os.kill(int(f.read()), signal.SIGTERM)
            output, _ = fg.communicate(timeout=60)
        finally:
            if fg.poll() is None:
                fg.kill()
                fg.wait()
        self.assertEqual(fg.returncode, 0)
        self.assertIn('-m zeoraid.server -C %s' % self.conf, output)
        self.assertIn('terminated by SIGTERM', output)

    def test_logtail(self):
        log = os.path.join(self.dir, 'some.log')
        with open(log, 'w') as f:
            f.write('first line\nsecond line\n')
        tail = subprocess.Popen(
            [sys.executable, '-m', 'zeoraid.manager', '-C', self.conf,
             'logtail', log], stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            self.assertEqual(tail.stdout.readline(), 'first line\n')
            self.assertEqual(tail.stdout.readline(), 'second line\n')
            with open(log, 'a') as f:
                f.write('third line\n')
            self.assertEqual(tail.stdout.readline(), 'third line\n')
        finally:
            tail.kill()
            tail.wait()
            tail.stdout.close()


class ScriptedRAID:
    """Stands in for RAIDStorage's management methods, to drive the
    manager's ``recover --wait`` loop through a real admin endpoint: the
    recovery itself belongs to another issue.  Backend b2 recovers in
    ``steps`` polls, then ends in state ``end``."""

    def __init__(self, steps, end='optimal'):
        self.state = 'degraded'
        self.steps = steps
        self.end = end
        self.done = 0

    def raid_status(self):
        return 'recovering' if self.state == 'recovering' else 'degraded'

    def raid_details(self):
        recovery = None
        if self.state == 'recovering':
            self.done += 1
            # the shape zeoraid.recovery.Progress reports
            recovery = {'phase': 'copy', 'txns_copied': self.done * 10,
                        'rate_txn_s': 100.0, 'eta_seconds': None,
                        'backlog_seconds': 40.0 - self.done * 10}
            if self.done >= self.steps:
                self.state = self.end
        return {'b1': {'state': 'optimal', 'reason': None, 'since': 0.0,
                       'last_tid': None},
                'b2': {'state': self.state, 'reason': 'copy failed'
                       if self.state == 'degraded' else None,
                       'since': 0.0, 'last_tid': None,
                       'recovery': recovery}}

    def raid_recover(self, name):
        self.state = 'recovering'
        return 'recovery of %s started' % name

    def lastTransaction(self):
        return b'\0' * 8


class RecoverWaitTests(TempDir):

    def serve(self, raid):
        from zeoraid.admin import AdminServer
        from zeoraid.admin import AdminService
        path = os.path.join(self.dir, 'admin.sock')
        server = AdminServer(path)
        server.start(AdminService({'1': raid}))
        self.addCleanup(server.close)
        return path

    def test_wait_until_recovered(self):
        path = self.serve(ScriptedRAID(steps=4))
        code, out, err = in_process('--admin', path, 'recover', 'b2',
                                    '--wait', '--interval', '0.01')
        self.assertEqual(code, 0, out + err)
        lines = out.splitlines()
        self.assertEqual(lines[0], 'b2 [..............................]'
                         '   0.0% copy, 10 txn copied, 100.0 txn/s,'
                         ' 30s behind ETA -')
        # from the second poll on, an ETA from the observed rate
        self.assertTrue(lines[1].startswith(
            'b2 [##########....................]  33.3% copy, 20 txn'
            ' copied, 100.0 txn/s, 20s behind ETA '), lines[1])
        self.assertNotEqual(lines[1][-2:], ' -')
        self.assertTrue(lines[2].startswith(
            'b2 [####################..........]  66.7% copy, 30 txn'
            ' copied, 100.0 txn/s, 10s behind ETA '), lines[2])
        self.assertTrue(out.rstrip().splitlines()[-1].startswith(
            'backend b2 recovered'), out)

    def test_wait_for_a_failing_recovery(self):
        path = self.serve(ScriptedRAID(steps=2, end='degraded'))
        code, out, err = in_process('--admin', path, 'recover', 'b2',
                                    '--wait', '--interval', '0.01')
        self.assertEqual(code, 2, out + err)
        self.assertIn('recovery of backend b2 ended degraded: copy failed',
                      out)

    def test_recover_without_wait(self):
        path = self.serve(ScriptedRAID(steps=2))
        code, out, err = in_process('--admin', path, 'recover', 'b2')
        self.assertEqual((code, out), (0, 'recovery of b2 started\n'))
        code, out, err = in_process('--admin', path, 'recover', 'b9')
        self.assertEqual(code, 3)
        self.assertIn("unknown backend 'b9'", err)


class DemoTests(unittest.TestCase):

    def test_demo_smoke(self):
        var = tempfile.mkdtemp(prefix='zeoraid-demo-')
        self.addCleanup(shutil.rmtree, var, True)
        proc = subprocess.run(
            [sys.executable, '-m', 'zeoraid.demo', '--smoke',
             '--port-base', '0', '--var', var],
            stdin=subprocess.DEVNULL, capture_output=True, text=True,
            timeout=240)
        output = proc.stdout + proc.stderr
        self.assertEqual(proc.returncode, 0, output)
        self.assertIn('smoke test passed', output)
        self.assertIn('RAID 1 DEGRADED - 1/2 backends optimal; degraded:'
                      ' zeo2', output)
        self.assertIn('commit 3: counter = 3', output)
        self.assertIn('all demo processes stopped', output)
        for name in ('zeoraid.pid', 'zeo1.pid', 'zeoraid.admin.sock'):
            self.assertFalse(os.path.exists(os.path.join(var, name)), name)
