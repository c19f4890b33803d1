"""A/B of the zeoraid server: this checkout against an earlier git revision.

    .venv/bin/python benchmarks/ab.py --base REV [--backends 1,2,3]
        [--clients 1] [--rounds 6] [--duration 2]

Machine drift on a small machine is larger than most single changes, so
comparing two full benchmark runs made minutes apart says little. Here
both versions run in the same process tree, at the same time: for every
backend count, a zeoraid server from this checkout (A) and one from
`REV` (B, its src/ exported with git archive and put first on the
server's PYTHONPATH) over their own runzeo backends, plus a plain ZEO
server. Rounds alternate the order. Each run commits one-object
transactions from `--clients` processes for `--duration` seconds.

Prints, per server: median commits/s over the rounds, the ratio to plain
ZEO, the zeoraid server's CPU per commit, and every round's figure.
"""
import argparse
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import bench  # noqa: E402
import common  # noqa: E402


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


def committer(addr, duration, key, answers):
    """One client process: commit one-object transactions."""
    import transaction
    import ZEO
    db = ZEO.DB(addr)
    try:
        conn = db.open()
        root = conn.root()
        done = 0
        deadline = time.monotonic() + duration
        while time.monotonic() < deadline:
            root[key]['n'] = done
            try:
                transaction.commit()
                done += 1
            except Exception:
                transaction.abort()
        answers.put(done)
    finally:
        db.close()


def prepare(topology, clients):
    import transaction
    import ZEO
    from persistent.mapping import PersistentMapping
    db = ZEO.DB(topology.front.addr)
    try:
        with transaction.manager:
            root = db.open().root()
            for i in range(clients):
                root['c%d' % i] = PersistentMapping()
    finally:
        db.close()


def one_run(topology, clients, duration):
    answers = multiprocessing.Queue()
    processes = [multiprocessing.Process(
        target=committer,
        args=(topology.front.addr, duration, 'c%d' % i, answers))
        for i in range(clients)]
    cpu_before = topology.front.cpu_seconds() or 0
    for process in processes:
        process.start()
    total = sum(answers.get(timeout=duration + 60) for _ in processes)
    for process in processes:
        process.join(30)
    cpu = (topology.front.cpu_seconds() or 0) - cpu_before
    return total / duration, cpu * 1000 / max(total, 1)


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
    workdir = tempfile.mkdtemp(prefix='zeoraid-ab-')
    base_src = export_source(args.base, tempfile.mkdtemp(dir=workdir))
    servers = []
    try:
        topologies = []
        for n in counts:
            for variant, path in (('A', None), ('B', base_src)):
                t = bench.Topology('%s-raid%d' % (variant, n), workdir, n)
                t.pythonpath = path
                topologies.append(t)
        plain = bench.Topology('zeo', workdir, 0)
        plain.pythonpath = None
        topologies.append(plain)
        servers = [s for t in topologies for s in t.servers]
        for t in topologies:
            for backend in t.backends:
                backend.start()
        for t in topologies:
            start_front(t, t.pythonpath)
            prepare(t, args.clients)
        rates = {t.name: [] for t in topologies}
        cpus = {t.name: [] for t in topologies}
        for r in range(args.rounds):
            for t in bench.rotated(topologies, r):
                rate, cpu = one_run(t, args.clients, args.duration)
                rates[t.name].append(rate)
                cpus[t.name].append(cpu)
        base_rate = statistics.median(rates['zeo'])
        print('A: this checkout, B: %s; %d client(s), %d rounds of %g s'
              % (args.base, args.clients, args.rounds, args.duration))
        print('| server | commits/s | ratio to zeo | front CPU ms/commit '
              '| rounds |')
        print('|---|---:|---:|---:|---|')
        for t in topologies:
            rate = statistics.median(rates[t.name])
            print('| %s | %.1f | %.3f | %.3f | %s |' % (
                t.name, rate, rate / base_rate,
                statistics.median(cpus[t.name]),
                ' '.join('%.0f' % x for x in rates[t.name])))
    finally:
        common.stop_all(servers)
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == '__main__':
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
