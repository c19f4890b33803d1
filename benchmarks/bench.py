"""zeoraid benchmark: plain ZEO versus zeoraid with 1, 2 and 3 ZEO backends.

    .venv/bin/python benchmarks/bench.py            # full run (~8 min)
    .venv/bin/python benchmarks/bench.py --quick    # smoke run (< 60 s)

Starts everything itself on 127.0.0.1 (stock runzeo processes), runs every
workload on every topology in the same run, alternating the order of the
topologies round by round to cancel machine drift, then the recovery
benchmark (benchmarks/recovery.py). Prints a table, writes JSON, a
Markdown table and (with matplotlib) a PNG chart to benchmarks/results/.
See benchmarks/README.md.
"""
import argparse
import concurrent.futures
import datetime
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import clients  # noqa: E402
import common  # noqa: E402
import recovery  # noqa: E402

logger = logging.getLogger('zeoraid.bench')

RESULTS_DIR = os.path.join(HERE, 'results')

#: name -> (title, unit, job kind)
WORKLOADS = {
    'commit_1obj': ('serial one-object commits', 'commits/s'),
    'commit_100obj': ('serial 100-object commits', 'commits/s'),
    'commit_8clients': ('8 concurrent committing clients (processes)',
                        'commits/s'),
    'load_cold': ('cold loads (client cache empty)', 'loads/s'),
    'load_warm': ('warm loads (client cache full)', 'loads/s'),
    'blob_write': ('1 MB blob write (one commit each)', 'commits/s'),
    'blob_read': ('1 MB blob read (blob cache empty)', 'reads/s'),
    'load_cold_readers': ('cold loads, concurrent readers, server caches '
                          'empty (server restarted)', 'loads/s'),
}
COMMIT_WORKLOADS = ('commit_1obj', 'commit_100obj', 'commit_8clients',
                    'blob_write')

#: (workload, topology, ratio threshold, description); 'raid2/raid3'
#: compares 3 backends with 2.
TARGETS = [
    ('commit_1obj', 'raid2', 0.55, 'serial 1-object commits, 2 backends'),
    ('commit_1obj', 'raid3/raid2', 0.90,
     'serial 1-object commits, 3 backends within 10% of 2'),
    ('commit_8clients', 'raid2', 0.80, '8 concurrent clients, 2 backends'),
    ('commit_8clients', 'raid3', 0.80, '8 concurrent clients, 3 backends'),
    ('load_warm', 'raid2', 0.90, 'warm loads, 2 backends'),
    ('load_cold', 'raid2', 0.60, 'cold loads, 2 backends'),
    ('load_cold', 'raid3', 0.60, 'cold loads, 3 backends'),
]

FULL = dict(rounds=3, duration=2.0, load_objects=4000, load_payload=1000,
            commit_payload=100, read_blobs=8, blob_max_ops=30,
            warm_objects=1000, readers=4, writers=8)
QUICK = dict(rounds=1, duration=0.3, load_objects=400, load_payload=1000,
             commit_payload=100, read_blobs=2, blob_max_ops=3,
             warm_objects=200, readers=4, writers=8)


#: Topology name suffix: a RAID whose backend clients have an IO thread
#: each (shared-backend-io off), e.g. raid2-own-io.
OWN_IO = '-own-io'


