#!/usr/bin/env python
"""Bounded soak: random faults under load against a real zeoraid cluster.

Starts runzeo backends, a fault-injecting proxy in front of each and a
zeoraid server over the proxies (tests/chaos.py), puts committing client
threads on it, and for ``--seconds`` injects random faults into one
backend at a time: kill -9, SIGSTOP, proxy stall, proxy reset, proxy
delay; half of them fire at a two-phase-commit message (vote or
tpc_finish, before or after it reaches the backend).  After each fault
the backend is healed and recovered through the admin endpoint while the
clients go on committing.

At the end it stops the clients, recovers everything, compares every
backend with every other (tids, metadata, records, blob bytes) and checks
that every commit a client saw succeed is on every backend, then prints
a report.  Exit status: 0 if lost = 0 and divergent = 0, else 1.

Usage (from the repository root)::

    .venv/bin/python tools/soak.py [--seconds 60] [--seed N]
"""
import argparse
import collections
import logging
import os
import random
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.chaos import Cluster  # noqa: E402
from tests.chaos import assert_identical  # noqa: E402
from tests.chaos import divergent_backends  # noqa: E402

KINDS = ('kill', 'stop', 'stall', 'reset', 'delay')
#: (ZEO message, when) pairs a fault may be armed on.
PHASES = (('vote', 'before'), ('vote', 'after'),
          ('tpc_finish', 'before'), ('tpc_finish', 'after'))

logger = logging.getLogger('soak')


