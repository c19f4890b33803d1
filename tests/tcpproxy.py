"""A fault-injecting TCP proxy for chaos tests (test-only code).

``FaultProxy(target)`` listens on 127.0.0.1 (a free port) and forwards
every connection to ``target``, a ZEO backend server.  The RAID is
configured to talk to ``proxy.address`` instead of the backend, and the
test breaks the network between the two on command::

    proxy = FaultProxy(backend.addr)
    proxy.delay(0.2)      # every chunk arrives 0.2 s late (both ways)
    proxy.stall()         # blackhole: accept, never forward, never answer
    proxy.reset()         # RST every open connection (new ones pass)
    proxy.drop()          # close every connection, refuse new ones
    proxy.heal()          # back to pass-through; held data flows again
    proxy.close()

Faults can also fire at one precise moment of the ZEO protocol: the
proxy follows the client-to-server stream frame by frame (4-byte
big-endian length, then a pickled ``(msgid, async, name, args)``); while
a trigger is armed it collects each frame whole to read its method name,
and ``arm(name, action, when)`` applies ``action`` right before that
message reaches the backend
(``when='before'``) or right after it was handed over, with the
backend's answers held back (``when='after'``).  Arming ``vote`` and
``tpc_finish`` this way makes faults at each phase of two-phase commit
deterministic::

    trigger = proxy.arm('tpc_finish', 'stall', when='before')
    ...                                   # a commit runs into it
    trigger.fired.wait(10)

Actions: ``'stall'``, ``'reset'``, ``'drop'``, or a callable (run in a
worker thread, e.g. ``backend.kill``).  After a ``when='after'`` action
the backend's answers stay held until ``heal()``, so the RAID never
learns the outcome of that message from this connection; a backend that
dies meanwhile (its side of the connection closes) has the RAID's side
reset at once, as a crash would.

A stall keeps what it holds: ``heal()`` delivers it, as a network that
recovers would.  The proxy runs its own asyncio loop in a daemon thread.
"""
import asyncio
import collections
import io
import logging
import pickle
import socket
import struct
import threading
import time

logger = logging.getLogger(__name__)

HOST = '127.0.0.1'
CALL_TIMEOUT = 10.0
ACTIONS = ('stall', 'reset', 'drop')


class _Anything:
    """Stands in for any global a pickled message might name."""

    def __init__(self, *args, **kw):
        pass

    def __setstate__(self, state):
        pass


class _SafeUnpickler(pickle.Unpickler):
    """Reads ZEO messages without importing anything they name."""

    def find_class(self, module, name):
        return _Anything

    def persistent_load(self, pid):
        return pid


def message_name(payload):
    """The method name of one ZEO message payload, or None.

    ZEO pickles messages as ``(msgid, async, name, args)`` (protocol 3);
    the handshake frames (b'Z5', ...) and replies yield None.
    """
    if payload[:1] != b'\x80':
        return None
    try:
        message = _SafeUnpickler(io.BytesIO(payload)).load()
    except Exception:
        return None
    if isinstance(message, tuple) and len(message) == 4 \
            and isinstance(message[2], str):
        return message[2]
    return None


class Trigger:
    """A fault armed on a ZEO message name; fires once (or every time)."""

    def __init__(self, name, action, when, once):
        if when not in ('before', 'after'):
            raise ValueError('when must be before or after, not %r' % when)
        if not callable(action) and action not in ACTIONS:
            raise ValueError('unknown action %r' % (action,))
        self.name = name
        self.action = action
        self.when = when
        self.once = once
        self.fired = threading.Event()
        self.count = 0
        self.time = None       # time.monotonic() of the first firing
        self.error = None      # exception raised by a callable action

    def __repr__(self):
        return '<Trigger %s %s %s fired=%d>' % (
            self.when, self.name, getattr(self.action, '__name__',
                                          self.action), self.count)


_EOF = object()


class _Pipe:
    """One direction of one connection: a queue of chunks to write."""

    def __init__(self, link, direction):
        self.link = link
        self.direction = direction       # 'c2s' or 's2c'
        self.items = collections.deque()  # (release_time, data, after)
        self.held = False                # held by an 'after' trigger

    def blocked(self):
        proxy = self.link.proxy
        if proxy.stalled:
            return True
        return self.held


