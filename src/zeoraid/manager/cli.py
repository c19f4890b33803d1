"""zeoraid-manager: manage a zeoraid server, the way zopectl manages Zope.

    zeoraid-manager -C zeoraid.conf [-S STORAGE] COMMAND [ARGS]

RAID commands talk to the server's admin endpoint (found from the same
configuration file the server reads; ``--admin`` overrides it).  Process
commands drive the server through zdaemon.  Exit codes follow Nagios:
0 optimal, 1 recovering, 2 degraded or failed, 3 unknown (unreachable
server, bad arguments, refused request).  See doc/CMDLINE.md.
"""
import argparse
import json
import os
import re
import ssl
import subprocess
import sys
import time

import ZConfig

from zeoraid.admin import AdminError
from zeoraid.manager.client import AdminClient
from zeoraid.manager.client import AdminUnreachable
from zeoraid.manager.client import parse_address


OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3

#: RAID status -> Nagios exit code
STATUS_EXIT = {'optimal': OK, 'recovering': WARNING,
               'degraded': CRITICAL, 'failed': CRITICAL,
               'waiting': CRITICAL}

BACKEND_STATES = ('optimal', 'recovering', 'degraded', 'disabled')

VERIFY_TIMEOUT = 3600.0
DEFAULT_TIMEOUT = 5.0
START_WAIT = 60.0


