"""The metrics and health endpoint of a zeoraid server.

Enabled by a ``<metrics>`` section (``address host:port``).  A small
HTTP server from the standard library, in threads of its own: it never
runs in the ZEO server's event loop, and the event loop never waits for
it.  Paths:

``/metrics``
    Prometheus text format 0.0.4, or OpenMetrics 1.0 when the scraper
    asks for it (``Accept: application/openmetrics-text``): per-backend
    state, last tid time, lag, recovery progress and rate, commit / vote /
    finish latency histograms, commit / abort / conflict counters and
    degrade counts (see doc/MONITORING.md for every metric).
``/healthz``
    Liveness: 200 while the ZEO event loop answers within a second,
    else 503.
``/readyz``
    Readiness: 200 when the server serves and every RAID storage has at
    least one optimal backend and is not failed, else 503.  The body says
    why, in one line.

Values are read from the storages' ``raid_status()``, ``raid_details()``,
``lastTransaction()`` and ``stats`` (zeoraid.stats.RAIDStats) at scrape
time; nothing here keeps state between scrapes.
"""
import binascii
import http.server
import logging
import socket
import threading
import time

import ZODB.TimeStamp


logger = logging.getLogger('zeoraid.metrics')

RAID_STATES = ('optimal', 'recovering', 'degraded', 'failed')
BACKEND_STATES = ('optimal', 'recovering', 'degraded', 'disabled')

PROMETHEUS_TYPE = 'text/plain; version=0.0.4; charset=utf-8'
OPENMETRICS_TYPE = ('application/openmetrics-text; version=1.0.0;'
                    ' charset=utf-8')


def tid_time(tid):
    """Seconds since the epoch of a tid (bytes or 16 hex digits), or None."""
    if tid is None:
        return None
    if isinstance(tid, str):
        try:
            tid = binascii.unhexlify(tid)
        except (ValueError, binascii.Error):
            return None
    if len(tid) != 8 or tid == b'\0' * 8:
        return None
    return ZODB.TimeStamp.TimeStamp(tid).timeTime()


def _escape(value):
    return (str(value).replace('\\', r'\\').replace('\n', r'\n')
            .replace('"', r'\"'))


def _number(value):
    if value is True:
        return '1'
    if value is False:
        return '0'
    if isinstance(value, int):
        return str(value)
    if value == float('inf'):
        return '+Inf'
    return repr(float(value))


class Exposition:
    """Collects metric families and renders them in one text format."""

    def __init__(self, openmetrics=False):
        self.openmetrics = openmetrics
        self._families = {}       # name -> (type, help, [lines])
        self._order = []

    def family(self, name, kind, help):
        if name not in self._families:
            self._families[name] = (kind, help, [])
            self._order.append(name)
        return self._families[name][2]

    def sample(self, family, kind, help, value, labels=(), suffix=''):
        """Add one sample of ``family`` (suffix: _total, _bucket, ...)."""
        if value is None:
            return
        lines = self.family(family, kind, help)
        label_text = ','.join('%s="%s"' % (k, _escape(v))
                              for k, v in labels)
        lines.append('%s%s%s %s' % (family, suffix,
                                    '{%s}' % label_text if label_text
                                    else '', _number(value)))

    def gauge(self, name, help, value, labels=()):
        self.sample(name, 'gauge', help, value, labels)

    def counter(self, name, help, value, labels=()):
        # name without _total; the sample always carries it
        self.sample(name, 'counter', help, value, labels, '_total')

    def histogram(self, name, help, histogram, labels=()):
        """A zeoraid.stats.Histogram as a Prometheus histogram."""
        counts = list(histogram.counts)     # one consistent-enough copy
        total = histogram.total
        running = 0
        bounds = list(histogram.buckets) + [float('inf')]
        for bound, n in zip(bounds, counts):
            running += n
            self.sample(name, 'histogram', help, running,
                        tuple(labels) + (('le', _number(bound)),), '_bucket')
        # _count equals the +Inf bucket even if an observation landed
        # between the copies above.
        self.sample(name, 'histogram', help, running, labels, '_count')
        self.sample(name, 'histogram', help, total, labels, '_sum')

    def render(self):
        out = []
        for name in self._order:
            kind, help, lines = self._families[name]
            out.append('# HELP %s %s' % (name, help))
            out.append('# TYPE %s %s' % (name, kind))
            out.extend(lines)
        if self.openmetrics:
            out.append('# EOF')
        return '\n'.join(out) + '\n'


