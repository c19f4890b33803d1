"""The CI's count of passed and failed tests (tests/summary.py)."""
import doctest


def test_suite():
    return doctest.DocTestSuite('tests.summary')
