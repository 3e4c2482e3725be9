"""Command-line tools: `plan` sizes a run before it starts; `mask_code` (the paper's Figure 10)
and `reconstruct` (the oracle's round trip) study the guiding code."""
