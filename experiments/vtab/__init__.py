"""VTAB-1K experiment scripts: configs per (task, method), a resumable sweep, the aggregator."""
