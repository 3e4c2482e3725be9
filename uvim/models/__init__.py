"""Models under the paper's names: `proj.uvim.vit` (stage I) and `proj.uvim.lm` (stage II)."""
