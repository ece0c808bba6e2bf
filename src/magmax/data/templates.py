"""Zero-shot prompt templates: each string has one ``{}`` that receives a class name.

The CIFAR-100 (18), ImageNet (80, used for ImageNet-R, CUB-200 and DomainNet), Stanford Cars (8) and
8-dataset lists are copied verbatim from the MagMax reference code (``src/datasets/templates.py``),
which takes them from the CLIP repository's prompt-engineering notebook and the task-vectors
repository; the 80 ImageNet templates are the same, in the same order, as open_clip's
``OPENAI_IMAGENET_TEMPLATES``. Order matters only to floating-point rounding of the averaged head.

``TEXT_TEMPLATES`` and ``FASHION_MNIST_TEMPLATES`` are this project's choices for its CPU demos (no
published list exists): "a kind of {}." is the template the WordNet-supersense demo uses.
"""

from __future__ import annotations

CIFAR100_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a black and white photo of a {}.",
    "a low contrast photo of a {}.",
    "a high contrast photo of a {}.",
    "a bad photo of a {}.",
    "a good photo of a {}.",
    "a photo of a small {}.",
    "a photo of a big {}.",
    "a photo of the {}.",
    "a blurry photo of the {}.",
    "a black and white photo of the {}.",
    "a low contrast photo of the {}.",
    "a high contrast photo of the {}.",
    "a bad photo of the {}.",
    "a good photo of the {}.",
    "a photo of the small {}.",
    "a photo of the big {}.",
)

IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

CARS_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of my {}.",
    "i love my {}!",
    "a photo of my dirty {}.",
    "a photo of my clean {}.",
    "a photo of my new {}.",
    "a photo of my old {}.",
)

MNIST_TEMPLATES: tuple[str, ...] = ('a photo of the number: "{}".',)

SVHN_TEMPLATES: tuple[str, ...] = ('a photo of the number: "{}".',)

EUROSAT_TEMPLATES: tuple[str, ...] = (
    "a centered satellite photo of {}.",
    "a centered satellite photo of a {}.",
    "a centered satellite photo of the {}.",
)

RESISC45_TEMPLATES: tuple[str, ...] = (
    "satellite imagery of {}.",
    "aerial imagery of {}.",
    "satellite photo of {}.",
    "aerial photo of {}.",
    "satellite view of {}.",
    "aerial view of {}.",
    "satellite imagery of a {}.",
    "aerial imagery of a {}.",
    "satellite photo of a {}.",
    "aerial photo of a {}.",
    "satellite view of a {}.",
    "aerial view of a {}.",
    "satellite imagery of the {}.",
    "aerial imagery of the {}.",
    "satellite photo of the {}.",
    "aerial photo of the {}.",
    "satellite view of the {}.",
    "aerial view of the {}.",
)

SUN397_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a photo of the {}.",
)

DTD_TEMPLATES: tuple[str, ...] = (
    "a photo of a {} texture.",
    "a photo of a {} pattern.",
    "a photo of a {} thing.",
    "a photo of a {} object.",
    "a photo of the {} texture.",
    "a photo of the {} pattern.",
    "a photo of the {} thing.",
    "a photo of the {} object.",
)

GTSRB_TEMPLATES: tuple[str, ...] = (
    'a zoomed in photo of a "{}" traffic sign.',
    'a centered photo of a "{}" traffic sign.',
    'a close up photo of a "{}" traffic sign.',
)

TEXT_TEMPLATES: tuple[str, ...] = ("a kind of {}.",)

FASHION_MNIST_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a black and white photo of a {}.",
    "a low resolution photo of a {}.",
    "a photo of the {}.",
)

SIMPLE_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "cifar100": CIFAR100_TEMPLATES,
    "imagenet": IMAGENET_TEMPLATES,
    "cars": CARS_TEMPLATES,
    "mnist": MNIST_TEMPLATES,
    "svhn": SVHN_TEMPLATES,
    "eurosat": EUROSAT_TEMPLATES,
    "resisc45": RESISC45_TEMPLATES,
    "sun397": SUN397_TEMPLATES,
    "dtd": DTD_TEMPLATES,
    "gtsrb": GTSRB_TEMPLATES,
    "text": TEXT_TEMPLATES,
    "fashion_mnist": FASHION_MNIST_TEMPLATES,
    "simple": SIMPLE_TEMPLATES,
}
"""Named sets, for readers whose templates are an option (``imagefolder``)."""


def template_set(name_or_list: str | list[str] | tuple[str, ...]) -> list[str]:
    """A named set, or an explicit list checked to have exactly one ``{}`` per template."""
    from magmax.errors import ConfigError

    if isinstance(name_or_list, str):
        if name_or_list not in TEMPLATE_SETS:
            raise ConfigError(
                f"unknown template set '{name_or_list}'; choose one of: {', '.join(TEMPLATE_SETS)} or give a list"
            )
        return list(TEMPLATE_SETS[name_or_list])
    templates = list(name_or_list)
    if not templates:
        raise ConfigError("an empty template list; give at least one template with one '{}'")
    for t in templates:
        if t.count("{}") != 1:
            raise ConfigError(f"template {t!r} must contain exactly one '{{}}' for the class name")
    return templates
