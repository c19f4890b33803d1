"""Smoke test of the benchmark suite: `benchmarks/bench.py --quick`.

It must run from the repository with one command, start and stop all of
its servers and clients itself, and write JSON with every workload for
every topology plus the recovery scenarios. Only that is checked: no
timing assertions (figures on a shared 2-core machine prove nothing).
"""
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, 'benchmarks', 'bench.py')
TIMEOUT = 300

WORKLOADS = ('commit_1obj', 'commit_100obj', 'commit_8clients', 'load_cold',
             'load_warm', 'blob_write', 'blob_read', 'load_cold_readers')
TOPOLOGIES = ('zeo', 'zeoproxy', 'raid1', 'raid2', 'raid3')
SCENARIOS = ('naive', 'read, then commit', 'recover', 'recover+live',
             'limited+live')


def _has_matplotlib():
    return subprocess.run(
        [sys.executable, '-c', 'import matplotlib'],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0


class QuickBenchmarkLayer:
    """Runs `bench.py --quick` once for all the tests of this module."""

    @classmethod
    def setUp(cls):
        cls.out = tempfile.mkdtemp(prefix='zeoraid-bench-smoke-')
        # Own session: on a timeout the whole group (servers, clients)
        # is killed, nothing outlives the test.
        process = subprocess.Popen(
            [sys.executable, BENCH, '--quick', '--output-dir', cls.out],
            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, start_new_session=True)
        try:
            output, _ = process.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
        cls.returncode = process.returncode
        cls.output = output.decode('utf-8', 'replace')
        paths = glob.glob(os.path.join(cls.out, 'bench-*-quick.json'))
        cls.data = None
        if len(paths) == 1:
            with open(paths[0]) as f:
                cls.data = json.load(f)
        cls.stem = paths[0][:-len('.json')] if paths else None

    @classmethod
    def tearDown(cls):
        shutil.rmtree(cls.out, ignore_errors=True)


class BenchmarkSmokeTests(unittest.TestCase):

    layer = QuickBenchmarkLayer

    def setUp(self):
        run = QuickBenchmarkLayer
        self.assertEqual(run.returncode, 0,
                         'bench.py --quick failed:\n' + run.output[-6000:])
        self.assertIsNotNone(run.data, 'no JSON written:\n'
                             + run.output[-3000:])
        self.data = run.data
        self.output = run.output
        self.stem = run.stem

    def test_every_workload_ran_on_every_topology(self):
        self.assertEqual(set(self.data['workloads']), set(WORKLOADS))
        for workload, entry in self.data['workloads'].items():
            self.assertEqual(set(entry['topologies']), set(TOPOLOGIES),
                             workload)
            for name, summary in entry['topologies'].items():
                where = '%s on %s' % (workload, name)
                self.assertGreater(summary['ops'], 0, where)
                self.assertGreater(summary['throughput'], 0, where)
                self.assertIsNotNone(summary['median_ms'], where)
                self.assertIsNotNone(summary['p99_ms'], where)
                self.assertIn('ratio', summary, where)

    def test_cold_readers_reached_the_backend_servers(self):
        entry = self.data['workloads']['load_cold_readers']['topologies']
        for name in TOPOLOGIES:
            loads = entry[name]['server_loads']
            expected = 1 if name in ('zeo', 'zeoproxy') else int(name[4:])
            self.assertEqual(len(loads), expected, name)
            self.assertGreater(sum(loads.values()), 0, name)

    def test_resources_and_targets_reported(self):
        resources = self.data['resources']
        self.assertEqual(set(resources['rss_end_bytes']), set(TOPOLOGIES))
        for name in TOPOLOGIES:
            self.assertGreater(resources['rss_end_bytes'][name]['front'], 0)
            self.assertIn(name, resources['cpu_ms_per_commit'])
        self.assertIn('rss_per_backend_bytes_end', resources)
        self.assertTrue(self.data['targets'])

    def test_recovery_scenarios(self):
        recovery = self.data['recovery']
        self.assertGreater(recovery['backlog_txns'], 0)
        scenarios = {s['scenario']: s for s in recovery['scenarios']}
        self.assertEqual(set(scenarios), set(SCENARIOS))
        for name in ('naive', 'read, then commit', 'recover',
                     'recover+live'):
            self.assertTrue(scenarios[name]['caught_up'], scenarios[name])
            self.assertGreaterEqual(scenarios[name]['txns'],
                                    recovery['backlog_txns'])
        bounds = scenarios['read, then commit']
        self.assertGreater(bounds['read_txn_per_s'], 0)
        self.assertGreater(bounds['commit_txn_per_s'], 0)
        limited = scenarios['limited+live']
        self.assertGreater(limited['txn_rate_limit'], 0)
        for key in ('live_before', 'live_during', 'live_after'):
            self.assertIsNotNone(limited[key]['median_ms'], key)

    def test_table_and_chart(self):
        with open(self.stem + '.md') as f:
            table = f.read()
        for workload in WORKLOADS:
            self.assertIn('| %s | raid3 |' % workload, table)
        # How fast the machine ran, so runs of different days compare.
        self.assertRegex(table, r'Machine speed .*: [0-9.]+ M iterations/s '
                                r'at start, [0-9.]+ at end; CPU steal '
                                r'during the run: [0-9.]+%')
        self.assertGreater(self.data['meta']['speed_start'], 0)
        self.assertIn('| %s | raid3 |' % WORKLOADS[0], self.output)
        # Each zeoraid topology against the one-extra-hop limit.
        self.assertRegex(table, r'\| commit_1obj \| [0-9.]+ \| raid1 '
                                r'[0-9.]+, raid2 [0-9.]+, raid3 [0-9.]+ \|')
        if _has_matplotlib():
            self.assertTrue(os.path.exists(self.stem + '.png'))
        else:
            self.assertIn('matplotlib is not installed', self.output)


class ABSmokeTests(unittest.TestCase):
    """benchmarks/ab.py: this checkout against a git revision, one round."""

    def test_ab_against_head(self):
        process = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, 'benchmarks', 'ab.py'),
             '--base', 'HEAD', '--backends', '1', '--rounds', '1',
             '--duration', '0.3'],
            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, start_new_session=True)
        try:
            output, _ = process.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
        output = output.decode('utf-8', 'replace')
        self.assertEqual(process.returncode, 0, output[-3000:])
        # A is this tree's src, first on its server's PYTHONPATH.
        self.assertIn('A: this checkout (%s)' % os.path.join(ROOT, 'src'),
                      output)
        for server in ('A-raid1', 'B-raid1', 'zeo'):
            self.assertRegex(output, r'\| %s \| [0-9.]+ \| [0-9.]+ \| '
                                     r'[0-9.]+ \| [0-9]+ \|' % server)

    def test_unknown_revision_is_one_line(self):
        process = subprocess.run(
            [sys.executable, os.path.join(ROOT, 'benchmarks', 'ab.py'),
             '--base', 'no-such-revision'],
            cwd=ROOT, capture_output=True, text=True, timeout=60)
        self.assertNotEqual(process.returncode, 0)
        self.assertEqual(len(process.stderr.strip().splitlines()), 1,
                         process.stderr)
        self.assertIn('ab: cannot export no-such-revision', process.stderr)
