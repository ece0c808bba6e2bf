"""ImageNet-R (Hendrycks et al. 2021): 30,000 renditions (art, cartoons, sketches, toys, ...) of 200
ImageNet classes in 15 rendition domains. No official split exists.

Layout: the official ``imagenet-r.tar`` extracted: ``imagenet-r/<wnid>/<domain>_<n>.jpg`` (e.g.
``imagenet-r/n01443537/art_0.jpg``), found in an explicit ``root`` (the ``imagenet-r`` folder or its
parent), ``$MAGMAX_DATA/imagenet_r`` or ``~/data``. Class folders renamed to the README names
(``goldfish``, as the MagMax reference's download step does) are accepted too.

Class ids (``class_ids="reference"``, default): the MagMax reference renames the wnid folders to the
names in the archive's ``README.txt`` and reads them with ``ImageFolder``, so its ids, and thus the
paper's 200-class order, index the class names sorted in code-point order (``African_chameleon``,
``Granny_Smith``, ``accordion``, ...). :data:`IMAGENET_R_CLASSES` lists (wnid, README name) in that
order. ``class_ids="wnid"`` numbers the classes in sorted-wnid order instead (then the paper order
means other classes). Class names: the README names with ``_`` → space, as in the reference.

Split: the reference draws an unseeded 80/20 ``random_split`` of the whole set; here the same split
shape with a seed (``seed``, default 5 as in every reference script; ``train_fraction`` 0.8), over the
files sorted by class id then file name; both are recorded in ``info``.

Domains: the file-name prefix; ``domain_names`` lists the 15 in the protocol's domain-incremental order
(tattoo, sketch, graphic, ..., deviantart), so the default domain-incremental stream is the paper's.
Templates: the 80 ImageNet templates.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from magmax.data.base import (
    Dataset,
    DatasetReader,
    ImageFiles,
    LabeledSet,
    ReaderOptions,
    natural_name,
    register_reader,
)
from magmax.data.folders import images_under, subfolders
from magmax.data.locate import candidate_dirs, describe_listing, locate, malformed
from magmax.data.splits import random_split
from magmax.data.templates import IMAGENET_TEMPLATES

DOMAINS = (
    "tattoo", "sketch", "graphic", "painting", "art", "origami", "sculpture", "graffiti",
    "cartoon", "misc", "toy", "embroidery", "videogame", "sticker", "deviantart",
)  # fmt: skip
"""The 15 rendition domains in the paper's domain-incremental order (protocol §4)."""

