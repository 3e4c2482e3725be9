"""tfds builders that need no download; importing this package registers them with tfds.

- `toy_scenes`: procedural scenes with panoptic, depth and colour labels.
- `coco_panoptic_folder`: a COCO-panoptic-format folder (also: `export_coco_panoptic`).
"""

from uvim.datasets import coco_folder, toy_scenes  # noqa: F401  (registers the builders)
