"""A fault-injecting wrapper storage for RAID tests.

``FaultyStorage(base)`` forwards every attribute to ``base`` (a real,
in-process storage such as FileStorage) and mirrors its interfaces, so the
RAID sees exactly the base's API.  Tests then make single methods fail or
hang on demand, and read the log of calls the RAID made::

    fs = FaultyStorage(FileStorage('b1.fs'))
    fs.fail('tpc_vote', exc=ConflictError())   # every later call raises
    fs.fail_once('store')                       # only the next call raises
    fs.hang('loadBefore')                       # block until fs.release()
    fs.calls                                    # [Call('tpc_begin', ...), ...]
    fs.reset()                                  # forget faults, release hangs

``__getattr__`` forwarding is fine here (test code only); the RAID itself must
not rely on it.  Every hang must be released (``release()``/``reset()``) in
the test's tearDown, so no thread stays blocked.
"""

import threading
import time

from zope.interface import directlyProvides
from zope.interface import providedBy


class InjectedFault(Exception):
    """The default exception raised by an injected failure."""


class HangReleased(InjectedFault):
    """Raised by a hung call after ``release()`` unless it was told to
    proceed: the caller gave up on it long ago, and running the real
    method late (e.g. a ``tpc_begin`` grabbing the commit lock after the
    RAID already aborted) would leave the base storage in a stuck state.
    """


class Call:
    """One logged call: method name, arguments, thread and outcome."""

    def __init__(self, name, args, kwargs):
        self.name = name
        self.args = args
        self.kwargs = kwargs
        self.thread = threading.current_thread().name
        self.start = time.monotonic()
        self.end = None
        self.result = None
        self.exception = None
        self.injected = None    # 'fail' or 'hang' when a fault applied
        self.overdue = False    # a hang ran into FaultyStorage.max_hang

    @property
    def done(self):
        return self.end is not None

    def __repr__(self):
        return 'Call(%s%s)' % (
            self.name, ' [%s]' % self.injected if self.injected else '')


class _Fault:

    def __init__(self, kind, exc=None, times=None, proceed=False,
                 when=None):
        self.kind = kind        # 'fail' or 'hang'
        self.exc = exc
        self.times = times      # None: forever
        self.proceed = proceed
        self.when = when        # None, or predicate(storage) -> bool


class OneShot:
    """A ``when`` predicate shared by several storages: true only once.

    Install the same fault with ``when=OneShot()`` on every backend to
    make exactly the first backend that gets the call fail, whichever
    one the caller picks; ``winner`` names it afterwards.
    """

    def __init__(self):
        self.winner = None
        self._lock = threading.Lock()

    def __call__(self, storage):
        with self._lock:
            if self.winner is not None:
                return False
            self.winner = storage.name
            return True


