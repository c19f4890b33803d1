"""Wait for one call on many backends, and decide what the answers mean.

The RAID submits the same operation to every healthy backend, waits for
all of them against a single deadline, and then *votes*: backends that
agree with the majority stay healthy, the others are degraded. Backends
that did not answer, or lost their connection, never get a vote.
"""
import concurrent.futures
import time

import ZODB.POSException

from zeoraid.errors import BackendTimeout
from zeoraid.errors import BackendUnavailable

try:
    from ZEO.Exceptions import ClientDisconnected
except ImportError:  # pragma: no cover - ZEO is a dependency
    class ClientDisconnected(Exception):
        pass

#: Failures that say something about the backend, never about the data.
CONNECTIVITY_ERRORS = (BackendTimeout, BackendUnavailable,
                       ClientDisconnected, ConnectionError, EOFError)

#: Answers a single healthy backend may legitimately give for a read.
READ_ANSWERS = (KeyError, ZODB.POSException.POSKeyError,
                ZODB.POSException.ConflictError,
                ZODB.POSException.UndoError,
                ZODB.POSException.Unsupported,
                ZODB.POSException.StorageTransactionError,
                ZODB.POSException.ReadOnlyError)


class Outcome:
    """What one backend answered: a value or an exception."""

    __slots__ = ('backend', 'value', 'error')

    def __init__(self, backend, value=None, error=None):
        self.backend = backend
        self.value = value
        self.error = error

    @property
    def ok(self):
        return self.error is None

    @property
    def key(self):
        """What must be equal for two backends to agree."""
        return 'ok' if self.error is None else type(self.error)

    def __repr__(self):
        return '<Outcome %s %r>' % (
            self.backend.name, self.value if self.ok else self.error)


def gather(futures, timeout):
    """Wait for {backend: future} up to timeout; return a list of Outcomes.

    The futures are concurrent.futures.Future (a backend's worker threads)
    or ZEO's own thread-safe futures (a DirectClient's requests: they only
    support result(timeout)); all share one deadline. Futures still
    running at the deadline become BackendTimeout outcomes; the call keeps
    running in the backend's own thread.
    """
    deadline = time.monotonic() + timeout
    workers = []
    for future in futures.values():
        if isinstance(future, concurrent.futures.Future):
            workers.append(future)
        else:
            _wait_zeo(future, deadline)
    if workers:
        concurrent.futures.wait(
            workers, timeout=max(0.0, deadline - time.monotonic()))
    return [_outcome(backend, future, timeout)
            for backend, future in futures.items()]


def _wait_zeo(future, deadline):
    try:
        future.result(max(0.0, deadline - time.monotonic()))
    except BaseException:
        pass    # looked at again in _outcome


def _outcome(backend, future, timeout):
    if not future.done():
        return Outcome(backend, error=BackendTimeout(
            'backend %s: no answer within %gs' % (backend.name, timeout)))
    try:
        return Outcome(backend, value=future.result(0))
    except Exception as exc:
        return Outcome(backend, error=exc)


class Verdict:
    """The result of a vote among backend outcomes.

    winners: outcomes that agree with the decision (stay healthy).
    losers: outcomes to degrade, each with its reason.
    error: an exception every voting backend agreed on (the application's
           problem, e.g. a ConflictError): re-raise it, degrade nobody.
    """

    def __init__(self, winners, losers, error=None):
        self.winners = winners
        self.losers = losers
        self.error = error

    @property
    def value(self):
        """The agreed value (from the first winner)."""
        return self.winners[0].value if self.winners else None


def describe(error):
    """A one-line reason: the exception class and what it says."""
    text = str(error)
    name = type(error).__name__
    if not text and isinstance(error, CONNECTIVITY_ERRORS):
        text = 'connection lost or backend not reachable'
    return '%s: %s' % (name, text) if text else name


def vote(outcomes, preferred):
    """Decide which outcomes are right.

    `preferred` is the list of backends in order of trust; it breaks ties.
    Connectivity failures always lose. Among the rest, the most common
    answer (ok, or an exception class) wins. If that answer is an
    exception, it is the application's error: re-raised by the caller,
    and the backends that said "ok" are the divergent minority.
    """
    if outcomes and all(outcome.error is None for outcome in outcomes):
        return Verdict(list(outcomes), [])     # the usual case: all ok
    losers = []
    votes = {}
    for outcome in outcomes:
        if outcome.error is not None and isinstance(
                outcome.error, CONNECTIVITY_ERRORS):
            losers.append((outcome, describe(outcome.error)))
        else:
            votes.setdefault(outcome.key, []).append(outcome)
    if not votes:
        return Verdict([], losers)
    rank = {backend: i for i, backend in enumerate(preferred)}

    def strength(key):
        # More backends win; on a tie, an answer the data can explain (ok,
        # or an application error such as a conflict) beats an unexplained
        # exception (a failing disk); then the more trusted backend wins.
        group = votes[key]
        explained = key == 'ok' or issubclass(key, READ_ANSWERS)
        return (len(group), explained,
                -min(rank.get(o.backend, len(rank)) for o in group))
    winning_key = max(votes, key=strength)
    winners = votes.pop(winning_key)
    for key, group in votes.items():
        for outcome in group:
            if outcome.ok:
                reason = ('divergent: answered ok where the other backends '
                          'raised %s' % describe(winners[0].error))
            else:
                reason = 'divergent: %s' % describe(outcome.error)
            losers.append((outcome, reason))
    error = None if winning_key == 'ok' else winners[0].error
    return Verdict(winners, losers, error)
