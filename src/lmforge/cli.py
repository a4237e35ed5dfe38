"""The `lmforge` command line. The only module besides `pipeline/` that knows every stage."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lmforge.config import ConfigError, RunConfig, dump_config, iter_keys, load_config

app = typer.Typer(
    help="lmforge: fine-tune, align, merge, evaluate and serve language models from YAML configs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Inspect configs: resolved values and every key.", no_args_is_help=True)
app.add_typer(config_app, name="config")
console = Console(stderr=True)


@app.callback()
def _quiet_library_deprecations() -> None:
    """Renames inside transformers/peft (FutureWarning) are not the user's concern on the CLI."""
    warnings.filterwarnings("ignore", category=FutureWarning)


TRACEBACK = typer.Option("--traceback", help="Show the full traceback on errors.")


def _fail(exc: BaseException, traceback: bool) -> None:
    """One clear line for errors a user can cause; full traceback only when asked."""
    if traceback:
        raise exc
    console.print(f"[bold red]error[/]: {escape(str(exc))}")
    raise typer.Exit(code=1)


# OSError covers a model or file that cannot be found or read (hub id without a network, bad path).
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, ValueError, OSError, RuntimeError)


def run_stage(config: RunConfig):
    if config.method.name == "pretrain":
        from lmforge.methods import pretrain

        return pretrain.run(config)
    from lmforge.methods import sft

    return sft.run(config)


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="YAML config of the stage.")],
    overrides: Annotated[list[str] | None, typer.Argument(help="Overrides: section.key=value ...")] = None,
    traceback: Annotated[bool, TRACEBACK] = False,
) -> None:
    """Run one training stage (sft or pretrain) from a YAML config."""
    try:
        cfg = load_config(config, overrides or [])
        result = run_stage(cfg)
    except USER_ERRORS as exc:
        _fail(exc, traceback)
        return
    console.print(
        f"[bold green]done[/]: {result.steps} steps, train loss {result.train_loss:.4f}, "
        f"{result.artifact.name}/ in {result.output_dir}"
    )


@app.command()
def quickstart(
    output_dir: Annotated[Path, typer.Option(help="Where everything is written.")] = Path("runs/quickstart"),
    seed: Annotated[int, typer.Option(help="Seed for data, model and training.")] = 0,
    traceback: Annotated[bool, TRACEBACK] = False,
) -> None:
    """The whole pipeline offline on a tiny model: tokenizer, pre-train, LoRA SFT, evaluate, merge, chat."""
    from lmforge.pipeline.quickstart import run_quickstart

    try:
        run_quickstart(output_dir, seed=seed)
    except USER_ERRORS as exc:
        _fail(exc, traceback)


@app.command()
def merge(
    base: Annotated[str, typer.Option(help="Base model folder or hub id (16-bit).")],
    adapter: Annotated[Path, typer.Option(help="Adapter folder to merge.")],
    out: Annotated[Path, typer.Option(help="Output folder for the merged model.")],
    dtype: Annotated[
        str, typer.Option(help="auto (as the base was saved), float32, bfloat16, float16.")
    ] = "auto",
    trust_remote_code: Annotated[bool, typer.Option(help="Run code shipped with the model.")] = False,
    traceback: Annotated[bool, TRACEBACK] = False,
) -> None:
    """Merge a LoRA/QLoRA adapter into its unquantized base and save safetensors + tokenizer + template."""
    from lmforge.export.merge import merge_adapter

    try:
        path = merge_adapter(base, adapter, out, dtype=dtype, trust_remote_code=trust_remote_code)
    except USER_ERRORS as exc:
        _fail(exc, traceback)
        return
    console.print(f"[bold green]merged[/] model saved to {path}")


@app.command()
def chat(
    model: Annotated[str, typer.Option(help="Model folder or hub id (merged, or the base of --adapter).")],
    prompt: Annotated[str | None, typer.Argument(help="Answer this one prompt and exit.")] = None,
    adapter: Annotated[str | None, typer.Option(help="Adapter folder on top of --model.")] = None,
    template: Annotated[str | None, typer.Option(help="Chat template (default: the one saved).")] = None,
    system: Annotated[str | None, typer.Option(help="System prompt.")] = None,
    demo: Annotated[bool, typer.Option(help="Answer a few built-in prompts and exit.")] = False,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate at most.")] = 256,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.7,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 0.9,
    seed: Annotated[int | None, typer.Option(help="Sampling seed.")] = None,
    traceback: Annotated[bool, TRACEBACK] = False,
) -> None:
    """Chat with a model (streaming, KV cache on), using the template it was trained with."""
    from lmforge.inference.chat import DEMO_PROMPTS, answer, interactive
    from lmforge.inference.engine import Engine, SamplingParams

    try:
        engine = Engine.load(model, adapter=adapter, template=template)
    except USER_ERRORS as exc:
        _fail(exc, traceback)
        return
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    out = Console()
    if prompt is not None or demo:
        for message in [prompt] if prompt is not None else DEMO_PROMPTS:
            out.print(f"[bold green]you[/]: {escape(message)}")
            answer(engine, [], message, params, out, system)
        return
    if not sys.stdin.isatty():
        console.print("[dim]reading prompts from standard input, one per line[/]")
    interactive(engine, params, system)


@config_app.command("show")
def config_show(
    config: Annotated[Path, typer.Argument(help="YAML config.")],
    overrides: Annotated[list[str] | None, typer.Argument(help="Overrides: section.key=value ...")] = None,
    traceback: Annotated[bool, TRACEBACK] = False,
) -> None:
    """Print the resolved config: defaults filled in, overrides applied, validated."""
    try:
        cfg = load_config(config, overrides or [])
    except USER_ERRORS as exc:
        _fail(exc, traceback)
        return
    typer.echo(dump_config(cfg), nl=False)


@config_app.command("keys")
def config_keys(
    section: Annotated[str | None, typer.Argument(help="Only keys of this section (e.g. train).")] = None,
) -> None:
    """List every config key with its type, default and help."""
    table = Table(show_lines=False)
    for column in ("key", "type", "default", "help"):
        table.add_column(column, overflow="fold")
    for key, kind, default, help_text in iter_keys():
        if section is None or key.startswith(section + "."):
            table.add_row(key, kind, default, help_text)
    Console(width=200).print(table)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
