"""Which backends hold the RAID's acknowledged history: the generation model.

A backend's last tid alone cannot tell "current" from "stale" or
"forked": after a restart the only current backend may be unreachable
(the others look current among themselves), a backend may have been
restored from an older copy, or somebody may have committed on it behind
the RAID's back. Like Linux md's per-member event counters and DRBD's
generation identifiers, the RAID therefore records, durably, what no
single backend knows (doc/DESIGN.md, "Safety model"):

- the *current set*: the backends that hold every acknowledged commit
  (the optimal ones; when the RAID fails as a whole, the last ones that
  were optimal), written at every state change (statefile.StateFile);
- the *commit marker* (CommitMarker): before any backend is told to
  finish a transaction, the RAID's last acknowledged tid P and the tid C
  being committed, fsynced; so after any crash every current backend's
  last tid is P or C, and anything else is a rollback or a fork;
- the *pack floor*: the tid below which the last pack removed history
  (recovery accepts a target that "missed a pack" only below it).

`judge` is the start-up judgement: a pure function from that record and
what the backends report to a verdict (who is current, who is stale and
why, or which backend the RAID must wait for). No I/O, tested as a table.
"""
import logging
import os
import threading

from ZODB.utils import tid_repr
from ZODB.utils import z64

logger = logging.getLogger('zeoraid')

MARKER_SIZE = 16


class Record:
    """What the RAID knew of its backends when it last ran.

    current: names of the backends that held every acknowledged commit,
    or None when nothing is recorded (first start, no state file, or a
    file from before the current set was kept). floor: a lower bound of
    the last acknowledged tid (every current backend has at least it).
    acked, committing: the commit marker's P and C, or None without one.
    pack_floor: the last pack's tid floor (z64: no pack recorded).
    states: {name: {'state', 'reason', ...}} as recorded.
    """

    def __init__(self, current=None, floor=z64, acked=None, committing=None,
                 pack_floor=z64, states=None):
        self.current = None if current is None else set(current)
        self.floor = floor
        self.acked = acked
        self.committing = committing
        self.pack_floor = pack_floor
        self.states = states or {}

    @property
    def known(self):
        return self.current is not None

    def __repr__(self):
        return '<Record current=%s floor=%s acked=%s committing=%s>' % (
            sorted(self.current) if self.current is not None else None,
            self.floor.hex(), self.acked and self.acked.hex(),
            self.committing and self.committing.hex())


class Observation:
    """What one backend reports at start: reachable, last tid, and
    whether it really has the transaction of its last tid."""

    def __init__(self, reachable, last_tid=None, has_last=True):
        self.reachable = reachable
        self.last_tid = last_tid
        self.has_last = has_last


class Judgement:
    """The start-up verdict.

    current: names that may serve and be written (optimal).
    stale: {name: reason} of reachable backends that must start degraded.
    wait_for: {name: why it is needed} when the RAID must not serve yet;
    refusal: the one line saying why (None when it may serve).
    last_tid: the RAID's last tid when it serves.
    """

    def __init__(self):
        self.current = []
        self.stale = {}
        self.wait_for = {}
        self.refusal = None
        self.last_tid = z64

    @property
    def serves(self):
        return self.refusal is None


def _hex(tid):
    return tid_repr(tid) if tid is not None else '-'


def judge(record, observed):
    """Decide which backends are current (see the module docstring).

    record: a Record (Record() when nothing is recorded); observed:
    {name: Observation}.
    """
    verdict = Judgement()
    reachable = {n: o for n, o in observed.items() if o.reachable}
    if record.known:
        candidates = {n: o for n, o in reachable.items()
                      if n in record.current}
        for name in sorted(set(reachable) - set(candidates)):
            verdict.stale[name] = _recorded_reason(record, name)
    else:
        candidates = dict(reachable)
    _classify(record, candidates, verdict)
    if verdict.current:
        verdict.last_tid = max(observed[n].last_tid for n in verdict.current)
        return verdict
    needed = sorted((record.current or set()) - set(reachable)
                    if record.known else set())
    if needed:
        verdict.wait_for = {n: 'holds the last acknowledged transactions'
                               ' (up to %s)' % _hex(_newest(record))
                            for n in needed}
        verdict.refusal = (
            'waiting for backend%s %s: %s the RAID\'s last acknowledged '
            'transaction %s; the reachable backends are stale (%s). Start '
            'it, or if it is lost for good: zeoraid-manager force BACKEND'
            % ('s' if len(needed) > 1 else '', ', '.join(needed),
               'they hold' if len(needed) > 1 else 'it holds',
               _hex(_newest(record)), _stale_text(verdict) or 'none'))
    else:
        verdict.refusal = (
            'no reachable backend holds the RAID\'s last acknowledged '
            'transaction %s (%s). If the newest one is lost for good: '
            'zeoraid-manager force BACKEND'
            % (_hex(_newest(record)), _stale_text(verdict) or
               'no backend is reachable'))
    return verdict