class Failure(Exception):
    """Stop with a one-line message and an exit code (default UNKNOWN)."""

    def __init__(self, message, code=UNKNOWN):
        super().__init__(message)
        self.code = code


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but bad arguments exit 3 (Nagios UNKNOWN), one line."""

    def error(self, message):
        sys.stderr.write('%s: error: %s (see %s -h)\n'
                         % (self.prog, message, self.prog))
        sys.exit(UNKNOWN)


def _common_options(parser, defaults):
    """Options accepted before and after the command name."""
    def default(value):
        return value if defaults else argparse.SUPPRESS
    parser.add_argument(
        '-C', '--configure', dest='config', metavar='CONF',
        default=default(None),
        help='zeoraid server configuration file (the one the server runs)')
    parser.add_argument(
        '-S', '--storage', metavar='STORAGE', default=default(None),
        help='RAID storage name (needed when the server has several)')
    parser.add_argument(
        '--admin', metavar='PATH_OR_HOST:PORT', default=default(None),
        help='admin endpoint; overrides the one in the configuration')
    parser.add_argument(
        '--token-file', metavar='FILE', default=default(None),
        help='shared-secret file for a TCP admin endpoint')
    parser.add_argument(
        '--tls-ca', metavar='FILE', default=default(None),
        help='TLS to a TCP admin endpoint (<admin-ssl>): CA file that the '
             "server's certificate must be signed by")
    parser.add_argument(
        '--tls-cert', metavar='FILE', default=default(None),
        help='client certificate (PEM) for a TCP admin endpoint with TLS')
    parser.add_argument(
        '--tls-key', metavar='FILE', default=default(None),
        help='private key of --tls-cert (if not in the same file)')
    parser.add_argument(
        '--timeout', type=float, metavar='SECONDS',
        default=default(DEFAULT_TIMEOUT),
        help='connect/answer timeout per request (default %g)'
        % DEFAULT_TIMEOUT)
    parser.add_argument(
        '--json', action='store_true', default=default(False),
        help='machine-readable output (the JSON answer of the server)')


def build_parser():
    parser = ArgumentParser(
        prog='zeoraid-manager',
        description='Manage a zeoraid server: RAID status and operations'
        ' through its admin endpoint, process control through zdaemon.',
        epilog='Exit codes (Nagios): 0 optimal, 1 recovering, 2 degraded'
        ' or failed, 3 unknown (unreachable, bad arguments, error).')
    _common_options(parser, defaults=True)
    common = ArgumentParser(add_help=False)
    _common_options(common, defaults=False)
    sub = parser.add_subparsers(dest='command', metavar='COMMAND')
    sub.required = True

    def command(name, help, func):
        p = sub.add_parser(name, help=help, description=help,
                           parents=[common])
        p.set_defaults(func=func)
        return p

    command('status', 'one-line Nagios-style RAID status;'
            ' exit 0/1/2/3 (optimal/recovering/degraded or failed/unknown)',
            cmd_status)
    command('details', 'per-backend state, reason, since, last tid, lag'
            ' and recovery progress; exit code as for status', cmd_details)
    p = command('disable', 'degrade backend NAME on purpose (refused for'
                ' the last optimal backend)', cmd_disable)
    p.add_argument('name', metavar='NAME', help='backend name')
    p = command('force', 'a RAID waiting for a lost backend: serve from'
                ' backend NAME as it is (transactions only the lost one had'
                ' are gone; logged)', cmd_force)
    p.add_argument('name', metavar='NAME')
    p = command('recover', 'start recovering backend NAME', cmd_recover)
    p.add_argument('name', metavar='NAME', help='backend name')
    p.add_argument('--wait', action='store_true',
                   help='wait for the recovery to end, with a progress bar'
                   ' and ETA; exit 0 when the backend is optimal again,'
                   ' 2 when the recovery failed')
    p.add_argument('--interval', type=float, default=1.0, metavar='SECONDS',
                   help='progress polling interval with --wait (default 1)')
    p = command('reload', 're-read the backends from the configuration'
                ' file; added backends join degraded, removed ones are'
                ' closed', cmd_reload)
    p.add_argument('--dry-run', action='store_true',
                   help='only show what would change')
    p = command('verify', 'compare the backends transaction by transaction'
                ' (read-only, online); exit 0 identical, 2 divergent,'
                ' 3 cannot check', cmd_verify)
    p.add_argument('--since', metavar='TID',
                   help='only transactions after TID (last_tid of an'
                   ' earlier verify)')
    p.add_argument('--rate', type=float, default=0, metavar='N',
                   help='at most N transactions per second'
                   ' (default 0: unlimited)')

    p = command('start', 'start the server as a daemon (zdaemon) and wait'
                ' until its admin endpoint answers', cmd_start)
    p.add_argument('--no-wait', action='store_true',
                   help='return as soon as the process is started')
    command('stop', 'stop the daemon (SIGTERM, clean shutdown)', cmd_zd)
    command('restart', 'stop and start the daemon', cmd_zd)
    command('fg', 'run the server in the foreground (Ctrl-C stops it)',
            cmd_zd)
    p = command('logtail', 'follow the log file (Ctrl-C stops)',
                cmd_logtail)
    p.add_argument('file', nargs='?', metavar='FILE',
                   help='log file (default: the configured one)')
    command('pid', 'print the server process id; exit 3 if not running',
            cmd_pid)
    p = command('kill', 'send a signal to the server (default TERM;'
                ' HUP reloads, USR2 reopens logs)', cmd_kill)
    p.add_argument('signal', nargs='?', default='TERM', metavar='SIGNAL')
    return parser


# configuration

class Context:
    """What a command needs: parsed options, settings, an admin client."""

    def __init__(self, options):
        self.options = options
        self._settings = None

    @property
    def settings(self):
        if self._settings is None:
            from zeoraid.server import ServerSettings
            from zeoraid.server import load_configuration
            config = self.options.config
            if not config:
                raise Failure('no configuration file; use -C zeoraid.conf'
                              ' (or --admin for RAID commands)')
            try:
                root = load_configuration(config)
            except (ZConfig.ConfigurationError, OSError) as e:
                raise Failure('cannot read configuration %s: %s'
                              % (config, ' '.join(str(e).split())))
            try:
                self._settings = ServerSettings(root, config)
            except AdminError as e:
                raise Failure(str(e))
        return self._settings

    def client(self):
        options = self.options
        if options.admin:
            try:
                address = parse_address(options.admin)
            except ValueError as e:
                raise Failure(str(e))
            token_file = options.token_file
            if (token_file is None and isinstance(address, tuple)
                    and options.config):
                token_file = self.settings.token_file
        else:
            settings = self.settings
            if options.token_file is not None:
                token_file = options.token_file
                address = settings.admin_address or settings.admin_socket
            elif settings.admin_address and not os.path.exists(
                    settings.admin_socket):
                address, token_file = (settings.admin_address,
                                       settings.token_file)
            else:
                address, token_file = settings.admin_socket, None
            if isinstance(address, list):
                address = tuple(address)
        if isinstance(address, tuple) and not address[0]:
            address = ('127.0.0.1', address[1])
        token = None
        if token_file and isinstance(address, tuple):
            try:
                with open(token_file, 'rb') as f:
                    token = f.read().strip().decode('utf-8')
            except (OSError, UnicodeDecodeError) as e:
                raise Failure('cannot read token file %s: %s'
                              % (token_file, e))
        return AdminClient(address, token=token, timeout=options.timeout,
                           tls=self._tls_context(address))

    def _tls_context(self, address):
        """The client TLS context for a TCP admin endpoint, or None."""
        options = self.options
        if not (options.tls_ca or options.tls_cert or options.tls_key):
            return None
        if not isinstance(address, tuple):
            raise Failure('--tls-ca/--tls-cert/--tls-key are for a TCP admin'
                          ' endpoint, not the unix socket %s' % address)
        if options.tls_key and not options.tls_cert:
            raise Failure('--tls-key needs --tls-cert')
        try:
            context = ssl.create_default_context(cafile=options.tls_ca)
            if options.tls_cert:
                context.load_cert_chain(options.tls_cert,
                                        options.tls_key or None)
        except (OSError, ssl.SSLError) as e:
            raise Failure('cannot load the TLS files (%s): %s' % (
                ', '.join(f for f in (options.tls_ca, options.tls_cert,
                                      options.tls_key) if f),
                ' '.join(str(e).split())))
        return context

    def call(self, op, args=()):
        """Do one admin request; return the full response dict."""
        try:
            response = self.client().request(op, self.options.storage, args)
        except AdminUnreachable as e:
            raise Failure(str(e))
        return response


def _result(ctx, op, args=()):
    """The result of a request, or Failure with the server's error."""
    response = ctx.call(op, args)
    if not response['ok']:
        raise Failure(response.get('error') or 'request refused')
    return response['result']


