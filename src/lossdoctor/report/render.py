"""Render a report (or a comparison) on the terminal with rich, in the terminal's width (or
``COLUMNS``, piped output too; 120 when neither says).

Numbers have 3 significant digits and are never cut: a table wider than the console is split
into tables of whole column groups (a profile's columns stay together), each repeating the key
columns. Colour follows rich's rules: none when the output is not a terminal or NO_COLOR is set.
No line ends in spaces.
"""

from __future__ import annotations

import io
import math
import os
import sys
from dataclasses import dataclass

from rich import box
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from ..diagnose.groups import FindingGroup, span
from ..replay.precision import scale_text
from ..vocab import BOX_TERMS, DENSE_TERMS, TERMS, Head, PrecisionSource, ProfileSource, Severity
from .build import ALL_LEVELS
from .compare import SAME, Change, Comparison
from .meta import PrecisionMeta
from .model import Report
from .rows import LevelRow

WIDTH = 120
# a console narrower than this is taken as this wide (nothing useful fits in less)
MIN_WIDTH = 40
# below this width findings are stacked (code and place, then the message) instead of a table
STACKED_FINDINGS_BELOW = 100
WHERE_WIDTH = 28
RUN_SOURCE = {ProfileSource.DUMP: "recorded in the dump", ProfileSource.GIVEN: "--old",
              ProfileSource.CONFIG: "from its config"}  # fmt: skip
SEVERITY_STYLE = {Severity.ERROR: "bold red", Severity.WARNING: "yellow", Severity.INFO: "cyan"}
UNITS = {Head.RPN: "anchors", Head.ROI: "RoIs", Head.MASK: "RoIs", Head.DENSE: "anchors"}
LEVEL_METRICS = (
    ("avg_factor", "avg_f"),
    ("sample_weight", "w/smp"),
    ("loss_cls", "cls"),
    ("loss_bbox", "bbox"),
    ("grad_feature", "|dL/dF|"),
)
# the mask head has one term
MASK_METRICS = (
    ("avg_factor", "avg_f"),
    ("sample_weight", "w/smp"),
    ("loss_mask", "loss"),
    ("grad_feature", "|dL/dF|"),
)
# a dense head with centerness (FCOS, ATSS) has a third term
CTR_METRICS = (*LEVEL_METRICS[:4], ("loss_ctr", "ctr"), LEVEL_METRICS[4])


class _StripTrailing(io.TextIOBase):
    """A text stream that drops the spaces rich pads each line with."""

    def __init__(self, stream):
        self.stream, self.pending = stream, ""

    def write(self, text: str) -> int:
        lines = (self.pending + text).split("\n")
        self.pending = lines.pop()
        if lines:
            self.stream.write("".join(line.rstrip(" ") + "\n" for line in lines))
        return len(text)

    def flush(self) -> None:
        if self.pending:
            self.stream.write(self.pending.rstrip(" "))
            self.pending = ""
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()


def _columns() -> int | None:
    try:
        return max(MIN_WIDTH, int(os.environ.get("COLUMNS", "")))
    except ValueError:
        return None


def console(file=None, stderr: bool = False) -> Console:
    """A console as wide as ``COLUMNS`` says, else the terminal (at most 120 columns), else 120;
    plain text off a terminal or under NO_COLOR."""
    stream = file if file is not None else (sys.stderr if stderr else sys.stdout)
    probe = Console(file=stream)
    width = _columns() or (min(probe.size.width, WIDTH) if probe.is_terminal else WIDTH)
    # a terminal keeps its padding: live progress lines overwrite with it
    out = stream if probe.is_terminal else _StripTrailing(stream)
    return Console(file=out, width=max(MIN_WIDTH, width), highlight=False,
                   force_terminal=probe.is_terminal, no_color=probe.no_color)  # fmt: skip


def num(v) -> Text:
    """3 significant digits; NaN/Inf in bold red."""
    if v is None or v == "":
        return Text("")
    if isinstance(v, bool):
        return Text(str(v))
    if isinstance(v, int):
        return Text(str(v))
    if isinstance(v, float):
        if math.isnan(v):
            return Text("NaN", style="bold red")
        if math.isinf(v):
            return Text("Inf" if v > 0 else "-Inf", style="bold red")
        if v == int(v) and abs(v) < 1e6:
            return Text(str(int(v)))
        # 3 significant digits in at most 7 characters: 0.00195 -> 1.95e-3
        s = f"{v:.2e}" if abs(v) < 1e-2 or abs(v) >= 1e6 else f"{v:.3g}"
        if "e" in s:
            mant, exp = s.split("e")
            s = f"{mant}e{int(exp)}"
        return Text(s)
    return Text(str(v))


