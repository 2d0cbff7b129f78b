"""The on-disk format of a run: the bottom of the house, importing nothing above ``config`` and ``errors``.

``runs/<name>/``::

    .lock            held (flock) by the one process writing the run       lock.py
    config.yaml      the resolved config                                   rundir.py
    metrics.jsonl    one JSON line per step and per evaluation             rundir.py
    summary.json     the outcome                                           rundir.py
    lineage.json     the run and checkpoint a branched run started from    branch.py
    data_info.json   what sizes the model; tokenizer/ beside it            records.py
    compression.json what `gradwise compress` did to a variant             records.py
    checkpoints/     manifest.json (the commit point), step-*/, weights-*/, last/best links
                                                                           checkpoint.py, sharded.py

Every write is atomic and confined to the run directory (files.py, paths.py); every failure of the
machine or of a file is one line naming the path.
"""
