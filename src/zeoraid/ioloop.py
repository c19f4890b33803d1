"""One IO thread for the ZEO clients of all backends.

ZEO's ClientStorage runs its network code in a thread and event loop of
its own (ZEO.asyncio.client.ClientThread). A RAID over N ZEO backends thus
has N IO threads, and each commit wakes every one of them twice (vote and
finish) and is woken back by each: with the GIL, these hand-offs are most
of what a further backend costs the zeoraid server.

ClientStorage takes the class that runs its network side as
`_client_factory`. SharedLoopRunner is ZEO's own ClientRunner (the same
ClientIO protocol code, calls and coroutines) set up on one event loop
that every backend client of the process shares, run by one daemon
thread. Nothing in it blocks: a backend that hangs leaves its own futures
unanswered, and the RAID's deadlines degrade it as before.
"""
import asyncio
import logging
import os
import threading

import ZEO.asyncio.client
import ZODB.config

try:
    from ZEO.asyncio.compat import new_event_loop
except ImportError:  # pragma: no cover - older ZEO
    new_event_loop = asyncio.new_event_loop

logger = logging.getLogger('zeoraid')

_lock = threading.Lock()
_loop = None


def _forget_in_child():
    """A forked child has the loop object but not the thread running it
    (ZEO's test forker, daemonizing servers): it starts its own."""
    global _lock, _loop
    _lock = threading.Lock()
    _loop = None


os.register_at_fork(after_in_child=_forget_in_child)


def shared_loop():
    """The process's backend IO loop, started on first use."""
    global _loop
    with _lock:
        if _loop is None:
            loop = new_event_loop()
            started = threading.Event()

            def run():
                asyncio.set_event_loop(loop)
                loop.call_soon(started.set)
                try:
                    loop.run_forever()
                except Exception:   # pragma: no cover - never expected
                    logger.exception('backend IO loop stopped')
                    raise
            threading.Thread(target=run, name='zeoraid-backend-io',
                             daemon=True).start()
            started.wait()
            _loop = loop
        return _loop


class SharedLoopRunner(ZEO.asyncio.client.ClientRunner):
    """ClientStorage's `_client_factory`: ClientThread's interface on the
    shared loop instead of a thread and loop of its own."""

    def __init__(self, addrs, client, cache, storage_key='1',
                 read_only=False, timeout=30, disconnect_poll=1, ssl=None,
                 ssl_server_hostname=None):
        self.set_options(addrs, client, cache, storage_key, read_only,
                         timeout, disconnect_poll, ssl=ssl,
                         ssl_server_hostname=ssl_server_hostname)
        loop = shared_loop()
        ready = threading.Event()
        failure = []

        def setup():
            try:
                self.setup_delegation(loop)
            except Exception as exc:
                failure.append(exc)
            finally:
                ready.set()
        loop.call_soon_threadsafe(setup)
        ready.wait()
        if failure:
            raise failure[0]
        self._closed = False

    def close(self):
        self._closed = True
        super().close()     # does nothing the second time

    def is_closed(self):
        return self._closed


def open_zeo_client(section):
    """ZODB.config.ZEOClient.open, on the shared backend IO loop.

    ZODB's opener cannot pass ClientStorage's _client_factory; this is
    that opener with the one argument added (ZODB 5 and 6).
    """
    from ZEO.ClientStorage import ClientStorage
    config = section.config
    addresses = [server.address for server in config.server]
    options = {}
    if config.blob_cache_size is not None:
        options['blob_cache_size'] = config.blob_cache_size
    if config.blob_cache_size_check is not None:
        options['blob_cache_size_check'] = config.blob_cache_size_check
    if config.client_label is not None:
        options['client_label'] = config.client_label
    return ClientStorage(
        addresses,
        blob_dir=config.blob_dir,
        shared_blob_dir=config.shared_blob_dir,
        storage=config.storage,
        cache_size=config.cache_size,
        name=config.name,
        client=config.client,
        var=config.var,
        min_disconnect_poll=config.min_disconnect_poll,
        max_disconnect_poll=config.max_disconnect_poll,
        wait=config.wait,
        read_only=config.read_only,
        read_only_fallback=config.read_only_fallback,
        drop_cache_rather_verify=config.drop_cache_rather_verify,
        username=config.username,
        password=config.password,
        realm=config.realm,
        _client_factory=SharedLoopRunner,
        **options)


def opener(section, shared=True):
    """A backend section's opener: ZEO clients on the shared loop."""
    if shared and type(section) is ZODB.config.ZEOClient:
        return lambda: open_zeo_client(section)
    return section.open