def _table(title: str, **kw) -> Table:
    """A borderless table with a bold title, left-aligned, as every table of the report."""
    return Table(
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        title_justify="left",
        title=Text(title, style="bold"),
        **kw,
    )


@dataclass
class Column:
    """One column of a table that is split to fit: its header and cells."""

    header: str
    cells: list[Text]
    justify: str = "right"

    def width(self) -> int:
        texts = self.header.split("\n") + [c.plain for c in self.cells]
        return max(len(t) for t in texts)


# what a column takes beyond its text: its right padding and the space between columns
COLUMN_GAP = 2


def _span(columns: list[Column]) -> int:
    return sum(c.width() + COLUMN_GAP for c in columns)


def _chunks(keys: list[Column], groups: list[list[Column]], width: int) -> list[list[Column]]:
    """The value columns in runs that fit ``width`` beside the key columns: whole groups where
    they fit, a group's columns one by one where it alone does not."""
    room = width - _span(keys)
    pieces = []
    for group in groups:
        pieces += [group] if _span(group) <= room else [[c] for c in group]
    chunks: list[list[Column]] = [[]]
    for piece in pieces:
        if chunks[-1] and _span(chunks[-1]) + _span(piece) > room:
            chunks.append([])
        chunks[-1] += piece
    return chunks


def fitted(title: str, keys: list[Column], groups: list[list[Column]], width: int,
           section_after: int | None = None) -> list[Table]:  # fmt: skip
    """Tables of ``keys`` and the ``groups`` of value columns, split so each fits ``width``;
    every column as wide as its widest cell (nothing is cut)."""
    tables = []
    for k, chunk in enumerate(_chunks(keys, groups, width)):
        t = _table(title if k == 0 else f"{title.split(' (')[0]} (continued)", padding=(0, 1, 0, 0))
        for c in keys + chunk:
            t.add_column(c.header, justify=c.justify, no_wrap=True, min_width=c.width())
        for i in range(len(keys[0].cells)):
            t.add_row(*[c.cells[i] for c in keys + chunk], end_section=i == section_after)
        tables.append(t)
    return tables


def header(report: Report) -> Text:
    m = report.meta
    ck, bt, _h = m.checkpoint, m.batch, m.heads
    t = Text()
    t.append("lossdoctor ", style="bold")
    t.append(f"{m.lossdoctor} (torch {m.torch})\n")
    t.append(f"checkpoint  {ck.path or '<object>'}  [{ck.layout} layout")
    t.append(f", sha256 {ck.sha256[:12]}]\n" if ck.sha256 else "]\n")
    strides = "/".join(str(x) for x in bt.strides)
    pad = f"{bt.pad_size[0]}x{bt.pad_size[1]}"
    levels = f"{bt.levels[0]}-{bt.levels[-1]}"
    t.append(
        f"batch       {bt.path or '<object>'}  [{bt.images} images, levels {levels} "
        f"(strides {strides}), padded {pad}]\n"
    )
    dump = bt.dump
    it = (
        f"; step {dump.step}" if dump.step is not None
        else f"; iteration {dump.iteration}" if dump.iteration is not None else ""
    )  # fmt: skip
    t.append(_detector_line(m) + it + "\n")
    why = captured_because(report)
    if why:
        t.append(f"captured    because {why}\n", style="bold")
    sampling = "every candidate (--sample-all)" if m.sample_all else f"seed {m.seed}"
    if m.dense is not None:
        sampling = "none (every anchor not ignored)"
    t.append(f"profiles    {_profiles(report)}; sampling {sampling}")
    if m.precision is not None:
        t.append(f"\nprecision   {precision_line(m.precision)}")
    for note in _checkpoint_notes(ck):
        t.append(f"\nnote        {note}", style="dim")
    return t


def _detector_line(m) -> str:
    h, dn = m.heads, m.dense
    if dn is not None:
        ema = "" if dn.ema is None else f"; EMA normalizer {dn.ema:.4g} (before {_ema(dn)})"
        return (
            f"detector    one-stage {dn.kind}, {dn.preset} config; {dn.classes} classes, "
            f"{dn.anchors} anchors/location, {dn.convs} convs per tower"
            f"{' with GroupNorm' if dn.norm else ''}; {dn.positives} positives{ema}"
        )
    return (
        f"detector    {m.config.name} config; {h.classes} classes (background "
        f"{h.background}), {h.anchors} anchors/location, {h.channels} channels"
    )


