"""The zeoraid admin endpoint: management requests, off the ZEO port.

ZEO 6 has no extension methods, and management must not be open to every
database client anyway.  So the zeoraid server listens on a separate
admin endpoint: a unix-domain socket created owner-only (mode 0600) and,
optionally, a TCP address guarded by a shared-secret token (and, with
``<admin-ssl>``, TLS with client certificates).  The protocol
is JSON lines, one request object per line, one response object per line
(see doc/ADMIN-PROTOCOL.md)::

    {"op": "status", "storage": "1", "args": []}
    {"ok": true, "result": {...}}
    {"ok": false, "error": "one clear line"}

The endpoint runs in its own threads (one per connection), never in the
ZEO server's event loop, so a slow operation (recover, verify, reload
opening a new backend) cannot stall database clients.

This module knows nothing about sockets' callers and little about the
RAID: ``AdminService`` maps requests to the storage's ``raid_*`` methods,
``AdminServer`` carries them over sockets.
"""
import binascii
import errno
import hmac
import json
import logging
import os
import socket
import socketserver
import ssl
import stat
import struct
import threading

import ZODB.TimeStamp

from zeoraid.errors import RAIDError


logger = logging.getLogger('zeoraid.admin')

#: Longest request line accepted, in bytes.
MAX_REQUEST = 64 * 1024
#: An idle admin connection is closed after this many seconds.
IDLE_TIMEOUT = 60.0

#: op name -> (minimum, maximum) number of args
OPERATIONS = {
    'status': (0, 0),
    'details': (0, 0),
    'disable': (1, 1),
    'recover': (1, 1),
    'force': (1, 1),
    'reload': (0, 1),
    'verify': (0, 2),
}


def _add_waiting(result, storage):
    """A waiting RAID says why and which backend it needs."""
    waiting = getattr(storage, 'raid_waiting', lambda: None)()
    if waiting is not None:
        result['waiting'] = waiting


class AdminError(Exception):
    """A request was refused; the message is the one line sent back."""


def one_line(text):
    """Collapse a (possibly multi-line) message into one line."""
    return ' '.join(str(text).split())


def tid_hex(tid):
    """A tid as 16 hex digits, or None."""
    if tid is None:
        return None
    if isinstance(tid, bytes):
        return binascii.hexlify(tid).decode('ascii')
    return str(tid)


def _tid_time(tid_text):
    """Seconds since the epoch encoded in a 16-hex-digit tid, or None."""
    try:
        raw = binascii.unhexlify(tid_text)
    except (TypeError, ValueError, binascii.Error):
        return None
    if len(raw) != 8:
        return None
    return ZODB.TimeStamp.TimeStamp(raw).timeTime()


def _json_default(value):
    """Make RAID values JSON-safe (bytes become hex, the rest text)."""
    if isinstance(value, bytes):
        return binascii.hexlify(value).decode('ascii')
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


def encode(message):
    """One protocol line (bytes, newline-terminated) for a message."""
    return (json.dumps(message, default=_json_default, sort_keys=True)
            + '\n').encode('utf-8')


