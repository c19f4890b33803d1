"""Recovery benchmark: RAIDStorage.raid_recover versus the naive copy.

    .venv/bin/python benchmarks/recovery.py           # 10,000-txn backlog
    .venv/bin/python benchmarks/recovery.py --quick   # 300-txn backlog

(bench.py runs it too, after the other workloads.)

Two stock runzeo servers on 127.0.0.1 play a RAID's backends: the source
holds a prefix plus a backlog of N transactions, the target only the
prefix (its files are copies made once, in-process, so every scenario
starts from the same backlog in a second). An in-process RAIDStorage over
two ClientStorages opens with the target degraded ("missing
transactions") and recovers it. Scenarios, all in the same run:

    naive        zeoraid.recovery.naive_copy (one transaction at a time)
    recover      raid_recover, no rate limit, no live commits
    recover+live raid_recover, no rate limit, paced live commits through
                 the RAID; must catch up
    limited+live raid_recover with recovery-txn-rate (default: half the
                 rate `recover` reached in this run), paced live commits.
                 Live commit latency is measured before (no recovery),
                 during a fixed window of the recovery, and after it was
                 stopped (no recovery again): A-B-A, so drift shows. The
                 copy rate reached in the window shows the limit at work
                 (limit + live credit). The recovery is then stopped
                 (raid_recovery().stop()), which is what an operator's
                 stop does: the target goes back to degraded.
"""
import argparse
import datetime
import functools
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import common  # noqa: E402

logger = logging.getLogger('zeoraid.bench')

HOT_OBJECTS = 500
RECORDS_PER_TXN = 3
PAYLOAD = 600

#: txn_rate None: half of what the unlimited recovery reached in this run.
FULL = dict(backlog=10000, txn_rate=None, live_rate=50, baseline=5.0,
            window=10.0)
QUICK = dict(backlog=300, txn_rate=None, live_rate=20, baseline=1.0,
             window=1.0)


