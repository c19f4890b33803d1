"""The metrics and health endpoint, scraped from a real zeoraid process.

A zeoraid server with ``<metrics>`` in front of two runzeo backends is
scraped over HTTP while clients commit, a backend is disabled and
recovered, and finally both backends die.  The exposition text is checked
against the Prometheus text format rules that scrapers rely on.  The
rendering is also checked in-process on a RAID over two FileStorages.
"""
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import unittest
import urllib.error
import urllib.request

import transaction
import ZODB
import ZODB.FileStorage

from tests.test_server import ServerTestBase
from tests.test_server import wait_until
from zeoraid.metrics import collect
from zeoraid.metrics import readiness
from zeoraid.storage import RAIDStorage


_METRICS_RE = re.compile(r'metrics endpoint on ([\d.]+):(\d+)')
_SAMPLE_RE = re.compile(
    r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_][a-zA-Z0-9_]*="'
    r'(?:[^"\\]|\\.)*",?)*\})? (-?[0-9.e+-]+|\+Inf|-Inf|NaN)$')
_LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse(text, openmetrics=False):
    """{(name, frozenset(labels)): value}, checking the format: every
    sample belongs to a family declared by # TYPE before it, histograms
    have cumulative buckets ending in +Inf equal to _count."""
    lines = text.split('\n')
    assert lines[-1] == '', 'must end with a newline'
    lines = lines[:-1]
    if openmetrics:
        assert lines[-1] == '# EOF', lines[-1]
        lines = lines[:-1]
    else:
        assert '# EOF' not in lines
    types = {}
    samples = {}
    for line in lines:
        if line.startswith('# TYPE '):
            _, _, name, kind = line.split(' ')
            assert name not in types, 'family %s declared twice' % name
            types[name] = kind
            continue
        if line.startswith('# HELP '):
            continue
        match = _SAMPLE_RE.match(line)
        assert match, 'not a sample line: %r' % line
        name, labels, value = match.group(1), match.group(2), match.group(3)
        family = re.sub(r'(_total|_bucket|_count|_sum)$', '', name)
        assert family in types, 'no # TYPE for %s' % name
        if name.endswith('_total'):
            assert types[family] == 'counter', name
        key = (name, frozenset(_LABEL_RE.findall(labels or '')))
        assert key not in samples, 'duplicate sample %r' % line
        samples[key] = float(value)
    for family, kind in types.items():
        if kind != 'histogram':
            continue
        series = {}
        for (name, labels), value in samples.items():
            if name == family + '_bucket':
                rest = frozenset(l for l in labels if l[0] != 'le')
                le = dict(labels)['le']
                series.setdefault(rest, []).append(
                    (float('inf') if le == '+Inf' else float(le), value))
        for rest, buckets in series.items():
            buckets.sort()
            values = [v for _, v in buckets]
            assert values == sorted(values), 'buckets not cumulative'
            assert buckets[-1][0] == float('inf')
            assert samples[(family + '_count', rest)] == values[-1]
    return samples


def value(samples, name, **labels):
    return samples.get((name, frozenset(labels.items())))


def http_get(address, path, accept=None):
    """(status, content type, body) of GET http://address/path."""
    request = urllib.request.Request('http://%s:%d%s' % (address + (path,)))
    if accept:
        request.add_header('Accept', accept)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return (response.status, response.headers['Content-Type'],
                    response.read().decode('utf-8'))
    except urllib.error.HTTPError as e:
        return e.code, e.headers['Content-Type'], e.read().decode('utf-8')