class Topology:
    """A front server (plain ZEO or zeoraid) and its backends."""

    def __init__(self, name, workdir, backends, proxy=False, extra=''):
        self.name = name
        self.directory = os.path.join(workdir, name)
        self.backends = []
        if proxy:
            # The one-extra-hop limit: plain ZEO over one ZEO backend.
            directory = os.path.join(self.directory, 'b1')
            self.backends.append(common.Server(
                '%s-b1' % name, directory,
                common.filestorage_config(directory)))
            front_dir = os.path.join(self.directory, 'proxy')
            self.front = common.Server(
                name, front_dir,
                common.proxy_config(front_dir, self.backends[0]))
        elif backends == 0:
            self.front = common.Server(
                name, self.directory,
                common.filestorage_config(self.directory))
        else:
            for i in range(backends):
                directory = os.path.join(self.directory, 'b%d' % (i + 1))
                self.backends.append(common.Server(
                    '%s-b%d' % (name, i + 1), directory,
                    common.filestorage_config(directory)))
            front_dir = os.path.join(self.directory, 'raid')
            self.front = common.Server(
                name, front_dir, common.raid_config(
                    front_dir, [('b%d' % (i + 1), b)
                                for i, b in enumerate(self.backends)],
                    extra=extra),
                module='zeoraid.server')
        self.data_oids = []
        self.blobs = []

    @property
    def servers(self):
        return self.backends + [self.front]

    @property
    def is_raid(self):
        return bool(self.backends)

    def cpu(self):
        return {'front': self.front.cpu_seconds(),
                'backends': sum(b.cpu_seconds() or 0 for b in self.backends)}

    def rss(self):
        return {'front': self.front.rss_bytes(),
                'backends': [b.rss_bytes() for b in self.backends]}


def make_topologies(workdir, names):
    topologies = []
    for name in names:
        if name == 'zeo':
            topologies.append(Topology(name, workdir, 0))
        elif name == 'zeoproxy':
            topologies.append(Topology(name, workdir, 1, proxy=True))
        elif name.startswith('raid') and name[4:].isdigit():
            topologies.append(Topology(name, workdir, int(name[4:])))
        elif (name.startswith('raid') and name.endswith(OWN_IO)
              and name[4:-len(OWN_IO)].isdigit()):
            # A/B of <raidstorage> shared-backend-io (zeoraid.ioloop).
            topologies.append(Topology(name, workdir,
                                       int(name[4:-len(OWN_IO)]),
                                       extra='shared-backend-io off'))
        else:
            raise SystemExit('unknown topology %r (zeo, zeoproxy, raid1, '
                             'raid2, ..., raid2%s, ...)' % (name, OWN_IO))
    return topologies


def start_topologies(topologies):
    """Start all backends in parallel, then all front servers."""
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda s: s.start(),
                      [b for t in topologies for b in t.backends]))
        list(pool.map(lambda t: t.front.start(), topologies))


# -- one run of one workload on one topology ----------------------------------

def job_base(topology, p, **kw):
    job = dict(addr=topology.front.addr, duration=p['duration'])
    job.update(kw)
    return job


def jobs_for(workload, topology, p):
    if workload == 'commit_1obj':
        return [job_base(topology, p, kind='commit', objects=1)]
    if workload == 'commit_100obj':
        return [job_base(topology, p, kind='commit', objects=100)]
    if workload == 'commit_8clients':
        return [job_base(topology, p, kind='commit', objects=1)
                for _ in range(p['writers'])]
    if workload == 'load_cold':
        return [job_base(topology, p, kind='load', mode='cold',
                         oids=topology.data_oids)]
    if workload == 'load_warm':
        return [job_base(topology, p, kind='load', mode='warm',
                         oids=topology.data_oids[:p['warm_objects']])]
    if workload == 'blob_write':
        return [job_base(topology, p, kind='blob_write',
                         max_ops=p['blob_max_ops'])]
    if workload == 'blob_read':
        return [job_base(topology, p, kind='blob_read',
                         blobs=topology.blobs)]
    if workload == 'load_cold_readers':
        n = p['readers']
        oids = topology.data_oids
        return [job_base(topology, p, kind='load', mode='cold', one_pass=True,
                         oids=oids[i::n]) for i in range(n)]
    raise ValueError(workload)


def backend_loads(pool, topology):
    """Per-server load counters (the backends', or the plain server's)."""
    servers = topology.backends or [topology.front]
    [result] = pool.run([dict(kind='status', servers=[
        (s.name, s.addr) for s in servers])])
    return {name: status.get('loads', 0)
            for name, status in result['status'].items()}


