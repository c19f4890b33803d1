"""The zeoraid server process: ``zeoraid -C zeoraid.conf``.

A ZEO 6 server (ZEO's runzeo machinery, unchanged on the ZEO port) that
serves RAID storages, plus:

* an admin endpoint (``zeoraid.admin``) in its own threads, off the ZEO
  port, so database clients cannot manage the RAID;
* a pid file that is always written (runzeo skips it for read-only
  servers) and removed on exit;
* signals: SIGTERM/SIGINT stop the event loop and close the storages (the
  RAID aborts in-flight transactions and closes its backends), SIGUSR2
  reopens the log files, SIGHUP re-reads the RAID backends from the
  configuration file (runzeo would exit instead);
* an optional HTTP metrics and health endpoint (``<metrics>``,
  ``zeoraid.metrics``), in its own threads too;
* TLS: ZEO's ``<zeo><ssl>`` for clients, and ``<clientstorage>`` backends
  with a ``<client-ssl>`` section; an unusable certificate, key or CA file
  stops the startup with one clear line (``client_ssl``, ``tls_problem``).

The configuration is runzeo's format with ``%import zeoraid``,
``<raidstorage>`` sections and an optional ``<zeoraid>`` section (admin
endpoint).  ``load_configuration`` and ``ServerSettings`` are shared with
zeoraid-manager so both find the same admin socket.
"""
import logging
import os
import ssl
import sys
import threading

import ZConfig
import ZEO.runzeo

from zeoraid import served
from zeoraid.admin import AdminError
from zeoraid.admin import AdminServer
from zeoraid.admin import AdminService
from zeoraid.admin import AdminTLS
from zeoraid.admin import one_line
from zeoraid.config import raid_settings
from zeoraid.config import settings_diff
from zeoraid.errors import RAIDError
from zeoraid.metrics import MetricsEndpoint
from zeoraid.storage import key_name


logger = logging.getLogger('zeoraid.server')

SCHEMA_DIR = os.path.dirname(os.path.abspath(__file__))
SCHEMA_FILE = 'schema.xml'

_schema = None
_schema_lock = threading.Lock()


def load_schema():
    """The zeoraid server schema (loaded once per process)."""
    global _schema
    with _schema_lock:
        if _schema is None:
            _schema = ZConfig.loadSchema(os.path.join(SCHEMA_DIR,
                                                      SCHEMA_FILE))
        return _schema


def load_configuration(path):
    """Parse a zeoraid server configuration file; return its root.

    Raises ZConfig.ConfigurationError (or OSError) with the reason.
    """
    root, _ = ZConfig.loadConfig(load_schema(), path)
    return root


def storage_name(section):
    """The served name of a storage section (runzeo names an unnamed one
    '1')."""
    return section.name if section.name is not None else '1'


def is_raid_section(section):
    """True for the opener of a ``<raidstorage>`` section."""
    config = getattr(section, 'config', None)
    return (config is not None
            and config.getSectionType() == 'raidstorage')


def default_state_files(sections, settings, quiet=False):
    """Give every served <raidstorage> without a state-file one next to
    the pid file (var/zeoraid.pid: var/zeoraid.NAME.state.json), so that
    backend states survive restarts whatever the configuration says."""
    for section in sections:
        if is_raid_section(section) and section.config.state_file is None:
            name = storage_name(section).replace(os.sep, '_')
            section.config.state_file = '%s.%s.state.json' % (
                settings.base(), name)
            if not quiet:
                logger.info('storage %r: no state-file set, keeping '
                            'backend states in %s', storage_name(section),
                            section.config.state_file)


def backend_openers(section):
    """[(backend name, opener)] of a ``<raidstorage>`` section's backends.

    The very list the RAID gets when it is opened from that section, so a
    reload compares like with like.
    """
    backends = getattr(section, 'backends', None)
    if backends is None:
        backends = [(o.name, o.open) for o in section.config.storages]
    return list(backends)


