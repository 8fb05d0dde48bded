"""AlpacaEval generators left out of every split: the data owns these oddities."""

from __future__ import annotations

# Generators left out of every split, with the reason (see /shared/data notes).
EXCLUDED_GENERATORS = {
    "falcon-7b-instruct": "its 805 outputs are an exact copy of falcon-40b-instruct's: kept, the same texts "
                          "could sit on both sides of the generator split (or count twice on one side)",
    "Mistral-7B+RAHF-DUAL+LoRA": "judged against a different reference output_1 than all other generators, so "
                                 "its gold labels are not comparable with theirs",
}
