"""Loads answered off the zeoraid server's event loop (zeoraid.served).

A real zeoraid server process over two runzeo backends, real ZEO clients.
Checked: cold loads come back right and are spread over the backends; a
client that loads while another commits never keeps a stale revision as
current (the reply's end tid is fixed in the event loop); the end-tid
rule itself on ZEO's invalidation queue.
"""
import os
import signal
import threading
import time
import unittest

import transaction
import ZODB
from persistent.mapping import PersistentMapping
from ZODB.utils import p64

from tests.test_server import ServerTestBase

from zeoraid import served


class EndTidTests(unittest.TestCase):
    """served.end_tid on hand-made invalidation queues (newest first)."""

    def test_no_commit_since_the_load(self):
        invq = [(p64(5), [b'x']), (p64(4), None)]
        self.assertIsNone(served.end_tid(invq, p64(5), b'x'))

    def test_first_commit_that_changed_the_object(self):
        invq = [(p64(9), [b'x']), (p64(8), [b'y']), (p64(7), [b'x']),
                (p64(6), [b'z']), (p64(5), None)]
        self.assertEqual(served.end_tid(invq, p64(5), b'x'), p64(7))
        self.assertEqual(served.end_tid(invq, p64(5), b'y'), p64(8))
        self.assertIsNone(served.end_tid(invq, p64(5), b'q'))
        # Commits before the load was asked for do not count.
        self.assertEqual(served.end_tid(invq, p64(7), b'x'), p64(9))

    def test_queue_no_longer_reaches_back(self):
        invq = [(p64(9), [b'x']), (p64(8), [b'y'])]
        self.assertIs(served.end_tid(invq, p64(5), b'y'), served.UNKNOWN)


class ServedLoadTests(ServerTestBase):

    def fill(self, count):
        db = self.db()
        conn = db.open()
        root = conn.root()
        for i in range(count):
            root['o%d' % i] = PersistentMapping(n=i)
        transaction.commit()
        oids = [root['o%d' % i]._p_oid for i in range(count)]
        conn.close()
        return oids

    def restart_server(self):
        """Empty the zeoraid server's backend caches."""
        self.server.stop()
        self.server.start()

    def backend_loads(self):
        counts = []
        for backend in self.backends[:2]:
            client = backend.client()
            try:
                counts.append(client.server_status()['loads'])
            finally:
                client.close()
        return counts

    def test_a_slow_load_does_not_hold_up_other_clients(self):
        # ZEO runs a served storage's loads in its one event-loop thread;
        # a load that waits for a backend must not make everybody wait.
        oids = self.fill(5)
        self.restart_server()
        other = self.server.client_storage()
        self.closers.append(other.close)
        loader = self.server.client_storage()
        self.closers.append(loader.close)
        frozen = [b.process.pid for b in self.backends[:2]]
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        self.closers.append(lambda: [os.kill(pid, signal.SIGCONT)
                                     for pid in frozen])
        outcome = []
        thread = threading.Thread(
            target=lambda: outcome.append(_try(loader.load, oids[3])))
        thread.start()
        time.sleep(0.5)          # the load is now waiting for a backend
        started = time.monotonic()
        other._call('lastTransaction')
        elapsed = time.monotonic() - started
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
        thread.join(30)
        # The server's timeout is 5 s: a loop blocked by the load would
        # have answered after several seconds.
        self.assertLess(elapsed, 2.0)
        self.assertEqual(len(outcome), 1)

    def test_cold_loads_are_right_and_spread(self):
        oids = self.fill(200)
        self.restart_server()
        before = self.backend_loads()
        errors = []

        def read(part):
            storage = self.server.client_storage()
            try:
                for i, oid in part:
                    data, _ = storage.load(oid)
                    if b'n' not in data:
                        errors.append(i)
            except Exception as exc:
                errors.append(exc)
            finally:
                storage.close()
        items = list(enumerate(oids))
        threads = [threading.Thread(target=read, args=(items[k::4],))
                   for k in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        self.assertEqual(errors, [])
        after = self.backend_loads()
        served_by = [a - b for a, b in zip(after, before)]
        # Both backends answered some of the 200 cold loads.
        self.assertGreater(min(served_by), 0, served_by)
        # And every value is right through ZODB too.
        db = self.db()
        conn = db.open()
        for i in range(200):
            self.assertEqual(conn.root()['o%d' % i]['n'], i)
        conn.close()

    def test_no_stale_current_revision_while_others_commit(self):
        self.fill(1)
        writer_db = self.db()
        reader_db = self.db()
        stop = threading.Event()
        written = []

        def write():
            conn = writer_db.open()
            try:
                for n in range(1, 151):
                    if stop.is_set():
                        break
                    conn.root()['o0']['n'] = n
                    transaction.commit()
                    written.append(n)
            finally:
                conn.close()
        writer = threading.Thread(target=write)
        writer.start()
        reader_errors = []
        deadline = time.monotonic() + 60
        try:
            tm = transaction.TransactionManager()
            conn = reader_db.open(tm)
            last = -1
            while writer.is_alive() and time.monotonic() < deadline:
                tm.begin()
                # Drop the object so every round loads it from the server
                # (or from the ZEO client cache, which must stay right).
                conn.cacheMinimize()
                value = conn.root()['o0']['n']
                if value < last:
                    reader_errors.append((last, value))
                last = value
        finally:
            stop.set()
            writer.join(60)
        self.assertEqual(reader_errors, [])
        self.assertTrue(written)
        # After the last commit, the reader sees it (no stale "current"
        # revision in its ZEO cache).
        tm.begin()
        conn.cacheMinimize()
        self.assertEqual(conn.root()['o0']['n'], written[-1])
        conn.close()


def _try(fn, *args):
    try:
        return fn(*args)
    except Exception as exc:
        return exc


def test_suite():
    loader = unittest.defaultTestLoader
    return unittest.TestSuite([
        loader.loadTestsFromTestCase(EndTidTests),
        loader.loadTestsFromTestCase(ServedLoadTests),
    ])
