"""Model families behind one seam (see :mod:`diffusion_env.models.base` for who owns what).

``load_family(model)`` loads a local folder or cached Hugging Face repo with the family whose layout it
has: ``SD1Family`` (SD v1.x, ε-prediction, DDIM η) and ``SD3Family`` (SD3/3.5, flow matching, Flow-GRPO's
SDE; ``SD3CPSFamily`` its coefficients-preserving variant).
"""

from diffusion_env.models.base import (
    Cond,
    ModelFamily,
    cat_conditions,
    expand_condition,
    family_class,
    load_family,
    register_family,
    registered_families,
)
from diffusion_env.models.loading import (
    TINY_MODEL_PATH,
    TINYFLOW_MODEL_PATH,
    ModelNotFoundError,
    resolve_model_path,
)
from diffusion_env.models.sd1 import SD14_REPO, SD1Family
from diffusion_env.models.sd3 import SD35_REPO, SD3CPSFamily, SD3Family

__all__ = [
    "Cond",
    "ModelFamily",
    "ModelNotFoundError",
    "SD14_REPO",
    "SD1Family",
    "SD35_REPO",
    "SD3CPSFamily",
    "SD3Family",
    "TINY_MODEL_PATH",
    "TINYFLOW_MODEL_PATH",
    "cat_conditions",
    "expand_condition",
    "family_class",
    "load_family",
    "register_family",
    "registered_families",
    "resolve_model_path",
]
