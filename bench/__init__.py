"""Speed benchmark of rmlib against TRL's RewardTrainer and plain loops (issue 9): `make bench`.

``bench.run`` (the parent) runs each measurement of ``bench.measure`` in its own process, so each
peak RSS is its own, and writes ``bench/results.md`` + ``bench/results.json``; ``bench.report``
holds the arithmetic (FLOPs, MFU, ratios) and the Markdown writer, ``bench.trl_format`` the
conversion of rmlib pairs to TRL's dataset format. See ``bench/README.md``.
"""