def _emit_json(response):
    print(json.dumps(response, indent=2, sort_keys=True))


# RAID commands

def status_line(result):
    """Nagios-style one-line status for a status/details result."""
    name = result.get('storage')
    status = result.get('status') or 'unknown'
    states = {}
    for backend, state in sorted(result['backends'].items()):
        if isinstance(state, dict):
            state = state.get('state')
        states.setdefault(state, []).append(backend)
    total = len(result['backends'])
    optimal = len(states.get('optimal', ()))
    text = 'RAID %s %s - %d/%d backends optimal' % (
        name, status.upper(), optimal, total)
    for state in sorted(states):
        if state != 'optimal':
            text += '; %s: %s' % (state, ', '.join(states[state]))
    waiting = result.get('waiting')
    if isinstance(waiting, dict) and waiting.get('reason'):
        text += '; %s' % waiting['reason']
    perf = ' '.join('%s=%d;;;0;%d' % (state, len(states.get(state, ())),
                                      total)
                    for state in BACKEND_STATES)
    return '%s | %s' % (text, perf)


def _status_code(status):
    return STATUS_EXIT.get(status, UNKNOWN)


def _status_request(ctx, op):
    """Ask for status or details: (result, exit code).

    With --json the answer is printed as it is and result is None.
    """
    response = ctx.call(op)
    if ctx.options.json:
        _emit_json(response)
        if not response['ok']:
            return None, UNKNOWN
        return None, _status_code(response['result'].get('status'))
    if not response['ok']:
        raise Failure(response.get('error'))
    result = response['result']
    return result, _status_code(result.get('status'))


