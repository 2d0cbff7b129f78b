"""Reports drawn from run directories: PNG plots (:mod:`gradwise.report.plots`).

Nothing is imported here so that ``import gradwise.report`` stays cheap; import
the submodule you need (``from gradwise.report.plots import write_run_plots``).
"""