def build_seed(directory, backlog):
    """prefix.fs (the target) and full.fs (prefix + backlog, the source)."""
    import persistent.list
    import persistent.mapping
    import transaction
    import ZODB
    import ZODB.FileStorage
    import ZODB.utils
    PM = persistent.mapping.PersistentMapping
    os.makedirs(directory, exist_ok=True)
    prefix = os.path.join(directory, 'prefix.fs')
    full = os.path.join(directory, 'full.fs')
    db = ZODB.DB(ZODB.FileStorage.FileStorage(prefix))
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    root = conn.root()
    root['live'] = PM(n=0)
    root['hot'] = persistent.list.PersistentList(
        PM(n=0, payload=b'') for _ in range(HOT_OBJECTS))
    tm.commit()
    prefix_last = db.storage.lastTransaction()
    conn.close()
    db.close()
    common.copy_storage_files(prefix, full)
    db = ZODB.DB(ZODB.FileStorage.FileStorage(full))
    conn = db.open(tm)
    hot = conn.root()['hot']
    for i in range(backlog):
        for k in range(RECORDS_PER_TXN):
            obj = hot[(i * RECORDS_PER_TXN + k) % HOT_OBJECTS]
            obj['n'] = i
            obj['payload'] = (b'%09d' % (i * 7 + k)) * (PAYLOAD // 9)
        tm.get().note('backlog %d' % i)
        tm.commit()
    conn.close()
    storage = db.storage
    txns = 0
    nbytes = 0
    start = ZODB.utils.p64(ZODB.utils.u64(prefix_last) + 1)
    for txn in storage.iterator(start):
        txns += 1
        nbytes += sum(len(r.data or b'') for r in txn)
    db.close()
    return dict(prefix=prefix, full=full, prefix_last=prefix_last,
                txns=txns, bytes=nbytes)


class Backends:
    """The source and target runzeo servers, reset to the seed files."""

    def __init__(self, directory, seed):
        self.seed = seed
        self.src = common.Server('recovery-src', os.path.join(
            directory, 'src'), common.filestorage_config(
                os.path.join(directory, 'src'), blobs=False))
        self.tgt = common.Server('recovery-tgt', os.path.join(
            directory, 'tgt'), common.filestorage_config(
                os.path.join(directory, 'tgt'), blobs=False))

    def reset(self):
        common.stop_all([self.src, self.tgt])
        for server, path in ((self.src, self.seed['full']),
                             (self.tgt, self.seed['prefix'])):
            common.copy_storage_files(
                path, os.path.join(server.directory, 'Data.fs'))
        self.src.start()
        self.tgt.start()

    def stop(self):
        common.stop_all([self.src, self.tgt])


def _client(addr):
    import ZEO.ClientStorage
    # A short wait_timeout: after Ctrl-C (servers gone) nothing waits long.
    return ZEO.ClientStorage.ClientStorage(addr, storage='1', wait=True,
                                           wait_timeout=10)


def last_tid(storage):
    from zeoraid.backend import authoritative_last_tid
    return authoritative_last_tid(storage)


def run_naive(backends):
    from ZODB.utils import p64
    from ZODB.utils import u64
    from zeoraid.recovery import naive_copy
    src = _client(backends.src.addr)
    tgt = _client(backends.tgt.addr)
    try:
        start = p64(u64(backends.seed['prefix_last']) + 1)
        t0 = time.perf_counter()
        count = naive_copy(src, tgt, start)
        elapsed = time.perf_counter() - t0
        same = last_tid(src) == last_tid(tgt)
    finally:
        src.close()
        tgt.close()
    return dict(scenario='naive', txns=count, bytes=backends.seed['bytes'],
                seconds=round(elapsed, 3),
                txn_per_s=round(count / elapsed, 1),
                mb_per_s=round(backends.seed['bytes'] / elapsed / 1e6, 3),
                caught_up=same)


def run_bounds(backends):
    """The two halves of a copy, each alone: read everything, then commit.

    Both through plain ClientStorage calls (one round trip at a time).
    recover reads in batches (direct.BatchIterator) and keeps several
    restores in flight (direct.RestoreStream), so it can beat both.
    """
    from ZODB.utils import p64
    from ZODB.utils import u64
    from zeoraid.recovery import CopiedTransaction
    src = _client(backends.src.addr)
    tgt = _client(backends.tgt.addr)
    try:
        start = p64(u64(backends.seed['prefix_last']) + 1)
        t0 = time.perf_counter()
        txns = [CopiedTransaction(info) for info in src.iterator(start)]
        t1 = time.perf_counter()
        for txn in txns:
            tgt.tpc_begin(txn, txn.tid, txn.status)
            for record in txn:
                tgt.restore(record.oid, record.tid, record.data, '',
                            record.data_txn, txn)
            tgt.tpc_vote(txn)
            tgt.tpc_finish(txn)
        t2 = time.perf_counter()
        same = last_tid(src) == last_tid(tgt)
    finally:
        src.close()
        tgt.close()
    n = len(txns)
    return dict(scenario='read, then commit', txns=n,
                bytes=backends.seed['bytes'], seconds=round(t2 - t0, 3),
                txn_per_s=round(n / (t2 - t0), 1),
                mb_per_s=round(backends.seed['bytes'] / (t2 - t0) / 1e6, 3),
                read_txn_per_s=round(n / (t1 - t0), 1),
                commit_txn_per_s=round(n / (t2 - t1), 1),
                caught_up=same)


class LiveCommitter:
    """Paced commits through the RAID (a thread); records latencies."""

    def __init__(self, db, rate, max_seconds):
        self.db = db
        self.rate = rate
        self.max_commits = int(rate * max_seconds) + 1
        self.latencies = []
        self.errors = []
        self._stop = threading.Event()
        self._thread = None

    def start(self):
        self.latencies = []
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name='bench-live-committer')
        self._thread.start()

    def stop(self):
        self._stop.set()
        self._thread.join(60)
        return list(self.latencies)

    def run_for(self, seconds):
        self.start()
        self._stop.wait(seconds)
        return self.stop()

    def _run(self):
        import transaction
        tm = transaction.TransactionManager()
        conn = self.db.open(tm)
        try:
            obj = conn.root()['live']
            interval = 1.0 / self.rate
            next_at = time.perf_counter()
            while not self._stop.is_set() and \
                    len(self.latencies) < self.max_commits:
                now = time.perf_counter()
                if next_at > now:
                    if self._stop.wait(next_at - now):
                        break
                next_at = max(next_at + interval,
                              time.perf_counter() - interval)
                t0 = time.perf_counter()
                try:
                    obj['n'] += 1
                    tm.commit()
                except Exception as exc:   # reported, not hidden
                    tm.abort()
                    self.errors.append(repr(exc))
                    if len(self.errors) > 20:
                        break
                    continue
                self.latencies.append(time.perf_counter() - t0)
        finally:
            conn.close()


