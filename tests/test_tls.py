"""TLS on both sides of a zeoraid server, with certificates made here.

Backends are stock runzeo processes that require TLS with a client
certificate; the zeoraid server runs etc/production-tls.conf (its %define
lines replaced) and so connects to them with its client certificate and
requires one from its own clients.  The sample client configurations
(etc/client-tls.conf, etc/client-embedded.conf, etc/zeo-backend-tls.conf)
are opened as written, with their %define lines replaced.
"""
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import unittest

import ZEO.ClientStorage
import ZEO.Exceptions
import ZEO.runzeo
import ZODB
import ZODB.config

from tests.test_server import RaidServer
from tests.test_server import wait_until
from tests.zeo_backends import BackendServer
from tests.zeo_backends import stop_all
from zeoraid.demo import render


HERE = os.path.dirname(os.path.abspath(__file__))
ETC = os.path.join(os.path.dirname(HERE), 'etc')

_EXTENSIONS = '''\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = DNS:localhost, IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
'''


def openssl(*args, cwd):
    subprocess.run(['openssl'] + list(args), cwd=cwd, check=True,
                   stdin=subprocess.DEVNULL, capture_output=True,
                   timeout=60)


def make_certificates(directory):
    """A test CA and certificates it signed, valid for 127.0.0.1 and
    localhost: {name: (certificate path, key path)} plus 'ca'."""
    ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1',
          '-nodes']
    openssl('req', '-x509', *ec, '-keyout', 'ca.key', '-out', 'ca.pem',
            '-days', '2', '-subj', '/CN=zeoraid test CA',
            '-addext', 'basicConstraints=critical,CA:TRUE',
            '-addext', 'keyUsage=critical,keyCertSign,cRLSign',
            cwd=directory)
    with open(os.path.join(directory, 'leaf.ext'), 'w') as f:
        f.write(_EXTENSIONS)
    result = {'ca': os.path.join(directory, 'ca.pem')}
    for name in ('zeo1', 'zeo2', 'zeoraid-server', 'zeoraid-client',
                 'app-client'):
        openssl('req', *ec, '-keyout', name + '.key', '-out', name + '.csr',
                '-subj', '/CN=%s' % name, cwd=directory)
        openssl('x509', '-req', '-in', name + '.csr', '-CA', 'ca.pem',
                '-CAkey', 'ca.key', '-CAcreateserial', '-days', '2',
                '-extfile', 'leaf.ext', '-out', name + '.pem',
                cwd=directory)
        result[name] = (os.path.join(directory, name + '.pem'),
                        os.path.join(directory, name + '.key'))
    return result


def read_etc(name):
    with open(os.path.join(ETC, name)) as f:
        return f.read()


def etc_config(name, values):
    """etc/NAME with its %define lines set to values, and those values
    also spelled out where they are used (so tests can edit them)."""
    text = render(read_etc(name), values)
    return re.sub(r'\$(\w+)|\$\{(\w+)\}',
                  lambda m: str(values.get(m.group(1) or m.group(2),
                                           m.group(0))), text)


def server_ssl_section(certs, name):
    cert, key = certs[name]
    return ('<ssl>\n    certificate %s\n    key %s\n    authenticate %s\n'
            '  </ssl>' % (cert, key, certs['ca']))


def client_context(certs, name='app-client'):
    context = ssl.create_default_context(cafile=certs['ca'])
    if name is not None:
        context.load_cert_chain(*certs[name])
    return context


class TLSLayer:
    """A TLS cluster shared by the tests: certificates made by a test CA
    and two backends requiring TLS with a client certificate (a
    zope.testrunner layer: set up once, torn down after the tests)."""

    @classmethod
    def setUp(cls):
        cls.tmp = tempfile.mkdtemp(prefix='zeoraid-tls-')
        cls.tls = os.path.join(cls.tmp, 'tls')
        os.makedirs(cls.tls)
        cls.certs = make_certificates(cls.tls)
        cls.backends = [
            BackendServer(os.path.join(cls.tmp, name),
                          zeo_options=server_ssl_section(cls.certs, name))
            for name in ('zeo1', 'zeo2')]
        try:
            for backend in cls.backends:
                backend.launch()
            for backend in cls.backends:
                backend.wait_started()
        except BaseException:
            stop_all(cls.backends)
            raise

    @classmethod
    def tearDown(cls):
        stop_all(cls.backends)
        shutil.rmtree(cls.tmp, ignore_errors=True)


