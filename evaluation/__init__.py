"""Evaluation: systems grouped from run directories, statistics, audits and the exported report."""
