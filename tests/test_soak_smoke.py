"""tools/soak.py, the documented soak command, runs and reports.

A short run (a few seconds of random faults over real processes); the
60 s runs and their figures are in doc/FAULTS.md. Asserts the report's
verdict lines, not timing.
"""
import os
import re
import subprocess
import sys
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class SoakSmokeTest(unittest.TestCase):

    def test_short_soak_loses_nothing(self):
        result = subprocess.run(
            [sys.executable, os.path.join(ROOT, 'tools', 'soak.py'),
             '--seconds', '6', '--seed', '1'],
            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, timeout=180)
        report = result.stdout
        self.assertEqual(result.returncode, 0, report)
        self.assertIn('zeoraid soak report', report)
        self.assertRegex(report, r'lost:\s+0\b')
        self.assertRegex(report, r'divergent:\s+0\b')
        self.assertRegex(report, r'non-retryable errors:\s+0\b')
        faults = int(re.search(r'faults injected:\s+(\d+)', report).group(1))
        self.assertGreater(faults, 0, report)
        committed = int(re.search(
            r'transactions committed:\s+(\d+)', report).group(1))
        self.assertGreater(committed, 0, report)
