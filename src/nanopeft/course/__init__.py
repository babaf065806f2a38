"""The course's research harness: the experiments behind its results (learning-rate sweeps, the showdown, the
LoRA+ ratio sweep, the DoRA study, step times), their statistics and verdicts, the claims as data (claims.json), the
plots, and the shipped results the notebooks load. Long runs: `python -m nanopeft.course --help`."""
