"""A reasoning schema: the prompt a model gets, how its response is parsed, and the ideal response.

The three schemas (adfm, r1, direct) differ only in their class attributes (tags, which stage holds
the boxes); the wording of prompts and of SFT targets is data, passed in from `conf/schema/*.yaml`.
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

from anomaly_rl.data.records import ANOMALOUS, NORMAL, Box, Sample
from anomaly_rl.schemas.parsed import ParsedResponse
from anomaly_rl.schemas.parsing import (
    answer_letter,
    close_tag,
    follows_layout,
    has_brackets,
    open_tag,
    parse_boxes,
    stage_texts,
)
from anomaly_rl.schemas.rendering import IntBox, format_boxes, snap_box, whole_image_box

PROMPT_KEYS: tuple[str, ...] = ("system", "user", "references")
PROMPT_PLACEHOLDERS: frozenset[str] = frozenset({"width", "height", "category", "num_references"})
RENDER_PLACEHOLDERS: frozenset[str] = frozenset({"width", "height", "category", "defect", "boxes"})
LABELS: tuple[str, ...] = (ANOMALOUS, NORMAL)

TOKENS_PER_TAG = 1
"""Lower bound used by `min_new_tokens`: a tag may be a single (added) token in some tokenizer."""


class SchemaConfigError(ValueError):
    """A schema's prompt or render templates are missing or malformed; names the offending key."""


def _placeholders(template: str, where: str) -> set[str]:
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as err:  # unbalanced braces
        raise SchemaConfigError(f"{where}: malformed template {template!r}: {err}") from err
    if any(not f.isidentifier() for f in fields):
        raise SchemaConfigError(f"{where}: placeholders must be names like {{width}}, got {sorted(fields)}")
    return fields


def _check_template(template: Any, where: str, allowed: frozenset[str]) -> str:
    if not isinstance(template, str):
        raise SchemaConfigError(f"{where}: expected a string, got {type(template).__name__}")
    unknown = _placeholders(template, where) - allowed
    if unknown:
        raise SchemaConfigError(
            f"{where}: unknown placeholders {sorted(unknown)}; allowed: {sorted(allowed)}"
        )
    return template


def readable(name: str) -> str:
    """Dataset identifiers as words ("metal_nut" -> "metal nut"): fewer odd tokens in prompts."""
    return name.replace("_", " ").strip()


