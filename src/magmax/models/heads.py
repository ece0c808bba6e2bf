"""Zero-shot heads from class names (protocol §2): the frozen classifier, never trained nor merged.

For class c with name n_c and templates t_1..t_M (each with one "{}"):

    e_{c,m} = enc(t_m.replace("{}", n_c)) / ‖enc(t_m.replace("{}", n_c))‖
    h_c     = mean_m e_{c,m} / ‖mean_m e_{c,m}‖

and logits = s · f̂ · Hᵀ with f̂ the L2-normalised image (or text) features and s the logit scale.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from magmax.errors import ConfigError


def fill_templates(class_names: Sequence[str], templates: Sequence[str]) -> list[str]:
    """All filled templates, class-major: [t_1(n_1), .., t_M(n_1), t_1(n_2), ..]."""
    if len(class_names) == 0:
        raise ConfigError("zero-shot head: no class names given; pass the dataset's class_names")
    if len(templates) == 0:
        raise ConfigError("zero-shot head: no templates given; pass at least one template such as 'a photo of a {}.'")
    for template in templates:
        if template.count("{}") != 1:
            raise ConfigError(f"zero-shot template {template!r} must contain exactly one '{{}}' for the class name")
    return [template.replace("{}", name) for name in class_names for template in templates]


@torch.no_grad()
def template_head(
    encode: Callable[[list[str]], torch.Tensor],
    class_names: Sequence[str],
    templates: Sequence[str],
    batch_size: int = 256,
) -> torch.Tensor:
    """Zero-shot head [C, D]: per class the normalised mean of normalised template embeddings.

    ``encode`` maps a list of strings to embeddings [B, D] (normalised or not; each is normalised
    here). Texts are encoded in batches of ``batch_size`` to bound memory.
    """
    texts = fill_templates(class_names, templates)
    chunks = [encode(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]
    embeddings = F.normalize(torch.cat(chunks).float(), dim=-1)
    per_class = embeddings.view(len(class_names), len(templates), -1).mean(dim=1)
    return F.normalize(per_class, dim=-1)