class AdminService:
    """Turns admin requests into calls on the served RAID storages.

    storages: {name: storage} as served by the ZEO server; only those with
    RAID management methods are addressable.  reload: a callable
    ``reload(storage_name, dry_run) -> diff`` provided by the server (it
    re-reads the configuration file), or None if reloading is not possible.
    """

    def __init__(self, storages, reload=None):
        self.storages = {name: storage for name, storage in storages.items()
                         if callable(getattr(storage, 'raid_status', None))}
        self._reload = reload

    def handle(self, request):
        """Answer one decoded request with a response dict (never raises)."""
        try:
            return {'ok': True, 'result': self._dispatch(request)}
        except AdminError as e:
            return {'ok': False, 'error': one_line(e)}
        except RAIDError as e:
            return {'ok': False, 'error': one_line(e)}
        except Exception as e:
            logger.exception('admin request %r failed', request)
            return {'ok': False, 'error': one_line(
                'internal error: %s: %s' % (e.__class__.__name__, e))}

    def _dispatch(self, request):
        if not isinstance(request, dict):
            raise AdminError('a request must be a JSON object')
        op = request.get('op')
        if op not in OPERATIONS:
            raise AdminError('unknown operation %r (known: %s)'
                             % (op, ', '.join(sorted(OPERATIONS))))
        args = request.get('args', [])
        if args is None:
            args = []
        if (not isinstance(args, list)
                or not all(isinstance(a, str) for a in args)):
            raise AdminError('args must be a list of strings')
        lo, hi = OPERATIONS[op]
        if not lo <= len(args) <= hi:
            if lo == hi:
                expected = '%d argument%s' % (lo, '' if lo == 1 else 's')
            else:
                expected = '%d to %d arguments' % (lo, hi)
            raise AdminError('%s takes %s, got %d'
                             % (op, expected, len(args)))
        name, storage = self._storage(request.get('storage'))
        return getattr(self, 'op_' + op)(name, storage, *args)

    def _storage(self, name):
        if not self.storages:
            raise AdminError('this server serves no RAID storage')
        names = ', '.join(sorted(self.storages))
        if name is None:
            if len(self.storages) == 1:
                return next(iter(self.storages.items()))
            raise AdminError('several RAID storages are served (%s);'
                             ' name one' % names)
        if not isinstance(name, str) or name not in self.storages:
            raise AdminError('unknown storage %r (RAID storages: %s)'
                             % (name, names))
        return name, self.storages[name]

    def _backend(self, storage, backend):
        known = storage.raid_details()
        if backend not in known:
            raise AdminError('unknown backend %r (backends: %s)'
                             % (backend, ', '.join(sorted(known))))

    # operations: each returns a JSON-able result or raises

    def op_status(self, name, storage):
        details = storage.raid_details()
        result = {'storage': name,
                  'status': storage.raid_status(),
                  'backends': {b: d.get('state') for b, d in details.items()}}
        _add_waiting(result, storage)
        return result

    def op_details(self, name, storage):
        status = storage.raid_status()
        details = storage.raid_details()
        last_tid = tid_hex(storage.lastTransaction())
        raid_time = _tid_time(last_tid) if last_tid else None
        backends = {}
        for backend, info in details.items():
            info = dict(info)
            if 'lag_seconds' not in info:
                backend_time = (_tid_time(info['last_tid'])
                                if info.get('last_tid') else None)
                info['lag_seconds'] = (
                    max(0.0, raid_time - backend_time)
                    if raid_time is not None and backend_time is not None
                    else None)
            backends[backend] = info
        result = {'storage': name, 'status': status, 'last_tid': last_tid,
                  'backends': backends}
        _add_waiting(result, storage)
        return result

    def op_disable(self, name, storage, backend):
        self._backend(storage, backend)
        return storage.raid_disable(backend)

    def op_force(self, name, storage, backend):
        self._backend(storage, backend)
        logger.critical('admin: force %s requested for storage %s',
                        backend, name)
        return storage.raid_force(backend)

    def op_recover(self, name, storage, backend):
        recover = getattr(storage, 'raid_recover', None)
        if recover is None:
            raise AdminError('recovery not implemented yet')
        self._backend(storage, backend)
        return recover(backend)

    def op_reload(self, name, storage, *args):
        if args and args[0] != '--dry-run':
            raise AdminError('reload takes no argument but --dry-run, got %r'
                             % args[0])
        if self._reload is None:
            raise AdminError('this server cannot reload its configuration')
        return self._reload(name, dry_run=bool(args))

    def op_verify(self, name, storage, *args):
        verify = getattr(storage, 'raid_verify', None)
        if verify is None:
            raise AdminError('verify not implemented yet')
        options = {}
        for arg in args:
            key, _, value = arg.partition('=')
            if key == '--since' and value:
                options['since'] = value
            elif key == '--rate' and value:
                try:
                    options['rate'] = float(value)
                except ValueError:
                    raise AdminError('verify --rate takes a number, not %r'
                                     % value)
            else:
                raise AdminError('verify takes --since=TID and --rate=N, '
                                 'got %r' % arg)
        try:
            return verify(**options)
        except ValueError as e:       # a malformed tid
            raise AdminError(str(e))


