"""Many runs: sweeps, seed comparisons, finders, variants, evaluation and export of run directories."""
