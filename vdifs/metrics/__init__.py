"""Metrics in the Prometheus text format: an opt-in HTTP endpoint per
process (`http.py`) and the families both kinds of process report
(`families.py`); what a mount and a peer report is in `fuse/metrics.py`
and `peer/metrics.py`. Everything is read at scrape time from counters the
processes keep anyway: a scrape costs the hot paths nothing."""