class FaultyStorage:
    """Wrap ``base``; inject failures and hangs per method name.

    A method name of ``'*'`` matches every forwarded method.
    """

    #: A safety net, not a feature: a hang ends by itself after this many
    #: seconds, so a caller that never times out makes its test fail
    #: (too slow) instead of blocking the whole test run.
    max_hang = 30.0

    def __init__(self, base, name=None):
        self.base = base
        self.name = name or getattr(base, '__name__', None) or repr(base)
        directlyProvides(self, providedBy(base))
        self.calls = []
        self.registered_db = None
        self._faults = {}
        self._lock = threading.Lock()
        self._released = threading.Event()
        self._hung = 0

    # -- control API ------------------------------------------------------

    def fail(self, method, exc=None, times=None, when=None):
        """Make ``method`` raise ``exc`` (``times`` times, default always).

        ``exc`` may be an exception instance, class, or a callable taking
        the method name.  The default is ``InjectedFault`` naming this
        backend and the method, so tests can look for it in reasons.
        ``when``: a predicate called with this storage at call time; the
        fault applies only if it returns true (see OneShot).
        """
        with self._lock:
            self._faults[method] = _Fault('fail', exc, times, when=when)

    def fail_once(self, method, exc=None):
        self.fail(method, exc, times=1)

    def hang(self, method, proceed=False, times=None, when=None):
        """Block calls of ``method`` until ``release()``.

        After release the call raises ``HangReleased``, or, with
        ``proceed=True``, runs the real method.  ``when`` as for fail().
        """
        with self._lock:
            if self._released.is_set():
                self._released = threading.Event()
            self._faults[method] = _Fault('hang', times=times,
                                          proceed=proceed, when=when)

    def clear(self, method=None):
        """Remove faults (of one method or all); hung calls stay hung."""
        with self._lock:
            if method is None:
                self._faults.clear()
            else:
                self._faults.pop(method, None)

    def release(self):
        """Wake every hung call and stop hanging new ones."""
        with self._lock:
            for name, fault in list(self._faults.items()):
                if fault.kind == 'hang':
                    del self._faults[name]
            self._released.set()

    def reset(self):
        """Release all hangs, forget all faults and the call log."""
        self.release()
        with self._lock:
            self._faults.clear()
            del self.calls[:]

    def hung_calls(self):
        """Calls currently blocked in a hang."""
        return [c for c in list(self.calls)
                if c.injected == 'hang' and not c.done]

    def called(self, name):
        """Calls of ``name`` logged so far."""
        return [c for c in list(self.calls) if c.name == name]

    def call_names(self):
        return [c.name for c in list(self.calls)]

    # -- forwarding --------------------------------------------------------

    def _fault_for(self, name):
        with self._lock:
            fault = self._faults.get(name) or self._faults.get('*')
            if fault is None:
                return None
            if fault.when is not None and not fault.when(self):
                return None
            if fault.times is not None:
                fault.times -= 1
                if fault.times <= 0:
                    for key, value in list(self._faults.items()):
                        if value is fault:
                            del self._faults[key]
            return fault, self._released

    def _make_exc(self, fault, name):
        exc = fault.exc
        if exc is None:
            return InjectedFault('injected failure in %s.%s'
                                 % (self.name, name))
        if isinstance(exc, BaseException):
            return exc
        if isinstance(exc, type) and issubclass(exc, BaseException):
            return exc('injected %s in %s.%s'
                       % (exc.__name__, self.name, name))
        return exc(name)

    def _invoke(self, name, method, args, kwargs):
        call = Call(name, args, kwargs)
        self.calls.append(call)
        try:
            found = self._fault_for(name)
            if found is not None:
                fault, released = found
                call.injected = fault.kind
                if fault.kind == 'fail':
                    raise self._make_exc(fault, name)
                if not released.wait(self.max_hang):
                    call.overdue = True
                    raise HangReleased('hung call %s.%s was never released'
                                       % (self.name, name))
                if not fault.proceed:
                    raise HangReleased('hung call %s.%s released'
                                       % (self.name, name))
            call.result = method(*args, **kwargs)
            return call.result
        except BaseException as exc:
            call.exception = exc
            raise
        finally:
            call.end = time.monotonic()

    def __getattr__(self, name):
        # Dunder lookups (zope.interface's __providedBy__, copy, pickle...)
        # must not reach the base, or the wrapper would lie about itself.
        if name.startswith('__') or name == 'base':
            raise AttributeError(name)
        attr = getattr(self.base, name)
        if not callable(attr):
            return attr

        def method(*args, **kwargs):
            return self._invoke(name, attr, args, kwargs)
        method.__name__ = name
        return method

    def registerDB(self, db):
        """Remember the upcall wrapper so tests can fire upcalls."""
        self.registered_db = db
        return self._invoke('registerDB', self.base.registerDB, (db,), {})

    def __len__(self):
        return self._invoke('__len__', self.base.__len__, (), {})

    def __bool__(self):
        return True

    def __repr__(self):
        return '<FaultyStorage %s>' % self.name


def faulty_filestorage(path, name=None, **kw):
    """Open a FileStorage at ``path`` wrapped in a FaultyStorage."""
    from ZODB.FileStorage import FileStorage
    return FaultyStorage(FileStorage(path, **kw), name=name)