def _newest(record):
    """The RAID's last acknowledged tid as recorded."""
    return record.acked if record.acked is not None else record.floor


def _stale_text(verdict):
    return '; '.join('%s: %s' % item for item in sorted(verdict.stale.items()))


def _recorded_reason(record, name):
    entry = record.states.get(name)
    if entry is None:
        return 'not in the state file: needs recovery'
    # The old reason first: auto-recover reads it (an operator's disable,
    # a diverged backend are left alone).
    return '%s (%s before the restart)' % (
        entry.get('reason') or 'no reason recorded', entry.get('state'))


def _classify(record, candidates, verdict):
    """Split candidates into current and stale (with reasons)."""
    if not candidates:
        return
    marker = record.acked is not None and record.committing is not None
    good = {}
    for name, obs in sorted(candidates.items()):
        last = obs.last_tid
        if last < record.floor:
            verdict.stale[name] = (
                'missing transactions: last tid %s, the RAID acknowledged '
                '%s (rolled back: restored from an older copy?)'
                % (_hex(last), _hex(record.floor)))
        elif not marker or last in (record.acked, record.committing):
            good[name] = obs
        elif last < record.acked:
            verdict.stale[name] = (
                'missing transactions: last tid %s, the RAID acknowledged '
                '%s (rolled back: restored from an older copy?)'
                % (_hex(last), _hex(record.acked)))
        else:
            verdict.stale[name] = (
                'diverged: last tid %s was never committed by this RAID '
                '(its last: %s): a foreign commit, or another file. It '
                'needs a full rebuild' % (_hex(last), _hex(record.acked)))
    if not good:
        return
    # A FileStorage reopened after a crash between vote and finish
    # reports the tid of the transaction it dropped: it lacks its own
    # last transaction while another backend has it.
    for name, obs in list(good.items()):
        if obs.has_last or obs.last_tid == z64:
            continue
        if any(o.last_tid == obs.last_tid and o.has_last
               for n, o in good.items() if n != name):
            verdict.stale[name] = (
                'missing transactions: last tid %s is of an unfinished '
                'transaction (crash between vote and finish)'
                % obs.last_tid.hex())
            del good[name]
    if not good:
        return
    newest = max(o.last_tid for o in good.values())
    for name, obs in sorted(good.items()):
        if obs.last_tid < newest:
            verdict.stale[name] = ('missing transactions: last tid %s, '
                                   'newest %s' % (_hex(obs.last_tid),
                                                  _hex(newest)))
        else:
            verdict.current.append(name)