class Soak:

    def __init__(self, args):
        self.args = args
        self.rng = random.Random(args.seed)
        self.faults = collections.Counter()
        self.phase_faults = collections.Counter()
        self.recovery_refusals = []
        self.rebuilds = 0
        self.fault_log = []
        self.recovery_times = []
        self.recovery_rates = []     # (seconds, txns copied, txn/s)

    def say(self, text):
        if self.args.verbose:
            print('%7.2f %s' % (time.monotonic() - self.started, text),
                  flush=True)
        logger.info(text)

    def run(self):
        args = self.args
        self.started = time.monotonic()
        self.cluster = cluster = Cluster(
            args.backends, timeout=args.timeout, blobs=args.blobs,
            directory=args.directory).start()
        self.say('cluster up: %s' % cluster.tmp)
        self.load = load = cluster.load(threads=args.threads,
                                        max_seconds=args.seconds + 300,
                                        pause=args.pause)
        load.start()
        try:
            end = time.monotonic() + args.seconds
            while time.monotonic() < end:
                time.sleep(self.rng.uniform(0.5, 2.0))
                if time.monotonic() >= end:
                    break
                self.one_fault(end)
        finally:
            load.stop()
        return self.finish()

    # -- faults -------------------------------------------------------------

    def one_fault(self, end):
        cluster = self.cluster
        kind = self.rng.choice(KINDS)
        backend = self.rng.choice(cluster.backends)
        phase = None
        if kind in ('kill', 'stop', 'stall', 'reset') and \
                self.rng.random() < 0.5:
            phase = self.rng.choice(PHASES)
        hold = self.rng.uniform(0.5, 3.0)
        action = self.action(kind, backend, phase is not None)
        self.faults[kind] += 1
        if phase is not None:
            self.phase_faults['%s %s' % (phase[1], phase[0])] += 1
            trigger = backend.proxy.arm(phase[0], action, when=phase[1])
            fired = trigger.fired.wait(10)
            what = '%s %s at %s %s' % (kind, backend.name, phase[1],
                                        phase[0])
            if not fired:
                what += ' (never fired)'
        else:
            action()
            what = '%s %s' % (kind, backend.name)
        self.fault_log.append(what)
        self.say('fault: %s, hold %.1fs' % (what, hold))
        time.sleep(hold)
        backend.heal()
        self.recover()

    def action(self, kind, backend, at_message):
        """What to do: a callable, or a proxy action name for arm()."""
        if kind == 'kill':
            return backend.kill
        if kind == 'stop':
            return backend.sigstop
        if kind == 'stall':
            return 'stall' if at_message else backend.proxy.stall
        if kind == 'reset':
            return 'reset' if at_message else backend.proxy.reset
        delay = self.rng.uniform(0.05, 1.5) * self.args.timeout
        return lambda: backend.proxy.delay(delay)

    def recover(self):
        """Recover what the fault degraded, while the clients commit."""
        started = time.monotonic()
        try:
            self.note_recoveries(self.cluster.recover_all(timeout=60))
        except AssertionError as exc:
            self.recovery_refusals.append(str(exc))
            self.say('recovery failed: %s; full rebuild' % exc)
            self.rebuilds += 1
            self.cluster.rebuild()
        self.recovery_times.append(time.monotonic() - started)
        self.say('optimal again after %.1fs' % self.recovery_times[-1])

    def rates_text(self):
        rates = self.recovery_rates
        if not rates:
            return 'none measured'
        copied = sum(r[1] for r in rates)
        seconds = sum(r[0] for r in rates)
        return ('%d, %d txn copied in %.1fs (%.0f txn/s overall; per '
                'recovery: median rate %.0f txn/s, longest catch-up %.1fs)'
                % (len(rates), copied, seconds, copied / max(seconds, 1e-9),
                   sorted(r[2] for r in rates)[len(rates) // 2],
                   max(r[0] for r in rates)))

    def note_recoveries(self, ended):
        """Keep each recovery's time, copied transactions and rate."""
        for name, (seconds, txns, rate) in sorted(ended.items()):
            self.recovery_rates.append((seconds, txns or 0, rate or 0.0))
            self.say('recovered %s: %d txn in %.1fs (%.0f txn/s)'
                     % (name, txns or 0, seconds, rate or 0.0))

    # -- the end ------------------------------------------------------------

    def finish(self):
        cluster, load = self.cluster, self.load
        cluster.heal_all()
        try:
            self.note_recoveries(cluster.recover_all(timeout=60))
        except AssertionError as exc:
            self.recovery_refusals.append(str(exc))
            self.rebuilds += 1
            cluster.rebuild()
        names = [b.name for b in cluster.backends]
        snapshots = [cluster.snapshot(name) for name in names]
        divergent = divergent_backends(snapshots)
        missing = set()
        for snap in snapshots:
            for t, n, tid in load.committed:
                if tid not in snap.tids:
                    missing.add((t, n, tid))
        data_error = None
        storage = cluster.backend(names[0]).client()
        try:
            load.assert_data(storage)
        except AssertionError as exc:
            data_error = str(exc)
        finally:
            storage.close()
        identical_error = None
        if not divergent:
            try:
                assert_identical(snapshots)
            except AssertionError as exc:
                identical_error = str(exc)
        return self.report(snapshots, divergent, missing, data_error,
                           identical_error)

    def longest_gap(self):
        times = sorted(self.load.commit_times)
        if len(times) < 2:
            return 0.0
        return max(b - a for a, b in zip(times, times[1:]))

    def report(self, snapshots, divergent, missing, data_error,
               identical_error):
        args, load, cluster = self.args, self.load, self.cluster
        lost = len(missing) + (1 if data_error else 0)
        n_divergent = len(divergent) + (1 if identical_error else 0)
        kinds = ', '.join('%s %d' % (k, self.faults[k]) for k in KINDS)
        phases = ', '.join('%s %d' % item for item in
                           sorted(self.phase_faults.items())) or 'none'
        lines = [
            'zeoraid soak report',
            '  duration:                 %gs of faults, %.0fs in all '
            '(seed %s)' % (args.seconds, time.monotonic() - self.started,
                           args.seed),
            '  cluster:                  %d runzeo backends behind fault '
            'proxies, 1 zeoraid server (timeout %gs), %d client threads '
            '(pause %gs)%s' % (args.backends, args.timeout, args.threads,
                              args.pause, ', blobs' if args.blobs else ''),
            '  transactions committed:   %d (client-confirmed)' % load.count,
            '  faults injected:          %d (%s)'
            % (sum(self.faults.values()), kinds),
            '    at a 2PC message:       %d (%s)'
            % (sum(self.phase_faults.values()), phases),
            '  degradations (RAID log):  %d' % cluster.raid.degradations(),
            '  recoveries started:       %d (back to optimal after a '
            'fault: longest %.1fs, mean %.1fs)' % (
                cluster.recoveries, max(self.recovery_times, default=0),
                sum(self.recovery_times) / max(len(self.recovery_times), 1)),
            '  recovery copies:          %s' % self.rates_text(),
            '  recoveries refused:       %d (each followed by a full '
            'rebuild: %d)' % (len(self.recovery_refusals), self.rebuilds),
            '  client retries:           %d (transient errors: conflicts, '
            'disconnects)' % load.transient,
            '  non-retryable errors:     %d' % len(load.errors),
            '  longest client-visible stall: %.2fs (slowest commit '
            'attempt); %.2fs (longest time without any commit)'
            % (load.max_latency, self.longest_gap()),
            '  transactions on each backend: %s' % ', '.join(
                '%s %d' % (s.name, len(s.transactions)) for s in snapshots),
            '  lost:                     %d' % lost,
            '  divergent:                %d' % n_divergent,
        ]
        for name, why in divergent:
            lines.append('    divergent %s: %s' % (name, why))
        if identical_error:
            lines.append('    %s' % identical_error)
        for t, n, tid in sorted(missing)[:10]:
            lines.append('    lost: client %d commit %d tid %s'
                         % (t, n, tid.hex()))
        if data_error:
            lines.append('    data: %s' % data_error)
        for error in load.errors[:5]:
            lines.append('    client error: %r' % (error,))
        for refusal in self.recovery_refusals[:5]:
            lines.append('    recovery refused: %s' % refusal[:300])
        if args.verbose:
            lines.append('  fault log:')
            lines += ['    ' + f for f in self.fault_log]
        print('\n'.join(lines), flush=True)
        return 1 if lost or n_divergent else 0


def main(argv=None):
    parser = argparse.ArgumentParser(
        description='Random faults under load against a real zeoraid '
                    'cluster; exit 1 if a transaction was lost or '
                    'backends diverged.')
    parser.add_argument('--seconds', type=float, default=60.0,
                        help='how long to inject faults (default 60)')
    parser.add_argument('--seed', type=int, default=None,
                        help='random seed (default: from the clock)')
    parser.add_argument('--backends', type=int, default=3)
    parser.add_argument('--threads', type=int, default=3,
                        help='committing client threads (default 3)')
    parser.add_argument('--pause', type=float, default=0.1,
                        help='seconds each client waits between commits '
                             '(default 0.1; 0 for full speed, which on a '
                             'small machine leaves recovery little room '
                             'to catch up)')
    parser.add_argument('--timeout', type=float, default=1.0,
                        help='the RAID timeout in seconds (default 1)')
    parser.add_argument('--blobs', action='store_true',
                        help='commit blobs too')
    parser.add_argument('--keep', action='store_true',
                        help='keep the cluster directory (logs, data)')
    parser.add_argument('-v', '--verbose', action='store_true',
                        help='print every fault as it happens')
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = int(time.time())
    args.directory = tempfile.mkdtemp(prefix='zeoraid-soak-')
    logging.basicConfig(
        filename=os.path.join(args.directory, 'soak.log'), level=logging.INFO,
        format='%(asctime)s %(levelname)s %(name)s %(message)s')
    soak = Soak(args)
    try:
        status = soak.run()
    finally:
        cluster = getattr(soak, 'cluster', None)
        if cluster is not None:
            cluster.close(remove=False)
        if args.keep:
            print('kept %s' % args.directory)
        else:
            shutil.rmtree(args.directory, ignore_errors=True)
    return status


if __name__ == '__main__':
    sys.exit(main())