def run_once(pool, workload, topology, p):
    """One measured run; returns ops, elapsed, latencies, cpu, extras."""
    extra = {}
    if workload == 'load_cold_readers':
        # Empty the server's caches (for zeoraid: its backend clients').
        topology.front.restart()
        before_loads = backend_loads(pool, topology)
    cpu_before = topology.cpu()
    results = pool.run(jobs_for(workload, topology, p))
    cpu_after = topology.cpu()
    if workload == 'load_cold_readers':
        after_loads = backend_loads(pool, topology)
        extra['server_loads'] = {name: after_loads[name] - before_loads[name]
                                 for name in after_loads}
    ops = sum(r['ops'] for r in results)
    elapsed = max(r['elapsed'] for r in results) or 1e-9
    latencies = [x for r in results for x in r['latencies']]
    cpu = {k: (cpu_after[k] - cpu_before[k])
           if cpu_after[k] is not None and cpu_before[k] is not None
           else None for k in cpu_after}
    return dict(ops=ops, elapsed=elapsed, latencies=latencies, cpu=cpu,
                **extra)


def summarize(runs):
    ops = sum(r['ops'] for r in runs)
    elapsed = sum(r['elapsed'] for r in runs)
    latencies = [x for r in runs for x in r['latencies']]
    summary = dict(ops=ops, elapsed=round(elapsed, 4),
                   throughput=round(ops / elapsed, 2) if elapsed else None)
    summary.update(common.latency_summary(latencies))
    summary['rounds'] = [dict(ops=r['ops'], elapsed=round(r['elapsed'], 4),
                              throughput=round(r['ops'] / r['elapsed'], 2))
                         for r in runs]
    if ops and all(r['cpu']['front'] is not None for r in runs):
        summary['cpu_front_ms_per_op'] = round(
            sum(r['cpu']['front'] for r in runs) / ops * 1000, 4)
        summary['cpu_backends_ms_per_op'] = round(
            sum(r['cpu']['backends'] for r in runs) / ops * 1000, 4)
    if 'server_loads' in runs[0]:
        loads = {}
        for r in runs:
            for name, n in r['server_loads'].items():
                loads[name] = loads.get(name, 0) + n
        summary['server_loads'] = loads
    return summary


def rotated(items, k):
    k %= len(items)
    return items[k:] + items[:k]


def run_workloads(pool, topologies, workloads, p, log):
    results = {}
    for workload in workloads:
        runs = {t.name: [] for t in topologies}
        for round_no in range(p['rounds']):
            for topology in rotated(topologies, round_no):
                run = run_once(pool, workload, topology, p)
                runs[topology.name].append(run)
                log('%-18s round %d %-6s %8.1f %s/s' % (
                    workload, round_no + 1, topology.name,
                    run['ops'] / run['elapsed'],
                    WORKLOADS[workload][1].split('/')[0]))
        title, unit = WORKLOADS[workload]
        entry = {'title': title, 'unit': unit, 'topologies': {}}
        for topology in topologies:
            entry['topologies'][topology.name] = summarize(
                runs[topology.name])
        base = entry['topologies'].get('zeo')
        for name, summary in entry['topologies'].items():
            if base and base['throughput'] and summary['throughput']:
                summary['ratio'] = round(
                    summary['throughput'] / base['throughput'], 3)
        results[workload] = entry
    return results


def check_targets(results):
    checks = []
    for workload, topology, threshold, description in TARGETS:
        entry = results.get(workload, {}).get('topologies', {})
        if '/' in topology:
            a, b = topology.split('/')
            if a not in entry or b not in entry:
                continue
            value = entry[a]['throughput'] / entry[b]['throughput']
        else:
            if topology not in entry or 'ratio' not in entry[topology]:
                continue
            value = entry[topology]['ratio']
        checks.append(dict(workload=workload, topology=topology,
                           description=description, target=threshold,
                           value=round(value, 3), met=value >= threshold))
    return checks