def _ema(dn) -> str:
    return "100, assumed: not recorded" if dn.ema_before is None else f"{dn.ema_before:.4g}"


def _checkpoint_notes(ck) -> list[str]:
    out = []
    if ck.replaced:
        shown = ", ".join(ck.replaced[:3])
        out.append(f"replaced {len(ck.replaced)} non-tensor checkpoint objects: {shown}")
    if ck.unreplayed:
        out.append(f"not replayed: {', '.join(ck.unreplayed)}; their losses are not in the tables")
    return out


PRECISION_FROM = {
    PrecisionSource.GIVEN: "--precision",
    PrecisionSource.DUMP: "the dump's autocast dtype",
    PrecisionSource.FEATURES: "the dtype of the dumped features",
    PrecisionSource.DEFAULT: "the default",
}


def precision_line(p: PrecisionMeta) -> str:
    """The replay's precision, where it came from, and the loss scaler's decision."""
    run = "" if p.precision is p.run else f"; a what-if: the run trained in {p.run}"
    out = f"{p.precision} (from {PRECISION_FROM[p.source]}){run}"
    if p.grad_max is not None and not math.isfinite(p.grad_max):
        out += f"; the gradient is non-finite at scale 1 (in {p.grad_max_in}): no scale is safe"
    elif p.grad_max is not None:
        out += (f"; largest |gradient| at scale 1 {num(p.grad_max).plain} in {p.grad_max_in}, "
                f"safe loss scale up to {scale_text(p.safe_scale)}")  # fmt: skip
    if p.loss_scale is not None:
        said = {True: "overflows: GradScaler skips this step", False: "does not overflow",
                None: "was not replayed in a low precision"}[p.overflows]  # fmt: skip
        out += f"; the dump's loss scale {p.loss_scale:g} {said}"
    if p.skipped:
        out += f" ({p.skipped} steps skipped before it)"
    return out


def precision_table(report: Report) -> list[Table]:
    """The low-precision replay per layer (range, overflow, underflow, gradient) and per term
    (its loss next to fp32's), for the first two profiles."""
    rows = report.tables.precision
    if not rows:
        return []
    p = rows[0].precision
    t = _table(f"{p} against fp32, per layer (the run's profile's gradient at scale 1)")
    for h in ("head", "level", "layer", "max |x|", "of limit", "overflow", "underflow",
              "max |grad|"):  # fmt: skip
        t.add_column(h, justify="left" if h in ("head", "level", "layer") else "right")
    for r in rows:
        level = r.level if not r.stage else f"{r.level} s{r.stage}"
        over = Text(str(r.overflow), style="bold red" if r.overflow else "")
        t.add_row(r.head, level, r.layer, num(r.max_abs), f"{r.max_abs / r.limit:.1%}", over,
                  str(r.underflow), num(r.grad_max))  # fmt: skip
    d = _table(f"loss terms, {p} vs fp32 (same samples)")
    for h in ("profile", "term", p.value, "fp32", "apart"):
        d.add_column(h, justify="left" if h in ("profile", "term") else "right")
    for r in (x for x in report.tables.drift if x.profile in report.profiles[:2]):
        d.add_row(r.profile, r.term, num(r.loss), num(r.loss_fp32), f"{r.relative:.2e}")
    return [t, d]


def captured_because(report: Report) -> str:
    """Why the dump exists, as its capture recorded it, with the gradient norm it saw (the whole
    model's and the heads', unscaled) beside the heads' norm the replay computes under the run's
    own profile."""
    dump = report.meta.batch.dump
    if not dump.reason:
        return ""
    out, seen = dump.reason, dump.grad_norm
    if seen is not None:
        heads = f", heads {num(seen.heads).plain}" if seen.heads is not None else ""
        scale = (
            f" (unscaled: loss scale {num(seen.loss_scale).plain})"
            if seen.loss_scale is not None
            else ""
        )
        out += f"; norms at capture: whole model {num(seen.model).plain}{heads}{scale}"
    own = report.meta.own
    row = next((r for r in report.tables.profiles if r.profile == own), None)
    if row is not None and seen is not None:
        out += f"; replayed heads ({own}) {num(row.grad_total_norm).plain}"
    return out