class ServerSettings:
    """Where a zeoraid server keeps its files and admin endpoint.

    Derived from a parsed configuration exactly the same way in the server
    and in zeoraid-manager.
    """

    def __init__(self, root, configfile):
        self.configfile = (os.path.abspath(configfile)
                           if configfile else None)
        zeo = root.zeo
        address = zeo.address
        self.address = getattr(address, 'address', address)
        pidfile = zeo.pid_filename
        if not pidfile and os.environ.get('INSTANCE_HOME'):
            # runzeo's fallback
            pidfile = os.path.join(os.environ['INSTANCE_HOME'], 'var',
                                   'ZEO.pid')
        self.pidfile = os.path.abspath(pidfile) if pidfile else None
        section = getattr(root, 'zeoraid', None)
        self.admin_socket = getattr(section, 'admin_socket', None)
        if not self.admin_socket:
            base = self.pidfile or self.configfile
            if base is None:
                raise AdminError('cannot place the admin socket: set'
                                 ' admin-socket in <zeoraid> or a pid file')
            self.admin_socket = os.path.splitext(base)[0] + '.admin.sock'
        self.admin_socket = os.path.abspath(self.admin_socket)
        self.admin_address = getattr(section, 'admin_address', None)
        self.token_file = getattr(section, 'admin_token_file', None)
        self.admin_tls = getattr(section, 'admin_ssl', None)
        self.runner = getattr(root, 'runner', None)
        self.storage_names = [storage_name(s) for s in root.storages]
        self.raid_storage_names = [storage_name(s) for s in root.storages
                                   if is_raid_section(s)]
        self.eventlog = getattr(root, 'eventlog', None)

    def base(self):
        """Path prefix for files that default to 'next to the pid file'."""
        return os.path.splitext(self.pidfile or self.configfile
                                or self.admin_socket)[0]


# TLS

def check_tls_files(certificate=None, key=None, authenticate=None,
                    server=False):
    """Explain in one line what is wrong with TLS files, or return None.

    Tries what ZEO will do with them (load the CA locations and the
    certificate chain), so an unreadable, missing or non-PEM file is
    named before any connection is attempted.
    """
    for what, path in (('certificate', certificate), ('key', key),
                       ('authenticate', authenticate)):
        if path and path != 'DYNAMIC' and not os.path.exists(path):
            return '%s file %s does not exist' % (what, path)
        if path and os.path.isfile(path) and not os.access(path, os.R_OK):
            return '%s file %s is not readable' % (what, path)
    if server and not certificate:
        return 'a server <ssl> section needs a certificate'
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server
                             else ssl.PROTOCOL_TLS_CLIENT)
    if authenticate and authenticate != 'DYNAMIC':
        try:
            if os.path.isdir(authenticate):
                context.load_verify_locations(capath=authenticate)
            else:
                context.load_verify_locations(cafile=authenticate)
        except (ssl.SSLError, OSError) as e:
            return ('authenticate file %s holds no usable PEM certificate:'
                    ' %s' % (authenticate, one_line(e)))
    if certificate:
        try:
            context.load_cert_chain(certificate, key or None,
                                    password=lambda: b'')
        except (ssl.SSLError, OSError) as e:
            return ('certificate %s%s cannot be loaded (a PEM certificate'
                    ' and its matching, unencrypted key?): %s'
                    % (certificate, ' with key %s' % key if key else '',
                       one_line(e)))
    return None


def _checked_ssl(section, name, server):
    """ZEO's TLS context for `section` (`<name>`), its files checked
    first so a problem is one line that names the file."""
    problem = check_tls_files(section.certificate, section.key,
                              section.authenticate, server=server)
    if problem is not None and not (section.password_function
                                    and 'cannot be loaded' in problem):
        raise ValueError('<%s>: %s' % (name, problem))
    import ZEO.zconfig
    return ZEO.zconfig.ssl_config(section, server)


def client_ssl(section):
    """Datatype of ``<client-ssl>``: ZEO's client TLS settings, checked."""
    return _checked_ssl(section, 'client-ssl', server=False)