def cmd_status(ctx):
    result, code = _status_request(ctx, 'status')
    if result is not None:
        print(status_line(result))
    return code


def _format_time(seconds):
    if seconds is None:
        return '-'
    return time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(seconds))


def _format_duration(seconds):
    if seconds is None:
        return '-'
    seconds = int(round(seconds))
    if seconds < 120:
        return '%ds' % seconds
    if seconds < 7200:
        return '%dm%02ds' % divmod(seconds, 60)
    hours, rest = divmod(seconds, 3600)
    return '%dh%02dm' % (hours, rest // 60)


def _progress(info, first_backlog=None):
    """(fraction or None, eta seconds or None, text) for a backend that
    is recovering, or None.

    The RAID reports (zeoraid.recovery.Progress): phase, txns_copied,
    rate_txn_s, backlog_seconds (how far the copy is behind the RAID),
    backpressure_spells and eta_seconds; ``done``/``total`` are used when
    given.  Without them the
    fraction is the part of the first backlog seen (first_backlog) that
    has been caught up.
    """
    recovery = info.get('recovery')
    if info.get('state') != 'recovering' or not isinstance(recovery, dict):
        return None
    parts = []
    if recovery.get('phase'):
        parts.append(str(recovery['phase']))
    fraction = None
    done, total = recovery.get('done'), recovery.get('total')
    backlog = recovery.get('backlog_seconds')
    if isinstance(done, (int, float)) and isinstance(total, (int, float)):
        fraction = min(1.0, done / total) if total else 0.0
        parts.append('%d/%d' % (done, total))
    elif isinstance(backlog, (int, float)) and first_backlog:
        fraction = max(0.0, min(1.0, 1 - backlog / first_backlog))
    if recovery.get('txns_copied') is not None:
        parts.append('%s txn copied' % recovery['txns_copied'])
    if recovery.get('rate_txn_s'):
        parts.append('%s txn/s' % recovery['rate_txn_s'])
    if isinstance(backlog, (int, float)):
        parts.append('%s behind' % _format_duration(backlog))
    if recovery.get('backpressure_spells'):
        parts.append('back-pressure on live commits (%s spells)'
                     % recovery['backpressure_spells'])
    eta = recovery.get('eta_seconds', recovery.get('eta'))
    return fraction, eta, ', '.join(parts)


def cmd_details(ctx):
    result, code = _status_request(ctx, 'details')
    if result is None:
        return code
    print(status_line(result).split(' | ')[0])
    print('last tid: %s' % (result.get('last_tid') or '-'))
    rows = [('BACKEND', 'STATE', 'SINCE', 'LAST TID', 'LAG', 'REASON')]
    for name, info in sorted(result['backends'].items()):
        lag = _format_duration(info.get('lag_seconds'))
        if info.get('lag_transactions') is not None:
            lag += ' (%s txn)' % info['lag_transactions']
        reason = info.get('reason') or '-'
        progress = _progress(info)
        if progress:
            fraction, eta, text = progress
            reason += '; recovery: %s%s' % (
                text, ', ETA %s' % _format_duration(eta)
                if eta is not None else '')
        rows.append((name, info.get('state') or '?',
                     _format_time(info.get('since')),
                     info.get('last_tid') or '-', lag, reason))
    widths = [max(len(str(row[i])) for row in rows)
              for i in range(len(rows[0]) - 1)]
    for row in rows:
        print('  '.join(str(c).ljust(w) for c, w in zip(row, widths))
              + '  ' + str(row[-1]))
    return code


def _simple(ctx, op, args, render):
    response = ctx.call(op, args)
    if ctx.options.json:
        _emit_json(response)
        return OK if response['ok'] else UNKNOWN
    if not response['ok']:
        raise Failure(response.get('error'))
    print(render(response['result']))
    return OK


def _text(result):
    if isinstance(result, str):
        return result
    return json.dumps(result, sort_keys=True)


def cmd_disable(ctx):
    return _simple(ctx, 'disable', [ctx.options.name],
                   lambda r: r if isinstance(r, str) and r
                   else 'backend %s disabled' % ctx.options.name)


def cmd_force(ctx):
    return _simple(ctx, 'force', [ctx.options.name],
                   lambda r: r if isinstance(r, str) and r
                   else 'backend %s forced' % ctx.options.name)


#: diff key, what a dry run would do, what the reload did
_DIFF_LINES = (('added', 'would add', 'added'),
               ('removed', 'would remove', 'removed'),
               ('changed', 'would replace (settings changed)',
                'replaced (settings changed)'),
               ('kept', 'would keep', 'kept'))


def _render_diff(diff):
    dry_run = bool(diff.get('dry_run'))
    lines = ['RAID %s %s' % (diff.get('storage'),
                             'reload (dry run, nothing changed)' if dry_run
                             else 'reloaded')]
    for key, would, did in _DIFF_LINES:
        lines.append('  %s: %s' % (would if dry_run else did,
                                   ', '.join(diff.get(key) or []) or '-'))
    settings = diff.get('settings') or {}
    lines.append('  %s: %s' % (
        'would change settings' if dry_run else 'settings changed',
        ', '.join('%s %s -> %s' % (key, _setting(old), _setting(new))
                  for key, (old, new) in sorted(settings.items())) or '-'))
    if diff.get('restart_needed'):
        lines.append('  needs a restart (left as they are): %s'
                     % ', '.join(diff['restart_needed']))
    return '\n'.join(lines)


def _setting(value):
    """A setting as the configuration file writes it."""
    if isinstance(value, bool):
        return 'on' if value else 'off'
    if value is None:
        return '(unset)'
    if isinstance(value, float) and value.is_integer():
        return '%d' % value
    return str(value)


def cmd_reload(ctx):
    args = ['--dry-run'] if ctx.options.dry_run else []
    return _simple(ctx, 'reload', args, _render_diff)


def cmd_verify(ctx):
    options = ctx.options
    if options.timeout == DEFAULT_TIMEOUT:
        # A verify reads the whole history synchronously.
        options.timeout = VERIFY_TIMEOUT
    args = (['--since=' + options.since] if options.since else []) + \
        (['--rate=%g' % options.rate] if options.rate else [])
    response = ctx.call('verify', args)
    if ctx.options.json:
        _emit_json(response)
    elif not response['ok']:
        raise Failure(response.get('error'))
    elif isinstance(response['result'], dict) and \
            'summary' in response['result']:
        print(response['result']['summary'])
    else:
        print(_text(response['result']))
    if not response['ok']:
        return UNKNOWN
    result = response['result']
    if isinstance(result, dict) and result.get('consistent') is False:
        return CRITICAL
    return OK


def _bar(fraction, width=30):
    fraction = max(0.0, min(1.0, fraction))
    filled = int(round(fraction * width))
    return '[%s%s] %5.1f%%' % ('#' * filled, '.' * (width - filled),
                               100 * fraction)


def cmd_recover(ctx):
    name = ctx.options.name
    response = ctx.call('recover', [name])
    if not response['ok']:
        if ctx.options.json:
            _emit_json(response)
            return UNKNOWN
        raise Failure(response.get('error'))
    if not ctx.options.wait:
        if ctx.options.json:
            _emit_json(response)
        else:
            print(_text(response['result'])
                  or 'recovery of %s started' % name)
        return OK
    return _wait_for_recovery(ctx, name)


def _wait_for_recovery(ctx, name):
    """Poll details until the backend is optimal (0) or not recovering
    any more (2); show a progress bar and an ETA (redrawn in place on a
    terminal, one line per poll otherwise)."""
    interactive = sys.stdout.isatty() and not ctx.options.json
    started = time.monotonic()
    first_backlog = None
    first = None            # (time, fraction) of the first measured poll
    info = {}
    while True:
        result = _result(ctx, 'details')
        info = result['backends'].get(name)
        if info is None:
            raise Failure('backend %s is gone' % name)
        state = info.get('state')
        if state != 'recovering':
            break
        recovery = info.get('recovery') or {}
        if first_backlog is None and recovery.get('backlog_seconds'):
            first_backlog = recovery['backlog_seconds']
        progress = _progress(info, first_backlog)
        if progress and not ctx.options.json:
            fraction, eta, text = progress
            now = time.monotonic()
            if fraction is not None:
                if first is None:
                    first = (now, fraction)
                elif eta is None and fraction > first[1]:
                    rate = (fraction - first[1]) / (now - first[0])
                    eta = (1 - fraction) / rate
            line = '%s %s %s ETA %s' % (
                name, _bar(fraction) if fraction is not None else '[...]',
                text, _format_duration(eta))
            if interactive:
                sys.stdout.write('\r\x1b[K' + line)
                sys.stdout.flush()
            else:
                print(line)
        time.sleep(max(0.05, ctx.options.interval))
    if interactive:
        sys.stdout.write('\n')
    elapsed = _format_duration(time.monotonic() - started)
    if ctx.options.json:
        _emit_json({'ok': True, 'result': info})
    elif state == 'optimal':
        print('backend %s recovered (%s)' % (name, elapsed))
    else:
        print('recovery of backend %s ended %s: %s'
              % (name, state, info.get('reason') or '-'))
    return OK if state == 'optimal' else CRITICAL


# process control (zdaemon)

_ZDSOCK_DEFAULT = 'zdsock'


def zdaemon_command(settings, python=None):
    """The zdaemon command line (without the action) for the server.

    The server configuration is handed to zdaemon with the zeoraid
    schema, so a ``<runner>`` section in it is honoured as with zeoctl;
    what it leaves out defaults to files next to the pid file and to the
    program ``<python> -m zeoraid.server -C <conf>``.
    """
    from zeoraid.server import SCHEMA_DIR
    from zeoraid.server import SCHEMA_FILE
    python = python or sys.executable
    base = settings.base()
    cmd = [python, '-m', 'zdaemon',
           '-S', os.path.join(SCHEMA_DIR, SCHEMA_FILE),
           '-C', settings.configfile]
    runner = settings.runner
    if runner is None:
        cmd += ['-p', '%s -m zeoraid.server -C %s'
                % (python, settings.configfile), '-d']
    sockname = getattr(runner, 'socket_name', None)
    if not sockname or sockname == _ZDSOCK_DEFAULT:
        # zdaemon's default is 'zdsock' in the current directory, which
        # differs per caller; put it next to the pid file instead.
        cmd += ['-s', base + '.zdsock']
    if not getattr(runner, 'transcript', None):
        cmd += ['-t', base + '.transcript.log']
    return cmd


def _logfile(settings):
    runner = settings.runner
    if runner is not None and getattr(runner, 'logfile', None):
        return runner.logfile
    eventlog = settings.eventlog
    for factory in getattr(eventlog, 'handler_factories', ()) or ():
        path = getattr(getattr(factory, 'section', None), 'path', None)
        if path and path not in ('STDOUT', 'STDERR'):
            return path
    return _transcript(settings)


def _transcript(settings):
    runner = settings.runner
    if runner is not None and getattr(runner, 'transcript', None):
        return runner.transcript
    return settings.base() + '.transcript.log'


def _last_lines(path, count=5):
    try:
        with open(path, 'rb') as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            lines = f.read().decode('utf-8', 'replace').splitlines()
    except OSError as e:
        return '(cannot read it: %s)' % e.strerror
    return '\n'.join(line for line in lines[-count:])


def _run_zdaemon(ctx, action, capture=False):
    cmd = zdaemon_command(ctx.settings) + action
    env = dict(os.environ)
    env.pop('DAEMON_MANAGER_MODE', None)
    if capture:
        proc = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
        return proc.returncode, proc.stdout
    try:
        return subprocess.call(cmd, env=env), None
    except KeyboardInterrupt:
        return OK, None


def cmd_zd(ctx):
    code, _ = _run_zdaemon(ctx, [ctx.options.command])
    return code


def cmd_kill(ctx):
    code, _ = _run_zdaemon(ctx, ['kill', ctx.options.signal])
    return code


def cmd_logtail(ctx):
    path = ctx.options.file or _logfile(ctx.settings)
    try:
        tail_follow(path, sys.stdout)
    except OSError as e:
        raise Failure('cannot read log file %s: %s' % (path, e.strerror))
    except KeyboardInterrupt:
        sys.stdout.write('\n')
    return OK


def tail_follow(path, out, lines=10, interval=0.5, stop=None):
    """Print the last lines of path, then what gets appended (like
    ``tail -F``: a truncated or rotated file is reopened).  zdaemon's own
    logtail cannot follow a file under Python 3, hence this one."""
    f = open(path, 'rb')
    try:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - 64 * 1024))
        tail = f.read().splitlines(True)[-lines:]
        out.write(b''.join(tail).decode('utf-8', 'replace'))
        out.flush()
        while stop is None or not stop():
            chunk = f.read()
            if chunk:
                out.write(chunk.decode('utf-8', 'replace'))
                out.flush()
                continue
            time.sleep(interval)
            try:
                st = os.stat(path)
            except OSError:
                continue            # rotated away; wait for the new one
            if st.st_ino != os.fstat(f.fileno()).st_ino:
                f.close()
                f = open(path, 'rb')
                out.write('==> %s reopened <==\n' % path)
            elif st.st_size < f.tell():
                f.seek(0)
                out.write('==> %s truncated <==\n' % path)
    finally:
        f.close()


