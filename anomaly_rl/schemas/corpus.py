"""Text a from-scratch tokenizer is trained on: everything the schemas ever write or ask.

A tiny model pays per token, so its tokenizer should see every prompt (both styles, with and
without references), every SFT target template of every stage and label, every tag and every
coordinate value 0..max_coordinate in the box format. Texts are deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence

from anomaly_rl.data.records import ANOMALOUS, NORMAL, Sample
from anomaly_rl.schemas.base import Schema
from anomaly_rl.schemas.config import SCHEMA_NAMES, load_schema
from anomaly_rl.schemas.parsing import close_tag, open_tag
from anomaly_rl.schemas.rendering import format_boxes

MVTEC_CATEGORIES: tuple[str, ...] = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)  # fmt: skip
MVTEC_DEFECT_TYPES: tuple[str, ...] = (
    "broken_large", "broken_small", "contamination", "bent_wire", "cable_swap", "combined",
    "cut_inner_insulation", "cut_outer_insulation", "missing_cable", "missing_wire",
    "poke_insulation", "crack", "faulty_imprint", "poke", "squeeze", "color", "cut", "hole",
    "metal_contamination", "thread", "bent", "broken", "glue", "print", "fold", "glue_strip",
    "gray_stroke", "oil", "rough", "flip", "scratch", "pill_type", "manipulated_front",
    "scratch_head", "scratch_neck", "thread_side", "thread_top", "defective", "damaged_case",
    "misplaced", "liquid", "broken_teeth", "fabric_border", "fabric_interior", "split_teeth",
    "squeezed_teeth",
)  # fmt: skip


def _samples(categories: Sequence[str], defect_types: Sequence[str], size: tuple[int, int]) -> list[Sample]:
    """One normal and one anomalous sample per category (defect types cycled), plus a two-box one."""
    width, height = size
    box = (width * 0.25, height * 0.25, width * 0.5, height * 0.5)
    second = (width * 0.6, height * 0.6, width * 0.9, height * 0.8)
    samples = []
    for i, category in enumerate(categories):
        defect = defect_types[i % len(defect_types)] if defect_types else "defect"
        samples.append(Sample("", NORMAL, category, "good", None, (), size, "train"))
        boxes = (box, second) if i % 2 else (box,)
        samples.append(Sample("", ANOMALOUS, category, defect, None, boxes, size, "train"))
    for j, defect in enumerate(defect_types):  # every defect name appears at least once
        category = categories[j % len(categories)] if categories else "object"
        samples.append(Sample("", ANOMALOUS, category, defect, None, (box,), size, "train"))
    return samples


def _schema_variants(schemas: Sequence[Schema] | None) -> list[Schema]:
    base = list(schemas) if schemas is not None else [load_schema(name) for name in SCHEMA_NAMES]
    variants = []
    for schema in base:
        for style in schema.styles:
            variants.append(
                type(schema)(
                    style=style,
                    styles=schema.styles,
                    render=schema.render_templates,
                    box_separator=schema.box_separator,
                )
            )
    return variants


def tokenizer_corpus(
    image_size: tuple[int, int],
    max_coordinate: int,
    categories: Sequence[str] = MVTEC_CATEGORIES,
    defect_types: Sequence[str] = MVTEC_DEFECT_TYPES,
    schemas: Sequence[Schema] | None = None,
) -> list[str]:
    """Prompts and rendered responses of every schema (default: conf/schema/*.yaml, all styles).

    Args:
        image_size: the model frame (width, height) that prompts state and boxes live in.
        max_coordinate: the largest coordinate value a response may write (usually max(image_size)).
        categories, defect_types: the dataset words prompts and targets contain.
        schemas: configured schemas to cover instead of the defaults (e.g. with edited prompts).
    """
    if max_coordinate < 0:
        raise ValueError(f"max_coordinate must be >= 0, got {max_coordinate}")
    texts: list[str] = []
    samples = _samples(categories, defect_types, image_size)
    for schema in _schema_variants(schemas):
        for sample in samples[: 2 * len(categories)]:  # the prompt depends on the category only
            for refs in (0, 1, 2):
                for message in schema.messages(sample, image_size, num_references=refs):
                    texts.extend(part["text"] for part in message["content"] if part["type"] == "text")
        n_variants = max(
            (
                len(options)
                for per_label in schema.render_templates.values()
                for options in per_label.values()
            ),
            default=1,
        )
        for sample in samples:
            for k in range(n_variants):  # template k of every stage: all templates appear
                pick = lambda options, k=k: options[k % len(options)]  # noqa: E731
                texts.append(schema.render_variant(sample, sample.boxes, image_size, 1, pick))
    values = list(range(max_coordinate + 1))
    for start in range(0, len(values), 4):  # every coordinate value, in the box format
        chunk = values[start : start + 4]
        chunk += [max_coordinate] * (4 - len(chunk))
        for separator in (", ", ","):
            texts.append(open_tag("think") + format_boxes([chunk], separator) + close_tag("think"))
    return list(dict.fromkeys(texts))  # unique, first-seen order