class _Link:
    """One proxied connection: RAID side (down) and backend side (up)."""

    def __init__(self, proxy, reader, writer):
        self.proxy = proxy
        self.down_reader = reader
        self.down_writer = writer
        self.up_reader = None
        self.up_writer = None
        self.c2s = _Pipe(self, 'c2s')
        self.s2c = _Pipe(self, 's2c')
        self.closed = False
        self.tasks = []

    # -- teardown ----------------------------------------------------------

    def close(self, down='rst', up='rst'):
        """End both sides now; 'rst' resets, 'fin' closes gracefully."""
        if self.closed:
            return
        self.closed = True
        for writer, how in ((self.down_writer, down), (self.up_writer, up)):
            if writer is None:
                continue
            try:
                if how == 'rst':
                    sock = writer.get_extra_info('socket')
                    if sock is not None:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                        struct.pack('ii', 1, 0))
                    writer.transport.abort()
                else:
                    writer.close()
            except Exception:     # already gone
                pass
        self.proxy._links.discard(self)
        self.proxy._wake()
        current = asyncio.current_task()
        for task in self.tasks:
            if task is not current:
                task.cancel()


class FaultProxy:
    """A TCP proxy from ``address`` (127.0.0.1, free port) to ``target``."""

    def __init__(self, target, name=None, port=0):
        self.target = tuple(target)
        self.name = name or '%s:%d' % self.target
        self.stalled = False
        self.dropping = False
        self._delay = 0.0
        self._links = set()
        self._triggers = []
        self._server = None
        self._cond = None
        self.address = None
        self.connections = 0          # accepted so far
        # client->server messages seen while a trigger was armed, by name
        self.messages = collections.Counter()
        self.events = []              # (monotonic time, text) log
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name='FaultProxy(%s)' % self.name,
            daemon=True)
        self._thread.start()
        try:
            self.address = self._call(self._listen(port))
        except BaseException:
            self._stop_loop()
            raise

    def __repr__(self):
        return '<FaultProxy %s -> %s:%d%s>' % (
            self.address[1] if self.address else '?',
            self.target[0], self.target[1],
            ' stalled' if self.stalled else '')

    # -- public API (any thread) ---------------------------------------------

    @property
    def mode(self):
        if self.dropping:
            return 'drop'
        if self.stalled:
            return 'stall'
        if self._delay:
            return 'delay'
        return 'pass'

    def delay(self, seconds):
        """Deliver every chunk ``seconds`` late, in both directions."""
        self._call(self._set(delay=float(seconds)))

    def stall(self):
        """Blackhole: hold everything, connect nothing, answer nothing."""
        self._call(self._set(stalled=True))

    def reset(self):
        """Reset (RST) every open connection; new connections pass."""
        self._call(self._reset_all())

    def drop(self):
        """Close every open connection and refuse new ones."""
        self._call(self._drop())

    def heal(self):
        """Back to pass-through: no delay, no stall, holds released."""
        self._call(self._heal())

    def arm(self, name, action, when='before', once=True):
        """Fire ``action`` at the ZEO message ``name`` (see module doc)."""
        trigger = Trigger(name, action, when, once)
        self._call(self._add_trigger(trigger))
        return trigger

    def disarm(self):
        self._call(self._set(triggers=[]))

    def active_connections(self):
        return len(self._links)

    def close(self):
        """Close the listener and every connection; stop the loop."""
        if not self._loop.is_running():
            return
        try:
            self._call(self._shutdown())
        finally:
            self._stop_loop()

    def _stop_loop(self):
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(CALL_TIMEOUT)
        if not self._thread.is_alive():
            self._loop.close()

    def _call(self, coro):
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(CALL_TIMEOUT)

    def _log(self, text):
        self.events.append((time.monotonic(), text))
        logger.debug('proxy %s: %s', self.name, text)

    # -- loop side -----------------------------------------------------------

    def _wake(self):
        async def notify():
            async with self._cond:
                self._cond.notify_all()
        self._loop.create_task(notify())

    async def _listen(self, port):
        if self._cond is None:
            self._cond = asyncio.Condition()
        self._server = await asyncio.start_server(
            self._accept, HOST, port, reuse_address=True)
        return self._server.sockets[0].getsockname()[:2]

    async def _set(self, **kw):
        if 'delay' in kw:
            self._delay = kw['delay']
            self._log('delay %g' % self._delay)
        if 'stalled' in kw:
            self.stalled = kw['stalled']
            self._log('stall' if self.stalled else 'unstall')
        if 'triggers' in kw:
            self._triggers = list(kw['triggers'])
        self._wake()

    async def _add_trigger(self, trigger):
        self._triggers.append(trigger)

    async def _reset_all(self):
        links = list(self._links)
        for link in links:
            link.close('rst', 'rst')
        self._log('reset %d connections' % len(links))

    async def _drop(self):
        if self._server is not None:
            self._server.close()
            self._server = None
        self.dropping = True
        await self._reset_all()
        self._log('drop')

    async def _heal(self):
        self._delay = 0.0
        self.stalled = False
        for link in list(self._links):
            link.c2s.held = link.s2c.held = False
        if self.dropping:
            self.dropping = False
            await self._listen(self.address[1])
        self._log('heal')
        self._wake()

    async def _shutdown(self):
        if self._server is not None:
            self._server.close()
            self._server = None
        self._triggers = []
        for link in list(self._links):
            link.close('rst', 'rst')
        for task in asyncio.all_tasks():
            if task is not asyncio.current_task():
                task.cancel()

    async def _accept(self, reader, writer):
        self.connections += 1
        link = _Link(self, reader, writer)
        if self.dropping:
            link.close('rst', 'rst')
            return
        self._links.add(link)
        link.tasks = [
            asyncio.current_task(),
            self._loop.create_task(self._pump(link.c2s, writer_of=lambda:
                                              link.up_writer)),
            self._loop.create_task(self._pump(link.s2c, writer_of=lambda:
                                              link.down_writer)),
            self._loop.create_task(self._read_down(link)),
        ]
        try:
            # A stalled proxy accepts, but does not even connect upstream.
            async with self._cond:
                await self._cond.wait_for(
                    lambda: not self.stalled or link.closed)
            if link.closed:
                return
            try:
                up_reader, up_writer = await asyncio.open_connection(
                    *self.target)
            except OSError as exc:
                self._log('upstream connect failed: %s' % exc)
                link.close('rst', 'rst')
                return
            link.up_reader, link.up_writer = up_reader, up_writer
            if link.closed:
                up_writer.transport.abort()
                return
            self._wake()
            await self._read_up(link)
        except asyncio.CancelledError:
            pass

    async def _read_down(self, link):
        """Client to server: track ZEO frames, check the triggers.

        Bytes pass on as they come; only while a trigger is armed is a
        frame collected whole (to read its method name) before it goes
        on.  So non-ZEO traffic passes too, and a trigger armed in the
        middle of a frame applies from the next frame on.
        """
        header = b''          # bytes of the current frame's length prefix
        header_sent = False   # some of them were passed on already
        remaining = 0         # body bytes of the current frame still due
        frame = None          # the frame being collected, if any
        try:
            while True:
                data = await link.down_reader.read(65536)
                if not data:
                    break
                out = []
                i = 0
                while i < len(data):
                    if frame is None and remaining == 0:
                        piece = data[i:i + 4 - len(header)]
                        i += len(piece)
                        header += piece
                        if not self._triggers or header_sent:
                            out.append(piece)
                            header_sent = True
                        if len(header) < 4:
                            continue
                        remaining = struct.unpack('>I', header)[0]
                        if not header_sent:
                            frame = bytearray(header)
                        header, header_sent = b'', False
                    else:
                        piece = data[i:i + remaining]
                        i += len(piece)
                        remaining -= len(piece)
                        if frame is None:
                            out.append(piece)
                        else:
                            frame += piece
                    if frame is not None and remaining == 0:
                        if out:
                            self._enqueue(link.c2s, b''.join(out))
                            out = []
                        complete, frame = bytes(frame), None
                        await self._frame(link, complete)
                        if link.closed:
                            return
                if out:
                    self._enqueue(link.c2s, b''.join(out))
        except (ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            return
        if frame is not None and not link.closed:
            self._enqueue(link.c2s, bytes(frame))
        self._eof(link.c2s)

    async def _frame(self, link, frame):
        name = message_name(frame[4:])
        trigger = None
        if name is not None:
            self.messages[name] += 1
            for candidate in self._triggers:
                if candidate.name == name and not (
                        candidate.once and candidate.count):
                    trigger = candidate
                    break
        if trigger is None:
            self._enqueue(link.c2s, frame)
            return
        trigger.count += 1
        if trigger.time is None:
            trigger.time = time.monotonic()
        if trigger.once:
            self._triggers = [t for t in self._triggers if t is not trigger]
        self._log('trigger %s %s: %s' % (trigger.when, name, trigger.action))
        try:
            if trigger.when == 'before':
                await self._act(link, trigger)
                if not link.closed:
                    self._enqueue(link.c2s, frame)
                return
            # 'after': hold the answers, hand the message over, then act.
            link.s2c.held = True
            done = self._loop.create_future()
            self._enqueue(link.c2s, frame, after=lambda: done.set_result(
                None) if not done.done() else None)
            while not done.done() and not link.closed:
                await asyncio.wait([done], timeout=0.05)
            if not link.closed:
                # Give the backend a moment to process it.
                await asyncio.sleep(0.1)
                await self._act(link, trigger, after=True)
        finally:
            # A callable action may end this link (a killed backend) and
            # so cancel us: it reports its own end, from its thread.
            if not callable(trigger.action):
                trigger.fired.set()

    async def _act(self, link, trigger, after=False):
        action = trigger.action
        if action == 'stall':
            self.stalled = True
            self._log('stall')
        elif action == 'reset':
            # After: the backend got the message and sees a clean close
            # (it reads the message first); the RAID's side is reset.
            link.close('rst', 'fin' if after else 'rst')
            self._log('reset at message')
        elif action == 'drop':
            await self._drop()
        else:
            def run():
                try:
                    action()
                except Exception as exc:
                    trigger.error = exc
                    logger.exception('proxy %s: trigger action failed',
                                     self.name)
                finally:
                    trigger.fired.set()
            await self._loop.run_in_executor(None, run)
        self._wake()

    async def _read_up(self, link):
        """Server to client: pass chunks on; a closed backend resets us."""
        try:
            while True:
                data = await link.up_reader.read(65536)
                if not data:
                    break
                self._enqueue(link.s2c, data)
        except (ConnectionError, OSError):
            pass
        self._eof(link.s2c)

    def _enqueue(self, pipe, data, after=None):
        pipe.items.append((time.monotonic() + self._delay, data, after))
        self._wake()

    def _eof(self, pipe):
        """The source side closed.

        In a stall the other side must not learn it (blackhole): the EOF
        waits in the queue.  Otherwise the link ends now; a backend that
        went away resets the RAID's connection, as a crash would.
        """
        if pipe.link.closed:
            return
        if self.stalled or self._delay:
            pipe.items.append((time.monotonic() + self._delay, _EOF, None))
            self._wake()
        elif pipe.direction == 's2c':
            pipe.link.close('rst', 'fin')
        else:
            pipe.link.close('fin', 'fin')

    async def _pump(self, pipe, writer_of):
        link = pipe.link
        try:
            while True:
                async with self._cond:
                    await self._cond.wait_for(
                        lambda: link.closed or (
                            pipe.items and not pipe.blocked()
                            and writer_of() is not None))
                if link.closed:
                    return
                release, data, after = pipe.items[0]
                wait = release - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                    continue     # re-check stall/hold after sleeping
                pipe.items.popleft()
                if data is _EOF:
                    if pipe.direction == 's2c':
                        link.close('rst', 'fin')
                    else:
                        link.close('fin', 'fin')
                    return
                writer = writer_of()
                writer.write(data)
                await writer.drain()
                if after is not None:
                    after()
        except (ConnectionError, OSError):
            link.close('rst', 'rst')
        except asyncio.CancelledError:
            pass
