"""`python -m models.summary`: parameters and GMACs of B0-B7 in the paper's variants.

Examples:
  python -m models.summary
  python -m models.summary --models efficientnet-b0 --variants g16-lnpn --resolutions native,160 --format csv
"""

from __future__ import annotations

import csv
import io
import sys
from dataclasses import dataclass

import simple_parsing
import torch

from . import FAMILY, VARIANTS, count_parameters, create_model
from .flops import count_macs


@dataclass
class SummaryArgs:
    """What to list."""

    models: str = "all"  # comma-separated model names, or "all"
    variants: str = "g1-bn,g16-gn,g16-lnpn"  # comma-separated, from: g1-bn, g1-gn, g16-gn, g16-lnpn
    resolutions: str = "native,half"  # comma-separated: native, half, or pixel sizes
    format: str = "markdown"  # markdown | csv


def _split(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def summary_rows(models: list[str], variants: list[str], resolutions: list[str]) -> list[dict[str, object]]:
    rows = []
    for name in models:
        member = FAMILY[name]
        for variant in variants:
            with torch.device("meta"):
                model = create_model(name, **VARIANTS[variant])
            params = count_parameters(model)
            for res_key in resolutions:
                res = {"native": member.resolution, "half": member.half_resolution}.get(res_key)
                res = res if res is not None else int(res_key)
                rows.append(
                    dict(model=name, variant=variant, resolution=res, params=params, gmacs=count_macs(model, res) / 1e9)
                )
    return rows


def format_rows(rows: list[dict[str, object]], fmt: str) -> str:
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=["model", "variant", "resolution", "params", "gmacs"])
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "gmacs": f"{row['gmacs']:.4f}"})
        return buffer.getvalue()
    lines = ["| model | variant | resolution | params | GMACs |", "|---|---|---:|---:|---:|"]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['variant']} | {row['resolution']} | {row['params']:,} | {row['gmacs']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = simple_parsing.parse(SummaryArgs, args=argv, description=__doc__)
    models = list(FAMILY) if args.models == "all" else _split(args.models)
    variants = _split(args.variants)
    resolutions = _split(args.resolutions)
    problems = [f"unknown model {m!r} (known: {', '.join(FAMILY)})" for m in models if m not in FAMILY]
    problems += [f"unknown variant {v!r} (known: {', '.join(VARIANTS)})" for v in variants if v not in VARIANTS]
    problems += [
        f"bad resolution {r!r} (use native, half or a positive integer)"
        for r in resolutions
        if r not in ("native", "half") and not (r.isdigit() and int(r) >= 32)
    ]
    if args.format not in ("markdown", "csv"):
        problems.append(f"--format must be markdown or csv, got {args.format!r}")
    if not (models and variants and resolutions):
        problems.append("--models, --variants and --resolutions must each name at least one item")
    if problems:
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    sys.stdout.write(format_rows(summary_rows(models, variants, resolutions), args.format))
    return 0


if __name__ == "__main__":
    sys.exit(main())
