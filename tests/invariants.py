"""The RAID's invariant, as a reusable test helper.

After any commit, every optimal backend must hold the same transactions:
same tids in the same order, same metadata, same records.  Tests call
``assert_replicas_identical(raid)`` after each scenario.
"""

from ZODB.utils import tid_repr


def _hex(value):
    if value is None:
        return 'None'
    if isinstance(value, bytes) and len(value) == 8:
        return tid_repr(value)
    return repr(value)


def _close(iterator):
    close = getattr(iterator, 'close', None)
    if close is not None:
        close()


def committed_tids(storage):
    """All tids of ``storage``, in iteration order."""
    it = storage.iterator()
    try:
        return [txn.tid for txn in it]
    finally:
        _close(it)


def _storages(raid, backends):
    details = raid.raid_details()
    if backends is None:
        names = sorted(name for name, info in details.items()
                       if info['state'] == 'optimal')
    else:
        names = list(backends)
        unknown = [name for name in names if name not in details]
        if unknown:
            raise AssertionError('unknown backends %s (RAID has %s)'
                                 % (unknown, sorted(details)))
    result = []
    for name in names:
        storage = raid.raid_backend_storage(name)
        if storage is None:
            raise AssertionError('backend %r has no open storage (%s)'
                                 % (name, details.get(name)))
        result.append((name, storage))
    return result


def _txn_meta(txn):
    return {
        'status': txn.status,
        'user': txn.user,
        'description': txn.description,
        'extension': dict(txn.extension or {}),
    }


def _records(txn):
    return [(r.oid, r.data) for r in txn]


def _compare_txn(ref_name, ref, ref_records, name, txn):
    if txn.tid != ref.tid:
        raise AssertionError(
            'backend %r has tid %s where backend %r has tid %s'
            % (name, _hex(txn.tid), ref_name, _hex(ref.tid)))
    tid = _hex(ref.tid)
    ref_meta, meta = _txn_meta(ref), _txn_meta(txn)
    for key in ('status', 'user', 'description', 'extension'):
        if meta[key] != ref_meta[key]:
            raise AssertionError(
                'backend %r differs from %r at tid %s: %s %r != %r'
                % (name, ref_name, tid, key, meta[key], ref_meta[key]))
    records = _records(txn)
    ref_oids = [oid for oid, _ in ref_records]
    oids = [oid for oid, _ in records]
    if oids != ref_oids:
        raise AssertionError(
            'backend %r differs from %r at tid %s: record oids %s != %s'
            % (name, ref_name, tid, [_hex(o) for o in oids],
               [_hex(o) for o in ref_oids]))
    for (oid, data), (_, expected) in zip(records, ref_records):
        if (data is None) != (expected is None):
            raise AssertionError(
                'backend %r differs from %r at tid %s oid %s: data is %s'
                ' there, %s here'
                % (name, ref_name, tid, _hex(oid),
                   'None' if expected is None else 'present',
                   'None' if data is None else 'present'))
        if data != expected:
            raise AssertionError(
                'backend %r differs from %r at tid %s oid %s: record data'
                ' %r != %r' % (name, ref_name, tid, _hex(oid),
                               data[:60], expected[:60]))


def assert_replicas_identical(raid, backends=None):
    """Assert that backends hold identical transactions.

    ``backends``: names to compare; default all whose raid_details state is
    'optimal'.  Compares tid, status, user, description, extension and,
    per record, oid and data (including data None), transaction by
    transaction via each backend's ``iterator()``, then lastTransaction.
    Raises AssertionError naming backend, tid, oid and the difference.
    Returns the number of transactions compared.
    """
    storages = _storages(raid, backends)
    if len(storages) < 2:
        count = 0
        for name, storage in storages:
            count = len(committed_tids(storage))
        return count
    iterators = [(name, storage.iterator()) for name, storage in storages]
    count = 0
    try:
        its = [(name, iter(it)) for name, it in iterators]
        ref_name, ref_it = its[0]
        while True:
            ref = next(ref_it, None)
            ref_records = _records(ref) if ref is not None else None
            for name, it in its[1:]:
                txn = next(it, None)
                if ref is None and txn is None:
                    continue
                if ref is None:
                    raise AssertionError(
                        'backend %r has extra transaction %s that %r lacks'
                        % (name, _hex(txn.tid), ref_name))
                if txn is None:
                    raise AssertionError(
                        'backend %r lacks transaction %s that %r has'
                        % (name, _hex(ref.tid), ref_name))
                _compare_txn(ref_name, ref, ref_records, name, txn)
            if ref is None:
                break
            count += 1
    finally:
        for _, it in iterators:
            _close(it)
    ref_name, ref_storage = storages[0]
    ref_last = ref_storage.lastTransaction()
    for name, storage in storages[1:]:
        last = storage.lastTransaction()
        if last != ref_last:
            raise AssertionError(
                'backend %r lastTransaction %s != %r lastTransaction %s'
                % (name, _hex(last), ref_name, _hex(ref_last)))
    return count
