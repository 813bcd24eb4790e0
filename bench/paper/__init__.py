"""Parts of bench/paper_table.py: corpus, presets, runs, analysis, plots, report."""