def collect(storages, openmetrics=False, now=None):
    """The exposition text for {name: storage} (RAID storages only)."""
    now = time.time() if now is None else now
    exp = Exposition(openmetrics)
    exp.gauge('zeoraid_up', 'The zeoraid server process answers.', 1)
    for name, storage in sorted(storages.items()):
        if not callable(getattr(storage, 'raid_status', None)):
            continue
        try:
            _collect_storage(exp, name, storage, now)
        except Exception:
            # A storage being closed must not break the whole scrape.
            logger.exception('metrics of storage %r failed', name)
            exp.gauge('zeoraid_scrape_error',
                      'Collecting this storage failed (see the log).', 1,
                      (('storage', name),))
    return exp.render()


def _collect_storage(exp, name, storage, now):
    s = (('storage', name),)
    status = storage.raid_status()
    for state in RAID_STATES:
        exp.gauge('zeoraid_status', 'RAID status: 1 for the current one.',
                  status == state, s + (('status', state),))
    raid_tid = storage.lastTransaction()
    raid_time = tid_time(raid_tid)
    exp.gauge('zeoraid_last_tid_timestamp_seconds',
              'Time encoded in the last committed tid of the RAID.',
              raid_time, s)
    details = storage.raid_details()
    optimal = sum(1 for info in details.values()
                  if info.get('state') == 'optimal')
    exp.gauge('zeoraid_backends', 'Number of backends.', len(details), s)
    exp.gauge('zeoraid_backends_optimal', 'Number of optimal backends.',
              optimal, s)
    stats = getattr(storage, 'stats', None)
    degrades = dict(getattr(stats, 'degrades', None) or {})
    for backend, info in sorted(details.items()):
        b = s + (('backend', backend),)
        state = info.get('state')
        for candidate in BACKEND_STATES:
            exp.gauge('zeoraid_backend_state',
                      'Backend state: 1 for the current one.',
                      state == candidate, b + (('state', candidate),))
        exp.gauge('zeoraid_backend_state_since_seconds',
                  'When the backend entered its current state (epoch).',
                  info.get('since'), b)
        backend_time = tid_time(info.get('last_tid'))
        exp.gauge('zeoraid_backend_last_tid_timestamp_seconds',
                  'Time encoded in the last tid the backend has.',
                  backend_time, b)
        lag = info.get('lag_seconds')
        if lag is None and raid_time is not None \
                and backend_time is not None:
            lag = max(0.0, raid_time - backend_time)
        exp.gauge('zeoraid_backend_lag_seconds',
                  'How far the backend is behind the RAID (tid time).',
                  lag, b)
        exp.counter('zeoraid_backend_degrades',
                    'How often the backend was degraded since start.',
                    degrades.get(backend, 0), b)
        _collect_recovery(exp, b, state, info.get('recovery'), now)
    if stats is not None:
        exp.counter('zeoraid_commits', 'Transactions committed.',
                    stats.commits, s)
        exp.counter('zeoraid_aborts', 'Transactions aborted.',
                    stats.aborts, s)
        exp.counter('zeoraid_conflicts', 'Conflict errors raised in vote.',
                    stats.conflicts, s)
        exp.histogram('zeoraid_commit_duration_seconds',
                      'tpc_begin to tpc_finish of committed transactions.',
                      stats.commit_latency, s)
        exp.histogram('zeoraid_vote_duration_seconds',
                      'Fan-out of tpc_vote to the backends.',
                      stats.vote_latency, s)
        exp.histogram('zeoraid_finish_duration_seconds',
                      'Fan-out of tpc_finish to the backends.',
                      stats.finish_latency, s)


def _collect_recovery(exp, labels, state, recovery, now):
    active = state == 'recovering' and isinstance(recovery, dict)
    exp.gauge('zeoraid_recovery_active',
              '1 while the backend is being recovered.', active, labels)
    if not isinstance(recovery, dict):
        return
    exp.gauge('zeoraid_recovery_started_seconds',
              'Start of the last recovery of the backend (epoch).',
              recovery.get('started'), labels)
    exp.gauge('zeoraid_recovery_transactions_copied',
              'Transactions copied by the last recovery.',
              recovery.get('txns_copied'), labels)
    exp.gauge('zeoraid_recovery_bytes_copied',
              'Bytes copied by the last recovery.',
              recovery.get('bytes_copied'), labels)
    exp.gauge('zeoraid_recovery_rate_transactions_per_second',
              'Copy rate of the last recovery.',
              recovery.get('rate_txn_s'), labels)
    exp.gauge('zeoraid_recovery_rate_bytes_per_second',
              'Copy rate of the last recovery in bytes.',
              recovery.get('rate_bytes_s'), labels)
    exp.gauge('zeoraid_recovery_backpressure_spells',
              'Spells in which the last recovery made live commits wait.',
              recovery.get('backpressure_spells'), labels)
    if active:
        exp.gauge('zeoraid_recovery_backlog_seconds',
                  'How far the recovery copy is behind the RAID.',
                  recovery.get('backlog_seconds'), labels)
        exp.gauge('zeoraid_recovery_eta_seconds',
                  'Estimated time until the copy has caught up.',
                  recovery.get('eta_seconds'), labels)


