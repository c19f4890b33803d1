"""Chaos tests: real faults under load against real processes.

Every scenario starts runzeo backend processes, a FaultProxy in front of
each, and a zeoraid server process over the proxies (tests.chaos), puts
three committing client threads on it, injects one fault into one
backend, lets the clients go on, heals, and then checks the invariants
(tests.chaos.Cluster.check): no non-retryable client error, no commit
slower than the deadline, every commit a client saw on every optimal
backend, optimal backends identical, and after recovery all backends
identical.

The two-phase-commit phases are hit deterministically: the proxy reads
the ZEO frames the RAID sends and fires the fault at the ``vote`` or
``tpc_finish`` message (before it reaches the backend, or right after,
with the backend's answer held back).
"""
import pickle
import socket
import struct
import threading
import time
import unittest

from tests.chaos import Cluster
from tests.chaos import wait_until
from tests.tcpproxy import FaultProxy
from tests.tcpproxy import message_name

#: The RAID's per-backend-call deadline in these tests (seconds).
TIMEOUT = 1.0
#: Commits before a fault, and commits required after it.
BEFORE = 10
AFTER = 15
#: Longest wait for the clients to make that progress.
PROGRESS_TIMEOUT = 30.0

#: (phase, ZEO message, when) for the four moments of two-phase commit.
PHASES = (
    ('before vote', 'vote', 'before'),
    ('during vote', 'vote', 'after'),
    ('between vote and finish', 'tpc_finish', 'before'),
    ('during finish', 'tpc_finish', 'after'),
)


class ChaosTestBase(unittest.TestCase):

    backend_count = 3
    blobs = False
    faulty = ()

    def setUp(self):
        self.cluster = Cluster(self.backend_count, timeout=TIMEOUT,
                               blobs=self.blobs, faulty=self.faulty).start()
        self.loads = []

    def tearDown(self):
        for load in self.loads:
            try:
                load.stop(timeout=5)
            except Exception:
                pass
        self.cluster.close()

    def start_load(self, **kw):
        load = self.cluster.load(**kw).start()
        self.loads.append(load)
        return load

    def progress(self, load, count, what):
        if not load.wait_commits(count, PROGRESS_TIMEOUT):
            raise AssertionError(
                'clients stuck %s: %d commits, wanted %d; errors %s; '
                'states %s' % (what, load.count, count, load.errors[:3],
                               self.cluster.states()))

    def scenario(self, inject, expect_degraded=(), heal=None,
                 latency_limit=None, after=AFTER):
        """Load, fault, more load, heal, check (with recovery)."""
        load = self.start_load()
        self.progress(load, BEFORE, 'before the fault')
        inject()
        self.progress(load, load.count + after, 'after the fault')
        load.stop()
        (heal or self.cluster.heal_all)()
        return self.cluster.check(load, expect_degraded=expect_degraded,
                                  latency_limit=latency_limit)

    def phase_scenarios(self, make_action):
        """Run the fault at each 2PC phase, each on another backend."""
        names = [b.name for b in self.cluster.backends]
        for i, (phase, message, when) in enumerate(PHASES):
            backend = self.cluster.backend(names[i % len(names)])
            with self.subTest(phase=phase, backend=backend.name):
                load = self.start_load()
                try:
                    self.progress(load, BEFORE, 'before %s' % phase)
                    trigger = backend.proxy.arm(
                        message, make_action(backend), when=when)
                    self.assertTrue(trigger.fired.wait(PROGRESS_TIMEOUT),
                                    'the %s trigger never fired' % phase)
                    self.assertIsNone(trigger.error)
                    self.progress(load, load.count + AFTER,
                                  'after %s' % phase)
                    load.stop()
                    self.cluster.heal_all()
                    self.cluster.check(load, expect_degraded=[backend.name])
                except BaseException:
                    # Let the next phase start from identical backends.
                    load.stop(timeout=5)
                    self.cluster.rebuild()
                    raise


class BackendProcessFaults(ChaosTestBase):
    """kill -9 and SIGSTOP of a backend server under load."""

    def test_kill_backend(self):
        b2 = self.cluster.backend('b2')
        self.scenario(b2.kill, expect_degraded=['b2'])

    def test_sigstop_backend(self):
        b3 = self.cluster.backend('b3')
        self.scenario(b3.sigstop, expect_degraded=['b3'])


