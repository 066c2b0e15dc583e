"""``roma-train bench``: quality benchmarks (their commands live in this subpackage)."""

import typer

bench_app = typer.Typer(
    help="Benchmarks that train and evaluate router patches and print a table.",
    no_args_is_help=True,
)

# The commands import their heavy dependencies lazily, so ``roma-train --help`` stays fast.
from roma_trainer.bench.cli import pretrain_cmd, quality_cmd, screen_cmd  # noqa: E402

bench_app.command("pretrain")(pretrain_cmd)
bench_app.command("quality")(quality_cmd)
bench_app.command("screen")(screen_cmd)