def _profiles(report: Report) -> str:
    """The run's own profile and the what-ifs, where the report knows which is which."""
    run = report.meta.run
    if run is None or run.own is None:
        return " vs ".join(report.profiles)
    source = RUN_SOURCE.get(run.source, "--old")
    others = [p for p in report.profiles if p != run.own]
    return f"{run.own} (the run's, {source}) vs {', '.join(others)} (what-if)"


def symptom(report: Report) -> Text:
    s = report.meta.symptom
    t = Text()
    t.append("Symptom  ", style="bold")
    dets = s.detections
    style = "bold red" if dets and sum(dets) == 0 else ""
    t.append(f"detections per image at score > {s.score_thr}: {dets}", style=style)
    t.append(
        "\n         max foreground score per image: ["
        + ", ".join(num(v).plain for v in s.max_fg_score)
        + "]"
    )
    if s.chance is not None:
        t.append(f"; chance {num(s.chance).plain}")
    if s.objectness_above_half == s.objectness_above_half:  # NaN: a one-stage detector
        t.append(f"\n         anchors with objectness > 0.5: {s.objectness_above_half:.1%}")
    return t


def _where(g: FindingGroup, levels: list[str]) -> str:
    """What a group covers, short: profiles, heads, levels (a range where they run), images."""
    w = g.where
    parts = [
        ("rank " + ",".join(map(str, w.ranks))) if w.ranks else "",
        ",".join(w.profiles),
        ",".join(w.heads),
        span(w.levels, levels),
        ("img " + ",".join(map(str, w.images))) if w.images else "",
    ]
    return " ".join(p for p in parts if p)


def _finding_body(g: FindingGroup, groups: list[FindingGroup], k: int) -> Text:
    """A group's message, and its fix after the last of a run with the same code and fix."""
    body = Text(g.message)
    nxt = groups[k + 1] if k + 1 < len(groups) else None
    if nxt is None or (nxt.code, nxt.fix) != (g.code, g.fix):
        body.append("\nfix: ", style="bold")
        body.append(g.fix, style="dim")
    return body


def findings(report: Report, width: int = WIDTH):
    """The findings, most severe first: a table, or (below STACKED_FINDINGS_BELOW columns) one
    block each, its message indented under its code and place."""
    groups, rows = report.groups, len(report.findings)
    repeats = f"; {rows} rows in the JSON" if rows != len(groups) else ""
    title = f"Findings ({len(groups)}, most severe first{repeats})"
    levels = report.meta.batch.levels
    if width < STACKED_FINDINGS_BELOW:
        return _stacked_findings(title, groups, levels)
    t = _table(title, expand=False)
    t.add_column("severity", no_wrap=True)
    t.add_column("code", no_wrap=True)
    t.add_column("where", no_wrap=True, max_width=WHERE_WIDTH, overflow="ellipsis")
    t.add_column("finding and fix", ratio=1)
    for k, g in enumerate(groups):
        severity = Text(g.severity, style=SEVERITY_STYLE[g.severity])
        t.add_row(severity, g.code, _where(g, levels), _finding_body(g, groups, k))
    if not groups:
        t.add_row("", "", "", "no finding")
    return t


def indented(body) -> Table:
    """``body`` two columns in, its wrapped lines too."""
    grid = Table.grid(padding=(0, 0))
    grid.add_column(width=2, no_wrap=True)
    grid.add_column(ratio=1)
    grid.add_row("", body)
    return grid


def _stacked_findings(title: str, groups: list[FindingGroup], levels: list[str]) -> Group:
    parts = [Text(title, style="bold")]
    for k, g in enumerate(groups):
        line = Text(g.severity, style=SEVERITY_STYLE[g.severity])
        line.append(f"  {g.code}", style="bold")
        line.append(f"  {_where(g, levels)}")
        parts += [line, indented(_finding_body(g, groups, k))]
    if not groups:
        parts.append(Text("  no finding"))
    return Group(*parts)


def _level_cells(r: LevelRow, metrics) -> list[Text]:
    """The metrics of one profile at one level (a head-wide normalizer only where levels share
    one)."""
    cells = []
    for key, _ in metrics:
        v = getattr(r, key)
        per_level = r.level == ALL_LEVELS and key in ("avg_factor", "sample_weight") and v != v
        cell = Text("-", style="dim") if per_level else num(v)
        if key in ("loss_bbox", "loss_mask") and r.nan_origin and not cell.style:
            cell.stylize("bold red")
        cells.append(cell)
    return cells