def resource_figures(rss_start, rss_end, results):
    """RSS of each front server, and the cost of one more backend."""
    figures = {'rss_start_bytes': rss_start, 'rss_end_bytes': rss_end}
    raids = sorted((int(n[4:]), n) for n in rss_end
                   if n.startswith('raid') and n[4:].isdigit())
    if len(raids) >= 2:
        (n1, first), (n2, last) = raids[0], raids[-1]
        for label, table in (('start', rss_start), ('end', rss_end)):
            figures['rss_per_backend_bytes_%s' % label] = int(
                (table[last]['front'] - table[first]['front']) / (n2 - n1))
    commit = results.get('commit_1obj', {}).get('topologies', {})
    figures['cpu_ms_per_commit'] = {
        name: {'front': s.get('cpu_front_ms_per_op'),
               'backends': s.get('cpu_backends_ms_per_op')}
        for name, s in commit.items()}
    return figures


# -- output -------------------------------------------------------------------

def fmt(value, digits=2):
    if value is None:
        return '-'
    if isinstance(value, float):
        return ('%.' + str(digits) + 'f') % value
    return str(value)


def markdown_table(data):
    meta = data['meta']
    machine = meta.get('machine', {})
    lines = ['Run %s%s: git %s, Python %s, ZODB %s, ZEO %s, %s CPUs, load '
             'average %s at start, %s at end; %d round(s) of %g s per '
             'workload and topology.' % (
                 meta['date'], ' (--quick)' if meta.get('quick') else '',
                 machine.get('git', '?'), machine.get('python', '?'),
                 machine.get('ZODB', '?'), machine.get('ZEO', '?'),
                 machine.get('cpus', '?'),
                 '/'.join(machine.get('loadavg', ['?'])),
                 '/'.join(meta.get('loadavg_end') or ['?']),
                 meta['params']['rounds'], meta['params']['duration']),
             '',
             'Machine speed (a plain Python loop on one core, to tell a fast '
             'day from a slow one): %s M iterations/s at start, %s at end; '
             'CPU steal during the run: %s%%.' % (
                 meta.get('speed_start', '?'), meta.get('speed_end', '?'),
                 fmt(meta.get('cpu_steal_percent'), 1)),
             '',
             '| workload | topology | throughput | median ms | p99 ms | '
             'ratio to zeo | server CPU ms/op (front + backends) |',
             '|---|---|---:|---:|---:|---:|---:|']
    for workload, entry in data['workloads'].items():
        for name, s in entry['topologies'].items():
            cpu = '-'
            if s.get('cpu_front_ms_per_op') is not None and \
                    workload in COMMIT_WORKLOADS:
                cpu = '%.2f + %.2f' % (s['cpu_front_ms_per_op'],
                                       s['cpu_backends_ms_per_op'])
            lines.append('| %s | %s | %s %s | %s | %s | %s | %s |' % (
                workload, name, fmt(s['throughput'], 1), entry['unit'],
                fmt(s['median_ms'], 3), fmt(s['p99_ms'], 3),
                fmt(s.get('ratio'), 2), cpu))
    readers = data['workloads'].get('load_cold_readers')
    if readers:
        lines += ['', '| topology | loads served by each backend server '
                  '(load_cold_readers) |', '|---|---|']
        for name, s in readers['topologies'].items():
            lines.append('| %s | %s |' % (name, ', '.join(
                '%s: %d' % kv for kv in sorted(
                    s.get('server_loads', {}).items()))))
    if data.get('targets'):
        lines += ['', '| target | required | achieved | met |',
                  '|---|---:|---:|---|']
        for c in data['targets']:
            lines.append('| %s (%s) | >= %.2f | %.3f | %s |' % (
                c['description'], c['topology'], c['target'], c['value'],
                'yes' if c['met'] else 'NO'))
    hop = one_hop_table(data['workloads'])
    if hop:
        lines += [''] + hop
    res = data.get('resources')
    if res:
        lines += ['', '| server | RSS after start | RSS at end | CPU ms per '
                  'one-object commit (front + backends) |',
                  '|---|---:|---:|---:|']
        for name, end in res['rss_end_bytes'].items():
            start = res['rss_start_bytes'].get(name, {})
            cpu = res['cpu_ms_per_commit'].get(name, {})
            lines.append('| %s | %.1f MB | %.1f MB | %s + %s |' % (
                name, (start.get('front') or 0) / 1e6,
                (end['front'] or 0) / 1e6, fmt(cpu.get('front'), 3),
                fmt(cpu.get('backends'), 3)))
        for label in ('start', 'end'):
            key = 'rss_per_backend_bytes_%s' % label
            if key in res:
                lines.append('')
                lines.append('RSS of the zeoraid server per backend (%s): '
                             '%.1f MB' % (label, res[key] / 1e6))
    rec = data.get('recovery')
    if rec:
        lines += ['', recovery.markdown_table(rec)]
    return '\n'.join(lines)