class MetricsServerTests(ServerTestBase):
    """A zeoraid process with a <metrics> section, scraped over HTTP."""

    start_server = False

    def setUp(self):
        super().setUp()
        self.server = self.make_server(
            zeoraid_section='<metrics>\n  address 127.0.0.1:0\n'
                            '</metrics>\n')
        match = _METRICS_RE.search(self.server.log())
        self.assertIsNotNone(match, self.server.log())
        self.metrics = (match.group(1), int(match.group(2)))

    def make_server(self, **kw):
        kw.setdefault('eventlog', os.path.join(self.dir, 'zeoraid.log'))
        return super().make_server(**kw)

    def scrape(self, openmetrics=False):
        status, content_type, body = http_get(
            self.metrics, '/metrics',
            'application/openmetrics-text; version=1.0.0' if openmetrics
            else None)
        self.assertEqual(status, 200, body)
        if openmetrics:
            self.assertTrue(content_type.startswith(
                'application/openmetrics-text'), content_type)
        else:
            self.assertTrue(content_type.startswith(
                'text/plain; version=0.0.4'), content_type)
        return parse(body, openmetrics)

    def test_scrape_through_degrade_and_recovery(self):
        db = self.db()      # may commit the root object
        s = self.scrape()
        self.assertEqual(value(s, 'zeoraid_up'), 1)
        for backend in ('b1', 'b2'):
            self.assertEqual(value(s, 'zeoraid_backend_state', storage='1',
                                   backend=backend, state='optimal'), 1)
            self.assertEqual(value(s, 'zeoraid_backend_state', storage='1',
                                   backend=backend, state='degraded'), 0)
        self.assertEqual(value(s, 'zeoraid_status', storage='1',
                               status='optimal'), 1)
        self.assertEqual(value(s, 'zeoraid_backends_optimal', storage='1'),
                         2)
        before = value(s, 'zeoraid_commits_total', storage='1')
        self.assertEqual(http_get(self.metrics, '/readyz')[0], 200)
        self.assertEqual(http_get(self.metrics, '/healthz')[:3:2],
                         (200, 'alive\n'))

        for i in range(5):
            self.commit(db, 'k%d' % i, i)
        s = self.scrape()
        self.assertEqual(value(s, 'zeoraid_commits_total', storage='1'),
                         before + 5)
        self.assertGreaterEqual(value(
            s, 'zeoraid_commit_duration_seconds_count', storage='1'), 5)
        self.assertGreater(value(
            s, 'zeoraid_vote_duration_seconds_sum', storage='1'), 0)
        self.assertGreaterEqual(value(
            s, 'zeoraid_finish_duration_seconds_count', storage='1'), 5)
        raid_time = value(s, 'zeoraid_last_tid_timestamp_seconds',
                          storage='1')
        for backend in ('b1', 'b2'):
            self.assertEqual(value(
                s, 'zeoraid_backend_last_tid_timestamp_seconds',
                storage='1', backend=backend), raid_time)
            self.assertEqual(value(s, 'zeoraid_backend_lag_seconds',
                                   storage='1', backend=backend), 0)

        # disable b2, commit: b2 lags (an operator's disable is not
        # counted as a failure in zeoraid_backend_degrades_total)
        response = self.server.admin('disable', ['b2'])
        self.assertTrue(response['ok'], response)
        self.commit(db, 'after-disable', 1)
        s = self.scrape()
        self.assertEqual(value(s, 'zeoraid_status', storage='1',
                               status='degraded'), 1)
        self.assertEqual(value(s, 'zeoraid_backend_state', storage='1',
                               backend='b2', state='optimal'), 0)
        self.assertEqual(
            sum(value(s, 'zeoraid_backend_state', storage='1', backend='b2',
                      state=state) for state in ('degraded', 'disabled')), 1)
        for backend in ('b1', 'b2'):
            self.assertEqual(value(s, 'zeoraid_backend_degrades_total',
                                   storage='1', backend=backend), 0)
        self.assertGreater(value(s, 'zeoraid_backend_lag_seconds',
                                 storage='1', backend='b2'), 0)
        # one optimal backend left: still ready
        self.assertEqual(http_get(self.metrics, '/readyz')[0], 200)

        # recover b2: the recovery's numbers are exported
        response = self.server.admin('recover', ['b2'])
        self.assertTrue(response['ok'], response)
        wait_until(lambda: self.server.admin('status')['result']['status']
                   == 'optimal', 60, 'b2 recovered')
        s = self.scrape(openmetrics=True)
        self.assertEqual(value(s, 'zeoraid_status', storage='1',
                               status='optimal'), 1)
        labels = dict(storage='1', backend='b2')
        self.assertEqual(value(s, 'zeoraid_recovery_active', **labels), 0)
        self.assertGreaterEqual(value(
            s, 'zeoraid_recovery_transactions_copied', **labels), 1)
        self.assertIsNotNone(value(
            s, 'zeoraid_recovery_rate_transactions_per_second', **labels))
        self.assertIsNotNone(value(s, 'zeoraid_recovery_started_seconds',
                                   **labels))
        # A quiet recovery needed no back-pressure.
        self.assertEqual(value(s, 'zeoraid_recovery_backpressure_spells',
                               **labels), 0)
        self.assertEqual(value(s, 'zeoraid_backend_lag_seconds', **labels),
                         0)

        self.assertEqual(http_get(self.metrics, '/nothing')[0], 404)

    def test_readyz_503_when_failed(self):
        db = self.db()
        self.commit(db, 'x', 1)
        for backend in self.backends[:2]:
            backend.kill()
        # the RAID notices on the next call
        with self.assertRaises(Exception):
            self.commit(db, 'y', 2)
        transaction.abort()
        status, _, body = wait_until(
            lambda: (lambda r: r if r[0] == 503 else None)(
                http_get(self.metrics, '/readyz')), 30, 'readyz 503')
        self.assertIn('RAID 1 is', body)
        self.assertIn('with 0 optimal backends', body)
        # the process is alive and its event loop answers
        self.assertEqual(http_get(self.metrics, '/healthz')[0], 200)
        s = self.scrape()
        self.assertEqual(value(s, 'zeoraid_backends_optimal', storage='1'),
                         0)
        for backend in ('b1', 'b2'):
            self.assertEqual(value(s, 'zeoraid_backend_state', storage='1',
                                   backend=backend, state='optimal'), 0)
            self.assertEqual(value(s, 'zeoraid_backend_degrades_total',
                                   storage='1', backend=backend), 1)

    def test_metrics_address_in_use(self):
        """A taken metrics address stops the startup with one line."""
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(('127.0.0.1', 0))
        taken.listen(1)
        text = self.server.config_text(self.server.backends).replace(
            'address 127.0.0.1:0\n</metrics>',
            'address 127.0.0.1:%d\n</metrics>' % taken.getsockname()[1])
        conf = os.path.join(self.dir, 'taken.conf')
        with open(conf, 'w') as f:
            f.write(text.replace(self.server.pidfile,
                                 os.path.join(self.dir, 'taken.pid')))
        proc = subprocess.run(
            [sys.executable, '-m', 'zeoraid.server', '-C', conf],
            stdin=subprocess.DEVNULL, capture_output=True, text=True,
            timeout=60)
        self.assertEqual(proc.returncode, 2, proc.stderr)
        self.assertTrue(proc.stderr.startswith(
            'Error: cannot listen on metrics address 127.0.0.1:%d:'
            % taken.getsockname()[1]), proc.stderr)