class _Handler(socketserver.StreamRequestHandler):
    """One admin connection: read request lines, write response lines."""

    timeout = IDLE_TIMEOUT

    def handle(self):
        server = self.server
        if isinstance(self.connection, ssl.SSLSocket):
            try:
                self.connection.do_handshake()
            except (ssl.SSLError, OSError) as e:
                logger.warning('admin TLS connection from %s refused: %s',
                               self.client_address[0], one_line(e))
                return
            refused = server.tls.refuses(self.connection.getpeercert())
            if refused:
                logger.warning('admin TLS connection from %s refused: %s',
                               self.client_address[0], refused)
                self.wfile.write(encode({
                    'ok': False, 'error': 'permission denied: ' + refused}))
                return
        if not server.admin.allowed_peer(self.connection):
            self.wfile.write(encode({'ok': False,
                                     'error': 'permission denied'}))
            return
        while True:
            try:
                line = self.rfile.readline(MAX_REQUEST + 1)
            except (socket.timeout, OSError):
                return
            if not line:
                return
            if len(line) > MAX_REQUEST:
                self.wfile.write(encode({'ok': False,
                                         'error': 'request too long'}))
                return
            if not line.strip():
                continue
            response = server.admin.answer(line, server.needs_token)
            try:
                self.wfile.write(encode(response))
                self.wfile.flush()
            except OSError:
                return


class AdminTLS:
    """The TCP admin endpoint's TLS: ZEO's server context (client
    certificates signed by the configured CA) and, optionally, the only
    certificate names let in (<admin-ssl> allowed-client)."""

    def __init__(self, context, allowed_clients=()):
        self.context = context
        self.allowed_clients = frozenset(allowed_clients)

    def wrap_socket(self, sock, **kw):
        return self.context.wrap_socket(sock, **kw)

    def refuses(self, certificate):
        """Why a verified peer certificate may not in, or None."""
        if not self.allowed_clients:
            return None
        names = certificate_names(certificate or {})
        if self.allowed_clients.intersection(names):
            return None
        return ('client certificate %s is not an allowed-client'
                % (', '.join(sorted(names)) or 'without a name'))


def certificate_names(certificate):
    """The names a certificate (ssl's getpeercert() dict) is for: the
    subject's common names and its DNS and email alternative names."""
    names = set()
    for rdn in certificate.get('subject', ()):
        for key, value in rdn:
            if key == 'commonName':
                names.add(value)
    for kind, value in certificate.get('subjectAltName', ()):
        if kind in ('DNS', 'email'):
            names.add(value)
    return names


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    needs_token = False

    def __init__(self, sock, admin):
        # The socket is already bound (with a safe umask); just listen.
        socketserver.BaseServer.__init__(self, sock.getsockname(), _Handler)
        self.socket = sock
        self.admin = admin
        self.server_activate()


class _TCPServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True
    needs_token = True

    def __init__(self, address, admin, tls=None):
        self.address_family = (socket.AF_INET6 if ':' in address[0]
                               else socket.AF_INET)
        socketserver.TCPServer.__init__(self, address, _Handler)
        self.admin = admin
        self.tls = tls

    def get_request(self):
        connection, address = self.socket.accept()
        if self.tls is not None:
            # The handshake runs in the connection's thread (_Handler),
            # under its idle timeout, never in the accepting one.
            connection = self.tls.wrap_socket(
                connection, server_side=True, do_handshake_on_connect=False)
        return connection, address


def bind_unix_socket(path):
    """Create and bind a unix socket at ``path`` with mode 0600.

    The umask is tightened around bind() so the socket file is never
    accessible to others, not even between bind() and a chmod().  A stale
    socket file (nobody listening) is removed; a live one is an error.
    """
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise AdminError('admin socket path %s exists and is not a socket'
                             % path)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(2.0)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)      # stale: left behind by a crashed server
        else:
            raise AdminError('admin socket %s is in use by another server'
                             % path)
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(path)
    except OSError as e:
        sock.close()
        raise AdminError('cannot create admin socket %s: %s' % (path, e))
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    return sock


def read_token(path):
    """The shared secret in ``path`` (stripped); refuse weak setups."""
    try:
        mode = os.stat(path).st_mode
        with open(path, 'rb') as f:
            token = f.read().strip()
    except OSError as e:
        raise AdminError('cannot read admin token file %s: %s'
                         % (path, e.strerror or e))
    if mode & 0o077:
        raise AdminError('admin token file %s must not be accessible by'
                         ' group or others (chmod 600)' % path)
    if len(token) < 16:
        raise AdminError('admin token in %s is too short (16 characters'
                         ' at least)' % path)
    return token


