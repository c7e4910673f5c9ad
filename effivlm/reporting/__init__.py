"""Tables and figures from evaluation jobs: aggregate (metrics, summary, views), efficiency, tables, figures.

The package imports nothing itself, so that the workflow reads table names without loading pandas or matplotlib.
"""