def readiness(storages, serving):
    """(ready, one-line reason) for /readyz."""
    if not serving:
        return False, 'not serving (starting or stopping)'
    raids = {n: s for n, s in storages.items()
             if callable(getattr(s, 'raid_status', None))}
    if not raids:
        return False, 'no RAID storage served'
    problems = []
    for name, storage in sorted(raids.items()):
        status = storage.raid_status()
        optimal = [b for b, info in storage.raid_details().items()
                   if info.get('state') == 'optimal']
        if status == 'failed' or not optimal:
            problems.append('RAID %s is %s with %d optimal backends'
                            % (name, status, len(optimal)))
    if problems:
        return False, '; '.join(problems)
    return True, 'ready: ' + ', '.join(
        '%s %s' % (n, s.raid_status()) for n, s in sorted(raids.items()))


class _Handler(http.server.BaseHTTPRequestHandler):
    server_version = 'zeoraid-metrics'
    protocol_version = 'HTTP/1.0'

    def do_GET(self):
        endpoint = self.server.endpoint
        path = self.path.split('?', 1)[0]
        try:
            if path == '/metrics':
                openmetrics = 'application/openmetrics-text' in (
                    self.headers.get('Accept') or '')
                body = collect(endpoint.storages(), openmetrics)
                self._reply(200, body, OPENMETRICS_TYPE if openmetrics
                            else PROMETHEUS_TYPE)
            elif path == '/healthz':
                alive, reason = endpoint.alive()
                self._reply(200 if alive else 503, reason + '\n')
            elif path == '/readyz':
                ready, reason = readiness(endpoint.storages(),
                                          endpoint.serving())
                self._reply(200 if ready else 503, reason + '\n')
            else:
                self._reply(404, 'not found; try /metrics, /healthz or'
                            ' /readyz\n')
        except Exception as e:
            logger.exception('metrics request %s failed', path)
            self._reply(500, 'internal error: %s\n' % e)

    do_HEAD = do_GET

    def _reply(self, code, body, content_type='text/plain; charset=utf-8'):
        data = body.encode('utf-8')
        self.send_response(code)
        self.send_header('Content-Type', content_type)
        self.send_header('Content-Length', str(len(data)))
        self.end_headers()
        if self.command != 'HEAD':
            self.wfile.write(data)

    def log_message(self, format, *args):
        logger.debug('%s %s', self.address_string(), format % args)


class _HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, endpoint):
        self.address_family = (socket.AF_INET6 if ':' in address[0]
                               else socket.AF_INET)
        super().__init__(address, _Handler)
        self.endpoint = endpoint


class MetricsEndpoint:
    """The HTTP endpoint; binds on creation so errors show at startup.

    storages: callable returning {name: storage} as served.
    serving: callable, True while the ZEO server accepts clients.
    ping: callable(timeout) -> True if the ZEO event loop ran a callback
    within timeout seconds (liveness), or None to only check this thread.
    """

    def __init__(self, address, storages, serving, ping=None):
        self._storages = storages
        self._serving = serving
        self._ping = ping
        try:
            self._server = _HTTPServer(address, self)
        except OSError as e:
            raise OSError('cannot listen on metrics address %s:%s: %s'
                          % (address[0], address[1], e.strerror or e))
        self._thread = None

    @property
    def address(self):
        return self._server.server_address[:2]

    def storages(self):
        return dict(self._storages())

    def serving(self):
        return bool(self._serving())

    def alive(self):
        if self._ping is None or not self.serving():
            return True, 'alive'
        if self._ping(1.0):
            return True, 'alive'
        return False, 'ZEO event loop did not answer within 1s'

    def start(self):
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={'poll_interval': 0.5},
            name='zeoraid-metrics', daemon=True)
        self._thread.start()
        logger.info('metrics endpoint listening on http://%s:%s/metrics',
                    *self.address)

    def close(self):
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(5)
            self._thread = None
        self._server.server_close()