def admin_ssl(section):
    """Datatype of ``<admin-ssl>``: TLS with client certificates for the
    TCP admin endpoint (ZEO's server TLS settings, checked), and the
    certificate names allowed in."""
    allowed = [name.strip() for name in section.allowed_clients or ()]
    if any(not name for name in allowed):
        raise ValueError('<admin-ssl>: allowed-client needs a name')
    return AdminTLS(_checked_ssl(section, 'admin-ssl', server=True),
                    allowed)


def tls_problem(exc):
    """A one-line explanation of an error ZEO's ``<ssl>`` datatype raised
    while the configuration was loaded (it raises bare OSError/SSLError
    without naming the file)."""
    tb = exc.__traceback__
    section = None
    while tb is not None:
        if tb.tb_frame.f_code.co_name == 'ssl_config':
            section = tb.tb_frame.f_locals.get('section')
        tb = tb.tb_next
    if section is not None:
        problem = check_tls_files(
            getattr(section, 'certificate', None),
            getattr(section, 'key', None),
            getattr(section, 'authenticate', None), server=True)
        if problem:
            return '<zeo> <ssl>: ' + problem
    return '<ssl> section: %s' % one_line(exc)


USAGE = """Usage: zeoraid -C zeoraid.conf

Runs a ZEO server for RAID storages.  The configuration is runzeo's
format plus "%import zeoraid", <raidstorage> sections, an optional
<zeoraid> section (admin-socket, admin-address, admin-token-file) and an
optional <metrics> section (address of the HTTP metrics endpoint).

Options:
-C/--configure URL -- configuration file
-h/--help -- print this usage message and exit

Signals: SIGTERM/SIGINT stop cleanly, SIGUSR2 reopens the log files,
SIGHUP reloads the RAID backends from the configuration file.
"""


class ZEORaidOptions(ZEO.runzeo.ZEOOptions):
    # runzeo's options with the zeoraid schema (which adds <zeoraid>);
    # zdaemon prints __doc__ as the usage message.
    __doc__ = USAGE
    schemadir = SCHEMA_DIR
    schemafile = SCHEMA_FILE

    def realize(self, *args, **kw):
        try:
            super().realize(*args, **kw)
        except (OSError, ssl.SSLError) as e:
            # ZEO's <ssl> datatype failed while the file was parsed.
            self.usage(tls_problem(e))
        if self.configfile is None:
            self.usage('a configuration file is required; use -C')


