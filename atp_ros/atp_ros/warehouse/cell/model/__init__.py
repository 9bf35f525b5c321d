"""The bundled model of the rendered warehouse cell, trained from nothing on CPU (``python -m
atp_ros.warehouse.cell.model``).

warehouse-tiny's recipe (``warehouse.train``) at the cell's geometry, in the same resumable run:

1. **frames** -- ``random_still`` training frames rendered at the camera's 4:3 (and the stills'
   square) and squeezed to 256 x 256 as the processor does, cached in ``--work`` in chunks;
   a validation split (train phrasings, new frames) for choosing ATP's defaults later.
2. **clip** -- a CLIP (ViT patch 16 at 256 px: 16 x 16 = 256 patches; a small text tower on the
   cell's byte-level BPE) with the global InfoNCE (captions: 2-3 answered questions) and the
   region loss that puts the patch-text cosine (ATP's ``S_inter`` read-out) on the question's
   evidence patches.
3. **features** -- the frozen tower's last layer for every frame, cached.
4. **llava** -- projector + Llama decoder from scratch on the cached features: twelve question
   turns per image in one sequence (the prompt exactly as the shipped chat template and
   processor build it), loss on the answer token and its end token, attention supervision of
   two heads toward the evidence patches (first four turns), and 30% of sequences on a random
   10-100% subset of image tokens at their ORIGINAL position ids (what makes pruning work).
5. **report** -- ``metrics.json``: test-split accuracy (held-out phrasings, new 640 x 480
   frames) per kind through ``load_backend(out).answer``: full, ATP keep 0.25 and 0.11, random
   keep 0.11; the frame latency; sizes and phase times. ``learning_curve.png`` next to it.

The towers' forward passes run under bfloat16 autocast on a CPU that computes bfloat16 natively
(AVX512-BF16 or AMX; elsewhere in float32, where emulated bfloat16 is many times slower), the LM's in
float32; losses, weights and the optimizer are float32 throughout. ``metrics.json`` records which
(``tower_precision``). Step ``s`` of a phase draws from ``default_rng([seed, phase, s])``, so a
resumed run trains exactly what an uninterrupted one would.
"""

from atp_ros.warehouse.cell.model.recipe import QUICK, Recipe

__all__ = ["QUICK", "Recipe"]
