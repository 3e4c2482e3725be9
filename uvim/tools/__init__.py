"""Command-line tools: `python -m uvim.tools.plan` sizes a run before it starts."""
