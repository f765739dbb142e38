"""Draw docs/context_family.png: a 1024^2 "context" slide (hrvit synth slides --family context, slide_000) read back
from its pyramid at level 1, next to its labels, with a legend.

    python tools/draw_context_family.py docs/context_family.png
"""
import sys
import tempfile
from pathlib import Path

# tools/profile.py would shadow the standard library's profile module, which torch imports (cProfile)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from hrvit.data import open_image, open_label  # noqa: E402
from hrvit.data.synthetic import FAMILY_CLASSES, make_slides  # noqa: E402
from hrvit.engine.picture import PALETTE, _overlay, _titled, _to_rgb  # noqa: E402
from hrvit.patching.overlay import save_with_legend  # noqa: E402

out = Path(sys.argv[1])
with tempfile.TemporaryDirectory() as tmp:
    folder = make_slides(Path(tmp), n=1, size=1024, seed=0, family="context").parent
    image, label = open_image(folder / "slide_000.tiff"), open_label(folder / "slide_000_mask.tiff")
    rgb = _to_rgb(image.read_level(1, (0, 0), image.level_shapes[1]))
    lab = label.read_level(1, (0, 0), label.level_shapes[1])
panels = [_titled(rgb, "image (1024^2 slide, shown at 512^2)"),
          _titled(_overlay(rgb, lab), "labels: tumour inside the capsule, benign outside")]
gap = 8
sheet = np.full((panels[0].height, sum(p.width for p in panels) + gap, 3), 255, np.uint8)
sheet[:, : panels[0].width] = np.asarray(panels[0])
sheet[:, panels[0].width + gap:] = np.asarray(panels[1])
names = FAMILY_CLASSES["context"]
save_with_legend(out, sheet, {names[k]: PALETTE[k].tolist() for k in (1, 2)}, optimize=True)
print(out, out.stat().st_size)