class TLSTests(unittest.TestCase):

    layer = TLSLayer

    @property
    def tmp(self):
        return TLSLayer.tmp

    @property
    def tls(self):
        return TLSLayer.tls

    @property
    def certs(self):
        return TLSLayer.certs

    @property
    def backends(self):
        return TLSLayer.backends

    def setUp(self):
        self.closers = []
        self.server = None

    def tearDown(self):
        for close in reversed(self.closers):
            try:
                close()
            except Exception:
                pass
        if self.server is not None:
            self.server.kill()

    def production_config(self, directory, **override):
        values = dict(
            TLS=self.tls, VAR=directory, LOG=directory,
            ADDRESS='127.0.0.1:0', METRICS='127.0.0.1:0',
            BACKEND1='%s:%d' % self.backends[0].addr,
            BACKEND2='%s:%d' % self.backends[1].addr)
        values.update(override)
        return etc_config('production-tls.conf', values)

    def start_server(self):
        directory = os.path.join(self.tmp, 'raid')
        os.makedirs(directory, exist_ok=True)
        server = RaidServer(directory, [],
                            eventlog=os.path.join(directory, 'zeoraid.log'))
        self.server = server
        server.write_config(text=self.production_config(directory))
        server.start()
        return server

    def test_tls_both_sides(self):
        """Commit and read through TLS client -> zeoraid -> TLS backends;
        a plain client and a client without certificate are refused; the
        sample client configurations work as written."""
        certs = self.certs
        server = self.start_server()
        status = wait_until(
            lambda: server.admin('status')['result']['status'] == 'optimal'
            and server.admin('status')['result'], 30, 'an optimal RAID')
        self.assertEqual(status['backends'],
                         {'zeo1': 'optimal', 'zeo2': 'optimal'})

        # the application client, over TLS with its certificate
        storage = ZEO.ClientStorage.ClientStorage(
            server.addr, ssl=client_context(certs), wait_timeout=30)
        db = ZODB.DB(storage)
        self.closers.append(db.close)
        with db.transaction() as conn:
            conn.root()['tls'] = 'through TLS'

        # the sample client configuration, a second client, reads it
        client_conf = etc_config('client-tls.conf', {
            'TLS': self.tls, 'ZEORAID': '%s:%d' % server.addr})
        db2 = ZODB.config.databaseFromString(client_conf)
        self.closers.append(db2.close)
        with db2.transaction() as conn:
            self.assertEqual(conn.root()['tls'], 'through TLS')
            conn.root()['second'] = 2

        # both backends have every commit
        details = server.admin('details')['result']
        self.assertEqual(details['status'], 'optimal')
        tids = {b: info['last_tid']
                for b, info in details['backends'].items()}
        self.assertEqual(set(tids.values()), {details['last_tid']}, tids)

        # a plain client is refused, so is a TLS client without a
        # certificate
        with self.assertRaises(ZEO.Exceptions.ClientDisconnected):
            ZEO.ClientStorage.ClientStorage(server.addr, wait_timeout=2)
        with self.assertRaises(ZEO.Exceptions.ClientDisconnected):
            ZEO.ClientStorage.ClientStorage(
                server.addr, ssl=client_context(certs, None),
                wait_timeout=2)
        # the server survived the refused handshakes
        with db2.transaction() as conn:
            self.assertEqual(conn.root()['second'], 2)

        # the backends refuse a plain connection too
        with self.assertRaises(ZEO.Exceptions.ClientDisconnected):
            ZEO.ClientStorage.ClientStorage(self.backends[0].addr,
                                            wait_timeout=2)

        db.close()
        db2.close()
        self.assertEqual(server.stop(), 0)
        self.server = None

        # With the server stopped (one writer at a time), the embedded
        # RAID of etc/client-embedded.conf reads and writes the backends.
        embedded = etc_config('client-embedded.conf', {
            'TLS': self.tls,
            'BACKEND1': '%s:%d' % self.backends[0].addr,
            'BACKEND2': '%s:%d' % self.backends[1].addr})
        db3 = ZODB.config.databaseFromString(embedded)
        self.closers.append(db3.close)
        self.assertEqual(db3.storage.raid_status(), 'optimal')
        with db3.transaction() as conn:
            self.assertEqual(conn.root()['tls'], 'through TLS')
            conn.root()['embedded'] = True
        self.assertEqual(db3.storage.raid_status(), 'optimal')
        db3.close()

    def test_backend_sample_config_loads(self):
        """etc/zeo-backend-tls.conf is a valid runzeo configuration whose
        TLS context loads (what runzeo does first)."""
        conf = os.path.join(self.tmp, 'zeo-backend.conf')
        cert, key = self.certs['zeo1']
        text = etc_config('zeo-backend-tls.conf', {
            'TLS': self.tls, 'VAR': self.tmp, 'ADDRESS': '127.0.0.1:0'})
        with open(os.path.join(self.tls, 'zeo1.pem')) as f:
            self.assertTrue(f.read().startswith('-----BEGIN CERTIFICATE'))
        with open(conf, 'w') as f:
            f.write(text)
        options = ZEO.runzeo.ZEOOptions()
        options.realize(['-C', conf])
        self.assertIsInstance(options.ssl, ssl.SSLContext)
        self.assertEqual(options.ssl.verify_mode, ssl.CERT_REQUIRED)
        self.assertTrue(os.path.exists(cert) and os.path.exists(key))

    def run_zeoraid(self, text):
        directory = tempfile.mkdtemp(dir=self.tmp)
        conf = os.path.join(directory, 'zeoraid.conf')
        with open(conf, 'w') as f:
            f.write(text)
        return subprocess.run(
            [sys.executable, '-m', 'zeoraid.server', '-C', conf],
            stdin=subprocess.DEVNULL, capture_output=True, text=True,
            timeout=60, cwd=directory)

    def assertStartupError(self, text, expected):
        proc = self.run_zeoraid(text)
        self.assertEqual(proc.returncode, 2, proc.stderr)
        first = proc.stderr.splitlines()[0]
        self.assertTrue(first.startswith('Error: '), proc.stderr)
        self.assertIn(expected, first)
        self.assertNotIn('Traceback', proc.stderr)
        return first

    def test_missing_or_invalid_certificates(self):
        """Unusable TLS files stop zeoraid at startup with one line."""
        directory = os.path.join(self.tmp, 'bad')
        os.makedirs(directory, exist_ok=True)
        good = self.production_config(directory)
        missing = os.path.join(self.tls, 'nonexistent.pem')
        garbage = os.path.join(directory, 'garbage.pem')
        with open(garbage, 'w') as f:
            f.write('not a certificate\n')
        server_cert = os.path.join(self.tls, 'zeoraid-server.pem')
        client_cert = os.path.join(self.tls, 'zeoraid-client.pem')
        ca = os.path.join(self.tls, 'ca.pem')

        # server side (<zeo><ssl>, ZEO's own section)
        self.assertStartupError(
            good.replace(server_cert, missing, 1),
            '<zeo> <ssl>: certificate file %s does not exist' % missing)
        self.assertStartupError(
            good.replace(server_cert, garbage, 1),
            'certificate %s with key' % garbage)
        text = good.replace('    authenticate %s\n' % ca,
                            '    authenticate %s\n' % garbage, 1)
        self.assertStartupError(text, 'authenticate file %s' % garbage)

        # backend side (<client-ssl>)
        self.assertStartupError(
            good.replace(client_cert, missing, 1),
            '<client-ssl>: certificate file %s does not exist' % missing)
        line = self.assertStartupError(
            good.replace(client_cert, garbage),
            '<client-ssl>: certificate %s' % garbage)
        self.assertIn('cannot be loaded', line)
        # a key that does not belong to the certificate
        self.assertStartupError(
            good.replace(os.path.join(self.tls, 'zeoraid-client.key'),
                         os.path.join(self.tls, 'zeo1.key')),
            'cannot be loaded')

    def test_zeoraid_without_client_certificate_refused(self):
        """A backend requiring client certificates refuses a zeoraid that
        presents none: the RAID cannot use it (here: it does not start, as
        both backends refuse), and its log says why."""
        directory = os.path.join(self.tmp, 'nocert')
        os.makedirs(directory, exist_ok=True)
        text = self.production_config(directory, METRICS='127.0.0.1:0')
        for line in ('      certificate %s\n' % os.path.join(
                         self.tls, 'zeoraid-client.pem'),
                     '      key %s\n' % os.path.join(
                         self.tls, 'zeoraid-client.key')):
            self.assertIn(line, text)
            text = text.replace(line, '')
        text = text.replace('wait-timeout 5', 'wait-timeout 2')
        text = text.replace('timeout 10s', 'timeout 3s', 1)
        proc = self.run_zeoraid(text)
        self.assertNotEqual(proc.returncode, 0)
        with open(os.path.join(directory, 'zeoraid.log')) as f:
            log = f.read()
        for backend in ('zeo1', 'zeo2'):
            # the parseable state-change line (doc/MONITORING.md)
            self.assertRegex(log, r'raid=1 backend=%s state=degraded'
                             r' previous=degraded( last_tid=\S+)? reason=open'
                             r' failed: ClientDisconnected' % backend)
        self.assertIn('no working backend', proc.stderr + log)

    # -- the TCP admin endpoint with <admin-ssl>: TLS, client certificates
    #    signed by the configured CA, and the token

    def admin_config(self, directory, port, token_file, ssl=True,
                     allowed=()):
        cert, key = self.certs['zeoraid-server']
        section = ('<zeoraid>\n  admin-socket %s\n'
                   '  admin-address 127.0.0.1:%d\n  admin-token-file %s\n'
                   % (os.path.join(directory, 'zeoraid.admin.sock'), port,
                      token_file))
        if ssl:
            section += ('  <admin-ssl>\n    certificate %s\n    key %s\n'
                        '    authenticate %s\n%s  </admin-ssl>\n'
                        % (cert, key, self.certs['ca'], ''.join(
                            '    allowed-client %s\n' % name
                            for name in allowed)))
        section += '</zeoraid>'
        return re.sub(r'<zeoraid>.*?</zeoraid>', lambda m: section,
                      self.production_config(directory), flags=re.S)

    def token(self, directory):
        token_file = os.path.join(directory, 'admin.token')
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, b'0123456789abcdef-admin-tls\n')
        os.close(fd)
        return token_file

    def start_admin_tls_server(self, name, allowed=()):
        """A zeoraid server with a TLS admin endpoint on a free port;
        returns (server, directory, port, token file)."""
        directory = os.path.join(self.tmp, name)
        os.makedirs(directory, exist_ok=True)
        token_file = self.token(directory)
        with socket.socket() as s:
            s.bind(('127.0.0.1', 0))
            port = s.getsockname()[1]
        server = RaidServer(directory, [],
                            eventlog=os.path.join(directory, 'zeoraid.log'))
        self.server = server
        server.write_config(text=self.admin_config(
            directory, port, token_file, allowed=allowed))
        server.start()
        return server, directory, port, token_file

    def test_admin_over_tls_with_client_certificates(self):
        server, directory, port, token_file = self.start_admin_tls_server(
            'admin-tls')
        wait_until(lambda: server.admin('status')['result']['status']
                   == 'optimal', 30, 'an optimal RAID')
        tcp = ['--admin', '127.0.0.1:%d' % port, '--token-file', token_file]
        cert, key = self.certs['app-client']
        r = server.manager(*tcp, '--tls-ca', self.certs['ca'],
                           '--tls-cert', cert, '--tls-key', key, 'status')
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn('OPTIMAL', r.stdout)
        # No client certificate, or no TLS at all: refused, one line.
        for extra in (['--tls-ca', self.certs['ca']], []):
            r = server.manager(*tcp, *extra, 'status')
            self.assertEqual(r.returncode, 3, r.stdout + r.stderr)
            self.assertEqual(len(r.stdout.strip().splitlines()), 1,
                             r.stdout)
            self.assertIn('RAID UNKNOWN', r.stdout)
        wait_until(lambda: 'admin TLS connection from 127.0.0.1 refused'
                   in server.log(), 10, 'the refusal in the log')
        # A server certificate the client does not trust: refused too.
        r = server.manager(*tcp, '--tls-ca', cert, '--tls-cert', cert,
                           '--tls-key', key, 'details')
        self.assertEqual(r.returncode, 3, r.stdout + r.stderr)
        self.assertEqual(len(r.stderr.strip().splitlines()), 1, r.stderr)
        self.assertIn('CERTIFICATE_VERIFY_FAILED', r.stderr)
        # Bad TLS options: one line, exit 3.
        r = server.manager(*tcp, '--tls-key', key, 'details')
        self.assertEqual(r.returncode, 3)
        self.assertIn('--tls-key needs --tls-cert', r.stderr)
        r = server.manager(*tcp, '--tls-ca', os.path.join(directory, 'no'),
                           'details')
        self.assertEqual(r.returncode, 3)
        self.assertIn('cannot load the TLS files', r.stderr)
        self.assertEqual(len(r.stderr.strip().splitlines()), 1, r.stderr)
        # The server went on serving.
        self.assertEqual(server.admin('status')['result']['status'],
                         'optimal')

    def test_admin_tls_allowed_client_names(self):
        server, directory, port, token_file = self.start_admin_tls_server(
            'admin-tls-names', allowed=['zeoraid-client', 'ops@example.org'])
        tcp = ['--admin', '127.0.0.1:%d' % port, '--token-file', token_file,
               '--tls-ca', self.certs['ca']]

        def manager(name):
            cert, key = self.certs[name]
            return server.manager(*tcp, '--tls-cert', cert, '--tls-key',
                                  key, 'status')
        r = manager('zeoraid-client')
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        # Signed by the same CA, but not a name on the list.
        r = manager('app-client')
        self.assertEqual(r.returncode, 3, r.stdout + r.stderr)
        self.assertEqual(len(r.stdout.strip().splitlines()), 1, r.stdout)
        self.assertIn('permission denied: client certificate', r.stdout)
        self.assertIn('app-client', r.stdout)
        wait_until(lambda: 'is not an allowed-client' in server.log(), 10,
                   'the refusal in the log')
        self.assertEqual(server.admin('status')['result']['status'],
                         'optimal')
        # An empty name is a configuration error, one line.
        other = os.path.join(self.tmp, 'admin-tls-names-bad')
        os.makedirs(other, exist_ok=True)
        self.assertStartupError(
            self.admin_config(other, 1, token_file, allowed=['']),
            'allowed-client needs a name')

    def test_admin_ssl_needs_an_admin_address_and_a_ca(self):
        directory = os.path.join(self.tmp, 'admin-tls-bad')
        os.makedirs(directory, exist_ok=True)
        token_file = self.token(directory)
        text = self.admin_config(directory, 1, token_file)
        self.assertStartupError(
            text.replace('  admin-address 127.0.0.1:1\n', '').replace(
                '  admin-token-file %s\n' % token_file, ''),
            '<admin-ssl> needs an admin TCP address')
        self.assertStartupError(
            text.replace('    authenticate %s\n' % self.certs['ca'], ''),
            'authenticate')
