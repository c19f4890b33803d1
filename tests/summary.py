"""Turn a zope.testrunner log into the plain line CI reads: `N passed, N failed`.

Used by `.ci/run`; stdlib only, because it must also work when the
virtualenv could not even be built.

    python3 tests/summary.py LOGFILE [--status RC]
    python3 tests/summary.py --self-test

zope.testrunner closes with `Total: N tests, F failures, E errors and S
skipped in ...` when more than one layer ran, and with only the per-layer
`Ran N tests with F failures, E errors and S skipped in ...` line when one
layer ran.  Its error counts include modules that failed to import (which
are not counted as tests), and the `Total` errors include layer set-up and
tear-down failures.  All of those count as failed; only real tests that
neither failed, errored nor were skipped count as passed.

Exit status: 0 only when a summary was found, at least one test ran, nothing
failed and RC (the status of `make test`) is 0.

Sample outputs, as zope.testrunner 8 prints them (abridged):

>>> single = '''
...  test_ok (tests.test_a.T.test_ok)
...  test_skip (tests.test_a.T.test_skip) (skipped)
...   Ran 4 tests with 1 failures, 1 errors and 1 skipped in 0.002 seconds.
... Tearing down left over layers:
... '''
>>> summarize(single)
(1, 2, 1, [])

>>> multi = '''
...   Ran 2 tests with 1 failures, 0 errors and 0 skipped in 0.001 seconds.
... Running tests.test_a.L tests:
...   Ran 3 tests with 0 failures, 0 errors and 1 skipped in 0.000 seconds.
... Tests with failures:
...    test_fail (tests.test_a.T.test_fail)
... Total: 5 tests, 1 failures, 0 errors and 1 skipped in 0.015 seconds.
... '''
>>> summarize(multi)
(3, 1, 1, [])

An import problem is an error in every layer's line but only once in the
total; it is a failure, not a test:

>>> imp = '''
...   Ran 4 tests with 1 failures, 2 errors and 1 skipped in 0.001 seconds.
... Test-modules with import problems:
...   tests.test_b
...
... Tests with errors:
...    test_err (tests.test_a.T.test_err)
... '''
>>> summarize(imp)
(1, 3, 1, [])
>>> impmulti = '''
...   Ran 2 tests with 1 failures, 1 errors and 0 skipped in 0.001 seconds.
...   Ran 3 tests with 0 failures, 1 errors and 1 skipped in 0.000 seconds.
... Test-modules with import problems:
...   tests.test_b
... Total: 5 tests, 1 failures, 1 errors and 1 skipped in 0.017 seconds.
... '''
>>> summarize(impmulti)
(3, 2, 1, [])
>>> summarize('''
... Test-modules with import problems:
...   tests.test_b
... Total: 0 tests, 0 failures, 1 errors and 0 skipped in 0.000 seconds.
... ''')
(0, 1, 0, [])

A layer whose set-up fails is counted in the total's errors, not in its tests:

>>> summarize('''
...   Ran 2 tests with 0 failures, 0 errors and 0 skipped in 0.1 seconds.
... Tests with errors:
...    Layer: tests.test_zeo.ZEOLayer.setUp
... Total: 2 tests, 0 failures, 1 errors and 0 skipped in 0.5 seconds.
... ''')
(2, 1, 0, [])

With one layer the `Ran` line does not include a layer failure:

>>> summarize('''
...   Ran 2 tests with 0 failures, 0 errors and 0 skipped in 0.1 seconds.
... Tearing down left over layers:
... Tests with errors:
...    Layer: tests.test_zeo.ZEOLayer.tearDown
... ''')
(2, 1, 0, [])

No summary at all (the install failed, or the runner crashed):

>>> summarize('pip: ERROR: No matching distribution found for ZODB\\n')
(0, 1, 0, ['no zope.testrunner summary found in the output'])

Colour codes are ignored:

>>> summarize('\\x1b[36m  Ran \\x1b[0m\\x1b[1m3\\x1b[0m\\x1b[36m tests with '
...           '\\x1b[0m\\x1b[1m0\\x1b[0m failures, 0 errors and 0 skipped in 1s.')
(3, 0, 0, [])

The CI line and exit status:

>>> report(*summarize(multi), status=1)
(['3 passed, 1 failed, 1 skipped'], 1)
>>> report(3, 0, 0, [], status=0)
(['3 passed, 0 failed'], 0)
>>> report(0, 0, 0, [], status=0)
(['no tests ran', '0 passed, 0 failed'], 1)
>>> report(3, 0, 0, [], status=2)
(['make test exited with status 2 although no test failed', '3 passed, 1 failed'], 2)
"""