class ZEORaidServer(ZEO.runzeo.ZEOServer):
    """runzeo's ZEOServer with the admin endpoint and RAID signals."""

    admin = None
    metrics = None
    settings = None
    _loads = None
    _loop = None
    _serving = False
    _stopping = False

    def __init__(self, options):
        super().__init__(options)
        self.storages = {}
        self._reload_lock = threading.Lock()
        # {storage name: raid_settings} the RAIDs run with (reload diffs).
        self._raid_settings = {}

    def open_storages(self):
        default_state_files(self.options.storages, self.settings)
        super().open_storages()
        for section in self.options.storages:
            if is_raid_section(section):
                self._raid_settings[storage_name(section)] = \
                    raid_settings(section)

    def main(self):
        self.setup_default_logging()
        self.check_socket()
        self.clear_socket()
        self._get_pidfile()
        self.create_admin()
        try:
            self.create_metrics()
            self.make_pidfile()
            self.setup_signals()
            self.open_storages()
            self.create_server()
            self.start_admin()
            self.loop_forever()
        finally:
            self.close_metrics()
            self.close_admin()
            self.close_server()
            self.close_loop()
            self.clear_socket()
            self.remove_pidfile()

    # admin endpoint

    def create_admin(self):
        """Bind the admin socket(s) before anything else starts."""
        try:
            self.settings = ServerSettings(self.options.configroot,
                                           self.options.configfile)
            self.admin = AdminServer(self.settings.admin_socket,
                                     self.settings.admin_address,
                                     self.settings.token_file,
                                     tls=self.settings.admin_tls)
        except AdminError as e:
            self.options.usage(str(e))

    def create_server(self):
        super().create_server()
        # Loads that miss the backend caches go to threads (served.py).
        self._loads = served.install(self.server)
        self._loop = self.server.acceptor.event_loop
        addr = self.server.acceptor.addr
        if isinstance(addr, tuple):
            addr = '%s:%s' % addr[:2]
        log('serving storages %s on %s; admin socket %s'
            % (', '.join(sorted(self.storages)), addr,
               self.settings.admin_socket))

    def start_admin(self):
        self.admin.start(AdminService(self.storages,
                                      reload=self.reload_storage))
        self._serving = True

    def close_admin(self):
        if self.admin is not None:
            self.admin.close()
            self.admin = None

    # metrics endpoint

    def create_metrics(self):
        """Listen on the <metrics> address, if any; /readyz says 503
        until the storages are open and served."""
        section = getattr(self.options.configroot, 'metrics', None)
        if section is None:
            return
        try:
            self.metrics = MetricsEndpoint(
                section.address, storages=lambda: self.storages,
                serving=lambda: self._serving and not self._stopping,
                ping=self.ping_loop)
        except OSError as e:
            self.options.usage(str(e))
        self.metrics.start()
        log('metrics endpoint on %s:%s' % self.metrics.address)

    def close_metrics(self):
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None

    def ping_loop(self, timeout):
        """True if the ZEO event loop runs a callback within timeout."""
        loop = self._loop
        if loop is None or not loop.is_running():
            return False
        done = threading.Event()
        try:
            loop.call_soon_threadsafe(done.set)
        except RuntimeError:        # closed meanwhile
            return False
        return done.wait(timeout)

    # event loop and shutdown

    def loop_forever(self):
        """Run the ZEO event loop until a signal stops it.

        Unlike runzeo, the loop is stopped (not unwound by an exception
        raised in the middle of a storage call) and is not closed, so
        closing the server afterwards works.
        """
        self._loop.run_forever()
        self._serving = False
        log('event loop stopped')

    def close_server(self):
        if self.server is not None:
            super().close_server()
            if self._loads is not None:
                self._loads.close()
        else:
            # stopped while opening: close what was opened
            for name, storage in self.storages.items():
                try:
                    storage.close()
                except Exception:
                    logger.exception('closing storage %r', name)

    def close_loop(self):
        """Close the stopped loop now, not in a garbage collector's
        ``__del__`` at interpreter exit (which fails noisily)."""
        loop = self._loop
        self._loop = None
        if loop is not None and not loop.is_running() \
                and not loop.is_closed():
            loop.close()

    def _stop(self, why):
        if self._stopping:
            log('%s: already stopping' % why)
            return
        self._stopping = True
        log('terminated by %s' % why)
        loop = self._loop
        if loop is not None and loop.is_running():
            loop.call_soon_threadsafe(loop.stop)
        else:
            sys.exit(0)         # still starting: unwind through main()

    def handle_sigterm(self):
        self._stop('SIGTERM')

    def handle_sigint(self):
        self._stop('SIGINT')

    def handle_sigusr2(self):
        # Reopen from the loop thread, between callbacks, never in the
        # middle of a log record being written.
        loop = self._loop
        reopen = super().handle_sigusr2
        if loop is not None and loop.is_running():
            loop.call_soon_threadsafe(reopen)
        else:
            reopen()

    def handle_sighup(self):
        if not self._serving or self._stopping:
            log('SIGHUP ignored: the server is not serving (yet)',
                logging.WARNING)
            return
        log('SIGHUP: reloading the RAID configuration')
        threading.Thread(target=self._reload_all, name='zeoraid-reload',
                         daemon=True).start()

    def _reload_all(self):
        """SIGHUP: reload every RAID (reload_storage logs the changes)."""
        try:
            self.reload_storage(None)
        except RAIDError as e:
            log('reload refused: %s' % one_line(e), logging.ERROR)
        except Exception:
            logger.exception('reload failed')

    # pid file: always written, even for a read-only server

    def make_pidfile(self):
        pidfile = self.options.pid_file
        if pidfile is None:
            return
        tmp = '%s.%d.tmp' % (pidfile, os.getpid())
        try:
            with open(tmp, 'w') as f:
                f.write('%d\n' % os.getpid())
            os.rename(tmp, pidfile)
            log("created PID file '%s'" % pidfile)
        except OSError as e:
            logger.error("PID file '%s' cannot be written: %s", pidfile, e)

    def remove_pidfile(self):
        pidfile = self.options.pid_file
        if pidfile is None:
            return
        try:
            with open(pidfile) as f:
                pid = int(f.read().strip() or 0)
            if pid == os.getpid():
                os.unlink(pidfile)
                log("removed PID file '%s'" % pidfile)
        except (OSError, ValueError):
            pass

    # reload

    def reload_storage(self, name=None, dry_run=False):
        """Re-read the configuration file and apply its backend lists.

        name: one served RAID storage, or None for all of them (SIGHUP).
        Returns the diff of that storage, or a list of diffs for all.
        Nothing changes unless the file parses and every RAID accepts its
        new backend list in a dry run first.  Only backend sections are
        reloaded (a kept backend whose section changed is replaced), and
        the <raidstorage> keys a running RAID can take
        (storage.ONLINE_SETTINGS); other changed keys are reported in
        `restart_needed` and left as they are.
        """
        with self._reload_lock:
            configfile = self.options.configfile
            try:
                root = load_configuration(configfile)
            except (ZConfig.ConfigurationError, OSError) as e:
                raise RAIDError('configuration %s does not parse, nothing'
                                ' changed: %s' % (configfile, one_line(e)))
            default_state_files(root.storages, self.settings, quiet=True)
            sections = {storage_name(s): s for s in root.storages}
            raids = {n: s for n, s in self.storages.items()
                     if callable(getattr(s, 'raid_reload', None))}
            targets = [name] if name is not None else sorted(raids)
            plan = {}
            for target in targets:
                if target not in raids:
                    raise RAIDError('storage %r is not a RAID storage'
                                    % target)
                section = sections.get(target)
                if section is None:
                    raise RAIDError(
                        'storage %r is missing from %s; removing a storage'
                        ' needs a restart, nothing changed'
                        % (target, configfile))
                if not is_raid_section(section):
                    raise RAIDError(
                        'storage %r in %s is no longer a <raidstorage>;'
                        ' that needs a restart, nothing changed'
                        % (target, configfile))
                wanted = raid_settings(section)
                online, restart = settings_diff(
                    self._raid_settings.get(target, wanted), wanted)
                plan[target] = (backend_openers(section), online, restart)
            diffs = {target: raids[target].raid_reload(plan[target][0],
                                                       dry_run=True)
                     for target in targets}
            if not dry_run:
                diffs = {target: raids[target].raid_reload(plan[target][0])
                         for target in targets}
                for target in targets:
                    online = plan[target][1]
                    if online:
                        raids[target].apply_settings(
                            {key: new for key, (_, new) in online.items()})
                        self._raid_settings[target].update(
                            (key, new) for key, (_, new) in online.items())
            results = []
            for target in targets:
                _, online, restart = plan[target]
                diff = dict(diffs[target])
                diff.update(storage=target, dry_run=bool(dry_run),
                            settings={key_name(key): list(change)
                                      for key, change in online.items()},
                            restart_needed=[key_name(k) for k in restart])
                if not dry_run:
                    log('reload of storage %r: added %s, removed %s, '
                        'replaced (settings changed) %s, settings %s'
                        % (target, diff.get('added'), diff.get('removed'),
                           diff.get('changed'), _settings_text(diff)))
                    if restart:
                        log('reload of storage %r: changed keys that need a '
                            'restart, left as they were: %s'
                            % (target, ', '.join(diff['restart_needed'])),
                            logging.WARNING)
                results.append(diff)
            return results[0] if name is not None else results


def _settings_text(diff):
    """'timeout 10.0 -> 5.0, ...' for the log, or 'unchanged'."""
    return ', '.join('%s %r -> %r' % (key, old, new) for key, (old, new)
                     in sorted(diff['settings'].items())) or 'unchanged'


def log(msg, level=logging.INFO):
    logger.log(level, '(%d) %s', os.getpid(), msg)


def main(args=None):
    options = ZEORaidOptions()
    options.realize(args, progname='zeoraid')
    ZEORaidServer(options).main()


if __name__ == '__main__':
    main()
