"""pytest plugin: write each failure's report to ``$STREAM_FAILURES`` as soon as it happens, so that a run cut off
by a time limit (a lent GPU's, say) still leaves its failures behind. Load with ``-p pytest_stream_failures``."""
import os


def pytest_runtest_logreport(report):
    path = os.environ.get("STREAM_FAILURES")
    if path and report.failed:
        with open(path, "a") as log:
            log.write(f"\n===== {report.nodeid} ({report.when})\n{report.longreprtext}\n")