class NetworkFaults(ChaosTestBase):
    """Stall, reset, drop and delay through the proxy, under load."""

    def test_stall(self):
        b1 = self.cluster.backend('b1')
        self.scenario(b1.proxy.stall, expect_degraded=['b1'])

    def test_reset_drop_and_delay(self):
        b2 = self.cluster.backend('b2')

        def resets():
            for _ in range(3):
                b2.proxy.reset()
                time.sleep(0.3)
        # A reset between two transactions may go unnoticed (the backend
        # reconnects before its next call): no expectation on the state.
        self.scenario(resets)
        self.scenario(b2.proxy.drop, expect_degraded=['b2'])
        # Slower than usual but well within the deadline: nothing to
        # expect, but every invariant holds.  (Each commit waits for two
        # round trips to b2, so few commits.)
        self.scenario(lambda: b2.proxy.delay(TIMEOUT / 10), after=6)


class TwoPhaseCommitFaults(ChaosTestBase):
    """A fault at each phase: before/during vote, between vote and
    finish, during finish."""

    def test_stall_at_each_phase(self):
        self.phase_scenarios(lambda backend: 'stall')

    def test_reset_at_each_phase(self):
        self.phase_scenarios(lambda backend: 'reset')

    def test_kill_at_each_phase(self):
        self.phase_scenarios(lambda backend: backend.kill)

    def test_sigstop_at_each_phase(self):
        self.phase_scenarios(lambda backend: backend.sigstop)


class RaidServerRestart(ChaosTestBase):
    """The zeoraid process itself goes away while clients commit."""

    def restart(self, kill):
        raid = self.cluster.raid
        started = time.monotonic()
        if kill:
            raid.kill()
        else:
            raid.stop()
        raid.start()
        self.restart_time = time.monotonic() - started

    def test_restart_while_clients_commit(self):
        for kill in (False, True):
            with self.subTest(kill=kill):
                load = self.start_load()
                self.progress(load, BEFORE, 'before the restart')
                self.restart(kill)
                self.progress(load, load.count + AFTER, 'after the restart')
                load.stop()
                # Clients wait for the server while it restarts.
                limit = self.restart_time + self.cluster.client_deadline
                self.cluster.check(load, latency_limit=limit)
                self.assertEqual(self.cluster.raid.starts, 2 + kill)


class FailingStorage(ChaosTestBase):
    """Backend b3's storage raises (in-process FaultyStorage served by a
    ZEO server thread); backend b2 runs out of disk space."""

    faulty = ('b3',)

    def test_storage_raises(self):
        b3 = self.cluster.backend('b3')
        for method in ('tpc_vote', 'store'):
            with self.subTest(method=method):
                self.scenario(lambda: b3.faulty.fail(method),
                              expect_degraded=['b3'])
        with self.subTest(method='tpc_vote hangs'):
            self.scenario(lambda: b3.faulty.hang('tpc_vote'),
                          expect_degraded=['b3'])

    def test_disk_full(self):
        b2 = self.cluster.backend('b2')

        def heal():
            # The operator frees space and restarts the backend: a
            # FileStorage whose write failed half-way has closed its file
            # ("seek of closed file") and serves nothing until restarted.
            self.cluster.heal_all()
            b2.server.stop()
            b2.server.restart()
        self.scenario(b2.limit_file_size, expect_degraded=['b2'], heal=heal)


class BlobFaults(ChaosTestBase):
    """Blobs under load, a backend killed, then recovered."""

    blobs = True

    def test_kill_backend_with_blobs(self):
        b1 = self.cluster.backend('b1')
        self.scenario(b1.kill, expect_degraded=['b1'])


