"""Where a RAID commit spends its time: phases of the commit path in-process.

    .venv/bin/python benchmarks/commit_phases.py [--commits N] [--objects K]

Drives the storage API directly (tpc_begin, store, tpc_vote, tpc_finish)
in this process, once on a plain ClientStorage and once on a RAIDStorage
over 1, 2 and 3 ClientStorage backends. Every configuration gets fresh
runzeo backend servers. Prints the median wall time of each phase and
this process's CPU per commit (all threads: the RAID's workers and the
backend clients' IO threads).

Without a front server in the way, this isolates what the RAID adds in
its own process. If fan-out were parallel, vote and finish would not grow
with the number of backends. When they grow by about one ClientStorage
commit per backend, the per-backend client work is serialised, whether
by CPU, by the GIL or by thread handoffs.
"""
import argparse
import functools
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import common  # noqa: E402

PHASES = ('begin', 'store', 'vote', 'finish', 'total')


def _client(server):
    import ZEO.ClientStorage
    return ZEO.ClientStorage.ClientStorage(server.addr, wait=True,
                                           wait_timeout=10)


def measure(storage, commits, objects, serials):
    """Commit `commits` times; serials: oid -> last serial (kept)."""
    from ZODB.Connection import TransactionMetaData
    from ZODB.utils import p64
    from ZODB.utils import z64
    times = {phase: [] for phase in PHASES}
    clock = time.perf_counter
    data = b'x' * 100
    cpu = time.process_time()
    for _ in range(commits):
        txn = TransactionMetaData()
        t0 = clock()
        storage.tpc_begin(txn)
        t1 = clock()
        for k in range(objects):
            oid = p64(k + 1)
            storage.store(oid, serials.get(oid, z64), data, '', txn)
        t2 = clock()
        storage.tpc_vote(txn)
        t3 = clock()
        tid = storage.tpc_finish(txn, lambda tid: None)
        t4 = clock()
        for k in range(objects):
            serials[p64(k + 1)] = tid
        for phase, value in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2,
                                         t4 - t3, t4 - t0)):
            times[phase].append(value)
    result = {phase: round(statistics.median(v) * 1000, 3)
              for phase, v in times.items()}
    result['cpu'] = round((time.process_time() - cpu) / commits * 1000, 3)
    return result


def run_config(workdir, label, backends, commits, objects):
    from zeoraid.storage import RAIDStorage
    directory = tempfile.mkdtemp(dir=workdir)
    servers = [common.Server(
        'b%d' % i, os.path.join(directory, 'b%d' % i),
        common.filestorage_config(os.path.join(directory, 'b%d' % i),
                                  blobs=False))
        for i in range(max(backends, 1))]
    with common.StopAll(servers):
        for server in servers:
            server.start()
        if backends == 0:
            storage = _client(servers[0])
        else:
            storage = RAIDStorage('phases', [
                ('b%d' % i, functools.partial(_client, s))
                for i, s in enumerate(servers)], timeout=20)
            assert storage.raid_status() == 'optimal', storage.raid_details()
        try:
            serials = {}
            measure(storage, max(commits // 10, 5), objects, serials)
            return label, measure(storage, commits, objects, serials)
        finally:
            storage.close()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--commits', type=int, default=500)
    parser.add_argument('--objects', type=int, default=1)
    parser.add_argument('--rounds', type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger('zeoraid').setLevel(logging.ERROR)
    workdir = tempfile.mkdtemp(prefix='zeoraid-bench-phases-')
    configs = [('ClientStorage', 0), ('RAID 1 backend', 1),
               ('RAID 2 backends', 2), ('RAID 3 backends', 3)]
    print('%d commits of %d object(s); median ms per phase, CPU ms per '
          'commit of this process' % (args.commits, args.objects))
    print('| storage | ' + ' | '.join(PHASES) + ' | CPU |')
    print('|---|' + '---:|' * (len(PHASES) + 1))
    try:
        for _ in range(args.rounds):
            for label, backends in configs:
                label, r = run_config(workdir, label, backends,
                                      args.commits, args.objects)
                print('| %s | %s | %.3f |' % (label, ' | '.join(
                    '%.3f' % r[p] for p in PHASES), r['cpu']), flush=True)
    finally:
        common.kill_leftovers()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == '__main__':
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
