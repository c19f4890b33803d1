"""The RAID's commit lock is granted in request order (no starvation)."""
import threading
import time
import unittest

from zeoraid.backend import FairLock


class FairLockTests(unittest.TestCase):

    def test_waiters_are_served_in_order_and_timeouts_skip_their_turn(self):
        lock = FairLock()
        lock.acquire()
        order = []

        def waiter(name, timeout=-1):
            ok = lock.acquire(timeout=timeout)
            order.append((name, ok))
            if ok:
                lock.release()
        threads = []
        for name in ('a', 'b', 'c'):
            threads.append(threading.Thread(target=waiter, args=(name,)))
            threads[-1].start()
            time.sleep(0.02)
        impatient = threading.Thread(target=waiter, args=('x', 0.05))
        impatient.start()
        impatient.join(5)
        late = threading.Thread(target=waiter, args=('d',))
        late.start()
        time.sleep(0.02)
        lock.release()
        for t in threads + [late]:
            t.join(5)
        self.assertEqual(order, [('x', False), ('a', True), ('b', True),
                                 ('c', True), ('d', True)])
        self.assertFalse(lock.locked())

    def test_a_thread_that_takes_it_back_to_back_does_not_starve_others(self):
        # The ZEO server thread commits back to back; a recovery waiting
        # for the lock must get it at the next release.
        lock = FairLock()
        stop = threading.Event()
        got = threading.Event()

        def committer():
            deadline = time.monotonic() + 5
            while not stop.is_set() and time.monotonic() < deadline:
                with lock:
                    time.sleep(0.001)
        t = threading.Thread(target=committer)
        t.start()
        time.sleep(0.05)
        if lock.acquire(timeout=1):
            got.set()
            lock.release()
        stop.set()
        t.join(10)
        self.assertTrue(got.is_set())

    def test_release_unheld_is_an_error(self):
        self.assertRaises(RuntimeError, FairLock().release)
