"""How the example scores and reports its runs: F1 / exact match against gold answers,
ROUGE-L and first-token agreement against the full-prefill answer (:mod:`metrics`), and
per-mode summaries, tables, CSV and plots (:mod:`report`). Not part of the installed
library: nothing in ``ucm`` uses them."""