import re
import sys

USAGE = ('usage: python3 tests/summary.py LOGFILE [--status RC]\n'
         '       python3 tests/summary.py --self-test\n')
ANSI = re.compile(r'\x1b\[[0-9;]*m')
TOTAL = re.compile(
    r'^\s*Total: (\d+) tests?, (\d+) failures?,? (?:and )?(\d+) errors?'
    r'(?: and (\d+) skipped)? in ')
RAN = re.compile(
    r'^\s*Ran (\d+) tests? with (\d+) failures?,? (?:and )?(\d+) errors?'
    r'(?: and (\d+) skipped)? in ')
SECTION = re.compile(r'^(Test-modules with import problems|Tests with errors'
                     r'|Tests with failures):\s*$')


def _counts(match):
    n, f, e, s = match.groups()
    return int(n), int(f), int(e), int(s or 0)


def summarize(text):
    """Return (passed, failed, skipped, problems) for a zope.testrunner log."""
    totals, rans = [], []
    import_modules, layer_errors = set(), set()
    section = None
    for line in ANSI.sub('', text).splitlines():
        match = TOTAL.match(line)
        if match:
            totals.append(_counts(match))
            section = None
            continue
        match = RAN.match(line)
        if match:
            rans.append(_counts(match))
            section = None
            continue
        match = SECTION.match(line)
        if match:
            section = match.group(1)
            continue
        if section and line.startswith(' ') and line.strip():
            entry = line.strip()
            if section.startswith('Test-modules'):
                import_modules.add(entry)
            elif section == 'Tests with errors' and entry.startswith('Layer: '):
                layer_errors.add(entry)
        else:
            section = None

    n_import, n_layer = len(import_modules), len(layer_errors)
    if totals:
        # The total counts every import problem and layer failure once.
        n, f, e, s = totals[-1]
        test_errors = e - n_import - n_layer
        failed = f + e
    elif rans:
        # No total: one layer ran (or the runner died between layers).
        # Each layer line counts every import problem again.
        n = sum(r[0] for r in rans)
        f = sum(r[1] for r in rans)
        s = sum(r[3] for r in rans)
        test_errors = sum(r[2] for r in rans) - len(rans) * n_import
        failed = f + test_errors + n_import + n_layer
    else:
        return 0, 1, 0, ['no zope.testrunner summary found in the output']
    passed = max(0, n - f - max(0, test_errors) - s)
    return passed, failed, s, []


def report(passed, failed, skipped, problems, status):
    """Return (lines to print, exit status); the CI line is the last one."""
    lines = list(problems)
    code = status
    if status and not failed:
        lines.append('make test exited with status %s although no test failed'
                     % status)
        failed = 1
    elif not passed and not failed:
        lines.append('no tests ran')
        code = 1
    if failed and not code:
        code = 1
    line = '%d passed, %d failed' % (passed, failed)
    if skipped:
        line += ', %d skipped' % skipped
    lines.append(line)
    return lines, code


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv == ['--self-test']:
        import doctest
        failures, tests = doctest.testmod(sys.modules[__name__])
        print('%d passed, %d failed' % (tests - failures, failures))
        return 1 if failures or not tests else 0
    if len(argv) not in (1, 3) or (len(argv) == 3 and argv[1] != '--status'):
        sys.stderr.write(USAGE)
        return 2
    status = int(argv[2]) if len(argv) == 3 else 0
    try:
        with open(argv[0], encoding='utf-8', errors='replace') as f:
            text = f.read()
    except OSError as exc:
        text = ''
        print('cannot read %s: %s' % (argv[0], exc))
    lines, code = report(*summarize(text), status=status)
    sys.stdout.flush()
    print('\n'.join(lines), flush=True)
    return code


if __name__ == '__main__':
    sys.exit(main())
