"""`masknet reproduce`: the paper's Tables 2-6 and its mask analysis (RQ4) on any dataset.

    paper.py   the published numbers (paper_results.json, shipped with the package)
    plan.py    presets and the cells to run: (table, variant, model, seed, overrides), stable ids
    runner.py  runs cells through training.run.train_run, one result file per cell (resumable)
    stats.py   mean ± std over seeds, paired comparisons and verdicts on the paper's claims
    rq4.py     mask statistics of a trained 3-block SerMaskNet
    report.py  report.md + results.json
    plots.py   PNG figures (matplotlib, Agg backend)
"""