def open_raid(backends):
    import ZODB
    from zeoraid.storage import RAIDStorage
    raid = RAIDStorage('bench', [
        ('src', functools.partial(_client, backends.src.addr)),
        ('tgt', functools.partial(_client, backends.tgt.addr))],
        timeout=20)
    return raid, ZODB.DB(raid)


def wait_recovered(raid, name, limit):
    """Poll raid_details() until the recovery of `name` ended."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        info = raid.raid_details()[name]
        progress = info.get('recovery') or {}
        if progress.get('phase') in ('done', 'failed') and \
                progress.get('finished'):
            return info
        time.sleep(0.01)
    recovery = raid.raid_recovery()
    if recovery is not None:
        recovery.stop()
    raise RuntimeError('recovery of %s did not end within %gs: %s'
                       % (name, limit, raid.raid_details()[name]))


def run_recover(backends, scenario, txn_rate=0, live_rate=0, baseline=0.0,
                window=0.0):
    """One raid_recover; with window, only that long, then stopped."""
    raid, db = open_raid(backends)
    try:
        state = raid.raid_details()['tgt']['state']
        if state != 'degraded':
            raise RuntimeError('target should start degraded, is %s' % state)
        raid.recovery_txn_rate = txn_rate
        result = dict(scenario=scenario, txn_rate_limit=txn_rate,
                      live_rate=live_rate)
        limit = 60 + backends.seed['txns'] / 20.0
        live = None
        if live_rate:
            live = LiveCommitter(db, live_rate, limit + 2 * baseline + 10)
            if baseline:
                result['live_before'] = common.latency_summary(
                    live.run_for(baseline))
            live.start()
        t0 = time.perf_counter()
        raid.raid_recover('tgt')
        if window:
            info = _run_window(raid, 'tgt', window, limit)
        else:
            info = wait_recovered(raid, 'tgt', limit)
        wall = time.perf_counter() - t0
        if live is not None:
            during = live.stop()
            result['live_during'] = common.latency_summary(during)
            result['live_commits_during'] = len(during)
            result['live_rate_achieved'] = round(len(during) / wall, 1)
            if baseline:
                result['live_after'] = common.latency_summary(
                    live.run_for(baseline))
            result['live_errors'] = live.errors[:5]
        progress = info['recovery']
        seconds = (progress['finished'] or time.time()) - progress['started']
        result.update(
            state=raid.raid_details()['tgt']['state'],
            phase=progress['phase'], error=progress['error'],
            txns=progress['txns_copied'], bytes=progress['bytes_copied'],
            seconds=round(seconds, 3), wall_seconds=round(wall, 3),
            txn_per_s=round(progress['txns_copied'] / seconds, 1),
            mb_per_s=round(progress['bytes_copied'] / seconds / 1e6, 3))
        if window and progress['phase'] != 'done':
            result['stopped_after_window'] = True
            result['caught_up'] = None
        else:
            result['caught_up'] = (
                last_tid(raid.raid_backend_storage('src'))
                == last_tid(raid.raid_backend_storage('tgt'))
                == raid.lastTransaction())
        return result
    except KeyboardInterrupt:
        # Interrupted: the servers are being killed; a graceful close
        # would wait for them. The process is about to exit anyway.
        db = None
        raise
    finally:
        if db is not None:
            db.close()   # closes the RAID and its backend clients


def _run_window(raid, name, window, limit):
    """Let the recovery run for `window` seconds, then stop it."""
    deadline = time.monotonic() + window
    while time.monotonic() < deadline:
        progress = raid.raid_details()[name].get('recovery') or {}
        if progress.get('phase') in ('done', 'failed'):
            break
        time.sleep(0.02)
    recovery = raid.raid_recovery()
    if recovery is not None:
        recovery.stop()
    return wait_recovered(raid, name, limit)


def run(directory, quick=False, backlog=None, txn_rate=None, live_rate=None,
        log=print):
    """The whole recovery benchmark; returns a JSON-able dict."""
    p = dict(QUICK if quick else FULL)
    if backlog:
        p['backlog'] = backlog
    if txn_rate is not None:
        p['txn_rate'] = txn_rate
    if live_rate:
        p['live_rate'] = live_rate
    os.makedirs(directory, exist_ok=True)
    # The RAID logs every state change at WARNING: expected here, noise.
    raid_logger = logging.getLogger('zeoraid')
    level = raid_logger.level
    raid_logger.setLevel(logging.ERROR)
    try:
        return _run(directory, p, log)
    finally:
        raid_logger.setLevel(level)


def _run(directory, p, log):
    t0 = time.perf_counter()
    seed = build_seed(os.path.join(directory, 'seed'), p['backlog'])
    log('recovery: seed of %d transactions (%.1f MB) built in %.1f s'
        % (seed['txns'], seed['bytes'] / 1e6, time.perf_counter() - t0))
    backends = Backends(directory, seed)
    scenarios = []
    try:
        plan = [
            ('naive', None),
            ('bounds', None),
            ('recover', dict()),
            ('recover+live', dict(live_rate=p['live_rate'])),
            ('limited+live', dict(txn_rate=p['txn_rate'],
                                  live_rate=p['live_rate'],
                                  baseline=p['baseline'],
                                  window=p['window'])),
        ]
        for name, kw in plan:
            if kw and 'txn_rate' in kw and not kw['txn_rate']:
                unlimited = [s['txn_per_s'] for s in scenarios
                             if s['scenario'] == 'recover'] or [100]
                kw['txn_rate'] = max(1, int(unlimited[0] / 2))
            backends.reset()
            if name == 'bounds':
                result = run_bounds(backends)
            elif kw is None:
                result = run_naive(backends)
            else:
                result = run_recover(backends, name, **kw)
            scenarios.append(result)
            if result.get('stopped_after_window'):
                note = '  (stopped after the window)'
            elif result.get('caught_up'):
                note = ''
            else:
                note = '  NOT CAUGHT UP'
            if name == 'bounds':
                note += '  (read alone %.1f txn/s, commit alone %.1f ' \
                    'txn/s)' % (result['read_txn_per_s'],
                                result['commit_txn_per_s'])
            log('recovery: %-13s %6d txns in %7.2f s = %7.1f txn/s %6.2f '
                'MB/s%s' % (name, result['txns'], result['seconds'],
                            result['txn_per_s'], result['mb_per_s'], note))
    finally:
        backends.stop()
    by_name = {s['scenario']: s for s in scenarios}
    summary = dict(params=p, backlog_txns=seed['txns'],
                   backlog_bytes=seed['bytes'], scenarios=scenarios)
    naive = by_name.get('naive')
    if naive:
        for s in scenarios:
            if s is not naive and not s.get('stopped_after_window') \
                    and 'read_txn_per_s' not in s:
                s['speedup_vs_naive'] = round(
                    s['txn_per_s'] / naive['txn_per_s'], 2)
    limited = by_name.get('limited+live', {})
    before = [limited.get(k, {}).get('median_ms')
              for k in ('live_before', 'live_after')]
    during = limited.get('live_during', {}).get('median_ms')
    if all(before) and during:
        # Compared with the mean of the A-B-A neighbours (no recovery).
        summary['live_median_increase'] = round(
            during / (sum(before) / 2) - 1, 3)
    return summary


def markdown_table(summary):
    lines = ['Recovery of a %d-transaction backlog (%.1f MB of records) '
             'through ZEO backends:' % (summary['backlog_txns'],
                                        summary['backlog_bytes'] / 1e6),
             '',
             '| scenario | txns copied | seconds | txn/s | MB/s | x naive | '
             'caught up |',
             '|---|---:|---:|---:|---:|---:|---|']
    for s in summary['scenarios']:
        label = s['scenario']
        if s.get('txn_rate_limit'):
            label += ' (limit %g txn/s)' % s['txn_rate_limit']
        if s.get('live_rate'):
            label += ' (live %g commits/s)' % s['live_rate']
        if s.get('stopped_after_window'):
            caught_up = 'stopped after %.0f s window' % s['seconds']
        else:
            caught_up = 'yes' if s.get('caught_up') else 'NO'
        lines.append('| %s | %d | %.2f | %.1f | %.2f | %s | %s |' % (
            label, s['txns'], s['seconds'], s['txn_per_s'], s['mb_per_s'],
            s.get('speedup_vs_naive', '-'), caught_up))
    rows = []
    for s in summary['scenarios']:
        for key, label in (('live_before', 'before (no recovery)'),
                           ('live_during', 'during recovery'),
                           ('live_after', 'after (recovery stopped)')):
            if key in s:
                rows.append('| %s: %s | %.3f | %.3f |' % (
                    s['scenario'], label, s[key]['median_ms'] or 0,
                    s[key]['p99_ms'] or 0))
    if rows:
        lines += ['', '| live commits through the RAID | median ms | '
                  'p99 ms |', '|---|---:|---:|'] + rows
    for s in summary['scenarios']:
        if 'read_txn_per_s' in s:
            lines += ['', 'The halves of a copy alone: reading the backlog '
                      'from the source %.1f txn/s, committing it to the '
                      'target %.1f txn/s, both through plain '
                      'ClientStorage calls (recover batches its reads and '
                      'keeps several restores in flight).'
                      % (s['read_txn_per_s'], s['commit_txn_per_s'])]
    if 'live_median_increase' in summary:
        lines += ['', 'Live median commit latency during the rate-limited '
                  'recovery: %+.0f%% compared to the mean of before and '
                  'after (no recovery).'
                  % (summary['live_median_increase'] * 100)]
    return '\n'.join(lines)


def chart(ax, summary):
    names = [s['scenario'] for s in summary['scenarios']]
    values = [s['txn_per_s'] for s in summary['scenarios']]
    baselines = ('naive', 'read, then commit')
    ax.bar(names, values, color=['grey' if n in baselines else 'tab:blue'
                                 for n in names])
    ax.set_ylabel('transactions/s')
    ax.set_title('recovery of a %d-transaction backlog through ZEO'
                 % summary['backlog_txns'])


def _terminate(signum, frame):
    raise KeyboardInterrupt('signal %d' % signum)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--quick', action='store_true')
    parser.add_argument('--backlog', type=int)
    parser.add_argument('--rate', type=float,
                        help='recovery-txn-rate of the limited scenario')
    parser.add_argument('--live-rate', type=float,
                        help='live commits per second')
    parser.add_argument('--output-dir', default=os.path.join(HERE,
                                                             'results'))
    parser.add_argument('--keep', action='store_true',
                        help='keep the work directory')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)
    workdir = tempfile.mkdtemp(prefix='zeoraid-bench-recovery-')
    started = time.monotonic()

    def log(message):
        print('[%6.1fs] %s' % (time.monotonic() - started, message),
              flush=True)
    try:
        summary = run(workdir, quick=args.quick, backlog=args.backlog,
                      txn_rate=args.rate, live_rate=args.live_rate, log=log)
    finally:
        common.kill_leftovers()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(args.output_dir, exist_ok=True)
    stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
    path = os.path.join(args.output_dir, 'recovery-%s.json' % stamp)
    with open(path, 'w') as f:
        json.dump(summary, f, indent=1)
    print()
    print(markdown_table(summary))
    print('\nJSON: %s' % path)
    return 0


if __name__ == '__main__':
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.stderr.write('interrupted: servers stopped\n')
        sys.exit(130)