class AdminServer:
    """The admin endpoint: a unix socket, optionally a TCP address.

    Create it (binds the sockets, so errors show before the ZEO server
    starts and before anything else runs in threads, which matters for the
    umask), then ``start(service)`` once the storages are open, and
    ``close()`` on shutdown.  Connections made before ``start`` wait in
    the listen backlog.
    """

    service = None

    def __init__(self, socket_path, tcp_address=None, token_file=None,
                 tls=None):
        if tcp_address is not None and token_file is None:
            raise AdminError('an admin TCP address needs a token file'
                             ' (admin-token-file)')
        if tls is not None and tcp_address is None:
            raise AdminError('<admin-ssl> needs an admin TCP address'
                             ' (admin-address)')
        self.socket_path = socket_path
        self.token = read_token(token_file) if tcp_address else None
        self._uid = os.geteuid()
        self._servers = []
        self._threads = []
        self._inode = None
        sock = bind_unix_socket(socket_path)
        self._inode = os.stat(socket_path).st_ino
        self._servers.append(_UnixServer(sock, self))
        if tcp_address is not None:
            try:
                self._servers.append(_TCPServer(tcp_address, self, tls))
            except OSError as e:
                self.close()
                raise AdminError('cannot listen on admin address %s:%s: %s'
                                 % (tcp_address[0], tcp_address[1], e))

    @property
    def tcp_address(self):
        """(host, port) of the TCP listener, or None."""
        for server in self._servers:
            if isinstance(server, _TCPServer):
                return server.server_address[:2]
        return None

    def start(self, service):
        """Serve requests for ``service`` (an AdminService) in threads."""
        self.service = service
        for server in self._servers:
            thread = threading.Thread(
                target=server.serve_forever, kwargs={'poll_interval': 0.5},
                name='zeoraid-admin %s' % (server.server_address,),
                daemon=True)
            thread.start()
            self._threads.append(thread)
        logger.info('admin endpoint listening on %s%s', self.socket_path,
                    ' and %s:%s' % self.tcp_address if self.tcp_address
                    else '')

    def close(self):
        """Stop serving and remove the socket file (if it is still ours)."""
        for server, thread in zip(self._servers, self._threads):
            server.shutdown()
        for server in self._servers:
            server.server_close()
        for thread in self._threads:
            thread.join(5)
        self._servers = []
        self._threads = []
        try:
            if (self._inode is not None
                    and os.stat(self.socket_path).st_ino == self._inode):
                os.unlink(self.socket_path)
        except OSError as e:
            if e.errno != errno.ENOENT:
                logger.warning('cannot remove admin socket %s: %s',
                               self.socket_path, e)
        self._inode = None

    def allowed_peer(self, connection):
        """On the unix socket, accept only our own user and root."""
        if connection.family != socket.AF_UNIX:
            return True
        try:
            creds = connection.getsockopt(socket.SOL_SOCKET,
                                          socket.SO_PEERCRED,
                                          struct.calcsize('3i'))
        except (AttributeError, OSError):
            return True     # no SO_PEERCRED here: the file mode protects
        pid, uid, gid = struct.unpack('3i', creds)
        return uid in (0, self._uid)

    def answer(self, line, needs_token):
        """Decode, authenticate and answer one request line."""
        try:
            request = json.loads(line.decode('utf-8'))
        except (UnicodeDecodeError, ValueError) as e:
            return {'ok': False, 'error': one_line(
                'request is not valid JSON: %s' % e)}
        if needs_token:
            given = (request.get('token') if isinstance(request, dict)
                     else None)
            if (not isinstance(given, str) or not hmac.compare_digest(
                    given.encode('utf-8'), self.token)):
                logger.warning('admin request with a wrong token refused')
                return {'ok': False, 'error': 'permission denied'}
        if isinstance(request, dict) and request.get('op') not in (
                'status', 'details'):
            logger.info('admin request: %s', ' '.join(
                str(word) for word in [request.get('op'),
                                       request.get('storage')]
                + list(request.get('args') or ()) if word is not None))
        return self.service.handle(request)
