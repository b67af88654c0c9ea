"""The measured tier: real training steps, a store of profiles, and validation of the predictions.

- `measure`: `profile(spec, device, steps)` -> `Profile` (CUDA: allocator peaks per phase, NVML,
  the context; CPU: the simulate tracker on real tensors and peak RSS)
- `result`: the `Profile` type and its JSON form
- `store`: `profiles/<gpu>/<spec key>.json`, written atomically; `load_profiles` skips bad files
- `campaign`: `--matrix FILE.toml`, many specs, each CUDA case in a fresh forked process
- `validate`: every stored profile against `estimate` and `simulate`, with a summary
"""

from vramplan.profile.result import MeasuredGpu, PhaseMeasure, Profile
from vramplan.profile.store import ProfileExists, load_profiles, save_profile, spec_key

__all__ = ["MeasuredGpu", "PhaseMeasure", "Profile", "ProfileExists", "load_profiles", "save_profile",
           "spec_key"]