class CommitMarker:
    """The commit marker: P (last acknowledged tid) and C (committing).

    16 bytes at offset 0 of a file of its own, written with one pwrite
    and fdatasync before any backend is told to finish C. A write that
    fails makes the RAID refuse commits (Replicas.check_durable): a
    marker that lags would make a current backend look forked.
    """

    def __init__(self, path):
        self.path = path
        self._fd = None
        self._lock = threading.Lock()

    def load(self):
        """(P, C) from the file, or None without a usable one."""
        try:
            with open(self.path, 'rb') as f:
                data = f.read(MARKER_SIZE + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            logger.critical('commit marker %s cannot be read: %s',
                            self.path, exc)
            return None
        if len(data) != MARKER_SIZE:
            logger.critical('commit marker %s has %d bytes, not %d: '
                            'ignored', self.path, len(data), MARKER_SIZE)
            return None
        return data[:8], data[8:]

    def write(self, acked, committing):
        """Record (P, C) durably; raises OSError if it cannot."""
        with self._lock:
            if self._fd is None:
                self._fd = os.open(
                    self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW
                    | getattr(os, 'O_CLOEXEC', 0), 0o600)
            os.pwrite(self._fd, acked + committing, 0)
            os.fdatasync(self._fd)

    def close(self):
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def reconnect_verdict(expected, raid_last, last, has_expected):
    """None if a reconnected backend is still current, else the reason.

    expected: the last tid the RAID committed on it; raid_last: the
    RAID's last tid; last: what the backend reports now; has_expected:
    does it have that transaction. Checked with the commit lock held.
    """
    if last < expected or not has_expected:
        return ('missing transactions: reconnected with last tid %s, the '
                'RAID committed %s on it (restarted on an older copy?)'
                % (_hex(last), _hex(expected)))
    if last > expected:
        return ('diverged: reconnected with last tid %s, which this RAID '
                'never committed on it (its last: %s): a foreign commit, '
                'or another file. It needs a full rebuild'
                % (_hex(last), _hex(expected)))
    if expected < raid_last:
        return ('missing transactions: last tid %s, the RAID is at %s '
                '(commits while it reconnected)' % (_hex(last),
                                                   _hex(raid_last)))
    return None


class Generations:
    """The RAID's durable record: the state file and the commit marker.

    One object per RAID with a state file. `durable` is False while the
    last write failed: the RAID then refuses commits (an acknowledged
    commit must never rest on a record that says otherwise).
    """

    def __init__(self, state_file, marker):
        self.state_file = state_file
        self.marker = marker
        self.current = None       # last non-empty set of optimal names
        self.pack_floor = z64
        self.problems = {}        # 'file'/'marker' -> the last write error

    @property
    def durable(self):
        return not self.problems

    def load(self):
        """The Record of the last run (Record() if nothing is recorded)."""
        data = self.state_file.load()
        if not data:
            return Record()
        states = data['backends']
        current = data['current']
        if current is None:
            # Format 1: no current set and no generation were kept.
            current = [n for n, e in states.items()
                       if e.get('state') == 'optimal'] or None
            if current is None:
                logger.warning(
                    'state file %s (format 1) has every working backend '
                    'degraded and no current set; judging them by their '
                    'last tids', self.state_file.path)
        marker = self.marker.load() if current is not None else None
        acked = committing = None
        floor = data['last_tid']
        if marker is not None:
            acked, committing = marker
            if acked < floor:
                # A marker older than the file (it was restored or lost):
                # the file's tid is the better lower bound, and without
                # an upper bound the marker is not used.
                acked = committing = None
        self.current = set(current) if current is not None else None
        self.pack_floor = data['pack_floor']
        return Record(current=current, floor=floor, acked=acked,
                      committing=committing, pack_floor=data['pack_floor'],
                      states=states)

    def save(self, backends, last_tid):
        """Write the states; the current set is the optimal backends (the
        last non-empty one when none is left)."""
        optimal = {b.name for b in backends if b.state == 'optimal'}
        if optimal:
            self.current = optimal
        error = self.state_file.save(backends, self.current or (),
                                     last_tid, self.pack_floor)
        self._note('file', error, 'state file %s' % self.state_file.path)

    def force(self, name):
        """The operator's override: `name` alone is current."""
        self.current = {name}

    def record_pack(self, floor, backends, last_tid):
        self.pack_floor = max(self.pack_floor, floor)
        self.save(backends, last_tid)

    def mark(self, acked, committing):
        """Write the commit marker; raises OSError if it cannot."""
        try:
            self.marker.write(acked, committing)
        except OSError as exc:
            self._note('marker', exc, 'commit marker %s' % self.marker.path)
            raise
        self._note('marker', None, 'commit marker %s' % self.marker.path)

    def _note(self, kind, error, what):
        if error is not None:
            self.problems[kind] = '%s cannot be written: %s' % (what, error)
        elif self.problems.pop(kind, None) is not None:
            logger.warning('%s written again', what)

    def refusal(self):
        """Why commits are refused now (None: they are not). A marker
        that cannot be written refuses each vote itself (it is tried at
        every vote); a state file that cannot be written refuses here."""
        return self.problems.get('file')

    def close(self):
        self.marker.close()