def one_hop_table(workloads):
    """Throughput relative to zeoproxy (ZEO over one ZEO: one extra hop)."""
    rows = []
    for workload in COMMIT_WORKLOADS:
        entry = workloads.get(workload, {}).get('topologies', {})
        proxy = entry.get('zeoproxy', {}).get('throughput')
        if not proxy:
            continue
        ratios = ['%s %.2f' % (name, s['throughput'] / proxy)
                  for name, s in entry.items()
                  if name.startswith('raid') and s.get('throughput')]
        rows.append('| %s | %.2f | %s |' % (
            workload, entry['zeoproxy'].get('ratio') or 0,
            ', '.join(ratios)))
    if not rows:
        return []
    return ['| workload | zeoproxy / zeo (the one-hop limit) | zeoraid / '
            'zeoproxy |', '|---|---:|---|'] + rows


def write_chart(data, path):
    """A PNG for people who would rather look than read (matplotlib)."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return ('no chart: matplotlib is not installed (install it with '
                '.venv/bin/pip install matplotlib)')
    workloads = [w for w in data['workloads']
                 if 'zeo' in data['workloads'][w]['topologies']]
    raids = sorted({n for w in workloads
                    for n in data['workloads'][w]['topologies']
                    if n != 'zeo'})
    panels = 2 + bool(data.get('recovery'))
    fig, axes = plt.subplots(panels, 1, figsize=(11, 4.2 * panels))
    ax = axes[0]
    width = 0.8 / max(len(raids), 1)
    for i, name in enumerate(raids):
        values = [data['workloads'][w]['topologies'].get(name, {})
                  .get('ratio') or 0 for w in workloads]
        ax.bar([x + i * width for x in range(len(workloads))], values,
               width, label=name)
    ax.axhline(1.0, color='black', linewidth=0.8)
    ax.set_xticks([x + width * (len(raids) - 1) / 2
                   for x in range(len(workloads))])
    ax.set_xticklabels(workloads, rotation=20, fontsize=8)
    ax.set_ylabel('throughput / plain ZEO')
    ax.set_title('zeoraid throughput relative to plain ZEO (same run)')
    ax.legend(fontsize=8)
    ax = axes[1]
    names = ['zeo'] + raids
    for i, name in enumerate(names):
        values = [data['workloads'][w]['topologies'].get(name, {})
                  .get('median_ms') or 0 for w in workloads]
        ax.bar([x + i * 0.8 / len(names) for x in range(len(workloads))],
               values, 0.8 / len(names), label=name)
    ax.set_yscale('log')
    ax.set_xticks([x + 0.4 - 0.4 / len(names)
                   for x in range(len(workloads))])
    ax.set_xticklabels(workloads, rotation=20, fontsize=8)
    ax.set_ylabel('median latency, ms (log)')
    ax.legend(fontsize=8)
    if data.get('recovery'):
        recovery.chart(axes[2], data['recovery'])
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return None


def machine_speed(seconds=0.5):
    """Millions of iterations/s of a plain Python loop on one core: how
    fast this machine runs today. Ratios compare within one run; this
    tells runs on a fast and a slow day apart."""
    count = 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(10000):
            count += 1
    return round(count / seconds / 1e6, 2)


def cpu_times():
    """The machine's CPU time counters (/proc/stat), or None."""
    try:
        with open('/proc/stat') as f:
            return [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None


def steal_percent(before, after):
    """CPU time the hypervisor gave to others between two cpu_times()."""
    if not before or not after or len(before) < 8:
        return None
    deltas = [b - a for a, b in zip(before, after)]
    total = sum(deltas[:8])
    return round(100.0 * deltas[7] / total, 1) if total else None


def machine_info():
    info = dict(python=sys.version.split()[0], platform=platform.platform(),
                cpus=os.cpu_count())
    try:
        info['loadavg'] = open('/proc/loadavg').read().split()[:3]
    except OSError:
        pass
    try:
        head = subprocess.run(
            ['git', 'rev-parse', '--short', 'HEAD'], cwd=HERE,
            capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(
            ['git', 'status', '--porcelain', '--untracked-files=no',
             '--', 'src'], cwd=HERE, capture_output=True, text=True,
            timeout=10).stdout.strip()
        if head:
            info['git'] = head + (' (src/ modified)' if dirty else '')
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        from importlib.metadata import version
        for name in ('ZODB', 'ZEO', 'zeoraid'):
            info[name] = version(name)
    except Exception:
        pass
    return info


# -- main ---------------------------------------------------------------------

def parse_args(argv):
    parser = argparse.ArgumentParser(
        description='Benchmark zeoraid against plain ZEO on 127.0.0.1.')
    parser.add_argument('--quick', action='store_true',
                        help='smoke run: tiny counts, one round (< 60 s)')
    parser.add_argument('--rounds', type=int,
                        help='rounds per workload (topology order rotates)')
    parser.add_argument('--duration', type=float,
                        help='seconds per run (one workload, topology, '
                             'round)')
    parser.add_argument('--topologies',
                        default='zeo,zeoproxy,raid1,raid2,raid3',
                        help='comma separated (default %(default)s)')
    parser.add_argument('--workloads', default=','.join(WORKLOADS),
                        help='comma separated subset of: %s'
                             % ', '.join(WORKLOADS))
    parser.add_argument('--no-recovery', action='store_true',
                        help='skip the recovery benchmark')
    parser.add_argument('--backlog', type=int,
                        help='recovery backlog in transactions '
                             '(default 10000, quick 300)')
    parser.add_argument('--recovery-rate', type=float,
                        help='recovery-txn-rate of the rate-limited '
                             'recovery (default: half of the unlimited '
                             'rate reached in the same run)')
    parser.add_argument('--output-dir', default=RESULTS_DIR,
                        help='where JSON/Markdown/PNG go (default '
                             'benchmarks/results)')
    parser.add_argument('--workdir', help='where servers keep their data '
                        '(default: a new temporary directory, removed)')
    parser.add_argument('--keep', action='store_true',
                        help='keep the work directory (server logs, data)')
    parser.add_argument('--no-chart', action='store_true')
    args = parser.parse_args(argv)
    p = dict(QUICK if args.quick else FULL)
    if args.rounds:
        p['rounds'] = args.rounds
    if args.duration:
        p['duration'] = args.duration
    args.params = p
    args.topology_names = [t.strip() for t in args.topologies.split(',')
                           if t.strip()]
    args.workload_names = [w.strip() for w in args.workloads.split(',')
                           if w.strip()]
    for w in args.workload_names:
        if w not in WORKLOADS:
            parser.error('unknown workload %r' % w)
    return args


def _terminate(signum, frame):
    raise KeyboardInterrupt('signal %d' % signum)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING,
                        format='%(asctime)s %(levelname)s %(name)s '
                               '%(message)s')
    # Explicit, also where SIGINT was ignored (a background job of a
    # script): Ctrl-C and SIGTERM both end in the cleanup below.
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)
    started = time.monotonic()

    def log(message):
        sys.stdout.write('[%6.1fs] %s\n' % (time.monotonic() - started,
                                            message))
        sys.stdout.flush()

    p = args.params
    workdir = args.workdir or tempfile.mkdtemp(prefix='zeoraid-bench-')
    os.makedirs(workdir, exist_ok=True)
    os.makedirs(args.output_dir, exist_ok=True)
    stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
    stem = os.path.join(args.output_dir, 'bench-%s%s' % (
        stamp, '-quick' if args.quick else ''))
    data = dict(meta=dict(date=stamp, quick=args.quick, params=p,
                          topologies=args.topology_names,
                          machine=machine_info(), workdir=workdir,
                          speed_start=machine_speed()),
                workloads={})
    cpu_start = cpu_times()
    topologies = make_topologies(workdir, args.topology_names)
    servers = [s for t in topologies for s in t.servers]
    pool = clients.WorkerPool(max(p['writers'], p['readers'], 1), workdir)
    try:
        with common.StopAll(servers), pool:
            log('starting %d servers and %d client processes in %s'
                % (len(servers), pool.size, workdir))
            start_topologies(topologies)
            rss_start = {t.name: t.rss() for t in topologies}
            for topology in topologies:
                [result] = pool.run([job_base(
                    topology, p, kind='setup', blobs=True,
                    writers=p['writers'], commit_payload=p['commit_payload'],
                    load_objects=p['load_objects'],
                    load_payload=p['load_payload'],
                    read_blobs=p['read_blobs'])])
                topology.data_oids = result['data_oids']
                topology.blobs = result['blobs']
            log('setup done: %d objects, %d blobs per topology'
                % (len(topologies[0].data_oids), len(topologies[0].blobs)))
            data['workloads'] = run_workloads(
                pool, topologies, args.workload_names, p, log)
            rss_end = {t.name: t.rss() for t in topologies}
            data['resources'] = resource_figures(rss_start, rss_end,
                                                 data['workloads'])
            data['targets'] = check_targets(data['workloads'])
        if not args.no_recovery:
            log('recovery benchmark')
            data['recovery'] = recovery.run(
                os.path.join(workdir, 'recovery'), quick=args.quick,
                backlog=args.backlog, txn_rate=args.recovery_rate, log=log)
    finally:
        common.kill_leftovers()
        if not (args.keep or args.workdir):
            shutil.rmtree(workdir, ignore_errors=True)
    data['meta']['seconds'] = round(time.monotonic() - started, 1)
    data['meta']['loadavg_end'] = machine_info().get('loadavg')
    data['meta']['cpu_steal_percent'] = steal_percent(cpu_start, cpu_times())
    data['meta']['speed_end'] = machine_speed()
    with open(stem + '.json', 'w') as f:
        json.dump(data, f, indent=1, sort_keys=False)
    table = markdown_table(data)
    with open(stem + '.md', 'w') as f:
        f.write(table + '\n')
    print()
    print(table)
    print()
    print('JSON:     %s.json' % stem)
    print('Markdown: %s.md' % stem)
    if not args.no_chart:
        problem = write_chart(data, stem + '.png')
        print(problem or 'Chart:    %s.png' % stem)
    print('total %.0f s' % (time.monotonic() - started))
    return 0


if __name__ == '__main__':
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.stderr.write('interrupted: servers and clients stopped\n')
        sys.exit(130)
