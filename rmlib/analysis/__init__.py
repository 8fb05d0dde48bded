"""Layer 5: the experiments' analyses. Statistics, the claims (ONE set of verdict rules),
benchmarks, norm dispersion, the four scenarios, Best-of-N curves, the synthetic-gold setup, RLOO
curves. Tables in, tables out; figures are ``rmlib.plots``.
"""