def level_table(
    report: Report, head: Head, profiles: list[str], stage: int = 0, width: int = WIDTH
) -> list[Table]:
    """The per-level table of one head (and cascade stage): counts, then each profile's
    metrics; split by profile where it is wider than ``width``."""
    rows = [r for r in report.tables.levels if r.head == head and r.stage == stage]
    unit = UNITS[head]
    metrics = MASK_METRICS if head == Head.MASK else LEVEL_METRICS
    if any(r.loss_ctr is not None for r in rows):
        metrics = CTR_METRICS
    name = f"{head.upper()} head" + (f", cascade stage {stage}" if stage else "")
    levels = list(dict.fromkeys(r.level for r in rows))
    by_level = [{r.profile: r for r in rows if r.level == lvl} for lvl in levels]
    firsts = [b[profiles[0]] for b in by_level]
    keys = [Column("level", [Text(lvl, style="bold" if lvl == ALL_LEVELS else "")
                             for lvl in levels], "left")]  # fmt: skip
    keys += [Column(col, [num(getattr(r, attr)) for r in firsts])
             for col, attr in ((unit, "anchors"), ("pos", "pos"), ("neg", "neg"))]  # fmt: skip
    groups = []
    for p in profiles:
        cells = [_level_cells(b[p], metrics) for b in by_level]
        groups.append([Column(f"{p[:7]}\n{short}", [c[j] for c in cells])
                       for j, (_, short) in enumerate(metrics)])  # fmt: skip
    title = (
        f"{name}, per level ({unit}; counts are shared by all profiles; avg_f: normalizer, "
        "w/smp: per-sample weight, |dL/dF|: feature gradient)"
    )
    return fitted(title, keys, groups, width, len(levels) - 2 if len(levels) > 1 else None)


def _given(v) -> bool:
    return v is not None and v == v  # a dense report's two-stage terms are NaN


def totals(report: Report, width: int = WIDTH) -> list[Table]:
    """Totals per profile, split where wider than ``width``."""
    rows = report.tables.profiles
    terms = [
        x.value for x in (*TERMS, *DENSE_TERMS) if any(_given(getattr(r, x.value)) for r in rows)
    ]
    cols = ("loss_total", *terms, "grad_total_norm", "grad_clipped_norm", "rpn_neg_share")
    names = ("loss", *terms, "|grad| pre-clip", "post-clip", "rpn neg share")
    if report.meta.dense is not None:  # no RPN
        cols, names = cols[:-1], names[:-1]
    keys = [Column("profile", [Text(r.profile) for r in rows], "left")]
    groups = [[Column(n, [num(getattr(r, c)) for r in rows])] for c, n in zip(cols, names)]
    return fitted(
        "Totals per profile (gradient norms over all head parameters)", keys, groups, width
    )


def _ranks_line(report: Report) -> Text:
    ranks = [r.rank for r in report.meta.ranks]
    return Text(f"ranks       {', '.join(map(str, ranks))} of world size {report.meta.world_size}")


def _rank_symptoms(report: Report) -> Text:
    t = Text()
    t.append("Symptom  ", style="bold")
    for k, r in enumerate(report.meta.ranks):
        s = r.symptom
        best = ", ".join(num(v).plain for v in s.max_fg_score)
        t.append(("" if k == 0 else "\n         ") + f"rank {r.rank}: detections {s.detections}")
        t.append(f"; max foreground score [{best}]")
    return t


def rank_table(report: Report, profile: str, width: int = WIDTH) -> list[Table]:
    """Per rank and level under one profile: the rank's normalizer next to the all-reduced one,
    and what a sample weighs in the step's averaged gradient under each."""
    rows = [r for r in report.tables.ranks or [] if r.profile == profile]
    keys = [Column(name, [cell(r) for r in rows], justify) for name, cell, justify in (
        ("rank", lambda r: num(r.rank), "right"), ("head", lambda r: Text(str(r.head)), "left"),
        ("level", lambda r: Text(r.level), "left"), ("pos", lambda r: num(r.pos), "right"),
        ("neg", lambda r: num(r.neg), "right"))]  # fmt: skip
    pairs = (("avg_f", "avg_factor"), ("w/smp", "sample_weight"),
             ("box avg_f", "avg_factor_bbox"), ("box w/smp", "sample_weight_bbox"))  # fmt: skip
    groups = [[Column(name, [num(getattr(r, attr)) for r in rows]),
               Column("mean", [num(getattr(r, f"global_{attr}")) for r in rows])]
              for name, attr in pairs]  # fmt: skip
    title = (
        f"Ranks under {profile}, per level (avg_f: the rank's normalizer, mean: all-reduced "
        "across ranks; w/smp: a sample's weight in the step's gradient)"
    )
    return fitted(title, keys, groups, width)