IMAGENET_R_CLASSES: tuple[tuple[str, str], ...] = (
    ("n01694178", "African_chameleon"),
    ("n07742313", "Granny_Smith"),
    ("n02672831", "accordion"),
    ("n12267677", "acorn"),
    ("n02088094", "afghan_hound"),
    ("n02701002", "ambulance"),
    ("n02009912", "american_egret"),
    ("n02219486", "ant"),
    ("n02749479", "assault_rifle"),
    ("n01632777", "axolotl"),
    ("n02486410", "baboon"),
    ("n02769748", "backpack"),
    ("n02447366", "badger"),
    ("n07693725", "bagel"),
    ("n01614925", "bald_eagle"),
    ("n07753592", "banana"),
    ("n02793495", "barn"),
    ("n09835506", "baseball_player"),
    ("n02802426", "basketball"),
    ("n02088238", "basset_hound"),
    ("n02808440", "bathtub"),
    ("n02088364", "beagle"),
    ("n02363005", "beaver"),
    ("n02206856", "bee"),
    ("n02823750", "beer_glass"),
    ("n07720875", "bell_pepper"),
    ("n02841315", "binoculars"),
    ("n02843684", "birdhouse"),
    ("n02410509", "bison"),
    ("n01860187", "black_swan"),
    ("n02088466", "bloodhound"),
    ("n02106166", "border_collie"),
    ("n02096585", "boston_terrier"),
    ("n02883205", "bow_tie"),
    ("n02108089", "boxer"),
    ("n07714990", "broccoli"),
    ("n02906734", "broom"),
    ("n02909870", "bucket"),
    ("n07880968", "burrito"),
    ("n07714571", "cabbage"),
    ("n02948072", "candle"),
    ("n02950826", "cannon"),
    ("n02951358", "canoe"),
    ("n02966193", "carousel"),
    ("n02980441", "castle"),
    ("n02939185", "cauldron"),
    ("n01784675", "centipede"),
    ("n07697313", "cheeseburger"),
    ("n02130308", "cheetah"),
    ("n02085620", "chihuahua"),
    ("n02481823", "chimpanzee"),
    ("n02112137", "chow_chow"),
    ("n02607072", "clown_fish"),
    ("n01748264", "cobra"),
    ("n02102318", "cocker_spaniels"),
    ("n02233338", "cockroach"),
    ("n02106030", "collie"),
    ("n03124170", "cowboy_hat"),
    ("n07718472", "cucumber"),
    ("n02110341", "dalmatian"),
    ("n02268443", "dragonfly"),
    ("n01847000", "duck"),
    ("n02526121", "eel"),
    ("n03272010", "electric_guitar"),
    ("n07920052", "espresso"),
    ("n03345487", "fire_engine"),
    ("n02007558", "flamingo"),
    ("n03372029", "flute"),
    ("n02190166", "fly"),
    ("n02356798", "fox_squirrel"),
    ("n02108915", "french_bulldog"),
    ("n03424325", "gasmask"),
    ("n02423022", "gazelle"),
    ("n02106662", "german_shepherd_dog"),
    ("n02483362", "gibbon"),
    ("n02099601", "golden_retriever"),
    ("n01531178", "goldfinch"),
    ("n01443537", "goldfish"),
    ("n01855672", "goose"),
    ("n02480855", "gorilla"),
    ("n03452741", "grand_piano"),
    ("n02226429", "grasshopper"),
    ("n01484850", "great_white_shark"),
    ("n02066245", "grey_whale"),
    ("n03467068", "guillotine"),
    ("n02364673", "guinea_pig"),
    ("n03481172", "hammer"),
    ("n01494475", "hammerhead"),
    ("n03494278", "harmonica"),
    ("n03495258", "harp"),
    ("n03498962", "hatchet"),
    ("n01514859", "hen"),
    ("n01986214", "hermit_crab"),
    ("n02398521", "hippopotamus"),
    ("n07697537", "hotdog"),
    ("n01833805", "hummingbird"),
    ("n02110185", "husky"),
    ("n02117135", "hyena"),
    ("n07614500", "ice_cream"),
    ("n01677366", "iguana"),
    ("n02091032", "italian_greyhound"),
    ("n03594945", "jeep"),
    ("n01910747", "jellyfish"),
    ("n03602883", "joystick"),
    ("n01534433", "junco"),
    ("n02071294", "killer_whale"),
    ("n02056570", "king_penguin"),
    ("n01882714", "koala"),
    ("n03630383", "lab_coat"),
    ("n02099712", "labrador_retriever"),
    ("n02165456", "ladybug"),
    ("n03649909", "lawn_mower"),
    ("n07749582", "lemon"),
    ("n02128385", "leopard"),
    ("n02814860", "lighthouse"),
    ("n02129165", "lion"),
    ("n03676483", "lipstick"),
    ("n02437616", "llama"),
    ("n01983481", "lobster"),
    ("n01820546", "lorikeet"),
    ("n03710193", "mailbox"),
    ("n02236044", "mantis"),
    ("n02138441", "meerkat"),
    ("n04552348", "military_aircraft"),
    ("n03773504", "missile"),
    ("n03775071", "mitten"),
    ("n02992529", "mobile_phone"),
    ("n02279972", "monarch_butterfly"),
    ("n07734744", "mushroom"),
    ("n01630670", "newt"),
    ("n02480495", "orangutan"),
    ("n01518878", "ostrich"),
    ("n02510455", "panda"),
    ("n03888257", "parachute"),
    ("n01806143", "peacock"),
    ("n02051845", "pelican"),
    ("n02113023", "pembroke_welsh_corgi"),
    ("n03930630", "pickup_truck"),
    ("n02395406", "pig"),
    ("n07753275", "pineapple"),
    ("n03947888", "pirate_ship"),
    ("n07873807", "pizza"),
    ("n02134084", "polar_bear"),
    ("n07768694", "pomegranate"),
    ("n02112018", "pomeranian"),
    ("n02346627", "porcupine"),
    ("n07695742", "pretzel"),
    ("n02655020", "puffer_fish"),
    ("n02110958", "pug"),
    ("n02119022", "red_fox"),
    ("n04086273", "revolver"),
    ("n02106550", "rottweiler"),
    ("n04118538", "rugby_ball"),
    ("n02109525", "saint_bernard"),
    ("n04133789", "sandal"),
    ("n04141076", "saxophone"),
    ("n04325704", "scarf"),
    ("n04146614", "school_bus"),
    ("n04147183", "schooner"),
    ("n01770393", "scorpion"),
    ("n02097298", "scottish_terrier"),
    ("n10565667", "scuba_diver"),
    ("n02077923", "sea_lion"),
    ("n04192698", "shield"),
    ("n02086240", "shih_tzu"),
    ("n02445715", "skunk"),
    ("n01944390", "snail"),
    ("n02128757", "snow_leopard"),
    ("n04254680", "soccer_ball"),
    ("n04266014", "space_shuttle"),
    ("n04275548", "spider_web"),
    ("n02113799", "standard_poodle"),
    ("n02317335", "starfish"),
    ("n04310018", "steam_locomotive"),
    ("n01498041", "stingray"),
    ("n07745940", "strawberry"),
    ("n04347754", "submarine"),
    ("n02123045", "tabby_cat"),
    ("n04389033", "tank"),
    ("n01774750", "tarantula"),
    ("n04409515", "tennis_ball"),
    ("n02129604", "tiger"),
    ("n02114367", "timber_wolf"),
    ("n01843383", "toucan"),
    ("n02113624", "toy_poodle"),
    ("n04465501", "tractor"),
    ("n01644373", "tree_frog"),
    ("n04487394", "trombone"),
    ("n04522168", "vase"),
    ("n04536866", "violin"),
    ("n09472597", "volcano"),
    ("n01616318", "vulture"),
    ("n02092339", "weimaraner"),
    ("n02098286", "west_highland_white_terrier"),
    ("n02797295", "wheelbarrow"),
    ("n02091134", "whippet"),
    ("n04591713", "wine_bottle"),
    ("n02325366", "wood_rabbit"),
    ("n02094433", "yorkshire_terrier"),
    ("n02391049", "zebra"),
)
"""(wnid, README folder name) of the 200 classes, in the MagMax reference's class-id order."""

