"""Report: one Report object (metadata, tidy tables, findings), JSON/CSV, compare, render, plot."""
