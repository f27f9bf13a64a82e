"""Activation patching: exact (batched) and attribution (AtP / AtP*) sweeps with labelled results.

    from omnilens.methods.patching import Sweep, LogitDiff, patch_exact, patch_attribution
    result = patch_exact(lens, clean, corrupted, LogitDiff(cat_id, dog_id), Sweep("hook_resid_pre"))
    result.top(5); result.to_figure().write_html("resid_pre.html"); result.save("resid_pre.safetensors")
"""

from omnilens.methods.patching.attribution import patch_attribution
from omnilens.methods.patching.exact import patch_exact
from omnilens.methods.patching.metrics import KLToClean, LogitDiff, LogitFn, LogProb, Prob
from omnilens.methods.patching.results import PatchingResult, rank_correlation
from omnilens.methods.patching.sweeps import Sweep

__all__ = ["KLToClean", "LogProb", "LogitDiff", "LogitFn", "PatchingResult", "Prob", "Sweep", "patch_attribution",
           "patch_exact", "rank_correlation"]