class FaultProxyTests(unittest.TestCase):
    """The proxy itself, against a plain echo server."""

    def setUp(self):
        self.listener = socket.socket()
        self.listener.bind(('127.0.0.1', 0))
        self.listener.listen(16)
        self.received = []
        self.server_conns = []
        self.server_thread = threading.Thread(target=self._serve,
                                              daemon=True)
        self.server_thread.start()
        self.proxy = FaultProxy(self.listener.getsockname())

    def tearDown(self):
        self.proxy.close()
        self.listener.shutdown(socket.SHUT_RDWR)   # wakes accept()
        self.listener.close()
        self.server_thread.join(5)
        for conn in self.server_conns:
            conn.close()

    def _serve(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.server_conns.append(conn)
            threading.Thread(target=self._echo, args=(conn,),
                             daemon=True).start()

    def _echo(self, conn):
        while True:
            try:
                data = conn.recv(65536)
            except OSError:
                return
            if not data:
                conn.close()
                return
            self.received.append(data)
            try:
                conn.sendall(data)
            except OSError:
                return

    def connect(self):
        sock = socket.create_connection(self.proxy.address, timeout=5)
        self.addCleanup(sock.close)
        return sock

    def roundtrip(self, sock, data, timeout=5):
        sock.settimeout(timeout)
        sock.sendall(data)
        got = b''
        while len(got) < len(data):
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError('closed')
            got += chunk
        return got

    def test_pass_and_delay(self):
        sock = self.connect()
        self.assertEqual(self.roundtrip(sock, b'hello'), b'hello')
        self.proxy.delay(0.2)
        started = time.monotonic()
        self.assertEqual(self.roundtrip(sock, b'slow'), b'slow')
        self.assertGreaterEqual(time.monotonic() - started, 0.4)
        self.proxy.heal()
        started = time.monotonic()
        self.roundtrip(sock, b'fast')
        self.assertLess(time.monotonic() - started, 0.2)

    def test_stall_holds_until_heal(self):
        sock = self.connect()
        self.roundtrip(sock, b'a')
        self.proxy.stall()
        sock.sendall(b'held')
        sock.settimeout(0.5)
        self.assertRaises(socket.timeout, sock.recv, 10)
        # new connections are accepted but not answered either
        other = self.connect()
        other.sendall(b'new')
        other.settimeout(0.3)
        self.assertRaises(socket.timeout, other.recv, 10)
        self.proxy.heal()
        sock.settimeout(5)
        self.assertEqual(sock.recv(10), b'held')
        other.settimeout(5)
        self.assertEqual(other.recv(10), b'new')

    def test_reset_and_drop(self):
        sock = self.connect()
        self.roundtrip(sock, b'a')
        self.proxy.reset()
        with self.assertRaises((ConnectionError, OSError)):
            self.roundtrip(sock, b'b')
            self.roundtrip(sock, b'c')
        self.assertEqual(self.roundtrip(self.connect(), b'new'), b'new')
        self.proxy.drop()
        self.assertRaises(ConnectionRefusedError, socket.create_connection,
                          self.proxy.address, 2)
        self.proxy.heal()
        self.assertEqual(self.roundtrip(self.connect(), b'back'), b'back')

    def test_trigger_on_zeo_message(self):
        def frame(name):
            payload = pickle.dumps((7, False, name, (1,)), 3)
            return struct.pack('>I', len(payload)) + payload
        self.assertEqual(message_name(frame('vote')[4:]), 'vote')
        self.assertIsNone(message_name(b'Z5'))
        sock = self.connect()
        self.roundtrip(sock, frame('storea'))
        trigger = self.proxy.arm('vote', 'stall', when='before')
        sock.sendall(frame('vote'))
        self.assertTrue(trigger.fired.wait(5))
        time.sleep(0.2)
        self.assertFalse(any(b'vote' in d for d in self.received))
        self.proxy.heal()
        wait_until(lambda: any(b'vote' in d for d in self.received), 5,
                   'the held vote')
        # 'after': the message arrives, the answer is held back
        trigger = self.proxy.arm('tpc_finish', 'stall', when='after')
        sock.settimeout(5)
        sock.recv(65536)
        sock.sendall(frame('tpc_finish'))
        self.assertTrue(trigger.fired.wait(5))
        wait_until(lambda: any(b'tpc_finish' in d for d in self.received),
                   5, 'the forwarded tpc_finish')
        sock.settimeout(0.5)
        self.assertRaises(socket.timeout, sock.recv, 65536)
        self.proxy.heal()
        sock.settimeout(5)
        self.assertIn(b'tpc_finish', sock.recv(65536))
        self.assertEqual(self.proxy.messages['vote'], 1)


def test_suite():
    loader = unittest.defaultTestLoader
    suite = unittest.TestSuite()
    for case in (FaultProxyTests, BackendProcessFaults, NetworkFaults,
                 TwoPhaseCommitFaults, RaidServerRestart, FailingStorage,
                 BlobFaults):
        suite.addTest(loader.loadTestsFromTestCase(case))
    return suite
