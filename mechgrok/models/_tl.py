"""The transformer-lens boundary: the one module that imports transformer-lens.

Everything mechgrok uses from transformer-lens comes through here, so a new transformer-lens
version is handled in one place. mechgrok targets transformer-lens 3.x: 4.x deprecates
``HookedTransformer`` in favour of ``TransformerBridge``, and sae-lens 6 needs < 4.

>>> TL_VERSION.split(".")[0].isdigit()
True
>>> "relu" in SUPPORTED_ACTIVATIONS
True
"""

from __future__ import annotations

import importlib.metadata
import warnings

with warnings.catch_warnings():
    # transformer-lens 3.x warns that HookedTransformer is deprecated in favour of 4.x's
    # TransformerBridge; sae-lens 6 needs < 4, so 3.x is the version mechgrok targets.
    warnings.simplefilter("ignore", DeprecationWarning)
    warnings.simplefilter("ignore", FutureWarning)
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens import loading_from_pretrained as _tl_loading

    try:  # transformer-lens >= 3 exports it at the top level
        from transformer_lens import HookedRootModule
    except ImportError:  # pragma: no cover - transformer-lens 2.x
        from transformer_lens.hook_points import HookedRootModule
    from transformer_lens.hook_points import HookPoint
    from transformer_lens.utilities.activation_functions import SUPPORTED_ACTIVATIONS, softcap_enabled

    try:  # transformer-lens 3.9 classifies architectures in one place
        from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES as _POST_NORM
    except ImportError:  # pragma: no cover - older transformer-lens: no post-norm architecture known
        _POST_NORM = ()

TL_VERSION = importlib.metadata.version("transformer-lens")

#: Hugging Face architectures whose blocks normalise each sublayer's *output* before adding it to
#: the residual stream (post-norm, e.g. OLMo-2), as the installed transformer-lens lists them;
#: empty where it lists none.
POST_NORM_ARCHITECTURES: tuple[str, ...] = tuple(sorted(_POST_NORM))

__all__ = ["HookedTransformer", "HookedTransformerConfig", "HookedRootModule", "HookPoint", "SUPPORTED_ACTIVATIONS",
           "softcap_enabled", "TL_VERSION", "POST_NORM_ARCHITECTURES"]


def _quiet_build(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with transformer-lens's deprecation warnings silenced (for this call only)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message=".*deprecated.*")
        return fn(*args, **kwargs)
