"""Client side of the zeoraid admin protocol (JSON lines, see
doc/ADMIN-PROTOCOL.md).

Every call is bounded by a timeout (connect and each read), so a manager
command never hangs on a dead or wedged server.
"""
import json
import os
import socket
import time


class AdminUnreachable(Exception):
    """The admin endpoint could not be reached or stopped answering."""


class AdminRefused(Exception):
    """The server answered the request with an error (one line)."""


def parse_address(text):
    """An admin address: a unix socket path, or ``host:port`` for TCP.

    Anything with a '/' (or an existing file) is a path; ``[::1]:8199``
    and ``127.0.0.1:8199`` are TCP addresses.
    """
    if '/' in text or os.path.exists(text):
        return text
    host, sep, port = text.rpartition(':')
    if not sep or not port.isdigit():
        raise ValueError('admin address %r is neither a socket path nor'
                         ' HOST:PORT' % text)
    host = host.strip('[]') or '127.0.0.1'
    return (host, int(port))


def describe(address):
    if isinstance(address, tuple):
        return 'admin address %s:%d' % address
    return 'admin socket %s' % address


def _reason(error):
    """One line for a socket or TLS error."""
    return ' '.join(str(error.strerror or error).split())


class AdminClient:
    """Sends requests to one admin endpoint, one connection per call."""

    def __init__(self, address, token=None, timeout=5.0, tls=None):
        self.address = address
        self.token = token
        self.timeout = timeout
        self.tls = tls       # client SSLContext for a TCP endpoint

    def request(self, op, storage=None, args=()):
        """Send one request; return the decoded response dict."""
        message = {'op': op, 'args': list(args)}
        if storage is not None:
            message['storage'] = storage
        if self.token is not None:
            message['token'] = self.token
        line = (json.dumps(message) + '\n').encode('utf-8')
        where = describe(self.address)
        deadline = time.monotonic() + self.timeout
        try:
            if isinstance(self.address, tuple):
                sock = socket.create_connection(self.address,
                                                timeout=self.timeout)
                if self.tls is not None:
                    try:
                        sock = self.tls.wrap_socket(
                            sock, server_hostname=self.address[0])
                    except BaseException:
                        sock.close()
                        raise
            else:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(self.timeout)
                try:
                    sock.connect(self.address)
                except BaseException:
                    sock.close()
                    raise
        except OSError as e:
            raise AdminUnreachable('cannot reach %s: %s'
                                   % (where, _reason(e)))
        try:
            sock.sendall(line)
            data = b''
            while not data.endswith(b'\n'):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise socket.timeout('timed out')
                sock.settimeout(remaining)
                chunk = sock.recv(65536)
                if not chunk:
                    raise AdminUnreachable(
                        '%s closed the connection without an answer'
                        % where)
                data += chunk
        except socket.timeout:
            raise AdminUnreachable('no answer from %s within %gs'
                                   % (where, self.timeout))
        except OSError as e:
            raise AdminUnreachable('connection to %s failed: %s'
                                   % (where, _reason(e)))
        finally:
            sock.close()
        try:
            response = json.loads(data.decode('utf-8'))
        except ValueError:
            raise AdminUnreachable('%s sent an invalid answer' % where)
        if not isinstance(response, dict) or 'ok' not in response:
            raise AdminUnreachable('%s sent an invalid answer' % where)
        return response

    def call(self, op, storage=None, args=()):
        """Send one request; return its result or raise AdminRefused."""
        response = self.request(op, storage, args)
        if not response['ok']:
            raise AdminRefused(response.get('error') or 'request refused')
        return response.get('result')
