"""The report: reading a finished run, summary.json, report.md and the plots."""