class Schema:
    """Prompting, parsing and rendering for one response shape; subclasses only set class attributes.

    Args:
        style: which entry of `styles` `messages` uses (e.g. "short" or "instruction").
        styles: per style, templates `system`, `user` and `references` (the latter is put before the
            user text when reference images are shown). Placeholders: {width} {height} {category}
            {num_references}.
        render: per non-answer tag, per label ("anomalous", "normal"), a list of templates for the
            stage's contents in SFT targets. Placeholders: {boxes} {category} {defect} {width} {height}.
            The region stage of a schema that requires boxes must write {boxes} in every template.
        box_separator: what goes between the four numbers of a written box: ", " reads like the
            spec's "[x1, y1, x2, y2]"; "," saves three tokens per box with a whole-number tokenizer
            (the space before a number is a token of its own). Must be a comma with optional spaces.
    """

    name: ClassVar[str]
    tags: ClassVar[tuple[str, ...]]  # the stage tags of a valid response, in order
    region_tag: ClassVar[str | None]  # the stage boxes are parsed from (None: boxes are never read)
    requires_box: ClassVar[bool]  # a valid response names at least one box in the region stage

    def __init__(
        self,
        style: str,
        styles: Mapping[str, Mapping[str, str]],
        render: Mapping[str, Mapping[str, Sequence[str]]] | None = None,
        box_separator: str = ", ",
    ) -> None:
        if not isinstance(box_separator, str) or not re.fullmatch(r"[ ]*,[ ]*", box_separator):
            raise SchemaConfigError(
                f"schema.box_separator must be a comma with optional spaces, got {box_separator!r}"
            )
        self.box_separator = box_separator
        self.styles = self._check_styles(styles)
        if style not in self.styles:
            raise SchemaConfigError(
                f"schema.style={style!r} is not one of schema.styles {sorted(self.styles)}"
            )
        self.style = style
        self.render_templates = self._check_render(render or {})

    # ----------------------------------------------------------------- config validation
    def _check_styles(self, styles: Mapping[str, Mapping[str, str]]) -> dict[str, dict[str, str]]:
        if not isinstance(styles, Mapping) or not styles:
            raise SchemaConfigError("schema.styles must map style names to prompt templates")
        checked: dict[str, dict[str, str]] = {}
        for style_name, prompt in styles.items():
            where = f"schema.styles.{style_name}"
            if not isinstance(prompt, Mapping):
                raise SchemaConfigError(f"{where} must be a mapping with keys {list(PROMPT_KEYS)}")
            missing = [k for k in PROMPT_KEYS if k not in prompt]
            extra = [k for k in prompt if k not in PROMPT_KEYS]
            if missing or extra:
                raise SchemaConfigError(f"{where}: missing keys {missing}, unknown keys {extra}")
            checked[str(style_name)] = {
                k: _check_template(prompt[k], f"{where}.{k}", PROMPT_PLACEHOLDERS) for k in PROMPT_KEYS
            }
        return checked

    def _check_render(
        self, render: Mapping[str, Mapping[str, Sequence[str]]]
    ) -> dict[str, dict[str, tuple[str, ...]]]:
        stages = [t for t in self.tags if t != "answer"]
        extra = [k for k in render if k not in stages]
        if extra:
            raise SchemaConfigError(
                f"schema.render: {extra} are not stages of the {self.name} schema {stages}"
            )
        checked: dict[str, dict[str, tuple[str, ...]]] = {}
        for stage in stages:
            per_label = render.get(stage)
            if not isinstance(per_label, Mapping):
                raise SchemaConfigError(
                    f"schema.render.{stage} must map {list(LABELS)} to lists of templates"
                )
            checked[stage] = {}
            for label in LABELS:
                where = f"schema.render.{stage}.{label}"
                templates = per_label.get(label)
                if isinstance(templates, str) or not isinstance(templates, Sequence) or not templates:
                    raise SchemaConfigError(f"{where} must be a non-empty list of templates")
                for i, template in enumerate(templates):
                    _check_template(template, f"{where}[{i}]", RENDER_PLACEHOLDERS)
                    if stage == self.region_tag and self.requires_box and "{boxes}" not in template:
                        raise SchemaConfigError(
                            f"{where}[{i}] must contain {{boxes}}: this stage names the boxes"
                        )
                checked[stage][label] = tuple(templates)
        return checked

    # ----------------------------------------------------------------- properties
    @property
    def min_new_tokens(self) -> int:
        """A lower bound on the tokens of any response that follows the schema.

        Counted in structural units that no tokenizer can merge below one token each: every
        opening and closing tag (TOKENS_PER_TAG), the answer letter, and the four coordinates of
        the one box a box-requiring schema needs (a coordinate is at least one token). Stage texts
        may be empty in a valid response, so they add nothing. A `max_new_tokens` below this makes a
        valid response impossible; one above it may still truncate the rendered SFT targets, which
        only a check with the actual tokenizer can tell.
        """
        return 2 * TOKENS_PER_TAG * len(self.tags) + 1 + (4 if self.requires_box else 0)

    @property
    def prompt(self) -> dict[str, str]:
        return self.styles[self.style]

    # ----------------------------------------------------------------- prompting
    def messages(
        self, sample: Sample, model_size: tuple[int, int], num_references: int = 0
    ) -> list[dict[str, Any]]:
        """The chat (Hugging Face format) asking about `sample`, for a processor's chat template.

        Image slots: the query image first, then `num_references` reference images, in that order;
        callers must pass the images in the same order. `model_size` is the (width, height) of the
        query image as the model sees it: the prompt states it, and box coordinates refer to it.
        """
        if num_references < 0:
            raise ValueError(f"num_references must be >= 0, got {num_references}")
        values = {
            "width": int(model_size[0]),
            "height": int(model_size[1]),
            "category": readable(sample.category),
            "num_references": num_references,
        }
        text = self.prompt["user"].format(**values)
        if num_references > 0:
            text = self.prompt["references"].format(**values) + "\n" + text
        user: list[dict[str, Any]] = [{"type": "image"} for _ in range(1 + num_references)]
        user.append({"type": "text", "text": text})
        return [
            {"role": "system", "content": [{"type": "text", "text": self.prompt["system"].format(**values)}]},
            {"role": "user", "content": user},
        ]

    # ----------------------------------------------------------------- parsing
    def parse(self, text: str) -> ParsedResponse:
        """Structure any string (never raises): stage texts, region boxes, answer letter, validity.

        Boxes come only from the schema's region stage and are in the frame they were written in
        (the model's); map them with `ParsedResponse.with_boxes(frame.to_original(...))` to score.
        """
        if not isinstance(text, str):
            text = str(text)
        tags, contents = stage_texts(text)
        region = contents.get(self.region_tag) if self.region_tag is not None else None
        boxes = parse_boxes(region) if region is not None else ()
        answer_text = contents.get("answer")
        exact_answer = answer_text is not None and answer_text.strip().lower() in ("a", "b")
        follows = exact_answer and follows_layout(text, self.tags) and (bool(boxes) or not self.requires_box)
        return ParsedResponse(
            text=text,
            tags=tags,
            think=contents.get("think"),
            rethink=contents.get("rethink"),
            answer_text=answer_text,
            answer=answer_letter(answer_text),
            boxes=boxes,
            region_has_brackets=region is not None and has_brackets(region),
            follows_schema=follows,
        )

    # ----------------------------------------------------------------- rendering
    def target_boxes(
        self, sample: Sample, model_boxes: Sequence[Box], model_size: tuple[int, int], box_grid: int = 1
    ) -> tuple[IntBox, ...]:
        """The boxes an ideal response names: the true boxes, or the whole image when there are none.

        An anomalous image without annotated boxes is scored like a normal one by R_loc (0.5 for
        one box), so it gets the whole image too.
        """
        if len(model_boxes) != len(sample.boxes):
            raise ValueError(
                f"render got {len(model_boxes)} model-frame boxes for a sample with {len(sample.boxes)} "
                f"boxes ({sample.image_path}); convert all of sample.boxes with Frame.to_model"
            )
        if sample.is_anomalous and model_boxes:
            return tuple(snap_box(b, model_size, box_grid) for b in model_boxes)
        return (whole_image_box(model_size, box_grid),)

    def render(
        self,
        sample: Sample,
        model_boxes: tuple[Box, ...],
        rng: random.Random,
        box_grid: int = 1,
        *,
        model_size: tuple[int, int],
    ) -> str:
        """The ideal response for a ground-truth sample (an SFT target), wording drawn with `rng`.

        `model_boxes` are `sample.boxes` in the model frame (`Frame.to_model`), `model_size` that
        frame's (width, height): coordinates are written as integers rounded to a multiple of
        `box_grid` and clamped inside the image.
        """
        return self.render_variant(sample, model_boxes, model_size, box_grid, rng.choice)

    def render_variant(
        self,
        sample: Sample,
        model_boxes: Sequence[Box],
        model_size: tuple[int, int],
        box_grid: int,
        pick: Callable[[Sequence[str]], str],
    ) -> str:
        """`render` with the wording chosen by `pick` (from each stage's template list).

        The tokenizer corpus passes a deterministic pick to cover every template; training uses
        `render`, whose pick is `rng.choice`.
        """
        values = {
            "width": int(model_size[0]),
            "height": int(model_size[1]),
            "category": readable(sample.category),
            "defect": readable(sample.defect_type),
            "boxes": format_boxes(
                self.target_boxes(sample, model_boxes, model_size, box_grid), self.box_separator
            ),
        }
        parts = []
        for tag in self.tags:
            if tag == "answer":
                content = sample.answer_letter
            else:
                content = pick(self.render_templates[tag][sample.label]).format(**values)
            parts.append(open_tag(tag) + content + close_tag(tag))
        return "".join(parts)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(style={getattr(self, 'style', None)!r})"