LAYOUT = "imagenet-r/<wnid>/<domain>_<n>.jpg (the extracted official imagenet-r.tar)"
SOURCE = "https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar"

_WNID = re.compile(r"n\d{8}")


def class_table(class_ids: str) -> list[tuple[str, str]]:
    return list(IMAGENET_R_CLASSES) if class_ids == "reference" else sorted(IMAGENET_R_CLASSES)


def probe(candidate: Path) -> Path | None:
    known = {w for w, _ in IMAGENET_R_CLASSES} | {n for _, n in IMAGENET_R_CLASSES}
    for folder in (candidate / "imagenet-r", candidate):
        if folder.is_dir():
            names = subfolders(folder)
            if names and any(n in known for n in names):
                return folder
    return None


class ImageNetROptions(ReaderOptions):
    seed: int = 5
    """Seed of the 80/20 split (the reference's was unseeded; 5 is the seed of its scripts)."""
    train_fraction: float = Field(0.8, gt=0.0, lt=1.0)
    class_ids: Literal["reference", "wnid"] = "reference"
    """``reference``: ids of the MagMax code (sorted README names); ``wnid``: sorted wnids."""


@register_reader("imagenet_r")
class ImageNetRReader(DatasetReader):
    modality = "image"
    summary = "ImageNet-R: 30k renditions of 200 ImageNet classes, 15 domains, seeded 80/20 split"
    Options = ImageNetROptions

    def read(self, root: Path | None, options: ImageNetROptions) -> Dataset:
        folder = locate(
            "imagenet_r", candidate_dirs(root, ("imagenet_r", "imagenet-r"), ["~/data"]), probe, LAYOUT, SOURCE
        )
        table = class_table(options.class_ids)
        id_of = {**{w: i for i, (w, _) in enumerate(table)}, **{n: i for i, (_, n) in enumerate(table)}}
        domain_of = {d: i for i, d in enumerate(DOMAINS)}

        entries: list[tuple[int, str, str]] = []  # (class id, folder, file)
        for name in subfolders(folder):
            if name not in id_of:
                raise malformed(
                    "imagenet_r", folder / name, "not one of the 200 ImageNet-R class folders (wnid or README name)"
                )
            entries += [(id_of[name], name, f) for f in images_under(folder / name)]
        if not entries:
            raise malformed("imagenet_r", folder, "no image files")
        entries.sort()

        domains = []
        for _, name, file in entries:
            prefix = os.path.basename(file).split("_", 1)[0]
            if prefix not in domain_of:
                raise malformed(
                    "imagenet_r",
                    folder / name / file,
                    f"file name does not start with one of the 15 domains ({', '.join(DOMAINS)}) and '_'",
                )
            domains.append(domain_of[prefix])
        full = LabeledSet(
            ImageFiles(str(folder / name / f) for _, name, f in entries),
            np.asarray([c for c, _, _ in entries]),
            np.asarray(domains),
        )
        train_idx, test_idx = random_split(len(full), options.train_fraction, options.seed)
        return Dataset(
            name="imagenet_r",
            modality="image",
            class_names=[natural_name(n) for _, n in table],
            train=full.subset(train_idx),
            test=full.subset(test_idx),
            templates=list(IMAGENET_TEMPLATES),
            domain_names=list(DOMAINS),
            info={
                "listing": describe_listing(folder, [f"{n}/{f}" for _, n, f in entries]),
                "wnids": [w for w, _ in table],
                "class_ids": options.class_ids,
                "classes_present": len({c for c, _, _ in entries}),
                "split": {"kind": "random", "train_fraction": options.train_fraction, "seed": options.seed},
            },
        )
