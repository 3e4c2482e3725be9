"""Models, registered under the paper's names: `proj.uvim.vit` (stage I), `proj.uvim.lm` (stage II)."""