def _zdaemon_pid(ctx):
    code, output = _run_zdaemon(ctx, ['status'], capture=True)
    match = re.search(r'program running; pid=(\d+)', output or '')
    return int(match.group(1)) if match else None


def _pidfile_pid(settings):
    if not settings.pidfile:
        return None
    try:
        with open(settings.pidfile) as f:
            pid = int(f.read().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def cmd_pid(ctx):
    pid = _zdaemon_pid(ctx) or _pidfile_pid(ctx.settings)
    if pid is None:
        print('zeoraid server not running')
        return UNKNOWN
    print(pid)
    return OK


def cmd_start(ctx):
    code, output = _run_zdaemon(ctx, ['start'], capture=True)
    sys.stdout.write(output)
    if code:
        transcript = _transcript(ctx.settings)
        raise Failure('start failed (zdaemon exit %d); last lines of %s:'
                      '\n%s' % (code, transcript, _last_lines(transcript)))
    if ctx.options.no_wait:
        return OK
    # Wait until the server answers on its admin endpoint: then it has
    # opened its storages and serves the ZEO port.
    deadline = time.monotonic() + START_WAIT
    last = None
    while time.monotonic() < deadline:
        try:
            ctx.client().request('status', ctx.options.storage)
        except AdminUnreachable as e:
            last = str(e)
            time.sleep(0.2)
            continue
        print('zeoraid server ready')
        return OK
    raise Failure('server did not become ready within %ds: %s (see the'
                  ' log: %s)' % (START_WAIT, last, _logfile(ctx.settings)))


def main(args=None):
    parser = build_parser()
    options = parser.parse_args(args)
    ctx = Context(options)
    try:
        code = options.func(ctx)
    except Failure as e:
        if options.json:
            _emit_json({'ok': False, 'error': str(e)})
        elif options.command == 'status':
            print('RAID UNKNOWN - %s' % e)
        else:
            sys.stderr.write('zeoraid-manager: %s\n' % e)
        code = e.code
    except KeyboardInterrupt:
        sys.stderr.write('zeoraid-manager: interrupted\n')
        code = UNKNOWN
    sys.stdout.flush()
    return code


if __name__ == '__main__':
    sys.exit(main())
