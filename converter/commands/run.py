"""``onnxship run RECIPE.toml [-o OUTDIR]``"""

from __future__ import annotations

import argparse

from converter.commands import add_command

HELP = "run a recipe: export → passes → validate → bench, with manifest and report"
EPILOG = """\
example:
  onnxship run models/digits_cnn/recipe.toml -o build/digits_cnn

OUTDIR (default build/<recipe name>) receives fp32.onnx, one .onnx per variant,
manifest.json (sha256 and size of every artifact, the resolved recipe, versions, machine,
every metric and timing), report.md and report.html (with plots). Model files are
deterministic: the same recipe and inputs give the same bytes. An earlier run's manifest and
reports are removed first and the manifest is written last: an interrupted run leaves none.
Exit 1 when a gate of the recipe fails (the report is still written), 2 on a bad recipe
(every key and value is checked before anything runs).

A top-level `executor = "ray"` in the recipe scores the validation data's shards as Ray tasks
(`ray_address = "ADDR"` for an existing cluster; default a local Ray); the numbers are the
same as in-process. The bench always runs on this machine.
"""


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = add_command(sub, common, "run", HELP, EPILOG, run)
    p.add_argument("recipe", metavar="RECIPE.toml")
    p.add_argument("-o", "--output", metavar="OUTDIR", help="folder for every artifact")


def run(args: argparse.Namespace) -> int:
    from converter.recipes.pipeline import check_gates, run_recipe

    result = run_recipe(args.recipe, args.output)
    if not args.quiet:
        print(result.report_md.read_text(encoding="utf-8"))
        print(f"report: {result.report_md} and {result.report_html}")
        print(f"manifest: {result.manifest}")
    check_gates(result)
    return 0
