"""Generated document pages (text, tables, bar charts, forms) with questions whose evidence is known.

Every page is drawn with Pillow, so the box of every glyph run is known exactly. A question's
evidence is the box of the text that holds its answer (a word of a paragraph, a table cell, the
value printed on a bar, a form field, the title), so an answer can only be read from inside it.

Page shapes cycle through aspect ratios chosen so that every LLaVA-NeXT grid occurs (2x2, 1x2, 2x1,
1x3, 3x1) as well as ratios that leave padding on the canvas (3:4, 4:3, 2:3, 3:2, 5:2). Each page
is drawn from its own generator seeded by ``(seed, index)``: page ``i`` is the same whatever ``n``,
and another ``seed`` gives a fresh split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .sample import Box, Sample

# (height, width) ratios, in the order pages cycle through them.
PAGE_SHAPES: tuple[tuple[int, int], ...] = (
    (1, 1), (1, 2), (2, 1), (1, 3), (3, 1), (3, 4), (4, 3), (2, 3), (3, 2), (2, 5),
)

WORDS = (
    "river stone paper garden window market silver orange planet forest winter harbor rocket "
    "candle mirror bridge castle desert engine falcon glacier hammer island jungle kettle ladder "
    "meadow needle oyster pepper quartz saddle timber violet walnut yellow zipper anchor basket "
    "cotton dragon feather ginger helmet insect jacket lemon marble nickel olive pillow rabbit "
    "salmon tunnel velvet wagon barrel cactus dolphin"
).split()
CATEGORIES = "Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split()
FORM_FIELDS = (
    "Invoice no", "Account", "Order ref", "Customer id", "Due date", "Total", "Tax", "Phone", "Room", "Batch",
)
TITLES = ("annual report", "field notes", "inventory sheet", "quarterly summary", "lab record", "trip log")
INK = ((20, 20, 20), (30, 30, 80), (60, 20, 20), (10, 50, 30))
PAPER = ((255, 255, 255), (250, 247, 238), (244, 246, 250), (252, 250, 244))
BAR_COLOURS = ((70, 110, 180), (200, 90, 60), (90, 160, 90), (150, 100, 170), (210, 160, 50))


@dataclass
class _Question:
    question: str
    answer: str
    box: Box
    question_type: str
    font_size: int


@dataclass
class _Page:
    draw: ImageDraw.ImageDraw
    rng: np.random.Generator
    font_size: int
    ink: tuple[int, int, int]
    questions: list[list[_Question]]  # one list per block

    def font(self, scale: float = 1.0) -> ImageFont.FreeTypeFont:
        return ImageFont.load_default(size=max(8, round(self.font_size * scale)))

    def text(self, xy: tuple[float, float], text: str, scale: float = 1.0, fill=None) -> Box:
        """Draw ``text`` with its top-left at ``xy`` and return the box of what was drawn."""
        font = self.font(scale)
        self.draw.text(xy, text, font=font, fill=fill or self.ink)
        return tuple(float(v) for v in self.draw.textbbox(xy, text, font=font))

    def width(self, text: str, scale: float = 1.0) -> float:
        return self.draw.textlength(text, font=self.font(scale))

    def fitting_scale(self, text: str, scale: float, width: float) -> float:
        """``scale``, shrunk until ``text`` fits in ``width`` (headings of narrow blocks)."""
        while self.width(text, scale) > width and self.font_size * scale > 8:
            scale *= 0.9
        return scale


def generate_documents(seed: int, n: int, questions_per_image: int = 3) -> list[Sample]:
    """``n`` document pages, each with up to ``questions_per_image`` questions (one Sample each).

    Samples of the same page share one ``image`` object; ``meta`` holds ``seed``, ``index`` (the
    page), ``page_shape`` (height:width ratio), ``font_size`` (of the answer text) and ``block``.
    """
    if n < 1:
        raise ValueError(f"n (pages to generate) must be at least 1, got {n}")
    if questions_per_image < 1:
        raise ValueError(f"questions_per_image must be at least 1, got {questions_per_image}")
    samples = []
    for index in range(n):
        rng = np.random.default_rng([seed, index])
        shape = PAGE_SHAPES[index % len(PAGE_SHAPES)]
        image, blocks = _render_page(rng, shape)
        for block, question in _pick_questions(rng, blocks, questions_per_image):
            samples.append(
                Sample(
                    image=image,
                    question=question.question,
                    answer=question.answer,
                    evidence=[question.box],
                    kind="document",
                    question_type=question.question_type,
                    meta={"seed": seed, "index": index, "page_shape": list(shape),
                          "font_size": question.font_size, "block": block},
                )
            )
    return samples


def _pick_questions(rng: np.random.Generator, blocks: list[list[_Question]], count: int):
    """Questions from distinct blocks first, then more from the same blocks."""
    order = [int(i) for i in rng.permutation(len(blocks))]
    pools = {b: [int(i) for i in rng.permutation(len(blocks[b]))] for b in order}
    picked = []
    while len(picked) < count and any(pools.values()):
        for block in order:
            if pools[block] and len(picked) < count:
                picked.append((block, blocks[block][pools[block].pop()]))
    return picked


def _render_page(rng: np.random.Generator, shape: tuple[int, int]) -> tuple[Image.Image, list[list[_Question]]]:
    long_side = int(rng.integers(700, 1301))
    ratio_h, ratio_w = shape
    # Exact ratios: LLaVA-NeXT picks the 1x2 grid for a large page only when it is exactly 1:2
    # (any wider and 1x3 shows more pixels, any narrower and 2x2 does).
    unit = long_side // max(shape)
    width, height = unit * ratio_w, unit * ratio_h
    image = Image.new("RGB", (width, height), PAPER[int(rng.integers(len(PAPER)))])
    font_size = int(np.clip(round(long_side / 48) + int(rng.integers(-2, 3)), 14, 28))
    page = _Page(ImageDraw.Draw(image), rng, font_size, INK[int(rng.integers(len(INK)))], [])

    margin = round(0.04 * min(width, height)) + 4
    title = f"{_word(rng).capitalize()} {TITLES[int(rng.integers(len(TITLES)))]}"
    title_scale = page.fitting_scale(title, 1.5, width - 2 * margin)
    title_box = page.text((margin, margin), title, scale=title_scale)
    page.questions.append([_Question("What is the title of the document?", title, title_box, "title",
                                     max(8, round(font_size * title_scale)))])

    top = title_box[3] + font_size
    cols = max(1, round(2 * width / height))
    cols = min(cols, 4)
    rows = max(1, round((height - top) / (width / cols)))
    rows = min(rows, 4)
    gap = font_size
    cell_w = (width - 2 * margin - (cols - 1) * gap) / cols
    cell_h = (height - top - margin - (rows - 1) * gap) / rows
    kinds: list[Callable] = [_text_block, _table_block, _chart_block, _form_block]
    used_fields: set[str] = set()
    for r in range(rows):
        for c in range(cols):
            x0 = margin + c * (cell_w + gap)
            y0 = top + r * (cell_h + gap)
            block = kinds[int(rng.integers(len(kinds)))]
            questions = block(page, (x0, y0, x0 + cell_w, y0 + cell_h), used_fields)
            if questions:
                page.questions.append(questions)
    return image, page.questions


def _word(rng: np.random.Generator) -> str:
    return WORDS[int(rng.integers(len(WORDS)))]


def _text_block(page: _Page, cell: Box, used_fields: set[str]) -> list[_Question]:
    x0, y0, x1, y1 = cell
    rng, size = page.rng, page.font_size
    heading = f"On the {_word(rng)}"
    heading_box = page.text((x0, y0), heading, scale=page.fitting_scale(heading, 1.15, x1 - x0))
    line_height = round(size * 1.45)
    y = heading_box[3] + size * 0.6
    questions = []
    line = 0
    while y + line_height <= y1:
        x, words = x0, 0
        while True:
            word = _word(rng)
            if x + page.width(word) > x1:
                break
            box = page.text((x, y), word)
            words += 1
            questions.append(_Question(
                f"In the section headed '{heading}', what is word {words} of line {line + 1}?",
                word, box, "read", size,
            ))
            x += page.width(word + " ")
        if words == 0:
            break
        line += 1
        y += line_height
    return questions


def _table_block(page: _Page, cell: Box, used_fields: set[str]) -> list[_Question]:
    x0, y0, x1, y1 = cell
    rng, size = page.rng, page.font_size
    caption = f"Table of {_word(rng)} counts"
    caption_box = page.text((x0, y0), caption, scale=page.fitting_scale(caption, 1.1, x1 - x0))
    row_h = round(size * 1.7)
    col_w = page.width("00000") + size
    columns = int(min(6, (x1 - x0) // col_w - 1))
    rows = int(min(8, (y1 - caption_box[3] - size * 0.5) // row_h - 1))
    if columns < 1 or rows < 1:
        return []
    top = caption_box[3] + size * 0.5
    grid = (200, 200, 200)
    for i in range(rows + 2):
        page.draw.line([(x0, top + i * row_h), (x0 + (columns + 1) * col_w, top + i * row_h)], fill=grid)
    for j in range(columns + 2):
        page.draw.line([(x0 + j * col_w, top), (x0 + j * col_w, top + (rows + 1) * row_h)], fill=grid)
    pad = size * 0.3
    for j in range(columns):
        page.text((x0 + (j + 1) * col_w + pad, top + pad), "ABCDEF"[j])
    questions = []
    for i in range(rows):
        page.text((x0 + pad, top + (i + 1) * row_h + pad), str(i + 1))
        for j in range(columns):
            value = str(int(rng.integers(10, 10000)))
            box = page.text((x0 + (j + 1) * col_w + pad, top + (i + 1) * row_h + pad), value)
            questions.append(_Question(
                f"In the table '{caption}', what is the value in row {i + 1} of column {'ABCDEF'[j]}?",
                value, box, "table", size,
            ))
    return questions


def _chart_block(page: _Page, cell: Box, used_fields: set[str]) -> list[_Question]:
    x0, y0, x1, y1 = cell
    rng, size = page.rng, page.font_size
    caption = f"{_word(rng).capitalize()} per month"
    caption_box = page.text((x0, y0), caption, scale=page.fitting_scale(caption, 1.1, x1 - x0))
    slot = page.width("Mar") + size * 0.8
    bars = int(min(8, (x1 - x0 - size) // slot))
    plot_top = caption_box[3] + size * 1.8
    plot_bottom = y1 - size * 1.6
    if bars < 2 or plot_bottom - plot_top < 3 * size:
        return []
    axis = (90, 90, 90)
    page.draw.line([(x0, plot_bottom), (x0 + bars * slot + size * 0.5, plot_bottom)], fill=axis, width=2)
    start = int(rng.integers(0, 12 - bars + 1))
    values = rng.integers(5, 100, size=bars)
    colour = BAR_COLOURS[int(rng.integers(len(BAR_COLOURS)))]
    questions = []
    for k in range(bars):
        left = x0 + size * 0.5 + k * slot
        height = (plot_bottom - plot_top) * values[k] / 100
        page.draw.rectangle([left, plot_bottom - height, left + slot - size * 0.6, plot_bottom], fill=colour)
        label = CATEGORIES[start + k]
        page.text((left, plot_bottom + size * 0.2), label, scale=0.9)
        value = str(int(values[k]))
        box = page.text((left, plot_bottom - height - size * 1.3), value, scale=0.9)
        questions.append(_Question(
            f"In the chart '{caption}', what is the value for {label}?", value, box, "chart", round(size * 0.9),
        ))
    return questions


def _form_block(page: _Page, cell: Box, used_fields: set[str]) -> list[_Question]:
    x0, y0, x1, y1 = cell
    rng, size = page.rng, page.font_size
    line_height = round(size * 1.8)
    questions = []
    y = y0
    for field_name in [FORM_FIELDS[int(i)] for i in rng.permutation(len(FORM_FIELDS))]:
        if y + line_height > y1:
            break
        if field_name in used_fields:
            continue
        value = str(int(rng.integers(1000, 1000000)))
        label = f"{field_name}:"
        if page.width(f"{label} {value}") > x1 - x0:
            break
        used_fields.add(field_name)
        page.text((x0, y), label)
        box = page.text((x0 + page.width(label + " "), y), value)
        questions.append(_Question(f"What is the {field_name.lower()}?", value, box, "form", size))
        y += line_height
    return questions
