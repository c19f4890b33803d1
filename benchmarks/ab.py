"""A/B of the zeoraid server: this checkout against an earlier git revision.

    .venv/bin/python benchmarks/ab.py --base REV [--backends 1,2,3]
        [--clients 1] [--rounds 6] [--duration 2]

Machine drift on a small machine is larger than most single changes, so
comparing two full benchmark runs made minutes apart says little. Here
both versions run in the same process tree, at the same time: for every
backend count, a zeoraid server from this checkout (A) and one from
`REV` (B, its src/ exported with git archive and put first on the
server's PYTHONPATH) over their own runzeo backends, plus a plain ZEO
server. Rounds alternate the order. Each run is bench.py's commit_1obj
workload (or commit_8clients with `--clients` N > 1: N committing
client processes) for `--duration` seconds, with bench.py's client
processes and jobs.

Prints, per server: median commits/s over the rounds, the ratio to plain
ZEO, the zeoraid server's CPU per commit over all rounds, and every
round's figure.
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import bench  # noqa: E402
import clients  # noqa: E402
import common  # noqa: E402


def checkout_source():
    """The src/ of the checkout this script is in (A's zeoraid).

    Put first on A's PYTHONPATH, so that A is this tree's code even when
    the virtualenv's editable install points at another checkout (a git
    worktree made for an experiment).
    """
    return os.path.join(os.path.dirname(HERE), 'src')


def export_source(rev, directory):
    """git archive REV src into directory; returns its src path."""
    root = os.path.dirname(HERE)
    archive = subprocess.run(['git', 'archive', rev, 'src'], cwd=root,
                             capture_output=True, check=False)
    if archive.returncode:
        raise SystemExit('ab: cannot export %s: %s' % (
            rev, archive.stderr.decode(errors='replace').strip()))
    subprocess.run(['tar', '-x', '-C', directory], input=archive.stdout,
                   check=True)
    return os.path.join(directory, 'src')


def start_front(topology, pythonpath):
    if pythonpath:
        os.environ['PYTHONPATH'] = pythonpath
    try:
        topology.front.start()
    finally:
        os.environ.pop('PYTHONPATH', None)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--base', required=True,
                        help='git revision to compare with (B)')
    parser.add_argument('--backends', default='1,2,3')
    parser.add_argument('--clients', type=int, default=1)
    parser.add_argument('--rounds', type=int, default=6)
    parser.add_argument('--duration', type=float, default=2.0)
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.backends.split(',') if n.strip()]
    # bench.py's own workloads, jobs and client processes; few load
    # objects, as only commits are measured.
    p = dict(bench.QUICK, rounds=args.rounds, duration=args.duration,
             writers=max(args.clients, 1))
    workload = 'commit_1obj' if args.clients <= 1 else 'commit_8clients'
    workdir = tempfile.mkdtemp(prefix='zeoraid-ab-')
    base_src = export_source(args.base, tempfile.mkdtemp(dir=workdir))
    topologies = [bench.Topology('zeo', workdir, 0)]
    topologies[0].pythonpath = None
    for n in counts:
        for variant, path in (('A', checkout_source()), ('B', base_src)):
            t = bench.Topology('%s-raid%d' % (variant, n), workdir, n)
            t.pythonpath = path
            topologies.append(t)
    servers = [s for t in topologies for s in t.servers]
    pool = clients.WorkerPool(p['writers'], workdir)
    try:
        with common.StopAll(servers), pool:
            for t in topologies:
                for backend in t.backends:
                    backend.start()
                start_front(t, t.pythonpath)
                pool.run([bench.job_base(
                    t, p, kind='setup', blobs=False, writers=p['writers'],
                    commit_payload=p['commit_payload'], load_objects=1,
                    load_payload=1, read_blobs=0)])
            results = bench.run_workloads(pool, topologies, [workload], p,
                                          lambda message: None)
    finally:
        common.kill_leftovers()
        shutil.rmtree(workdir, ignore_errors=True)
    summaries = results[workload]['topologies']
    rates = {name: [r['throughput'] for r in summary['rounds']]
             for name, summary in summaries.items()}
    base_rate = statistics.median(rates['zeo'])
    print('A: this checkout (%s), B: %s; %d client(s), %d rounds of %g s'
          % (checkout_source(), args.base, p['writers'], args.rounds,
             args.duration))
    print('| server | commits/s | ratio to zeo | front CPU ms/commit '
          '| rounds |')
    print('|---|---:|---:|---:|---|')
    for t in topologies[1:] + topologies[:1]:
        rate = statistics.median(rates[t.name])
        print('| %s | %.1f | %.3f | %.3f | %s |' % (
            t.name, rate, rate / base_rate,
            summaries[t.name].get('cpu_front_ms_per_op') or 0,
            ' '.join('%.0f' % x for x in rates[t.name])))
    return 0


if __name__ == '__main__':
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