class RenderTests(unittest.TestCase):
    """collect() and readiness() on a RAID over two FileStorages."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix='zeoraid-metrics-')
        self.raid = RAIDStorage('main', [
            (name, lambda name=name: ZODB.FileStorage.FileStorage(
                os.path.join(self.tmp, name + '.fs')))
            for name in ('a', 'b')])

    def tearDown(self):
        self.raid.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def test_render_and_readiness(self):
        db = ZODB.DB(self.raid)
        with db.transaction() as conn:
            conn.root()['x'] = 1
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        conn.root()['y'] = 2
        tm.abort()
        conn.close()
        storages = {'main': self.raid, 'plain': object()}
        for openmetrics in (False, True):
            s = parse(collect(storages, openmetrics), openmetrics)
            self.assertEqual(value(s, 'zeoraid_commits_total',
                                   storage='main'),
                             self.raid.stats.commits)
            self.assertGreaterEqual(value(s, 'zeoraid_commits_total',
                                          storage='main'), 1)
            self.assertIsNone(value(s, 'zeoraid_commits_total',
                                    storage='plain'))
        self.assertEqual(readiness(storages, True)[0], True)
        self.assertEqual(readiness(storages, False),
                         (False, 'not serving (starting or stopping)'))
        self.assertEqual(readiness({'plain': object()}, True),
                         (False, 'no RAID storage served'))
        self.raid.raid_disable('b')
        ready, reason = readiness(storages, True)
        self.assertTrue(ready, reason)
        self.assertEqual(reason, 'ready: main degraded')
        s = parse(collect(storages))
        self.assertEqual(value(s, 'zeoraid_backend_state', storage='main',
                               backend='b', state='degraded'), 1)
        self.assertEqual(value(s, 'zeoraid_backends_optimal',
                               storage='main'), 1)
        db.close()
