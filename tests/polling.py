"""Waiting for a condition in tests: bounded polling, no bare sleeps."""
import time


def poll(condition, timeout, interval=0.02):
    """Poll condition() until true or timeout; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(interval)


def wait_until(predicate, timeout, what, interval=0.05):
    """Poll predicate until true; AssertionError naming `what` if not."""
    value = poll(predicate, timeout, interval)
    if not value:
        raise AssertionError('timed out after %gs waiting for %s'
                             % (timeout, what))
    return value