def _rank_totals(report: Report) -> Table:
    t = _table("Totals per rank and profile")
    names = ("rank", "profile", "loss", *(x.value for x in BOX_TERMS), "|grad| pre-clip")
    for n in names:
        t.add_column(n, justify="left" if n == "profile" else "right")
    for row in report.tables.profiles:
        cells = [getattr(row, x.value) for x in BOX_TERMS]
        t.add_row(num(row.rank), row.profile, num(row.loss_total), *map(num, cells),
                  num(row.grad_total_norm))  # fmt: skip
    return t


def render_step(report: Report, out: Console, quiet: bool = False) -> None:
    """The view of one step across ranks: header, each rank's symptom, the findings, then
    (unless quiet) the ranks table under the run's profile and the totals per rank."""
    if not quiet:
        out.print(header(report))
        out.print(_ranks_line(report))
        out.print()
    out.print(_rank_symptoms(report))
    out.print()
    out.print(findings(report, out.width))
    if quiet:
        return
    for t in rank_table(report, report.profiles[0], out.width):
        out.print()
        out.print(t)
    out.print()
    out.print(_rank_totals(report))


def render(report: Report, out: Console, quiet: bool = False) -> None:
    """The inspect view: header, symptom, findings, then (unless quiet) the per-level evidence."""
    if report.is_step:
        return render_step(report, out, quiet)
    if not quiet:
        out.print(header(report))
        out.print()
    out.print(symptom(report))
    out.print()
    out.print(findings(report, out.width))
    if quiet:
        return
    for head, stage in dict.fromkeys((r.head, r.stage) for r in report.tables.levels):
        for t in level_table(report, head, report.profiles[:2], stage, out.width):
            out.print()
            out.print(t)
    for t in [*totals(report, out.width), *precision_table(report)]:
        out.print()
        out.print(t)
    if len(report.profiles) > 2:
        note = (
            f"(tables show the first two profiles; all {len(report.profiles)} are in --json/--csv)"
        )
        out.print(Text(note, style="dim"))


def _comparison_rows(c: Comparison, changed_only: bool) -> list[tuple[str, str, Change]]:
    rows = [("total", "", r) for r in c.totals] + [(r.head, r.level, r) for r in c.rows]
    return [x for x in rows if x[2].change != SAME or not changed_only]


def _comparison_table(c: Comparison, changed_only: bool, width: int = WIDTH):
    """The changes side by side; where that is wider than ``width``, one line per change."""
    rows = _comparison_rows(c, changed_only)
    cells = [(Text(head), Text(level), Text(r.metric), num(r.old), num(r.new), _change(r.change))
             for head, level, r in rows]  # fmt: skip
    names = ("head", "level", "metric", "old", "new", "change")
    if _span([Column(n, [x[k] for x in cells]) for k, n in enumerate(names)]) > width:
        return _comparison_lines(c, cells)
    t = _table(f"{c.old}  →  {c.new}")
    for name in names:
        t.add_column(name, justify="right" if name in ("old", "new") else "left", no_wrap=True)
    for row in cells:
        t.add_row(*row)
    if not cells:
        t.add_row("", "", "no change", "", "", "")
    return t


def _comparison_lines(c: Comparison, cells: list) -> Group:
    lines = [Text(f"{c.old}  →  {c.new}", style="bold")]
    for head, level, metric, old, new, change in cells:
        line = Text(f"{head.plain} {level.plain} {metric.plain}: ".replace("  ", " "))
        line.append_text(old).append(" → ").append_text(new).append("  ").append_text(change)
        lines.append(line)
    if not cells:
        lines.append(Text("no change"))
    return Group(*lines)


def render_comparison(comps: list[Comparison], out: Console, changed_only: bool = True) -> None:
    for c in comps:
        out.print(_comparison_table(c, changed_only, out.width))
        for title, items, style in (
            ("Findings that appear", c.appeared, "red"),
            ("Findings that disappear", c.disappeared, "green"),
        ):
            out.print(Text(f"{title}: {len(items)}", style="bold"))
            for f in items:
                out.print(Text(f"  {f.severity:<8} {f.code:<24} {f.message}", style=style))
        out.print()


def _change(s: str) -> Text:
    if "→" in s:
        return Text(s, style="bold red" if s.endswith(("NaN", "Inf")) else "bold green")
    return Text(s)
